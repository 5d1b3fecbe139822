"""What the tests of attached sessions share: the busy loop, the hot
probes, the bad dmesg lines, and hashes of what qprobes writes."""

from __future__ import annotations

import hashlib
import re
import sys

from qprobes.errors import QprobesError
from qprobes.machine.linux import LINUX_PROMPT, linux_config
from qprobes.machine.qemu import QemuMachine, attach
from tests.conftest import require_vm

LOOP = "(while :; do cat /etc/hostname >/dev/null; ls /proc >/dev/null 2>&1; done) &"
BAD = re.compile(r"BUG:|Oops|WARNING:|general protection|unable to handle|Kernel panic|"
                 r"double fault|invalid opcode|soft lockup|rcu_sched detected")  # fmt: skip
CLI = [sys.executable, "-m", "qprobes.frontends.cli"]
#: The functions HOT probes, whose text the tests hash.
PROBED = ["_raw_spin_lock_irqsave", "do_sys_openat2", "vfs_read", "hrtimer_nanosleep"]
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


def busy_guest(extra_args: list[str] | None = None) -> tuple[QemuMachine, list[int]]:
    """A 2-vCPU Linux guest started as someone else's QEMU would be (with
    ``extra_args`` for QEMU; ``{memory_mib}`` in them is the guest's RAM in
    MiB), two busy loops running, its gdbstub released; and the addresses of
    :data:`PROBED` (from its /proc/kallsyms). The caller shuts the machine down."""
    config = linux_config(append="qprobes.echo=0", smp=2)
    config.extra_args += [a.format(memory_mib=config.memory_mib) for a in extra_args or []]
    machine = QemuMachine(config)
    try:
        machine.launch()
    except QprobesError as exc:
        require_vm(f"cannot launch QEMU: {exc}")
    try:
        machine.target.resume()
        machine.console.recvuntil(LINUX_PROMPT, timeout=120)
        for _ in range(2):
            machine.console.command(LOOP, LINUX_PROMPT, timeout=120)
        out = machine.console.command(f"grep -E ' ({'|'.join(PROBED)})$' /proc/kallsyms",
                                      LINUX_PROMPT, timeout=120)  # fmt: skip
        found = {m.group(2): int(m.group(1), 16)
                 for m in re.finditer(r"([0-9a-f]{16}) \w (\w+)", str(out))}  # fmt: skip
        addrs = [found[n] for n in PROBED]
        machine.release_gdbstub()
    except BaseException:
        machine.shutdown()
        raise
    return machine, addrs


def answers_cleanly(machine: QemuMachine) -> None:
    """The guest still answers at its shell, and nothing bad is in its dmesg
    or on its console since (a recovery, a detach done)."""
    mark = len(machine.console_text())
    out = machine.console.command("echo qp-alive; dmesg | tail -50", LINUX_PROMPT,
                                  timeout=120)  # fmt: skip
    text = str(out) + machine.console_text()[mark:]
    assert "qp-alive" in text
    assert not [x for x in text.splitlines() if BAD.search(x)], text[-3000:]
