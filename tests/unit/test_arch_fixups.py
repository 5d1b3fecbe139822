"""The resume_execution math (qprobes.arch.x86_64.fixups), with concrete numbers.

Each case is one single-step of a copy: the probe at ORIG, the copy at COPY,
the registers and the word at the top of the stack as the #DB finds them,
and what the guest must be given back.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from qprobes.arch.x86_64.fixups import (
    X86_EFLAGS_IF,
    X86_EFLAGS_PF,
    X86_EFLAGS_RF,
    X86_EFLAGS_TF,
    X86_EFLAGS_ZF,
    KprobeFlags,
    ResumeResult,
    fault_fixup,
    int3_passthrough,
    prepare_singlestep,
    resume_execution,
    set_current_kprobe,
    singlestep_rip,
    step_end_rips,
)
from qprobes.arch.x86_64.insn import analyze, decode

ORIG = 0xFFFF_FFFF_8123_4560
COPY = 0xFFFF_FFFF_A000_1000
RSP = 0xFFFF_C900_0012_3F00
FUNC = 0xFFFF_FFFF_81FF_FF00  # an indirect call/jmp target

TF, IF = X86_EFLAGS_TF, X86_EFLAGS_IF
GUEST = 0x246  # IF | ZF | PF | bit 1, as at most probe hits
STEPPED = 0x146  # GUEST with TF set and IF clear (prepare_singlestep)


def test_flag_values() -> None:
    assert (TF, IF, X86_EFLAGS_ZF, X86_EFLAGS_PF, X86_EFLAGS_RF) == (
        0x100,
        0x200,
        0x40,
        0x4,
        0x10000,
    )
    assert GUEST == IF | X86_EFLAGS_ZF | X86_EFLAGS_PF | 0x2


@pytest.mark.parametrize(
    ("rflags", "if_modifier", "old", "saved"),
    [
        (GUEST, False, IF, IF),
        (GUEST, True, IF, 0),  # cli/sti/popf/iret decide IF themselves
        (GUEST | TF, False, TF | IF, TF | IF),  # the guest single-steps itself
        (GUEST | TF, True, TF | IF, TF),
        (0x46, False, 0, 0),  # interrupts already off
    ],
)
def test_set_current_kprobe(rflags: int, if_modifier: bool, old: int, saved: int) -> None:
    assert set_current_kprobe(rflags, if_modifier) == KprobeFlags(old, saved)


@pytest.mark.parametrize(
    ("rflags", "stepped"),
    [(GUEST, STEPPED), (0x46, 0x146), (GUEST | TF, STEPPED), (0x10246, 0x10146)],
)
def test_prepare_singlestep(rflags: int, stepped: int) -> None:
    assert prepare_singlestep(rflags) == stepped


def test_singlestep_rip() -> None:
    assert singlestep_rip(analyze(decode(b"\xcc", ORIG)), ORIG, COPY) == ORIG
    assert singlestep_rip(analyze(decode(b"\x55", ORIG)), ORIG, COPY) == COPY


@dataclass(frozen=True)
class Case:
    name: str
    hexbytes: str
    rip: int  # after the step
    tos: int | None  # word at rsp after the step
    rflags: int  # after the step
    want_rip: int
    want_tos: int | None
    want_rflags: int
    old: int = IF  # kprobe_old_rflags


CASES = [
    # 0) rip relocated from the copy to the original.
    Case("mov rbp,rsp", "4889e5", COPY + 3, None, STEPPED, ORIG + 3, None, GUEST),
    Case("inc gs:[rip]", "65ff0545230100", COPY + 7, None, STEPPED, ORIG + 7, None, GUEST),
    Case("ftrace nop", "0f1f440000", COPY + 5, None, STEPPED, ORIG + 5, None, GUEST),
    Case("je taken", "7410", COPY + 2 + 0x10, None, STEPPED, ORIG + 2 + 0x10, None, GUEST),
    Case("je not taken", "7410", COPY + 2, None, STEPPED, ORIG + 2, None, GUEST),
    Case("jne back", "75f0", COPY + 2 - 0x10, None, STEPPED, ORIG + 2 - 0x10, None, GUEST),
    Case("jmp rel32", "e900100000", COPY + 0x1005, None, STEPPED, ORIG + 0x1005, None, GUEST),
    Case("loop taken", "e210", COPY + 0x12, None, STEPPED, ORIG + 0x12, None, GUEST),
    Case("jrcxz", "e310", COPY + 0x12, None, STEPPED, ORIG + 0x12, None, GUEST),
    Case("push rbp", "55", COPY + 1, 0x1234, STEPPED, ORIG + 1, None, GUEST),
    # A rep iteration that has not finished leaves rip on the copy: back to
    # the probe (which fires again), as the kernel does.
    Case("rep movsb unfinished", "f3a4", COPY, None, STEPPED, ORIG, None, GUEST),
    # 1) pushf: the pushed word shows the guest's TF/IF, not the step's.
    Case("pushfq", "9c", COPY + 1, STEPPED, STEPPED, ORIG + 1, GUEST, GUEST),
    Case("pushfw", "669c", COPY + 2, STEPPED, STEPPED, ORIG + 2, GUEST, GUEST),
    Case("pushfq, IF off", "9c", COPY + 1, 0x146, 0x146, ORIG + 1, 0x46, 0x46, old=0),
    # 2) call rel32: return address fixed AND rip relocated (the copy's
    # rel32 is relative to the copy).
    Case(
        "call rel32",
        "e800010000",
        COPY + 5 + 0x100,
        COPY + 5,
        STEPPED,
        ORIG + 5 + 0x100,
        ORIG + 5,
        GUEST,
    ),
    Case(
        "cs call rel32",
        "2ee800010000",
        COPY + 6 + 0x100,
        COPY + 6,
        STEPPED,
        ORIG + 6 + 0x100,
        ORIG + 6,
        GUEST,
    ),
    # 2) indirect call: return address fixed, rip is right.
    Case("call *%rax", "ffd0", FUNC, COPY + 2, STEPPED, FUNC, ORIG + 2, GUEST),
    Case("call *%r11", "41ffd3", FUNC, COPY + 3, STEPPED, FUNC, ORIG + 3, GUEST),
    Case("call *[rip+x]", "ff1500100000", FUNC, COPY + 6, STEPPED, FUNC, ORIG + 6, GUEST),
    Case("call *abs", "ff14250000ff81", FUNC, COPY + 7, STEPPED, FUNC, ORIG + 7, GUEST),
    # rip is right: indirect jmp, ret, iret.
    Case("jmp *%rax", "ffe0", FUNC, None, STEPPED, FUNC, None, GUEST),
    Case("notrack jmp", "3effe0", FUNC, None, STEPPED, FUNC, None, GUEST),
    Case("jmp *[rip+x]", "ff2500100000", FUNC, None, STEPPED, FUNC, None, GUEST),
    Case("ret", "c3", FUNC, None, STEPPED, FUNC, None, GUEST),
    Case("repz ret", "f3c3", FUNC, None, STEPPED, FUNC, None, GUEST),
    Case("ret 0x10", "c21000", FUNC, None, STEPPED, FUNC, None, GUEST),
    Case("lretq", "48cb", FUNC, None, STEPPED, FUNC, None, GUEST),
    # iretq popped flags 0x246 (TF clear): IF comes from the popped image.
    Case("iretq", "48cf", FUNC, None, GUEST, FUNC, None, GUEST),
    Case("iretq to IF off", "48cf", FUNC, None, 0x46, FUNC, None, 0x46),
    # IF modifiers: IF after the step is the instruction's own.
    Case("cli", "fa", COPY + 1, None, 0x146, ORIG + 1, None, 0x46),
    Case("sti", "fb", COPY + 1, None, 0x346, ORIG + 1, None, GUEST),
    Case("sti, IF was off", "fb", COPY + 1, None, 0x346, ORIG + 1, None, GUEST, old=0),
    Case("popfq IF off", "9d", COPY + 1, None, 0x146, ORIG + 1, None, 0x46),
    Case("popfq IF on", "9d", COPY + 1, None, 0x346, ORIG + 1, None, GUEST),
    # The guest was single-stepping itself (TF at the int3): TF comes back.
    Case("guest TF", "4889e5", COPY + 3, None, STEPPED, ORIG + 3, None, GUEST | TF, old=TF | IF),
    Case(
        "guest TF pushf",
        "9c",
        COPY + 1,
        STEPPED,
        STEPPED,
        ORIG + 1,
        GUEST | TF,
        GUEST | TF,
        TF | IF,
    ),
]


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_resume_execution(c: Case) -> None:
    analysis = analyze(decode(bytes.fromhex(c.hexbytes), ORIG))
    result = resume_execution(
        analysis,
        orig_addr=ORIG,
        copy_addr=COPY,
        rip=c.rip,
        rsp=RSP,
        tos=c.tos,
        old_rflags=c.old,
        rflags=c.rflags,
    )
    assert result == ResumeResult(
        rip=c.want_rip,
        rflags=c.want_rflags,
        tos_addr=RSP,
        tos_write=c.want_tos,
        pass_to_guest=bool(c.want_rflags & TF),
    )


def test_resume_execution_26_ff_trap() -> None:
    # "call *%rax" (ff d0) probed at 0xffffffff81234560, its copy stepped at
    # 0xffffffffa0001000 with rax = 0xffffffff81ffff00. After the step rip is
    # rax and the word at rsp is the copy's return address 0xffffffffa0001002.
    # The guest must get rip 0xffffffff81ffff00 unchanged (2.6 classed the
    # call as relative and "relocated" it to 0xffffffff63233460, which is not
    # code) and the return address 0xffffffff81234562, the byte after the
    # original's two. The numbers are written out, not derived.
    result = resume_execution(
        analyze(decode(b"\xff\xd0", 0xFFFF_FFFF_8123_4560)),
        orig_addr=0xFFFF_FFFF_8123_4560,
        copy_addr=0xFFFF_FFFF_A000_1000,
        rip=0xFFFF_FFFF_81FF_FF00,
        rsp=0xFFFF_C900_0012_3F00,
        tos=0xFFFF_FFFF_A000_1002,
        old_rflags=0x200,
        rflags=0x146,
    )
    assert result == ResumeResult(
        rip=0xFFFF_FFFF_81FF_FF00,
        rflags=0x246,
        tos_addr=0xFFFF_C900_0012_3F00,
        tos_write=0xFFFF_FFFF_8123_4562,
        pass_to_guest=False,
    )
    assert result.rip != 0xFFFF_FFFF_6323_3460


def test_resume_execution_wraps() -> None:
    # Copy below, original at the top: relocation is modulo 2**64.
    analysis = analyze(decode(b"\x55", 0xFFFF_FFFF_FFFF_FFFF))
    result = resume_execution(
        analysis,
        orig_addr=0xFFFF_FFFF_FFFF_FFFF,
        copy_addr=0x1000,
        rip=0x1001,
        rsp=RSP,
        tos=None,
        old_rflags=IF,
        rflags=STEPPED,
    )
    assert result.rip == 0


def test_resume_execution_needs_tos() -> None:
    analysis = analyze(decode(b"\x9c", ORIG))
    with pytest.raises(ValueError, match="top of the stack"):
        resume_execution(
            analysis,
            orig_addr=ORIG,
            copy_addr=COPY,
            rip=COPY + 1,
            rsp=RSP,
            tos=None,
            old_rflags=IF,
            rflags=STEPPED,
        )


def test_resume_execution_int3() -> None:
    analysis = analyze(decode(b"\xcc", ORIG))
    with pytest.raises(ValueError, match="in place"):
        resume_execution(
            analysis,
            orig_addr=ORIG,
            copy_addr=COPY,
            rip=ORIG + 1,
            rsp=RSP,
            tos=None,
            old_rflags=IF,
            rflags=STEPPED,
        )


@pytest.mark.parametrize(
    ("rflags", "saved", "want"),
    [(STEPPED, IF, GUEST), (STEPPED, TF | IF, GUEST | TF), (0x146, 0, 0x46)],
)
def test_int3_passthrough(rflags: int, saved: int, want: int) -> None:
    assert int3_passthrough(rflags, saved) == want


@pytest.mark.parametrize(
    ("old", "rflags", "want"),
    [
        (IF, STEPPED, GUEST),
        (IF, STEPPED | X86_EFLAGS_RF, GUEST | X86_EFLAGS_RF),
        (0, 0x146, 0x46),
        (TF | IF, STEPPED, GUEST | TF),
    ],
)
def test_fault_fixup(old: int, rflags: int, want: int) -> None:
    result = fault_fixup(ORIG, old, rflags)
    assert (result.rip, result.rflags) == (ORIG, want)


def test_full_hit_pushfq() -> None:
    # The whole flow for "pushfq" at a site with interrupts on.
    analysis = analyze(decode(b"\x9c", ORIG))
    kcb = set_current_kprobe(GUEST, analysis.if_modifier)
    stepped = prepare_singlestep(GUEST)
    assert singlestep_rip(analysis, ORIG, COPY) == COPY
    # The CPU pushes the stepped flags and traps after the copy.
    result = resume_execution(
        analysis,
        orig_addr=ORIG,
        copy_addr=COPY,
        rip=COPY + 1,
        rsp=RSP - 8,
        tos=stepped,
        old_rflags=kcb.old_rflags,
        rflags=stepped,
    )
    assert result == ResumeResult(
        rip=ORIG + 1, rflags=GUEST, tos_addr=RSP - 8, tos_write=GUEST, pass_to_guest=False
    )


# Where a step may end: (bytes at ORIG, pad, rips relative to COPY or None).
STEP_ENDS = [
    ("4889d8", 0, {0, 3}),  # mov rax, rbx: after the copy (or an unfinished rep: at it)
    ("f3a4", 0, {0, 2}),  # rep movsb
    ("7410", 0, {0, 2, 0x12}),  # je +0x10: not taken, taken
    ("0f8410000000", 0, {0, 6, 0x16}),  # je rel32
    ("ebfe", 0, {0, 2}),  # jmp . (its target is the copy itself)
    ("e800010000", 0, {0, 5, 0x105}),  # call rel32
    ("e2fe", 0, {0, 2}),  # loop .
    ("fb", 1, {0, 1, 2}),  # sti with its pad nop (TCG traps after the nop)
    ("c3", 0, None),  # ret: rip is right, anywhere
    ("ffd0", 0, None),  # call rax
    ("48cf", 0, None),  # iretq
]


@pytest.mark.parametrize(("code", "pad", "ends"), STEP_ENDS, ids=[c[0] for c in STEP_ENDS])
def test_step_end_rips(code: str, pad: int, ends: set[int] | None) -> None:
    analysis = analyze(decode(bytes.fromhex(code), ORIG))
    got = step_end_rips(analysis, ORIG, COPY, pad)
    assert got == (None if ends is None else frozenset(COPY + e for e in ends))


def test_step_end_rips_int3() -> None:
    with pytest.raises(ValueError, match="in place"):
        step_end_rips(analyze(decode(b"\xcc", ORIG)), ORIG, COPY)
