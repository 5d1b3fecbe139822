"""The probe engine's pure parts: slots, probe-table hash, IDT gates, stubs, pt_regs."""

from __future__ import annotations

import shutil
import struct

import pytest

from qprobes.arch.x86_64.idt import gate_offset, gate_with_offset
from qprobes.errors import ProbeError
from qprobes.probes.context import PtRegs
from qprobes.probes.slots import SlotAllocator
from qprobes.probes.stubs import (
    FRAME_SIZE,
    FRAME_WORDS,
    PT_REGS_NAMES,
    PTABLE_BITS,
    SLOT_FAULT_VECTORS,
    StubLayout,
    assemble_stubs,
    fault_label,
    probe_hash,
)


def make_alloc(slot_size: int = 32) -> tuple[SlotAllocator, list[str]]:
    events: list[str] = []

    def map_page(i: int) -> int:
        events.append(f"map {i}")
        return 0xFFFFFFFFFE000000 + i * 4096

    def unmap_page(i: int) -> None:
        events.append(f"unmap {i}")

    return SlotAllocator(slot_size, 32, 34, map_page, unmap_page), events


def test_slots_fill_pages_in_order() -> None:
    alloc, events = make_alloc()
    slots = [alloc.get_insn_slot() for _ in range(129)]
    assert slots[0] == 0xFFFFFFFFFE000000 + 32 * 4096
    assert slots[1] - slots[0] == 32
    assert slots[128] == 0xFFFFFFFFFE000000 + 33 * 4096
    assert events == ["map 32", "map 33"]
    assert alloc.insns_per_page == 128


def test_empty_page_is_freed_except_the_last() -> None:
    alloc, events = make_alloc()
    slots = [alloc.get_insn_slot() for _ in range(129)]
    alloc.free_insn_slot(slots[128])  # page 33 empty, page 32 still used: freed
    assert events[-1] == "unmap 33"
    for s in slots[:128]:
        alloc.free_insn_slot(s)  # page 32 empty but the last one: kept
    assert events.count("unmap 32") == 0
    assert alloc.get_insn_slot() == slots[0]  # reused


def test_slot_errors() -> None:
    alloc, _ = make_alloc(slot_size=2048)
    a = alloc.get_insn_slot()
    with pytest.raises(ProbeError):
        alloc.free_insn_slot(a + 8)
    for _ in range(5):
        alloc.get_insn_slot()
    with pytest.raises(ProbeError, match="out of instruction slots"):
        alloc.get_insn_slot()


def test_probe_hash_range_and_spread() -> None:
    addrs = [0xFFFFFFFF81000000 + 16 * i for i in range(1000)]
    buckets = {probe_hash(a) for a in addrs}
    assert all(0 <= b < (1 << PTABLE_BITS) for b in buckets)
    assert len(buckets) > 900


def test_gate_offset_round_trip() -> None:
    # A Linux-like interrupt gate: selector 0x10, IST 0, type 0x8e.
    gate = struct.pack("<HHBBHII", 0x1234, 0x10, 0, 0x8E, 0x5678, 0xFFFFFFFF, 0)
    assert gate_offset(gate) == 0xFFFFFFFF56781234
    new = gate_with_offset(gate, 0xFFFFFFFFFEE00040)
    assert gate_offset(new) == 0xFFFFFFFFFEE00040
    assert new[2:6] == gate[2:6]  # selector, IST and type untouched
    assert new[12:] == gate[12:]


