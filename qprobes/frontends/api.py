"""The Python API behind the command line."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from qprobes.errors import MachineError
from qprobes.machine.guests import QTEST_EXIT_PASS, qtest_config
from qprobes.machine.qemu import QemuMachine, attach

if TYPE_CHECKING:
    from qprobes.frontends.session import Session
    from qprobes.frontends.signals import SignalGuard
    from qprobes.symbols.elf import SymbolTable
    from qprobes.symbols.kallsyms import KallsymsTable


def qtest_selfcheck(
    loops: int = 1,
    smp: int = 1,
    accel: str = "tcg",
    cpu: str | None = None,
    out: TextIO = sys.stdout,
    timeout: float = 120.0,
) -> int:
    """Boot qtest, connect to its gdbstub, run its self-check and relay the console.

    Returns 0 when the self-check passed, 1 otherwise.
    """
    config = qtest_config(
        append=f"qtest.auto=selfcheck qtest.loops={loops}", smp=smp, accel=accel, cpu=cpu
    )
    started = time.monotonic()
    with QemuMachine(config) as machine:
        client = machine.client
        target = machine.target
        print(
            f"qprobes: QEMU pid {machine.pid}, gdbstub {machine.gdb_socket}: "
            f"{len(target.vcpus)} vCPU(s), PacketSize={client.packet_size:#x}, "
            f"{len(client.layout.registers)} registers from target.xml",
            file=out,
        )
        console = machine.console
        target.resume()
        deadline = started + timeout
        while True:
            try:
                data = console.tube.recv(4096, timeout=0.2)
            except EOFError:
                break  # QEMU exited and closed the console
            if data:
                out.write(data.decode(errors="replace").replace("\r\n", "\n"))
                out.flush()
            elif not machine.alive():
                break
            if time.monotonic() > deadline:
                raise MachineError(f"qtest did not finish within {timeout} s")
        status = machine.wait(5.0)
    elapsed = time.monotonic() - started
    ok = status == QTEST_EXIT_PASS
    verdict = "passed" if ok else f"FAILED (QEMU exit status {status})"
    print(f"qprobes: qtest self-check {verdict} in {elapsed:.2f} s", file=out)
    return 0 if ok else 1


def boot_interactive(
    kernel: str | None = None,
    initrd: str | None = None,
    append: str = "",
    smp: int = 1,
    memory_mib: int = 512,
    accel: str = "tcg",
    cpu: str | None = None,
    qtest: bool = False,
    kaslr: bool = False,
) -> int:
    """Boot a guest (the built-in Linux guest by default) and hand its serial
    console to the terminal until it exits. The gdbstub socket is printed so
    that ``qprobes attach`` or gdb can connect meanwhile."""
    check_machine_args(kernel=kernel, initrd=initrd, smp=smp, memory_mib=memory_mib,
                       accel=accel)  # fmt: skip
    if qtest:
        config = qtest_config(append=append, smp=smp, accel=accel, cpu=cpu)
    else:
        from qprobes.machine.linux import linux_config

        # --kernel alone boots with the built-in busybox initramfs.
        config = linux_config(append=append, kaslr=kaslr, smp=smp, accel=accel, cpu=cpu,
                              memory_mib=memory_mib)  # fmt: skip
        if kernel is not None:
            config.kernel = Path(kernel)
        if initrd is not None:
            config.initrd = Path(initrd)
    import re

    seen = bytearray()

    def keep_tail(data: bytes) -> None:
        seen.extend(data)
        del seen[:-4096]

    with QemuMachine(config) as machine:
        start, size = config.reserved
        print(
            f"qprobes: gdbstub at {machine.gdb_socket} (pid {machine.pid}); "
            f"memory kept for qprobes: --reserve {start:#x}:{size:#x}\r\n"
            "qprobes: the guest's console follows; Ctrl-A x quits",
            file=sys.stderr,
        )
        machine.target.resume()
        machine.release_gdbstub()
        how = machine.console.interact(sys.stdin.fileno(), sys.stdout.fileno(), keep_tail)
    if how == "quit":
        print("\r\nqprobes: quit (Ctrl-A x); the guest is shut down", file=sys.stderr)
        return 0
    # The built-in guest's init names the shell's exit status before powering off.
    found = re.findall(rb"shell exited with status (\d+)", bytes(seen))
    return int(found[-1]) if found else 0


def recover(address: str, reserve: tuple[int, int], out: TextIO = sys.stdout,
            force: bool = False) -> int:  # fmt: skip
    """``qprobes attach ADDRESS --recover``: put back what a qprobes session
    that died attached left in the guest (0 also when there was nothing).
    ``force``: even if the journal's owner may still run."""
    from qprobes.frontends.session import Session

    report = Session.recover(address, reserve=reserve, force=force)
    print(f"qprobes: {report.describe()}", file=out)
    return 0


