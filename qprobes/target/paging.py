"""x86_64 page-table walks (4-level and 5-level paging).

Pure code: the walk reads page-table entries through a callback, so it runs
the same against a live guest, a memory dump or a unit-test dictionary.

Reference: Intel SDM Vol. 3A, 4.5 "4-Level Paging and 5-Level Paging",
tables 4-15 to 4-20 (entry formats).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from qprobes.errors import TranslationError

PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PTE_USER = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_PS = 1 << 7  # page size: a 1 GiB (PDPTE) or 2 MiB (PDE) leaf
PTE_GLOBAL = 1 << 8
PTE_NX = 1 << 63

# Bits 51:12 of an entry hold the physical address of the next level
# (MAXPHYADDR is at most 52 bits).
ADDR_MASK = 0x000F_FFFF_FFFF_F000

CR4_LA57 = 1 << 12
CR0_PG = 1 << 31
CR3_ADDR_MASK = ADDR_MASK

PAGE_SIZE = 4096
PAGE_SHIFT = 12


class Level(enum.IntEnum):
    """Paging-structure levels, named as in Linux (pgd/p4d/pud/pmd/pte)."""

    PTE = 1  # page table: 4 KiB leaves
    PMD = 2  # page directory: 2 MiB leaves
    PUD = 3  # page-directory-pointer table: 1 GiB leaves
    P4D = 4  # PML4 (the top level under 4-level paging)
    PGD = 5  # PML5 (5-level paging only)


_LEVEL_NAMES = {
    Level.PGD: "PML5",
    Level.P4D: "PML4",
    Level.PUD: "PDPT",
    Level.PMD: "PD",
    Level.PTE: "PT",
}


def level_shift(level: Level) -> int:
    """The virtual-address bit where ``level``'s 9-bit index starts."""
    return PAGE_SHIFT + 9 * (int(level) - 1)


def table_index(vaddr: int, level: Level) -> int:
    """The index into the paging structure of ``level`` for ``vaddr``."""
    return (vaddr >> level_shift(level)) & 0x1FF


def is_canonical(vaddr: int, la57: bool = False) -> bool:
    """Whether ``vaddr`` is canonical (bits above 47, or 56, all equal)."""
    bits = 57 if la57 else 48
    top = vaddr >> (bits - 1)
    return top == 0 or top == (1 << (64 - bits + 1)) - 1


@dataclass(frozen=True)
class WalkStep:
    """One paging-structure entry visited by a walk."""

    level: Level
    table: int  # physical address of the table
    index: int
    entry: int

    @property
    def entry_addr(self) -> int:
        """Physical address of the entry itself."""
        return self.table + 8 * self.index


@dataclass(frozen=True)
class Translation:
    """The result of a successful walk."""

    vaddr: int
    paddr: int
    page_size: int  # 4 KiB, 2 MiB or 1 GiB
    steps: tuple[WalkStep, ...]

    @property
    def writable(self) -> bool:
        return all(step.entry & PTE_RW for step in self.steps)

    @property
    def executable(self) -> bool:
        return not any(step.entry & PTE_NX for step in self.steps)

    @property
    def user(self) -> bool:
        return all(step.entry & PTE_USER for step in self.steps)


ReadU64 = Callable[[int], int]
"""Reads one little-endian 64-bit word of guest-physical memory."""


def walk(read_u64: ReadU64, cr3: int, vaddr: int, la57: bool = False) -> Translation:
    """Translate ``vaddr`` through the page tables rooted at ``cr3``.

    Raises :class:`TranslationError` naming the level whose entry is not
    present, or when ``vaddr`` is not canonical.
    """
    vaddr &= (1 << 64) - 1
    if not is_canonical(vaddr, la57):
        raise TranslationError(vaddr, "canonical check")
    level = Level.PGD if la57 else Level.P4D
    table = cr3 & CR3_ADDR_MASK
    steps: list[WalkStep] = []
    while True:
        index = table_index(vaddr, level)
        entry = read_u64(table + 8 * index)
        step = WalkStep(level, table, index, entry)
        steps.append(step)
        if not entry & PTE_PRESENT:
            raise TranslationError(vaddr, _LEVEL_NAMES[level], entry)
        leaf = level == Level.PTE or (level in (Level.PUD, Level.PMD) and entry & PTE_PS)
        if leaf:
            size = 1 << level_shift(level)
            base = entry & ADDR_MASK & ~(size - 1)
            return Translation(vaddr, base | (vaddr & (size - 1)), size, tuple(steps))
        table = entry & ADDR_MASK
        level = Level(int(level) - 1)


def make_entry(paddr: int, *, writable: bool, executable: bool, large: bool = False) -> int:
    """Build a present kernel (supervisor, global-free) paging entry."""
    entry = (paddr & ADDR_MASK) | PTE_PRESENT | PTE_ACCESSED
    if writable:
        entry |= PTE_RW | PTE_DIRTY
    if large:
        entry |= PTE_PS
    if not executable:
        entry |= PTE_NX
    return entry
