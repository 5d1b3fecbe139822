"""The trap stubs' fast path run in unicorn: the real #BP stub (assembled as
the engine assembles it) finds the probe, calls its recorder and returns to
the boosted slot with no doorbell; a #PF inside the recorder goes through the
real #PF stub's exception-table lookup and back to the fixup; a full ring,
a guest single-stepping itself, a vCPU stepping a slot and a probe with no
recorder ring the doorbell instead. The harness plays the CPU's exception
delivery (unicorn hands exceptions to a hook instead of the IDT): it pushes
the frame the CPU would push and jumps to the vector's stub.
"""

from __future__ import annotations

import shutil
import struct

import pytest

from tests.unit.test_recorder import (
    CPU_NUMBER,
    KERNEL_FLOOR,
    PROBE_IP,
    REGS,
    RING,
    SYMBOLS,
    TASK_LAYOUT,
    GuestMem,
    Oracle,
    make_guest,
    q,
    spec_for,
)

unicorn = pytest.importorskip("unicorn")
from unicorn import x86_const as X  # noqa: E402

from qprobes.arch.x86_64.recorder_asm import (  # noqa: E402
    RecorderSpec,
    RingLayout,
    assemble_recorder,
)
from qprobes.probes.stubs import (  # noqa: E402
    PT_REGS_NAMES,
    PTABLE_BITS,
    VAR_PTABLE,
    VAR_PTABLE_HEADER,
    VAR_SS_ACTIVE,
    StubLayout,
    Stubs,
    assemble_stubs,
    probe_hash,
    rtable_entry,
)
from qprobes.tracing import FAULT, compile_fetchargs, evaluate  # noqa: E402
from qprobes.tracing.recorder import decode_record, drain_ring, plan_recorder  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")

AREA = 0xFFFF_FFFF_C040_0000
STUB_CODE, DOORBELL, VARS, PTABLE = AREA, AREA + 0x1000, AREA + 0x2000, AREA + 0x3000
SLOT_LO, SLOT_HI = AREA + 0x20000, AREA + 0x30000
RTABLE = AREA + 0x40000
REC_LO, REC_HI = AREA + 0x50000, AREA + 0x52000
EXTABLE = AREA + 0x60000
BOOST = SLOT_LO + 0x40  # the probe's boosted slot entry
GDT = 0xFFFF_FFFF_C047_0000
KERNEL_CS, KERNEL_SS = 0x10, 0x18
LAYOUT = StubLayout(STUB_CODE, DOORBELL, VARS, PTABLE, SLOT_LO, SLOT_HI, RTABLE, REC_LO,
                    REC_HI, EXTABLE)  # fmt: skip
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15")  # fmt: skip


def _reg(name: str) -> int:
    return int(getattr(X, f"UC_X86_REG_{name.upper()}"))


