#!/usr/bin/env python3
"""Detach under load, many times in a row: does the guest survive?

Each run boots the default Linux guest with ``--smp`` vCPUs (2 by default),
starts busy shell loops in it, arms a hot boosted probe (by default
``_raw_spin_lock_irqsave``), lets it fire for ``--duration`` seconds,
detaches while the loops keep running, and lets the guest run on for
``--after`` seconds. Then it reads the guest's dmesg through the console.
A run counts as *oopsed* when the console output after the detach or the
dmesg holds a BUG/Oops/WARNING/general protection/page fault line, or the
guest stops answering (``panic=-1`` reboots it on a fatal oops). A run in
which detach itself raised counts as *refused* (the area is left mapped and
the guest keeps running: not a crash, but reported).

Modes: ``api`` (``Session.linux`` and ``session.engine.detach()``) and
``attach`` (a QEMU started by :class:`QemuMachine`, its gdbstub released,
then ``Session.attach``; detach by ``Session.close``).

    PYTHONPATH=$PWD python scripts/detach_soak.py --runs 20 --mode attach
    PYTHONPATH=$PWD python scripts/detach_soak.py --runs 5 --preempt full

Prints one line per run and a summary ``N of M runs oopsed``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from dataclasses import dataclass

from qprobes.errors import QprobesError
from qprobes.frontends.session import Session
from qprobes.machine.linux import LINUX_PROMPT, linux_config
from qprobes.machine.qemu import QemuMachine

#: What a broken guest prints (the kernel's oops, BUG, WARN and fault banners).
BAD = re.compile(
    rb"BUG:|Oops|WARNING:|general protection|unable to handle|page fault|"
    rb"Kernel panic|double fault|invalid opcode|RIP: 0010:0x|qprobes-guest: ready"
)
#: Busy loops that take spin locks with interrupts off on every vCPU.
LOOP = "(while :; do cat /etc/hostname >/dev/null; ls /proc >/dev/null 2>&1; done) &"


@dataclass
class Outcome:
    oops: bool
    refused: bool
    hits: int
    detail: str
    error: bool = False  # the run failed before the detach (not an oops)


def _bad_lines(text: bytes) -> list[str]:
    return [
        line.decode(errors="replace").strip()
        for line in text.splitlines()
        if BAD.search(line) and b"grep" not in line
    ]


def _run_on(console: object, seconds: float) -> bytes:
    """Collect console output for ``seconds`` while the guest runs alone."""
    tube = console.tube  # type: ignore[attr-defined]
    out = bytearray()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out += tube.recv(4096, timeout=max(0.05, end - time.monotonic()))
    return bytes(out)


def _dmesg(console: object) -> bytes:
    console.sendline("echo qp-dmesg-start; dmesg; echo qp-dmesg-end")  # type: ignore[attr-defined]
    data: bytes = console.recvuntil(b"qp-dmesg-end\r\n", timeout=60)  # type: ignore[attr-defined]
    return data


def _append(preempt: str) -> str:
    return "qprobes.echo=0" + (f" preempt={preempt}" if preempt else "")


def _verdict(machine: QemuMachine, mark: int, refused: str, hits: int,
             after: bytes | None, error: str = "") -> Outcome:
    """Judge a run by what the guest printed after the detach (``mark``: the
    console log's length then) and by its dmesg, if it still answers."""
    log = machine.console_text()[mark:].encode(errors="replace")
    bad = _bad_lines(log) + _bad_lines(after or b"")
    if error or not machine.alive():
        return Outcome(True, bool(refused), hits, (bad[:1] or [error or "QEMU died"])[0])
    try:
        dmesg = _dmesg(machine.console)
    except (QprobesError, EOFError, OSError) as exc:  # EOF: QEMU died (-no-reboot)
        return Outcome(True, bool(refused), hits, (bad[:1] or [f"no answer: {exc!r}"])[0])
    bad += _bad_lines(dmesg)
    return Outcome(bool(bad), bool(refused), hits, (bad[:1] or [refused])[0])


def run_api(args: argparse.Namespace) -> Outcome:
    config = linux_config(append=_append(args.preempt), smp=args.smp)
    session = Session.linux(config)
    machine = session.machine
    assert machine is not None
    try:
        hits = [0]

        def count(kp: object, ctx: object) -> bool:
            hits[0] += 1
            return False

        for _ in range(args.loops):
            session.command(LOOP)
        session.kprobe(args.probe, count)
        session.run(timeout=args.duration)
        mark = len(machine.console_text())
        refused = ""
        try:
            session.engine.detach()
        except QprobesError as exc:
            refused = str(exc)
        try:
            session.target.resume()
            after = _run_on(machine.console, args.after)
        except (QprobesError, EOFError, OSError) as exc:
            return _verdict(machine, mark, refused, hits[0], None, f"after detach: {exc}")
        return _verdict(machine, mark, refused, hits[0], after)
    finally:
        with contextlib.suppress(QprobesError):
            session.close()
        machine.shutdown()


def run_attach(args: argparse.Namespace) -> Outcome:
    machine = QemuMachine(linux_config(append=_append(args.preempt), smp=args.smp))
    machine.launch()
    try:
        machine.target.resume()
        machine.console.recvuntil(LINUX_PROMPT, timeout=120)
        for _ in range(args.loops):
            machine.console.command(LOOP, LINUX_PROMPT)
        machine.release_gdbstub()
        session = Session.attach(str(machine.gdb_socket), reserve=machine.config.reserved,
                                 linux=True)  # fmt: skip
        hits = [0]

        def count(kp: object, ctx: object) -> bool:
            hits[0] += 1
            return False

        refused = ""
        mark = 0
        try:
            session.kprobe(args.probe, count)
            session.run(timeout=args.duration)
        finally:
            mark = len(machine.console_text())
            try:
                session.close()  # detaches and leaves the guest running
            except QprobesError as exc:
                refused = str(exc)
        try:
            after = _run_on(machine.console, args.after)
        except (QprobesError, EOFError, OSError) as exc:
            return _verdict(machine, mark, refused, hits[0], None, f"after detach: {exc}")
        return _verdict(machine, mark, refused, hits[0], after)
    finally:
        machine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--mode", choices=("api", "attach"), default="api")
    parser.add_argument("--smp", type=int, default=2)
    parser.add_argument("--loops", type=int, default=2, help="busy shell loops in the guest")
    parser.add_argument("--probe", default="_raw_spin_lock_irqsave")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds armed")
    parser.add_argument("--after", type=float, default=8.0, help="seconds run on after detach")
    parser.add_argument("--preempt", default="", help="preempt= on the guest command line")
    args = parser.parse_args(argv)
    oopsed = refused = errors = 0
    for run in range(1, args.runs + 1):
        start = time.monotonic()
        try:
            out = (run_api if args.mode == "api" else run_attach)(args)
        except (QprobesError, EOFError, OSError) as exc:
            out = Outcome(False, False, 0, f"run failed before detach: {exc!r}", error=True)
        oopsed += out.oops
        refused += out.refused
        errors += out.error
        verdict = "OOPS" if out.oops else ("refused" if out.refused else
                                           "error" if out.error else "ok")  # fmt: skip
        print(f"run {run}: {verdict:7} hits={out.hits} {time.monotonic() - start:.0f}s "
              f"{out.detail[:160]}", flush=True)  # fmt: skip
    print(f"{oopsed} of {args.runs} runs oopsed ({refused} detaches refused, {errors} runs "
          f"failed before detaching); mode={args.mode} "
          f"smp={args.smp} preempt={args.preempt or 'voluntary'} probe={args.probe}")  # fmt: skip
    return 1 if oopsed else 0


if __name__ == "__main__":
    sys.exit(main())
