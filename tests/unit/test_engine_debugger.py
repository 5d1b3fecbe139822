"""The engine's hooks for a debugger beside the probes, with a fake target.

``write_text`` (a debugger's write into probed text), ``step_original``
(a step over a probe site runs the original instruction), ``saved_text``,
and ``run()``'s hold: the guest is stopped for ``hold`` and resumed after.
"""

from __future__ import annotations

from typing import Any

import pytest

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.errors import ProbeError, StubTimeoutError
from qprobes.probes.engine import KprobeEngine
from qprobes.probes.kprobe import Kprobe, ProbePoint
from qprobes.wire.stop import StopReply, parse_stop_reply

A = 0xFFFFFFFF81001000
SLOT = 0xFFFFFFFFFEE20000


class FakeClient:
    def __init__(self, target: FakeTarget) -> None:
        self.target = target
        self.interrupts = 0

    @property
    def running(self) -> bool:
        return self.target.running

    def interrupt(self) -> None:
        self.interrupts += 1
        self.target.stops.append(parse_stop_reply(b"T02thread:01;"))

    def note_stop_thread(self, thread: int) -> None:
        pass


class FakeTarget:
    """Byte memory, one vCPU's rip, and scripted stops."""

    def __init__(self) -> None:
        self.mem: dict[int, int] = {}
        self.rip = A
        self.running = False
        self.stops: list[StopReply] = []
        self.log: list[Any] = []
        self.client = FakeClient(self)

    @property
    def vcpus(self) -> list[int]:
        return [1]

    def read(self, addr: int, length: int, vcpu: int | None = None) -> bytes:
        return bytes(self.mem.get(addr + i, 0) for i in range(length))

    def write(self, addr: int, data: bytes, vcpu: int | None = None) -> None:
        self.log.append(("write", addr, data))
        for i, b in enumerate(data):
            self.mem[addr + i] = b

    def read_register(self, name: str, vcpu: int | None = None) -> int:
        assert name == "rip"
        return self.rip

    def step(self, vcpu: int | None = None, timeout: float | None = None) -> StopReply:
        self.log.append(("step", self.mem.get(self.rip)))
        self.rip += 2
        return parse_stop_reply(b"T05thread:01;")

    def resume(self) -> None:
        assert not self.running
        self.running = True
        self.log.append("resume")

    def wait(self, timeout: float | None = None) -> StopReply:
        if not self.stops:
            raise StubTimeoutError("no stop")
        self.running = False
        return self.stops.pop(0)


def make() -> tuple[KprobeEngine, FakeTarget, ProbePoint]:
    target = FakeTarget()
    engine = KprobeEngine(target, (0x7C00000, 4 << 20), A)  # type: ignore[arg-type]
    code = bytes.fromhex("4154")  # push r12
    target.write(A, b"\xcc\x54")
    insn = x86insn.decode(code, A)
    point = ProbePoint(A, code[0], insn, x86insn.analyze(insn), SLOT, True, [Kprobe(addr=A)],
                       armed=True)  # fmt: skip
    engine.points[A] = point
    engine.points[A + 0x100] = ProbePoint(A + 0x100, 0x90, insn, point.analysis, SLOT + 32,
                                          True, [], armed=False)  # fmt: skip
    target.log.clear()
    return engine, target, point


def test_saved_text_is_the_armed_probes_bytes() -> None:
    engine, _target, _point = make()
    assert engine.saved_text() == {A: 0x41}


def test_a_write_elsewhere_is_a_plain_write() -> None:
    engine, target, _point = make()
    engine.write_text(A + 0x10, b"\x90\x90")
    assert target.log == [("write", A + 0x10, b"\x90\x90")]


def test_a_write_of_the_same_instruction_keeps_the_int3() -> None:
    engine, target, point = make()
    engine.write_text(A - 1, b"\x90\x41\x54")
    assert target.read(A - 1, 3) == b"\x90\xcc\x54"
    assert point.opcode == 0x41 and point.armed and point.slot == SLOT


def test_a_write_gdb_cannot_probe_loses_the_probe(caplog: pytest.LogCaptureFixture) -> None:
    engine, target, point = make()
    engine.write_text(A, b"\xcf")  # iret (32-bit): refused, as Linux refuses it
    assert target.read(A, 1) == b"\xcf"  # the debugger's byte, no int3
    assert point.lost and not point.armed and point.kprobes[0].lost
    assert "a debugger wrote an instruction it cannot run" in (point.kprobes[0].lost_why or "")


def test_a_write_with_no_slot_for_it_loses_the_probe() -> None:
    """The new bytes are in when the slot is sought: with none to be had,
    the probe must not stay on the old slot's copy of the old instruction."""
    engine, target, point = make()

    class NoSlots:
        def get_insn_slot(self) -> int:
            raise ProbeError("out of instruction slots")

    engine._slots = NoSlots()  # type: ignore[assignment]
    engine.write_text(A, b"\x53")  # push rbx: a new instruction, one byte
    assert target.read(A, 2) == b"\x53\x54"  # the debugger's byte, no int3
    assert point.lost and not point.armed and point.kprobes[0].lost
    assert "no slot for the instruction a debugger wrote" in (point.kprobes[0].lost_why or "")


