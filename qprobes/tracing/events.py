"""Trace event records and the ways they are printed: ftrace's ``trace`` text and JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qprobes.tracing.fetch import FAULT, Value


@dataclass(frozen=True)
class TraceEvent:
    """One probe hit, with its fetched fields."""

    group: str
    event: str
    kind: str  # "p" (kprobe) or "r" (return probe)
    addr: int  # the probed address
    location: str  # SYM+0xOFF/0xSIZE of the probe
    ret_to: str | None  # return probes: where the function returned to
    cpu: int  # 0-based vCPU
    pid: int | None
    comm: str | None
    timestamp: float  # seconds since the trace started
    fields: dict[str, Value]
    text: str  # the fields as ftrace prints them
    # The kernel stack at the hit, when a trigger asked for it: addresses
    # innermost first, and each as ``%pS`` (``name+0xoff/0xsize``).
    stack: tuple[int, ...] | None = None
    stack_syms: tuple[str, ...] = ()
    show_stack: bool = False  # a stacktrace trigger: print the <stack trace> block
    duration: float | None = None  # return probes: seconds from the call's entry

    def _prefix(self) -> str:
        comm = self.comm if self.comm is not None else "<unknown>"
        pid = self.pid if self.pid is not None else -1
        return f"{comm:>16}-{pid:<7} [{self.cpu:03d}] {self.timestamp:12.6f}: "

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
            "timestamp": round(self.timestamp, 6),
            "fields": fields,
            **({"stack": list(self.stack_syms)} if self.stack is not None else {}),
            **({"duration_ns": round(self.duration * 1e9)} if self.duration is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_json(), default=str)
