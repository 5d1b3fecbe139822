"""Register and stack fixups around a single-stepped copy, as integers.

Mirrors the flag handling of Linux 2.6's arch/x86_64/kernel/kprobes.c
(``set_current_kprobe``, ``prepare_singlestep``, ``resume_execution``,
``post_kprobe_handler``, ``kprobe_fault_handler``) and of the unified
arch/x86/kernel/kprobes/core.c from before int3-based single-stepping
(v2.6.25 to v5.10), which use the same TF single-step that qprobes uses. No
I/O: the caller reads the registers and the word at the top of the stack,
and writes back what these functions return.

The flow of one single-stepped hit::

    kcb = set_current_kprobe(rflags, analysis.if_modifier)   # at the int3
    rflags = prepare_singlestep(rflags)                       # TF on, IF off
    rip = singlestep_rip(analysis, orig_addr, copy_addr)
    ... the guest steps the copy, #DB ...
    result = resume_execution(analysis, orig_addr=..., copy_addr=..., rip=...,
                              rsp=..., tos=..., old_rflags=kcb.old_rflags,
                              rflags=...)
    # write result.tos_write at result.tos_addr (if not None), set rip/rflags;
    # result.pass_to_guest: the guest was single-stepping itself, hand it the #DB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from qprobes.arch.x86_64.insn import Fixup, InsnAnalysis

__all__ = [
    "DR6_BS",
    "DR6_TRAP_BITS",
    "X86_EFLAGS_AC",
    "X86_EFLAGS_AF",
    "X86_EFLAGS_CF",
    "X86_EFLAGS_DF",
    "X86_EFLAGS_IF",
    "X86_EFLAGS_NT",
    "X86_EFLAGS_OF",
    "X86_EFLAGS_PF",
    "X86_EFLAGS_RF",
    "X86_EFLAGS_SF",
    "X86_EFLAGS_TF",
    "X86_EFLAGS_VM",
    "X86_EFLAGS_ZF",
    "FaultFixup",
    "KprobeFlags",
    "ResumeResult",
    "fault_fixup",
    "int3_passthrough",
    "prepare_singlestep",
    "resume_execution",
    "set_current_kprobe",
    "singlestep_rip",
    "step_end_rips",
]

# RFLAGS bits (SDM Vol. 1, 3.4.3), with the kernel's names
# (arch/x86/include/uapi/asm/processor-flags.h).
X86_EFLAGS_CF = 0x0000_0001
X86_EFLAGS_PF = 0x0000_0004
X86_EFLAGS_AF = 0x0000_0010
X86_EFLAGS_ZF = 0x0000_0040
X86_EFLAGS_SF = 0x0000_0080
X86_EFLAGS_TF = 0x0000_0100
X86_EFLAGS_IF = 0x0000_0200
X86_EFLAGS_DF = 0x0000_0400
X86_EFLAGS_OF = 0x0000_0800
X86_EFLAGS_NT = 0x0000_4000
X86_EFLAGS_RF = 0x0001_0000
X86_EFLAGS_VM = 0x0002_0000
X86_EFLAGS_AC = 0x0004_0000

# DR6 (SDM Vol. 3B, 17.2.3): B0-B3, a debug-register breakpoint matched;
# BS, the single-step trap (TF). Linux: DR_TRAP_BITS, DR_STEP.
DR6_TRAP_BITS = 0x0000_000F
DR6_BS = 0x0000_4000

_TF_IF = X86_EFLAGS_TF | X86_EFLAGS_IF
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class KprobeFlags:
    """The flag fields of 2.6's ``struct kprobe_ctlblk`` for one hit."""

    old_rflags: int
    """``kprobe_old_rflags``: the guest's own TF and IF at the int3."""
    saved_rflags: int
    """``kprobe_saved_rflags``: what ``post_kprobe_handler`` ORs back after
    the step: ``old_rflags``, without IF for an IF modifier (the instruction
    itself decided IF)."""


def set_current_kprobe(rflags: int, if_modifier: bool) -> KprobeFlags:
    """Save the guest's TF and IF at the int3 (2.6 ``set_current_kprobe``)."""
    old = rflags & _TF_IF
    saved = old & ~X86_EFLAGS_IF if if_modifier else old
    return KprobeFlags(old_rflags=old, saved_rflags=saved)


def prepare_singlestep(rflags: int) -> int:
    """rflags for stepping the copy: TF set, IF clear (2.6 ``prepare_singlestep``).

    IF is cleared so that no interrupt handler runs with rip in the slot.
    """
    return (rflags | X86_EFLAGS_TF) & ~X86_EFLAGS_IF


def singlestep_rip(analysis: InsnAnalysis, orig_addr: int, copy_addr: int) -> int:
    """Where to step: the original int3 in place, the copy otherwise.

    2.6 ``prepare_singlestep``: "single step inline if the instruction is an
    int3". The in-place int3 raises #BP (not #DB); see :func:`int3_passthrough`.
    """
    return orig_addr if analysis.is_int3 else copy_addr


def int3_passthrough(rflags: int, saved_rflags: int) -> int:
    """rflags when the in-place int3 traps again, before it goes to the guest.

    2.6 ``kprobe_handler``, state ``KPROBE_HIT_SS`` with an int3 original:
    ``regs->eflags &= ~TF_MASK; regs->eflags |= kcb->kprobe_saved_rflags``;
    the #BP then goes on to the guest's own handler.
    """
    return (rflags & ~X86_EFLAGS_TF) | saved_rflags


