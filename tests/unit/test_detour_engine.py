"""The engine's side of detours with a fake target (no guest): the order of
the writes that put the jump in and take it out (``text_poke_bp()``'s), the
wait for nothing inside the window before the jump, a fault in a detour
buffer reported at the original instruction, a hit a detour handed to the
host going on through the relocated window, and the lost-probe check
expecting the jump's first byte."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import pytest

from qprobes.arch.x86_64 import detour as D
from qprobes.arch.x86_64 import insn as X
from qprobes.probes.kprobe import Kprobe, KprobeCtlblk, KprobeStatus, ProbePoint
from qprobes.probes.slots import SlotAllocator
from qprobes.probes.stubs import ACTION_CHAIN, Stubs
from tests.unit.test_engine_states import SLOT_A, frame, make_engine

A = 0xFFFFFFFF81001000
BUF = 0xFFFFFFFF83B90000  # the first detour buffer
REC = 0xFFFFFFFF83BB3000
BP_OURS = 0xFFFFFFFF83A00100
# push r12; mov r12, rsi; push rbp (do_sys_openat2+5: a 5-byte window of two)
CODE = bytes.fromhex("4154 4989f4 55")


class Writes:
    """The fake target's memory, logging each write."""

    def __init__(self, target: Any) -> None:
        self.log: list[tuple[int, bytes]] = []
        real = target.write

        def write(addr: int, data: bytes) -> None:
            self.log.append((addr, bytes(data)))
            real(addr, data)

        target.write = write


@dataclass
class _Rec:
    address: int


@dataclass
class _Installed:
    recorder: _Rec


class FakeFast:
    def __init__(self) -> None:
        self.installed = {A: [_Installed(_Rec(REC))]}

    def word(self, point: ProbePoint | None) -> int:
        return 1

    def entry_of(self, point: ProbePoint | None) -> int | None:
        return REC

    def detour_refusal(self, point_addr: int) -> str | None:
        return None

    def chain_recorded(self, orig_ax: int) -> tuple[Kprobe, ...]:
        return ()

    def write_word(self, index: int, point: ProbePoint | None) -> None:
        pass


def detoured_engine(code: bytes = CODE) -> tuple[Any, Any, ProbePoint, Kprobe]:
    engine, target = make_engine()
    target.write(A, code)
    target.write(A, b"\xcc")  # the armed int3
    insn = X.decode(code, A)
    kp = Kprobe(addr=A)
    point = ProbePoint(A, code[0], insn, X.analyze(insn), SLOT_A, True, [kp], armed=True)
    engine.points[A] = point
    engine._detour_buffers = SlotAllocator(D.DETOUR_SIZE, 400, 415,
                                           lambda i: BUF + (i - 400) * 4096,
                                           lambda i: None)  # fmt: skip
    engine._stubs = Stubs(b"", {"qp_bp_ours": BP_OURS})
    engine._kernel_selectors = (0x10, 0x18)
    engine.fast = FakeFast()
    window = D.Window(tuple(X.decode_function(code[:5], A)))
    engine._detour_window = lambda p: window
    return engine, target, point, kp


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")
def test_the_jump_goes_in_tail_first_after_the_window_is_empty() -> None:
    engine, target, _point, kp = detoured_engine()
    writes = Writes(target)
    waited: list[list[tuple[int, int]]] = []
    engine._wait_out_of = lambda ranges, what: waited.append(ranges) or writes.log.append((0, b""))
    assert engine.optimize(kp) and kp.detoured and kp.detour_refused is None
    jump = D.jump_bytes(A, BUF)
    buffer_write, wait, tail, head = writes.log
    assert buffer_write[0] == BUF and len(buffer_write[1]) == D.DETOUR_SIZE
    assert wait == (0, b"")
    # Nothing in the window's bytes 1..4, nor in the boosted slot, whose jmp
    # back lands inside a window of two instructions.
    assert waited == [[(A + 1, A + 5), (SLOT_A, SLOT_A + X.SLOT_SIZE)]]
    assert tail == (A + 1, jump[1:]) and head == (A, jump[:1])
    assert target.read(A, 5) == jump
    assert engine.check_lost() == []  # the jump's e9 is what a detoured point holds


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")
def test_a_window_ending_in_a_one_byte_instruction_waits_on_its_end_too() -> None:
    """push r15; push r14; push rbp: a probe on the push rbp, just removed,
    can leave a #BP frame whose rip is its byte + 1, the window's end; the
    answer to that hit sends the vCPU back to the byte, inside the jump."""
    code = bytes.fromhex("4157 4156 55")
    engine, _target, _point, kp = detoured_engine(code)
    waited: list[list[tuple[int, int]]] = []
    engine._wait_out_of = lambda ranges, what: waited.append(ranges)
    assert engine.optimize(kp), kp.detour_refused
    assert waited[0][0] == (A + 1, A + 6)


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")
def test_the_jump_comes_out_int3_first_then_the_original_tail() -> None:
    engine, target, point, kp = detoured_engine()
    engine._wait_out_of = lambda ranges, what: None
    engine.optimize(kp)
    writes = Writes(target)
    engine._disarm(point)
    assert writes.log == [(A, b"\xcc"), (A + 1, CODE[1:5]), (A, CODE[:1])]
    assert target.read(A, len(CODE)) == CODE
    assert not kp.detoured and A not in engine.detours
    # The buffer is dirty: handed out again only once nothing points into it.
    assert engine._detour_buffers.dirty_slots() == [BUF]


def test_a_refusal_leaves_the_int3_and_says_why() -> None:
    engine, target, _point, kp = detoured_engine()
    engine._detour_window = lambda p: (_ for _ in ()).throw(D.DetourError(A, "nope"))
    writes = Writes(target)
    assert not engine.optimize(kp)
    assert kp.detour_refused == "nope" and not kp.detoured and writes.log == []


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")
def test_a_task_that_stays_inside_the_window_keeps_the_int3() -> None:
    engine, target, _point, kp = detoured_engine()

    def stuck(ranges: list[tuple[int, int]], what: str) -> None:
        raise D.DetourError(A, "something stayed inside the window for 3 s (vCPU 2 is at ...)")

    engine._wait_out_of = stuck
    writes = Writes(target)
    assert not engine.optimize(kp)
    assert "stayed inside" in (kp.detour_refused or "")
    assert all(addr >= BUF for addr, _ in writes.log)  # only the buffer was written
    assert target.read(A, 1) == b"\xcc"
    assert engine._detour_buffers.dirty_slots() == []  # never used: clean again


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")
def test_faults_and_handed_over_hits_in_a_detour() -> None:
    engine, target, point, kp = detoured_engine()
    engine._wait_out_of = lambda ranges, what: None
    engine.optimize(kp)
    det = engine.detours[A]
    # A hit the detour's recorder handed over (its ring was full) goes on
    # through the relocated window, not the boosted slot.
    kcb = KprobeCtlblk()
    hit = frame(A + 1)
    engine._kprobe_handler(kcb, hit)
    assert hit.regs.rip == det.code.reloc and kcb.status is KprobeStatus.NONE
    # A fault at the second relocated instruction is the original's.
    second = det.code.copies[1][0]
    fault = frame(second)
    engine._kprobe_fault_handler(KprobeCtlblk(), fault, 14)
    assert fault.regs.rip == A + 2 and fault.regs.action == ACTION_CHAIN
    # The guest rewrote the jump: lost, nothing written back.
    target.write(A, b"\x0f")
    assert engine.check_lost() == [point]
    assert A not in engine.detours and kp.lost
