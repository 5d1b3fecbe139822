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

from qprobes.arch.x86_64.recorder_asm import RecorderSpec, TaskLayout, assemble_recorder
from qprobes.errors import ProbeError
from qprobes.probes.context import HitContext
from qprobes.probes.kprobe import Kprobe
from qprobes.probes.kretprobe import Kretprobe
from qprobes.probes.stubs import PT_REGS_NAMES
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
from qprobes.tracing.recorder import (
    NotFastError,
    RawRecord,
    RecorderPlan,
    decode_record,
    plan_recorder,
)

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
    # The fast path: the recorder's plan and id, hits it recorded, and why a
    # definition stays on the slow path.
    plan: RecorderPlan | None = field(default=None, repr=False)
    fast_id: int = 0
    fast_hits: int = 0
    slow_reason: str | None = None

    @property
    def name(self) -> str:
        return f"{self.spec.group}/{self.spec.event}"

    @property
    def nhit(self) -> int:
        return (self.probe.nhit if self.probe is not None else 0) + self.fast_hits

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


# Linux's copy_from_kernel_nofault_allowed(): kernel reads below
# TASK_SIZE_MAX + PAGE_SIZE (4-level paging) fault.
LINUX_KERNEL_FLOOR = 0x0000_8000_0000_0000
SP_OFFSET = 8 * PT_REGS_NAMES.index("rsp")


