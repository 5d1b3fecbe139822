"""Trace output as the guest's own ftrace writes it (no guest): the latency
column, the context flags, the clock arithmetic, the header and whole lines.

The expected lines and header are copied from the default guest's (Linux
6.1) ``/sys/kernel/tracing/trace`` for ``p:kopen do_sys_openat2
path=+0(%si):string dfd=%di`` and ``r:kret do_sys_openat2 $retval``.
"""

from __future__ import annotations

import json
import struct
from typing import ClassVar

import pytest

from qprobes.errors import QprobesError, SymbolError
from qprobes.linux.clock import (
    ClockError,
    Cyc2nsData,
    GuestClock,
    SchedClockData,
    cycles_2_ns,
    mul_u64_u32_shr,
    sched_clock_local,
    trace_clock_global,
    wrap_max,
    wrap_min,
)
from qprobes.linux.preempt import (
    PREEMPT_NEED_RESCHED,
    TRACE_FLAG_BH_OFF,
    TRACE_FLAG_HARDIRQ,
    TRACE_FLAG_IRQS_NOSUPPORT,
    TRACE_FLAG_IRQS_OFF,
    TRACE_FLAG_NEED_RESCHED,
    TRACE_FLAG_NMI,
    TRACE_FLAG_PREEMPT_RESCHED,
    TRACE_FLAG_SOFTIRQ,
    PreemptState,
    TraceCtx,
    tracing_gen_ctx,
)
from qprobes.probes.context import HitContext, PtRegs
from qprobes.probes.stubs import FRAME_WORDS, PT_REGS_NAMES
from qprobes.tracing.events import (
    TraceEvent,
    ns2usecs,
    trace_header,
    trace_print_lat_fmt,
    trace_print_time,
)

IF = 0x200
NO_RESCHED = PREEMPT_NEED_RESCHED  # x86: the bit is set while no reschedule is due

# --- trace_print_lat_fmt ------------------------------------------------------------

IRQS_OFF, NEED, PREEMPT = TRACE_FLAG_IRQS_OFF, TRACE_FLAG_NEED_RESCHED, TRACE_FLAG_PREEMPT_RESCHED
HARD, SOFT, NMI, BH = TRACE_FLAG_HARDIRQ, TRACE_FLAG_SOFTIRQ, TRACE_FLAG_NMI, TRACE_FLAG_BH_OFF

LAT_FMT = [
    (0, 0, "....."),
    (IRQS_OFF, 0, "d...."),
    (IRQS_OFF | BH, 0, "D...."),
    (BH, 0, "b...."),
    (TRACE_FLAG_IRQS_NOSUPPORT, 0, "X...."),
    (NEED | PREEMPT, 0, ".N..."),
    (NEED, 0, ".n..."),
    (PREEMPT, 0, ".p..."),
    (IRQS_OFF | HARD, 1, "d.h1."),
    (HARD | SOFT, 0, "..H.."),
    (SOFT, 0, "..s.."),
    (NMI | HARD, 0, "..Z.."),
    (NMI, 0, "..z.."),
    (0, 0xF, "...f."),
    (0, 0x10, "....1"),
    (IRQS_OFF | NEED | PREEMPT | HARD, 0x23, "dNh32"),
]


@pytest.mark.parametrize(("flags", "pc", "text"), LAT_FMT, ids=[t for _, _, t in LAT_FMT])
def test_trace_print_lat_fmt(flags: int, pc: int, text: str) -> None:
    assert trace_print_lat_fmt(flags, pc) == text


# --- tracing_gen_ctx ----------------------------------------------------------------------

