"""Page walks over a dictionary of guest-physical words."""

from __future__ import annotations

import pytest

from qprobes.errors import TranslationError
from qprobes.target.paging import (
    PTE_NX,
    PTE_PRESENT,
    PTE_PS,
    PTE_RW,
    Level,
    is_canonical,
    make_entry,
    table_index,
    walk,
)

CR3 = 0x1000


class Mem(dict[int, int]):
    def read(self, addr: int) -> int:
        assert addr % 8 == 0, "entries are 8-byte aligned"
        return self.get(addr, 0)


def idx(vaddr: int, level: Level) -> int:
    return table_index(vaddr, level)


def build() -> Mem:
    """Kernel text with a 2 MiB page, a 4 KiB page, a 1 GiB page, an unmapped hole."""
    m = Mem()
    text = 0xFFFFFFFF81000000
    m[CR3 + 8 * idx(text, Level.P4D)] = 0x2000 | PTE_PRESENT | PTE_RW
    m[0x2000 + 8 * idx(text, Level.PUD)] = 0x3000 | PTE_PRESENT | PTE_RW
    m[0x3000 + 8 * idx(text, Level.PMD)] = 0x1000000 | PTE_PRESENT | PTE_PS
    small = 0xFFFFFFFF81400000
    m[0x3000 + 8 * idx(small, Level.PMD)] = 0x4000 | PTE_PRESENT | PTE_RW
    m[0x4000 + 8 * idx(small + 0x5000, Level.PTE)] = 0x777000 | PTE_PRESENT | PTE_NX
    huge = 0xFFFF888000000000
    m[CR3 + 8 * idx(huge, Level.P4D)] = 0x5000 | PTE_PRESENT | PTE_RW
    m[0x5000 + 8 * idx(huge, Level.PUD)] = 0x40000000 | PTE_PRESENT | PTE_RW | PTE_PS
    return m


@pytest.mark.parametrize(
    ("vaddr", "paddr", "size"),
    [
        (0xFFFFFFFF81000000, 0x1000000, 2 << 20),
        (0xFFFFFFFF811234AB, 0x11234AB, 2 << 20),
        (0xFFFFFFFF81405123, 0x777123, 4096),
        (0xFFFF888000000000 + 0x12345678, 0x40000000 + 0x12345678, 1 << 30),
    ],
)
def test_walk_translates(vaddr: int, paddr: int, size: int) -> None:
    t = walk(build().read, CR3, vaddr)
    assert (t.paddr, t.page_size) == (paddr, size)


def test_walk_reports_permissions() -> None:
    m = build()
    assert not walk(m.read, CR3, 0xFFFFFFFF81405000).executable
    assert walk(m.read, CR3, 0xFFFFFFFF81000000).executable
    assert not walk(m.read, CR3, 0xFFFFFFFF81000000).writable


@pytest.mark.parametrize(
    ("vaddr", "level"),
    [
        (0xFFFFFFFFC0000000, "PDPT"),
        (0xFFFFFFFF81600000, "PD"),
        (0xFFFFFFFF81406000, "PT"),
        (0x0000000000400000, "PML4"),
        (0x0000800000000000, "canonical check"),
    ],
)
def test_walk_names_missing_level(vaddr: int, level: str) -> None:
    with pytest.raises(TranslationError) as info:
        walk(build().read, CR3, vaddr)
    assert info.value.level == level
    assert info.value.vaddr == vaddr


def test_five_level_walk_uses_pml5() -> None:
    m = Mem()
    v = 0xFF00000000001000
    m[CR3 + 8 * idx(v, Level.PGD)] = 0x2000 | PTE_PRESENT
    m[0x2000 + 8 * idx(v, Level.P4D)] = 0x3000 | PTE_PRESENT
    m[0x3000 + 8 * idx(v, Level.PUD)] = 0x4000 | PTE_PRESENT
    m[0x4000 + 8 * idx(v, Level.PMD)] = 0x5000 | PTE_PRESENT
    m[0x5000 + 8 * idx(v, Level.PTE)] = 0x9000 | PTE_PRESENT
    assert walk(m.read, CR3, v, la57=True).paddr == 0x9000
    assert len(walk(m.read, CR3, v, la57=True).steps) == 5


@pytest.mark.parametrize(
    ("vaddr", "la57", "ok"),
    [
        (0xFFFF800000000000, False, True),
        (0x00007FFFFFFFFFFF, False, True),
        (0x0000800000000000, False, False),
        (0xFF00000000000000, False, False),
        (0xFF00000000000000, True, True),
    ],
)
def test_canonical(vaddr: int, la57: bool, ok: bool) -> None:
    assert is_canonical(vaddr, la57) is ok


def test_make_entry_bits() -> None:
    e = make_entry(0x123000, writable=False, executable=False)
    assert e & PTE_PRESENT and e & PTE_NX and not e & PTE_RW
    assert make_entry(0x200000, writable=True, executable=True, large=True) & PTE_PS