class Tracer:
    """Probes from kprobe_events definitions on a session (a :class:`ProbeHost`).

    With ``fast``, a kprobe whose definition the guest can fetch by itself
    (:func:`~qprobes.tracing.recorder.plan_recorder`) records its hits in
    the guest with no stop per hit; the Tracer drains the rings while the
    guest runs (when qprobes launched QEMU, else whenever the guest stops)
    and emits the same events as the slow path. Strings keep at most
    ``string_cap`` bytes there. Other definitions, and hits the guest must
    hand to the host (a vCPU single-stepping, an aggregate probe), take the
    slow path. A full ring hands its hit to the host (``lossless``, the
    default: one stop, the rings drained, the hit on the slow path), or
    drops and counts it (:attr:`fast_dropped`).
    """

    def __init__(self, session: ProbeHost, sink: Callable[[TraceEvent], None], *,
                 fast: bool = False, string_cap: int = 255,
                 lossless: bool = True) -> None:  # fmt: skip
        self.session = session
        self.sink = sink
        self.probes: dict[str, TraceProbe] = {}
        self.started = time.monotonic()
        self.fast = fast
        self.string_cap = string_cap
        self.lossless = lossless
        self._tsc_hz: float | None = None
        self._tsc_anchor: float | None = None  # seconds to subtract from tsc / hz

    @property
    def fast_dropped(self) -> int:
        """Records the guest dropped (nested hits, full rings), engine-wide."""
        fast = self.session.engine.fast
        return fast.dropped if fast is not None else 0

    @property
    def fast_spilled(self) -> int:
        """Hits a full ring handed to the host (lossless mode), engine-wide."""
        fast = self.session.engine.fast
        return fast.spilled if fast is not None else 0

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
            if self.fast:
                tp.slow_reason = "return probes are not on the fast path yet"
        else:
            kp = Kprobe(addr=addr, pre_handler=self._pre_handler(tp), name=name)
            tp.probe = self.session.engine.register_kprobe(kp)
            if self.fast:
                try:
                    self._make_fast(tp, kp)
                except NotFastError as exc:
                    tp.slow_reason = str(exc)
        self.probes[name] = tp
        return tp

    # --- the fast path ------------------------------------------------------------

    def _make_fast(self, tp: TraceProbe, kp: Kprobe) -> None:
        engine = self.session.engine
        plan = plan_recorder(tp.args, tp.addr)
        try:
            ring = engine.enable_fast_path()
        except ProbeError as exc:
            raise NotFastError(f"{tp.name}: {exc}") from exc
        kernel = self.session.kernel
        task = cpu_number = None
        floor = 0
        if kernel is not None:
            floor = LINUX_KERNEL_FLOOR
            if kernel.current_task is not None and kernel.task is not None:
                task = TaskLayout(kernel.current_task, kernel.task.pid, kernel.task.comm)
            if "cpu_number" in kernel.symbols:
                cpu_number = kernel.symbols.address("cpu_number")
            if self._tsc_hz is None and "tsc_khz" in kernel.symbols:
                khz = int.from_bytes(engine.read_data(kernel.symbols.address("tsc_khz"), 4),
                                     "little")  # fmt: skip
                self._tsc_hz = khz * 1000.0 if khz else None
        # On x86 Linux a kernel-form fetch of a user address reads user memory.
        probe_id = engine.fast.new_id() if engine.fast is not None else 0
        spec = RecorderSpec(probe_id, plan.fetches, SP_OFFSET, ring, engine.cpu_features(),
                            task, cpu_number, self.string_cap, floor,
                            kernel_reads_user=kernel is not None,
                            lossless=self.lossless)  # fmt: skip
        try:
            rec = engine.install_recorder(kp, lambda at: assemble_recorder(spec, at))
        except ProbeError as exc:
            raise NotFastError(f"{tp.name}: {exc}") from exc
        if rec is None:
            raise NotFastError(f"{tp.name}: the probed instruction cannot run boosted")
        tp.plan, tp.fast_id = plan, probe_id
        assert engine.fast is not None
        engine.fast.consumers[probe_id] = lambda data: self._consume(tp, data)

    def _consume(self, tp: TraceProbe, data: bytes) -> None:
        assert tp.plan is not None
        tp.fast_hits += 1
        self._emit_record(tp, decode_record(data, tp.plan.strings))

    def drain(self) -> int:
        """Emit the events the guest recorded so far (every CPU's, in TSC
        order); the number of records taken (the engine's, for every tracer)."""
        fast = self.session.engine.fast
        return fast.drain() if fast is not None else 0

    def _timestamp(self, tsc: int) -> float:
        """Seconds since the trace started, from the guest's TSC: anchored to
        the host's clock at the first record (the guest's own sched_clock
        conversion is not used yet)."""
        if self._tsc_hz is None:
            return time.monotonic() - self.started
        seconds = tsc / self._tsc_hz
        if self._tsc_anchor is None:
            self._tsc_anchor = seconds - (time.monotonic() - self.started)
        return seconds - self._tsc_anchor

    def _emit_record(self, tp: TraceProbe, raw: RawRecord) -> None:
        assert tp.plan is not None
        values = tp.plan.values(raw)
        if tp.filter is not None and not evaluate_filter(
            tp.filter, {**common_values(raw.pid, raw.comm, raw.cpu), **values}
        ):
            tp.filtered += 1
            return
        tp.emitted += 1
        self.sink(
            TraceEvent(
                group=tp.spec.group,
                event=tp.spec.event,
                kind="p",
                addr=tp.addr,
                location=tp.location,
                ret_to=None,
                cpu=raw.cpu,
                pid=raw.pid,
                comm=raw.comm,
                timestamp=self._timestamp(raw.tsc),
                fields=values,
                text=format_args(tp.args, values),
            )
        )

    def remove(self, name: str) -> None:
        tp = self.probes.get(name)
        if tp is None:
            raise ProbeError(f"no event {name}")
        fast = self.session.engine.fast
        if tp.fast_id and fast is not None:
            self.drain()  # what it recorded before it goes
            fast.consumers.pop(tp.fast_id, None)
        del self.probes[name]
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

    def _fast_now(self, tp: TraceProbe) -> bool:
        """Whether ``tp``'s hits are recorded in the guest now."""
        kp = tp.kprobe
        return bool(tp.fast_id) and kp is not None and self.session.engine.is_fast(kp)

    def _slow_reason(self, tp: TraceProbe) -> str | None:
        if not self.fast or self._fast_now(tp):
            return None
        if tp.slow_reason is None:
            return "another probe shares its address, or it is disabled or lost"
        return tp.slow_reason

    def summary(self) -> list[dict[str, Any]]:
        """Hits and misses per probe."""
        engine = self.session.engine
        return [
            {"event": name, "location": tp.spec.location, "hits": tp.nhit,
             "emitted": tp.emitted, "filtered": tp.filtered, "missed": tp.nmissed,
             "note": engine.ftrace_site_changed(tp.kprobe) if tp.kprobe is not None else None,
             "lost": tp.lost, "fast": self._fast_now(tp), "slow_reason": self._slow_reason(tp)}
            for name, tp in self.probes.items()
        ]  # fmt: skip
