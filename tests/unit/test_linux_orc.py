"""The ORC unwinder on hand-built tables: entry decoding for both layouts,
orc_find's block index, and unwind_next_frame's frame types."""

from __future__ import annotations

import struct

import pytest

from qprobes.linux.orc import (
    ORC_REG_BP,
    ORC_REG_PREV_SP,
    ORC_REG_SP,
    ORC_REG_SP_INDIRECT,
    ORC_REG_UNDEFINED,
    OrcEntry,
    OrcLayout,
    OrcTable,
    OrcUnwinder,
)
from qprobes.tracing.hist import parse_stacktrace

# 6.1: sp_reg:4 bp_reg:4 type:2 end:1 (from the default guest's BTF).
V61 = OrcLayout(6, (32, 4), (36, 4), (40, 2), (42, 1), None)
# 6.4+: type:3 (UNDEFINED 0, END_OF_STACK 1, CALL 2, REGS 3, REGS_PARTIAL 4), signal:1.
V64 = OrcLayout(6, (32, 4), (36, 4), (40, 3), None, (43, 1))


def raw(sp_off: int, bp_off: int, sp_reg: int, bp_reg: int, kind: int, extra: int = 0) -> bytes:
    bits = sp_reg | bp_reg << 4 | kind << 8 | extra
    return struct.pack("<hhH", sp_off, bp_off, bits)


@pytest.mark.parametrize(
    ("layout", "data", "expected"),
    [
        (V61, raw(8, 0, ORC_REG_SP, ORC_REG_UNDEFINED, 0), OrcEntry(8, 0, ORC_REG_SP, 0, "call")),
        (V61, raw(160, 0, ORC_REG_SP, 0, 1), OrcEntry(160, 0, ORC_REG_SP, 0, "regs")),
        (
            V61,
            raw(0, 0, ORC_REG_UNDEFINED, 0, 0, 1 << 10),
            OrcEntry(0, 0, ORC_REG_UNDEFINED, 0, "call", end=True),
        ),
        (
            V61,
            raw(16, -16, ORC_REG_BP, ORC_REG_PREV_SP, 2),
            OrcEntry(16, -16, ORC_REG_BP, ORC_REG_PREV_SP, "regs_partial"),
        ),
        (V64, raw(8, 0, ORC_REG_SP, 0, 2), OrcEntry(8, 0, ORC_REG_SP, 0, "call")),
        (V64, raw(0, 0, 0, 0, 1), OrcEntry(0, 0, 0, 0, "end")),
        (
            V64,
            raw(8, 0, ORC_REG_SP, 0, 3, 1 << 11),
            OrcEntry(8, 0, ORC_REG_SP, 0, "regs", signal=True),
        ),
    ],
)
def test_entries_decode_for_both_layouts(
    layout: OrcLayout, data: bytes, expected: OrcEntry
) -> None:
    assert layout.decode(data) == expected


class FakeKernel:
    """Text at 0x1000-0x3000 with three functions; ORC tables and a stack."""

    STEXT, ETEXT = 0x1000, 0x3000
    IP, ORC, LOOKUP = 0x10000, 0x20000, 0x30000

    def __init__(self, entries: list[tuple[int, bytes]]) -> None:
        self.mem: dict[int, int] = {}
        for i, (ip, data) in enumerate(entries):
            self.put(self.IP + 4 * i, struct.pack("<i", ip - (self.IP + 4 * i)))
            self.put(self.ORC + 6 * i, data)
        blocks = (self.ETEXT - self.STEXT) // 256 + 1
        for b in range(blocks + 1):
            block_ip = self.STEXT + 256 * b
            first = max([i for i, (ip, _) in enumerate(entries) if ip <= block_ip] or [0])
            self.put(self.LOOKUP + 4 * b, struct.pack("<I", first))
        self.blocks = blocks + 1
        self.count = len(entries)

    def put(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.mem[addr + i] = b

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.mem.get(addr + i, 0) for i in range(n))

    def table(self) -> OrcTable:
        table = OrcTable.__new__(OrcTable)
        table.ip_start, table.ip_stop = self.IP, self.IP + 4 * self.count
        table.orc_start, table.lookup = self.ORC, self.LOOKUP
        table.stext, table.etext = self.STEXT, self.ETEXT
        table.layout, table.read, table.count = V61, self.read, self.count
        table.num_blocks, table.init = self.blocks, None
        table._cache, table._all_ips = {}, None
        table._module_cache, table._module_gen = {}, None
        table.modules, table._module_tables, table.ftrace = None, {}, None
        return table