@dataclass(frozen=True)
class ResumeResult:
    """Registers and stack after ``resume_execution`` and ``post_kprobe_handler``."""

    rip: int
    rflags: int
    """TF cleared, then ``kprobe_saved_rflags`` ORed back."""
    tos_addr: int
    """rsp after the step: where :attr:`tos_write` goes."""
    tos_write: int | None
    """The 8-byte word to store at ``tos_addr``, or None to leave the stack alone."""
    pass_to_guest: bool
    """TF is still set because the guest was single-stepping itself: the #DB
    goes on to the guest (``post_kprobe_handler`` returns 0)."""


def resume_execution(
    analysis: InsnAnalysis,
    orig_addr: int,
    copy_addr: int,
    rip: int,
    rsp: int,
    tos: int | None,
    old_rflags: int,
    rflags: int,
) -> ResumeResult:
    """Fix rip, rflags and the stack after the #DB that ends the step.

    ``rip``, ``rsp`` and ``rflags`` are the values after the step; ``tos`` is
    the 8-byte word at ``rsp``, needed when ``analysis.fixup.reads_tos``;
    ``old_rflags`` is :attr:`KprobeFlags.old_rflags`. The numbered cases are
    those of the comment above 2.6's ``resume_execution`` (see
    :class:`~qprobes.arch.x86_64.insn.Fixup`):

    0) unless rip is right (ret, iret, indirect jmp/call), relocate it from the
       copy to the original: ``rip = orig + (rip - copy)``;
    1) pushf: the pushed word gets the guest's own TF and IF:
       ``*tos = (*tos & ~(TF | IF)) | old_rflags``. Only bits 8 and 9 change,
       so writing back all 8 bytes is right for ``pushfw`` (66 9c) too;
    2) call: the return address is made to follow the original:
       ``*tos = orig + (*tos - copy)``.

    Then, as in ``post_kprobe_handler``: TF is cleared and
    ``kprobe_saved_rflags`` ORed back (the guest's own TF and IF, without IF
    for an IF modifier, whose own result stands).

    A ``rep`` string instruction that has not finished leaves rip on the copy
    (the CPU traps after each iteration); rip then goes back to the original,
    where the int3 fires again, once per iteration, as in the kernel.
    """
    fixup = analysis.fixup
    if fixup is Fixup.INT3:
        raise ValueError("an int3 original is stepped in place: use int3_passthrough()")
    if fixup.reads_tos and tos is None:
        raise ValueError(f"the {fixup.value} fixup needs the word at the top of the stack")

    tos_write: int | None = None
    if fixup is Fixup.PUSHF:
        assert tos is not None
        tos_write = (tos & ~_TF_IF) | (old_rflags & _TF_IF)
    elif fixup in (Fixup.CALL_REL, Fixup.CALL_INDIRECT):
        assert tos is not None
        tos_write = (orig_addr + (tos - copy_addr)) & _MASK64

    new_rip = rip if fixup.rip_is_right else (orig_addr + (rip - copy_addr)) & _MASK64

    saved = old_rflags & _TF_IF
    if analysis.if_modifier:
        saved &= ~X86_EFLAGS_IF
    new_rflags = (rflags & ~X86_EFLAGS_TF) | saved
    return ResumeResult(
        rip=new_rip,
        rflags=new_rflags,
        tos_addr=rsp,
        tos_write=tos_write,
        pass_to_guest=bool(new_rflags & X86_EFLAGS_TF),
    )


def step_end_rips(
    analysis: InsnAnalysis, orig_addr: int, copy_addr: int, pad: int = 0
) -> frozenset[int] | None:
    """Where rip may be at the #DB that ends a single-step of the copy.

    None when the instruction sets rip absolutely (ret, iret, indirect
    jmp/call: :attr:`Fixup.rip_is_right`) and any rip can follow. Otherwise:
    the copy's start (an unfinished ``rep`` iteration, as in
    :func:`resume_execution`), right after the copy (and after ``pad`` more
    bytes: TCG traps after the nop that follows a stepped sti), and for a
    relative branch or call its target, as the copy reaches it
    (``copy + (target - orig)``). A #DB anywhere else did not end this step.
    """
    fixup = analysis.fixup
    if fixup is Fixup.INT3:
        raise ValueError("an int3 original is stepped in place: there is no step end")
    if fixup.rip_is_right:
        return None
    insn = analysis.insn
    ends = {copy_addr, (copy_addr + insn.length) & _MASK64}
    if pad:
        ends.add((copy_addr + insn.length + pad) & _MASK64)
    if insn.is_relative_branch and insn.branch_target is not None:
        ends.add((copy_addr + insn.branch_target - orig_addr) & _MASK64)
    return frozenset(ends)


class FaultFixup(NamedTuple):
    """Registers after a fault raised by the copy while it was single-stepped.

    A named tuple: ``rip, rflags = fault_fixup(...)`` works.
    """

    rip: int
    rflags: int


def fault_fixup(orig_addr: int, old_rflags: int, rflags: int) -> FaultFixup:
    """Undo the step when the copy faults (``kprobe_fault_handler``).

    The fault then looks as if raised by the original instruction: rip goes
    back to the probe address (so the guest's fault handler finds its
    exception-table entry), TF is cleared and the guest's own TF and IF are
    ORed back. This is the TF-stepping kernel's version (v2.6.25 to v5.10:
    "Trap flag (TF) has been set here because this fault happened where the
    single stepping will be done. So clear it"). When the guest's handler
    returns, the int3 fires again.
    """
    return FaultFixup(rip=orig_addr, rflags=(rflags & ~X86_EFLAGS_TF) | (old_rflags & _TF_IF))
