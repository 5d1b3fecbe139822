"""Tracing with kprobe_events definitions: probes from spec strings, hits as records.

A :class:`Tracer` turns ``p:[GRP/]EVENT SYM[+offs] FETCHARGS`` and
``r[MAXACTIVE]:...`` definitions (Documentation/trace/kprobetrace.rst) into
qprobes kprobes and kretprobes whose handlers fetch the arguments, apply the
event's filter and hand a :class:`TraceEvent` to a sink. Events print the way
ftrace's ``trace`` file does, or as JSON objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from qprobes.arch.x86_64.recorder_asm import (
    Fetch,
    Recorder,
    RecorderSpec,
    RingLayout,
    TaskLayout,
    assemble_recorder,
)
from qprobes.errors import ProbeError, QprobesError, SymbolError
from qprobes.linux.preempt import PREEMPT_NEED_RESCHED, TraceCtx, tracing_gen_ctx
from qprobes.probes.context import HitContext, PtRegs
from qprobes.probes.kprobe import Kprobe
from qprobes.probes.kretprobe import Kretprobe
from qprobes.probes.stubs import FRAME_WORDS, PT_REGS_NAMES
from qprobes.tracing.ast import ProbeSpec, RemoveSpec
from qprobes.tracing.events import TraceEvent, trace_header
from qprobes.tracing.fetch import (
    CompiledArg,
    HitFetchContext,
    compile_fetchargs,
    evaluate,
    format_args,
)
from qprobes.tracing.filter import FilterExpr, common_values, evaluate_filter, parse_filter
from qprobes.tracing.hist import Histogram, KeyMod, StackTrigger, parse_hist, parse_stacktrace
from qprobes.tracing.latency import Latency
from qprobes.tracing.parser import parse_probe
from qprobes.tracing.recorder import (
    NotFastError,
    RawRecord,
    RecorderPlan,
    decode_record,
    plan_recorder,
    plan_return_recorder,
    return_extra,
    with_context,
)

#: Where x86-64 modules (and ftrace/BPF trampolines) live: MODULES_VADDR up.
MODULES_START = 0xFFFFFFFFA0000000
MODULES_END = 0xFFFFFFFFFF000000

if TYPE_CHECKING:
    from qprobes.linux.modules import LinuxModules
    from qprobes.probes.engine import KprobeEngine
    from qprobes.probes.fastret import FastReturn
    from qprobes.probes.kretprobe import KretprobeManager
    from qprobes.symbols.linux import LinuxKernel


class HitClock(Protocol):
    """The guest's trace clock at a hit: (timestamp, clock name), e.g. ns on
    ftrace's ``local`` clock (on Linux: :class:`qprobes.linux.clock.GuestClock`);
    None when it cannot be read."""

    def __call__(self, ctx: HitContext) -> tuple[int, str] | None: ...


class HitState(Protocol):
    """The interrupted context of a hit as ftrace records it (on Linux:
    :class:`qprobes.linux.preempt.PreemptState`)."""

    def cpu(self, ctx: HitContext) -> int: ...
    def trace_ctx(self, ctx: HitContext) -> TraceCtx | None: ...
    def comm_pid(self, ctx: HitContext) -> tuple[str, int] | None: ...


class ProbeHost(Protocol):
    """What a :class:`Tracer` needs of the session it traces (a
    :class:`qprobes.frontends.session.Session` is one): the engine, the
    return-probe manager, the symbols and, on Linux, the kernel, its trace
    clock and the state of the interrupted context."""

    @property
    def engine(self) -> KprobeEngine: ...
    @property
    def kretprobes(self) -> KretprobeManager: ...
    @property
    def symbols(self) -> Any: ...
    @property
    def kernel(self) -> LinuxKernel | None: ...
    @property
    def modules(self) -> LinuxModules | None: ...
    @property
    def trace_clock(self) -> HitClock | None: ...
    @property
    def trace_state(self) -> HitState | None: ...
    def unregister(self, probe: Kprobe | Kretprobe) -> None: ...
    def unregister_many(self, probes: Sequence[Kprobe | Kretprobe],
                        ) -> Sequence[QprobesError | None]: ...  # fmt: skip
    def watch_modules(self) -> None: ...


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
    hists: list[Histogram] = field(default_factory=list, repr=False)
    stacktrace: StackTrigger | None = None
    latency: Latency | None = None

    # The fast path: the recorder's plan and id, hits it recorded, and why a
    # definition stays on the slow path.
    plan: RecorderPlan | None = field(default=None, repr=False)
    fast_id: int = 0
    fast_hits: int = 0
    slow_reason: str | None = None
    # A fast return probe's share of the instance store, and how to read
    # the entries it missed (store full) from the guest.
    fast_ret: FastReturn | None = field(default=None, repr=False)
    fast_missed: Callable[[], int] | None = field(default=None, repr=False)

    @property
    def want_stack(self) -> bool:
        return self.stacktrace is not None or any(h.wants_stack for h in self.hists)

    @property
    def name(self) -> str:
        return f"{self.spec.group}/{self.spec.event}"

    @property
    def nhit(self) -> int:
        return (self.probe.nhit if self.probe is not None else 0) + self.fast_hits

    @property
    def nmissed(self) -> int:
        """Entries that found no instance (return probes), on both paths."""
        slow = self.probe.nmissed if self.probe is not None else 0
        if self.fast_missed is not None:
            try:
                return slow + self.fast_missed()
            except QprobesError:
                return slow  # the guest is gone
        return slow

    @property
    def kprobe(self) -> Kprobe | None:
        """The kprobe that holds the int3 (a return probe's entry probe)."""
        if isinstance(self.probe, Kretprobe):
            return self.probe.kp
        return self.probe

    @property
    def lost_why(self) -> str | None:
        kp = self.kprobe
        return kp.lost_why if kp is not None and kp.lost else None

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
RFLAGS_OFFSET = 8 * PT_REGS_NAMES.index("eflags")


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

    With ``detour`` (the default) a fast-path probe whose instructions allow
    it is jump-optimized: a jump to a detour buffer replaces its int3, so a
    hit raises no exception (``summary()``'s ``detour``; where the engine
    refuses, ``detour_refused`` says why and the int3 fast path stays).
    """

    def __init__(self, session: ProbeHost, sink: Callable[[TraceEvent], None], *,
                 fast: bool = False, string_cap: int = 255,
                 lossless: bool = True, detour: bool = True) -> None:  # fmt: skip
        self.session = session
        self.sink = sink
        self.probes: dict[str, TraceProbe] = {}
        self.started = time.monotonic_ns()
        self.fast = fast
        self.string_cap = string_cap
        self.lossless = lossless
        self.detour = detour
        self._tsc_hz: float | None = None
        self._tsc_anchor: int | None = None  # ns to subtract from tsc / hz
        self._per_cpu: list[int] | None = None  # __per_cpu_offset, for record clocks

    def header(self) -> str:
        """The header of the guest's ``trace`` file, printed once above the events."""
        kernel = self.session.kernel
        bh_off = True  # Linux 5.18 and later
        if kernel is not None and kernel.btf is not None:
            # enum trace_flag_type (kernel/trace/trace.h), when BTF has it.
            flags = kernel.btf.enumerators("TRACE_FLAG_")
            bh_off = "TRACE_FLAG_BH_OFF" in flags or not flags
        return trace_header(bh_off)

    def _btf_defaults(self) -> bool:
        """Does the guest's own kprobe_events type a bare ``$retval``/``$argN``
        from BTF? Linux does since 6.6 (with traceprobe_expand_meta_args);
        before, they are ``x64``."""
        kernel = self.session.kernel
        return kernel is None or "traceprobe_expand_meta_args" in kernel.symbols

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

    def _resolve(self, addr: int) -> tuple[str, int, int, str | None] | None:
        """``addr`` as (symbol, offset, size, module or None), from vmlinux's
        symbols or a loaded module's."""
        symbols = self._symbols
        found = symbols.resolve(addr) if symbols is not None else None
        if found is not None:
            return found[0].name, found[1], found[0].size, None
        modules = self.session.modules
        if modules is None or not MODULES_START <= addr < MODULES_END:
            return None
        try:
            in_module = modules.resolve(addr)
        except QprobesError:
            return None
        if in_module is None:
            return None
        sym, off, module = in_module
        return sym.name, off, sym.size, module.name

    def _symbol(self, addr: int) -> str:
        """``%pS``: ``name+0xoff/0xsize [module]``, or ``0x...`` for what
        kallsyms does not know."""
        found = self._resolve(addr)
        if found is None:
            return f"{addr:#x}"
        name, off, size, module = found
        text = f"{name}+{off:#x}/{size:#x}"
        return f"{text} [{module}]" if module else text

    def _location(self, addr: int) -> str:
        return self._symbol(addr)

    def describe(self, tp: TraceProbe) -> str:
        """Where ``tp`` is, and where its int3 went when that is elsewhere: a
        probe at an ftrace site is armed on the next instruction (its hits
        are still reported at the site)."""
        text = f"{tp.name} at {self._location(tp.addr)}"
        kp = tp.kprobe
        if kp is not None and kp.on_ftrace and kp.arm_addr is not None:
            text += f" (an ftrace site: int3 at {self._location(kp.arm_addr)})"
        return text

    def _resolver(self, btf: Any = None) -> Any:
        kernel = self.session.kernel
        btf = btf if btf is not None else (kernel.btf if kernel is not None else None)
        if btf is None:
            return None
        from qprobes.tracing.btf_resolver import BtfTypeResolver

        return BtfTypeResolver(btf)

    def _module_address(self, spec: ProbeSpec) -> tuple[int, Any]:
        """``MOD:SYM[+offs]`` (or a ``SYM`` only a module has): its address and
        the module's BTF (None without). The module must be loaded."""
        assert spec.symbol is not None
        modules = self.session.modules
        where = f"{spec.module}:{spec.symbol}" if spec.module else spec.symbol
        if modules is None:
            raise ProbeError(f"{where}: this session cannot read the guest's modules")
        try:
            sym, module = modules.lookup(spec.symbol, spec.module)
            btf = modules.btf(module)
        except QprobesError as exc:
            raise ProbeError(f"{where}: {exc}") from None
        if spec.offset and sym.size and spec.offset >= sym.size:
            raise ProbeError(f"{where}+{spec.offset:#x} is past the end of {spec.symbol} "
                             f"({sym.size:#x} bytes)")  # fmt: skip
        self.session.watch_modules()
        return sym.addr + spec.offset, btf

    def add(
        self,
        definition: str,
        filter_text: str | None = None,
        triggers: Sequence[str] = (),
    ) -> TraceProbe:
        """Register the probe ``definition`` (kprobe_events syntax), with an
        ftrace filter and ``hist:`` triggers (their histograms are
        ``tp.hists``). Everything is checked before the probe is armed."""
        spec = parse_probe(definition)
        if isinstance(spec, RemoveSpec):
            self.remove(f"{spec.group or 'kprobes'}/{spec.event}")
            raise ProbeError(f"removed {spec.event}")  # not a probe to add
        name = f"{spec.group}/{spec.event}"
        if name in self.probes:
            raise ProbeError(f"event {name} already exists")
        module_btf = None
        if spec.address is not None:
            addr = spec.address
        else:
            if self._symbols is None:
                raise ProbeError(f"no symbols to resolve {spec.symbol}")
            assert spec.symbol is not None
            if spec.module is not None or spec.symbol not in self._symbols:
                addr, module_btf = self._module_address(spec)
            else:
                addr = self._symbols.address(spec.symbol) + spec.offset
        args = compile_fetchargs(
            spec, self._symbols, self._resolver(module_btf), self._btf_defaults()
        )
        tp = TraceProbe(spec, args, addr, filter_text=filter_text, location=self._location(addr))
        if filter_text:
            tp.filter = parse_filter(filter_text, [a.filter_field for a in args])
        for text in triggers:
            self._add_trigger(tp, text)
        if spec.is_return:
            rp = Kretprobe(addr=addr, handler=self._ret_handler(tp), maxactive=spec.maxactive,
                           name=name, entry_handler=self._entry_handler)  # fmt: skip
            tp.probe = self.session.kretprobes.register(rp)
            if self.fast:
                try:
                    self._make_fast_return(tp, rp)
                except NotFastError as exc:
                    tp.slow_reason = str(exc)
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

    def add_many(self, definitions: Sequence[str]) -> list[TraceProbe | QprobesError]:
        """:meth:`add` each of ``definitions`` in one batch of the engine
        (:meth:`~qprobes.probes.engine.KprobeEngine.batch`: kernel memory
        read once per page, the code writes pipelined, the guest stopped
        throughout); for each, its probe or the error that refused it (the
        same :meth:`add` raises for it alone)."""
        engine = self.session.engine
        out: list[TraceProbe | QprobesError] = []
        engine.wait_text_unlocked()
        engine.make_room(len(definitions))
        with engine.batch():
            for definition in definitions:
                try:
                    out.append(self.add(definition))
                except QprobesError as exc:
                    out.append(exc)
        return out

    # --- the fast path ------------------------------------------------------------

    def _make_fast(self, tp: TraceProbe, kp: Kprobe) -> None:
        if tp.want_stack:
            raise NotFastError(f"{tp.name}: kernel stack traces are taken on the slow path")
        engine = self.session.engine
        plan = self._with_context(plan_recorder(tp.args, tp.addr))
        try:
            ring = engine.enable_fast_path()
        except ProbeError as exc:
            raise NotFastError(f"{tp.name}: {exc}") from exc
        probe_id = engine.fast.new_id() if engine.fast is not None else 0
        spec = self._recorder_spec(probe_id, plan.fetches, ring, self.lossless)
        assert engine.fast is not None
        # Taken before the recorder can run: detouring it runs the guest.
        tp.plan = plan
        engine.fast.consumers[probe_id] = lambda data: self._consume(tp, data)
        try:
            rec = engine.install_recorder(kp, lambda at: assemble_recorder(spec, at),
                                          detour=self.detour)  # fmt: skip
        except ProbeError as exc:
            engine.fast.consumers.pop(probe_id, None)
            tp.plan = None
            raise NotFastError(f"{tp.name}: {exc}") from exc
        if rec is None:
            engine.fast.consumers.pop(probe_id, None)
            tp.plan = None
            raise NotFastError(f"{tp.name}: the probed instruction cannot run boosted")
        tp.fast_id = probe_id

    def _make_fast_return(self, tp: TraceProbe, rp: Kretprobe) -> None:
        """The entry code and trampoline of a return probe in the guest
        (:mod:`qprobes.probes.fastret`): an instance per call in guest
        memory, a record per return, no stop."""
        if tp.want_stack:
            raise NotFastError(f"{tp.name}: kernel stack traces are taken on the slow path")
        engine = self.session.engine
        plan = self._with_context(plan_return_recorder(tp.args))
        try:
            ring = engine.enable_fast_path()
        except ProbeError as exc:
            raise NotFastError(f"{tp.name}: {exc}") from exc
        why = engine.not_fast_because(rp.kp)
        if why is not None:
            raise NotFastError(f"{tp.name}: {why}")
        fast, fastret = engine.fast, engine.fastret
        assert fast is not None and fastret is not None
        probe_id = fast.new_id()
        # A full ring makes the trampoline wait for the host (lossless), or
        # drops the return's record and counts it (fast_dropped).
        spec = self._recorder_spec(probe_id, plan.fetches, ring, self.lossless)
        current = spec.task.current if spec.task is not None else None
        # The guest's own kretprobes (rethook, through ftrace at +0) run before
        # this entry: the entry code reports the caller behind them.
        rethook = getattr(self.session.kretprobes.see_through, "rethook", None)
        try:
            fr = fastret.add(rp.maxactive, current, fast.place,
                             lambda at: assemble_recorder(spec, at), rethook,
                             self.lossless)  # fmt: skip
        except ProbeError as exc:
            raise NotFastError(f"{tp.name}: {exc}") from exc
        try:
            engine.install_fast_entry(rp.kp, Recorder(fr.entry, b"", (), 0))
        except ProbeError as exc:
            fastret.remove(fr)  # its share goes back (no instance was ever taken)
            raise NotFastError(f"{tp.name}: {exc}") from exc
        tp.plan, tp.fast_id, tp.fast_ret = plan, probe_id, fr
        tp.fast_missed = lambda: fastret.nmissed(fr)
        fast.consumers[probe_id] = lambda data: self._consume_return(tp, data)
        slow_entry = rp.kp.pre_handler
        assert slow_entry is not None

        def pre_handler(kp: Kprobe, ctx: HitContext) -> bool:
            # A hit on the host with every fast instance taken (lossless mode
            # hands those over): free the instances of tasks gone; if some
            # were, this call takes the slow path, else it is missed, as the
            # guest counts it without a doorbell.
            if fastret.full(fr) and not fastret.reclaim():
                fr.host_missed += 1
                return False
            return bool(slow_entry(kp, ctx))

        rp.kp.pre_handler = pre_handler

    def _with_context(self, plan: RecorderPlan) -> RecorderPlan:
        """``plan`` recording the hit's context too (the latency columns), when
        the session reads the guest's (a Linux guest)."""
        fetches = getattr(self.session.trace_state, "record_fetches", None)
        return with_context(plan, fetches(RFLAGS_OFFSET)) if fetches is not None else plan

    def _recorder_spec(self, probe_id: int, fetches: tuple[Fetch, ...], ring: RingLayout,
                       lossless: bool) -> RecorderSpec:  # fmt: skip
        engine = self.session.engine
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
        return RecorderSpec(probe_id, fetches, SP_OFFSET, ring, engine.cpu_features(),
                            task, cpu_number, self.string_cap, floor,
                            kernel_reads_user=kernel is not None,
                            lossless=lossless)  # fmt: skip

    def _consume(self, tp: TraceProbe, data: bytes) -> None:
        assert tp.plan is not None
        tp.fast_hits += 1
        self._emit_record(tp, decode_record(data, tp.plan.strings))

    def _consume_return(self, tp: TraceProbe, data: bytes) -> None:
        assert tp.plan is not None
        tp.fast_hits += 1
        raw = decode_record(data, tp.plan.strings)
        entry_tsc, ret = return_extra(raw)
        self._emit_record(tp, raw, ret, entry_tsc)

    def drain(self) -> int:
        """Emit the events the guest recorded so far (every CPU's, in TSC
        order); the number of records taken (the engine's, for every tracer)."""
        fast = self.session.engine.fast
        return fast.drain() if fast is not None else 0

    def _record_timestamp(self, tsc: int, cpu: int) -> tuple[int, str]:
        """A record's time on the guest's clock: its ``sched_clock()`` (the
        TSC through the CPU's ``cyc2ns`` data) when the session reads the
        guest's clocks, else the TSC at ``tsc_khz`` anchored to host time at
        the first record."""
        clock = self.session.trace_clock
        kernel = self.session.kernel
        if clock is not None and kernel is not None:
            if self._per_cpu is None and "__per_cpu_offset" in kernel.symbols:
                n = len(self.session.engine.target.vcpus)
                raw = self.session.engine.read_data(kernel.symbols.address("__per_cpu_offset"),
                                                    8 * n)  # fmt: skip
                self._per_cpu = [int.from_bytes(raw[8 * i : 8 * i + 8], "little")
                                 for i in range(n)]  # fmt: skip
            at = getattr(clock, "sched_clock_at", None)
            if at is not None and self._per_cpu is not None and 0 <= cpu < len(self._per_cpu):
                ns = at(tsc, self._per_cpu[cpu])  # see below: ftrace's "local" clock
                if ns is not None:
                    return ns, "local"
            elif self._per_cpu is not None and 0 <= cpu < len(self._per_cpu):
                ctx = HitContext(cpu + 1, PtRegs([0] * FRAME_WORDS), self.session.engine.read_data,
                                 0, tsc=tsc, gs_base=self._per_cpu[cpu])  # fmt: skip
                # sched_clock() of the record's TSC (ftrace's "local" clock):
                # the "global" and "perf" clocks clamp against state read now,
                # long after the record was made, which would reorder a CPU's
                # records.
                sched = getattr(clock, "sched_clock", None)
                ns = sched(ctx) if sched is not None else None
                if ns is not None:
                    return ns, "local"
        if self._tsc_hz is None:
            return time.monotonic_ns() - self.started, "host"
        ns = round(tsc / self._tsc_hz * 1e9)
        if self._tsc_anchor is None:
            self._tsc_anchor = ns - (time.monotonic_ns() - self.started)
        return ns - self._tsc_anchor, "host"

    def _emit_record(self, tp: TraceProbe, raw: RawRecord, ret: int | None = None,
                     entry_tsc: int | None = None) -> None:  # fmt: skip
        """Emit a fast-path record; a return probe's has its real return
        address (``ret``) and its entry's TSC."""
        assert tp.plan is not None
        values = tp.plan.values(raw)
        cpu = raw.cpu
        duration = None
        if entry_tsc is not None:
            # Entry and return on the return's CPU's clock (the task may have
            # migrated; the guest's TSCs are synchronized).
            ts, clock = self._record_timestamp(raw.tsc, cpu)
            entry_ts, entry_clock = self._record_timestamp(entry_tsc, cpu)
            if entry_clock == clock:
                duration = max(0, ts - entry_ts) / 1e9
                if tp.latency is not None:
                    tp.latency.add(duration)
        seen: dict[str, Any] = {}
        if tp.filter is not None or tp.hists:  # (built only for them: a drain is hot)
            seen = {**common_values(raw.pid, raw.comm, cpu), "common_cpu": cpu, **values}
        passed = tp.filter is None or evaluate_filter(tp.filter, seen)
        if not passed and not tp.hists:
            tp.filtered += 1
            return
        if entry_tsc is None:
            ts, clock = self._record_timestamp(raw.tsc, cpu)
        context = tp.plan.context(raw)
        tctx = tracing_gen_ctx(*context) if context is not None else None
        event = TraceEvent(
            group=tp.spec.group,
            event=tp.spec.event,
            kind="r" if tp.spec.is_return else "p",
            addr=tp.addr,
            location=tp.location,
            ret_to=self._location(ret) if ret is not None else None,
            cpu=cpu,
            pid=raw.pid,
            comm=raw.comm,
            timestamp_ns=ts,
            fields=values,
            text=format_args(tp.args, values),
            clock=clock,
            trace_flags=tctx.flags if tctx is not None else 0,
            preempt_count=tctx.preempt_count if tctx is not None else 0,
            duration=duration,
        )
        for hist in tp.hists:
            hist.update(event, seen)
        if not passed:
            tp.filtered += 1
            return
        tp.emitted += 1
        self.sink(event)

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
        fastret = self.session.engine.fastret
        if tp.fast_ret is not None and fastret is not None:
            # Its trampoline and instances stay while calls are outstanding.
            fastret.remove(tp.fast_ret)

    def remove_many(self, names: Sequence[str]) -> list[QprobesError | None]:
        """:meth:`remove` each of ``names``, their probes unregistered in one
        batch (``Session.unregister_many``: one drain, the bytes back in one
        stream); for each, None or the error that kept it."""
        out: list[QprobesError | None] = [None] * len(names)
        fast = self.session.engine.fast
        going: list[tuple[int, TraceProbe]] = []
        for n, name in enumerate(names):
            tp = self.probes.get(name)
            if tp is None:
                out[n] = ProbeError(f"no event {name}")
                continue
            going.append((n, tp))
            del self.probes[name]
        if fast is not None and any(tp.fast_id for _n, tp in going):
            self.drain()  # what they recorded before they go
        for _n, tp in going:
            if tp.fast_id and fast is not None:
                fast.consumers.pop(tp.fast_id, None)
        with_probe = [(n, tp) for n, tp in going if tp.probe is not None]
        results = self.session.unregister_many([tp.probe for _n, tp in with_probe
                                                if tp.probe is not None])  # fmt: skip
        for (n, _tp), err in zip(with_probe, results, strict=True):
            out[n] = err
        fastret = self.session.engine.fastret
        for _n, tp in going:
            if tp.fast_ret is not None and fastret is not None:
                fastret.remove(tp.fast_ret)  # its trampoline stays while calls are out
        return out

    def _task(self, ctx: HitContext) -> tuple[str | None, int | None]:
        kernel = self.session.kernel
        if kernel is None:
            return None, None
        state = self.session.trace_state  # reads by __pa where it can
        found = state.comm_pid(ctx) if state else kernel.comm_pid(ctx.gs_base, ctx.read)
        return found if found is not None else (None, None)

    def _timestamp(self, ctx: HitContext) -> tuple[int, str]:
        clock = self.session.trace_clock
        if clock is not None:
            found = clock(ctx)
            if found is not None:
                return found
        return time.monotonic_ns() - self.started, "host"

    def _context(self, ctx: HitContext) -> tuple[int, TraceCtx]:
        state = self.session.trace_state
        if state is not None:
            found = state.trace_ctx(ctx)
            if found is not None:
                return state.cpu(ctx), found
        # Only the interrupt flag is known.
        return ctx.vcpu, tracing_gen_ctx(ctx.regs.eflags, PREEMPT_NEED_RESCHED, 0)

    def _entry_handler(self, rp: Kretprobe, ctx: HitContext) -> bool:
        # The entry's time on the trace clock, paired with the return by the instance.
        ctx.entry_data = self._timestamp(ctx)
        return False

    def _emit(self, tp: TraceProbe, ctx: HitContext, ret_to: str | None) -> None:
        comm, pid = self._task(ctx)
        cpu, tctx = self._context(ctx)
        ts, clock = self._timestamp(ctx)
        duration = None
        entry = ctx.entry_data
        if ctx.kind == "kretprobe" and isinstance(entry, tuple) and entry[1] == clock:
            duration = max(0, ts - entry[0]) / 1e9
            if tp.latency is not None:
                tp.latency.add(duration)
        fctx = HitFetchContext(ctx, lambda: comm or "")
        values = evaluate(tp.args, fctx)
        seen = {**common_values(pid, comm, cpu), "common_cpu": cpu, **values}
        passed = tp.filter is None or evaluate_filter(tp.filter, seen)
        if not passed and not tp.hists:
            tp.filtered += 1
            return
        stack: tuple[int, ...] | None = None
        syms: tuple[str, ...] = ()
        show = False
        if tp.want_stack:
            stack = tuple(ctx.stack())
            syms = tuple(self._symbol(a) for a in stack)
            show = tp.stacktrace is not None and passed and tp.stacktrace.fires(seen)
        event = TraceEvent(
            group=tp.spec.group,
            event=tp.spec.event,
            kind="r" if tp.spec.is_return else "p",
            addr=tp.addr,
            location=tp.location,
            ret_to=ret_to,
            cpu=cpu,
            pid=pid,
            comm=comm,
            timestamp_ns=ts,
            fields=values,
            text=format_args(tp.args, values),
            clock=clock,
            trace_flags=tctx.flags,
            preempt_count=tctx.preempt_count,
            stack=stack,
            stack_syms=syms,
            show_stack=show,
            duration=duration,
        )
        # As in the kernel, triggers see every hit; the event's filter only
        # chooses what is printed (a trigger has its own ``if``).
        for hist in tp.hists:
            hist.update(event, seen)
        if not passed:
            tp.filtered += 1
            return
        tp.emitted += 1
        self.sink(event)

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

    def latency(self, function: str, unit: str = "us") -> TraceProbe:
        """Measure ``function``'s latency: a return probe ``lat_FUNCTION``
        whose every call's entry-to-return time goes to ``tp.latency``
        (a :class:`~qprobes.tracing.latency.Latency`); its events carry
        ``duration``."""
        event = "lat_" + "".join(c if c.isalnum() or c == "_" else "_" for c in function)
        tp = self.add(f"r:qprobes/{event} {function}")
        tp.latency = Latency(function, unit)
        return tp

    def hist(self, event: str, trigger: str) -> Histogram:
        """Add ftrace's ``hist`` trigger ``trigger`` (``hist:keys=...``) to
        ``event`` (``EVENT`` or ``GROUP/EVENT``) and return the
        :class:`~qprobes.tracing.hist.Histogram` it fills as hits come in."""
        tp = self._probe_named(event)
        hist = self._histogram(tp, trigger)
        tp.hists.append(hist)
        return hist

    def stacktrace(self, event: str, trigger: str = "stacktrace") -> None:
        """Add ftrace's ``stacktrace[:COUNT] [if FILTER]`` trigger to
        ``event``: its events carry the kernel stack and print it."""
        self._add_trigger(self._probe_named(event), trigger)

    @property
    def can_unwind(self) -> bool:
        return self.session.engine.stack_unwinder is not None

    def _add_trigger(self, tp: TraceProbe, text: str) -> None:
        name = text.split(":", 1)[0].split(" ", 1)[0].strip()
        if name == "hist":
            tp.hists.append(self._histogram(tp, text))
        elif name == "stacktrace":
            if not self.can_unwind:
                raise ProbeError("stacktrace: this session cannot unwind kernel stacks "
                                 "(no ORC tables or BTF)")  # fmt: skip
            if tp.stacktrace is not None:
                raise ProbeError(f"{tp.name} already has a stacktrace trigger")
            tp.stacktrace = parse_stacktrace(text, [a.filter_field for a in tp.args])
        else:
            raise ProbeError(f"qprobes runs hist and stacktrace triggers, not {name!r}")

    def _histogram(self, tp: TraceProbe, trigger: str) -> Histogram:
        spec = parse_hist(trigger, [a.filter_field for a in tp.args], stacktrace=self.can_unwind)
        syscalls = self._syscall_names() if any(k.mod is KeyMod.SYSCALL for k in spec.keys) else {}
        return Histogram(
            tp.spec.event, spec, resolve=self._resolve, syscall_name=syscalls.get,
            stack=lambda event: event.stack or (),
        )  # fmt: skip

    def _probe_named(self, event: str) -> TraceProbe:
        if event in self.probes:
            return self.probes[event]
        found = [tp for tp in self.probes.values() if tp.spec.event == event]
        if len(found) == 1:
            return found[0]
        known = ", ".join(sorted(tp.spec.event for tp in self.probes.values())) or "none"
        raise ProbeError(f"no event {event!r} to add a trigger to (events: {known})")

    def _syscall_names(self) -> dict[int, str]:
        """System call numbers to names (``sys_read``), from the guest's
        ``sys_call_table``, as ``get_syscall_name`` gives them; a number whose
        entry is ``sys_ni_syscall`` has no name."""
        symbols = self._symbols
        if symbols is None:
            return {}
        try:
            table = symbols.lookup("sys_call_table")
        except SymbolError:  # no table: every number prints as unknown_syscall
            return {}
        if not table.size:
            return {}
        raw = self.session.engine.read_data(table.addr, table.size)
        names: dict[int, str] = {}
        for nr in range(len(raw) // 8):
            found = symbols.resolve(int.from_bytes(raw[nr * 8 : nr * 8 + 8], "little"))
            if found is None or found[1] != 0:
                continue
            name = found[0].name.removeprefix("__x64_")
            if name.endswith("ni_syscall"):
                continue
            names[nr] = name
        return names

    def _fast_now(self, tp: TraceProbe) -> bool:
        """Whether ``tp``'s hits are recorded in the guest now."""
        kp = tp.kprobe
        return bool(tp.fast_id) and kp is not None and self.session.engine.is_fast(kp)

    def _slow_reason(self, tp: TraceProbe) -> str | None:
        if not self.fast or self._fast_now(tp):
            return None
        if tp.slow_reason is None:
            return ("another probe shares its address and runs on the host, or it is "
                    "disabled or lost")
        return tp.slow_reason

    def summary(self, notes: bool = True) -> list[dict[str, Any]]:
        """Hits and misses per probe. ``notes=False`` leaves out what needs the
        guest (whether it changed a probed ftrace site): for a guest that died."""
        engine = self.session.engine
        return [
            {"event": name, "location": tp.spec.location, "hits": tp.nhit,
             "emitted": tp.emitted, "filtered": tp.filtered, "missed": tp.nmissed,
             "note": engine.ftrace_site_changed(tp.kprobe)
                     if notes and tp.kprobe is not None and not tp.lost else None,
             "lost": tp.lost, "lost_why": tp.lost_why, "fast": self._fast_now(tp),
             "slow_reason": self._slow_reason(tp),
             "detour": tp.kprobe is not None and engine.is_detoured(tp.kprobe),
             "detour_refused": tp.kprobe.detour_refused
                               if self.fast and self.detour and tp.kprobe is not None
                               and self._fast_now(tp) else None}
            for name, tp in self.probes.items()
        ]  # fmt: skip
