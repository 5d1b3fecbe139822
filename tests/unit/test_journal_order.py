"""The journal keeps each record until the change it undoes is really undone
(no guest): a controller that dies at any point between two writes leaves a
journal a recovery can finish from.

The engine runs on fakes: guest memory where physical = virtual & 0xffffffff,
a journal in it, and stops delivered to :meth:`KprobeEngine.handle_stop` as
QEMU reports them. "Dying" is a write that raises (the connection or QEMU
gone in the middle of the answer).
"""

from __future__ import annotations

import struct

import pytest

from qprobes.errors import ConnectionClosedError
from qprobes.probes.engine import KprobeEngine
from qprobes.probes.kretprobe import KretprobeManager
from qprobes.probes.stubs import (
    FRAME_WORDS,
    KRETPROBE_VECTOR,
    PERCPU_STRIDE,
    VAR_PERCPU,
    Stubs,
)
from qprobes.target.paging import Translation
from qprobes.wire.stop import StopReply, parse_stop_reply
from tests.unit.test_engine_states import A, FakeTarget

PAGE = 4096
CR3 = 0x1000
VARS_PHYS = 0x7E02000
DOORBELL = 0xFFFFFFFFFEE01000
TRAMP = 0xFFFFFFFFFEE00378
TRAMP_END = TRAMP + 0x80
LOST = TRAMP_END + 0x10
SLOT = 0xFFFFC90000013F58  # a hijacked return-address slot on a task stack
REAL = 0xFFFFFFFF81300010  # the real return address
RETSLOT = 2 + 17  # the trampoline frame's return-address word
FRAME = SLOT - 8 * RETSLOT


