"""Fast return probes run in unicorn: the real #BP stub calls the entry code
(:mod:`qprobes.probes.fastret`, assembled and placed by
:class:`~qprobes.probes.fastret.FastReturns` as on a guest), which takes an
instance and hijacks the return address; a ``ret`` then lands in the
trampoline, which records the return through the real return recorder,
frees the instance and returns to the real caller with the registers as
the function left them. Nested calls on one task, a task that moved to
another CPU, a full store (nmissed, the stack left alone), the host's
undo of outstanding instances and its view for unwinders.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass

import pytest

from tests.unit.test_recorder import (
    CODE,
    CPU_NUMBER,
    CURRENT_TASK,
    KERNEL_FLOOR,
    KSTACK,
    PERCPU,
    RING,
    SYMBOLS,
    TASK_LAYOUT,
    GuestMem,
    Oracle,
    Regs,
    q,
)

unicorn = pytest.importorskip("unicorn")
from unicorn import x86_const as X  # noqa: E402

from qprobes.arch.x86_64.recorder_asm import (  # noqa: E402
    Recorder,
    RecorderSpec,
    RingLayout,
    assemble_recorder,
    ring_stats,
)
from qprobes.probes.fastret import (  # noqa: E402
    FASTRET_SPILL_VECTOR,
    INST_RET,
    INST_SLOT,
    INST_TASK,
    INSTANCE_SIZE,
    PAGE_CODE,
    PAGE_END,
    PAGE_HEADER,
    FastReturns,
    Instance,
    real_return,
    restore_plan,
)
from qprobes.probes.stubs import PT_REGS_NAMES, probe_hash, rtable_entry  # noqa: E402
from qprobes.tracing import compile_fetchargs, evaluate, parse_probe  # noqa: E402
from qprobes.tracing.ast import ProbeSpec  # noqa: E402
from qprobes.tracing.recorder import (  # noqa: E402
    decode_record,
    drain_ring,
    plan_return_recorder,
    return_extra,
)
from tests.unit.test_recorder_stubs import (  # noqa: E402
    AREA,
    BOOST,
    DOORBELL,
    EXTABLE,
    GPRS,
    PTABLE,
    REC_LO,
    RTABLE,
    VARS,
    Machine,
    _reg,
)

pytestmark = pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")

PROBE_IP = 0xFFFF_FFFF_8100_0000
RET_INSN = CODE + 0x100  # a `ret`: the probed function returning
CALLER = CODE + 0x200  # hlt: where the outer call returns to
CALLER2 = CODE + 0x300  # hlt: where the inner call returns to
SLOT_OUTER = KSTACK
SLOT_INNER = KSTACK - 0x200
TASK_A = 0xFFFF_8880_0002_0000  # test_recorder's task (pid 1234, "bash")
DEFINITION = "r:test/ret vfs_read r=$retval:s32 di=%di s=$stack0:x64 ip=%ip c=$comm"


@dataclass
class FakeArea:
    machine: Machine
    vbase: int = AREA

    def map_page(self, index: int, *, writable: bool, executable: bool, fill: int = 0) -> None:
        self.machine.guest.map(self.vbase + index * 4096)
        if fill:
            self.machine.guest.write(self.vbase + index * 4096, bytes([fill]) * 4096)


class Returns:
    """A Machine whose probe is a fast return probe."""

    def __init__(self, maxactive: int = 4, definition: str = DEFINITION,
                 rethook: tuple[int, int, int, int, int] | None = None,
                 ring: RingLayout = RING, lossless: bool = False) -> None:  # fmt: skip
        self.m = m = Machine("%di", recorder=False)
        self.ring = ring
        g = m.guest
        g.write(RET_INSN, b"\xc3")
        g.write(CALLER, b"\xf4")
        g.write(CALLER2, b"\xf4")
        g.write(BOOST, b"\xf4")
        spec = parse_probe(definition)
        assert isinstance(spec, ProbeSpec)
        self.compiled = compile_fetchargs(spec, SYMBOLS)
        self.plan = plan_return_recorder(self.compiled)
        rspec = RecorderSpec(7, self.plan.fetches, 8 * PT_REGS_NAMES.index("rsp"), ring,
                             task=TASK_LAYOUT, cpu_number=CPU_NUMBER, kernel_floor=KERNEL_FLOOR,
                             kernel_reads_user=True, lossless=lossless)  # fmt: skip
        self.store = FastReturns(FakeArea(m), g.read, g.write, g.write)  # type: ignore[arg-type]
        self.store.lost_target = CODE + 0x400
        self.store.doorbell, self.store.vars = DOORBELL, VARS
        self.doorbells: dict[int, int] = {}
        self.store.on_doorbells = self.doorbells.update
        self.fr = self.store.add(maxactive, CURRENT_TASK, self._place,
                                 lambda at: assemble_recorder(rspec, at), rethook,
                                 lossless)  # fmt: skip
        index = probe_hash(PROBE_IP)
        g.write(PTABLE + 8 * index, q(PROBE_IP))
        g.write(RTABLE + 8 * index, q(rtable_entry(self.fr.entry - AREA, BOOST - AREA)))

    def _place(self, build: object) -> Recorder:
        rec: Recorder = build(REC_LO)  # type: ignore[operator]
        g = self.m.guest
        g.write(REC_LO, rec.code)
        g.write(EXTABLE, b"".join(struct.pack("<QQ", a, b) for a, b in rec.extable) + bytes(16))
        return rec

    def run(self, start: int, until: int) -> None:
        g, uc = self.m.guest, self.m.guest.uc
        rip = start
        for _ in range(50):
            g.intr.clear()
            uc.emu_start(rip, until, count=500_000)
            rip = int(uc.reg_read(X.UC_X86_REG_RIP))
            if rip == until:
                return
            if g.intr == [14]:
                g._forget_exception()
                self.m.deliver(self.m.stubs["qp_pf_entry"], rip, 0,
                               uc.reg_read(X.UC_X86_REG_EFLAGS))  # fmt: skip
                rip = int(uc.reg_read(X.UC_X86_REG_RIP))
                continue
            raise AssertionError(f"stopped at {rip:#x} (exceptions {g.intr})")
        raise AssertionError("does not end")

    def call(self, slot: int, ret_to: int, regs: dict[str, int] | None = None,
             until: int = BOOST) -> None:  # fmt: skip
        """A call of the probed function from ``ret_to``: its int3, with rsp
        at ``slot`` holding ``ret_to``; back at the boosted slot (or ``until``)."""
        g, uc = self.m.guest, self.m.guest.uc
        g.write(slot, q(ret_to))
        g._forget_exception()
        for name in GPRS:
            uc.reg_write(_reg(name), (regs or {}).get(name, 0x1000 + GPRS.index(name)))
        uc.reg_write(X.UC_X86_REG_RSP, slot)
        self.m.deliver(self.m.stubs["qp_bp_entry"], PROBE_IP + 1, None, 0x246)
        self.run(int(uc.reg_read(X.UC_X86_REG_RIP)), until)
        if until == BOOST:
            assert uc.reg_read(X.UC_X86_REG_RSP) == slot

    def ret(self, slot: int, until: int, regs: dict[str, int]) -> dict[str, int]:
        """The function returns from ``slot`` with ``regs``; runs until ``until``."""
        g, uc = self.m.guest, self.m.guest.uc
        g._forget_exception()
        for name in GPRS:
            uc.reg_write(_reg(name), regs[name])
        uc.reg_write(X.UC_X86_REG_RSP, slot)
        uc.reg_write(X.UC_X86_REG_EFLAGS, 0x283)  # IF, SF, CF: as the function left them
        self.run(RET_INSN, until)
        return {n: int(uc.reg_read(_reg(n))) for n in GPRS}

    def live(self) -> list[Instance]:
        return [i for i in self.store.instances(self.fr) if i.live]

    def records(self) -> list[bytes]:
        out: list[bytes] = []
        for cpu in range(self.ring.ncpus):
            out += drain_ring(GuestMem(self.m.guest), self.ring, cpu)
        return out

    def word(self, addr: int) -> int:
        return int.from_bytes(self.m.guest.read(addr, 8), "little")


def _regs(rax: int) -> dict[str, int]:
    return {n: 0x5000 + i for i, n in enumerate(GPRS)} | {"rax": rax}


def _expected(r: Returns, regs: dict[str, int], slot: int, real: int) -> dict[str, object]:
    at_return = dict.fromkeys(PT_REGS_NAMES, 0) | regs | {
        "rip": real, "rsp": slot + 8, "eflags": 0x283, "orig_rax": 2**64 - 1}  # fmt: skip
    return dict(evaluate(r.compiled, Oracle(r.m.guest, regs=Regs(at_return), retval=regs["rax"])))


def test_an_instance_is_taken_at_entry_and_freed_at_return() -> None:
    r = Returns()
    r.call(SLOT_OUTER, CALLER)
    (inst,) = r.live()
    assert (inst.task, inst.slot, inst.ret) == (TASK_A, SLOT_OUTER, CALLER)
    assert r.word(SLOT_OUTER) == r.fr.trampoline == inst.tramp
    assert r.m.guest.read(r.m.guest.uc.reg_read(X.UC_X86_REG_RSP), 1)  # stack readable
    regs = _regs(rax=(-5) % 2**64)
    r.m.guest.write(SLOT_OUTER + 8, q(0xFEED))  # $stack0 at the return
    after = r.ret(SLOT_OUTER, CALLER, regs)
    # Back at the caller with the function's registers, flags and stack.
    assert after == regs
    uc = r.m.guest.uc
    assert uc.reg_read(X.UC_X86_REG_RSP) == SLOT_OUTER + 8
    assert uc.reg_read(X.UC_X86_REG_EFLAGS) & 0xFFF == 0x283
    assert r.live() == []
    assert all(i.task == 0 for i in r.store.instances(r.fr))
    (record,) = r.records()
    raw = decode_record(record, r.plan.strings)
    entry_tsc, ret = return_extra(raw)
    assert ret == CALLER
    assert 0 < entry_tsc <= raw.tsc
    values = dict(r.plan.values(raw))
    assert values == _expected(r, regs, SLOT_OUTER, CALLER)
    assert values["r"] == -5 and values["s"] == 0xFEED and values["c"] == "bash"
    assert r.store.nmissed(r.fr) == 0


def test_two_nested_calls_on_one_task_and_a_migration() -> None:
    r = Returns()
    r.call(SLOT_OUTER, CALLER)
    r.call(SLOT_INNER, CALLER2)  # the outer function calls itself
    assert {(i.slot, i.ret) for i in r.live()} == {(SLOT_OUTER, CALLER), (SLOT_INNER, CALLER2)}
    # The task moves to CPU 3 before the inner call returns.
    r.m.guest.write(PERCPU + CPU_NUMBER, struct.pack("<I", 3))
    inner = r.ret(SLOT_INNER, CALLER2, _regs(rax=111))
    assert inner["rax"] == 111
    assert [(i.slot, i.ret) for i in r.live()] == [(SLOT_OUTER, CALLER)]
    outer = r.ret(SLOT_OUTER, CALLER, _regs(rax=222))
    assert outer["rax"] == 222
    assert r.live() == []
    records = [decode_record(d, r.plan.strings) for d in r.records()]
    assert [(x.cpu, r.plan.values(x)["r"], return_extra(x)[1]) for x in records] == [
        (3, 111, CALLER2), (3, 222, CALLER)]  # fmt: skip
    # Each return's entry TSC is its own call's: the outer entered first.
    assert return_extra(records[1])[0] < return_extra(records[0])[0]


def test_the_caller_behind_the_guests_rethook_is_reported() -> None:
    """The guest's own kretprobe (through ftrace at +0) ran first: the return
    address at the entry is its arch_rethook_trampoline; the record names
    the caller its rethook node holds for this stack slot, and the return
    goes on through the guest's trampoline."""
    rethook_tramp = CODE + 0x500
    head, llist, ret, frame = 0x800, 0x8, 0x10, 0x18
    r = Returns(rethook=(rethook_tramp, head, llist, ret, frame))
    g = r.m.guest
    g.write(rethook_tramp, b"\xf4")
    other, mine = TASK_A + 0x900, TASK_A + 0xA00  # newest first: another slot's, then ours
    g.write(TASK_A + head, q(other + llist))
    g.write(other + llist, q(mine + llist))
    g.write(other + frame, q(SLOT_INNER))
    g.write(other + ret, q(CALLER2))
    g.write(mine + llist, q(0))
    g.write(mine + frame, q(SLOT_OUTER))
    g.write(mine + ret, q(CALLER))
    r.call(SLOT_OUTER, rethook_tramp)
    r.ret(SLOT_OUTER, rethook_tramp, _regs(rax=3))
    (record,) = r.records()
    assert return_extra(decode_record(record, r.plan.strings))[1] == CALLER