GEN_CTX = [
    # rflags, raw __preempt_count, thread_info.flags, migration_disabled -> column
    (IF, NO_RESCHED, 0, 0, "....."),  # a task in process context
    (0, NO_RESCHED, 0, 0, "d...."),  # interrupts off
    (IF, 0, 1 << 3, 0, ".N..."),  # TIF_NEED_RESCHED, folded into __preempt_count
    (IF, NO_RESCHED, 1 << 3, 0, ".n..."),  # TIF only
    (IF, 0, 0, 0, ".p..."),  # the folded bit only
    (IF, NO_RESCHED | 1, 0, 0, "...1."),  # preempt_disable()
    (IF, NO_RESCHED | 20, 0, 0, "...f."),  # capped at 15
    (0, NO_RESCHED | 0x10000, 0, 0, "d.h.."),  # a hardirq
    (0, NO_RESCHED | 0x10001, 0, 0, "d.h1."),
    (IF, NO_RESCHED | 0x100, 0, 0, "..s.."),  # serving a softirq
    (IF, NO_RESCHED | 0x200, 0, 0, "b...."),  # local_bh_disable() (SOFTIRQ_DISABLE_OFFSET)
    (IF, NO_RESCHED | 0x300, 0, 0, "b.s.."),  # bh disabled inside a softirq
    (0, NO_RESCHED | 0x10200, 0, 0, "D.h.."),
    (0, NO_RESCHED | 0x110000, 0, 0, "d.Z.."),  # nmi_enter(): NMI + HARDIRQ
    (0, NO_RESCHED | 0x100000, 0, 0, "d.z.."),
    (IF, NO_RESCHED, 0, 1, "....1"),  # migrate_disable()
    (IF, NO_RESCHED | 2, 0, 17, "...2f"),
]


@pytest.mark.parametrize(("rflags", "pc", "tif", "migrate", "text"), GEN_CTX,
                         ids=[f"{pc:#x}-{t}" for _, pc, _, _, t in GEN_CTX])  # fmt: skip
def test_tracing_gen_ctx(rflags: int, pc: int, tif: int, migrate: int, text: str) -> None:
    ctx = tracing_gen_ctx(rflags | 0x2, pc, tif, migrate)
    assert trace_print_lat_fmt(ctx.flags, ctx.preempt_count) == text


def test_tracing_gen_ctx_fields() -> None:
    assert tracing_gen_ctx(IF, NO_RESCHED | 0x10003, 0, 2) == TraceCtx(HARD, 0x23)
    assert tracing_gen_ctx(0, 0, 1 << 3) == TraceCtx(IRQS_OFF | NEED | PREEMPT, 0)


# --- the clock ------------------------------------------------------------------------------

U64 = (1 << 64) - 1

MUL_SHR = [
    (1000, 1 << 31, 31, 1000),
    (2445379000, 6860, 24, 2445379000 * 6860 >> 24),
    ((1 << 64) - 1, 0xFFFF_FFFF, 32, ((1 << 64) - 1) * 0xFFFF_FFFF >> 32 & U64),  # 96-bit product
    (1 << 40, 1 << 31, 0, (1 << 71) & U64),  # truncated to 64 bits
]


@pytest.mark.parametrize(("a", "mul", "shift", "out"), MUL_SHR)
def test_mul_u64_u32_shr(a: int, mul: int, shift: int, out: int) -> None:
    assert mul_u64_u32_shr(a, mul, shift) == out


def test_cycles_2_ns_adds_the_offset_modulo_2_64() -> None:
    # 2445.379 MHz (the default guest's refined TSC): mul/2^shift = 1e6/khz.
    khz, shift = 2445379, 31
    mul = (1_000_000 << shift) // khz
    data = Cyc2nsData(mul, shift, 0)
    assert abs(cycles_2_ns(khz * 1000 * 3, data) - 3_000_000_000) < 10
    # set_cyc2ns_scale makes the offset negative so that the clock does not
    # jump at a rescale: it wraps as the kernel's u64 does.
    back = Cyc2nsData(mul, shift, (-1_000_000) & U64)
    assert cycles_2_ns(khz * 1000 * 3, back) == cycles_2_ns(khz * 1000 * 3, data) - 1_000_000


TIMES = [
    (0, "    0.000000"),
    (3_451_831_499, "    3.451831"),
    (3_451_831_500, "    3.451832"),  # ns2usecs rounds
    (999_999_999_600, " 1000.000000"),
    (123_456_789_000_000, "123456.789000"),
]


