"""Jump-optimized probes ("detours"): Linux's optprobes
(``arch/x86/kernel/kprobes/opt.c``), as pure functions over instructions.

A fast-path probe (one whose hits a recorder handles in the guest) whose
instruction, or the run of instructions starting at it, covers at least 5
bytes can have those bytes replaced by a ``jmp rel32`` to a *detour
buffer* in qprobes' area. The buffer builds the ``pt_regs`` frame the #BP
stub would have built, calls the same recorder, restores every register
and the flags, runs the relocated instructions and jumps back after them:
a hit raises no exception at all.

This module picks the window (:func:`select_window`, Linux's
``can_optimize()`` and ``copy_optimized_instructions()``), relocates it
(:func:`relocate_window`) and generates the buffer
(:func:`detour_source`). The engine checks the guest-side rules (text the
kernel patches, the blacklist, ftrace sites, exception tables, tasks inside
the window) and writes the jump as ``text_poke_bp()`` does.

The rules, and how each is met
==============================

* Every instruction of the window must be one a boosted slot may run
  (Linux: ``can_boost()`` on each), not rejected, not an int3, and not a
  relative jmp/jcc/loop (refused: the probe stays on int3). A ``call rel32``
  may end the window: its copy pushes the *original* return address (the
  end of the window) and jumps to the callee, so the callee returns into the
  original code, and stack unwinders and ``__builtin_return_address`` see
  what they would have seen.
* Rip-relative operands are rewritten for the copy's address
  (:func:`~qprobes.arch.x86_64.insn.copy_instruction`); the area is placed
  within +-2 GiB of kernel text, so every displacement reaches.
* Only the first instruction may access memory other than the stack (and
  it may: that is the probed instruction, as on the int3 path). A fault at a
  relocated instruction is routed to the host by qprobes' fault stubs, which
  put rip back at the original instruction's address before the guest's
  handler runs (:meth:`Detour.original_rip`), as the slot path does. A
  fault the guest's handler fixes and retries then restarts at the probe
  address, which holds the jump: the probe fires again, as Linux's does
  after ``kprobe_fault_handler``. A retry at an instruction *inside* the
  window would land in the jump's displacement, so the later instructions
  are kept to those that can fault only fatally (register-only operations,
  pushes and pops, ``leave``, the final call's push).
* An instruction after the first must not end the flow (ret, indirect jmp):
  the bytes after it could be reached only by a jump from elsewhere.
* The window lies inside the function (kallsyms' size), no branch in the
  function goes into it (except to its first byte), and the function has no
  indirect jump (``ff /4``, ``ff /5``, or a jmp to a retpoline thunk), which
  could go anywhere: Linux's ``insn_is_indirect_jump()`` and
  ``insn_jump_into_range()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qprobes.arch.x86_64.insn import (
    JMP_REL32_SIZE,
    Fixup,
    Insn,
    analyze,
    copy_instruction,
    synthesize_reljump,
)
from qprobes.errors import DetourError

#: Bytes of a detour buffer; the relocated instructions start at RELOC_OFFSET.
DETOUR_SIZE = 256
RELOC_OFFSET = 208
_RELOC_ROOM = DETOUR_SIZE - RELOC_OFFSET

_PT_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
)  # fmt: skip
_RSP_OFF = 8 * _PT_REGS.index("rsp")
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Window:
    """The instructions a detour's jump covers: ``insns[0]`` is the probed one."""

    insns: tuple[Insn, ...]

    @property
    def addr(self) -> int:
        return self.insns[0].addr

    @property
    def length(self) -> int:
        return sum(i.length for i in self.insns)

    @property
    def end(self) -> int:
        return self.addr + self.length

    @property
    def original(self) -> bytes:
        return b"".join(i.raw for i in self.insns)


def _is_call_rel32(insn: Insn) -> bool:
    """A near ``call rel32``, with no prefix but 3e (which the CPU ignores
    here, as the boosted copy does)."""
    return (insn.opcode == b"\xe8" and insn.rex is None
            and all(p == 0x3E for p in insn.prefixes))  # fmt: skip


def _is_indirect_jump(insn: Insn) -> bool:
    return insn.opcode == b"\xff" and not insn.vex and insn.modrm_reg in (4, 5)


def _is_jump(insn: Insn) -> bool:
    """A relative jmp or jcc (not a call)."""
    return insn.is_relative_branch and not _is_call_rel32(insn)


# One-byte opcodes without ModRM that access memory other than the stack:
# moffs moves, string instructions, xlat.
_MEMORY_NO_MODRM = frozenset({0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7,
                              0xAA, 0xAB, 0xAC, 0xAD, 0xAE, 0xAF, 0xD7})  # fmt: skip
_LEA = 0x8D