class Machine:
    """A guest with qprobes' area: stubs, tables, one probe and its recorder."""

    def __init__(self, args: str, ring: RingLayout = RING, recorder: bool = True) -> None:
        self.guest = g = make_guest()
        self.stubs: Stubs = assemble_stubs(LAYOUT)
        for base, size in ((STUB_CODE, 0x3000), (PTABLE, 0x10000), (SLOT_LO, 0x1000),
                           (RTABLE, 0x10000), (REC_LO, REC_HI - REC_LO), (EXTABLE, 0x1000),
                           (GDT, 0x1000)):  # fmt: skip
            g.map(base, size)
        g.write(STUB_CODE, self.stubs.code)
        g.write(BOOST, b"\xf4")  # hlt: where the boosted copy would run
        # 64-bit code and data descriptors, for iretq.
        g.write(GDT + KERNEL_CS, q(0x00AF9B000000FFFF) + q(0x00CF93000000FFFF))
        g.uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT, 0x1000 - 1, 0))
        g.uc.reg_write(X.UC_X86_REG_CS, KERNEL_CS)
        g.uc.reg_write(X.UC_X86_REG_SS, KERNEL_SS)
        g.clean = g.uc.context_save()
        compiled = compile_fetchargs(spec_for(args), SYMBOLS)
        self.compiled = compiled
        self.plan = plan_recorder(compiled, PROBE_IP)
        spec = RecorderSpec(5, self.plan.fetches, 8 * PT_REGS_NAMES.index("rsp"), ring,
                            task=TASK_LAYOUT, cpu_number=CPU_NUMBER,
                            kernel_floor=KERNEL_FLOOR, kernel_reads_user=True)  # fmt: skip
        self.recorder = rec = assemble_recorder(spec, REC_LO)
        g.write(REC_LO, rec.code)
        g.write(EXTABLE, b"".join(struct.pack("<QQ", a, b) for a, b in rec.extable) + bytes(16))
        # The table in use: its header (shift, mask, addresses, fast-path
        # words) and the pointer to it, as the engine writes them at attach.
        g.write(VARS + VAR_PTABLE_HEADER, q(64 - PTABLE_BITS) + q((1 << PTABLE_BITS) - 1)
                + q(PTABLE) + q(RTABLE))  # fmt: skip
        g.write(VARS + VAR_PTABLE, q(VARS + VAR_PTABLE_HEADER))
        index = probe_hash(PROBE_IP)
        g.write(PTABLE + 8 * index, q(PROBE_IP))
        if recorder:
            g.write(RTABLE + 8 * index, q(rtable_entry(REC_LO - AREA, BOOST - AREA)))
        self.ring = ring

    def _push(self, value: int) -> None:
        uc = self.guest.uc
        rsp = uc.reg_read(X.UC_X86_REG_RSP) - 8
        self.guest.write(rsp, q(value))
        uc.reg_write(X.UC_X86_REG_RSP, rsp)

    def deliver(self, handler: int, rip: int, error_code: int | None, rflags: int) -> None:
        """What the CPU does at an exception in ring 0 through an interrupt gate."""
        uc = self.guest.uc
        old_rsp = uc.reg_read(X.UC_X86_REG_RSP)
        uc.reg_write(X.UC_X86_REG_RSP, old_rsp & ~0xF)
        for value in (KERNEL_SS, old_rsp, rflags, KERNEL_CS, rip):
            self._push(value)
        if error_code is not None:
            self._push(error_code)
        uc.reg_write(X.UC_X86_REG_EFLAGS, rflags & ~0x200 & ~0x100)  # IF and TF off
        uc.reg_write(X.UC_X86_REG_RIP, handler)

    def hit(self, eflags: int = 0x246, until: int = BOOST) -> int:
        """int3 at PROBE_IP with the registers of REGS; run until rip is
        ``until`` (the boosted slot, or the doorbell). Returns rip."""
        g, uc = self.guest, self.guest.uc
        g._forget_exception()
        for name in GPRS:
            uc.reg_write(_reg(name), REGS[name])
        uc.reg_write(X.UC_X86_REG_RSP, REGS["rsp"])
        self.deliver(self.stubs["qp_bp_entry"], PROBE_IP + 1, None, eflags)
        for _ in range(50):
            g.intr.clear()
            uc.emu_start(uc.reg_read(X.UC_X86_REG_RIP), until, count=200_000)
            rip = int(uc.reg_read(X.UC_X86_REG_RIP))
            if rip == until:
                return rip
            if g.intr == [14]:
                # A #PF: into the real #PF stub, as the CPU would.
                g._forget_exception()
                self.deliver(self.stubs["qp_pf_entry"], rip, 0, uc.reg_read(X.UC_X86_REG_EFLAGS))
                continue
            raise AssertionError(f"stopped at {rip:#x} (exceptions {g.intr})")
        raise AssertionError("the hit does not end")

    def records(self) -> list[bytes]:
        return drain_ring(GuestMem(self.guest), self.ring, 2)


def test_fast_hit_records_and_returns_to_the_boosted_slot() -> None:
    m = Machine("%di +0(%si):string $stack1 +8(%di):u32 c=$comm")
    m.hit()
    uc = m.guest.uc
    # Back from the exception exactly: every register as at the int3, rip
    # at the boosted copy.
    assert {n: uc.reg_read(_reg(n)) for n in GPRS} == {n: REGS[n] for n in GPRS}
    assert uc.reg_read(X.UC_X86_REG_RSP) == REGS["rsp"]
    assert uc.reg_read(X.UC_X86_REG_EFLAGS) & 0x200
    (record,) = m.records()
    raw = decode_record(record, m.plan.strings)
    assert dict(m.plan.values(raw)) == dict(evaluate(m.compiled, Oracle(m.guest)))
    assert m.guest.read(DOORBELL, 1) == b"\0"


def test_fault_in_the_recorder_resumes_at_its_fixup_through_the_pf_stub() -> None:
    m = Machine("+0(%r10) %di +0(%r10):string")
    seen: list[int] = []
    original = m.guest._on_intr

    def spy(uc: object, intno: int, data: object) -> None:
        seen.append(intno)
        original(uc, intno, data)

    m.guest.uc.hook_del(m.guest.intr_hook)
    m.guest.intr_hook = m.guest.uc.hook_add(unicorn.UC_HOOK_INTR, spy)
    m.hit()
    assert seen == [14, 14]
    (record,) = m.records()
    raw = decode_record(record, m.plan.strings)
    assert list(m.plan.values(raw).values()) == [FAULT, REGS["rdi"], FAULT]
    assert m.guest.uc.reg_read(X.UC_X86_REG_RSP) == REGS["rsp"]


def _frame_at_doorbell(m: Machine) -> dict[str, int]:
    rsp = m.guest.uc.reg_read(X.UC_X86_REG_RSP)
    words = struct.unpack("<23Q", m.guest.read(rsp, 8 * 23))
    return {"action": words[0], "vector": words[1]} | dict(
        zip(PT_REGS_NAMES, words[2:], strict=True))  # fmt: skip


