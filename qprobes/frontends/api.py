"""The Python API behind the command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from qprobes.errors import MachineError
from qprobes.machine.guests import QTEST_EXIT_PASS, qtest_config
from qprobes.machine.qemu import MachineConfig, QemuMachine, attach

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
    if qtest:
        config = qtest_config(append=append, smp=smp, accel=accel, cpu=cpu)
    elif kernel is None:
        from qprobes.machine.linux import linux_config

        config = linux_config(append=append, kaslr=kaslr, smp=smp, accel=accel, cpu=cpu)
    else:
        config = MachineConfig(
            kernel=Path(kernel), initrd=Path(initrd) if initrd else None, append=append,
            smp=smp, memory_mib=memory_mib, accel=accel, cpu=cpu,
        )  # fmt: skip
    with QemuMachine(config) as machine:
        start, size = config.reserved
        print(
            f"qprobes: gdbstub at {machine.gdb_socket} (pid {machine.pid}); "
            f"memory kept for qprobes: --reserve {start:#x}:{size:#x}",
            file=sys.stderr,
        )
        machine.target.resume()
        machine.release_gdbstub()
        machine.console.interactive()
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
                    refused += 1  # ud2 guards that never run
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
    from qprobes.probes.area import MODULES_END
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
    try:
        steps = walk(target.read_phys_u64, regs.cr3, MODULES_END - 1).steps
    except TranslationError:
        steps = ()
    tables = {regs.cr3 & ~0xFFF} | {step.table for step in steps}
    for table in sorted(tables):
        digest.update(target.read_phys(table, 4096))
    return digest.hexdigest()


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
) -> Session:
    """The Linux session a trace or symbols command works on."""
    from qprobes.frontends.session import Session
    from qprobes.machine.linux import LINUX_CMDLINE

    if attach_address is not None:
        if reserve is None:
            raise MachineError(
                "--attach needs --reserve START:SIZE: guest-physical memory the guest does "
                "not use (boot it with memmap=SIZE$START)"
            )
        start, _, size = reserve.partition(":")
        return Session.attach(attach_address, reserve=(int(start, 0), int(size, 0)),
                              symbols=symbols_file, linux=True)  # fmt: skip
    if kernel is not None:
        parts = [LINUX_CMDLINE, append] if append else [LINUX_CMDLINE]
        if not kaslr:
            parts.append("nokaslr")
        config = MachineConfig(
            kernel=Path(kernel), initrd=Path(initrd) if initrd else None,
            append=" ".join(parts), memory_mib=512, smp=smp, accel=accel, cpu=cpu,
        )  # fmt: skip
        return Session.linux(config, symbols_file=symbols_file)
    return Session.linux(kaslr=kaslr, smp=smp, accel=accel, cpu=cpu, symbols_file=symbols_file)


def trace(
    probes: list[str],
    command: list[str],
    *,
    json_output: bool = False,
    filters: list[str] | None = None,
    duration: float | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    **machine: Any,
) -> int:
    """``qprobes trace``: arm kprobe_events-style probes, run a guest command,
    print every hit, then a summary. Ctrl-C stops tracing and detaches."""
    import json
    import signal

    from qprobes.frontends.trace import TraceEvent, Tracer
    from qprobes.probes.language import parse_probe

    # Check every definition before booting anything.
    for text in probes:
        parse_probe(text)
    if command and machine.get("attach_address"):
        raise MachineError(
            "with --attach qprobes has no console to type GUEST_COMMAND into: run the "
            "workload in the guest yourself, and stop tracing with Ctrl-C or --duration"
        )
    by_event: dict[str, str] = {}
    for item in filters or []:
        event, sep, expr = item.partition(":")
        if not sep:
            raise MachineError(f"--filter wants EVENT:EXPRESSION, got {item!r}")
        by_event[event] = expr

    def sink(event: TraceEvent) -> None:
        out.write((event.to_json() if json_output else event.format()) + "\n")
        out.flush()

    stop = {"asked": False}

    def on_sigint(signum: int, frame: object) -> None:
        stop["asked"] = True

    session = _session_for(**machine)
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        tracer = Tracer(session, sink)
        for text in probes:
            spec = parse_probe(text)
            tp = tracer.add(text, by_event.get(getattr(spec, "event", "")))
            print(f"qprobes: {tp.name} at {tracer._location(tp.addr)}", file=err)
        if command:
            line = " ".join(command)
            output, _ = session.run_command(line, interrupted=lambda: stop["asked"])
            if output:
                err.write(output if output.endswith("\n") else output + "\n")
        else:
            print("qprobes: tracing; Ctrl-C to stop", file=err)
            session.run(until=lambda: stop["asked"], timeout=duration)
        summary = tracer.summary()
    finally:
        signal.signal(signal.SIGINT, previous)
        session.close()
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
    return 130 if stop["asked"] else 0


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
    return 0 if rows else 1
