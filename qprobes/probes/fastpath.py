"""The fast path's share of qprobes' area: recorders, their exception table,
the per-probe fast-path table the #BP stub reads, and the per-CPU rings.

A kprobe with a recorder (:meth:`FastPath.install`) is handled in the guest:
the #BP stub finds the probe in the probe table, reads this table's word at
the same index (the area offsets of the recorder and of the probe's boosted
slot entry), calls the recorder with the saved ``pt_regs`` and sends the
vCPU to the boosted slot, with no doorbell (see
:func:`qprobes.probes.stubs._fast_hit`). What the recorders are and what
their records hold is :mod:`qprobes.arch.x86_64.recorder_asm`'s business;
this module only places them and gives the host access to the rings, while
the guest runs when the engine has ``/proc/PID/mem`` (``hostmem``).

Area pages (the slots end below them)::

    416-431  fast-path table: one u64 per probe-table entry
    432-433  exception table: (load rip, fixup rip) u64 pairs, 0-terminated
    434      ring headers (64 bytes per CPU, one more for CPUs with no ring)
    435-447  recorder code
    448-511  ring data, split between the CPUs (a power of two each)

The fast-path table and the exception table are mapped at attach (the stub
reads the first at every hit of a probe); code and ring pages when the first
recorder is installed.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qprobes.arch.x86_64.recorder_asm import (
    RING_HEADER_SIZE,
    Recorder,
    RingLayout,
    assemble_chain,
    drain_ring,
    record_header,
    record_tsc,
    ring_stats,
)
from qprobes.errors import ProbeError
from qprobes.probes.area import PAGE_SIZE, GuestArea
from qprobes.probes.stubs import PT_REGS_NAMES, PTABLE_ENTRIES, rtable_entry

if TYPE_CHECKING:
    from qprobes.probes.kprobe import Kprobe, ProbePoint
    from qprobes.target.hostmem import HostMemory
    from qprobes.target.target import Target

PAGE_RTABLE = 416
PAGE_EXTABLE = 432
EXTABLE_PAGES = 2
PAGE_RING_HEADERS = 434
PAGE_REC_CODE = 435
PAGE_RING_DATA = 448
PAGE_FAST_END = 512
RTABLE_PAGES = PTABLE_ENTRIES * 8 // PAGE_SIZE
EXTABLE_ENTRIES = EXTABLE_PAGES * PAGE_SIZE // 16 - 1  # one zero entry ends it
#: Where a chain of recorders leaves its progress in ``pt_regs`` (orig_ax).
ORIG_RAX_OFFSET = 8 * PT_REGS_NAMES.index("orig_rax")


def ring_size_for(ncpus: int) -> int:
    """The largest power-of-two ring each of ``ncpus`` CPUs gets."""
    pages = (PAGE_FAST_END - PAGE_RING_DATA) // max(ncpus, 1)
    if pages < 1:
        raise ProbeError(f"no ring space for {ncpus} CPUs")
    return PAGE_SIZE << (pages.bit_length() - 1)


@dataclass
class Installed:
    """A recorder placed in the area, for one probe point."""

    kp: Kprobe
    recorder: Recorder
    #: Code placed by its owner (a fast return probe's entry), not built here:
    #: the #BP stub calls it, a detour does not (see ``detour_refusal``).
    placed: bool = False


class FastPath:
    """The fast-path pages of an attached engine's area.

    ``write_code(vaddr, data)`` writes guest code so TCG sees it (the
    engine's ``kwrite_code``); ``write_data`` writes guest data.
    """

    def __init__(self, area: GuestArea, target: Target, hostmem: HostMemory | None,
                 write_code: Callable[[int, bytes], None],
                 write_data: Callable[[int, bytes], None]) -> None:  # fmt: skip
        self.area = area
        self.target = target
        self.hostmem = hostmem
        self._write_code = write_code
        self._write_data = write_data
        self.ring: RingLayout | None = None
        self._code_next = 0
        self._extable: list[tuple[int, int]] = []
        # Probe point address -> its kprobes' recorders, in installation order.
        self.installed: dict[int, list[Installed]] = {}
        # The recorders of aggregate points: by the recorders they call, in
        # order; and the kprobes of each, by its tag (its index + 1).
        self._chains: dict[tuple[int, ...], Recorder] = {}
        self._chain_kprobes: list[tuple[Kprobe, ...]] = []
        # Who takes the records of each probe id (a Tracer's decoder); ids
        # are the engine's, so several tracers share the rings.
        self.consumers: dict[int, Callable[[bytes], None]] = {}
        self._next_id = 1
        self.orphans = 0  # records of ids nobody takes any more
        self.dropped = 0  # records the guest dropped: nested hits, full rings
        self.spilled = 0  # hits a full ring handed to the host (lossless mode)
        # With no live view of the rings (an attached QEMU whose memory this
        # process cannot read), the engine stops the guest this often to
        # drain them, so events come out while it runs: a few stops a
        # second, not one per hit.
        self.batch_interval = 0.2
        self.batches = 0  # such stops
        self._last_drain = time.monotonic()
        self._live = hostmem is not None

    def _vaddr(self, page: int) -> int:
        return self.area.vbase + page * PAGE_SIZE

    @property
    def rtable(self) -> int:
        return self._vaddr(PAGE_RTABLE)

    @property
    def extable(self) -> int:
        return self._vaddr(PAGE_EXTABLE)

    @property
    def rec_lo(self) -> int:
        return self._vaddr(PAGE_REC_CODE)

    @property
    def rec_hi(self) -> int:
        return self._vaddr(PAGE_RING_DATA)

    def map_tables(self) -> None:
        """At attach: the pages the stubs read (zero: no recorders)."""
        for i in range(RTABLE_PAGES):
            self.area.map_page(PAGE_RTABLE + i, writable=True, executable=False)
        for i in range(EXTABLE_PAGES):
            self.area.map_page(PAGE_EXTABLE + i, writable=True, executable=False)

    def enable(self, ncpus: int) -> RingLayout:
        """Map the code and ring pages (once) and return the rings' layout."""
        if self.ring is not None:
            return self.ring
        size = ring_size_for(ncpus)
        if (ncpus + 1) * RING_HEADER_SIZE > PAGE_SIZE:
            raise ProbeError(f"ring headers for {ncpus} CPUs do not fit a page")
        self.area.map_page(PAGE_RING_HEADERS, writable=True, executable=False)
        for page in range(PAGE_RING_DATA, PAGE_RING_DATA + ncpus * size // PAGE_SIZE):
            self.area.map_page(page, writable=True, executable=False)
        for page in range(PAGE_REC_CODE, PAGE_RING_DATA):
            self.area.map_page(page, writable=False, executable=True, fill=0xCC)
        self._code_next = self.rec_lo
        self.ring = RingLayout(self._vaddr(PAGE_RING_HEADERS), self._vaddr(PAGE_RING_DATA),
                               size, ncpus)  # fmt: skip
        ring_pages = [PAGE_RING_HEADERS, *range(PAGE_RING_DATA, PAGE_RING_DATA
                                                + ncpus * size // PAGE_SIZE)]  # fmt: skip
        hostmem = self.hostmem
        self._live = hostmem is not None and all(
            hostmem.covers(self.area.page(p).paddr, PAGE_SIZE) for p in ring_pages)
        if hostmem is not None:
            # Look the host addresses up now: later reads run with the guest running.
            for page in ring_pages:
                hostmem.read_phys(self.area.page(page).paddr, 8)
        return self.ring

    @property
    def live(self) -> bool:
        """Whether the rings can be read while the guest runs."""
        return self._live

    def batch_due(self) -> bool:
        """Whether the engine should stop the guest now to drain the rings
        (they have consumers but cannot be read while it runs)."""
        if self.ring is None or not self.consumers or self.live:
            return False
        return time.monotonic() - self._last_drain >= self.batch_interval

    def install(self, kp: Kprobe, point: ProbePoint, build: Callable[[int], Recorder]) -> Recorder:
        """Place the recorder ``build(address)`` returns for ``kp`` (registered,
        at ``point``); it runs once the probe-table word is written
        (:meth:`update`, which the engine calls)."""
        self._check_new(kp, point)
        rec = self.place(build)
        self.installed.setdefault(point.addr, []).append(Installed(kp, rec))
        return rec

    def install_placed(self, kp: Kprobe, point: ProbePoint, rec: Recorder) -> None:
        """Make ``rec``, code already in the area (a fast return probe's entry
        code), the recorder of ``kp`` at ``point``."""
        self._check_new(kp, point)
        self.installed.setdefault(point.addr, []).append(Installed(kp, rec, placed=True))

    def detour_refusal(self, point_addr: int) -> str | None:
        """Why a detour may not call the recorders at a point, or None."""
        if any(i.placed for i in self.installed.get(point_addr, ())):
            return "a return probe's entry code there runs from the int3 only"
        return None

    def _check_new(self, kp: Kprobe, point: ProbePoint) -> None:
        if any(inst.kp is kp for inst in self.installed.get(point.addr, ())):
            raise ProbeError(f"{kp!r} already has a recorder at {point.addr:#x}")

    def recorder_of(self, kp: Kprobe, point_addr: int) -> Recorder | None:
        """``kp``'s own recorder at the point, if it has one."""
        return next((i.recorder for i in self.installed.get(point_addr, ()) if i.kp is kp), None)

    def place(self, build: Callable[[int], Recorder]) -> Recorder:
        """Write the recorder ``build(address)`` returns into the recorder
        pages, with its exception-table entries; nothing calls it yet."""
        if self.ring is None:
            raise ProbeError("enable the fast path before installing recorders")
        addr = self._code_next
        rec = build(addr)
        if rec.address != addr:
            raise ProbeError(f"recorder built at {rec.address:#x}, wanted {addr:#x}")
        if rec.end > self.rec_hi:
            raise ProbeError("no room left for recorders in qprobes' area")
        if len(self._extable) + len(rec.extable) > EXTABLE_ENTRIES:
            raise ProbeError("the recorders' exception table is full")
        self._write_code(addr, rec.code)
        # Entries go after the existing ones: the zero that ends the table
        # moves last, so a fault stub never reads a half-written table.
        at = self.extable + 16 * len(self._extable)
        data = b"".join(struct.pack("<QQ", load, fixup) for load, fixup in rec.extable)
        self._write_data(at, data + bytes(16))
        self._extable += rec.extable
        self._code_next = (rec.end + 15) & ~15
        return rec

    def remove(self, point_addr: int, kp: Kprobe | None = None) -> None:
        """Forget ``kp``'s recorder at a point (default: every one there).
        The code stays: a vCPU may be in it."""
        if kp is None:
            self.installed.pop(point_addr, None)
            return
        left = [i for i in self.installed.get(point_addr, ()) if i.kp is not kp]
        if left:
            self.installed[point_addr] = left
        else:
            self.installed.pop(point_addr, None)

    def entry_of(self, point: ProbePoint | None) -> int | None:
        """The address the #BP stub or a detour calls at a hit of ``point``,
        when every hit there may run in the guest: its kprobe's recorder, or
        for an aggregate point (several kprobes, each with a recorder) a
        chain of theirs in the kprobes' order (:func:`assemble_chain`,
        placed once per sequence). None: the hits go to the host (a kprobe
        with no recorder, one disabled, one that needs the single-step)."""
        if point is None or not point.boosted or point.lost or not point.kprobes:
            return None
        mine = {id(i.kp): i.recorder for i in self.installed.get(point.addr, ())}
        recs: list[int] = []
        for kp in point.kprobes:
            rec = mine.get(id(kp))
            if rec is None or kp.disabled or kp.post_handler is not None or not kp.boost:
                return None
            recs.append(rec.address)
        if len(recs) == 1:
            return recs[0]
        chain = self._chains.get(tuple(recs))
        if chain is None:
            # (A recorder is never reused: the same recorders, the same kprobes.)
            tag = len(self._chain_kprobes) + 1
            try:
                chain = self.place(lambda at: assemble_chain(recs, at, ORIG_RAX_OFFSET, tag))
            except ProbeError:
                return None  # no room for its code: the host takes these hits
            self._chains[tuple(recs)] = chain
            self._chain_kprobes.append(tuple(point.kprobes))
        return chain.address

    def chain_recorded(self, orig_ax: int) -> tuple[Kprobe, ...]:
        """The kprobes that recorded a hit in the guest before its chain
        handed it to the host, from the ``orig_ax`` the chain left (see
        :func:`assemble_chain`); none for any other value (-1: no chain)."""
        tag, count = orig_ax >> 32, orig_ax & 0xFFFFFFFF
        if not 0 < tag <= len(self._chain_kprobes):
            return ()
        return self._chain_kprobes[tag - 1][:count]

    def word(self, point: ProbePoint | None) -> int:
        """The table word for ``point``: the recorder to call (:meth:`entry_of`)
        and its boosted slot entry; 0 when its hits go to the host."""
        entry = self.entry_of(point)
        if entry is None:
            return 0
        assert point is not None
        base = self.area.vbase
        return rtable_entry(entry - base, point.boost_entry - base)

    def write_word(self, index: int, point: ProbePoint | None, rtable: int | None = None) -> None:
        """Write ``point``'s word at ``index`` of the fast-path array at
        ``rtable`` (the probe table's in use; default: the first table's)."""
        base = self.rtable if rtable is None else rtable
        self._write_data(base + 8 * index, struct.pack("<Q", self.word(point)))

    def new_id(self) -> int:
        """A probe id for a recorder, never handed out before."""
        self._next_id += 1
        return self._next_id - 1

    def drain(self) -> int:
        """Take every committed record from every CPU's ring and hand each,
        in TSC order (then CPU, then ring order), to its id's consumer.
        The number of records taken."""
        ring = self.ring
        if ring is None:
            return 0
        self._last_drain = time.monotonic()
        got: list[tuple[int, int, int, bytes]] = []
        for cpu in range(ring.ncpus):
            for n, data in enumerate(drain_ring(self, ring, cpu)):
                got.append((record_tsc(data), cpu, n, data))
        got.sort(key=lambda item: item[:3])
        for *_, data in got:
            consume = self.consumers.get(record_header(data)[1])
            if consume is None:
                self.orphans += 1
            else:
                consume(data)
        stats = [ring_stats(self, ring, c) for c in range(ring.ncpus + 1)]
        self.dropped = sum(s.nested + s.full for s in stats)
        self.spilled = sum(s.spilled for s in stats)
        return len(got)

    def poll(self, running: bool) -> None:
        """The engine's poll hook: drain, while the guest runs only when :attr:`live`."""
        if self.ring is None or not self.consumers or (running and not self.live):
            return
        self.drain()

    # --- ring memory ----------------------------------------------------------

    def _paddr(self, vaddr: int) -> int:
        index = (vaddr - self.area.vbase) // PAGE_SIZE
        return self.area.page(index).paddr + vaddr % PAGE_SIZE

    def read(self, vaddr: int, length: int) -> bytes:
        """Ring memory; while the guest runs only when :attr:`live`."""
        out = bytearray()
        while length > 0:
            n = min(length, PAGE_SIZE - vaddr % PAGE_SIZE)
            paddr = self._paddr(vaddr)
            if self.hostmem is not None:
                out += self.hostmem.read_phys(paddr, n)
            else:
                out += self.target.read_phys(paddr, n)
            vaddr, length = vaddr + n, length - n
        return bytes(out)

    def write(self, vaddr: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), PAGE_SIZE - vaddr % PAGE_SIZE)
            paddr = self._paddr(vaddr)
            if self.hostmem is not None:
                self.hostmem.write_phys(paddr, bytes(view[:n]))
            else:
                self.target.write_phys(paddr, bytes(view[:n]))
            vaddr, view = vaddr + n, view[n:]
