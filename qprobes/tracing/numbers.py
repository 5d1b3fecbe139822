"""The kernel's number parsers (``lib/kstrtox.c``, ``lib/vsprintf.c``), so
definitions accept exactly the numbers Linux accepts. Pure code."""

from __future__ import annotations

__all__ = ["kstrtol", "kstrtoul", "simple_strtoul", "to_signed", "truncate"]

_U64 = (1 << 64) - 1
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _fixup_radix(s: str, base: int) -> tuple[str, int]:
    """``_parse_integer_fixup_radix``: base 0 means 0x... hex, 0... octal, else decimal."""
    if base == 0:
        if s[:1] == "0":
            if s[1:2] in ("x", "X") and s[2:3] and s[2].lower() in _DIGITS[:16]:
                return s[2:], 16
            return s, 8
        return s, 10
    if base == 16 and s[:2].lower() == "0x":
        return s[2:], 16
    return s, base


def _kstrtoull(s: str, base: int) -> int | None:
    """``_kstrtoull``: all of ``s`` (bar one trailing newline) must be digits; no overflow."""
    s, base = _fixup_radix(s, base)
    if s.endswith("\n"):
        s = s[:-1]
    if not s or any(c.lower() not in _DIGITS[:base] for c in s):
        return None
    digits = s.lstrip("0") or "0"
    if len(digits) > 64:  # more than 64 digits overflow in any base (and int() balks)
        return None
    value = int(digits, base)
    return value if value <= _U64 else None


def _digits_value(digits: str, base: int) -> int:
    # int() refuses more than sys.get_int_max_str_digits() decimal digits.
    value = 0
    for at in range(0, len(digits), 1000):
        chunk = digits[at : at + 1000]
        value = value * base ** len(chunk) + int(chunk, base)
    return value


def kstrtoul(s: str, base: int = 0) -> int | None:
    """``kstrtoul``/``kstrtoull`` (64-bit): an optional ``+``, then the number; None if invalid."""
    if s[:1] == "+":
        s = s[1:]
    return _kstrtoull(s, base)


def kstrtol(s: str, base: int = 0) -> int | None:
    """``kstrtol``/``kstrtoll``: like :func:`kstrtoul` with an optional ``-``, within s64."""
    if s[:1] == "-":
        value = _kstrtoull(s[1:], base)
        if value is None or value > 1 << 63:
            return None
        return -value
    value = kstrtoul(s, base)
    if value is None or value >= 1 << 63:
        return None
    return value


def simple_strtoul(s: str, base: int = 0) -> tuple[int, int]:
    """``simple_strtoul``: the value of the digits at the start of ``s`` and the
    index just past them (0 when there are none)."""
    rest, base = _fixup_radix(s, base)
    start = len(s) - len(rest)
    end = start
    while end < len(s) and s[end].lower() in _DIGITS[:base]:
        end += 1
    if end == start:
        return 0, 0
    return _digits_value(s[start:end], base), end


def truncate(value: int, size: int) -> int:
    """``value`` cut to ``size`` bytes, as an unsigned number."""
    return value & ((1 << (8 * size)) - 1)


def to_signed(value: int, size: int) -> int:
    """``size`` bytes of ``value`` read as a two's-complement number."""
    value = truncate(value, size)
    sign = 1 << (8 * size - 1)
    return value - (sign << 1) if value & sign else value
