"""The Python API behind the command line."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from qprobes.errors import MachineError
from qprobes.machine.guests import QTEST_EXIT_PASS, qtest_config
from qprobes.machine.qemu import QemuMachine, attach

if TYPE_CHECKING:
    from qprobes.frontends.session import Session


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
    **_: Any,
) -> None:
    """Check what can be checked before anything boots: one clear error each."""
    for what, path in (("--kernel", kernel), ("--initrd", initrd), ("--symbols", symbols_file)):
        if path is not None and not Path(path).is_file():
            raise MachineError(f"{what} {path}: no such file")
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
) -> Session:
    """The Linux session a trace or symbols command works on."""
    from qprobes.frontends.session import Session

    check_machine_args(kernel=kernel, initrd=initrd, smp=smp, memory_mib=memory_mib,
                       accel=accel, symbols_file=symbols_file, attach_address=attach_address,
                       reserve=reserve)  # fmt: skip
    if attach_address is not None:
        assert reserve is not None
        return Session.attach(attach_address, reserve=_parse_reserve(reserve),
                              symbols=symbols_file, linux=True)  # fmt: skip
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


def trace(
    probes: list[str],
    command: list[str],
    *,
    json_output: bool = False,
    filters: list[str] | None = None,
    duration: float | None = None,
    fast: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    **machine: Any,
) -> int:
    """``qprobes trace``: arm kprobe_events-style probes, run a guest command,
    print every hit, then a summary. Ctrl-C stops tracing and detaches.

    Returns the guest command's exit status (124 when ``duration`` ended
    it), 0 after tracing with no command, 130 after Ctrl-C, 141 when stdout
    was closed (``| head``)."""
    import json
    import signal

    from qprobes.tracing import RemoveSpec, TraceEvent, Tracer, parse_probe

    # Check every definition, filter and machine option before booting anything.
    for text in probes:
        parse_probe(text)
    if command and machine.get("attach_address"):
        raise MachineError(
            "with --attach qprobes has no console to type GUEST_COMMAND into: run the "
            "workload in the guest yourself, and stop tracing with Ctrl-C or --duration"
        )
    if duration is not None and duration <= 0:
        raise MachineError(f"--duration {duration}: give a positive number of seconds")
    by_event = _filters_by_event(filters, probes)
    check_machine_args(**machine)

    state = {"asked": False, "pipe": False, "mute": False}

    def sink(event: TraceEvent) -> None:
        if state["pipe"] or state["mute"]:
            return
        try:
            out.write((event.to_json() if json_output else event.format()) + "\n")
            out.flush()
        except BrokenPipeError:
            state["pipe"] = True  # the reader went away: stop, as grep would

    def on_sigint(signum: int, frame: object) -> None:
        state["asked"] = True

    def stopping() -> bool:
        return state["asked"] or state["pipe"]

    session = _session_for(**machine)
    previous = signal.signal(signal.SIGINT, on_sigint)
    status = 0
    try:
        tracer = Tracer(session, sink, fast=fast)
        for text in probes:
            spec = parse_probe(text)
            if isinstance(spec, RemoveSpec):
                name = f"{spec.group or 'kprobes'}/{spec.event}"
                tracer.remove(name)
                print(f"qprobes: removed {name}", file=err)
                continue
            tp = tracer.add(text, by_event.get(spec.event))
            print(f"qprobes: {tracer.describe(tp)}", file=err)
            if fast and tp.slow_reason:
                print(f"qprobes: {tp.name}: slow path ({tp.slow_reason})", file=err)
        if command:
            line = guest_command_line(command)
            output, finished = session.run_command(line, timeout=duration, interrupted=stopping)
            if output:
                err.write(output if output.endswith("\n") else output + "\n")
            summary = tracer.summary()
            state["mute"] = True
            if finished:
                status = session.last_status()
            elif not stopping():
                print(f"qprobes: --duration {duration:g} s ended the guest command", file=err)
                status = EXIT_TIMEOUT
        else:
            print("qprobes: tracing; Ctrl-C to stop", file=err)
            session.run(until=stopping, timeout=duration)
            summary = tracer.summary()
        fast_counts = (tracer.fast_dropped, tracer.fast_spilled)
    finally:
        signal.signal(signal.SIGINT, previous)
        session.close()
    if state["pipe"]:
        return EXIT_PIPE
    for row in summary:
        if json_output:
            err.write(json.dumps({"summary": row}) + "\n")
        else:
            err.write(
                f"qprobes: {row['event']}: {row['hits']} hits, {row['emitted']} printed, "
                f"{row['filtered']} filtered out, {row['missed']} missed"
                + (", lost (the guest rewrote the probed text)" if row["lost"] else "")
                + "\n"
            )
            if row.get("note"):
                err.write(f"qprobes: {row['event']}: warning: {row['note']}\n")
    if fast and not json_output and (fast_counts[0] or fast_counts[1]):
        err.write(f"qprobes: fast path: {fast_counts[0]} records dropped (nested hits), "
                  f"{fast_counts[1]} hits taken by the host (a ring was full)\n")  # fmt: skip
    return 130 if state["asked"] else status


def symbols(pattern: str, out: TextIO = sys.stdout, **machine: Any) -> int:
    """``qprobes symbols``: kernel symbols matching a glob, with addresses and sizes."""
    import fnmatch

    session = _session_for(**machine)
    try:
        table = session.symbols
        assert table is not None
        rows = sorted(
            (s for s in table if fnmatch.fnmatchcase(s.name, pattern)), key=lambda s: s.addr
        )
        kernel = session.kernel
        if kernel is not None:
            print(f"# KASLR slide {kernel.slide:#x}; {len(table)} symbols", file=sys.stderr)
        for s in rows:
            print(f"{s.addr:016x} {s.size:8d} {s.kind:<6} {s.name}", file=out)
    finally:
        session.close()
    if not rows:
        print(f"qprobes: no kernel symbol matches {pattern!r}", file=sys.stderr)
        return 1
    return 0
