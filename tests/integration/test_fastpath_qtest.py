"""The fast path on qtest (no Linux: the CPU from cpuid's APIC ID, no task):
the same events as the slow path for direct calls of ``t_hot``, with no stop."""

from __future__ import annotations

import pytest

from qprobes.tracing import TraceEvent, Tracer
from tests.integration.qtest_fixtures import qtest_session

pytestmark = pytest.mark.vm


def test_fast_path_on_qtest() -> None:
    n = 500
    with qtest_session() as (session, driver):
        runs: dict[bool, tuple[list[TraceEvent], int]] = {}
        for fast in (False, True):
            events: list[TraceEvent] = []
            tracer = Tracer(session, events.append, fast=fast)
            tp = tracer.add("p:q/h t_hot a=%di b=%si:s32 sp=$stack s0=$stack0 ip=%ip:x64")
            assert bool(tp.fast_id) == fast, tp.slow_reason
            driver.hot(1)  # a hit in flight at the switch rings once: let it pass
            stops = session.engine.stats.bp
            driver.hot(n)
            runs[fast] = (events, session.engine.stats.bp - stops)
            tracer.remove("q/h")
        slow, slow_stops = runs[False]
        fast_events, fast_stops = runs[True]
        assert len(slow) == len(fast_events) == n + 1
        key = [(e.cpu, e.pid, e.comm, e.fields, e.text) for e in slow[1:]]
        assert [(e.cpu, e.pid, e.comm, e.fields, e.text) for e in fast_events[1:]] == key
        assert slow_stops == n and fast_stops == 0
        assert fast_events[-1].pid is None and fast_events[-1].cpu == 0
