"""Fuzzing the binary and symbol-file decoders (hypothesis): BTF blobs, the
kallsyms tables of a kernel image, System.map and /proc/kallsyms text, ORC
entries and the journal's header.

The BTF and kallsyms inputs are the unit tests' kernel-shaped blobs (the
format Linux writes) with bytes flipped, set, inserted, deleted or cut off;
the symbol files are the real samples in tests/unit/data. Each decoder gives
a value or a :class:`~qprobes.errors.QprobesError` subclass; nothing else
escapes, and no loop runs forever.
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from qprobes.errors import QprobesError, SymbolError
from qprobes.linux.orc import OrcEntry, OrcError, OrcLayout
from qprobes.probes.journal import (
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Header,
    JournalError,
    JournalState,
    _pack_header,
    unpack_header,
)
from qprobes.symbols.btf import Btf, BtfError, BtfKind, parse_btf
from qprobes.symbols.kallsyms import KallsymsNotFound, find_kallsyms, parse_kallsyms
from qprobes.symbols.sysmap import parse_system_map
from tests.unit.fuzzing import FUZZ, FUZZ_SLOW, mutated
from tests.unit.test_symbols_btf import kernel_like
from tests.unit.test_symbols_kallsyms import DECOY, build_kallsyms, sample_symbols

SYMBOLS = Path(__file__).parent / "data" / "symbols"

# --- BTF --------------------------------------------------------------------------

BTF_BLOB, _IDS = kernel_like()


def exercise_btf(btf: Btf) -> None:
    """Every lookup a session makes, over every type; errors must be BtfError."""
    for type_id in range(len(btf) + 1):
        for call in (btf.type, btf.resolve, btf.sizeof, btf.type_name):
            with contextlib.suppress(BtfError):
                call(type_id)
    for struct_name, path in [("task_struct", "se.vruntime"), ("task_struct", "comm"),
                              ("task_struct", "mm->pgd"), ("task_struct", "b"),
                              ("task_struct", "sched_wide"), ("task_t", "__state")]:  # fmt: skip
        try:
            btf.struct_member_offset(struct_name, path)
            btf.member_chain(struct_name, path)
        except BtfError:
            pass
    for func in ("do_sys_openat2", "_printk", "cpu_idle"):
        try:
            btf.func_args(func)
            btf.func_return(func)
        except BtfError:
            pass
    with contextlib.suppress(BtfError):
        btf.enumerators("")


def test_the_unmutated_blob_parses() -> None:
    exercise_btf(parse_btf(BTF_BLOB))


@FUZZ_SLOW
@given(mutated(BTF_BLOB, max_edits=4))
@example(BTF_BLOB[:23])
@example(BTF_BLOB[:24])
@example(BTF_BLOB[:765] + bytes((BTF_BLOB[765] ^ 2,)) + BTF_BLOB[766:])
def test_mutated_btf_parses_or_raises(blob: bytes) -> None:
    try:
        btf = parse_btf(blob)
    except BtfError as exc:
        assert str(exc)
        return
    exercise_btf(btf)


def btf_of(types: list[bytes], strings: bytes = b"\0x\0") -> bytes:
    body = b"".join(types)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(body), len(body), len(strings))
    return header + body + strings


def btf_type(kind: BtfKind, size_or_type: int, vlen: int = 0, extra: bytes = b"") -> bytes:
    return struct.pack("<III", 1, int(kind) << 24 | vlen, size_or_type) + extra


# Types that name themselves: a session must get a BtfError, not a RecursionError.
LOOPS = [
    [btf_type(BtfKind.PTR, 1)],
    [btf_type(BtfKind.ARRAY, 0, extra=struct.pack("<III", 1, 1, 4))],
    [btf_type(BtfKind.VAR, 1, extra=struct.pack("<I", 1))],
    [btf_type(BtfKind.FUNC_PROTO, 1, 1, struct.pack("<II", 1, 1))],
    [btf_type(BtfKind.FUNC, 1)],
    [btf_type(BtfKind.CONST, 2), btf_type(BtfKind.PTR, 1)],
    [btf_type(BtfKind.STRUCT, 8, 1, struct.pack("<III", 0, 2, 0)), btf_type(BtfKind.TYPEDEF, 1)],
    [btf_type(BtfKind.STRUCT, 8, 1, struct.pack("<III", 1, 1, 0))],
]


def proto_ladder(n: int) -> list[bytes]:
    """Prototype i takes two pointers to prototype i+1: spelled naively, 2**n names."""
    types = []
    for i in range(n):
        ptr, proto = 2 * i + 1, 2 * i + 2
        types.append(btf_type(BtfKind.PTR, proto))
        nxt = ptr + 2 if i + 1 < n else 0
        types.append(btf_type(BtfKind.FUNC_PROTO, 0, 2, struct.pack("<IIII", 0, nxt, 0, nxt)))
    return types


def anonymous_ladder(n: int) -> list[bytes]:
    """Struct i holds two anonymous struct i+1: searched naively, 2**n visits."""
    types = []
    for i in range(n):
        members = struct.pack("<III", 0, i + 2, 0) * 2 if i + 1 < n else b""
        types.append(btf_type(BtfKind.STRUCT, 8, 2 if i + 1 < n else 0, members))
    return types


LOOPS += [proto_ladder(30), proto_ladder(40), anonymous_ladder(40), anonymous_ladder(70)]


@pytest.mark.parametrize("types", LOOPS, ids=range(len(LOOPS)))
def test_types_that_name_themselves_raise(types: list[bytes]) -> None:
    btf = parse_btf(btf_of(types))
    exercise_btf(btf)
    for type_id in range(1, len(btf) + 1):
        for call in (btf.sizeof, btf.type_name):
            with contextlib.suppress(BtfError):
                call(type_id)
    with pytest.raises(BtfError):
        btf.member_chain("x", "nosuch")


# --- kallsyms ----------------------------------------------------------------------

_SYMS = sample_symbols(count=60)
KALLSYMS = build_kallsyms(_SYMS, lead=b"\xcc" * 256 + DECOY + b"\0" * 8).image


def test_the_unmutated_tables_parse() -> None:
    assert [s for s, _, _ in _SYMS] == find_kallsyms(KALLSYMS).names


@FUZZ_SLOW
@given(mutated(KALLSYMS, max_edits=4))
def test_mutated_kallsyms_parse_or_raise(image: bytes) -> None:
    try:
        table = parse_kallsyms(image)
    except KallsymsNotFound as exc:
        assert str(exc)
        return
    assert len(table.entries) > 0


SYSTEM_MAPS = [p.read_bytes() for p in sorted(SYMBOLS.iterdir())]


@FUZZ
@given(st.sampled_from(range(len(SYSTEM_MAPS))).flatmap(lambda i: mutated(SYSTEM_MAPS[i])))
@example(b"-1 T f\n")
@example(b"0x10 T f\n")
@example(b"1_0 T f\n")
@example(b" +10 T f\n")
def test_mutated_system_maps_parse_or_raise(raw: bytes) -> None:
    text = raw.decode("latin-1")
    try:
        table = parse_system_map(text, source="sample")
    except SymbolError as exc:
        assert "sample" in str(exc)
        return
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[1] not in "UuNn":
            assert all(c in "0123456789abcdefABCDEF" for c in fields[0]), line
            assert table.lookup(fields[2]) is not None


# --- ORC entries -------------------------------------------------------------------

V61 = OrcLayout(6, (32, 4), (36, 4), (40, 2), (42, 1), None)
V64 = OrcLayout(6, (32, 4), (36, 4), (40, 3), None, (43, 1))


@FUZZ
@given(st.sampled_from([V61, V64]), st.binary(max_size=8))
@example(V61, b"")
@example(V64, b"\x01\x02\x03")
def test_orc_entries_decode_or_raise(layout: OrcLayout, raw: bytes) -> None:
    try:
        entry = layout.decode(raw)
    except OrcError as exc:
        assert len(raw) != layout.size
        assert str(len(raw)) in str(exc)
        return
    assert len(raw) == layout.size
    assert isinstance(entry, OrcEntry)
    assert entry.type in ("undefined", "end", "call", "regs", "regs_partial")
    assert entry.sp_reg < 16 and entry.bp_reg < 16


@FUZZ
@given(st.integers(-(2**15), 2**15 - 1), st.integers(-(2**15), 2**15 - 1),
       st.integers(0, 15), st.integers(0, 15), st.integers(0, 4), st.booleans())  # fmt: skip
def test_orc_entry_round_trip(
    sp: int, bp: int, sp_reg: int, bp_reg: int, kind: int, flag: bool
) -> None:
    word = sp_reg | bp_reg << 4 | kind << 8 | int(flag) << 11
    raw = struct.pack("<hhH", sp, bp, word)
    entry = V64.decode(raw)
    names = ["undefined", "end", "call", "regs", "regs_partial"]
    assert entry == OrcEntry(sp, bp, sp_reg, bp_reg, names[kind], False, flag)


# --- the journal's header -----------------------------------------------------------

HEADER = Header(JournalState.ACTIVE, 3, 4242, 1.7e9, "host", "0.1", 0xFFFF_C900_0000_0000,
                0x1234000, False, 1, 2, 3, 4, 5, 6, 7, 2, 3)  # fmt: skip
PACKED = _pack_header(HEADER, 10, 20).ljust(HEADER_SIZE, b"\0")


@FUZZ
@given(st.one_of(mutated(PACKED, max_edits=4), st.binary(max_size=64).map(lambda b: MAGIC + b)))
@example(MAGIC)
@example(PACKED[:100])
def test_journal_headers_unpack_or_raise(raw: bytes) -> None:
    try:
        header = unpack_header(raw)
    except JournalError as exc:
        assert str(exc)
        return
    if raw[:8] != MAGIC:
        assert header is None
        return
    assert header is not None
    assert struct.unpack_from("<I", raw, 8)[0] == VERSION
    assert isinstance(header.state, JournalState)


@FUZZ
@given(
    st.sampled_from(JournalState),
    st.integers(0, 2**32 - 1),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-.", max_size=32),
    st.text("0123456789.+abcdef", max_size=16),
    st.lists(st.integers(0, 2**64 - 1), min_size=8, max_size=8),
    st.integers(0, 64),
    st.integers(0, 64),
)
def test_journal_header_round_trip(
    state: JournalState, pid: int, host: str, version: str, words: list[int], gates: int, ptes: int
) -> None:
    header = Header(state, words[0], pid, 1.7e9, host, version, words[1], words[2], True,
                    *words[3:], gates, ptes)  # fmt: skip
    assert unpack_header(_pack_header(header, 0, 0)) == header


@pytest.mark.parametrize("cut", [8, 12, 100, 183])
def test_a_cut_journal_header_is_a_journal_error(cut: int) -> None:
    with pytest.raises(QprobesError):
        unpack_header(PACKED[:cut])
