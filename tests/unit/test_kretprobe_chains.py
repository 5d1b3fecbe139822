"""Return-probe instance chains on fakes: entry/return sequences, which
handlers fire, and with which return addresses.

A small simulated CPU pushes return addresses, runs each entry probe's
pre_handler at a call, and at a return into the trampoline builds the
trampoline's doorbell frame (as qp_kretprobe_trampoline leaves it: the slot
still holding the trampoline's address) and runs the manager's handler, then
returns where the host answered, as the stub does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from qprobes.probes.context import HitContext, PtRegs
from qprobes.probes.kprobe import Kprobe
from qprobes.probes.kretprobe import Kretprobe, KretprobeManager
from qprobes.probes.stubs import FRAME_WORDS, KRETPROBE_VECTOR, PT_REGS_NAMES, Stubs

TRAMP = 0xFFFFFFFFFEE00378
TRAMP_END = TRAMP + 0x80
LOST = TRAMP_END + 0x10
F, G = 0xFFFFFFFF81100000, 0xFFFFFFFF81200000
CALLER = 0xFFFFFFFF81300010  # where the outermost call returns to
STACK_A = 0xFFFFC90000014000  # top of task A's stack
STACK_B = 0xFFFFC90000024000
TASK_A, TASK_B = 0xFFFF888000A00000, 0xFFFF888000B00000
RETSLOT = 2 + 17  # the trampoline frame's return-address word
RAX = 2 + PT_REGS_NAMES.index("rax")


class Mem:
    def __init__(self) -> None:
        self.words: dict[int, int] = {}

    def read(self, addr: int, length: int) -> bytes:
        out = b"".join(struct.pack("<Q", self.words.get(a, 0)) for a in range(addr & ~7,
                       addr + length, 8))  # fmt: skip
        return out[addr & 7 :][:length]

    def write(self, addr: int, data: bytes) -> None:
        assert addr % 8 == 0 and len(data) % 8 == 0
        for i in range(0, len(data), 8):
            self.words[addr + i] = struct.unpack_from("<Q", data, i)[0]


class FakeTarget:
    def __init__(self) -> None:
        self.vcpus = [1, 2]
        self.regs: dict[tuple[str, int], int] = {}

    def read_register(self, name: str, vcpu: int) -> int:
        return self.regs.get((name, vcpu), 0)


class FakeEngine:
    def __init__(self, mem: Mem) -> None:
        self.mem = mem
        self.target = FakeTarget()
        self.symbols = None
        self.kretprobes: KretprobeManager | None = None
        self.stubs = Stubs(b"", {"qp_kretprobe_trampoline": TRAMP,
                                 "qp_kretprobe_trampoline_end": TRAMP_END,
                                 "qp_kretprobe_lost": LOST})  # fmt: skip

    def register_kprobe(self, kp: Kprobe) -> Kprobe:
        kp.registered = True
        return kp

    def unregister_kprobe(self, kp: Kprobe) -> None:
        kp.registered = False

    def read_data(self, addr: int, length: int, cr3: int | None = None) -> bytes:
        return self.mem.read(addr, length)

    def write_data(self, addr: int, data: bytes, cr3: int | None = None) -> None:
        self.mem.write(addr, data)


@dataclass
class FakeTasks:
    """TaskHooks: the task is whatever the test put in the context's GS base."""

    dead: set[int] = field(default_factory=set)

    def current(self, ctx: HitContext) -> int | None:
        return ctx.gs_base or None

    def stack_of(self, task: int) -> int | None:
        return task + 1

    def is_gone(self, task: int, stack: int | None) -> bool:
        return task in self.dead


