"""Fuzzing the GDB remote protocol codecs (hypothesis): the packet decoder,
escaping, run-length decoding and hex; stop replies; general replies;
target descriptions.

Each parser gives a value or a :class:`~qprobes.errors.ProtocolError` that
carries the offending packet; nothing else escapes. Codecs with an encoder
round-trip.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from qprobes.errors import ProtocolError, QprobesError
from qprobes.wire.features import parse_target_description
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
    parse_hex_int,
    unescape_binary,
)
from qprobes.wire.replies import (
    error_code,
    parse_key_values,
    parse_qsupported,
    parse_qxfer,
    parse_vcont_actions,
)
from qprobes.wire.stop import StopKind, WatchKind, parse_stop_reply
from qprobes.wire.threads import ThreadId, parse_thread_id, parse_thread_list
from tests.unit.fuzzing import FUZZ, FUZZ_SLOW, mutated

DATA = Path(__file__).parent / "data" / "qemu-7.2-x86_64"
HEX = re.compile(rb"[0-9a-fA-F]+")

# Bytes that matter to the framing, often; anything else now and then.
wire_bytes = st.lists(
    st.one_of(st.sampled_from(b"$#}*+-\x030123456789abcdefT:;"), st.integers(0, 255)),
    max_size=64,
).map(bytes)


# --- escaping, run-length encoding, hex, checksums ---------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_escape_round_trip(data: bytes) -> None:
    escaped = escape_binary(data)
    assert not re.search(rb"[#$*]", escaped)
    assert unescape_binary(escaped) == data


@FUZZ
@given(wire_bytes)
@example(b"}")
@example(b"a}}}")
def test_unescape_gives_bytes_or_a_protocol_error(data: bytes) -> None:
    try:
        out = unescape_binary(data)
    except ProtocolError as exc:
        assert exc.packet == data
        return
    assert out == unescape_reference(data)


def unescape_reference(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(data):
        if data[i] == 0x7D:
            out.append(data[i + 1] ^ 0x20)  # IndexError: the test fails, as it should
            i += 2
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


def rle_encode(data: bytes) -> bytes:
    """A reference run-length encoder (GDB's rules: a count character
    ``n`` stands for ``ord(n) - 29`` more copies, never '#' or '$', and
    the counts stay printable)."""
    out = bytearray()
    i = 0
    while i < len(data):
        c = data[i]
        j = i
        while j + 1 < len(data) and data[j + 1] == c and j - i < 97:
            j += 1
        more = j - i
        out.append(c)
        while more >= 3 and more in (6, 7):
            out.append(c)  # '#' and '$' are not counts: send one copy plainly
            more -= 1
        if more >= 3:
            out += b"*" + bytes((more + 29,))
        else:
            out += bytes((c,)) * more
        i = j + 1
    return bytes(out)


runs = st.lists(st.tuples(st.sampled_from(b"0af9xE:;"), st.integers(1, 120)), max_size=12).map(
    lambda rs: b"".join(bytes((c,)) * n for c, n in rs)
)


@FUZZ
@given(runs)
@example(b"0" * 8)
@example(b"0" * 99)
def test_rle_round_trip(data: bytes) -> None:
    encoded = rle_encode(data)
    assert not re.search(rb"\*[#$]", encoded)
    assert decode_rle(encoded) == data


@FUZZ
@given(wire_bytes)
@example(b"*")
@example(b"a*")
@example(b"a*\x1d")
@example(b"a*\x7f")
def test_decode_rle_gives_bytes_or_a_protocol_error(data: bytes) -> None:
    try:
        out = decode_rle(data)
    except ProtocolError as exc:
        assert exc.packet == data
        return
    assert len(out) >= len(data) - 2 * data.count(b"*")


@FUZZ
@given(st.binary(max_size=100))
def test_hex_round_trip(data: bytes) -> None:
    assert decode_hex(encode_hex(data)) == data
    assert decode_hex(encode_hex(data).upper()) == data


@FUZZ
@given(wire_bytes)
def test_decode_hex_gives_bytes_or_a_protocol_error(text: bytes) -> None:
    try:
        out = decode_hex(text)
    except ProtocolError as exc:
        assert exc.packet == text
        return
    assert HEX.fullmatch(text) or text == b""
    assert encode_hex(out) == text.lower()


@FUZZ
@given(st.one_of(wire_bytes, st.sampled_from([b" 1", b"1 ", b"0x10", b"1_0", b"\t10\n"])))
@example(b" 1")
@example(b"0x10")
@example(b"0X10")
def test_parse_hex_int_takes_hex_digits_only(text: bytes) -> None:
    try:
        value = parse_hex_int(text)
    except ProtocolError as exc:
        assert exc.packet == text
        assert not HEX.fullmatch(text)
        return
    assert HEX.fullmatch(text), f"{text!r} parsed as {value:#x}"
    assert value == int(text, 16)


@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_parse_hex_int_round_trip(value: int) -> None:
    assert parse_hex_int(b"%x" % value) == value


# --- the packet decoder --------------------------------------------------------


def decode_all(stream: bytes, cuts: list[int]) -> list[Event]:
    decoder = PacketDecoder()
    events: list[Event] = []
    last = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts):
        events += decoder.feed(stream[last:cut])
        last = cut
    events += decoder.feed(stream[last:])
    return events


# A stream of well-formed pieces and noise.
piece = st.one_of(
    st.binary(max_size=40).map(lambda d: frame(escape_binary(d))),
    runs.map(lambda d: frame(rle_encode(d))),
    st.sampled_from([b"+", b"-", b"\x03", b"$OK#9a", b"$OK#00", b"$OK#zz", b"$a*\x1d#8d"]),
    wire_bytes,
)
streams = st.lists(piece, max_size=10).map(b"".join)


@FUZZ
@given(streams, st.lists(st.integers(0, 10_000), max_size=8))
@example(b"$a#x$b#00", [4])
@example(b"$ab#$c#00", [4, 5])
@example(b"$OK#9", [5])
def test_a_stream_split_anywhere_gives_the_same_events(stream: bytes, cuts: list[int]) -> None:
    whole = PacketDecoder().feed(stream)
    assert decode_all(stream, cuts) == whole


@FUZZ_SLOW
@given(streams)
def test_a_stream_fed_byte_by_byte_gives_the_same_events(stream: bytes) -> None:
    whole = PacketDecoder().feed(stream)
    decoder = PacketDecoder()
    one_by_one: list[Event] = []
    for i in range(len(stream)):
        one_by_one += decoder.feed(stream[i : i + 1])
    assert one_by_one == whole


@FUZZ
@given(st.lists(st.binary(max_size=60), max_size=6), st.lists(st.integers(0, 10_000), max_size=6))
def test_framed_packets_come_back(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"+".join(frame(escape_binary(p)) for p in payloads)
    events = decode_all(stream, cuts)
    packets = [e for e in events if not isinstance(e, type(ACK))]
    assert all(isinstance(e, Packet) for e in packets)
    assert [unescape_binary(e.payload) for e in packets if isinstance(e, Packet)] == payloads
    assert events.count(ACK) == max(0, len(payloads) - 1)


@FUZZ
@given(runs)
def test_run_length_encoded_packets_come_back_expanded(data: bytes) -> None:
    assert PacketDecoder().feed(frame(rle_encode(data))) == [Packet(data)]


@FUZZ
@given(st.binary(max_size=40).map(escape_binary), st.integers(0, 255))
def test_a_wrong_checksum_is_reported(payload: bytes, received: int) -> None:
    stream = b"$%s#%02x" % (payload, received)
    (event,) = PacketDecoder().feed(stream)
    if received == checksum(payload):
        assert event == Packet(payload)
    else:
        assert event == BadChecksum(payload, received, checksum(payload))
        assert isinstance(event.error(), ProtocolError)


@FUZZ
@given(
    st.binary(max_size=20).map(escape_binary), st.sampled_from([b" 0", b"0 ", b"+0", b"-0", b"0_"])
)
@example(b"", b"-0")
@example(b"", b" 0")
def test_a_checksum_is_two_hex_digits(payload: bytes, text: bytes) -> None:
    # The checksum must be two hex digits: anything else is unreadable, even
    # when Python's int() would take it.
    stream = b"$%s#%s" % (payload, text)
    (event,) = PacketDecoder().feed(stream)
    assert event == BadChecksum(payload, None, checksum(payload))


@FUZZ
@given(streams)
def test_events_are_only_the_decoder_s(stream: bytes) -> None:
    decoder = PacketDecoder()
    for event in decoder.feed(stream):
        assert event in (ACK, NACK, INTERRUPT) or isinstance(
            event, (Packet, BadChecksum, MalformedPacket)
        )
        if isinstance(event, MalformedPacket):
            assert isinstance(event.error(), ProtocolError)
    assert decoder.pending <= len(stream)


# --- thread ids and stop replies ---------------------------------------------

part = st.one_of(st.just(-1), st.integers(0, 2**32))
thread_ids = st.builds(ThreadId, st.one_of(st.none(), part), part)


@FUZZ
@given(thread_ids)
def test_thread_id_round_trip(tid: ThreadId) -> None:
    assert parse_thread_id(tid.format().encode()) == tid


@FUZZ
@given(st.one_of(wire_bytes, st.sampled_from([b" 1", b"0x1", b"1_0", b"p1. 2", b"p0x1"])))
@example(b" 1")
@example(b"p1.0x2")
def test_thread_ids_are_hex_digits_or_an_error(text: bytes) -> None:
    try:
        tid = parse_thread_id(text)
    except ProtocolError as exc:
        assert exc.packet == text
        return
    assert THREAD_ID.fullmatch(text), f"{text!r} parsed as {tid}"
    assert parse_thread_id(tid.format().encode()) == tid


THREAD_ID = re.compile(rb"(-1|[0-9a-fA-F]+)|p(-1|[0-9a-fA-F]+)(\.(-1|[0-9a-fA-F]+))?")


@FUZZ
@given(
    st.one_of(wire_bytes.map(lambda b: b"m" + b), wire_bytes.map(lambda b: b"l" + b), wire_bytes)
)
def test_thread_lists_parse_or_raise(payload: bytes) -> None:
    try:
        ids, _more = parse_thread_list(payload)
    except ProtocolError as exc:
        assert exc.packet is not None
        return
    assert all(isinstance(t, ThreadId) for t in ids)


hexnum = st.integers(0, 2**64 - 1).map(lambda v: b"%x" % v)
stop_pairs = st.one_of(
    st.tuples(
        st.integers(0, 0x80).map(lambda n: b"%x" % n), st.binary(max_size=16).map(encode_hex)
    ),
    st.tuples(st.just(b"thread"), thread_ids.map(lambda t: t.format().encode())),
    st.tuples(st.sampled_from([b"watch", b"rwatch", b"awatch", b"core"]), hexnum),
    st.tuples(
        st.sampled_from([b"swbreak", b"hwbreak", b"library", b"create", b"fork"]), st.just(b"")
    ),
)


@FUZZ
@given(st.integers(0, 255), st.lists(stop_pairs, max_size=8))
def test_t_stop_reply_round_trip(signal: int, pairs: list[tuple[bytes, bytes]]) -> None:
    packet = b"T%02x" % signal + b"".join(n + b":" + v + b";" for n, v in pairs)
    reply = parse_stop_reply(packet)
    assert reply.kind is StopKind.SIGNAL and reply.signal == signal and reply.packet == packet
    for name, _value in pairs:
        if HEX.fullmatch(name):
            assert int(name, 16) in reply.registers
        elif name == b"thread":
            assert reply.thread is not None
        elif name in (b"watch", b"rwatch", b"awatch"):
            assert reply.watch_kind in tuple(WatchKind)
            assert reply.watch_addr is not None
        elif name == b"core":
            assert reply.core is not None
    last = {n: v for n, v in pairs}
    if b"thread" in last:
        assert reply.thread == parse_thread_id(last[b"thread"])
    if b"core" in last:
        assert reply.core == int(last[b"core"], 16)
    regs = {int(n, 16): decode_hex(v) for n, v in pairs if HEX.fullmatch(n)}
    assert reply.registers == regs


stop_like = st.one_of(
    wire_bytes,
    st.tuples(st.sampled_from([b"T", b"S", b"W", b"X", b"w", b"O", b"F", b"N"]), wire_bytes).map(
        b"".join
    ),
    st.builds(lambda s, p: b"T%02x" % s + p, st.integers(0, 255), wire_bytes),
)


@FUZZ
@given(stop_like)
@example(b"T05thread:p1.;")
@example(b"W00;process:")
@example(b"T05:1;")
@example(b"O4")
def test_stop_replies_parse_or_raise_naming_the_packet(packet: bytes) -> None:
    try:
        reply = parse_stop_reply(packet)
    except ProtocolError as exc:
        assert exc.packet == packet
        return
    assert reply.packet == packet
    assert isinstance(reply.kind, StopKind)


# --- general replies ------------------------------------------------------------


@FUZZ
@given(wire_bytes)
def test_replies_parse_or_raise(reply: bytes) -> None:
    code = error_code(reply)
    assert code is None or -1 <= code <= 0xFF
    for parse in (parse_qsupported, parse_qxfer, parse_vcont_actions, parse_key_values):
        try:
            parse(reply)
        except ProtocolError as exc:
            assert exc.packet is not None
            assert reply.startswith(exc.packet) or exc.packet in reply


@FUZZ
@given(st.binary(max_size=100), st.booleans())
def test_qxfer_round_trip(data: bytes, more: bool) -> None:
    reply = (b"m" if more else b"l") + escape_binary(data)
    assert parse_qxfer(reply) == (data, more)


LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
names = st.builds(
    lambda a, b: (a + b).encode(),
    st.sampled_from(LETTERS),
    st.text(LETTERS + "0123456789_.", max_size=15),
)


@FUZZ
@given(
    st.dictionaries(
        names,
        st.one_of(st.booleans(), st.just("?"), st.text("0123456789abcdef", min_size=1, max_size=8)),
    )
)
def test_qsupported_round_trip(features: dict[bytes, bool | str]) -> None:
    def item(name: bytes, value: bool | str) -> bytes:
        if value is True:
            return name + b"+"
        if value is False:
            return name + b"-"
        if value == "?":
            return name + b"?"
        return name + b"=" + value.encode()

    reply = b";".join(item(n, v) for n, v in features.items())
    assert parse_qsupported(reply) == {n.decode(): v for n, v in features.items()}


@FUZZ
@given(st.dictionaries(names.filter(lambda n: b"=" not in n), st.integers(0, 2**32), min_size=1))
def test_key_values_round_trip(values: dict[bytes, int]) -> None:
    reply = b",".join(b"%s=%x" % (n, v) for n, v in values.items())
    assert parse_key_values(reply) == {n.decode(): v for n, v in values.items()}


@FUZZ
@given(st.sampled_from([b"A= 1", b"A=0x1", b"A=1_0", b"A=+1", b"A=-1"]))
def test_key_values_are_hex_digits(reply: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_key_values(reply)


# --- target descriptions --------------------------------------------------------

TARGET = (DATA / "target.xml").read_bytes()
FEATURE = (DATA / "i386-64bit.xml").read_bytes()


def fetch_real(href: str) -> bytes:
    if href == "i386-64bit.xml":
        return FEATURE
    raise ProtocolError(f"no document {href!r}")


def test_the_real_description_parses() -> None:
    layout = parse_target_description(TARGET, fetch_real)
    assert layout.by_name("rip").size == 8


@FUZZ_SLOW
@given(mutated(FEATURE, max_edits=6))
def test_mutated_descriptions_parse_or_raise(feature: bytes) -> None:
    def fetch(href: str) -> bytes:
        return feature

    try:
        layout = parse_target_description(TARGET, fetch)
    except QprobesError as exc:
        assert isinstance(exc, ProtocolError)
        assert "target description" in str(exc) or "i386-64bit.xml" in str(exc)
        return
    offset = 0
    for reg in sorted(layout.registers, key=lambda r: r.regnum):
        assert reg.offset_in_g == offset
        offset += reg.size


@FUZZ
@given(st.one_of(st.text(max_size=80), mutated(TARGET, max_edits=6)))
@example("\udc80")
@example("<target><reg/></target>")
@example('<feature><reg name="a" bitsize="1e3"/></feature>')
@example('<feature><reg name="a" bitsize="' + "9" * 5000 + '"/></feature>')
def test_any_text_parses_or_raises(text: str | bytes) -> None:
    try:
        parse_target_description(text, fetch_real)
    except ProtocolError as exc:
        assert str(exc)


reg_specs = st.lists(
    st.tuples(names.map(bytes.decode), st.sampled_from([8, 16, 32, 64, 80, 128])),
    max_size=20,
    unique_by=lambda r: r[0],
)


@FUZZ
@given(reg_specs)
def test_description_round_trip(regs: list[tuple[str, int]]) -> None:
    body = "".join(f'<reg name="{n}" bitsize="{b}"/>' for n, b in regs)
    text = f'<?xml version="1.0"?><target><feature name="f">{body}</feature></target>'
    layout = parse_target_description(text)
    assert [(r.name, r.bitsize, r.regnum) for r in layout.registers] == [
        (n, b, i) for i, (n, b) in enumerate(regs)
    ]
    assert layout.g_size == sum((b + 7) // 8 for _n, b in regs)
