"""The per-CPU frame record the stubs leave for the host (no guest).

Issue 7 item 10: an interrupt taken inside the kretprobe trampoline, between
its record write and its doorbell store, hit a kprobe whose #BP stub wrote
the same CPU's record. At the trampoline's doorbell the record named that
stale (already answered) #BP frame; the host fell back to the registers for
the frame, but still wrote its answer to the stale frame's address, so the
trampoline rang again, unanswered, and was handled a second time.
"""

from __future__ import annotations

import struct

from qprobes.probes.context import PtRegs
from qprobes.probes.engine import KprobeEngine
from qprobes.probes.stubs import (
    ACTION_RETURN,
    FRAME_WORDS,
    KRETPROBE_VECTOR,
    PERCPU_STRIDE,
    VAR_PERCPU,
)
from qprobes.target.paging import Translation
from tests.unit.test_engine_states import A, FakeTarget

VARS_PHYS = 0x7C02000
STALE_BP_FRAME = 0xFFFFC90000003DD8  # on the IRQ stack
TRAMP_FRAME = 0xFFFFC900003F3CE8  # on the task stack
CR3 = 0x1000


class FakeHostMem:
    """Guest-physical memory where physical = virtual & 0xffffffff."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}
        self.phys_writes: list[int] = []
        self.virt_writes: list[int] = []

    def read_phys(self, paddr: int, length: int) -> bytes:
        return bytes(self.bytes.get(paddr + i, 0) for i in range(length))

    def write_phys(self, paddr: int, data: bytes) -> None:
        self.phys_writes.append(paddr)
        for i, b in enumerate(data):
            self.bytes[paddr + i] = b

    def translate(self, cr3: int, vaddr: int, la57: bool = False) -> Translation:
        return Translation(vaddr, vaddr & 0xFFFFFFFF, 4096, ())

    def read_virt(self, cr3: int, vaddr: int, length: int, la57: bool = False) -> bytes:
        return self.read_phys(vaddr & 0xFFFFFFFF, length)

    def write_virt(self, cr3: int, vaddr: int, data: bytes, la57: bool = False) -> None:
        self.virt_writes.append(vaddr)
        for i, b in enumerate(data):
            self.bytes[(vaddr & 0xFFFFFFFF) + i] = b


def test_a_stale_record_does_not_take_the_answer() -> None:
    engine = KprobeEngine(FakeTarget(), (0x7C00000, 4 << 20), A)  # type: ignore[arg-type]
    hostmem = FakeHostMem()
    engine.hostmem = hostmem  # type: ignore[assignment]
    engine._vars_phys = VARS_PHYS
    # vCPU 1's record names the #BP frame the interrupt handler's hit used;
    # that frame was answered already (action = return).
    record = VARS_PHYS + VAR_PERCPU + PERCPU_STRIDE * 0
    hostmem.write_phys(record, struct.pack("<QQQ", STALE_BP_FRAME, 0, CR3))
    stale = [ACTION_RETURN, 3] + [0] * (FRAME_WORDS - 2)
    hostmem.write_phys(STALE_BP_FRAME & 0xFFFFFFFF, struct.pack(f"<{FRAME_WORDS}Q", *stale))
    hostmem.phys_writes.clear()
    assert engine._locate_frame_fast(1) is None  # the host then reads the registers
    # The trampoline frame found through rsp gets the answer, not the stale one.
    words = [0, KRETPROBE_VECTOR] + [0] * (FRAME_WORDS - 2)
    frame = PtRegs(words)
    frame.action = ACTION_RETURN
    engine._write_frame(TRAMP_FRAME, frame, CR3, False)
    answered = struct.unpack("<Q", hostmem.read_phys(TRAMP_FRAME & 0xFFFFFFFF, 8))[0]
    assert answered == ACTION_RETURN
    assert hostmem.virt_writes == [TRAMP_FRAME]
    assert hostmem.phys_writes == []
    stale_now = struct.unpack("<Q", hostmem.read_phys(STALE_BP_FRAME & 0xFFFFFFFF, 8))[0]
    assert stale_now == ACTION_RETURN


class StopClient:
    def __init__(self) -> None:
        self.noted: list[int] = []

    def note_stop_thread(self, vcpu: int) -> None:
        self.noted.append(vcpu)


class RipTarget:
    def __init__(self, rip: int) -> None:
        self.rip = rip
        self.vcpus = [1, 2]
        self.client = StopClient()

    def read_register(self, name: str, vcpu: int) -> int:
        assert name == "rip"
        return self.rip


def test_a_watch_stop_at_an_address_nobody_watches_is_not_foreign() -> None:
    """QEMU once reported ``watch:<user address>`` with only the doorbell
    watched: it is taken like a stop with no watch field (spurious, or a
    doorbell if the vCPU sits on a doorbell store), never an unexpected stop."""
    from qprobes.wire.stop import parse_stop_reply

    engine = KprobeEngine(RipTarget(0xFFFFFFFF81000000), (0x7C00000, 4 << 20), A)  # type: ignore[arg-type]
    engine._doorbell = 0xFFFFFFFFFEE01000
    stop = parse_stop_reply(b"T05thread:p01.02;watch:000055fa8e93b53f;")
    assert stop.watch_addr == 0x55FA8E93B53F
    assert engine._bare_trap_stop(stop, 2) and engine._spurious
    assert engine.stats.spurious == 1
    engine._ret_kind = {0xFFFFFFFF81000000: 3}  # the vCPU is on a doorbell store
    assert engine._bare_trap_stop(stop, 2) and not engine._spurious


def test_the_record_carries_the_tsc_of_the_hit() -> None:
    """The stubs store rdtsc in the record's fourth word; the hit's context
    gets it (the guest's trace clock is computed from it)."""
    from qprobes.probes.stubs import RECORD_TSC, StubLayout, stub_source

    engine = KprobeEngine(FakeTarget(), (0x7C00000, 4 << 20), A)  # type: ignore[arg-type]
    hostmem = FakeHostMem()
    engine.hostmem = hostmem  # type: ignore[assignment]
    engine._vars_phys = VARS_PHYS
    record = VARS_PHYS + VAR_PERCPU + PERCPU_STRIDE * 1  # vCPU 2
    tsc = 0x1234_5678_9ABC
    hostmem.write_phys(record, struct.pack("<QQQQ", TRAMP_FRAME, 0xFFFF88801F600000, CR3, tsc))
    words = [0, 3] + [0] * (FRAME_WORDS - 2)
    hostmem.write_phys(TRAMP_FRAME & 0xFFFFFFFF, struct.pack(f"<{FRAME_WORDS}Q", *words))
    located = engine._locate_frame_fast(2)
    assert located is not None
    assert located[0] == TRAMP_FRAME and located[-1] == tsc
    layout = StubLayout(0x1000, 0x2000, 0x3000, 0x4000, 0x10000, 0x20000)
    assert f"rdtsc\n    shl rdx, 32\n    or rax, rdx\n    mov [rbx + {RECORD_TSC}], rax" in (
        stub_source(layout)
    )


def test_without_host_memory_the_tsc_comes_from_the_record_by_the_gdbstub() -> None:
    class VcpuTarget(FakeTarget):
        def read(self, addr: int, length: int, vcpu: int | None = None) -> bytes:
            return super().read(addr, length)

    target = VcpuTarget()
    engine = KprobeEngine(target, (0x7C00000, 4 << 20), A)  # type: ignore[arg-type]
    engine._vars = 0xFFFFFFFFFEE02000
    record = engine._vars + VAR_PERCPU + PERCPU_STRIDE * 0
    target.write(record, struct.pack("<QQQQ", TRAMP_FRAME, 0, CR3, 777))
    assert engine._record_tsc(1, TRAMP_FRAME) == 777
    assert engine._record_tsc(1, STALE_BP_FRAME) is None  # the record is another frame's
