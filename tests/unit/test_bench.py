"""``qprobes bench``'s arithmetic and report, on hand-made runs (no guest)."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest

from qprobes.errors import ProbeError
from qprobes.frontends.bench import (
    RATIOS,
    ROWS,
    Arming,
    BenchError,
    BenchOptions,
    BenchResult,
    Boot,
    Case,
    Row,
    Timed,
    _is_limit,
    report,
)
from qprobes.frontends.cli import build_parser
from qprobes.frontends.gdbmi import GdbTrace, packet_kind, remote_log_counts
from qprobes.probes.kprobe import Kprobe


def make_result() -> BenchResult:
    result = BenchResult(BenchOptions(repeat=2, hits=10))
    base = Row("noprobe", 10, walls=[0.0015, 0.0013], fixed=[0.0005, 0.0005])  # 100, 80 us
    boosted = Row(
        "boosted",
        10,
        baseline=base,
        walls=[0.0105, 0.0095],
        fixed=[0.0005, 0.0005],
        stops={"stops": 20},
    )
    step = Row(
        "single_step",
        10,
        baseline=base,
        walls=[0.0205, 0.0205],
        fixed=[0.0005, 0.0005],
        stops={"stops": 40},
    )
    gdb_base = Row("gdb_noprobe", 10, path="console", walls=[0.0015], fixed=[0.0005])
    gdb = Row("gdb", 10, path="console", baseline=gdb_base, walls=[0.5005], fixed=[0.0005])
    guest = Row(
        "guest_kprobe_events", 10, baseline=base, walls=[0.0025, 0.0025], fixed=[0.0005, 0.0005]
    )
    fast = Row(
        "fast",
        10,
        baseline=base,
        walls=[0.0020, 0.0018],  # 50 us a hit in both rounds
        fixed=[0.0005, 0.0005],
        stops={"stops": 0},
        hits_seen=20,
        events_seen=20,
        fast={"events": 24, "hits": 24, "dropped": 0, "spilled": 0, "orphans": 0},
    )
    detour = dataclasses.replace(fast, key="detour", walls=[0.0017, 0.0015])  # 20 us a hit
    for row in (base, boosted, step, gdb_base, gdb, guest, fast, detour):
        result.rows[row.key] = row
    result.rows["kretprobe_fast"] = Row("kretprobe_fast", 0, available=False,
                                        reason="not built yet")  # fmt: skip
    result.arming[1000] = Arming(1000, armed=1000, refused=3, seconds=2.5, seconds_tried=2.5,
                                 unregister_s=0.4)  # fmt: skip
    result.arming[10_000] = Arming(
        10_000, armed=4096, seconds_tried=9.0, limit="at most 4096 probe addresses at once"
    )
    result.unhit.probes = 1000
    result.unhit.baseline_s = [1.0, 1.0, 1.2]
    result.unhit.armed_s = [1.1, 1.1]
    result.boot = Boot(plain_s=4.0, first_probe_s=6.0)
    return result


def test_per_hit_is_per_open_minus_the_baseline_of_the_same_round() -> None:
    result = make_result()
    assert result.value("noprobe") == pytest.approx(90.0)  # median of 100 and 80 us
    # per open 1000 and 900 us, less the baseline's 100 and 80 of the same rounds
    assert result.value("boosted") == pytest.approx(860.0)
    rows = result.rows
    assert [round(x * 1e6) for x in rows["boosted"].overhead_runs] == [900, 820]
    assert result.value("single_step") == pytest.approx(1910.0)
    assert result.value("gdb") == pytest.approx(50_000.0 - 100.0)
    assert rows["boosted"].stops_per_hit == 1.0 and rows["single_step"].stops_per_hit == 2.0


def test_ratios_are_quotients_and_null_where_a_row_is_missing() -> None:
    doc = make_result().summary()
    assert doc["ratio_gdb_to_boosted"] == doc["gdb_us_per_hit"] / doc["boosted_us_per_hit"]
    assert doc["ratio_gdb_to_single_step"] == doc["gdb_us_per_hit"] / doc["single_step_us_per_hit"]
    assert doc["fast_us_per_hit"] == pytest.approx(50.0)
    assert doc["guest_kprobe_events_us_per_hit"] == pytest.approx(110.0)  # 200 less 90
    assert doc["ratio_fast_to_guest_kprobe_events"] == (
        doc["fast_us_per_hit"] / doc["guest_kprobe_events_us_per_hit"]
    )
    assert doc["stops_per_hit"]["fast"] == 0.0
    assert doc["detour_us_per_hit"] == pytest.approx(20.0)
    assert doc["ratio_detour_to_guest_kprobe_events"] == (
        doc["detour_us_per_hit"] / doc["guest_kprobe_events_us_per_hit"]
    )
    for key in (
        "kretprobe_fast_us_per_hit",
        "tracer_us_per_hit",
        "ratio_tracer_to_fast",  # no slow Tracer row in this result
    ):
        assert doc[key] is None, key
    assert {k for k, _, _ in RATIOS} <= doc.keys()
    assert {v[0] for v in ROWS.values()} <= doc.keys()


def test_a_negative_denominator_gives_no_ratio() -> None:
    result = make_result()
    result.rows["boosted"].walls = [0.0001, 0.0001]  # cheaper than no probe: noise
    assert result.value("boosted") is not None and result.value("boosted") < 0  # type: ignore[operator]
    assert result.summary()["ratio_gdb_to_boosted"] is None


def test_arming_unhit_and_boot_numbers() -> None:
    doc = make_result().summary()
    assert doc["arm_1000_s"] == 2.5 and doc["arm_1000_refused"] == 3
    # Not all 10,000 armed: no time, but what was armed and what stopped it.
    assert doc["arm_10000_s"] is None and doc["arm_10000_armed"] == 4096
    assert doc["arm_10000_limit"].startswith("at most")
    assert doc["unregister_1000_s"] == 0.4 and doc["unregister_10000_s"] is None
    assert doc["unhit_1000_slowdown"] == pytest.approx(0.1)  # medians 1.1 / 1.0
    assert doc["boot_to_first_probe_ratio"] == pytest.approx(1.5)


def test_json_document_round_trips() -> None:
    doc = make_result().as_json()
    again = json.loads(json.dumps(doc))
    assert again["ratio_gdb_to_boosted"] == doc["ratio_gdb_to_boosted"]
    rows = {r["key"]: r for r in again["rows"]}
    assert rows["detour"]["label"] == "qprobes Tracer, string fetch (fast path, detour)"
    assert rows["detour"]["available"] is True
    assert rows["kretprobe_fast"] == {
        "key": "kretprobe_fast",
        "json_key": "kretprobe_fast_us_per_hit",
        "label": "qprobes Tracer r: $retval (fast path)",
        "available": False,
        "reason": "not built yet",
    }
    assert rows["fast"]["events_seen"] == rows["fast"]["hits_seen"] == 20
    assert rows["fast"]["fast"]["dropped"] == 0
    assert rows["boosted"]["us_min"] == pytest.approx(820.0)
    assert rows["boosted"]["us_max"] == pytest.approx(900.0)


def test_the_table_says_not_available_and_names_the_limit() -> None:
    out = io.StringIO()
    report(make_result(), out)
    text = out.getvalue()
    assert text.count("not available") >= 2 + 2  # two rows, two ratios
    assert "24 events for 24 hits" in text and "dropped 0" in text
    assert "at most 4096 probe addresses at once" in text
    assert "4096 armed" in text
    assert "slowdown +10.0%" in text


@pytest.mark.parametrize(
    ("message", "limit"),
    [
        ("at most 4096 probe addresses at once", True),
        ("out of instruction slots", True),
        ("the physical reservation 0x1-0x2 is used up", True),
        ("nmi_handle+0x5: Linux's kprobe blacklist lists nmi_handle", False),
        ("0xffffffff8102d875: a jump-label (static key) site at 0xffffffff8102d875", False),
    ],
)
def test_engine_limits_end_an_arming_refusals_do_not(message: str, limit: bool) -> None:
    assert _is_limit(ProbeError(message)) is limit


def test_case_subtracts_the_run_for_zero_and_the_cost_of_counting() -> None:
    hits = [0]

    def run(n: int) -> Timed:
        hits[0] += n + 1  # the command itself hits once, as the shell opening a script
        return Timed(0.001 * n)

    def count() -> int:
        hits[0] += 2  # a count read on the console opens files too
        return hits[0]

    row = Row("guest_kprobe_events", 7)
    case = Case(row, count=count, count_cost=2)
    for _ in range(3):
        case.pair(run, dict)
    case.check(3)
    assert row.hits_seen == 21 and not row.problems
    assert row.walls == [0.007] * 3 and row.fixed == [0.0] * 3


def test_case_counts_the_events_of_the_timed_runs_net_of_the_run_for_zero() -> None:
    events = [0]

    def run(n: int) -> Timed:
        events[0] += n + 3  # the shell starting the workload opens other files: not counted
        return Timed(0.001 * n)

    row = Row("fast", 5)
    case = Case(row, events=lambda: events[0])
    for _ in range(2):
        case.pair(run, dict)
    case.check(2)
    assert row.events_seen == 10 and not row.problems
    short = Row("fast", 5)
    lossy = Case(short, events=lambda: events[0] // 2)  # half the events lost
    lossy.pair(run, dict)
    lossy.check(1)
    assert short.events_seen is not None and short.events_seen < 5
    assert short.problems and "expected 5" in short.problems[0]


def test_rows_that_never_stop_the_guest_are_timed_by_its_vcpu_threads() -> None:
    """A busy host stretches wall time (the vCPU waits for a CPU); a row with
    no stop is taken from the vCPU threads' CPU time, a row with stops from
    the wall clock, each against the baseline's runs by the same clock."""
    base, fast, boosted = Row("noprobe", 10), Row("fast", 10), Row("boosted", 10)
    fast.baseline = boosted.baseline = base
    for wall, vcpu in ((0.0010, 0.0005), (0.0030, 0.0006)):  # a busy spell in round 2
        base.add(0, Timed(0.0, 0.0, 0.0))
        base.add(10, Timed(wall, vcpu, 0.0001))
        fast.add(0, Timed(0.0, 0.0, 0.0))
        fast.add(10, Timed(wall * 3, vcpu + 0.0001, 0.0004))  # 10 us a hit of vCPU time
        boosted.add(0, Timed(0.0, 0.0, 0.0))
        boosted.add(10, Timed(wall + 0.005, vcpu, 0.002))  # 500 us a hit, all of it stopped
    fast.stops, boosted.stops = {"stops": 0}, {"stops": 20}
    assert (base.metric, fast.metric, boosted.metric) == ("wall", "vcpu", "wall")
    assert fast.us() == pytest.approx(10.0)
    assert boosted.us() == pytest.approx(500.0)
    doc = fast.as_dict()
    assert doc["metric"] == "vcpu" and doc["us_wall"] == pytest.approx(400.0)
    assert doc["qprobes_cpu_us"] == pytest.approx(30.0)
    # One run without its vCPU time: wall for the row.
    fast.add(10, Timed(0.003, None))
    fast.add(0, Timed(0.0, 0.0))
    assert fast.metric == "wall" and fast.as_dict()["us_vcpu"] is None
    # A row with a stop is timed by the wall clock whatever it has.
    boosted.stops = {"stops": 1}
    assert boosted.metric == "wall"
    text = io.StringIO()
    result = BenchResult(BenchOptions(repeat=2, hits=10))
    result.rows = {"noprobe": base, "boosted": boosted}
    report(result, text)
    assert "timed by" in text.getvalue()


