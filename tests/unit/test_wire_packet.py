"""The packet codec: framing, checksums, escapes, run-length encoding, hex,
and the incremental decoder. Tables of (raw bytes, expected)."""

from __future__ import annotations

import pytest

from qprobes.errors import ChecksumError, ProtocolError
from qprobes.wire.packet import (
    ACK,
    INTERRUPT,
    NACK,
    BadChecksum,
    Event,
    MalformedPacket,
    Packet,
    PacketDecoder,
    checksum,
    decode_hex,
    decode_rle,
    encode_hex,
    escape_binary,
    frame,
    int_to_le,
    le_to_int,
    parse_hex_int,
    unescape_binary,
)

# --- framing and checksums ------------------------------------------------------

FRAMES = [
    (b"", b"$#00"),
    (b"OK", b"$OK#9a"),
    (b"g", b"$g#67"),
    (b"?", b"$?#3f"),
    (b"qSupported", b"$qSupported#37"),
    (b"m1000,4", b"$m1000,4#8e"),
    (b"T05thread:p01.01;", b"$T05thread:p01.01;#06"),
    (b"vCont;c;C;s;S", b"$vCont;c;C;s;S#62"),
    (b"\xff\xff", b"$\xff\xff#fe"),  # the sum wraps modulo 256
]


@pytest.mark.parametrize(("payload", "framed"), FRAMES)
def test_frame(payload: bytes, framed: bytes) -> None:
    assert frame(payload) == framed
    assert checksum(payload) == int(framed[-2:], 16)


@pytest.mark.parametrize(("payload", "framed"), FRAMES)
def test_decode_own_frames(payload: bytes, framed: bytes) -> None:
    assert PacketDecoder().feed(framed) == [Packet(payload)]


# --- binary escapes (GDB manual E.1: '#', '$', '}' and, from stubs, '*') --------

ESCAPES = [
    (b"", b""),
    (b"plain", b"plain"),
    (b"#", b"}\x03"),
    (b"$", b"}\x04"),
    (b"}", b"}]"),
    (b"*", b"}\x0a"),
    (b"a#b$c}d*e", b"a}\x03b}\x04c}]d}\x0ae"),
    (b"}}", b"}]}]"),
    (bytes(range(256)), None),  # round trip only
]


@pytest.mark.parametrize(("raw", "escaped"), ESCAPES)
def test_escape_round_trip(raw: bytes, escaped: bytes | None) -> None:
    if escaped is not None:
        assert escape_binary(raw) == escaped
        assert unescape_binary(escaped) == raw
    assert unescape_binary(escape_binary(raw)) == raw
    assert not set(escape_binary(raw)) & set(b"#$*")


def test_escape_returns_same_object_when_nothing_to_escape() -> None:
    data = b"no specials here"
    assert escape_binary(data) is data
    assert unescape_binary(data) is data