def test_pt_regs_view_tracks_writes() -> None:
    words = list(range(FRAME_WORDS))
    regs = PtRegs(words)
    assert regs.r15 == 2 and regs.rip == 2 + PT_REGS_NAMES.index("rip")
    assert regs.ip == regs.rip and regs.flags == regs.eflags
    regs.rip = 0x1000
    regs.action = 1
    assert words[2 + PT_REGS_NAMES.index("rip")] == 0x1000
    assert regs.dirty == {0, 2 + PT_REGS_NAMES.index("rip")}
    assert regs.args()[0] == regs.rdi
    with pytest.raises(AttributeError):
        regs.xmm0 = 1
    assert FRAME_SIZE == 8 * 23


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")
def test_stubs_assemble_into_one_page() -> None:
    base = 0xFFFFFFFFFEE00000
    stubs = assemble_stubs(
        StubLayout(
            base, base + 0x1000, base + 0x2000, base + 0x3000, base + 0x20000, base + 0x200000
        )
    )
    assert 0 < len(stubs.code) <= 4096
    assert stubs["qp_bp_entry"] == base
    for name in (
        "qp_db_entry",
        "qp_gp_entry",
        "qp_pf_entry",
        "qp_kretprobe_trampoline",
        "qp_bp_doorbell_ret",
        "qp_jprobe_return",
    ):
        assert base < stubs[name] < base + len(stubs.code)
    # One stub per slot fault vector, with or without an error code pushed.
    for vector in SLOT_FAULT_VECTORS:
        assert base < stubs[f"{fault_label(vector)}_entry"] < base + len(stubs.code)
    # The #DB stub reads DR6 (mov rax, dr6) for the host, and loads it back
    # before it chains (mov dr6, rax).
    db = stubs["qp_db_entry"] - base
    assert b"\x0f\x21\xf0" in stubs.code[db : db + 64]
    assert b"\x0f\x23\xf0" in stubs.code[db:]
    # The doorbell store is the instruction right before each *_doorbell_ret.
    ret = stubs["qp_bp_doorbell_ret"] - base
    assert stubs.code[ret - 7 : ret - 5] == b"\xc6\x05"  # movb $1, disp32(%rip)
    disp = struct.unpack("<i", stubs.code[ret - 5 : ret - 1])[0]
    assert base + ret + disp == base + 0x1000


def test_dirty_slots_are_reused_last_and_keep_their_page() -> None:
    alloc, events = make_alloc(slot_size=2048)  # 2 slots a page, pages 32..34
    a, b = alloc.get_insn_slot(), alloc.get_insn_slot()
    c = alloc.get_insn_slot()  # second page
    alloc.free_insn_slot(c, dirty=True)  # a boosted slot: a task may be inside
    assert "unmap 33" not in events  # its page stays
    d = alloc.get_insn_slot()
    assert d == c + 2048  # the clean slot beside it first
    e, f = alloc.get_insn_slot(), alloc.get_insn_slot()  # then a third page
    assert len({a, b, c, d, e, f}) == 6
    assert alloc.get_insn_slot() == c  # no clean slot, no page left: the dirty one


def test_dirty_slots_are_reused_only_when_nothing_points_in() -> None:
    events: list[str] = []
    busy: set[int] = set()

    def collect(slots: list[int]) -> list[int]:
        events.append(f"collect {len(slots)}")
        return [s for s in slots if s not in busy]

    alloc = SlotAllocator(2048, 32, 32, lambda i: 0xFFFFFFFFFE000000 + i * 4096,
                          lambda i: None, collect=collect,
                          fill=lambda slot: events.append(f"fill {slot:#x}"))  # fmt: skip
    a, b = alloc.get_insn_slot(), alloc.get_insn_slot()  # the only page, full
    alloc.free_insn_slot(a, dirty=True)
    alloc.free_insn_slot(b, dirty=True)
    busy |= {a, b}  # a task still sits in both
    with pytest.raises(ProbeError, match="2 freed slots may still be in use"):
        alloc.get_insn_slot()
    busy.discard(b)  # that task left
    assert alloc.get_insn_slot() == b
    assert f"fill {b:#x}" in events  # handed out again: int3 over the old copy
    assert alloc.dirty_slots() == [a]
    busy.clear()
    assert alloc.get_insn_slot() == a
    assert alloc.dirty_slots() == []


@pytest.mark.parametrize(
    ("text", "end", "first", "last_after"),
    [
        # nokaslr: after _end up to 512 MiB (the module area may start there).
        (0xFFFFFFFF81000000, 0xFFFFFFFF83830000, 0xFFFFFFFF83A00000, 0xFFFFFFFF9FE00000),
        # _end already 2 MiB aligned.
        (0xFFFFFFFF81000000, 0xFFFFFFFF83800000, 0xFFFFFFFF83800000, 0xFFFFFFFF9FE00000),
        # A randomized image past 512 MiB: KERNEL_IMAGE_SIZE is 1 GiB.
        (0xFFFFFFFFA9000000, 0xFFFFFFFFAB830000, 0xFFFFFFFFABA00000, 0xFFFFFFFFBFE00000),
    ],
)
def test_area_candidates_are_in_the_unused_kernel_image_mapping(
    text: int, end: int, first: int, last_after: int
) -> None:
    from qprobes.probes.area import START_KERNEL_MAP, image_candidates

    got = image_candidates(text, end)
    assert got[0] == first
    after = [c for c in got if c > text]
    assert after[-1] == last_after
    below = [c for c in got if c < text]
    assert below[0] == (text & ~0x1FFFFF) - 0x200000 and below[-1] == START_KERNEL_MAP
    assert all(not text - 0x200000 < c < end for c in got)  # never over the image


