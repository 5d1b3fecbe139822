"""Stop replies (GDB manual E.3 "Stop Reply Packets") and thread ids, as
tables of (payload, expected)."""

from __future__ import annotations

import pytest

from qprobes.errors import ProtocolError
from qprobes.wire.stop import (
    GDB_SIGNAL_INT,
    GDB_SIGNAL_TRAP,
    StopKind,
    StopReply,
    ThreadId,
    WatchKind,
    is_console_output,
    parse_stop_reply,
)
from qprobes.wire.threads import parse_thread_id, parse_thread_list


def _stop(packet: bytes, **fields: object) -> StopReply:
    return StopReply(packet=packet, **fields)  # type: ignore[arg-type]


P1T1 = ThreadId(1, 1)

STOPS = [
    # QEMU 7.2, as captured
    (b"T05thread:p01.01;", _stop(b"T05thread:p01.01;", kind=StopKind.SIGNAL, signal=5,
                                 thread=P1T1)),
    (b"T02thread:p01.02;", _stop(b"T02thread:p01.02;", kind=StopKind.SIGNAL, signal=2,
                                 thread=ThreadId(1, 2))),
    (b"T05thread:p01.01;watch:0000000000002000;",
     _stop(b"T05thread:p01.01;watch:0000000000002000;", kind=StopKind.SIGNAL, signal=5,
           thread=P1T1, watch_kind=WatchKind.WATCH, watch_addr=0x2000)),
    (b"T05thread:p01.02;rwatch:ffffffff81000000;",
     _stop(b"T05thread:p01.02;rwatch:ffffffff81000000;", kind=StopKind.SIGNAL, signal=5,
           thread=ThreadId(1, 2), watch_kind=WatchKind.RWATCH, watch_addr=0xFFFFFFFF81000000)),
    (b"T05thread:01;awatch:10;",
     _stop(b"T05thread:01;awatch:10;", kind=StopKind.SIGNAL, signal=5,
           thread=ThreadId(None, 1), watch_kind=WatchKind.AWATCH, watch_addr=0x10)),
    (b"W00", _stop(b"W00", kind=StopKind.EXITED, exit_status=0)),
    # the other forms of the manual
    (b"S05", _stop(b"S05", kind=StopKind.SIGNAL, signal=5)),
    (b"S0b", _stop(b"S0b", kind=StopKind.SIGNAL, signal=11)),
    (b"T05", _stop(b"T05", kind=StopKind.SIGNAL, signal=5)),
    (b"T0506:0000000000000000;07:10e0ffffffffffff;10:f0ff000000000000;thread:1;core:3;",
     _stop(b"T0506:0000000000000000;07:10e0ffffffffffff;10:f0ff000000000000;thread:1;core:3;",
           kind=StopKind.SIGNAL, signal=5, thread=ThreadId(None, 1), core=3,
           registers={6: bytes(8), 7: bytes.fromhex("10e0ffffffffffff"),
                      16: bytes.fromhex("f0ff000000000000")})),
    (b"T05swbreak:;thread:p1.3;",
     _stop(b"T05swbreak:;thread:p1.3;", kind=StopKind.SIGNAL, signal=5,
           thread=ThreadId(1, 3), swbreak=True)),
    (b"T05hwbreak:;", _stop(b"T05hwbreak:;", kind=StopKind.SIGNAL, signal=5, hwbreak=True)),
    (b"T05hwbreak", _stop(b"T05hwbreak", kind=StopKind.SIGNAL, signal=5, hwbreak=True)),
    (b"T05thread:-1;", _stop(b"T05thread:-1;", kind=StopKind.SIGNAL, signal=5,
                             thread=ThreadId(None, -1))),
    (b"T05thread:0;", _stop(b"T05thread:0;", kind=StopKind.SIGNAL, signal=5,
                            thread=ThreadId(None, 0))),
    (b"T05thread:p-1.-1;", _stop(b"T05thread:p-1.-1;", kind=StopKind.SIGNAL, signal=5,
                                 thread=ThreadId(-1, -1))),
    (b"T05library:;", _stop(b"T05library:;", kind=StopKind.SIGNAL, signal=5,
                            extra={"library": ""})),
    (b"T05fork:p2.2;thread:p1.1;",
     _stop(b"T05fork:p2.2;thread:p1.1;", kind=StopKind.SIGNAL, signal=5, thread=P1T1,
           extra={"fork": "p2.2"})),
    (b"T05syscall_entry:3c;", _stop(b"T05syscall_entry:3c;", kind=StopKind.SIGNAL, signal=5,
                                    extra={"syscall_entry": "3c"})),
    (b"T05replaylog:begin;", _stop(b"T05replaylog:begin;", kind=StopKind.SIGNAL, signal=5,
                                   extra={"replaylog": "begin"})),
    (b"W01;process:2a", _stop(b"W01;process:2a", kind=StopKind.EXITED, exit_status=1, pid=0x2A)),
    (b"X09", _stop(b"X09", kind=StopKind.TERMINATED, signal=9)),
    (b"X0f;process:1", _stop(b"X0f;process:1", kind=StopKind.TERMINATED, signal=15, pid=1)),
    (b"w00;p1.2", _stop(b"w00;p1.2", kind=StopKind.THREAD_EXITED, exit_status=0,
                        thread=ThreadId(1, 2))),
    (b"N", _stop(b"N", kind=StopKind.NO_RESUMED)),
    (b"O68690a", _stop(b"O68690a", kind=StopKind.OUTPUT, output=b"hi\n")),
    (b"Fwrite,1,2000,5", _stop(b"Fwrite,1,2000,5", kind=StopKind.FILE_IO,
                               extra={"request": "write,1,2000,5"})),
]  # fmt: skip