class Cpu:
    """One task's stack, driven call by call."""

    def __init__(self, world: World, top: int, task: int = 0, vcpu: int = 1) -> None:
        self.world, self.rsp, self.task, self.vcpu = world, top, task, vcpu

    def _ctx(self, words: list[int], frame_addr: int = 0) -> HitContext:
        return HitContext(self.vcpu, PtRegs(words), self.world.mem.read, 0x1000,
                          frame_addr=frame_addr, gs_base=self.task)  # fmt: skip

    def enter(self, probes: list[Kretprobe]) -> None:
        """Run the entry probes of the function just called (rsp at its return address)."""
        for rp in probes:
            words = [0] * FRAME_WORDS
            regs = PtRegs(words)
            regs.rsp, regs.rdi = self.rsp, 0x1234
            rp.kp.nhit += 1
            assert rp.kp.pre_handler is not None
            rp.kp.pre_handler(rp.kp, self._ctx(words))

    def call(self, ret_addr: int, probes: list[Kretprobe]) -> int:
        self.rsp -= 8
        self.world.mem.write(self.rsp, struct.pack("<Q", ret_addr))
        self.enter(probes)
        return self.rsp

    def ret(self, retval: int = 0) -> int:
        """``ret``; through the trampoline as often as it is returned into."""
        slot = self.rsp
        addr = self.world.mem.words[slot]
        self.rsp += 8
        for _ in range(4):
            if addr != TRAMP:
                return addr
            frame_addr = slot - 8 * RETSLOT
            words = [0] * FRAME_WORDS
            words[1] = KRETPROBE_VECTOR
            words[RAX] = retval
            words[RETSLOT - 1] = 0x246  # rflags as pushed
            words[RETSLOT] = TRAMP  # the slot, as the trampoline leaves it
            ctx = self._ctx(words, frame_addr)
            self.world.mgr.trampoline_handler(ctx)
            addr = ctx.regs.words[RETSLOT]
        raise AssertionError("the trampoline keeps returning into itself")


class World:
    def __init__(self, tasks: FakeTasks | None = None) -> None:
        self.mem = Mem()
        self.engine = FakeEngine(self.mem)
        self.mgr = KretprobeManager(self.engine, tasks)  # type: ignore[arg-type]
        self.fired: list[tuple[str, int, int]] = []

    def probe(self, name: str, addr: int, maxactive: int = 0) -> Kretprobe:
        def handler(rp: Kretprobe, ctx: HitContext) -> None:
            assert ctx.retval is not None and ctx.ret_addr is not None
            assert ctx.regs.rip == ctx.ret_addr
            self.fired.append((name, ctx.ret_addr, ctx.retval))

        return self.mgr.register(Kretprobe(addr=addr, handler=handler, name=name,
                                           maxactive=maxactive))  # fmt: skip


@pytest.fixture(params=[None, FakeTasks()], ids=["by-stack", "by-current"])
def world(request: pytest.FixtureRequest) -> World:
    return World(request.param)


def test_two_return_probes_on_one_function_both_see_the_caller(world: World) -> None:
    c, d = world.probe("c", F), world.probe("d", F)
    cpu = Cpu(world, STACK_A, TASK_A)
    cpu.call(CALLER, [c, d])
    assert cpu.ret(3) == CALLER
    assert world.fired == [("d", CALLER, 3), ("c", CALLER, 3)]  # newest first, as Linux
    assert world.mgr.stats.chained == 1
    assert not world.mgr.live and not world.mgr.chains and not c.instances and not d.instances


def test_tail_call_between_return_probed_functions(world: World) -> None:
    f, g = world.probe("f", F), world.probe("g", G)
    cpu = Cpu(world, STACK_A, TASK_A)
    cpu.call(CALLER, [f])
    cpu.enter([g])  # f ends in jmp g: same slot, the trampoline already in it
    assert cpu.ret(7) == CALLER
    assert world.fired == [("g", CALLER, 7), ("f", CALLER, 7)]
    assert f.nhit == g.nhit == 1 and f.nmissed == g.nmissed == 0