@pytest.mark.parametrize(("ns", "text"), TIMES)
def test_trace_print_time(ns: int, text: str) -> None:
    assert trace_print_time(ns) == text


def test_a_counter_clock_prints_the_count() -> None:
    assert trace_print_time(24463863480, in_ns=False) == " 24463863480"
    assert trace_print_time(123, in_ns=False) == "         123"


def test_ns2usecs() -> None:
    assert [ns2usecs(n) for n in (499, 500, 1499, 1500)] == [0, 1, 1, 2]


# GuestClock on a fake kernel: per-CPU cyc2ns at GS + its offset, the latch.

GS = 0xFFFF88801F600000
CYC2NS, USE_TSC = 0x311C0, 0xFFFFFFFF832BC5C0
OFFSET, STABLE = 0xFFFFFFFF82C39DB8, 0xFFFFFFFF832F3C10


class FakeSymbols:
    def __init__(self, table: dict[str, int]) -> None:
        self.table = table

    def __contains__(self, name: str) -> bool:
        return name in self.table

    def address(self, name: str) -> int:
        if name not in self.table:
            raise SymbolError(f"no symbol {name}")
        return self.table[name]

    def resolve(self, addr: int) -> None:
        return None


class FakeBtf:
    # The default guest's layouts (struct cyc2ns: data[2] then seq; 16-byte data).
    members: ClassVar[dict[tuple[str, str], tuple[int, int]]] = {
        ("cyc2ns", "data"): (0, 32),
        ("cyc2ns", "seq.seqcount.sequence"): (32, 4),
        ("cyc2ns_data", "cyc2ns_mul"): (0, 4),
        ("cyc2ns_data", "cyc2ns_shift"): (4, 4),
        ("cyc2ns_data", "cyc2ns_offset"): (8, 8),
        ("static_key", "enabled"): (0, 4),
        ("task_struct", "thread_info.flags"): (0, 8),
        ("task_struct", "migration_disabled"): (2032, 2),
        ("sched_clock_data", "tick_raw"): (0, 8),
        ("sched_clock_data", "tick_gtod"): (8, 8),
        ("sched_clock_data", "clock"): (16, 8),
        ("trace_array", "array_buffer.buffer"): (32, 8),
        ("trace_buffer", "clock"): (88, 8),
    }

    def struct_member_offset(self, struct_name: str, path: str) -> tuple[int, int]:
        if (struct_name, path) not in self.members:
            raise SymbolError(f"no {struct_name}.{path}")
        return self.members[(struct_name, path)]


class FakeKernel:
    def __init__(self, table: dict[str, int]) -> None:
        self.symbols = FakeSymbols(table)
        self.btf = FakeBtf()

    def current(self, gs_base: int, read: object) -> int | None:
        (task,) = struct.unpack("<Q", read(gs_base + 0x1FB80, 8))  # type: ignore[operator]
        return int(task) or None