class PageMem:
    """Sparse guest memory (physical = virtual & 0xffffffff) that can fail
    every write into one range, as a dying connection would."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.fail: tuple[int, int] | None = None  # physical [lo, hi)

    def read_phys(self, paddr: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            page, off = divmod(paddr, PAGE)
            n = min(length, PAGE - off)
            out += self.pages.get(page, bytes(PAGE))[off : off + n]
            paddr, length = paddr + n, length - n
        return bytes(out)

    def write_phys(self, paddr: int, data: bytes) -> None:
        if self.fail is not None and paddr < self.fail[1] and paddr + len(data) > self.fail[0]:
            raise ConnectionClosedError("the gdbstub closed the connection")
        view = memoryview(data)
        while view:
            page, off = divmod(paddr, PAGE)
            n = min(len(view), PAGE - off)
            self.pages.setdefault(page, bytearray(PAGE))[off : off + n] = view[:n]
            paddr, view = paddr + n, view[n:]

    def translate(self, cr3: int, vaddr: int, la57: bool = False) -> Translation:
        return Translation(vaddr, vaddr & 0xFFFFFFFF, PAGE, ())

    def read_virt(self, cr3: int, vaddr: int, length: int, la57: bool = False) -> bytes:
        return self.read_phys(vaddr & 0xFFFFFFFF, length)

    def write_virt(self, cr3: int, vaddr: int, data: bytes, la57: bool = False) -> None:
        self.write_phys(vaddr & 0xFFFFFFFF, data)

    def u64(self, vaddr: int) -> int:
        return int(struct.unpack("<Q", self.read_virt(CR3, vaddr, 8))[0])


class StopClient:
    def note_stop_thread(self, vcpu: int) -> None:
        pass


class VcpuTarget(FakeTarget):
    def __init__(self) -> None:
        super().__init__()
        self.vcpus = [1, 2]
        self.rips: dict[int, int] = {}

    def read_register(self, name: str, vcpu: int) -> int:
        assert name == "rip"
        return self.rips.get(vcpu, 0xFFFFFFFF81000000)


def make_engine() -> tuple[KprobeEngine, PageMem, VcpuTarget]:
    target = VcpuTarget()
    engine = KprobeEngine(target, (0x7C00000, 4 << 20), A)  # type: ignore[arg-type]
    mem = PageMem()
    engine.hostmem = mem  # type: ignore[assignment]
    engine.client = StopClient()  # type: ignore[assignment]
    engine._vars_phys = VARS_PHYS
    engine._vars = 0xFFFFFFFFFEE02000
    engine._doorbell = DOORBELL
    engine._kcr3 = CR3
    engine._stubs = Stubs(b"", {"qp_kretprobe_trampoline": TRAMP,
                                "qp_kretprobe_trampoline_end": TRAMP_END,
                                "qp_kretprobe_lost": LOST})  # fmt: skip
    assert engine.journal is not None
    engine.journal.begin(None, 0, "test")
    return engine, mem, target


def doorbell(mem: PageMem, vcpu: int, frame_addr: int, words: list[int]) -> StopReply:
    """vCPU ``vcpu`` rang the doorbell with ``words`` as its frame."""
    mem.write_virt(CR3, frame_addr, struct.pack(f"<{FRAME_WORDS}Q", *words))
    record = VARS_PHYS + VAR_PERCPU + PERCPU_STRIDE * (vcpu - 1)
    mem.write_phys(record, struct.pack("<QQQQ", frame_addr, 0, CR3, 1))
    return parse_stop_reply(f"T05thread:p01.{vcpu:02x};watch:{DOORBELL:x};".encode())


def trampoline_hit(engine: KprobeEngine, mem: PageMem) -> StopReply:
    """A task returned into the trampoline through SLOT, whose real return
    address (REAL) the journal and an instance hold."""
    mgr = KretprobeManager(engine)
    mgr.adopt([(SLOT, REAL, CR3)])
    assert engine.journal is not None
    engine.journal.ret(SLOT, REAL, CR3)
    mem.write_virt(CR3, SLOT, struct.pack("<Q", TRAMP))
    words = [0, KRETPROBE_VECTOR] + [0] * (FRAME_WORDS - 2)
    words[RETSLOT - 1] = 0x246
    words[RETSLOT] = TRAMP  # the trampoline leaves its address in the slot
    return doorbell(mem, 1, FRAME, words)


def journal_rets(engine: KprobeEngine) -> list[tuple[int, int, int]]:
    contents = engine.journal_contents()
    assert contents is not None
    return contents.rets


def test_a_return_address_stays_in_the_journal_until_the_trampoline_is_answered() -> None:
    """Finding 5: the record of the real return address went before the
    answer that carries it was written; a controller dying in between left
    the task with neither (the slot holds the trampoline, the frame no
    answer, the journal nothing to recover from)."""
    engine, mem, _ = make_engine()
    stop = trampoline_hit(engine, mem)
    mem.fail = (FRAME & 0xFFFFFFFF, (FRAME & 0xFFFFFFFF) + 8 * FRAME_WORDS)
    with pytest.raises(ConnectionClosedError):
        engine.handle_stop(stop)
    assert mem.u64(FRAME) == 0 and mem.u64(SLOT) == TRAMP  # no answer reached the guest
    assert journal_rets(engine) == [(SLOT, REAL, CR3)]  # so the journal still knows


def test_the_answered_return_address_leaves_the_journal() -> None:
    engine, mem, _ = make_engine()
    stop = trampoline_hit(engine, mem)
    assert engine.handle_stop(stop)
    assert mem.u64(SLOT) == REAL and mem.u64(FRAME) != 0  # answered
    assert journal_rets(engine) == []


# --- finding 6: a probe lost while a vCPU steps its slot ---------------------------

SLOT_A = 0xFFFFFFFFFEE20000
DB_BS, TF = 0x4000, 0x100
MOV_RAX_RBX = bytes.fromhex("4889d8")


class MemTarget(VcpuTarget):
    """Kernel code reads and writes through the fake's physical memory."""

    def __init__(self, mem: PageMem) -> None:
        super().__init__()
        self.memory = mem

    def read_phys(self, paddr: int, length: int) -> bytes:
        return self.memory.read_phys(paddr, length)

    def write_phys(self, paddr: int, data: bytes) -> None:
        self.memory.write_phys(paddr, data)