def test_pending_keeps_what_a_switch_cannot_prove_stale() -> None:
    from qprobes.probes.quiesce import StackRef, StackScan, Undecided, pending

    slot, tramp = 0xFFFFFFFF83A20000, 0xFFFFFFFF83A00100
    def in_slots(v: int) -> bool:
        return v >= 0xFFFFFFFF83A20000

    scan = StackScan(
        refs=[StackRef(0x1000, slot, "task 1 (a)", task=1),  # switched since: stale word
              StackRef(0x2000, tramp, "task 1 (a)", task=1),  # trampoline: stays
              StackRef(0x3000, slot, "task 2 (b)", task=2),  # preempted, no switch
              StackRef(0x4000, slot, "CPU 0 IRQ stack"),  # an interrupt frame
              StackRef(0x5000, slot, "task 3 (c)", task=3)],  # asleep off the run queue
        undecided=[Undecided(4, "task 4 (d)", "on no known stack"),
                   Undecided(5, "task 5 (e)", "on no known stack")],
        nvcsw={1: 11, 2: 20, 3: 30, 4: 41, 5: 50},
        quiescent={3},
    )  # fmt: skip
    baseline = {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}
    got = pending(scan, baseline, in_slots)
    assert got == [
        f"task 1 (a) holds {tramp:#x} at 0x2000",
        f"task 2 (b) holds {slot:#x} at 0x3000",
        f"CPU 0 IRQ stack holds {slot:#x} at 0x4000",
        "task 5 (e): on no known stack",
    ]
    # The first look (no baseline yet): only the quiescent task is cleared.
    assert len(pending(scan, None, in_slots)) == 6


def test_late_doorbell_stops_land_before_the_answer_is_read() -> None:
    """The engine takes a stop at doorbell_ret+4 and +7 for a doorbell stop
    (QEMU can report one late): those offsets must be the stub's test and
    jz, before anything moves rsp off the frame."""
    from qprobes.probes.stubs import StubLayout, assemble_stubs

    base = 0xFFFFFFFFC0000000
    stubs = assemble_stubs(StubLayout(base, base + 0x1000, base + 0x2000, base + 0x3000,
                                      base + 0x20000, base + 0x200000))  # fmt: skip
    for prefix in ("qp_bp", "qp_db", "qp_fault", "qp_kret"):
        ret = stubs[f"{prefix}_doorbell_ret"] - base
        code = stubs.code
        assert code[ret : ret + 4] == bytes.fromhex("488b0424"), prefix  # mov rax, [rsp]
        assert code[ret + 4 : ret + 7] == bytes.fromhex("4885c0"), prefix  # test rax, rax
        assert code[ret + 7] in (0x74, 0x0F), prefix  # jz


def test_slots_come_back_as_the_first_clean_free_one() -> None:
    """get_insn_slot hands out the first slot neither used nor dirty (a
    search by list, checked against the plain scan)."""
    import random as _random

    from qprobes.probes.slots import InsnPage, SlotAllocator, _clean_free

    rng = _random.Random(4)
    for _ in range(500):
        page = InsnPage(0, 0, [rng.random() < 0.7 for _ in range(128)],
                        [rng.random() < 0.3 for _ in range(128)])  # fmt: skip
        want = next((i for i in range(128) if not page.used[i] and not page.dirty[i]), None)
        assert _clean_free(page) == want
    slots = SlotAllocator(32, 0, 3, lambda i: 0x1000 * (i + 1), lambda i: None)
    got = [slots.get_insn_slot() for _ in range(130)]
    assert got[:3] == [0x1000, 0x1020, 0x1040] and got[128] == 0x2000
    slots.free_insn_slot(0x1020, dirty=True)
    slots.free_insn_slot(0x1060)
    assert slots.get_insn_slot() == 0x1060  # the dirty one is left alone
