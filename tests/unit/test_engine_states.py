"""The engine's per-vCPU state machine with a fake target (no guest).

Mirrors the paths of 2.6's kprobe_handler/post_kprobe_handler that are hard
to reach on a real guest: a probe hit while the same vCPU steps another
(KPROBE_REENTER), an int3 reported after its probe went away, a foreign
int3, and a #DB that is not qprobes'.
"""

from __future__ import annotations

import logging
import struct

import pytest

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.probes.context import HitContext, PtRegs
from qprobes.probes.engine import KprobeEngine, slot_code
from qprobes.probes.kprobe import Kprobe, KprobeCtlblk, KprobeStatus, ProbePoint
from qprobes.probes.stubs import ACTION_CHAIN, FRAME_WORDS

TF, IF = 0x100, 0x200
BS, B0 = 0x4000, 0x1  # DR6
A, B = 0xFFFFFFFF81001000, 0xFFFFFFFF81002000
SLOT_A, SLOT_B = 0xFFFFFFFFFEE20000, 0xFFFFFFFFFEE20020
STACK = 0xFFFFC90000004000


class FakeTarget:
    """Byte-addressed memory and nothing else."""

    def __init__(self) -> None:
        self.mem: dict[int, int] = {}
        self.client = None

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.mem.get(addr + i, 0) for i in range(length))

    def write(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.mem[addr + i] = b


def make_engine() -> tuple[KprobeEngine, FakeTarget]:
    target = FakeTarget()
    engine = KprobeEngine(target, (0x7C00000, 4 << 20), A)  # type: ignore[arg-type]
    engine._vars = 0xFFFFFFFFFEE02000
    return engine, target


def point(
    engine: KprobeEngine, target: FakeTarget, addr: int, code: bytes, slot: int
) -> ProbePoint:
    insn = x86insn.decode(code, addr)
    p = ProbePoint(addr, code[0], insn, x86insn.analyze(insn), slot, False, [], armed=True)
    engine.points[addr] = p
    target.write(addr, b"\xcc")
    return p


def frame(rip: int, eflags: int = IF | 0x2, rsp: int = STACK) -> HitContext:
    words = [0] * FRAME_WORDS
    regs = PtRegs(words)
    regs.rip, regs.eflags, regs.rsp = rip, eflags, rsp
    regs.dirty.clear()
    return HitContext(1, regs, lambda a, n: bytes(n), 0x1000)


def test_reenter_is_counted_missed_and_stepped_without_handlers() -> None:
    engine, target = make_engine()
    calls: list[str] = []
    pa = point(engine, target, A, bytes.fromhex("4889d8"), SLOT_A)  # mov rax, rbx
    pb = point(engine, target, B, bytes.fromhex("4889c3"), SLOT_B)  # mov rbx, rax
    ka = Kprobe(addr=A, pre_handler=lambda kp, ctx: calls.append("pre A") and None,
                post_handler=lambda kp, ctx, f: calls.append("post A"))  # fmt: skip
    kb = Kprobe(addr=B, pre_handler=lambda kp, ctx: calls.append("pre B") and None,
                post_handler=lambda kp, ctx, f: calls.append("post B"))  # fmt: skip
    pa.kprobes.append(ka)
    pb.kprobes.append(kb)
    kcb = KprobeCtlblk()

    hit_a = frame(A + 1)
    engine._kprobe_handler(kcb, hit_a)
    assert kcb.status is KprobeStatus.HIT_SS and kcb.current is pa
    assert hit_a.regs.rip == SLOT_A and hit_a.regs.eflags & TF and not hit_a.regs.eflags & IF

    hit_b = frame(B + 1, eflags=0x2 | TF)  # B's int3 hit while A is being stepped
    engine._kprobe_handler(kcb, hit_b)
    assert kcb.status is KprobeStatus.REENTER and kcb.current is pb
    assert kb.nmissed == 1 and kb.nhit == 0
    assert engine.stats.reentered == 1  # the miss's cause, counted engine-wide
    assert hit_b.regs.rip == SLOT_B
    assert calls == ["pre A"]

    step_b = frame(SLOT_B + 3, eflags=0x2 | TF)
    engine._post_kprobe_handler(kcb, step_b, BS)
    assert step_b.regs.rip == B + 3
    assert kcb.status is KprobeStatus.HIT_SS and kcb.current is pa  # A restored
    assert calls == ["pre A"]  # no post_handler for a reentered probe

    step_a = frame(SLOT_A + 3, eflags=0x2 | TF)
    engine._post_kprobe_handler(kcb, step_a, BS)
    assert step_a.regs.rip == A + 3
    assert step_a.regs.eflags & IF and not step_a.regs.eflags & TF  # guest flags back
    assert step_a.regs.action == 0  # plain return (the engine sets ACTION_RETURN)
    assert kcb.status is KprobeStatus.NONE and calls == ["pre A", "post A"]
    assert engine._ss_active == 0
    assert ka.nhit == 1 and ka.nmissed == 0


def test_int3_after_removal_resumes_at_the_probe_address() -> None:
    engine, target = make_engine()
    target.write(A, b"\x48")  # the original byte is back: the probe was removed
    ctx = frame(A + 1)
    engine._kprobe_handler(KprobeCtlblk(), ctx)
    assert ctx.regs.rip == A and ctx.regs.action != ACTION_CHAIN


def test_foreign_int3_goes_to_the_guest() -> None:
    engine, target = make_engine()
    target.write(A, b"\xcc")  # an int3 qprobes did not write
    ctx = frame(A + 1)
    engine._kprobe_handler(KprobeCtlblk(), ctx)
    assert ctx.regs.action == ACTION_CHAIN and ctx.regs.rip == A + 1


def test_debug_trap_that_is_not_ours_goes_to_the_guest() -> None:
    engine, _ = make_engine()
    ctx = frame(A + 3, eflags=0x2 | TF)
    engine._post_kprobe_handler(KprobeCtlblk(), ctx, BS)
    assert ctx.regs.action == ACTION_CHAIN and ctx.regs.rip == A + 3


def test_pushf_step_shows_the_guest_its_own_flags() -> None:
    engine, target = make_engine()
    p = point(engine, target, A, b"\x9c", SLOT_A)  # pushfq
    p.kprobes.append(Kprobe(addr=A))
    kcb = KprobeCtlblk()
    engine._kprobe_handler(kcb, frame(A + 1, eflags=IF | 0x2))
    pushed = 0x2 | TF  # what the CPU pushed while stepping: TF on, IF off
    target.write(STACK - 8, struct.pack("<Q", pushed))
    step = HitContext(1, PtRegs([0] * FRAME_WORDS), target.read, 0x1000)
    step.regs.rip, step.regs.eflags, step.regs.rsp = SLOT_A + 1, 0x2 | TF, STACK - 8
    assert engine._post_kprobe_handler(kcb, step, BS) == BS
    assert struct.unpack("<Q", target.read(STACK - 8, 8))[0] == IF | 0x2
    assert step.regs.rip == A + 1
    assert step.regs.eflags & IF and not step.regs.eflags & TF  # its flags after the step
    assert step.regs.action == 0  # a plain return to the guest
    assert kcb.status is KprobeStatus.NONE and engine._ss_active == 0


# --- boosted relative branches that are single-stepped -----------------------

JE_10 = bytes.fromhex("7410")  # je +0x10 at A: taken -> A + 0x12, not taken -> A + 2


def boosted_point(engine: KprobeEngine, target: FakeTarget, code: bytes) -> ProbePoint:
    """A boosted probe at A as register_kprobe lays out its slot."""
    insn = x86insn.decode(code, A)
    analysis = x86insn.analyze(insn)
    slot_bytes, boost_slot = slot_code(insn, analysis, SLOT_A, True)
    target.write(SLOT_A, slot_bytes)
    p = ProbePoint(A, code[0], insn, analysis, SLOT_A, True, [], armed=True,
                   boost_slot=boost_slot)  # fmt: skip
    engine.points[A] = p
    target.write(A, b"\xcc")
    return p


def test_slot_of_a_boosted_jcc_holds_the_plain_copy_first() -> None:
    insn = x86insn.decode(JE_10, A)
    code, boost_slot = slot_code(insn, x86insn.analyze(insn), SLOT_A, True)
    assert code[:2] == JE_10  # what a single-step runs: resume_execution relocates it
    assert boost_slot == SLOT_A + 16
    boosted = code[16:]
    # je rel32 to A + 0x12, then jmp rel32 back to A + 2
    assert boosted[:2] == b"\x0f\x84"
    assert SLOT_A + 16 + 6 + int.from_bytes(boosted[2:6], "little", signed=True) == A + 0x12
    assert boosted[6] == 0xE9
    assert SLOT_A + 16 + 11 + int.from_bytes(boosted[7:11], "little", signed=True) == A + 2
    assert len(code) <= x86insn.SLOT_SIZE


def test_boosted_jcc_without_post_handler_runs_the_boosted_copy() -> None:
    engine, target = make_engine()
    p = boosted_point(engine, target, JE_10)
    p.kprobes.append(Kprobe(addr=A))
    kcb = KprobeCtlblk()
    ctx = frame(A + 1)
    engine._kprobe_handler(kcb, ctx)
    assert ctx.regs.rip == SLOT_A + 16 and not ctx.regs.eflags & TF
    assert kcb.status is KprobeStatus.NONE and engine._ss_active == 0


@pytest.mark.parametrize(("after_step", "resume"), [
    (SLOT_A + 2, A + 2),  # not taken
    (SLOT_A + 0x12, A + 0x12),  # taken: the plain copy's target, relocated
])  # fmt: skip
def test_boosted_jcc_with_post_handler_is_stepped_and_resumes_right(
    after_step: int, resume: int
) -> None:
    engine, target = make_engine()
    p = boosted_point(engine, target, JE_10)
    seen: list[int] = []
    p.kprobes.append(Kprobe(addr=A))
    # An aggregate probe that gains a post_handler later stops boosting.
    p.kprobes.append(Kprobe(addr=A, post_handler=lambda kp, ctx, f: seen.append(ctx.regs.rip)))
    kcb = KprobeCtlblk()
    hit = frame(A + 1)
    engine._kprobe_handler(kcb, hit)
    assert hit.regs.rip == SLOT_A and hit.regs.eflags & TF  # the plain copy, stepped
    assert kcb.status is KprobeStatus.HIT_SS
    step = frame(after_step, eflags=0x2 | TF)
    engine._post_kprobe_handler(kcb, step, BS)
    assert step.regs.rip == resume and seen == [resume]
    assert step.regs.eflags & IF and not step.regs.eflags & TF
    assert kcb.status is KprobeStatus.NONE and engine._ss_active == 0


def test_boosted_jcc_under_guest_tf_is_stepped() -> None:
    engine, target = make_engine()
    p = boosted_point(engine, target, JE_10)
    p.kprobes.append(Kprobe(addr=A))
    kcb = KprobeCtlblk()
    hit = frame(A + 1, eflags=IF | TF | 0x2)  # the guest single-steps itself
    engine._kprobe_handler(kcb, hit)
    assert hit.regs.rip == SLOT_A
    step = frame(SLOT_A + 2, eflags=0x2 | TF)
    engine._post_kprobe_handler(kcb, step, BS)
    assert step.regs.rip == A + 2 and step.regs.action == ACTION_CHAIN  # its own #DB


def test_boost_false_probe_added_to_a_boosted_point_steps_it() -> None:
    engine, target = make_engine()
    p = boosted_point(engine, target, JE_10)
    p.kprobes += [Kprobe(addr=A), Kprobe(addr=A, boost=False)]
    hit = frame(A + 1)
    engine._kprobe_handler(KprobeCtlblk(), hit)
    assert hit.regs.rip == SLOT_A and hit.regs.eflags & TF


# --- nested reentry ---------------------------------------------------------------

C = 0xFFFFFFFF81003000
SLOT_C = 0xFFFFFFFFFEE20040


def test_nested_reentry_unwinds_every_level() -> None:
    """A is popfq loading TF (the guest's own); B reenters while A steps and C
    while B steps. Each is missed and stepped; unwinding restores each level
    with its own flags and popped TF, and A ends as if nothing happened."""
    engine, target = make_engine()
    pa = point(engine, target, A, b"\x9d", SLOT_A)  # popfq
    pb = point(engine, target, B, bytes.fromhex("4889c3"), SLOT_B)
    pc = point(engine, target, C, bytes.fromhex("4889d8"), SLOT_C)
    ka, kb, kc = Kprobe(addr=A), Kprobe(addr=B), Kprobe(addr=C)
    pa.kprobes.append(ka)
    pb.kprobes.append(kb)
    pc.kprobes.append(kc)
    target.write(STACK, struct.pack("<Q", 0x2 | TF | IF))  # the image popfq loads
    kcb = KprobeCtlblk()
    hit_a = HitContext(1, PtRegs([0] * FRAME_WORDS), target.read, 0x1000)
    hit_a.regs.rip, hit_a.regs.eflags, hit_a.regs.rsp = A + 1, IF | 0x2, STACK
    engine._kprobe_handler(kcb, hit_a)
    assert kcb.popped_tf == TF
    engine._kprobe_handler(kcb, frame(B + 1, eflags=0x2))  # e.g. in an NMI
    assert kcb.status is KprobeStatus.REENTER and kcb.current is pb
    hit_c = frame(C + 1, eflags=0x2)
    engine._kprobe_handler(kcb, hit_c)  # while B is stepped: nested
    assert kcb.status is KprobeStatus.REENTER and kcb.current is pc
    assert hit_c.regs.rip == SLOT_C and engine._ss_active == 3
    assert (ka.nmissed, kb.nmissed, kc.nmissed) == (0, 1, 1)

    step_c = frame(SLOT_C + 3, eflags=0x2 | TF)
    engine._post_kprobe_handler(kcb, step_c, BS)
    assert step_c.regs.rip == C + 3 and not step_c.regs.eflags & TF
    assert kcb.status is KprobeStatus.REENTER and kcb.current is pb
    step_b = frame(SLOT_B + 3, eflags=0x2 | TF)
    engine._post_kprobe_handler(kcb, step_b, BS)
    assert step_b.regs.rip == B + 3 and not step_b.regs.eflags & TF
    assert kcb.status is KprobeStatus.HIT_SS and kcb.current is pa
    step_a = frame(SLOT_A + 1, eflags=0x2 | TF, rsp=STACK + 8)
    engine._post_kprobe_handler(kcb, step_a, BS)
    assert step_a.regs.rip == A + 1
    assert step_a.regs.eflags & TF  # the TF popfq loaded, kept across both reentries
    assert step_a.regs.action == 0  # the guest had no TF before: this trap was ours
    assert kcb.status is KprobeStatus.NONE and not kcb.prev and engine._ss_active == 0
    assert ka.nhit == 1


# --- the end of a step ----------------------------------------------------------------


def stepping_a() -> tuple[KprobeEngine, KprobeCtlblk, ProbePoint]:
    engine, target = make_engine()
    pa = point(engine, target, A, bytes.fromhex("4889d8"), SLOT_A)  # mov rax, rbx
    pa.kprobes.append(Kprobe(addr=A))
    kcb = KprobeCtlblk()
    engine._kprobe_handler(kcb, frame(A + 1))
    assert kcb.status is KprobeStatus.HIT_SS
    return engine, kcb, pa


def test_debug_trap_without_bs_does_not_end_the_step() -> None:
    engine, kcb, pa = stepping_a()
    ctx = frame(SLOT_A + 3, eflags=0x2 | TF)
    assert engine._post_kprobe_handler(kcb, ctx, 0) == 0  # neither BS nor B0-B3
    assert ctx.regs.action == ACTION_CHAIN and ctx.regs.rip == SLOT_A + 3
    assert kcb.status is KprobeStatus.HIT_SS and kcb.current is pa and engine._ss_active == 1
    elsewhere = frame(0xFFFFFFFF81005555, eflags=0x2)  # a guest breakpoint elsewhere
    assert engine._post_kprobe_handler(kcb, elsewhere, B0) == B0
    assert elsewhere.regs.action == ACTION_CHAIN and elsewhere.regs.rip == 0xFFFFFFFF81005555
    assert kcb.status is KprobeStatus.HIT_SS and kcb.current is pa and engine._ss_active == 1


def test_debug_trap_elsewhere_is_not_the_end_of_the_step() -> None:
    """A #DB in an NMI handler that ran before the stepped instruction."""
    engine, kcb, _ = stepping_a()
    nmi_rip = 0xFFFFFFFF81005555
    ctx = frame(nmi_rip, eflags=0x2 | TF)
    assert engine._post_kprobe_handler(kcb, ctx, BS) == BS
    assert ctx.regs.action == ACTION_CHAIN and ctx.regs.rip == nmi_rip
    assert kcb.status is KprobeStatus.HIT_SS and engine._ss_active == 1
    end = frame(SLOT_A + 3, eflags=0x2 | TF)  # then the real end of the step
    engine._post_kprobe_handler(kcb, end, BS)
    assert end.regs.rip == A + 3 and kcb.status is KprobeStatus.NONE


@pytest.mark.parametrize("dr6", [BS | B0, B0], ids=["with-bs", "reported-apart"])
def test_guest_breakpoint_hit_by_the_stepped_instruction_goes_to_the_guest(dr6: int) -> None:
    engine, kcb, _ = stepping_a()
    ctx = frame(SLOT_A + 3, eflags=0x2 | TF)
    guest_dr6 = engine._post_kprobe_handler(kcb, ctx, dr6)
    assert ctx.regs.rip == A + 3 and ctx.regs.eflags & IF and not ctx.regs.eflags & TF
    assert ctx.regs.action == ACTION_CHAIN and guest_dr6 == B0  # without qprobes' BS
    assert kcb.status is KprobeStatus.NONE and engine._ss_active == 0


# --- faults in a slot -------------------------------------------------------------------


def test_divide_error_in_a_stepped_slot_goes_to_the_guest_at_the_probe() -> None:
    engine, target = make_engine()
    pa = point(engine, target, A, bytes.fromhex("48f7f6"), SLOT_A)  # div rsi
    pa.kprobes.append(Kprobe(addr=A))
    kcb = KprobeCtlblk()
    engine._kprobe_handler(kcb, frame(A + 1))
    fault = frame(SLOT_A, eflags=0x2 | TF)
    engine._kprobe_fault_handler(kcb, fault, 0)
    assert fault.regs.rip == A and fault.regs.eflags & IF and not fault.regs.eflags & TF
    assert fault.regs.action == ACTION_CHAIN
    assert kcb.status is KprobeStatus.NONE and engine._ss_active == 0


def test_fault_in_a_boosted_slot_goes_to_the_guest_at_the_probe() -> None:
    engine, _ = make_engine()
    insn = x86insn.decode(bytes.fromhex("48f7f6"), A)
    p = ProbePoint(A, 0x48, insn, x86insn.analyze(insn), SLOT_A, True, [Kprobe(addr=A)],
                   armed=True)  # fmt: skip
    engine.points[A] = p
    kcb = KprobeCtlblk()
    hit = frame(A + 1)
    engine._kprobe_handler(kcb, hit)
    assert hit.regs.rip == SLOT_A and kcb.status is KprobeStatus.NONE
    fault = frame(SLOT_A)
    engine._kprobe_fault_handler(kcb, fault, 0)
    assert fault.regs.rip == A and fault.regs.action == ACTION_CHAIN


# --- lost probes -----------------------------------------------------------------------


def test_a_probe_whose_int3_the_guest_rewrote_is_lost(caplog: pytest.LogCaptureFixture) -> None:
    engine, target = make_engine()
    pa = point(engine, target, A, bytes.fromhex("0f1f440000"), SLOT_A)
    ka = Kprobe(addr=A)
    pa.kprobes.append(ka)
    engine._ptable_insert(A)
    assert engine.check_lost() == []
    target.write(A, b"\xe8")  # ftrace made the nop a call
    with caplog.at_level(logging.WARNING):
        assert engine.check_lost() == [pa]
        assert engine.check_lost() == []  # reported once
    assert [r.getMessage() for r in caplog.records] == [f"probe lost: the guest rewrote {A:#x}"]
    assert pa.lost and ka.lost and not pa.armed and engine.stats.lost == 1
    assert A not in engine._ptable
    engine._disarm(pa)
    assert target.read(A, 1) == b"\xe8"  # the saved byte never goes back


def test_guest_breakpoint_hit_by_a_boosted_copy_is_seen_after_the_original() -> None:
    """A boosted copy that hits a guest data breakpoint traps at the jmp back:
    the guest sees the #DB right after the original instruction instead."""
    engine, target = make_engine()
    insn = x86insn.decode(bytes.fromhex("48891f"), A)  # mov [rdi], rbx
    code, _ = slot_code(insn, x86insn.analyze(insn), SLOT_A, True)
    target.write(SLOT_A, code)
    engine.points[A] = ProbePoint(A, 0x48, insn, x86insn.analyze(insn), SLOT_A, True,
                                  [Kprobe(addr=A)], armed=True)  # fmt: skip
    ctx = frame(SLOT_A + 3)
    assert engine._post_kprobe_handler(KprobeCtlblk(), ctx, B0) == B0
    assert ctx.regs.rip == A + 3 and ctx.regs.action == ACTION_CHAIN


class _Chains:
    """FastPath.chain_recorded for one chain, tag 1, of ``kps``."""

    def __init__(self, kps: list[Kprobe]) -> None:
        self.kps = tuple(kps)

    def chain_recorded(self, value: int) -> tuple[Kprobe, ...]:
        return self.kps[: value & 0xFFFFFFFF] if value >> 32 == 1 else ()


@pytest.mark.parametrize("recorded", [None, 0, 1, 2])
@pytest.mark.parametrize("first_gone", [False, True])
def test_an_aggregate_hit_a_chain_handed_over_runs_the_handlers_of_the_rest(
    recorded: int | None, first_gone: bool
) -> None:
    # A chain of recorders that found the ring full after ``recorded`` of
    # them says so in orig_ax, with its tag; -1 (None here): no chain ran,
    # every handler runs. The kprobes that recorded are known by identity:
    # one unregistered before the host took the hit changes nothing.
    engine, target = make_engine()
    p = boosted_point(engine, target, b"\x55")  # push rbp
    ran: list[str] = []
    for name in ("first", "second", "third"):
        kp = Kprobe(addr=A, pre_handler=lambda kp, ctx, n=name: bool(ran.append(n)))
        p.kprobes.append(kp)
    engine.fast = _Chains(p.kprobes)  # type: ignore[assignment]
    names = ["first", "second", "third"]
    if first_gone:
        del p.kprobes[0]
        names = names[1:]
    ctx = frame(A + 1)
    ctx.regs.words[2 + 15] = 2**64 - 1 if recorded is None else 1 << 32 | recorded  # orig_rax
    engine._kprobe_handler(KprobeCtlblk(), ctx)
    done = ["first", "second", "third"][: recorded or 0]
    assert ran == [n for n in names if n not in done]
    assert ctx.regs.orig_rax == 2**64 - 1  # the word is the int3's again
    assert ctx.regs.rip == SLOT_A  # on through the boosted copy