def touches_memory(insn: Insn) -> bool:
    """Whether ``insn`` may read or write memory other than through the stack
    pointer (pushes, pops, leave and call touch only the stack)."""
    if insn.modrm is not None and insn.modrm_mod != 3:
        return not (len(insn.opcode) == 1 and insn.opcode[0] == _LEA and not insn.vex)
    return len(insn.opcode) == 1 and not insn.vex and insn.opcode[0] in _MEMORY_NO_MODRM


def _check_window_insn(insn: Insn, first: bool, last: bool) -> None:
    where = f"{insn.addr:#x} ({insn.mnemonic})"
    analysis = analyze(insn)
    if analysis.rejected is not None:
        raise DetourError(insn.addr, f"{where} cannot be probed: {analysis.rejected}")
    if analysis.is_int3:
        raise DetourError(insn.addr, f"{where} is an int3")
    if _is_call_rel32(insn):
        if not last:
            raise DetourError(insn.addr, f"a call at {where} would not end the window")
        return
    if _is_jump(insn):
        raise DetourError(insn.addr, f"{where} is a relative jump, which detours do not "
                          "relocate")  # fmt: skip
    if not analysis.boostable:
        raise DetourError(insn.addr, f"{where} cannot run out of line unstepped: "
                          f"{analysis.boost_reason}")  # fmt: skip
    if not first and touches_memory(insn):
        raise DetourError(insn.addr, f"{where} accesses memory: a fault there could not be "
                          "retried at its own address, which the jump covers")  # fmt: skip
    if not last and analysis.fixup is not Fixup.RELATIVE:
        raise DetourError(insn.addr, f"{where} ends the flow inside the window")


def select_window(insns: Sequence[Insn], addr: int, func_start: int, func_end: int,
                  thunks: tuple[int, int] | None = None,
                  extra: Iterable[Insn] = ()) -> Window:  # fmt: skip
    """The window of a detour at ``addr``: Linux's ``can_optimize()``.

    ``insns`` is the function ``[func_start, func_end)`` decoded linearly
    (its kallsyms size), ``extra`` other code that may branch into it (its
    ``.cold`` part), ``thunks`` the retpoline thunks' range (a jmp there is
    an indirect jump). Raises :class:`~qprobes.errors.DetourError` naming
    the reason when there is none.
    """
    if not func_start <= addr < func_end:
        raise DetourError(addr, f"{addr:#x} is outside its function")
    start = next((i for i, insn in enumerate(insns) if insn.addr == addr), None)
    if start is None:
        raise DetourError(addr, f"{addr:#x} is not an instruction boundary of its function")
    chosen: list[Insn] = []
    length = 0
    for insn in insns[start:]:
        chosen.append(insn)
        length += insn.length
        if length >= JMP_REL32_SIZE:
            break
    if length < JMP_REL32_SIZE or addr + length > func_end:
        raise DetourError(addr, f"fewer than {JMP_REL32_SIZE} bytes of the function from "
                          f"{addr:#x}")  # fmt: skip
    for n, insn in enumerate(chosen):
        _check_window_insn(insn, n == 0, n == len(chosen) - 1)
    end = addr + length
    for insn in (*insns, *extra):
        if _is_indirect_jump(insn):
            raise DetourError(addr, f"the function has an indirect jump at {insn.addr:#x}, "
                              "which may go into the window")  # fmt: skip
        target = insn.branch_target
        if target is None:
            continue
        if thunks is not None and _is_jump(insn) and thunks[0] <= target < thunks[1]:
            raise DetourError(addr, f"the function jumps to a retpoline thunk at "
                              f"{insn.addr:#x} (an indirect jump)")  # fmt: skip
        if addr < target < end:
            raise DetourError(addr, f"{insn.addr:#x} branches into the window at {target:#x}")
    if length - chosen[-1].length >= JMP_REL32_SIZE:
        raise AssertionError("the window is longer than needed")
    return Window(tuple(chosen))


@dataclass(frozen=True)
class Relocated:
    """The window's instructions as they run at ``at``, and where each went."""

    code: bytes
    copies: tuple[tuple[int, int, int], ...]  # (copy address, copy length, original address)


def _push_imm64(value: int) -> bytes:
    """Push ``value`` without touching the flags or a register."""
    signed = value - (1 << 64) if value >> 63 else value
    if -(1 << 31) <= signed < 1 << 31:
        return b"\x68" + signed.to_bytes(4, "little", signed=True)  # push imm32 (sign-extended)
    lo, hi = value & 0xFFFFFFFF, value >> 32
    lea = b"\x48\x8d\x64\x24\xf8"  # lea rsp, [rsp - 8]
    low = b"\xc7\x04\x24" + lo.to_bytes(4, "little")  # mov dword ptr [rsp], lo
    high = b"\xc7\x44\x24\x04" + hi.to_bytes(4, "little")  # mov dword ptr [rsp + 4], hi
    return lea + low + high


