"""GdbClient and Connection against a fake stub that behaves like QEMU 7.2's.

The fake (FakeStub) takes the client's bytes and produces the stub's; a
Connection subclass whose ``send_raw``/``recv_raw`` talk to it directly
covers the protocol logic, and a thread serving it on a socketpair covers
the real socket paths (timeouts, EOF).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qprobes.errors import (
    ChecksumError,
    ConnectionClosedError,
    MemoryAccessError,
    ProtocolError,
    StubError,
    StubTimeoutError,
    TargetError,
    TargetRunningError,
    UnsupportedError,
)
from qprobes.remote.client import BreakpointType, GdbClient
from qprobes.remote.connection import Connection
from qprobes.wire.packet import (
    Ack,
    Interrupt,
    Nack,
    Packet,
    PacketDecoder,
    decode_hex,
    encode_hex,
    frame,
)
from qprobes.wire.stop import StopKind, ThreadId, WatchKind

DATA = Path(__file__).parent / "data" / "qemu-7.2-x86_64"
XML = {name: (DATA / name).read_bytes() for name in ("target.xml", "i386-64bit.xml")}
G_SIZE = 608
RIP = 16


class FakeStub:
    """A scripted GDB stub with QEMU 7.2's quirks: no QStartNoAckMode
    unless asked, ``p`` empty before target.xml, ``m`` limited to 2048
    bytes, packets over 4094 bytes dropped silently, '+' before every
    reply in ack mode, one thread per qfThreadInfo packet."""

    def __init__(self, *, no_ack: bool = False, multiprocess: bool = True) -> None:
        self.decoder = PacketDecoder()
        self.out = bytearray()
        self.packets: list[bytes] = []
        self.acks = 0
        self.nacks = 0
        self.ack_mode = True
        self.offer_no_ack = no_ack
        self.multiprocess = multiprocess
        self.memory = bytearray(1 << 16)
        self.regs = bytearray(G_SIZE)
        self.regs[128:136] = (0xFFF0).to_bytes(8, "little")
        self.has_xml = False
        self.running = False
        self.breakpoints: set[tuple[int, int, int]] = set()
        self.threads = {"g": 1, "c": 1}
        self.phys = False
        self.sstep = 7
        self.closed = False
        self.violations: list[bytes] = []
        self.last_sent = b""
        # payload -> list of canned replies (None: no reply), consumed in order
        self.script: dict[bytes, list[bytes | None]] = {}
        self.corrupt_next = 0

    # --- stub output ------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        framed = frame(payload)
        self.last_sent = framed
        if self.corrupt_next:
            self.corrupt_next -= 1
            framed = framed[:-2] + b"00" if not framed.endswith(b"00") else framed[:-2] + b"01"
        self.out += framed

    def stop(self, payload: bytes = b"T05thread:p01.01;") -> None:
        """The target stops on its own (breakpoint, watchpoint...)."""
        assert self.running
        self.running = False
        self.send(payload)

    def take(self, limit: int | None = None) -> bytes:
        n = len(self.out) if limit is None else min(limit, len(self.out))
        data = bytes(self.out[:n])
        del self.out[:n]
        return data

    # --- stub input ---------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        for event in self.decoder.feed(data):
            if isinstance(event, Ack):
                self.acks += 1
            elif isinstance(event, Nack):
                self.nacks += 1
                self.out += self.last_sent
            elif isinstance(event, Interrupt):
                if self.running:
                    self.running = False
                    self.send(b"T02thread:p01.01;")
            elif isinstance(event, Packet):
                if self.running:
                    self.violations.append(event.payload)
                    continue
                if self.ack_mode:
                    self.out += b"+"
                self.packets.append(event.payload)
                self.handle(event.payload)
            else:
                self.out += b"-"

    def handle(self, p: bytes) -> None:
        if self.script.get(p):
            reply = self.script[p].pop(0)
            if reply is not None:
                self.send(reply)
            return
        if len(p) > 4094:
            return  # QEMU drops it: the client waits forever
        handler = self.dispatch(p)
        if handler is not None:
            handler(p)
        else:
            self.send(b"")

    def dispatch(self, p: bytes) -> Callable[[bytes], None] | None:
        exact: dict[bytes, Callable[[bytes], None]] = {
            b"vCont?": lambda _: self.send(b"vCont;c;C;s;S"),
            b"?": lambda _: self.send(
                b"T05thread:p01.01;" if self.multiprocess else b"T05thread:01;"
            ),
            b"g": lambda _: self.send(encode_hex(bytes(self.regs))),
            b"qfThreadInfo": lambda _: self.send(b"mp01.01"),
            b"qsThreadInfo": self.qs_thread_info,
            b"qqemu.sstep": lambda _: self.send(b"0x%x" % self.sstep),
            b"qqemu.sstepbits": lambda _: self.send(b"ENABLE=1,NOIRQ=2,NOTIMER=4"),
            b"QStartNoAckMode": self.start_no_ack,
            b"c": self.resume,
            b"s": self.resume,
            b"k": self.kill,
        }
        if p in exact:
            return exact[p]
        prefixes: list[tuple[bytes, Callable[[bytes], None]]] = [
            (b"qSupported", self.q_supported),
            (b"qXfer:features:read:", self.q_xfer),
            (b"vCont;", self.resume),
            (b"G", self.write_regs),
            (b"p", self.read_reg),
            (b"P", self.write_reg),
            (b"m", self.read_mem),
            (b"M", self.write_mem),
            (b"Z", self.breakpoint),
            (b"z", self.breakpoint),
            (b"H", self.select),
            (b"qRcmd,", self.rcmd),
            (b"Qqemu.PhyMemMode:", self.phys_mode),
            (b"Qqemu.sstep=", self.set_sstep),
            (b"D", self.detach),
        ]
        for prefix, handler in prefixes:
            if p.startswith(prefix):
                return handler
        return None

    def q_supported(self, p: bytes) -> None:
        reply = b"PacketSize=1000;qXfer:features:read+;vContSupported+"
        if self.multiprocess and b"multiprocess+" in p:
            reply += b";multiprocess+"
        if self.offer_no_ack:
            reply += b";QStartNoAckMode+"
        self.send(reply)

    def start_no_ack(self, p: bytes) -> None:
        self.send(b"OK")
        self.ack_mode = False

    def q_xfer(self, p: bytes) -> None:
        annex, _, span = p[len(b"qXfer:features:read:") :].rpartition(b":")
        offset, length = (int(x, 16) for x in span.split(b","))
        doc = XML.get(annex.decode())
        if doc is None:
            self.send(b"E00")
            return
        self.has_xml = True
        chunk = doc[offset : offset + length]
        self.send((b"m" if offset + length < len(doc) else b"l") + chunk)

    def qs_thread_info(self, p: bytes) -> None:
        last = self.packets[-2] if len(self.packets) > 1 else b""
        self.send(b"mp01.02" if last == b"qfThreadInfo" else b"l")

    def read_reg(self, p: bytes) -> None:
        if not self.has_xml:
            self.send(b"")
            return
        n = int(p[1:], 16)
        size = {RIP: 8, 17: 4}.get(n, 8)
        offset = {RIP: 128, 17: 136}.get(n, 8 * n)
        self.send(encode_hex(bytes(self.regs[offset : offset + size])))

    def write_reg(self, p: bytes) -> None:
        if not self.has_xml:
            self.send(b"")
            return
        n_text, _, value = p[1:].partition(b"=")
        n = int(n_text, 16)
        offset = {RIP: 128, 17: 136}.get(n, 8 * n)
        data = decode_hex(value)
        self.regs[offset : offset + len(data)] = data
        self.send(b"OK")

    def write_regs(self, p: bytes) -> None:
        data = decode_hex(p[1:])
        self.regs[: len(data)] = data
        self.send(b"OK")

    def read_mem(self, p: bytes) -> None:
        addr, length = (int(x, 16) for x in p[1:].split(b","))
        if length > 2048:
            self.send(b"E22")
        elif addr + length > len(self.memory):
            self.send(b"E14")
        else:
            self.send(encode_hex(bytes(self.memory[addr : addr + length])))

    def write_mem(self, p: bytes) -> None:
        head, _, data = p[1:].partition(b":")
        addr, length = (int(x, 16) for x in head.split(b","))
        if addr + length > len(self.memory):
            self.send(b"E14")
            return
        self.memory[addr : addr + length] = decode_hex(data)
        self.send(b"OK")

    def breakpoint(self, p: bytes) -> None:
        kind, addr, size = (int(x, 16) for x in p[1:].split(b","))
        if kind > 4:
            self.send(b"")
            return
        if p[:1] == b"Z":
            self.breakpoints.add((kind, addr, size))
        else:
            self.breakpoints.discard((kind, addr, size))
        self.send(b"OK")

    def select(self, p: bytes) -> None:
        self.threads[chr(p[1])] = int(p[2:].split(b".")[-1], 16)
        self.send(b"OK")

    def resume(self, p: bytes) -> None:
        self.running = True  # no reply until the target stops

    def rcmd(self, p: bytes) -> None:
        command = decode_hex(p[6:])
        if not command:
            self.send(b"E22")
            return
        for line in (b"CPU#0\r\n", b"IDT=     00000000 000003ff\r\n"):
            self.send(b"O" + encode_hex(line))
        self.send(b"OK")

    def phys_mode(self, p: bytes) -> None:
        self.phys = p.endswith(b"1")
        self.send(b"OK")

    def set_sstep(self, p: bytes) -> None:
        self.sstep = int(p[len(b"Qqemu.sstep=") :], 16)
        self.send(b"OK")

    def detach(self, p: bytes) -> None:
        self.send(b"OK" if (p == b"D;1") == self.multiprocess else b"E22")

    def kill(self, p: bytes) -> None:
        self.closed = True


class FakeConnection(Connection):
    """A Connection whose raw methods talk to a FakeStub: the whole fake."""

    def __init__(self, stub: FakeStub, chunk: int | None = None) -> None:
        super().__init__(None, timeout=0.2)
        self.stub = stub
        self.chunk = chunk
        self.writes: list[bytes] = []
        self.raw_closed = False

    def send_raw(self, data: bytes) -> None:
        if self.stub.closed:
            raise ConnectionClosedError("stub gone")
        self.writes.append(data)
        self.stub.receive(data)

    def recv_raw(self, timeout: float) -> bytes:
        data = self.stub.take(self.chunk)
        if data:
            return data
        if self.stub.closed:
            raise ConnectionClosedError("the stub closed the connection")
        time.sleep(min(timeout, 0.05))  # nothing will come: let the deadline pass
        return b""

    def close_raw(self) -> None:
        self.raw_closed = True


def make_client(
    chunk: int | None = None, **stub_args: bool
) -> tuple[GdbClient, FakeStub, FakeConnection]:
    stub = FakeStub(**stub_args)
    conn = FakeConnection(stub, chunk)
    client = GdbClient(conn, timeout=0.2)
    return client, stub, conn


@pytest.fixture
def fake() -> tuple[GdbClient, FakeStub, FakeConnection]:
    return make_client()


# --- handshake ------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 3, 64])
def test_handshake(chunk: int | None) -> None:
    client, stub, conn = make_client(chunk)
    assert stub.packets[0].startswith(b"qSupported:")
    assert b"multiprocess+" in stub.packets[0]
    assert stub.packets[1].startswith(b"qXfer:features:read:target.xml:0,")
    assert any(p.startswith(b"qXfer:features:read:i386-64bit.xml:") for p in stub.packets)
    assert stub.packets[-2:] == [b"vCont?", b"?"]
    assert b"QStartNoAckMode" not in stub.packets
    assert client.supported["PacketSize"] == "1000"
    assert client.packet_size == 0x1000
    assert client.multiprocess
    assert client.layout.g_size == G_SIZE
    assert client.layout["rip"].regnum == RIP
    assert set(client.target_xml) == {"target.xml", "i386-64bit.xml"}
    assert client.vcont_actions == {"c", "C", "s", "S"}
    assert client.initial_stop.signal == 5
    assert client.initial_stop.thread == ThreadId(1, 1)
    assert not client.running
    assert not conn.no_ack
    assert client.read_chunk == 2048
    assert client.write_chunk == 1024
    assert stub.violations == []


def test_handshake_no_ack_mode() -> None:
    client, stub, conn = make_client(no_ack=True)
    assert b"QStartNoAckMode" in stub.packets
    assert conn.no_ack
    acks_before = stub.acks
    client.read_register(RIP)
    client.read_memory(0, 16)
    assert stub.acks == acks_before  # nothing acked any more
    assert not any(w.startswith(b"+") for w in conn.writes[-2:])


def test_handshake_skips_unsolicited_stop() -> None:
    # QEMU 7.2 stops a running guest when a client connects and says so
    # with a T02 stop reply that can come before the qSupported reply.
    stub = FakeStub()
    stub.out += frame(b"T02thread:p01.01;")
    client = GdbClient(FakeConnection(stub), timeout=0.2)
    assert client.packet_size == 0x1000
    assert client.initial_stop.signal == 5


def test_handshake_without_multiprocess() -> None:
    client, stub, _ = make_client(multiprocess=False)
    assert not client.multiprocess
    assert client.initial_stop.thread == ThreadId(None, 1)
    client.select_thread("g", 2)
    assert stub.packets[-1] == b"Hg2"
    client.detach()
    assert stub.packets[-1] == b"D"


def test_handshake_failure_closes_connection() -> None:
    stub = FakeStub()
    stub.script[b"?"] = [b"garbage"]
    conn = FakeConnection(stub)
    with pytest.raises(ProtocolError):
        GdbClient(conn, timeout=0.2)
    assert conn.raw_closed and conn.closed


def test_register_access_needs_target_xml() -> None:
    # Without qXfer:features:read, QEMU answers p/P with an empty packet.
    stub = FakeStub()
    stub.script[b"qSupported:multiprocess+;swbreak+;hwbreak+;vContSupported+"] = [
        b"PacketSize=1000;multiprocess+"
    ]
    client = GdbClient(FakeConnection(stub), timeout=0.2)
    assert len(client.layout) == 0
    with pytest.raises(UnsupportedError) as info:
        client.read_register(RIP)
    assert info.value.request == b"p10"


# --- acks -------------------------------------------------------------------------


def test_acks_ride_with_the_next_packet(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, _stub, conn = fake
    conn.writes.clear()
    client.read_register(RIP)
    client.read_register(0)
    # one write per request: the ack for the previous reply is its prefix
    assert conn.writes == [b"+" + frame(b"p10"), b"+" + frame(b"p0")]
    conn.close()
    assert conn.writes[-1] == b"+"  # the last ack goes out at close


def test_console_output_is_acked_at_once(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, _stub, conn = fake
    conn.writes.clear()
    assert "IDT=" in client.monitor("info registers")
    assert conn.writes[1:] == [b"+", b"+"]  # one per O packet; the OK's is held


def test_retransmit_on_nack(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _conn = fake
    real_receive = stub.receive
    mangled: list[bytes] = []

    def flaky(data: bytes) -> None:
        if b"$p10#" in data and not mangled:
            mangled.append(data)
            data = data.replace(b"$p10#", b"$p11#")  # corrupted on the way
        real_receive(data)

    stub.receive = flaky  # type: ignore[method-assign]
    assert client.read_register(RIP) == (0xFFF0).to_bytes(8, "little")
    assert mangled
    assert stub.packets.count(b"p10") == 1


def test_nack_bad_checksum_from_stub(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _conn = fake
    stub.corrupt_next = 1
    assert client.read_register(RIP) == (0xFFF0).to_bytes(8, "little")
    assert stub.nacks == 1


def test_bad_checksum_in_no_ack_mode_raises() -> None:
    client, stub, _ = make_client(no_ack=True)
    stub.corrupt_next = 1
    with pytest.raises(ChecksumError):
        client.read_register(RIP)
    # the connection stays in step: the bad packet was the reply
    assert client.read_register(RIP) == (0xFFF0).to_bytes(8, "little")


def test_stub_keeps_rejecting(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _conn = fake

    def always_bad(data: bytes) -> None:
        if b"$" in data:
            stub.out += b"-"

    stub.receive = always_bad  # type: ignore[method-assign]
    with pytest.raises(ProtocolError, match="keeps rejecting"):
        client.read_register(RIP)
    with pytest.raises(ConnectionClosedError):
        client.read_register(RIP)


# --- registers ----------------------------------------------------------------------


def test_registers(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    g = client.read_registers()
    assert len(g) == G_SIZE
    assert int.from_bytes(g[128:136], "little") == 0xFFF0
    client.write_register(0, (0x1234).to_bytes(8, "little"))
    assert stub.packets[-1] == b"P0=3412000000000000"
    assert client.read_register(0) == (0x1234).to_bytes(8, "little")
    assert client.get_reg("rip") == 0xFFF0
    client.set_reg("rip", -1)
    assert client.get_reg("rip") == 2**64 - 1
    client.write_registers(bytes(range(200)) + bytes(G_SIZE - 200))
    assert stub.regs[:200] == bytes(range(200))
    with pytest.raises(ValueError, match="takes 8 bytes"):
        client.write_register(0, b"\x00")


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"E01", StubError),
        (b"", UnsupportedError),
        (b"zz", ProtocolError),
        (b"0000", ProtocolError),  # 2 bytes for an 8-byte register
    ],
)
def test_read_register_bad_replies(
    fake: tuple[GdbClient, FakeStub, FakeConnection], reply: bytes, error: type[Exception]
) -> None:
    client, stub, _ = fake
    stub.script[b"p10"] = [reply]
    with pytest.raises(error) as info:
        client.read_register(RIP)
    assert isinstance(info.value, ProtocolError)
    assert info.value.packet == (reply or None)
    if isinstance(info.value, StubError):
        assert info.value.request == b"p10"
        assert info.value.code == 1


def test_register_unavailable(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    stub.script[b"p10"] = [b"xxxxxxxxxxxxxxxx"]
    with pytest.raises(TargetError, match="unavailable"):
        client.read_register(RIP)


# --- threads ----------------------------------------------------------------------


def test_select_thread_is_cached(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    n = len(stub.packets)
    client.select_thread("g", 1)  # already selected by the initial stop
    assert len(stub.packets) == n
    client.select_thread("g", 2)
    client.select_thread("g", 2)
    assert stub.packets[n:] == [b"Hgp1.2"]
    client.select_thread("c", 2)
    assert stub.packets[n:] == [b"Hgp1.2", b"Hcp1.2"]
    client.select_thread("g", -1)
    client.select_thread("g", -1)  # "all threads" is never cached
    assert stub.packets[-2:] == [b"Hgp1.-1", b"Hgp1.-1"]
    with pytest.raises(ValueError):
        client.select_thread("x", 1)


def test_select_thread_error_forgets_selection(
    fake: tuple[GdbClient, FakeStub, FakeConnection],
) -> None:
    client, stub, _ = fake
    stub.script[b"Hgp1.3"] = [b"E22"]
    with pytest.raises(StubError):
        client.select_thread("g", 3)
    client.select_thread("g", 1)  # no longer known to be selected
    assert stub.packets[-1] == b"Hgp1.1"


def test_stop_moves_selection(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    client.select_thread("g", 1)
    client.cont()
    stub.stop(b"T05thread:p01.02;watch:10;")
    client.wait_stop()
    n = len(stub.packets)
    client.select_thread("g", 2)  # QEMU already points Hg at the vCPU that stopped
    assert len(stub.packets) == n
    assert client.stop_thread == 2


def test_thread_ids(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    assert client.thread_ids() == [1, 2]
    assert stub.packets[-3:] == [b"qfThreadInfo", b"qsThreadInfo", b"qsThreadInfo"]


# --- memory -------------------------------------------------------------------------


def test_memory_round_trip_in_chunks(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, conn = fake
    data = bytes(i * 7 & 0xFF for i in range(5000))
    conn.writes.clear()
    client.write_memory(0x1000, data)
    writes = [p for p in stub.packets if p.startswith(b"M")]
    assert [p.split(b":")[0] for p in writes] == [
        b"M1000,400",
        b"M1400,400",
        b"M1800,400",
        b"M1c00,400",
        b"M2000,388",
    ]
    assert len(conn.writes) == 1  # pipelined: one write for all five packets
    assert stub.memory[0x1000 : 0x1000 + 5000] == data
    conn.writes.clear()
    assert client.read_memory(0x1000, 5000) == data
    reads = [p for p in stub.packets if p.startswith(b"m")]
    assert reads == [b"m1000,800", b"m1800,800", b"m2000,388"]
    assert len(conn.writes) == 1


def test_memory_unpipelined() -> None:
    client, _stub, conn = make_client()
    client.pipelining = False
    conn.writes.clear()
    client.write_memory(0, bytes(3000))
    assert len(conn.writes) == 3


def test_pipeline_windows(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, _stub, conn = fake
    conn.writes.clear()
    client.write_memory(0, bytes(64 * 1024))  # 64 'M' packets of 2 KiB of hex
    assert 2 <= len(conn.writes) <= 4
    assert all(len(w) <= 64 * 1024 for w in conn.writes)


def test_write_memory_many(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, conn = fake
    conn.writes.clear()
    client.write_memory_many([(0x10, b"\xcc"), (0x20, b"\x90\x90"), (0x30, b""), (0x40, b"ab")])
    assert len(conn.writes) == 1
    assert stub.packets[-3:] == [b"M10,1:cc", b"M20,2:9090", b"M40,2:6162"]
    assert stub.memory[0x10:0x11] == b"\xcc" and stub.memory[0x40:0x42] == b"ab"
    client.write_memory_many([])


def test_read_memory_error_carries_address(
    fake: tuple[GdbClient, FakeStub, FakeConnection],
) -> None:
    client, stub, _ = fake
    size = len(stub.memory)
    with pytest.raises(MemoryAccessError) as info:
        client.read_memory(size - 3000, 4000)
    err = info.value
    assert (err.addr, err.length, err.code) == (size - 3000 + 2048, 4000 - 2048, 0x14)
    assert err.partial == bytes(2048)
    assert isinstance(err, StubError)
    # the connection stayed in step
    assert client.read_memory(0, 4) == bytes(4)


def test_write_memory_error_after_all_replies(
    fake: tuple[GdbClient, FakeStub, FakeConnection],
) -> None:
    client, stub, _ = fake
    size = len(stub.memory)
    with pytest.raises(MemoryAccessError) as info:
        client.write_memory_many([(size + 0x100, b"x"), (0, b"y")])
    assert info.value.addr == size + 0x100
    assert stub.memory[0:1] == b"y"  # the later write still happened
    assert client.read_memory(0, 1) == b"y"


def test_short_read_is_completed(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    stub.memory[0:8] = b"abcdefgh"
    stub.script[b"m0,8"] = [encode_hex(b"abc")]
    assert client.read_memory(0, 8) == b"abcdefgh"
    assert stub.packets[-1] == b"m3,5"


@pytest.mark.parametrize(("addr", "length"), [(-1, 1), (0, -1), (2**64 - 1, 2)])
def test_memory_range_checked(
    fake: tuple[GdbClient, FakeStub, FakeConnection], addr: int, length: int
) -> None:
    client, _, _ = fake
    with pytest.raises(ValueError):
        client.read_memory(addr, length)


def test_zero_length(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    n = len(stub.packets)
    assert client.read_memory(0, 0) == b""
    client.write_memory(0, b"")
    assert len(stub.packets) == n


def test_oversized_packet_is_refused(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, _, _ = fake
    client.write_chunk = 4000  # more than QEMU takes
    with pytest.raises(ValueError, match="exceeds"):
        client.write_memory(0, bytes(4000))


def test_phys_mode_is_cached(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    assert client.phys_mem_mode is None
    client.set_phys_mem_mode(False)  # unknown at first: always sent
    client.set_phys_mem_mode(False)
    client.set_phys_mem_mode(True)
    client.set_phys_mem_mode(True)
    assert [p for p in stub.packets if p.startswith(b"Qqemu.Phy")] == [
        b"Qqemu.PhyMemMode:0",
        b"Qqemu.PhyMemMode:1",
    ]
    assert stub.phys and client.phys_mem_mode


# --- breakpoints -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "addr", "kind", "packet"),
    [
        (BreakpointType.SOFTWARE, 0xFFFFFFFF81000000, 1, b"0,ffffffff81000000,1"),
        (BreakpointType.HARDWARE, 0x1000, 1, b"1,1000,1"),
        (BreakpointType.WRITE, 0x2000, 1, b"2,2000,1"),
        (BreakpointType.READ, 0x2000, 8, b"3,2000,8"),
        (BreakpointType.ACCESS, 0x2000, 4, b"4,2000,4"),
    ],
)
def test_breakpoints(
    fake: tuple[GdbClient, FakeStub, FakeConnection],
    type_: BreakpointType,
    addr: int,
    kind: int,
    packet: bytes,
) -> None:
    client, stub, _ = fake
    client.insert_breakpoint(type_, addr, kind)
    assert stub.packets[-1] == b"Z" + packet
    assert stub.breakpoints == {(int(type_), addr, kind)}
    client.remove_breakpoint(type_, addr, kind)
    assert stub.packets[-1] == b"z" + packet
    assert not stub.breakpoints


def test_unsupported_breakpoint(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    stub.script[b"Z1,10,1"] = [b""]
    with pytest.raises(UnsupportedError):
        client.insert_breakpoint(BreakpointType.HARDWARE, 0x10)
    stub.script[b"Z0,10,1"] = [b"E0e"]
    with pytest.raises(StubError) as info:
        client.insert_breakpoint(BreakpointType.SOFTWARE, 0x10)
    assert info.value.code == 0x0E
    stub.script[b"Z0,10,1"] = [b"OKAY"]
    with pytest.raises(ProtocolError, match="unexpected reply"):
        client.insert_breakpoint(BreakpointType.SOFTWARE, 0x10)


# --- run control -----------------------------------------------------------------------


def test_cont_and_watchpoint_stop(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _conn = fake
    client.cont()
    assert stub.packets[-1] == b"c"
    assert client.running and stub.running
    stub.stop(b"T05thread:p01.01;watch:0000000000002000;")
    stop = client.wait_stop()
    assert (stop.kind, stop.signal, stop.watch_kind, stop.watch_addr) == (
        StopKind.SIGNAL,
        5,
        WatchKind.WATCH,
        0x2000,
    )
    assert stop.thread == ThreadId(1, 1)
    assert not client.running
    assert client.last_stop is stop
    assert stub.violations == []


def test_requests_refused_while_running(
    fake: tuple[GdbClient, FakeStub, FakeConnection],
) -> None:
    client, stub, _ = fake
    client.cont()
    calls: list[Callable[[], object]] = [
        client.read_registers,
        lambda: client.write_registers(bytes(G_SIZE)),
        lambda: client.read_register(0),
        lambda: client.write_register(0, bytes(8)),
        lambda: client.read_memory(0, 1),
        lambda: client.write_memory(0, b"x"),
        lambda: client.insert_breakpoint(BreakpointType.SOFTWARE, 0),
        lambda: client.remove_breakpoint(BreakpointType.SOFTWARE, 0),
        client.cont,
        client.step,
        lambda: client.vcont("c"),
        client.halt_reason,
        lambda: client.select_thread("g", 2),
        client.thread_ids,
        lambda: client.monitor("info registers"),
        lambda: client.set_phys_mem_mode(True),
        client.get_sstep_flags,
        lambda: client.set_sstep_flags(1),
        client.sstep_bits,
    ]
    for call in calls:
        with pytest.raises(TargetRunningError):
            call()
    assert stub.violations == []
    client.interrupt()
    stop = client.wait_stop()
    assert stop.signal == 2
    with pytest.raises(TargetError):
        client.interrupt()
    with pytest.raises(TargetError):
        client.wait_stop()


def test_wait_stop_timeout_leaves_connection_usable(
    fake: tuple[GdbClient, FakeStub, FakeConnection],
) -> None:
    client, stub, _ = fake
    client.cont()
    start = time.monotonic()
    with pytest.raises(StubTimeoutError):
        client.wait_stop(0.05)
    assert time.monotonic() - start < 1.0
    assert client.running
    assert client.poll_stop() is None
    stub.stop()
    stop = client.poll_stop()
    assert stop is not None and stop.signal == 5
    assert client.read_register(RIP)


def test_console_output_while_running(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    client.cont()
    stub.send(b"O" + encode_hex(b"hello "))
    stub.send(b"O" + encode_hex(b"world\n"))
    stub.stop()
    assert client.wait_stop().kind is StopKind.SIGNAL
    assert bytes(client.console_output) == b"hello world\n"


def test_step(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    client.step()  # the thread that stopped last
    assert stub.packets[-1] == b"vCont;s:p1.1"
    stub.stop(b"T05thread:p01.02;")
    client.wait_stop()
    client.step()
    assert stub.packets[-1] == b"vCont;s:p1.2"
    stub.stop()
    client.wait_stop()
    client.step(2)
    assert stub.packets[-1] == b"vCont;s:p1.2"


def test_step_without_vcont() -> None:
    stub = FakeStub()
    stub.script[b"vCont?"] = [b""]
    client = GdbClient(FakeConnection(stub), timeout=0.2)
    client.step(2)
    assert stub.packets[-2:] == [b"Hcp1.2", b"s"]
    stub.stop()
    client.wait_stop()
    with pytest.raises(UnsupportedError):
        client.cont(2)


def test_cont_thread_and_vcont(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    client.cont(2)
    assert stub.packets[-1] == b"vCont;c:p1.2"
    stub.stop()
    client.wait_stop()
    client.vcont("s:p1.1;c")
    assert stub.packets[-1] == b"vCont;s:p1.1;c"
    stub.stop()
    client.wait_stop()
    client.vcont("vCont;c")
    assert stub.packets[-1] == b"vCont;c"


def test_halt_reason(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, _, _ = fake
    assert client.halt_reason().thread == ThreadId(1, 1)


def test_exit_stop(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    client.cont()
    stub.stop(b"W00")
    stop = client.wait_stop()
    assert stop.kind is StopKind.EXITED and stop.exit_status == 0
    assert client.stop_thread is None


def test_malformed_stop_reply(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    client.cont()
    stub.stop(b"Tzz")
    with pytest.raises(ProtocolError) as info:
        client.wait_stop()
    assert info.value.packet == b"Tzz"
    assert not client.running


# --- QEMU extras ------------------------------------------------------------------------


def test_monitor(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    text = client.monitor("info registers")
    assert stub.packets[-1] == b"qRcmd," + encode_hex(b"info registers")
    assert text == "CPU#0\nIDT=     00000000 000003ff\n"
    assert bytes(client.console_output) == b""  # monitor output is not console output
    with pytest.raises(StubError):
        client.monitor("")


def test_sstep_flags(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, _ = fake
    assert client.get_sstep_flags() == 7
    client.set_sstep_flags(5)
    assert stub.packets[-1] == b"Qqemu.sstep=5"
    assert client.get_sstep_flags() == 5
    assert client.sstep_bits() == {"ENABLE": 1, "NOIRQ": 2, "NOTIMER": 4}
    stub.script[b"qqemu.sstep"] = [b"zz"]
    with pytest.raises(ProtocolError):
        client.get_sstep_flags()


def test_detach_closes(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, conn = fake
    client.detach()
    assert stub.packets[-1] == b"D;1"
    assert conn.closed and conn.raw_closed
    with pytest.raises(ConnectionClosedError):
        client.read_register(RIP)
    client.close()  # twice is fine


def test_kill(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, conn = fake
    client.kill(timeout=0.1)
    assert stub.packets[-1] == b"k"
    assert conn.closed


def test_kill_running_interrupts_first(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, conn = fake
    client.cont()
    client.kill(timeout=0.1)
    assert stub.packets[-1] == b"k"
    assert stub.violations == []
    assert conn.closed


def test_context_manager() -> None:
    client, _, conn = make_client()
    with client as c:
        assert c is client
    assert conn.closed


# --- timeouts and closed connections -----------------------------------------------------


def test_request_timeout_puts_connection_out_of_step(
    fake: tuple[GdbClient, FakeStub, FakeConnection],
) -> None:
    client, stub, _ = fake
    stub.script[b"p10"] = [None]  # the stub never answers
    start = time.monotonic()
    with pytest.raises(StubTimeoutError, match="p10"):
        client.read_register(RIP)
    assert time.monotonic() - start < 2.0
    with pytest.raises(ConnectionClosedError, match="out of step"):
        client.read_register(RIP)


def test_closed_connection(fake: tuple[GdbClient, FakeStub, FakeConnection]) -> None:
    client, stub, conn = fake
    stub.closed = True
    with pytest.raises(ConnectionClosedError):
        client.read_register(RIP)
    assert conn.closed
    with pytest.raises(ConnectionClosedError):
        client.read_memory(0, 1)


# --- a real socket ---------------------------------------------------------------------------


class SocketStub:
    """FakeStub served by a thread on one end of a socketpair."""

    def __init__(self, stub: FakeStub) -> None:
        self.stub = stub
        self.ours, self.theirs = socket.socketpair()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        self.theirs.settimeout(0.01)
        while not self.done.is_set():
            with self.lock:
                out = self.stub.take()
                if out:
                    self.theirs.sendall(out)
                if self.stub.closed:
                    self.theirs.close()
                    return
            try:
                data = self.theirs.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.stub.receive(data)

    def close(self) -> None:
        self.done.set()
        self.thread.join(2)
        self.theirs.close()


@pytest.fixture
def socket_client() -> Iterator[tuple[GdbClient, FakeStub, SocketStub]]:
    stub = FakeStub()
    server = SocketStub(stub)
    client = GdbClient(Connection(server.ours, timeout=2.0), timeout=2.0)
    try:
        yield client, stub, server
    finally:
        client.close()
        server.close()


def test_socket_round_trips(socket_client: tuple[GdbClient, FakeStub, SocketStub]) -> None:
    client, stub, server = socket_client
    assert client.layout.g_size == G_SIZE
    data = bytes(range(256)) * 20
    client.write_memory(0x100, data)
    assert client.read_memory(0x100, len(data)) == data
    assert client.thread_ids() == [1, 2]
    client.cont()
    deadline = time.monotonic() + 2.0
    while True:  # the stub thread handles 'c' on its own schedule
        with server.lock:
            if stub.running:
                stub.stop(b"T05thread:p01.02;watch:40;")
                break
        assert time.monotonic() < deadline, "the stub never saw 'c'"
        time.sleep(0.001)
    stop = client.wait_stop(2.0)
    assert stop.watch_addr == 0x40 and stop.thread == ThreadId(1, 2)
    client.cont()
    client.interrupt()
    assert client.wait_stop(2.0).signal == 2
    assert stub.violations == []


def test_socket_timeouts(socket_client: tuple[GdbClient, FakeStub, SocketStub]) -> None:
    client, stub, _ = socket_client
    client.cont()
    start = time.monotonic()
    with pytest.raises(StubTimeoutError):
        client.wait_stop(0.1)
    assert 0.09 <= time.monotonic() - start < 1.5
    client.interrupt()
    client.wait_stop()
    stub.script[b"p10"] = [None]
    with pytest.raises(StubTimeoutError):
        client.conn.request(b"p10", timeout=0.1)


def test_socket_eof(socket_client: tuple[GdbClient, FakeStub, SocketStub]) -> None:
    client, stub, server = socket_client
    with server.lock:
        stub.closed = True
    server.thread.join(2)  # the stub has hung up
    with pytest.raises(ConnectionClosedError):
        client.read_registers()
    with pytest.raises(ConnectionClosedError):
        client.read_registers()


def test_connect_unix_and_tcp(tmp_path: Path) -> None:
    with pytest.raises(ConnectionClosedError):
        GdbClient.connect(str(tmp_path / "missing.sock"), timeout=0.5)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    results: list[GdbClient] = []

    def serve() -> None:
        sock, _ = listener.accept()
        server = SocketStub.__new__(SocketStub)
        server.stub = FakeStub()
        server.ours, server.theirs = None, sock  # type: ignore[assignment]
        server.lock = threading.Lock()
        server.done = threading.Event()
        server.serve()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = GdbClient.connect(f"127.0.0.1:{port}", timeout=2.0)
        results.append(client)
        sock = client.conn._sock
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert client.read_register(RIP) == (0xFFF0).to_bytes(8, "little")
    finally:
        for c in results:
            c.close()
        listener.close()
        thread.join(2)
