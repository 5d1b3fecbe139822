"""``qprobes bench``: what a probe hit costs, against gdb and the guest's own kprobes.

One run boots the default Linux guest once and measures every row on it,
with one workload: ``qp-open N /etc/hostname`` (the guest's helper opens a
file N times from the shell itself, one ``openat`` per round, no fork),
probes on ``do_sys_openat2``. Typed on the serial console, timed to the
prompt. Rows, in the order they run:

1. no probe (qprobes attached, nothing armed): the cost of one open;
2. the guest's own kprobe_events, ``p:... do_sys_openat2
   path=+0(%si):string``, set up through tracefs in the same guest;
3. qprobes kprobes with a no-op handler: boosted (copy + ``jmp`` back, one
   stop per hit) and single-step (a #BP stop, then a #DB stop; after the
   5-byte ftrace nop the function starts with);
4. a qprobes kretprobe (the slow path: the entry probe and the trampoline),
   and a fast return probe: the Tracer with ``fast=True`` and ``r:...
   do_sys_openat2 ret=$retval:s32`` (entry code and trampoline in the
   guest, no stop per call; the row checks one event per open, from the
   workload's process, and that nothing was missed or dropped);
5. the qprobes :class:`~qprobes.tracing.tracer.Tracer` with the same
   definition as row 2 (the string fetch, comm and pid, a formatted event),
   on the slow path (a stop per hit) and on the fast path (``fast=True``:
   the recorder runs in the guest at the int3, the host drains its ring
   while the guest runs); the fast row checks that it got one event per
   hit, each naming the file opened, and reports the records the guest
   dropped and the hits a full ring handed to the host (in each round the
   fast row runs right after row 2, next to the no-probe row; the table
   lists it after the slow Tracer);
6. the fast path with a detour (``Tracer(fast=True)``, the engine's
   jump-optimized probe): the same fetch arguments on ``do_sys_openat2``'s
   first instruction of 5 bytes or more (``mov rax, gs:[0x28]`` at +0x18 on
   the default guest, where ``%si`` still holds the path), replaced by a
   ``jmp`` to a detour buffer, so a hit raises no exception; the int3 fast
   row above runs with ``detour=False``;
7. gdb: qprobes detaches and lets go of the gdbstub, a real gdb connects
   to the same QEMU (pygdbmi), first with no breakpoint, then with
   ``break *do_sys_openat2`` + ``commands`` / ``silent`` / ``continue``.

Method. qprobes' rows (1-6) run in rounds: each round sets up, measures
and takes down every row in turn, so that a busy spell of the host falls
on all of them alike. A row's measurement is a warm-up, then the command
for N=0 (the fixed cost of one command: the console round trip and the
shell starting ``qp-open``), then the command for N:
``per open = (wall(N) - median wall(0)) / N`` for each round. The overhead
per hit is that per open minus the no-probe row's per open in the same
round (for gdb: the gdb-attached baseline's); min, median and max are over
the rounds. Stops per hit are ``engine.stats`` (net of the N=0 runs), for
gdb the stop replies in gdb's remote log over an untimed run.

Besides the hit cost: the time to arm 1,000 and 10,000 probes on distinct
function entries taken from kallsyms (probes the engine refuses are
counted and skipped; the engine's own limits are reported as they come),
the slowdown of a mixed shell workload with 1,000 armed probes that it
never hits, and the time from launching QEMU to the first probe hit
against a plain boot of the same guest to its prompt (a second, short
boot before the main one).

Nothing here asserts a time; numbers depend on the machine and what else
runs on it. Compare ratios taken in one run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from qprobes.errors import MachineError, QprobesError
from qprobes.frontends.session import Session
from qprobes.machine.guestprog import OPENAT_LOOP_NAME, openat_loop, upload_command
from qprobes.probes.kprobe import Kprobe

PROBED = "do_sys_openat2"
OPENED = "/etc/hostname"
FTRACE_NOP = bytes.fromhex("0f1f440000")  # nop dword ptr [rax + rax*1 + 0]
FETCHARGS = "path=+0(%si):string"
TRACE_DEF = f"p:myopen {PROBED} {FETCHARGS}"
TRACEFS = "/sys/kernel/tracing"
#: The guest's own event (kprobe_profile names it by its event name alone).
GUEST_GROUP, GUEST_EVENT = "qpbench", "qpbench_open"
GUEST_DEF = f"p:{GUEST_GROUP}/{GUEST_EVENT} {PROBED} {FETCHARGS}"
#: A mixed workload: fork and exec, file system, procfs, pipes.
MIXED = (
    "for i in $(seq {n}); do ls -l /bin > /dev/null; cat /proc/self/status {file} > /dev/null; "
    "echo $i > /tmp/qp-mix; sort /tmp/qp-mix | wc -c > /dev/null; done; echo mixed-done"
)
#: The fast-path Tracer's event: the same fetch arguments as the others.
FAST_DEF = f"p:myopen_fast {PROBED} {FETCHARGS}"
#: The fast return probe row's event.
FAST_RET_DEF = f"r:myret_fast {PROBED} ret=$retval:s32"
#: The workload: a static program the bench writes into the guest at the
#: start (:mod:`qprobes.machine.guestprog`), N rounds of openat, read and
#: close of :data:`OPENED` with no shell in between: a round costs tens of
#: microseconds under TCG, where a shell loop's round costs hundreds.
WORKLOAD = f"/tmp/{OPENAT_LOOP_NAME}"
#: The process the workload runs in (its comm in events).
WORKLOAD_COMM = OPENAT_LOOP_NAME


def workload_line(n: int) -> str:
    """The console line that runs the workload for ``n`` opens."""
    return f"{WORKLOAD} {n} {OPENED} && echo '{workload_done(n)}'"


def workload_done(n: int) -> str:
    """What :func:`workload_line` prints when all ``n`` opens succeeded."""
    return f"{OPENAT_LOOP_NAME}: {n} opens of {OPENED}"
NOT_BUILT: dict[str, str] = {}  # rows not built yet: key -> why

#: Rows by key: the JSON key of their overhead, their label.
ROWS: dict[str, tuple[str, str]] = {
    "noprobe": ("noprobe_us_per_open", "no probe (per open)"),
    "guest_kprobe_events": (
        "guest_kprobe_events_us_per_hit",
        "guest's own kprobe_events, string fetch",
    ),
    "boosted": ("boosted_us_per_hit", "qprobes kprobe, boosted"),
    "single_step": ("single_step_us_per_hit", "qprobes kprobe, single-step"),
    "kretprobe": ("kretprobe_us_per_hit", "qprobes kretprobe (slow path)"),
    "tracer": ("tracer_us_per_hit", "qprobes Tracer, string fetch (slow path)"),
    "fast": ("fast_us_per_hit", "qprobes Tracer, string fetch (fast path, int3)"),
    "detour": ("detour_us_per_hit", "qprobes Tracer, string fetch (fast path, detour)"),
    "kretprobe_fast": ("kretprobe_fast_us_per_hit", "qprobes Tracer r: $retval (fast path)"),
    "gdb_noprobe": ("gdb_noprobe_us_per_open", "gdb attached, no breakpoint (per open)"),
    "gdb": ("gdb_us_per_hit", "gdb break + commands silent/continue"),
}

#: (JSON key, numerator row, denominator row).
RATIOS = [
    ("ratio_gdb_to_boosted", "gdb", "boosted"),
    ("ratio_gdb_to_single_step", "gdb", "single_step"),
    ("ratio_gdb_to_tracer", "gdb", "tracer"),
    ("ratio_tracer_to_guest_kprobe_events", "tracer", "guest_kprobe_events"),
    ("ratio_fast_to_guest_kprobe_events", "fast", "guest_kprobe_events"),
    ("ratio_tracer_to_fast", "tracer", "fast"),
    ("ratio_detour_to_guest_kprobe_events", "detour", "guest_kprobe_events"),
    ("ratio_kretprobe_to_fast_kretprobe", "kretprobe", "kretprobe_fast"),
]


class BenchError(QprobesError):
    """The benchmark could not measure something (a guest command failed)."""


@dataclass
class BenchOptions:
    """What ``qprobes bench`` runs; :meth:`quick_run` is a short run for tests."""

    repeat: int = 5  # timed runs per row
    hits: int = 1000  # opens per run (probe hits), qprobes and kprobe_events rows
    pairs: int = 4  # off/on pairs per round of the rows that can be switched off
    gdb_hits: int = 100  # opens per run with gdb's breakpoint (about 25-55 ms each)
    unhit: int = 1000  # probes armed for the mixed workload (0: skip)
    arm_many: int = 10_000  # probes to arm at once (0: skip)
    mixed_rounds: int = 20  # rounds of the mixed workload per run
    trace_hits: int = 3  # hits of the untimed gdb run with the remote log (0: skip)
    gdb: str = field(default_factory=lambda: shutil.which("gdb") or "/usr/bin/gdb")
    timeout: float = 300.0  # seconds one timed command may take
    quick: bool = False

    @classmethod
    def quick_run(cls, **changes: Any) -> BenchOptions:
        """A short run: every row, fewer runs and hits, no 10,000-probe arming."""
        opts = cls(
            repeat=3, hits=300, gdb_hits=10, arm_many=0, mixed_rounds=4, trace_hits=2, quick=True,
            pairs=2,
        )
        return dataclasses.replace(opts, **changes)


@dataclass(frozen=True)
class Timed:
    """One timed guest command: wall seconds, the seconds of host CPU the
    guest's vCPU threads ran meanwhile (None: not known), and qprobes' own
    CPU seconds (this process: serving stops, draining the rings)."""

    wall: float
    vcpu: float | None = None
    host: float = 0.0


@dataclass
class Row:
    """The runs of one row."""

    key: str
    hits: int  # opens per run
    path: str = "session"  # "session" (qprobes' Session.command) or "console" (gdb attached)
    available: bool = True
    reason: str | None = None  # why a row is not available
    walls: list[float] = field(default_factory=list)  # seconds, command(hits)
    fixed: list[float] = field(default_factory=list)  # seconds, the same command for 0
    vcpus: list[float | None] = field(default_factory=list)  # vCPU seconds, command(hits)
    vcpu_fixed: list[float | None] = field(default_factory=list)  # the same for 0
    hosts: list[float] = field(default_factory=list)  # qprobes' CPU seconds, command(hits)
    host_fixed: list[float] = field(default_factory=list)  # the same for 0
    # Pairs of runs for ``hits`` opens with the probe switched off, then on,
    # one right after the other (rows that can be switched off).
    offs: list[Timed] = field(default_factory=list)
    ons: list[Timed] = field(default_factory=list)
    pair_stops: int = 0  # stops in the runs with the probe on
    stops: dict[str, int] = field(default_factory=dict)  # the N runs net of the N=0 runs
    hits_seen: int | None = None  # counted by the probe, N runs net of the N=0 runs
    events_seen: int | None = None  # events naming the file opened, N runs net of N=0
    fast: dict[str, int] | None = None  # the fast path's counters (records dropped ...)
    baseline: Row | None = None  # the no-probe row of the same path
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    label_extra: str = ""

    @property
    def label(self) -> str:
        return ROWS[self.key][1] + self.label_extra

    @property
    def measured(self) -> bool:
        return self.available and bool(self.walls)

    def add(self, n: int, timed: Timed) -> None:
        """A run of the command for ``n`` opens (0: the fixed cost)."""
        (self.walls if n else self.fixed).append(timed.wall)
        (self.vcpus if n else self.vcpu_fixed).append(timed.vcpu)
        (self.hosts if n else self.host_fixed).append(timed.host)

    @property
    def has_vcpu(self) -> bool:
        runs = self.vcpus + self.vcpu_fixed + [t.vcpu for t in self.offs + self.ons]
        return bool(self.vcpus) and all(v is not None for v in runs)

    def add_pair(self, off: Timed, on: Timed, stops: int) -> None:
        self.offs.append(off)
        self.ons.append(on)
        self.pair_stops += stops

    def pair_overheads(self, metric: str) -> list[float]:
        """Seconds per hit in each off/on pair: (on - off) / hits."""
        def value(t: Timed) -> float | None:
            return t.vcpu if metric == "vcpu" else t.host if metric == "host" else t.wall

        out = []
        for off, on in zip(self.offs, self.ons, strict=True):
            a, b = value(on), value(off)
            if a is not None and b is not None:
                out.append((a - b) / self.hits)
        return out

    @property
    def metric(self) -> str:
        """What the row's number is taken from: ``vcpu`` for a row that
        never stopped the guest (the guest's own execution is then the whole
        cost, and its vCPU threads' CPU time measures it without the time
        they wait for a host CPU, which on a busy host is most of the spread
        of wall time), ``wall`` for the rest (a stop's cost is time the
        guest does not run) and for the baselines."""
        if self.baseline is None or self.stops.get("stops") != 0 or self.pair_stops:
            return "wall"
        if self.has_vcpu and self.baseline.has_vcpu:
            return "vcpu"
        return "wall"

    def _series(self, metric: str) -> tuple[list[float], list[float]]:
        if metric == "vcpu":
            return ([v for v in self.vcpus if v is not None],
                    [v for v in self.vcpu_fixed if v is not None])  # fmt: skip
        if metric == "host":
            return self.hosts, self.host_fixed
        return self.walls, self.fixed

    def per_open_of(self, metric: str) -> list[float]:
        """Seconds per open in each run, the fixed cost (median) removed."""
        runs, fixed_runs = self._series(metric)
        fixed = statistics.median(fixed_runs) if fixed_runs else 0.0
        return [(w - fixed) / self.hits for w in runs]

    @property
    def per_open_runs(self) -> list[float]:
        return self.per_open_of("wall")

    @property
    def per_open(self) -> float:
        return statistics.median(self.per_open_runs)

    def overhead_of(self, metric: str) -> list[float]:
        """Seconds a probe hit adds to an open by ``metric``: per off/on pair
        when the row has them (the closest comparison: the same set-up, the
        same moment), else per run against the baseline (no baseline: per
        open).

        qprobes' rows run in rounds: run i is compared with the baseline's
        run i, of the same round (close in time, so that a busy spell of the
        host falls on both). gdb's runs come in a block after its
        baseline's: they are compared with the baseline's median.
        """
        if self.ons:
            return self.pair_overheads(metric)
        return self.round_overheads(metric)

    def round_overheads(self, metric: str) -> list[float]:
        """Per run, against the baseline's run of the same round."""
        mine = self.per_open_of(metric)
        if self.baseline is None:
            return mine
        base = self.baseline.per_open_of(metric)
        if self.path == "session" and len(base) == len(mine):
            return [p - b for p, b in zip(mine, base, strict=True)]
        return [p - statistics.median(base) for p in mine] if base else mine

    @property
    def overhead_runs(self) -> list[float]:
        return self.overhead_of(self.metric)

    @property
    def stops_per_hit(self) -> float | None:
        if "stops" not in self.stops or not self.walls:
            return None
        return self.stops["stops"] / (self.hits * len(self.walls))

    def us(self) -> float | None:
        """The row's number in µs: median overhead per hit (per open for a baseline)."""
        if not self.measured:
            return None
        return statistics.median(self.overhead_runs) * 1e6

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "key": self.key,
            "json_key": ROWS[self.key][0],
            "label": self.label,
            "available": self.available,
            "reason": self.reason,
        }
        if not self.measured:
            return doc
        over = [x * 1e6 for x in self.overhead_runs]

        def median_us(metric: str) -> float | None:
            runs = self.overhead_of(metric)
            return statistics.median(runs) * 1e6 if runs else None

        doc.update(
            {
                "path": self.path,
                "opens_per_run": self.hits,
                "runs": len(self.walls),
                "wall_s": self.walls,
                "fixed_s": self.fixed,
                "vcpu_s": self.vcpus,
                "vcpu_fixed_s": self.vcpu_fixed,
                "qprobes_cpu_s": self.hosts,
                "qprobes_cpu_fixed_s": self.host_fixed,
                "per_open_us": self.per_open * 1e6,
                "metric": self.metric,
                "us": self.us(),
                "us_min": min(over),
                "us_max": max(over),
                "us_wall": median_us("wall"),
                "us_vcpu": median_us("vcpu") if self.has_vcpu and (
                    self.baseline is None or self.baseline.has_vcpu) else None,
                "qprobes_cpu_us": median_us("host"),
                "pairs": len(self.ons),
                "pair_us": [x * 1e6 for x in self.pair_overheads(self.metric)],
                "pair_stops": self.pair_stops,
                "rounds_us": (statistics.median(r) * 1e6
                              if (r := self.round_overheads(self.metric)) else None),
                "baseline": self.baseline.key if self.baseline is not None else None,
                "stops": self.stops,
                "stops_per_hit": self.stops_per_hit,
                "hits_seen": self.hits_seen,
                "events_seen": self.events_seen,
                "fast": self.fast,
                "notes": self.notes,
                "problems": self.problems,
            }
        )
        return doc