def attach_info(address: str, out: TextIO = sys.stdout) -> int:
    """Connect to a running QEMU's gdbstub, describe the guest, and detach."""
    target = attach(address)
    client = target.client
    try:
        with target.stopped():
            vcpus = target.vcpus
            print(f"qprobes: attached to {address}: {len(vcpus)} vCPU(s)", file=out)
            for vcpu in vcpus:
                regs = target.registers(vcpu)
                idt = target.idt(vcpu)
                print(
                    f"  vCPU {vcpu}: rip={regs.rip:#018x} rsp={regs.rsp:#018x} "
                    f"cr3={regs.cr3:#x} IDT={idt.base:#x}/{idt.limit:#x}",
                    file=out,
                )
    finally:
        client.detach()
        client.close()
    return 0


def qtest_probe_all(
    rounds: int = 1,
    smp: int = 1,
    accel: str = "tcg",
    cpu: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Boot qtest, probe every instruction of every target, and run its self-check.

    Probes alternate between boosted and single-stepped. Returns 0 when the
    self-check passes and every probe fired as often as its target ran.
    """
    from qprobes.arch.x86_64 import insn as x86insn
    from qprobes.errors import InstructionError
    from qprobes.frontends.qtest import QtestDriver
    from qprobes.frontends.session import Session
    from qprobes.probes.kprobe import Kprobe

    started = time.monotonic()
    with Session.qtest(smp=smp, accel=accel, cpu=cpu, attach=False) as session:
        q = QtestDriver(session)
        engine = session.engine
        pristine = guest_digest(session)
        engine.attach()
        print(
            f"qprobes: qtest booted under {accel.upper()} with {len(session.target.vcpus)} "
            f"vCPU(s); qprobes area at {engine.area.vbase:#x}, IDT vectors 1/3/13/14 redirected",
            file=out,
        )
        per_target: dict[str, list[Kprobe]] = {}
        refused = 0
        for t in q.targets:
            code = session.target.read(t.addr, t.size)
            for insn in x86insn.decode_function(code, t.addr):
                try:
                    kp = session.kprobe(insn.addr, lambda kp, ctx: None,
                                        boost=len(engine.points) % 2 == 0)  # fmt: skip
                except InstructionError:
                    refused += 1  # ud2 guards that never run; far indirect call/jmp
                    continue
                per_target.setdefault(t.name, []).append(kp)
        points = list(engine.points.values())
        boosted = sum(p.boosted for p in points)
        print(
            f"qprobes: {len(points)} probes armed on {len(per_target)} targets "
            f"({boosted} boosted, {len(points) - boosted} single-stepped, {refused} refused)",
            file=out,
        )
        before = q.calls()
        text = session.command(f"selfcheck {rounds}", timeout=300)
        out.write(text)
        after = q.calls()
        print(f"{'target':<18} {'probes':>6} {'calls':>6} {'hits':>7}", file=out)
        for t in q.targets:
            probes = per_target.get(t.name, [])
            hits = sum(kp.nhit for kp in probes)
            print(f"{t.name:<18} {len(probes):>6} {after[t.index] - before[t.index]:>6} "
                  f"{hits:>7}", file=out)  # fmt: skip
        stats = engine.stats
        hits = sum(p.nhit for p in points)
        passed = ", 0 failed" in text and "FAIL" not in text
        engine.detach()
        identical = guest_digest(session) == pristine
        # The guest runs on, unprobed.
        runs_on = ", 0 failed" in session.command("selfcheck", timeout=120)
        restored = identical and runs_on
    elapsed = time.monotonic() - started
    verdict = "passed" if passed else "FAILED"
    print(
        f"qprobes: self-check {verdict} with {len(points)} probes armed: {hits} hits, "
        f"{stats.stops} stops ({stats.bp} int3, {stats.db} single-step), {elapsed:.2f} s",
        file=out,
    )
    print(
        "qprobes: detached: kernel text, IDT and page tables "
        + ("identical to before attaching" if identical else "DIFFER from before attaching")
        + ("; the guest's self-check passes again" if runs_on else "; the guest FAILS now"),
        file=out,
    )
    return 0 if passed and restored else 1


def guest_digest(session: Session) -> str:
    """A hash of what qprobes writes to: kernel text, every IDT, and the page-table
    pages on the way to qprobes' area (the guest must be stopped)."""
    import hashlib

    from qprobes.errors import TranslationError
    from qprobes.probes.area import MODULES_END, image_candidates
    from qprobes.target.paging import walk

    target = session.target
    digest = hashlib.sha256()
    symbols = session.symbols
    if symbols is not None:
        funcs = [s for s in symbols if s.kind == "func" and s.size and s.addr >> 63]
        lo, hi = min(s.addr for s in funcs), max(s.end for s in funcs)
        digest.update(target.read(lo, hi - lo))
    for vcpu in target.vcpus:
        idt = target.idt(vcpu)
        digest.update(target.read(idt.base, idt.limit + 1))
    regs = target.registers()
    where = [MODULES_END - 1]
    if session.engine.area.image is not None:
        where += image_candidates(*session.engine.area.image)[:1]
    tables = {regs.cr3 & ~0xFFF}
    for vaddr in where:
        with contextlib.suppress(TranslationError):  # nothing mapped there: no tables
            tables |= {step.table for step in walk(target.read_phys_u64, regs.cr3, vaddr).steps}
    for table in sorted(tables):
        digest.update(target.read_phys(table, 4096))
    return digest.hexdigest()


def check_machine_args(
    *,
    kernel: str | None = None,
    initrd: str | None = None,
    smp: int = 1,
    memory_mib: int | None = None,
    accel: str = "tcg",
    symbols_file: str | None = None,
    attach_address: str | None = None,
    reserve: str | None = None,
    guest_memory: str | None = None,
    **_: Any,
) -> None:
    """Check what can be checked before anything boots: one clear error each."""
    for what, path in (("--kernel", kernel), ("--initrd", initrd), ("--symbols", symbols_file),
                       ("--guest-memory", guest_memory)):  # fmt: skip
        if path is not None and not Path(path).is_file():
            raise MachineError(f"{what} {path}: no such file")
    if guest_memory is not None and attach_address is None:
        raise MachineError("--guest-memory goes with --attach: a guest qprobes boots "
                           "shares its memory by itself")
    if smp < 1:
        raise MachineError(f"--smp {smp}: a guest needs at least one vCPU")
    if memory_mib is not None and memory_mib < 64:
        raise MachineError(f"--memory {memory_mib}: give at least 64 MiB")
    if attach_address is None and accel == "kvm":
        _check_kvm()
    if attach_address is not None:
        if reserve is None:
            raise MachineError(
                "--attach needs --reserve START:SIZE: guest-physical memory the guest does "
                "not use (boot it with memmap=SIZE$START)"
            )
        _parse_reserve(reserve)
    elif reserve is not None:
        raise MachineError("--reserve is for --attach (qprobes reserves memory itself otherwise)")


def _parse_reserve(reserve: str) -> tuple[int, int]:
    start, sep, size = reserve.partition(":")
    try:
        if not sep:
            raise ValueError(reserve)
        return int(start, 0), int(size, 0)
    except ValueError:
        raise MachineError(f"--reserve {reserve}: want START:SIZE, e.g. 0x1f800000:0x400000") \
            from None


def _check_kvm() -> None:
    """KVM needs a /dev/kvm this process can open."""
    import os

    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise MachineError(f"--accel kvm: cannot open /dev/kvm ({exc.strerror}); use --accel tcg") \
            from None
    os.close(fd)


def _session_for(
    kernel: str | None,
    initrd: str | None,
    append: str,
    attach_address: str | None,
    reserve: str | None,
    kaslr: bool,
    smp: int,
    accel: str,
    cpu: str | None,
    symbols_file: str | None = None,
    memory_mib: int | None = None,
    watchdog: bool = True,
    guest_memory: str | None = None,
) -> Session:
    """The Linux session a trace or symbols command works on."""
    from qprobes.frontends.session import Session

    check_machine_args(kernel=kernel, initrd=initrd, smp=smp, memory_mib=memory_mib,
                       accel=accel, symbols_file=symbols_file, attach_address=attach_address,
                       reserve=reserve, guest_memory=guest_memory)  # fmt: skip
    if attach_address is not None:
        assert reserve is not None
        return Session.attach(attach_address, reserve=_parse_reserve(reserve),
                              symbols=symbols_file, linux=True, watchdog=watchdog,
                              guest_memory=guest_memory)  # fmt: skip
    # Every machine option applies to the built-in guest and to --kernel
    # alike; --kernel without --initrd boots the built-in busybox userland.
    overrides: dict[str, Any] = {"smp": smp, "accel": accel, "cpu": cpu}
    if memory_mib is not None:
        overrides["memory_mib"] = memory_mib
    return Session.linux(kaslr=kaslr, append=append, kernel=kernel, initrd=initrd,
                         symbols_file=symbols_file, **overrides)  # fmt: skip


def guest_command_line(command: list[str]) -> str:
    """The line typed into the guest shell for ``-- COMMAND...``.

    One argument is a shell command line as it is; several are an argv,
    each quoted for the shell (as after ``perf record --`` or ``timeout``).
    """
    import shlex

    if len(command) == 1:
        return command[0]
    return shlex.join(command)


#: Exit status when --duration ended a guest command (as timeout(1) does).
EXIT_TIMEOUT = 124
#: Exit status after a broken pipe on stdout (128 + SIGPIPE, as a shell shows it).
EXIT_PIPE = 141


def _filters_by_event(filters: list[str] | None, probes: list[str]) -> dict[str, str]:
    """``--filter EVENT:EXPR`` options by event, checked against the probes;
    several for one event are combined with ``&&``."""
    from qprobes.tracing import ProbeSpec, parse_filter, parse_probe

    events: dict[str, str] = {}  # EVENT and GROUP/EVENT -> EVENT
    for text in probes:
        spec = parse_probe(text)
        if isinstance(spec, ProbeSpec):
            events[spec.event] = events[f"{spec.group}/{spec.event}"] = spec.event
    by_event: dict[str, list[str]] = {}
    for item in filters or []:
        event, sep, expr = item.partition(":")
        if not sep or not expr.strip():
            raise MachineError(f"--filter wants EVENT:EXPRESSION, got {item!r}")
        if event not in events:
            known = ", ".join(sorted({e for e in events.values()})) or "none"
            raise MachineError(f"--filter {item!r}: no probe defines event {event!r} "
                               f"(events: {known})")  # fmt: skip
        parse_filter(expr)  # syntax, before booting; fields are checked at arm time
        by_event.setdefault(events[event], []).append(expr.strip())
    return {
        event: exprs[0] if len(exprs) == 1 else " && ".join(f"({e})" for e in exprs)
        for event, exprs in by_event.items()
    }


def _triggers_by_event(triggers: list[str] | None, probes: list[str]) -> dict[str, list[str]]:
    """``--trigger EVENT:TRIGGER`` options by event, checked (syntax, and
    that the event exists) before booting; field names are checked when the
    event's fetch args are compiled, still before its probe is armed."""
    from qprobes.tracing import Comm, FilterField, ProbeSpec, parse_probe
    from qprobes.tracing.hist import parse_hist, parse_stacktrace

    events: dict[str, str] = {}
    fields: dict[str, list[FilterField]] = {}
    for text in probes:
        spec = parse_probe(text)
        if isinstance(spec, ProbeSpec):
            events[spec.event] = events[f"{spec.group}/{spec.event}"] = spec.event
            # Only ":string"/":ustring" (and an untyped $comm) are strings;
            # an untyped argument is a number (kprobe_events' default types).
            fields[spec.event] = [
                FilterField(
                    a.name,
                    is_string=a.type.name in ("string", "ustring")
                    or (a.type.name is None and isinstance(a.fetch, Comm)),
                    is_array=a.type.count > 0,
                )
                for a in spec.args
            ]
    by_event: dict[str, list[str]] = {}
    for item in triggers or []:
        event, sep, trigger = item.partition(":")
        trigger = trigger.strip()
        if not sep or not trigger:
            raise MachineError(f"--trigger wants EVENT:TRIGGER, got {item!r}")
        if event not in events:
            known = ", ".join(sorted(set(events.values()))) or "none"
            raise MachineError(
                f"--trigger {item!r}: no probe defines event {event!r} (events: {known})"
            )
        name = trigger.split(":", 1)[0].split(" ", 1)[0]
        if name == "stacktrace":
            parse_stacktrace(trigger, fields[events[event]])
        elif name == "hist":
            parse_hist(trigger, fields[events[event]], stacktrace=True)
        else:
            raise MachineError(
                f"--trigger {item!r}: qprobes runs hist and stacktrace triggers, not {name!r}"
            )
        by_event.setdefault(events[event], []).append(trigger)
    return by_event


class _Stream:
    """An output that may go away under qprobes: a closed pipe (``| head``)
    or a hung-up terminal (EIO after SIGHUP). The first write that fails
    points the stream's file descriptor at /dev/null, so that nothing later
    (the interpreter's own flush at exit included) fails on it again."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.gone: OSError | None = None

    def write(self, text: str) -> bool:
        if self.gone is not None:
            return False
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError as exc:
            self.gone = exc
            silence(self.stream)
            return False
        return True


def silence(stream: TextIO) -> None:
    """Point ``stream``'s file descriptor at /dev/null (its reader is gone)."""
    import os

    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return  # not a file (a StringIO)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def trace(
    probes: list[str],
    command: list[str],
    *,
    json_output: bool = False,
    filters: list[str] | None = None,
    triggers: list[str] | None = None,
    quiet: bool = False,
    latency: list[str] | None = None,
    output: str | None = None,
    output_format: str | None = None,
    duration: float | None = None,
    fast: bool = False,
    gdb_listen: str | None = None,
    detour: bool = True,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    **machine: Any,
) -> int:
    """``qprobes trace``: arm kprobe_events-style probes, run a guest command,
    print every hit, then a summary.

    ``triggers`` are ``EVENT:hist:...`` triggers, whose histograms print on
    stdout at the end (ftrace's ``hist`` file, or one JSON object each), and
    ``EVENT:stacktrace`` triggers, whose events print the kernel stack;
    ``quiet`` prints no event lines. ``latency`` names functions whose
    entry-to-return times print as a histogram at the end (per call only in
    JSON). ``output`` writes the events to a file instead of stdout, in
    ``output_format`` (``txt``, ``ndjson``, ``chrome``; by default chosen by
    the file's name).

    SIGINT (Ctrl-C), SIGTERM and SIGHUP stop tracing: qprobes detaches, prints
    the summary and returns 130, 143 or 129 (128 + the signal); further
    signals while it detaches are ignored (see
    :mod:`qprobes.frontends.signals`). A guest that dies mid-trace (a panic,
    QEMU killed) is one error line, the tail of its console and the summary
    of what was counted until then; the return is 1.

    Otherwise returns the guest command's exit status (124 when ``duration``
    ended it), 0 after tracing with no command, 141 when stdout was closed
    (``| head``).

    ``gdb_listen`` (``HOST:PORT`` or ``unix:PATH``) serves a GDB remote
    endpoint there while the probes are armed (:meth:`Session.serve_gdb`)."""
    from qprobes.frontends.signals import SignalGuard
    from qprobes.tracing import parse_probe
    from qprobes.tracing.output import format_for

    # Check every definition, filter, trigger and option before booting anything.
    if not probes and not latency:
        raise MachineError("give at least one probe definition or --latency FUNCTION")
    for text in probes:
        parse_probe(text)
    if command and machine.get("attach_address"):
        raise MachineError(
            "with --attach qprobes has no console to type GUEST_COMMAND into: run the "
            "workload in the guest yourself, and stop tracing with Ctrl-C or --duration"
        )
    if duration is not None and duration <= 0:
        raise MachineError(f"--duration {duration:g}: give a positive number of seconds")
    by_event = _filters_by_event(filters, probes)
    triggers_by_event = _triggers_by_event(triggers, probes)
    if output is not None:
        format_for(output, output_format)  # a name we cannot place
    if gdb_listen is not None:
        from qprobes.frontends.gdbserver import parse_listen

        parse_listen(gdb_listen)
    check_machine_args(**machine)

    errs = _Stream(err)

    def say(text: str) -> None:
        errs.write(text + "\n")

    options = _TraceOptions(json_output, by_event, triggers_by_event, quiet, latency or [],
                            output, output_format, duration, fast, gdb_listen,
                            detour)  # fmt: skip
    # Booting a guest of qprobes' own can be interrupted anywhere (QEMU dies
    # with qprobes); attaching to someone else's QEMU is finished first, then
    # detached again.
    with SignalGuard(say, raising=not machine.get("attach_address")) as guard:
        return _trace(probes, command, guard, say, errs, options, out=out, machine=machine)


