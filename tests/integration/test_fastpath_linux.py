"""The fast path on the default Linux guest: the same definitions traced with
recorders in the guest (``Tracer(fast=True)``) and with a stop per hit give
the same events, field by field, over the same workload.

The workload runs in a process whose pid it prints (``exec`` keeps the
shell's pid), so each run's events are told apart from the console's own.
"""

from __future__ import annotations

import re

import pytest

from qprobes.frontends.session import Session
from qprobes.tracing import TraceEvent, Tracer

pytestmark = pytest.mark.vm

DEFINITIONS = [
    # registers, a user string through a kernel-form fetch, a user struct
    # word, $comm, the stack
    "p:fo do_sys_openat2 dfd=%di:s32 path=+0(%si):string how=+0(%dx):x64 c=$comm "
    "s=$stack0:x64",
    # BTF member chains, a kernel string, sizes and signs
    "p:fr vfs_read count name=file->f_path.dentry->d_name.name:string "
    "mode=file->f_mode:x32 low=count:s8",
    # a NULL dereference: (fault) on both paths
    "p:fz do_filp_open z=@0x10:x64 n=+0(@0x10):string dfd=%di:s32",
]
N_OPENS = 25
WORKLOAD = f"sh -c 'echo PID=$$; exec qp-open {N_OPENS} /etc/hostname'"


def _trace(session: Session, fast: bool) -> tuple[list[TraceEvent], int, Tracer]:
    events: list[TraceEvent] = []
    tracer = Tracer(session, events.append, fast=fast)
    try:
        for definition in DEFINITIONS:
            tracer.add(definition)
        stops = session.engine.stats.bp
        out = session.command(WORKLOAD)
        stops = session.engine.stats.bp - stops
    finally:
        summary = tracer.summary()
        for name in list(tracer.probes):
            tracer.remove(name)
    found = re.search(r"PID=(\d+)", out)
    assert found, out
    pid = int(found.group(1))
    if fast:
        assert all(row["fast"] for row in summary), summary
    return [e for e in events if e.pid == pid], stops, tracer


def _fields(e: TraceEvent) -> tuple[object, ...]:
    return (e.group, e.event, e.kind, e.addr, e.location, e.cpu, e.comm, e.fields, e.text)


def test_fast_path_events_equal_slow_path_events(linux: Session) -> None:
    slow, slow_stops, _ = _trace(linux, fast=False)
    fast, fast_stops, tracer = _trace(linux, fast=True)
    opens = [e for e in slow if e.event == "fo" and e.fields["path"] == "/etc/hostname"]
    assert len(opens) == N_OPENS
    assert {e.event for e in slow} == {"fo", "fr", "fz"}
    assert [_fields(e) for e in fast] == [_fields(e) for e in slow]
    assert all(e.fields["z"] == e.fields["n"] for e in fast if e.event == "fz")
    assert "(fault)" in next(e.text for e in fast if e.event == "fz")
    # The slow path stopped for every hit; the fast path for none.
    assert slow_stops >= len(slow)
    assert fast_stops == 0
    assert tracer.fast_dropped == 0
    # Timestamps come from the guest's TSC, in order within the run.
    stamps = [e.timestamp for e in fast]
    assert stamps == sorted(stamps)


def test_a_definition_the_guest_cannot_fetch_stays_slow(linux: Session) -> None:
    events: list[TraceEvent] = []
    tracer = Tracer(linux, events.append, fast=True)
    try:
        arr = tracer.add("p:fa do_sys_openat2 a=+0(%si):u8[4]")
        ret = tracer.add("r:fret do_sys_openat2 r=$retval:s32")
        assert arr.fast_id == 0 and arr.slow_reason and "arrays" in arr.slow_reason
        assert ret.fast_id == 0 and ret.slow_reason
        linux.command("qp-open 2 /etc/hostname")
    finally:
        for name in list(tracer.probes):
            tracer.remove(name)
    assert any(e.event == "fa" and e.fields["a"] == [ord(c) for c in "/etc"] for e in events)
    assert any(e.event == "fret" for e in events)
