#!/usr/bin/env python3
"""Cost of one probe hit: qprobes' kprobes against gdb's ``break`` + ``commands``.

Two workloads (``--guest qtest``, the default; ``--guest linux``; ``--guest both``),
each on a freshly booted guest under TCG with ``smp=1``:

qtest: ``hot N`` runs N direct calls of ``t_hot`` (``nopl; lock incq;
lea 1(%rdi),%rax; ret``) in a loop, so every call is one probe hit and
almost nothing else runs. qprobes drives it through qtest's memory
mailbox; gdb's machine types it on the serial console.

Linux (the default Linux guest: Debian's 6.1 cloud kernel, busybox
initramfs): ``qp-open N /etc/hostname`` opens a file N times from the
shell itself (one openat per round, no fork), and the probe sits on
``do_sys_openat2``, as in the table "The cost that decides the design" of
``/work/shared/FIELD-NOTES.md``. Both qprobes (``Session.command``) and
gdb's machine type it on the serial console and time it to the prompt.

Cases, per guest:

qprobes (one Session; the host services the stops while the command runs):

1. no probe;
2. a boosted kprobe (copy + jmp back: one stop per hit);
3. a single-step kprobe (``boost=False``: #BP stop, then #DB stop). On
   Linux it sits at ``do_sys_openat2+5``, after the 5-byte ftrace nop
   the function starts with (checked before probing);
4. a kretprobe (boosted entry probe + trampoline stop);
5. Linux only: the full trace path, a :class:`~qprobes.tracing.tracer.Tracer`
   with ``p:myopen do_sys_openat2 path=+0(%si):string``: per hit it
   fetches the path string, looks up comm and pid of the current task and
   hands a formatted event to a sink that counts it.

gdb (a second machine; qprobes releases the gdbstub with
``QemuMachine.release_gdbstub()`` and ``/usr/bin/gdb`` connects to it,
driven through pygdbmi; the command is typed on the serial console and
timed from the line sent to the prompt):

6. no breakpoint (the guest just runs);
7. ``break *ADDR`` with ``commands / silent / continue / end`` (on Linux,
   ADDR is read from the guest's ``/proc/kallsyms`` before gdb connects).

Method. Every timed command is run ``--repeat`` times, alternating with
the same command for N=0 (same path, same probes armed): that measures
the fixed cost of one command (mailbox packets, resume, the final
interrupt; or the console round trip, and on Linux the shell starting
``qp-open``), which is subtracted:
``per hit = (median wall(N) - median wall(0)) / N``. The spread shown is
the range of per-run values against the same fixed cost. Every case is
warmed up first (the guest's translation cache, the slot pages).

On Linux ``qp-open 0`` itself hits ``do_sys_openat2`` once (the shell
opens the script), in every case alike: hit and stop counts below are
those of the N runs net of the N=0 runs, so they should equal N per run.

The qtest no-probe rows run ``--baseline-calls`` calls, not N: N unprobed
calls take a few microseconds, far below the fixed cost. "x an unprobed
call" compares a probed call with one of those. On Linux the no-probe row
runs ``--linux-opens`` opens and "per hit" of a probed case is the whole
open with its probe hit; "added per hit" is what the probe adds.

gdb on Linux runs ``--linux-gdb-opens`` opens per run (each hit costs
about 20 ms: QEMU flushes its whole translation cache at every breakpoint
stop and the kernel retranslates its working set).

qtest's mailbox is polled every ``--poll`` seconds (2 ms) through
``Session.engine.run``; ``--poll 0`` uses ``QtestDriver.hot`` as it is
(``Session.run``, whose own poll interval is also 2 ms). On Linux
``Session.command`` polls the console every 2 ms.

"guest cycles" (qtest only) is the guest's own rdtsc delta for the loop.
Under TCG the guest TSC follows the host TSC but QEMU pauses it while the
VM is stopped (vm_stop disables its tick counter), so it counts the time
the guest ran (its code, its translation work, qprobes' stubs) and leaves
out the time the host spent handling stops. The TSC frequency is
estimated from a no-probe run (gdb's console run first: it has no poll
step) to show that share in microseconds.

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
from qprobes.machine.linux import LINUX_PROMPT, linux_config
from qprobes.machine.qemu import MachineConfig, QemuMachine
from qprobes.symbols.elf import load_elf_symbols

PROBED = "t_hot"
HOT_DONE = re.compile(rb"hot (\d+) done cycles=(\d+)")

LINUX_PROBED = "do_sys_openat2"
LINUX_FILE = "/etc/hostname"
FTRACE_NOP = bytes.fromhex("0f1f440000")  # nop dword ptr [rax + rax*1 + 0]
TRACE_DEF = f"p:myopen {LINUX_PROBED} path=+0(%si):string"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- results ----------------------------------------------------------------------


@dataclass
class Case:
    """The runs of one benchmark case."""

    key: str
    label: str
    path: str  # "mailbox" (qprobes on qtest), "session" (qprobes on Linux) or "console" (gdb)
    hits: int  # probe hits per run (calls or opens, for the no-probe rows)
    probed: bool = True
    walls: list[float] = field(default_factory=list)  # seconds, command(hits)
    fixed: list[float] = field(default_factory=list)  # seconds, the same for 0
    cycles: list[int] = field(default_factory=list)  # guest rdtsc delta per run (qtest)
    stops: dict[str, int] = field(default_factory=dict)  # N runs net of the N=0 runs
    hits_seen: int | None = None  # counted by the probe (or gdb), N runs net of N=0 runs
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def fixed_cost(self) -> float:
        return statistics.median(self.fixed) if self.fixed else 0.0

    @property
    def per_hit(self) -> float:
        """Seconds per hit (per call or open for the no-probe rows), fixed cost removed."""
        return (statistics.median(self.walls) - self.fixed_cost) / self.hits

    @property
    def per_hit_runs(self) -> list[float]:
        return [(w - self.fixed_cost) / self.hits for w in self.walls]

    @property
    def hits_per_second(self) -> float:
        return 1.0 / self.per_hit if self.per_hit > 0 else float("inf")

    @property
    def cycles_per_hit(self) -> float | None:
        return statistics.median(self.cycles) / self.hits if self.cycles else None

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
            "notes": self.notes,
            "problems": self.problems,
        }


@dataclass
class GdbTrace:
    """What gdb sends and receives per hit (from ``set debug remote 1``)."""

    hits: int = 0
    stop_replies: int = 0
    packets_sent: int = 0
    sent_kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class Run:
    """One timed command."""

    wall: float  # seconds
    cycles: int | None = None  # qtest: the guest's rdtsc delta
    problem: str | None = None  # the command's output was wrong


@dataclass
class GuestResult:
    """Everything measured on one guest."""

    guest: str  # "qtest" or "linux"
    cases: list[Case] = field(default_factory=list)
    trace: GdbTrace | None = None
    elapsed: float = 0.0
    release: str | None = None  # Linux: the kernel release


def _stats(session: Session) -> dict[str, int]:
    return dict(dataclasses.asdict(session.engine.stats))


def _measure(
    run: Callable[[int], Run],
    case: Case,
    repeat: int,
    warmup: int,
    count: Callable[[], int] | None = None,
    stats: Callable[[], dict[str, int]] | None = None,
) -> None:
    """Warm up, then alternate run(0) and run(case.hits) ``repeat`` times.

    ``count`` (probe hits so far) and ``stats`` (stops so far) are read
    around every run; what the N=0 runs took is subtracted from what the
    N runs took.
    """
    run(warmup)  # translation cache, slot pages
    run(0)
    seen = 0
    net: dict[str, int] = {}

    def snapshot() -> tuple[int, dict[str, int]]:
        return (count() if count is not None else 0, stats() if stats is not None else {})

    for _ in range(repeat):
        for n in (0, case.hits):
            hits0, stats0 = snapshot()
            result = run(n)
            hits1, stats1 = snapshot()
            sign = 1 if n else -1
            seen += sign * (hits1 - hits0)
            for k in stats1:
                net[k] = net.get(k, 0) + sign * (stats1[k] - stats0[k])
            (case.walls if n else case.fixed).append(result.wall)
            if result.problem:
                case.problems.append(result.problem)
            elif n and result.cycles is not None:
                case.cycles.append(result.cycles)
    case.stops = net
    if count is not None:
        case.hits_seen = seen
        expected = case.hits * repeat
        if seen != expected:
            case.problems.append(f"the probe counted {seen} hits (net), expected {expected}")


def _noop_kprobe(kp: Any, ctx: Any) -> None:
    return None


def _noop_kret(rp: Any, ctx: Any) -> None:
    return None


# --- qprobes on qtest ------------------------------------------------------------------


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

    def hot(self, n: int) -> Run:
        """Run ``hot n``; the result carries the guest's rdtsc delta."""
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
        wall = time.perf_counter() - start
        if result == (1 << 64) - 1:  # qtest's result when t_hot returned a wrong value
            return Run(wall, problem=f"hot {n} reported a wrong t_hot result")
        return Run(wall, cycles=result)


