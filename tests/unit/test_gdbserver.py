"""The gdb endpoint's packet handling, against a fake guest (no QEMU).

A test plays gdb on a Unix socket: it sends framed packets, runs the
server's hooks as the engine's run loop would (``poll`` while the guest
runs, ``hold`` once a hold was requested) and reads the replies.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from qprobes.errors import MemoryAccessError
from qprobes.frontends.gdbserver import (
    GdbServer,
    GdbServerError,
    Listen,
    hide_probes,
    monitor_refusal,
    parse_listen,
    readable_length,
)
from qprobes.wire.packet import Interrupt, Packet, PacketDecoder, decode_hex, encode_hex, frame
from qprobes.wire.stop import StopReply, parse_stop_reply
from qprobes.wire.threads import ThreadId

TEXT = 0xFFFF_FFFF_8100_0000
AREA = (0xFFFF_FFFF_8300_0000, 0xFFFF_FFFF_8320_0000)
TRAMP = AREA[0] + 0x872
STACK = 0xFFFF_C900_0000_0000


class FakeGuest:
    """What the server asks of the guest, in memory."""

    def __init__(self) -> None:
        self.memory: dict[int, int] = {}
        for i, b in enumerate(bytes.fromhex("0f1f440000cc5449")):
            self.memory[TEXT + i] = b  # an int3 at TEXT+5 (the probe's), saved byte 0x41
        self.memory.update({STACK + i: b for i, b in enumerate(TRAMP.to_bytes(8, "little"))})
        self.saved = {TEXT + 5: 0x41}
        self.returns = {STACK: (TRAMP, TEXT + 0x123)}
        self.regs = {1: bytearray(range(16)) * 38, 2: bytearray(608)}
        self.rips = {1: TEXT, 2: TEXT + 0x40}
        self.points: list[tuple[int, int, int]] = []
        self.writes: list[tuple[int, int, bytes]] = []
        self.steps: list[int] = []
        self.parks = 0
        self.monitored: list[str] = []

    def threads(self) -> list[int]:
        return [1, 2]

    def target_xml(self) -> dict[str, bytes]:
        return {"target.xml": b"<target>" + b"x" * 3000 + b"</target>"}

    def read_registers(self, thread: int) -> bytes:
        return bytes(self.regs[thread])

    def write_registers(self, thread: int, data: bytes) -> None:
        self.regs[thread] = bytearray(data)

    def read_register(self, thread: int, regnum: int) -> bytes:
        return bytes(self.regs[thread][8 * regnum : 8 * regnum + 8])

    def write_register(self, thread: int, regnum: int, value: bytes) -> None:
        self.regs[thread][8 * regnum : 8 * regnum + 8] = value

    def rip_register(self) -> tuple[int, int]:
        return 16, 128  # as in QEMU's x86_64 layout (and this fake's 8 bytes a register)

    def rip(self, thread: int) -> int:
        return self.rips[thread]

    def read_memory(self, thread: int, addr: int, length: int) -> bytes:
        out = bytearray()
        for a in range(addr, addr + length):
            if a not in self.memory:
                raise MemoryAccessError(b"m", 0x14, a, 1, bytes(out))
            out.append(self.memory[a])
        return bytes(out)

    def write_memory(self, thread: int, addr: int, data: bytes) -> None:
        self.writes.append((thread, addr, data))

    def saved_text(self) -> dict[int, int]:
        return dict(self.saved)

    def hidden_ranges(self) -> list[tuple[int, int]]:
        return [AREA]

    def return_addresses(self) -> dict[int, tuple[int, int]]:
        return dict(self.returns)

    def insert_point(self, type: int, addr: int, kind: int) -> None:
        self.points.append((type, addr, kind))

    def remove_point(self, type: int, addr: int, kind: int) -> None:
        self.points.remove((type, addr, kind))

    def monitor(self, command: str) -> str:
        self.monitored.append(command)
        return "VM status: paused (debug)\n"

    def park(self) -> None:
        self.parks += 1

    def step(self, thread: int) -> StopReply:
        self.steps.append(thread)
        return parse_stop_reply(b"T05thread:%02x;" % thread)


class Gdb:
    """The test's side of the connection."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(2.0)
        self.decoder = PacketDecoder()
        self.acks = 0
        self.queue: list[bytes] = []

    def send(self, *payloads: bytes) -> None:
        self.sock.sendall(b"".join(frame(p) for p in payloads))

    def interrupt(self) -> None:
        self.sock.sendall(b"\x03")

    def replies(self, count: int) -> list[bytes]:
        while len(self.queue) < count:
            data = self.sock.recv(65536)
            if not data:
                break
            for event in self.decoder.feed(data):
                if isinstance(event, Packet):
                    self.queue.append(event.payload)
                elif not isinstance(event, Interrupt):
                    self.acks += 1
        out, self.queue = self.queue[:count], self.queue[count:]
        return out

    def reply(self) -> bytes:
        (one,) = self.replies(1)
        return one

    def eof(self) -> bool:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                for event in self.decoder.feed(data):
                    if isinstance(event, Packet):
                        self.queue.append(event.payload)
        except TimeoutError:
            return False


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.guest = FakeGuest()
        self.holds = 0
        self.stopping = False
        self.server = GdbServer(self.guest, Listen(path=str(tmp / "gdb.sock")),
                                request_hold=self.request,
                                stopping=lambda: self.stopping)  # fmt: skip
        self.gdb = Gdb(str(tmp / "gdb.sock"))
        self.server.poll(True)  # accepts
        assert self.server.connected

    def request(self) -> None:
        self.holds += 1

    def poll(self) -> None:
        # The packets sent so far are in the socket: give them a moment.
        import select

        select.select([self.server._peer.sock], [], [], 0.5)  # type: ignore[union-attr]
        self.server.poll(True)

    def held(self, *payloads: bytes, stop: StopReply | None = None) -> None:
        """Send packets (the last one resumes or detaches), then serve them held."""
        self.gdb.send(*payloads)
        self.poll()
        self.server.hold(stop)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.server.close()


