"""The journal's records: written before each change, read back whole."""

from __future__ import annotations

import pytest

from qprobes.probes.journal import (
    END,
    MAX_GATES,
    Journal,
    JournalError,
    JournalState,
    StepLevel,
    unpack_header,
)


class Memory:
    def __init__(self) -> None:
        self.data = bytearray(END + 4096)
        self.writes = 0

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.data[addr - 0x1000 : addr - 0x1000 + n])

    def write(self, addr: int, data: bytes) -> None:
        self.writes += 1
        self.data[addr - 0x1000 : addr - 0x1000 + len(data)] = data


def journal(mem: Memory) -> Journal:
    return Journal(0x1000, mem.read, mem.write)


def test_no_journal_and_nothing_recorded_before_begin() -> None:
    mem = Memory()
    j = journal(mem)
    assert j.read_header() is None and j.load() is None
    j.site(0xFFFF, 1, 0x55, True)  # not attached: nothing written
    assert mem.writes == 0


def test_records_round_trip() -> None:
    mem = Memory()
    j = journal(mem)
    j.begin(None, 0x5000, "0.1.0")
    j.set_area(area=0xFFFFFFFF83000000, kcr3=0x1000, la57=False, code=1, doorbell=2,
               vars_=3, ptable=4, slot_lo=5, slot_hi=6)  # fmt: skip
    j.gate(0x2000, 3, bytes(range(16)))
    j.pte(0x3008, 0)
    j.site(0xFFFFFFFF81000005, 0xFFFFFFFF83020000, 0x48, True)
    j.site(0xFFFFFFFF81000105, 0xFFFFFFFF83020020, 0x55, False)
    j.unsite(0xFFFFFFFF81000105)
    j.ret(0xFFFFC90000123F58, 0xFFFFFFFF81234567, 0x1000)
    j.steps(1, [StepLevel(2, 0xFFFFFFFF81000005, 0x200, 0x200, 0)])
    got = journal(mem).load()
    assert got is not None
    h = got.header
    assert h.state is JournalState.ACTIVE and h.generation == 1 and h.area == 0xFFFFFFFF83000000
    assert got.gates == [(0x2000, 3, bytes(range(16)))]
    assert got.ptes == [(0x3008, 0)]
    assert got.sites == [(0xFFFFFFFF81000005, 0xFFFFFFFF83020000, 0x48, True, 0)]
    assert got.rets == [(0xFFFFC90000123F58, 0xFFFFFFFF81234567, 0x1000)]
    assert got.steps == {1: [StepLevel(2, 0xFFFFFFFF81000005, 0x200, 0x200, 0)]}
    j.steps(1, [])
    j.unret(0xFFFFC90000123F58)
    j.end(JournalState.DETACHED)
    again = journal(mem).load()
    assert again is not None and again.header.state is JournalState.DETACHED
    assert not again.rets and not again.steps


def test_held_site_records_go_out_together_before_the_header_that_covers_them() -> None:
    mem = Memory()
    j = journal(mem)
    j.begin(None, 0x5000, "0.1.0")
    j.site(0xFFFFFFFF81000005, 0xFFFFFFFF83020000, 0x48, True)
    log: list[tuple[int, int]] = []
    write = mem.write

    def logged(addr: int, data: bytes) -> None:
        log.append((addr, len(data)))
        write(addr, data)

    j.write = logged
    j.hold_sites(True)
    sites = [0xFFFFFFFF81000105 + 0x100 * n for n in range(50)]
    for n, addr in enumerate(sites):
        j.site(addr, 0xFFFFFFFF83020020 + 0x20 * n, 0x55, False)
    j.unsite(sites[7])  # taken out again before the batch ends
    j.site(sites[7], 0xFFFFFFFF83030000, 0x41, True)  # and in once more
    j.unsite(sites[9])
    assert log == []  # nothing while held
    assert [s[0] for s in journal(mem).load().sites] == [0xFFFFFFFF81000005]  # type: ignore[union-attr]
    j.hold_sites(False)
    # One write of the 50 adjacent records, then the header (at the base).
    assert [a for a, _ in log] == [log[0][0], 0x1000] and log[0][0] > 0x1000
    got = journal(mem).load()
    assert got is not None
    want = {0xFFFFFFFF81000005, *sites} - {sites[9]}
    assert {s[0] for s in got.sites} == want
    assert (sites[7], 0xFFFFFFFF83030000, 0x41, True, 0) in got.sites
    log.clear()
    # Not held: at once. The first takes sites[9]'s free record; the second
    # a new one, which the header's high-water mark then covers.
    j.site(0xFFFFFFFF82000000, 0xFFFFFFFF83040000, 0x90, False)
    j.site(0xFFFFFFFF82000100, 0xFFFFFFFF83040020, 0x90, False)
    assert len(log) == 3 and log[1][0] - log[0][0] == (51 - 10) * 32 and log[2][0] == 0x1000