@pytest.mark.parametrize("lossless", [True, False])
def test_a_full_ring_waits_for_the_host_or_drops_and_counts(lossless: bool) -> None:
    small = RingLayout(RING.headers, RING.data, 256, RING.ncpus)
    r = Returns(ring=small, lossless=lossless)
    assert bool(r.fr.doorbell_rets) == lossless
    assert set(r.doorbells.values()) <= {FASTRET_SPILL_VECTOR}
    for rax in (1, 2):  # two records of 104 bytes fill the 256-byte ring
        r.call(SLOT_OUTER, CALLER)
        r.ret(SLOT_OUTER, CALLER, _regs(rax=rax))
    r.call(SLOT_OUTER, CALLER)
    if not lossless:
        r.ret(SLOT_OUTER, CALLER, _regs(rax=3))
        assert len(r.records()) == 2
        assert ring_stats(GuestMem(r.m.guest), small, 2).full == 1
        assert r.live() == []
        return
    # The third waits at the doorbell, its frame as the stubs' are.
    ret = r.fr.doorbell_rets[1]
    r.ret(SLOT_OUTER, ret, _regs(rax=3))
    uc = r.m.guest.uc
    rsp = uc.reg_read(X.UC_X86_REG_RSP)
    action, vector = struct.unpack("<QQ", r.m.guest.read(rsp, 16))
    assert (action, vector) == (0, FASTRET_SPILL_VECTOR)
    assert r.word(rsp + 16 + 8 * PT_REGS_NAMES.index("rax")) == 3
    assert r.m.guest.read(DOORBELL, 1) == b"\x01"
    first = [decode_record(d, r.plan.strings) for d in r.records()]  # the host drains
    r.m.guest.write(rsp, q(1))  # and answers
    r.run(ret, CALLER)
    assert uc.reg_read(X.UC_X86_REG_RAX) == 3
    assert uc.reg_read(X.UC_X86_REG_RSP) == SLOT_OUTER + 8
    (last,) = [decode_record(d, r.plan.strings) for d in r.records()]
    assert [r.plan.values(x)["r"] for x in [*first, last]] == [1, 2, 3]
    assert r.live() == []