@pytest.mark.parametrize("bad", [b"}", b"abc}", b"}]}"])
def test_unescape_dangling_escape(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        unescape_binary(bad)


# --- run-length encoding (E.1: count = ord(c) - 29) -----------------------------

RLE = [
    (b"0* ", b"0000"),  # the manual's own example: ' ' = 32, 3 more
    (b"0*!", b"00000"),
    (b'a*"b', b"a" * 6 + b"b"),  # '"' = 34: 5 more
    (b"00*%", b"00" + b"0" * 8),
    (b"x*~", b"x" * 98),  # '~' = 126, the largest count
    (b"ab*\x1e", b"abb"),  # GDB accepts counts from 1
    (b"no rle", b"no rle"),
    (b"f* e* ", b"ffffeeee"),
]


@pytest.mark.parametrize(("raw", "expanded"), RLE)
def test_decode_rle(raw: bytes, expanded: bytes) -> None:
    assert decode_rle(raw) == expanded


@pytest.mark.parametrize("bad", [b"*a", b"a*", b"a*\x7f", b"a*\x10"])
def test_decode_rle_malformed(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_rle(bad)


# --- hex and integers -------------------------------------------------------------

HEX = [
    (b"", b""),
    (b"\x00", b"00"),
    (b"\xde\xad\xbe\xef", b"deadbeef"),
    (bytes(range(16)), b"000102030405060708090a0b0c0d0e0f"),
]


@pytest.mark.parametrize(("raw", "text"), HEX)
def test_hex_round_trip(raw: bytes, text: bytes) -> None:
    assert encode_hex(raw) == text
    assert decode_hex(text) == raw
    assert decode_hex(text.upper()) == raw


@pytest.mark.parametrize("bad", [b"0", b"zz", b"0g", b"xx"])
def test_decode_hex_malformed(bad: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_hex(bad)
    assert info.value.packet == bad


@pytest.mark.parametrize(
    ("text", "value"), [(b"0", 0), (b"ff", 255), (b"FFFFFFFF81000000", 0xFFFFFFFF81000000)]
)
def test_parse_hex_int(text: bytes, value: int) -> None:
    assert parse_hex_int(text) == value


@pytest.mark.parametrize("bad", [b"", b"-1", b"+1", b"1_0", b"0xg"])
def test_parse_hex_int_malformed(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_hex_int(bad)


@pytest.mark.parametrize(
    ("data", "value", "size"),
    [
        (b"\xf0\xff\x00\x00\x00\x00\x00\x00", 0xFFF0, 8),
        (b"\x02\x00\x00\x00", 2, 4),
        (b"\xff\xff\xff\xff\xff\xff\xff\xff", 2**64 - 1, 8),
    ],
)
def test_little_endian(data: bytes, value: int, size: int) -> None:
    assert le_to_int(data) == value
    assert int_to_le(value, size) == data


def test_little_endian_signed_and_wrapping() -> None:
    assert le_to_int(b"\xff\xff", signed=True) == -1
    assert int_to_le(-1, 4) == b"\xff\xff\xff\xff"
    with pytest.raises(OverflowError):
        int_to_le(1 << 32, 4)


# --- the incremental decoder -----------------------------------------------------

STREAMS: list[tuple[bytes, list[Event]]] = [
    (b"+", [ACK]),
    (b"-", [NACK]),
    (b"\x03", [INTERRUPT]),
    (b"+$OK#9a", [ACK, Packet(b"OK")]),
    (b"$OK#9a$#00", [Packet(b"OK"), Packet(b"")]),
    (b"+$OK#9A", [ACK, Packet(b"OK")]),  # upper-case checksum digits
    # noise outside packets is skipped
    (b"garbage\r\n$OK#9a", [Packet(b"OK")]),
    (b"\x00\xff+", [ACK]),
    # a '$' before the '#' abandons the truncated packet (GDB's read_frame)
    (b"$trunc$OK#9a", [Packet(b"OK")]),
    # bad checksums are reported, not dropped, and decoding goes on
    (b"$OK#00+", [BadChecksum(b"OK", 0x00, 0x9A), ACK]),
    (b"$OK#zz", [BadChecksum(b"OK", None, 0x9A)]),
    # run-length encoding is expanded; the checksum covers the encoded form
    (frame(b"0* "), [Packet(b"0000")]),
    (frame(b"*x"), [MalformedPacket(b"*x", "run-length encoding without a character or a count")]),
    # escapes stay in the payload: only binary replies are unescaped
    (frame(b"l}]"), [Packet(b"l}]")]),
    # QEMU's reply to qRcmd: output packets then OK, in one read
    (
        b"+$O0d0a#74$O4141#19$OK#9a",
        [ACK, Packet(b"O0d0a"), Packet(b"O4141"), Packet(b"OK")],
    ),
]


@pytest.mark.parametrize(("stream", "events"), STREAMS)
def test_decoder_whole(stream: bytes, events: list[Event]) -> None:
    decoder = PacketDecoder()
    assert decoder.feed(stream) == events
    assert decoder.pending == 0


@pytest.mark.parametrize(("stream", "events"), STREAMS)
def test_decoder_byte_by_byte(stream: bytes, events: list[Event]) -> None:
    decoder = PacketDecoder()
    got: list[Event] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == events


@pytest.mark.parametrize(("stream", "events"), STREAMS)
def test_decoder_every_split(stream: bytes, events: list[Event]) -> None:
    for cut in range(len(stream) + 1):
        decoder = PacketDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == events, cut


def test_decoder_keeps_incomplete_packet() -> None:
    decoder = PacketDecoder()
    assert decoder.feed(b"+$T05thread:p01") == [ACK]
    assert decoder.pending == len(b"$T05thread:p01")
    assert decoder.feed(b".01;#") == []
    assert decoder.feed(b"0") == []
    assert decoder.feed(b"6") == [Packet(b"T05thread:p01.01;")]
    assert decoder.pending == 0


def test_decoder_reset() -> None:
    decoder = PacketDecoder()
    decoder.feed(b"$half")
    decoder.reset()
    assert decoder.feed(b"OK#9a") == []


def test_bad_checksum_error_carries_packet() -> None:
    (event,) = PacketDecoder().feed(b"$OK#00")
    assert isinstance(event, BadChecksum)
    error = event.error()
    assert isinstance(error, ChecksumError)
    assert error.packet == b"OK"
    assert "0x9a" in str(error)


def test_large_packet() -> None:
    payload = encode_hex(bytes(range(256)) * 8)  # a 4096-byte 'm' reply
    stream = b"+" + frame(payload)
    decoder = PacketDecoder()
    got: list[Event] = []
    for i in range(0, len(stream), 1000):
        got += decoder.feed(stream[i : i + 1000])
    assert got == [ACK, Packet(payload)]
