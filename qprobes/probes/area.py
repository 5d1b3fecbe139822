"""qprobes' own memory inside the guest.

Guest-physical pages come from memory the guest never uses (the machine puts
``memmap=`` on the kernel command line; qtest stays below 32 MiB). They are
mapped into a free 2 MiB region by writing page-table entries, so copies of
kernel instructions keep their rip-relative reach (±2 GiB) and the trap stubs
can be the target of IDT gates.

Where: a region that is free only in the page tables is not enough, since
the guest's own allocators do not know about it. The module area (Linux:
``MODULES_VADDR`` up to 0xffffffffff000000) is handed out by vmalloc to
modules, BPF programs and Linux's own kprobe slots, so one loaded later
could land on qprobes' area. With :attr:`GuestArea.image` set (the Linux
kernel image's ``_text`` and ``_end``) the area goes where no allocator
looks: the unused part of the kernel image mapping, after ``_end`` (or
before ``_text``), inside ``__START_KERNEL_map`` + ``KERNEL_IMAGE_SIZE``.
``cleanup_highmap()`` clears those PMDs at boot and nothing maps them again,
and every address there is within ±2 GiB of kernel and module text. Without
it (a kernel that is not Linux), the top of the module area is used.

Every entry qprobes writes is recorded with the value it replaced and put
back by :meth:`GuestArea.teardown`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qprobes.errors import ProbeError, TranslationError
from qprobes.target.paging import (
    ADDR_MASK,
    CR4_LA57,
    PTE_NX,
    PTE_PRESENT,
    PTE_PS,
    Level,
    make_entry,
    table_index,
    walk,
)
from qprobes.target.target import Target

PAGE_SIZE = 4096
REGION_SIZE = 2 * 1024 * 1024  # one page table's worth of 4 KiB pages
REGION_PAGES = REGION_SIZE // PAGE_SIZE
#: The area can grow to this many regions, contiguous after the first (each
#: mapped when its first page is), so pages 0..AREA_PAGES-1 are indices.
MAX_REGIONS = 8
AREA_SPAN = MAX_REGIONS * REGION_SIZE
AREA_PAGES = MAX_REGIONS * REGION_PAGES
MODULES_VADDR = 0xFFFF_FFFF_A000_0000
MODULES_END = 0xFFFF_FFFF_FF00_0000
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map
# KERNEL_IMAGE_SIZE: 1 GiB with CONFIG_RANDOMIZE_BASE, else 512 MiB (then
# MODULES_VADDR starts right above it).
KERNEL_IMAGE_SIZE_MIN = 512 << 20
KERNEL_IMAGE_SIZE_KASLR = 1 << 30
REL32_REACH = 1 << 31
EFER_NXE = 1 << 11


def image_candidates(text: int, end: int, span: int = REGION_SIZE) -> list[int]:
    """Bases of ``span`` bytes (2 MiB regions) of the kernel image mapping no
    allocator hands out, best first: after ``_end`` upward, then below
    ``_text`` downward.

    The mapping spans ``KERNEL_IMAGE_SIZE`` from ``__START_KERNEL_map``. It
    is 1 GiB when the kernel can be randomized, which is certain once the
    image reaches past 512 MiB; otherwise only the first 512 MiB are sure
    not to be the module area.
    """
    size = KERNEL_IMAGE_SIZE_KASLR if end > START_KERNEL_MAP + KERNEL_IMAGE_SIZE_MIN \
        else KERNEL_IMAGE_SIZE_MIN  # fmt: skip
    top = START_KERNEL_MAP + size
    first = (end + REGION_SIZE - 1) & ~(REGION_SIZE - 1)
    after = list(range(first, top - span + 1, REGION_SIZE))
    below = list(range((text & ~(REGION_SIZE - 1)) - span, START_KERNEL_MAP - 1,
                       -REGION_SIZE))  # fmt: skip
    return after + below


@dataclass(frozen=True)
class Page:
    """One 4 KiB page of the area."""

    vaddr: int
    paddr: int
    writable: bool
    executable: bool


class PhysAllocator:
    """Hands out 4 KiB guest-physical pages from the reservation."""

    def __init__(self, start: int, size: int) -> None:
        if start % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ProbeError(f"bad physical reservation {start:#x}+{size:#x}")
        self.start = start
        self.end = start + size
        self._next = start
        self._free: list[int] = []
        # Called with the new high-water mark before a fresh page is handed out.
        self.on_grow: Callable[[int], None] | None = None

    def alloc(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next >= self.end:
            raise ProbeError(f"the physical reservation {self.start:#x}-{self.end:#x} is used up")
        page = self._next
        if self.on_grow is not None:
            self.on_grow(page + PAGE_SIZE)  # recorded before the page is used
        self._next += PAGE_SIZE
        return page

    def free(self, paddr: int) -> None:
        self._free.append(paddr)

    @property
    def next_free(self) -> int:
        """The first page never handed out (pages below it may be in use)."""
        return self._next

    def skip_to(self, paddr: int) -> None:
        """Never hand out pages below ``paddr`` (an abandoned area's)."""
        if self.start <= paddr <= self.end:
            self._next = max(self._next, paddr - paddr % PAGE_SIZE)


class GuestArea:
    """Up to :data:`MAX_REGIONS` contiguous 2 MiB virtual regions of 4 KiB
    pages that qprobes owns in the guest: the first is mapped at set-up, each
    later one when its first page is (:meth:`map_page` with an index of 512
    or more). The set-up chooses a base whose whole span is unmapped.

    ``near`` is an address of kernel text: the span is chosen so that any
    address in it is within rel32 reach of it. Page tables are edited through
    the gdbstub in physical mode while the guest is stopped.
    """

    def __init__(self, target: Target, reserve: tuple[int, int], near: int,
                 vbase: int | None = None) -> None:  # fmt: skip
        self.target = target
        self.phys = PhysAllocator(*reserve)
        self.near = near
        self._requested_vbase = vbase
        self.vbase = 0
        self._pt = 0  # physical address of our page table (the first region's)
        self._pts: dict[int, int] = {}  # region -> physical address of its page table
        self._claimed: set[int] = set()  # page indices handed out by claim_pages
        self._written: list[tuple[int, int]] = []  # (entry paddr, old value), in order
        self._pages: dict[int, Page] = {}  # page index -> Page
        self._cr3 = 0
        self._la57 = False
        self._nx = False
        self._user: int | None = None  # PTI user page-table root
        # (_text, _end) of a Linux kernel image: the area goes in its unused tail.
        self.image: tuple[int, int] | None = None
        # The virtual address of a top-level page table that lives as long as
        # the kernel (Linux: init_top_pgt), for every walk qprobes makes; None:
        # the vCPU's cr3 at set-up.
        self.root_vaddr: int | None = None
        # Called with (entry paddr, old value) before an entry of the guest's
        # own page tables is rewritten (the journal records it first).
        self.on_guest_write: Callable[[int, int], None] | None = None
        # Writes guest-physical *data* (the fill of a data page) faster than
        # the gdbstub (the engine's host-memory path); None: the gdbstub.
        self.write_data_phys: Callable[[int, bytes], None] | None = None
        # Reads guest-physical data the same way (qprobes' own page-table
        # entries); None: the gdbstub.
        self.read_data_phys_u64: Callable[[int], int] | None = None
        # Writes the fill of a code page (the engine's batch puts it in its
        # stream, before the slots written into the page); None: the gdbstub.
        self.write_code_phys: Callable[[int, bytes], None] | None = None
        self._reserve = reserve

    # --- set-up -------------------------------------------------------------

    def _own(self, paddr: int) -> bool:
        """Whether ``paddr`` is in qprobes' reserved RAM (its own tables)."""
        start, size = self._reserve
        return start <= paddr < start + size

    def _read_entry(self, paddr: int) -> int:
        if self.read_data_phys_u64 is not None and self._own(paddr):
            return self.read_data_phys_u64(paddr)
        return self.target.read_phys_u64(paddr)

    def _write_entry(self, paddr: int, value: int) -> None:
        old = self._read_entry(paddr)
        own = self._own(paddr)
        if self.on_guest_write is not None and not own:
            self.on_guest_write(paddr, old)
        self._written.append((paddr, old))
        if own and self.write_data_phys is not None:
            # An entry of qprobes' own tables is data, never cached while not
            # present: host memory, no gdbstub round trip.
            self.write_data_phys(paddr, value.to_bytes(8, "little"))
        else:
            self.target.write_phys(paddr, value.to_bytes(8, "little"))

    def _new_table(self) -> int:
        page = self.phys.alloc()
        self.target.write_phys(page, bytes(PAGE_SIZE))
        return page

    def setup(self) -> None:
        """Pick the region and install its page table."""
        regs = self.target.registers()
        self._cr3 = regs.cr3 & ADDR_MASK
        if self.root_vaddr is not None:
            # The kernel's own top-level table (Linux: init_top_pgt), not the
            # interrupted task's: that one is freed when the task exits, and
            # every later walk through it would read a reused page. (Under
            # PTI a vCPU in user mode runs on the user half of its pair,
            # which does not map kernel data: walk the kernel half then.)
            for root in (self._cr3, self._cr3 & ~0x1FFF):
                try:
                    found = walk(self.target.read_phys_u64, root, self.root_vaddr,
                                 bool(regs.cr4 & CR4_LA57))  # fmt: skip
                except TranslationError:
                    continue
                self._cr3 = found.paddr & ADDR_MASK
                break
        self._la57 = bool(regs.cr4 & CR4_LA57)
        # The NX bit is reserved (a #PF with RSVD) unless EFER.NXE is on.
        self._nx = bool(regs.efer & EFER_NXE)
        self._user = self._user_root()
        if self._user is not None:
            self._cr3 &= ~0x1FFF  # the kernel half of the pair
        if self._requested_vbase is not None:
            candidates = [self._requested_vbase]
        elif self.image is not None:
            candidates = image_candidates(*self.image, span=AREA_SPAN)
        else:
            candidates = list(range(MODULES_END - AREA_SPAN, MODULES_VADDR - 1, -REGION_SIZE))
        for vbase in candidates:
            if vbase % REGION_SIZE:
                raise ProbeError(f"area base {vbase:#x} is not 2 MiB aligned")
            lo, hi = min(vbase, self.near), max(vbase + AREA_SPAN, self.near)
            if hi - lo >= REL32_REACH:
                continue
            if not self._span_free(vbase):
                if self._requested_vbase is not None:
                    raise ProbeError(f"the requested area {vbase:#x} is already in use")
                continue
            if self._try_region(vbase):
                self.vbase = vbase
                self._pts = {0: self._pt}
                return
            if self._requested_vbase is not None:
                raise ProbeError(f"the requested area {vbase:#x} is already in use")
        where = "the kernel image mapping" if self.image is not None else "the module area"
        raise ProbeError(f"no free 2 MiB region in {where} within rel32 reach of {self.near:#x}")

    def _pmd_entry(self, root: int, vbase: int) -> int | None:
        """Address of the PMD entry for ``vbase`` under ``root``, creating the
        PUD-level tables on the way; None where that cannot be done safely."""
        table = root
        level = Level.PGD if self._la57 else Level.P4D
        while level > Level.PMD:
            entry_addr = table + 8 * table_index(vbase, level)
            entry = self._read_entry(entry_addr)
            if not entry & PTE_PRESENT:
                if level >= Level.P4D:
                    # A new top-level entry would not be shared by other
                    # address spaces (each process has its own PGD).
                    return None
                new = self._new_table()
                self._write_entry(entry_addr, make_entry(new, writable=True, executable=True))
                table = new
            elif level == Level.PUD and entry & PTE_PS:
                return None  # a 1 GiB page covers it
            else:
                table = entry & ADDR_MASK
            level = Level(int(level) - 1)
        return table + 8 * table_index(vbase, Level.PMD)

    def _user_root(self) -> int | None:
        """The PTI user page-table root paired with the kernel's, if PTI is on.

        With page-table isolation Linux allocates each PGD as an 8 KiB pair,
        kernel half first; exceptions from user mode start on the user half,
        which maps only the entry code, so qprobes' stubs must be mapped
        there too (FIELD-NOTES, "Hazards for the trap path").
        """
        kernel = self._cr3 & ~0x1FFF
        user = kernel | 0x1000
        top = 511  # the kernel image's top-level slot, 4- or 5-level
        kernel_top = self._read_entry(kernel + 8 * top)
        user_top = self._read_entry(user + 8 * top)
        if not (kernel_top & PTE_PRESENT and user_top & PTE_PRESENT) or user_top == kernel_top:
            return None
        # The user half mirrors the kernel half's user-space entries (Linux
        # sets NX on the kernel's copies: pti_set_user_pgtbl()).
        same = present = 0
        for i in range(256):
            k = self._read_entry(kernel + 8 * i)
            if k & PTE_PRESENT:
                present += 1
                same += (self._read_entry(user + 8 * i) | PTE_NX) == (k | PTE_NX)
        if present:
            return user if same == present else None
        # No user mappings to compare (a kernel thread's page tables): the
        # user half of a PTI pair maps only a few kernel-half slots (the CPU
        # entry area and the entry text), the kernel half many.
        user_high = [i for i in range(256, 512) if self._read_entry(user + 8 * i) & PTE_PRESENT]
        kernel_high = sum(
            1 for i in range(256, 512) if self._read_entry(kernel + 8 * i) & PTE_PRESENT
        )
        # (Linux preallocates the vmalloc area's upper levels: dozens of slots.)
        looks_paired = 511 in user_high and len(user_high) <= 4 and kernel_high >= 8
        return user if looks_paired else None

    def _pmd_free(self, root: int, vbase: int) -> bool:
        """Whether the PMD entry of ``vbase`` is empty, creating nothing (a
        missing upper level is free too, unless it is a top-level entry)."""
        table = root
        level = Level.PGD if self._la57 else Level.P4D
        while level > Level.PMD:
            entry = self._read_entry(table + 8 * table_index(vbase, level))
            if not entry & PTE_PRESENT:
                return level < Level.P4D
            if level == Level.PUD and entry & PTE_PS:
                return False
            table = entry & ADDR_MASK
            level = Level(int(level) - 1)
        return not self._read_entry(table + 8 * table_index(vbase, Level.PMD)) & PTE_PRESENT

    def _span_free(self, vbase: int) -> bool:
        """Whether the regions after the first one at ``vbase`` are all unmapped."""
        roots = [self._cr3] + ([self._user] if self._user is not None else [])
        return all(self._pmd_free(root, vbase + k * REGION_SIZE)
                   for k in range(1, MAX_REGIONS) for root in roots)  # fmt: skip

    def _map_region(self, region: int) -> int:
        """Install the page table of ``region`` (1..MAX_REGIONS-1); its address."""
        vbase = self.vbase + region * REGION_SIZE
        slots = [self._pmd_entry(self._cr3, vbase)]
        if self._user is not None:
            slots.append(self._pmd_entry(self._user, vbase))
        if any(slot is None or self._read_entry(slot) & PTE_PRESENT for slot in slots):
            raise ProbeError(f"qprobes' area cannot grow: the region at {vbase:#x} is in use")
        table = self._new_table()
        for slot in slots:
            assert slot is not None
            self._write_entry(slot, make_entry(table, writable=True, executable=True))
        self._pts[region] = table
        return table

    def _try_region(self, vbase: int) -> bool:
        """Install a page table for ``vbase`` if its PMD entries are free."""
        slots = [self._pmd_entry(self._cr3, vbase)]
        if self._user is not None:
            slots.append(self._pmd_entry(self._user, vbase))
        if any(slot is None or self._read_entry(slot) & PTE_PRESENT for slot in slots):
            return False
        self._pt = self._new_table()
        for slot in slots:
            assert slot is not None
            self._write_entry(slot, make_entry(self._pt, writable=True, executable=True))
        return True

    # --- pages --------------------------------------------------------------

    def map_page(self, index: int, *, writable: bool, executable: bool, fill: int = 0) -> Page:
        """Map page ``index`` of the region to a fresh physical page, every
        byte ``fill`` (0; int3 for code)."""
        if not 0 <= index < AREA_PAGES:
            raise ProbeError(f"area page index {index} out of range")
        if index in self._pages:
            raise ProbeError(f"area page {index} is already mapped")
        region = index // REGION_PAGES
        table = self._pts.get(region)
        if table is None:
            table = self._map_region(region)
        paddr = self.phys.alloc()
        if executable and self.write_code_phys is not None:
            self.write_code_phys(paddr, bytes([fill]) * PAGE_SIZE)
        elif executable or self.write_data_phys is None:
            self.target.write_phys(paddr, bytes([fill]) * PAGE_SIZE)
        else:
            # A data page: TCG has no code of it to invalidate.
            self.write_data_phys(paddr, bytes([fill]) * PAGE_SIZE)
        entry = make_entry(paddr, writable=writable, executable=executable or not self._nx)
        self._write_entry(table + 8 * (index % REGION_PAGES), entry)
        page = Page(self.vbase + index * PAGE_SIZE, paddr, writable, executable)
        self._pages[index] = page
        return page

    def unmap_page(self, index: int) -> None:
        page = self._pages.pop(index)
        table = self._pts[index // REGION_PAGES]
        self.target.write_phys(table + 8 * (index % REGION_PAGES), bytes(8))
        self.phys.free(page.paddr)
        self._claimed.discard(index)

    def claim_pages(self, count: int) -> int:
        """The first of ``count`` contiguous page indices in the regions after
        the first (512 on), none mapped or claimed; they are the caller's
        (to :meth:`map_page`) until unmapped or :meth:`release_pages`."""
        run = 0
        for index in range(REGION_PAGES, AREA_PAGES):
            if index in self._pages or index in self._claimed:
                run = 0
                continue
            run += 1
            if run == count:
                first = index - count + 1
                self._claimed.update(range(first, index + 1))
                return first
        raise ProbeError(f"qprobes' area has no {count} free pages left "
                         f"({MAX_REGIONS} regions of 2 MiB)")  # fmt: skip

    def release_pages(self, first: int, count: int) -> None:
        """Unmap (where mapped) and give back pages from :meth:`claim_pages`."""
        for index in range(first, first + count):
            if index in self._pages:
                self.unmap_page(index)
            self._claimed.discard(index)

    @property
    def regions(self) -> int:
        """How many regions are mapped."""
        return len(self._pts)

    @property
    def cr3(self) -> int:
        """The page-table root the area was installed under."""
        return self._cr3

    @property
    def la57(self) -> bool:
        return self._la57

    def is_mapped(self, index: int) -> bool:
        return index in self._pages

    def page(self, index: int) -> Page:
        return self._pages[index]

    def contains(self, vaddr: int) -> bool:
        """Whether ``vaddr`` is in the area's span (every region it may grow to)."""
        return self.vbase <= vaddr < self.vbase + AREA_SPAN

    @property
    def end(self) -> int:
        return self.vbase + AREA_SPAN

    def check_mapping(self, vaddr: int) -> int:
        """The physical address behind ``vaddr``, proving the guest sees the mapping."""
        try:
            return self.target.translate(vaddr).paddr
        except TranslationError as exc:
            raise ProbeError(f"area page {vaddr:#x} is not visible to the guest") from exc

    def adopt(self, vbase: int, cr3: int, la57: bool, guest_entries: list[tuple[int, int]]) -> None:
        """Take over the area a dead session mapped (from its journal): its
        teardown then writes the guest's own entries back."""
        self.vbase, self._cr3, self._la57 = vbase, cr3, la57
        self._written = list(guest_entries)
        self._pages.clear()
        self._pts.clear()

    def forget(self) -> None:
        """Give up the area without unmapping it: its entries stay in the
        guest's page tables and its physical pages stay taken."""
        self._written.clear()
        self._pages.clear()
        self._pts.clear()
        self._claimed.clear()

    def teardown(self) -> None:
        """Put back every page-table entry written, newest first."""
        for paddr, old in reversed(self._written):
            self.target.write_phys(paddr, old.to_bytes(8, "little"))
        self._written.clear()
        self._pages.clear()
        self._pts.clear()
        self._claimed.clear()
