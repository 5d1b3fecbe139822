"""The watchdog without a guest: its retry rules with a fake recovery, and
the real process against a socket that plays the gdbstub's listener."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qprobes.errors import ConnectionClosedError, ProbeError, QprobesError, StubTimeoutError
from qprobes.frontends import watchdog as wd
from qprobes.machine.qemu import OWNER_FILE, process_start_time

RESERVE = (0x1000_0000, 0x40_0000)


def refused() -> ConnectionClosedError:
    try:
        raise ConnectionClosedError("cannot connect to /x: refused") from ConnectionRefusedError()
    except ConnectionClosedError as exc:
        return exc


def missing() -> ConnectionClosedError:
    try:
        raise ConnectionClosedError("cannot connect to /x: no file") from FileNotFoundError()
    except ConnectionClosedError as exc:
        return exc


@pytest.mark.parametrize(
    ("outcomes", "status", "said", "tries"),
    [
        (["recovered 4 sites"], 0, "recovered 4 sites", 1),
        ([refused()], None, "is gone: nothing to recover", 1),
        ([missing()], None, "is gone: nothing to recover", 1),
        # The gdbstub has not taken the watchdog yet (the dead client's
        # socket not closed yet), or dropped it halfway: try again.
        ([StubTimeoutError("timed out"), "recovered"], 0, "recovered", 2),
        ([ConnectionClosedError("dropped"), StubTimeoutError("t"), "nothing"], 0, "nothing", 3),
        ([ProbeError("the journal is of format 9")], 1, "--recover --reserve 0x10000000", 1),
    ],
    ids=["recovered", "refused", "no-socket", "timeout-then-ok", "dropped-then-ok", "error"],
)
def test_recover_retries_until_the_gdbstub_takes_it(outcomes: list[object], status: int | None,
                                                    said: str, tries: int) -> None:  # fmt: skip
    lines: list[str] = []
    calls = []

    def once(address: str, reserve: tuple[int, int]) -> str:
        calls.append((address, reserve))
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, QprobesError):
            raise outcome
        assert isinstance(outcome, str)
        return outcome

    assert wd.recover("/x", RESERVE, lines.append, patience=30, recover_once=once) == status
    assert len(calls) == tries and calls[0] == ("/x", RESERVE)
    assert len(lines) == 1 and said in lines[0], lines


def test_recover_gives_up_after_its_patience() -> None:
    lines: list[str] = []

    def once(address: str, reserve: tuple[int, int]) -> str:
        raise StubTimeoutError("connecting: timed out")

    assert wd.recover("/x", RESERVE, lines.append, patience=0, recover_once=once) == 1
    assert "cannot recover the guest" in lines[0] and "qprobes attach /x --recover" in lines[0]


def alive(pid: int) -> bool:
    return process_start_time(pid) is not None


def wait_gone(pid: int, timeout: float) -> float:
    started = time.monotonic()
    while alive(pid):
        assert time.monotonic() - started < timeout, f"pid {pid} still runs"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_detach_ends_the_watchdog_at_once(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    dog = wd.Watchdog.start(str(tmp_path / "gdb.sock"), RESERVE)
    assert dog.workdir.parent == tmp_path and dog.workdir.name.startswith("qprobes-")
    roles = [line.split()[0] for line in (dog.workdir / OWNER_FILE).read_text().splitlines()]
    assert roles == ["qprobes", "watchdog"]
    assert os.getsid(dog.pid) == dog.pid  # a session of its own
    time.sleep(0.5)
    assert dog.proc.poll() is None, "it did not wait for qprobes"
    dog.detached()
    assert dog.proc.returncode == 0
    assert not dog.workdir.exists()
    assert list(tmp_path.glob("qprobes-*")) == []


CHILD = """
import os, sys, time
from qprobes.frontends.watchdog import Watchdog
dog = Watchdog.start(sys.argv[1], (0x10000000, 0x400000))
print(dog.pid, dog.log_path, flush=True)
time.sleep(float(sys.argv[2]))
os._exit(9)  # dies without detaching, as after a SIGKILL
"""


def test_a_dead_qprobes_sets_the_watchdog_going(tmp_path: Path) -> None:
    """The watchdog connects only once qprobes is gone, holds none of its
    streams, and exits with nothing to do (its directory removed) when
    nobody listens any more."""
    path = str(tmp_path / "gdb.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    # qprobes imported from the checkout it runs in (cwd), not from PYTHONPATH:
    # the watchdog, which runs in /, must still find the same package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TMPDIR"] = str(tmp_path)
    started = time.monotonic()
    # stdout and stderr are pipes: run() returns only when every holder closed them.
    child = subprocess.run(
        [sys.executable, "-c", CHILD, path, "2"], capture_output=True, text=True, env=env,
        cwd=Path(__file__).resolve().parents[2], timeout=60, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    assert child.returncode == 9, child.stderr
    pid_text, log_text = child.stdout.split()
    pid, log = int(pid_text), Path(log_text)
    assert took < 20, "the watchdog held qprobes' stdout or stderr"
    # Nothing connected while the child lived; now the watchdog does.
    ready, _, _ = select.select([listener], [], [], 30)
    assert ready, "the watchdog did not connect after qprobes died"
    conn, _ = listener.accept()
    assert alive(pid)
    # QEMU goes away: the watchdog's handshake fails, its next connect finds
    # no socket, and it says so and exits.
    conn.close()
    listener.close()
    os.unlink(path)
    wait_gone(pid, 60)
    # Nothing to tell: its directory (and log) went with it.
    assert not log.parent.exists(), log.read_text()
    assert list(tmp_path.glob("qprobes-*")) == []
