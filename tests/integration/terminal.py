"""The qprobes CLI on a real pseudo-terminal, as a user's terminal runs it."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time

CLI = [sys.executable, "-m", "qprobes.frontends.cli"]


class PtySession:
    """The CLI on a new pseudo-terminal as its controlling terminal."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: stdin/stdout/stderr are the terminal
            try:
                argv = [sys.executable, *CLI[1:], *args]
                os.execve(sys.executable, argv, env if env is not None else os.environ)
            finally:
                os._exit(127)
        self.output = b""

    def read_until(self, needle: bytes, timeout: float, start: int = 0) -> bytes:
        """Read until ``needle`` shows in the output from offset ``start`` on."""
        deadline = time.monotonic() + timeout
        while needle not in self.output[start:]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {needle!r} in {timeout} s: {self.output[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"EOF before {needle!r}: {self.output[-2000:]!r}")
                self.output += data
        return self.output

    def send(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")  # the terminal's VINTR: SIGINT to the foreground group

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._drain()
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"still running after {timeout} s: {self.output[-2000:]!r}")
            self._drain(0.2)

    def _drain(self, timeout: float = 0.0) -> None:
        while select.select([self.fd], [], [], timeout)[0]:
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return
            self.output += data
            timeout = 0.0