def stepping_engine() -> tuple[KprobeEngine, PageMem]:
    """vCPU 1 hit the (not boosted) probe at A and is stepping its slot."""
    from qprobes.arch.x86_64 import insn as x86insn
    from qprobes.probes.kprobe import Kprobe, KprobeStatus, ProbePoint

    engine, mem, _ = make_engine()
    target = MemTarget(mem)
    engine.target = target  # type: ignore[assignment]
    mem.write_virt(CR3, A, b"\xcc" + MOV_RAX_RBX[1:])
    mem.write_virt(CR3, SLOT_A, MOV_RAX_RBX + b"\xcc" * 13)
    insn = x86insn.decode(MOV_RAX_RBX, A)
    kp = Kprobe(addr=A, pre_handler=lambda kp, ctx: None)
    kp.registered = True
    point = ProbePoint(A, MOV_RAX_RBX[0], insn, x86insn.analyze(insn), SLOT_A, False, [kp],
                       armed=True)  # fmt: skip
    engine.points[A] = point
    assert engine.journal is not None
    engine.journal.site(A, SLOT_A, MOV_RAX_RBX[0], False)
    frame_addr = 0xFFFFC90000013E00
    words = [0, 3] + [0] * (FRAME_WORDS - 2)
    regs_rip = 2 + 16  # pt_regs' rip word in the frame
    words[regs_rip] = A + 1
    words[regs_rip + 2] = 0x246  # eflags
    bp = doorbell(mem, 1, frame_addr, words)
    assert engine.handle_stop(bp)
    assert engine.kcb[1].status is KprobeStatus.HIT_SS and engine.kcb[1].current is point
    return engine, mem


def step_done(engine: KprobeEngine, mem: PageMem) -> None:
    """vCPU 1's single-step of the slot's copy traps (#DB, DR6.BS)."""
    frame_addr = 0xFFFFC90000013E00
    words = [0, 1] + [0] * (FRAME_WORDS - 2)
    words[2 + 15] = DB_BS  # orig_rax: the DR6 the #DB stub read
    words[2 + 16] = SLOT_A + len(MOV_RAX_RBX)
    words[2 + 18] = 0x46 | TF
    assert engine.handle_stop(doorbell(mem, 1, frame_addr, words))


def site_records(engine: KprobeEngine) -> tuple[list[int], list[int], dict[int, list[int]]]:
    contents = engine.journal_contents()
    assert contents is not None
    steps = {v: [lv.point for lv in levels] for v, levels in contents.steps.items()}
    step_only = getattr(contents, "step_sites", [])  # (older journals kept none)
    return [s[0] for s in contents.sites], [s[0] for s in step_only], steps


@pytest.mark.parametrize("how", ["module unloaded", "rewritten", "disabled"])
def test_a_site_lost_mid_step_keeps_its_record_until_the_step_ends(how: str) -> None:
    """Finding 6: the site record went with the int3 while vCPU 1 still
    stepped the slot; a recovery then found a step of a point it did not
    know, and could not finish it (TF set, rip in a slot)."""
    engine, mem = stepping_engine()
    assert site_records(engine) == ([A], [], {0: [A]})
    point = engine.points[A]
    if how == "module unloaded":
        engine.kill_range(A, A + 1, "its module was unloaded")
    elif how == "rewritten":
        mem.write_virt(CR3, A, b"\x0f")  # the guest patched its text
        assert engine.check_lost([point]) == [point]
    else:
        engine.disable_kprobe(point.kprobes[0])
        assert mem.read_virt(CR3, A, 1) == MOV_RAX_RBX[:1]  # the original byte is back
    # The int3 is gone (nothing is to be written back), but the record stays.
    assert site_records(engine) == ([], [A], {0: [A]})
    step_done(engine, mem)
    assert engine.kcb[1].current is None
    assert site_records(engine) == ([], [], {})


