"""A GDB remote endpoint beside the probes: gdb sees the guest as if no probe were there.

QEMU's gdbstub takes one client, and qprobes is it. :class:`GdbServer`
listens on a socket of its own (TCP or a Unix socket) and serves one gdb at
a time over the same wire codec the client uses
(:mod:`qprobes.wire.packet`), forwarding what gdb asks to QEMU through
qprobes' connection, while the probes keep firing:

* memory reads show each probe site's saved byte, not its int3, and a
  kretprobe's trampoline address in a stack slot as the real return
  address; qprobes' area reads as unmapped (``E14``); a write into a
  probed instruction updates the saved byte and keeps the int3
  (:meth:`~qprobes.probes.engine.KprobeEngine.write_text`);
* doorbell stops are never reported: the engine answers them as always;
  only stops gdb caused (its breakpoints and watchpoints, its Ctrl-C, its
  steps) reach it, and only once every vCPU that was inside qprobes' code
  (a stub, a slot, the trampoline) has been brought to an instruction
  boundary of the guest's own code;
* a single-step runs the guest's own instruction, also at a probe site
  (its int3 is taken out for the step);
* monitor commands that would pull the machine from under qprobes
  (``quit``, ``system_reset``, ``loadvm``, ``stop``, ``cont``...) are refused
  with a line in gdb's console.

The engine's run loop drives it (:attr:`KprobeEngine.poll_hooks`,
``foreign_stop``, ``hold``): while gdb has the guest stopped, the loop is
held inside :meth:`GdbServer.hold` and the probes cannot fire; when gdb
continues, they do. All-stop mode, one gdb thread per vCPU (QEMU's ids).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from qprobes.errors import (
    ConnectionClosedError,
    MemoryAccessError,
    ProbeError,
    ProtocolError,
    QprobesError,
    UnsupportedError,
)
from qprobes.remote.client import BreakpointType
from qprobes.wire.packet import (
    Ack,
    BadChecksum,
    Interrupt,
    MalformedPacket,
    Nack,
    Packet,
    PacketDecoder,
    decode_hex,
    encode_hex,
    escape_binary,
    frame,
    parse_hex_int,
)
from qprobes.wire.stop import GDB_SIGNAL_INT, GDB_SIGNAL_TRAP, StopReply
from qprobes.wire.threads import ALL_THREADS, ANY_THREAD, parse_thread_id

if TYPE_CHECKING:
    from qprobes.probes.engine import KprobeEngine
    from qprobes.probes.kretprobe import KretprobeManager

__all__ = [
    "Backend",
    "EngineBackend",
    "GdbServer",
    "GdbServerError",
    "Listen",
    "hide_probes",
    "monitor_refusal",
    "parse_listen",
    "readable_length",
]

log = logging.getLogger(__name__)

#: What this endpoint offers in reply to ``qSupported`` (E.5). PacketSize
#: as QEMU's (hex 1000 = 4096 bytes); no multiprocess: thread ids are plain.
QSUPPORTED_REPLY: Final = b"PacketSize=1000;qXfer:features:read+;QStartNoAckMode+;vContSupported+"
PACKET_SIZE: Final = 0x1000
#: EFAULT, as gdbserver answers for memory it cannot access.
E_FAULT: Final = b"E14"
E_BAD: Final = b"E01"
#: Text per ``O`` packet (hex doubles it).
_OUTPUT_CHUNK: Final = 1000
#: How long a held loop waits for gdb before it looks at ``stopping()`` again.
_HOLD_POLL: Final = 0.1
#: Replies a gdb may leave unread before it is dropped: they are queued and
#: sent as its socket takes them, never waited for (qprobes' run loop must
#: not block on a gdb that stopped reading).
OUTPUT_LIMIT: Final = 1 << 20

#: Monitor (HMP) commands that would pull the machine from under qprobes:
#: refused (their first word, with HMP's short forms).
REFUSED_MONITOR: Final = {
    "quit": "it would end QEMU, and the guest with it",
    "q": "it would end QEMU, and the guest with it",
    "system_reset": "a reset would reboot the guest under the probes' int3s, stubs and gates",
    "system_powerdown": "it would shut the guest down under the probes",
    "loadvm": "it would replace the guest's memory, and qprobes' changes in it, by a snapshot's",
    "stop": "qprobes runs the guest itself; use gdb's Ctrl-C",
    "s": "qprobes runs the guest itself; use gdb's Ctrl-C",
    "cont": "qprobes runs the guest itself; use gdb's continue",
    "c": "qprobes runs the guest itself; use gdb's continue",
    "gdbserver": "it would take QEMU's gdbstub from qprobes",
    "migrate": "the guest would go on elsewhere without its probes' host",
}


class GdbServerError(QprobesError):
    """The gdb endpoint cannot listen where asked, or its gdb misbehaved."""


# --- pure parts ------------------------------------------------------------------


@dataclass(frozen=True)
class Listen:
    """Where to listen: ``host``/``port`` for TCP, or ``path`` for a Unix socket."""

    host: str = ""
    port: int = 0
    path: str | None = None

    def describe(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}"


def parse_listen(text: str) -> Listen:
    """``HOST:PORT``, ``:PORT`` (localhost), ``unix:PATH`` or a path with a
    ``/`` in it. Raises GdbServerError with the reason."""
    if text.startswith("unix:"):
        if not text[5:]:
            raise GdbServerError("--gdb-listen unix:PATH needs a path")
        return Listen(path=text[5:])
    if "/" in text:
        return Listen(path=text)
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise GdbServerError(
            f"--gdb-listen {text!r}: give HOST:PORT (a port from 0 to 65535), "
            "or unix:PATH for a Unix socket"
        )
    return Listen(host=host.strip("[]") or "127.0.0.1", port=int(port_text))


def readable_length(addr: int, length: int, hidden: Iterable[tuple[int, int]]) -> int:
    """How many bytes from ``addr`` gdb may read before a hidden range
    ``[lo, hi)`` begins (0 when ``addr`` is inside one)."""
    end = addr + length
    for lo, hi in hidden:
        if lo <= addr < hi:
            return 0
        if addr < lo < end:
            end = lo
    return end - addr


def overlaps(addr: int, length: int, hidden: Iterable[tuple[int, int]]) -> bool:
    return any(addr < hi and lo < addr + length for lo, hi in hidden)


def hide_probes(addr: int, data: bytes, saved: dict[int, int],
                returns: dict[int, tuple[int, int]]) -> bytes:  # fmt: skip
    """``data`` read at ``addr`` as the guest would hold it without qprobes:
    each probe site's int3 replaced by its saved byte (``saved``: address ->
    byte), and each stack slot of ``returns`` (slot -> (trampoline, real
    return address)) that holds the trampoline shown holding the real
    return address (also when the read covers only part of the slot)."""
    end = addr + len(data)
    buf = bytearray(data)
    if len(saved) < len(data):
        for site, byte in saved.items():
            if addr <= site < end:
                buf[site - addr] = byte
    else:
        for off in range(len(data)):
            found = saved.get(addr + off)
            if found is not None:
                buf[off] = found
    for slot, (tramp, real) in returns.items():
        lo, hi = max(slot, addr), min(slot + 8, end)
        if lo >= hi:
            continue
        shown, want = tramp.to_bytes(8, "little"), real.to_bytes(8, "little")
        if all(buf[i - addr] == shown[i - slot] for i in range(lo, hi)):
            for i in range(lo, hi):
                buf[i - addr] = want[i - slot]
    return bytes(buf)


def monitor_refusal(command: str) -> str | None:
    """Why a monitor command is refused (None: it may run)."""
    words = command.split()
    if not words:
        return None
    why = REFUSED_MONITOR.get(words[0])
    if why is None:
        return None
    return (f"qprobes: monitor command {words[0]!r} refused while qprobes has probes in the "
            f"guest: {why}\n")  # fmt: skip


def stop_reply(signal: int, thread: int, watch: tuple[str, int] | None = None) -> bytes:
    """A ``T`` stop reply as QEMU words it (E.3)."""
    reply = b"T%02xthread:%02x;" % (signal, thread)
    if watch is not None:
        reply += b"%s:%x;" % (watch[0].encode(), watch[1])
    return reply


def console_packets(text: str) -> list[bytes]:
    """``O`` packets carrying ``text`` to gdb's console."""
    data = text.encode()
    return [b"O" + encode_hex(data[i : i + _OUTPUT_CHUNK])
            for i in range(0, len(data), _OUTPUT_CHUNK)]  # fmt: skip


