"""The fast path's pages and tables (qprobes.probes.fastpath) over a fake
area: ring sizes, recorder placement and the exception table, which probe
points may run in the guest, and the drain that merges every CPU's ring in
TSC order and hands each record to its probe id's consumer."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from qprobes.arch.x86_64.recorder_asm import (
    PAD_ID,
    REC_TSC,
    RING_FULL,
    RING_NESTED,
    RING_SPILLED,
    Recorder,
)
from qprobes.errors import ProbeError
from qprobes.probes.area import PAGE_SIZE, Page
from qprobes.probes.fastpath import (
    EXTABLE_ENTRIES,
    PAGE_REC_CODE,
    PAGE_RING_DATA,
    FastPath,
    ring_size_for,
)
from qprobes.probes.kprobe import Kprobe, ProbePoint
from qprobes.probes.stubs import rtable_entry

VBASE = 0xFFFF_FFFF_C000_0000


@dataclass
class FakeArea:
    vbase: int = VBASE
    pages: dict[int, Page] = field(default_factory=dict)

    def map_page(self, index: int, *, writable: bool, executable: bool, fill: int = 0) -> Page:
        assert index not in self.pages
        page = Page(self.vbase + index * PAGE_SIZE, 0x100_0000 + index * PAGE_SIZE, writable,
                    executable)  # fmt: skip
        self.pages[index] = page
        return page

    def page(self, index: int) -> Page:
        return self.pages[index]


@dataclass
class FakeTarget:
    phys: dict[int, int] = field(default_factory=dict)

    def read_phys(self, paddr: int, length: int) -> bytes:
        return bytes(self.phys.get(paddr + i, 0) for i in range(length))

    def write_phys(self, paddr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.phys[paddr + i] = b


def make(ncpus: int = 2) -> tuple[FastPath, dict[int, bytes], dict[int, bytes]]:
    code: dict[int, bytes] = {}
    data: dict[int, bytes] = {}
    area, target = FakeArea(), FakeTarget()
    fast = FastPath(area, target, None, code.__setitem__, data.__setitem__)  # type: ignore[arg-type]
    fast.enable(ncpus)
    return fast, code, data


def point(addr: int = 0xFFFF_FFFF_8100_0005, boosted: bool = True, **kp_fields: object
          ) -> tuple[ProbePoint, Kprobe]:  # fmt: skip
    kp = Kprobe(addr=addr, **kp_fields)  # type: ignore[arg-type]
    pt = ProbePoint(addr, 0x55, None, None, VBASE + 0x20040, boosted, [kp], armed=True)
    return pt, kp


def recorder_at(size: int, extable: int = 2) -> object:
    def build(at: int) -> Recorder:
        table = tuple((at + 4 * i, at + 100 + i) for i in range(extable))
        return Recorder(at, b"\x90" * size, table, 64)

    return build


@pytest.mark.parametrize(("ncpus", "size"), [(1, 256 << 10), (2, 128 << 10), (3, 64 << 10),
                                             (4, 64 << 10), (64, 4096)])  # fmt: skip
def test_ring_sizes(ncpus: int, size: int) -> None:
    assert ring_size_for(ncpus) == size


def test_enable_maps_rings_once_and_headers_fit() -> None:
    fast, _, _ = make(2)
    ring = fast.ring
    assert ring is not None and ring.size == 128 << 10 and ring.ncpus == 2
    assert fast.enable(5) is ring  # once
    assert ring.data == VBASE + PAGE_RING_DATA * PAGE_SIZE
    with pytest.raises(ProbeError, match="no ring space"):
        ring_size_for(65)


def test_install_places_code_and_grows_the_exception_table() -> None:
    fast, code, data = make()
    pt1, kp1 = point()
    pt2, kp2 = point(0xFFFF_FFFF_8100_1000)
    r1 = fast.install(kp1, pt1, recorder_at(30))  # type: ignore[arg-type]
    r2 = fast.install(kp2, pt2, recorder_at(50, extable=3))  # type: ignore[arg-type]
    assert r1.address == fast.rec_lo == VBASE + PAGE_REC_CODE * PAGE_SIZE
    assert r2.address == r1.address + 32  # 16-aligned after the first
    assert code == {r1.address: r1.code, r2.address: r2.code}
    # Each install appends its entries and a new terminating zero.
    first = b"".join(struct.pack("<QQ", a, b) for a, b in r1.extable)
    assert data[fast.extable] == first + bytes(16)
    assert data[fast.extable + 32] == b"".join(
        struct.pack("<QQ", a, b) for a, b in r2.extable) + bytes(16)  # fmt: skip
    with pytest.raises(ProbeError, match="already has a recorder"):
        fast.install(kp1, pt1, recorder_at(8))  # type: ignore[arg-type]


def test_install_refuses_what_does_not_fit() -> None:
    fast, _, _ = make()
    pt, kp = point()
    with pytest.raises(ProbeError, match="no room"):
        fast.install(kp, pt, recorder_at(fast.rec_hi - fast.rec_lo + 1))  # type: ignore[arg-type]
    with pytest.raises(ProbeError, match="exception table is full"):
        fast.install(kp, pt, recorder_at(8, EXTABLE_ENTRIES + 1))  # type: ignore[arg-type]
    with pytest.raises(ProbeError, match="wanted"):
        fast.install(kp, pt, lambda at: Recorder(at + 16, b"", (), 64))


def test_which_points_run_in_the_guest() -> None:
    fast, _, _ = make()
    pt, kp = point()
    assert fast.word(pt) == 0  # no recorder yet
    rec = fast.install(kp, pt, recorder_at(16))  # type: ignore[arg-type]
    assert fast.word(pt) == rtable_entry(rec.address - VBASE, pt.boost_entry - VBASE)
    assert fast.word(None) == 0
    other = Kprobe(addr=pt.addr)
    pt.kprobes.append(other)  # an aggregate probe, one of whose kprobes has no recorder
    assert fast.word(pt) == 0
    pt.kprobes.remove(other)
    for change, undo in (
        (lambda: setattr(kp, "disabled", True), lambda: setattr(kp, "disabled", False)),
        (lambda: setattr(kp, "post_handler", print), lambda: setattr(kp, "post_handler", None)),
        (lambda: setattr(kp, "boost", False), lambda: setattr(kp, "boost", True)),
        (lambda: setattr(pt, "lost", True), lambda: setattr(pt, "lost", False)),
        (lambda: setattr(pt, "boosted", False), lambda: setattr(pt, "boosted", True)),
    ):
        change()
        assert fast.word(pt) == 0
        undo()
        assert fast.word(pt) != 0
    fast.remove(pt.addr)
    assert fast.word(pt) == 0


def test_an_aggregate_point_whose_kprobes_all_record_calls_a_chain_of_them() -> None:
    fast, code, _ = make()
    pt, kp1 = point()
    r1 = fast.install(kp1, pt, recorder_at(16))  # type: ignore[arg-type]
    kp2 = Kprobe(addr=pt.addr)
    pt.kprobes.append(kp2)
    assert fast.entry_of(pt) is None  # kp2 has no recorder: the host takes the hits
    r2 = fast.install(kp2, pt, recorder_at(16))  # type: ignore[arg-type]
    with pytest.raises(ProbeError, match="already has a recorder"):
        fast.install(kp2, pt, recorder_at(8))  # type: ignore[arg-type]
    chain = fast.entry_of(pt)
    assert chain is not None and chain not in (r1.address, r2.address)
    assert fast.word(pt) == rtable_entry(chain - VBASE, pt.boost_entry - VBASE)
    # The chain calls kp1's recorder, then kp2's (the kprobes' order).
    calls = [chain + i + 5 + int.from_bytes(code[chain][i + 1 : i + 5], "little", signed=True)
             for i in range(len(code[chain]) - 4) if code[chain][i] == 0xE8]  # fmt: skip
    assert calls == [r1.address, r2.address]
    assert fast.entry_of(pt) == chain  # placed once for the same recorders
    kp2.disabled = True
    assert fast.entry_of(pt) is None
    kp2.disabled = False
    pt.kprobes.reverse()
    other = fast.entry_of(pt)
    assert other is not None and other != chain  # another order, another chain
    fast.remove(pt.addr, kp1)
    pt.kprobes.remove(kp1)
    assert fast.entry_of(pt) == r2.address
    assert fast.recorder_of(kp2, pt.addr) is r2 and fast.recorder_of(kp1, pt.addr) is None


def _put(fast: FastPath, cpu: int, records: list[tuple[int, int]], pad: int = 0) -> None:
    """Commit records (probe id, tsc) of 56 bytes in CPU ``cpu``'s ring,
    after ``pad`` bytes of padding."""
    ring = fast.ring
    assert ring is not None
    blob = b""
    if pad:
        blob += struct.pack("<II", pad, PAD_ID).ljust(pad, b"\0")
    for probe_id, tsc in records:
        rec = bytearray(56)
        struct.pack_into("<II", rec, 0, 56, probe_id)
        struct.pack_into("<Q", rec, REC_TSC, tsc)
        blob += bytes(rec)
    fast.write(ring.ring(cpu), blob)
    fast.write(ring.header(cpu), struct.pack("<Q", len(blob)))


def test_drain_merges_cpus_in_tsc_order_and_dispatches_by_id() -> None:
    fast, _, _ = make(2)
    got: list[tuple[str, int]] = []
    fast.consumers[7] = lambda d: got.append(("a", struct.unpack_from("<Q", d, REC_TSC)[0]))
    fast.consumers[8] = lambda d: got.append(("b", struct.unpack_from("<Q", d, REC_TSC)[0]))
    _put(fast, 0, [(7, 10), (8, 30), (9, 35)], pad=16)
    _put(fast, 1, [(8, 20), (7, 40)])
    ring = fast.ring
    assert ring is not None
    fast.write(ring.header(1) + RING_NESTED, struct.pack("<Q", 2))
    fast.write(ring.header(2) + RING_FULL, struct.pack("<Q", 1))  # the no-ring CPUs' header
    fast.write(ring.header(0) + RING_SPILLED, struct.pack("<Q", 4))
    assert fast.drain() == 5
    assert got == [("a", 10), ("b", 20), ("b", 30), ("a", 40)]
    assert (fast.orphans, fast.dropped, fast.spilled) == (1, 3, 4)
    assert fast.drain() == 0  # the tails moved to the heads
    fast.poll(True)  # not live: nothing is read while the guest runs
    assert got[-1] == ("a", 40)


def test_new_ids_are_never_reused() -> None:
    fast, _, _ = make()
    ids = [fast.new_id() for _ in range(3)]
    assert ids == sorted(set(ids)) and 0 not in ids
