"""A real gdb, driven through gdb/MI (pygdbmi): the baseline of ``qprobes bench``.

gdb connects to the gdbstub of a guest qprobes booted (qprobes lets go of
the stub first: it serves one client), puts ``break *ADDR`` with
``commands`` / ``silent`` / ``continue`` / ``end`` on it, and continues;
the benchmark types the workload on the guest's console meanwhile. The
records gdb prints while the target runs are read on a thread, so that its
stdout pipe never fills.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from qprobes.errors import QprobesError


class GdbError(QprobesError):
    """gdb did not answer as expected (an MI error, a timeout)."""


@dataclass
class GdbTrace:
    """What gdb sends and receives per hit (from ``set debug remote 1``)."""

    hits: int = 0
    stop_replies: int = 0
    packets_sent: int = 0
    sent_kinds: dict[str, int] = field(default_factory=dict)


def mi_version(binary: str) -> str:
    """mi4 when gdb has it (13 and later), else mi3.

    In MI 3 a breakpoint's ``script`` field is ``{"silent","continue"}``,
    which is not valid MI: pygdbmi 0.11 loops forever parsing it inside
    ``-break-info``'s table (and misparses it in ``=breakpoint-modified``).
    MI 4 prints it as a list.
    """
    probe = subprocess.run(
        [binary, "--nx", "--batch", "--interpreter=mi4"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return "mi4" if probe.returncode == 0 and "unrecognized" not in probe.stderr else "mi3"


def packet_kind(packet: str) -> str:
    """A remote packet's kind for counting: ``vCont``, one letter for memory,
    register and breakpoint packets (``m``, ``Z``, ``g`` ...), else its name."""
    if packet.startswith("vCont"):
        return "vCont"
    if packet[:1] in tuple("zZmMgGpP"):
        return packet[:1]
    return packet


class Gdb:
    """A gdb/MI process with a reader for the records it prints while the target runs."""

    def __init__(self, binary: str) -> None:
        from pygdbmi.gdbcontroller import GdbController

        self.mi = mi_version(binary)
        self.ctl = GdbController(command=[binary, "--nx", "--quiet", f"--interpreter={self.mi}"])
        self._token = 100
        self._pending: list[dict[str, Any]] = []
        self._stop_drain = threading.Event()
        self._drain_thread: threading.Thread | None = None

    def _read(self, timeout: float) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.ctl.get_gdb_response(
            timeout_sec=timeout, raise_error_on_timeout=False
        )
        return records

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> list[dict[str, Any]]:
        """Read records until one matches; returns all records read."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while True:
            records, self._pending = self._pending, []
            if not records:
                records = self._read(0.05)
            for i, rec in enumerate(records):
                if match(rec):
                    seen += records[: i + 1]
                    self._pending = records[i + 1 :]
                    return seen
            seen += records
            if time.monotonic() > deadline:
                raise GdbError(f"gdb: no {what} within {timeout} s; got {seen[-5:]}")

    def command_records(self, cmd: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Send an MI command; returns the records up to its result (an error raises)."""
        if self._drain_thread is not None:
            raise GdbError("stop draining before sending commands")
        self._token += 1
        token = self._token
        self.ctl.write(f"{token}{cmd}", read_response=False)
        records = self.wait_for(
            lambda r: r.get("type") == "result" and r.get("token") == token, timeout, cmd
        )
        if records[-1].get("message") == "error":
            raise GdbError(f"gdb: {cmd}: {records[-1].get('payload')}")
        return records

    def command(self, cmd: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send an MI command and return its result record (an error raises)."""
        return self.command_records(cmd, timeout)[-1]

    def console(self, line: str) -> str:
        """A CLI command's console output."""
        records = self.command_records(f'-interpreter-exec console "{line}"')
        return "".join(str(r.get("payload")) for r in records if r.get("type") == "console")

    def wait_stopped(self, timeout: float = 10.0) -> None:
        self.wait_for(
            lambda r: r.get("type") == "notify" and r.get("message") == "stopped",
            timeout,
            "*stopped",
        )

    def interrupt(self) -> None:
        """Stop the running target and wait for its ``*stopped``."""
        self.command("-exec-interrupt")
        self.wait_stopped()

    @contextmanager
    def draining(self) -> Iterator[list[dict[str, Any]]]:
        """Read gdb's output on a thread while the target runs; yields the
        list the records go to."""
        records = list(self._pending)
        self._pending = []
        self._stop_drain.clear()

        def loop() -> None:
            while not self._stop_drain.is_set():
                records.extend(self._read(0.05))

        self._drain_thread = threading.Thread(target=loop, daemon=True)
        self._drain_thread.start()
        try:
            yield records
        finally:
            self._stop_drain.set()
            self._drain_thread.join()
            self._drain_thread = None

    def hit_count(self, bp: str) -> int:
        """Breakpoint ``bp``'s hit count (the target must be stopped).

        Read from ``info breakpoints`` text rather than ``-break-info``, whose
        MI 3 form pygdbmi cannot parse (see :func:`mi_version`).
        """
        found = re.search(r"already hit (\d+) times?", self.console(f"info breakpoints {bp}"))
        return int(found.group(1)) if found else 0

    def close(self) -> None:
        self.ctl.exit()


def remote_log_counts(records: list[dict[str, Any]], trace: GdbTrace) -> None:
    """Count stop replies and packets sent in ``set debug remote 1`` log records."""
    for rec in records:
        text = rec.get("payload")
        if rec.get("type") != "log" or not isinstance(text, str):
            continue
        if "Packet received: T" in text or "Packet received: S" in text:
            trace.stop_replies += 1
        sent = re.search(r"Sending packet: \$([A-Za-z?]+)", text)
        if sent:
            trace.packets_sent += 1
            kind = packet_kind(sent.group(1))
            trace.sent_kinds[kind] = trace.sent_kinds.get(kind, 0) + 1
