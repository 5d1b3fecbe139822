"""Instruction slots: the host-side mirror of kprobes' ``kprobe_insn_page``.

Linux 2.6 (``kernel/kprobes.c``): ``get_insn_slot`` hands out fixed-size
slots from executable pages, ``free_insn_slot`` returns them, and a page that
becomes empty is freed unless it is the last one (keeping one page avoids
mapping and unmapping on every register/unregister pair).

Boosted slots are freed *dirty*, as modern kprobes does: a task preempted
(or interrupted) in the slot, before the copied instruction or the jump
back, still has its rip there, so the slot keeps its bytes and its page
stays mapped. Linux collects dirty slots after ``synchronize_rcu_tasks()``
(``collect_garbage_slots``); here the engine's ``collect`` callback looks at
the guest's stacks (:mod:`qprobes.probes.quiesce`) and names the dirty
slots nothing points into, and only those are handed out again, when no
clean slot and no new page is left. Single-stepped slots run with
interrupts off and are clean again at once.

A slot handed out again is first filled with int3 (``fill``), like a fresh
page, so a stray jump into the unused tail of a slot traps rather than runs
what an older copy left there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from qprobes.errors import ProbeError

PAGE_SIZE = 4096


@dataclass
class InsnPage:
    """One executable page of slots (``struct kprobe_insn_page``)."""

    index: int  # page index inside the guest area
    vaddr: int
    used: list[bool] = field(default_factory=list)
    dirty: list[bool] = field(default_factory=list)

    @property
    def nused(self) -> int:
        return sum(self.used)


def _clean_free(page: InsnPage) -> int | None:
    """The first slot of ``page`` neither used nor dirty (list searches, not a
    loop over every slot)."""
    used, dirty = page.used, page.dirty
    i = -1
    while True:
        try:
            i = used.index(False, i + 1)
        except ValueError:
            return None
        if not dirty[i]:
            return i


class SlotAllocator:
    """Fixed-size instruction slots on area pages ``first_page..last_page``."""

    def __init__(
        self,
        slot_size: int,
        first_page: int,
        last_page: int,
        map_page: Callable[[int], int],
        unmap_page: Callable[[int], None],
        collect: Callable[[list[int]], Iterable[int]] | None = None,
        fill: Callable[[int], None] | None = None,
        more_pages: Callable[[], int] | None = None,
    ) -> None:
        if PAGE_SIZE % slot_size:
            raise ValueError("slot size must divide the page size")
        self.slot_size = slot_size
        self.insns_per_page = PAGE_SIZE // slot_size  # INSNS_PER_PAGE
        self._first = first_page
        self._last = last_page
        self._map_page = map_page
        self._unmap_page = unmap_page
        self._collect = collect
        self._fill = fill
        # Page indices beyond first..last, once those are all taken (raises
        # ProbeError when there are none left).
        self._more_pages = more_pages
        self.pages: list[InsnPage] = []
        self._last_free = 0  # pages before this one have no clean free slot

    def get_insn_slot(self) -> int:
        """The address of a free slot: a clean one, then a new page, then a dirty one."""
        for n in range(self._last_free, len(self.pages)):
            page = self.pages[n]
            i = _clean_free(page)
            if i is not None:
                page.used[i] = True
                self._last_free = n
                return page.vaddr + i * self.slot_size
        self._last_free = len(self.pages)
        taken = {p.index for p in self.pages}
        free = next((i for i in range(self._first, self._last + 1) if i not in taken), None)
        if free is None and self._more_pages is not None:
            try:
                free = self._more_pages()
            except ProbeError:
                free = None
        if free is None:
            ndirty = self.collect_garbage_slots()
            for page in self.pages:
                for i, used in enumerate(page.used):
                    if not used and not page.dirty[i]:
                        page.used[i] = True
                        slot = page.vaddr + i * self.slot_size
                        if self._fill is not None:
                            self._fill(slot)
                        return slot
            if ndirty:
                raise ProbeError(
                    f"out of instruction slots: {ndirty} freed slots may still be in use "
                    "by guest tasks (try again after the guest has run a little)"
                )
            raise ProbeError("out of instruction slots")
        vaddr = self._map_page(free)
        page = InsnPage(free, vaddr, [False] * self.insns_per_page, [False] * self.insns_per_page)
        page.used[0] = True
        self.pages.append(page)
        return vaddr

    def dirty_slots(self) -> list[int]:
        """Addresses of the freed slots a guest task may still be in."""
        return [p.vaddr + i * self.slot_size for p in self.pages
                for i, d in enumerate(p.dirty) if d]  # fmt: skip

    def collect_garbage_slots(self) -> int:
        """Mark clean the dirty slots ``collect`` proves unused; how many stay dirty.

        Without a ``collect`` callback every dirty slot is taken as clean
        (nothing can be proven either way).
        """
        dirty = self.dirty_slots()
        if not dirty:
            return 0
        safe = set(dirty if self._collect is None else self._collect(dirty))
        for page in self.pages:
            for i in range(self.insns_per_page):
                if page.dirty[i] and page.vaddr + i * self.slot_size in safe:
                    page.dirty[i] = False
                    self._last_free = 0
        return len(dirty) - len(safe & set(dirty))

    def free_insn_slot(self, slot: int, dirty: bool = False) -> None:
        """Return ``slot``; free its page if it became empty (and clean) and is
        not the last. ``dirty``: a guest task may still be inside it."""
        for page in self.pages:
            if page.vaddr <= slot < page.vaddr + PAGE_SIZE:
                i = (slot - page.vaddr) // self.slot_size
                if not page.used[i] or (slot - page.vaddr) % self.slot_size:
                    raise ProbeError(f"{slot:#x} is not an allocated slot")
                page.used[i] = False
                page.dirty[i] = dirty
                self._last_free = 0
                if page.nused == 0 and not any(page.dirty) and len(self.pages) > 1:
                    self.pages.remove(page)
                    self._unmap_page(page.index)
                return
        raise ProbeError(f"{slot:#x} is not in a slot page")

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and any(
            p.vaddr <= addr < p.vaddr + PAGE_SIZE for p in self.pages
        )