INTERRUPTED = parse_stop_reply(b"T02thread:01;")


def attach(rig: Rig) -> None:
    """gdb's opening: ``?`` needs the guest stopped."""
    rig.gdb.send(b"qSupported:multiprocess+;swbreak+", b"QStartNoAckMode", b"?")
    rig.poll()
    assert rig.gdb.replies(2) == [
        b"PacketSize=1000;qXfer:features:read+;QStartNoAckMode+;vContSupported+", b"OK"]
    assert rig.holds == 1  # '?' waits for a hold


# --- pure parts -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    ("localhost:1234", Listen(host="localhost", port=1234)),
    (":0", Listen(host="127.0.0.1", port=0)),
    ("[::1]:9", Listen(host="::1", port=9)),
    ("unix:/tmp/qp.sock", Listen(path="/tmp/qp.sock")),
    ("/tmp/qp.sock", Listen(path="/tmp/qp.sock")),
])  # fmt: skip
def test_parse_listen(text: str, want: Listen) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["localhost", "host:99999", "host:x", "unix:", ""])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(GdbServerError, match="--gdb-listen"):
        parse_listen(text)


@pytest.mark.parametrize(("addr", "length", "want"), [
    (0x1000, 0x10, 0x10),  # nowhere near
    (0x1FF0, 0x20, 0x10),  # stops where the area begins
    (0x2000, 0x10, 0),  # inside
    (0x2FF8, 0x10, 0),  # inside, running out of it
    (0x3000, 0x10, 0x10),  # just after
])  # fmt: skip
def test_readable_length(addr: int, length: int, want: int) -> None:
    assert readable_length(addr, length, [(0x2000, 0x3000)]) == want