def test_the_unhit_slowdown_is_taken_from_vcpu_time_when_every_run_has_it() -> None:
    result = BenchResult(BenchOptions())
    u = result.unhit
    u.probes = 1000
    for base, armed in ((Timed(1.0, 0.50), Timed(2.0, 0.51)), (Timed(1.0, 0.50), Timed(1.0, 0.51))):
        u.add(False, base)
        u.add(True, armed)
    assert u.metric == "vcpu" and u.slowdown == pytest.approx(0.02)
    assert u.slowdown_of("wall") == pytest.approx(0.5)
    summary = result.summary()
    assert summary["unhit_1000_slowdown"] == pytest.approx(0.02)
    assert summary["unhit_1000_slowdown_wall"] == pytest.approx(0.5)
    u.add(True, Timed(1.0, None))
    u.add(False, Timed(1.0, 0.5))
    assert u.metric == "wall"


def test_gdb_remote_log_counts() -> None:
    records = [
        {"type": "log", "payload": "[remote] Sending packet: $vCont;c#a8\n"},
        {"type": "log", "payload": "[remote] Packet received: T05thread:01;\n"},
        {"type": "log", "payload": "[remote] Sending packet: $z0,ffffffff81,1#00\n"},
        {"type": "log", "payload": "[remote] Sending packet: $m1000,8#00\n"},
        {"type": "console", "payload": "Sending packet: $g#67"},  # not a log record
    ]
    trace = GdbTrace(hits=1)
    remote_log_counts(records, trace)
    assert (trace.stop_replies, trace.packets_sent) == (1, 3)
    assert trace.sent_kinds == {"vCont": 1, "z": 1, "m": 1}
    assert packet_kind("qSupported") == "qSupported"