@pytest.mark.parametrize("case", ["no recorder", "guest TF", "slot stepping", "ring full"])
def test_hits_the_guest_cannot_take_ring_the_doorbell(case: str) -> None:
    small = RingLayout(RING.headers, RING.data, 256, RING.ncpus)
    m = Machine("%di", ring=small, recorder=case != "no recorder")
    eflags = 0x246 | (0x100 if case == "guest TF" else 0)
    if case == "slot stepping":
        m.guest.write(VARS + VAR_SS_ACTIVE, q(1))
    if case == "ring full":
        for _ in range(4):
            m.hit()
    m.hit(eflags, until=m.stubs["qp_bp_doorbell_ret"])
    frame = _frame_at_doorbell(m)
    assert m.guest.read(DOORBELL, 1) == b"\1"
    # The frame is the int3's, untouched: the host handles this hit.
    assert (frame["vector"], frame["action"], frame["rip"]) == (3, 0, PROBE_IP + 1)
    assert frame["rdi"] == REGS["rdi"] and frame["eflags"] == eflags
    assert len(m.records()) == (4 if case == "ring full" else 0)


def _chained(m: Machine, second: str) -> int:
    """A second recorder (probe id 6, fetching ``second``) at the same probe,
    and the chain the engine gives an aggregate point: the table's word now
    calls the chain, which calls the first recorder, then the second."""
    from qprobes.arch.x86_64.recorder_asm import assemble_chain

    compiled = compile_fetchargs(spec_for(second), SYMBOLS)
    spec = RecorderSpec(6, plan_recorder(compiled, PROBE_IP).fetches,
                        8 * PT_REGS_NAMES.index("rsp"), m.ring, task=TASK_LAYOUT,
                        cpu_number=CPU_NUMBER, kernel_floor=KERNEL_FLOOR,
                        kernel_reads_user=True)  # fmt: skip
    rec2 = assemble_recorder(spec, REC_LO + 0x800)
    m.guest.write(rec2.address, rec2.code)
    chain = assemble_chain([REC_LO, rec2.address], REC_LO + 0x1000,
                           8 * PT_REGS_NAMES.index("orig_rax"), tag=7)  # fmt: skip
    m.guest.write(chain.address, chain.code)
    m.guest.write(RTABLE + 8 * probe_hash(PROBE_IP), q(rtable_entry(chain.address - AREA,
                                                                   BOOST - AREA)))  # fmt: skip
    return rec2.max_record


def _ids(records: list[bytes]) -> list[int]:
    return [struct.unpack_from("<I", r, 4)[0] for r in records]


def test_a_chain_runs_every_recorder_of_an_aggregate_point_in_order() -> None:
    m = Machine("%di c=$comm")
    _chained(m, "+0(%si):string %dx")
    for _ in range(3):
        m.hit()
    uc = m.guest.uc
    assert {n: uc.reg_read(_reg(n)) for n in GPRS} == {n: REGS[n] for n in GPRS}
    assert uc.reg_read(X.UC_X86_REG_RSP) == REGS["rsp"]
    assert _ids(m.records()) == [5, 6] * 3
    assert m.guest.read(DOORBELL, 1) == b"\0"


@pytest.mark.parametrize("first_fits", [True, False])
def test_a_chain_that_finds_the_ring_full_tells_the_host_which_recorded(first_fits: bool) -> None:
    # Lossless mode: a full ring hands the hit to the host. The chain stops
    # at the first recorder that found no room and leaves in orig_ax how
    # many recorded before it, for the host to run only the others' handlers.
    small = RingLayout(RING.headers, RING.data, 512, RING.ncpus)
    # Records of 56 and 144 bytes: after two hits (400 bytes) a 56-byte
    # record still fits, a 144-byte one does not.
    big = "%di %si %dx %cx %r8 %r9 %r10 %r11 %ax %bx %bp %r12"
    m = Machine("%di" if first_fits else big, ring=small)
    _chained(m, big if first_fits else "%di")
    taken = 0
    doorbell = m.stubs["qp_bp_doorbell_ret"]
    for _ in range(20):
        g, uc = m.guest, m.guest.uc
        g._forget_exception()
        for name in GPRS:
            uc.reg_write(_reg(name), REGS[name])
        uc.reg_write(X.UC_X86_REG_RSP, REGS["rsp"])
        m.deliver(m.stubs["qp_bp_entry"], PROBE_IP + 1, None, 0x246)
        uc.emu_start(uc.reg_read(X.UC_X86_REG_RIP), doorbell, count=200_000)
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        if rip == BOOST + 1:  # past the hlt where the boosted copy would run
            taken += 1
            continue
        assert rip == doorbell, hex(rip)
        frame = _frame_at_doorbell(m)
        assert m.guest.read(DOORBELL, 1) == b"\1"
        assert (frame["vector"], frame["rip"], frame["rdi"]) == (3, PROBE_IP + 1, REGS["rdi"])
        # The chain's tag (7) and how many recorded before the full ring.
        recorded = 1 if first_fits else 0
        assert frame["orig_rax"] == 7 << 32 | recorded
        assert taken >= 1
        assert _ids(m.records()) == [5, 6] * taken + [5] * recorded
        return
    raise AssertionError("the ring never filled")
