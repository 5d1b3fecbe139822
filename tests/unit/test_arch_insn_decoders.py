"""Two decoders on every instruction: capstone cross-checked with iced-x86.

Tables of raw bytes and the decision taken on them: decoded (length and
mnemonic) or refused (the reason). The encodings are from the Intel SDM
Vol. 2 (``serialize`` 0f 01 e8, ``wrmsrns`` 0f 01 c6, ``lkgs`` f2 0f 00 /6,
``enqcmds`` f3 0f 38 f8 /r, ``tdcall`` 66 0f 01 cc, ``seamcall`` 66 0f 01 cf,
FRED's ``erets`` f2 0f 01 ca and ``eretu`` f3 0f 01 ca, UD0 0f ff /r, UD1
0f b9 /r) and the AMD APM Vol. 3 (``vmgexit`` f3 0f 01 d9); the Linux forms
from the kernel's own text (UBSAN's ``ud1 0x12(%eax),%eax``, the static-call
trampolines' ``ud1 %esp,%ecx`` signature).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qprobes.arch.x86_64.insn import (
    adjust_kprobe_offset,
    analyze,
    can_probe,
    decode,
    decode_function,
    flags_image,
    spanning_instruction,
)
from qprobes.errors import DecoderDisagreementError, InstructionError, ProbeError
from qprobes.probes.engine import KprobeEngine
from qprobes.probes.kprobe import Kprobe
from qprobes.symbols.elf import Symbol, SymbolTable
from tests.unit.fuzzing import FUZZ

A = 0xFFFF_FFFF_8123_4560


@dataclass(frozen=True)
class Dec:
    hexbytes: str
    length: int | None  # None: refused
    what: str  # the mnemonic, or a regex the refusal must match


DECISIONS = [
    # capstone 5 cannot decode these; iced-x86 can.
    Dec("0f01e8", None, "iced-x86 reads serialize, capstone cannot decode it"),
    Dec("0f01c6", None, "iced-x86 reads wrmsrns, capstone cannot decode it"),
    Dec("f20f00f0", None, "iced-x86 reads lkgs, capstone cannot decode it"),
    Dec("f30f38f80f", None, "iced-x86 reads enqcmds, capstone cannot decode it"),
    Dec("660f01cc", None, "iced-x86 reads tdcall, capstone cannot decode it"),
    # Same length, another instruction: capstone ignores the mandatory prefix.
    Dec("f20f01ca", None, r"capstone reads clac \(4 bytes\), iced-x86 reads erets \(4 bytes\)"),
    Dec("f30f01ca", None, r"capstone reads clac \(4 bytes\), iced-x86 reads eretu \(4 bytes\)"),
    Dec("660f01cf", None, r"capstone reads encls \(4 bytes\), iced-x86 reads seamcall"),
    Dec("f30f01d9", None, r"capstone reads vmmcall \(4 bytes\), iced-x86 reads vmgexit"),
    # Without the prefix both agree: decoded.
    Dec("0f01ca", 3, "clac"),
    Dec("0f01cf", 3, "encls"),
    Dec("0f01d9", 3, "vmmcall"),
    # Names that differ only in spelling are the same instruction.
    Dec("48bb00000000000011ff", 10, "movabs"),
    Dec("a10000000000000000", 9, "movabs"),
    Dec("48ff1d00100000", 7, "lcall"),
    Dec("48ff2d00100000", 7, "ljmp"),
    Dec("48cb", 2, "retfq"),
    Dec("dfe9", 2, "fucompi"),  # fucomip st(1)
    Dec("dff1", 2, "fcompi"),  # fcomip st(1)
    Dec("dbe4", 2, "fsetpm"),
    Dec("dec0", 2, "faddp"),  # capstone's id says fadd, its mnemonic faddp
    # Random bytes where the names differ for real: refused.
    Dec("0f183f", None, r"capstone reads nop \(3 bytes\), iced-x86 reads prefetchit0"),
    Dec("6748e3cf", None, r"capstone reads jrcxz \(4 bytes\), iced-x86 reads jecxz"),
    # UD0/UD1 take a ModRM (capstone 5 says 3, 2, 2 and 2 bytes).
    Dec("670fb94012", 5, "ud1"),  # UBSAN: ud1 0x12(%eax),%eax
    Dec("0fb9cc", 3, "ud1"),  # static-call trampoline signature
    Dec("0fff00", 3, "ud0"),
    Dec("0fb90500100000", 7, "ud1"),  # rip-relative ModRM, disp32
    # Ordinary kernel instructions.
    Dec("0f1f440000", 5, "nop"),
    Dec("f30f1efa", 4, "endbr64"),
    Dec("f3a4", 2, "rep movsb"),
    Dec("65ff0545230100", 7, "inc"),
    Dec("0f0b", 2, "ud2"),
    Dec("0f0b78656e4889e5", 8, "mov"),  # Xen forced-emulation prefix + mov
    # REX.W beats 66 (SDM Vol. 2, 2.2.1.2): popfq, which capstone reads as popf.
    Dec("66489d", None, r"capstone reads popf \(3 bytes\), iced-x86 reads popfq"),
    # Neither decodes it.
    Dec("06", None, "cannot decode 06 .*invalid in 64-bit mode"),
    Dec("0f01", None, "cannot decode 0f 01 .*truncated"),
]


@pytest.mark.parametrize("d", DECISIONS, ids=lambda d: d.hexbytes)
def test_decode_decision(d: Dec) -> None:
    code = bytes.fromhex(d.hexbytes)
    if d.length is None:
        with pytest.raises(InstructionError, match=d.what) as info:
            decode(code, A)
        assert info.value.addr == A
        return
    got = decode(code + bytes.fromhex("cc" * 15), A)
    assert (got.length, got.mnemonic) == (d.length, d.what)


@pytest.mark.parametrize("hexbytes", [d.hexbytes for d in DECISIONS if "reads" in d.what])
def test_disagreement_has_its_own_error(hexbytes: str) -> None:
    with pytest.raises(DecoderDisagreementError):
        decode(bytes.fromhex(hexbytes), A)


def test_emulate_prefix_before_a_disagreement_is_not_a_plain_ud2() -> None:
    # "ud2; .ascii xen" then erets: refused, not read as ud2 followed by data.
    with pytest.raises(DecoderDisagreementError, match="erets"):
        decode(bytes.fromhex("0f0b78656e f20f01ca"), A)


@pytest.mark.parametrize(
    ("hexbytes", "modrm", "disp", "riprel_target"),
    [
        ("670fb94012", 0x40, (4, 1), None),
        ("0fb9cc", 0xCC, None, None),
        ("0fff00", 0x00, None, None),
        ("0fb90500100000", 0x05, (3, 4), A + 7 + 0x1000),
        ("0fb9442410", 0x44, (4, 1), None),  # SIB, disp8
    ],
)
def test_ud_layout(
    hexbytes: str, modrm: int, disp: tuple[int, int] | None, riprel_target: int | None
) -> None:
    got = decode(bytes.fromhex(hexbytes), A)
    assert got.modrm == modrm and got.modrm_offset == got.opcode_offset + 2
    offset_size = None if got.disp_offset is None else (got.disp_offset, got.disp_size)
    assert offset_size == disp
    assert got.riprel_target == riprel_target and got.imm_offset is None
    assert analyze(got).rejected is not None  # BUG/WARN traps are never probed


# A function with UBSAN's trap: ud1 (5 bytes), nop, ret.
UBSAN_FUNC = bytes.fromhex("670fb94012 90 c3")


@pytest.mark.parametrize(
    ("offset", "expected"), [(0, True), (1, False), (3, False), (4, False), (5, True), (6, True)]
)
def test_can_probe_after_a_ud1(offset: int, expected: bool) -> None:
    assert can_probe(UBSAN_FUNC, A, A + offset) is expected


def test_boundaries_after_a_ud1() -> None:
    insns = decode_function(UBSAN_FUNC, A)
    assert [(i.addr - A, i.mnemonic) for i in insns] == [(0, "ud1"), (5, "nop"), (6, "ret")]


# nop; serialize; nop; ret: capstone cannot decode serialize, iced-x86 can.
SERIALIZE_FUNC = bytes.fromhex("90 0f01e8 90 c3")
# erets (capstone: clac, 4 bytes too) then nop: right length, wrong instruction.
ERETS_FUNC = bytes.fromhex("f20f01ca 90 c3")
# nop; a byte that is no instruction in 64-bit mode; nop; ret.
INVALID_FUNC = bytes.fromhex("90 06 90 c3")


@pytest.mark.parametrize(
    ("code", "offset"),
    [(SERIALIZE_FUNC, 4), (SERIALIZE_FUNC, 5), (ERETS_FUNC, 4), (ERETS_FUNC, 5)],
)
def test_walk_takes_the_length_both_decoders_allow(code: bytes, offset: int) -> None:
    """Only lengths matter on the way to an address: where capstone cannot
    decode an instruction iced-x86 reads (or reads it as another instruction
    of the same length), the boundary after it is still certain."""
    assert spanning_instruction(code, A, A + offset) is None
    assert can_probe(code, A, A + offset)


@pytest.mark.parametrize(("code", "offset", "reason"),
                         [(SERIALIZE_FUNC, 1, "serialize"), (ERETS_FUNC, 0, "erets")])  # fmt: skip
def test_the_uncertain_instruction_itself_is_refused(code: bytes, offset: int, reason: str) -> None:
    with pytest.raises(InstructionError, match=reason):
        decode(code[offset:], A + offset)


def test_inside_an_instruction_only_iced_reads_is_still_inside() -> None:
    got = spanning_instruction(SERIALIZE_FUNC, A, A + 2)
    assert got is not None and (got.addr, got.length) == (A + 1, 3)


@pytest.mark.parametrize("offset", [2, 3])
def test_walk_refuses_past_bytes_neither_decoder_reads(offset: int) -> None:
    with pytest.raises(InstructionError, match="cannot decode 06"):
        spanning_instruction(INVALID_FUNC, A, A + offset)
    with pytest.raises(InstructionError, match="cannot decode 06"):
        can_probe(INVALID_FUNC, A, A + offset)
    assert spanning_instruction(INVALID_FUNC, A, A + 1) is None  # up to it: fine


def test_spanning_instruction_names_the_instruction() -> None:
    got = spanning_instruction(UBSAN_FUNC, A, A + 3)
    assert got is not None and (got.addr, got.length) == (A, 5)


# --- the engine's can_probe (check_kprobe_address_safe) ---------------------------


class FakeText:
    def __init__(self, code: bytes) -> None:
        self.code = code
        self.client = None

    def read(self, addr: int, length: int) -> bytes:
        out = bytearray(length)
        for i in range(length):
            if 0 <= addr + i - A < len(self.code):
                out[i] = self.code[addr + i - A]
        return bytes(out)


def engine_with(code: bytes) -> KprobeEngine:
    engine = KprobeEngine(FakeText(code), (0x7C00000, 4 << 20), A)  # type: ignore[arg-type]
    engine.symbols = SymbolTable([Symbol("f", A, len(code), "func")])
    return engine


@pytest.mark.parametrize(
    ("code", "offset", "refusal"),
    [
        (SERIALIZE_FUNC, 4, None),  # iced-x86's length after serialize: a known boundary
        (ERETS_FUNC, 4, None),
        (SERIALIZE_FUNC, 2, r"\(f\+0x2\) is not an instruction boundary: .* f\+0x1 spans it"),
        (INVALID_FUNC, 2, r"cannot probe 0x\S+ \(f\+0x2\): .* f\+0x1 cannot be .*cannot decode 06"),
        (UBSAN_FUNC, 3, r"\(f\+0x3\) is not an instruction boundary: .* f\+0x0 spans it"),
        (UBSAN_FUNC, 5, None),
        (UBSAN_FUNC, 0, None),
        (SERIALIZE_FUNC, 1, None),  # the serialize itself: refused later, by decode
    ],
)
def test_engine_can_probe(code: bytes, offset: int, refusal: str | None) -> None:
    engine = engine_with(code)
    if refusal is None:
        engine.can_probe(A + offset)
    else:
        with pytest.raises(ProbeError, match=refusal):
            engine.can_probe(A + offset)


# --- the rflags image popf and iret load ---------------------------------------

FLAGS_IMAGES = [
    ("9d", (0, 8)),  # popfq
    ("489d", (0, 8)),
    ("669d", (0, 2)),  # popfw: capstone calls it "popf"
    ("48cf", (16, 8)),  # iretq: RIP, CS, then RFLAGS
    ("6648cf", (16, 8)),
    ("cf", (8, 4)),  # iretd: EIP, CS, EFLAGS in 4-byte words (refused anyway)
    ("66cf", (4, 2)),  # iretw (refused anyway)
    ("9c", None),  # pushf stores flags, it does not load them
    ("c3", None),
    ("fa", None),
]


@pytest.mark.parametrize(("hexbytes", "image"), FLAGS_IMAGES)
def test_flags_image(hexbytes: str, image: tuple[int, int] | None) -> None:
    assert flags_image(decode(bytes.fromhex(hexbytes), A)) == image


# --- endbr64 at a function's entry (arch_adjust_kprobe_addr) -----------------------

ENDBR_FUNC = bytes.fromhex("f30f1efa 0f1f440000 55 c3")  # endbr64; nop5; push; ret

ADJUST = [
    # (function's first bytes, offset asked) -> (offset probed, on the entry)
    ("f30f1efa", 0, 4, True),  # endbr64: past it
    ("f30f1efb", 0, 4, True),  # endbr32
    ("f30f1efa", 4, 4, True),  # +4 is the entry too
    ("f30f1efa", 9, 9, False),
    ("0f1f440000", 0, 0, True),  # no endbr: unchanged
    ("0f1f440000", 4, 4, False),
    ("f30f1e", 0, 0, True),  # cut short: not an endbr
]


@pytest.mark.parametrize(("entry", "offset", "probed", "on_entry"), ADJUST)
def test_adjust_kprobe_offset(entry: str, offset: int, probed: int, on_entry: bool) -> None:
    assert adjust_kprobe_offset(bytes.fromhex(entry), offset) == (probed, on_entry)


@pytest.mark.parametrize(
    ("kprobe", "addr"),
    [
        (Kprobe(symbol_name="f"), A + 4),
        (Kprobe(symbol_name="f", offset=4), A + 4),
        (Kprobe(symbol_name="f", offset=9), A + 9),
        (Kprobe(addr=A), A + 4),  # an address is taken back to its symbol, as Linux does
        (Kprobe(addr=A + 10), A + 10),
    ],
)
def test_engine_probes_past_a_leading_endbr(kprobe: Kprobe, addr: int) -> None:
    assert engine_with(ENDBR_FUNC).resolve(kprobe) == addr


def test_engine_leaves_other_entries_alone() -> None:
    engine = engine_with(bytes.fromhex("0f1f440000 55 c3"))
    assert engine.resolve(Kprobe(symbol_name="f")) == A


# --- the byte scan before the branch sweep ---------------------------------------

_BRANCHES = [  # (opcode bytes, displacement width)
    (b"\xeb", 1), (b"\x74", 1), (b"\x7f", 1), (b"\xe2", 1), (b"\xe3", 1),
    (b"\xe9", 4), (b"\xe8", 4), (b"\x0f\x85", 4), (b"\x0f\x8e", 4), (b"\xc7\xf8", 4),
    (b"\x66\xc7\xf8", 2),  # xbegin rel16: its target is not truncated
]  # fmt: skip


def _iced_targets(code: bytes, start: int, target: int) -> list[int]:
    import iced_x86

    from qprobes.arch.x86_64.insn import _NEAR_BRANCH_KINDS

    return [i.ip for i in iced_x86.Decoder(64, code, ip=start)
            if not i.is_invalid and i.op0_kind in _NEAR_BRANCH_KINDS
            and i.near_branch_target == target]  # fmt: skip


@FUZZ
@given(
    st.binary(min_size=0, max_size=400),
    st.lists(st.tuples(st.integers(0, 399), st.sampled_from(_BRANCHES)), max_size=4),
    st.sampled_from([5, 0, 9, 200, -4096, 1 << 20, -(1 << 30)]),
    st.integers(0, 1 << 20),
)
def test_the_byte_scan_never_misses_a_branch_to_the_target(
    noise: bytes, planted: list[tuple[int, tuple[bytes, int]]], delta: int, where: int
) -> None:
    """Wherever iced-x86 finds a relative branch to the target, on any
    boundaries, the scan says one may be there; and the sweep it guards
    finds the same branches."""
    from qprobes.arch.x86_64.insn import _may_branch_to, quick_branches_to

    start = 0xFFFFFFFF81000000 + where
    target = start + delta
    code = bytearray(noise)
    for at, (opcode, width) in planted:
        end = at + len(opcode) + width
        disp = target - (start + end)
        if end > len(code) or not -(1 << (8 * width - 1)) <= disp < 1 << (8 * width - 1):
            continue
        code[at:end] = opcode + disp.to_bytes(width, "little", signed=True)
    data = bytes(code)
    for offset in range(min(len(data), 16)):  # every boundary iced-x86 may start on
        found = _iced_targets(data[offset:], start + offset, target)
        if found:
            assert _may_branch_to(data, start, target), (data.hex(), offset, found)
    quick = quick_branches_to(data, start, target)
    if quick is not None:
        assert quick == _iced_targets(data, start, target)
