"""Finding 12: the probe table changes under a vCPU stopped inside the #BP
stub's lookup (all-stop mode stops vCPUs anywhere). A removal re-inserts the
rest of its cluster; a vCPU that had read the first entries of the cluster
then found the gap and took a probe for a foreign int3.

A small interpreter runs the stub's lookup loop (qp_bp_lookup) one
instruction per step over the table the engine writes.
"""

from __future__ import annotations

import contextlib
import struct

from qprobes.probes.stubs import PTABLE_ENTRIES, Stubs, probe_hash
from tests.unit.test_journal_order import CR3, LOST, TRAMP, TRAMP_END, make_engine

PTABLE = 0xFFFFFFFFFEE03000
LOOKUP = 0xFFFFFFFFFEE00100
# qp_bp_lookup's instructions: mov rdx, [rcx*8+PTABLE]; cmp rdx, rax; je found;
# test rdx, rdx; jz foreign; inc rcx; and rcx, N-1; jmp qp_bp_lookup
MOV, CMP, JE, TEST, JZ, INC, AND, JMP = (LOOKUP + o for o in (0, 8, 11, 13, 16, 18, 21, 28))
FOREIGN = LOOKUP + 30
OURS = LOOKUP + 0x80


def colliding(n: int) -> list[int]:
    """``n`` kernel addresses with the same probe-table hash."""
    by_hash: dict[int, list[int]] = {}
    addr = 0xFFFFFFFF81000000
    while True:
        addr += 0x10
        found = by_hash.setdefault(probe_hash(addr), [])
        found.append(addr)
        if len(found) == n:
            return found


class LookupCpu:
    """A vCPU in the #BP stub, looking up ``key`` (rax) in the guest's table."""

    def __init__(self, read: object, key: int, index: int, rip: int) -> None:
        self.read = read
        self.rax, self.rcx, self.rdx, self.rip = key, index, 0, rip
        self.zf = False
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        rip = self.rip
        if rip == MOV:
            self.rdx = struct.unpack("<Q", self.read(PTABLE + 8 * self.rcx, 8))[0]  # type: ignore[operator]
            self.rip = CMP
        elif rip == CMP:
            self.zf, self.rip = self.rdx == self.rax, JE
        elif rip == JE:
            self.rip = OURS if self.zf else TEST
        elif rip == TEST:
            self.zf, self.rip = self.rdx == 0, JZ
        elif rip == JZ:
            self.rip = FOREIGN if self.zf else INC
        elif rip == INC:
            self.rcx, self.rip = self.rcx + 1, AND
        elif rip == AND:
            self.rcx, self.rip = self.rcx & (PTABLE_ENTRIES - 1), JMP
        elif rip == JMP:
            self.rip = MOV
        else:
            raise AssertionError(f"stepped outside the lookup at {rip:#x}")

    def run(self) -> str:
        while self.rip not in (OURS, FOREIGN):
            self.step()
        return "ours" if self.rip == OURS else "foreign"


def setup(rip_at: int) -> tuple[object, LookupCpu, list[int]]:
    engine, mem, target = make_engine()
    engine._ptable_addr = PTABLE
    engine._stubs = Stubs(b"", {"qp_bp_lookup": LOOKUP, "qp_bp_foreign": FOREIGN,
                                "qp_bp_ours": OURS, "qp_kretprobe_trampoline": TRAMP,
                                "qp_kretprobe_trampoline_end": TRAMP_END,
                                "qp_kretprobe_lost": LOST})  # fmt: skip
    a, b = colliding(2)
    engine._ptable_insert(a)
    engine._ptable_insert(b)  # b sits right after a, in a's cluster
    i = probe_hash(a)
    read = lambda addr, n: mem.read_virt(CR3, addr, n)  # noqa: E731
    # vCPU 2 hit b's int3: it read a at index i and is about to go on.
    cpu = LookupCpu(read, b, i, rip_at)
    target.rips[1] = 0xFFFFFFFF81000000  # vCPU 1: the one whose stop this is
    steps: list[int] = []

    def step(vcpu: int, timeout: float | None = None) -> None:
        assert vcpu == 2
        steps.append(vcpu)
        cpu.step()
        target.rips[2] = cpu.rip

    target.rips[2] = cpu.rip
    target.step = step  # type: ignore[attr-defined]
    engine._ptable_remove(a)  # a's probe goes: b moves into its place
    assert engine._ptable[i] == b and not engine._ptable[(i + 1) % PTABLE_ENTRIES]
    return engine, cpu, steps


