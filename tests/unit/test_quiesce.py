"""The host's synchronize_rcu_tasks() with a fake guest: the engine waits
until the stack scanner finds nothing pointing into the area, runs the guest
between looks, and gives up with a clear error, never unmapping under a task."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from qprobes.errors import QuiesceError
from qprobes.probes.area import AREA_SPAN, REGION_SIZE
from qprobes.probes.engine import PAGE_SLOTS_FIRST, KprobeEngine
from qprobes.probes.quiesce import CpuState, StackRef, StackScan
from qprobes.target.registers import Registers

VBASE = 0xFFFFFFFF83A00000
SLOT = VBASE + PAGE_SLOTS_FIRST * 4096
TRAMP = VBASE + 0x400
STACK = 0xFFFFC90000004000


class FakeClient:
    running = False


class FakeTarget:
    def __init__(self) -> None:
        self.client = FakeClient()
        self.vcpus = [1, 2]
        self.rip = {1: 0xFFFFFFFF81000000, 2: 0xFFFFFFFF81000010}

    def registers(self, vcpu: int) -> Registers:
        return Registers(rip=self.rip[vcpu], rsp=STACK - 64 * vcpu, cs=0x10)


class FakeScanner:
    """Answers a scripted sequence of scans, then the last one forever."""

    def __init__(self, scans: list[StackScan]) -> None:
        self.scans = scans
        self.looks: list[list[CpuState]] = []

    def scan(self, lo: int, hi: int, cpus: Sequence[CpuState]) -> StackScan:
        assert (lo, hi) == (VBASE, VBASE + AREA_SPAN) or VBASE <= lo < hi <= VBASE + REGION_SIZE
        self.looks.append(list(cpus))
        i = min(len(self.looks), len(self.scans)) - 1
        s = self.scans[i]
        return StackScan(refs=list(s.refs), undecided=list(s.undecided), nvcsw=dict(s.nvcsw),
                         quiescent=set(s.quiescent), tasks=s.tasks)  # fmt: skip


def make(scans: list[StackScan]) -> tuple[KprobeEngine, FakeScanner, list[float]]:
    target = FakeTarget()
    engine = KprobeEngine(target, (0x7C00000, 4 << 20), 0xFFFFFFFF81000000)  # type: ignore[arg-type]
    engine.area.vbase = VBASE
    scanner = FakeScanner(scans)
    engine.stack_scanner = scanner
    runs: list[float] = []
    engine.run = lambda until=None, timeout=None, poll=0.002: runs.append(timeout)  # type: ignore[method-assign,assignment]
    return engine, scanner, runs


def ref(value: int, task: int | None = 7) -> StackRef:
    return StackRef(STACK - 0x100, value, "task 7 (sh)" if task else "CPU 0 IRQ stack", task)


def test_waits_until_no_stack_points_in() -> None:
    busy = StackScan(refs=[ref(SLOT, task=None)], nvcsw={7: 3})
    engine, scanner, runs = make([busy, busy, busy, StackScan(nvcsw={7: 3})])
    engine.synchronize_area(5.0)
    assert len(scanner.looks) == 4 and len(runs) == 3  # the guest ran between looks
    assert [c.cpu for c in scanner.looks[0]] == [0, 1]  # QEMU thread id - 1


def test_a_vcpu_inside_the_area_blocks() -> None:
    engine, _, runs = make([StackScan()])
    engine.target.rip[2] = SLOT + 3  # type: ignore[attr-defined]

    def leave(until: object = None, timeout: float | None = None, poll: float = 0.0) -> None:
        runs.append(timeout or 0.0)
        engine.target.rip[2] = 0xFFFFFFFF81000020  # type: ignore[attr-defined]

    engine.run = leave  # type: ignore[method-assign,assignment]
    engine.synchronize_area(5.0)
    assert len(runs) == 1


def test_a_voluntary_switch_clears_a_stale_slot_word_but_not_the_trampoline() -> None:
    first = StackScan(refs=[ref(SLOT)], nvcsw={7: 3})
    later = StackScan(refs=[ref(SLOT)], nvcsw={7: 4})  # the word stays; the task slept since
    engine, _, runs = make([first, later])
    engine.synchronize_area(5.0)
    assert len(runs) == 1

    first = StackScan(refs=[ref(TRAMP)], nvcsw={7: 3})
    later = StackScan(refs=[ref(TRAMP)], nvcsw={7: 4})
    engine, _, runs = make([first, later])
    stuck = r"1 reference into .*task 7 \(sh\) holds 0xffffffff83a00400"
    with pytest.raises(QuiesceError, match=stuck):
        engine.synchronize_area(0.2)
    assert runs  # it did wait


def test_a_sleeper_clears_stale_stub_words_but_not_the_trampolines_entry() -> None:
    """What the soak found: the console's shell, asleep for the whole detach,
    with stale words from an interrupt at the trampoline's ``ret`` and from
    an int3 stub's recorder call."""
    from qprobes.probes.stubs import Stubs

    ret = TRAMP + 0x9A  # the trampoline's ret after popfq
    call = VBASE + 0xCB  # after the int3 stub's call of a recorder
    outside = VBASE + 0x1000 + 0x10  # another area page: not the stubs'
    for word, blocks in ((ret, False), (call, False), (TRAMP, True), (outside, True)):
        asleep = StackScan(refs=[ref(word)], nvcsw={7: 3}, quiescent={7})
        engine, _, runs = make([asleep])
        engine._stubs = Stubs(b"", {"qp_kretprobe_trampoline": TRAMP})
        if blocks:
            with pytest.raises(QuiesceError, match=f"holds {word:#x}"):
                engine.synchronize_area(0.2)
        else:
            engine.synchronize_area(0.2)
            assert not runs, hex(word)  # clear at the first look
    # Awake and not switched since the wait began: even a stub word blocks.
    engine, _, _ = make([StackScan(refs=[ref(call)], nvcsw={7: 3})])
    engine._stubs = Stubs(b"", {"qp_kretprobe_trampoline": TRAMP})
    with pytest.raises(QuiesceError):
        engine.synchronize_area(0.2)