def test_nested_calls_return_to_their_own_callers(world: World) -> None:
    f, g = world.probe("f", F), world.probe("g", G)
    cpu = Cpu(world, STACK_A, TASK_A)
    cpu.call(CALLER, [f])
    cpu.call(F + 0x40, [g])
    cpu.call(G + 0x10, [f])  # recursion into f from g
    assert cpu.ret(1) == G + 0x10
    assert cpu.ret(2) == F + 0x40
    assert cpu.ret(3) == CALLER
    assert world.fired == [("f", G + 0x10, 1), ("g", F + 0x40, 2), ("f", CALLER, 3)]


def test_two_tasks_interleaved(world: World) -> None:
    c, d = world.probe("c", F), world.probe("d", F)
    a, b = Cpu(world, STACK_A, TASK_A, vcpu=1), Cpu(world, STACK_B, TASK_B, vcpu=2)
    a.call(CALLER, [c, d])
    b.call(CALLER + 8, [c, d])
    assert a.ret(1) == CALLER and b.ret(2) == CALLER + 8
    assert world.fired == [("d", CALLER, 1), ("c", CALLER, 1),
                           ("d", CALLER + 8, 2), ("c", CALLER + 8, 2)]  # fmt: skip


def test_a_reused_slot_reclaims_the_dead_instance(world: World) -> None:
    f = world.probe("f", F, maxactive=1)
    cpu = Cpu(world, STACK_A, TASK_A)
    slot = cpu.call(CALLER, [f])
    cpu.rsp += 8  # the frame is unwound without returning (an exception path)
    assert cpu.call(CALLER + 4, [f]) == slot  # a new call in the same slot
    assert f.nreclaimed == 1 and world.mgr.stats.reclaimed == 1 and f.nmissed == 0
    assert world.mgr.stats.reclaimed_because == {"its stack slot was reused": 1}
    assert cpu.ret(5) == CALLER + 4
    assert world.fired == [("f", CALLER + 4, 5)]


def test_out_of_instances_reclaims_one_whose_slot_moved_on(world: World) -> None:
    f = world.probe("f", F, maxactive=1)
    a, b = Cpu(world, STACK_A, TASK_A), Cpu(world, STACK_B, TASK_B, vcpu=2)
    slot = a.call(CALLER, [f])
    world.mem.words[slot] = 0xDEAD  # A's stack moved on: the slot holds something else
    b.call(CALLER + 8, [f])
    assert f.nmissed == 0 and f.nreclaimed == 1 and world.mgr.stats.reclaim_scans == 1
    assert b.ret(9) == CALLER + 8 and world.fired == [("f", CALLER + 8, 9)]


def test_a_sleeping_call_is_not_reclaimed() -> None:
    world = World(FakeTasks())
    f = world.probe("f", F, maxactive=1)
    a, b = Cpu(world, STACK_A, TASK_A), Cpu(world, STACK_B, TASK_B, vcpu=2)
    a.call(CALLER, [f])  # A sleeps in f: its slot holds the trampoline
    b.call(CALLER + 8, [f])
    assert f.nmissed == 1 and f.nreclaimed == 0
    assert world.mgr.stats.missed == {"maxactive": 1}  # the miss's cause, counted
    assert b.ret() == CALLER + 8 and a.ret(4) == CALLER
    assert world.fired == [("f", CALLER, 4)]


def test_an_exited_task_is_reclaimed() -> None:
    tasks = FakeTasks()
    world = World(tasks)
    f = world.probe("f", F, maxactive=1)
    a, b = Cpu(world, STACK_A, TASK_A), Cpu(world, STACK_B, TASK_B, vcpu=2)
    a.call(CALLER, [f])  # f never returns (do_exit): the trampoline stays in A's slot
    tasks.dead.add(TASK_A)
    b.call(CALLER + 8, [f])
    assert f.nmissed == 0 and f.nreclaimed == 1
    assert world.mgr.stats.reclaimed_because == {"its task is gone": 1}
    assert b.ret(1) == CALLER + 8


