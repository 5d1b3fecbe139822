"""A Linux guest's tasks, their kernel stacks, and the per-CPU IRQ and IST stacks.

Everything is found through kallsyms and BTF, never fixed offsets:

* the task list: ``init_task.tasks`` (``for_each_process``), each process's
  threads through ``signal->thread_head`` / ``thread_node``
  (``for_each_thread``), and the idle tasks, which are on no list
  (``runqueues.idle`` per CPU);
* a task's stack: ``task->stack`` up to ``THREAD_SIZE``
  (``__end_init_task - __start_init_task``: ``INIT_TASK_DATA`` in
  ``vmlinux.lds.h`` sizes the init stack so), its saved stack pointer
  ``task->thread.sp`` (written by ``__switch_to_asm``), ``task->nvcsw`` and
  ``task->on_rq`` (0 for a task that went to sleep: ``__schedule`` dequeues
  only on a voluntary switch, the test ``rcu_tasks_pertask`` makes);
* per CPU (``__per_cpu_offset[cpu] + var``): ``current_task``, the hardirq
  stack (``hardirq_stack_ptr`` points 8 bytes below its top, where
  ``call_on_irqstack`` saves the interrupted rsp; ``IRQ_STACK_SIZE`` equals
  ``THREAD_SIZE`` on x86_64) and the IST stacks (``cea_exception_stacks``:
  each ``*_stack`` member of ``struct cea_exception_stacks``; the hardware
  exception frame sits at each one's top).

:class:`LinuxStacks` is the :class:`~qprobes.probes.quiesce.StackScanner`
of a Linux guest. The live part of a stack is the part above its user's
stack pointer: for a vCPU, its rsp, then each stack it switched from (the
IRQ stack's saved rsp, an IST frame's rsp) down to its task's stack; for a
task that is not running, ``thread.sp``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from qprobes.errors import QprobesError, SymbolError
from qprobes.probes.quiesce import CpuState, StackRef, StackScan, Undecided
from qprobes.symbols.btf import Btf
from qprobes.symbols.elf import SymbolTable

Read = Callable[[int, int], bytes]

MAX_TASKS = 1 << 16
#: An x86 exception frame: rip, cs, rflags, rsp, ss.
IRET_FRAME = 40


class TaskError(QprobesError):
    """The guest's task list or stacks cannot be read."""


@dataclass(frozen=True)
class TaskFields:
    """Offsets into ``struct task_struct`` (and ``signal_struct``) from BTF."""

    state: int
    stack: int
    tasks: int
    thread_node: int
    signal: int
    thread_head: int  # in signal_struct
    nvcsw: int
    on_rq: int
    thread_sp: int
    pid: int
    comm: int
    comm_size: int

    @classmethod
    def from_btf(cls, btf: Btf) -> TaskFields:
        def off(struct_name: str, member: str) -> int:
            return btf.struct_member_offset(struct_name, member)[0]

        state = "__state"
        try:
            off("task_struct", state)
        except SymbolError:
            state = "state"  # before v5.14
        comm, comm_size = btf.struct_member_offset("task_struct", "comm")
        return cls(
            state=off("task_struct", state),
            stack=off("task_struct", "stack"),
            tasks=off("task_struct", "tasks"),
            thread_node=off("task_struct", "thread_node"),
            signal=off("task_struct", "signal"),
            thread_head=off("signal_struct", "thread_head"),
            nvcsw=off("task_struct", "nvcsw"),
            on_rq=off("task_struct", "on_rq"),
            thread_sp=off("task_struct", "thread.sp"),
            pid=off("task_struct", "pid"),
            comm=comm,
            comm_size=comm_size,
        )

    @property
    def span(self) -> tuple[int, int]:
        """The smallest byte range of a task_struct holding every field."""
        offs = (self.state, self.stack, self.tasks, self.thread_node, self.signal, self.nvcsw,
                self.on_rq, self.thread_sp, self.pid)  # fmt: skip
        return min(offs), max(max(offs) + 8, self.comm + self.comm_size)


@dataclass(frozen=True)
class Task:
    """One task as read from the guest."""

    addr: int
    pid: int
    comm: str
    stack: int  # the stack's lowest address; 0 once freed
    sp: int  # thread.sp
    nvcsw: int
    on_rq: int  # 0: asleep, dequeued by a voluntary switch

    def __str__(self) -> str:
        return f"task {self.pid} ({self.comm})"


@dataclass(frozen=True)
class Stack:
    """One stack's range and whose it is."""

    lo: int
    hi: int
    name: str
    kind: str  # "task", "irq" or "ist"
    task: Task | None = None

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.lo <= addr < self.hi


