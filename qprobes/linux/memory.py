"""Reading kernel memory without a page walk, where Linux's own ``__pa`` would.

Per-CPU data, ``task_struct``\\ s and the kernel image's variables are read
on every trace event (the clock, the context column, comm and pid). A
page-table walk per read costs several physical reads; but the direct map
(``page_offset_base`` up to ``vmalloc_base``) maps all RAM at a fixed
offset (``__va``/``__pa``), and the kernel image sits at
``__START_KERNEL_map`` shifted by ``phys_base`` (``__pa_symbol``), so such
addresses become physical by arithmetic (arch/x86/include/asm/page_64.h).
Anything else (vmalloc, stacks, modules) goes through the page-walking
reader. The arithmetic is checked once against the walk before it is used.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from qprobes.errors import QprobesError
from qprobes.symbols.linux import LinuxKernel

Read = Callable[[int, int], bytes]

# arch/x86/include/asm/page_64_types.h: where the kernel image is mapped
# (KASLR moves the image inside this region; phys_base follows).
START_KERNEL_MAP = 0xFFFFFFFF80000000
# The direct map's size when vmalloc_base is unknown (4-level paging: 64 TiB).
DIRECT_MAP_SIZE = 1 << 46


class KernelMemory:
    """A kernel reader: ``__pa`` arithmetic for the direct map and the kernel
    image (read physically), the page-walking ``read`` for the rest."""

    def __init__(self, read: Read, read_phys: Read | None = None,
                 direct_map: tuple[int, int] | None = None,
                 image: tuple[int, int, int] | None = None) -> None:  # fmt: skip
        self.read = read
        self.read_phys = read_phys
        self.direct_map = direct_map  # [start, end)
        self.image = image  # [start, end), phys_base

    @classmethod
    def from_kernel(cls, kernel: LinuxKernel, read: Read, read_phys: Read | None) -> KernelMemory:
        """The reader for ``kernel``; plain ``read`` when there is no physical
        reader or the arithmetic does not match what the page tables say."""
        symbols = kernel.symbols
        names = ("page_offset_base", "phys_base", "_text", "_end", "linux_banner")
        if read_phys is None or any(n not in symbols for n in names):
            return cls(read)
        try:
            (base,) = struct.unpack("<Q", read(symbols.address("page_offset_base"), 8))
            (phys_base,) = struct.unpack("<Q", read(symbols.address("phys_base"), 8))
            end = base + DIRECT_MAP_SIZE
            if "vmalloc_base" in symbols:
                (end,) = struct.unpack("<Q", read(symbols.address("vmalloc_base"), 8))
            image = (symbols.address("_text"), symbols.address("_end"), int(phys_base))
            fast = cls(read, read_phys, (int(base), int(end)), image)
            banner = symbols.address("linux_banner")
            want = read(banner, 32)
            paddr = banner - START_KERNEL_MAP + image[2]
            if fast(banner, 32) != want or fast(int(base) + paddr, 32) != want:
                return cls(read)
        except (QprobesError, struct.error):
            return cls(read)
        return fast

    def paddr(self, vaddr: int, length: int) -> int | None:
        """The physical address of ``[vaddr, vaddr + length)`` by ``__pa``, or None."""
        if self.direct_map is not None:
            lo, hi = self.direct_map
            if lo <= vaddr and vaddr + length <= hi:
                return vaddr - lo
        if self.image is not None:
            lo, hi, phys_base = self.image
            if lo <= vaddr and vaddr + length <= hi:
                return vaddr - START_KERNEL_MAP + phys_base
        return None

    def __call__(self, vaddr: int, length: int) -> bytes:
        paddr = self.paddr(vaddr, length) if self.read_phys is not None else None
        if paddr is None or self.read_phys is None:
            return self.read(vaddr, length)
        return self.read_phys(paddr, length)