def test_hide_probes_puts_saved_bytes_back() -> None:
    data = bytes.fromhex("0f1f440000cc5449")
    assert hide_probes(0x100, data, {0x105: 0x41, 0x200: 0x90}, {}) == bytes.fromhex(
        "0f1f440000415449")
    # A read that starts at the site, and one that ends before it.
    assert hide_probes(0x105, b"\xcc", {0x105: 0x41}, {}) == b"\x41"
    assert hide_probes(0x100, data[:5], {0x105: 0x41}, {}) == data[:5]


def test_hide_probes_shows_real_return_addresses() -> None:
    tramp, real = 0xFFFFFFFF83A00872, 0xFFFFFFFF81147ABC
    stack = b"\x11" * 8 + tramp.to_bytes(8, "little") + b"\x22" * 8
    returns = {0x1008: (tramp, real)}
    shown = hide_probes(0x1000, stack, {}, returns)
    assert shown[8:16] == real.to_bytes(8, "little")
    assert shown[:8] == stack[:8] and shown[16:] == stack[16:]
    # Half the slot, from either side.
    assert hide_probes(0x100C, stack[12:], {}, returns)[:4] == real.to_bytes(8, "little")[4:]
    assert hide_probes(0x1000, stack[:12], {}, returns)[8:] == real.to_bytes(8, "little")[:4]
    # A slot that no longer holds the trampoline is shown as it is.
    other = b"\x33" * 24
    assert hide_probes(0x1000, other, {}, returns) == other


@pytest.mark.parametrize(("command", "refused"), [
    ("system_reset", True), ("quit", True), ("q", True), ("loadvm snap1", True),
    ("stop", True), ("cont", True), ("c", True), ("gdbserver tcp::1", True),
    ("info registers", False), ("x/4x 0", False), ("", False), ("info status", False),
])  # fmt: skip
def test_monitor_refusal(command: str, refused: bool) -> None:
    why = monitor_refusal(command)
    assert (why is not None) == refused
    if why is not None:
        assert command.split()[0] in why and "refused" in why


# --- packets ------------------------------------------------------------------------


def test_opening_and_halt_reason(rig: Rig) -> None:
    attach(rig)
    rig.gdb.send(b"c")
    rig.server.hold(INTERRUPTED)
    # Not waiting for a stop yet: the reply to '?' says why the guest is stopped.
    assert rig.gdb.reply() == b"T02thread:01;"
    assert rig.guest.parks == 1


def test_acks_until_no_ack_mode(rig: Rig) -> None:
    rig.gdb.send(b"qSupported")
    rig.poll()
    rig.gdb.reply()
    assert rig.gdb.acks == 1
    rig.gdb.send(b"QStartNoAckMode", b"vCont?")
    rig.poll()
    assert rig.gdb.replies(2) == [b"OK", b"vCont;c;C;s;S"]
    assert rig.gdb.acks == 2  # the QStartNoAckMode packet itself is acked, nothing after


def test_target_description_in_pieces(rig: Rig) -> None:
    rig.gdb.send(b"qXfer:features:read:target.xml:0,7fb", b"qXfer:features:read:target.xml:7fb,7fb",
                 b"qXfer:features:read:nope.xml:0,10")  # fmt: skip
    rig.poll()
    first, second, missing = rig.gdb.replies(3)
    assert first[:1] == b"m" and len(first) == 1 + 0x7FB
    assert second[:1] == b"l"
    assert first[1:] + second[1:] == rig.guest.target_xml()["target.xml"]
    assert missing == b"E00"


def test_memory_hides_probes_and_the_area(rig: Rig) -> None:
    attach(rig)
    rig.held(b"m%x,8" % TEXT, b"m%x,8" % STACK, b"m%x,4" % AREA[0], b"m%x,20" % (AREA[0] - 8),
             b"m%x,4" % 0x1234, b"c", stop=INTERRUPTED)  # fmt: skip
    _halt, text, stack, area, before_area, unmapped = rig.gdb.replies(6)
    assert decode_hex(text) == bytes.fromhex("0f1f440000415449")  # the saved byte, not 0xcc
    assert decode_hex(stack) == (TEXT + 0x123).to_bytes(8, "little")
    assert area == b"E14"
    assert unmapped == b"E14"
    # A read running into the area stops where it begins (the fake has no
    # memory there either: the error is the area's, not the fake's).
    assert before_area == b"E14"


