"""A GDB remote protocol connection: packets over a socket.

Everything rests on three raw methods, ``send_raw``, ``recv_raw`` and
``close_raw`` (the pwntools-tube shape): a fake for tests overrides those
three and inherits the rest.

Acknowledgments (GDB manual, E.1 "Overview" and E.11 "Packet
Acknowledgment"). In ack mode the receiver of a packet answers ``+`` (or
``-`` to have it resent). This class acks each packet it receives, but the
``+`` for a reply that completes a request (and for a stop reply) is held
back and sent in the same write as the next packet: one syscall and one
wake-up of the stub fewer per request. That is safe with QEMU's system-mode
stub, which never waits for an ack before reading on, and with stubs that
do wait, because the held ack goes out before anything else is sent. Acks
for console-output packets, after which more packets are expected, go out
at once.

QEMU 7.2 hazards this class is shaped by (gdbstub.c, ``gdb_read_byte``):
any byte that reaches the stub while the guest runs, other than the ``+``
for its last packet, stops the guest (a stray ``+``, or the ``$`` of a
packet, whose remaining bytes are then dropped). So nothing but 0x03 may
be sent while the target runs, and no ``+`` may be sent twice for one
packet. The stub drops a packet whose payload exceeds 4094 bytes without
any reply; :attr:`Connection.max_payload` guards against sending one.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Final

from qprobes.errors import (
    ConnectionClosedError,
    ProtocolError,
    QprobesError,
    StubTimeoutError,
)
from qprobes.wire.packet import (
    Ack,
    BadChecksum,
    MalformedPacket,
    Nack,
    Packet,
    PacketDecoder,
    decode_hex,
    frame,
)
from qprobes.wire.stop import is_console_output

__all__ = ["Connection"]

_RECV_SIZE: Final = 1 << 16
_MAX_RETRANSMITS: Final = 5
_MAX_UNACKED: Final = 1024


def _poll_ms(timeout: float) -> int | None:
    """A poll() timeout in milliseconds, rounded up (None: forever)."""
    if timeout == math.inf:
        return None
    return max(0, math.ceil(timeout * 1000))


def _shown(payload: bytes) -> bytes:
    return payload if len(payload) <= 40 else payload[:37] + b"..."


def _proc_net_addr(host: str, port: int) -> str | None:
    """``host:port`` spelled as ``/proc/net/tcp{,6}`` spells it."""
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
    except OSError:
        try:
            packed = socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            return None
    # The kernel prints each 32-bit word of the address in host order.
    words = struct.unpack(f"<{len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def tcp_peer_pid(local: tuple[str, int], remote: tuple[str, int],
                 proc: str = "/proc") -> int | None:  # fmt: skip
    """The pid of the process holding the TCP socket from ``remote`` to
    ``local`` on this host (the server side of a loopback connection whose
    client side has these ends), or None."""
    want_local, want_remote = _proc_net_addr(*remote), _proc_net_addr(*local)
    if want_local is None or want_remote is None:
        return None
    inode = None
    for table in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/net/{table}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[1] == want_local and fields[2] == want_remote:
                inode = fields[9]
                break
        if inode is not None:
            break
    if inode is None or inode == "0":
        return None
    link = f"socket:[{inode}]"
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"{entry.path}/fd"):
                try:
                    if os.readlink(fd.path) == link:
                        return int(entry.name)
                except OSError:
                    continue
        except OSError:
            continue
    return None


class Connection:
    """Packets to and from a GDB stub over a connected socket.

    ``timeout`` (seconds) bounds every wait that is not given its own;
    ``math.inf`` waits forever. A wait that runs out raises
    StubTimeoutError; if a request's reply was still due, the connection is
    out of step with the stub and every later call raises
    ConnectionClosedError. EOF or a reset raises ConnectionClosedError.
    """

    def __init__(self, sock: socket.socket | None = None, *, timeout: float = 10.0) -> None:
        self._sock = sock
        # The socket stays non-blocking and waits go through poll(): a
        # settimeout() per wait would cost an ioctl each time.
        self._poller = select.poll()
        if sock is not None:
            sock.setblocking(False)
            self._poller.register(sock.fileno(), select.POLLIN)
        self.timeout = timeout
        self.console_output = bytearray()
        """Decoded ``O`` console output received outside a ``qRcmd``."""
        self.max_payload: int | None = None
        """Largest payload :meth:`send_packet` accepts (None: no limit)."""
        self._decoder = PacketDecoder()
        self._packets: collections.deque[bytes | QprobesError] = collections.deque()
        self._no_ack = False
        self._owed_acks = 0
        self._unacked: collections.deque[bytes] = collections.deque()
        self._retransmits = 0
        self._closed = False
        self._broken: str | None = None

    # --- construction -----------------------------------------------------------

    @classmethod
    def open_unix(cls, path: str, timeout: float = 10.0) -> Connection:
        """Connect to a stub listening on a Unix socket (``-gdb unix:PATH,server=on``)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(None if timeout == math.inf else timeout)
            sock.connect(path)
        except TimeoutError as exc:
            sock.close()
            raise StubTimeoutError(f"connecting to {path}: timed out") from exc
        except OSError as exc:
            sock.close()
            raise ConnectionClosedError(f"cannot connect to {path}: {exc}") from exc
        return cls(sock, timeout=timeout)

    @classmethod
    def open_tcp(cls, host: str, port: int, timeout: float = 10.0) -> Connection:
        """Connect to a stub over TCP (``-gdb tcp::PORT``), with Nagle off:
        the protocol is request/reply with small packets."""
        try:
            sock = socket.create_connection(
                (host, port), timeout=None if timeout == math.inf else timeout
            )
        except TimeoutError as exc:
            raise StubTimeoutError(f"connecting to {host}:{port}: timed out") from exc
        except OSError as exc:
            raise ConnectionClosedError(f"cannot connect to {host}:{port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, timeout=timeout)

    def peer_pid(self) -> int | None:
        """The process at the other end of this connection, when it runs on
        this host and the host says which (None otherwise): ``SO_PEERCRED``
        for a Unix socket; for TCP over loopback, the process holding the
        socket whose ends are this one's swapped (``/proc/net/tcp``)."""
        sock = self._sock
        if sock is None:
            return None
        try:
            if sock.family == socket.AF_UNIX:
                cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                       struct.calcsize("3i"))  # fmt: skip
                pid = int(struct.unpack("3i", cred)[0])
                return pid if pid > 0 else None
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return tcp_peer_pid(sock.getsockname()[:2], sock.getpeername()[:2])
        except OSError:
            return None
        return None

    # --- the raw interface: override these three in a fake -------------------------

    def send_raw(self, data: bytes) -> None:
        """Write all of ``data`` (waiting up to :attr:`timeout` for room)."""
        sock = self._require_socket()
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = sock.send(view)
                except BlockingIOError:
                    writable = select.poll()
                    writable.register(sock.fileno(), select.POLLOUT)
                    if not writable.poll(_poll_ms(self.timeout)):
                        msg = "the stub stopped reading: send timed out"
                        raise StubTimeoutError(msg) from None
                    continue
                view = view[sent:]
        except OSError as exc:
            raise ConnectionClosedError(f"connection to the stub lost: {exc}") from exc

    def recv_raw(self, timeout: float) -> bytes:
        """Read what is available, waiting up to ``timeout`` seconds (0: do
        not wait; ``math.inf``: forever). Returns b"" when the time runs out;
        raises ConnectionClosedError at EOF."""
        sock = self._require_socket()
        try:
            if not self._poller.poll(_poll_ms(timeout)):
                return b""
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise ConnectionClosedError(f"connection to the stub lost: {exc}") from exc
        if not data:
            raise ConnectionClosedError("the stub closed the connection")
        return data

    def close_raw(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._poller.unregister(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def fileno(self) -> int:
        """The socket's descriptor, for select(); -1 without a socket."""
        return -1 if self._sock is None else self._sock.fileno()

    def _require_socket(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionClosedError("connection is closed")
        return self._sock

    # --- state ----------------------------------------------------------------

    @property
    def no_ack(self) -> bool:
        """True once no-acknowledgment mode is on (``QStartNoAckMode``)."""
        return self._no_ack

    @property
    def closed(self) -> bool:
        return self._closed

    def enable_no_ack(self) -> None:
        """Stop acknowledging, after the stub said OK to ``QStartNoAckMode``.

        The OK itself is still acknowledged (E.11), so held acks go out now.
        """
        self.flush_acks()
        self._no_ack = True
        self._unacked.clear()

    def _check_usable(self) -> None:
        if self._closed:
            raise ConnectionClosedError("connection is closed")
        if self._broken is not None:
            raise ConnectionClosedError(f"connection is out of step with the stub: {self._broken}")

    def _lost(self, exc: ConnectionClosedError) -> ConnectionClosedError:
        self._closed = True
        self.close_raw()
        return exc

    # --- sending ----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._owed_acks:
            data = b"+" * self._owed_acks + data
            self._owed_acks = 0
        try:
            self.send_raw(data)
        except ConnectionClosedError as exc:
            raise self._lost(exc) from exc

    def _framed(self, payload: bytes) -> bytes:
        if self.max_payload is not None and len(payload) > self.max_payload:
            raise ValueError(
                f"packet of {len(payload)} bytes exceeds the stub's limit of {self.max_payload}"
            )
        framed = frame(payload)
        if not self._no_ack:
            if len(self._unacked) >= _MAX_UNACKED:
                self._unacked.popleft()  # a stub that never acks: keep the memory bounded
            self._unacked.append(framed)
        return framed

    def send_packet(self, payload: bytes) -> None:
        """Send one packet (with any held acks in the same write)."""
        self._check_usable()
        self._write(self._framed(payload))

    def send_packets(self, payloads: Iterable[bytes]) -> int:
        """Send several packets in one write; returns how many.

        Read their replies with :meth:`recv_replies`. The stub must read
        on while a reply awaits its ack (QEMU's system-mode stub does); a
        ``-`` for any but the oldest packet in flight cannot be repaired and
        raises ProtocolError.
        """
        self._check_usable()
        framed = [self._framed(p) for p in payloads]
        if framed:
            self._write(b"".join(framed))
        return len(framed)

    def send_interrupt(self) -> None:
        """Send a bare 0x03 (E.11 "Interrupts"): the running target stops
        and the stub sends a stop reply."""
        self._check_usable()
        self._write(b"\x03")

    def flush_acks(self) -> None:
        """Send held acks now (needed only before a long silence)."""
        if self._owed_acks and not self._closed:
            self._write(b"")

    # --- receiving ----------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        for event in self._decoder.feed(data):
            if isinstance(event, Packet):
                self._packets.append(event.payload)
            elif isinstance(event, Ack):
                if self._unacked:
                    self._unacked.popleft()
                self._retransmits = 0
            elif isinstance(event, Nack):
                self._on_nack()
            elif isinstance(event, BadChecksum | MalformedPacket):
                if self._no_ack:
                    self._packets.append(event.error())
                else:
                    # Ask again. Held acks are dropped, not sent: QEMU keeps
                    # only its last packet for resending, and a '+' now would
                    # discard the very packet we want again.
                    self._owed_acks = 0
                    self._write(b"-")
            # Interrupt: only a client sends 0x03; ignore it from a stub.

    def _on_nack(self) -> None:
        if self._no_ack or not self._unacked:
            return
        if len(self._unacked) > 1:
            self._broken = "the stub rejected a packet while later ones were in flight"
            self._packets.append(
                ProtocolError("stub rejected a pipelined packet", self._unacked[0])
            )
            return
        self._retransmits += 1
        if self._retransmits > _MAX_RETRANSMITS:
            self._broken = "the stub kept rejecting a packet"
            self._packets.append(ProtocolError("stub keeps rejecting packet", self._unacked[0]))
            return
        self._write(self._unacked[0])

    def _next_packet(self, timeout: float | None, waiting_for: str) -> bytes:
        """The next packet payload, unacknowledged."""
        packets = self._packets
        if not packets:
            limit = self.timeout if timeout is None else timeout
            deadline = time.monotonic() + limit
            while not packets:
                remaining = deadline - time.monotonic()
                try:
                    data = self.recv_raw(remaining if remaining > 0 else 0.0)
                except ConnectionClosedError as exc:
                    raise self._lost(exc) from exc
                if data:
                    self._feed(data)
                elif remaining <= 0:
                    raise StubTimeoutError(f"no {waiting_for} within {limit:g} s")
        item = packets.popleft()
        if isinstance(item, QprobesError):
            raise item
        return item

    def _ack(self) -> None:
        if not self._no_ack:
            self._write(b"+")

    def _hold_ack(self) -> None:
        if not self._no_ack:
            self._owed_acks += 1

    def recv_packet(self, timeout: float | None = None, *, hold_ack: bool = False) -> bytes:
        """The next packet's payload, whatever it is (console output too).

        With ``hold_ack`` its ack goes out with the next write instead of
        now. Raises StubTimeoutError when nothing arrives in time.
        """
        self._check_usable()
        payload = self._next_packet(timeout, "packet from the stub")
        if hold_ack:
            self._hold_ack()
        else:
            self._ack()
        return payload

    def poll_packet(self) -> bytes | None:
        """A packet if one has arrived, without waiting (ack held)."""
        self._check_usable()
        try:
            payload = self._next_packet(0.0, "packet")
        except StubTimeoutError:
            return None
        self._hold_ack()
        return payload

    def _recv_skipping_output(
        self, timeout: float | None, output: bytearray | None, waiting_for: str
    ) -> bytes:
        while True:
            payload = self._next_packet(timeout, waiting_for)
            if is_console_output(payload):
                self._ack()  # more is coming: a stub that waits for acks needs this now
                sink = self.console_output if output is None else output
                sink += decode_hex(payload[1:])
                continue
            self._hold_ack()
            return payload

    def recv_reply(
        self,
        timeout: float | None = None,
        output: bytearray | None = None,
        request: bytes = b"",
    ) -> bytes:
        """The reply to a request, skipping ``O`` console-output packets,
        whose decoded text goes to ``output`` (default
        :attr:`console_output`).

        A timeout here leaves the reply due, so the connection is out of
        step with the stub afterwards (later calls raise
        ConnectionClosedError).
        """
        self._check_usable()
        waiting_for = f"reply to {_shown(request)!r}" if request else "reply"
        try:
            return self._recv_skipping_output(timeout, output, waiting_for)
        except StubTimeoutError as exc:
            self._broken = str(exc)
            raise

    def recv_async(self, timeout: float | None = None) -> bytes:
        """The next packet the stub sends on its own (a stop reply),
        skipping console output into :attr:`console_output`.

        A timeout here leaves the connection usable.
        """
        self._check_usable()
        return self._recv_skipping_output(timeout, None, "stop reply")

    def request(
        self, payload: bytes, timeout: float | None = None, output: bytearray | None = None
    ) -> bytes:
        """Send a packet and return its reply (see :meth:`recv_reply`)."""
        self.send_packet(payload)
        return self.recv_reply(timeout, output, payload)

    def recv_replies(
        self,
        count: int,
        timeout: float | None = None,
        requests: Sequence[bytes] = (),
    ) -> list[bytes]:
        """The replies to ``count`` packets sent with :meth:`send_packets`,
        in order; ``timeout`` bounds the wait for each."""
        replies = []
        for i in range(count):
            request = requests[i] if i < len(requests) else b""
            replies.append(self.recv_reply(timeout, None, request))
        return replies

    def pipeline(self, payloads: Sequence[bytes], timeout: float | None = None) -> list[bytes]:
        """Send all ``payloads`` in one write, then read their replies."""
        count = self.send_packets(payloads)
        return self.recv_replies(count, timeout, payloads)

    # --- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Send held acks (best effort) and close; closing twice is fine."""
        if self._closed:
            return
        try:
            if self._owed_acks and self._broken is None:
                self._write(b"")
        except QprobesError:
            pass  # closing anyway: a lost ack changes nothing now
        finally:
            self._closed = True
            self.close_raw()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