# --- finding 8: a full journal never raises in the hit path -------------------------


class CountingMem(PageMem):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write_phys(self, paddr: int, data: bytes) -> None:
        self.writes += 1
        super().write_phys(paddr, data)


def test_a_return_probe_entry_with_the_journal_full_is_missed_and_writes_nothing() -> None:
    from qprobes.probes.context import HitContext, PtRegs
    from qprobes.probes.journal import MAX_RETS
    from qprobes.probes.kprobe import Kprobe
    from qprobes.probes.kretprobe import Kretprobe

    engine, mem, _ = make_engine()
    mgr = KretprobeManager(engine)
    journal = engine.journal
    assert journal is not None
    for i in range(MAX_RETS):  # calls hijacked elsewhere, still running
        journal.ret(0xFFFFC90000100000 + 8 * i, REAL, CR3)
    mem.write_virt(CR3, SLOT, struct.pack("<Q", REAL))
    rp = Kretprobe(addr=A, handler=lambda rp, ctx: None, maxactive=10)
    rp.kp = Kprobe(addr=A)
    words = [0] * FRAME_WORDS
    regs = PtRegs(words)
    regs.rsp = SLOT
    ctx = HitContext(1, regs, lambda a, n: mem.read_virt(CR3, a, n), CR3)
    assert mgr.entry(rp, ctx) is None  # was: JournalError out of the #BP handler
    assert rp.nmissed == 1 and mgr.stats.journal_full == 1 and not rp.instances
    assert mem.u64(SLOT) == REAL  # the return address is left alone
    assert len(journal_rets(engine)) == MAX_RETS


def test_registering_with_the_journals_sites_full_is_one_line_before_anything_is_written() -> None:
    from qprobes.errors import ProbeError
    from qprobes.probes.journal import MAX_SITES
    from qprobes.probes.kprobe import Kprobe

    engine, mem, _ = make_engine()
    counting = CountingMem()
    counting.pages = mem.pages
    engine.hostmem = counting  # type: ignore[assignment]
    engine.target = MemTarget(counting)  # type: ignore[assignment]
    engine.attached = True
    assert engine.journal is not None
    sites = engine.journal.max_sites
    assert sites >= MAX_SITES
    for i in range(sites):  # armed sites (lost ones kept for a step, say)
        engine.journal.site(0xFFFFFFFF82000000 + 16 * i, SLOT_A, 0x55, False)
    mem.write_virt(CR3, A, MOV_RAX_RBX)
    counting.writes = 0
    with pytest.raises(ProbeError, match=f"journal records at most {sites} armed probe sites"):
        engine.register_kprobe(Kprobe(addr=A))
    assert counting.writes == 0 and mem.read_virt(CR3, A, 3) == MOV_RAX_RBX
    assert not engine.points


