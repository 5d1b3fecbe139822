"""GdbClient against a real qemu-system-x86_64 stopped at reset (no guest
kernel: the BIOS reset state is enough). One QEMU per module, two vCPUs.

At reset the CPU is in real mode with paging off, so virtual addresses are
physical ones; the tests write a two-instruction loop into RAM and point
cs:rip at it when they need the guest to run.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qprobes.errors import MemoryAccessError, StubTimeoutError, TargetRunningError
from qprobes.remote.client import BreakpointType, GdbClient
from qprobes.wire.stop import GDB_SIGNAL_INT, GDB_SIGNAL_TRAP, StopKind, ThreadId, WatchKind

pytestmark = pytest.mark.vm

LOOP_ADDR = 0x1000
DOORBELL = 0x2000
# mov [0x2000], al (16-bit moffs form) ; jmp back to the mov
LOOP_CODE = bytes.fromhex("a20020ebfb")


class Qemu:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.socket = workdir / "gdb.sock"
        self.log = workdir / "qemu.log"
        self.cmdline = [
            binary,
            "-S",
            "-nographic",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64M",
            "-smp",
            "2",
            "-accel",
            "tcg",
            "-gdb",
            f"unix:{self.socket},server=on,wait=off",
        ]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.cmdline, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"QEMU did not open its gdb socket\ncommand: {' '.join(self.cmdline)}\n"
                    f"output:\n{self.log.read_text(errors='replace')}",
                    pytrace=False,
                )
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def qemu(qemu_binary: str) -> Iterator[Qemu]:
    with tempfile.TemporaryDirectory(prefix="qprobes-rsp-") as workdir:
        machine = Qemu(qemu_binary, Path(workdir))
        try:
            machine.wait_ready()
            yield machine
        finally:
            machine.stop()


@pytest.fixture
def client(qemu: Qemu) -> Iterator[GdbClient]:
    c = GdbClient.connect(str(qemu.socket), timeout=10.0)
    try:
        yield c
    finally:
        if c.running:
            c.interrupt()
            c.wait_stop()
        c.close()


def run_loop_setup(client: GdbClient) -> None:
    """Put vCPU 0 on LOOP_CODE (real mode: cs base = selector << 4)."""
    client.select_thread("g", 1)
    client.set_phys_mem_mode(False)
    client.write_memory(LOOP_ADDR, LOOP_CODE)
    client.set_reg("cs", 0)
    client.set_reg("rip", LOOP_ADDR)


def test_handshake(client: GdbClient) -> None:
    assert client.packet_size == 0x1000
    assert client.supported.get("qXfer:features:read") is True
    assert client.multiprocess
    assert client.layout.g_size == 608
    assert client.layout["rip"].regnum == 16
    assert client.layout["eflags"].offset_in_g == 136
    assert client.layout.architecture == "i386:x86-64"
    assert {"c", "s"} <= client.vcont_actions
    assert client.initial_stop.kind is StopKind.SIGNAL
    assert client.initial_stop.thread is not None
    assert client.initial_stop.thread.pid == 1
    assert not client.conn.no_ack  # QEMU 7.2 does not offer QStartNoAckMode


def test_saved_target_description_matches(client: GdbClient) -> None:
    data = Path(__file__).parents[1] / "unit" / "data" / "qemu-7.2-x86_64"
    for name, text in client.target_xml.items():
        assert (data / name).read_bytes() == text, name


def test_registers_round_trip(client: GdbClient) -> None:
    client.select_thread("g", 1)
    g = client.read_registers()
    assert len(g) == 608
    rax = client.layout["rax"]
    # Outside long mode QEMU keeps only the low 32 bits of a GPR write.
    client.write_register(rax.regnum, (0x12345678).to_bytes(8, "little"))
    assert client.read_register(rax.regnum) == (0x12345678).to_bytes(8, "little")
    g = client.read_registers()
    assert g[rax.offset_in_g : rax.offset_in_g + 8] == (0x12345678).to_bytes(8, "little")
    client.set_reg("rbx", 0xCAFE)
    assert client.get_reg("rbx") == 0xCAFE
    eflags = client.layout["eflags"]
    assert len(client.read_register(eflags.regnum)) == 4


def test_memory_round_trip(client: GdbClient) -> None:
    client.set_phys_mem_mode(False)
    data = bytes((i * 37 + 11) & 0xFF for i in range(5000))  # crosses 1 KiB and 2 KiB chunks
    client.write_memory(0x10000, data)
    assert client.read_memory(0x10000, 5000) == data
    assert client.read_memory(0x10000 + 1023, 3) == data[1023:1026]


def test_phys_mode_toggle(client: GdbClient) -> None:
    client.set_phys_mem_mode(True)
    client.write_memory(0x20000, b"physical")
    client.set_phys_mem_mode(False)
    assert client.read_memory(0x20000, 8) == b"physical"  # paging is off at reset
    assert client.monitor("info registers").count("CR0=") >= 1


def test_pipelined_writes(client: GdbClient) -> None:
    client.set_phys_mem_mode(False)
    writes = [(0x30000 + 0x100 * i, bytes([i]) * 16) for i in range(40)]
    client.write_memory_many(writes)
    for addr, data in writes:
        assert client.read_memory(addr, 16) == data


def test_memory_error(client: GdbClient) -> None:
    client.set_phys_mem_mode(False)
    with pytest.raises(MemoryAccessError) as info:
        client.read_memory(0xFFFFFFFFFFFF0000, 16)
    assert info.value.addr == 0xFFFFFFFFFFFF0000
    assert client.read_memory(0x10000, 1)  # still in step


def test_x_packet_is_not_implemented(client: GdbClient) -> None:
    assert client.conn.request(b"X10000,0:") == b""


def test_watchpoint_stop(client: GdbClient) -> None:
    run_loop_setup(client)
    client.insert_breakpoint(BreakpointType.WRITE, DOORBELL, 1)
    try:
        client.cont()
        stop = client.wait_stop(10)
        assert stop.signal == GDB_SIGNAL_TRAP
        assert stop.watch_kind is WatchKind.WATCH
        assert stop.watch_addr == DOORBELL
        assert stop.thread == ThreadId(1, 1)
        # TCG reports the stop after the store: rip is past the mov.
        assert client.get_reg("rip") == LOOP_ADDR + 3
        client.cont()
        assert client.wait_stop(10).watch_addr == DOORBELL
    finally:
        client.remove_breakpoint(BreakpointType.WRITE, DOORBELL, 1)


def test_interrupt_then_continue(client: GdbClient) -> None:
    run_loop_setup(client)
    for _ in range(2):
        client.cont()
        time.sleep(0.05)
        with pytest.raises(TargetRunningError):
            client.read_registers()
        client.interrupt()
        stop = client.wait_stop(10)
        assert stop.signal == GDB_SIGNAL_INT
        assert stop.thread is not None and stop.thread.tid == 1
        assert client.get_reg("rip") in (LOOP_ADDR, LOOP_ADDR + 3)


def test_step(client: GdbClient) -> None:
    run_loop_setup(client)
    client.step(1)
    stop = client.wait_stop(10)
    assert stop.signal == GDB_SIGNAL_TRAP
    assert stop.thread == ThreadId(1, 1)
    assert client.get_reg("rip") == LOOP_ADDR + 3
    client.step()
    client.wait_stop(10)
    assert client.get_reg("rip") == LOOP_ADDR


def test_monitor(client: GdbClient) -> None:
    text = client.monitor("info registers")
    assert "IDT=" in text and "GDT=" in text
    assert "\r" not in text


def test_threads(client: GdbClient) -> None:
    assert client.thread_ids() == [1, 2]
    client.select_thread("g", 2)
    assert client.get_reg("rip") == 0xFFF0  # the second vCPU waits for SIPI at reset
    client.select_thread("g", 1)


def test_sstep_flags(client: GdbClient) -> None:
    assert client.sstep_bits() == {"ENABLE": 1, "NOIRQ": 2, "NOTIMER": 4}
    before = client.get_sstep_flags()
    try:
        client.set_sstep_flags(1)
        assert client.get_sstep_flags() == 1
    finally:
        client.set_sstep_flags(before)
    assert client.get_sstep_flags() == before


def test_step_keeps_other_vcpus_stopped(client: GdbClient) -> None:
    # vCPU 0 runs "inc word [0x2000]; jmp back", so the counter shows
    # whether it ran. vCPU 1 waits for SIPI: a step of it never finishes.
    counter_code = bytes.fromhex("ff060020ebfa")
    client.select_thread("g", 1)
    client.set_phys_mem_mode(False)
    client.write_memory(LOOP_ADDR, counter_code)
    client.write_memory(DOORBELL, bytes(2))
    client.set_reg("cs", 0)
    client.set_reg("rip", LOOP_ADDR)

    def counter() -> int:
        return int.from_bytes(client.read_memory(DOORBELL, 2), "little")

    client.step(2)  # vCont;s:p1.2: only vCPU 1 is resumed
    with pytest.raises(StubTimeoutError):
        client.wait_stop(0.2)
    client.interrupt()
    client.wait_stop(10)
    assert counter() == 0  # vCPU 0 never ran

    client.step(1)
    client.wait_stop(10)
    assert counter() == 1  # exactly one instruction of vCPU 0

    # The legacy 's' (what step() falls back to without vCont) steps the Hc
    # vCPU but resumes every other one.
    actions = client.vcont_actions
    client.vcont_actions = frozenset()
    try:
        client.step(2)
        time.sleep(0.1)
        client.interrupt()
        client.wait_stop(10)
    finally:
        client.vcont_actions = actions
    assert counter() != 1  # vCPU 0 ran meanwhile


def test_reconnect_while_running(qemu: Qemu) -> None:
    # QEMU stops a running guest when a client connects and sends an
    # unsolicited T02 first; the handshake must step over it.
    first = GdbClient.connect(str(qemu.socket))
    run_loop_setup(first)
    first.cont()
    first.close()
    time.sleep(0.05)
    with GdbClient.connect(str(qemu.socket)) as second:
        assert not second.running
        assert second.layout.g_size == 608
        assert second.read_memory(LOOP_ADDR, len(LOOP_CODE)) == LOOP_CODE
