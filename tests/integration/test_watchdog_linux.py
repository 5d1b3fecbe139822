"""The watchdog of an attached ``qprobes trace``: SIGKILL the trace, and the
guest comes back with no further command.

The guest is a QEMU started here, on 2 vCPUs with two busy loops; qprobes
attaches with hot probes and a return probe that a sleeping task holds, and
is SIGKILLed mid-run. Its watchdog (a process of its own) must then put back
every int3, return address, gate and page-table entry from the journal: the
guest runs its workload again, its dmesg stays free of BUG/Oops/WARNING,
its IDT and probed text hash as before, ``qprobes attach --recover`` finds
nothing left to do, and a later attach works. With the watchdog killed as
well, ``--recover`` is the way back.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qprobes.machine.linux import LINUX_PROMPT
from qprobes.machine.qemu import QemuMachine, process_start_time
from tests.integration.attached import BAD, CLI, HOT, busy_guest, snapshot
from tests.integration.cli_process import CliProcess, left_behind

pytestmark = [pytest.mark.vm, pytest.mark.serial]

WATCHDOG = re.compile(r"qprobes: watchdog pid (\d+) puts the guest back .*\(log: (.+)\)")
RECOVERED = re.compile(r"recovered the changes of pid (\d+) .*: (\d+) probe sites, "
                       r"(\d+) return addresses, (\d+) IDT gates")  # fmt: skip


@dataclass
class Guest:
    machine: QemuMachine
    address: str
    reserve: str
    addrs: list[int]
    before: dict[str, str]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                          check=False, env=env)  # fmt: skip


def wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process_start_time(pid) is not None:
        assert time.monotonic() < deadline, f"process {pid} still runs after {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    machine, addrs = busy_guest()
    try:
        address = str(machine.gdb_socket)
        start, size = machine.config.reserved
        yield Guest(machine, address, f"{start:#x}:{size:#x}", addrs, snapshot(address, addrs))
    finally:
        machine.shutdown()


def start_trace(guest: Guest, tmp: Path) -> tuple[CliProcess, int, Path]:
    """An attached ``qprobes trace`` with the hot probes armed and a sleeping
    task in a return-probed function; its watchdog's pid and log."""
    cli = CliProcess(["trace", "--attach", guest.address, "--reserve", guest.reserve, "-q",
                      *HOT], tmp)  # fmt: skip
    cli.wait_for("Ctrl-C to stop", timeout=300)
    match = WATCHDOG.search(cli.stderr)
    assert match, cli.stderr[-3000:]
    pid, log = int(match.group(1)), Path(match.group(2))
    assert process_start_time(pid) is not None, "the watchdog is not running"
    # Its own session: no Ctrl-C or hang-up of qprobes' terminal reaches it.
    assert os.getsid(pid) == pid != os.getsid(cli.pid)
    # It does not hold the gdbstub while qprobes lives: qprobes still traces.
    guest.machine.console.command("sleep 30 & echo started-sleep", LINUX_PROMPT, timeout=120)
    time.sleep(4)
    return cli, pid, log


def check_clean(guest: Guest, mark: int) -> None:
    """The guest runs on: the sleeper returns through its real return
    address, dmesg is quiet, the IDT and text are as before the session."""
    machine = guest.machine
    out = machine.console.command("kill %3 2>/dev/null; sleep 2; wait %3; echo qp-alive; dmesg",
                                  LINUX_PROMPT, timeout=180)  # fmt: skip
    text = str(out) + machine.console_text()[mark:]
    assert "qp-alive" in text
    assert not [line for line in text.splitlines() if BAD.search(line)], text[-3000:]
    assert snapshot(guest.address, guest.addrs) == guest.before, "qprobes' writes not all undone"


def later_attach_works(guest: Guest, tmp: Path) -> None:
    again = run("attach", guest.address, "--recover", "--reserve", guest.reserve)
    assert again.returncode == 0 and "nothing to recover" in again.stdout, again
    scratch = tmp / "later"
    scratch.mkdir()
    later = run("trace", "--attach", guest.address, "--reserve", guest.reserve, "--duration",
                "3", "p:op do_sys_openat2 path=+0(%si):string",
                env=dict(os.environ, TMPDIR=str(scratch)))  # fmt: skip
    assert later.returncode == 0, later.stderr
    assert 'path="/etc/hostname"' in later.stdout
    assert WATCHDOG.search(later.stderr), later.stderr
    assert left_behind(scratch) == [], "a normal detach left the watchdog's directory"


def test_the_watchdog_recovers_a_killed_trace(guest: Guest, tmp_path: Path) -> None:
    mark = len(guest.machine.console_text())
    cli, watchdog, log = start_trace(guest, tmp_path)
    cli.proc.kill()  # SIGKILL: no detach, no clean-up
    cli.proc.wait(timeout=30)
    started = time.monotonic()
    # No further command: the guest (stopped at the doorbell with nobody to
    # answer) resumes once the watchdog has put everything back.
    out = guest.machine.console.command("echo qp-resumed", LINUX_PROMPT, timeout=240)
    assert "qp-resumed" in str(out)
    print(f"the guest answered {time.monotonic() - started:.1f} s after the SIGKILL")
    wait_gone(watchdog, 120)
    said = log.read_text()
    print(said)
    match = RECOVERED.search(said)
    assert match, said
    assert len(said.strip().splitlines()) == 1, said
    assert int(match.group(1)) == cli.pid
    assert int(match.group(2)) == len(HOT)  # every int3 was still armed
    assert int(match.group(3)) >= 1  # the sleeping task's return address
    assert int(match.group(4)) >= 2  # #DB and #BP at least
    check_clean(guest, mark)
    later_attach_works(guest, tmp_path)


def test_recover_when_the_watchdog_was_killed_too(guest: Guest, tmp_path: Path) -> None:
    mark = len(guest.machine.console_text())
    cli, watchdog, log = start_trace(guest, tmp_path)
    os.kill(watchdog, signal.SIGKILL)
    wait_gone(watchdog, 30)
    cli.proc.kill()
    cli.proc.wait(timeout=30)
    time.sleep(2)
    assert log.read_text() == "", "the killed watchdog wrote something"

    recovered = run("attach", guest.address, "--recover", "--reserve", guest.reserve)
    assert recovered.returncode == 0, recovered.stderr
    match = RECOVERED.search(recovered.stdout)
    assert match, recovered.stdout + recovered.stderr
    assert int(match.group(1)) == cli.pid
    assert int(match.group(2)) == len(HOT)
    assert int(match.group(3)) >= 1
    check_clean(guest, mark)
    later_attach_works(guest, tmp_path)
