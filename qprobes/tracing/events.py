"""Trace event records and the ways they are printed: ftrace's ``trace`` text and JSON.

The text is what the guest's own ``trace`` file shows for the same event
(Linux 6.1, default options: ``irq-info`` on, the ``local`` clock):
``trace_print_context()`` (comm, pid, CPU, the latency column of
``trace_print_lat_fmt()``, the timestamp as ``trace_print_time()`` prints
it), then the kprobe event's own ``(SYM+off/size) name=value ...``
(kernel/trace/trace_output.c, trace_kprobe.c). :func:`trace_header` is the
header ``print_trace_header`` and ``print_func_help_header_irq`` print
above the events (kernel/trace/trace.c).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qprobes.linux.clock import COUNTER_CLOCKS
from qprobes.linux.preempt import (
    TRACE_FLAG_BH_OFF,
    TRACE_FLAG_HARDIRQ,
    TRACE_FLAG_IRQS_NOSUPPORT,
    TRACE_FLAG_IRQS_OFF,
    TRACE_FLAG_NEED_RESCHED,
    TRACE_FLAG_NMI,
    TRACE_FLAG_PREEMPT_RESCHED,
    TRACE_FLAG_SOFTIRQ,
)
from qprobes.tracing.fetch import FAULT, Value

NSEC_PER_USEC = 1000
USEC_PER_SEC = 1_000_000


def trace_print_lat_fmt(flags: int, preempt_count: int) -> str:
    """The five-letter irqs-off/need-resched/hardirq-softirq/preempt-depth/
    migrate-disable column of a ``trace_entry`` (trace_print_lat_fmt)."""
    nmi = flags & TRACE_FLAG_NMI
    hardirq = flags & TRACE_FLAG_HARDIRQ
    softirq = flags & TRACE_FLAG_SOFTIRQ
    bh_off = flags & TRACE_FLAG_BH_OFF
    irqs_off = flags & TRACE_FLAG_IRQS_OFF
    if irqs_off and bh_off:
        irqs = "D"
    elif irqs_off:
        irqs = "d"
    elif bh_off:
        irqs = "b"
    elif flags & TRACE_FLAG_IRQS_NOSUPPORT:
        irqs = "X"
    else:
        irqs = "."
    resched = {
        TRACE_FLAG_NEED_RESCHED | TRACE_FLAG_PREEMPT_RESCHED: "N",
        TRACE_FLAG_NEED_RESCHED: "n",
        TRACE_FLAG_PREEMPT_RESCHED: "p",
    }.get(flags & (TRACE_FLAG_NEED_RESCHED | TRACE_FLAG_PREEMPT_RESCHED), ".")
    if nmi and hardirq:
        hardsoft = "Z"
    elif nmi:
        hardsoft = "z"
    elif hardirq and softirq:
        hardsoft = "H"
    elif hardirq:
        hardsoft = "h"
    elif softirq:
        hardsoft = "s"
    else:
        hardsoft = "."
    depth = f"{preempt_count & 0xF:x}" if preempt_count & 0xF else "."
    migrate = f"{(preempt_count >> 4) & 0xF:x}" if preempt_count & 0xF0 else "."
    return f"{irqs}{resched}{hardsoft}{depth}{migrate}"


def ns2usecs(ns: int) -> int:
    """kernel/trace/trace.c: nanoseconds to microseconds, rounded."""
    return (ns + NSEC_PER_USEC // 2) // NSEC_PER_USEC


def trace_print_time(ns: int, in_ns: bool = True) -> str:
    """The timestamp column (``trace_print_time``, no latency format):
    ``%5lu.%06lu`` seconds and microseconds, or ``%12llu`` on a clock that
    does not count nanoseconds (``x86-tsc``, ``counter``)."""
    if not in_ns:
        return f"{ns:12d}"
    secs, usec = divmod(ns2usecs(ns), USEC_PER_SEC)
    return f"{secs:5d}.{usec:06d}"


def trace_header(bh_off: bool = True) -> str:
    """The header the guest's ``trace`` file starts with (tracer ``nop``,
    ``irq-info`` on), without the ``entries-in-buffer`` line that only a
    finished buffer can fill in. ``bh_off``: the kernel shows BH-disabled
    sections in the first column (Linux 5.18 and later)."""
    first = "irqs-off/BH-disabled" if bh_off else "irqs-off"
    return (
        "# tracer: nop\n"
        "#\n"
        f"#                                _-----=> {first}\n"
        "#                               / _----=> need-resched\n"
        "#                              | / _---=> hardirq/softirq\n"
        "#                              || / _--=> preempt-depth\n"
        "#                              ||| / _-=> migrate-disable\n"
        "#                              |||| /     delay\n"
        "#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION\n"
        "#              | |         |   |||||     |         |\n"
    )


@dataclass(frozen=True)
class TraceEvent:
    """One probe hit, with its fetched fields."""

    group: str
    event: str
    kind: str  # "p" (kprobe) or "r" (return probe)
    addr: int  # the probed address
    location: str  # SYM+0xOFF/0xSIZE of the probe
    ret_to: str | None  # return probes: where the function returned to
    cpu: int  # 0-based, the kernel's CPU number
    pid: int | None
    comm: str | None
    timestamp_ns: int  # on ``clock`` (ns, or counts on a COUNTER_CLOCKS clock)
    fields: dict[str, Value]
    text: str  # the fields as ftrace prints them
    # The guest's trace clock ("local": sched_clock(), "global", "perf",
    # "x86-tsc"); "host": host time since the trace began.
    clock: str = "local"
    trace_flags: int = 0  # struct trace_entry's flags (TRACE_FLAG_*)
    preempt_count: int = 0  # and its preempt_count (migrate-disable depth << 4)
    # The kernel stack at the hit, when a trigger asked for it: addresses
    # innermost first, and each as ``%pS`` (``name+0xoff/0xsize``).
    stack: tuple[int, ...] | None = None
    stack_syms: tuple[str, ...] = ()
    show_stack: bool = False  # a stacktrace trigger: print the <stack trace> block
    duration: float | None = None  # return probes: seconds from the call's entry

    @property
    def timestamp(self) -> float:
        """Seconds on ``clock``."""
        return self.timestamp_ns / 1e9

    @property
    def lat_fmt(self) -> str:
        """The irqs-off/need-resched/hardirq/preempt/migrate column."""
        return trace_print_lat_fmt(self.trace_flags, self.preempt_count)

    def _prefix(self) -> str:
        """``comm-pid [cpu] flags timestamp: `` as the trace file prints it."""
        # trace_find_cmdline: pid 0 is "<idle>", a task it cannot name "<...>".
        comm = self.comm if self.comm is not None else "<...>"
        if self.pid == 0:
            comm = "<idle>"
        pid = self.pid if self.pid is not None else -1
        return (
            f"{comm:>16}-{pid:<7} [{self.cpu:03d}] {self.lat_fmt} "
            f"{trace_print_time(self.timestamp_ns, self.clock not in COUNTER_CLOCKS)}: "
        )

    def format(self) -> str:
        """The line ftrace's ``trace`` file would show; after it, for a
        ``stacktrace`` trigger, the ``<stack trace>`` entry as
        ``trace_stack_print`` prints it (one `` => SYMBOL`` line a frame)."""
        where = f"{self.ret_to} <- {self.location.split('+')[0]}" if self.ret_to else self.location
        tail = f" {self.text}" if self.text else ""
        prefix = self._prefix()
        line = f"{prefix}{self.event}: ({where}){tail}"
        if self.show_stack and self.stack_syms:
            frames = "".join(f"\n => {sym.split('+')[0]}" for sym in self.stack_syms)
            line += f"\n{prefix}<stack trace>{frames}"
        return line

    def as_json(self) -> dict[str, Any]:
        sym, _, off = self.location.partition("+")
        fields = {k: (None if v is FAULT else v) for k, v in self.fields.items()}
        return {
            "event": self.event,
            "group": self.group,
            "type": self.kind,
            "symbol": sym,
            "offset": int(off.split("/")[0], 16) if off else 0,
            "addr": f"{self.addr:#x}",
            "ret_to": self.ret_to,
            "cpu": self.cpu,
            "pid": self.pid,
            "comm": self.comm,
            "timestamp": self.timestamp_ns
            if self.clock in COUNTER_CLOCKS
            else ns2usecs(self.timestamp_ns) / USEC_PER_SEC,
            "timestamp_ns": self.timestamp_ns,
            "clock": self.clock,
            "flags": self.lat_fmt,
            "common_flags": self.trace_flags,
            "common_preempt_count": self.preempt_count,
            "fields": fields,
            **({"stack": list(self.stack_syms)} if self.stack is not None else {}),
            **({"duration_ns": round(self.duration * 1e9)} if self.duration is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_json(), default=str)