# --- what the server needs of qprobes ---------------------------------------------


class Backend(Protocol):
    """The guest as the server sees it (guest stopped for every call but
    :meth:`threads` and :meth:`target_xml`). :class:`EngineBackend` is
    qprobes'; tests use a fake."""

    def threads(self) -> list[int]: ...
    def target_xml(self) -> dict[str, bytes]: ...
    def read_registers(self, thread: int) -> bytes: ...
    def write_registers(self, thread: int, data: bytes) -> None: ...
    def read_register(self, thread: int, regnum: int) -> bytes: ...
    def write_register(self, thread: int, regnum: int, value: bytes) -> None: ...
    def rip_register(self) -> tuple[int, int] | None:
        """rip's register number and offset in a ``g`` packet (None: unknown)."""
    def rip(self, thread: int) -> int: ...
    def read_memory(self, thread: int, addr: int, length: int) -> bytes: ...
    def write_memory(self, thread: int, addr: int, data: bytes) -> None: ...
    def saved_text(self) -> dict[int, int]: ...
    def hidden_ranges(self) -> list[tuple[int, int]]: ...
    def return_addresses(self) -> dict[int, tuple[int, int]]: ...
    def insert_point(self, type: int, addr: int, kind: int) -> None: ...
    def remove_point(self, type: int, addr: int, kind: int) -> None: ...
    def monitor(self, command: str) -> str: ...
    def park(self) -> None: ...
    def step(self, thread: int) -> StopReply: ...


