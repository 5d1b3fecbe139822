"""The soak: 30 probes on the hot paths of a 2-vCPU Linux guest under a
mixed workload, then detach; the same code for the suite's short form
(``test_soak_linux.py``, about 2 minutes) and ``scripts/soak.sh`` (longer).

What it checks, in :func:`soak`: every probe hit; every ``nmissed`` has a
counted cause (``engine.stats.reentered`` for kprobes, the return-probe
manager's ``stats.missed`` by cause; no return address lost); no probe
lost; the guest's console and dmesg hold no WARN/BUG/Oops; after detach
the probed functions' text, every IDT, the kernel half of the top-level page
table and the page directory that mapped the area hash as before attaching;
the guest answers during the run and afterwards.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from qprobes.frontends.session import Session
from qprobes.machine.linux import LINUX_HOSTNAME, LINUX_PROMPT
from qprobes.target.paging import ADDR_MASK
from qprobes.tracing import Tracer
from qprobes.tracing.ast import ProbeSpec
from qprobes.tracing.events import TraceEvent
from qprobes.tracing.parser import parse_probe

#: Recorded in the guest (fast path): the hottest entries.
FAST = [
    "p:spin_lock _raw_spin_lock lock=%di:x64",
    "p:spin_lock_irqsave _raw_spin_lock_irqsave lock=%di:x64",
    "p:spin_unlock_irqrestore _raw_spin_unlock_irqrestore flags=%si:x64",
    "p:spin_lock_irq _raw_spin_lock_irq",
    "p:cache_alloc kmem_cache_alloc cache=%di:x64 gfp=%si:x32",
    "p:cache_free kmem_cache_free cache=%di:x64",
    "p:kmalloc __kmalloc size=%di:u64 gfp=%si:x32",
    "p:kfree kfree ptr=%di:x64",
    "p:kmalloc_trace kmalloc_trace size=%dx:u64",
    "p:update_curr update_curr",
    "p:dput dput",
    "p:fput fput",
]
#: Handled on the host, one stop per hit; return probes with explicit maxactive.
SLOW = [
    "p:mm_fault handle_mm_fault addr=%si:x64 flags=%dx:x32",
    "p:map_pages filemap_map_pages start=%si:u64 end=%dx:u64",
    "p:do_fault __do_fault",
    "p:wp_page do_wp_page",
    "p:wake try_to_wake_up state=%si:x32",
    "p:enqueue enqueue_task_fair flags=%dx:x32",
    "p:dequeue dequeue_task_fair flags=%dx:x32",
    "p:pick pick_next_task_fair",
    "p:tick scheduler_tick",
    "p:write ksys_write fd=%di:s32 count=%dx:u64",
    "p:close close_fd fd=%di:s32",
    "p:execve __x64_sys_execve",
    "r16:openat_ret do_sys_openat2 ret=$retval:s64",
    "r32:read_ret vfs_read ret=$retval:s64",
    "r16:write_ret vfs_write ret=$retval:s64",
    "r8:fault_ret __handle_mm_fault ret=$retval:x32",
    "r16:lru_ret kmem_cache_alloc_lru ret=$retval:x64",
    "r8:path_ret path_openat ret=$retval:x64",
]
PROBES = FAST + SLOW
assert len(PROBES) == 30

#: Background loops: spin locks and slab (ls, cat), file I/O (dd, sort),
#: fork/exec/page faults and wake-ups (sh -c, awk, sleep).
WORKLOAD = [
    "(while :; do cat /etc/hostname >/dev/null; ls -l /proc >/dev/null 2>&1; done) &",
    "(while :; do dd if=/dev/zero of=/tmp/qp-soak bs=4k count=32 2>/dev/null; "
    "sort /tmp/qp-soak >/dev/null; rm -f /tmp/qp-soak; done) &",
    "(while :; do sh -c 'echo $$' >/dev/null; "
    "awk 'BEGIN{for(i=0;i<2000;i++)a[i]=i}'; sleep 0.1; done) &",
]
#: What a broken guest prints.
BAD = re.compile(
    r"BUG:|Oops|WARNING:|general protection|unable to handle|Kernel panic|double fault|"
    r"invalid opcode|soft lockup|hard LOCKUP|rcu_sched detected|rcu: INFO|qprobes-guest: ready"
)
#: How often the console is asked whether the guest still answers.
PING_EVERY = 15.0


@dataclass
class SoakResult:
    seconds: float = 0.0
    hits: dict[str, int] = field(default_factory=dict)
    missed: dict[str, int] = field(default_factory=dict)
    causes: dict[str, int] = field(default_factory=dict)
    fast_dropped: int = 0
    fast_spilled: int = 0
    pings: int = 0
    slowest_ping: float = 0.0
    lost: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    explained: bool = False
    answered: bool = False
    alive: bool = False
    events: deque[TraceEvent] = field(default_factory=lambda: deque(maxlen=2000))

    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())

    def line(self) -> str:
        return (f"soak: {self.seconds:.0f} s, {len(self.hits)} probes, {self.total_hits} hits, "
                f"{sum(self.missed.values())} missed {dict(self.causes)}, fast path "
                f"{self.fast_dropped} dropped / {self.fast_spilled} spilled, {self.pings} pings "
                f"(slowest {self.slowest_ping:.1f} s), {len(self.lost)} lost, "
                f"{len(self.bad)} bad console lines, {len(self.changed)} hashes changed, "
                f"misses explained: {self.explained}, guest alive and answering after "
                f"detach: {self.alive and self.answered}")  # fmt: skip


def snapshot(session: Session, functions: list[int]) -> dict[str, str]:
    """Hashes of what qprobes writes (guest stopped): each probed function's
    text, every IDT, the kernel half of the top-level page table, the page
    directory that maps the area."""
    engine, target = session.engine, session.target
    assert session.symbols is not None
    out = {}
    for addr in functions:
        found = session.symbols.resolve(addr)
        size = found[0].size if found is not None and found[0].size else 64
        out[f"text {addr:#x}"] = hashlib.sha256(engine.kread(addr, size)).hexdigest()
    for vcpu in target.vcpus:
        idt = target.idt(vcpu)
        paddr = target.translate(idt.base, vcpu).paddr
        out[f"idt{vcpu}"] = hashlib.sha256(target.read_phys(paddr, idt.limit + 1)).hexdigest()
    root = target.registers().cr3 & ~0x1FFF & ((1 << 52) - 1)
    out["pgd"] = hashlib.sha256(target.read_phys(root + 8 * 256, 8 * 256)).hexdigest()
    vbase = engine.area.vbase
    pud = target.read_phys_u64(root + 8 * ((vbase >> 39) & 511)) & ADDR_MASK
    pmd = target.read_phys_u64(pud + 8 * ((vbase >> 30) & 511)) & ADDR_MASK
    out["pmd"] = hashlib.sha256(target.read_phys(pmd, 4096)).hexdigest()
    return out


def bad_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if BAD.search(line) and "grep" not in line]


def _console_and_dmesg(session: Session, seconds: float) -> str:
    """Let the guest run alone (detached) for ``seconds``; what it printed and its dmesg."""
    assert session.machine is not None
    console = session.machine.console
    out = bytearray()
    session.target.resume()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out += console.tube.recv(4096, timeout=max(0.05, end - time.monotonic()))
    console.sendline("echo qp-dmesg-start; dmesg; echo qp-dmesg-end")
    out += console.recvuntil(b"qp-dmesg-end\r\n", timeout=120)
    out += console.recvuntil(LINUX_PROMPT, timeout=120)
    console.sendline("cat /etc/hostname")
    out += console.recvuntil(LINUX_PROMPT, timeout=120)
    return out.decode(errors="replace")


def soak(session: Session, seconds: float, log: Any = None) -> SoakResult:
    """Run the soak on ``session`` (a 2-vCPU default Linux guest, attached)."""
    engine = session.engine
    assert session.symbols is not None and session.machine is not None
    result = SoakResult()
    for line in WORKLOAD:
        session.command(line)
    counts: Counter[str] = Counter()

    def sink(event: TraceEvent) -> None:
        counts[event.event] += 1
        result.events.append(event)

    functions = []
    for definition in PROBES:
        spec = parse_probe(definition)
        assert isinstance(spec, ProbeSpec) and spec.symbol is not None
        functions.append(session.symbols.address(spec.symbol))
    engine.detach()  # start from the guest as it is without qprobes
    before = snapshot(session, functions)
    mark = len(session.machine.console_text())
    engine.attach()
    fast_tracer, slow_tracer = Tracer(session, sink, fast=True), Tracer(session, sink)
    for tracer, defs in ((fast_tracer, FAST), (slow_tracer, SLOW)):
        for definition in defs:
            tracer.add(definition)
    start = time.monotonic()
    end = start + seconds
    ping = 0
    while time.monotonic() < end:
        session.run(timeout=min(PING_EVERY, max(0.1, end - time.monotonic())))
        fast_tracer.drain()
        ping += 1
        asked = time.monotonic()
        out = session.command(f"echo qp-ping-{ping}", timeout=180)
        took = time.monotonic() - asked
        assert f"qp-ping-{ping}" in out, out[-300:]
        result.pings += 1
        result.slowest_ping = max(result.slowest_ping, took)
        if log is not None:
            log(f"soak: {time.monotonic() - start:.0f} s, {sum(counts.values())} events, "
                f"ping {took:.1f} s")  # fmt: skip
    result.seconds = time.monotonic() - start
    fast_tracer.drain()
    for tracer in (fast_tracer, slow_tracer):
        for name, tp in tracer.probes.items():
            result.hits[name] = tp.nhit
            result.missed[name] = tp.nmissed
            if tp.lost:
                result.lost.append(f"{name}: {tp.lost_why}")
    result.fast_dropped = fast_tracer.fast_dropped
    result.fast_spilled = fast_tracer.fast_spilled
    kprobes_missed = sum(tp.kprobe.nmissed for t in (fast_tracer, slow_tracer)
                         for tp in t.probes.values() if tp.kprobe is not None)  # fmt: skip
    kret_entry_missed = sum(tp.probe.kp.nmissed for tp in slow_tracer.probes.values()
                            if tp.spec.is_return and tp.probe is not None)  # fmt: skip
    stats = session.kretprobes.stats
    result.causes = {"kprobe reentered": engine.stats.reentered, **stats.missed,
                     "return address lost": stats.lost}  # fmt: skip
    result.causes = {k: v for k, v in result.causes.items() if v}
    # Each miss explained: reentries are the kprobes' misses (return probes'
    # entry kprobes too), the manager's causes the return probes'.
    result.explained = (kprobes_missed + kret_entry_missed == engine.stats.reentered
                        and sum(tp.nmissed for tp in slow_tracer.probes.values()
                                if tp.spec.is_return) == sum(stats.missed.values())
                        and stats.lost == 0)  # fmt: skip
    engine.detach()
    after_text = _console_and_dmesg(session, 5.0)
    session.engine._stop_quietly()
    after = snapshot(session, functions)
    result.changed = [k for k in before if before[k] != after.get(k)]
    result.bad = bad_lines(session.machine.console_text()[mark:]) + bad_lines(after_text)
    result.answered = LINUX_HOSTNAME in after_text.split("qp-dmesg-end")[-1]
    result.alive = session.machine.alive()
    return result
