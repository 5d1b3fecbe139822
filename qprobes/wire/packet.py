"""The GDB remote serial protocol at the byte level: framing, checksums,
escaping, run-length encoding and hex.

Pure code, no I/O. Every rule cites the GDB manual, appendix E "GDB Remote
Serial Protocol", section E.1 "Overview" unless noted otherwise.

The common case (a short hex payload with no escapes and no run-length
encoding) goes through bytes methods only: no loop over bytes in Python.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import Final

from qprobes.errors import ChecksumError, ProtocolError

__all__ = [
    "ACK",
    "INTERRUPT",
    "NACK",
    "Ack",
    "BadChecksum",
    "Event",
    "Interrupt",
    "MalformedPacket",
    "Nack",
    "Packet",
    "PacketDecoder",
    "checksum",
    "decode_hex",
    "decode_rle",
    "encode_hex",
    "escape_binary",
    "frame",
    "int_to_le",
    "le_to_int",
    "parse_hex_int",
    "unescape_binary",
]

# "The bytes 0x23 (ASCII '#'), 0x24 (ASCII '$'), and 0x7d (ASCII '}') must
# always be escaped. Responses sent by the stub must also escape 0x2a (ASCII
# '*'), so that it is not interpreted as the start of a run-length encoded
# sequence" (E.1, binary data).
_ESCAPE: Final = 0x7D
_MUST_ESCAPE = re.compile(rb"[#$}*]")
_ESCAPED = re.compile(rb"}(.)", re.DOTALL)

# The largest packet the decoder buffers while waiting for its '#'. A stub
# never sends this much in one packet; more means the stream is garbage.
MAX_FRAME: Final = 1 << 22

# Hex numbers are hex digits only: int(text, 16) would also take
# whitespace, a sign, a 0x prefix and '_' separators.
_HEX_NUMBER = re.compile(rb"[0-9a-fA-F]+")


def checksum(payload: bytes) -> int:
    """The packet checksum: "the unsigned sum of all the characters in the
    packet data modulo 256" (E.1)."""
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    """Frame ``payload`` as ``$payload#cc``.

    The payload goes out as given: escape binary data first with
    :func:`escape_binary`.
    """
    return b"$%s#%02x" % (payload, sum(payload) & 0xFF)


def escape_binary(data: bytes) -> bytes:
    """Escape binary data for an ``X``-style packet: each of ``#$}*``
    becomes ``}`` followed by the byte XOR 0x20 (E.1, binary data)."""
    if _MUST_ESCAPE.search(data) is None:
        return data
    return _MUST_ESCAPE.sub(lambda m: bytes((_ESCAPE, m[0][0] ^ 0x20)), data)


def unescape_binary(data: bytes) -> bytes:
    """Undo :func:`escape_binary` on binary reply data (``x``, ``qXfer``).

    Raises ProtocolError when the data ends inside an escape.
    """
    if b"}" not in data:
        return data
    if data.endswith(b"}") and (len(data) - len(data.rstrip(b"}"))) % 2:
        raise ProtocolError("binary data ends inside an escape", data)
    return _ESCAPED.sub(lambda m: bytes((m[1][0] ^ 0x20,)), data)


class _RleError(ValueError):
    pass


def _expand_rle(payload: bytes) -> bytes:
    out = bytearray()
    start = 0
    while True:
        star = payload.find(b"*", start)
        if star < 0:
            out += payload[start:]
            return bytes(out)
        out += payload[start:star]
        if not out or star + 1 >= len(payload):
            raise _RleError("run-length encoding without a character or a count")
        # The count is a printable character ('#' and '$' excluded, E.1);
        # like GDB's read_frame, accept any count that repeats at least once.
        count = payload[star + 1] - 29
        if count < 1 or payload[star + 1] > 126:
            raise _RleError("invalid run-length count")
        out += out[-1:] * count
        start = star + 2


def decode_rle(payload: bytes) -> bytes:
    """Expand run-length encoding: ``c*n`` stands for ``c`` followed by
    ``ord(n) - 29`` more copies of ``c`` (E.1, "Response data can be
    run-length encoded"; GDB's ``read_frame`` computes ``c - ' ' + 3``).

    Expansion applies to the frame as sent, before binary unescaping, like
    GDB does. Raises ProtocolError on a ``*`` with nothing to repeat or no
    valid count.
    """
    if b"*" not in payload:
        return payload
    try:
        return _expand_rle(payload)
    except _RleError as exc:
        raise ProtocolError(str(exc), payload) from None


def encode_hex(data: bytes) -> bytes:
    """Lower-case hex digits, two per byte, as the protocol sends data."""
    return binascii.hexlify(data)


def decode_hex(text: bytes) -> bytes:
    """Decode hex digits to bytes; raises ProtocolError on malformed text."""
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"malformed hex data: {exc}", text) from exc