def test_an_interrupt_on_the_trampolines_first_instruction_keeps_the_instance(
    world: World,
) -> None:
    f = world.probe("f", F, maxactive=1)
    a, b = Cpu(world, STACK_A, TASK_A), Cpu(world, STACK_B, TASK_B, vcpu=2)
    slot = a.call(CALLER, [f])
    # The function returned (rsp = slot + 8) and an interrupt came before the
    # trampoline's first instruction: its frame covers the slot.
    base = slot + 8 if (slot + 8) % 16 == 0 else slot
    for i, word in enumerate((0x18, slot + 8, 0x246, 0x10, TRAMP)):  # ss rsp rflags cs rip
        world.mem.words[base - 8 * (i + 1)] = word
    assert world.mem.words[slot] != TRAMP
    b.call(CALLER + 8, [f])
    assert f.nmissed == 1 and f.nreclaimed == 0


def test_a_vcpu_inside_the_trampoline_keeps_its_instance(world: World) -> None:
    f = world.probe("f", F, maxactive=1)
    a, b = Cpu(world, STACK_A, TASK_A), Cpu(world, STACK_B, TASK_B, vcpu=2)
    slot = a.call(CALLER, [f])
    world.mem.words[slot] = 0x18  # clobbered, but vCPU 1 is in the trampoline for it
    world.engine.target.regs[("rip", 1)] = TRAMP + 0x20
    world.engine.target.regs[("rsp", 1)] = slot - 8 * 3
    b.call(CALLER + 8, [f])
    assert f.nmissed == 1 and f.nreclaimed == 0


def test_a_trampoline_hit_twice_for_one_frame_returns_to_the_same_caller(world: World) -> None:
    """What a lost doorbell answer looked like (issue 7 item 10): the same
    frame handled again after its instance was gone. An accounted miss, and
    the same real return address, never an exception."""
    f = world.probe("f", F)
    cpu = Cpu(world, STACK_A, TASK_A)
    slot = cpu.call(CALLER, [f])
    assert cpu.ret(3) == CALLER
    world.mem.words[slot] = TRAMP  # as if the answer had not reached the frame
    cpu.rsp = slot
    assert cpu.ret(3) == CALLER
    assert world.fired == [("f", CALLER, 3)]
    assert f.nmissed == 1 and world.mgr.stats.orphans == 1 and world.mgr.stats.lost == 0
    assert world.mgr.stats.missed == {"orphan return": 1}


def test_a_trampoline_hit_with_nothing_known_goes_to_the_lost_trap(world: World) -> None:
    world.probe("f", F)
    cpu = Cpu(world, STACK_A, TASK_A)
    cpu.rsp -= 8
    world.mem.words[cpu.rsp] = TRAMP
    assert cpu.ret() == LOST
    assert world.mgr.stats.lost == 1 and not world.fired


def test_an_entry_that_finds_the_trampoline_with_no_instance_is_missed(world: World) -> None:
    f = world.probe("f", F)
    cpu = Cpu(world, STACK_A, TASK_A)
    cpu.rsp -= 8
    world.mem.words[cpu.rsp] = TRAMP
    cpu.enter([f])
    assert f.nmissed == 1 and not f.instances
    assert world.mgr.stats.missed == {"no instance to chain to": 1}


def test_detach_puts_back_the_real_address_under_a_chain(world: World) -> None:
    c, d = world.probe("c", F), world.probe("d", F)
    cpu = Cpu(world, STACK_A, TASK_A)
    slot = cpu.call(CALLER, [c, d])
    world.mgr.detach()
    assert world.mem.words[slot] == CALLER
    assert not world.mgr.live and not c.instances and not d.instances


def test_an_unregistered_probe_returns_without_its_handler(world: World) -> None:
    f = world.probe("f", F)
    cpu = Cpu(world, STACK_A, TASK_A)
    cpu.call(CALLER, [f])
    world.mgr.unregister(f)
    assert cpu.ret() == CALLER and not world.fired
