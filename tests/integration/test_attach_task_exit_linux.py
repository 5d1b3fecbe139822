"""Regression for the stale-cr3 bug (commit df74e7d): qprobes walked kernel
memory through the page table of whatever task the vCPU was running when it
attached. When that task exited, its page table was freed and reused, and
every later kernel read and write (int3s, slots, detach) went through a page
that was no longer a page table.

One vCPU runs a short-lived busy task while qprobes attaches (so the task is
the one stopped); the task exits, the guest then fills most of its free
memory (its freed page table is reused), and qprobes must still read and
write kernel memory, take probe hits and detach cleanly.
"""

from __future__ import annotations

import time

import pytest

from qprobes.errors import QprobesError
from qprobes.frontends.session import Session
from qprobes.machine.linux import LINUX_PROMPT, linux_config
from qprobes.machine.qemu import QemuMachine
from qprobes.target.paging import ADDR_MASK
from tests.conftest import require_vm
from tests.integration.attached import BAD

pytestmark = pytest.mark.vm

# The busy task spins until FILL starts (a loop of fixed length ended before
# the attach on a fast host), then exits while FILL runs.
BUSY = "(while [ ! -e /tmp/qp-go ]; do :; done; : > /tmp/qp-done; echo qp-busy-done) &"
# Page tables wanted while the busy task exits: its page-table page goes back
# to the allocator, and a dd faulting in its buffer takes it for a page of
# PTEs (cleared when that dd exits). A fork would take it as another pgd,
# whose kernel half is the same: that would hide the bug.
FILL = (": > /tmp/qp-go; while [ ! -e /tmp/qp-done ]; do "
        "dd if=/dev/zero of=/dev/null bs=16M count=1 2>/dev/null; done; "
        "for i in 1 2 3 4; do dd if=/dev/zero of=/dev/null bs=16M count=1 2>/dev/null; done; "
        "echo qp-filled")  # fmt: skip


def test_kernel_walks_survive_the_exit_of_the_task_running_at_attach() -> None:
    machine = QemuMachine(linux_config(append="qprobes.echo=0", smp=1))
    try:
        machine.launch()
    except QprobesError as exc:
        require_vm(f"cannot launch QEMU: {exc}")
    session = None
    try:
        machine.target.resume()
        machine.console.recvuntil(LINUX_PROMPT, timeout=120)
        machine.console.command(BUSY, LINUX_PROMPT, timeout=60)
        time.sleep(0.5)
        machine.release_gdbstub()
        session = Session.attach(str(machine.gdb_socket), reserve=machine.config.reserved,
                                 linux=True, watchdog=False)  # fmt: skip
        target, engine = session.target, session.engine
        assert "qp-busy-done" not in machine.console_text(), "the task ended before the attach"
        # The vCPU was stopped in the busy task: its page table is the task's own.
        task_pgd = target.registers().cr3 & ADDR_MASK & ~0x1FFF
        init_top_pgt = session.kernel.symbols.address("init_top_pgt")  # type: ignore[union-attr]
        kernel_pgd = target.translate(init_top_pgt, target.vcpus[0]).paddr & ADDR_MASK
        assert task_pgd != kernel_pgd, "attached in a task that uses the kernel's table"
        kernel_half = target.read_phys(task_pgd + 2048, 2048)

        machine.console.sendline(FILL)
        session.run(until=lambda: "qp-filled" in machine.console_text(), timeout=600)
        assert "qp-busy-done" in machine.console_text() and "qp-filled" in machine.console_text()
        assert target.read_phys(task_pgd + 2048, 2048) != kernel_half, (
            "the exited task's page table was not reused: nothing was tested"
        )

        # Kernel reads, through whatever qprobes walks.
        banner = session.kernel.symbols.address("linux_banner")  # type: ignore[union-attr]
        assert engine.kread(banner, 13) == b"Linux version"
        # Kernel writes: an int3 and a slot, hits, and the byte back.
        vfs_read = session.kernel.symbols.address("vfs_read")  # type: ignore[union-attr]
        original = engine.kread(vfs_read, 16)
        kp = session.kprobe("vfs_read", lambda kp, ctx: False)
        assert engine.kread(kp.arm_addr, 1) == b"\xcc"
        machine.console.sendline("dd if=/etc/hostname of=/dev/null 2>/dev/null; echo qp-read")
        session.run(until=lambda: "qp-read" in machine.console_text(), timeout=300)
        assert kp.nhit > 0
        session.unregister(kp)
        assert engine.kread(vfs_read, 16) == original
        # And the detach walks the same way.
        mark = len(machine.console_text())
        session.close()
        session = None
        # (The quotes keep the console's echo of the line from matching.)
        machine.console.sendline("echo qp-al''ive; dmesg | tail -40; echo qp-e''nd")
        out = machine.console.recvuntil(b"qp-end\r\n", timeout=120).decode(errors="replace")
        text = out + machine.console_text()[mark:]
        assert "qp-alive" in text
        assert not [line for line in text.splitlines() if BAD.search(line)], text[-3000:]
    finally:
        if session is not None:
            session.close()
        machine.shutdown()