@dataclass(frozen=True)
class _TraceOptions:
    json_output: bool
    by_event: dict[str, str]
    triggers_by_event: dict[str, list[str]]
    quiet: bool
    latency: list[str]
    output: str | None
    output_format: str | None
    duration: float | None
    fast: bool = False
    gdb_listen: str | None = None
    detour: bool = True


def _session_for_guarded(guard: SignalGuard, machine: dict[str, Any]) -> Session:
    """:func:`_session_for`, where a signal that stopped the boot halfway is
    said as that signal, whatever error the half-done start then raised."""
    from qprobes.errors import QprobesError
    from qprobes.frontends.signals import Interrupted

    try:
        return _session_for(**machine)
    except QprobesError:
        if guard.signum is not None:
            raise Interrupted(guard.signum) from None
        raise


def _trace(probes: list[str], command: list[str], guard: SignalGuard,
           say: Callable[[str], None], errs: _Stream, opts: _TraceOptions, *, out: TextIO,
           machine: dict[str, Any]) -> int:  # fmt: skip
    import json

    from qprobes.errors import GuestDiedError
    from qprobes.tracing import RemoveSpec, TraceEvent, Tracer, parse_probe
    from qprobes.tracing.output import TraceWriter

    stdout = _Stream(out)
    state = {"mute": False}
    writer: TraceWriter | None = None
    latency_events = {f"lat_{''.join(c if c.isalnum() or c == '_' else '_' for c in f)}"
                      for f in opts.latency}  # fmt: skip
    duration = opts.duration

    def sink(event: TraceEvent) -> None:
        if state["mute"]:
            return
        if writer is not None:
            writer.write(event)
            return
        if opts.quiet or (event.event in latency_events and not opts.json_output):
            return
        # A closed pipe (| head) or a hung-up terminal stops the trace, as grep would.
        stdout.write((event.to_json() if opts.json_output else event.format()) + "\n")

    def stopping() -> bool:
        return guard.received() or stdout.gone is not None

    session = _session_for_guarded(guard, machine)
    guard.detaching()  # from here on a signal is noted, and qprobes detaches
    if session.watchdog is not None:
        say(f"qprobes: watchdog pid {session.watchdog.pid} puts the guest back if qprobes "
            f"dies attached (log: {session.watchdog.log_path})")  # fmt: skip
    status = 0
    fault: GuestDiedError | None = None
    tracer: Tracer | None = None
    summary: list[dict[str, Any]] = []
    fast_counts = (0, 0)
    try:
        try:
            tracer = Tracer(session, sink, fast=opts.fast, detour=opts.detour)
            if opts.output is not None:
                writer = TraceWriter(opts.output, opts.output_format, header=tracer.header())
            for function in opts.latency:
                if stopping():
                    break
                tp = tracer.latency(function)
                say(f"qprobes: latency of {tracer.describe(tp)}")
            for text in probes:
                if stopping():
                    break
                spec = parse_probe(text)
                if isinstance(spec, RemoveSpec):
                    name = f"{spec.group or 'kprobes'}/{spec.event}"
                    tracer.remove(name)
                    say(f"qprobes: removed {name}")
                    continue
                tp = tracer.add(text, opts.by_event.get(spec.event),
                                opts.triggers_by_event.get(spec.event, ()))  # fmt: skip
                say(f"qprobes: {tracer.describe(tp)}")
                if opts.fast and tp.slow_reason:
                    say(f"qprobes: {tp.name}: slow path ({tp.slow_reason})")
                elif opts.fast and tp.kprobe is not None:
                    if tp.kprobe.detoured:
                        say(f"qprobes: {tp.name}: fast path, detoured (a jump, no int3)")
                    elif tp.kprobe.detour_refused and opts.detour:
                        say(f"qprobes: {tp.name}: fast path on int3 (no detour: "
                            f"{tp.kprobe.detour_refused})")  # fmt: skip
            printing = any(tp.latency is None for tp in tracer.probes.values())
            if not opts.json_output and not opts.quiet and writer is None and printing:
                stdout.write(tracer.header())  # as the guest's trace file begins
            if opts.gdb_listen is not None and not stopping():
                server = session.serve_gdb(opts.gdb_listen, stopping=stopping)
                say(f"qprobes: gdb endpoint at {server.address} (gdb: target remote "
                    f"{server.address})")  # fmt: skip
            if stopping():
                pass  # a signal while arming: straight to the detach
            elif command:
                line = guest_command_line(command)
                output, finished = session.run_command(line, timeout=duration,
                                                       interrupted=stopping)  # fmt: skip
                if output:
                    errs.write(output if output.endswith("\n") else output + "\n")
                state["mute"] = True
                if finished and not stopping():
                    status = session.last_status()
                elif not stopping():
                    say(f"qprobes: --duration {duration:g} s ended the guest command")
                    status = EXIT_TIMEOUT
            else:
                say("qprobes: tracing; Ctrl-C to stop")
                session.run(until=stopping, timeout=duration)
            summary = tracer.summary()
            fast_counts = (tracer.fast_dropped, tracer.fast_spilled)
        finally:
            state["mute"] = True
            guard.closing()
            try:
                session.close()
            finally:
                if writer is not None:
                    writer.close()
    except GuestDiedError as exc:
        fault = exc
        if tracer is not None:
            summary = tracer.summary(notes=False)  # the guest is gone: counts only
    if fault is not None:
        say(f"qprobes: error: {fault}")
    if stdout.gone is not None and guard.signum is None and fault is None:
        return EXIT_PIPE
    if tracer is not None and not _print_histograms(tracer, opts.json_output, stdout):
        return EXIT_PIPE if guard.signum is None and fault is None else 1
    if writer is not None:
        say(f"qprobes: wrote {writer.count} events to {writer.path} ({writer.format})")
    for row in summary:
        if opts.json_output:
            errs.write(json.dumps({"summary": row}) + "\n")
        else:
            errs.write(
                f"qprobes: {row['event']}: {row['hits']} hits, {row['emitted']} printed, "
                f"{row['filtered']} filtered out, {row['missed']} missed"
                + (", detoured" if row.get("detour") else "")
                + (f", lost ({row.get('lost_why') or 'the guest rewrote the probed text'})"
                   if row["lost"] else "")
                + "\n"
            )
            if row.get("note"):
                errs.write(f"qprobes: {row['event']}: warning: {row['note']}\n")
    if opts.fast and not opts.json_output and (fast_counts[0] or fast_counts[1]):
        errs.write(f"qprobes: fast path: {fast_counts[0]} records dropped (nested hits), "
                   f"{fast_counts[1]} hits taken by the host (a ring was full)\n")  # fmt: skip
    if fault is not None:
        return 1
    if guard.status is not None:
        return guard.status
    return status


