"""Where Linux keeps each CPU's own number, for qprobes' trap stubs.

The stubs file each exception's frame in a per-CPU record; without help
they find the CPU with ``cpuid`` (the initial APIC ID), which under KVM
exits to the hypervisor on every hit. Linux keeps the CPU's number in
per-CPU memory: ``cpu_number`` (x86, up to 6.1), or the ``cpu_number``
member of ``pcpu_hot`` (6.2 on). In kernel mode GS holds the per-CPU base,
so the stubs read ``[GS base + offset]``.

The host then reads the record of gdb thread N at index N - 1: that holds
only if Linux's CPU numbers follow QEMU's vCPU order, which
:func:`numbering_matches` checks at attach (else the stubs keep ``cpuid``).
"""

from __future__ import annotations

from collections.abc import Callable

from qprobes.errors import QprobesError
from qprobes.symbols.linux import LinuxKernel
from qprobes.target.target import Target


def cpu_number_offset(kernel: LinuxKernel) -> int | None:
    """The per-CPU offset of this CPU's number, or None when the kernel has
    neither ``cpu_number`` nor ``pcpu_hot.cpu_number``."""
    symbols = kernel.symbols
    if "cpu_number" in symbols:
        return symbols.address("cpu_number")
    if "pcpu_hot" in symbols and kernel.btf is not None:
        try:
            offset, size = kernel.btf.struct_member_offset("pcpu_hot", "cpu_number")
        except QprobesError:
            return None
        if size == 4:
            return symbols.address("pcpu_hot") + offset
    return None


def numbering_matches(target: Target, read: Callable[[int, int], bytes], offset: int) -> bool:
    """Whether every vCPU's Linux CPU number is its gdb thread id - 1, read
    through its kernel GS base (the guest stopped). False when a base or the
    number cannot be read."""
    try:
        for vcpu in target.vcpus:
            regs = target.registers(vcpu)
            # In user mode (or in the entry code before swapgs) the kernel's
            # base is the swapped-out one.
            base = regs.gs_base if regs.gs_base >> 63 else regs.k_gs_base
            if not base >> 63:
                return False
            if int.from_bytes(read(base + offset, 4), "little") != vcpu - 1:
                return False
    except QprobesError:
        return False
    return True
