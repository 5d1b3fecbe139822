"""kprobes on a two-vCPU qtest: probes hit concurrently on both vCPUs.

qtest's `smp N` command makes both CPUs call the SMP-safe targets N times at
once; its call counters are atomic, so they are the exact expected counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.frontends.qtest import TFLAG_SMP, TFLAG_TRAPS, QtestDriver
from qprobes.frontends.session import Session
from qprobes.probes.kprobe import Kprobe
from tests.integration.qtest_fixtures import instructions, qtest_session

pytestmark = [pytest.mark.vm, pytest.mark.serial]

ROUNDS = 100


@pytest.fixture(scope="module")
def guest(qtest_image: object) -> Iterator[tuple[Session, QtestDriver]]:
    with qtest_session(smp=2) as (session, q):
        assert session.target.vcpus == [1, 2]
        yield session, q


@pytest.fixture(autouse=True)
def no_probes_left(guest: tuple[Session, QtestDriver]) -> Iterator[None]:
    yield
    session, _ = guest
    for point in list(session.engine.points.values()):
        for kp in list(point.kprobes):
            session.engine.unregister_kprobe(kp)


def smp_run(session: Session, rounds: int = ROUNDS) -> None:
    # About 50 s single-stepped on an idle machine; more when the host is busy.
    out = session.command(f"smp {rounds}", timeout=300)
    assert f"smp {rounds} cpus=2 ok" in out, out


BRANCHES = ("j", "call", "ret", "loop", "iret", "lcall", "ljmp", "int", "ud")


def entry_block(session: Session, q: QtestDriver, name: str) -> list[int]:
    """The target's instructions up to its first control transfer: each runs
    exactly once per call, whatever the arguments."""
    target = q.by_name[name]
    block = []
    for insn in instructions(session, target):
        # Far indirect calls and jumps are refused (as Linux refuses them).
        probeable = x86insn.analyze(insn).rejected is None
        if insn.mnemonic.startswith(BRANCHES):
            # A target that traps may leave through its exception fixup.
            if not target.flags & TFLAG_TRAPS and probeable:
                block.append(insn.addr)
            break
        assert probeable, insn
        block.append(insn.addr)
    return block


@pytest.mark.parametrize("boost", [True, False], ids=["boosted", "single-step"])
def test_concurrent_hits_on_both_vcpus(guest: tuple[Session, QtestDriver], boost: bool) -> None:
    session, q = guest
    smp_targets = [t for t in q.targets if t.flags & TFLAG_SMP]
    assert {"t_hot", "t_mixed", "t_cli_sti", "t_riprel_gs", "t_call_rel"} <= {
        t.name for t in smp_targets
    }
    lines = {t.name: entry_block(session, q, t.name) for t in smp_targets}
    by_vcpu: Counter[int] = Counter()
    probes: dict[int, tuple[str, Kprobe]] = {}

    def count(kp: Kprobe, ctx: object) -> None:
        by_vcpu[ctx.vcpu] += 1  # type: ignore[attr-defined]

    for name, addrs in lines.items():
        for addr in addrs:
            probes[addr] = (name, session.kprobe(addr, count, boost=boost))
    before = q.calls()
    smp_run(session)
    after = q.calls()
    delta = {t.name: after[t.index] - before[t.index] for t in smp_targets}
    assert all(d >= 2 * ROUNDS for d in delta.values()), delta
    for addr, (name, kp) in probes.items():
        assert kp.nhit == delta[name], f"{name} {addr:#x}: nhit {kp.nhit} != calls {delta[name]}"
    assert set(by_vcpu) == {0, 1}  # 0-based, as the kernel numbers CPUs
    assert sum(by_vcpu.values()) == sum(kp.nhit for _, kp in probes.values())
    assert q.selfcheck() == 0


def test_kretprobe_pairs_returns_on_both_vcpus(guest: tuple[Session, QtestDriver]) -> None:
    session, q = guest
    rets: Counter[int] = Counter()
    bad: list[tuple[int, int]] = []

    def on_ret(rp: object, ctx: object) -> None:
        rets[ctx.vcpu] += 1  # type: ignore[attr-defined]
        arg = ctx.entry_regs["rdi"]  # type: ignore[attr-defined]
        if ctx.retval != arg + 1:  # type: ignore[attr-defined]
            bad.append((arg, ctx.retval))  # type: ignore[attr-defined]

    rp = session.kretprobe("t_hot", on_ret)
    index = q.by_name["t_hot"].index
    before = q.calls()[index]
    smp_run(session)
    calls = q.calls()[index] - before
    assert not bad
    assert set(rets) == {0, 1}
    assert rp.nhit + rp.nmissed == calls
    assert sum(rets.values()) == rp.nhit
    assert not rp.instances and not session.kretprobes.live
    session.unregister(rp)
