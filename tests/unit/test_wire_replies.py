"""Replies to general requests (GDB manual E.2, E.4, E.5), as tables."""

from __future__ import annotations

import pytest

from qprobes.errors import ProtocolError
from qprobes.wire.replies import (
    ERROR_WITH_TEXT,
    error_code,
    parse_key_values,
    parse_qsupported,
    parse_qxfer,
    parse_vcont_actions,
)

ERRORS = [
    (b"E22", 0x22),
    (b"E14", 0x14),
    (b"E0A", 0x0A),
    (b"E.no such thing", ERROR_WITH_TEXT),
    (b"OK", None),
    (b"", None),
    (b"E1", None),  # a one-byte 'm' reply, not an error
    (b"E1E2", None),  # a two-byte 'm' reply
    (b"Ezz", None),
    (b"e01", None),
]


@pytest.mark.parametrize(("reply", "code"), ERRORS)
def test_error_code(reply: bytes, code: int | None) -> None:
    assert error_code(reply) == code


QSUPPORTED = [
    (
        b"PacketSize=1000;qXfer:features:read+;vContSupported+;multiprocess+",  # QEMU 7.2
        {
            "PacketSize": "1000",
            "qXfer:features:read": True,
            "vContSupported": True,
            "multiprocess": True,
        },
    ),
    (
        b"PacketSize=3fff;QStartNoAckMode+;qXfer:auxv:read-;swbreak?;",
        {"PacketSize": "3fff", "QStartNoAckMode": True, "qXfer:auxv:read": False, "swbreak": "?"},
    ),
    (b"", {}),
]


@pytest.mark.parametrize(("reply", "features"), QSUPPORTED)
def test_parse_qsupported(reply: bytes, features: dict[str, str | bool]) -> None:
    assert parse_qsupported(reply) == features


def test_parse_qsupported_malformed() -> None:
    with pytest.raises(ProtocolError):
        parse_qsupported(b"PacketSize=1000;bare")


QXFER = [
    (b"l<target/>", (b"<target/>", False)),
    (b"m<?xml", (b"<?xml", True)),
    (b"l", (b"", False)),
    (b"la}]b", (b"a}b", False)),  # binary escapes are undone
]


@pytest.mark.parametrize(("reply", "expected"), QXFER)
def test_parse_qxfer(reply: bytes, expected: tuple[bytes, bool]) -> None:
    assert parse_qxfer(reply) == expected


@pytest.mark.parametrize("bad", [b"", b"x<target/>", b"OK"])
def test_parse_qxfer_malformed(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_qxfer(bad)


@pytest.mark.parametrize(
    ("reply", "actions"),
    [
        (b"vCont;c;C;s;S", {"c", "C", "s", "S"}),  # QEMU 7.2
        (b"vCont;c;C;s;S;t;r", {"c", "C", "s", "S", "t", "r"}),
        (b"vCont", set()),
    ],
)
def test_parse_vcont_actions(reply: bytes, actions: set[str]) -> None:
    assert parse_vcont_actions(reply) == actions


def test_parse_vcont_actions_malformed() -> None:
    with pytest.raises(ProtocolError):
        parse_vcont_actions(b"c;s")


@pytest.mark.parametrize(
    ("reply", "values"),
    [
        (b"ENABLE=1,NOIRQ=2,NOTIMER=4", {"ENABLE": 1, "NOIRQ": 2, "NOTIMER": 4}),  # QEMU 7.2
        (b"A=ff", {"A": 255}),
    ],
)
def test_parse_key_values(reply: bytes, values: dict[str, int]) -> None:
    assert parse_key_values(reply) == values


@pytest.mark.parametrize("bad", [b"", b"ENABLE", b"=1", b"A=zz"])
def test_parse_key_values_malformed(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_key_values(bad)
