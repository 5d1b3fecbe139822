"""Stop replies: what the stub says when the target stops.

Pure code. The forms follow the GDB manual, E.3 "Stop Reply Packets":

    S AA                      signal AA
    T AA n1:r1;n2:r2;...      signal AA with registers and stop reasons
    W AA / W AA;process:pid   the process exited with status AA
    X AA / X AA;process:pid   the process was terminated by signal AA
    w AA;tid                  a thread exited with status AA
    N                         no resumed threads are left
    O XX...                   console output (hex), not a stop
    F call-id,parameter...    a File-I/O request from the target

QEMU 7.2 sends ``T05thread:p01.01;`` for breakpoints and single steps,
``T05thread:p01.01;watch:0000000000002000;`` (or ``rwatch``/``awatch``) for
watchpoints, ``T02thread:...;`` after an interrupt and ``W00`` when QEMU
exits; the thread is ``01`` rather than ``p01.01`` when the client did not
offer ``multiprocess+`` in qSupported.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Final

from qprobes.errors import ProtocolError
from qprobes.wire.packet import decode_hex
from qprobes.wire.threads import ThreadId, parse_thread_id

__all__ = [
    "GDB_SIGNAL_INT",
    "GDB_SIGNAL_TRAP",
    "StopKind",
    "StopReply",
    "ThreadId",
    "WatchKind",
    "is_console_output",
    "parse_stop_reply",
]

# GDB's own signal numbers (gdb/include/gdb/signals.def), which stubs use in
# stop replies whatever the host's numbering is.
GDB_SIGNAL_INT: Final = 2
GDB_SIGNAL_TRAP: Final = 5

_HEX_DIGITS: Final = frozenset(b"0123456789abcdefABCDEF")


class StopKind(enum.Enum):
    """Which stop reply form arrived."""

    SIGNAL = "T"  # 'S' or 'T'
    EXITED = "W"
    TERMINATED = "X"
    THREAD_EXITED = "w"
    NO_RESUMED = "N"
    OUTPUT = "O"
    FILE_IO = "F"


class WatchKind(enum.Enum):
    """The stop reason of a watchpoint hit (E.3, ``watch``/``rwatch``/``awatch``)."""

    WATCH = "watch"  # write
    RWATCH = "rwatch"  # read
    AWATCH = "awatch"  # access


@dataclass(frozen=True, slots=True)
class StopReply:
    """A parsed stop reply.

    ``signal`` is the GDB signal number for SIGNAL and TERMINATED stops, and
    0 otherwise; ``exit_status`` is set for EXITED and THREAD_EXITED.
    ``registers`` maps register numbers (as the stub numbers them: the
    target description's ``regnum``) to raw target-order bytes. ``extra``
    keeps every ``name:value`` pair with no field of its own (``library``,
    ``fork``, ``syscall_entry``, ``create``, ...) as text. ``pid`` is the
    process of a W/X reply with ``;process:pid``. ``output`` is the decoded
    text of an O packet.
    """

    kind: StopKind
    signal: int = 0
    thread: ThreadId | None = None
    watch_kind: WatchKind | None = None
    watch_addr: int | None = None
    swbreak: bool = False
    hwbreak: bool = False
    registers: dict[int, bytes] = field(default_factory=dict)
    core: int | None = None
    extra: dict[str, str] = field(default_factory=dict)
    exit_status: int | None = None
    pid: int | None = None
    output: bytes = b""
    packet: bytes = b""

    @property
    def is_watchpoint(self) -> bool:
        return self.watch_kind is not None


def is_console_output(payload: bytes) -> bool:
    """True for an ``O XX...`` console-output packet: ``O`` and hex digits
    (so ``OK`` is not one)."""
    return payload[:1] == b"O" and len(payload) % 2 == 1 and _HEX_DIGITS.issuperset(payload[1:])


def _hex_byte(text: bytes, packet: bytes) -> int:
    if len(text) != 2 or not _HEX_DIGITS.issuperset(text):
        raise ProtocolError("stop reply needs a two-digit hex number", packet)
    return int(text, 16)


def _hex_number(text: bytes, packet: bytes) -> int:
    if not text or not _HEX_DIGITS.issuperset(text):
        raise ProtocolError("malformed hex number in stop reply", packet)
    return int(text, 16)


@functools.lru_cache(maxsize=256)
def _cached_thread_id(text: bytes) -> ThreadId:
    # Stop replies name the same few vCPUs over and over: this is the hot path.
    return parse_thread_id(text)


def _thread(text: bytes, packet: bytes) -> ThreadId:
    try:
        return _cached_thread_id(text)
    except ProtocolError:
        raise ProtocolError("malformed thread id in stop reply", packet) from None


def _parse_t(packet: bytes) -> StopReply:
    signal = _hex_byte(packet[1:3], packet)
    thread: ThreadId | None = None
    watch_kind: WatchKind | None = None
    watch_addr: int | None = None
    swbreak = hwbreak = False
    registers: dict[int, bytes] = {}
    core: int | None = None
    extra: dict[str, str] = {}
    for item in packet[3:].split(b";"):
        if not item:
            continue  # the reply usually ends with ';'
        name, _, value = item.partition(b":")
        if not name:
            raise ProtocolError("stop reply has a pair with no name", packet)
        # "If n is a hexadecimal number, it is a register number" (E.3).
        if _HEX_DIGITS.issuperset(name):
            try:
                registers[int(name, 16)] = decode_hex(value)
            except ProtocolError:
                raise ProtocolError("malformed register value in stop reply", packet) from None
        elif name == b"thread":
            thread = _thread(value, packet)
        elif name in (b"watch", b"rwatch", b"awatch"):
            watch_kind = WatchKind(name.decode())
            watch_addr = _hex_number(value, packet)
        elif name == b"swbreak":
            swbreak = True
        elif name == b"hwbreak":
            hwbreak = True
        elif name == b"core":
            core = _hex_number(value, packet)
        else:
            # library, replaylog, fork, vfork, vforkdone, exec, create,
            # syscall_entry, syscall_return, and anything newer: "GDB
            # should ignore this n:r pair" when it does not know n (E.3).
            extra[name.decode("ascii", "replace")] = value.decode("ascii", "replace")
    return StopReply(
        kind=StopKind.SIGNAL,
        signal=signal,
        thread=thread,
        watch_kind=watch_kind,
        watch_addr=watch_addr,
        swbreak=swbreak,
        hwbreak=hwbreak,
        registers=registers,
        core=core,
        extra=extra,
        packet=packet,
    )


def _parse_exit(packet: bytes, kind: StopKind) -> StopReply:
    number_text, sep, rest = packet[1:].partition(b";")
    number = _hex_byte(number_text, packet)
    pid: int | None = None
    if sep:
        name, colon, value = rest.partition(b":")
        if name != b"process" or not colon:
            raise ProtocolError("expected ';process:pid' in exit reply", packet)
        pid = _hex_number(value, packet)
    if kind is StopKind.EXITED:
        return StopReply(kind=kind, exit_status=number, pid=pid, packet=packet)
    return StopReply(kind=kind, signal=number, pid=pid, packet=packet)


def parse_stop_reply(packet: bytes) -> StopReply:
    """Parse one stop reply payload; raises ProtocolError when it is not one."""
    letter = packet[:1]
    if letter == b"T":
        return _parse_t(packet)
    if letter == b"S":
        if len(packet) != 3:
            raise ProtocolError("'S' stop reply takes exactly a signal number", packet)
        return StopReply(kind=StopKind.SIGNAL, signal=_hex_byte(packet[1:3], packet), packet=packet)
    if letter == b"W":
        return _parse_exit(packet, StopKind.EXITED)
    if letter == b"X":
        return _parse_exit(packet, StopKind.TERMINATED)
    if letter == b"w":
        status_text, sep, tid_text = packet[1:].partition(b";")
        if not sep:
            raise ProtocolError("'w' stop reply needs a thread id", packet)
        return StopReply(
            kind=StopKind.THREAD_EXITED,
            exit_status=_hex_byte(status_text, packet),
            thread=_thread(tid_text, packet),
            packet=packet,
        )
    if packet == b"N":
        return StopReply(kind=StopKind.NO_RESUMED, packet=packet)
    if letter == b"O":
        if not is_console_output(packet):
            raise ProtocolError("malformed console output", packet)
        return StopReply(kind=StopKind.OUTPUT, output=decode_hex(packet[1:]), packet=packet)
    if letter == b"F":
        if len(packet) < 2:
            raise ProtocolError("'F' request without a call", packet)
        return StopReply(
            kind=StopKind.FILE_IO,
            extra={"request": packet[1:].decode("ascii", "replace")},
            packet=packet,
        )
    raise ProtocolError("not a stop reply", packet)
