"""Signals that end a trace, scratch directories left by a killed qprobes, and
the console lines shown when a guest dies (no guest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qprobes.errors import GuestDiedError
from qprobes.frontends.session import console_tail
from qprobes.frontends.signals import (
    EXIT_SIGNALS,
    PLEASE_WAIT,
    Interrupted,
    SignalGuard,
    exit_status,
    held_until_exit,
)
from qprobes.machine.qemu import (
    KEPT_FILE,
    LEGACY_STALE_AFTER,
    OWNER_FILE,
    clean_stale_workdirs,
    owner_record,
    owners_alive,
)


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_a_deferred_signal_is_noted_and_the_rest_wait_for_the_detach(
    signum: int, status: int
) -> None:
    said: list[str] = []
    with SignalGuard(said.append) as guard:
        os.kill(os.getpid(), signum)
        assert guard.signum == signum and guard.status == status
        assert said == []
        for again in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(os.getpid(), again)  # ignored: the process lives on
        assert said == [PLEASE_WAIT]  # once
        assert guard.signum == signum and guard.repeats == 3
    assert exit_status(signum) == status
    # The handlers in force before are back.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_in_the_cli_a_guard_that_saw_a_signal_leaves_them_ignored_until_exit() -> None:
    """After the detach the CLI exits 128 + the first signal; a SIGTERM that
    comes between the guard's end and the exit must not kill it (-15)."""
    said: list[str] = []
    before = {signum: signal.getsignal(signum) for signum in EXIT_SIGNALS}
    try:
        with held_until_exit():
            with SignalGuard(said.append) as quiet:
                pass
            assert quiet.signum is None
            # A guard that saw no signal restored what it found.
            assert {s: signal.getsignal(s) for s in EXIT_SIGNALS} == before
            with SignalGuard(said.append) as guard:
                os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # after the guard: ignored
            assert guard.signum == signal.SIGTERM and said == []
            assert all(signal.getsignal(s) is signal.SIG_IGN for s in EXIT_SIGNALS)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def test_a_signal_while_booting_raises_and_the_clean_up_is_not_interrupted() -> None:
    said: list[str] = []
    with SignalGuard(said.append, raising=True) as guard:
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # not reached: the handler raises at once
        assert info.value.status == 143 and isinstance(info.value, KeyboardInterrupt)
        os.kill(os.getpid(), signal.SIGHUP)  # during the clean-up: noted only
        assert guard.signum == signal.SIGTERM and said == [PLEASE_WAIT]


def test_a_first_signal_while_restoring_the_guest_says_so() -> None:
    said: list[str] = []
    with SignalGuard(said.append, raising=True) as guard:
        guard.closing()
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
    assert guard.status == 129 and said == [PLEASE_WAIT]


def test_detaching_turns_raising_off() -> None:
    with SignalGuard(lambda _: None, raising=True) as guard:
        guard.detaching()
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.received()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def workdir(parent: Path, name: str, owner: str | None, age: float = 0.0) -> Path:
    path = parent / name
    path.mkdir()
    (path / "console.log").write_text("x")
    if owner is not None:
        (path / OWNER_FILE).write_text(owner)
    when = time.time() - age
    for p in (*path.iterdir(), path):
        os.utime(p, (when, when))
    return path


def test_stale_workdirs_go_and_live_ones_stay(tmp_path: Path) -> None:
    dead = dead_pid()
    live = owner_record("qprobes", os.getpid())
    gone = f"qprobes {dead} 12345\nqemu {dead} 12346\n"
    reused = f"qprobes {os.getpid()} 1\n"  # this pid, but another process's start time
    half = f"qprobes {dead} 1\n" + owner_record("qemu", os.getpid())  # QEMU still runs
    dirs = {
        "dead": workdir(tmp_path, "qprobes-dead", gone),
        "reused": workdir(tmp_path, "qprobes-reused", reused),
        "live": workdir(tmp_path, "qprobes-live", live),
        "half": workdir(tmp_path, "qprobes-half", half),
        "empty-owner": workdir(tmp_path, "qprobes-writing", ""),
        "legacy-old": workdir(tmp_path, "qprobes-legacy", None, age=LEGACY_STALE_AFTER + 60),
        "legacy-new": workdir(tmp_path, "qprobes-fresh", None, age=10),
        "other": workdir(tmp_path, "pwn-asm-x", gone),
        "kept": workdir(tmp_path, "qprobes-kept", gone),
    }
    (dirs["kept"] / KEPT_FILE).touch()  # QPROBES_KEEP_WORKDIR=1 kept it
    removed = clean_stale_workdirs(tmp_path)
    assert sorted(removed) == sorted([dirs["dead"], dirs["reused"], dirs["legacy-old"]])
    for name, path in dirs.items():
        assert path.exists() == (path not in removed), name


