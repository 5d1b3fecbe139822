"""Lossless mode over many hits: the fast path's count equals the guest's own.

A 2-vCPU guest; qprobes' fast-path probe and the guest's own kprobe_events
on ``do_sys_openat2`` in the same run, the guest's counted by a hist
trigger keyed on the pid. Two processes open files at once, 100,000 times
between them (``QPROBES_LOSSLESS_HITS`` sets the total); for each of the
two pids, qprobes' events and the guest's hitcount are equal, nothing was
dropped, and no hit needed a stop unless a full ring handed it over (then
it is counted, and still an event).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator

import pytest

from qprobes.errors import QprobesError
from qprobes.frontends.session import Session
from qprobes.tracing import TraceEvent, Tracer
from tests.conftest import require_vm

pytestmark = pytest.mark.vm

HITS = int(os.environ.get("QPROBES_LOSSLESS_HITS", "100000"))
TR = "/sys/kernel/tracing"


@pytest.fixture(scope="module")
def linux2() -> Iterator[Session]:
    try:
        session = Session.linux(smp=2)
    except QprobesError as exc:
        require_vm(f"the 2-vCPU Linux guest cannot be booted: {exc}")
        raise
    try:
        yield session
    finally:
        session.close()


def test_every_hit_is_an_event_and_the_guest_counts_the_same(linux2: Session) -> None:
    session = linux2
    per = HITS // 2
    events: list[TraceEvent] = []
    tracer = Tracer(session, events.append, fast=True)
    tp = tracer.add("p:ll do_sys_openat2 path=+0(%si):string")
    assert tp.fast_id, tp.slow_reason
    fast = session.engine.fast
    assert fast is not None
    spilled, stops = fast.spilled, session.engine.stats.bp
    try:
        out = session.command(
            f"echo 'p:qpl/opens do_sys_openat2' >> {TR}/kprobe_events && "
            f"echo 'hist:keys=common_pid:size=1024' > {TR}/events/qpl/opens/trigger && "
            "echo configured",
        )
        assert "configured" in out, out
        session.command(
            f"qp-open {per} /etc/hostname >/dev/null & qp-open {per} /etc/passwd >/dev/null & wait",
            timeout=3600,
        )
        hist = session.command(f"cat {TR}/events/qpl/opens/hist", timeout=120)
        tracer.drain()
        spilled, stops = fast.spilled - spilled, session.engine.stats.bp - stops
    finally:
        session.command(f"echo '!hist:keys=common_pid:size=1024' > {TR}/events/qpl/opens/trigger; "
                        f"echo '-:qpl/opens' >> {TR}/kprobe_events")  # fmt: skip
        tracer.remove(tp.name)
    theirs = {int(pid): int(n) for pid, n in
              re.findall(r"common_pid:\s*(\d+)\s*\}\s*hitcount:\s*(\d+)", hist)}  # fmt: skip
    by_path: dict[str, Counter[int]] = {}
    for e in events:
        by_path.setdefault(str(e.fields["path"]), Counter())[e.pid or 0] += 1
    for path in ("/etc/hostname", "/etc/passwd"):
        ((pid, n),) = by_path[path].most_common(1)
        # The process that opened this file `per` times is one workload
        # process; its other opens (its script) count on both sides too.
        assert n == per, (path, by_path[path].most_common(3))
        ours = sum(1 for e in events if e.pid == pid)
        assert theirs.get(pid) == ours, (path, pid, theirs.get(pid), ours)
    assert tracer.fast_dropped == 0
    # A hit takes a stop only when a full ring hands it to the host.
    assert stops <= spilled, (stops, spilled)
    assert {e.cpu for e in events} == {0, 1}