def bench_qtest_qprobes(args: argparse.Namespace) -> list[Case]:
    log("qtest/qprobes: booting qtest")
    session = Session.qtest(smp=1)
    try:
        runner = HotRunner(session, args.poll, args.timeout)
        cases = []

        def stats() -> dict[str, int]:
            return _stats(session)

        case = Case("noprobe", "no probe", "mailbox", args.baseline_calls, probed=False)
        log(f"qtest/qprobes: {case.label}, {args.repeat} x {case.hits} calls")
        _measure(runner.hot, case, args.repeat, min(case.hits, 50), stats=stats)
        cases.append(case)

        probes: list[tuple[str, str, Callable[[], Any]]] = [
            ("boosted", "qprobes kprobe, boosted", lambda: session.kprobe(PROBED, _noop_kprobe)),
            (
                "singlestep",
                "qprobes kprobe, single-step",
                lambda: session.kprobe(PROBED, _noop_kprobe, boost=False),
            ),
            ("kretprobe", "qprobes kretprobe", lambda: session.kretprobe(PROBED, _noop_kret)),
        ]
        for key, label, register in probes:
            probe = register()
            case = Case(key, label, "mailbox", args.hits)
            log(f"qtest/qprobes: {label}, {args.repeat} x {case.hits} hits")
            try:
                _measure(
                    runner.hot,
                    case,
                    args.repeat,
                    min(case.hits, 50),
                    count=lambda: int(probe.nhit),  # noqa: B023
                    stats=stats,
                )
                if key == "kretprobe" and probe.nmissed:
                    case.problems.append(f"kretprobe nmissed={probe.nmissed}")
            finally:
                session.unregister(probe)
            cases.append(case)
        return cases
    finally:
        session.close()


