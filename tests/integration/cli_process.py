"""The qprobes CLI as a subprocess, its output in files, its scratch
directories in a temporary directory of the test's own."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from qprobes.machine.qemu import SOCKET_PATH_MAX
from tests.integration.terminal import CLI


class CliProcess:
    """``qprobes ARGS`` with stdout and stderr in files under ``tmp`` and
    ``TMPDIR=tmp/scratch`` (where its QEMU's scratch directory goes)."""

    def __init__(self, args: list[str], tmp: Path, scratch: Path | None = None) -> None:
        tmp.mkdir(exist_ok=True)
        self.out_path = tmp / "stdout"
        self.err_path = tmp / "stderr"
        self.scratch = tmp / "scratch" if scratch is None else scratch
        if scratch is None and len(str(self.scratch)) > SOCKET_PATH_MAX:
            # Too deep for the sockets in QEMU's scratch directory (pytest's
            # temporary directories under xdist): a short one of the test's own.
            self.scratch = Path(tempfile.mkdtemp(prefix="qpt-", dir="/tmp"))
        self.scratch.mkdir(exist_ok=True)
        env = dict(os.environ, TMPDIR=str(self.scratch))
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen([*CLI, *args], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, env=env)  # fmt: skip
        self.pid = self.proc.pid

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, needle: str, *, stream: str = "stderr", timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while needle not in (self.stdout if stream == "stdout" else self.stderr):
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {needle!r}:\n"
                                     f"{self.stderr[-3000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"no {needle!r} in {timeout} s:\n{self.stderr[-3000:]}")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"still running after {timeout} s:\n{self.stderr[-3000:]}"
            ) from None

    def qemu_pid(self, timeout: float = 60) -> int:
        """The QEMU qprobes started (its child)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in children(self.pid):
                if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            time.sleep(0.05)
        raise AssertionError("qprobes started no QEMU")


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def processes_naming(path: Path) -> list[int]:
    """Processes with ``path`` in their command line (a QEMU names its scratch directory)."""
    needle = str(path).encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
        except OSError:
            continue
    return out


def left_behind(scratch: Path, timeout: float = 10) -> list[Path]:
    """The qprobes scratch directories still in ``scratch`` (QEMU given a
    moment to exit) and, as a failure, any process still naming one."""
    deadline = time.monotonic() + timeout
    while processes_naming(scratch) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_naming(scratch), "a QEMU outlived qprobes"
    return sorted(scratch.glob("qprobes-*"))
