#!/usr/bin/env python3
"""Cost of one probe hit: qprobes' kprobes against gdb's ``break`` + ``commands``.

Workload: qtest's ``hot N`` runs N direct calls of ``t_hot`` (``nopl;
lock incq; lea 1(%rdi),%rax; ret``) in a loop on one vCPU under TCG, so
every call is one probe hit and almost nothing else runs.

Cases, each on a freshly booted qtest (``smp=1``):

qprobes (one Session; the guest runs ``hot N`` from its memory mailbox
while the host services the doorbell stops):

1. no probe;
2. a boosted kprobe on ``t_hot`` (copy + jmp back: one stop per hit);
3. a single-step kprobe (``boost=False``: #BP stop, then #DB stop);
4. a kretprobe on ``t_hot`` (boosted entry probe + trampoline stop).

gdb (a second machine; qprobes' own client is closed and ``/usr/bin/gdb``
connects to QEMU's gdbstub, driven through pygdbmi; ``hot N`` is typed
on the serial console and timed from the line sent to the prompt):

5. no breakpoint (the guest just runs);
6. ``break *t_hot`` with ``commands / silent / continue / end``.

Method. Every timed command is run ``--repeat`` times, alternating with
the same command for 0 calls (same path, same probes armed, no hit):
that measures the fixed cost of one command (mailbox packets, resume,
the final interrupt; or the console round trip), which is subtracted:
``per hit = (median wall(N) - median wall(0)) / N``. The spread shown is
the range of per-run values against the same fixed cost. Every case is
warmed up first (the guest's translation cache, the slot pages).

The no-probe rows run ``--baseline-calls`` calls, not N: N unprobed calls
take a few microseconds, far below the fixed cost. "x an unprobed call"
compares a probed call with one of those.

By default the mailbox is polled every ``--poll`` seconds (2 ms) through
``Session.engine.run``; ``--poll 0`` uses ``QtestDriver.hot`` as it is,
which waits in 50 ms steps after the guest's last stop (``Session.run``
passes no poll interval on), so each command then ends up to 50 ms late.

"guest cycles" is the guest's own rdtsc delta for the loop. Under TCG the
guest TSC follows the host TSC but QEMU pauses it while the VM is stopped
(vm_stop disables its tick counter), so it counts the time the guest ran
(its code, its translation work, qprobes' stubs) and leaves out the time
the host spent handling stops. The TSC frequency is estimated from a
no-probe run (gdb's console run first: it has no poll step) to show that
share in microseconds.

Stops: qprobes' ``engine.stats`` (stops by kind) per run; for gdb, an
extra untimed run with ``set debug remote 1`` counts the stop replies and
packets gdb exchanges per hit.

Not a test: nothing here asserts a time. The numbers depend on the
machine and on what else it runs; compare ratios taken in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qprobes.frontends.qtest import KERNEL_BASE, MBOX_HOT, QtestDriver
from qprobes.frontends.session import Session
from qprobes.machine.guests import QTEST_PROMPT, qtest_config
from qprobes.machine.qemu import QemuMachine
from qprobes.symbols.elf import load_elf_symbols

PROBED = "t_hot"
BAD_RESULT = (1 << 64) - 1  # qtest's result when t_hot returned a wrong value
HOT_DONE = re.compile(rb"hot (\d+) done cycles=(\d+)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- results ----------------------------------------------------------------------


@dataclass
class Case:
    """The runs of one benchmark case."""

    key: str
    label: str
    path: str  # "mailbox" (qprobes) or "console" (gdb)
    hits: int  # probe hits per run (calls, for the no-probe rows)
    probed: bool = True
    walls: list[float] = field(default_factory=list)  # seconds, hot(hits)
    fixed: list[float] = field(default_factory=list)  # seconds, the same for 0 calls
    cycles: list[int] = field(default_factory=list)  # guest rdtsc delta per run
    stops: dict[str, int] = field(default_factory=dict)  # summed over the timed runs
    hits_seen: int | None = None  # counted by the probe (or gdb), timed runs only
    problems: list[str] = field(default_factory=list)

    @property
    def fixed_cost(self) -> float:
        return statistics.median(self.fixed) if self.fixed else 0.0

    @property
    def per_hit(self) -> float:
        """Seconds per hit (per call for the no-probe rows), fixed cost removed."""
        return (statistics.median(self.walls) - self.fixed_cost) / self.hits

    @property
    def per_hit_runs(self) -> list[float]:
        return [(w - self.fixed_cost) / self.hits for w in self.walls]

    @property
    def hits_per_second(self) -> float:
        return 1.0 / self.per_hit if self.per_hit > 0 else float("inf")

    @property
    def cycles_per_hit(self) -> float:
        return statistics.median(self.cycles) / self.hits if self.cycles else 0.0

    @property
    def stops_per_hit(self) -> float | None:
        if "stops" not in self.stops or not self.walls:
            return None
        return self.stops["stops"] / (self.hits * len(self.walls))

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "path": self.path,
            "hits_per_run": self.hits,
            "runs": len(self.walls),
            "wall_s": self.walls,
            "fixed_s": self.fixed,
            "fixed_median_s": self.fixed_cost,
            "per_hit_s": self.per_hit,
            "per_hit_runs_s": self.per_hit_runs,
            "hits_per_s": self.hits_per_second,
            "guest_cycles": self.cycles,
            "guest_cycles_per_hit": self.cycles_per_hit,
            "stops": self.stops,
            "stops_per_hit": self.stops_per_hit,
            "hits_seen": self.hits_seen,
            "problems": self.problems,
        }


@dataclass
class GdbTrace:
    """What gdb sends and receives per hit (from ``set debug remote 1``)."""

    hits: int = 0
    stop_replies: int = 0
    packets_sent: int = 0
    sent_kinds: dict[str, int] = field(default_factory=dict)


# --- qprobes -------------------------------------------------------------------------


class HotRunner:
    """``hot N`` through the mailbox of a qtest :class:`Session`, timed."""

    def __init__(self, session: Session, poll: float, timeout: float) -> None:
        self.session = session
        self.driver = QtestDriver(session)
        self.poll = poll
        self.timeout = timeout

    def _done_running(self) -> int:
        """The mailbox's ``done`` count, read while the guest runs."""
        hostmem = self.session.hostmem
        assert hostmem is not None  # Session.qtest launches QEMU itself
        paddr = self.driver.mailbox_addr + 16 - KERNEL_BASE
        return int(struct.unpack("<Q", hostmem.read_phys(paddr, 8))[0])

    def hot(self, n: int) -> tuple[float, int]:
        """Run ``hot n``; returns (wall seconds, guest rdtsc delta or BAD_RESULT)."""
        start = time.perf_counter()
        if self.poll <= 0:
            result = self.driver.hot(n)
        else:
            # QtestDriver.mailbox, with a poll interval of our own.
            target = self.session.target
            box = self.driver.mailbox_addr
            before = self.driver.post(MBOX_HOT, n)
            self.session.engine.run(
                until=lambda: self._done_running() != before, timeout=self.timeout, poll=self.poll
            )
            if target.read_u64(box + 16) == before:
                raise RuntimeError(f"hot {n} did not finish in {self.timeout} s")
            result = target.read_u64(box + 24)
        return time.perf_counter() - start, result


