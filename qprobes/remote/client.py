"""GdbClient: the GDB remote protocol requests qprobes uses, in all-stop mode.

This is the per-probe-hit hot path, so the client sends no packet it can
avoid: the ``Hg`` thread selection and QEMU's physical-memory mode are
cached (QEMU itself moves ``Hg``/``Hc`` to the vCPU that stopped, and the
cache follows), acks ride along with the next packet (see
:mod:`qprobes.remote.connection`), and memory transfers larger than one
packet are pipelined.

What QEMU 7.2's system-mode stub does, as read in its gdbstub.c and checked
against qemu-system-x86_64 7.2:

- No ``QStartNoAckMode`` (its qSupported reply offers ``PacketSize=1000``,
  ``qXfer:features:read+``, ``vContSupported+``, ``multiprocess+``); the
  client uses no-ack mode when a stub offers it.
- ``p``/``P`` answer empty until ``target.xml`` was read on the connection:
  the handshake reads it.
- ``m`` takes at most 2048 bytes (PacketSize / 2; more is ``E22``); a packet
  whose payload exceeds 4094 bytes is dropped with no reply at all.
- ``X`` (binary write) is not implemented: it answers empty. Writes use ``M``.
- ``?`` removes every breakpoint and watchpoint (``handle_target_halt``
  treats it as a new debugger attaching); the handshake sends it once.
- ``vCont;s:T`` single-steps vCPU T alone: the other vCPUs stay stopped
  (``gdb_continue_partial`` resumes only the vCPUs the packet names, and
  ``vm_prepare_start(step_pending=true)`` skips ``resume_all_vcpus``). A
  plain ``s`` steps the ``Hc`` vCPU and resumes all the others, so
  :meth:`GdbClient.step` uses vCont. A vCPU that is halted (``hlt``,
  waiting for INIT/SIPI) does not finish its step until it wakes.
- Connecting stops a running guest, and QEMU then sends an unsolicited
  ``T02`` stop reply, which the handshake skips.
- Stop replies are ``T05thread:p01.01;`` (breakpoint or step),
  ``T05thread:p01.01;watch:ADDR;`` (watchpoints; reported after the
  writing instruction), ``T02thread:...;`` (interrupt).
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Final

from qprobes.errors import (
    ConnectionClosedError,
    MemoryAccessError,
    ProtocolError,
    StubError,
    StubTimeoutError,
    TargetError,
    TargetRunningError,
    UnsupportedError,
)
from qprobes.remote.connection import Connection
from qprobes.wire.features import RegisterLayout, parse_target_description
from qprobes.wire.packet import decode_hex, encode_hex, int_to_le, le_to_int
from qprobes.wire.replies import (
    error_code,
    parse_key_values,
    parse_qsupported,
    parse_qxfer,
    parse_vcont_actions,
)
from qprobes.wire.stop import StopReply, parse_stop_reply
from qprobes.wire.threads import ALL_THREADS, ThreadId, parse_thread_list

__all__ = ["BreakpointType", "GdbClient"]

# The features this client understands (E.5, qSupported).
_QSUPPORTED: Final = b"qSupported:multiprocess+;swbreak+;hwbreak+;vContSupported+"
_DEFAULT_PACKET_SIZE: Final = 400  # what GDB assumes without a PacketSize
_WRITE_CHUNK: Final = 1024  # bytes of data per 'M' (FIELD-NOTES: QEMU drops > 4094-byte packets)
_PIPELINE_BYTES: Final = 64 * 1024  # requests plus replies in flight at once
_MAX_THREAD_PACKETS: Final = 4096


class BreakpointType(enum.IntEnum):
    """The ``type`` field of ``Z``/``z`` packets (E.4)."""

    SOFTWARE = 0
    HARDWARE = 1
    WRITE = 2
    READ = 3
    ACCESS = 4


def _is_stop_reply(payload: bytes) -> bool:
    return len(payload) >= 3 and payload[:1] in (b"T", b"S") and payload[1:3].isalnum()


def _chunks(addr: int, length: int, size: int) -> list[tuple[int, int]]:
    return [(addr + off, min(size, length - off)) for off in range(0, length, size)]


class GdbClient:
    """A connected, handshaken GDB remote protocol client (all-stop mode).

    Threads are the stub's thread ids: for QEMU, vCPU n (from 0) is thread
    n + 1. Every wait is bounded by ``timeout`` unless a call takes its own;
    ``math.inf`` waits forever.

    Errors: ``E NN`` replies raise StubError (MemoryAccessError for memory),
    an empty reply to a request that needs support raises
    UnsupportedError, any other unexpected reply raises ProtocolError;
    a request that needs the target stopped raises TargetRunningError while
    it runs.
    """

    def __init__(self, conn: Connection, timeout: float = 10.0, *, pipelining: bool = True) -> None:
        """Take over ``conn`` and handshake: qSupported, QStartNoAckMode when
        offered, the target description, ``vCont?`` and ``?``.

        ``pipelining`` sends multi-packet memory transfers in one write;
        turn it off for a stub that waits for each ack before reading on.
        The connection is closed if the handshake fails.
        """
        self.conn = conn
        self.timeout = timeout
        conn.timeout = timeout
        self.pipelining = pipelining
        self.supported: dict[str, str | bool] = {}
        self.packet_size = _DEFAULT_PACKET_SIZE
        self.layout = RegisterLayout(())
        self.target_xml: dict[str, bytes] = {}
        """The target description documents read in the handshake, by name."""
        self.vcont_actions: frozenset[str] = frozenset()
        self.read_chunk = _DEFAULT_PACKET_SIZE // 2
        self.write_chunk = _WRITE_CHUNK
        self.last_stop: StopReply | None = None
        self._running = False
        self._multiprocess = False
        self._pid = 1
        self._g_thread: int | None = None
        self._c_thread: int | None = None
        self._stop_thread: int | None = None
        self._phys_mode: bool | None = None  # unknown: QEMU keeps it across connections
        try:
            self.initial_stop = self._handshake()
        except BaseException:
            conn.close()
            raise

    @classmethod
    def connect(cls, address: str | tuple[str, int], timeout: float = 10.0) -> GdbClient:
        """Connect and handshake.

        ``address`` is a Unix socket path, ``"host:port"`` or a
        ``(host, port)`` tuple; QEMU's ``unix:PATH`` and ``tcp:HOST:PORT``
        spellings work too.
        """
        if isinstance(address, tuple):
            host, port = address
            conn = Connection.open_tcp(host, port, timeout)
        elif address.startswith("unix:"):
            conn = Connection.open_unix(address[5:], timeout)
        else:
            text = address[4:] if address.startswith("tcp:") else address
            host, colon, port_text = text.rpartition(":")
            if colon and port_text.isdigit() and "/" not in text:
                conn = Connection.open_tcp(host or "localhost", int(port_text), timeout)
            else:
                conn = Connection.open_unix(address, timeout)
        return cls(conn, timeout)

    # --- handshake ------------------------------------------------------------

    def _handshake(self) -> StopReply:
        conn = self.conn
        reply = conn.request(_QSUPPORTED)
        while _is_stop_reply(reply):
            # QEMU stops a running guest when a client connects and reports
            # it at once, ahead of the reply.
            reply = conn.recv_reply(request=_QSUPPORTED)
        self._raise_if_error(_QSUPPORTED, reply, empty_ok=True)
        self.supported = parse_qsupported(reply)
        size = self.supported.get("PacketSize")
        if isinstance(size, str):
            try:
                self.packet_size = int(size, 16)
            except ValueError:
                raise ProtocolError("malformed PacketSize", reply) from None
        self._multiprocess = self.supported.get("multiprocess") is True
        # Leave room for '$', '#' and the checksum whether or not the stub
        # counts them (QEMU takes at most PacketSize - 2 bytes of payload).
        conn.max_payload = self.packet_size - 4
        self.read_chunk = max(1, self.packet_size // 2)
        header = len(b"M%x,%x:" % (2**64 - 1, _WRITE_CHUNK))
        self.write_chunk = max(1, min(_WRITE_CHUNK, (conn.max_payload - header) // 2))

        if self.supported.get("QStartNoAckMode") is True:
            self._expect_ok(b"QStartNoAckMode")
            conn.enable_no_ack()

        if self.supported.get("qXfer:features:read") is True:
            self.layout = self._read_target_description()

        reply = conn.request(b"vCont?")
        if reply:
            self._raise_if_error(b"vCont?", reply)
            self.vcont_actions = parse_vcont_actions(reply)

        stop = parse_stop_reply(conn.request(b"?"))
        self._note_stop(stop)
        return stop

    def _read_xfer(self, obj: str, annex: str) -> bytes:
        out = bytearray()
        # Ask for as much as a reply packet holds ('m' plus data).
        length = max(1, self.packet_size - 5)
        while True:
            request = f"qXfer:{obj}:read:{annex}:{len(out):x},{length:x}".encode()
            reply = self.conn.request(request)
            self._raise_if_error(request, reply)
            data, more = parse_qxfer(reply)
            out += data
            if not more:
                return bytes(out)
            if not data:
                raise ProtocolError("qXfer reply says more follows but carries nothing", reply)

    def _read_target_description(self) -> RegisterLayout:
        def fetch(name: str) -> bytes:
            text = self._read_xfer("features", name)
            self.target_xml[name] = text
            return text

        return parse_target_description(fetch("target.xml"), fetch, "target.xml")

    # --- replies ----------------------------------------------------------------

    def _raise_if_error(self, request: bytes, reply: bytes, empty_ok: bool = False) -> None:
        if not reply:
            if empty_ok:
                return
            raise UnsupportedError(request)
        code = error_code(reply)
        if code is not None:
            raise StubError(request, code, reply)

    def _unexpected(self, request: bytes, reply: bytes) -> ProtocolError:
        if not reply:
            return UnsupportedError(request)
        code = error_code(reply)
        if code is not None:
            return StubError(request, code, reply)
        shown = request if len(request) <= 40 else request[:37] + b"..."
        return ProtocolError(f"unexpected reply to {shown!r}", reply)

    def _require_stopped(self, what: str) -> None:
        if self._running:
            raise TargetRunningError(f"{what} needs the target stopped, but it is running")

    def _request(self, payload: bytes, what: str) -> bytes:
        self._require_stopped(what)
        return self.conn.request(payload)

    def _expect_ok(self, payload: bytes, what: str = "") -> None:
        reply = self._request(payload, what or payload.decode("ascii", "replace"))
        if reply != b"OK":
            raise self._unexpected(payload, reply)

    def _note_stop(self, stop: StopReply) -> None:
        # QEMU points both Hg and Hc at the vCPU that stopped
        # (gdb_set_stop_cpu); without a thread in the reply, nothing is known.
        thread = stop.thread
        tid = thread.tid if thread is not None and thread.tid > 0 else None
        if thread is not None and thread.pid is not None and thread.pid > 0:
            self._pid = thread.pid
        self._g_thread = self._c_thread = self._stop_thread = tid
        self.last_stop = stop

    def _thread_text(self, thread: int) -> bytes:
        pid = self._pid if self._multiprocess else None
        return ThreadId(pid, thread).format().encode()

    def _exchange(self, requests: Sequence[bytes], reply_size: int) -> list[bytes]:
        """Requests and their replies, pipelined in windows that keep the
        bytes in flight well inside the socket buffers (QEMU blocks its main
        loop while the reply it writes does not fit)."""
        conn = self.conn
        if len(requests) == 1 or not self.pipelining:
            return [conn.request(r) for r in requests]
        replies: list[bytes] = []
        window: list[bytes] = []
        in_flight = 0
        for request in requests:
            cost = len(request) + reply_size + 8
            if window and in_flight + cost > _PIPELINE_BYTES:
                replies += conn.pipeline(window)
                window = []
                in_flight = 0
            window.append(request)
            in_flight += cost
        replies += conn.pipeline(window)
        return replies

    # --- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (QEMU keeps the guest as it is); idempotent."""
        self.conn.close()

    def __enter__(self) -> GdbClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def console_output(self) -> bytearray:
        """Console output (``O`` packets) received outside ``monitor``."""
        return self.conn.console_output

    # --- registers ----------------------------------------------------------------

    def read_registers(self) -> bytes:
        """All registers of the ``Hg`` thread (``g``), laid out as
        :attr:`layout` says."""
        reply = self._request(b"g", "reading registers")
        if not reply or error_code(reply) is not None:
            raise self._unexpected(b"g", reply)
        return decode_hex(reply)

    def write_registers(self, data: bytes) -> None:
        """Write all registers of the ``Hg`` thread (``G``). QEMU applies
        every value, so writing an unchanged cr3 still flushes its TLB:
        prefer :meth:`write_register` for a few registers."""
        self._expect_ok(b"G" + encode_hex(data), "writing registers")

    def read_register(self, regnum: int) -> bytes:
        """One register of the ``Hg`` thread (``p``), raw target-order bytes."""
        request = b"p%x" % regnum
        reply = self._request(request, "reading a register")
        if not reply or error_code(reply) is not None:
            raise self._unexpected(request, reply)
        if b"x" in reply:
            raise TargetError(f"register {regnum} is unavailable")
        value = decode_hex(reply)
        reg = self.layout.find_regnum(regnum)
        if reg is not None and len(value) != reg.size:
            raise ProtocolError(f"register {reg.name} should be {reg.size} bytes", reply)
        return value

    def write_register(self, regnum: int, value: bytes) -> None:
        """Write one register of the ``Hg`` thread (``P``)."""
        reg = self.layout.find_regnum(regnum)
        if reg is not None and len(value) != reg.size:
            raise ValueError(f"register {reg.name} takes {reg.size} bytes, not {len(value)}")
        self._expect_ok(b"P%x=%s" % (regnum, encode_hex(value)), "writing a register")

    def get_reg(self, name: str) -> int:
        """Register ``name`` of the ``Hg`` thread as an unsigned integer."""
        return le_to_int(self.read_register(self.layout.by_name(name).regnum))

    def set_reg(self, name: str, value: int) -> None:
        """Set register ``name`` of the ``Hg`` thread (value masked to its width)."""
        reg = self.layout.by_name(name)
        self.write_register(reg.regnum, int_to_le(value & ((1 << reg.bitsize) - 1), reg.size))

    # --- memory ---------------------------------------------------------------

    def read_memory(self, addr: int, length: int) -> bytes:
        """``length`` bytes at ``addr`` (virtual, of the ``Hg`` vCPU, unless
        physical mode is on), in ``m`` packets of :attr:`read_chunk` bytes.

        Returns all the bytes or raises: MemoryAccessError (carrying the
        refused chunk's address and the bytes read before it) when the stub
        answers ``E NN``.
        """
        if length < 0 or addr < 0 or addr + length > 1 << 64:
            raise ValueError(f"bad memory range {addr:#x}+{length:#x}")
        if length == 0:
            return b""
        self._require_stopped("reading memory")
        pieces = _chunks(addr, length, self.read_chunk)
        requests = [b"m%x,%x" % piece for piece in pieces]
        replies = self._exchange(requests, 2 * self.read_chunk)
        out = bytearray()
        for (piece_addr, piece_len), request, reply in zip(pieces, requests, replies, strict=True):
            code = error_code(reply)
            if code is not None:
                raise MemoryAccessError(request, code, piece_addr, piece_len, bytes(out), reply)
            if not reply:
                raise UnsupportedError(request)
            data = decode_hex(reply)
            if len(data) > piece_len:
                raise ProtocolError(f"stub sent more than the {piece_len} bytes asked", reply)
            out += data
            if len(data) < piece_len:
                # E.4 allows a short 'm' reply: ask for the rest.
                out += self.read_memory(piece_addr + len(data), piece_len - len(data))
        return bytes(out)

    def write_memory(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr`` in ``M`` packets of at most
        :attr:`write_chunk` (1 KiB) bytes; raises MemoryAccessError for the
        first chunk the stub refused (later chunks may have been written)."""
        self.write_memory_many(((addr, data),))

    def write_memory_many(self, writes: Iterable[tuple[int, bytes]]) -> None:
        """Several independent writes, pipelined: one socket write for many
        packets, then all the replies. Raises MemoryAccessError for the
        first refused chunk, after every reply has been read."""
        pieces: list[tuple[int, int]] = []
        requests: list[bytes] = []
        size = self.write_chunk
        for addr, data in writes:
            if addr < 0 or addr + len(data) > 1 << 64:
                raise ValueError(f"bad memory range {addr:#x}+{len(data):#x}")
            for off in range(0, len(data), size):
                piece = data[off : off + size]
                pieces.append((addr + off, len(piece)))
                requests.append(b"M%x,%x:%s" % (addr + off, len(piece), encode_hex(piece)))
        if not requests:
            return
        self._require_stopped("writing memory")
        replies = self._exchange(requests, 8)
        for (piece_addr, piece_len), request, reply in zip(pieces, requests, replies, strict=True):
            if reply == b"OK":
                continue
            code = error_code(reply)
            if code is not None:
                raise MemoryAccessError(request, code, piece_addr, piece_len, b"", reply)
            raise self._unexpected(request, reply)

    # --- breakpoints and watchpoints ---------------------------------------------

    def insert_breakpoint(self, type: BreakpointType, addr: int, kind: int = 1) -> None:
        """``Z``: for breakpoints ``kind`` is the instruction length (1 on
        x86), for watchpoints the watched length."""
        self._expect_ok(b"Z%d,%x,%x" % (type, addr, kind), "inserting a breakpoint")

    def remove_breakpoint(self, type: BreakpointType, addr: int, kind: int = 1) -> None:
        """``z``, the inverse of :meth:`insert_breakpoint`."""
        self._expect_ok(b"z%d,%x,%x" % (type, addr, kind), "removing a breakpoint")

    # --- run control -------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True from a resume until its stop reply has been read."""
        return self._running

    @property
    def stop_thread(self) -> int | None:
        """The thread the last stop reply named, if it named one."""
        return self._stop_thread

    def note_stop_thread(self, thread: int) -> None:
        """Record that the stub has ``thread`` selected for ``Hg`` and ``Hc``,
        as QEMU does for the vCPU that stopped. :meth:`wait_stop` already
        does this from the stop reply's thread."""
        self._g_thread = self._c_thread = self._stop_thread = thread

    def _resume(self, payload: bytes, what: str) -> None:
        self._require_stopped(what)
        self.conn.send_packet(payload)
        self._running = True
        self._g_thread = self._c_thread = None

    def cont(self, thread: int | None = None) -> None:
        """Resume and return at once; :meth:`wait_stop` reads the stop.

        Without ``thread`` every vCPU runs (``c``); with it, only that
        thread runs (``vCont;c:T``) and the others stay stopped.
        """
        if thread is None:
            self._resume(b"c", "continuing")
            return
        if "c" not in self.vcont_actions:
            raise UnsupportedError(b"vCont;c")
        self._resume(b"vCont;c:" + self._thread_text(thread), "continuing")

    def step(self, thread: int | None = None) -> None:
        """Single-step one thread (default: the one that stopped last) and
        return at once; :meth:`wait_stop` reads the stop.

        Uses ``vCont;s:T``: QEMU steps that vCPU alone and keeps the others
        stopped. Interrupts and timers stay masked during the step while
        QEMU's sstep flags include NOIRQ/NOTIMER (the default, 0x7).
        """
        tid = self._stop_thread if thread is None else thread
        if "s" in self.vcont_actions and tid is not None:
            self._resume(b"vCont;s:" + self._thread_text(tid), "stepping")
            return
        # Legacy 's' steps the Hc thread; QEMU then also runs the others.
        if tid is not None:
            self.select_thread("c", tid)
        self._resume(b"s", "stepping")

    def vcont(self, actions: str) -> None:
        """Send ``vCont;ACTIONS`` as given (e.g. ``"s:p1.1;c"``) and return."""
        if actions.startswith("vCont;"):
            actions = actions[6:]
        self._resume(b"vCont;" + actions.encode(), "vCont")

    def wait_stop(self, timeout: float | None = None) -> StopReply:
        """Block until the running target stops and return the stop reply.

        Console output that arrives meanwhile goes to
        :attr:`console_output`. A timeout raises StubTimeoutError and the
        target keeps running (interrupt it, then wait again).
        """
        if not self._running:
            raise TargetError("wait_stop: the target is not running")
        payload = self.conn.recv_async(timeout)
        self._running = False
        stop = parse_stop_reply(payload)
        self._note_stop(stop)
        return stop

    def poll_stop(self) -> StopReply | None:
        """The stop reply if the target has stopped, without waiting."""
        if not self._running:
            raise TargetError("poll_stop: the target is not running")
        try:
            return self.wait_stop(0.0)
        except StubTimeoutError:
            return None

    def interrupt(self) -> None:
        """Send 0x03: the running target stops (reported as signal 2);
        read the stop with :meth:`wait_stop`. If the target stopped on its
        own meanwhile, QEMU ignores the byte and that stop is the one
        reported."""
        if not self._running:
            raise TargetError("interrupt: the target is not running")
        self.conn.send_interrupt()

    def halt_reason(self) -> StopReply:
        """Ask why the target stopped (``?``).

        QEMU 7.2 removes all breakpoints and watchpoints when it gets ``?``.
        """
        stop = parse_stop_reply(self._request(b"?", "asking the halt reason"))
        self._note_stop(stop)
        return stop

    # --- threads ----------------------------------------------------------------

    def select_thread(self, op: str, thread: int) -> None:
        """Select the thread for later ``g`` (register and memory access)
        or ``c`` operations (``Hg``/``Hc``); skipped when already selected."""
        if op not in ("g", "c"):
            raise ValueError(f"thread operation must be 'g' or 'c', not {op!r}")
        current = self._g_thread if op == "g" else self._c_thread
        if current == thread and thread != ALL_THREADS:
            return
        payload = b"H" + op.encode() + self._thread_text(thread)
        try:
            self._expect_ok(payload, "selecting a thread")
        except BaseException:
            if op == "g":
                self._g_thread = None
            else:
                self._c_thread = None
            raise
        if op == "g":
            self._g_thread = thread
        else:
            self._c_thread = thread

    def thread_ids(self) -> list[int]:
        """The stub's threads (QEMU: one per vCPU), from qfThreadInfo/qsThreadInfo."""
        request = b"qfThreadInfo"
        threads: list[ThreadId] = []
        for _ in range(_MAX_THREAD_PACKETS):
            reply = self._request(request, "listing threads")
            self._raise_if_error(request, reply)
            found, more = parse_thread_list(reply)
            threads += found
            if not more:
                break
            request = b"qsThreadInfo"
        else:
            raise ProtocolError("thread list does not end")
        for thread in threads:
            if thread.pid is not None and thread.pid > 0:
                self._pid = thread.pid
                break
        return [t.tid for t in threads]

    # --- QEMU extras ----------------------------------------------------------

    def monitor(self, command: str) -> str:
        """Run a QEMU monitor (HMP) command through ``qRcmd`` and return its
        output, with line ends as ``\\n``."""
        request = b"qRcmd," + encode_hex(command.encode())
        self._require_stopped("a monitor command")
        output = bytearray()
        reply = self.conn.request(request, output=output)
        if reply != b"OK":
            raise self._unexpected(request, reply)
        return output.decode("utf-8", "replace").replace("\r\n", "\n")

    def set_phys_mem_mode(self, enabled: bool) -> None:
        """Make ``m``/``M`` use guest-physical addresses (QEMU's
        ``Qqemu.PhyMemMode``); not sent when the mode is already set."""
        if self._phys_mode is enabled:
            return
        self._expect_ok(b"Qqemu.PhyMemMode:%d" % enabled, "setting the memory mode")
        self._phys_mode = enabled

    @property
    def phys_mem_mode(self) -> bool | None:
        """The physical-memory mode last set, None before any set."""
        return self._phys_mode

    def get_sstep_flags(self) -> int:
        """QEMU's single-step flags (``qqemu.sstep``), see :meth:`sstep_bits`."""
        request = b"qqemu.sstep"
        reply = self._request(request, "reading sstep flags")
        self._raise_if_error(request, reply)
        try:
            return int(reply, 16)
        except ValueError:
            raise ProtocolError("malformed sstep flags", reply) from None

    def set_sstep_flags(self, flags: int) -> None:
        self._expect_ok(b"Qqemu.sstep=%x" % flags, "setting sstep flags")

    def sstep_bits(self) -> dict[str, int]:
        """The meaning of the sstep flag bits (``qqemu.sstepbits``); QEMU 7.2
        says ``{"ENABLE": 1, "NOIRQ": 2, "NOTIMER": 4}``."""
        request = b"qqemu.sstepbits"
        reply = self._request(request, "reading sstep bits")
        self._raise_if_error(request, reply)
        return parse_key_values(reply)

    def detach(self) -> None:
        """Detach (``D``): QEMU removes every breakpoint and resumes the
        guest. The connection is closed afterwards."""
        request = b"D;%x" % self._pid if self._multiprocess else b"D"
        try:
            self._expect_ok(request, "detaching")
        finally:
            self.close()

    def kill(self, timeout: float = 2.0) -> None:
        """Kill the target (``k``: QEMU exits) and close the connection.

        A running target is interrupted first (QEMU drops a packet that
        arrives while the guest runs); StubTimeoutError if it does not
        stop within ``timeout``. A stub that is already gone is fine.
        """
        try:
            if self._running:
                self.interrupt()
                self.wait_stop(timeout)
            self.conn.send_packet(b"k")
            # "The 'k' packet has no reply" (E.4); QEMU exits. Wait briefly
            # for the close so the caller sees the process gone.
            deadline = time.monotonic() + timeout
            with contextlib.suppress(StubTimeoutError, ProtocolError):
                while True:
                    self.conn.recv_packet(max(0.0, deadline - time.monotonic()))
        except ConnectionClosedError:
            pass
        finally:
            self.close()

    # --- for the machine layer ----------------------------------------------------

    @property
    def multiprocess(self) -> bool:
        """True when thread ids go out as ``pPID.TID``."""
        return self._multiprocess
