"""Instruction slots: the host-side mirror of kprobes' ``kprobe_insn_page``.

Linux 2.6 (``kernel/kprobes.c``): ``get_insn_slot`` hands out fixed-size
slots from executable pages, ``free_insn_slot`` returns them, and a page that
becomes empty is freed unless it is the last one (keeping one page avoids
mapping and unmapping on every register/unregister pair).

Boosted slots are freed *dirty*, as modern kprobes does: a task preempted
between the copied instruction and the jump back still has its rip in the
slot, so the slot keeps its bytes and is handed out again only when no clean
slot is left, and its page stays mapped. (Linux collects dirty slots after
``synchronize_rcu_tasks()``; from outside the guest there is no such
guarantee.) Single-stepped slots run with interrupts off and are clean again
at once.
"""

from __future__ import annotations

from collections.abc import Callable
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


class SlotAllocator:
    """Fixed-size instruction slots on area pages ``first_page..last_page``."""

    def __init__(
        self,
        slot_size: int,
        first_page: int,
        last_page: int,
        map_page: Callable[[int], int],
        unmap_page: Callable[[int], None],
    ) -> None:
        if PAGE_SIZE % slot_size:
            raise ValueError("slot size must divide the page size")
        self.slot_size = slot_size
        self.insns_per_page = PAGE_SIZE // slot_size  # INSNS_PER_PAGE
        self._first = first_page
        self._last = last_page
        self._map_page = map_page
        self._unmap_page = unmap_page
        self.pages: list[InsnPage] = []

    def get_insn_slot(self) -> int:
        """The address of a free slot: a clean one, then a new page, then a dirty one."""
        for page in self.pages:
            for i, used in enumerate(page.used):
                if not used and not page.dirty[i]:
                    page.used[i] = True
                    return page.vaddr + i * self.slot_size
        taken = {p.index for p in self.pages}
        free = next((i for i in range(self._first, self._last + 1) if i not in taken), None)
        if free is None:
            for page in self.pages:  # last resort: reuse a dirty slot
                for i, used in enumerate(page.used):
                    if not used:
                        page.used[i] = True
                        page.dirty[i] = False
                        return page.vaddr + i * self.slot_size
            raise ProbeError("out of instruction slots")
        vaddr = self._map_page(free)
        page = InsnPage(free, vaddr, [False] * self.insns_per_page, [False] * self.insns_per_page)
        page.used[0] = True
        self.pages.append(page)
        return vaddr

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
                if page.nused == 0 and not any(page.dirty) and len(self.pages) > 1:
                    self.pages.remove(page)
                    self._unmap_page(page.index)
                return
        raise ProbeError(f"{slot:#x} is not in a slot page")

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and any(
            p.vaddr <= addr < p.vaddr + PAGE_SIZE for p in self.pages
        )
