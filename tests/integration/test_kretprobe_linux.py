"""Return probes on the default Linux guest (issue 7 items 2, 3 and 10).

Two return probes on one function; a return probe on a function and on the
one it tail-calls (``__x64_sys_newuname`` ends in ``jmp __do_sys_newuname``
on the default 6.1 guest, checked below); instances of a call that never
returns (``do_exit``) reclaimed; and a return probe next to a hot kprobe on
two vCPUs, where an interrupt inside the trampoline used to make the host
answer the wrong frame.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.errors import QprobesError
from qprobes.frontends.session import Session
from qprobes.probes.context import HitContext
from qprobes.probes.kretprobe import Kretprobe
from tests.conftest import require_vm

pytestmark = [pytest.mark.vm, pytest.mark.serial]

ITEM10_PROBES = ["p:a _raw_spin_lock", "r:c kmem_cache_alloc"]
ITEM10_COMMAND = "for i in 1 2 3 4 5 6 7 8; do cat /etc/hostname >/dev/null & done; wait"


def boot(smp: int = 1) -> Session:
    try:
        return Session.linux(smp=smp)
    except QprobesError as exc:
        require_vm(f"the default Linux guest cannot be booted: {exc}")
        raise


@pytest.fixture(scope="module")
def linux() -> Iterator[Session]:
    session = boot()
    try:
        yield session
    finally:
        session.close()


def where(session: Session, addr: int) -> str:
    assert session.symbols is not None
    found = session.symbols.resolve(addr)
    assert found is not None, f"{addr:#x} is in no function"
    return found[0].name


Record = list[tuple[int, int, int]]


def recorder(out: Record) -> object:
    def handler(rp: Kretprobe, ctx: HitContext) -> None:
        assert ctx.ret_addr is not None and ctx.retval is not None
        out.append((ctx.ret_addr, ctx.retval, ctx.entry_regs["rdi"] if ctx.entry_regs else 0))

    return handler


def test_two_return_probes_on_one_function(linux: Session) -> None:
    first: Record = []
    second: Record = []
    c = linux.kretprobe("do_sys_openat2", recorder(first))
    d = linux.kretprobe("do_sys_openat2", recorder(second))
    try:
        out = linux.command("cat /etc/hostname")
    finally:
        linux.unregister(d)
        linux.unregister(c)
    assert "qprobes" in out  # the guest's hostname: the open worked
    assert first and first == second
    assert {where(linux, ret) for ret, _, _ in first} <= {"__x64_sys_openat", "__x64_sys_open"}
    assert any(rv == 3 for _, rv, _ in first)  # cat's open of /etc/hostname
    assert c.nmissed == d.nmissed == 0 and c.nhit == d.nhit == len(first)
    assert linux.kretprobes.stats.chained >= len(first)
    assert not linux.kretprobes.live and linux.kretprobes.stats.lost == 0


def test_two_return_probes_through_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qprobes.frontends.cli", "trace",
         "r:c do_sys_openat2 rv=$retval", "r:d do_sys_openat2 $retval",
         "--", "cat /etc/hostname"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    hits = re.findall(r"\b([cd]): \((\S+) <- do_sys_openat2\)", proc.stdout)
    assert {name for name, _ in hits} == {"c", "d"}
    assert all(ret.startswith("__x64_sys_openat+") for _, ret in hits), proc.stdout


def test_return_probes_on_a_function_and_its_tail_callee(linux: Session) -> None:
    assert linux.symbols is not None
    caller = linux.symbols.lookup("__x64_sys_newuname")
    callee = linux.symbols.address("__do_sys_newuname")
    code = linux.engine.kread(caller.addr, caller.size)
    pos, jumps = 0, []
    while pos < len(code):
        insn = x86insn.decode(code[pos:], caller.addr + pos)
        if code[pos] == 0xE9:
            jumps.append(caller.addr + pos + 5 + int.from_bytes(code[pos + 1 : pos + 5], "little",
                                                                signed=True))  # fmt: skip
        pos += insn.length
    assert callee in jumps, "__x64_sys_newuname no longer tail-calls __do_sys_newuname"

    outer: Record = []
    inner: Record = []
    rf = linux.kretprobe("__x64_sys_newuname", recorder(outer))
    rg = linux.kretprobe("__do_sys_newuname", recorder(inner))
    chained = linux.kretprobes.stats.chained
    try:
        out = linux.command("uname -s")
    finally:
        linux.unregister(rg)
        linux.unregister(rf)
    assert "Linux" in out
    assert outer and len(outer) == len(inner)
    assert [(ret, rv) for ret, rv, _ in outer] == [(ret, rv) for ret, rv, _ in inner]
    assert {where(linux, ret) for ret, _, _ in outer} == {"do_syscall_64"}
    assert all(rv == 0 for _, rv, _ in outer)
    assert linux.kretprobes.stats.chained - chained == len(outer)
    assert rf.nmissed == rg.nmissed == 0


def test_instances_of_calls_that_never_return_are_reclaimed(linux: Session) -> None:
    """do_exit never returns: each exiting task leaves an instance behind.
    With maxactive=1, every exit after the first found none free before."""
    returned: Record = []
    rp = linux.kretprobe("do_exit", recorder(returned), maxactive=1)
    try:
        linux.command("for i in 1 2 3 4 5 6; do cat /dev/null; done")
    finally:
        linux.unregister(rp)
    assert rp.kp.nhit >= 6
    assert rp.nmissed == 0, f"{rp.nmissed} of {rp.kp.nhit} exits found no free instance"
    assert rp.nreclaimed >= rp.kp.nhit - 1
    assert not returned


def test_kretprobe_with_a_hot_kprobe_on_two_vcpus_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qprobes.frontends.cli", "trace", "--smp", "2",
         *ITEM10_PROBES, "--", ITEM10_COMMAND],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = dict(re.findall(r"kprobes/(\w): (\d+) hits", proc.stderr))
    assert int(counts["a"]) > 0 and int(counts["c"]) > 0, proc.stderr[-2000:]
    assert "trampoline" not in proc.stderr


def test_kretprobe_with_a_hot_kprobe_on_two_vcpus_api() -> None:
    session = boot(smp=2)
    try:
        locks = []
        session.kprobe("_raw_spin_lock", lambda kp, ctx: locks.append(ctx.vcpu) and None)
        returns: Record = []
        rp = session.kretprobe("kmem_cache_alloc", recorder(returns))
        session.command(ITEM10_COMMAND, timeout=300)
        session.engine.detach()
        assert locks and returns and set(locks) == {0, 1}  # 0-based CPU numbers
        stats = session.kretprobes.stats
        assert stats.lost == 0 and stats.orphans == 0, stats
        assert rp.nhit == len(returns)
        assert all(where(session, ret) != "kmem_cache_alloc" for ret, _, _ in returns)
        # Nothing of qprobes' is left running: the guest still answers.
        assert "alive" in session.command("echo alive", timeout=60)
    finally:
        session.close()