def test_a_vcpu_inside_the_lookup_still_finds_its_probe_when_the_cluster_moves() -> None:
    _engine, cpu, steps = setup(INC)
    assert cpu.run() == "ours"  # was: "foreign", b's hit sent to the guest's handler
    assert steps  # it was stepped out before anything moved


def test_vcpus_outside_the_lookup_are_not_stepped() -> None:
    _engine, cpu, steps = setup(OURS)
    assert steps == [] and cpu.run() == "ours"


def test_a_removal_that_wraps_never_leaves_a_moved_probe_out_of_the_guests_table() -> None:
    """A cluster that wraps past the table's end: the entry moving from index
    0 to the last index must be written there before index 0 is cleared (a
    controller dying between the two writes left an armed int3 that the
    stub's lookup calls foreign)."""
    from qprobes.errors import ConnectionClosedError

    engine, mem, _target = make_engine()
    engine._ptable_addr = PTABLE
    engine._stubs = Stubs(b"", {"qp_bp_lookup": LOOKUP, "qp_bp_foreign": FOREIGN})
    last = PTABLE_ENTRIES - 1
    found: list[int] = []
    addr = 0xFFFFFFFF81000000
    while len(found) < 2:
        addr += 0x10
        if probe_hash(addr) == last:
            found.append(addr)
    a, b = found
    engine._ptable_insert(a)
    engine._ptable_insert(b)  # wraps to index 0
    assert engine._ptable[last] == a and engine._ptable[0] == b
    # The second of the removal's two writes never happens.
    writes: list[int] = []
    real_write = mem.write_phys

    def write_phys(paddr: int, data: bytes) -> None:
        writes.append(paddr)
        if len(writes) == 2:
            raise ConnectionClosedError("the controller died")
        real_write(paddr, data)

    mem.write_phys = write_phys  # type: ignore[method-assign]
    with contextlib.suppress(ConnectionClosedError):
        engine._ptable_remove(a)
    table = [mem.u64(PTABLE + 8 * i) for i in (last, 0)]
    assert b in table, table


class FakeFast:
    """A fast path whose table word for a probe is its address + 1 (the
    guest's recorder words, kept apart from its probe table)."""

    def __init__(self, check: object) -> None:
        self.rtable: dict[int, int] = {}
        self.check = check

    def word(self, point: object) -> int:
        return 0 if point is None else point.addr + 1  # type: ignore[attr-defined]

    def write_word(self, index: int, point: object) -> None:
        self.rtable[index] = self.word(point)
        self.check()  # type: ignore[operator]


def test_an_entry_and_its_recorder_word_never_disagree_in_the_guest() -> None:
    """Between two writes the stub's lookup may find the entry the guest's
    table holds and take the recorder word at that index: it must be that
    entry's (or 0, the slow path), never the word of the entry moving in
    (a controller dying there sent a hit into another probe's boosted slot)."""
    from types import SimpleNamespace

    engine, mem, _target = make_engine()
    engine._ptable_addr = PTABLE
    engine._stubs = Stubs(b"", {"qp_bp_lookup": LOOKUP, "qp_bp_foreign": FOREIGN})
    a, b = colliding(2)
    for addr in (a, b):
        engine.points[addr] = SimpleNamespace(addr=addr)  # type: ignore[assignment]
    bad: list[tuple[int, int, int]] = []

    def check() -> None:
        for index, word in fast.rtable.items():
            entry = mem.u64(PTABLE + 8 * index)
            if entry and word and word != entry + 1:
                bad.append((index, entry, word))

    fast = FakeFast(check)
    engine.fast = fast  # type: ignore[assignment]
    real_write = mem.write_phys

    def write_phys(paddr: int, data: bytes) -> None:
        real_write(paddr, data)
        check()

    mem.write_phys = write_phys  # type: ignore[method-assign]
    engine._ptable_insert(a)
    engine._ptable_insert(b)
    del engine.points[a]
    engine._ptable_remove(a)  # b moves into a's index
    i = probe_hash(a)
    assert mem.u64(PTABLE + 8 * i) == b and fast.rtable[i] == b + 1
    assert bad == []