def test_memory_writes(rig: Rig) -> None:
    attach(rig)
    rig.held(b"M%x,2:9090" % (TEXT + 5), b"M%x,1:90" % AREA[0], b"M%x,2:90" % TEXT, b"c",
             stop=INTERRUPTED)  # fmt: skip
    assert rig.gdb.replies(4)[1:] == [b"OK", b"E14", b"E01"]
    assert rig.guest.writes == [(1, TEXT + 5, b"\x90\x90")]


def test_registers(rig: Rig) -> None:
    attach(rig)
    rig.held(b"Hg2", b"g", b"P3=1122334455667788", b"p3", b"Hg1", b"p1", b"Hg7", b"c",
             stop=INTERRUPTED)  # fmt: skip
    _halt, ok, regs, ok2, reg3, ok3, reg1, bad = rig.gdb.replies(8)
    assert (ok, ok2, ok3) == (b"OK", b"OK", b"OK")
    assert decode_hex(regs) == bytes(608)
    assert reg3 == b"1122334455667788"
    assert decode_hex(reg1) == bytes(range(8, 16))
    assert bad == b"E01"
    rig.held(b"Hg2", b"G" + encode_hex(b"\x07" * 608), b"c", stop=INTERRUPTED)
    # (gdb continued before: the stop is reported first)
    assert rig.gdb.replies(3) == [b"T02thread:01;", b"OK", b"OK"]
    assert rig.guest.regs[2] == b"\x07" * 608