@dataclass
class Arming:
    """One attempt to arm ``wanted`` probes at once."""

    wanted: int
    armed: int = 0
    refused: int = 0
    seconds: float | None = None  # to arm ``wanted`` (None: not all armed)
    seconds_tried: float = 0.0  # until the attempt ended, however it ended
    unregister_s: float | None = None
    limit: str | None = None  # the engine's error that ended the attempt
    refusals: dict[str, int] = field(default_factory=dict)  # a few examples

    def refuse(self, exc: QprobesError) -> None:
        self.refused += 1
        if len(self.refusals) < 6:
            self.refusals[str(exc)[:200]] = 1


@dataclass
class Unhit:
    """The mixed workload with and without ``probes`` armed, unhit."""

    probes: int = 0
    rounds: int = 0
    baseline_s: list[float] = field(default_factory=list)
    armed_s: list[float] = field(default_factory=list)
    baseline_vcpu_s: list[float | None] = field(default_factory=list)
    armed_vcpu_s: list[float | None] = field(default_factory=list)
    dropped: int = 0  # probes the calibration found hit, replaced
    hits: int = 0  # hits on the probes during the timed runs (should be 0)
    lost_check_s: float | None = None  # one engine.check_lost() over them, guest stopped
    problems: list[str] = field(default_factory=list)

    def add(self, armed: bool, timed: Timed) -> None:
        (self.armed_s if armed else self.baseline_s).append(timed.wall)
        (self.armed_vcpu_s if armed else self.baseline_vcpu_s).append(timed.vcpu)

    @property
    def metric(self) -> str:
        """``vcpu`` when every run has its vCPU time (unhit probes never stop
        the guest, so its own execution is what they could slow), else ``wall``."""
        runs = self.baseline_vcpu_s + self.armed_vcpu_s
        return "vcpu" if runs and all(v is not None for v in runs) else "wall"

    def _runs(self, metric: str) -> tuple[list[float], list[float]]:
        if metric == "vcpu":
            return ([v for v in self.baseline_vcpu_s if v is not None],
                    [v for v in self.armed_vcpu_s if v is not None])  # fmt: skip
        return self.baseline_s, self.armed_s

    def slowdown_of(self, metric: str) -> float | None:
        """How much longer a run takes with the probes armed (a fraction): the
        median of each armed run over the run without them just before it."""
        base, armed = self._runs(metric)
        if not base or not armed or min(base) <= 0:
            return None
        pairs = self.pairs_of(metric)
        if pairs:
            return statistics.median(pairs) - 1
        return statistics.median(armed) / statistics.median(base) - 1

    @property
    def slowdown(self) -> float | None:
        return self.slowdown_of(self.metric)

    def pairs_of(self, metric: str) -> list[float]:
        """Each armed run over the run without the probes just before it."""
        base, armed = self._runs(metric)
        if not armed or len(base) != len(armed) or min(base) <= 0:
            return []
        return [a / b for a, b in zip(armed, base, strict=True)]

    @property
    def pairs(self) -> list[float]:
        return self.pairs_of(self.metric)