class LinuxStacks:
    """Reads tasks and stacks of a stopped Linux guest; a StackScanner."""

    def __init__(self, symbols: SymbolTable, btf: Btf, read: Read, ncpus: int) -> None:
        self.symbols = symbols
        self.read = read
        self.ncpus = ncpus
        try:
            self.fields = TaskFields.from_btf(btf)
            self.init_task = symbols.address("init_task")
            self.per_cpu_offset = symbols.address("__per_cpu_offset")
            self.thread_size = (symbols.address("__end_init_task")
                                - symbols.address("__start_init_task"))  # fmt: skip
        except SymbolError as exc:
            raise TaskError(f"cannot find the guest's tasks: {exc}") from exc
        if self.thread_size <= 0 or self.thread_size % 4096:
            raise TaskError(f"implausible THREAD_SIZE {self.thread_size:#x}")
        self._rq_idle: int | None = None
        self._runqueues: int | None = None
        if "runqueues" in symbols:
            self._runqueues = symbols.address("runqueues")
            self._rq_idle = btf.struct_member_offset("rq", "idle")[0]
        self._current_task = symbols.address("current_task") if "current_task" in symbols else None
        self._hardirq = (symbols.address("hardirq_stack_ptr")
                         if "hardirq_stack_ptr" in symbols else None)  # fmt: skip
        self._cea = (symbols.address("cea_exception_stacks")
                     if "cea_exception_stacks" in symbols else None)  # fmt: skip
        self._ist: list[tuple[str, int, int]] = []  # (name, offset, size)
        if self._cea is not None:
            try:
                cea = btf.find_struct("cea_exception_stacks")
                for member in cea.members:
                    if member.name.endswith("_stack") and not member.name.endswith("guard"):
                        self._ist.append((member.name, member.bit_offset // 8,
                                          btf.sizeof(member.type_id)))  # fmt: skip
            except SymbolError:
                self._ist = []

    # --- reading ------------------------------------------------------------------

    def _u64(self, addr: int) -> int:
        return int(struct.unpack("<Q", self.read(addr, 8))[0])

    def percpu(self, cpu: int, var: int) -> int:
        """The address of per-CPU variable ``var`` (its kallsyms value) on ``cpu``."""
        return self._u64(self.per_cpu_offset + 8 * cpu) + var

    def task(self, addr: int) -> Task:
        f = self.fields
        lo, hi = f.span
        data = self.read(addr + lo, hi - lo)

        def u64(off: int) -> int:
            return int(struct.unpack_from("<Q", data, off - lo)[0])

        (pid,) = struct.unpack_from("<i", data, f.pid - lo)
        (on_rq,) = struct.unpack_from("<i", data, f.on_rq - lo)
        comm = data[f.comm - lo : f.comm - lo + f.comm_size].split(b"\0", 1)[0]
        return Task(addr, int(pid), comm.decode(errors="replace"), u64(f.stack),
                    u64(f.thread_sp), u64(f.nvcsw), int(on_rq))  # fmt: skip

    def _list(self, head: int) -> Iterator[int]:
        """The nodes of the circular ``list_head`` at ``head`` (not the head)."""
        node = self._u64(head)
        seen: set[int] = set()
        while node != head:
            if node in seen or len(seen) >= MAX_TASKS:
                raise TaskError(f"the list at {head:#x} loops or is torn at {node:#x}")
            seen.add(node)
            yield node
            node = self._u64(node)

    def task_addrs(self) -> list[int]:
        """Every task: init_task, each CPU's idle task, every thread of every process."""
        f = self.fields
        found = [self.init_task]
        if self._runqueues is not None and self._rq_idle is not None:
            for cpu in range(self.ncpus):
                idle = self._u64(self.percpu(cpu, self._runqueues) + self._rq_idle)
                if idle and idle not in found:
                    found.append(idle)
        for node in self._list(self.init_task + f.tasks):
            leader = node - f.tasks
            signal = self._u64(leader + f.signal)
            threads = [leader]
            if signal:
                threads = [n - f.thread_node for n in self._list(signal + f.thread_head)]
            for t in threads if leader in threads else [leader, *threads]:
                if t not in found:
                    found.append(t)
        return found

    def current(self, cpu: int) -> int | None:
        if self._current_task is None:
            return None
        return self._u64(self.percpu(cpu, self._current_task)) or None

    def cpu_stacks(self, cpu: int) -> list[Stack]:
        """The IRQ and IST stacks of ``cpu``."""
        out = []
        if self._hardirq is not None:
            ptr = self._u64(self.percpu(cpu, self._hardirq))
            if ptr:
                top = ptr + 8
                out.append(Stack(top - self.thread_size, top, f"CPU {cpu} IRQ stack", "irq"))
        if self._cea is not None and self._ist:
            base = self._u64(self.percpu(cpu, self._cea))
            if base:
                for name, off, size in self._ist:
                    out.append(Stack(base + off, base + off + size, f"CPU {cpu} {name}", "ist"))
        return out

    # --- the scan -------------------------------------------------------------------

    def _words(self, lo: int, hi: int) -> list[tuple[int, int]]:
        lo &= ~7
        if hi <= lo:
            return []
        data = self.read(lo, hi - lo)
        n = len(data) // 8
        return [(lo + 8 * i, w) for i, w in enumerate(struct.unpack(f"<{n}Q", data[: 8 * n]))]

    def _scan_range(self, out: StackScan, lo: int, hi: int, stack: Stack, sp: int) -> None:
        task = stack.task.addr if stack.task is not None else None
        for where, value in self._words(sp, stack.hi):
            if lo <= value < hi:
                out.refs.append(StackRef(where, value, stack.name, task))

    def scan(self, lo: int, hi: int, cpus: Sequence[CpuState]) -> StackScan:
        """Every word in ``[lo, hi)`` on a live stack (the guest must be stopped)."""
        out = StackScan()
        tasks: dict[int, Task] = {}
        for addr in self.task_addrs():
            try:
                tasks[addr] = self.task(addr)
            except QprobesError:
                continue  # freed under the list walk: nothing of it can run
            out.nvcsw[addr] = tasks[addr].nvcsw
        out.tasks = len(tasks)
        task_stacks = [Stack(t.stack, t.stack + self.thread_size, str(t), "task", t)
                       for t in tasks.values() if t.stack]  # fmt: skip
        covered: set[int] = set()  # tasks whose live stack a vCPU's walk reached
        running: dict[int, int] = {}  # task -> CPU
        for cpu in cpus:
            current = self.current(cpu.cpu)
            if current is not None:
                running[current] = cpu.cpu
            if cpu.user_mode:
                if current is not None:
                    covered.add(current)  # no kernel frames: nothing to return into
                continue
            end = self._walk_cpu(out, lo, hi, cpu, task_stacks, covered)
            if current is None or current in covered:
                continue
            if end == "user":
                covered.add(current)  # an IST frame from user mode: no kernel frames
            elif end == "lost":
                who = str(tasks[current]) if current in tasks else f"task {current:#x}"
                why = f"CPU {cpu.cpu} runs it on a stack qprobes does not know"
                out.undecided.append(Undecided(current, who, why))
                covered.add(current)
        for stack in task_stacks:
            task = stack.task
            assert task is not None
            if task.addr in covered:
                continue
            if task.addr in running:
                why = f"CPU {running[task.addr]} runs it, but its rsp is on another stack"
                out.undecided.append(Undecided(task.addr, str(task), why))
            elif task.sp not in stack:
                why = f"its thread.sp {task.sp:#x} is off its stack"
                out.undecided.append(Undecided(task.addr, str(task), why))
            else:
                if not task.on_rq:
                    out.quiescent.add(task.addr)
                self._scan_range(out, lo, hi, stack, task.sp)
        return out

    def _walk_cpu(self, out: StackScan, lo: int, hi: int, cpu: CpuState,
                  task_stacks: list[Stack], covered: set[int]) -> str:  # fmt: skip
        """Scan the stacks a kernel-mode vCPU is on, from its rsp, through each
        stack it switched from, down to a task's stack ("task"), or to an
        exception frame from user mode ("user"); "lost" when a stack pointer
        on the way is on no stack known."""
        stacks = task_stacks + self.cpu_stacks(cpu.cpu)
        sp = cpu.rsp
        for _hop in range(8):
            stack = next((s for s in stacks if sp in s), None)
            if stack is None:
                return "lost"
            self._scan_range(out, lo, hi, stack, sp)
            if stack.task is not None:
                covered.add(stack.task.addr)
                return "task"
            if stack.kind == "irq":
                sp = self._u64(stack.hi - 8)  # the rsp call_on_irqstack saved
                continue
            # An IST stack: the hardware frame at its top names what it interrupted.
            frame = self.read(stack.hi - IRET_FRAME, IRET_FRAME)
            _rip, cs, _flags, sp, _ss = struct.unpack("<5Q", frame)
            if cs & 3:
                return "user"
        return "lost"
