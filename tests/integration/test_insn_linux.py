"""capstone and iced-x86 on the default Linux guest's own text.

Every instruction of the hot functions decodes the same with both decoders
(length and instruction), so cross-checking costs no probe on them; where
capstone 5 falls short on this kernel (``serialize`` in ``do_sync_core``,
``ud1`` in the static-call trampolines), qprobes refuses the instruction and
still finds the right boundaries, before writing anything.
"""

from __future__ import annotations

import iced_x86
import pytest

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.errors import InstructionError, ProbeError
from qprobes.frontends.session import Session

pytestmark = pytest.mark.vm

HOT = (
    "do_sys_openat2", "vfs_read", "vfs_write", "_raw_spin_lock", "_raw_spin_lock_irqsave",
    "_raw_spin_unlock_irqrestore", "kmem_cache_alloc", "kmem_cache_free", "kfree", "__kmalloc",
    "schedule", "__schedule", "do_filp_open", "path_openat", "ksys_read",
    "__x64_sys_openat", "copy_page_to_iter", "mutex_lock", "fput", "dput", "getname_flags",
    "strncpy_from_user", "_copy_to_user", "__fdget_pos", "handle_mm_fault", "do_user_addr_fault",
    "try_to_wake_up", "update_curr", "enqueue_task_fair", "ktime_get", "rcu_note_context_switch",
)  # fmt: skip


def text(session: Session, name: str) -> tuple[int, bytes]:
    assert session.symbols is not None
    sym = session.symbols.lookup(name)
    assert sym is not None and sym.kind == "func" and sym.size, name
    return sym.addr, session.engine.kread(sym.addr, sym.size)


def iced_lengths(code: bytes, addr: int) -> list[tuple[int, int]]:
    """(address, length) of each instruction, by iced-x86 alone."""
    out = []
    for instr in iced_x86.Decoder(64, code, ip=addr):
        assert not instr.is_invalid, f"{instr.ip:#x}"
        out.append((instr.ip, instr.len))
    return out


@pytest.mark.parametrize("name", HOT)
def test_hot_function_decodes_the_same_with_both(linux: Session, name: str) -> None:
    addr, code = text(linux, name)
    insns = x86insn.decode_function(code, addr)  # raises on any disagreement
    assert [(i.addr, i.length) for i in insns] == iced_lengths(code, addr)
    assert len(insns) > 3


def test_every_hot_boundary_is_accepted(linux: Session) -> None:
    """can_probe's walk from each function's start accepts every boundary."""
    checked = 0
    for name in ("do_sys_openat2", "_raw_spin_lock_irqsave", "kmem_cache_alloc"):
        addr, code = text(linux, name)
        for insn in x86insn.decode_function(code, addr):
            if insn.raw[0] == x86insn.INT3:
                continue  # padding past the last ret
            linux.engine.can_probe(insn.addr)
            checked += 1
    assert checked > 60


def test_serialize_is_refused_and_its_length_still_known(linux: Session) -> None:
    """do_sync_core holds ``serialize`` (its alternative, unused here), which
    capstone 5 cannot decode: a probe on it is refused with the reason and
    nothing written; iced-x86's length still gives the boundary after it, so
    the next instruction can be probed, and one inside it cannot."""
    addr, code = text(linux, "do_sync_core")
    at = code.find(bytes.fromhex("0f01e8"))
    assert at > 0
    with pytest.raises(InstructionError, match="iced-x86 reads serialize"):
        x86insn.decode(code[at:], addr + at)
    with pytest.raises(InstructionError, match="serialize"):
        linux.kprobe(addr + at, lambda kp, ctx: None)
    with pytest.raises(ProbeError, match="not an instruction boundary"):
        linux.kprobe(addr + at + 1, lambda kp, ctx: None)
    assert linux.engine.kread(addr, len(code)) == code
    assert not linux.engine.points
    for where in (addr + at - 3, addr + at + 3):  # the nop before it, the insn after it
        kp = linux.kprobe(where, lambda kp, ctx: None)
        linux.unregister(kp)
    assert linux.engine.kread(addr, len(code)) == code


def test_static_call_trampoline_ud1_is_three_bytes(linux: Session) -> None:
    """``__SCT__*`` trampolines end with ``ud1 %esp,%ecx`` (0f b9 cc), whose
    ModRM capstone 5 leaves out: the boundaries are +0 and +5 only."""
    assert linux.symbols is not None
    names = [s.name for s in linux.symbols.all_symbols() if s.name.startswith("__SCT__tp_func_")]
    assert len(names) > 100
    for name in names[:50]:
        addr, code = text(linux, name)
        insns = x86insn.decode_function(code[:8], addr)
        assert [(i.addr - addr, i.mnemonic, i.length) for i in insns] in (
            [(0, "jmp", 5), (5, "ud1", 3)],
            [(0, "ret", 1), (1, "int3", 1), (2, "int3", 1), (3, "int3", 1), (4, "int3", 1),
             (5, "ud1", 3)],
        ), name  # fmt: skip
        assert not x86insn.can_probe(code, addr, addr + 7)
