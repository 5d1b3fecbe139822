"""SIGTERM and SIGHUP end ``qprobes trace`` as Ctrl-C does: it detaches,
prints the summary and exits 143 / 129 (130 for SIGINT), with a guest of its
own and attached to a QEMU it did not start. Signals after the first wait
for the detach. No scratch directory (``qprobes-*``) is left behind, and one
a killed qprobes left is cleaned at the next start.

The attached guest (one QEMU for the module, started here, with a busy
shell loop) must come out clean: its IDT and probed text as before the
trace, its dmesg free of BUG/Oops/WARNING, and its shell still answering.
"""

from __future__ import annotations

import hashlib
import os
import pty
import re
import select
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qprobes.errors import QprobesError
from qprobes.machine.linux import LINUX_HOSTNAME, LINUX_PROMPT, linux_config
from qprobes.machine.qemu import OWNER_FILE, QemuMachine, attach, owner_record, owners_alive
from tests.conftest import require_vm
from tests.integration.cli_process import CliProcess, left_behind, processes_naming
from tests.integration.terminal import CLI

pytestmark = [pytest.mark.vm, pytest.mark.serial]

PROBE = "p:myopen do_sys_openat2 path=+0(%si):string"
LOOP = "(while :; do cat /etc/hostname >/dev/null; ls /proc >/dev/null 2>&1; done) &"
BAD = re.compile(
    r"BUG:|Oops|WARNING:|general protection|unable to handle|page fault|Kernel panic|"
    r"double fault|invalid opcode|qprobes-guest: ready"
)
SUMMARY = re.compile(r"^qprobes: kprobes/myopen: (\d+) hits, (\d+) printed", re.M)


def hits(stderr: str) -> int:
    found = SUMMARY.findall(stderr)
    assert len(found) == 1, stderr[-3000:]
    return int(found[0][0])


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]
    assert "reconnect" not in text and "cannot connect" not in text, text[-3000:]


# --- attached to a QEMU started here --------------------------------------------


class TheirGuest:
    """A QEMU this module started, with a busy shell loop, gdbstub released."""

    def __init__(self, machine: QemuMachine, openat2: int) -> None:
        self.machine = machine
        self.openat2 = openat2
        start, size = machine.config.reserved
        self.args = ["--attach", str(machine.gdb_socket), "--reserve", f"{start:#x}:{size:#x}"]
        self.pristine = self.snapshot()

    def snapshot(self) -> dict[str, str]:
        """Hashes of what qprobes writes to: every vCPU's IDT and the probed
        function's first bytes (read through a gdbstub connection of our own)."""
        target = attach(str(self.machine.gdb_socket))
        out = {}
        try:
            with target.stopped():
                for vcpu in target.vcpus:
                    idt = target.idt(vcpu)
                    out[f"idt{vcpu}"] = hashlib.sha256(target.read(idt.base, idt.limit + 1)
                                                       ).hexdigest()  # fmt: skip
                out["text"] = target.read(self.openat2, 64).hex()
        finally:
            target.client.detach()
        return out

    def check_clean(self, mark: int) -> None:
        """The guest runs on unprobed: same IDT and text, a quiet dmesg, a shell that answers."""
        assert self.snapshot() == self.pristine, "qprobes' writes were not undone"
        time.sleep(1)
        console = self.machine.console
        out = console.command("cat /etc/hostname; echo qp-dmesg; dmesg", LINUX_PROMPT, timeout=60)
        assert out.splitlines()[0].strip() == LINUX_HOSTNAME, out[:500]
        printed = self.machine.console_text()[mark:]
        bad = [line for line in (printed + out).splitlines() if BAD.search(line)]
        assert not bad, bad[:5]


@pytest.fixture(scope="module")
def their_guest() -> Iterator[TheirGuest]:
    machine = QemuMachine(linux_config(append="qprobes.echo=0", smp=2))
    try:
        machine.launch()
    except QprobesError as exc:
        require_vm(f"cannot launch QEMU: {exc}")
    try:
        machine.target.resume()
        machine.console.recvuntil(LINUX_PROMPT, timeout=120)
        machine.console.command(LOOP, LINUX_PROMPT)
        line = machine.console.command("grep ' do_sys_openat2$' /proc/kallsyms", LINUX_PROMPT)
        openat2 = int(line.split()[0], 16)
        assert openat2 >> 63, line
        machine.release_gdbstub()
        yield TheirGuest(machine, openat2)
    finally:
        machine.shutdown()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_detaches_from_an_attached_guest(their_guest: TheirGuest, tmp_path: Path,
                                                  signum: int) -> None:  # fmt: skip
    mark = len(their_guest.machine.console_text())
    cli = CliProcess(["trace", *their_guest.args, PROBE], tmp_path)
    cli.wait_for("myopen: (do_sys_openat2", stream="stdout")
    time.sleep(1)
    cli.signal(signum)
    status = cli.wait()
    assert status == 128 + signum, cli.stderr[-3000:]
    no_traceback(cli.stderr)
    assert hits(cli.stderr) > 0
    assert "detaching, please wait" not in cli.stderr
    their_guest.check_clean(mark)
    assert left_behind(cli.scratch) == []


