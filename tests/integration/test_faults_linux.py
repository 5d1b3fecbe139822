"""A guest that dies mid-trace is reported as what happened: one line (the
guest panicked, QEMU exited or was killed), the end of its console (the
panic and its stack), the summary of what was counted until then, exit
status 1; never a traceback or ``cannot connect to .../gdb.sock``. Each test
kills its guest, so each boots one.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from qprobes.errors import QprobesError
from qprobes.machine.linux import LINUX_PROMPT, linux_config
from qprobes.machine.qemu import QemuMachine
from tests.conftest import require_vm
from tests.integration.cli_process import CliProcess, left_behind

pytestmark = pytest.mark.vm

PROBE = "p:myopen do_sys_openat2 path=+0(%si):string"
SUMMARY = re.compile(r"^qprobes: kprobes/myopen: (\d+) hits, (\d+) printed", re.M)


def error_line(stderr: str) -> tuple[str, list[str]]:
    """The one ``qprobes: error:`` line and the lines after it."""
    lines = stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("qprobes: error:")]
    assert len(errors) == 1, stderr[-3000:]
    return lines[errors[0]], lines[errors[0] + 1 :]


def check_report(stderr: str) -> int:
    """No traceback, no connection noise; returns the hits the summary counted."""
    assert "Traceback" not in stderr, stderr[-3000:]
    for noise in ("cannot connect", "reconnect", "unexpected stop", "gdb.sock"):
        assert noise not in stderr, (noise, stderr[-3000:])
    found = SUMMARY.findall(stderr)
    assert len(found) == 1, stderr[-3000:]
    # The summary comes after the error and its console lines.
    assert stderr.rindex("qprobes: error:") < stderr.rindex("qprobes: kprobes/myopen:")
    return int(found[0][0])


def test_a_guest_panic_mid_trace(tmp_path: Path) -> None:
    cli = CliProcess(["trace", PROBE, "--", "cat /etc/hostname; echo c > /proc/sysrq-trigger"],
                     tmp_path)  # fmt: skip
    status = cli.wait(240)
    stderr = cli.stderr
    assert status == 1, stderr[-3000:]
    first, rest = error_line(stderr)
    assert first.startswith("qprobes: error: the guest panicked (QEMU exited with status 0)"), first
    console = "\n".join(rest)
    assert "Kernel panic - not syncing: sysrq triggered crash" in console, console
    assert "sysrq_handle_crash" in console and "Call Trace" in console, console
    assert check_report(stderr) >= 2  # /etc/hostname and /proc/sysrq-trigger
    assert 'path="/etc/hostname"' in cli.stdout
    assert left_behind(cli.scratch) == []


def test_qemu_killed_mid_trace(tmp_path: Path) -> None:
    loop = "while :; do cat /etc/hostname >/dev/null; sleep 0.1; done"
    cli = CliProcess(["trace", PROBE, "--", loop], tmp_path)
    qemu = cli.qemu_pid()
    cli.wait_for('path="/etc/hostname"', stream="stdout")
    time.sleep(1)
    import os

    os.kill(qemu, signal.SIGKILL)
    status = cli.wait()
    stderr = cli.stderr
    assert status == 1, stderr[-3000:]
    first, rest = error_line(stderr)
    assert first.startswith("qprobes: error: QEMU was killed by signal 9 (SIGKILL)"), first
    assert any("qprobes-guest#" in line for line in rest), rest  # the console's end
    assert check_report(stderr) >= 2
    assert left_behind(cli.scratch) == []


def test_an_attached_qemu_killed_mid_trace(tmp_path: Path) -> None:
    machine = QemuMachine(linux_config(append="qprobes.echo=0"))
    try:
        machine.launch()
    except QprobesError as exc:
        require_vm(f"cannot launch QEMU: {exc}")
    try:
        machine.target.resume()
        machine.console.recvuntil(LINUX_PROMPT, timeout=120)
        machine.console.command("(while :; do cat /etc/hostname >/dev/null; sleep 0.1; done) &",
                                LINUX_PROMPT)  # fmt: skip
        machine.release_gdbstub()
        start, size = machine.config.reserved
        cli = CliProcess(["trace", "--attach", str(machine.gdb_socket),
                          "--reserve", f"{start:#x}:{size:#x}", PROBE], tmp_path)  # fmt: skip
        cli.wait_for("myopen: (do_sys_openat2", stream="stdout")
        time.sleep(1)
        machine._proc.kill()  # type: ignore[union-attr]
        status = cli.wait()
    finally:
        machine.shutdown()
    stderr = cli.stderr
    assert status == 1, stderr[-3000:]
    first, _ = error_line(stderr)
    assert "dropped and it takes no new one: QEMU exited or was killed" in first, first
    assert "Traceback" not in stderr and "reconnect" not in stderr, stderr[-3000:]
    assert SUMMARY.search(stderr) and int(SUMMARY.findall(stderr)[0][0]) > 0, stderr[-3000:]
