"""Scale: the probe table at 100,000 probes, the #BP stub's search over a
2^18-bucket table (run in unicorn), and batch registration on fakes: every
probe of a batch meets the checks a probe registered alone meets, with the
same refusal."""

from __future__ import annotations

import random
import shutil
import struct
from dataclasses import dataclass, field

import pytest

from qprobes.errors import ProbeError, QprobesError
from qprobes.probes.area import AREA_PAGES, MAX_REGIONS, REGION_PAGES, image_candidates
from qprobes.probes.engine import KprobeEngine, _segments
from qprobes.probes.ftrace_site import FtraceSite
from qprobes.probes.journal import MAX_SITES, SITES_LIMIT, journal_size, sites_for
from qprobes.probes.kprobe import Kprobe
from qprobes.probes.ptable import (
    HASH_MULT,
    MAX_BITS,
    TOMBSTONE,
    ProbeTable,
    bits_for,
    max_probes,
    table_hash,
)
from qprobes.probes.slots import SlotAllocator
from qprobes.probes.stubs import PTABLE_BITS, probe_hash
from qprobes.symbols.elf import Symbol, SymbolTable
from tests.unit.test_journal_order import CR3, PageMem

KTEXT = 0xFFFF_FFFF_8100_0000


def kernel_addrs(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return rng.sample(range(KTEXT, KTEXT + (64 << 20)), n)


# --- the table ---------------------------------------------------------------------


def test_the_first_table_hashes_as_the_stub_always_did() -> None:
    for addr in kernel_addrs(1000):
        assert table_hash(addr, PTABLE_BITS) == probe_hash(addr)


def test_table_holds_100000_probes_at_half_load_and_finds_each() -> None:
    assert bits_for(100_000) == MAX_BITS and max_probes() >= 100_000
    addrs = kernel_addrs(100_000)
    table = ProbeTable(PTABLE_BITS)
    for start in range(0, len(addrs), 10_000):
        chunk = addrs[start : start + 10_000]
        if not table.room(len(chunk)):
            table = table.rehashed(len(chunk))
        for addr in chunk:
            table.insert(addr)
    assert table.bits == MAX_BITS and table.live == 100_000
    assert table.live + table.tombstones <= table.size // 2
    assert all(table.find(a) is not None for a in addrs)
    present = set(addrs)
    assert all(table.find(a + 1) is None for a in addrs[:2000] if a + 1 not in present)


def test_removal_leaves_a_tombstone_and_moves_nothing() -> None:
    table = ProbeTable(PTABLE_BITS)
    # Addresses of one cluster: the same bucket by construction (the hash's
    # multiplier is odd, so invertible modulo 2^64).
    inverse = pow(HASH_MULT, -1, 2**64)
    bucket = 77
    same = [((bucket << (64 - PTABLE_BITS)) + r) * inverse % 2**64 for r in range(1, 6)]
    assert {table_hash(a, PTABLE_BITS) for a in same} == {bucket}
    for a in same:
        table.insert(a)
    before = list(table.entries)
    assert table.remove(same[1]) == bucket + 1
    # Only that bucket changed, to a tombstone: a search that was past it
    # (another vCPU stopped mid-search) still finds the addresses after it.
    changed = [i for i, (x, y) in enumerate(zip(before, table.entries, strict=True)) if x != y]
    assert changed == [bucket + 1]
    assert table.entries[bucket + 1] == TOMBSTONE
    assert [table.find(a) for a in same[2:]] == [bucket + 2, bucket + 3, bucket + 4]
    assert table.find(same[1]) is None
    # An insert reuses the tombstone of its cluster.
    assert table.insert(same[1]) == bucket + 1 and table.tombstones == 0


def test_tombstones_count_towards_the_load_and_a_rehash_drops_them() -> None:
    table = ProbeTable(PTABLE_BITS)
    addrs = kernel_addrs(table.size // 2)
    for a in addrs:
        table.insert(a)
    for a in addrs[:-10]:
        table.remove(a)
    assert not table.room(1)
    fresh = table.rehashed(1)
    assert fresh.tombstones == 0 and fresh.live == 10 and fresh.bits == PTABLE_BITS
    assert all(fresh.find(a) is not None for a in addrs[-10:])
    with pytest.raises(ProbeError, match="at most 131072 probe addresses"):
        table.rehashed(max_probes())


def test_a_table_read_back_from_the_guest_keeps_its_counts() -> None:
    table = ProbeTable(14)
    for a in kernel_addrs(300):
        table.insert(a)
    table.remove(table.addresses()[0])
    back = ProbeTable.from_entries(list(table.entries))
    assert (back.bits, back.live, back.tombstones) == (14, 299, 1)


# --- area, journal, slots ------------------------------------------------------------


def test_area_span_and_candidates_leave_room_for_every_region() -> None:
    assert AREA_PAGES == MAX_REGIONS * REGION_PAGES
    text, end = 0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8380_0000
    span = MAX_REGIONS * 2 * 1024 * 1024
    for base in image_candidates(text, end, span):
        assert base + span <= 0xFFFF_FFFF_A000_0000 and not text <= base < end
        assert not base < end < base + span


def test_journal_sites_follow_the_reservation() -> None:
    assert sites_for(4 << 20) >= MAX_SITES
    assert sites_for(4 << 20) * 32 <= (4 << 20) // 8
    assert sites_for(1 << 30) == SITES_LIMIT
    assert journal_size(sites_for(32 << 20)) % 4096 == 0


def test_slots_come_from_the_later_regions_once_the_first_is_full() -> None:
    mapped: list[int] = []
    extra = iter(range(512, 600))
    alloc = SlotAllocator(1024, 32, 33, lambda i: mapped.append(i) or 0x1000 * i,
                          lambda i: None, more_pages=lambda: next(extra))  # fmt: skip
    slots = [alloc.get_insn_slot() for _ in range(4 * 6)]
    assert mapped == [32, 33, 512, 513, 514, 515] and len(set(slots)) == 24


def test_blacklist_segments_name_the_first_range_in_list_order() -> None:
    ranges = [(10, 20, "a"), (15, 30, "b"), (0, 100, "c"), (40, 41, "d")]
    bounds, first = _segments(ranges)

    def lookup(addr: int) -> str | None:
        import bisect

        i = bisect.bisect_right(bounds, addr) - 1
        return None if i < 0 or first[i] < 0 else ranges[first[i]][2]

    for addr in range(-5, 110):
        linear = next((why for s, e, why in ranges if s <= addr < e), None)
        assert lookup(addr) == linear, addr


# --- the stub's search over a big table, in unicorn ------------------------------------


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")
def test_the_bp_stub_finds_probes_in_a_2_18_table_with_tombstones() -> None:
    pytest.importorskip("unicorn")
    from tests.unit import test_recorder_stubs as rs

    machine = rs.Machine("%di")
    g = machine.guest
    big = rs.AREA + 0x200000  # header page, 2 MiB of addresses, 2 MiB of fast-path words
    entries = 1 << MAX_BITS
    g.map(big, 0x1000 + 16 * entries)
    table = ProbeTable(MAX_BITS)
    inverse = pow(HASH_MULT, -1, 2**64)
    bucket = table_hash(rs.PROBE_IP, MAX_BITS)
    # The probe's cluster starts with addresses of its bucket, one of them
    # removed (a tombstone the search must pass over).
    before = [((bucket << (64 - MAX_BITS)) + r) * inverse % 2**64 for r in range(1, 4)]
    for a in kernel_addrs(100_000, seed=5):
        if a != rs.PROBE_IP:
            table.insert(a)
    for a in before:
        table.insert(a)
    index = table.insert(rs.PROBE_IP)
    tomb = table.remove(before[1])
    assert tomb is not None and table.entries[tomb] == TOMBSTONE
    # The search from the probe's bucket passes the tombstone to reach it.
    assert (index - bucket) % table.size > (tomb - bucket) % table.size
    assert table.live == 100_003
    addrs, rtable = big + 0x1000, big + 0x1000 + 8 * entries
    g.write(addrs, struct.pack(f"<{entries}Q", *table.entries))
    g.write(rtable + 8 * index, rs.q(rs.rtable_entry(rs.REC_LO - rs.AREA, rs.BOOST - rs.AREA)))
    g.write(big, struct.pack("<QQQQ", table.shift, table.mask, addrs, rtable))
    g.write(rs.VARS + rs.VAR_PTABLE, rs.q(big))  # the switch: one store
    # The first table no longer holds the probe: only the big one can find it.
    g.write(rs.PTABLE + 8 * probe_hash(rs.PROBE_IP), rs.q(0))
    assert machine.hit() == rs.BOOST  # found, recorded, sent to the boosted slot
    assert len(machine.records()) == 1 and g.read(rs.DOORBELL, 1) == b"\0"


# --- batch registration on fakes -------------------------------------------------------

NOP5 = bytes.fromhex("0f1f440000")
FUNCS = {
    # name: code (each at its own 0x100-aligned address)
    "plain": NOP5 + bytes.fromhex("554889e55dc3"),  # push rbp; mov rbp, rsp; pop rbp; ret
    "loops": NOP5 + bytes.fromhex("4885c075fb5dc3"),  # test rax, rax; jne to +5
    "listed": NOP5 + bytes.fromhex("554889e55dc3"),
    "nofentry": bytes.fromhex("554889e55dc3"),
    "reserved": NOP5 + bytes.fromhex("554889e55dc3"),
}


@dataclass
class FakeFtrace:
    """The engine's ftrace hook: sites at every function's +0 that has a nop5."""

    sites: set[int]
    reserved: set[int]
    batches: list[bool] = field(default_factory=list)

    def site(self, addr: int) -> FtraceSite | None:
        return FtraceSite(addr, 0, 0, False, False, False) if addr in self.sites else None

    def text_reserved(self, start: int, end: int) -> str | None:
        hit = [a for a in self.reserved if start <= a < end]
        return f"a jump-label (static key) site at {hit[0]:#x}" if hit else None


class FakeTarget:
    def __init__(self) -> None:
        self.mem = bytearray(0x10000)
        self.client = None

    def _off(self, addr: int) -> int:
        off = addr - KTEXT
        if not 0 <= off < len(self.mem):
            raise ProbeError(f"fake memory has no {addr:#x}")
        return off

    def read(self, addr: int, length: int) -> bytes:
        if addr >> 63 and addr >= 0xFFFF_FFFF_FE00_0000:
            return bytes(length)  # the area
        off = self._off(addr)
        return bytes(self.mem[off : off + length])

    def write(self, addr: int, data: bytes) -> None:
        if addr >= 0xFFFF_FFFF_FE00_0000:
            return
        off = self._off(addr)
        self.mem[off : off + len(data)] = data


def fake_engine() -> tuple[KprobeEngine, FakeTarget, dict[str, int], FakeFtrace]:
    target = FakeTarget()
    engine = KprobeEngine(target, (0x7C00000, 4 << 20), KTEXT)  # type: ignore[arg-type]
    where: dict[str, int] = {}
    syms = []
    for n, (name, code) in enumerate(FUNCS.items()):
        addr = KTEXT + 0x100 * (n + 1)
        target.write(addr, code)
        where[name] = addr
        syms.append(Symbol(name, addr, len(code), "func"))
    engine.symbols = SymbolTable(syms)
    ftrace = FakeFtrace({a for name, a in where.items() if FUNCS[name].startswith(NOP5)},
                        {where["reserved"] + 5})  # fmt: skip
    engine.ftrace = ftrace
    engine.batch_hooks.append(ftrace.batches.append)
    engine.blacklist(where["listed"], where["listed"] + 11, "it is listed")
    slot_page = 0xFFFF_FFFF_FE40_0000
    engine._slots = SlotAllocator(32, 32, 40, lambda i: slot_page + 0x1000 * i, lambda i: None)
    engine._tbuf = type(engine._tbuf)(0xFFFF_FFFF_FE20_0000, 0xFFFF_FFFF_FE20_1000, 0, None)
    engine.attached = True
    return engine, target, where, ftrace


def wanted(where: dict[str, int]) -> list[tuple[str, int]]:
    return [("plain", 0), ("loops", 0), ("listed", 0), ("nofentry", 0), ("reserved", 0),
            ("plain", 6), ("nofentry", 2), ("plain", 0x40)]  # fmt: skip


def test_a_batch_makes_every_check_and_refuses_as_alone() -> None:
    engine, target, where, ftrace = fake_engine()
    kps = [Kprobe(symbol_name=name, offset=off, pre_handler=lambda kp, ctx: None)
           for name, off in wanted(where)]  # fmt: skip
    results = engine.register_many(kps)
    assert ftrace.batches == [True, False]  # the hooks saw one batch
    armed = [kp for kp, err in zip(kps, results, strict=True) if err is None]
    # plain+0 (on its +5), nofentry+0, plain+6: armed, with their int3s.
    assert [(kp.symbol_name, kp.offset) for kp in armed] == [("plain", 0), ("nofentry", 0),
                                                             ("plain", 6)]  # fmt: skip
    for kp in armed:
        assert kp.arm_addr is not None
        assert target.read(kp.arm_addr, 1) == b"\xcc"
        assert engine.probe_table.find(kp.arm_addr) is not None
    # Each refusal is the one a probe there meets registered alone.
    for (name, off), err in zip(wanted(where), results, strict=True):
        if err is None:
            continue
        alone, _t, _w, _f = fake_engine()
        with pytest.raises(QprobesError) as info:
            alone.register_kprobe(Kprobe(symbol_name=name, offset=off,
                                         pre_handler=lambda kp, ctx: None))  # fmt: skip
        assert str(info.value) == str(err), name
        assert type(info.value) is type(err)
    reasons = [str(e) for e in results if e is not None]
    assert any("a branch in loops goes there too" in r for r in reasons)
    assert any("blacklisted: it is listed" in r for r in reasons)
    assert any("text the kernel patches" in r for r in reasons)
    assert any("not an instruction boundary" in r for r in reasons)
    assert any("outside plain" in r for r in reasons)


def test_stop_on_error_raises_the_first_refusal_and_keeps_the_earlier_probes() -> None:
    engine, _target, where, ftrace = fake_engine()
    kps = [Kprobe(symbol_name=n, offset=o) for n, o in wanted(where)[:3]]
    with pytest.raises(ProbeError, match="a branch in loops"):
        engine.register_many(kps, stop_on_error=True)
    assert kps[0].registered and not kps[1].registered and not kps[2].registered
    assert ftrace.batches == [True, False]


def test_a_bigger_journal_records_more_sites_and_reads_only_up_to_its_mark() -> None:
    from qprobes.probes.journal import Journal, JournalError, JournalState

    size = journal_size(6000)
    mem = bytearray(size)

    def read(addr: int, n: int) -> bytes:
        return bytes(mem[addr - 0x1000 : addr - 0x1000 + n])

    def write(addr: int, data: bytes) -> None:
        mem[addr - 0x1000 : addr - 0x1000 + len(data)] = data

    j = Journal(0x1000, read, write, max_sites=6000)
    j.begin(None, 0x2000000, "test")
    addrs = kernel_addrs(6000, seed=3)
    for n, a in enumerate(addrs):
        j.site(a, 0xFFFF_FFFF_FE40_0000 + 32 * n, 0x0F, True)
    assert not j.has_room(KTEXT - 1)
    with pytest.raises(JournalError, match="more than 6000 probe sites"):
        j.site(KTEXT - 1, 0, 0x55, False)
    loaded = j.load()
    assert loaded is not None and [s[0] for s in loaded.sites] == addrs
    # A new session's journal starts empty without clearing the old sites:
    # its high-water mark is 0, so none of them is read back.
    j.end(JournalState.DETACHED)
    j2 = Journal(0x1000, read, write, max_sites=6000)
    j2.begin(j.read_header(), 0x2000000, "test")
    again = j2.load()
    assert again is not None and again.sites == []
    j2.site(addrs[0], 0, 0x55, False)
    again = j2.load()
    assert again is not None and [s[0] for s in again.sites] == [addrs[0]]


def test_unregister_many_puts_back_every_byte_as_one_by_one() -> None:
    engine, target, where, _ftrace = fake_engine()
    before = bytes(target.mem)
    kps = [Kprobe(symbol_name=n, offset=o) for n, o in wanted(where)]
    results = engine.register_many(kps)
    armed = [kp for kp, err in zip(kps, results, strict=True) if err is None]
    assert len(armed) == 3 and bytes(target.mem) != before
    # A second kprobe on plain's point: the point stays while it is there.
    extra = engine.register_kprobe(Kprobe(symbol_name="plain", offset=0))
    # The guest rewrote nofentry's int3 (its own text patching): lost, left alone.
    nofentry = next(kp for kp in armed if kp.symbol_name == "nofentry")
    assert nofentry.arm_addr is not None
    target.write(nofentry.arm_addr, b"\x90")
    rewritten = bytes(target.mem)
    stray = Kprobe(symbol_name="plain", offset=0)  # never registered
    got = engine.unregister_many([*armed, stray, armed[0]])
    assert got[: len(armed)] == [None] * len(armed)
    assert [str(e) for e in got[len(armed) :]] == [f"{stray!r} is not registered",
                                                   f"{armed[0]!r} is not registered"]  # fmt: skip
    assert all(not kp.registered for kp in armed) and nofentry.lost
    plain = extra.arm_addr
    assert plain is not None and engine.points[plain].armed and target.read(plain, 1) == b"\xcc"
    assert list(engine.points) == [plain] and engine.probe_table.live == 1
    # What is left equals unregistering the same probes one by one.
    alone, t2, w2, _f2 = fake_engine()
    kps2 = [Kprobe(symbol_name=n, offset=o) for n, o in wanted(w2)]
    armed2 = [kp for kp, err in zip(kps2, alone.register_many(kps2), strict=True) if err is None]
    alone.register_kprobe(Kprobe(symbol_name="plain", offset=0))
    t2.mem[:] = rewritten
    for kp in armed2:
        alone.unregister_kprobe(kp)
    assert bytes(target.mem) == bytes(t2.mem)
    engine.unregister_many([extra])
    expected = bytearray(before)
    expected[nofentry.arm_addr - KTEXT] = 0x90  # the guest's byte stays
    assert target.mem == expected
    assert not engine.points and engine.probe_table.live == 0


def test_the_points_index_finds_the_points_in_a_range_as_a_scan_does() -> None:
    from qprobes.probes.engine import _Points

    rng = random.Random(3)
    points = _Points()
    plain: dict[int, object] = {}
    base = KTEXT + 0x3F00
    for step in range(3000):
        addr = base + rng.randrange(0x3000)
        op = rng.randrange(4)
        if op < 2:
            points[addr] = plain[addr] = step  # type: ignore[assignment]
        elif op == 2 and addr in plain:
            del points[addr], plain[addr]
        else:
            assert points.pop(addr, None) == plain.pop(addr, None)
        lo = base + rng.randrange(-0x100, 0x3000)
        hi = lo + rng.choice((0, 1, 5, 15, 32, 33, 300, 0x1800))
        assert sorted(points.within(lo, hi)) == sorted(a for a in plain if lo <= a < hi)
    assert dict(points) == plain
    points.clear()
    assert points.within(base, base + 0x4000) == [] and not points._pages


class _StreamClient:
    """A gdbstub client that records each pipelined stream of writes."""

    def __init__(self, mem: PageMem) -> None:
        self.mem, self.streams = mem, []  # type: list[list[tuple[int, bytes]]]

    def set_phys_mem_mode(self, on: bool) -> None:
        assert on

    def write_memory_many(self, writes: list[tuple[int, bytes]]) -> None:
        self.streams.append(list(writes))
        for paddr, data in writes:
            self.mem.write_phys(paddr, data)


def paged_engine() -> tuple[KprobeEngine, PageMem, _StreamClient]:
    engine = KprobeEngine(FakeTarget(), (0x7C00000, 4 << 20), KTEXT)  # type: ignore[arg-type]
    mem = PageMem()
    client = _StreamClient(mem)
    engine.hostmem, engine.client, engine._kcr3 = mem, client, CR3  # type: ignore[assignment]
    engine.target.read_phys = mem.read_phys  # type: ignore[attr-defined]
    return engine, mem, client


def test_a_batch_writes_the_int3s_last_and_a_later_write_over_one_wins() -> None:
    engine, mem, client = paged_engine()
    slot = 0xFFFF_FFFF_FE40_0000
    a, b, c = KTEXT + 0x10, KTEXT + 0x2010, KTEXT + 0x4010
    mem.write_phys(a & 0xFFFFFFFF, b"\x55")
    with engine.batch():
        for n, addr in enumerate((a, b, c)):
            engine.kwrite_code(slot + 32 * n, bytes([n]) * 32)
            engine.kwrite_code(addr, b"\xcc", arming=True)
            assert engine.kread(addr, 1) == b"\xcc"  # the batch reads what it will write
        engine.kwrite_code(a, b"\x55")  # a's probe taken out again in the same batch
    (stream,) = client.streams
    phys = 0xFFFFFFFF
    # The three slots in one write, then the int3s that still stand, in order.
    slots = b"".join(bytes([n]) * 32 for n in range(3))
    assert stream == [(slot & phys, slots), (a & phys, b"\x55"), (b & phys, b"\xcc"),
                      (c & phys, b"\xcc")]  # fmt: skip
    assert mem.read_phys(a & phys, 1) == b"\x55" and mem.read_phys(b & phys, 1) == b"\xcc"


def test_the_handler_table_names_the_vector_each_comparison_named() -> None:
    engine, _t, where, _f = fake_engine()
    assert engine.symbols is not None
    plain, loops = where["plain"], where["loops"]
    outside = KTEXT + 0x9000  # in no function
    # Vector order matters: the first whose handler shares the function.
    engine._orig_handler = {14: loops + 3, 3: plain + 2, 1: outside, 13: plain}
    for addr in (plain, plain + 5, loops, loops + 1, outside, outside + 1, where["nofentry"]):
        found = engine.symbols.resolve(addr)
        want = next((v for v, h in engine._orig_handler.items()
                     if engine._same_function_as(addr, found, h)), None)  # fmt: skip
        assert engine._handler_vector(addr, found) == want, hex(addr)
    assert engine._handler_vector(plain, engine.symbols.resolve(plain)) == 3
    assert engine._handler_vector(outside, None) == 1
    engine._orig_handler = {1: plain}  # a new set of handlers: a new table
    assert engine._handler_vector(plain + 1, engine.symbols.resolve(plain + 1)) == 1


def test_original_bytes_in_a_batch_are_as_outside_it() -> None:
    """The batch works out each page's original bytes once: the same as
    without the batch after int3s come and go, and after a write that is
    not an int3 (a debugger's) the new bytes."""
    from qprobes.arch.x86_64 import insn as x86insn
    from qprobes.probes.kprobe import ProbePoint

    engine, mem, _client = paged_engine()
    code = bytes.fromhex("554889e5 4883ec10 c9c3") * 600  # 10 bytes each, over two pages
    base = KTEXT + 0xF00
    mem.write_phys(base & 0xFFFFFFFF, code)
    a, b = base + 0x104, base + 0x1004  # two probe points (on a push), one per page
    for addr in (a, b):
        insn = x86insn.decode(code[addr - base :], addr)
        engine.points[addr] = ProbePoint(addr, code[addr - base], insn, x86insn.analyze(insn),
                                         0, False, [], armed=True)  # fmt: skip
    mem.write_phys(a & 0xFFFFFFFF, b"\xcc")
    outside = engine._original_bytes(base, len(code))
    assert outside == code
    with engine.batch():
        assert engine._original_bytes(base, len(code)) == outside
        assert engine._batch is not None and len(engine._batch.original) == 3  # its pages, kept
        engine.kwrite_code(b, b"\xcc", arming=True)
        assert engine._original_bytes(b - 3, 9) == code[b - 3 - base : b + 6 - base]
        assert engine.kread(b, 1) == b"\xcc"
        engine.kwrite_code(base + 0x10, b"\x90\x90")  # not an int3: the bytes change
        got = engine._original_bytes(base, 0x20)
        assert got == code[:0x10] + b"\x90\x90" + code[0x12:0x20]
    assert engine._original_bytes(base, 0x20) == got