@pytest.mark.parametrize(("packet", "expected"), STOPS)
def test_parse_stop_reply(packet: bytes, expected: StopReply) -> None:
    assert parse_stop_reply(packet) == expected


MALFORMED = [
    b"",
    b"OK",
    b"E01",
    b"T",
    b"T5",
    b"Tzz",
    b"S5",
    b"S0500",
    b"T05thread:;",
    b"T05thread:pz.1;",
    b"T05watch:;",
    b"T05watch:xyz;",
    b"T05core:;",
    b"T0506:123;",  # odd-length register value
    b"T05:1;",
    b"W",
    b"W1",
    b"W00;pid:1",
    b"X09;process:",
    b"w00",
    b"F",
    b"Q",
    b"O4",  # console output with half a byte
]


@pytest.mark.parametrize("packet", MALFORMED)
def test_parse_stop_reply_malformed(packet: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_stop_reply(packet)
    assert info.value.packet == packet


def test_signal_names() -> None:
    assert parse_stop_reply(b"T02thread:01;").signal == GDB_SIGNAL_INT
    assert parse_stop_reply(b"T05thread:01;").signal == GDB_SIGNAL_TRAP
    assert parse_stop_reply(b"T05watch:10;").is_watchpoint
    assert not parse_stop_reply(b"T05").is_watchpoint


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"O4f4b", True),
        (b"O", True),
        (b"OK", False),
        (b"OKAY", False),
        (b"O4", False),
        (b"T05", False),
        (b"", False),
    ],
)
def test_is_console_output(payload: bytes, expected: bool) -> None:
    assert is_console_output(payload) is expected


# --- thread ids (E.1, thread-id syntax) ------------------------------------------

THREAD_IDS = [
    (b"1", ThreadId(None, 1), "1"),
    (b"01", ThreadId(None, 1), "1"),
    (b"1f", ThreadId(None, 0x1F), "1f"),
    (b"0", ThreadId(None, 0), "0"),
    (b"-1", ThreadId(None, -1), "-1"),
    (b"p01.01", ThreadId(1, 1), "p1.1"),
    (b"p1.2", ThreadId(1, 2), "p1.2"),
    (b"p1.-1", ThreadId(1, -1), "p1.-1"),
    (b"p-1.-1", ThreadId(-1, -1), "p-1.-1"),
    (b"p2", ThreadId(2, -1), "p2.-1"),
    (b"p1.0", ThreadId(1, 0), "p1.0"),
]


@pytest.mark.parametrize(("text", "expected", "formatted"), THREAD_IDS)
def test_thread_ids(text: bytes, expected: ThreadId, formatted: str) -> None:
    parsed = parse_thread_id(text)
    assert parsed == expected
    assert parsed.format() == formatted == str(parsed)
    assert parse_thread_id(formatted.encode()) == expected


@pytest.mark.parametrize("bad", [b"", b"p", b"p1.", b"x", b"-2", b"+1", b"p.1", b"1.1"])
def test_thread_id_malformed(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_thread_id(bad)


THREAD_LISTS = [
    (b"mp01.01", [ThreadId(1, 1)], True),  # QEMU sends one thread per packet
    (b"m1,2,3", [ThreadId(None, 1), ThreadId(None, 2), ThreadId(None, 3)], True),
    (b"l", [], False),
    (b"lp01.02", [ThreadId(1, 2)], False),
]


@pytest.mark.parametrize(("payload", "threads", "more"), THREAD_LISTS)
def test_thread_lists(payload: bytes, threads: list[ThreadId], more: bool) -> None:
    assert parse_thread_list(payload) == (threads, more)


@pytest.mark.parametrize("bad", [b"", b"m", b"x1", b"m1,,2"])
def test_thread_list_malformed(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_thread_list(bad)