def test_cli_options() -> None:
    args = build_parser().parse_args(["bench", "--quick", "--json", "-r", "4"])
    assert args.quick and args.json and args.repeat == 4 and args.hits is None
    quick = BenchOptions.quick_run(repeat=4)
    assert quick.repeat == 4 and quick.arm_many == 0 and quick.quick
    assert BenchOptions().arm_many == 10_000 and BenchOptions().unhit == 1000


def test_gdb_runs_come_in_a_block_and_are_compared_with_the_baselines_median() -> None:
    base = Row("gdb_noprobe", 10, path="console", walls=[0.0015, 0.0013], fixed=[0.0005])
    gdb = Row("gdb", 10, path="console", baseline=base, walls=[0.5005, 0.4005], fixed=[0.0005])
    assert [round(x * 1e6) for x in gdb.overhead_runs] == [49_910, 39_910]  # less 90 us


def test_the_unhit_slowdown_pairs_each_armed_run_with_the_run_before_it() -> None:
    result = make_result()
    result.unhit.baseline_s = [1.0, 2.0]  # the host got busier between the rounds
    result.unhit.armed_s = [1.1, 2.4]
    assert result.summary()["unhit_1000_slowdown"] == pytest.approx(0.15)  # 1.1x, 1.2x


class _BatchSession:
    """A session whose kprobe_many refuses some addresses and stops at a limit."""

    def __init__(self, limit_at: int) -> None:
        self.batches: list[list[int]] = []
        self.limit_at = limit_at

    def kprobe_many(self, addrs: list[int], handler: object) -> list[object]:
        self.batches.append(list(addrs))
        out: list[object] = []
        for a in addrs:
            if a >= self.limit_at:
                out.append(ProbeError(f"at most {self.limit_at} probe addresses at once"))
            elif a % 10 == 3:
                out.append(ProbeError(f"{a:#x}: a jump-label (static key) site at {a:#x}"))
            else:
                out.append(Kprobe(addr=a))
        return out

    def unregister_many(self, probes: list[Kprobe]) -> list[object]:
        self.batches.append([-1, len(probes)])
        return [None if p.addr is not None and p.addr % 7 else ProbeError("stuck") for p in probes]