def nested_steps(boosted_last: bool) -> tuple[KprobeEngine, list[int]]:
    """vCPU 1 steps probe 0; an NMI hits probe 1, and so on, one level more
    than the journal records (STEP_LEVELS)."""
    from qprobes.arch.x86_64 import insn as x86insn
    from qprobes.probes.context import HitContext, PtRegs
    from qprobes.probes.engine import slot_code
    from qprobes.probes.journal import STEP_LEVELS
    from qprobes.probes.kprobe import Kprobe, KprobeCtlblk, ProbePoint

    engine, mem, _ = make_engine()
    engine.target = MemTarget(mem)  # type: ignore[assignment]
    addrs = [0xFFFFFFFF81001000 + 0x100 * i for i in range(STEP_LEVELS + 1)]
    for i, addr in enumerate(addrs):
        slot = SLOT_A + 0x40 * i
        insn = x86insn.decode(MOV_RAX_RBX, addr)
        analysis = x86insn.analyze(insn)
        boosted = boosted_last and i == STEP_LEVELS
        _code, boost_slot = slot_code(insn, analysis, slot, boosted)
        engine.points[addr] = ProbePoint(addr, MOV_RAX_RBX[0], insn, analysis, slot, boosted,
                                         [Kprobe(addr=addr)], armed=True,
                                         boost_slot=boost_slot)  # fmt: skip
        mem.write_virt(CR3, addr, b"\xcc" + MOV_RAX_RBX[1:])
        assert engine.journal is not None
        engine.journal.site(addr, slot, MOV_RAX_RBX[0], boosted)
    kcb = engine.kcb.setdefault(1, KprobeCtlblk(vcpu=1))
    rips = []
    for addr in addrs:
        regs = PtRegs([0] * FRAME_WORDS)
        regs.rip, regs.eflags, regs.rsp = addr + 1, 0x46, 0xFFFFC90000004000
        engine._kprobe_handler(kcb, HitContext(1, regs, lambda a, n: bytes(n), CR3))
        rips.append(regs.rip)
    return engine, rips


@pytest.mark.parametrize("boosted_last", [True, False], ids=["boosted", "stepped"])
def test_a_reentry_deeper_than_the_journal_records_does_not_raise(boosted_last: bool) -> None:
    from qprobes.probes.journal import STEP_LEVELS

    engine, rips = nested_steps(boosted_last)  # was: JournalError out of the #BP handler
    last = engine.points[max(engine.points)]
    contents = engine.journal_contents()
    assert contents is not None
    recorded = [lv.point for lv in contents.steps[0]]
    if boosted_last:
        # Run boosted: no step, no record; the outer steps are all recorded.
        assert rips[-1] == last.boost_entry and len(engine.kcb[1].prev) == STEP_LEVELS - 1
        assert recorded == sorted(engine.points)[:STEP_LEVELS]
    else:
        # Its copy needs a step the journal could not hold (it kept the
        # innermost levels: a recovery met the outermost step unknown, TF set
        # in a slot). Refused: the probe is out, the vCPU runs the original.
        assert rips[-1] == last.addr and len(engine.kcb[1].prev) == STEP_LEVELS - 1
        assert recorded == sorted(engine.points)[:STEP_LEVELS]
        assert last.lost and not last.armed and last.kprobes[0].nmissed == 1
        assert f"reentry {STEP_LEVELS + 1} deep" in (last.kprobes[0].lost_why or "")
        mem = engine.hostmem
        assert mem is not None
        assert mem.read_phys(last.addr & 0xFFFFFFFF, 3) == MOV_RAX_RBX  # its byte back
        assert [s[0] for s in contents.sites] == sorted(engine.points)[:STEP_LEVELS]


def test_more_vcpus_than_the_journal_records_are_refused_before_anything_is_written() -> None:
    from qprobes.probes.journal import MAX_VCPUS, JournalError

    engine, _mem, target = make_engine()
    counting = CountingMem()
    engine.hostmem = counting  # type: ignore[assignment]
    engine.journal.header = None  # type: ignore[union-attr]  # (a fresh engine: none begun)
    target.vcpus = list(range(1, MAX_VCPUS + 2))
    with pytest.raises(JournalError, match=f"vCPU {MAX_VCPUS + 1}: .*vCPUs 1 to {MAX_VCPUS}"):
        engine.attach()
    assert counting.writes == 0


# --- a site record a step names, its int3 gone (recovery) ----------------------------


class KernelTarget(MemTarget):
    """Kernel data reads and writes (the engine's vars, its probe table) too."""

    def read(self, addr: int, length: int) -> bytes:
        return self.memory.read_virt(CR3, addr, length)

    def write(self, addr: int, data: bytes) -> None:
        self.memory.write_virt(CR3, addr, data)

    def add_watchpoint(self, addr: int, length: int, kind: str) -> None:
        pass


