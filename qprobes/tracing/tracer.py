"""Tracing with kprobe_events definitions: probes from spec strings, hits as records.

A :class:`Tracer` turns ``p:[GRP/]EVENT SYM[+offs] FETCHARGS`` and
``r[MAXACTIVE]:...`` definitions (Documentation/trace/kprobetrace.rst) into
qprobes kprobes and kretprobes whose handlers fetch the arguments, apply the
event's filter and hand a :class:`TraceEvent` to a sink. Events print the way
ftrace's ``trace`` file does, or as JSON objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from qprobes.errors import ProbeError
from qprobes.probes.context import HitContext
from qprobes.probes.kprobe import Kprobe
from qprobes.probes.kretprobe import Kretprobe
from qprobes.tracing.ast import ProbeSpec, RemoveSpec
from qprobes.tracing.events import TraceEvent
from qprobes.tracing.fetch import (
    CompiledArg,
    HitFetchContext,
    compile_fetchargs,
    evaluate,
    format_args,
)
from qprobes.tracing.filter import FilterExpr, common_values, evaluate_filter, parse_filter
from qprobes.tracing.parser import parse_probe

if TYPE_CHECKING:
    from qprobes.probes.engine import KprobeEngine
    from qprobes.probes.kretprobe import KretprobeManager
    from qprobes.symbols.linux import LinuxKernel


class ProbeHost(Protocol):
    """What a :class:`Tracer` needs of the session it traces (a
    :class:`qprobes.frontends.session.Session` is one): the engine, the
    return-probe manager, the symbols and, on Linux, the kernel."""

    @property
    def engine(self) -> KprobeEngine: ...
    @property
    def kretprobes(self) -> KretprobeManager: ...
    @property
    def symbols(self) -> Any: ...
    @property
    def kernel(self) -> LinuxKernel | None: ...
    def unregister(self, probe: Kprobe | Kretprobe) -> None: ...


@dataclass
class TraceProbe:
    """One definition and what it counted."""

    spec: ProbeSpec
    args: list[CompiledArg]
    addr: int
    filter: FilterExpr | None = None
    filter_text: str | None = None
    location: str = ""  # SYM+0xOFF/0xSIZE, resolved once
    emitted: int = 0
    filtered: int = 0
    probe: Kprobe | Kretprobe | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.spec.group}/{self.spec.event}"

    @property
    def nhit(self) -> int:
        return self.probe.nhit if self.probe is not None else 0

    @property
    def nmissed(self) -> int:
        return self.probe.nmissed if self.probe is not None else 0

    @property
    def kprobe(self) -> Kprobe | None:
        """The kprobe that holds the int3 (a return probe's entry probe)."""
        if isinstance(self.probe, Kretprobe):
            return self.probe.kp
        return self.probe

    @property
    def lost(self) -> bool:
        """The guest rewrote the probed byte: the probe stopped firing."""
        if isinstance(self.probe, Kprobe):
            return self.probe.lost
        return self.probe is not None and self.probe.kp.lost


class Tracer:
    """Probes from kprobe_events definitions on a session (a :class:`ProbeHost`)."""

    def __init__(self, session: ProbeHost, sink: Callable[[TraceEvent], None]) -> None:
        self.session = session
        self.sink = sink
        self.probes: dict[str, TraceProbe] = {}
        self.started = time.monotonic()

    @property
    def _symbols(self) -> Any:
        return self.session.symbols

    def _location(self, addr: int) -> str:
        symbols = self._symbols
        found = symbols.resolve(addr) if symbols is not None else None
        if found is None:
            return f"{addr:#x}"
        sym, off = found
        return f"{sym.name}+{off:#x}/{sym.size:#x}"

    def describe(self, tp: TraceProbe) -> str:
        """Where ``tp`` is, and where its int3 went when that is elsewhere: a
        probe at an ftrace site is armed on the next instruction (its hits
        are still reported at the site)."""
        text = f"{tp.name} at {self._location(tp.addr)}"
        kp = tp.kprobe
        if kp is not None and kp.on_ftrace and kp.arm_addr is not None:
            text += f" (an ftrace site: int3 at {self._location(kp.arm_addr)})"
        return text

    def _resolver(self) -> Any:
        kernel = self.session.kernel
        if kernel is None or kernel.btf is None:
            return None
        from qprobes.tracing.btf_resolver import BtfTypeResolver

        return BtfTypeResolver(kernel.btf)

    def add(self, definition: str, filter_text: str | None = None) -> TraceProbe:
        """Register the probe ``definition`` (kprobe_events syntax)."""
        spec = parse_probe(definition)
        if isinstance(spec, RemoveSpec):
            self.remove(f"{spec.group or 'kprobes'}/{spec.event}")
            raise ProbeError(f"removed {spec.event}")  # not a probe to add
        name = f"{spec.group}/{spec.event}"
        if name in self.probes:
            raise ProbeError(f"event {name} already exists")
        if spec.address is not None:
            addr = spec.address
        else:
            if self._symbols is None:
                raise ProbeError(f"no symbols to resolve {spec.symbol}")
            assert spec.symbol is not None
            addr = self._symbols.address(spec.symbol) + spec.offset
        args = compile_fetchargs(spec, self._symbols, self._resolver())
        tp = TraceProbe(spec, args, addr, filter_text=filter_text, location=self._location(addr))
        if filter_text:
            tp.filter = parse_filter(filter_text, [a.filter_field for a in args])
        if spec.is_return:
            rp = Kretprobe(addr=addr, handler=self._ret_handler(tp), maxactive=spec.maxactive,
                           name=name)  # fmt: skip
            tp.probe = self.session.kretprobes.register(rp)
        else:
            kp = Kprobe(addr=addr, pre_handler=self._pre_handler(tp), name=name)
            tp.probe = self.session.engine.register_kprobe(kp)
        self.probes[name] = tp
        return tp

    def remove(self, name: str) -> None:
        tp = self.probes.pop(name, None)
        if tp is None:
            raise ProbeError(f"no event {name}")
        if tp.probe is not None:
            self.session.unregister(tp.probe)

    def _task(self, ctx: HitContext) -> tuple[str | None, int | None]:
        kernel = self.session.kernel
        if kernel is None:
            return None, None
        found = kernel.comm_pid(ctx.gs_base, ctx.read)
        return found if found is not None else (None, None)

    def _emit(self, tp: TraceProbe, ctx: HitContext, ret_to: str | None) -> None:
        comm, pid = self._task(ctx)
        fctx = HitFetchContext(ctx, lambda: comm or "")
        values = evaluate(tp.args, fctx)
        if tp.filter is not None and not evaluate_filter(
            tp.filter, {**common_values(pid, comm, ctx.vcpu - 1), **values}
        ):
            tp.filtered += 1
            return
        tp.emitted += 1
        self.sink(
            TraceEvent(
                group=tp.spec.group,
                event=tp.spec.event,
                kind="r" if tp.spec.is_return else "p",
                addr=tp.addr,
                location=self._location(tp.addr),
                ret_to=ret_to,
                cpu=ctx.vcpu - 1,
                pid=pid,
                comm=comm,
                timestamp=time.monotonic() - self.started,
                fields=values,
                text=format_args(tp.args, values),
            )
        )

    def _pre_handler(self, tp: TraceProbe) -> Callable[[Kprobe, HitContext], bool]:
        def handler(kp: Kprobe, ctx: HitContext) -> bool:
            self._emit(tp, ctx, None)
            return False

        return handler

    def _ret_handler(self, tp: TraceProbe) -> Callable[[Kretprobe, HitContext], None]:
        def handler(rp: Kretprobe, ctx: HitContext) -> None:
            ret = ctx.ret_addr
            self._emit(tp, ctx, self._location(ret) if ret is not None else None)

        return handler

    def summary(self, notes: bool = True) -> list[dict[str, Any]]:
        """Hits and misses per probe. ``notes=False`` leaves out what needs the
        guest (whether it changed a probed ftrace site): for a guest that died."""
        engine = self.session.engine
        return [
            {"event": name, "location": tp.spec.location, "hits": tp.nhit,
             "emitted": tp.emitted, "filtered": tp.filtered, "missed": tp.nmissed,
             "note": engine.ftrace_site_changed(tp.kprobe)
             if notes and tp.kprobe is not None else None,
             "lost": tp.lost}
            for name, tp in self.probes.items()
        ]  # fmt: skip
