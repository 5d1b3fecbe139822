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
from qprobes.tracing import TraceEvent, TraceProbe, Tracer

pytestmark = pytest.mark.vm

DEFINITIONS = [
    # registers, a user string through a kernel-form fetch, a user struct
    # word, $comm, the stack
    "p:fo do_sys_openat2 dfd=%di:s32 path=+0(%si):string how=+0(%dx):x64 c=$comm s=$stack0:x64",
    # BTF member chains, a kernel string, sizes and signs
    "p:fr vfs_read count name=file->f_path.dentry->d_name.name:string "
    "mode=file->f_mode:x32 low=count:s8",
    # a NULL dereference: (fault) on both paths
    "p:fz do_filp_open z=@0x10:x64 n=+0(@0x10):string dfd=%di:s32",
]
N_OPENS = 25
WORKLOAD = f"sh -c 'echo PID=$$; exec qp-open {N_OPENS} /etc/hostname'"


def _trace(session: Session, fast: bool, definitions: list[str] = DEFINITIONS,
           ) -> tuple[list[TraceEvent], int, Tracer]:  # fmt: skip
    """WORKLOAD's events with ``definitions`` traced, and the doorbell stops
    (int3 and return trampoline) it took."""
    events: list[TraceEvent] = []
    tracer = Tracer(session, events.append, fast=fast)
    stats = session.engine.stats
    try:
        for definition in definitions:
            tracer.add(definition)
        # A hit in flight when the probes changed (the vCPU was stopped in
        # the #BP stub) may still ring once: let it finish before counting.
        session.command("true")
        stops = stats.bp + stats.kret
        out = session.command(WORKLOAD)
        stops = stats.bp + stats.kret - stops
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
        ret = tracer.add("r:fret do_sys_openat2 r=$retval:s32 a=+0(%si):u8[2]")
        assert arr.fast_id == 0 and arr.slow_reason and "arrays" in arr.slow_reason
        assert ret.fast_id == 0 and ret.slow_reason and "arrays" in ret.slow_reason
        linux.command("qp-open 2 /etc/hostname")
        summary = {row["event"]: row for row in tracer.summary()}
    finally:
        for name in list(tracer.probes):
            tracer.remove(name)
    assert any(e.event == "fa" and e.fields["a"] == [ord(c) for c in "/etc"] for e in events)
    assert any(e.event == "fret" for e in events)
    assert not summary["kprobes/fret"]["fast"]


def test_fast_path_sees_what_the_guests_kprobe_events_see(linux: Session) -> None:
    """The guest's own kprobe_events and qprobes' fast path on the same ten
    functions in one run: the same calls with the same arguments, in order."""
    from tests.integration.test_trace_linux import (
        FUNCTIONS,
        first_real_instruction,
        parse_ftrace,
        window,
    )
    from tests.integration.test_trace_linux import (
        WORKLOAD as MIXED,
    )

    events: list[TraceEvent] = []
    tracer = Tracer(linux, events.append, fast=True)
    linux_defs = []
    slow = {}
    for i, name in enumerate(FUNCTIONS):
        off, _ = first_real_instruction(linux, name)
        tp = tracer.add(f"p:qp/e{i} {name}+{off} a=%di b=%si")
        if not tp.fast_id:  # its instruction cannot run boosted: not compared here
            slow[name] = tp.slow_reason
            tracer.remove(tp.name)
            continue
        linux_defs.append(f"p:lx/e{i} {name} a=%di b=%si")
    assert len(slow) <= 2, slow
    assert tracer.add("p:qp/mark tracing_mark_write text=+0(%si):ustring").fast_id
    tr = "/sys/kernel/tracing"
    setup = " && ".join(f"echo '{d}' >> {tr}/kprobe_events" for d in linux_defs)
    try:
        out = linux.command(f"echo > {tr}/trace && {setup} && echo 1 > {tr}/events/lx/enable "
                            "&& echo configured")  # fmt: skip
        assert "configured" in out, out
        linux.command("true")  # see _trace
        stops = linux.engine.stats.bp
        linux.command(f"echo START > {tr}/trace_marker; {MIXED}; echo END > {tr}/trace_marker",
                      timeout=120)  # fmt: skip
        stops = linux.engine.stats.bp - stops
        linux.command(f"echo 0 > {tr}/events/lx/enable")
        trace_text = linux.command(f"cat {tr}/trace", timeout=120)
    finally:
        linux.command(f"echo 0 > {tr}/events/lx/enable; echo > {tr}/kprobe_events")
        for name in list(tracer.probes):
            tracer.remove(name)
    theirs = window(parse_ftrace(trace_text))
    ours_rows = []
    for e in events:
        if e.event == "mark":
            ours_rows.append((e.comm or "", e.pid or 0, "MARK",
                              {"text": str(e.fields["text"]).strip()}))  # fmt: skip
        else:
            ours_rows.append((e.comm or "", e.pid or 0, "e" + e.event[1:],
                              {k: f"{v:#x}" for k, v in e.fields.items()}))  # fmt: skip
    ours = window(ours_rows)
    counts = {name: sum(1 for r in theirs if r[1] == f"e{i}")
              for i, name in enumerate(FUNCTIONS) if name not in slow}  # fmt: skip
    assert all(counts.values()), f"a function never ran in the workload: {counts}"
    assert ours == theirs
    assert stops == 0, f"{stops} doorbell stops on the fast path"
    assert tracer.fast_dropped == 0