def recovering_engine(mem: PageMem) -> KprobeEngine:
    """A new controller on the dead one's guest, ready for :meth:`KprobeEngine.adopt`
    (the stubs are taken as this build's)."""
    engine = KprobeEngine(KernelTarget(mem), (0x7C00000, 4 << 20), A)  # type: ignore[arg-type]
    engine.hostmem = mem  # type: ignore[assignment]
    engine.client = StopClient()  # type: ignore[assignment]
    engine._use_stubs = lambda layout: Stubs(b"", {})  # type: ignore[method-assign]
    return engine


def dead_stepping_session() -> tuple[KprobeEngine, PageMem]:
    """vCPU 1 steps the probe at A (:func:`stepping_engine`) in a session
    whose journal and probe table (empty) a recovery can read, and no more."""
    from qprobes.probes.stubs import VAR_PTABLE

    dead, mem = stepping_engine()
    assert dead.journal is not None
    header, addrs = 0xFFFFFFFFFEE03000, 0xFFFFFFFFFEE10000  # its probe table (empty)
    dead.journal.set_area(area=0xFFFFFFFFFEE00000, kcr3=CR3, la57=False, code=0xFFFFFFFFFEE00000,
                          doorbell=DOORBELL, vars_=dead._vars, ptable=header, slot_lo=SLOT_A,
                          slot_hi=SLOT_A + 0x10000)  # fmt: skip
    mem.write_virt(CR3, dead._vars + VAR_PTABLE, struct.pack("<Q", header))
    mem.write_virt(CR3, header, struct.pack("<QQQQ", 64 - 13, (1 << 13) - 1, addrs, 0))
    return dead, mem


def test_recovery_finishes_a_step_whose_site_record_missed_its_step_only_mark() -> None:
    """A controller died in ``_disarm`` between writing the original byte back
    and marking the site record step-only, while vCPU 1 stepped the slot. The
    recovery dropped the site (no int3 there: "nothing of ours") and then could
    not finish the step: the #DB went to the guest with rip in the slot."""
    from qprobes.probes.stubs import ACTION_CHAIN

    dead, mem = dead_stepping_session()
    mem.write_virt(CR3, A, MOV_RAX_RBX[:1])  # _disarm's byte write, and then it died
    assert site_records(dead) == ([A], [], {0: [A]})

    engine = recovering_engine(mem)
    assert engine.adopt()
    point = engine.points.get(A)
    assert point is not None and point.lost and not point.armed  # was: dropped
    assert site_records(engine) == ([], [A], {0: [A]})  # marked step-only now
    engine._vars_phys = VARS_PHYS  # (the fake's doorbell record sits there)
    step_done(engine, mem)
    frame = struct.unpack(f"<{FRAME_WORDS}Q", mem.read_virt(CR3, 0xFFFFC90000013E00,
                                                          8 * FRAME_WORDS))  # fmt: skip
    assert frame[0] != ACTION_CHAIN  # the step is qprobes' own, finished here
    assert frame[2 + 16] == A + len(MOV_RAX_RBX) and not frame[2 + 18] & TF
    assert engine.kcb[1].current is None
    assert site_records(engine) == ([], [], {})
    assert mem.read_virt(CR3, A, 3) == MOV_RAX_RBX  # nothing written at the site


def test_recovery_still_puts_back_the_int3_of_a_site_a_step_names() -> None:
    """The other case a step names a normal record: the probe armed, a vCPU
    mid-step. Its int3 is the dead session's and must go at detach."""
    _dead, mem = dead_stepping_session()
    engine = recovering_engine(mem)
    assert engine.adopt()
    point = engine.points[A]
    assert point.armed and not point.lost
    assert site_records(engine) == ([A], [], {0: [A]})