def _print_histograms(tracer: Any, json_output: bool, out: _Stream) -> bool:
    """Every latency histogram and hist trigger's table, in the order given;
    False when the output went away."""
    import json

    hists = [h for tp in tracer.probes.values() for h in tp.hists]
    latencies = [tp.latency for tp in tracer.probes.values() if tp.latency is not None]
    ok = True
    for lat in latencies:
        text = json.dumps({"latency": lat.as_json()}) + "\n" if json_output else lat.format()
        ok = ok and out.write(text)
    for n, hist in enumerate(hists):
        if json_output:
            ok = ok and out.write(json.dumps({"hist": hist.as_json()}, default=str) + "\n")
            continue
        ok = ok and out.write(("\n\n" if n else "") + hist.format())
        chart = hist.log2_chart()
        if chart:
            ok = ok and out.write("\n" + chart)
    return ok


def symbols(pattern: str, out: TextIO = sys.stdout, **machine: Any) -> int:
    """``qprobes symbols``: kernel symbols matching a glob, with addresses and sizes.

    A kernel image booted earlier with KASLR off is answered from the
    kallsyms that boot read (the same image has the same symbols at the same
    addresses), with no guest; otherwise a guest boots. SIGINT, SIGTERM and
    SIGHUP end it as they end :func:`trace`: an attached guest is detached
    from first."""
    from qprobes.frontends.signals import SignalGuard

    def say(text: str) -> None:
        _Stream(sys.stderr).write(text + "\n")

    check_machine_args(**machine)
    with SignalGuard(say, raising=not machine.get("attach_address")) as guard:
        status = _symbols(pattern, out, guard, **machine)
        return guard.status if guard.status is not None else status