# --- qprobes on Linux -----------------------------------------------------------------


class OpenRunner:
    """``qp-open N FILE`` on the console of a Linux :class:`Session`, timed."""

    def __init__(self, session: Session, timeout: float) -> None:
        self.session = session
        self.timeout = timeout

    def run(self, n: int) -> Run:
        line = f"qp-open {n} {LINUX_FILE}"
        start = time.perf_counter()
        out = self.session.command(line, timeout=self.timeout)
        wall = time.perf_counter() - start
        want = f"qp-open: {n} opens of {LINUX_FILE}"
        if out.strip() != want:
            return Run(wall, problem=f"{line!r} printed {out.strip()[-200:]!r}")
        return Run(wall)


def singlestep_offset(session: Session, addr: int) -> tuple[int, str | None]:
    """Where to put the single-step probe: after the ftrace nop if the function starts with it."""
    head = session.engine.read_data(addr, len(FTRACE_NOP))
    if head == FTRACE_NOP:
        return len(FTRACE_NOP), None
    return 0, f"{LINUX_PROBED} starts with {head.hex()}, not the ftrace nop: probed at +0"


def bench_linux_qprobes(args: argparse.Namespace) -> tuple[list[Case], str | None]:
    from qprobes.tracing import TraceEvent, Tracer

    log("linux/qprobes: booting Linux")
    session = Session.linux()
    try:
        runner = OpenRunner(session, args.timeout)
        n = args.linux_opens
        warm = min(n, 100)
        release = session.command("uname -r").strip() or None
        cases = []

        def stats() -> dict[str, int]:
            return _stats(session)

        case = Case("noprobe", "no probe", "session", n, probed=False)
        log(f"linux/qprobes: {case.label}, {args.repeat} x {n} opens")
        _measure(runner.run, case, args.repeat, warm, stats=stats)
        cases.append(case)

        addr = session.symbols.address(LINUX_PROBED) if session.symbols is not None else 0
        step_off, step_note = singlestep_offset(session, addr)
        step_at = f"{LINUX_PROBED}+{step_off}" if step_off else LINUX_PROBED

        probes: list[tuple[str, str, Callable[[], Any]]] = [
            (
                "boosted",
                "qprobes kprobe, boosted",
                lambda: session.kprobe(LINUX_PROBED, _noop_kprobe),
            ),
            (
                "singlestep",
                f"qprobes kprobe, single-step (+{step_off})",
                lambda: session.kprobe(step_at, _noop_kprobe, boost=False),
            ),
            (
                "kretprobe",
                "qprobes kretprobe",
                lambda: session.kretprobe(LINUX_PROBED, _noop_kret),
            ),
        ]
        for key, label, register in probes:
            probe = register()
            case = Case(key, label, "session", n)
            if key == "singlestep" and step_note:
                case.notes.append(step_note)
            log(f"linux/qprobes: {label}, {args.repeat} x {n} hits")
            try:
                _measure(
                    runner.run,
                    case,
                    args.repeat,
                    warm,
                    count=lambda: int(probe.nhit),  # noqa: B023
                    stats=stats,
                )
                if key == "kretprobe" and probe.nmissed:
                    case.problems.append(f"kretprobe nmissed={probe.nmissed}")
            finally:
                session.unregister(probe)
            cases.append(case)

        # The full trace path: a string fetch, comm/pid, a formatted event per hit.
        paths: dict[str, int] = {}
        last: list[TraceEvent] = []

        def sink(event: TraceEvent) -> None:
            path = event.fields.get("path")
            key = path if isinstance(path, str) else repr(path)
            paths[key] = paths.get(key, 0) + 1
            if key == LINUX_FILE:
                last[:] = [event]

        tracer = Tracer(session, sink)
        tp = tracer.add(TRACE_DEF)
        case = Case("tracer", "qprobes Tracer, path string + comm/pid", "session", n)
        log(f"linux/qprobes: {case.label}, {args.repeat} x {n} hits")
        try:
            _measure(
                runner.run,
                case,
                args.repeat,
                warm,
                count=lambda: int(tp.nhit),
                stats=stats,
            )
            got = paths.get(LINUX_FILE, 0)
            want = warm + n * args.repeat  # the warm-up run, then the N runs
            if got != want:
                case.problems.append(f"{got} events with path={LINUX_FILE}, expected {want}")
            if tp.emitted != tp.nhit:
                case.problems.append(f"{tp.emitted} events emitted for {tp.nhit} hits")
            case.notes.append(f"definition: {TRACE_DEF}")
            case.notes.append(
                "events by path: " + ", ".join(f"{p} {k}" for p, k in sorted(paths.items()))
            )
            if last:
                case.notes.append(f"last event: {last[0].format().strip()}")
        finally:
            tracer.remove(tp.name)
        cases.append(case)
        return cases, release
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
    """A guest booted by qprobes to its prompt, then handed over to a real gdb.

    Subclasses boot the guest (:meth:`boot`) and know its shell command.
    """

    guest = ""
    prompt = b""
    unit = "calls"

    def __init__(self, gdb_binary: str, timeout: float) -> None:
        self.timeout = timeout
        self.gdb: Gdb | None = None
        self.machine = QemuMachine(self.config())
        self.machine.launch()
        try:
            self.machine.console  # noqa: B018  (connect before the guest prints anything)
            self.machine.target.resume()
            self.machine.console.recvuntil(self.prompt, timeout=120.0)
            self.probe_addr = self.find_probe_addr()
            # One client at a time: qprobes lets go of the stub (the guest
            # keeps running) and gdb connects (QEMU stops the guest for it).
            self.machine.release_gdbstub()
            self.gdb = Gdb(gdb_binary)
            self.gdb.command("-gdb-set confirm off")
            self.gdb.command("-gdb-set mi-async on")  # commands while the target runs
            self.gdb.command(f"-target-select remote {self.machine.gdb_socket}", timeout=30.0)
        except BaseException:
            self.close()
            raise

    def config(self) -> MachineConfig:
        raise NotImplementedError

    def find_probe_addr(self) -> int:
        raise NotImplementedError

    def command_line(self, n: int) -> str:
        raise NotImplementedError

    def check(self, out: bytes, n: int, wall: float) -> Run:
        raise NotImplementedError

    def run(self, n: int) -> Run:
        """Type the workload's command for ``n``; wall seconds to the prompt."""
        console = self.machine.console
        start = time.perf_counter()
        console.sendline(self.command_line(n).encode())
        out = console.recvuntil(self.prompt, timeout=self.timeout)
        return self.check(out, n, time.perf_counter() - start)

    def measure(self, args: argparse.Namespace, noprobe_n: int, break_n: int) -> GuestResult:
        gdb = self.gdb
        assert gdb is not None
        result = GuestResult(self.guest)

        case = Case(
            "gdb_noprobe",
            "gdb attached, no breakpoint",
            "console",
            noprobe_n,
            probed=False,
        )
        log(f"{self.guest}/gdb: {case.label}, {args.repeat} x {case.hits} {self.unit}")
        gdb.command("-exec-continue")
        with gdb.draining():
            _measure(self.run, case, args.repeat, min(case.hits, 50))
        gdb.command("-exec-interrupt")
        gdb.wait_stopped()
        result.cases.append(case)

        case = Case("gdb_break", "gdb break + commands silent/continue", "console", break_n)
        log(f"{self.guest}/gdb: {case.label}, {args.repeat} x {case.hits} hits")
        bp = gdb.command(f"-break-insert *{self.probe_addr:#x}")["payload"]["bkpt"]["number"]
        gdb.command(f'-break-commands {bp} "silent" "continue"')
        gdb.command("-exec-continue")
        with gdb.draining():
            self.run(min(case.hits, 50))  # warm-up, not counted below
        before0 = self._times(bp)
        # Hits of the command for N=0 (on Linux the shell opens the script).
        gdb.command("-exec-continue")
        with gdb.draining():
            self.run(0)
        before = self._times(bp)
        extra = before - before0
        gdb.command("-exec-continue")
        with gdb.draining() as records:
            for _ in range(args.repeat):
                for n in (0, case.hits):
                    run = self.run(n)
                    (case.walls if n else case.fixed).append(run.wall)
                    if run.problem:
                        case.problems.append(run.problem)
                    elif n and run.cycles is not None:
                        case.cycles.append(run.cycles)
        case.hits_seen = self._times(bp) - before - 2 * extra * args.repeat
        stopped = sum(1 for r in records if r.get("message") == "stopped")
        case.stops = {"mi_stopped": stopped - 2 * extra * args.repeat}
        expected = case.hits * args.repeat
        if case.hits_seen > expected and not case.problems:
            # Seen on Linux, about once in 250 hits: QEMU answers gdb's step
            # over the breakpoint (z0, vCont;s) with a stop at the same rip,
            # no instruction executed, and gdb counts that stop as a new hit.
            # The commands' output shows the guest opened the file N times.
            case.notes.append(
                f"gdb counted {case.hits_seen} hits (net) for {expected} {self.unit}: QEMU "
                "sometimes ends gdb's step over the breakpoint before the instruction "
                "ran, and gdb counts the repeated stop as a hit"
            )
        elif case.hits_seen != expected:
            case.problems.append(f"gdb counted {case.hits_seen} hits (net), expected {expected}")
        if extra:
            case.notes.append(f"the command for N=0 hits the breakpoint {extra} time(s)")

        trace = self._trace(bp, args.trace_hits, extra)
        if trace.hits:
            case.stops["stops"] = trace.stop_replies * case.hits * args.repeat // trace.hits
        result.cases.append(case)
        result.trace = trace
        return result

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

    def _trace(self, bp: str, hits: int, extra: int) -> GdbTrace:
        """An untimed run for ``hits`` with the remote protocol logged
        (``extra``: hits of the command itself, for 0)."""
        gdb = self.gdb
        assert gdb is not None
        trace = GdbTrace(hits=hits + extra)
        if hits <= 0:
            trace.hits = 0
            return trace
        gdb.command("-gdb-set debug remote 1")
        gdb.command("-exec-continue")
        with gdb.draining() as records:
            # A command for 0 first: the packets of -exec-continue itself are
            # logged by the time its prompt is back; count only what follows.
            # The reader thread lags gdb's output: let it catch up each time.
            self.run(0)
            time.sleep(0.3)
            mark = len(records)
            self.run(hits)
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
        # qprobes' client is gone: shutdown() falls back to SIGTERM if QEMU still runs.
        self.machine.shutdown(timeout=2.0)