@pytest.mark.parametrize(("gone", "slot_moved", "freed"),
                         [(True, True, 1), (True, False, 0), (False, True, 0)])  # fmt: skip
def test_an_instance_of_a_task_gone_is_reclaimed(gone: bool, slot_moved: bool, freed: int) -> None:
    """A task that exited inside the function (do_exit): its instance is
    freed once its task is gone and its stack no longer holds the trampoline."""
    r = Returns(maxactive=1)
    r.call(SLOT_OUTER, CALLER)
    if slot_moved:
        r.m.guest.write(SLOT_OUTER, q(0x1234))  # the stack was reused
    asked: list[int] = []
    r.store.is_gone = lambda task: asked.append(task) is None and gone
    assert r.store.reclaim() == freed
    assert len(r.live()) == 1 - freed
    if freed:
        assert asked == [TASK_A]
        r.call(SLOT_INNER, CALLER2)  # the store has room again
        assert r.store.nmissed(r.fr) == 0 and len(r.live()) == 1


def test_a_full_store_in_lossless_mode_hands_the_call_to_the_host() -> None:
    r = Returns(maxactive=1, lossless=True)
    r.call(SLOT_OUTER, CALLER)
    assert r.store.full(r.fr)
    r.call(SLOT_INNER, CALLER2, until=r.m.stubs["qp_bp_doorbell_ret"])
    assert r.m.guest.read(DOORBELL, 1) == b"\x01"  # a slow-path hit, for the host
    assert r.store.nmissed(r.fr) == 0  # the host decides
    assert r.word(SLOT_INNER) == CALLER2
    assert r.store.full(r.fr)


