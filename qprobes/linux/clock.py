"""The guest's own clocks at a probe hit, from the TSC the trap stub read.

ftrace stamps each event with its trace clock (``trace_clock`` in tracefs,
``global_trace.array_buffer.buffer->clock`` in memory):

- ``local``, the default, is ``trace_clock_local()`` = ``sched_clock()``
  (kernel/trace/trace_clock.c). On x86 that is ``native_sched_clock()``
  (arch/x86/kernel/tsc.c) while the TSC is in use (the ``__use_tsc``
  static key): the TSC scaled by the CPU's ``cyc2ns`` data, ::

      ns = cyc2ns_offset + mul_u64_u32_shr(tsc, cyc2ns_mul, cyc2ns_shift)

  read from the per-CPU ``struct cyc2ns { struct cyc2ns_data data[2];
  seqcount_latch_t seq; }``, the copy ``data[seq & 1]``
  (``cyc2ns_read_begin``).
- ``global`` is ``trace_clock_global()``: ``sched_clock_cpu()`` held
  monotonic across CPUs by ``trace_clock_struct.prev_time``. Linux makes it
  the default when the sched clock is unstable (``tracing_set_default_clock``:
  "Unstable clock detected, switching default tracing clock to global"),
  as on the default guest with 2 vCPUs under TCG ("Marking TSC unstable
  due to TSCs unsynchronized").
- ``perf`` is ``trace_clock()`` = ``local_clock()``, printk's clock (what
  dmesg shows): ``sched_clock_cpu()`` of this CPU.
- ``x86-tsc`` is the TSC itself.

``sched_clock_cpu()`` (kernel/sched/clock.c) is ``sched_clock() +
__sched_clock_offset`` while ``sched_clock_stable()``; otherwise the
CPU's ``sched_clock_data`` filtered by ``sched_clock_local()``: the time
since the last tick's raw ``sched_clock()``, added to that tick's GTOD
time, clamped to within one tick.

qprobes' trap stub reads the TSC (``rdtsc``) just before it rings the
doorbell, so a hit is stamped on the guest's clock and its events sort
among the guest's own ftrace output. Under TCG QEMU derives the guest TSC
from the host's and stops it while the guest is stopped, as at every
doorbell. Layouts come from BTF, addresses from kallsyms.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from qprobes.errors import QprobesError, SymbolError
from qprobes.probes.context import HitContext
from qprobes.symbols.linux import LinuxKernel

Read = Callable[[int, int], bytes]

U64 = (1 << 64) - 1


class ClockError(SymbolError):
    """The guest's sched_clock() cannot be computed from outside."""


@dataclass(frozen=True)
class Cyc2nsData:
    """``struct cyc2ns_data`` (arch/x86/include/asm/timer.h)."""

    cyc2ns_mul: int
    cyc2ns_shift: int
    cyc2ns_offset: int


def mul_u64_u32_shr(a: int, mul: int, shift: int) -> int:
    """include/linux/math64.h: ``(a * mul) >> shift`` with a 96-bit product."""
    return ((a & U64) * (mul & 0xFFFF_FFFF)) >> shift & U64


def cycles_2_ns(tsc: int, data: Cyc2nsData) -> int:
    """``__cycles_2_ns``: TSC cycles to sched_clock() nanoseconds."""
    return (data.cyc2ns_offset + mul_u64_u32_shr(tsc, data.cyc2ns_mul, data.cyc2ns_shift)) & U64


def wrap_max(x: int, y: int) -> int:
    """kernel/sched/clock.c: the later of two u64 clock values, across a wrap."""
    return x if _s64(x - y) > 0 else y


def wrap_min(x: int, y: int) -> int:
    return x if _s64(x - y) < 0 else y


def _s64(v: int) -> int:
    v &= U64
    return v - (1 << 64) if v >> 63 else v


@dataclass(frozen=True)
class SchedClockData:
    """``struct sched_clock_data`` (kernel/sched/clock.c)."""

    tick_raw: int
    tick_gtod: int
    clock: int


def sched_clock_local(now: int, scd: SchedClockData, gtod_offset: int, tick_nsec: int) -> int:
    """``sched_clock_local()``: the unstable per-CPU clock at raw ``now``."""
    delta = max(_s64(now - scd.tick_raw), 0)
    gtod = (scd.tick_gtod + gtod_offset) & U64
    clock = (gtod + delta) & U64
    min_clock = wrap_max(gtod, scd.clock)
    max_clock = wrap_max(scd.clock, (gtod + tick_nsec) & U64)
    return wrap_min(wrap_max(clock, min_clock), max_clock)