class QtestGdbBench(GdbBench):
    """qtest's ``hot N`` on the console, ``break *t_hot``."""

    guest = "qtest"
    prompt = QTEST_PROMPT
    unit = "calls"

    def config(self) -> MachineConfig:
        return qtest_config()

    def find_probe_addr(self) -> int:
        return load_elf_symbols(self.machine.config.kernel).address(PROBED)

    def command_line(self, n: int) -> str:
        return f"hot {n}"

    def check(self, out: bytes, n: int, wall: float) -> Run:
        found = HOT_DONE.search(out)
        if found is None or b"FAIL" in out:
            return Run(wall, problem=f"hot {n} printed a failure")
        return Run(wall, cycles=int(found.group(2)))


class LinuxGdbBench(GdbBench):
    """Linux's ``qp-open N /etc/hostname`` on the console, ``break *do_sys_openat2``."""

    guest = "linux"
    prompt = LINUX_PROMPT
    unit = "opens"

    def __init__(self, gdb_binary: str, timeout: float) -> None:
        self.release: str | None = None
        super().__init__(gdb_binary, timeout)

    def config(self) -> MachineConfig:
        # Echo off, as Session.linux has it: the console carries only output.
        return linux_config(append="qprobes.echo=0")

    def find_probe_addr(self) -> int:
        """``do_sys_openat2`` from the guest's own ``/proc/kallsyms``."""
        console = self.machine.console
        self.release = console.command("uname -r", self.prompt).strip() or None
        out = console.command(f"grep ' {LINUX_PROBED}$' /proc/kallsyms", self.prompt)
        found = re.search(rf"^([0-9a-f]+) [tT] {LINUX_PROBED}$", out, re.MULTILINE)
        if found is None or int(found.group(1), 16) == 0:
            raise RuntimeError(f"no address for {LINUX_PROBED} in /proc/kallsyms: {out!r}")
        return int(found.group(1), 16)

    def command_line(self, n: int) -> str:
        return f"qp-open {n} {LINUX_FILE}"

    def check(self, out: bytes, n: int, wall: float) -> Run:
        if f"qp-open: {n} opens of {LINUX_FILE}".encode() not in out:
            return Run(wall, problem=f"qp-open {n} printed {out[-200:]!r}")
        return Run(wall)


