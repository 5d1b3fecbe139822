"""What the tests of attached sessions share: the busy loop, the hot
probes, the bad dmesg lines, and hashes of what qprobes writes."""

from __future__ import annotations

import hashlib
import re
import sys

from qprobes.machine.qemu import attach

LOOP = "(while :; do cat /etc/hostname >/dev/null; ls /proc >/dev/null 2>&1; done) &"
BAD = re.compile(r"BUG:|Oops|WARNING:|general protection|unable to handle|Kernel panic|"
                 r"double fault|invalid opcode|soft lockup|rcu_sched detected")  # fmt: skip
CLI = [sys.executable, "-m", "qprobes.frontends.cli"]
#: Hot probes, and a return probe that a sleeping task holds.
HOT = ["p:lk _raw_spin_lock_irqsave", "p:op do_sys_openat2 path=+0(%si):string",
       "r:ns hrtimer_nanosleep", "r:rd vfs_read"]  # fmt: skip


def snapshot(address: str, text_addrs: list[int]) -> dict[str, str]:
    """Hashes of each IDT and of the probed functions' text pages."""
    target = attach(address)
    try:
        with target.stopped():
            out = {}
            for vcpu in target.vcpus:
                idt = target.idt(vcpu)
                paddr = target.translate(idt.base, vcpu).paddr
                out[f"idt{vcpu}"] = hashlib.sha256(
                    target.read_phys(paddr, idt.limit + 1)
                ).hexdigest()
            for addr in text_addrs:
                out[f"{addr:#x}"] = hashlib.sha256(target.read(addr & ~0xFFF, 4096)).hexdigest()
            return out
    finally:
        target.client.detach()
        target.client.close()