class Memory:
    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}

    def poke(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.bytes[addr + i] = b

    def read(self, addr: int, length: int) -> bytes:
        if addr not in self.bytes:
            raise QprobesError(f"unmapped {addr:#x}")
        return bytes(self.bytes.get(addr + i, 0) for i in range(length))


def hit(tsc: int | None, gs_base: int = GS, rflags: int = IF | 2) -> HitContext:
    words = [0] * FRAME_WORDS
    words[2 + PT_REGS_NAMES.index("eflags")] = rflags
    return HitContext(1, PtRegs(words), lambda a, n: bytes(n), 0x1000, gs_base=gs_base, tsc=tsc)


def clock_memory(seq: int, stable: bool = True) -> Memory:
    mem = Memory()
    base = GS + CYC2NS
    mem.poke(base, struct.pack("<IIQ", 1, 0, 0))  # data[0]: a stale copy
    mem.poke(base + 16, struct.pack("<IIQ", 6860, 24, (-500) & U64))  # data[1]
    if seq % 2 == 0:
        mem.poke(base, struct.pack("<IIQ", 6860, 24, (-500) & U64))
        mem.poke(base + 16, struct.pack("<IIQ", 1, 0, 0))
    mem.poke(base + 32, struct.pack("<I", seq))
    mem.poke(USE_TSC, struct.pack("<i", 1))
    mem.poke(STABLE, struct.pack("<i", 1 if stable else 0))
    mem.poke(OFFSET, struct.pack("<q", -138010))
    return mem


SYMS = {"cyc2ns": CYC2NS, "__use_tsc": USE_TSC, "__sched_clock_offset": OFFSET,
        "__sched_clock_stable": STABLE}  # fmt: skip


@pytest.mark.parametrize("seq", [6, 7])
def test_sched_clock_reads_the_latched_copy(seq: int) -> None:
    mem = clock_memory(seq)
    clock = GuestClock(FakeKernel(SYMS), mem.read)  # type: ignore[arg-type]
    tsc = 2445379000 * 5
    expect = (tsc * 6860 >> 24) - 500
    assert clock.sched_clock(hit(tsc)) == expect
    assert clock(hit(tsc)) == (expect, "local")  # no global_trace: the default clock
    assert clock.local_clock(hit(tsc)) == expect - 138010  # + __sched_clock_offset
    assert clock.sched_clock(hit(None)) is None  # no TSC recorded
    assert clock.sched_clock(hit(tsc, gs_base=0)) is None


def test_sched_clock_at_reads_a_cpus_data_once_per_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast-path record's TSC to ns, as sched_clock() does; the records
    drained together share one read of the CPU's cyc2ns data."""
    mem = clock_memory(6)
    reads: list[int] = []

    def read(addr: int, size: int) -> bytes:
        if addr == GS + CYC2NS:  # (the latch's sequence is read again after)
            reads.append(addr)
        return mem.read(addr, size)

    clock = GuestClock(FakeKernel(SYMS), read)  # type: ignore[arg-type]
    tsc = 2445379000 * 5
    expect = (tsc * 6860 >> 24) - 500
    now = [100.0]
    monkeypatch.setattr("qprobes.linux.clock.time.monotonic", lambda: now[0])
    before = len(reads)
    assert [clock.sched_clock_at(tsc + i, GS) for i in (0, 0, 0)] == [expect] * 3
    assert len(reads) == before + 1
    assert clock.sched_clock_at(tsc, 0) is None  # no per-CPU base
    now[0] += clock.CYC2NS_REUSE_S * 2  # the next drain reads it again
    assert clock.sched_clock_at(tsc, GS) == expect and len(reads) == before + 2
    assert clock.sched_clock_at(tsc, GS) == clock.sched_clock(hit(tsc))


def test_records_made_before_the_guest_rescaled_its_tsc_keep_the_old_scale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """set_cyc2ns_scale() (the refined TSC calibration) gives a CPU a new mul
    and an offset that meets the old time at the TSC of the change; records
    made before it but drained after it are converted with the old data, as
    the guest's clock was then: times stay in order across the change."""
    mem = clock_memory(6)
    clock = GuestClock(FakeKernel(SYMS), mem.read)  # type: ignore[arg-type]
    now = [100.0]
    monkeypatch.setattr("qprobes.linux.clock.time.monotonic", lambda: now[0])
    t0 = 2445379000 * 5
    old = (t0 * 6860 >> 24) - 500
    assert clock.sched_clock_at(t0, GS) == old
    # The change at t1: mul 6860 -> 6900, offset so both agree at t1.
    t1 = t0 + 50_000_000
    offset = (t1 * 6860 >> 24) - 500 - (t1 * 6900 >> 24)
    mem.poke(GS + CYC2NS, struct.pack("<IIQ", 6900, 24, offset & U64))
    now[0] += 1.0
    stamps = [clock.sched_clock_at(t, GS) for t in range(t1 - 30_000_000, t1 + 30_000_000,
                                                          1_000_000)]  # fmt: skip
    assert stamps == sorted(stamps)
    assert clock.sched_clock_at(t1 - 1_000_000, GS) == ((t1 - 1_000_000) * 6860 >> 24) - 500
    assert clock.sched_clock_at(t1 + 1_000_000, GS) == ((t1 + 1_000_000) * 6900 >> 24) + offset


def test_cyc2ns_read_again_when_the_latch_moved_meanwhile() -> None:
    mem = clock_memory(6)  # seq 6: data[0] is the live copy
    after = iter([7, 6])  # the sequence read after each full read: moved once, then not
    full: list[int] = []

    def read(addr: int, size: int) -> bytes:
        if addr == GS + CYC2NS + 32 and size == 4:
            return struct.pack("<I", next(after))
        if addr == GS + CYC2NS:
            full.append(addr)
        return mem.read(addr, size)

    clock = GuestClock(FakeKernel(SYMS), read)  # type: ignore[arg-type]
    data = clock.cyc2ns(GS)
    assert (data.cyc2ns_mul, data.cyc2ns_shift) == (6860, 24)
    assert len(full) == 2


SCD, GTOD_OFFSET, TICK_NSEC, RUNNING = (
    0x32640,
    0xFFFFFFFF82C39DB0,
    0xFFFFFFFF8333FFA0,
    0xFFFFFFFF832F3C20,
)
UNSTABLE_SYMS = {**SYMS, "sched_clock_data": SCD, "__gtod_offset": GTOD_OFFSET,
                 "tick_nsec": TICK_NSEC, "sched_clock_running": RUNNING}  # fmt: skip


def unstable_memory(now_tsc: int) -> tuple[Memory, int]:
    mem = clock_memory(6, stable=False)
    now = (now_tsc * 6860 >> 24) - 500
    # The last tick: raw sched_clock 1 ms ago, at GTOD 7.0 s; -65 ms of offset.
    mem.poke(GS + SCD, struct.pack("<QQQ", now - 1_000_000, 7_000_000_000, 6_935_000_000))
    mem.poke(GTOD_OFFSET, struct.pack("<q", -65_133_730))
    mem.poke(TICK_NSEC, struct.pack("<Q", 4_000_000))
    mem.poke(RUNNING, struct.pack("<i", 1))
    return mem, now


def test_local_clock_on_an_unstable_sched_clock() -> None:
    tsc = 2445379000 * 5
    mem, _ = unstable_memory(tsc)
    clock = GuestClock(FakeKernel(UNSTABLE_SYMS), mem.read)  # type: ignore[arg-type]
    # sched_clock_local(): the tick's GTOD time + offset + 1 ms since the tick.
    assert clock.local_clock(hit(tsc)) == 7_000_000_000 - 65_133_730 + 1_000_000
    mem.poke(RUNNING, struct.pack("<i", 0))  # before sched_clock_init(): sched_clock()
    assert clock.local_clock(hit(tsc)) == clock.sched_clock(hit(tsc))
    without = GuestClock(FakeKernel(SYMS), clock_memory(6, stable=False).read)  # type: ignore[arg-type]
    assert without.local_clock(hit(tsc)) is None  # no sched_clock_data to filter with


GLOBAL_TRACE, BUFFER, CLOCK_STRUCT = 0xFFFFFFFF82B39D40, 0xFFFF888003C00000, 0xFFFFFFFF833448C0
CLOCK_FUNCS = {"trace_clock_local": 0xFFFFFFFF8119D980, "trace_clock_global": 0xFFFFFFFF8119D9E0,
               "trace_clock": 0xFFFFFFFF8119D9B0, "trace_clock_x86_tsc": 0xFFFFFFFF8106B9F0,
               "trace_clock_counter": 0xFFFFFFFF8119DA80}  # fmt: skip


@pytest.mark.parametrize(
    ("func", "name", "prev_time", "expect"),
    [
        ("trace_clock_local", "local", 0, "sched"),
        ("trace_clock_global", "global", 0, "local"),
        ("trace_clock_global", "global", 9_000_000_000, 9_000_000_000),  # held monotonic
        ("trace_clock", "perf", 0, "local"),
        ("trace_clock_x86_tsc", "x86-tsc", 0, "tsc"),
        ("trace_clock_counter", None, 0, None),  # not computed: host time
    ],
)
def test_trace_clock_follows_the_guests_choice(
    func: str, name: str | None, prev_time: int, expect: object
) -> None:
    tsc = 2445379000 * 5
    mem, _ = unstable_memory(tsc)
    mem.poke(GLOBAL_TRACE + 32, struct.pack("<Q", BUFFER))
    mem.poke(BUFFER + 88, struct.pack("<Q", CLOCK_FUNCS[func]))
    mem.poke(CLOCK_STRUCT, struct.pack("<Q", prev_time))
    syms = {**UNSTABLE_SYMS, **CLOCK_FUNCS, "global_trace": GLOBAL_TRACE,
            "trace_clock_struct": CLOCK_STRUCT}  # fmt: skip
    clock = GuestClock(FakeKernel(syms), mem.read)  # type: ignore[arg-type]
    assert clock.trace_clock_name() == name
    values = {"sched": clock.sched_clock(hit(tsc)), "local": clock.local_clock(hit(tsc)),
              "tsc": tsc}  # fmt: skip
    want = values.get(expect, expect) if isinstance(expect, str) else expect
    assert clock(hit(tsc)) == (None if name is None else (want, name))


SCHED_CLOCK_LOCAL = [
    # now, (tick_raw, tick_gtod, clock), gtod_offset -> clock
    (11_000, (10_000, 10_000, 10_200), 0, 11_000),
    (9_000, (10_000, 10_000, 10_200), 0, 10_200),  # raw went back: not before the last clock
    (5_010_000, (10_000, 10_000, 10_200), 0, 4_010_000),  # at most one tick past the tick
    (11_000, (10_000, 10_000, 10_200), -500, 10_500),
    (5, (U64 - 4, U64 - 4, U64 - 4), 0, 5),  # across the wrap
]


@pytest.mark.parametrize(("now", "scd", "offset", "out"), SCHED_CLOCK_LOCAL)
def test_sched_clock_local(now: int, scd: tuple[int, int, int], offset: int, out: int) -> None:
    assert sched_clock_local(now, SchedClockData(*scd), offset & U64, 4_000_000) == out


def test_wraps_and_the_global_clock() -> None:
    assert (wrap_max(1, 2), wrap_min(1, 2)) == (2, 1)
    assert (wrap_max(U64, 1), wrap_min(U64, 1)) == (1, U64)  # -1 is before 1
    assert [trace_clock_global(n, p) for n, p in ((100, 50), (50, 100), (5, U64 - 4))] == [
        100, 100, 5,
    ]  # fmt: skip


def test_sched_clock_refuses_a_kernel_without_the_tsc() -> None:
    mem = clock_memory(6)
    mem.poke(USE_TSC, struct.pack("<i", 0))
    with pytest.raises(ClockError, match="__use_tsc"):
        GuestClock(FakeKernel(SYMS), mem.read)  # type: ignore[arg-type]
    with pytest.raises(ClockError, match="cyc2ns"):
        GuestClock(FakeKernel({"__use_tsc": USE_TSC}), mem.read)  # type: ignore[arg-type]


def test_sched_clock_refuses_a_paravirt_clock() -> None:
    mem = clock_memory(6)
    FakeBtf.members[("static_call_key", "func")] = (0, 8)
    try:
        syms = {**SYMS, "__SCK__pv_sched_clock": 0xFFFFFFFF82A39BC0,
                "native_sched_clock": 0xFFFFFFFF81040000}  # fmt: skip
        mem.poke(0xFFFFFFFF82A39BC0, struct.pack("<Q", 0xFFFFFFFF81040000))
        GuestClock(FakeKernel(syms), mem.read)  # type: ignore[arg-type]
        mem.poke(0xFFFFFFFF82A39BC0, struct.pack("<Q", 0xFFFFFFFF81070000))  # kvm_sched_clock_read
        with pytest.raises(ClockError, match="not native_sched_clock"):
            GuestClock(FakeKernel(syms), mem.read)  # type: ignore[arg-type]
    finally:
        del FakeBtf.members[("static_call_key", "func")]


def test_preempt_state_reads_the_interrupted_context() -> None:
    task = 0xFFFF888003A18000
    mem = Memory()
    mem.poke(GS + 0x1FB40, struct.pack("<I", 0x10001))  # __preempt_count: hardirq, depth 1
    mem.poke(GS + 0x1FB80, struct.pack("<Q", task))  # current_task
    mem.poke(GS + 0x19160, struct.pack("<i", 3))  # cpu_number
    mem.poke(task, struct.pack("<Q", 1 << 3))  # TIF_NEED_RESCHED
    mem.poke(task + 2032, struct.pack("<H", 0))
    kernel = FakeKernel({"__preempt_count": 0x1FB40, "cpu_number": 0x19160})
    state = PreemptState(kernel, mem.read)  # type: ignore[arg-type]
    ctx = state.trace_ctx(hit(0, rflags=2))
    assert ctx is not None and trace_print_lat_fmt(ctx.flags, ctx.preempt_count) == "dNh1."
    assert state.cpu(hit(0)) == 3
    assert state.cpu(hit(0, gs_base=0)) == 0  # the vCPU, 0-based
    assert state.trace_ctx(hit(0, gs_base=0)) is None


# --- header and lines -----------------------------------------------------------------------

GUEST_HEADER = """\
# tracer: nop
#
# entries-in-buffer/entries-written: 6/6   #P:1
#
#                                _-----=> irqs-off/BH-disabled
#                               / _----=> need-resched
#                              | / _---=> hardirq/softirq
#                              || / _--=> preempt-depth
#                              ||| / _-=> migrate-disable
#                              |||| /     delay
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
#              | |         |   |||||     |         |
"""

GUEST_LINES = [
    "             cat-93      [000] .N...     3.451831: kopen: (do_sys_openat2+0x0/0x170) "
    'path="/etc/hostname" dfd=0xffffff9c',
    "             cat-93      [000] .....     3.455386: kret: (__x64_sys_openat+0x6a/0xa0 "
    "<- do_sys_openat2) arg1=0x3",
]


def test_trace_header_is_the_guests_without_the_entries_line() -> None:
    lines = GUEST_HEADER.splitlines(keepends=True)
    assert trace_header() == "".join(lines[:2] + lines[4:])
    assert "_-----=> irqs-off\n" in trace_header(bh_off=False)


def event(**kw: object) -> TraceEvent:
    base: dict[str, object] = dict(
        group="kprobes", event="kopen", kind="p", addr=0xFFFFFFFF8131A2A0,
        location="do_sys_openat2+0x0/0x170", ret_to=None, cpu=0, pid=93, comm="cat",
        timestamp_ns=3_451_831_200, fields={"path": "/etc/hostname", "dfd": 0xFFFFFF9C},
        text='path="/etc/hostname" dfd=0xffffff9c', trace_flags=NEED | PREEMPT,
    )  # fmt: skip
    base.update(kw)
    return TraceEvent(**base)  # type: ignore[arg-type]


def test_lines_are_the_guests() -> None:
    assert event().format() == GUEST_LINES[0]
    ret = event(event="kret", kind="r", ret_to="__x64_sys_openat+0x6a/0xa0",
                timestamp_ns=3_455_385_900, fields={"arg1": 3}, text="arg1=0x3",
                trace_flags=0)  # fmt: skip
    assert ret.format() == GUEST_LINES[1]
    assert event(pid=0, comm="swapper/0").format().startswith("          <idle>-0       [000]")
    assert event(pid=None, comm=None).format().startswith("           <...>--1      [000]")


def test_json_has_the_same_timestamp_and_flags() -> None:
    got = json.loads(event(cpu=1, preempt_count=1).to_json())
    assert got["timestamp"] == 3.451831 and got["timestamp_ns"] == 3_451_831_200
    assert (got["flags"], got["clock"], got["cpu"]) == (".N.1.", "local", 1)
    assert (got["common_flags"], got["common_preempt_count"]) == (NEED | PREEMPT, 1)
    tsc = event(clock="x86-tsc", timestamp_ns=24463863480)
    assert "[000] .N...  24463863480: kopen:" in tsc.format()  # " %12llu"
    assert tsc.as_json()["timestamp"] == 24463863480


def test_hit_context_numbers_vcpus_from_zero() -> None:
    ctx = HitContext(2, PtRegs([0] * FRAME_WORDS), lambda a, n: bytes(n), 0)
    assert (ctx.thread, ctx.vcpu) == (2, 1)


# --- reads by __pa -------------------------------------------------------------------------

PAGE_OFFSET, VMALLOC = 0xFFFF888000000000, 0xFFFFC90000000000
TEXT, END, BANNER = 0xFFFFFFFF81000000, 0xFFFFFFFF83400000, 0xFFFFFFFF82000100


def test_kernel_memory_reads_the_direct_map_and_the_image_by_arithmetic() -> None:
    from qprobes.linux.memory import KernelMemory

    walked: list[int] = []

    def walk(vaddr: int, n: int) -> bytes:
        walked.append(vaddr)
        return b"v" * n

    def phys(paddr: int, n: int) -> bytes:
        return paddr.to_bytes(8, "little")[:n]

    mem = KernelMemory(walk, phys, (PAGE_OFFSET, VMALLOC), (TEXT, END, 0x200000))
    assert mem.paddr(PAGE_OFFSET + 0x1F61FB40, 4) == 0x1F61FB40  # __pa
    assert mem.paddr(BANNER, 8) == BANNER - 0xFFFFFFFF80000000 + 0x200000  # __pa_symbol
    assert mem.paddr(VMALLOC + 0x1000, 8) is None  # a vmalloc'ed stack: walk
    assert mem.paddr(END - 4, 8) is None  # straddles the end of the image
    assert mem(PAGE_OFFSET + 0x1234, 4) == (0x1234).to_bytes(8, "little")[:4]
    assert mem(VMALLOC + 0x1000, 2) == b"vv" and walked == [VMALLOC + 0x1000]


@pytest.mark.parametrize("phys_base", [0, 0x200000])
def test_kernel_memory_checks_its_arithmetic_once(phys_base: int) -> None:
    """from_kernel compares a read by __pa with the page-walking read, and
    falls back to the walk when the guest does not agree."""
    from qprobes.linux.memory import KernelMemory

    ram = Memory()
    banner_phys = BANNER - 0xFFFFFFFF80000000  # where the guest really has it (phys_base 0)
    ram.poke(banner_phys, b"Linux version 6.1.0-56-cloud-amd64 ")
    ram.poke(0x2398480, struct.pack("<Q", PAGE_OFFSET))  # page_offset_base
    ram.poke(0x2A1A010, struct.pack("<Q", phys_base))
    ram.poke(0x2398478, struct.pack("<Q", VMALLOC))

    def walk(vaddr: int, n: int) -> bytes:  # the page tables: image at phys_base 0
        return ram.read(vaddr - (0xFFFFFFFF80000000 if vaddr >= TEXT else PAGE_OFFSET), n)

    syms = {"page_offset_base": 0xFFFFFFFF82398480, "phys_base": 0xFFFFFFFF82A1A010,
            "vmalloc_base": 0xFFFFFFFF82398478, "_text": TEXT, "_end": END,
            "linux_banner": BANNER}  # fmt: skip
    mem = KernelMemory.from_kernel(FakeKernel(syms), walk, ram.read)  # type: ignore[arg-type]
    assert (mem.read_phys is not None) is (phys_base == 0)
    assert KernelMemory.from_kernel(FakeKernel(syms), walk, None).read_phys is None  # type: ignore[arg-type]
