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
    drain_ring,
    record_header,
    record_tsc,
    ring_stats,
)
from qprobes.errors import ProbeError
from qprobes.probes.area import PAGE_SIZE, GuestArea
from qprobes.probes.stubs import PTABLE_ENTRIES, rtable_entry

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
        self.installed: dict[int, Installed] = {}  # probe point address -> recorder
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
        if point.addr in self.installed:
            raise ProbeError(f"{point.addr:#x} already has a recorder")
        rec = self.place(build)
        self.installed[point.addr] = Installed(kp, rec)
        return rec

    def install_placed(self, kp: Kprobe, point: ProbePoint, rec: Recorder) -> None:
        """Make ``rec``, code already in the area (a fast return probe's entry
        code), the recorder of ``kp`` at ``point``."""
        if point.addr in self.installed:
            raise ProbeError(f"{point.addr:#x} already has a recorder")
        self.installed[point.addr] = Installed(kp, rec)

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

    def remove(self, point_addr: int) -> None:
        """Forget the recorder of a point (its code stays: a vCPU may be in it)."""
        self.installed.pop(point_addr, None)

    def word(self, point: ProbePoint | None) -> int:
        """The table word for ``point``: its recorder and boosted slot entry,
        when every hit there may run in the guest."""
        if point is None:
            return 0
        inst = self.installed.get(point.addr)
        if inst is None or not point.boosted or point.lost:
            return 0
        if point.kprobes != [inst.kp] or inst.kp.disabled or inst.kp.post_handler is not None:
            return 0  # an aggregate probe, or one that needs the single-step
        if not inst.kp.boost:
            return 0
        base = self.area.vbase
        return rtable_entry(inst.recorder.address - base, point.boost_entry - base)

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
