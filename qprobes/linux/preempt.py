"""The interrupted context of a probe hit as ftrace records it.

Every ftrace event carries ``common_flags`` and ``common_preempt_count``
(``struct trace_entry``), filled by ``tracing_gen_ctx_irq_test()``
(kernel/trace/trace.c) from the saved interrupt flag, the CPU's
``__preempt_count`` and the task's ``TIF_NEED_RESCHED``. The guest's own
kprobe on an ftrace site, and its return probes, record the probed
function's context this way (the handler's own ``preempt_disable`` is taken
off again by ``tracing_gen_ctx_dec()``); qprobes reads the same state at
the hit: IF from the saved rflags, the rest through the hit vCPU's per-CPU
base (GS) and ``current``.

:func:`tracing_gen_ctx` is the pure part (tested with tables);
:class:`PreemptState` reads the guest.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from qprobes.arch.x86_64.recorder_asm import (
    Const,
    Fetch,
    FrameWord,
    PerCpuWord,
    StoreMem,
    StoreValue,
)
from qprobes.errors import QprobesError, SymbolError
from qprobes.probes.context import HitContext
from qprobes.symbols.linux import LinuxKernel

Read = Callable[[int, int], bytes]

# include/linux/preempt.h
PREEMPT_MASK = 0x000000FF
SOFTIRQ_SHIFT = 8
SOFTIRQ_OFFSET = 1 << SOFTIRQ_SHIFT
SOFTIRQ_MASK = 0x0000FF00
HARDIRQ_MASK = 0x000F0000
NMI_MASK = 0x00F00000
# arch/x86/include/asm/preempt.h: the MSB of __preempt_count is set when no
# reschedule is needed (folded, inverted).
PREEMPT_NEED_RESCHED = 0x80000000
# arch/x86/include/asm/thread_info.h
TIF_NEED_RESCHED = 3
# arch/x86/include/uapi/asm/processor-flags.h
X86_EFLAGS_IF = 0x200

# kernel/trace/trace.h, enum trace_flag_type (Linux 5.18 and later).
TRACE_FLAG_IRQS_OFF = 0x01
TRACE_FLAG_IRQS_NOSUPPORT = 0x02
TRACE_FLAG_NEED_RESCHED = 0x04
TRACE_FLAG_HARDIRQ = 0x08
TRACE_FLAG_SOFTIRQ = 0x10
TRACE_FLAG_PREEMPT_RESCHED = 0x20
TRACE_FLAG_NMI = 0x40
TRACE_FLAG_BH_OFF = 0x80


@dataclass(frozen=True)
class TraceCtx:
    """What ``struct trace_entry`` keeps of the context: ``flags`` (the
    TRACE_FLAG_* bits) and ``preempt_count`` (preemption depth in the low
    nibble, migrate-disable depth in the high one, each capped at 15)."""

    flags: int
    preempt_count: int


def tracing_gen_ctx(rflags: int, preempt_count: int, tif_flags: int,
                    migration_disabled: int = 0) -> TraceCtx:  # fmt: skip
    """``tracing_gen_ctx_irq_test()`` for a context whose saved rflags,
    raw ``__preempt_count`` (with the x86 PREEMPT_NEED_RESCHED bit),
    ``thread_info.flags`` and ``migration_disabled`` are given."""
    flags = 0 if rflags & X86_EFLAGS_IF else TRACE_FLAG_IRQS_OFF
    pc = preempt_count & ~PREEMPT_NEED_RESCHED & 0xFFFF_FFFF
    if pc & NMI_MASK:
        flags |= TRACE_FLAG_NMI
    if pc & HARDIRQ_MASK:
        flags |= TRACE_FLAG_HARDIRQ
    if pc & SOFTIRQ_OFFSET:  # in_serving_softirq()
        flags |= TRACE_FLAG_SOFTIRQ
    if (pc & SOFTIRQ_MASK) >> (SOFTIRQ_SHIFT + 1):  # softirq_count() >> (SOFTIRQ_SHIFT + 1)
        flags |= TRACE_FLAG_BH_OFF
    if tif_flags & (1 << TIF_NEED_RESCHED):
        flags |= TRACE_FLAG_NEED_RESCHED
    if not preempt_count & PREEMPT_NEED_RESCHED:  # test_preempt_need_resched()
        flags |= TRACE_FLAG_PREEMPT_RESCHED
    count = min(pc & 0xFF, 0xF) | min(migration_disabled, 0xF) << 4
    return TraceCtx(flags, count)


class PreemptState:
    """Reads the context of a hit on a Linux guest (``read``: kernel memory)."""

    def __init__(self, kernel: LinuxKernel, read: Read) -> None:
        self.kernel = kernel
        self.read = read
        symbols, btf = kernel.symbols, kernel.btf
        if "__preempt_count" not in symbols:
            raise SymbolError("the guest kernel has no per-CPU __preempt_count")
        self.preempt_count = symbols.address("__preempt_count")
        self.cpu_number = symbols.address("cpu_number") if "cpu_number" in symbols else None
        self.tif: tuple[int, int] | None = None
        self.migration_disabled: tuple[int, int] | None = None
        if btf is not None:
            try:
                self.tif = btf.struct_member_offset("task_struct", "thread_info.flags")
            except SymbolError:
                self.tif = None
            try:
                self.migration_disabled = btf.struct_member_offset(
                    "task_struct", "migration_disabled"
                )
            except SymbolError:
                self.migration_disabled = None

    def _task_field(self, task: int | None, where: tuple[int, int] | None) -> int:
        if task is None or where is None:
            return 0
        off, size = where
        return int.from_bytes(self.read(task + off, size), "little")

    def cpu(self, ctx: HitContext) -> int:
        """The kernel's CPU number of the hit (``smp_processor_id()``)."""
        if self.cpu_number is not None and ctx.gs_base:
            try:
                (cpu,) = struct.unpack("<i", self.read(ctx.gs_base + self.cpu_number, 4))
                return int(cpu)
            except (QprobesError, struct.error):
                pass
        return ctx.vcpu

    def comm_pid(self, ctx: HitContext) -> tuple[str, int] | None:
        """(comm, pid) of the task the hit interrupted."""
        return self.kernel.comm_pid(ctx.gs_base, self.read)

    def trace_ctx(self, ctx: HitContext) -> TraceCtx | None:
        """The interrupted context's trace flags and preempt count, or None
        when the per-CPU data cannot be read."""
        if not ctx.gs_base:
            return None
        try:
            (pc,) = struct.unpack("<I", self.read(ctx.gs_base + self.preempt_count, 4))
            task = self.kernel.current(ctx.gs_base, self.read)
            tif = self._task_field(task, self.tif)
            migrate = self._task_field(task, self.migration_disabled)
        except (QprobesError, struct.error):
            return None
        return tracing_gen_ctx(ctx.regs.eflags, pc, tif, migrate)

    def record_fetches(self, rflags_offset: int) -> tuple[Fetch, Fetch, Fetch, Fetch]:
        """What :meth:`trace_ctx` reads, as a recorder's fetches (the fast
        path records them at the hit): the frame's rflags (at
        ``rflags_offset`` of pt_regs), ``__preempt_count``, the current
        task's ``thread_info.flags`` and ``migration_disabled`` (0 where the
        kernel has no such field)."""
        current = self.kernel.current_task

        def task_field(where: tuple[int, int] | None) -> Fetch:
            if current is None or where is None:
                return Fetch(Const(0))
            off, size = where
            return Fetch(PerCpuWord(current), store=StoreMem(off, size))

        return (Fetch(FrameWord(rflags_offset)),
                Fetch(PerCpuWord(self.preempt_count), store=StoreValue(4)),
                task_field(self.tif), task_field(self.migration_disabled))  # fmt: skip