class EngineBackend:
    """:class:`Backend` over a :class:`~qprobes.probes.engine.KprobeEngine`
    (and its kretprobes), through qprobes' own gdbstub connection."""

    def __init__(self, engine: KprobeEngine, kretprobes: KretprobeManager | None = None) -> None:
        self.engine = engine
        self.kretprobes = kretprobes if kretprobes is not None else engine.kretprobes
        self._gates: dict[int, int] | None = None

    def threads(self) -> list[int]:
        return self.engine.target.vcpus

    def target_xml(self) -> dict[str, bytes]:
        return self.engine.client.target_xml

    def read_registers(self, thread: int) -> bytes:
        client = self.engine.client
        client.select_thread("g", thread)
        return client.read_registers()

    def write_registers(self, thread: int, data: bytes) -> None:
        client = self.engine.client
        client.select_thread("g", thread)
        client.write_registers(data)

    def read_register(self, thread: int, regnum: int) -> bytes:
        client = self.engine.client
        client.select_thread("g", thread)
        return client.read_register(regnum)

    def write_register(self, thread: int, regnum: int, value: bytes) -> None:
        client = self.engine.client
        client.select_thread("g", thread)
        client.write_register(regnum, value)

    def rip_register(self) -> tuple[int, int] | None:
        reg = self.engine.client.layout.get("rip")
        return (reg.regnum, reg.offset_in_g) if reg is not None else None

    def rip(self, thread: int) -> int:
        return self.engine.target.read_register("rip", thread)

    def read_memory(self, thread: int, addr: int, length: int) -> bytes:
        return self.engine.target.read(addr, length, thread)

    def write_memory(self, thread: int, addr: int, data: bytes) -> None:
        gates = self._gate_bytes()
        if any(addr + i in gates for i in range(len(data))):
            # gdb reads the guest's own gates there; a write would replace
            # qprobes' (its int3s then reach Linux's handler) and be undone
            # at detach.
            raise ProbeError(f"{addr:#x}: gdb may not write the IDT gates qprobes redirected")
        self.engine.write_text(addr, data, thread)

    def saved_text(self) -> dict[int, int]:
        saved = self.engine.saved_text()
        saved.update(self._gate_bytes())
        return saved

    def _gate_bytes(self) -> dict[int, int]:
        """The guest's own IDT gates, byte by byte, where each vCPU's IDTR
        says its IDT is (read once: the gates change only at attach)."""
        if self._gates is None:
            gates = self.engine.saved_gates()
            out: dict[int, int] = {}
            target = self.engine.target
            try:
                for vcpu in target.vcpus:
                    base = target.idt(vcpu).base
                    paddr = target.translate(base, vcpu).paddr
                    for (idt, vector), gate in gates.items():
                        if idt == paddr:
                            out.update((base + 16 * vector + i, b) for i, b in enumerate(gate))
            except QprobesError as exc:
                log.warning("the IDT gates qprobes replaced are shown as they are: %s", exc)
            self._gates = out
        return self._gates

    def hidden_ranges(self) -> list[tuple[int, int]]:
        return self.engine.area_ranges()

    def return_addresses(self) -> dict[int, tuple[int, int]]:
        rp = self.kretprobes
        if rp is None or not rp.live or not self.engine.attached:
            return {}
        tramp = rp.trampoline
        out: dict[int, tuple[int, int]] = {}
        for slot in rp.live:
            real = rp.find_ret_addr(slot)
            if real is not None:
                out[slot] = (tramp, real)
        return out

    def insert_point(self, type: int, addr: int, kind: int) -> None:
        self.engine.client.insert_breakpoint(BreakpointType(type), addr, kind)

    def remove_point(self, type: int, addr: int, kind: int) -> None:
        self.engine.client.remove_breakpoint(BreakpointType(type), addr, kind)

    def monitor(self, command: str) -> str:
        return self.engine.target.monitor(command)

    def park(self) -> None:
        self.engine.park_vcpus()

    def step(self, thread: int) -> StopReply:
        return self.engine.step_original(thread)


# --- one gdb connection ------------------------------------------------------------


