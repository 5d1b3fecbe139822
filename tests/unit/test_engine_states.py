"""The engine's per-vCPU state machine with a fake target (no guest).

Mirrors the paths of 2.6's kprobe_handler/post_kprobe_handler that are hard
to reach on a real guest: a probe hit while the same vCPU steps another
(KPROBE_REENTER), an int3 reported after its probe went away, a foreign
int3, and a #DB that is not qprobes'.
"""

from __future__ import annotations

import struct

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.probes.context import HitContext, PtRegs
from qprobes.probes.engine import KprobeEngine
from qprobes.probes.kprobe import Kprobe, KprobeCtlblk, KprobeStatus, ProbePoint
from qprobes.probes.stubs import ACTION_CHAIN, ACTION_RETURN, FRAME_WORDS

TF, IF = 0x100, 0x200
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
    assert hit_b.regs.rip == SLOT_B
    assert calls == ["pre A"]

    step_b = frame(SLOT_B + 3, eflags=0x2 | TF)
    engine._post_kprobe_handler(kcb, step_b)
    assert step_b.regs.rip == B + 3
    assert kcb.status is KprobeStatus.HIT_SS and kcb.current is pa  # A restored
    assert calls == ["pre A"]  # no post_handler for a reentered probe

    step_a = frame(SLOT_A + 3, eflags=0x2 | TF)
    engine._post_kprobe_handler(kcb, step_a)
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
    engine._post_kprobe_handler(KprobeCtlblk(), ctx)
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
    engine._post_kprobe_handler(kcb, step)
    assert struct.unpack("<Q", target.read(STACK - 8, 8))[0] == IF | 0x2
    assert step.regs.rip == A + 1 and step.regs.action != ACTION_CHAIN
    assert ACTION_RETURN == 1
