"""``--recover`` refuses while the journal's owner may still run: its pid on
its host, started before the journal began (a reused pid names a process
started later); another host cannot be checked."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time

from qprobes.probes.journal import Header, JournalState, owner_still_running, process_started


def header(pid: int, started: float, host: str | None = None) -> Header:
    return Header(JournalState.ACTIVE, 3, pid, float(int(started)),
                  host if host is not None else socket.gethostname()[:32], "0.1", 0, 0, False,
                  0, 0, 0, 0, 0, 0, 0)  # fmt: skip


def test_the_start_time_of_a_process_is_its_wall_clock_start() -> None:
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        when = process_started(child.pid)
        assert when is not None and before - 2 <= when <= time.time() + 2
    finally:
        child.kill()
        child.wait()
    assert process_started(child.pid) is None  # gone


def test_a_live_owner_on_this_host_is_still_running() -> None:
    mine = process_started(os.getpid())
    assert mine is not None
    # This process began a journal after it started (as every owner does).
    why = owner_still_running(header(os.getpid(), time.time()))
    assert why == f"process {os.getpid()} is still running"


def test_a_dead_owner_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert owner_still_running(header(child.pid, time.time())) is None


def test_a_reused_pid_is_another_process() -> None:
    h = header(os.getpid(), time.time() - 3600)  # the journal began an hour ago ...
    later = h.started + 600  # ... and the process now at that pid began after it
    assert owner_still_running(h, started=lambda pid: later) is None
    assert owner_still_running(h, started=lambda pid: h.started - 5) is not None


def test_another_host_cannot_be_checked() -> None:
    h = dataclasses.replace(header(1, time.time()), host="elsewhere")
    why = owner_still_running(h, host="here")
    assert why is not None and "another host (elsewhere; this is here)" in why