def test_a_full_store_counts_a_miss_and_leaves_the_stack_alone() -> None:
    r = Returns(maxactive=1)
    r.call(SLOT_OUTER, CALLER)
    r.call(SLOT_INNER, CALLER2)
    assert r.store.nmissed(r.fr) == 1
    assert r.word(SLOT_INNER) == CALLER2  # not hijacked
    assert [(i.slot, i.ret) for i in r.live()] == [(SLOT_OUTER, CALLER)]
    r.ret(SLOT_INNER, CALLER2, _regs(rax=1))  # straight back, no record
    assert r.records() == []
    r.ret(SLOT_OUTER, CALLER, _regs(rax=2))
    assert len(r.records()) == 1
    assert r.store.lost(r.fr) == 0


def test_detach_puts_back_every_outstanding_return_address() -> None:
    r = Returns()
    r.call(SLOT_OUTER, CALLER)
    r.call(SLOT_INNER, CALLER2)
    assert r.store.allowed() == {r.fr.trampoline}
    assert r.store.find_ret_addr(SLOT_INNER, r.fr.trampoline) == CALLER2
    assert r.store.detach() == 2
    assert (r.word(SLOT_OUTER), r.word(SLOT_INNER)) == (CALLER, CALLER2)
    # Instances stay (a task between its return and the trampoline's cli
    # still finds its own); a second detach finds nothing to do.
    assert len(r.live()) == 2
    assert r.store.detach() == 0
    # The function returns normally now: no trampoline, no record.
    r.ret(SLOT_INNER, CALLER2, _regs(rax=1))
    assert r.records() == []


