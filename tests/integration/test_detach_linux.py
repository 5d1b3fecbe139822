"""Detaching from a busy Linux guest that keeps running afterwards.

A hot boosted probe (``_raw_spin_lock_irqsave``) on 2 vCPUs with busy shell
loops: a vCPU sent into a slot can take an interrupt (or, with
``preempt=full``, be preempted) before the slot's instruction runs, and the
slot rip then sits in a frame on some stack. Detach must wait until nothing
points into qprobes' area before unmapping it; the guest runs on and its
dmesg must stay clean, and the kernel's text, IDT and page tables must hash
as before. Several attach/detach cycles per guest (the old detach oopsed
the guest in about one detach in four).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator

import pytest

from qprobes.errors import QprobesError
from qprobes.frontends.session import Session
from qprobes.machine.linux import LINUX_PROMPT, linux_config
from qprobes.machine.qemu import QemuMachine
from qprobes.probes.area import REGION_SIZE
from qprobes.target.paging import ADDR_MASK
from tests.conftest import require_vm

pytestmark = [pytest.mark.vm, pytest.mark.serial]

PROBE = "_raw_spin_lock_irqsave"
LOOP = "(while :; do cat /etc/hostname >/dev/null; ls /proc >/dev/null 2>&1; done) &"
BAD = re.compile(
    r"BUG:|Oops|WARNING:|general protection|unable to handle|page fault|Kernel panic|"
    r"double fault|invalid opcode|qprobes-guest: ready"
)
CYCLES = 3


def boot(append: str = "") -> Session:
    try:
        session = Session.linux(linux_config(append=f"qprobes.echo=0 {append}", smp=2))
    except QprobesError as exc:
        require_vm(f"the default Linux guest cannot be booted: {exc}")
        raise
    return session


def snapshot(session: Session) -> dict[str, str]:
    """Hashes of what qprobes writes: the probed function's text, every IDT,
    the kernel half of the top-level page table and the page-table page that
    maps the area (guest stopped)."""
    engine = session.engine
    assert session.symbols is not None
    target = session.target
    out = {}
    addr = session.symbols.address(PROBE)
    out["text"] = hashlib.sha256(engine.kread(addr & ~0xFFF, 8192)).hexdigest()
    for vcpu in target.vcpus:
        idt = target.idt(vcpu)
        paddr = target.translate(idt.base, vcpu).paddr
        out[f"idt{vcpu}"] = hashlib.sha256(target.read_phys(paddr, idt.limit + 1)).hexdigest()
    root = target.registers().cr3 & ~0x1FFF & ((1 << 52) - 1)
    out["pgd"] = hashlib.sha256(target.read_phys(root + 8 * 256, 8 * 256)).hexdigest()
    # The page directory that holds the area's entry (4-level paging).
    vbase = engine.area.vbase
    pud = target.read_phys_u64(root + 8 * ((vbase >> 39) & 511)) & ADDR_MASK
    pmd = target.read_phys_u64(pud + 8 * ((vbase >> 30) & 511)) & ADDR_MASK
    out["pmd"] = hashlib.sha256(target.read_phys(pmd, 4096)).hexdigest()
    return out


def console_after(session: Session, seconds: float) -> str:
    """Let the guest run alone for ``seconds``, then return what it printed
    meanwhile and its whole dmesg (through the console)."""
    assert session.machine is not None
    console = session.machine.console
    out = bytearray()
    session.target.resume()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out += console.tube.recv(4096, timeout=max(0.05, end - time.monotonic()))
    console.sendline("echo qp-dmesg-start; dmesg; echo qp-dmesg-end")
    out += console.recvuntil(b"qp-dmesg-end\r\n", timeout=60)
    console.recvuntil(LINUX_PROMPT, timeout=60)
    session.engine._stop_quietly()
    return out.decode(errors="replace")


def bad_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if BAD.search(line)]


def detach_cycles(session: Session, cycles: int) -> list[int]:
    """Attach, arm the hot probe, run, detach mid-run, let the guest run on; per cycle."""
    engine = session.engine
    for _ in range(2):
        session.command(LOOP)
    engine.detach()  # Session.linux attached: start from a clean guest
    before = snapshot(session)
    hits = []
    for cycle in range(cycles):
        engine.attach()
        assert engine.stack_scanner is not None
        kp = session.kprobe(PROBE, lambda kp, ctx: False)
        assert engine.points[kp.arm_addr].boosted  # type: ignore[index]
        session.run(timeout=2)
        hits.append(kp.nhit)
        engine.detach()
        assert not engine.attached
        text = console_after(session, 2)
        assert not bad_lines(text), (cycle, bad_lines(text)[:5])
        assert snapshot(session) == before, f"cycle {cycle}: what qprobes wrote is not undone"
    return hits


@pytest.fixture(scope="module")
def voluntary() -> Iterator[Session]:
    session = boot()
    try:
        yield session
    finally:
        session.close()


def test_detach_under_load_leaves_the_guest_running(voluntary: Session) -> None:
    hits = detach_cycles(voluntary, CYCLES)
    assert all(n > 50 for n in hits), hits  # the probe was hot in every cycle


def test_detach_under_load_with_full_preemption() -> None:
    session = boot("preempt=full")
    try:
        hits = detach_cycles(session, CYCLES)
        assert all(n > 50 for n in hits), hits
    finally:
        session.close()


def test_area_is_released_only_when_no_stack_points_in(voluntary: Session) -> None:
    """The scan sees the references the old detach ignored: with the probe
    hot, some live stack or vCPU soon holds a slot address; after detach's
    wait none does and the area is unmapped."""
    engine = voluntary.engine
    engine.attach()
    try:
        kp = voluntary.kprobe(PROBE, lambda kp, ctx: False)
        lo = engine.area.vbase
        seen: list[str] = []
        for _ in range(20):
            voluntary.run(timeout=0.3)
            blocking, scan = engine.area_references(lo, lo + REGION_SIZE)
            assert scan is not None and scan.tasks > 20
            seen += [b for b in blocking if "holds" in b]
            if seen:
                break
        assert seen, "no stack ever held a slot address while the probe was hot"
    finally:
        engine.detach()
    assert not kp.registered or not engine.points
    # Unmapped: the slot page is gone from the guest's page tables.
    with pytest.raises(QprobesError):
        engine._kphys(lo + 32 * 4096)


def test_kretprobe_detach_with_a_task_asleep_in_the_function(voluntary: Session) -> None:
    """A task asleep in a return-probed function holds the trampoline as its
    return address: the scan sees it; detach writes the real one back and
    checks that nothing points at the trampoline before unmapping it."""
    engine = voluntary.engine
    engine.attach()
    returns = []
    voluntary.kretprobe("do_nanosleep", lambda rp, ctx: returns.append(ctx.retval))
    # Not a job of the interactive shell: busybox ash on this console exits
    # when a background job of its own ends while the guest runs unattended.
    voluntary.command("sh -c '(sleep 3; echo slept >/tmp/slept) &'")
    voluntary.run(timeout=0.5)
    lo = engine.area.vbase
    blocking, _ = engine.area_references(lo, lo + REGION_SIZE)
    tramp = voluntary.kretprobes.trampoline
    assert any(f"holds {tramp:#x}" in b for b in blocking), blocking
    engine.detach()
    out = console_after(voluntary, 4)
    assert not bad_lines(out), bad_lines(out)[:5]
    assert "slept" in voluntary.command("cat /tmp/slept")


def test_detach_in_attach_mode_leaves_the_guest_running() -> None:
    """A QEMU started elsewhere, its gdbstub released; qprobes attaches, arms
    the hot probe under load, detaches (Session.close), and the guest runs on."""
    machine = QemuMachine(linux_config(append="qprobes.echo=0", smp=2))
    try:
        machine.launch()
    except QprobesError as exc:
        require_vm(f"cannot launch QEMU: {exc}")
    try:
        machine.target.resume()
        machine.console.recvuntil(LINUX_PROMPT, timeout=120)
        for _ in range(2):
            machine.console.command(LOOP, LINUX_PROMPT)
        machine.release_gdbstub()
        for _cycle in range(2):
            session = Session.attach(str(machine.gdb_socket), reserve=machine.config.reserved,
                                     linux=True)  # fmt: skip
            try:
                assert session.engine.stack_scanner is not None
                kp = session.kprobe(PROBE, lambda kp, ctx: False)
                session.run(timeout=3)
                assert kp.nhit > 50
            finally:
                mark = len(machine.console_text())
                session.close()
            time.sleep(2)
            machine.console.sendline("echo qp-dmesg-start; dmesg; echo qp-dmesg-end")
            dmesg = machine.console.recvuntil(b"qp-dmesg-end\r\n", timeout=60).decode(
                errors="replace"
            )
            printed = machine.console_text()[mark:]
            assert not bad_lines(printed + dmesg), bad_lines(printed + dmesg)[:5]
    finally:
        machine.shutdown()