def test_a_write_into_a_disabled_probes_instruction_loses_it() -> None:
    """Disarmed, its slot still holds the old instruction's copy: arming it
    again after the debugger changed the instruction would run that copy."""
    engine, target, _point = make()
    off = engine.points[A + 0x100]
    target.write(A + 0x100, b"\x41\x54")  # push r12, as its slot copy has it
    engine.write_text(A + 0x101, b"\x54")  # the same byte: nothing changes
    assert not off.lost
    engine.write_text(A + 0x101, b"\x55")  # push r13 now
    assert off.lost and not off.armed
    assert target.read(A + 0x100, 2) == b"\x41\x55"


class JournalMem:
    """Physical memory for the journal, telling ``on_write`` of each write."""

    def __init__(self, on_write: Any) -> None:
        self.data: dict[int, int] = {}
        self.on_write = on_write

    def read_phys(self, paddr: int, length: int) -> bytes:
        return bytes(self.data.get(paddr + i, 0) for i in range(length))

    def write_phys(self, paddr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.data[paddr + i] = b
        self.on_write()


@pytest.mark.parametrize("data", [b"\x53\x90", b"\x53", b"\x90"],
                         ids=["instruction", "site byte", "tail byte"])  # fmt: skip
def test_every_moment_of_a_write_into_a_probed_instruction_is_recoverable(data: bytes) -> None:
    """The text went in before the journal had the new saved byte: a
    controller killed in between left an int3 whose record restored the old
    byte in front of the debugger's new bytes (41 90 for 53 90 over 41 54)."""
    engine, target, _point = make()
    where = A if data != b"\x90" else A + 1
    old = target.read(A, 2).replace(b"\xcc", b"\x41")
    new = bytearray(old)
    new[where - A : where - A + len(data)] = data
    recovered: list[bytes] = []

    def after_each_write() -> None:
        # What a recovery from the guest as it is now would leave at A: a
        # site still holding qprobes' int3 gets the journal's byte.
        contents = engine.journal_contents()
        text = bytearray(target.read(A, 2))
        if contents is not None and text[0] == 0xCC:
            saved = {site[0]: site[2] for site in contents.sites}
            if A in saved:
                text[0] = saved[A]
        recovered.append(bytes(text))

    engine.hostmem = JournalMem(after_each_write)  # type: ignore[assignment]
    real_write = target.write

    def write(addr: int, data: bytes, vcpu: int | None = None) -> None:
        real_write(addr, data, vcpu)
        after_each_write()

    target.write = write  # type: ignore[method-assign]
    assert engine.journal is not None
    engine.journal.begin(None, 0, "test")
    engine._journal_site(engine.points[A])  # as _arm recorded it

    class Slots:
        def get_insn_slot(self) -> int:
            return SLOT + 64

        def free_insn_slot(self, slot: int, dirty: bool = False) -> None:
            pass

    engine._slots = Slots()  # type: ignore[assignment]
    recovered.clear()
    engine.write_text(where, data)
    assert recovered, "nothing written"
    assert set(recovered) <= {bytes(old), bytes(new)}, [r.hex() for r in recovered]
    assert recovered[-1] == bytes(new)
    point = engine.points[A]
    assert point.armed and point.slot == SLOT + 64 and target.read(A, 1) == b"\xcc"


def test_a_step_over_a_probe_site_runs_the_original() -> None:
    engine, target, _point = make()
    engine.step_original(1)
    assert ("step", 0x41) in target.log  # the original byte was in place for the step
    assert target.read(A, 1) == b"\xcc"  # and the int3 is back
    # Elsewhere nothing is swapped.
    target.log.clear()
    engine.step_original(1)
    assert [e for e in target.log if e[0] == "write"] == []


def test_a_step_that_never_ends_is_interrupted() -> None:
    engine, target, _point = make()

    def halted(vcpu: int | None = None, timeout: float | None = None) -> StopReply:
        target.running = True  # the step went out, its vCPU halted
        raise StubTimeoutError("no stop reply")

    target.step = halted  # type: ignore[method-assign]
    stop = engine.step_original(1, step_timeout=0.01)
    assert stop.signal == 2 and target.client.interrupts == 1 and not target.running
    assert target.read(A, 1) == b"\xcc"


def test_run_holds_the_guest_stopped_for_the_debugger() -> None:
    engine, target, _point = make()
    engine.attached = True
    held: list[tuple[StopReply | None, bool]] = []

    def hold(stop: StopReply | None) -> None:
        held.append((stop, target.running))

    engine.hold = hold
    engine.hold_requested = True
    polls = {"n": 0}

    def until() -> bool:
        polls["n"] += 1
        return polls["n"] > 3

    engine.run(until=until, poll=0.001)
    assert len(held) == 1
    stop, running = held[0]
    assert stop is not None and stop.signal == 2 and not running  # stopped by an interrupt
    assert not engine.hold_requested
    assert target.log.count("resume") >= 2  # run's own, and again after the hold
