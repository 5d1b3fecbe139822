"""The watchdog: a small process that puts an attached guest back when
qprobes dies without detaching.

When qprobes attaches to a QEMU it did not start (``qprobes trace
--attach``, :meth:`Session.attach <qprobes.frontends.session.Session.attach>`),
it starts ``python -m qprobes.frontends.watchdog`` beside itself, tied to it
by a pipe: qprobes holds the write end, the watchdog the read end. A normal
detach writes :data:`DETACHED` and the watchdog exits 0 at once. End of file
without that message means qprobes ended without detaching (SIGKILL, a
crash): the int3s, gates and page-table entries it wrote are still in the
guest, and QEMU keeps the doorbell watchpoint, so the guest freezes at its
next probe hit. The watchdog then waits for the qprobes process to be gone
(its gdbstub connection closes with it; QEMU 7.2 takes one client at a
time), connects, and runs :meth:`Session.recover` from the journal qprobes
kept in the guest, exactly what ``qprobes attach ADDR --recover`` does. It
writes one line to its log, ``watchdog.log`` in its scratch directory
(``$TMPDIR/qprobes-*``, left for the user to read and removed by the next
qprobes that starts), saying what it restored. A QEMU that is gone leaves
it nothing to do: it removes its directory and exits.

The watchdog runs in a session of its own with its standard streams on
``/dev/null`` and its log, so it holds no terminal or pipe of qprobes'
(a Ctrl-C or hang-up reaches qprobes only), and it never connects to the
gdbstub while qprobes lives. When qprobes launched QEMU itself there is no
watchdog: QEMU dies with qprobes. Where the watchdog cannot run, or is
killed as well, ``qprobes attach ADDR --recover --reserve START:SIZE`` is the
way back.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import qprobes
from qprobes.errors import ConnectionClosedError, MachineError, QprobesError, StubTimeoutError
from qprobes.machine.qemu import (
    OWNER_FILE,
    WORKDIR_PREFIX,
    owner_record,
    process_start_time,
    workdir_parent,
)

#: What qprobes writes to the pipe once it has detached.
DETACHED = b"detached\n"
#: The watchdog's log, in its scratch directory.
LOG_NAME = "watchdog.log"
#: How long the watchdog waits for the gdbstub to take it, after qprobes died.
CONNECT_PATIENCE = 120.0
#: How long a normal detach waits for the watchdog to exit.
EXIT_WAIT = 5.0


class Watchdog:
    """qprobes' side of a running watchdog (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen[bytes], fd: int, workdir: Path) -> None:
        self.proc = proc
        self._fd: int | None = fd
        self.workdir = workdir

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG_NAME

    @classmethod
    def start(cls, address: str, reserve: tuple[int, int]) -> Watchdog:
        """Start a watchdog for the guest at gdbstub ``address`` whose
        journal is in ``reserve``. Raises :class:`MachineError` when it cannot
        be started."""
        try:
            workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=workdir_parent()))
        except OSError as exc:
            raise MachineError(f"cannot start the watchdog: {exc}") from exc
        owner = workdir / OWNER_FILE
        read_fd, write_fd = os.pipe()  # both close on exec; the child gets read_fd only
        try:
            owner.write_text(owner_record("qprobes", os.getpid()))
            start, size = reserve
            args = [sys.executable, "-m", "qprobes.frontends.watchdog", "--fd", str(read_fd),
                    "--parent", str(os.getpid()), "--reserve", f"{start:#x}:{size:#x}",
                    "--workdir", str(workdir),
                    os.path.abspath(address) if os.path.exists(address) else address]  # fmt: skip
            # The same qprobes as this process's, wherever it was imported from
            # (a checkout too): the watchdog runs in / .
            package_root = str(Path(qprobes.__file__).resolve().parent.parent)
            path = os.environ.get("PYTHONPATH")
            env = dict(os.environ, PYTHONPATH=package_root + (os.pathsep + path if path else ""))
            with (workdir / LOG_NAME).open("ab") as log:
                proc = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=(read_fd,), start_new_session=True, cwd="/", env=env,
                )  # fmt: skip
            with owner.open("a") as f:
                f.write(owner_record("watchdog", proc.pid))
        except OSError as exc:
            os.close(write_fd)
            shutil.rmtree(workdir, ignore_errors=True)
            raise MachineError(f"cannot start the watchdog: {exc}") from exc
        finally:
            os.close(read_fd)
        return cls(proc, write_fd, workdir)

    def detached(self) -> None:
        """qprobes detached: the watchdog exits at once, its directory goes."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, DETACHED)
        except OSError:
            pass  # it is gone already
        finally:
            os.close(fd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(EXIT_WAIT)  # else it exits on its own once it reads the message
        shutil.rmtree(self.workdir, ignore_errors=True)

    def abandon(self) -> None:
        """qprobes did not detach cleanly: close the pipe without the
        message; the watchdog recovers the guest once this process is gone."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