def test_two_vcpus_record_in_their_own_rings() -> None:
    """Two processes opening files at once on a 2-vCPU guest: every open is
    recorded once, on the CPU it ran on, with no stop and nothing dropped."""
    from qprobes.errors import QprobesError
    from tests.conftest import require_vm

    try:
        session = Session.linux(smp=2)
    except QprobesError as exc:
        require_vm(f"the 2-vCPU Linux guest cannot be booted: {exc}")
        raise
    n = 2000
    events: list[TraceEvent] = []
    try:
        tracer = Tracer(session, events.append, fast=True)
        tp = tracer.add("p:so do_sys_openat2 path=+0(%si):string")
        assert tp.fast_id, tp.slow_reason
        stops = session.engine.stats.bp
        session.command(f"qp-open {n} /etc/hostname & qp-open {n} /etc/passwd & wait",
                        timeout=300)  # fmt: skip
        stops = session.engine.stats.bp - stops
        tracer.remove("kprobes/so")
    finally:
        session.close()
    by_path: dict[object, set[int | None]] = {}
    for e in events:
        by_path.setdefault(e.fields["path"], set()).add(e.pid)
    hostname = [e for e in events if e.fields["path"] == "/etc/hostname"]
    passwd = [e for e in events if e.fields["path"] == "/etc/passwd"]
    assert (len(hostname), len(passwd)) == (n, n)
    assert len({e.pid for e in hostname}) == 1 and len({e.pid for e in passwd}) == 1
    assert {e.cpu for e in events} == {0, 1}
    assert stops == 0
    assert tracer.fast_dropped == 0
    for cpu in (0, 1):
        stamps = [e.timestamp for e in events if e.cpu == cpu]
        assert stamps == sorted(stamps)


def _dd_drained_at_stops(session: Session, definitions: list[str], n: int
                        ) -> tuple[list[TraceEvent], Tracer, list[TraceProbe], int]:  # fmt: skip
    """``dd`` reading ``n`` bytes one at a time with ``definitions`` traced
    on the fast path and the rings drained only when the guest stops (so
    they fill): the events, the tracer, its probes and the hits full rings
    handed to the host."""
    fast = session.engine.fast
    assert fast is not None
    events: list[TraceEvent] = []
    tracer = Tracer(session, events.append, fast=True)
    hooks = session.engine.poll_hooks
    saved: list[object] = []
    try:
        tps = [tracer.add(d) for d in definitions]
        assert all(tp.fast_id for tp in tps), [tp.slow_reason for tp in tps]
        saved = list(hooks)
        at = hooks.index(fast.poll)
        hooks[at] = lambda running: None if running else fast.poll(False)  # drain at stops only
        spilled = tracer.fast_spilled
        session.command(f"dd if=/dev/zero of=/dev/null bs=1 count={n}", timeout=300)
        spilled = tracer.fast_spilled - spilled
    finally:
        if saved:
            hooks[:] = saved
        for name in list(tracer.probes):
            tracer.remove(name)
    return events, tracer, tps, spilled


def test_a_full_ring_hands_its_hits_to_the_host(linux: Session) -> None:
    """Lossless mode: with the rings drained only when the guest stops,
    8,000 hits overflow them; every hit still becomes exactly one event."""
    n = 8000
    events, tracer, (tp,), spilled = _dd_drained_at_stops(
        linux, ["p:fd vfs_read a=%di b=%si c=%dx d=%cx e=%r8 f=%r9 g=%ax h=%bx"], n)
    reads = [e for e in events if e.comm == "dd" and e.fields["c"] == 1]
    assert len(reads) == n
    assert spilled >= 1
    assert tracer.fast_dropped == 0
    assert tp.fast_hits >= n - spilled