@dataclass
class Boot:
    plain_s: float | None = None  # QEMU launched to the shell prompt
    first_probe_s: float | None = None  # QEMU launched to the first probe hit

    @property
    def ratio(self) -> float | None:
        if self.plain_s is None or self.first_probe_s is None or self.plain_s <= 0:
            return None
        return self.first_probe_s / self.plain_s


@dataclass
class BenchResult:
    options: BenchOptions
    rows: dict[str, Row] = field(default_factory=dict)
    arming: dict[int, Arming] = field(default_factory=dict)
    unhit: Unhit = field(default_factory=Unhit)
    boot: Boot = field(default_factory=Boot)
    release: str | None = None
    host: dict[str, Any] = field(default_factory=dict)
    gdb_trace: dict[str, Any] | None = None
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def value(self, key: str) -> float | None:
        row = self.rows.get(key)
        return row.us() if row is not None else None

    def ratio(self, num: str, den: str) -> float | None:
        a, b = self.value(num), self.value(den)
        if a is None or b is None or b <= 0:
            return None
        return a / b

    def summary(self) -> dict[str, Any]:
        """The top-level numeric keys (µs, seconds, fractions; None where not available)."""
        doc: dict[str, Any] = {ROWS[k][0]: self.value(k) for k in ROWS}
        doc["fast_kretprobe_us_per_hit"] = self.value("kretprobe_fast")  # the same row
        for key, num, den in RATIOS:
            doc[key] = self.ratio(num, den)
        doc["stops_per_hit"] = {k: r.stops_per_hit for k, r in self.rows.items() if r.measured}
        for n in (1000, 10_000):
            arm = self.arming.get(n)
            doc[f"arm_{n}_s"] = arm.seconds if arm is not None else None
            doc[f"arm_{n}_armed"] = arm.armed if arm is not None else None
            doc[f"arm_{n}_refused"] = arm.refused if arm is not None else None
            doc[f"arm_{n}_limit"] = arm.limit if arm is not None else None
            doc[f"unregister_{n}_s"] = arm.unregister_s if arm is not None else None
        doc["unhit_1000_slowdown"] = self.unhit.slowdown if self.unhit.probes == 1000 else None
        doc["unhit_1000_slowdown_wall"] = (
            self.unhit.slowdown_of("wall") if self.unhit.probes == 1000 else None
        )
        doc["unhit_probes"] = self.unhit.probes
        doc["boot_plain_s"] = self.boot.plain_s
        doc["boot_to_first_probe_s"] = self.boot.first_probe_s
        doc["boot_to_first_probe_ratio"] = self.boot.ratio
        return doc

    def as_json(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "workload": f"Linux {self.release or '?'}: '{OPENAT_LOOP_NAME} N {OPENED}' "
            f"(openat, read, close; no shell between rounds), probes on {PROBED}, TCG, smp=1",
            "method": "per open = (t(N) - median t(0)) / N per run; per hit = per open - the "
            "no-probe row's per open of the same round (same path); us = median over the "
            "rounds. t is the wall time for rows that stop the guest and for the baselines, "
            "and the CPU time of QEMU's vCPU threads for rows that never stop it (the row's "
            "'metric'; both are in each row)",
            "rows": [r.as_dict() for r in self.rows.values()],
            "arming": [dataclasses.asdict(a) for a in self.arming.values()],
            "unhit": {
                **dataclasses.asdict(self.unhit),
                "metric": self.unhit.metric,
                "slowdown": self.unhit.slowdown,
                "slowdown_wall": self.unhit.slowdown_of("wall"),
                "pairs": self.unhit.pairs,
            },
            "boot": {**dataclasses.asdict(self.boot), "ratio": self.boot.ratio},
            "gdb_trace": self.gdb_trace,
            "host": self.host,
            "options": dataclasses.asdict(self.options),
            "problems": self.problems,
            "elapsed_s": self.elapsed_s,
        }


