"""``qprobes bench --quick --json`` on the default Linux guest, as a subprocess.

Checks the shape of what it reports and that its numbers agree with each
other (every ratio is the quotient of the per-hit numbers in the same
document), never how fast anything is.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
from typing import Any

import pytest

from tests.conftest import require_vm
from tests.integration.terminal import CLI

pytestmark = [pytest.mark.vm, pytest.mark.serial]

PER_HIT = [
    "gdb_us_per_hit",
    "single_step_us_per_hit",
    "boosted_us_per_hit",
    "fast_us_per_hit",
    "detour_us_per_hit",
    "guest_kprobe_events_us_per_hit",
    "kretprobe_us_per_hit",
    "tracer_us_per_hit",
    "kretprobe_fast_us_per_hit",
    "fast_kretprobe_us_per_hit",
]
RATIOS = {
    "ratio_gdb_to_boosted": ("gdb_us_per_hit", "boosted_us_per_hit"),
    "ratio_gdb_to_single_step": ("gdb_us_per_hit", "single_step_us_per_hit"),
    "ratio_fast_to_guest_kprobe_events": ("fast_us_per_hit", "guest_kprobe_events_us_per_hit"),
    "ratio_detour_to_guest_kprobe_events": ("detour_us_per_hit", "guest_kprobe_events_us_per_hit"),
    "ratio_tracer_to_guest_kprobe_events": ("tracer_us_per_hit", "guest_kprobe_events_us_per_hit"),
    "ratio_tracer_to_fast": ("tracer_us_per_hit", "fast_us_per_hit"),
    "ratio_kretprobe_to_fast_kretprobe": ("kretprobe_us_per_hit", "kretprobe_fast_us_per_hit"),
}
OTHER = ["unhit_1000_slowdown", "arm_10000_s", "boot_to_first_probe_ratio"]
#: Rows that do not exist yet: null, never a number.
NOT_BUILT: list[str] = []
#: Rows whose probe stops the guest at every hit: their cost per hit is far
#: above the noise of a short run. (The guest's own kprobe_events and the
#: fast path add tens of microseconds to an open, within that noise on a
#: busy host, so only their being numbers is checked.)
STOPPING = [
    "gdb_us_per_hit",
    "single_step_us_per_hit",
    "boosted_us_per_hit",
    "kretprobe_us_per_hit",
    "tracer_us_per_hit",
]


@pytest.fixture(scope="module")
def report(guest: Any) -> dict[str, Any]:
    if shutil.which("gdb") is None:
        require_vm("gdb is not installed (scripts/install.sh installs it)")
    result = subprocess.run(
        [*CLI, "bench", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    doc: dict[str, Any] = json.loads(result.stdout)
    doc["_stderr"] = result.stderr
    return doc


def test_every_key_is_there(report: dict[str, Any]) -> None:
    for key in [*PER_HIT, *RATIOS, *OTHER]:
        assert key in report, key
        value = report[key]
        assert value is None or (isinstance(value, float | int) and math.isfinite(value)), key


def test_rows_that_do_not_exist_are_null_not_numbers(report: dict[str, Any]) -> None:
    for key in NOT_BUILT:
        assert report[key] is None, key
    rows = {r["json_key"]: r for r in report["rows"]}
    for key in NOT_BUILT:
        assert rows[key]["available"] is False and rows[key]["reason"], rows[key]



def test_measured_numbers_are_positive(report: dict[str, Any]) -> None:
    for key in STOPPING:
        assert report[key] is not None and report[key] > 0, (key, report[key])
    assert isinstance(report["guest_kprobe_events_us_per_hit"], float)
    assert isinstance(report["fast_us_per_hit"], float)
    # The detour row is measured: a number, and its probe was detoured (the
    # row would name a problem "not detoured: ..." otherwise).
    assert isinstance(report["detour_us_per_hit"], float)
    # (Its ratio to the guest's row is a number, or null when noise put the
    # guest's row at or below zero: test_ratios_are_the_quotients_of_the_numbers.)
    rows = {r["key"]: r for r in report["rows"]}
    assert not any("not detoured" in p or "not on the fast path" in p
                   for p in rows["detour"].get("problems", [])), rows["detour"]
    assert report["noprobe_us_per_open"] > 0
    assert report["boot_to_first_probe_ratio"] > 0
    assert report["boot_plain_s"] > 0 and report["boot_to_first_probe_s"] > 0
    assert report["arm_1000_s"] is not None and report["arm_1000_s"] > 0
    assert report["arm_1000_armed"] == 1000
    # --quick skips the 10,000-probe arming; the slowdown is a fraction
    # that noise can make negative.
    assert report["arm_10000_s"] is None
    assert isinstance(report["unhit_1000_slowdown"], float)


def test_ratios_are_the_quotients_of_the_numbers(report: dict[str, Any]) -> None:
    for key, (num, den) in RATIOS.items():
        a, b = report[num], report[den]
        if a is None or b is None or b <= 0:
            assert report[key] is None, key
        else:
            assert report[key] == pytest.approx(a / b, rel=1e-12), key
    boot = report["boot"]
    assert report["boot_to_first_probe_ratio"] == pytest.approx(
        boot["first_probe_s"] / boot["plain_s"], rel=1e-12
    )


def test_stops_per_hit_come_from_the_engine(report: dict[str, Any]) -> None:
    stops = report["stops_per_hit"]
    assert stops["boosted"] == 1.0  # one #BP doorbell per hit
    assert stops["single_step"] == 2.0  # #BP, then #DB
    assert stops["noprobe"] == 0.0 and stops["guest_kprobe_events"] == 0.0
    rows = {r["key"]: r for r in report["rows"]}
    n = rows["boosted"]["opens_per_run"] * rows["boosted"]["runs"]
    assert rows["boosted"]["hits_seen"] == n
    assert rows["guest_kprobe_events"]["hits_seen"] == n  # the guest's own kprobe_profile
    assert rows["gdb"]["hits_seen"] >= rows["gdb"]["opens_per_run"] * rows["gdb"]["runs"]


def test_the_fast_row_runs_in_the_guest_and_loses_nothing(report: dict[str, Any]) -> None:
    """The Tracer with fast=True, the guest row's definition: no stop per
    hit, and one event per open, naming the file (lossless)."""
    rows = {r["key"]: r for r in report["rows"]}
    fast = rows["fast"]
    assert fast["available"] is True and fast["runs"] >= 1, fast
    assert "do_sys_openat2 path=+0(%si):string" in fast["notes"][0]
    assert fast["problems"] == [], fast["problems"]  # every round on the fast path
    assert report["stops_per_hit"]["fast"] < 0.1
    assert report["stops_per_hit"]["tracer"] >= 1.0  # the same definition, slow path
    opens = fast["opens_per_run"] * fast["runs"]
    assert fast["hits_seen"] == opens
    assert fast["events_seen"] == opens  # events for /etc/hostname, net of the N=0 runs
    counters = fast["fast"]
    assert counters["events"] == counters["hits"] >= opens
    for key in ("dropped", "spilled"):
        assert isinstance(counters[key], int) and counters[key] >= 0, key
    assert rows["tracer"]["events_seen"] == rows["tracer"]["opens_per_run"] * rows["tracer"]["runs"]


def test_progress_goes_to_stderr_one_line_per_step(report: dict[str, Any]) -> None:
    lines = [line for line in report["_stderr"].splitlines() if line.startswith("bench [")]
    assert len(lines) >= 8, report["_stderr"]
    assert any("gdb" in line for line in lines)
    assert any("kprobe_events" in line for line in lines)


def test_the_fast_return_row_runs_in_the_guest_and_misses_nothing(report: dict[str, Any]) -> None:
    """A Tracer r: definition with fast=True: no stop per call, one event
    per open of the workload, no entry without an instance."""
    rows = {r["key"]: r for r in report["rows"]}
    row = rows["kretprobe_fast"]
    assert row["available"] is True and row["runs"] >= 1, row
    assert "r:myret_fast do_sys_openat2 ret=$retval:s32" in row["notes"][0]
    assert row["problems"] == [], row["problems"]
    assert report["stops_per_hit"]["kretprobe_fast"] == 0.0
    assert isinstance(report["kretprobe_fast_us_per_hit"], float)
    assert report["fast_kretprobe_us_per_hit"] == report["kretprobe_fast_us_per_hit"]
    assert row["fast"]["dropped"] == 0 and row["fast"]["events"] == row["fast"]["hits"]


def test_rows_that_never_stop_the_guest_are_timed_by_its_vcpu_threads(
    report: dict[str, Any],
) -> None:
    """The workload is the static qp-openat (no shell between rounds); a row
    with no stop is taken from the CPU time of QEMU's vCPU threads, which a
    guest with one vCPU can never have more of than the wall time."""
    rows = {r["key"]: r for r in report["rows"]}
    assert "qp-openat N /etc/hostname" in report["workload"]
    for key in ("guest_kprobe_events", "kretprobe_fast"):
        assert rows[key]["metric"] == "vcpu", rows[key]
        assert rows[key]["us"] == rows[key]["us_vcpu"]
    for key in ("boosted", "single_step", "tracer", "noprobe", "gdb"):
        assert rows[key]["metric"] == "wall", rows[key]
    for row in rows.values():
        if not row["available"]:
            continue
        for wall, vcpu in zip(row["wall_s"] + row["fixed_s"],
                              row["vcpu_s"] + row["vcpu_fixed_s"], strict=True):  # fmt: skip
            assert vcpu is not None and 0 < vcpu <= wall * 1.02 + 0.005, row["key"]
    assert report["unhit"]["metric"] == "vcpu"
    assert isinstance(report["unhit_1000_slowdown_wall"], float)


def test_the_cheap_rows_are_measured_in_off_on_pairs(report: dict[str, Any]) -> None:
    """The guest's event and the fast entry rows are switched off and on in
    each round; their number is the median of those pairs."""
    rows = {r["key"]: r for r in report["rows"]}
    options = report["options"]
    for key in ("guest_kprobe_events", "fast", "detour"):
        row = rows[key]
        assert row["pairs"] == options["repeat"] * options["pairs"], row
        assert len(row["pair_us"]) == row["pairs"]
        assert row["us"] == pytest.approx(statistics.median(row["pair_us"]), rel=1e-9), key
        assert row["problems"] == [], row["problems"]  # the detour came back each time
    assert rows["kretprobe_fast"]["pairs"] == 0 and rows["boosted"]["pairs"] == 0