def _stats(session: Session) -> dict[str, int]:
    return dict(dataclasses.asdict(session.engine.stats))


def _measure(runner: HotRunner, case: Case, repeat: int, count: Callable[[], int] | None) -> None:
    """Warm up, then alternate hot(0) and hot(case.hits) ``repeat`` times."""
    session = runner.session
    runner.hot(min(case.hits, 50))  # translation cache, slot pages
    runner.hot(0)
    hits_before = count() if count is not None else 0
    stats_before = _stats(session)
    for _ in range(repeat):
        wall0, _ = runner.hot(0)
        case.fixed.append(wall0)
        wall, result = runner.hot(case.hits)
        case.walls.append(wall)
        if result == BAD_RESULT:
            case.problems.append(f"hot {case.hits} reported a wrong t_hot result")
        else:
            case.cycles.append(result)
    stats_after = _stats(session)
    case.stops = {k: stats_after[k] - stats_before[k] for k in stats_after}
    if count is not None:
        case.hits_seen = count() - hits_before
        expected = case.hits * repeat
        if case.hits_seen != expected:
            case.problems.append(f"the probe counted {case.hits_seen} hits, expected {expected}")


def bench_qprobes(args: argparse.Namespace) -> list[Case]:
    log("qprobes: booting qtest")
    session = Session.qtest(smp=1)
    try:
        runner = HotRunner(session, args.poll, args.timeout)
        cases = []

        case = Case("noprobe", "no probe", "mailbox", args.baseline_calls, probed=False)
        log(f"qprobes: {case.label}, {args.repeat} x {case.hits} calls")
        _measure(runner, case, args.repeat, None)
        cases.append(case)

        def noop_kprobe(kp: Any, ctx: Any) -> None:
            return None

        def noop_kret(rp: Any, ctx: Any) -> None:
            return None

        probes: list[tuple[str, str, Callable[[], Any]]] = [
            ("boosted", "qprobes kprobe, boosted", lambda: session.kprobe(PROBED, noop_kprobe)),
            (
                "singlestep",
                "qprobes kprobe, single-step",
                lambda: session.kprobe(PROBED, noop_kprobe, boost=False),
            ),
            ("kretprobe", "qprobes kretprobe", lambda: session.kretprobe(PROBED, noop_kret)),
        ]
        for key, label, register in probes:
            probe = register()
            case = Case(key, label, "mailbox", args.hits)
            log(f"qprobes: {label}, {args.repeat} x {case.hits} hits")
            try:
                _measure(runner, case, args.repeat, lambda: int(probe.nhit))  # noqa: B023
                if key == "kretprobe" and probe.nmissed:
                    case.problems.append(f"kretprobe nmissed={probe.nmissed}")
            finally:
                session.unregister(probe)
            cases.append(case)
        return cases
    finally:
        session.close()