def test_a_legacy_workdir_a_process_names_stays(tmp_path: Path) -> None:
    path = workdir(tmp_path, "qprobes-inuse", None, age=LEGACY_STALE_AFTER + 60)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(path)])
    try:
        # Popen returns before the child has exec'd: wait until its command line names the path.
        cmdline = Path(f"/proc/{holder.pid}/cmdline")
        for _ in range(500):
            if str(path).encode() in cmdline.read_bytes():
                break
            time.sleep(0.01)
        assert clean_stale_workdirs(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()
    assert clean_stale_workdirs(tmp_path) == [path]


def test_owner_records_name_this_process() -> None:
    assert owners_alive(owner_record("qprobes", os.getpid()))
    assert not owners_alive(owner_record("qprobes", dead_pid()))


PANIC = """\
qprobes-guest# cat /etc/hostname
qprobes-guest
\x1b[0m[    2.66] sysrq: Trigger a crash\r
[    2.67] Kernel panic - not syncing: sysrq triggered crash\r
[    2.67] CPU: 0 PID: 92 Comm: sh Not tainted 6.1.0-56-cloud-amd64 #1
[    2.67] Call Trace:
[    2.67]  <TASK>
[    2.67]  panic+0x118/0x2f4
[    2.67]  sysrq_handle_crash+0x16/0x20
[    2.68]  </TASK>
[    2.68] Kernel Offset: disabled

"""


def test_the_console_tail_of_a_panic_starts_at_its_report() -> None:
    tail, panicked = console_tail(PANIC)
    assert panicked
    assert tail[0] == "[    2.66] sysrq: Trigger a crash"
    assert tail[-1] == "[    2.68] Kernel Offset: disabled"
    assert any("sysrq_handle_crash" in line for line in tail)


def test_the_console_tail_without_a_panic_is_its_last_lines() -> None:
    text = "".join(f"line {i}\r\n" for i in range(100))
    tail, panicked = console_tail(text)
    assert not panicked
    assert tail == [f"line {i}" for i in range(85, 100)]


def test_a_guest_died_error_is_one_line_then_the_console() -> None:
    exc = GuestDiedError("the guest panicked (QEMU exited with status 0)", ["a", "b"])
    first, *rest = str(exc).splitlines()
    assert first == "the guest panicked (QEMU exited with status 0); the last lines of its console:"
    assert rest == ["    a", "    b"]


def test_a_panic_of_its_own_shows_the_lines_before_it() -> None:
    text = "".join(f"boot {i}\n" for i in range(30)) + (
        "[ 2.9] /dev/root: Can't open blockdev\n"
        "[ 2.9] Kernel panic - not syncing: VFS: Unable to mount root fs\n"
        "[ 2.9] Call Trace:\n"
    )
    tail, panicked = console_tail(text)
    assert panicked
    assert tail[:4] == ["boot 26", "boot 27", "boot 28", "boot 29"]
    assert tail[4:] == ["[ 2.9] /dev/root: Can't open blockdev",
                        "[ 2.9] Kernel panic - not syncing: VFS: Unable to mount root fs",
                        "[ 2.9] Call Trace:"]  # fmt: skip


def test_a_zombie_owner_is_dead() -> None:
    """A QEMU that outlived its qprobes is reparented; where nothing reaps it
    (a container's init), it stays a zombie, and must count as gone."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        record = owner_record("qemu", child.pid)
        assert owners_alive(record)
        assert child.stdin is not None
        child.stdin.close()  # it exits; not reaped yet: a zombie
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not owners_alive(record)
    finally:
        child.wait()
