"""The target: a stopped-or-running x86_64 guest seen through the gdbstub.

:class:`Target` turns the raw :class:`~qprobes.remote.client.GdbClient` into
per-vCPU registers, virtual and physical memory, page walks, the IDT, and run
control. It is the only layer above the wire that knows the guest is x86_64.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from qprobes.errors import TargetError, TargetRunningError
from qprobes.remote.client import BreakpointType, GdbClient
from qprobes.target.paging import CR4_LA57, Translation, walk
from qprobes.target.registers import Registers
from qprobes.wire.stop import StopReply

_IDT_RE = re.compile(r"^IDT=\s*([0-9a-fA-F]+)\s+([0-9a-fA-F]+)", re.MULTILINE)
_GDT_RE = re.compile(r"^GDT=\s*([0-9a-fA-F]+)\s+([0-9a-fA-F]+)", re.MULTILINE)
_HVA_RE = re.compile(r"Host virtual address for 0x([0-9a-fA-F]+) \((.*?)\) is 0x([0-9a-fA-F]+)")


@dataclass(frozen=True)
class DescriptorTable:
    """A descriptor-table register (IDTR or GDTR)."""

    base: int
    limit: int


class Target:
    """Registers, memory and run control of an x86_64 guest.

    vCPUs are named by the stub's thread ids (QEMU numbers them from 1).
    Register and memory access need the guest stopped (all-stop mode).
    """

    def __init__(self, client: GdbClient) -> None:
        self.client = client
        self._vcpus: list[int] | None = None
        self._g_template: dict[int, bytes] = {}

    # --- vCPUs and registers ------------------------------------------------

    @property
    def vcpus(self) -> list[int]:
        """The vCPU thread ids, in order."""
        if self._vcpus is None:
            self._require_stopped()
            self._vcpus = self.client.thread_ids()
        return list(self._vcpus)

    def _require_stopped(self) -> None:
        if self.client.running:
            raise TargetRunningError("the guest is running; stop it first")

    def registers(self, vcpu: int | None = None) -> Registers:
        """Read one vCPU's registers (default: the first vCPU)."""
        self._require_stopped()
        vcpu = self.vcpus[0] if vcpu is None else vcpu
        self.client.select_thread("g", vcpu)
        data = self.client.read_registers()
        self._g_template[vcpu] = data
        return Registers.from_g(self.client.layout, data)

    def set_registers(self, regs: Registers, vcpu: int | None = None) -> None:
        """Write the registers of ``regs`` that differ from the guest's.

        Only changed registers are written, one ``P`` each: writing cr3 makes
        QEMU flush its TLB, so unchanged system registers are left alone.
        """
        self._require_stopped()
        vcpu = self.vcpus[0] if vcpu is None else vcpu
        current = self.registers(vcpu)
        layout = self.client.layout
        for name, value in regs.diff(current).items():
            reg = layout.by_name(name)
            size = reg.bitsize // 8
            self.client.write_register(
                reg.regnum, (value & ((1 << reg.bitsize) - 1)).to_bytes(size, "little")
            )

    def read_register(self, name: str, vcpu: int | None = None) -> int:
        """Read one register by its target.xml name."""
        self._require_stopped()
        vcpu = self.vcpus[0] if vcpu is None else vcpu
        self.client.select_thread("g", vcpu)
        reg = self.client.layout.by_name(name)
        return int.from_bytes(self.client.read_register(reg.regnum), "little")

    def write_register(self, name: str, value: int, vcpu: int | None = None) -> None:
        """Write one register by its target.xml name."""
        self._require_stopped()
        vcpu = self.vcpus[0] if vcpu is None else vcpu
        self.client.select_thread("g", vcpu)
        reg = self.client.layout.by_name(name)
        size = reg.bitsize // 8
        self.client.write_register(
            reg.regnum, (value & ((1 << reg.bitsize) - 1)).to_bytes(size, "little")
        )

    # --- memory ---------------------------------------------------------------

    def read(self, addr: int, length: int, vcpu: int | None = None) -> bytes:
        """Read guest-virtual memory, translated by ``vcpu``'s page tables."""
        self._require_stopped()
        if vcpu is not None:
            self.client.select_thread("g", vcpu)
        self.client.set_phys_mem_mode(False)
        return self.client.read_memory(addr, length)

    def write(self, addr: int, data: bytes, vcpu: int | None = None) -> None:
        """Write guest-virtual memory (read-only mappings are written too)."""
        self._require_stopped()
        if vcpu is not None:
            self.client.select_thread("g", vcpu)
        self.client.set_phys_mem_mode(False)
        self.client.write_memory(addr, data)

    def read_phys(self, paddr: int, length: int) -> bytes:
        """Read guest-physical memory."""
        self._require_stopped()
        self.client.set_phys_mem_mode(True)
        return self.client.read_memory(paddr, length)

    def write_phys(self, paddr: int, data: bytes) -> None:
        """Write guest-physical memory (TCG's translated code is invalidated)."""
        self._require_stopped()
        self.client.set_phys_mem_mode(True)
        self.client.write_memory(paddr, data)

    def read_u64(self, addr: int) -> int:
        return int(struct.unpack("<Q", self.read(addr, 8))[0])

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<Q", value & (2**64 - 1)))

    def read_phys_u64(self, paddr: int) -> int:
        return int(struct.unpack("<Q", self.read_phys(paddr, 8))[0])

    # --- paging -------------------------------------------------------------

    def translate(self, vaddr: int, vcpu: int | None = None, cr3: int | None = None) -> Translation:
        """Walk ``vcpu``'s page tables (or those rooted at ``cr3``) for ``vaddr``."""
        regs = self.registers(vcpu)
        root = regs.cr3 if cr3 is None else cr3
        return walk(self.read_phys_u64, root, vaddr, la57=bool(regs.cr4 & CR4_LA57))

    def virt_to_phys(self, vaddr: int, vcpu: int | None = None) -> int:
        return self.translate(vaddr, vcpu).paddr

    # --- descriptor tables and monitor ------------------------------------------

    def monitor(self, command: str) -> str:
        """Run a QEMU human-monitor command through ``qRcmd``."""
        return self.client.monitor(command)

    def _info_registers(self, vcpu: int | None) -> str:
        vcpu = self.vcpus[0] if vcpu is None else vcpu
        # The monitor's "cpu" index is QEMU's cpu_index: thread id - 1.
        self.monitor(f"cpu {vcpu - 1}")
        return self.monitor("info registers")

    def idt(self, vcpu: int | None = None) -> DescriptorTable:
        """The IDTR of ``vcpu``, read through the monitor (not in target.xml)."""
        text = self._info_registers(vcpu)
        match = _IDT_RE.search(text)
        if match is None:
            raise TargetError(f"no IDT= line in 'info registers' output: {text[:200]!r}")
        return DescriptorTable(int(match.group(1), 16), int(match.group(2), 16))

    def gdt(self, vcpu: int | None = None) -> DescriptorTable:
        text = self._info_registers(vcpu)
        match = _GDT_RE.search(text)
        if match is None:
            raise TargetError(f"no GDT= line in 'info registers' output: {text[:200]!r}")
        return DescriptorTable(int(match.group(1), 16), int(match.group(2), 16))

    def gpa2hva(self, paddr: int) -> int:
        """The QEMU process address backing guest-physical ``paddr``."""
        text = self.monitor(f"gpa2hva {paddr:#x}")
        match = _HVA_RE.search(text)
        if match is None:
            raise TargetError(f"gpa2hva {paddr:#x} failed: {text.strip()}")
        return int(match.group(3), 16)

    # --- run control ----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.client.running

    def resume(self) -> None:
        """Let every vCPU run."""
        self.client.cont()

    def wait(self, timeout: float | None = None) -> StopReply:
        """Wait for the next stop reply."""
        return self.client.wait_stop(timeout)

    def stop(self, timeout: float | None = None) -> StopReply:
        """Interrupt a running guest and return the stop reply."""
        if not self.client.running:
            raise TargetError("the guest is already stopped")
        self.client.interrupt()
        return self.client.wait_stop(timeout)

    def step(self, vcpu: int | None = None, timeout: float | None = None) -> StopReply:
        """Single-step one vCPU (the others stay stopped) and wait for the stop."""
        self._require_stopped()
        vcpu = self.vcpus[0] if vcpu is None else vcpu
        self.client.step(vcpu)
        return self.client.wait_stop(timeout)

    @contextmanager
    def stopped(self, timeout: float | None = None) -> Iterator[StopReply | None]:
        """Stop the guest for the ``with`` body if it runs, then resume it."""
        if not self.client.running:
            yield None
            return
        reply = self.stop(timeout)
        try:
            yield reply
        finally:
            self.resume()

    # --- watchpoints and breakpoints (not used for probe hits) -------------------

    def add_watchpoint(self, addr: int, length: int = 1, kind: str = "write") -> None:
        types = {"write": BreakpointType.WRITE, "read": BreakpointType.READ,
                 "access": BreakpointType.ACCESS}  # fmt: skip
        self.client.insert_breakpoint(types[kind], addr, length)

    def remove_watchpoint(self, addr: int, length: int = 1, kind: str = "write") -> None:
        types = {"write": BreakpointType.WRITE, "read": BreakpointType.READ,
                 "access": BreakpointType.ACCESS}  # fmt: skip
        self.client.remove_breakpoint(types[kind], addr, length)
