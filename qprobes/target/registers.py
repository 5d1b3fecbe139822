"""x86_64 register sets as dataclasses, converted to and from ``g`` packets.

The byte layout is never hard-coded: offsets and sizes come from the
:class:`~qprobes.wire.features.RegisterLayout` parsed from the stub's
target.xml (GDB manual, "Target Description Format").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qprobes.wire.features import RegisterLayout

# The general-purpose and system registers qprobes works with, in the order
# QEMU's x86_64 target description lists them. Vector and x87 registers stay
# in the raw ``g`` buffer and are written back untouched.
GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
SYSTEM_NAMES = (
    "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs",
    "fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
)  # fmt: skip
REGISTER_NAMES = GPR_NAMES + SYSTEM_NAMES

# Linux's pt_regs order (arch/x86/include/asm/ptrace.h) for the GPRs, used by
# the trap stubs that save registers on the guest stack.
PT_REGS_GPRS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10",
    "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
)  # fmt: skip


@dataclass
class Registers:
    """One vCPU's integer and system registers."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rbp: int = 0
    rsp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    eflags: int = 0
    cs: int = 0
    ss: int = 0
    ds: int = 0
    es: int = 0
    fs: int = 0
    gs: int = 0
    fs_base: int = 0
    gs_base: int = 0
    k_gs_base: int = 0
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0

    # Linux-style aliases, so handler code reads like kernel code.
    @property
    def ip(self) -> int:
        return self.rip

    @property
    def sp(self) -> int:
        return self.rsp

    @property
    def flags(self) -> int:
        return self.eflags

    def args(self) -> tuple[int, int, int, int, int, int]:
        """The first six integer arguments (System V AMD64 calling convention)."""
        return (self.rdi, self.rsi, self.rdx, self.rcx, self.r8, self.r9)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def diff(self, other: Registers) -> dict[str, int]:
        """Names and values in ``self`` that differ from ``other``."""
        mine, theirs = self.as_dict(), other.as_dict()
        return {k: v for k, v in mine.items() if theirs[k] != v}

    @classmethod
    def from_g(cls, layout: RegisterLayout, data: bytes) -> Registers:
        """Decode a ``g`` reply."""
        values: dict[str, int] = {}
        for name in REGISTER_NAMES:
            reg = layout.by_name(name)
            size = reg.bitsize // 8
            values[name] = int.from_bytes(data[reg.offset : reg.offset + size], "little")
        return cls(**values)

    def to_g(self, layout: RegisterLayout, template: bytes) -> bytes:
        """Encode into a ``G`` payload, keeping ``template``'s other registers."""
        buf = bytearray(template)
        for name in REGISTER_NAMES:
            reg = layout.by_name(name)
            size = reg.bitsize // 8
            value = getattr(self, name) & ((1 << reg.bitsize) - 1)
            buf[reg.offset : reg.offset + size] = value.to_bytes(size, "little")
        return bytes(buf)