def trace_clock_global(now: int, prev_time: int) -> int:
    """``trace_clock_global()``: never before the last time any CPU read."""
    return prev_time if _s64(now - prev_time) < 0 else now


@dataclass(frozen=True)
class _Layout:
    cyc2ns: int  # per-CPU offset of the cyc2ns variable
    data: int  # offsetof(struct cyc2ns, data)
    data_size: int  # sizeof(struct cyc2ns_data)
    seq: int  # offsetof(struct cyc2ns, seq.seqcount.sequence)
    mul: tuple[int, int]
    shift: tuple[int, int]
    offset: tuple[int, int]


def _field(data: bytes, where: tuple[int, int]) -> int:
    off, size = where
    return int.from_bytes(data[off : off + size], "little")


#: The trace clocks qprobes computes, by the kernel function behind each
#: (kernel/trace/trace.c, trace_clocks[]), and whether it counts ns.
TRACE_CLOCKS = {
    "trace_clock_local": "local",
    "trace_clock_global": "global",
    "trace_clock": "perf",
    "trace_clock_x86_tsc": "x86-tsc",
}
#: Clocks whose timestamps are not nanoseconds (printed as a plain count).
COUNTER_CLOCKS = frozenset({"x86-tsc", "counter"})


class GuestClock:
    """The guest's clocks at a hit: ``sched_clock()``, ``sched_clock_cpu()``
    (= ``local_clock()``) and whichever trace clock ftrace uses now.

    ``read`` reads kernel memory (the engine's ``read_data``).
    """

    def __init__(self, kernel: LinuxKernel, read: Read) -> None:
        self.read = read
        self._cyc2ns_cache: dict[int, tuple[float, Cyc2nsData]] = {}
        # Per CPU: the cyc2ns data seen, each from the TSC where it took over.
        self._cyc2ns_eras: dict[int, list[tuple[int, Cyc2nsData]]] = {}
        self.symbols = symbols = kernel.symbols
        btf = kernel.btf
        if btf is None:
            raise ClockError("no BTF: the layout of the guest's cyc2ns data is unknown")
        for name in ("cyc2ns", "__use_tsc"):
            if name not in symbols:
                raise ClockError(f"the guest kernel has no {name} (not an x86 TSC sched_clock)")
        try:
            data, data_bytes = btf.struct_member_offset("cyc2ns", "data")
            seq, _ = btf.struct_member_offset("cyc2ns", "seq.seqcount.sequence")
            self.layout = _Layout(
                cyc2ns=symbols.address("cyc2ns"),
                data=data,
                data_size=data_bytes // 2,
                seq=seq,
                mul=btf.struct_member_offset("cyc2ns_data", "cyc2ns_mul"),
                shift=btf.struct_member_offset("cyc2ns_data", "cyc2ns_shift"),
                offset=btf.struct_member_offset("cyc2ns_data", "cyc2ns_offset"),
            )
            self._static_key = btf.struct_member_offset("static_key", "enabled")
        except SymbolError as exc:
            raise ClockError(f"cannot lay out the guest's cyc2ns data: {exc}") from exc
        if not self._key_enabled(symbols.address("__use_tsc")):
            raise ClockError("the guest's sched_clock() does not use the TSC (__use_tsc is off)")
        self._paravirt_check(kernel)
        self._unstable_layout(kernel)
        self._trace_clock_layout(kernel)

    def _addr(self, name: str) -> int | None:
        return self.symbols.address(name) if name in self.symbols else None

    def _unstable_layout(self, kernel: LinuxKernel) -> None:
        """What sched_clock_cpu() reads (kernel/sched/clock.c)."""
        assert kernel.btf is not None
        self.sched_clock_offset = self._addr("__sched_clock_offset")
        self.sched_clock_stable = self._addr("__sched_clock_stable")
        self.sched_clock_running = self._addr("sched_clock_running")
        self.gtod_offset = self._addr("__gtod_offset")
        self.tick_nsec = self._addr("tick_nsec")  # TICK_NSEC, as NTP adjusted it
        self.sched_clock_data = self._addr("sched_clock_data")
        self.scd: tuple[tuple[int, int], ...] | None = None
        try:
            self.scd = tuple(kernel.btf.struct_member_offset("sched_clock_data", m)
                             for m in ("tick_raw", "tick_gtod", "clock"))  # fmt: skip
        except SymbolError:
            self.scd = None

    def _trace_clock_layout(self, kernel: LinuxKernel) -> None:
        """Where ftrace's current clock function is: global_trace's ring buffer."""
        assert kernel.btf is not None
        self.trace_buffer: tuple[int, int] | None = None
        self._trace_buffer_ptr: int | None = None
        self.trace_clock_struct: int | None = None
        self.clocks: dict[int, str] = {
            self.symbols.address(func): name
            for func, name in TRACE_CLOCKS.items()
            if func in self.symbols
        }
        global_trace = self._addr("global_trace")
        if global_trace is None:
            return
        try:
            buffer, _ = kernel.btf.struct_member_offset("trace_array", "array_buffer.buffer")
            clock, _ = kernel.btf.struct_member_offset("trace_buffer", "clock")
        except SymbolError:
            return
        self.trace_buffer = (global_trace + buffer, clock)
        self.trace_clock_struct = self._addr("trace_clock_struct")

    def _buffer(self) -> int:
        """global_trace's ring buffer (allocated once, at boot)."""
        if self._trace_buffer_ptr is None:
            assert self.trace_buffer is not None
            self._trace_buffer_ptr = self._u64(self.trace_buffer[0])
        return self._trace_buffer_ptr

    def _u64(self, addr: int) -> int:
        return int(struct.unpack("<Q", self.read(addr, 8))[0])

    def _key_enabled(self, addr: int) -> bool:
        off, size = self._static_key
        return int.from_bytes(self.read(addr + off, size), "little", signed=True) > 0

    def _paravirt_check(self, kernel: LinuxKernel) -> None:
        """sched_clock() is ``static_call(pv_sched_clock)`` on a paravirt kernel:
        only ``native_sched_clock`` is the TSC formula (kvmclock is not)."""
        symbols, btf = kernel.symbols, kernel.btf
        if "__SCK__pv_sched_clock" not in symbols or "native_sched_clock" not in symbols:
            return
        assert btf is not None
        try:
            off, size = btf.struct_member_offset("static_call_key", "func")
        except SymbolError:
            return
        func = int.from_bytes(
            self.read(symbols.address("__SCK__pv_sched_clock") + off, size), "little"
        )
        native = symbols.address("native_sched_clock")
        if func != native:
            found = symbols.resolve(func)
            name = found[0].name if found is not None else f"{func:#x}"
            raise ClockError(f"the guest's sched_clock() is {name}, not native_sched_clock")

    def cyc2ns(self, gs_base: int) -> Cyc2nsData:
        """The CPU's current ``cyc2ns_data`` (``cyc2ns_read_begin``: the copy
        the latch's sequence names). Stopped, one read of the whole struct
        is consistent; read while the guest runs (the fast path's drains
        through host memory), the sequence is read again after, and the
        read retried if it moved (``cyc2ns_read_retry``)."""
        lay = self.layout
        start = min(lay.data, lay.seq)
        end = max(lay.data + 2 * lay.data_size, lay.seq + 4)
        for _ in range(8):
            raw = self.read(gs_base + lay.cyc2ns + start, end - start)
            (seq,) = struct.unpack_from("<I", raw, lay.seq - start)
            again = self.read(gs_base + lay.cyc2ns + lay.seq, 4)
            if struct.unpack("<I", again)[0] == seq:
                break
        else:
            raise ClockError("the guest kept changing its cyc2ns data while it was read")
        at = lay.data - start + (seq & 1) * lay.data_size
        data = raw[at : at + lay.data_size]
        return Cyc2nsData(_field(data, lay.mul), _field(data, lay.shift), _field(data, lay.offset))

    #: How long :meth:`sched_clock_at` reuses a CPU's ``cyc2ns`` data: the
    #: records of one drain share a read (they are converted when drained,
    #: long after they were made, with the data of that moment either way).
    CYC2NS_REUSE_S = 0.1

    def sched_clock_at(self, tsc: int, gs_base: int) -> int | None:
        """``sched_clock()`` in ns of a TSC read on the CPU whose per-CPU
        base is ``gs_base`` (a fast-path record's), or None."""
        if not gs_base:
            return None
        now = time.monotonic()
        cache = self._cyc2ns_cache
        hit = cache.get(gs_base)
        if hit is None or now - hit[0] > self.CYC2NS_REUSE_S:
            try:
                hit = (now, self.cyc2ns(gs_base))
            except (QprobesError, struct.error):
                return None
            cache[gs_base] = hit
            self._new_era(gs_base, hit[1])
        # A record is converted with the data of its own moment: one made
        # before the guest changed its scale (set_cyc2ns_scale(), e.g. the
        # refined TSC calibration) and drained after it takes the old data,
        # as the guest's own clock did then (the times stay in order).
        for start, data in reversed(self._cyc2ns_eras.get(gs_base, ())):
            if tsc >= start:
                return cycles_2_ns(tsc, data)
        return cycles_2_ns(tsc, hit[1])

    #: The eras a CPU's history keeps.
    CYC2NS_ERAS = 8

    def _new_era(self, gs_base: int, data: Cyc2nsData) -> None:
        """Note ``data`` as the CPU's current cyc2ns, from the TSC where it
        meets the last one (the guest makes the clock continuous there:
        ``set_cyc2ns_scale()`` sets the new offset so that both give the
        same time at the TSC of the change)."""
        eras = self._cyc2ns_eras.setdefault(gs_base, [])
        if not eras:
            eras.append((0, data))
            return
        last = eras[-1][1]
        if data == last:
            return
        rate_old = last.cyc2ns_mul / float(1 << last.cyc2ns_shift)
        rate_new = data.cyc2ns_mul / float(1 << data.cyc2ns_shift)
        if rate_old == rate_new:
            start = 0  # only the offset moved: no TSC where they meet
        else:
            start = int((_s64(data.cyc2ns_offset) - _s64(last.cyc2ns_offset))
                        / (rate_old - rate_new))  # fmt: skip
        if start <= eras[-1][0]:
            eras[:] = [(0, data)]  # (no usable meeting point: the new data alone)
            return
        eras.append((start, data))
        del eras[: -self.CYC2NS_ERAS]

    def sched_clock(self, ctx: HitContext) -> int | None:
        """``sched_clock()`` in ns at the hit, or None (no TSC, no per-CPU base)."""
        if ctx.tsc is None or not ctx.gs_base:
            return None
        try:
            return cycles_2_ns(ctx.tsc, self.cyc2ns(ctx.gs_base))
        except (QprobesError, struct.error):
            return None

    def sched_clock_cpu(self, ctx: HitContext) -> int | None:
        """``sched_clock_cpu(smp_processor_id())`` at the hit, which is
        ``local_clock()``; None when it cannot be computed."""
        now = self.sched_clock(ctx)
        if now is None:
            return None
        try:
            if self.sched_clock_stable is not None and self._key_enabled(self.sched_clock_stable):
                if self.sched_clock_offset is None:
                    return None
                return (now + self._u64(self.sched_clock_offset)) & U64
            if self.sched_clock_running is not None and not self._key_enabled(
                self.sched_clock_running
            ):
                return now
            if (self.scd is None or self.sched_clock_data is None or self.gtod_offset is None
                    or self.tick_nsec is None):  # fmt: skip
                return None
            base = ctx.gs_base + self.sched_clock_data
            tick_raw, tick_gtod, clock = (
                int.from_bytes(self.read(base + off, size), "little") for off, size in self.scd
            )
            scd = SchedClockData(tick_raw, tick_gtod, clock)
            return sched_clock_local(now, scd, self._u64(self.gtod_offset),
                                     self._u64(self.tick_nsec))  # fmt: skip
        except (QprobesError, struct.error):
            return None

    def local_clock(self, ctx: HitContext) -> int | None:
        """``local_clock()`` (printk's clock, dmesg's timestamps) at the hit."""
        return self.sched_clock_cpu(ctx)

    def trace_clock_name(self) -> str | None:
        """The trace clock ftrace uses now (tracefs ``trace_clock``), if it
        is one qprobes computes."""
        if self.trace_buffer is None:
            return "local"
        try:
            func = self._u64(self._buffer() + self.trace_buffer[1])
        except (QprobesError, struct.error):
            return None
        return self.clocks.get(func)

    def trace_clock(self, ctx: HitContext) -> tuple[int, str] | None:
        """The hit's timestamp on ftrace's current clock, and the clock's name."""
        name = self.trace_clock_name()
        ns: int | None = None
        if name == "local":
            ns = self.sched_clock(ctx)
        elif name == "perf":
            ns = self.sched_clock_cpu(ctx)
        elif name == "x86-tsc":
            ns = ctx.tsc
        elif name == "global":
            ns = self.sched_clock_cpu(ctx)
            if ns is not None and self.trace_clock_struct is not None:
                # static struct { u64 prev_time; arch_spinlock_t lock; }: an
                # anonymous type BTF does not name; prev_time comes first.
                with contextlib.suppress(QprobesError, struct.error):
                    ns = trace_clock_global(ns, self._u64(self.trace_clock_struct))
        if ns is None or name is None:
            return None
        return ns, name

    def __call__(self, ctx: HitContext) -> tuple[int, str] | None:
        return self.trace_clock(ctx)
