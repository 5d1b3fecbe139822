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