def test_more_signals_wait_for_the_detach(their_guest: TheirGuest, tmp_path: Path) -> None:
    """SIGTERM, then SIGINT and SIGHUP while qprobes detaches: it says once
    that it is detaching, finishes, and exits as the first signal asks."""
    mark = len(their_guest.machine.console_text())
    cli = CliProcess(["trace", *their_guest.args, PROBE], tmp_path)
    cli.wait_for("myopen: (do_sys_openat2", stream="stdout")
    time.sleep(1)
    cli.signal(signal.SIGTERM)
    started = time.monotonic()
    for again in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        time.sleep(0.05)
        if cli.proc.poll() is None:
            cli.signal(again)
    status = cli.wait()
    print(f"detached and exited {time.monotonic() - started:.2f} s after SIGTERM")
    assert status == 143, cli.stderr[-3000:]
    no_traceback(cli.stderr)
    assert cli.stderr.count("detaching, please wait") == 1, cli.stderr[-3000:]
    assert hits(cli.stderr) > 0
    their_guest.check_clean(mark)


# --- a guest of qprobes' own ----------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "command"),
    [(signal.SIGTERM, ["--", "cat /etc/hostname; sleep 100"]), (signal.SIGHUP, [])],
    ids=["SIGTERM-during-a-guest-command", "SIGHUP-tracing"],
)
def test_a_signal_detaches_from_a_guest_of_its_own(tmp_path: Path, signum: int,
                                                   command: list[str]) -> None:  # fmt: skip
    cli = CliProcess(["trace", "--duration", "150", PROBE, *command], tmp_path)
    if command:
        cli.wait_for('path="/etc/hostname"', stream="stdout")
        time.sleep(1)  # the guest is in its sleep
    else:
        cli.wait_for("Ctrl-C to stop")
    cli.signal(signum)
    status = cli.wait()
    assert status == 128 + signum, cli.stderr[-3000:]
    no_traceback(cli.stderr)
    assert hits(cli.stderr) >= (1 if command else 0)
    assert left_behind(cli.scratch) == []


def new_workdir(cli: CliProcess, known: list[Path]) -> Path:
    """The scratch directory ``cli``'s QEMU works in, once it exists."""
    deadline = time.monotonic() + 120
    while True:
        made = [p for p in cli.scratch.glob("qprobes-*") if p not in known]
        if made:
            return made[0]
        assert time.monotonic() < deadline and cli.proc.poll() is None, cli.stderr
        time.sleep(0.02)


def test_a_signal_while_booting_stops_and_cleans_up(tmp_path: Path) -> None:
    """A qprobes killed by SIGKILL leaves its scratch directory (its QEMU
    dies with it); the next start removes it, and keeps a live qprobes' one.
    SIGTERM while that next guest boots: nothing to detach yet; QEMU and its
    scratch directory go, and the status is 143."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    live = scratch / "qprobes-live"
    live.mkdir()
    (live / OWNER_FILE).write_text(owner_record("qprobes", os.getpid()))
    killed = CliProcess(["trace", PROBE], tmp_path / "killed", scratch)
    stale = new_workdir(killed, [live])
    killed.signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    deadline = time.monotonic() + 20
    # Its QEMU follows it (PR_SET_PDEATHSIG).
    while processes_naming(stale) or owners_alive((stale / OWNER_FILE).read_text()):
        assert time.monotonic() < deadline, "QEMU outlived the qprobes that started it"
        time.sleep(0.1)
    assert (stale / OWNER_FILE).read_text().startswith("qprobes ")  # left behind

    cli = CliProcess(["trace", PROBE], tmp_path / "next", scratch)
    new_workdir(cli, [live, stale])
    assert not stale.exists(), "the next start did not remove the stale scratch directory"
    time.sleep(0.5)  # QEMU is up, the guest boots
    assert "tracing" not in cli.stderr
    cli.signal(signal.SIGTERM)
    status = cli.wait()
    assert status == 143, cli.stderr
    assert "qprobes: interrupted (SIGTERM)" in cli.stderr, cli.stderr
    no_traceback(cli.stderr)
    assert left_behind(scratch) == [live]


def test_the_terminal_closing_is_a_sighup(tmp_path: Path) -> None:
    """qprobes on a pseudo-terminal (stdout, stdin; stderr in a file), the
    terminal closed under it mid-trace: the kernel sends SIGHUP; qprobes
    detaches, its summary still reaches stderr, and it exits 129 (writes to
    the dead terminal fail with EIO and must not stop the detach)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    err_path = tmp_path / "stderr"
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal is its controlling terminal
        try:
            err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(err, 2)
            os.environ["TMPDIR"] = str(scratch)
            loop = "while :; do cat /etc/hostname; sleep 0.2; done"
            os.execv(sys.executable, [*CLI, "trace", PROBE, "--", loop])
        finally:
            os._exit(127)
    output = b""
    deadline = time.monotonic() + 240
    try:
        while output.count(b'path="/etc/hostname"') < 3:
            assert time.monotonic() < deadline, err_path.read_text()[-3000:]
            if select.select([fd], [], [], 1.0)[0]:
                output += os.read(fd, 4096)
    finally:
        os.close(fd)  # the terminal hangs up
    while True:
        done, wstatus = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline + 120:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(err_path.read_text()[-3000:])
        time.sleep(0.1)
    stderr = err_path.read_text()
    assert os.waitstatus_to_exitcode(wstatus) == 129, stderr[-3000:]
    no_traceback(stderr)
    assert hits(stderr) >= 3
    assert left_behind(scratch) == []
    assert not processes_naming(scratch)
