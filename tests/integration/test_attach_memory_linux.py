"""The fast path on a QEMU qprobes attached to: how the rings are drained.

One 2-vCPU guest, started as someone else's QEMU would be, with its RAM in
a shared file (``memory-backend-file,share=on``) and two busy loops opening
``/etc/hostname``. Each test attaches, traces ``do_sys_openat2`` on the
fast path for a few seconds and detaches:

- the QEMU at the other end of the socket runs on this host, so its RAM is
  read through ``/proc/PID/mem`` and the rings drain while the guest runs;
- ``--guest-memory FILE`` reads the shared file instead;
- with neither, the engine stops the guest a few times a second to drain,
  not once per hit;
- a file that is not this guest's RAM is refused in one line before
  anything is written.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qprobes.errors import TargetError
from qprobes.frontends.session import Session
from qprobes.machine.linux import LINUX_PROMPT
from qprobes.machine.qemu import QemuMachine
from qprobes.target.hostmem import FileMemory
from qprobes.tracing import TraceEvent, Tracer
from tests.integration.attached import BAD, CLI, busy_guest, snapshot

pytestmark = pytest.mark.vm

DEFINITION = "p:op do_sys_openat2 path=+0(%si):string"
SECONDS = 4.0


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[QemuMachine, Path, list[int]]]:
    ram = tmp_path_factory.mktemp("ram") / "guest.ram"
    machine, addrs = busy_guest([
        "-object", f"memory-backend-file,id=qpram,size={{memory_mib}}M,mem-path={ram},share=on",
        "-machine", "memory-backend=qpram",
    ])  # fmt: skip
    try:
        yield machine, ram, addrs
    finally:
        machine.shutdown()


def _trace(session: Session) -> tuple[list[TraceEvent], int, int]:
    """Trace for a while: the events, the stops and the drain stops."""
    events: list[TraceEvent] = []
    tracer = Tracer(session, events.append, fast=True)
    try:
        tracer.add(DEFINITION)
        assert all(row["fast"] for row in tracer.summary())
        fast = session.engine.fast
        assert fast is not None
        stops, batches = session.engine.stats.stops, fast.batches
        session.run(timeout=SECONDS)
        stops, batches = session.engine.stats.stops - stops, fast.batches - batches
    finally:
        for name in list(tracer.probes):
            tracer.remove(name)
    return events, stops, batches


def _check_events(events: list[TraceEvent]) -> None:
    assert len(events) > 50, len(events)
    paths = [e.fields["path"] for e in events]
    assert paths.count("/etc/hostname") > len(events) // 6, paths[:20]
    assert {e.clock for e in events} == {"local"}, {e.clock for e in events}
    # In order on each CPU. (Across the two, a record still being appended
    # on one vCPU when a drain reads the rings comes out with the next
    # drain, after later records of the other: as with ftrace's trace_pipe.)
    for cpu in {e.cpu for e in events}:
        stamps = [e.timestamp_ns for e in events if e.cpu == cpu]
        assert stamps == sorted(stamps), cpu


def _check_guest(machine: QemuMachine, before: dict[str, str], addrs: list[int]) -> None:
    assert snapshot(str(machine.gdb_socket), addrs) == before
    mark = len(machine.console_text())
    out = machine.console.command("dmesg | tail -n 40; echo qp-alive", LINUX_PROMPT,
                                  timeout=120)  # fmt: skip
    assert "qp-alive" in str(out)
    text = machine.console_text()[mark:]
    assert not BAD.search(text), text[-2000:]


def test_a_local_qemu_is_read_through_its_process_memory(
    shared: tuple[QemuMachine, Path, list[int]],
) -> None:
    machine, _, addrs = shared
    before = snapshot(str(machine.gdb_socket), addrs)
    session = Session.attach(str(machine.gdb_socket), reserve=machine.config.reserved,
                             linux=True, watchdog=False)  # fmt: skip
    try:
        assert session.hostmem is not None and session.hostmem.pid == machine.pid
        events, stops, batches = _trace(session)
    finally:
        session.close()
    _check_events(events)
    # The rings are read while the guest runs: no stop per hit, no drain stops.
    assert batches == 0
    assert stops < len(events) / 20, (stops, len(events))
    _check_guest(machine, before, addrs)


def test_without_host_memory_the_rings_drain_in_short_stops(
    shared: tuple[QemuMachine, Path, list[int]],
) -> None:
    machine, _, addrs = shared
    before = snapshot(str(machine.gdb_socket), addrs)
    session = Session.attach(str(machine.gdb_socket), reserve=machine.config.reserved,
                             linux=True, watchdog=False, host_memory=False)  # fmt: skip
    try:
        assert session.hostmem is None
        events, stops, batches = _trace(session)
    finally:
        session.close()
    _check_events(events)
    # A few stops a second (0.2 s apart), each draining many hits.
    assert 3 <= batches <= SECONDS / 0.2 + 2, batches
    assert stops < len(events) / 5, (stops, len(events))
    _check_guest(machine, before, addrs)


def test_guest_memory_file(shared: tuple[QemuMachine, Path, list[int]]) -> None:
    machine, ram, addrs = shared
    before = snapshot(str(machine.gdb_socket), addrs)
    session = Session.attach(str(machine.gdb_socket), reserve=machine.config.reserved,
                             linux=True, watchdog=False, guest_memory=ram)  # fmt: skip
    try:
        assert isinstance(session.hostmem, FileMemory)
        events, stops, batches = _trace(session)
    finally:
        session.close()
    _check_events(events)
    assert batches == 0
    assert stops < len(events) / 20, (stops, len(events))
    _check_guest(machine, before, addrs)


def test_a_file_that_is_not_the_guests_ram_is_refused(shared: tuple[QemuMachine, Path, list[int]],
                                                      tmp_path: Path) -> None:  # fmt: skip
    machine, ram, addrs = shared
    before = snapshot(str(machine.gdb_socket), addrs)
    other = tmp_path / "other.ram"
    with open(other, "wb") as f:
        f.truncate(os.path.getsize(ram))
    with pytest.raises(TargetError, match="not this guest's"):
        Session.attach(str(machine.gdb_socket), reserve=machine.config.reserved,
                       linux=True, watchdog=False, guest_memory=other)  # fmt: skip
    start, size = machine.config.reserved
    proc = subprocess.run(
        [*CLI, "trace", "--attach", str(machine.gdb_socket), "--reserve",
         f"{start:#x}:{size:#x}", "--no-watchdog", "--guest-memory", str(other), DEFINITION],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not this guest's" in lines[0], proc.stderr
    time.sleep(0.5)
    _check_guest(machine, before, addrs)
