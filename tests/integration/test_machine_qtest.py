"""The target API and the QEMU machine against a real qtest guest (one per module)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest

from qprobes.errors import (
    ConnectionClosedError,
    LaunchError,
    QprobesError,
    TranslationError,
)
from qprobes.frontends import api
from qprobes.machine.guests import QTEST_PROMPT, qtest_config
from qprobes.machine.qemu import QemuMachine, attach
from qprobes.symbols.elf import SymbolTable, load_elf_symbols
from qprobes.target.hostmem import HostMemory
from qprobes.wire.stop import StopKind

pytestmark = pytest.mark.vm

KERNEL_BASE = 0xFFFF_FFFF_8000_0000


@pytest.fixture(scope="module")
def machine(qtest_image: object) -> Iterator[QemuMachine]:
    m = QemuMachine(qtest_config())
    m.launch()
    try:
        m.target.resume()
        m.console.recvuntil(QTEST_PROMPT, timeout=30)
        m.target.stop()
        yield m
    finally:
        m.shutdown()


@pytest.fixture(scope="module")
def syms(machine: QemuMachine) -> SymbolTable:
    return load_elf_symbols(machine.config.kernel)


def test_selfcheck_through_the_api() -> None:
    out = io.StringIO()
    assert api.qtest_selfcheck(out=out) == 0
    text = out.getvalue()
    assert "qtest: selfcheck 28 passed, 0 failed" in text
    assert "self-check passed" in text


def test_cli_version_and_help() -> None:
    run = [sys.executable, "-m", "qprobes.frontends.cli"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("qprobes ")
    helptext = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True)
    assert "qtest" in helptext.stdout and "attach" in helptext.stdout


def test_registers_read_and_write(machine: QemuMachine) -> None:
    target = machine.target
    regs = target.registers()
    assert regs.rip >= KERNEL_BASE and regs.cs == 0x10
    assert regs.cr0 & (1 << 31)  # paging on
    saved = regs.r12
    regs.r12 = 0x1122334455667788
    target.set_registers(regs)
    assert target.registers().r12 == 0x1122334455667788
    assert target.read_register("r12") == 0x1122334455667788
    target.write_register("r12", saved)
    assert target.registers().r12 == saved


def test_virtual_memory_round_trip(machine: QemuMachine, syms: SymbolTable) -> None:
    target = machine.target
    area = syms.address("qtest_4k_area")
    old = target.read(area, 5000)
    data = bytes((i * 7) & 0xFF for i in range(5000))  # crosses the 1 KiB write chunks
    target.write(area, data)
    assert target.read(area, 5000) == data
    target.write(area, old)


def test_page_walk_matches_qtest_mappings(machine: QemuMachine, syms: SymbolTable) -> None:
    target = machine.target
    area = syms.address("qtest_4k_area")
    phys = syms.address("qtest_4k_phys")  # an absolute symbol: its value is the address
    small = target.translate(area + 0x1234)
    assert (small.paddr, small.page_size) == (phys + 0x1234, 4096)
    big = target.translate(syms.address("t_hot"))
    assert big.page_size == 2 << 20
    assert big.paddr == syms.address("t_hot") - KERNEL_BASE
    assert target.read_phys(big.paddr, 16) == target.read(syms.address("t_hot"), 16)
    assert target.read_phys(phys, 64) == target.read(area, 64)
    for hole in (0xFFFFFFFF88000000, 0xFFFFFFFFC0000000, 0x0000000000400000):
        with pytest.raises(TranslationError):
            target.translate(hole)


def test_idt_base_from_the_monitor(machine: QemuMachine, syms: SymbolTable) -> None:
    idt = machine.target.idt()
    assert idt.base == syms.address("qtest_idt")
    assert idt.limit == 16 * 256 - 1


def test_host_memory_reads_what_the_stub_reads(machine: QemuMachine, syms: SymbolTable) -> None:
    target = machine.target
    hm = HostMemory(target, machine.pid)
    try:
        addr = syms.address("t_mixed")
        paddr = addr - KERNEL_BASE
        assert hm.read_phys(paddr, 64) == target.read_phys(paddr, 64)
        regs = target.registers()
        assert hm.read_virt(regs.cr3, addr, 64) == target.read(addr, 64)
    finally:
        hm.close()


def test_interrupt_and_continue(machine: QemuMachine) -> None:
    target = machine.target
    target.resume()
    assert target.running
    reply = target.stop(timeout=5)
    assert reply.kind is StopKind.SIGNAL and not target.running
    assert reply.thread is not None and reply.thread.tid == target.vcpus[0]
    target.registers()  # usable again


def test_watchpoint_stop_on_the_mailbox(machine: QemuMachine, syms: SymbolTable) -> None:
    """A write watchpoint on qtest_mailbox.done stops the guest after the store."""
    target = machine.target
    mailbox = syms.address("qtest_mailbox")
    done = target.read_u64(mailbox + 16)
    target.add_watchpoint(mailbox + 16, 8, "write")
    try:
        target.write(mailbox + 8, struct.pack("<Q", (0 << 32) | 5))  # target 0, 5 calls
        target.write(mailbox, struct.pack("<Q", 3))  # MBOX_RUN
        target.resume()
        reply = target.wait(30)
        assert reply.watch_addr == mailbox + 16
        assert target.read_u64(mailbox + 16) == done + 1
    finally:
        target.remove_watchpoint(mailbox + 16, 8, "write")


def test_console_is_a_pwntools_tube(machine: QemuMachine) -> None:
    target = machine.target
    target.resume()
    try:
        out = machine.console.command("run t_hot 3", QTEST_PROMPT, timeout=20)
    finally:
        target.stop(timeout=5)
    assert "ran t_hot 3" in out


def test_launch_errors_carry_command_line_and_output(qtest_image: object) -> None:
    config = qtest_config(extra_args=["-no-such-option"])
    with pytest.raises(LaunchError) as info:
        QemuMachine(config).launch()
    assert "-no-such-option" in " ".join(info.value.cmdline)
    assert "no-such-option" in info.value.output
    with pytest.raises(LaunchError, match="does not exist"):
        QemuMachine(qtest_config(kernel="/nonexistent/kernel")).launch()


def test_dead_qemu_gives_a_clear_error(qtest_image: object) -> None:
    m = QemuMachine(qtest_config())
    m.launch()
    try:
        os.kill(m.pid, signal.SIGKILL)
        m.wait(10)
        with pytest.raises(ConnectionClosedError):
            m.target.registers()
    finally:
        m.shutdown()


def test_attach_to_a_running_qemu(qtest_image: object) -> None:
    m = QemuMachine(qtest_config())
    m.launch()
    try:
        m.target.resume()
        m.console.recvuntil(QTEST_PROMPT, timeout=30)
        m.client.close()  # QEMU's stub serves one client at a time
        target = attach(str(m.gdb_socket))
        try:
            assert target.vcpus == [1]
            assert target.registers().cs == 0x10
            out = io.StringIO()
        finally:
            target.client.detach()
        # `qprobes attach` describes the guest and leaves it running.
        assert api.attach_info(str(m.gdb_socket), out=out) == 0
        assert "vCPU 1: rip=" in out.getvalue()
        m.console.sendline("run t_hot 1")
        assert b"ran t_hot 1" in m.console.recvuntil(QTEST_PROMPT, timeout=20)
    finally:
        with contextlib.suppress(QprobesError):
            m.shutdown()