def test_rip_cannot_be_set_into_qprobes_area(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """gdb could send a vCPU into a stub, a slot or a trampoline (``set $pc``,
    ``jump``): code that waits for the host's answers, and that gdb itself
    reads as unmapped."""
    attach(rig)
    inside = (AREA[0] + 0x40).to_bytes(8, "little")
    regs = bytearray(rig.guest.regs[2])
    regs[128:136] = inside
    rig.held(b"Hg2", b"P10=" + encode_hex(inside), b"G" + encode_hex(bytes(regs)),
             b"P0=" + encode_hex(inside), b"P10=" + encode_hex(TEXT.to_bytes(8, "little")),
             b"c", stop=INTERRUPTED)  # fmt: skip
    _halt, ok, refused, refused2, ok2, ok3 = rig.gdb.replies(6)
    why = b"E.qprobes refused to set thread 2's rip to %#x: that is qprobes' own code" % (
        AREA[0] + 0x40)
    assert ok == b"OK" and refused.startswith(why) and refused2 == refused
    assert (ok2, ok3) == (b"OK", b"OK")  # another register may hold such a value; rip elsewhere
    assert rig.guest.regs[2][:8] == inside
    assert rig.guest.regs[2][128:136] == TEXT.to_bytes(8, "little")
    assert caplog.text.count("qprobes refused to set thread 2's rip") == 2


def test_threads(rig: Rig) -> None:
    attach(rig)
    rig.held(b"qfThreadInfo", b"qsThreadInfo", b"qC", b"T2", b"T9", b"qThreadExtraInfo,2", b"c",
             stop=INTERRUPTED)  # fmt: skip
    _halt, first, rest, current, alive, dead, extra = rig.gdb.replies(7)
    assert (first, rest, current, alive, dead) == (b"m01,02", b"l", b"QC01", b"OK", b"E01")
    assert decode_hex(extra) == b"CPU#1 [running]"


def test_breakpoints_are_gdbs_stops(rig: Rig) -> None:
    guest = rig.guest
    attach(rig)
    # No gdb breakpoint yet: no stop is gdb's.
    assert not rig.server.foreign_stop(parse_stop_reply(b"T05thread:02;"))
    rig.held(b"Z0,%x,1" % (TEXT + 0x40), b"Z2,%x,8" % STACK, b"Z0,%x,1" % AREA[0], b"c",
             stop=INTERRUPTED)  # fmt: skip
    assert rig.gdb.replies(4)[1:] == [b"OK", b"OK", b"E14"]
    assert guest.points == [(0, TEXT + 0x40, 1), (2, STACK, 8)]
    # The engine offers stops: vCPU 2 sits on the breakpoint, vCPU 1 does not.
    holds = rig.holds
    assert not rig.server.foreign_stop(parse_stop_reply(b"T05thread:01;"))
    assert rig.server.foreign_stop(parse_stop_reply(b"T05thread:02;"))
    assert rig.holds == holds + 1
    rig.gdb.send(b"z0,%x,1" % (TEXT + 0x40), b"c")
    rig.poll()
    rig.server.hold(None)
    # gdb was waiting (it continued): the stop is reported first, on vCPU 2.
    assert rig.gdb.replies(2) == [b"T05thread:02;", b"OK"]
    assert guest.points == [(2, STACK, 8)]
    # A watchpoint hit in gdb's range; one outside it (QEMU reports odd ones) is not gdb's.
    assert rig.server.foreign_stop(parse_stop_reply(b"T05thread:01;watch:%x;" % (STACK + 4)))
    assert not rig.server.foreign_stop(parse_stop_reply(b"T05thread:01;watch:%x;" % (STACK + 8)))
    rig.gdb.send(b"D")
    rig.poll()
    rig.server.hold(None)
    reply, detached = rig.gdb.replies(2)
    assert reply == b"T05thread:01;watch:%x;" % (STACK + 4)
    assert detached == b"OK"
    assert guest.points == []  # gdb's watchpoint went with it
    assert rig.gdb.eof() and not rig.server.connected


def test_steps(rig: Rig) -> None:
    attach(rig)
    rig.held(b"vCont;s:2;c", b"s", b"Hc1", b"s", b"vCont;c", stop=INTERRUPTED)
    _halt, step2, again, ok, step1 = rig.gdb.replies(5)
    assert (step2, again, ok, step1) == (b"T05thread:02;", b"T05thread:02;", b"OK",
                                         b"T05thread:01;")  # fmt: skip
    assert rig.guest.steps == [2, 2, 1]


def test_interrupt_while_running(rig: Rig) -> None:
    attach(rig)
    # A Ctrl-C while gdb does not wait for a stop asks for nothing.
    rig.gdb.interrupt()
    rig.poll()
    assert rig.holds == 1
    rig.held(b"c", stop=INTERRUPTED)
    rig.gdb.reply()
    holds = rig.holds
    rig.gdb.interrupt()
    rig.poll()
    assert rig.holds == holds + 1
    # The run loop interrupts the guest and holds it: QEMU names vCPU 2.
    rig.gdb.send(b"c")
    rig.server.hold(parse_stop_reply(b"T02thread:02;"))
    assert rig.gdb.reply() == b"T02thread:02;"


def test_monitor_commands(rig: Rig) -> None:
    attach(rig)
    rig.held(b"qRcmd," + encode_hex(b"system_reset"), b"qRcmd," + encode_hex(b"info status"),
             b"c", stop=INTERRUPTED)  # fmt: skip
    _halt, refused, ok, status, ok2 = rig.gdb.replies(5)
    assert refused[:1] == b"O" and b"refused" in decode_hex(refused[1:])
    assert status[:1] == b"O" and decode_hex(status[1:]) == b"VM status: paused (debug)\n"
    assert (ok, ok2) == (b"OK", b"OK")
    assert rig.guest.monitored == ["info status"]


def test_kill_detaches(rig: Rig) -> None:
    attach(rig)
    rig.held(b"Z0,%x,1" % TEXT, b"k", stop=INTERRUPTED)
    _halt, ok, said = rig.gdb.replies(3)
    assert ok == b"OK" and b"not killed" in decode_hex(said[1:])
    assert rig.guest.points == []
    assert not rig.server.connected


def test_gdb_that_vanishes_leaves_no_breakpoint(rig: Rig, tmp_path: Path) -> None:
    attach(rig)
    rig.held(b"Z0,%x,1" % TEXT, b"c", stop=INTERRUPTED)
    rig.gdb.sock.close()
    holds = rig.holds
    rig.server.poll(True)  # sees the EOF
    assert not rig.server.connected and rig.holds == holds + 1
    assert rig.guest.points == [(0, TEXT, 1)]  # the guest runs: taken out at the hold
    rig.server.hold(INTERRUPTED)
    assert rig.guest.points == []
    # Another gdb can connect.
    rig.gdb = Gdb(str(tmp_path / "gdb.sock"))
    rig.server.poll(True)
    assert rig.server.connected and rig.server.connections == 2


def test_gdb_that_vanishes_while_holding_leaves_no_breakpoint(rig: Rig) -> None:
    attach(rig)
    rig.held(b"Z0,%x,1" % TEXT, b"c", stop=INTERRUPTED)
    rig.gdb.replies(2)
    rig.gdb.interrupt()
    rig.poll()
    rig.gdb.sock.close()
    rig.server.hold(INTERRUPTED)  # finds gdb gone while it holds the guest
    assert not rig.server.connected
    assert rig.guest.points == []


def test_one_gdb_at_a_time(rig: Rig, tmp_path: Path) -> None:
    second = Gdb(str(tmp_path / "gdb.sock"))
    rig.server.poll(True)
    assert b"another gdb" in decode_hex(second.reply()[1:])
    assert second.eof()
    assert rig.server.connected


def test_stopping_gives_the_guest_back(rig: Rig) -> None:
    attach(rig)
    rig.stopping = True
    rig.server.hold(INTERRUPTED)  # returns with no resume from gdb
    assert rig.gdb.reply() == b"T02thread:01;"
    assert rig.server.connected


def test_close_tells_gdb(rig: Rig, tmp_path: Path) -> None:
    attach(rig)
    rig.held(b"Z0,%x,1" % TEXT, b"c", stop=INTERRUPTED)
    rig.gdb.replies(2)
    rig.server.close()
    said = rig.gdb.reply()
    assert said[:1] == b"O" and b"qprobes: detaching" in decode_hex(said[1:])
    assert rig.gdb.eof()
    assert rig.guest.points == []
    assert not (tmp_path / "gdb.sock").exists()


def test_listen_error_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(GdbServerError, match="cannot listen for gdb on"):
        GdbServer(FakeGuest(), Listen(path=str(tmp_path / "no" / "such" / "dir" / "s")))


def test_a_listen_error_leaves_no_socket_open(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(GdbServerError) as failed:
        GdbServer(FakeGuest(), Listen(path=str(tmp_path / "no" / "such" / "dir" / "s")))
    assert len(os.listdir("/proc/self/fd")) == before, failed.value  # (the error kept alive)


def test_tcp_listener_names_its_port() -> None:
    server = GdbServer(FakeGuest(), ":0")
    try:
        host, _, port = server.address.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
    finally:
        server.close()


def test_stop_thread_defaults_to_the_first_vcpu(rig: Rig) -> None:
    attach(rig)
    rig.held(b"c", stop=StopReply(kind=parse_stop_reply(b"S02").kind, signal=2,
                                  thread=ThreadId(None, 0)))  # fmt: skip
    assert rig.gdb.reply() == b"T02thread:01;"


def test_gdb_cannot_write_over_an_idt_gate_qprobes_redirected() -> None:
    """gdb reads the guest's own gate there: a write landed on qprobes' gate
    (its int3s would reach Linux's handler) and the detach undid it."""
    from types import SimpleNamespace

    from qprobes.errors import ProbeError
    from qprobes.frontends.gdbserver import EngineBackend

    idt, writes = 0xFFFFFE0000000000, []
    phys = SimpleNamespace(paddr=0x1000)
    target = SimpleNamespace(vcpus=[1], idt=lambda vcpu: SimpleNamespace(base=idt),
                             translate=lambda addr, vcpu: phys)  # fmt: skip
    engine = SimpleNamespace(target=target, kretprobes=None,
                             saved_gates=lambda: {(0x1000, 3): bytes(range(16))},
                             write_text=lambda addr, data, vcpu: writes.append(addr))  # fmt: skip
    backend = EngineBackend(engine)  # type: ignore[arg-type]
    with pytest.raises(ProbeError, match="IDT gates"):
        backend.write_memory(1, idt + 16 * 3 + 15, b"\x00\x00")
    backend.write_memory(1, idt + 16 * 4, b"\x00")  # the next gate is the guest's
    assert writes == [idt + 16 * 4]


def test_a_gdb_that_stops_reading_is_dropped_without_blocking(
    rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A write to gdb waited up to 5 s for its socket to drain, with qprobes'
    run loop (and the probes) stuck meanwhile; now replies are queued, and a
    gdb that leaves too many unread is dropped."""
    import time

    attach(rig)
    peer = rig.server._peer
    assert peer is not None
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.output_limit = 32 * 1024
    started = time.monotonic()
    # 100 register reads (1216 bytes each), none of them read by "gdb".
    rig.held(*([b"g"] * 100), b"c", stop=INTERRUPTED)
    took = time.monotonic() - started
    assert took < 2.0, f"the hold blocked {took:.1f} s on a gdb that does not read"
    assert not rig.server.connected
    assert "dropping gdb: it stopped reading its replies" in caplog.text
    # The endpoint goes on: another gdb can connect and is served.
    rig.gdb = Gdb(str(tmp_path / "gdb.sock"))
    rig.server.poll(True)
    assert rig.server.connected


def test_replies_a_gdb_reads_late_all_arrive(rig: Rig) -> None:
    """Replies queued while gdb's socket was full are sent as it drains."""
    attach(rig)
    peer = rig.server._peer
    assert peer is not None
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rig.held(*([b"g"] * 20), b"c", stop=INTERRUPTED)
    assert rig.server.connected
    for _ in range(50):  # the run loop's polls send the rest
        rig.server.poll(True)
        if not peer._out:
            break
        rig.gdb.sock.settimeout(0.05)
        with contextlib.suppress(TimeoutError):
            rig.gdb.queue += [e.payload for e in rig.gdb.decoder.feed(rig.gdb.sock.recv(65536))
                              if isinstance(e, Packet)]  # fmt: skip
    rig.gdb.sock.settimeout(2.0)
    replies = rig.gdb.replies(21)
    assert replies[0] == b"T02thread:01;"
    assert replies[1:] == [encode_hex(bytes(range(16)) * 38)] * 20


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "gdb.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()  # an earlier run's socket: nobody listens on it
    server = GdbServer(FakeGuest(), Listen(path=str(path)))
    try:
        gdb = Gdb(str(path))
        server.poll(True)
        assert server.connected
        gdb.sock.close()
    finally:
        server.close()
    assert not path.exists()


def test_a_socket_someone_listens_on_is_left_alone(tmp_path: Path) -> None:
    """Any socket at the path was unlinked: a running endpoint (or anything
    else listening there) lost its name to this one."""
    path = tmp_path / "gdb.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    other.listen(1)
    try:
        with pytest.raises(GdbServerError) as refused:
            GdbServer(FakeGuest(), Listen(path=str(path)))
        assert str(refused.value) == (f"cannot listen for gdb on {path}: another process "
                                      "listens there")  # fmt: skip
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))  # still the other listener's
        client.close()
    finally:
        other.close()


def test_a_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    with pytest.raises(GdbServerError, match=r"notes.txt: it exists and is not a socket$"):
        GdbServer(FakeGuest(), Listen(path=str(path)))
    assert path.read_text() == "mine\n"


def test_close_leaves_a_socket_that_replaced_its_own(tmp_path: Path) -> None:
    path = tmp_path / "gdb.sock"
    server = GdbServer(FakeGuest(), Listen(path=str(path)))
    path.unlink()
    newer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    newer.bind(str(path))
    try:
        server.close()
        assert path.exists()
    finally:
        newer.close()