def test_a_new_session_starts_clean_with_a_higher_generation() -> None:
    mem = Memory()
    j = journal(mem)
    j.begin(None, 0x5000, "0.1.0")
    for i in range(MAX_GATES):
        j.gate(0x2000, i, bytes(16))
    with pytest.raises(JournalError, match="more than 64 IDT gates"):
        j.gate(0x2000, 99, bytes(16))
    j.end(JournalState.DETACHED)
    j.begin(j.read_header(), 0x5000, "0.1.0")  # a second attach of the same engine
    j.gate(0x2000, 3, bytes(16))
    got = j.load()
    assert got is not None and got.header.generation == 2 and len(got.gates) == 1


def test_take_over_continues_the_records() -> None:
    mem = Memory()
    dead = journal(mem)
    dead.begin(None, 0x5000, "0.1.0")
    dead.site(0xA0, 0xB0, 0x90, False)
    dead.ret(0xC0, 0xD0, 0x1000)
    contents = journal(mem).load()
    assert contents is not None
    heir = journal(mem)
    heir.take_over(contents)
    heir.unsite(0xA0)
    heir.unret(0xC0)
    got = heir.load()
    assert got is not None and not got.sites and not got.rets
    assert got.header.generation == 2 and got.header.state is JournalState.ACTIVE


def test_another_format_is_refused() -> None:
    raw = bytearray(b"QPJRNL01" + (99).to_bytes(4, "little") + bytes(500))
    with pytest.raises(JournalError, match="format 99"):
        unpack_header(bytes(raw))


def test_an_abandoned_areas_pages_stay_out_of_reach_for_every_later_session() -> None:
    """A abandons its area (pages up to 0x103000); B detaches cleanly; C must
    still not reuse A's pages (the floor is carried from session to session)."""
    mem = Memory()
    a = journal(mem)
    a.begin(None, 0x100000, "0.1.0")
    a.set_phys_next(0x103000)  # A's allocator grew (recorded before each new page)
    a.end(JournalState.ABANDONED)
    b = journal(mem)
    b.begin(b.read_header(), 0x100000, "0.1.0")
    assert b.header is not None and b.header.phys_floor == 0x103000
    b.end(JournalState.DETACHED)
    c = journal(mem)
    c.begin(c.read_header(), 0x100000, "0.1.0")
    assert c.header is not None and c.header.phys_floor == 0x103000
    assert c.header.phys_next >= 0x103000


def test_a_step_only_site_is_kept_apart_and_taken_over() -> None:
    mem = Memory()
    j = journal(mem)
    j.begin(None, 0, "0.1")
    j.site(0xFFFFFFFF81000000, 0xFFFFFFFFFEE20000, 0x48, False)
    j.site(0xFFFFFFFF81000100, 0xFFFFFFFFFEE20020, 0x55, True, 0xFFFFFFFFC0000000)
    j.site_step_only(0xFFFFFFFF81000100)  # its int3 went while a vCPU steps it
    contents = j.load()
    assert contents is not None
    assert [s[0] for s in contents.sites] == [0xFFFFFFFF81000000]
    assert contents.step_sites == [(0xFFFFFFFF81000100, 0xFFFFFFFFFEE20020, 0x55, True,
                                    0xFFFFFFFFC0000000)]  # fmt: skip
    later = journal(mem)
    later.take_over(contents)
    later.unsite(0xFFFFFFFF81000100)  # the recovery finished the step
    after = later.load()
    assert after is not None and after.step_sites == [] and len(after.sites) == 1


def test_detour_records_round_trip_and_survive_a_take_over() -> None:
    """A detoured site keeps its whole window's original bytes and the jump,
    so a recovery can put the int3 and the original tail back."""
    mem = Memory()
    j = journal(mem)
    j.begin(None, 0x5000, "0.1.0")
    window = bytes.fromhex("4157415641 55")
    jump = bytes.fromhex("e9fbffffff")
    j.site(0xFFFFFFFF81000005, 0xFFFFFFFF83020000, 0x41, True)
    j.detour(0xFFFFFFFF81000005, window, jump)
    j.detour(0xFFFFFFFF81000105, b"\x55" * 7, jump)
    j.undetour(0xFFFFFFFF81000105)
    got = journal(mem).load()
    assert got is not None
    assert got.detours == [(0xFFFFFFFF81000005, window, jump)]
    # A later session takes the journal over and drops the record once the
    # site is back to its int3.
    later = journal(mem)
    later.take_over(got)
    later.undetour(0xFFFFFFFF81000005)
    again = journal(mem).load()
    assert again is not None and not again.detours
    assert again.sites == got.sites
    with pytest.raises(JournalError, match="does not fit"):
        later.detour(0xFFFFFFFF81000205, bytes(30), jump)