class _Peer:
    """Packets to and from one gdb (acks until ``QStartNoAckMode``)."""

    def __init__(self, sock: socket.socket, output_limit: int = OUTPUT_LIMIT) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.decoder = PacketDecoder()
        self.no_ack = False
        self._last = b""
        self._out = bytearray()  # sent to gdb as its socket takes it
        self.output_limit = output_limit

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, timeout: float) -> list[bytes | Interrupt]:
        """What gdb sent, waiting up to ``timeout`` (sending queued replies
        meanwhile); ConnectionClosedError at EOF."""
        ready, writable, _ = select.select([self.sock], [self.sock] if self._out else [], [],
                                           timeout)  # fmt: skip
        if writable:
            self.flush()
        if not ready:
            return []
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise ConnectionClosedError(f"gdb's connection dropped: {exc}") from exc
        if not data:
            raise ConnectionClosedError("gdb closed the connection")
        out: list[bytes | Interrupt] = []
        try:
            events = self.decoder.feed(data)
        except ProtocolError as exc:
            raise ConnectionClosedError(f"gdb sent garbage: {exc}") from exc
        for event in events:
            if isinstance(event, Packet):
                if not self.no_ack:
                    self._write(b"+")
                    # gdb sends nothing after it before the OK; whatever follows is unacked.
                    self.no_ack = event.payload == b"QStartNoAckMode"
                out.append(event.payload)
            elif isinstance(event, Interrupt):
                out.append(event)
            elif isinstance(event, BadChecksum | MalformedPacket):
                if not self.no_ack:
                    self._write(b"-")
            elif isinstance(event, Nack):
                if self._last:
                    self._write(self._last)
            elif isinstance(event, Ack):
                pass
        return out

    def send(self, payload: bytes) -> None:
        self._last = frame(payload)
        self._write(self._last)

    def _write(self, data: bytes) -> None:
        """Queue ``data`` and send what the socket takes now; a gdb that
        leaves more than :attr:`output_limit` bytes unread is dropped."""
        self._out += data
        self.flush()
        if len(self._out) > self.output_limit:
            log.warning("dropping gdb: it stopped reading its replies (%d bytes unread); "
                        "the probes go on", len(self._out))  # fmt: skip
            raise ConnectionClosedError(f"gdb stopped reading its replies ({len(self._out)} "
                                        "bytes unread)")  # fmt: skip

    def flush(self) -> None:
        """Send queued replies, as much as the socket takes without waiting."""
        try:
            while self._out:
                try:
                    sent = self.sock.send(self._out)
                except BlockingIOError:
                    return
                del self._out[:sent]
        except OSError as exc:
            raise ConnectionClosedError(f"gdb's connection dropped: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(ConnectionClosedError):
            self.flush()  # the last replies, if the socket takes them now
        with contextlib.suppress(OSError):
            self.sock.close()


# Packets answered while the guest runs; every other one waits for a hold.
_RUNNING_SAFE: Final = (
    b"qSupported", b"QStartNoAckMode", b"qXfer:features:read:", b"vCont?", b"qAttached",
    b"vMustReplyEmpty", b"qTStatus", b"qTfV", b"qTsV", b"qTfP", b"qTsP", b"qOffsets",
    b"qSymbol", b"QThreadEvents", b"QProgramSignals", b"QPassSignals", b"QNonStop",
    b"QDisableRandomization", b"QEnvironment", b"QSetWorkingDir", b"QStartupWithShell",
    b"QCatchSyscalls", b"QAgent", b"qL", b"qP", b"!", b"H",
)  # fmt: skip


class GdbServer:
    """A GDB remote endpoint for the guest that ``backend`` serves.

    ``request_hold()`` asks the run loop to stop the guest and call
    :meth:`hold`; ``stopping()`` true makes a hold give the guest back (qprobes
    is ending). :meth:`poll` is the run loop's poll hook, :meth:`foreign_stop`
    its hook for stops that are not doorbells.
    """

    def __init__(self, backend: Backend, listen: Listen | str, *,
                 request_hold: Callable[[], None] = lambda: None,
                 stopping: Callable[[], bool] | None = None) -> None:  # fmt: skip
        self.backend = backend
        self.listen = parse_listen(listen) if isinstance(listen, str) else listen
        self.request_hold = request_hold
        self.stopping = stopping
        self._listener = self._open(self.listen)
        self._socket_file = self._file_id(self.listen.path)  # ours to unlink at close
        self._peer: _Peer | None = None
        self._pending: collections.deque[bytes] = collections.deque()
        self._points: list[tuple[int, int, int]] = []  # gdb's Z points in QEMU
        self._orphans: list[tuple[int, int, int]] = []  # left by a gdb that went away
        self._reason: StopReply | None = None
        self._interrupt = False  # gdb typed Ctrl-C while the guest ran for it
        self._waiting = False  # gdb continued and waits for a stop reply
        self._parking = False
        self._held = False
        self._g_thread = 0
        self._c_thread = 0
        self._last_reply = b""
        self.connections = 0
        """gdb connections accepted so far."""
        self.closed = False

    # --- the listening socket -----------------------------------------------------

    @staticmethod
    def _file_id(path: str | None) -> tuple[int, int] | None:
        if path is None:
            return None
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    @staticmethod
    def _remove_stale(path: str) -> None:
        """Take out a socket an earlier run left at ``path`` (nobody listens
        there: connect() is refused); refuse anything else found there."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise GdbServerError(f"cannot listen for gdb on {path}: it exists and is not a "
                                 "socket")  # fmt: skip
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)  # (a listener with a full backlog keeps connect() waiting)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nobody listens
            return
        except TimeoutError:
            pass  # a listener, its backlog full
        except OSError as exc:
            raise GdbServerError(f"cannot listen for gdb on {path}: a socket is there "
                                 f"({exc.strerror or exc})") from exc  # fmt: skip
        finally:
            probe.close()
        raise GdbServerError(f"cannot listen for gdb on {path}: another process listens there")

    @classmethod
    def _open(cls, where: Listen) -> socket.socket:
        try:
            if where.path is not None:
                cls._remove_stale(where.path)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.bind(where.path)
                except OSError:
                    sock.close()
                    raise
            else:
                sock = socket.create_server((where.host, where.port))
        except OSError as exc:
            raise GdbServerError(f"cannot listen for gdb on {where.describe()}: "
                                 f"{exc.strerror or exc}") from exc  # fmt: skip
        sock.listen(1)
        sock.setblocking(False)
        return sock

    @property
    def address(self) -> str:
        """What to give gdb's ``target remote``."""
        if self.listen.path is not None:
            return self.listen.path
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    @property
    def connected(self) -> bool:
        return self._peer is not None

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        if self._peer is not None:
            # One gdb at a time, as QEMU's stub.
            with contextlib.suppress(OSError):
                sock.sendall(frame(b"O" + encode_hex(b"qprobes: another gdb is attached\n")))
                sock.close()
            return
        if self._orphans and not self._held:
            self.request_hold()
        self._peer = _Peer(sock)
        self.connections += 1
        self._pending.clear()
        self._waiting = self._interrupt = False
        self._g_thread = self._c_thread = 0
        self._last_reply = b""
        log.info("gdb connected to %s", self.address)

    # --- hooks of the run loop -------------------------------------------------------

    def poll(self, running: bool = True) -> None:
        """Read what gdb sent; ask for a hold when something needs the guest stopped."""
        if self.closed:
            return
        self._accept()
        if self._peer is None:
            return
        for item in self._read(0.0):
            if isinstance(item, Interrupt):
                if self._waiting:
                    self._interrupt = True
                    self.request_hold()
                continue
            # (Nothing is answered ahead of a stop reply gdb waits for.)
            if not self._pending and not self._waiting and item.startswith(_RUNNING_SAFE) \
                    and not item.startswith(b"qRcmd"):  # fmt: skip
                try:
                    self._reply(self._answer_running(item))
                except QprobesError as exc:
                    log.info("gdb's %r failed: %s", item[:40], exc)
                    self._reply(E_BAD)
                continue
            self._pending.append(item)
            self.request_hold()

    def _read(self, timeout: float) -> list[bytes | Interrupt]:
        peer = self._peer
        if peer is None:
            return []
        try:
            return peer.read(timeout)
        except ConnectionClosedError as exc:
            log.info("gdb went away: %s", exc)
            self._drop_peer()
            return []

    def _reply(self, payload: bytes | None) -> None:
        if payload is None or self._peer is None:
            return
        try:
            self._peer.send(payload)
        except ConnectionClosedError as exc:
            log.info("gdb went away: %s", exc)
            self._drop_peer()

    def _drop_peer(self) -> None:
        if self._peer is not None:
            self._peer.close()
            self._peer = None
        self._pending.clear()
        self._waiting = self._interrupt = False
        if self._points:
            # Its breakpoints stay in QEMU until the guest is stopped to take them out.
            self._orphans += self._points
            self._points = []
            if not self._held:
                self.request_hold()

    def foreign_stop(self, stop: StopReply) -> bool:
        """The engine's hook for a stop that is not a doorbell: true when it
        is gdb's (its breakpoint, watchpoint or Ctrl-C); the hold follows."""
        if not self._points and not self._interrupt:
            return False
        if not self._is_gdbs(stop):
            return False
        if self._reason is None:
            self._reason = stop
        if not self._parking:
            self.request_hold()
        return True

    def _thread_of(self, stop: StopReply | None) -> int:
        if stop is not None and stop.thread is not None and stop.thread.tid > 0:
            return stop.thread.tid
        return self.backend.threads()[0]

    def _watch_of(self, stop: StopReply) -> tuple[str, int] | None:
        if stop.watch_addr is None or stop.watch_kind is None:
            return None
        for type_, addr, kind in self._points:
            if type_ >= BreakpointType.WRITE and addr <= stop.watch_addr < addr + max(kind, 1):
                return stop.watch_kind.value, stop.watch_addr
        return None

    def _is_gdbs(self, stop: StopReply) -> bool:
        if stop.signal == GDB_SIGNAL_INT:
            return self._interrupt
        if stop.signal != GDB_SIGNAL_TRAP:
            return False
        if stop.watch_addr is not None:
            return self._watch_of(stop) is not None
        breaks = {addr for type_, addr, _ in self._points if type_ < BreakpointType.WRITE}
        if not breaks:
            return False
        try:
            return self.backend.rip(self._thread_of(stop)) in breaks
        except QprobesError:
            return False

    def hold(self, stop: StopReply | None) -> None:
        """Serve gdb with the guest stopped, until gdb resumes it, leaves,
        or qprobes stops. ``stop`` is why the guest stopped if the run loop
        interrupted it (None after a stop it handled)."""
        reason, self._reason = self._reason, None
        if reason is None and stop is not None and (stop.signal == GDB_SIGNAL_INT
                                                    or self._is_gdbs(stop)):  # fmt: skip
            reason = stop
        self._held = True
        try:
            self._take_out_orphans()
            if self._peer is None:
                return
            self._parking = True
            try:
                self.backend.park()
            finally:
                self._parking = False
            trap = reason is not None and reason.signal == GDB_SIGNAL_TRAP
            signal = GDB_SIGNAL_TRAP if trap else GDB_SIGNAL_INT
            thread = self._thread_of(reason if reason is not None else stop)
            watch = self._watch_of(reason) if reason is not None else None
            self._last_reply = stop_reply(signal, thread, watch)
            self._g_thread = self._c_thread = thread
            if self._waiting or self._interrupt:
                self._waiting = self._interrupt = False
                self._reply(self._last_reply)
            self._serve_held()
        finally:
            self._take_out_orphans()  # of a gdb that went away meanwhile
            self._held = False
            self._reason = None

    def _take_out_orphans(self) -> None:
        orphans, self._orphans = self._orphans, []
        for point in orphans:
            with contextlib.suppress(QprobesError):
                self.backend.remove_point(*point)

    def _serve_held(self) -> None:
        while self._peer is not None:
            while self._pending:
                if self._answer_held(self._pending.popleft()):
                    return
                if self._peer is None:
                    return
            if self.stopping is not None and self.stopping():
                return
            for item in self._read(_HOLD_POLL):
                if isinstance(item, bytes):
                    self._pending.append(item)

    # --- packets ---------------------------------------------------------------------

    def _answer_running(self, packet: bytes) -> bytes | None:
        """Packets that need nothing of the guest."""
        if packet.startswith(b"qSupported"):
            return QSUPPORTED_REPLY
        if packet == b"QStartNoAckMode":
            self._reply(b"OK")
            if self._peer is not None:
                self._peer.no_ack = True
            return None
        if packet.startswith(b"qXfer:features:read:"):
            return self._xfer_features(packet[len(b"qXfer:features:read:") :])
        if packet == b"vCont?":
            return b"vCont;c;C;s;S"
        if packet.startswith(b"qAttached"):
            return b"1"
        if packet.startswith(b"qSymbol"):
            return b"OK"
        if packet[:1] == b"H":
            return self._select_thread(packet)
        return b""

    def _xfer_features(self, args: bytes) -> bytes:
        annex, _, span = args.rpartition(b":")
        docs = self.backend.target_xml()
        doc = docs.get(annex.decode("ascii", "replace"))
        if doc is None:
            return b"E00"
        try:
            off_text, _, len_text = span.partition(b",")
            off, length = parse_hex_int(off_text), parse_hex_int(len_text)
        except ProtocolError:
            return E_BAD
        piece = doc[off : off + min(length, PACKET_SIZE // 2)]
        more = off + len(piece) < len(doc)
        return (b"m" if more else b"l") + escape_binary(piece)

    def _thread(self, text: bytes) -> int | None:
        """A thread id gdb named, as a vCPU thread (0 and -1: the current one)."""
        try:
            tid = parse_thread_id(text).tid
        except ProtocolError:
            return None
        threads = self.backend.threads()
        if tid in (ANY_THREAD, ALL_THREADS):
            return ANY_THREAD
        return tid if tid in threads else None

    def _select_thread(self, packet: bytes) -> bytes:
        op, tid = packet[1:2], self._thread(packet[2:])
        if op not in (b"g", b"c") or tid is None:
            return E_BAD
        if op == b"g":
            self._g_thread = tid
        else:
            self._c_thread = tid
        return b"OK"

    def _current(self, which: int) -> int:
        return which if which > 0 else self.backend.threads()[0]

    def _answer_held(self, packet: bytes) -> bool:
        """Answer one packet with the guest stopped; True when gdb resumed it
        (or left)."""
        try:
            outcome = self._dispatch(packet)
        except QprobesError as exc:
            log.info("gdb's %r failed: %s", packet[:40], exc)
            outcome = E_BAD
        if outcome is True:
            return True
        self._reply(outcome if isinstance(outcome, bytes) else None)
        return False

    def _dispatch(self, packet: bytes) -> bytes | bool | None:
        letter = packet[:1]
        if packet.startswith(_RUNNING_SAFE) and not packet.startswith(b"qRcmd"):
            return self._answer_running(packet)
        if letter == b"?":
            return self._last_reply or stop_reply(GDB_SIGNAL_INT, self._current(self._g_thread))
        if letter == b"g":
            return encode_hex(self.backend.read_registers(self._current(self._g_thread)))
        if letter == b"G":
            thread, data = self._current(self._g_thread), decode_hex(packet[1:])
            rip = self.backend.rip_register()
            refused = self._refuse_rip(thread, data[rip[1] : rip[1] + 8]) if rip else None
            if refused is not None:
                return refused
            self.backend.write_registers(thread, data)
            return b"OK"
        if letter == b"p":
            return self._read_register(packet[1:])
        if letter == b"P":
            regnum_text, _, value_text = packet[1:].partition(b"=")
            thread, regnum = self._current(self._g_thread), parse_hex_int(regnum_text)
            value = decode_hex(value_text)
            rip = self.backend.rip_register()
            refused = self._refuse_rip(thread, value) if rip and regnum == rip[0] else None
            if refused is not None:
                return refused
            self.backend.write_register(thread, regnum, value)
            return b"OK"
        if letter == b"m":
            return self._read_memory(packet[1:])
        if letter == b"M":
            return self._write_memory(packet[1:])
        if letter in (b"Z", b"z"):
            return self._breakpoint(letter == b"Z", packet[1:])
        if letter in (b"c", b"C"):
            self._waiting = True
            return True
        if letter in (b"s", b"S"):
            return self._step(self._current(self._c_thread))
        if packet.startswith(b"vCont;"):
            return self._vcont(packet[6:])
        if letter == b"T":
            return b"OK" if self._thread(packet[1:]) not in (None, ANY_THREAD) else E_BAD
        if packet == b"qfThreadInfo":
            return b"m" + b",".join(b"%02x" % t for t in self.backend.threads())
        if packet == b"qsThreadInfo":
            return b"l"
        if packet == b"qC":
            return b"QC%02x" % self._current(self._g_thread)
        if packet.startswith(b"qThreadExtraInfo,"):
            tid = self._thread(packet[len(b"qThreadExtraInfo,") :])
            if tid in (None, ANY_THREAD):
                return E_BAD
            assert tid is not None
            return encode_hex(f"CPU#{tid - 1} [running]".encode())
        if packet.startswith(b"qRcmd,"):
            return self._monitor(packet[6:])
        if letter == b"D":
            self._detach_gdb(b"OK")
            return True
        if letter == b"k" or packet.startswith(b"vKill"):
            self._reply_console("qprobes: the guest is not killed; gdb is detached from it\n")
            self._detach_gdb(b"OK" if letter == b"v" else None)
            return True
        return b""

    def _refuse_rip(self, thread: int, value: bytes) -> bytes | None:
        """The error reply refusing a write of ``value`` to ``thread``'s rip,
        or None when it may go: qprobes' area (stubs, slots, detour buffers,
        trampolines) is no place for a vCPU gdb sends, its code expects the
        host's answers and reads as unmapped to gdb.

        The reason goes in the reply itself (``E.errtext``, E.1 "Standard
        Replies"; gdb prints it in its "remote failure reply" error): an
        ``O`` packet is no answer to ``G``/``P`` (gdb would take it for
        the reply), and goes to qprobes' log too."""
        if len(value) < 8:
            return None
        rip = int.from_bytes(value[:8], "little")
        if not overlaps(rip, 1, self.backend.hidden_ranges()):
            return None
        why = (f"qprobes refused to set thread {thread}'s rip to {rip:#x}: that is qprobes' "
               "own code (stubs, instruction slots, trampolines)")  # fmt: skip
        log.warning("%s", why)
        return b"E." + why.encode("ascii")

    def _read_register(self, text: bytes) -> bytes:
        try:
            return encode_hex(self.backend.read_register(self._current(self._g_thread),
                                                         parse_hex_int(text)))  # fmt: skip
        except UnsupportedError:
            return b""

    def _parse_span(self, text: bytes) -> tuple[int, int, bytes]:
        span, _, data = text.partition(b":")
        addr_text, _, len_text = span.partition(b",")
        return parse_hex_int(addr_text), parse_hex_int(len_text), data

    def _read_memory(self, text: bytes) -> bytes:
        addr, length, _ = self._parse_span(text)
        length = min(length, PACKET_SIZE // 2)
        n = readable_length(addr, length, self.backend.hidden_ranges())
        if n == 0:
            return E_FAULT if length else b""
        try:
            data = self.backend.read_memory(self._current(self._g_thread), addr, n)
        except MemoryAccessError as exc:
            data = exc.partial
        except QprobesError:
            data = b""
        if not data:
            return E_FAULT
        return encode_hex(hide_probes(addr, data, self.backend.saved_text(),
                                      self.backend.return_addresses()))  # fmt: skip

    def _write_memory(self, text: bytes) -> bytes:
        addr, length, hex_data = self._parse_span(text)
        data = decode_hex(hex_data)
        if len(data) != length:
            return E_BAD
        if overlaps(addr, length, self.backend.hidden_ranges()):
            return E_FAULT
        try:
            self.backend.write_memory(self._current(self._g_thread), addr, data)
        except QprobesError:
            return E_FAULT
        return b"OK"

    def _breakpoint(self, insert: bool, text: bytes) -> bytes:
        fields = text.split(b";", 1)[0].split(b",")
        if len(fields) != 3:
            return E_BAD
        type_, addr, kind = (parse_hex_int(f) for f in fields)
        if type_ > BreakpointType.ACCESS:
            return b""
        point = (type_, addr, kind)
        if insert:
            if overlaps(addr, max(kind, 1), self.backend.hidden_ranges()):
                return E_FAULT
            try:
                self.backend.insert_point(*point)
            except UnsupportedError:
                return b""
            self._points.append(point)
            return b"OK"
        if point not in self._points:
            return b"OK"
        self._points.remove(point)
        self.backend.remove_point(*point)
        return b"OK"

    def _step(self, thread: int) -> bytes:
        self._parking = True
        try:
            self.backend.step(thread)
        finally:
            self._parking = False
        self._g_thread = self._c_thread = thread
        self._last_reply = stop_reply(GDB_SIGNAL_TRAP, thread)
        return self._last_reply

    def _vcont(self, text: bytes) -> bytes | bool:
        actions = []
        for item in text.split(b";"):
            action, _, tid_text = item.partition(b":")
            tid = self._thread(tid_text) if tid_text else ANY_THREAD
            if tid is None or action[:1] not in (b"c", b"C", b"s", b"S", b"t"):
                return E_BAD
            actions.append((action[:1], tid))
        for action, tid in actions:
            if action in (b"s", b"S"):
                # The step runs with every other vCPU stopped.
                return self._step(tid if tid else self._current(self._c_thread))
        if any(action in (b"c", b"C") for action, _ in actions):
            self._waiting = True
            return True
        return b"OK"

    def _monitor(self, hex_command: bytes) -> bytes:
        command = decode_hex(hex_command).decode("utf-8", "replace").strip()
        refusal = monitor_refusal(command)
        if refusal is not None:
            self._reply_console(refusal)
            return b"OK"
        try:
            output = self.backend.monitor(command)
        except QprobesError as exc:
            output = f"qprobes: monitor command failed: {exc}\n"
        self._reply_console(output)
        return b"OK"

    def _reply_console(self, text: str) -> None:
        for packet in console_packets(text):
            self._reply(packet)

    def _detach_gdb(self, reply: bytes | None) -> None:
        points, self._points = self._points, []
        for point in points:
            with contextlib.suppress(QprobesError):
                self.backend.remove_point(*point)
        self._reply(reply)
        if self._peer is not None:
            self._peer.close()
            self._peer = None
        self._pending.clear()
        self._waiting = self._interrupt = False
        log.info("gdb detached")

    # --- the end ---------------------------------------------------------------------

    def close(self, message: str = "qprobes: detaching from the guest; this gdb endpoint "
              "closes\n") -> None:  # fmt: skip
        """End the endpoint (the guest stopped): gdb's breakpoints out of
        QEMU, ``message`` to gdb's console, the connection and the listening
        socket closed."""
        if self.closed:
            return
        self.closed = True
        if self._peer is not None:
            self._reply_console(message)
        self._detach_gdb(None)
        self._take_out_orphans()
        with contextlib.suppress(OSError):
            self._listener.close()
        path = self.listen.path
        if path is not None and self._socket_file is not None \
                and self._file_id(path) == self._socket_file:  # fmt: skip
            # (Only the socket this endpoint made: not one that replaced it.)
            with contextlib.suppress(OSError):
                os.unlink(path)


def serve(engine: KprobeEngine, listen: Listen | str, *,
          kretprobes: KretprobeManager | None = None,
          stopping: Callable[[], bool] | None = None) -> GdbServer:  # fmt: skip
    """A :class:`GdbServer` for ``engine``'s guest, plugged into its run loop."""

    def request_hold() -> None:
        engine.hold_requested = True

    server = GdbServer(EngineBackend(engine, kretprobes), listen, request_hold=request_hold,
                       stopping=stopping)  # fmt: skip
    engine.foreign_stop = server.foreign_stop
    engine.hold = server.hold
    engine.poll_hooks.append(server.poll)
    return server


def unplug(engine: KprobeEngine, server: GdbServer) -> None:
    """Take ``server``'s hooks out of ``engine``'s run loop."""
    if engine.foreign_stop == server.foreign_stop:
        engine.foreign_stop = None
    if engine.hold == server.hold:
        engine.hold = None
    with contextlib.suppress(ValueError):
        engine.poll_hooks.remove(server.poll)
    engine.hold_requested = False
