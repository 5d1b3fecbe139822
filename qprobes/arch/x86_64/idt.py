"""64-bit IDT gate descriptors (Intel SDM Vol. 3A, 6.14.1, figure 6-8).

A gate is 16 bytes: offset 15:0 at byte 0, segment selector at 2, IST at 4,
type and attributes at 5, offset 31:16 at 6, offset 63:32 at 8, reserved at 12.
"""

from __future__ import annotations

import struct

GATE_SIZE = 16


def gate_offset(gate: bytes) -> int:
    """The handler address a gate points at."""
    lo, _sel, _ist, _attr, mid, hi, _res = struct.unpack("<HHBBHII", gate[:GATE_SIZE])
    return int(lo | (mid << 16) | (hi << 32))


def gate_with_offset(gate: bytes, offset: int) -> bytes:
    """``gate`` pointing at ``offset``; selector, IST and type unchanged."""
    buf = bytearray(gate[:GATE_SIZE])
    struct.pack_into("<H", buf, 0, offset & 0xFFFF)
    struct.pack_into("<H", buf, 6, (offset >> 16) & 0xFFFF)
    struct.pack_into("<I", buf, 8, (offset >> 32) & 0xFFFFFFFF)
    return bytes(buf)


def gate_ist(gate: bytes) -> int:
    return gate[4] & 7


def gate_type(gate: bytes) -> int:
    """0xE: interrupt gate, 0xF: trap gate."""
    return gate[5] & 0xF