# --- gdb ------------------------------------------------------------------------------


class Gdb:
    """A gdb/MI process (pygdbmi) with a reader for the records it prints while the target runs."""

    def __init__(self, binary: str) -> None:
        from pygdbmi.gdbcontroller import GdbController

        self.mi = self.mi_version(binary)
        self.ctl = GdbController(command=[binary, "--nx", "--quiet", f"--interpreter={self.mi}"])
        self._token = 100
        self._pending: list[dict[str, Any]] = []
        self._stop_drain = threading.Event()
        self._drain_thread: threading.Thread | None = None

    @staticmethod
    def mi_version(binary: str) -> str:
        """mi4 when gdb has it (13 and later), else mi3.

        In MI 3 a breakpoint's ``script`` field is ``{"silent","continue"}``,
        which is not valid MI: pygdbmi 0.11 loops forever parsing it inside
        ``-break-info``'s table (and misparses it in ``=breakpoint-modified``).
        MI 4 prints it as a list.
        """
        probe = subprocess.run(
            [binary, "--nx", "--batch", "--interpreter=mi4"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return "mi4" if probe.returncode == 0 and "unrecognized" not in probe.stderr else "mi3"

    def _read(self, timeout: float) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.ctl.get_gdb_response(
            timeout_sec=timeout, raise_error_on_timeout=False
        )
        return records

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> list[dict[str, Any]]:
        """Read records until one matches; returns all records read."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while True:
            records, self._pending = self._pending, []
            if not records:
                records = self._read(0.05)
            for i, rec in enumerate(records):
                if match(rec):
                    seen += records[: i + 1]
                    self._pending = records[i + 1 :]
                    return seen
            seen += records
            if time.monotonic() > deadline:
                raise RuntimeError(f"gdb: no {what} within {timeout} s; got {seen[-5:]}")

    def command_records(self, cmd: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Send an MI command; returns the records up to its result (an error raises)."""
        assert self._drain_thread is None, "stop draining before sending commands"
        self._token += 1
        token = self._token
        self.ctl.write(f"{token}{cmd}", read_response=False)
        records = self.wait_for(
            lambda r: r.get("type") == "result" and r.get("token") == token, timeout, cmd
        )
        if records[-1].get("message") == "error":
            raise RuntimeError(f"gdb: {cmd}: {records[-1].get('payload')}")
        return records

    def command(self, cmd: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send an MI command and return its result record (an error raises)."""
        return self.command_records(cmd, timeout)[-1]

    def wait_stopped(self, timeout: float = 10.0) -> None:
        self.wait_for(
            lambda r: r.get("type") == "notify" and r.get("message") == "stopped",
            timeout,
            "*stopped",
        )

    @contextmanager
    def draining(self) -> Iterator[list[dict[str, Any]]]:
        """Read gdb's output on a thread (so its stdout pipe never fills) while
        the target runs; yields the list the records go to."""
        records = list(self._pending)
        self._pending = []
        self._stop_drain.clear()

        def loop() -> None:
            while not self._stop_drain.is_set():
                records.extend(self._read(0.05))

        self._drain_thread = threading.Thread(target=loop, daemon=True)
        self._drain_thread.start()
        try:
            yield records
        finally:
            self._stop_drain.set()
            self._drain_thread.join()
            self._drain_thread = None

    def close(self) -> None:
        try:
            self.ctl.exit()
        except Exception as exc:  # cleanup must go on
            log(f"gdb: exit: {exc}")


class GdbBench:
    """qtest booted by qprobes, then handed over to a real gdb."""

    def __init__(self, gdb_binary: str, timeout: float) -> None:
        self.timeout = timeout
        config = qtest_config()
        self.t_hot = load_elf_symbols(config.kernel).address(PROBED)
        self.machine = QemuMachine(config)
        self.gdb: Gdb | None = None
        self.machine.launch()
        try:
            self.machine.target.resume()
            self.machine.console.recvuntil(QTEST_PROMPT)
            # One client at a time: stop the guest, drop qprobes' client (no
            # detach, which would resume it), and let gdb connect.
            self.machine.target.stop()
            self.machine.client.close()
            self.gdb = Gdb(gdb_binary)
            self.gdb.command("-gdb-set confirm off")
            self.gdb.command("-gdb-set mi-async on")  # commands while the target runs
            self.gdb.command(f"-target-select remote {self.machine.gdb_socket}")
        except BaseException:
            self.close()
            raise

    def hot(self, n: int) -> tuple[float, int]:
        """Type ``hot n``; returns (wall seconds to the prompt, guest rdtsc delta)."""
        console = self.machine.console
        start = time.perf_counter()
        console.sendline(f"hot {n}".encode())
        out = console.recvuntil(QTEST_PROMPT, timeout=self.timeout)
        wall = time.perf_counter() - start
        found = HOT_DONE.search(out)
        if found is None or b"FAIL" in out:
            return wall, BAD_RESULT
        return wall, int(found.group(2))

    def _measure(self, case: Case, repeat: int) -> None:
        self.hot(min(case.hits, 50))
        self.hot(0)
        for _ in range(repeat):
            wall0, _ = self.hot(0)
            case.fixed.append(wall0)
            wall, result = self.hot(case.hits)
            case.walls.append(wall)
            if result == BAD_RESULT:
                case.problems.append(f"hot {case.hits} printed a failure")
            else:
                case.cycles.append(result)

    def run(self, args: argparse.Namespace) -> tuple[list[Case], GdbTrace]:
        gdb = self.gdb
        assert gdb is not None
        cases = []

        case = Case(
            "gdb_noprobe",
            "gdb attached, no breakpoint",
            "console",
            args.baseline_calls,
            probed=False,
        )
        log(f"gdb: {case.label}, {args.repeat} x {case.hits} calls")
        gdb.command("-exec-continue")
        with gdb.draining():
            self._measure(case, args.repeat)
        gdb.command("-exec-interrupt")
        gdb.wait_stopped()
        cases.append(case)

        case = Case("gdb_break", "gdb break + commands silent/continue", "console", args.gdb_hits)
        log(f"gdb: {case.label}, {args.repeat} x {case.hits} hits")
        bp = gdb.command(f"-break-insert *{self.t_hot:#x}")["payload"]["bkpt"]["number"]
        gdb.command(f'-break-commands {bp} "silent" "continue"')
        gdb.command("-exec-continue")
        with gdb.draining():
            self.hot(min(case.hits, 50))  # warm-up, not counted below
            self.hot(0)
        before = self._times(bp)
        gdb.command("-exec-continue")
        with gdb.draining() as records:
            for _ in range(args.repeat):
                wall0, _ = self.hot(0)
                case.fixed.append(wall0)
                wall, result = self.hot(case.hits)
                case.walls.append(wall)
                if result == BAD_RESULT:
                    case.problems.append(f"hot {case.hits} printed a failure")
                else:
                    case.cycles.append(result)
        case.hits_seen = self._times(bp) - before
        stopped = sum(1 for r in records if r.get("message") == "stopped")
        case.stops = {"mi_stopped": stopped}
        expected = case.hits * args.repeat
        if case.hits_seen != expected:
            case.problems.append(f"gdb counted {case.hits_seen} hits, expected {expected}")

        trace = self._trace(bp, args.trace_hits)
        if trace.hits:
            case.stops["stops"] = trace.stop_replies * case.hits * args.repeat // trace.hits
        cases.append(case)
        return cases, trace

    def _times(self, bp: str) -> int:
        """The breakpoint's hit count; stops the guest (and leaves it stopped).

        Read from ``info breakpoints`` text rather than ``-break-info``, whose
        MI 3 form pygdbmi cannot parse (see :meth:`Gdb.mi_version`).
        """
        gdb = self.gdb
        assert gdb is not None
        gdb.command("-exec-interrupt")
        gdb.wait_stopped()
        records = gdb.command_records(f'-interpreter-exec console "info breakpoints {bp}"')
        text = "".join(str(r.get("payload")) for r in records if r.get("type") == "console")
        found = re.search(r"already hit (\d+) times?", text)
        return int(found.group(1)) if found else 0

    def _trace(self, bp: str, hits: int) -> GdbTrace:
        """An untimed run of ``hot hits`` with the remote protocol logged."""
        gdb = self.gdb
        assert gdb is not None
        trace = GdbTrace(hits=hits)
        if hits <= 0:
            return trace
        gdb.command("-gdb-set debug remote 1")
        gdb.command("-exec-continue")
        with gdb.draining() as records:
            # hot 0 first: the packets of -exec-continue itself are logged by
            # the time its prompt is back; count only what follows.
            # The reader thread lags gdb's output: let it catch up each time.
            self.hot(0)
            time.sleep(0.3)
            mark = len(records)
            self.hot(hits)
            time.sleep(0.3)
            end = len(records)
        gdb.command("-exec-interrupt")
        gdb.wait_stopped()
        gdb.command("-gdb-set debug remote 0")
        kinds: dict[str, int] = {}
        for rec in records[mark:end]:
            text = rec.get("payload")
            if rec.get("type") != "log" or not isinstance(text, str):
                continue
            if "Packet received: T" in text or "Packet received: S" in text:
                trace.stop_replies += 1
            sent = re.search(r"Sending packet: \$([A-Za-z?]+)", text)
            if sent:
                trace.packets_sent += 1
                kind = sent.group(1)
                kind = (
                    "vCont"
                    if kind.startswith("vCont")
                    else kind[:1]
                    if kind[0] in "zZmMgGpP"
                    else kind
                )
                kinds[kind] = kinds.get(kind, 0) + 1
        trace.sent_kinds = kinds
        return trace

    def close(self) -> None:
        if self.gdb is not None:
            try:
                # gdb's kill sends QEMU 'k': QEMU exits, so shutdown() finds it gone.
                if self.gdb._drain_thread is None:
                    self.gdb.ctl.write("-interpreter-exec console kill", read_response=False)
                    time.sleep(0.2)
            except Exception as exc:  # cleanup must go on
                log(f"gdb: kill: {exc}")
            self.gdb.close()
            self.gdb = None
        # qprobes' client is closed: shutdown() falls back to SIGTERM if QEMU still runs.
        self.machine.shutdown(timeout=2.0)


def bench_gdb(args: argparse.Namespace) -> tuple[list[Case], GdbTrace]:
    log("gdb: booting qtest")
    bench = GdbBench(args.gdb, args.timeout)
    try:
        return bench.run(args)
    finally:
        bench.close()


# --- report -----------------------------------------------------------------------------


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.splitlines()[0].strip() if out.stdout else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def host_info(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "qemu": _version(["qemu-system-x86_64", "--version"]),
        "gdb": _version([args.gdb, "--version"]) if not args.skip_gdb else None,
        "cpus": os.cpu_count(),
        "loadavg_before": list(os.getloadavg()),
        "accel": "tcg",
    }


def fmt_time(seconds: float) -> str:
    if seconds < 0:
        return "-" + fmt_time(-seconds)
    if seconds < 1e-6:
        return f"{seconds * 1e9:.1f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_rate(rate: float) -> str:
    if rate == float("inf"):
        return "inf"
    if rate >= 1e6:
        return f"{rate / 1e6:.1f} M/s"
    if rate >= 1e3:
        return f"{rate / 1e3:.2f} k/s"
    return f"{rate:.0f} /s"


def ratios(cases: list[Case]) -> dict[str, dict[str, float | None]]:
    """Per probed case: how many times faster than gdb's breakpoint, and how
    many times the cost of an unprobed call (same path)."""
    by_key = {c.key: c for c in cases}
    gdb = by_key.get("gdb_break")
    out: dict[str, dict[str, float | None]] = {}
    for c in cases:
        if not c.probed:
            continue
        base = by_key.get("gdb_noprobe" if c.path == "console" else "noprobe")
        out[c.key] = {
            "faster_than_gdb_break": (gdb.per_hit / c.per_hit) if gdb and c.per_hit > 0 else None,
            "times_unprobed_call": (c.per_hit / base.per_hit)
            if base and base.per_hit > 0
            else None,
            "added_per_hit_s": (c.per_hit - base.per_hit) if base else None,
        }
    return out


def tsc_hz(cases: list[Case], poll: float) -> tuple[float, str] | None:
    """Guest TSC frequency: guest cycles over net wall time of a no-probe run.

    The guest TSC runs whenever the VM runs, even while the host deschedules
    QEMU, so load on the host does not bias this; only the error of the fixed
    cost does. The console run (gdb's machine) has no poll step, so it comes
    first; the mailbox run is good to the poll interval (2 ms of ~100 ms),
    and useless with ``--poll 0`` (50 ms steps).
    """
    keys = ["gdb_noprobe"] + (["noprobe"] if poll > 0 else [])
    for key in keys:
        for c in cases:
            if c.key == key and c.cycles and len(c.cycles) == len(c.walls) and c.per_hit > 0:
                rates = [
                    cyc / (w - c.fixed_cost)
                    for cyc, w in zip(c.cycles, c.walls, strict=True)
                    if w > c.fixed_cost
                ]
                if rates:
                    return statistics.median(rates), c.label
    return None


def print_report(
    args: argparse.Namespace,
    info: dict[str, Any],
    cases: list[Case],
    trace: GdbTrace | None,
    elapsed: float,
) -> None:
    found = tsc_hz(cases, args.poll)
    hz = found[0] if found else None
    print(
        f"Probe hit cost on qtest's {PROBED} (TCG, smp=1): {args.repeat} runs per case, "
        f"medians; per hit = (wall(N) - wall(0)) / N"
    )
    print(
        f"  {info['qemu']}; {info['gdb'] or 'gdb skipped'}; Python {info['python']}; "
        f"{info['cpus']} CPUs; load average before {info['loadavg_before'][0]:.2f}"
    )
    poll = f"poll {args.poll * 1e3:g} ms" if args.poll > 0 else "QtestDriver.hot (50 ms poll)"
    print(f"  qprobes: mailbox, {poll}; gdb: console")
    print()
    head = (
        f"{'case':<38} {'N/run':>8} {'wall(N)':>10} {'wall(0)':>9} {'per hit':>10} "
        f"{'range':>21} {'hits/s':>10} {'guest cyc/hit':>14} {'stops/hit':>9}"
    )
    print(head)
    print("-" * len(head))
    for c in cases:
        runs = c.per_hit_runs
        spread = f"{fmt_time(min(runs))}..{fmt_time(max(runs))}"
        sph = c.stops_per_hit
        label = c.label if c.probed else f"{c.label} (per call)"
        print(
            f"{label:<38} {c.hits:>8} {fmt_time(statistics.median(c.walls)):>10} "
            f"{fmt_time(c.fixed_cost):>9} {fmt_time(c.per_hit):>10} {spread:>21} "
            f"{fmt_rate(c.hits_per_second):>10} {c.cycles_per_hit:>14,.0f} "
            f"{'-' if sph is None else f'{sph:.2f}':>9}"
        )
    print()
    if found is not None and hz:
        print(
            f"Guest TSC ~{hz / 1e9:.2f} GHz (estimated from '{found[1]}'). Guest time per hit: "
            "the part of the hit the guest spent running (its TSC pauses while the VM is stopped):"
        )
        for c in cases:
            if c.probed and c.cycles:
                share = c.cycles_per_hit / hz
                print(
                    f"  {c.label:<38} {fmt_time(share):>10} of {fmt_time(c.per_hit):>9} "
                    f"({100 * share / c.per_hit:.0f}%)"
                )
        print()
    print("Ratios (per hit, fixed cost removed):")
    for key, r in ratios(cases).items():
        c = next(x for x in cases if x.key == key)
        parts = []
        fast = r["faster_than_gdb_break"]
        if fast is not None and key != "gdb_break":
            parts.append(
                f"{fast:.1f}x faster than gdb break+commands"
                if fast >= 1
                else f"{1 / fast:.1f}x slower than gdb break+commands"
            )
        times = r["times_unprobed_call"]
        added = r["added_per_hit_s"]
        if times is not None and added is not None:
            parts.append(f"{times:,.0f}x an unprobed call (+{fmt_time(added)} per hit)")
        print(f"  {c.label + ':':<39} " + "; ".join(parts))
    print()
    print("Stops (qprobes: engine.stats summed over the timed runs; gdb: MI records, remote log):")
    for c in cases:
        if c.path == "mailbox" and c.probed:
            kinds = " ".join(f"{k}={v}" for k, v in c.stops.items())
            seen = f"; probe nhit {c.hits_seen}" if c.hits_seen is not None else ""
            print(f"  {c.label + ':':<39} {kinds}{seen}")
    if trace is not None:
        gdb_case = next((c for c in cases if c.key == "gdb_break"), None)
        if gdb_case is not None:
            print(
                f"  {'gdb break + commands:':<39} MI *stopped={gdb_case.stops.get('mi_stopped')}"
                f"; breakpoint hits {gdb_case.hits_seen}"
            )
        if trace.hits:
            kinds = ", ".join(
                f"{k} {v / trace.hits:g}" for k, v in sorted(trace.sent_kinds.items())
            )
            print(
                f"  gdb remote log over {trace.hits} hits: {trace.stop_replies / trace.hits:g} "
                f"stop replies and {trace.packets_sent / trace.hits:g} packets sent per hit "
                f"({kinds})"
            )
    problems = [(c.label, p) for c in cases for p in c.problems]
    if problems:
        print()
        print("Problems:")
        for label, p in problems:
            print(f"  {label}: {p}")
    print()
    print(f"Total time {elapsed:.1f} s.")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="See the module docstring for the method.",
    )
    parser.add_argument(
        "-n", "--hits", type=int, default=2000, help="probe hits per run for qprobes (default 2000)"
    )
    parser.add_argument(
        "--gdb-hits", type=int, default=200, help="breakpoint hits per run for gdb (default 200)"
    )
    parser.add_argument(
        "--baseline-calls",
        type=int,
        default=5_000_000,
        help="calls per run for the no-probe rows (default 5000000)",
    )
    parser.add_argument(
        "-r", "--repeat", type=int, default=5, help="timed runs per case (default 5)"
    )
    parser.add_argument(
        "--poll",
        type=float,
        default=0.002,
        help="mailbox poll interval in s while the guest runs; "
        "0 uses QtestDriver.hot (default 0.002)",
    )
    parser.add_argument(
        "--trace-hits",
        type=int,
        default=3,
        help="hits of the untimed gdb run with remote logging (0: skip)",
    )
    parser.add_argument(
        "--gdb",
        default=shutil.which("gdb") or "/usr/bin/gdb",
        help="the gdb binary (default: gdb on PATH)",
    )
    parser.add_argument("--skip-gdb", action="store_true", help="no gdb baseline")
    parser.add_argument("--skip-qprobes", action="store_true", help="only the gdb baseline")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds one hot command may take"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of the table (progress still goes to stderr)",
    )
    args = parser.parse_args()
    for name in ("hits", "gdb_hits", "baseline_calls", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.skip_gdb and not Path(args.gdb).exists():
        parser.error(f"{args.gdb} not found (or use --skip-gdb)")

    info = host_info(args)
    start = time.monotonic()
    cases: list[Case] = []
    trace: GdbTrace | None = None
    if not args.skip_qprobes:
        cases += bench_qprobes(args)
    if not args.skip_gdb:
        gdb_cases, trace = bench_gdb(args)
        cases += gdb_cases
    elapsed = time.monotonic() - start

    if args.json:
        doc = {
            "workload": f"qtest 'hot N': N direct calls of {PROBED}, TCG, smp=1",
            "method": "per_hit_s = (median wall(N) - median wall(0)) / N",
            "args": vars(args),
            "host": info,
            "tsc_hz_estimate": (tsc_hz(cases, args.poll) or (None,))[0],
            "cases": [c.as_dict() for c in cases],
            "ratios": ratios(cases),
            "gdb_trace": dataclasses.asdict(trace) if trace is not None else None,
            "elapsed_s": elapsed,
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_report(args, info, cases, trace, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