def test_arming_goes_through_batches_and_reports_refusals() -> None:
    from qprobes.frontends.bench import LinuxBench

    def bench_for(session: _BatchSession) -> LinuxBench:
        opts = BenchOptions()
        return LinuxBench(session, opts, BenchResult(opts), lambda msg: None)  # type: ignore[arg-type]

    session = _BatchSession(limit_at=10**9)
    bench = bench_for(session)
    arm = Arming(50)
    probes = bench._arm(list(range(100)), 50, arm)
    # One batch for the 50 wanted, then one for the 5 refused in it, and so on.
    assert session.batches[0] == list(range(50)) and len(session.batches) == 3
    assert len(probes) == 50 and arm.armed == 50 and arm.seconds is not None
    assert arm.refused == 5 + 1 and arm.limit is None
    assert all("jump-label" in r for r in arm.refusals)
    limited = _BatchSession(limit_at=20)
    arm = Arming(50)
    probes = bench_for(limited)._arm(list(range(100)), 50, arm)
    assert arm.limit == "at most 20 probe addresses at once" and arm.seconds is None
    assert len(probes) == 18 and len(limited.batches) == 1
    # Unregistered in one batch too; one that stays registered is a problem.
    ok = [kp for kp in probes if kp.addr is not None and kp.addr % 7]
    assert bench_for(limited)._unregister(ok) >= 0 and limited.batches[-1] == [-1, len(ok)]
    with pytest.raises(BenchError, match=r"1 probes could not be unregistered \(stuck\)"):
        bench_for(limited)._unregister([Kprobe(addr=14)])