def parse_hex_int(text: bytes) -> int:
    """Parse an unsigned big-endian hex number (addresses, lengths, register
    numbers); raises ProtocolError on anything else."""
    if _HEX_NUMBER.fullmatch(text) is None:
        raise ProtocolError("malformed hex number", text)
    return int(text, 16)


def le_to_int(data: bytes, signed: bool = False) -> int:
    """Register values travel in target byte order: little endian on x86."""
    return int.from_bytes(data, "little", signed=signed)


def int_to_le(value: int, size: int) -> bytes:
    """``value`` as ``size`` little-endian bytes; negative values wrap
    (two's complement), too-large values raise OverflowError."""
    if value < 0:
        value &= (1 << (8 * size)) - 1
    return value.to_bytes(size, "little")


# --- events of the incremental decoder ---------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """A ``+``: the peer received a packet intact."""


@dataclass(frozen=True, slots=True)
class Nack:
    """A ``-``: the peer wants the last packet again."""


@dataclass(frozen=True, slots=True)
class Interrupt:
    """A bare 0x03 byte (E.1 and E.11 "Interrupts"); only a client sends it."""


@dataclass(frozen=True, slots=True)
class Packet:
    """A packet with a good checksum. ``payload`` is run-length expanded but
    still binary-escaped (unescape with :func:`unescape_binary` when the
    request returns binary data)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class BadChecksum:
    """A framed packet whose checksum did not match."""

    payload: bytes
    received: int | None
    computed: int

    def error(self) -> ChecksumError:
        got = "unreadable" if self.received is None else f"{self.received:#04x}"
        return ChecksumError(
            f"checksum mismatch: packet says {got}, payload sums to {self.computed:#04x}",
            self.payload,
        )


@dataclass(frozen=True, slots=True)
class MalformedPacket:
    """A packet with a good checksum whose run-length encoding is invalid."""

    payload: bytes
    reason: str

    def error(self) -> ProtocolError:
        return ProtocolError(self.reason, self.payload)


Event = Ack | Nack | Interrupt | Packet | BadChecksum | MalformedPacket

ACK: Final = Ack()
NACK: Final = Nack()
INTERRUPT: Final = Interrupt()

_DOLLAR: Final = 0x24
_PLUS: Final = 0x2B
_MINUS: Final = 0x2D
_CTRL_C: Final = 0x03
_START = re.compile(rb"[$+\-\x03]")


class PacketDecoder:
    """Split a byte stream into protocol events, however it was chunked.

    ``feed`` takes whatever ``recv`` returned and gives back the complete
    events found so far; an incomplete packet stays buffered for the next
    call. Bytes outside packets other than ``+``, ``-`` and 0x03 are
    skipped (line noise, or a stub's stray output). A ``$`` before the
    ``#`` of the current packet abandons it, as GDB's ``read_frame`` does.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    @property
    def pending(self) -> int:
        """Number of bytes buffered towards an incomplete packet."""
        return len(self._buf)

    def reset(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Event]:
        buf = self._buf + data if self._buf else data
        events: list[Event] = []
        pos = 0
        end = len(buf)
        while pos < end:
            c = buf[pos]
            if c == _DOLLAR:
                hash_at = buf.find(b"#", pos + 1)
                if hash_at < 0 or hash_at + 3 > end:
                    restart = buf.rfind(b"$", pos + 1, end if hash_at < 0 else hash_at)
                    if restart >= 0:
                        pos = restart  # a new packet began: drop the truncated one
                        continue
                    if end - pos > MAX_FRAME:
                        raise ProtocolError("packet has no end", buf[pos : pos + 80])
                    break
                restart = buf.rfind(b"$", pos + 1, hash_at)
                if restart >= 0:
                    pos = restart
                    continue
                raw = buf[pos + 1 : hash_at]
                computed = sum(raw) & 0xFF
                digits = buf[hash_at + 1 : hash_at + 3]
                received = int(digits, 16) if _HEX_NUMBER.fullmatch(digits) else None
                pos = hash_at + 3
                if received != computed:
                    events.append(BadChecksum(raw, received, computed))
                    continue
                if b"*" not in raw:
                    events.append(Packet(raw))
                    continue
                try:
                    events.append(Packet(_expand_rle(raw)))
                except _RleError as exc:
                    events.append(MalformedPacket(raw, str(exc)))
            elif c == _PLUS:
                events.append(ACK)
                pos += 1
            elif c == _MINUS:
                events.append(NACK)
                pos += 1
            elif c == _CTRL_C:
                events.append(INTERRUPT)
                pos += 1
            else:
                m = _START.search(buf, pos)
                pos = end if m is None else m.start()
        self._buf = buf[pos:] if pos < end else b""
        return events
