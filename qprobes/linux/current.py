"""The task a probe hit interrupted, and whether a task is gone.

The kretprobe manager keeps its instances per task, as Linux keeps
``current->kretprobe_instances``; this is its :class:`TaskHooks` for a Linux
guest: ``current`` from the per-CPU ``current_task`` (through the vCPU's GS
base), and a task counts as gone once it reached ``TASK_DEAD`` or no longer
owns the kernel stack it had (``task->stack`` is cleared when a dead task's
stack is freed, and changes when its ``task_struct`` is reused).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from qprobes.errors import QprobesError, SymbolError
from qprobes.probes.context import HitContext
from qprobes.symbols.linux import LinuxKernel

Read = Callable[[int, int], bytes]

# include/linux/sched.h
TASK_DEAD = 0x0080


class LinuxTasks:
    """:class:`qprobes.probes.kretprobe.TaskHooks` for a Linux guest.

    ``read`` reads kernel memory (the engine's ``read_data``).
    """

    def __init__(self, kernel: LinuxKernel, read: Read) -> None:
        self.kernel = kernel
        self.read = read
        self.state: tuple[int, int] | None = None
        self.stack: tuple[int, int] | None = None
        btf = kernel.btf
        if btf is None:
            return
        for name in ("__state", "state"):  # renamed in 5.14
            try:
                self.state = btf.struct_member_offset("task_struct", name)
                break
            except SymbolError:
                continue
        try:
            self.stack = btf.struct_member_offset("task_struct", "stack")
        except SymbolError:
            self.stack = None

    def current(self, ctx: HitContext) -> int | None:
        try:
            return self.kernel.current(ctx.gs_base, ctx.read)
        except (QprobesError, struct.error):
            return None

    def _field(self, task: int, where: tuple[int, int] | None) -> int | None:
        if where is None:
            return None
        offset, size = where
        try:
            return int.from_bytes(self.read(task + offset, size), "little")
        except QprobesError:
            return None

    def stack_of(self, task: int) -> int | None:
        return self._field(task, self.stack)

    def is_gone(self, task: int, stack: int | None) -> bool:
        state = self._field(task, self.state)
        if state is not None and state & TASK_DEAD:
            return True
        now = self._field(task, self.stack)
        return stack is not None and now is not None and now != stack
