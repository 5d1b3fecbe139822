"""Waiting until nothing in the guest can return into qprobes' area.

Linux frees a boosted kprobe's instruction slot only after
``synchronize_rcu_tasks()``: every task has passed a voluntary context
switch, is in user mode, or is idle, so none can still be preempted (or
interrupted) with a slot rip in a saved frame. From outside the guest the
host can do better than wait: it can *look*. A context interrupted inside a
slot, a stub or the kretprobe trampoline keeps that rip in an interrupt frame
on some stack (the task's own stack, where a kernel-mode interrupt pushes its
frame before switching stacks, or a per-CPU IRQ or IST stack), and a task
asleep in a kretprobed function keeps the trampoline as a return address.

A :class:`StackScanner` (the Linux one is
:class:`qprobes.linux.tasks.LinuxStacks`, plugged in by
:class:`qprobes.frontends.session.Session`) reads the *live* part of every
stack (from the owner's stack pointer up to the stack's top: dead words below
it are not evidence) and reports each word that points into a range. Where
it cannot find a task's live stack (a vCPU whose rsp is on no stack it
knows), the task is *undecided*. :func:`pending` turns a scan into what
still blocks: a reference, unless it is into a slot and its task has since
passed a voluntary context switch since the wait began (its ``nvcsw``
moved) or is asleep off the run queue (``on_rq`` 0: it last left the CPU
voluntarily); an undecided task, until the same holds (as
``synchronize_rcu_tasks()`` waits). A boosted slot never calls, and a fault
in a slot is rerouted by the host before the guest's handler runs, so no
task goes to sleep with a slot frame live on its stack: a slot address found
on such a task's stack is a stale word inside a later frame (measured: the
int3 frames a hit leaves below rsp are often inside the live part of a
stack later). The trampoline's entry is different: a sleeping task keeps
it as a return address, so only a clean scan clears it (any other address
in the stub code page is an interrupt frame's or a popped return address,
cleared like a slot's: the stubs never call anything that sleeps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class CpuState:
    """What a stopped vCPU says about the stack it is on."""

    cpu: int  # the guest's CPU number (QEMU thread id - 1)
    rip: int
    rsp: int
    cs: int

    @property
    def user_mode(self) -> bool:
        return bool(self.cs & 3)


@dataclass(frozen=True)
class StackRef:
    """A word on a live stack that holds an address in the scanned range."""

    where: int  # the word's address
    value: int  # what it holds
    stack: str  # whose stack: "task 42 (sh)", "CPU 1 IRQ stack", ...
    task: int | None = None  # the task_struct, when on a task's stack

    def __str__(self) -> str:
        return f"{self.stack} holds {self.value:#x} at {self.where:#x}"


@dataclass(frozen=True)
class Undecided:
    """A task whose live stack the scanner could not find."""

    task: int
    who: str
    why: str

    def __str__(self) -> str:
        return f"{self.who}: {self.why}"


@dataclass
class StackScan:
    """One scan of every stack in the guest (guest stopped)."""

    refs: list[StackRef] = field(default_factory=list)
    undecided: list[Undecided] = field(default_factory=list)
    nvcsw: dict[int, int] = field(default_factory=dict)  # task -> voluntary switches
    # Tasks asleep since a voluntary switch (off the run queue, not running):
    # no interrupt frame of theirs can be live.
    quiescent: set[int] = field(default_factory=set)
    tasks: int = 0  # how many tasks were looked at


class StackScanner(Protocol):
    """Finds words pointing into ``[lo, hi)`` on every live stack of the guest."""

    def scan(self, lo: int, hi: int, cpus: Sequence[CpuState]) -> StackScan: ...


def pending(scan: StackScan, baseline: Mapping[int, int] | None,
            switch_proves: Callable[[int], bool]) -> list[str]:  # fmt: skip
    """What in ``scan`` still stops the range from being released.

    ``baseline`` holds each task's ``nvcsw`` when the wait began (None: no
    wait, nothing is proven by a switch); ``switch_proves(value)`` tells
    whether a voluntary switch since then proves a reference to ``value``
    stale (true for slot addresses, false for the trampoline, which a
    sleeping task legitimately keeps as a return address).
    """

    def switched(task: int | None) -> bool:
        if task is None:
            return False
        if task in scan.quiescent:
            return True
        if baseline is None or task not in baseline:
            return False
        return scan.nvcsw.get(task, baseline[task]) != baseline[task]

    out = [str(ref) for ref in scan.refs if not (switch_proves(ref.value) and switched(ref.task))]
    out += [str(u) for u in scan.undecided if not switched(u.task)]
    return out
