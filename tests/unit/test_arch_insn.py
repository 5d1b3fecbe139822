"""Decoding, analysis and slot copies for x86_64 (qprobes.arch.x86_64.insn).

Encodings were assembled with GNU as 2.40 (``as --64``) and read back with
``objdump -d``; the expected fields are worked out by hand from the Intel SDM
Vol. 2 (prefixes 2.1.1, ModRM/SIB 2.1.5, REX 2.2.1, VEX/EVEX 2.3/2.7).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from qprobes.arch.x86_64.insn import (
    INT3,
    JMP_REL32,
    MAX_INSN_SIZE,
    SLOT_SIZE,
    Fixup,
    Insn,
    analyze,
    boosted_copy,
    can_probe,
    copy_instruction,
    decode,
    decode_function,
    instruction_boundaries,
    skip_prefixes,
    synthesize_reljump,
)
from qprobes.errors import InstructionError, SlotRangeError

A = 0xFFFF_FFFF_8123_4560  # a kernel text address
SLOT = 0xFFFF_FFFF_A000_1000  # a slot in the module area, within ±2 GiB of A
M64 = (1 << 64) - 1


def insn(hexbytes: str, addr: int = A) -> Insn:
    return decode(bytes.fromhex(hexbytes), addr)


# --- decode --------------------------------------------------------------------


@dataclass(frozen=True)
class D:
    """Expected decode fields (None: not checked)."""

    hexbytes: str
    length: int
    opcode: str
    prefixes: str = ""
    rex: int | None = None
    modrm: int | None = None
    disp: tuple[int, int] | None = None  # (offset, size)
    imm: tuple[int, int] | None = None  # (offset, size)
    riprel_target: int | None = None
    branch_target: int | None = None
    vex: str = ""


DECODE_TABLE = [
    # Linux 6.1 hot sites (FIELD-NOTES): per-CPU inc with a gs prefix.
    D("65ff0545230100", 7, "ff", "65", None, 0x05, (3, 4), None, A + 7 + 0x12345),
    D("9c", 1, "9c"),  # pushfq
    D("fa", 1, "fa"),  # cli
    D("fb", 1, "fb"),  # sti
    D("0f1f440000", 5, "0f1f", modrm=0x44, disp=(4, 1)),  # ftrace nop, SIB at 3
    D("662e0f1f840000000000", 10, "0f1f", "662e", None, 0x84, (6, 4)),  # padding nop
    # rip-relative with an immediate after the displacement.
    D("813d0010000044332211", 10, "81", "", None, 0x3D, (2, 4), (6, 4), A + 10 + 0x1000),
    D("4883050010000007", 8, "83", "", 0x48, 0x05, (3, 4), (7, 1), A + 8 + 0x1000),
    D("c6050010000001", 7, "c6", "", None, 0x05, (2, 4), (6, 1), A + 7 + 0x1000),
    # capstone says disp_size 2 here (it follows the 66 prefix); it is 4.
    D("66c70500100000 3412", 9, "c7", "66", None, 0x05, (3, 4), (7, 2), A + 9 + 0x1000),
    D("488d0500100000", 7, "8d", "", 0x48, 0x05, (3, 4), None, A + 7 + 0x1000),  # lea
    D("488b05f0ffffff", 7, "8b", "", 0x48, 0x05, (3, 4), None, A + 7 - 0x10),  # disp < 0
    D("f0ff0500100000", 7, "ff", "f0", None, 0x05, (3, 4), None, A + 7 + 0x1000),  # lock
    # 0x67: eip-relative, the address is truncated to 32 bits.
    D("678b0500100000", 7, "8b", "67", None, 0x05, (3, 4), None, (A + 7 + 0x1000) & 0xFFFF_FFFF),
    # REX forms.
    D("48cf", 2, "cf", rex=0x48),  # iretq
    D("48cb", 2, "cb", rex=0x48),  # lretq
    D("41ffd3", 3, "ff", rex=0x41, modrm=0xD3),  # call *%r11
    # A REX cancelled by a later prefix is not the REX of the instruction.
    D("4866ffc0", 4, "ff", "4866", None, 0xC0),  # inc ax
    # Group 5 and absolute forms.
    D("ff14250000ff81", 7, "ff", modrm=0x14, disp=(3, 4)),  # call *0xffffffff81ff0000
    D("ff1500100000", 6, "ff", "", None, 0x15, (2, 4), None, A + 6 + 0x1000),
    D("ffe0", 2, "ff", modrm=0xE0),
    D("ff2500100000", 6, "ff", "", None, 0x25, (2, 4), None, A + 6 + 0x1000),
    D("3effe0", 3, "ff", "3e", None, 0xE0),  # notrack jmp *%rax
    D("a10000000000000080", 9, "a1", disp=(1, 8)),  # movabs eax, moffs64
    # Returns.
    D("c3", 1, "c3"),
    D("c21000", 3, "c2", imm=(1, 2)),
    D("f3c3", 2, "c3", "f3"),
    # Relative branches.
    D("e800010000", 5, "e8", imm=(1, 4), branch_target=A + 5 + 0x100),
    D("2ee800010000", 6, "e8", "2e", imm=(2, 4), branch_target=A + 6 + 0x100),
    D("7410", 2, "74", imm=(1, 1), branch_target=A + 2 + 0x10),
    D("75f0", 2, "75", imm=(1, 1), branch_target=A + 2 - 0x10),
    D("0f8400100000", 6, "0f84", imm=(2, 4), branch_target=A + 6 + 0x1000),
    D("e900100000", 5, "e9", imm=(1, 4), branch_target=A + 5 + 0x1000),
    D("ebfe", 2, "eb", imm=(1, 1), branch_target=A),  # jmp to self
    D("e210", 2, "e2", imm=(1, 1), branch_target=A + 2 + 0x10),  # loop
    D("e310", 2, "e3", imm=(1, 1), branch_target=A + 2 + 0x10),  # jrcxz
    D("c7f800010000", 6, "c7", modrm=0xF8, imm=(2, 4), branch_target=A + 6 + 0x100),  # xbegin
    # Ordinary instructions.
    D("55", 1, "55"),
    D("5d", 1, "5d"),
    D("4889e5", 3, "89", rex=0x48, modrm=0xE5),
    D("c8100000", 4, "c8", imm=(3, 1)),  # enter: capstone names the last immediate
    # mov from cr0 ignores ModRM.mod: 05 is not rip-relative here.
    D("0f2005", 3, "0f20", modrm=0x05),
    # VEX, EVEX, XOP and three-byte maps.
    D("c5fe6f0500100000", 8, "6f", "", None, 0x05, (4, 4), None, A + 8 + 0x1000, vex="c5fe"),
    D(
        "62f17e486f0500100000",
        10,
        "6f",
        "",
        None,
        0x05,
        (6, 4),
        None,
        A + 10 + 0x1000,
        vex="62f17e48",
    ),
    D("c4e27d580510000000", 9, "58", "", None, 0x05, (5, 4), None, A + 9 + 0x10, vex="c4e27d"),
    D("8fe978e1c0", 5, "e1", modrm=0xC0, vex="8fe978"),
    # capstone again says disp_size 2 because of the 66 prefix.
    D("660f3a0f0510000000ff", 10, "0f3a0f", "66", None, 0x05, (5, 4), (9, 1), A + 10 + 0x10),
]


@pytest.mark.parametrize("d", DECODE_TABLE, ids=lambda d: d.hexbytes.replace(" ", ""))
def test_decode(d: D) -> None:
    raw = bytes.fromhex(d.hexbytes)
    i = decode(raw + b"\x90" * 4, A)  # trailing bytes are not part of it
    assert i.addr == A
    assert i.length == d.length == len(raw)
    assert i.raw == raw
    assert i.next_addr == A + d.length
    assert i.opcode.hex() == d.opcode
    assert i.prefixes.hex() == d.prefixes
    assert i.rex == d.rex
    assert i.vex.hex() == d.vex
    if d.modrm is not None:
        assert i.modrm == d.modrm
    if d.disp is None:
        assert (i.disp_offset, i.disp_size) == (None, 0)
    else:
        assert (i.disp_offset, i.disp_size) == d.disp
    if d.imm is not None:
        assert (i.imm_offset, i.imm_size) == d.imm
    assert i.is_riprel == (d.riprel_target is not None)
    assert i.riprel_target == (None if d.riprel_target is None else d.riprel_target & M64)
    assert i.branch_target == (None if d.branch_target is None else d.branch_target & M64)


def test_decode_displacement_value() -> None:
    assert insn("488b05f0ffffff").disp == -0x10
    assert insn("0f1f440000").disp == 0
    assert insn("0f1f4000").disp == 0
    assert insn("c3").disp == 0


def test_decode_emulate_prefix() -> None:
    # XEN_EMULATE_PREFIX cpuid: one instruction for Linux's decoder.
    i = insn("0f0b78656e0fa2")
    assert i.length == 7
    assert i.emulate_prefix == bytes.fromhex("0f0b78656e")
    assert i.mnemonic == "cpuid"
    assert i.opcode.hex() == "0fa2"
    assert i.opcode_offset == 5
    # A plain ud2 (BUG()) is two bytes, also when the bytes after it only
    # look like the prefix.
    assert insn("0f0b").length == 2
    assert insn("0f0b78656e").length == 2


def test_decode_wraps_at_top_of_address_space() -> None:
    i = insn("e900000000", M64 - 2)
    assert i.branch_target == 2
    assert i.next_addr == 2


@pytest.mark.parametrize(
    "hexbytes",
    [
        "ea000000000000",  # jmp far ptr16:32: invalid in 64-bit mode
        "9a000000000000",  # call far ptr16:32
        "17",  # pop ss
        "1f",  # pop ds (the kernel's POP_SS_OPCODE)
        "ce",  # into
        "06",  # push es
        "60",  # pusha
        "d6",  # salc
        "",
        "0f",  # truncated
        "e80000",  # truncated call rel32
        "ff15000010",  # truncated rip-relative call
        "0f18c0",  # reserved-nop register form: capstone 5 refuses it
    ],
)
def test_decode_rejects(hexbytes: str) -> None:
    with pytest.raises(InstructionError) as exc:
        decode(bytes.fromhex(hexbytes), A)
    assert exc.value.addr == A
    assert "cannot decode" in str(exc.value)


def test_decode_rejects_bad_address() -> None:
    with pytest.raises(ValueError):
        decode(b"\xc3", -1)
    with pytest.raises(ValueError):
        decode(b"\xc3", 1 << 64)


@pytest.mark.parametrize(
    ("hexbytes", "offset"),
    [("c3", 0), ("f3c3", 1), ("4889e5", 1), ("664889e5", 2), ("2e66f0", 3), ("c5fe6f", 0)],
)
def test_skip_prefixes(hexbytes: str, offset: int) -> None:
    assert skip_prefixes(bytes.fromhex(hexbytes)) == offset


# --- linear decoding -------------------------------------------------------------

# A function in the shape of _raw_spin_lock_irqsave, hand-assembled:
FUNC = bytes.fromhex(
    "f30f1efa"  # +0  endbr64
    "0f1f440000"  # +4  nop dword ptr [rax + rax]   (ftrace)
    "55"  # +9  push rbp
    "4889e5"  # +10 mov rbp, rsp
    "9c"  # +13 pushfq
    "58"  # +14 pop rax
    "fa"  # +15 cli
    "65ff0545230100"  # +16 inc dword ptr gs:[rip + 0x12345]
    "5d"  # +23 pop rbp
    "c3"  # +24 ret
    "cc"  # +25 int3 (straight-line-speculation padding)
)
FUNC_STARTS = [0, 4, 9, 10, 13, 14, 15, 16, 23, 24, 25]


def test_instruction_boundaries() -> None:
    assert instruction_boundaries(FUNC, A) == [A + o for o in FUNC_STARTS]
    insns = decode_function(FUNC, A)
    assert [i.mnemonic for i in insns][:3] == ["endbr64", "nop", "push"]
    assert sum(i.length for i in insns) == len(FUNC)


def test_boundaries_recover_armed_probes() -> None:
    # An int3 armed over "mov rbp, rsp" makes the next two bytes decode as
    # "mov eax, esp"... unless the original byte is put back first.
    armed = FUNC[:10] + bytes((INT3,)) + FUNC[11:]
    assert instruction_boundaries(armed, A) != [A + o for o in FUNC_STARTS]
    assert instruction_boundaries(armed, A, patches={A + 10: b"\x48"}) == [
        A + o for o in FUNC_STARTS
    ]


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (0, True),
        (4, True),
        (13, True),
        (16, True),
        (25, True),
        (1, False),
        (17, False),
        (26, False),
    ],
)
def test_can_probe(offset: int, expected: bool) -> None:
    assert can_probe(FUNC, A, A + offset) is expected


def test_can_probe_needs_only_the_bytes_before_addr() -> None:
    assert can_probe(FUNC[:17], A, A + 16)


def test_decode_function_truncated() -> None:
    with pytest.raises(InstructionError) as exc:
        decode_function(FUNC[:20], A)
    assert exc.value.addr == A + 16


def test_patch_outside_code() -> None:
    with pytest.raises(ValueError):
        decode_function(FUNC, A, patches={A + len(FUNC): b"\x90"})


# --- analysis --------------------------------------------------------------------


@dataclass(frozen=True)
class An:
    hexbytes: str
    fixup: Fixup
    boostable: bool
    if_modifier: bool = False
    rejected: str | None = None  # a word of the reason


R, P, CR, CI, J, RET, IRET, I3 = (
    Fixup.RELATIVE,
    Fixup.PUSHF,
    Fixup.CALL_REL,
    Fixup.CALL_INDIRECT,
    Fixup.JMP_INDIRECT,
    Fixup.RET,
    Fixup.IRET,
    Fixup.INT3,
)

ANALYSIS_TABLE = [
    # hot sites
    An("65ff0545230100", R, True),  # inc gs:[rip + x]: Grp5 /0 boosts
    An("9c", P, True),  # pushfq: the boosted copy pushes the guest's own flags
    An("669c", P, True),  # pushfw
    An("fa", R, True, if_modifier=True),  # cli
    An("fb", R, False, if_modifier=True),  # sti: interrupt shadow
    An("9d", R, True, if_modifier=True),  # popfq
    An("0f1f440000", R, True),  # ftrace nop
    An("662e0f1f840000000000", R, True),  # two-byte opcode: 2e is fine
    # rip-relative
    An("813d0010000044332211", R, True),
    An("4883050010000007", R, True),
    An("c6050010000001", R, True),
    An("488d0500100000", R, True),
    An("678b0500100000", R, False),  # address-size prefix
    # returns and iret
    An("c3", RET, True),
    An("f3c3", RET, True),  # repz ret: 2.6 missed the f3
    An("c21000", RET, True),
    An("48cb", RET, True),
    An("cb", RET, True),
    An("48cf", IRET, False, if_modifier=True),
    An("6648cf", IRET, False, if_modifier=True),  # REX.W wins over 66: iretq
    # calls
    An("e800010000", CR, True),  # relocated: push the return address, jmp
    An("2ee800010000", CR, False),  # cs call to a retpoline thunk
    An("ffd0", CI, False),
    An("41ffd3", CI, False),
    An("ff14250000ff81", CI, False),
    An("ff1500100000", CI, False),  # rip-relative AND indirect call
    # jumps
    An("ffe0", J, True),
    An("41ffe3", J, True),
    An("3effe0", J, True),  # notrack
    An("ff2500100000", J, True),  # rip-relative indirect jmp
    An("7410", R, True),  # jcc rel8: relocated
    An("0f8400100000", R, True),  # jcc rel32: relocated
    An("3e7410", R, True),  # branch hint dropped
    An("2e7410", R, False),  # CS prefix: can_boost says no
    An("ebfe", R, True),
    An("e900100000", R, True),
    An("e210", R, False),  # loop: rel8 only
    An("e310", R, False),  # jrcxz
    An("67e310", R, False),  # jecxz
    # groups decided by ModRM.reg, not the opcode byte
    An("ffc0", R, True),  # inc eax, ff /0 (the 2.6 opcode-vs-modrm trap, see below)
    An("ffc8", R, True),  # dec eax, ff /1
    An("ff30", R, True),  # push qword ptr [rax], ff /6
    An("fe05ffffffff", R, True),  # inc byte ptr [rip - 1], fe /0
    An("48c1e003", R, True),  # shl rax, 3 (Grp2)
    An("f7d8", R, True),  # neg eax (Grp3)
    # ordinary and privileged, allowed
    An("55", R, True),
    An("5d", R, True),
    An("4889e5", R, True),
    An("c8100000", R, True),  # enter
    An("c9", R, True),  # leave
    An("0fa2", R, False),  # cpuid: twobyte_is_boostable says no
    An("0f30", R, False),  # wrmsr
    An("0f32", R, False),  # rdmsr
    An("0f31", R, True),  # rdtsc
    An("0f20d8", R, True),  # mov rax, cr3
    An("f3a4", R, True),  # rep movsb
    An("f0ff0500100000", R, True),  # lock inc [rip + x]
    An("0f0d08", R, False),  # prefetchw
    An("f390", R, True),  # pause
    An("f30f1efa", R, False),  # endbr64: twobyte_is_boostable says no
    An("c5fe6f0500100000", R, False),  # VEX
    An("62f17e486f0500100000", R, False),  # EVEX
    An("660f3a0f0510000000ff", R, False),  # three-byte map
    An("d9c0", R, False),  # fld st0: x87
    # int3 original: stepped in place
    An("cc", I3, False),
    # rejected
    An("8ed0", R, False, rejected="ss"),
    An("8e1500100000", R, False, rejected="ss"),
    An("f1", R, False, rejected="int1"),
    An("cd80", R, False, rejected="int n"),
    An("2ecc", R, False, rejected="prefixes"),
    An("0f0b", R, False, rejected="BUG"),
    An("0fb9c0", R, False, rejected="BUG"),
    An("0fffc0", R, False, rejected="BUG"),
    An("0f0b78656e0fa2", R, False, rejected="emulation"),
    An("0f05", R, False, rejected="privilege"),
    An("480f07", R, False, rejected="privilege"),
    An("0f34", R, False, rejected="privilege"),
    An("0f35", R, False, rejected="privilege"),
    An("0f01f8", R, False, rejected="swapgs"),
    An("0f01c1", R, False, rejected="VM"),
    An("0f01c2", R, False, rejected="VM"),
    An("f4", R, False, rejected="hlt"),
    An("0f01c9", R, False, rejected="sleep"),
    An("c7f800010000", R, False, rejected="xbegin"),
    An("66eb10", R, False, rejected="operand-size"),
    An("66c3", RET, False, rejected="operand-size"),
    An("66ffd0", CI, False, rejected="operand-size"),
    # far indirect call/jmp (ff /3, ff /5): refused whatever the operand size
    An("ff18", CI, False, rejected="far indirect call (ff /3) with a 32-bit operand"),
    An("ff1d00100000", CI, False, rejected="far indirect call (ff /3) with a 32-bit"),
    An("66ff1d00100000", CI, False, rejected="far indirect call (ff /3) with a 16-bit"),
    An("4866ff1d00100000", CI, False, rejected="with a 16-bit"),  # REX before 66: ignored
    An("48ff1d00100000", CI, False, rejected="far indirect call (ff /3, m16:64): AMD"),
    An("ff28", J, False, rejected="far indirect jmp (ff /5) with a 32-bit operand"),
    An("66ff2d00100000", J, False, rejected="far indirect jmp (ff /5) with a 16-bit"),
    An("48ff2d00100000", J, False, rejected="far indirect jmp (ff /5, m16:64): AMD"),
    # 32- and 16-bit iret; iretq (above) is stepped
    An("cf", IRET, False, if_modifier=True, rejected="32-bit iret"),
    An("66cf", IRET, False, if_modifier=True, rejected="16-bit iret"),
]


@pytest.mark.parametrize("a", ANALYSIS_TABLE, ids=lambda a: a.hexbytes)
def test_analyze(a: An) -> None:
    result = analyze(insn(a.hexbytes))
    assert result.fixup is a.fixup
    assert result.if_modifier is a.if_modifier
    assert result.boostable is a.boostable, result.boost_reason
    if a.rejected is None:
        assert result.rejected is None
    else:
        assert result.rejected is not None
        assert a.rejected in result.rejected
    assert result.is_int3 is (a.fixup is Fixup.INT3)


def test_fixup_properties() -> None:
    assert {f for f in Fixup if f.rip_is_right} == {CI, J, RET, IRET}
    assert {f for f in Fixup if f.reads_tos} == {P, CR, CI}


def fixup_26(raw: bytes) -> str:
    """The classification of 2.6's resume_execution, byte tests as written.

    It skips only a REX prefix, then switches on the opcode and, for 0xff,
    tests ``*insn`` (the opcode byte 0xff itself) where ModRM was meant.
    """
    i = 1 if 0x40 <= raw[0] <= 0x4F else 0
    op = raw[i]
    if op == 0x9C:
        return "pushf"
    if op in (0xC3, 0xCB, 0xC2, 0xCA):
        return "ret"
    if op == 0xE8:
        return "call_rel"
    if op == 0xFF:
        if (op & 0x30) == 0x10:
            return "call_indirect"
        if (op & 0x31) in (0x20, 0x21):
            return "jmp_indirect"
    if op == 0xEA:
        return "jmp_absolute"
    return "relative"


@pytest.mark.parametrize(
    ("hexbytes", "ours", "v26"),
    [
        # Group 5: the opcode byte 0xff has bits 5:4 = 11, so 2.6's tests
        # never match and every indirect call/jmp is relocated like a
        # relative branch (rip wrong, return address left in the slot).
        ("ffd0", "call_indirect", "relative"),
        ("41ffd3", "call_indirect", "relative"),
        ("ff1500100000", "call_indirect", "relative"),
        ("ffe0", "jmp_indirect", "relative"),
        ("ff2500100000", "jmp_indirect", "relative"),
        # ff /0 (inc) is "relative" in both: the trap is in the calls/jmps.
        ("ffc0", "relative", "relative"),
        # Legacy prefixes were not skipped by 2.6's resume_execution.
        ("f3c3", "ret", "relative"),
        ("2ee800010000", "call_rel", "relative"),
        ("3effe0", "jmp_indirect", "relative"),
        # No iret case in 2.6 x86_64.
        ("48cf", "iret", "relative"),
        # Where 2.6 was right.
        ("c3", "ret", "ret"),
        ("e800010000", "call_rel", "call_rel"),
        ("9c", "pushf", "pushf"),
    ],
)
def test_26_opcode_vs_modrm_trap(hexbytes: str, ours: str, v26: str) -> None:
    raw = bytes.fromhex(hexbytes)
    assert fixup_26(raw) == v26
    assert analyze(decode(raw, A)).fixup.value == ours


def test_26_modrm_tests_are_reg_tests() -> None:
    # The intended tests on ModRM pick exactly reg 2,3 and reg 4,5.
    calls = {m for m in range(256) if (m & 0x30) == 0x10}
    jmps = {m for m in range(256) if (m & 0x31) in (0x20, 0x21)}
    assert calls == {m for m in range(256) if (m >> 3) & 7 in (2, 3)}
    assert jmps == {m for m in range(256) if (m >> 3) & 7 in (4, 5)}


# --- slot copies -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("hexbytes", "copy"),
    [
        # new_disp = target - (SLOT + length) = A - SLOT + old_disp
        ("65ff0545230100", "65ff05a55824e1"),
        ("ff1500100000", "ff15604523e1"),
        ("813d0010000044332211", "813d604523e144332211"),  # immediate kept
        ("4883050010000007", "488305604523e107"),
        ("c6050010000001", "c605604523e101"),
        ("66c705001000003412", "66c705604523e13412"),
        ("c5fe6f0500100000", "c5fe6f05604523e1"),
        ("62f17e486f0500100000", "62f17e486f05604523e1"),
        ("678b0500100000", "678b05604523e1"),
        # not rip-relative: unchanged, relative branches included
        ("0f1f440000", "0f1f440000"),
        ("7410", "7410"),
        ("e800010000", "e800010000"),
        ("ffd0", "ffd0"),
        ("cc", "cc"),
    ],
)
def test_copy_instruction(hexbytes: str, copy: str) -> None:
    i = insn(hexbytes)
    out = copy_instruction(i, SLOT)
    assert out.hex() == copy
    again = decode(out, SLOT)
    assert again.length == i.length
    assert again.riprel_target == i.riprel_target


def test_copy_instruction_in_place_is_identity() -> None:
    i = insn("65ff0545230100")
    assert copy_instruction(i, A) == i.raw


@pytest.mark.parametrize("slot", [A - (1 << 31) - 0x1000, A - (1 << 32), 0x8000_0000_0000])
def test_copy_instruction_out_of_reach(slot: int) -> None:
    i = insn("65ff0545230100")
    with pytest.raises(SlotRangeError) as exc:
        copy_instruction(i, slot)
    err = exc.value
    assert isinstance(err, InstructionError)
    assert err.addr == A
    assert err.slot_addr == slot
    assert err.target == A + 7 + 0x12345
    assert f"{slot:#x}" in str(err)
    assert f"{A + 7 + 0x12345:#x}" in str(err)
    assert "rip-relative reach" in str(err)


def test_copy_instruction_reach_edges() -> None:
    i = insn("488d0500000000", A - (1 << 32))  # lea rax, [rip]: target = its own end
    target = A - (1 << 32) + 7
    # new_disp = target - (slot + 7): -2**31 and 2**31 - 1 are the limits.
    assert decode(copy_instruction(i, target + (1 << 31) - 7), 0).disp == -(1 << 31)
    assert decode(copy_instruction(i, target - (1 << 31) + 1 - 7), 0).disp == (1 << 31) - 1
    with pytest.raises(SlotRangeError):
        copy_instruction(i, target + (1 << 31) - 6)
    with pytest.raises(SlotRangeError):
        copy_instruction(i, target - (1 << 31) - 7)


def test_copy_instruction_wraps_modulo_2_64() -> None:
    # Kernel text sits in the top 2 GiB: a slot just above 0 is in reach,
    # as the CPU's rip arithmetic wraps.
    i = insn("65ff0545230100")
    out = copy_instruction(i, 0x1000)
    assert decode(out, 0x1000).riprel_target == i.riprel_target


def test_copy_instruction_addr32_always_fits() -> None:
    i = insn("678b0500100000")
    out = copy_instruction(i, 0x1000)
    assert decode(out, 0x1000).riprel_target == i.riprel_target


def test_copy_instruction_rejected() -> None:
    with pytest.raises(InstructionError) as exc:
        copy_instruction(insn("8ed0"), SLOT)
    assert not isinstance(exc.value, SlotRangeError)
    assert "ss" in exc.value.reason


# --- boosted copies -----------------------------------------------------------------


def jmp(from_addr: int, to_addr: int) -> str:
    return (
        bytes((JMP_REL32,)).hex()
        + ((to_addr - from_addr - 5) & 0xFFFF_FFFF).to_bytes(4, "little").hex()
    )


@pytest.mark.parametrize(
    ("hexbytes", "boosted"),
    [
        ("0f1f440000", "0f1f440000" + jmp(SLOT + 5, A + 5)),
        ("65ff0545230100", "65ff05a55824e1" + jmp(SLOT + 7, A + 7)),
        ("9c", "9c" + jmp(SLOT + 1, A + 1)),
        ("c3", "c3" + jmp(SLOT + 1, A + 1)),
        ("ff2500100000", "ff25604523e1" + jmp(SLOT + 6, A + 6)),
        # jmp rel8/rel32: one jmp rel32 to the original target
        ("eb10", jmp(SLOT, A + 2 + 0x10)),
        ("e900100000", jmp(SLOT, A + 5 + 0x1000)),
        # jcc rel8/rel32: jcc rel32 to the original target, then the jmp back
        ("7410", "0f84" + jmp(SLOT + 1, A + 2 + 0x10)[2:] + jmp(SLOT + 6, A + 2)),
        ("3e75f0", "0f85" + jmp(SLOT + 1, A + 3 - 0x10)[2:] + jmp(SLOT + 6, A + 3)),
        ("0f8f00100000", "0f8f" + jmp(SLOT + 1, A + 6 + 0x1000)[2:] + jmp(SLOT + 6, A + 6)),
        # call rel32: push the original return address, jmp to the callee
        ("e800010000", "68" + (A + 5).to_bytes(8, "little")[:4].hex()
         + jmp(SLOT + 5, A + 5 + 0x100)),
    ],
)
def test_boosted_copy(hexbytes: str, boosted: str) -> None:
    out = boosted_copy(insn(hexbytes), SLOT)
    assert out.hex() == boosted
    assert len(out) <= SLOT_SIZE


def test_boosted_copy_known_bytes() -> None:
    # The ftrace nop at A, slot at SLOT: jmp back rel32 = A + 5 - (SLOT + 10).
    assert boosted_copy(insn("0f1f440000"), SLOT).hex() == "0f1f440000e95b3523e1"


@pytest.mark.parametrize("hexbytes", ["2ee800010000", "ffd0", "fb", "48cf", "cc", "e210", "0fa2"])
def test_boosted_copy_not_boostable(hexbytes: str) -> None:
    with pytest.raises(InstructionError) as exc:
        boosted_copy(insn(hexbytes), SLOT)
    assert "not boostable" in str(exc.value)


def test_a_boosted_call_runs_as_the_call_does() -> None:
    """Under unicorn (a paged machine: the addresses are kernel ones): the
    boosted copy of a call leaves the original's return address on the
    stack and rip at the callee."""
    import unicorn.x86_const as X

    from tests.unit.test_recorder import Guest

    call = insn("e800010000")
    g = Guest()
    g.map(SLOT)
    g.write(SLOT, boosted_copy(call, SLOT))
    g.map(A + 5 + 0x100)
    g.write(A + 5 + 0x100, b"\xf4")  # hlt: where the callee starts
    stack = 0xFFFF_C900_0000_8000
    g.map(stack - 0x1000)
    g.uc.reg_write(X.UC_X86_REG_RSP, stack)
    g.uc.emu_start(SLOT, 0, count=2)
    assert g.uc.reg_read(X.UC_X86_REG_RIP) == A + 5 + 0x100  # the callee
    assert g.uc.reg_read(X.UC_X86_REG_RSP) == stack - 8
    assert int.from_bytes(g.read(stack - 8, 8), "little") == A + 5


def test_a_call_whose_return_address_a_push_cannot_hold_is_not_boosted() -> None:
    low = decode(bytes.fromhex("e800010000"), 0x40_0000)  # user text: not sign-extendable
    assert not analyze(low).boostable
    assert "push imm32" in analyze(low).boost_reason


def test_boosted_copy_rejected() -> None:
    with pytest.raises(InstructionError) as exc:
        boosted_copy(insn("f4"), SLOT)
    assert "hlt" in str(exc.value)


def test_boosted_copy_out_of_reach() -> None:
    far = A - (1 << 32)
    with pytest.raises(SlotRangeError) as exc:
        boosted_copy(insn("0f1f440000"), far)
    assert exc.value.addr == A
    assert exc.value.slot_addr == far
    with pytest.raises(SlotRangeError):
        boosted_copy(insn("7410"), far)


def test_synthesize_reljump() -> None:
    assert synthesize_reljump(0x1000, 0x1005).hex() == "e900000000"
    assert synthesize_reljump(0x1000, 0x1000).hex() == "e9fbffffff"
    assert synthesize_reljump(M64 - 4, 0x10).hex() == "e910000000"  # wraps
    with pytest.raises(SlotRangeError):
        synthesize_reljump(0, 1 << 32)


def test_slot_constants() -> None:
    assert MAX_INSN_SIZE == 15
    assert SLOT_SIZE % 16 == 0
    assert SLOT_SIZE >= MAX_INSN_SIZE + 5
    assert INT3 == 0xCC
    assert JMP_REL32 == 0xE9