def _symbols(pattern: str, out: TextIO, guard: SignalGuard, **machine: Any) -> int:
    import fnmatch

    cached = _cached_symbols(**machine)
    session = None
    table: SymbolTable
    rows: list[Any] = []
    if cached is not None:
        table, slide, how = cached, cached.slide, " (from an earlier boot of this kernel)"
    else:
        session = _session_for_guarded(guard, machine)
        guard.detaching()
    try:
        if guard.received():
            return 0
        if session is not None:
            assert session.symbols is not None and session.kernel is not None
            table, slide, how = session.symbols, session.kernel.slide, ""
        rows = sorted(
            (s for s in table if fnmatch.fnmatchcase(s.name, pattern)), key=lambda s: s.addr
        )
        print(f"# KASLR slide {slide:#x}; {len(table)} symbols{how}", file=sys.stderr)
        for s in rows:
            print(f"{s.addr:016x} {s.size:8d} {s.kind:<6} {s.name}", file=out)
        if session is not None and session.modules is not None:
            # Loaded modules' symbols, named as /proc/kallsyms names them.
            for module in session.modules.modules():
                found = sorted(
                    (s for s in session.modules.symbols(module)
                     if fnmatch.fnmatchcase(s.name, pattern)),
                    key=lambda s: s.addr,
                )  # fmt: skip
                for s in found:
                    print(f"{s.addr:016x} {s.size:8d} {s.kind:<6} {s.name} [{module.name}]",
                          file=out)  # fmt: skip
                rows += found
    finally:
        if session is not None:
            guard.closing()
            session.close()
    if not rows:
        print(f"qprobes: no kernel symbol matches {pattern!r}", file=sys.stderr)
        return 1
    return 0


def _cached_symbols(
    *,
    kernel: str | None = None,
    append: str = "",
    attach_address: str | None = None,
    kaslr: bool = False,
    symbols_file: str | None = None,
    **_: Any,
) -> KallsymsTable | None:
    """The kallsyms an earlier boot of the same kernel image read, when this
    boot would have KASLR off too (with KASLR each boot has its own slide)."""
    from qprobes.frontends.session import kaslr_off
    from qprobes.machine.linux import linux_config, sha256_file
    from qprobes.symbols.kallsyms import cached_kallsyms

    if attach_address is not None or symbols_file is not None:
        return None
    config = linux_config(append=append, kaslr=kaslr)  # the command line Session.linux boots
    if not kaslr_off(config.kernel_cmdline()):
        return None
    image = Path(kernel) if kernel is not None else Path(config.kernel)
    try:
        return cached_kallsyms(sha256_file(image))
    except OSError:
        return None