# --- measuring ------------------------------------------------------------------------


class Progress:
    """One line per step on stderr, with the time since the start."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.start = time.monotonic()

    def __call__(self, msg: str) -> None:
        if self.out is not None:
            print(
                f"bench [{time.monotonic() - self.start:6.1f} s] {msg}", file=self.out, flush=True
            )


def _net(before: dict[str, int], after: dict[str, int], sign: int, into: dict[str, int]) -> None:
    for k in after:
        into[k] = into.get(k, 0) + sign * (after[k] - before.get(k, 0))


def measure(
    row: Row,
    run: Callable[[int], Timed],
    repeat: int,
    *,
    count: Callable[[], int] | None = None,
    stats: Callable[[], dict[str, int]] | None = None,
) -> None:
    """Warm up, then alternate run(0) and run(row.hits) ``repeat`` times.

    ``count`` (probe hits so far) and ``stats`` (stops so far) are read
    around every run; what the N=0 runs took is subtracted from what the N
    runs took.
    """
    run(min(row.hits, 100))  # the translation cache, the slot pages
    run(0)
    seen = 0
    for _ in range(repeat):
        for n in (0, row.hits):
            hits0 = count() if count is not None else 0
            stats0 = stats() if stats is not None else {}
            timed = run(n)
            sign = 1 if n else -1
            if count is not None:
                seen += sign * (count() - hits0)
            if stats is not None:
                _net(stats0, stats(), sign, row.stops)
            row.add(n, timed)
    if count is not None:
        row.hits_seen = seen
        if seen != row.hits * repeat:
            row.problems.append(f"counted {seen} hits (net), expected {row.hits * repeat}")


def _nothing() -> None:
    return None


@dataclass
class Case:
    """A row's probes, set up before each of its rounds and taken down after.

    ``count`` reads the probe's hits so far; a read that itself hits the
    probe (a console command on the guest) adds ``count_cost``. ``events``
    (read after ``count``) reads the events so far that name the file the
    workload opens: one per open.
    """

    row: Row
    setup: Callable[[], None] = _nothing
    teardown: Callable[[], None] = _nothing
    count: Callable[[], int] | None = None
    count_cost: int = 0
    events: Callable[[], int] | None = None
    seen: int = 0
    events_seen: int = 0
    #: Switches the row's probe off (False) and on again (True), if it can be.
    toggle: Callable[[bool], None] | None = None

    def switched(self, run: Callable[[int], Timed], stats: Callable[[], dict[str, int]],
                 pairs: int, warm: int) -> None:  # fmt: skip
        """``pairs`` times a run with the probe off and one with it on, in
        turn off-on and on-off (a drift of the host's load then cancels), each
        after a short warm-up: switching rewrites the probed code, whose
        translation QEMU then drops. The probe is left on."""
        if self.toggle is None:
            return
        state = True
        for k in range(pairs):
            timed: dict[bool, Timed] = {}
            stops = 0
            for on in (False, True) if k % 2 == 0 else (True, False):
                if on != state:
                    self.toggle(on)
                    state = on
                run(warm)
                before = stats().get("stops", 0) if on else 0
                timed[on] = run(self.row.hits)
                if on:
                    stops = stats().get("stops", 0) - before
            self.row.add_pair(timed[False], timed[True], stops)
        if not state:
            self.toggle(True)

    def pair(self, run: Callable[[int], Timed], stats: Callable[[], dict[str, int]]) -> None:
        """run(0), then run(row.hits): the fixed cost, then the timed run.
        Hits and stops of the run for 0 are subtracted."""
        for n in (0, self.row.hits):
            sign = 1 if n else -1
            hits0 = self.count() if self.count is not None else 0
            events0 = self.events() if self.events is not None else 0
            stats0 = stats()
            timed = run(n)
            _net(stats0, stats(), sign, self.row.stops)
            if self.count is not None:
                self.seen += sign * (self.count() - hits0 - self.count_cost)
            if self.events is not None:
                self.events_seen += sign * (self.events() - events0)
            self.row.add(n, timed)

    def check(self, rounds: int) -> None:
        expected = self.row.hits * rounds
        if self.events is not None:
            self.row.events_seen = self.events_seen
            if self.events_seen != expected:
                self.row.problems.append(
                    f"{self.events_seen} events for {OPENED} (net), expected {expected}"
                )
        if self.count is None:
            return
        self.row.hits_seen = self.seen
        if self.seen != expected:
            self.row.problems.append(f"counted {self.seen} hits (net), expected {expected}")


def _noop(kp: Any, ctx: Any) -> None:
    return None


class LinuxBench:
    """The benchmark on one Linux guest (a :class:`Session`)."""

    def __init__(
        self, session: Session, opts: BenchOptions, result: BenchResult, progress: Progress
    ) -> None:
        self.session = session
        self.opts = opts
        self.result = result
        self.log = progress

    # --- the workload -----------------------------------------------------------------

    def prepare(self) -> None:
        """Write the workload program into the guest (see :data:`WORKLOAD`)."""
        out = self.shell(upload_command(WORKLOAD, openat_loop()) + f" && {WORKLOAD} 1 {OPENED}"
                         " && echo workload-ready")  # fmt: skip
        if "workload-ready" not in out:
            raise BenchError(f"could not write {WORKLOAD} into the guest: {out.strip()[-200:]!r}")

    def vcpu_time(self) -> float | None:
        machine = self.session.machine
        return machine.vcpu_cpu_time() if machine is not None else None

    def open_n(self, n: int) -> Timed:
        """``qp-openat n`` through ``Session.command`` (probe hits served meanwhile)."""
        line = workload_line(n)
        vcpu0, host0 = self.vcpu_time(), time.process_time()
        start = time.perf_counter()
        out = self.session.command(line, timeout=self.opts.timeout)
        wall = time.perf_counter() - start
        vcpu1, host1 = self.vcpu_time(), time.process_time()
        if out.strip() != workload_done(n):
            raise BenchError(f"{line!r} printed {out.strip()[-200:]!r}")
        vcpu = vcpu1 - vcpu0 if vcpu0 is not None and vcpu1 is not None else None
        return Timed(wall, vcpu, host1 - host0)

    def shell(self, line: str, timeout: float = 60.0) -> str:
        return self.session.command(line, timeout=timeout)

    def stats(self) -> dict[str, int]:
        return dict(dataclasses.asdict(self.session.engine.stats))

    def add_row(self, row: Row) -> Row:
        self.result.rows[row.key] = row
        return row

    # --- rows -------------------------------------------------------------------------

    def _guest_hits(self) -> int:
        """The guest's own hit count of its event (``kprobe_profile``)."""
        out = self.shell(f"cat {TRACEFS}/kprobe_profile")
        found = re.search(rf"^\s*{GUEST_EVENT}\s+(\d+)\s+(\d+)", out, re.MULTILINE)
        if found is None:
            raise BenchError(f"{GUEST_EVENT} is not in kprobe_profile: {out.strip()[-300:]!r}")
        return int(found.group(1))

    def _singlestep_at(self) -> tuple[str, str]:
        """After the ftrace nop, where the function starts with it."""
        addr = self.session.engine.resolve(Kprobe(symbol_name=PROBED))
        head = self.session.engine.read_data(addr, len(FTRACE_NOP))
        if head == FTRACE_NOP:
            return f"{PROBED}+{len(FTRACE_NOP)}", f" (+{len(FTRACE_NOP)})"
        return PROBED, ""

    def _kprobe_case(self, row: Row, register: Callable[[], Any]) -> Case:
        held: list[Any] = []

        def setup() -> None:
            held[:] = [register()]

        def teardown() -> None:
            probe = held.pop()
            if getattr(probe, "nmissed", 0):
                row.problems.append(f"nmissed={probe.nmissed}")
            self.session.unregister(probe)

        return Case(row, setup, teardown, count=lambda: int(held[0].nhit))

    def _guest_case(self, row: Row) -> Case:
        """The guest's own kprobe_events, set up and removed through tracefs."""
        row.notes.append(f"definition: {GUEST_DEF}")
        enable = f"{TRACEFS}/events/{GUEST_GROUP}/enable"
        case = Case(row, count=self._guest_hits)

        def setup() -> None:
            out = self.shell(
                f"echo '{GUEST_DEF}' >> {TRACEFS}/kprobe_events && echo 1 > {enable} "
                "&& echo configured"
            )
            if "configured" not in out:
                raise BenchError(f"the guest's kprobe_events refused {GUEST_DEF!r}: {out!r}")
            # Reading the count opens a file too (one hit per read, say).
            case.count_cost = -(self._guest_hits() - self._guest_hits())

        def teardown() -> None:
            self.shell(
                f"echo 0 > {enable}; echo '-:{GUEST_GROUP}/{GUEST_EVENT}' >> "
                f"{TRACEFS}/kprobe_events; echo > {TRACEFS}/trace"
            )

        def toggle(on: bool) -> None:
            out = self.shell(f"echo {int(on)} > {enable} && echo switched")
            if "switched" not in out:
                raise BenchError(f"could not switch the guest's event {'on' if on else 'off'}")

        case.setup, case.teardown, case.toggle = setup, teardown, toggle
        return case

    def _detour_at(self) -> str:
        """``do_sys_openat2``'s first instruction of 5 bytes or more after its
        ftrace nop (its first instruction where it has none), as SYM+OFF."""
        from qprobes.arch.x86_64 import insn as x86insn

        engine = self.session.engine
        addr = engine.resolve(Kprobe(symbol_name=PROBED))
        code = engine.read_data(addr, 128)
        off = len(FTRACE_NOP) if code.startswith(FTRACE_NOP) else 0
        while off < 100:
            insn = x86insn.decode(code[off:], addr + off)
            if insn.length >= x86insn.JMP_REL32_SIZE:
                return f"{PROBED}+{off:#x}"
            off += insn.length
        raise BenchError(f"{PROBED} has no instruction of 5 bytes in its first 100")

    def _tracer_case(self, row: Row, fast: bool = False, ret: bool = False,
                     detour: bool = False) -> Case:  # fmt: skip
        """The Tracer with the guest row's fetch arguments, on the slow path
        (a stop per hit) or the fast one (a recorder in the guest; the host
        drains the rings while the guest runs, and before each count), at
        the int3 or (``detour``) through a jump to a detour buffer; with
        ``ret``, the fast return probe (events: the workload's successful
        opens)."""
        from qprobes.tracing import TraceEvent, Tracer

        definition = FAST_RET_DEF if ret else FAST_DEF if fast else TRACE_DEF
        if detour:
            definition = f"p:myopen_detour {self._detour_at()} {FETCHARGS}"
        how = " (Tracer(fast=True))" if detour else " (Tracer(fast=True, detour=False))"
        row.notes.append(f"definition: {definition}" + (how if fast else ""))
        paths: Counter[str] = Counter()
        emitted = [0, 0]  # events emitted, hits

        def sink(event: TraceEvent) -> None:
            if not ret:
                paths[str(event.fields.get("path"))] += 1
                return
            value = event.fields.get("ret")
            if event.comm == WORKLOAD_COMM and isinstance(value, int) and value >= 0:
                paths[OPENED] += 1  # a call of the workload's that opened the file

        tracer = Tracer(self.session, sink, fast=fast, detour=detour)
        held: list[Any] = []
        engine = self.session.engine
        counters = {"dropped": 0, "spilled": 0, "orphans": 0}
        before: dict[str, int] = {}

        def fast_counters() -> dict[str, int]:
            fp = engine.fast
            if fp is None:
                return dict.fromkeys(counters, 0)
            return {"dropped": fp.dropped, "spilled": fp.spilled, "orphans": fp.orphans}

        def setup() -> None:
            tp = tracer.add(definition)
            held[:] = [tp]
            if not fast:
                return
            tracer.drain()
            before.update(fast_counters())
            if tp.kprobe is None or not engine.is_fast(tp.kprobe):
                why = tp.slow_reason or "the engine keeps it on the slow path"
                row.problems.append(f"not on the fast path: {why}")
            elif detour and not engine.is_detoured(tp.kprobe):
                row.problems.append(f"not detoured: {tp.kprobe.detour_refused}")

        def teardown() -> None:
            tp = held.pop()
            missed = tp.nmissed
            tracer.remove(tp.name)  # drains what it recorded first
            if missed:
                row.problems.append(f"nmissed={missed}")
            emitted[0] += tp.emitted
            emitted[1] += tp.nhit
            if fast:
                after = fast_counters()
                for k in counters:
                    counters[k] += after[k] - before.get(k, 0)
                row.fast = {"events": emitted[0], "hits": emitted[1], **counters}
            note = "events by path: " + ", ".join(f"{p} {k}" for p, k in sorted(paths.items()))
            row.notes[1:] = [note]
            mismatch = " events emitted for "
            row.problems[:] = [p for p in row.problems if mismatch not in p]
            if emitted[0] != emitted[1]:
                row.problems.append(f"{emitted[0]}{mismatch}{emitted[1]} hits")

        def count() -> int:
            if fast:
                tracer.drain()
            return int(held[0].nhit)

        def toggle(on: bool) -> None:
            probe = held[0].probe if held else None
            if not isinstance(probe, Kprobe):
                raise BenchError(f"{definition}: no kprobe to switch")
            if on:
                engine.enable_kprobe(probe)
                if detour and not engine.is_detoured(probe):
                    row.problems.append(f"not detoured after it was enabled again: "
                                        f"{probe.detour_refused}")  # fmt: skip
            else:
                engine.disable_kprobe(probe)
            tracer.drain()

        # The fast entry rows can be switched off and on (the slow ones cost
        # far more than the spread a switch would remove; a return probe's
        # instances outlive a switch).
        return Case(row, setup, teardown, count=count, events=lambda: paths[OPENED],
                    toggle=toggle if fast and not ret else None)  # fmt: skip

    def hit_rows(self) -> Row:
        """Every row on qprobes' side, interleaved: each round runs each row
        once (set up, warm up, N=0 and N, taken down), so that what else the
        host does at one moment spreads over all rows alike."""
        n = self.opts.hits
        base = self.add_row(Row("noprobe", n))
        step_at, step_label = self._singlestep_at()
        cases = [
            Case(base),
            self._guest_case(self.add_row(Row("guest_kprobe_events", n, baseline=base))),
            self._kprobe_case(
                self.add_row(Row("boosted", n, baseline=base)),
                lambda: self.session.kprobe(PROBED, _noop),
            ),
            self._kprobe_case(
                self.add_row(Row("single_step", n, baseline=base, label_extra=step_label)),
                lambda: self.session.kprobe(step_at, _noop, boost=False),
            ),
            self._kprobe_case(
                self.add_row(Row("kretprobe", n, baseline=base)),
                lambda: self.session.kretprobe(PROBED, _noop),
            ),
            self._tracer_case(self.add_row(Row("tracer", n, baseline=base))),
            self._tracer_case(self.add_row(Row("fast", n, baseline=base)), fast=True),
            self._tracer_case(self.add_row(Row("detour", n, baseline=base)), fast=True,
                              detour=True),
            self._tracer_case(
                self.add_row(Row("kretprobe_fast", n, baseline=base)), fast=True, ret=True
            ),
        ]
        # The rows that cost little (the guest's own probe, the fast paths)
        # run next to the baseline: close in time, their small numbers
        # suffer least from a change of the host's load within a round.
        # fast, detour: right after the guest's own row
        cheap = [cases.pop(-2), cases.pop(-1)]
        cases[2:2] = cheap
        for r in range(self.opts.repeat):
            self.log(
                f"round {r + 1}/{self.opts.repeat}: "
                + ", ".join(c.row.label for c in cases)
                + f" ({n} opens each)"
            )
            for case in cases:
                case.setup()
                try:
                    self.open_n(min(n, 50))  # warm up: the translation cache, the slot pages
                    case.pair(self.open_n, self.stats)
                    case.switched(self.open_n, self.stats, self.opts.pairs, min(n, 50))
                finally:
                    case.teardown()
        for case in cases:
            case.check(self.opts.repeat)
        if base.stops.get("stops") or self.result.rows["guest_kprobe_events"].stops.get("stops"):
            self.result.problems.append("qprobes stopped the guest with no qprobes probe armed")
        return base

    def not_available(self) -> None:
        for key, reason in NOT_BUILT.items():
            self.add_row(Row(key, 0, available=False, reason=reason))
            self.log(f"{ROWS[key][1]}: not available ({reason})")

    # --- many probes --------------------------------------------------------------------

    def _functions(self) -> list[int]:
        """Distinct function entries from kallsyms text, by address."""
        symbols = self.session.symbols
        if symbols is None:
            raise BenchError("the guest's symbols are not loaded")
        addrs = {s.addr for s in symbols if s.kind == "func" and s.size > 0}
        return sorted(addrs)

    def _arm(self, addrs: list[int], wanted: int, arm: Arming) -> list[Kprobe]:
        """Register probes from ``addrs`` until ``wanted`` are armed, in batches
        (``Session.kprobe_many``: one pass, the guest stopped once); a refusal
        is counted and its address skipped (the next batch takes more); an
        error that is not about the address (the engine's limits) ends the
        attempt."""
        armed: list[Kprobe] = []
        start = time.perf_counter()
        pos = 0
        while len(armed) < wanted and pos < len(addrs) and arm.limit is None:
            chunk = addrs[pos : pos + wanted - len(armed)]
            pos += len(chunk)
            for got in self.session.kprobe_many(chunk, _noop):
                if isinstance(got, Kprobe):
                    armed.append(got)
                elif _is_limit(got):
                    arm.limit = arm.limit or str(got)
                else:
                    arm.refuse(got)
        arm.seconds_tried = time.perf_counter() - start
        arm.armed += len(armed)
        if len(armed) >= wanted:
            arm.seconds = arm.seconds_tried
        return armed

    def _unregister(self, probes: list[Kprobe]) -> float:
        """Unregister ``probes`` in one batch (``Session.unregister_many``)."""
        start = time.perf_counter()
        failed = [e for e in self.session.unregister_many(probes) if e is not None]
        took = time.perf_counter() - start
        if failed:
            raise BenchError(f"{len(failed)} probes could not be unregistered ({failed[0]})")
        return took

    def mixed(self, rounds: int) -> Timed:
        line = MIXED.format(n=rounds, file=OPENED)
        vcpu0 = self.vcpu_time()
        start = time.perf_counter()
        out = self.shell(line, timeout=self.opts.timeout)
        wall = time.perf_counter() - start
        vcpu1 = self.vcpu_time()
        if "mixed-done" not in out:
            raise BenchError(f"the mixed workload printed {out.strip()[-300:]!r}")
        return Timed(wall, vcpu1 - vcpu0 if vcpu0 is not None and vcpu1 is not None else None)

    def unhit(self) -> None:
        """Arm ``opts.unhit`` probes the mixed workload never hits; time it without and with."""
        want = self.opts.unhit
        result = self.result.unhit
        result.rounds = self.opts.mixed_rounds
        pool = self._functions()
        random.Random(9).shuffle(pool)  # spread over the text, the same every run
        self.mixed(result.rounds)  # warm-up
        self.log(f"arming {want} probes on function entries (kallsyms)")
        arm = self.result.arming.setdefault(want, Arming(want))
        probes = self._arm(pool, want, arm)
        pool = pool[arm.armed + arm.refused :]
        # Calibration: probes the workload (or the idle guest) hits are
        # replaced. A short pass first (a hot probe is hit thousands of times
        # a round), then full ones until none is hit.
        for attempt in range(6):
            self.mixed(min(2, result.rounds) if attempt == 0 else result.rounds)
            hit = [kp for kp in probes if kp.nhit]
            if not hit:
                break
            result.dropped += len(hit)
            self._unregister(hit)
            probes = [kp for kp in probes if not kp.nhit]
            extra = Arming(len(hit))
            more = self._arm(pool, len(hit), extra)
            pool = pool[extra.armed + extra.refused :]
            probes += more
        result.probes = len(probes)
        if result.probes < want:
            result.problems.append(f"only {result.probes} unhit probes armed of {want}")
        self.log(
            f"mixed workload ({result.rounds} rounds), {self.opts.repeat} runs with {result.probes}"
            f" unhit probes armed ({result.dropped} hit in calibration, replaced), alternating "
            "with runs with them disabled"
        )
        # What the host does for them at every stop of a command's end: is
        # each int3 still there (engine.check_lost, at most once a second).
        start = time.perf_counter()
        self.session.engine.check_lost()
        result.lost_check_s = time.perf_counter() - start
        before = sum(kp.nhit for kp in probes)
        engine = self.session.engine
        for _ in range(self.opts.repeat):
            # Disabled: no int3 in the text, nothing for the host to check.
            # Each toggle writes into a thousand code pages, whose translated
            # blocks QEMU drops: a short warm-up before each timed run.
            for kp in probes:
                engine.disable_kprobe(kp)
            self.mixed(min(2, result.rounds))
            result.add(False, self.mixed(result.rounds))
            for kp in probes:
                engine.enable_kprobe(kp)
            self.mixed(min(2, result.rounds))
            result.add(True, self.mixed(result.rounds))
        result.hits = sum(kp.nhit for kp in probes) - before
        if result.hits:
            result.problems.append(f"the armed probes were hit {result.hits} times")
        arm.unregister_s = self._unregister(probes)

    def arm_many(self) -> None:
        want = self.opts.arm_many
        addrs = self._functions()
        # Spread over the whole text: every k-th function, then the next ones.
        k = max(1, len(addrs) // want)
        order = [a for i in range(k) for a in addrs[i::k]]
        self.log(f"arming {want} probes at once on function entries ({len(addrs)} functions)")
        arm = self.result.arming.setdefault(want, Arming(want))
        probes = self._arm(order, want, arm)
        self.log(
            f"armed {arm.armed} of {want} in {arm.seconds_tried:.1f} s, {arm.refused} "
            f"refused" + (f"; stopped: {arm.limit}" if arm.limit else "")
        )
        arm.unregister_s = self._unregister(probes)

    # --- boot -------------------------------------------------------------------------

    def first_probe(self, launched: float) -> None:
        """The first hit of a probe registered right after attaching."""
        first: list[float] = []

        def pre(kp: Any, ctx: Any) -> None:
            if not first:
                first.append(time.perf_counter())

        kp = self.session.kprobe(PROBED, pre)
        try:
            self.shell(f"read -r _line < {OPENED}")  # the shell opens it
        finally:
            self.session.unregister(kp)
        if first:
            self.result.boot.first_probe_s = first[0] - launched
        else:
            self.result.problems.append("the first probe was never hit")


#: The engine's own limits (its probe table, its slots, its reserved memory),
#: as opposed to the refusal of one address.
LIMITS = ("at most ", "out of instruction slots", "is used up", "no free 2 MiB region")


def _is_limit(exc: QprobesError) -> bool:
    text = str(exc)
    return any(text.startswith(s) or s in text for s in LIMITS)


def plain_boot(timeout: float) -> float:
    """Seconds from launching QEMU to the default guest's shell prompt, nothing attached."""
    from qprobes.machine.linux import LINUX_PROMPT, linux_config
    from qprobes.machine.qemu import QemuMachine

    machine = QemuMachine(linux_config(append="qprobes.echo=0"))
    start = time.perf_counter()
    machine.launch()
    try:
        console = machine.console
        machine.target.resume()
        console.recvuntil(LINUX_PROMPT, timeout=timeout)
        return time.perf_counter() - start
    finally:
        machine.shutdown()


# --- gdb --------------------------------------------------------------------------------


class GdbRows:
    """gdb on the same guest: qprobes detaches and lets go of the stub first."""

    def __init__(self, bench: LinuxBench, base: Row) -> None:
        self.bench = bench
        self.opts = bench.opts
        self.base = base
        machine = bench.session.machine
        if machine is None:
            raise BenchError("gdb needs a QEMU that qprobes launched")
        self.machine = machine

    def run(self, n: int) -> Timed:
        from qprobes.machine.linux import LINUX_PROMPT

        tube = self.machine.console.tube
        line = workload_line(n)
        vcpu0 = self.machine.vcpu_cpu_time()
        start = time.perf_counter()
        tube.sendline(line.encode())
        out: bytes = tube.recvuntil(LINUX_PROMPT, timeout=self.opts.timeout)
        wall = time.perf_counter() - start
        vcpu1 = self.machine.vcpu_cpu_time()
        if workload_done(n).encode() not in out:
            raise BenchError(f"{line!r} printed {out[-200:]!r} with gdb attached")
        vcpu = vcpu1 - vcpu0 if vcpu0 is not None and vcpu1 is not None else None
        return Timed(wall, vcpu)

    def measure(self) -> None:
        from qprobes.frontends.gdbmi import Gdb

        session, log = self.bench.session, self.bench.log
        log("qprobes detaches; gdb connects to the same QEMU")
        addr = session.engine.resolve(Kprobe(symbol_name=PROBED))
        session.engine.detach()
        self.machine.release_gdbstub()
        gdb = Gdb(self.opts.gdb)
        try:
            gdb.command("-gdb-set confirm off")
            gdb.command("-gdb-set mi-async on")  # commands while the target runs
            gdb.command(f"-target-select remote {self.machine.gdb_socket}", timeout=30.0)
            self._rows(gdb, addr)
        finally:
            self._close(gdb)

    def _rows(self, gdb: Any, addr: int) -> None:
        from qprobes.frontends.gdbmi import GdbTrace

        log, repeat, result = self.bench.log, self.opts.repeat, self.bench.result
        base = Row("gdb_noprobe", self.opts.hits, path="console")
        result.rows[base.key] = base
        log(f"{base.label}: {repeat} x {base.hits} opens")
        gdb.command("-exec-continue")
        with gdb.draining():
            measure(base, self.run, repeat)
        gdb.interrupt()

        row = Row("gdb", self.opts.gdb_hits, path="console", baseline=base)
        result.rows[row.key] = row
        log(f"{row.label}: {repeat} x {row.hits} hits")
        bp = gdb.command(f"-break-insert *{addr:#x}")["payload"]["bkpt"]["number"]
        gdb.command(f'-break-commands {bp} "silent" "continue"')
        # Hits of the command for N=0 (the shell opens the helper script).
        count0 = gdb.hit_count(bp)
        gdb.command("-exec-continue")
        with gdb.draining():
            self.run(0)
        gdb.interrupt()
        extra = gdb.hit_count(bp) - count0
        before = gdb.hit_count(bp)
        gdb.command("-exec-continue")
        with gdb.draining() as records:
            measure(row, self.run, repeat)
        gdb.interrupt()
        # measure(): a warm-up, a run for 0, then repeat pairs; every command
        # also hits what the one for 0 hits.
        not_timed = min(row.hits, 100) + extra * (2 * repeat + 2)
        row.hits_seen = gdb.hit_count(bp) - before - not_timed
        stopped = sum(1 for r in records if r.get("message") == "stopped")
        row.stops = {"mi_stopped": stopped - not_timed}
        expected = row.hits * repeat
        if row.hits_seen > expected:
            # QEMU sometimes answers gdb's step over the breakpoint (z0,
            # vCont;s) with a stop at the same rip, no instruction executed,
            # and gdb counts that stop as a new hit.
            row.notes.append(
                f"gdb counted {row.hits_seen} hits (net) for {expected} opens: "
                "QEMU sometimes ends gdb's step over the breakpoint before the "
                "instruction ran, and gdb counts the repeated stop as a hit"
            )
        elif row.hits_seen != expected:
            row.problems.append(f"gdb counted {row.hits_seen} hits (net), expected {expected}")
        if self.opts.trace_hits > 0:
            trace = self._trace(gdb, self.opts.trace_hits + extra)
            result.gdb_trace = dataclasses.asdict(trace)
            if trace.hits:
                row.stops["stops"] = trace.stop_replies * row.hits * repeat // trace.hits
        else:
            result.gdb_trace = dataclasses.asdict(GdbTrace())

    def _trace(self, gdb: Any, hits: int) -> Any:
        """An untimed run with gdb's remote protocol logged."""
        from qprobes.frontends.gdbmi import GdbTrace, remote_log_counts

        trace = GdbTrace(hits=hits)
        gdb.command("-gdb-set debug remote 1")
        gdb.command("-exec-continue")
        with gdb.draining() as records:
            # A command for 0 first: the packets of -exec-continue itself are
            # logged by then. The reader thread lags gdb: let it catch up.
            self.run(0)
            time.sleep(0.3)
            mark = len(records)
            self.run(self.opts.trace_hits)
            time.sleep(0.3)
            end = len(records)
        gdb.interrupt()
        gdb.command("-gdb-set debug remote 0")
        remote_log_counts(records[mark:end], trace)
        return trace

    def _close(self, gdb: Any) -> None:
        """gdb lets go of the guest (which runs on); qprobes connects again."""
        try:
            if gdb._drain_thread is None:
                gdb.command("-target-detach", timeout=10.0)
        except QprobesError as exc:
            self.bench.result.problems.append(f"gdb detach: {exc}")
        finally:
            gdb.close()
        self.bench.session.reconnect()


# --- the whole run ---------------------------------------------------------------------


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.splitlines()[0].strip() if out.stdout else "?"


def host_info(opts: BenchOptions) -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
            cpu = found.group(1).strip() if found else "?"
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "qemu": _version(["qemu-system-x86_64", "--version"]),
        "gdb": _version([opts.gdb, "--version"]),
        "loadavg_before": list(os.getloadavg()),
        "accel": "tcg",
    }


def run_bench(opts: BenchOptions, progress: TextIO | None = sys.stderr) -> BenchResult:
    """Every row on one Linux guest (and a plain boot before it)."""
    log = Progress(progress)
    result = BenchResult(opts, host=host_info(opts))
    if not os.path.exists(opts.gdb):
        raise BenchError(f"gdb not found at {opts.gdb} (scripts/install.sh installs it)")
    log("plain boot of the default Linux guest (nothing attached)")
    result.boot.plain_s = plain_boot(opts.timeout)
    log(f"plain boot: {result.boot.plain_s:.2f} s; booting the benchmark guest with qprobes")
    launched = time.perf_counter()
    session = Session.linux(boot_timeout=opts.timeout)
    try:
        bench = LinuxBench(session, opts, result, log)
        bench.first_probe(launched)
        if result.boot.first_probe_s is not None:
            log(f"boot to the first probe hit: {result.boot.first_probe_s:.2f} s")
        result.release = session.command("uname -r").strip() or None
        bench.prepare()
        base = bench.hit_rows()
        bench.not_available()
        if opts.unhit > 0:
            bench.unhit()
        if opts.arm_many > 0:
            bench.arm_many()
        GdbRows(bench, base).measure()
    finally:
        try:
            session.close()
        except MachineError as exc:
            result.problems.append(f"closing the guest: {exc}")
    result.elapsed_s = time.monotonic() - log.start
    result.host["loadavg_after"] = list(os.getloadavg())
    log(f"done in {result.elapsed_s:.0f} s")
    return result


# --- the report -------------------------------------------------------------------------


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    if abs(us) >= 10_000:
        return f"{us / 1000:,.1f} ms"
    if abs(us) >= 100:
        return f"{us:,.0f} us"
    return f"{us:.1f} us"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else (f"{r:,.0f}x" if r >= 100 else f"{r:.2f}x")


def report(result: BenchResult, out: TextIO) -> None:
    """The table and the other measurements, as text."""
    opts, host = result.options, result.host
    w = out.write
    w(
        f"qprobes bench: Linux {result.release or '?'}, TCG, smp=1; workload "
        f"'{OPENAT_LOOP_NAME} N {OPENED}' (openat, read, close a round), probes on {PROBED}\n"
    )
    w(
        f"  {host.get('qemu')}; {host.get('gdb')}; {host.get('nproc')} x {host.get('cpu')}; "
        f"load average {host.get('loadavg_before', [0])[0]:.2f} before, "
        f"{host.get('loadavg_after', [0])[0]:.2f} after\n"
    )
    w(
        f"  {opts.repeat} runs per row, N = {opts.hits} opens (gdb: {opts.gdb_hits}); "
        "per hit = what a probe adds to one open, fixed cost removed;\n"
        "  timed by the wall clock, or (vcpu) by the CPU time of QEMU's vCPU threads for "
        "rows that never stop the guest;\n  qprobes cpu = this process's CPU time per hit "
        "(serving stops, draining rings)\n\n"
    )
    gdb = result.value("gdb")
    head = (f"{'row':<46} {'per hit':>10} {'min':>10} {'max':>10} {'timed by':>8} "
            f"{'stops/hit':>9} {'gdb / row':>9} {'qprobes cpu':>11}")  # fmt: skip
    w(head + "\n" + "-" * len(head) + "\n")
    for row in result.rows.values():
        if not row.available:
            w(f"{row.label:<46} {'not available':>10}  ({row.reason})\n")
            continue
        over = [x * 1e6 for x in row.overhead_runs]
        sph = row.stops_per_hit
        us = row.us()
        vs = gdb / us if gdb and us and us > 0 and row.baseline and row.key != "gdb" else None
        cost = row.overhead_of("host") if row.path == "session" else []
        w(
            f"{row.label:<46} {fmt_us(row.us()):>10} {fmt_us(min(over)):>10} "
            f"{fmt_us(max(over)):>10} {row.metric:>8} {'-' if sph is None else f'{sph:.2f}':>9} "
            f"{fmt_ratio(vs) if vs else '':>9} "
            f"{fmt_us(statistics.median(cost) * 1e6) if cost else '':>11}\n"
        )
    w("\nRatios (per hit):\n")
    for key, num, den in RATIOS:
        r = result.ratio(num, den)
        why = "" if r is not None else "  (not available)"
        w(f"  {key:<40} {fmt_ratio(r) if r is not None else '-':>9}{why}\n")
    w("\nArming (distinct function entries from kallsyms):\n")
    for n, arm in result.arming.items():
        if arm.seconds is not None:
            text = f"{arm.seconds:.2f} s"
        else:
            text = f"not all: {arm.armed} armed in {arm.seconds_tried:.2f} s"
        w(
            f"  {n:>6,} probes: {text}; {arm.refused} refused on the way"
            + (f"; stopped by: {arm.limit}" if arm.limit else "")
            + (f"; unregistering took {arm.unregister_s:.2f} s" if arm.unregister_s else "")
            + "\n"
        )
    if opts.arm_many == 0:
        w(f"  {10_000:>6,} probes: skipped (--quick)\n")
    u = result.unhit
    if u.slowdown is not None:
        wall = u.slowdown_of("wall")
        by_wall = ""
        if u.metric != "wall" and wall is not None:
            by_wall = f", {wall:+.1%} by the wall clock"
        w(
            f"\nMixed workload ({u.rounds} rounds of ls, cat, echo, sort | wc), {u.probes} armed "
            f"probes never hit: median {statistics.median(u.armed_s):.3f} s against "
            f"{statistics.median(u.baseline_s):.3f} s with none (wall); slowdown "
            f"{u.slowdown:+.1%} by {u.metric}"
            + (f" (pairs {min(u.pairs) - 1:+.1%} .. {max(u.pairs) - 1:+.1%})" if u.pairs else "")
            + by_wall
            + "\n"
        )
        if u.lost_check_s is not None:
            w(
                f"  (one check that their {u.probes} int3s are still in place, which the engine "
                f"makes at the end of a command: {u.lost_check_s * 1e3:.0f} ms)\n"
            )
    b = result.boot
    if b.ratio is not None:
        w(
            f"\nBoot: plain {b.plain_s:.2f} s to the prompt; to the first probe hit "
            f"{b.first_probe_s:.2f} s (boot, symbols and BTF from memory, attach, arm, one "
            f"open): {b.ratio:.2f}x\n"
        )
    for key, what in (("fast", "in-guest recorder"), ("detour", "a detour, no int3")):
        fast = result.rows.get(key)
        if fast is None or not fast.measured or fast.fast is None:
            continue
        f = fast.fast
        w(
            f"\nFast path ({what}): {f['events']} events for {f['hits']} hits over its "
            f"rounds, {fast.events_seen} events for {OPENED} in the timed runs (net) for "
            f"{fast.hits * len(fast.walls)} opens; records the guest dropped {f['dropped']}, "
            f"hits a full ring handed to the host {f['spilled']}\n"
        )
    trace = result.gdb_trace
    if trace and trace.get("hits"):
        n = trace["hits"]
        w(
            f"\ngdb's remote log over {n} hits: {trace['stop_replies'] / n:g} stop replies and "
            f"{trace['packets_sent'] / n:g} packets sent per hit\n"
        )
    notes = [(r.label, n) for r in result.rows.values() for n in r.notes]
    if notes:
        w("\nNotes:\n")
        for label, note in notes:
            w(f"  {label}: {note}\n")
    problems = [(r.label, p) for r in result.rows.values() for p in r.problems]
    problems += [("mixed workload", p) for p in u.problems]
    problems += [("run", p) for p in result.problems]
    if problems:
        w("\nProblems:\n")
        for label, p in problems:
            w(f"  {label}: {p}\n")
    w(f"\nTotal time {result.elapsed_s:.0f} s.\n")


def bench(opts: BenchOptions, *, json_output: bool = False, out: TextIO = sys.stdout) -> int:
    """``qprobes bench``: run, then print the table (or JSON)."""
    result = run_bench(opts)
    if json_output:
        json.dump(result.as_json(), out, indent=2)
        out.write("\n")
    else:
        report(result, out)
    return 0