def test_a_return_with_no_instance_is_counted_and_sent_to_the_lost_stub() -> None:
    r = Returns()
    r.call(SLOT_OUTER, CALLER)
    (inst,) = r.live()
    base = r.store.store + inst.index * INSTANCE_SIZE
    r.m.guest.write(base + INST_TASK, q(0))  # as if another task owned it
    r.m.guest.write(CODE + 0x400, b"\xf4")
    r.ret(SLOT_OUTER, CODE + 0x400, _regs(rax=0))
    assert r.store.lost(r.fr) == 1
    assert r.records() == []


# --- the host's view, pure -------------------------------------------------------

T1, T2 = 0xFFFF_FFFF_C059_8089, 0xFFFF_FFFF_C059_8289
SLOW = 0xFFFF_FFFF_C040_0500


def _inst(i: int, slot: int, ret: int, seq: int, tramp: int, task: int = TASK_A) -> Instance:
    return Instance(i, task, slot, ret, 0, seq, tramp)


@pytest.mark.parametrize(
    ("instances", "stack", "expected"),
    [
        # one instance per slot
        ([_inst(0, 0x100, 0xA, 1, T1), _inst(1, 0x200, 0xB, 2, T1)],
         {0x100: T1, 0x200: T1}, {0x100: 0xA, 0x200: 0xB}),
        # a tail call: the newer instance saved the older's trampoline
        ([_inst(0, 0x100, 0xA, 1, T1), _inst(1, 0x100, T1, 2, T2)], {0x100: T2}, {0x100: 0xA}),
        # a slot returning right now (the trampoline is no longer there)
        ([_inst(0, 0x100, 0xA, 1, T1)], {0x100: 0x18}, {}),
        # a free instance is nobody's
        ([Instance(0, 0, 0x100, 0xA, 0, 1, T1)], {0x100: T1}, {}),
        # behind a slow trampoline: that one is the slow path's to undo
        ([_inst(0, 0x100, SLOW, 1, T1)], {0x100: T1}, {0x100: SLOW}),
    ],
)  # fmt: skip
def test_restore_plan(instances: list[Instance], stack: dict[int, int],
                      expected: dict[int, int]) -> None:  # fmt: skip
    assert restore_plan(instances, stack.get) == expected


def test_real_return_follows_chained_trampolines() -> None:
    insts = [_inst(0, 0x100, 0xA, 1, T1), _inst(1, 0x100, T1, 2, T2), _inst(2, 0x200, 0xB, 3, T1)]
    assert real_return(insts, 0x100, T2, {T1, T2}) == 0xA
    assert real_return(insts, 0x200, T1, {T1, T2}) == 0xB
    assert real_return(insts, 0x300, T1, {T1, T2}) == T1  # unknown: as found
    assert real_return(insts, 0x100, 0x1234, {T1, T2}) == 0x1234


def test_the_store_pages_are_fastret_s() -> None:
    from qprobes.probes import engine

    assert engine.PAGE_SLOTS_LAST < PAGE_HEADER < PAGE_CODE < PAGE_END <= 400
    assert (INST_TASK, INST_SLOT, INST_RET) == (0, 8, 16)