def test_switchable_rows_take_their_number_from_off_on_pairs() -> None:
    """A row that can be switched off: each pair is a run with the probe
    off, then one with it on, in the same set-up; the number is the median
    of (on - off) / hits, not the comparison with the baseline's round."""
    base, fast = Row("noprobe", 10), Row("fast", 10)
    fast.baseline = base
    base.add(0, Timed(0.0, 0.0))
    base.add(10, Timed(0.010, 0.002))  # 200 us an open of vCPU time: a busy round
    fast.add(0, Timed(0.0, 0.0))
    fast.add(10, Timed(0.004, 0.0006))  # cheaper than that baseline: noise
    fast.stops = {"stops": 0}
    assert fast.us() is not None and fast.us() < 0  # by the round alone
    states: list[bool] = []
    # Off then on, on then off, off then on: 10, 12 and 8 us a hit.
    timings = iter([Timed(0.001, 0.0005), Timed(0.0012, 0.00060),
                    Timed(0.0033, 0.00092), Timed(0.003, 0.0008),
                    Timed(0.001, 0.0004), Timed(0.0011, 0.00048)])  # fmt: skip

    def run(n: int) -> Timed:
        return next(timings) if n == 10 else Timed(0.0, 0.0)

    case = Case(fast, toggle=states.append)
    case.switched(run, lambda: {"stops": 0}, pairs=3, warm=2)
    assert states == [False, True, False, True]  # switched only when the state changes
    assert fast.metric == "vcpu" and fast.us() == pytest.approx(10.0)
    doc = fast.as_dict()
    assert doc["pairs"] == 3 and doc["pair_us"] == pytest.approx([10.0, 12.0, 8.0])
    assert doc["rounds_us"] is not None and doc["rounds_us"] < 0
    # A stop in a run with the probe on: the row goes by the wall clock.
    stops = iter([{"stops": 0}, {"stops": 1}])
    timings = iter([Timed(0.001, 0.0005), Timed(0.002, 0.0006)])
    case.switched(run, lambda: next(stops), pairs=1, warm=0)
    assert fast.pair_stops == 1 and fast.metric == "wall"