def relocate_window(window: Window, at: int) -> Relocated:
    """The window's instructions for address ``at``, then a ``jmp`` back to
    ``window.end`` (Linux: ``copy_optimized_instructions`` and the jump
    ``arch_prepare_optimized_kprobe`` synthesizes). A final ``call rel32``
    becomes a push of the original return address and a ``jmp`` to the
    callee. Raises :class:`~qprobes.errors.SlotRangeError` when a target is
    out of rel32 reach."""
    out = bytearray()
    copies = []
    ends_in_call = False
    for insn in window.insns:
        here = at + len(out)
        if _is_call_rel32(insn):
            assert insn.branch_target is not None
            body = _push_imm64(insn.next_addr)
            body += synthesize_reljump(here + len(body), insn.branch_target)
            ends_in_call = True
        else:
            body = copy_instruction(insn, here)
        copies.append((here, len(body), insn.addr))
        out += body
    if not ends_in_call:
        out += synthesize_reljump(at + len(out), window.end)
    return Relocated(bytes(out), tuple(copies))


@dataclass(frozen=True)
class DetourCode:
    """A generated detour buffer."""

    address: int
    code: bytes
    # Where the relocated instructions start (a hit handed to the host resumes there).
    reloc: int
    copies: tuple[tuple[int, int, int], ...]


def _imm32(value: int) -> int:
    return value - (1 << 32) if value >> 31 else value


def detour_source(window: Window, at: int, recorder: int, spill: int,
                  cs: int = 0x10, ss: int = 0x18) -> tuple[str, Relocated]:  # fmt: skip
    """The assembly of the detour buffer at ``at`` for ``window``.

    The frame is the one the #BP stub passes its recorder (Linux's
    ``optprobe_template_func``): ``pt_regs`` with ``ip`` = probe + 1 (as an
    int3 would leave it), ``orig_ax`` = -1, the interrupted ``sp`` and
    ``flags``; ``cs``/``ss`` are the kernel's selectors. Interrupts are off
    from right after ``pushfq`` until ``popfq`` (the #BP gate turns them
    off too): the recorder appends to this CPU's ring and must not migrate
    or be interrupted by a probe hit of its own. A recorder that found no
    room (lossless mode) returns nonzero: the frame is then exactly what
    the #BP stub builds, and the detour enters the stub where it rings the
    doorbell (``spill``, ``qp_bp_ours``), so the host sees an int3 hit at
    the probe and sends it back to ``reloc`` with every register restored.
    """
    rel = relocate_window(window, at + RELOC_OFFSET)
    if len(rel.code) > _RELOC_ROOM:
        raise DetourError(window.addr, f"the relocated window takes {len(rel.code)} bytes, "
                          f"more than {_RELOC_ROOM}")  # fmt: skip
    rip = (window.addr + 1) & _MASK64
    save = "\n".join(f"    push {r}" for r in reversed(_PT_REGS[:15]))
    restore = "\n".join(f"    pop {r}" for r in _PT_REGS[:15])
    reloc = ", ".join(f"{b:#04x}" for b in rel.code)
    source = f"""
qp_det:
.set REC, qp_det + {recorder - at:#x}
.set SPILL, qp_det + {spill - at:#x}
    push {ss:#x}
    push rsp
    pushfq
    cli
    push {cs:#x}
    push 0
    mov dword ptr [rsp], {_imm32(rip & 0xFFFFFFFF):#x}
    mov dword ptr [rsp + 4], {_imm32(rip >> 32):#x}
    push -1
{save}
    add qword ptr [rsp + {_RSP_OFF}], 8
    mov rdi, rsp
    call REC
    test eax, eax
    jnz qp_det_spill
{restore}
    lea rsp, [rsp + 24]
    popfq
    lea rsp, [rsp + 16]
    jmp qp_det_reloc
qp_det_spill:
    jmp SPILL
.org {RELOC_OFFSET}, 0xcc
qp_det_reloc:
    .byte {reloc}
.org {DETOUR_SIZE}, 0xcc
"""
    return source, rel


def jump_bytes(addr: int, detour: int) -> bytes:
    """The 5 bytes written at ``addr``: ``jmp rel32`` to the detour."""
    return synthesize_reljump(addr, detour)


@dataclass
class Detour:
    """A probe point's installed detour (host side)."""

    window: Window
    code: DetourCode
    jump: bytes  # what the first JMP_REL32_SIZE bytes of the window hold
    recorder: int = 0  # what the buffer calls (a recorder, or a chain of them)

    @property
    def addr(self) -> int:
        return self.window.addr

    @property
    def buffer(self) -> int:
        return self.code.address

    def original_rip(self, rip: int) -> int:
        """Where a fault at ``rip`` in the buffer happened in the original code:
        the original of a relocated instruction, else the probe address (the
        frame code: only a stack overflow can fault there)."""
        for copy, length, orig in self.code.copies:
            if copy <= rip < copy + length:
                return orig
        return self.addr