def test_allowed_values_do_not_block() -> None:
    engine, _, runs = make([StackScan(refs=[ref(TRAMP)], nvcsw={7: 3})])
    engine.synchronize_area(1.0, allow=frozenset({TRAMP}))
    assert not runs


def test_dirty_slots_are_collected_only_when_unreferenced() -> None:
    other = SLOT + 32
    engine, _, runs = make([StackScan(refs=[ref(SLOT + 5)])])
    assert engine._collect_garbage_slots([SLOT, other]) == [other]
    assert not runs  # one look, the guest is not run


class Recorder:
    trampoline = TRAMP

    def __init__(self, calls: list[str], name: str) -> None:
        self.calls, self.name = calls, name

    def detach(self) -> None:
        self.calls.append(self.name)


def detach_failing(failure: BaseException) -> tuple[KprobeEngine, list[str]]:
    """An attached engine whose first area synchronization raises ``failure``."""
    engine, _, _ = make([StackScan()])
    calls: list[str] = []
    engine.attached = True
    engine.drain = lambda timeout=10.0: None  # type: ignore[method-assign,assignment]
    engine.kretprobes = Recorder(calls, "kretprobes")  # type: ignore[assignment]
    engine.jprobes = Recorder(calls, "jprobes")  # type: ignore[assignment]

    def sync(timeout: float = 30.0, *, allow: frozenset[int] = frozenset()) -> None:
        raise failure

    engine.synchronize_area = sync  # type: ignore[method-assign,assignment]
    engine._restore_gates = lambda: calls.append("gates")  # type: ignore[method-assign]
    engine._step_out_of_area = lambda max_steps=10_000: calls.append("step out")  # type: ignore[method-assign,assignment]
    engine.target.remove_watchpoint = lambda *a: calls.append("watchpoint")  # type: ignore[attr-defined]
    engine.area._written.append((0x1000, 0))  # an entry of the area, in the guest
    engine.area.teardown = lambda: calls.append("unmapped")  # type: ignore[method-assign]
    return engine, calls


@pytest.mark.parametrize("failure", [QuiesceError("still in use", ["task 7"]),
                                     RuntimeError("unexpected stop")])  # fmt: skip
def test_a_failed_detach_leaves_no_way_into_the_stubs(failure: BaseException) -> None:
    """Whatever fails after the int3s are out: the return addresses and the
    gates go back and no vCPU stays in a stub, but the area stays mapped and
    forgotten (a later attach never unmaps it under whatever points in)."""
    engine, calls = detach_failing(failure)
    with pytest.raises(type(failure)):
        engine.detach()
    assert calls == ["kretprobes", "jprobes", "gates", "step out", "watchpoint"], calls
    assert not engine.attached
    assert engine.area._written == []  # forgotten, not written back


def test_a_dropped_connection_keeps_the_engine_attached_for_a_retry() -> None:
    from qprobes.errors import ConnectionClosedError

    engine, calls = detach_failing(ConnectionClosedError("gone"))
    with pytest.raises(ConnectionClosedError):
        engine.detach()
    assert engine.attached and calls == []
