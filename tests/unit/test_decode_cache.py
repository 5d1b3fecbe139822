"""The decode cache: an instruction decoded once is moved to the next address
its bytes are found at, and the answer is the one both decoders would give
there (every field, every refusal and its message)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.arch.x86_64.insn import decode
from qprobes.errors import InstructionError
from tests.unit.test_arch_insn import DECODE_TABLE
from tests.unit.test_arch_insn_decoders import DECISIONS

A = 0xFFFF_FFFF_8123_4560
B = 0xFFFF_FFFF_8FED_0003
LOW = 0x7FFF_FFF0  # a 0x67 target wraps differently here

EXTRA = [
    "0f0b786566 90",  # the Xen emulate prefix before a nop: one instruction
    "0f0b6b766d 488b0500100000",  # the KVM one before a rip-relative load
    "0f0b",  # a plain ud2
    "670fb94012",  # UBSAN's ud1 (capstone is one byte short)
    "0fb9cc",
    "0fffc0",
    "488b05f0ffffff",
    "678b05f0ffffff",
    "0f1f440000",
    "e8fbffffff",
    "ff",  # truncated
    "17",  # invalid in 64-bit mode
]

CODES = sorted(
    {d.hexbytes.replace(" ", "") for d in DECODE_TABLE}
    | {d.hexbytes.replace(" ", "") for d in DECISIONS}
    | {h.replace(" ", "") for h in EXTRA}
)


def outcome(code: bytes, addr: int) -> object:
    """What decoding gives: the instruction, or the refusal's type and message."""
    try:
        return decode(code, addr)
    except InstructionError as exc:
        return (type(exc), str(exc))


def full(code: bytes, addr: int) -> object:
    try:
        return x86insn._decode_full(code, addr)
    except InstructionError as exc:
        return (type(exc), str(exc))


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    x86insn._DECODED.clear()
    yield
    x86insn._DECODED.clear()


@pytest.mark.parametrize("hexbytes", CODES)
def test_a_cached_decode_equals_a_fresh_one_at_every_address(hexbytes: str) -> None:
    raw = bytes.fromhex(hexbytes)
    for n, addr in enumerate((A, B, LOW, A + 1, 0)):
        tail = bytes([0x90, 0xC3, 0x48, 0x0F][n % 4]) * 8  # other bytes after it each time
        assert outcome(raw + tail, addr) == full(raw + tail, addr), (hexbytes, hex(addr))


def test_the_second_decode_of_the_same_bytes_runs_no_capstone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = decode(bytes.fromhex("488b0500100000 90"), A)

    def no_capstone() -> object:
        raise AssertionError("capstone ran for bytes decoded before")

    monkeypatch.setattr(x86insn, "_capstone", no_capstone)
    again = decode(bytes.fromhex("488b0500100000 c3"), B)
    assert again.addr == B and again.riprel_target == B + 7 + 0x1000
    assert (again.raw, again.mnemonic, again.op_str) == (first.raw, first.mnemonic, first.op_str)
    # A relative branch: its target (capstone's operand) moves with it...
    monkeypatch.undo()
    decode(bytes.fromhex("e800010000"), A)
    monkeypatch.setattr(x86insn, "_capstone", no_capstone)
    call = decode(bytes.fromhex("e800010000"), B)
    assert (call.branch_target, call.op_str) == (B + 5 + 0x100, f"{B + 5 + 0x100:#x}")
    # ...within the kernel half; below it, decoded afresh.
    with pytest.raises(AssertionError, match="capstone ran"):
        decode(bytes.fromhex("e800010000"), LOW)


def test_random_bytes_decode_the_same_with_the_cache() -> None:
    rng = random.Random(7)
    # Short random instructions repeat often enough to hit the cache.
    pool = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4))) for _ in range(300)]
    for _ in range(3000):
        code = rng.choice(pool) + bytes(rng.randrange(256) for _ in range(12))
        addr = rng.choice((A, B, LOW)) + rng.randrange(1 << 20)
        assert outcome(code, addr) == full(code, addr), (code.hex(), hex(addr))
    assert x86insn._DECODED  # it did cache


def test_capstones_layout_read_from_its_c_structure_is_its_detail() -> None:
    """_cs_layout reads the encoding and the operands' bases from capstone's
    C structure: the same values as its Python detail API, on the tables
    and on random bytes."""
    from capstone import x86_const

    md = x86insn._capstone()
    rng = random.Random(9)
    codes = [bytes.fromhex(h) for h in CODES] + [bytes(rng.randrange(256) for _ in range(15))
                                                 for _ in range(3000)]  # fmt: skip
    seen = 0
    for code in codes:
        window = (code + bytes(15))[:15]
        ci = next(md.disasm(window, A, 1), None)
        if ci is None:
            continue
        enc, riprel = x86insn._cs_layout(ci)
        ref = next(md.disasm(window, A, 1))
        want = ref.encoding
        assert (enc.modrm_offset, enc.disp_offset, enc.disp_size, enc.imm_offset,
                enc.imm_size) == (want.modrm_offset, want.disp_offset, want.disp_size,
                                  want.imm_offset, want.imm_size), window.hex()  # fmt: skip
        assert riprel == any(op.type == x86_const.X86_OP_MEM and op.mem.base in
                             (x86_const.X86_REG_RIP, x86_const.X86_REG_EIP)
                             for op in ref.operands), window.hex()  # fmt: skip
        seen += riprel
    assert seen > 3
