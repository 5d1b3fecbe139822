"""Parsers for the replies of general requests: errors, ``qSupported``,
``qXfer``, ``vCont?`` and QEMU's ``qqemu.*`` queries.

Pure code. References are to the GDB manual, appendix E: E.2 "Standard
Replies", E.4 "Packets" and E.5 "General Query Packets".
"""

from __future__ import annotations

import re
from typing import Final

from qprobes.errors import ProtocolError
from qprobes.wire.packet import unescape_binary

__all__ = [
    "error_code",
    "parse_key_values",
    "parse_qsupported",
    "parse_qxfer",
    "parse_vcont_actions",
]

# E.2: "E xx: An error has occurred; xx is a two-digit hexadecimal error
# number", and, when the client sent error-message+, "E.errtext".
_ERROR = re.compile(rb"E([0-9a-fA-F]{2})")
ERROR_WITH_TEXT: Final = -1
_HEX_NUMBER = re.compile(rb"[0-9a-fA-F]+")


def error_code(reply: bytes) -> int | None:
    """The number of an ``E NN`` reply, :data:`ERROR_WITH_TEXT` for an
    ``E.text`` reply, None for anything else.

    A three-character ``E`` reply cannot be hex data (hex data has an even
    length), so ``m`` and ``g`` replies are never mistaken for errors.
    """
    if reply[:1] != b"E":
        return None
    m = _ERROR.fullmatch(reply)
    if m is not None:
        return int(m[1], 16)
    if reply[:2] == b"E.":
        return ERROR_WITH_TEXT
    return None


def parse_qsupported(reply: bytes) -> dict[str, str | bool]:
    """Parse a ``qSupported`` reply (E.5): ``name=value`` gives a string,
    ``name+`` True, ``name-`` False, ``name?`` the string ``"?"`` (the
    feature may be supported; probe for it)."""
    features: dict[str, str | bool] = {}
    for item in reply.split(b";"):
        if not item:
            continue
        text = item.decode("ascii", "replace")
        name, eq, value = text.partition("=")
        if eq:
            features[name] = value
        elif text[-1] == "+":
            features[text[:-1]] = True
        elif text[-1] == "-":
            features[text[:-1]] = False
        elif text[-1] == "?":
            features[text[:-1]] = "?"
        else:
            raise ProtocolError("malformed qSupported feature", item)
    return features


def parse_qxfer(reply: bytes) -> tuple[bytes, bool]:
    """Parse a ``qXfer:...:read`` reply (E.5): ``m`` data (more follows) or
    ``l`` data (last). The data is binary-escaped. Returns (data, more)."""
    kind = reply[:1]
    if kind not in (b"m", b"l"):
        raise ProtocolError("qXfer reply must start with 'm' or 'l'", reply)
    return unescape_binary(reply[1:]), kind == b"m"


def parse_vcont_actions(reply: bytes) -> frozenset[str]:
    """Parse a ``vCont?`` reply (E.4): ``vCont;c;C;s;S``."""
    if reply[:5] != b"vCont":
        raise ProtocolError("vCont? reply must start with 'vCont'", reply)
    return frozenset(a.decode("ascii", "replace") for a in reply[5:].split(b";") if a)


def parse_key_values(reply: bytes) -> dict[str, int]:
    """Parse ``NAME=hex,NAME=hex`` (QEMU's ``qqemu.sstepbits`` reply:
    ``ENABLE=1,NOIRQ=2,NOTIMER=4``)."""
    values: dict[str, int] = {}
    for item in reply.split(b","):
        name, eq, value = item.partition(b"=")
        if not eq or not name or _HEX_NUMBER.fullmatch(value) is None:
            raise ProtocolError("expected NAME=value pairs", reply)
        try:
            values[name.decode("ascii")] = int(value, 16)
        except UnicodeDecodeError as exc:
            raise ProtocolError("expected NAME=value pairs", reply) from exc
    return values