def test_smap_and_pti_guest() -> None:
    """An Intel CPU model: Linux turns SMAP and PTI on. Recorders open user
    access with stac/clac around user reads (a #UD on qemu64, which has no
    SMAP), and record the same events as the slow path."""
    from qprobes.errors import QprobesError
    from tests.conftest import require_vm

    try:
        session = Session.linux(cpu="Skylake-Client")
    except QprobesError as exc:
        require_vm(f"the Skylake-Client Linux guest cannot be booted: {exc}")
        raise
    try:
        assert session.engine.cpu_features().smap
        runs = {}
        for fast in (False, True):
            events: list[TraceEvent] = []
            tracer = Tracer(session, events.append, fast=fast)
            tp = tracer.add("p:so do_sys_openat2 path=+0(%si):string u=+u0(%si):x32 "
                            "k=+0(%si):x16")  # fmt: skip
            assert bool(tp.fast_id) == fast, tp.slow_reason
            session.command("true")
            out = session.command(WORKLOAD)
            tracer.remove("kprobes/so")
            pid = int(re.search(r"PID=(\d+)", out).group(1))  # type: ignore[union-attr]
            runs[fast] = [(e.comm, e.fields) for e in events if e.pid == pid]
        assert len(runs[True]) == N_OPENS + 1
        assert runs[True] == runs[False]
        assert "alive" in session.command("echo alive")
    finally:
        session.close()


def test_cli_trace_fast() -> None:
    """``qprobes trace --fast``: the same lines, a summary that says which
    definitions ran fast, and why the others did not."""
    import json

    from tests.integration.test_trace_linux import qprobes_cli

    proc = qprobes_cli("trace", "--json", "--fast", "p:fo do_sys_openat2 path=+0(%si):string",
                       "r:fr do_sys_openat2 ret=$retval:s32", "--", "qp-open", "3",
                       "/etc/hostname")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    paths = [e["fields"]["path"] for e in events if e["event"] == "fo" and e["comm"] == "qp-open"]
    assert paths[-3:] == ["/etc/hostname"] * 3
    rows = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    summary = {row["summary"]["event"]: row["summary"] for row in rows if "summary" in row}
    # The return probe's entry probe shares the address with fo (an
    # aggregate probe): both run in the guest, through a chain of recorders.
    assert summary["kprobes/fr"]["fast"] is True, summary["kprobes/fr"]
    assert summary["kprobes/fo"]["fast"] is True, summary["kprobes/fo"]
    assert summary["kprobes/fo"]["hits"] == summary["kprobes/fr"]["hits"]


AGGREGATE = [
    "p:ao do_sys_openat2 path=+0(%si):string",
    "r:ar do_sys_openat2 r=$retval:s32 c=$comm",
    "p:ad do_sys_openat2 dfd=%di:s32 how=+0(%dx):x64",
]


def test_probes_sharing_a_function_all_stay_on_the_fast_path(linux: Session) -> None:
    """An entry and a return probe and a second entry probe on one function
    (an aggregate point: one int3 or jump, a chain of recorders): no stop per
    call, and the events of the slow path, field by field."""
    slow, slow_stops, _ = _trace(linux, fast=False, definitions=AGGREGATE)
    fast, fast_stops, tracer = _trace(linux, fast=True, definitions=AGGREGATE)  # every row fast
    opens = [e for e in slow if e.event == "ao" and e.fields["path"] == "/etc/hostname"]
    assert len(opens) == N_OPENS
    assert {e.event for e in slow} == {"ao", "ar", "ad"}
    assert sorted(map(repr, map(_fields, fast))) == sorted(map(repr, map(_fields, slow)))
    # Per call: ao then ad at the entry (the order they were added), ar at the return.
    assert [e.event for e in fast][:3] == ["ao", "ad", "ar"]
    # The slow path: one stop at each call for both entry probes, one at each return.
    assert slow_stops >= 2 * len(opens)
    assert fast_stops == 0
    assert tracer.fast_dropped == 0


def test_a_full_ring_hands_an_aggregate_hit_over_once(linux: Session) -> None:
    """Two fast probes on one address, rings drained only at stops: a chain
    that finds the ring full after the first recorded hands the hit to the
    host, which runs the second's handler only. Every read is one event of
    each, never two."""
    n = 6000
    events, tracer, _tps, spilled = _dd_drained_at_stops(linux, [
        "p:fs vfs_read c=%dx",
        "p:fb vfs_read a=%di b=%si c=%dx d=%cx e=%r8 f=%r9 g=%ax h=%bx",
    ], n)  # fmt: skip
    for event in ("fs", "fb"):
        reads = [e for e in events if e.event == event and e.comm == "dd" and e.fields["c"] == 1]
        assert len(reads) == n, (event, len(reads))
    assert spilled >= 1
    assert tracer.fast_dropped == 0