PT_REGS = {"r13": 16, "bp": 32, "r10": 56, "dx": 96, "di": 112, "ip": 128, "cs": 136, "sp": 152}


def unwinder(kernel: FakeKernel) -> OrcUnwinder:
    return OrcUnwinder(kernel.table(), PT_REGS, lambda a: FakeKernel.STEXT <= a < FakeKernel.ETEXT)


def regs(rip: int, rsp: int, rbp: int = 0, cs: int = 0x10) -> dict[str, int]:
    return {"rip": rip, "rsp": rsp, "rbp": rbp, "r10": 0, "r13": 0, "rdi": 0, "rdx": 0, "cs": cs}


def test_call_frames_a_regs_frame_and_the_end() -> None:
    # leaf at 0x1000 (entry: CFA = sp+8), mid at 0x1800 (CFA = sp+24),
    # entry code at 0x2800 whose frame is pt_regs from user mode.
    kernel = FakeKernel(
        [
            (0x1000, raw(8, 0, ORC_REG_SP, 0, 0)),
            (0x1800, raw(24, 0, ORC_REG_SP, 0, 0)),
            (0x2800, raw(0, 0, ORC_REG_SP, 0, 1)),
            (0x2900, raw(0, 0, ORC_REG_UNDEFINED, 0, 0, 1 << 10)),
        ]
    )
    sp = 0x8000
    kernel.put(sp, struct.pack("<Q", 0x1810))  # leaf's return into mid
    kernel.put(sp + 8 + 16, struct.pack("<Q", 0x2810))  # mid's return into the entry
    user = sp + 8 + 24  # pt_regs of the syscall
    kernel.put(user + 128, struct.pack("<Q", 0x7F0000001000))
    kernel.put(user + 136, struct.pack("<Q", 0x33))
    kernel.put(user + 152, struct.pack("<Q", 0x7FFF0000))
    frames = unwinder(kernel).unwind(regs(0x1000, sp), kernel.read)
    assert frames == [0x1000, 0x1810, 0x2810]


def test_indirect_sp_follows_the_saved_stack_pointer() -> None:
    # An IRQ-stack frame: CFA = *(sp) + 8 (the previous sp saved at the top).
    kernel = FakeKernel(
        [(0x1000, raw(8, 0, ORC_REG_SP_INDIRECT, 0, 0)), (0x1800, raw(8, 0, ORC_REG_SP, 0, 0))]
    )
    irq_sp, task_sp = 0x9000, 0x5000
    kernel.put(irq_sp, struct.pack("<Q", task_sp))
    kernel.put(task_sp, struct.pack("<Q", 0x1820))  # return address on the task stack
    kernel.put(task_sp + 8, struct.pack("<Q", 0))  # then nothing: ends
    frames = unwinder(kernel).unwind(regs(0x1000, irq_sp), kernel.read)
    assert frames[:2] == [0x1000, 0x1820]


def test_a_trampoline_return_address_is_recovered() -> None:
    kernel = FakeKernel(
        [(0x1000, raw(8, 0, ORC_REG_SP, 0, 0)), (0x1800, raw(8, 0, ORC_REG_SP, 0, 0))]
    )
    sp = 0x8000
    kernel.put(sp, struct.pack("<Q", 0xFFFF_0000))  # a trampoline, not text
    seen = []

    def recover(slot: int, ret: int) -> int:
        seen.append((slot, ret))
        return 0x1830 if ret == 0xFFFF_0000 else ret

    frames = unwinder(kernel).unwind(regs(0x1000, sp), kernel.read, recover)
    assert frames[:2] == [0x1000, 0x1830]
    assert seen[0] == (sp, 0xFFFF_0000)


def test_user_mode_regs_give_only_their_ip() -> None:
    kernel = FakeKernel([(0x1000, raw(8, 0, ORC_REG_SP, 0, 0))])
    assert unwinder(kernel).unwind(regs(0x401000, 0x7FFF0000, cs=0x33), kernel.read) == [0x401000]


def test_stacktrace_trigger_parsing() -> None:
    trig = parse_stacktrace('stacktrace:2 if comm == "cat"')
    assert trig.count == 2
    values = {"comm": "cat"}
    assert [trig.fires(values) for _ in range(3)] == [True, True, False]
    assert not parse_stacktrace('stacktrace if comm == "cat"').fires({"comm": "sh"})