# --- the watchdog process ---------------------------------------------------------


def read_until_eof(fd: int) -> bytes:
    """Everything written to the pipe, once its writer closed it."""
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            return bytes(data)
        data += chunk


def wait_gone(pid: int, started: int | None, poll: float = 0.05) -> None:
    """Wait until process ``pid`` (started at ``started``) has ended."""
    while True:
        now = process_start_time(pid)
        if now is None or (started is not None and now != started):
            return
        time.sleep(poll)


def qemu_gone(exc: QprobesError) -> bool:
    """Whether a failed connect says nobody listens at the address any more."""
    cause = exc.__cause__
    return isinstance(exc, ConnectionClosedError) and isinstance(
        cause, (ConnectionRefusedError, FileNotFoundError)
    )


def recover(address: str, reserve: tuple[int, int], say: Callable[[str], None],
            patience: float = CONNECT_PATIENCE,
            recover_once: Callable[[str, tuple[int, int]], str] | None = None,
            ) -> int | None:  # fmt: skip
    """Put the guest at ``address`` back from its journal, trying until the
    gdbstub takes a client (for ``patience`` seconds). Says one line; returns
    the exit status, or None when QEMU is gone (nothing was done)."""
    if recover_once is None:
        recover_once = _session_recover
    deadline = time.monotonic() + patience
    start, size = reserve
    again = f"qprobes attach {address} --recover --reserve {start:#x}:{size:#x}"
    while True:
        try:
            what = recover_once(address, reserve)
        except (ConnectionClosedError, StubTimeoutError) as exc:
            if qemu_gone(exc):
                say(f"QEMU at {address} is gone: nothing to recover ({exc})")
                return None
            if time.monotonic() >= deadline:
                say(f"cannot recover the guest: {exc}; {again} puts it back")
                return 1
            time.sleep(0.5)
            continue
        except QprobesError as exc:
            say(f"cannot recover the guest: {exc}; {again} puts it back")
            return 1
        say(what)
        return 0


def _session_recover(address: str, reserve: tuple[int, int]) -> str:
    from qprobes.frontends.session import Session

    return Session.recover(address, reserve=reserve).describe()


def main(argv: Sequence[str] | None = None) -> int:
    from qprobes.frontends.api import _parse_reserve

    parser = argparse.ArgumentParser(prog="python -m qprobes.frontends.watchdog")
    parser.add_argument("--fd", type=int, required=True, help="the pipe's read end")
    parser.add_argument("--parent", type=int, required=True, help="the qprobes process")
    parser.add_argument("--reserve", required=True, metavar="START:SIZE")
    parser.add_argument("--workdir", type=Path, help="its scratch directory (and log)")
    parser.add_argument("address")
    args = parser.parse_args(argv)
    # A session of its own already; a hang-up or Ctrl-C is not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The one line below says what was done; the engine's notes on the way
    # ("recovering the changes of ...") stay out of the log, its errors do not.
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s qprobes watchdog: %(message)s")
    started = process_start_time(args.parent)
    message = read_until_eof(args.fd)
    os.close(args.fd)
    if DETACHED in message:
        return 0
    wait_gone(args.parent, started)
    when = time.strftime("%Y-%m-%d %H:%M:%S")

    def say(line: str) -> None:
        with contextlib.suppress(OSError):
            print(f"{when} qprobes watchdog: qprobes (pid {args.parent}) ended without "
                  f"detaching; {line}", file=sys.stderr, flush=True)  # fmt: skip

    status = recover(args.address, _parse_reserve(args.reserve), say)
    if status is None:
        # QEMU is gone and qprobes said so: nothing to keep.
        if args.workdir is not None and args.workdir.name.startswith(WORKDIR_PREFIX):
            shutil.rmtree(args.workdir, ignore_errors=True)
        return 0
    return status  # the log stays, for the user; the next qprobes removes it


if __name__ == "__main__":
    sys.exit(main())