def bench_gdb(bench_class: type[GdbBench], args: argparse.Namespace,
              noprobe_n: int, break_n: int) -> tuple[GuestResult, int, str | None]:  # fmt: skip
    log(f"{bench_class.guest}/gdb: booting {bench_class.guest}")
    bench = bench_class(args.gdb, args.timeout)
    try:
        result = bench.measure(args, noprobe_n, break_n)
        release = bench.release if isinstance(bench, LinuxGdbBench) else None
        return result, bench.probe_addr, release
    finally:
        bench.close()


def bench_guest(guest: str, args: argparse.Namespace) -> GuestResult:
    """All cases of one guest: qprobes' machine, then gdb's."""
    start = time.monotonic()
    result = GuestResult(guest)
    if guest == "qtest":
        if not args.skip_qprobes:
            result.cases += bench_qtest_qprobes(args)
        if not args.skip_gdb:
            gdb_result, _, _ = bench_gdb(QtestGdbBench, args, args.baseline_calls, args.gdb_hits)
            result.cases += gdb_result.cases
            result.trace = gdb_result.trace
    else:
        if not args.skip_qprobes:
            cases, result.release = bench_linux_qprobes(args)
            result.cases += cases
        if not args.skip_gdb:
            gdb_result, _, release = bench_gdb(
                LinuxGdbBench, args, args.linux_opens, args.linux_gdb_opens
            )
            result.cases += gdb_result.cases
            result.trace = gdb_result.trace
            result.release = result.release or release
    result.elapsed = time.monotonic() - start
    return result


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
    many times the cost of an unprobed call or open (same path)."""
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
    """Guest TSC frequency: guest cycles over net wall time of a no-probe run (qtest).

    The guest TSC runs whenever the VM runs, even while the host deschedules
    QEMU, so load on the host does not bias this; only the error of the fixed
    cost does. The console run (gdb's machine) has no poll step, so it comes
    first; the mailbox run is good to the poll interval (2 ms of ~100 ms).
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


def print_guest(args: argparse.Namespace, info: dict[str, Any], result: GuestResult) -> None:
    cases = result.cases
    found = tsc_hz(cases, args.poll) if result.guest == "qtest" else None
    hz = found[0] if found else None
    unit = "call" if result.guest == "qtest" else "open"
    if result.guest == "qtest":
        print(
            f"Probe hit cost on qtest's {PROBED} (TCG, smp=1): {args.repeat} runs per case, "
            f"medians; per hit = (wall(N) - wall(0)) / N"
        )
    else:
        kernel = f"Linux {result.release}" if result.release else "Linux"
        print(
            f"Probe hit cost on {LINUX_PROBED} ({kernel}, TCG, smp=1), workload "
            f"'qp-open N {LINUX_FILE}' (one openat per round): {args.repeat} runs per case, "
            f"medians; per hit = (wall(N) - wall(0)) / N"
        )
    print(
        f"  {info['qemu']}; {info['gdb'] or 'gdb skipped'}; Python {info['python']}; "
        f"{info['cpus']} CPUs; load average before {info['loadavg_before'][0]:.2f}"
    )
    if result.guest == "qtest":
        poll = f"poll {args.poll * 1e3:g} ms" if args.poll > 0 else "QtestDriver.hot"
        print(f"  qprobes: mailbox, {poll}; gdb: console")
    else:
        print(
            "  qprobes: Session.command (console, 2 ms poll); gdb: console; "
            f"'per hit' of a probed case includes the {unit} itself"
        )
    print()
    head = (
        f"{'case':<40} {'N/run':>8} {'wall(N)':>10} {'wall(0)':>9} {'per hit':>10} "
        f"{'range':>21} {'hits/s':>10} {'guest cyc/hit':>14} {'stops/hit':>9}"
    )
    print(head)
    print("-" * len(head))
    for c in cases:
        runs = c.per_hit_runs
        spread = f"{fmt_time(min(runs))}..{fmt_time(max(runs))}"
        sph = c.stops_per_hit
        cyc = c.cycles_per_hit
        label = c.label if c.probed else f"{c.label} (per {unit})"
        print(
            f"{label:<40} {c.hits:>8} {fmt_time(statistics.median(c.walls)):>10} "
            f"{fmt_time(c.fixed_cost):>9} {fmt_time(c.per_hit):>10} {spread:>21} "
            f"{fmt_rate(c.hits_per_second):>10} {'-' if cyc is None else f'{cyc:,.0f}':>14} "
            f"{'-' if sph is None else f'{sph:.2f}':>9}"
        )
    print()
    if found is not None and hz:
        print(
            f"Guest TSC ~{hz / 1e9:.2f} GHz (estimated from '{found[1]}'). Guest time per hit: "
            "the part of the hit the guest spent running (its TSC pauses while the VM is stopped):"
        )
        for c in cases:
            if c.probed and c.cycles_per_hit is not None:
                share = c.cycles_per_hit / hz
                print(
                    f"  {c.label:<40} {fmt_time(share):>10} of {fmt_time(c.per_hit):>9} "
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
            digits = 1 if times < 100 else 0
            parts.append(f"{times:,.{digits}f}x an unprobed {unit} (+{fmt_time(added)} per hit)")
        print(f"  {c.label + ':':<41} " + "; ".join(parts))
    print()
    print("Stops (N runs net of the N=0 runs; qprobes: engine.stats; gdb: MI records, remote log):")
    for c in cases:
        if c.path != "console" and c.probed:
            kinds = " ".join(f"{k}={v}" for k, v in c.stops.items())
            seen = f"; probe nhit {c.hits_seen}" if c.hits_seen is not None else ""
            print(f"  {c.label + ':':<41} {kinds}{seen}")
    trace = result.trace
    gdb_case = next((c for c in cases if c.key == "gdb_break"), None)
    if gdb_case is not None:
        print(
            f"  {'gdb break + commands:':<41} MI *stopped={gdb_case.stops.get('mi_stopped')}"
            f"; breakpoint hits {gdb_case.hits_seen}"
        )
    if trace is not None and trace.hits:
        kinds = ", ".join(f"{k} {v / trace.hits:g}" for k, v in sorted(trace.sent_kinds.items()))
        print(
            f"  gdb remote log over {trace.hits} hits: {trace.stop_replies / trace.hits:g} "
            f"stop replies and {trace.packets_sent / trace.hits:g} packets sent per hit "
            f"({kinds})"
        )
    notes = [(c.label, n) for c in cases for n in c.notes]
    if notes:
        print()
        print("Notes:")
        for label, n in notes:
            print(f"  {label}: {n}")
    problems = [(c.label, p) for c in cases for p in c.problems]
    if problems:
        print()
        print("Problems:")
        for label, p in problems:
            print(f"  {label}: {p}")
    print()


def guest_doc(
    args: argparse.Namespace, info: dict[str, Any], result: GuestResult
) -> dict[str, Any]:
    if result.guest == "qtest":
        workload = f"qtest 'hot N': N direct calls of {PROBED}, TCG, smp=1"
    else:
        workload = (
            f"Linux {result.release or '?'} 'qp-open N {LINUX_FILE}': N opens, "
            f"probes on {LINUX_PROBED}, TCG, smp=1"
        )
    return {
        "workload": workload,
        "method": "per_hit_s = (median wall(N) - median wall(0)) / N",
        "args": vars(args),
        "host": info,
        "tsc_hz_estimate": (tsc_hz(result.cases, args.poll) or (None,))[0]
        if result.guest == "qtest"
        else None,
        "cases": [c.as_dict() for c in result.cases],
        "ratios": ratios(result.cases),
        "gdb_trace": dataclasses.asdict(result.trace) if result.trace is not None else None,
        "elapsed_s": result.elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="See the module docstring for the method.",
    )
    parser.add_argument(
        "--guest",
        choices=("qtest", "linux", "both"),
        default="qtest",
        help="qtest's hot loop (default), Linux's open() on do_sys_openat2, or both",
    )
    parser.add_argument(
        "-n",
        "--hits",
        type=int,
        default=2000,
        help="qtest: probe hits per run for qprobes (default 2000)",
    )
    parser.add_argument(
        "--gdb-hits",
        type=int,
        default=200,
        help="qtest: breakpoint hits per run for gdb (default 200)",
    )
    parser.add_argument(
        "--baseline-calls",
        type=int,
        default=5_000_000,
        help="qtest: calls per run for the no-probe rows (default 5000000)",
    )
    parser.add_argument(
        "--linux-opens",
        type=int,
        default=1000,
        help="Linux: opens per run for qprobes and the no-probe rows (default 1000)",
    )
    parser.add_argument(
        "--linux-gdb-opens",
        type=int,
        default=100,
        help="Linux: opens (breakpoint hits) per run for gdb (default 100)",
    )
    parser.add_argument(
        "-r", "--repeat", type=int, default=5, help="timed runs per case (default 5)"
    )
    parser.add_argument(
        "--poll",
        type=float,
        default=0.002,
        help="qtest: mailbox poll interval in s while the guest runs; "
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
        "--timeout", type=float, default=120.0, help="seconds one timed command may take"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of the table (progress still goes to stderr); with "
        "--guest both, an object with one document per guest",
    )
    args = parser.parse_args()
    for name in ("hits", "gdb_hits", "baseline_calls", "linux_opens", "linux_gdb_opens",
                 "repeat"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.skip_gdb and not Path(args.gdb).exists():
        parser.error(f"{args.gdb} not found (or use --skip-gdb)")
    if args.skip_gdb and args.skip_qprobes:
        parser.error("--skip-gdb and --skip-qprobes leave nothing to measure")

    info = host_info(args)
    start = time.monotonic()
    guests = ["qtest", "linux"] if args.guest == "both" else [args.guest]
    results = [bench_guest(guest, args) for guest in guests]
    elapsed = time.monotonic() - start

    if args.json:
        docs = {r.guest: guest_doc(args, info, r) for r in results}
        doc: dict[str, Any] = (
            docs[results[0].guest] if len(results) == 1 else {**docs, "elapsed_s": elapsed}
        )
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        for result in results:
            print_guest(args, info, result)
        print(f"Total time {elapsed:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
