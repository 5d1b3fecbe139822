"""Kernel symbols recovered from the kallsyms tables in kernel memory.

Distribution kernels such as Debian's ``linux-image-*-cloud-amd64`` ship a
placeholder System.map; with ``CONFIG_KALLSYMS_ALL=y`` every symbol is still
inside the kernel, in the tables ``scripts/kallsyms.c`` generates into
``.rodata`` (``write_src()``). Each label is aligned to 8 bytes (``ALGN``,
``.balign 8`` on 64-bit) and the tables come in this order:

======================  =================================================
``kallsyms_offsets``    one ``.long`` per symbol (``CONFIG_KALLSYMS_BASE_RELATIVE``)
                        [``kallsyms_addresses``: one pointer each, without it]
``kallsyms_relative_base``  a pointer, relocated at boot (KASLR)
``kallsyms_num_syms``   ``.long`` N
``kallsyms_names``      N entries: length (ULEB128, 1 or 2 bytes since 6.1's
                        "big symbols"), then token bytes; the expanded
                        string is the type letter followed by the name
``kallsyms_markers``    ``.long`` offset in ``kallsyms_names`` of every 256th entry
``kallsyms_seqs_of_names``  3 bytes per symbol (v6.2, and Debian's 6.1.y,
                        which has the stable backport)
``kallsyms_token_table``  256 NUL-terminated tokens
``kallsyms_token_index``  256 ``.short`` offsets into the token table
======================  =================================================

Since v6.4 ("scripts/kallsyms: change the output order", Masahiro Yamada)
``num_syms``, ``names``, ``markers``, ``token_table`` and ``token_index``
come first and ``offsets``, ``relative_base`` and ``seqs_of_names`` after them;
:func:`find_kallsyms` accepts both orders.

Finding the tables without symbols follows vmlinux-to-elf's
``kallsyms_finder.py`` (Marin Moulinier): token bytes that stand for
themselves are kept as one-character tokens (``insert_real_symbols_in_table``),
so the tokens for '0'..'9' are ten consecutive one-character strings, a rare
byte pattern. The rest is found by structure and checked end to end: the
token index must list exactly the token table's offsets, the markers must
name every 256th entry of ``kallsyms_names``, ``kallsyms_num_syms`` must count
them, and the decoded addresses must be sorted.

Addresses are decoded as ``kallsyms_sym_address()`` (kernel/kallsyms.c) does
with ``CONFIG_KALLSYMS_ABSOLUTE_PERCPU`` (x86_64 SMP): a non-negative offset
is an absolute value (per-CPU variables), a negative one means
``relative_base - 1 - offset``. Without absolute per-CPU symbols every offset
is an unsigned displacement from ``relative_base``.

:func:`parse_kallsyms` is pure (bytes in, table out); :func:`read_guest_kallsyms`
pulls the kernel's read-only data out of a stopped guest and caches the
result on disk.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qprobes.errors import QprobesError, SymbolError
from qprobes.symbols.elf import Symbol, SymbolTable
from qprobes.symbols.sysmap import (
    DEFAULT_TEXT,
    KERNEL_MAP_SIZE,
    KERNEL_MAP_START,
    SLIDE_ALIGN,
    KernelSymbol,
    in_kernel_image,
    kernel_symbols,
)
from qprobes.target.paging import ADDR_MASK, CR3_ADDR_MASK, CR4_LA57, PTE_NX, PTE_PRESENT, PTE_PS
from qprobes.target.paging import PTE_RW as _PTE_RW
from qprobes.target.target import Target

# nm type letters kallsyms can hold (scripts/kallsyms.c drops U/N and most A).
_TYPE_LETTERS = frozenset(b"AaBbCcDdGgIiPpRrSsTtVvWwu?-")
_DIGIT_TOKENS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
_ALIGN = 8  # ALGN on 64-bit
_MAX_NAME = 512  # KSYM_NAME_LEN since v6.1
_MAX_SYMS = 1 << 22


class KallsymsNotFound(SymbolError):
    """No consistent set of kallsyms tables was found in the image."""


@dataclass(frozen=True)
class KallsymsLayout:
    """Where each table was found: offsets into the image (``None``: absent)."""

    token_table: int
    token_index: int
    markers: int
    names: int
    num_syms: int
    offsets: int
    relative_base: int | None
    seqs_of_names: int | None


@dataclass(frozen=True)
class RawKallsyms:
    """The decoded tables: one entry per kallsyms symbol, in table order
    (sorted by address). ``absolute[i]`` marks values KASLR does not move."""

    names: list[str]
    types: str
    addrs: list[int]
    absolute: list[bool]
    relative_base: int
    layout: KallsymsLayout

    def __len__(self) -> int:
        return len(self.names)

    def symbols(self) -> list[KernelSymbol]:
        """Sized symbols (size = distance to the next higher address)."""
        return kernel_symbols(zip(self.names, self.types, self.addrs, strict=True))


class KallsymsTable(SymbolTable):
    """A :class:`SymbolTable` read from kallsyms, with what the read learnt.

    ``slide`` is the KASLR slide (``_text`` - 0xffffffff81000000); ``banner``
    the kernel's ``linux_banner`` when it was found; ``from_cache`` whether the
    table came from the on-disk cache.
    """

    def __init__(
        self,
        symbols: list[Symbol],
        *,
        slide: int = 0,
        banner: str | None = None,
        from_cache: bool = False,
    ) -> None:
        super().__init__(symbols)
        self.slide = slide
        self.banner = banner
        self.from_cache = from_cache


# --- pure parsing -------------------------------------------------------------


def _align(value: int, to: int = _ALIGN) -> int:
    return (value + to - 1) & ~(to - 1)


def _u32(image: bytes, off: int) -> int:
    return int.from_bytes(image[off : off + 4], "little")


def _find_token_table(image: bytes, start: int = 0) -> Iterator[tuple[int, int, list[bytes]]]:
    """Yield ``(token_table, token_index, tokens)`` for every valid candidate.

    The anchor is the run of tokens "0".."9" (tokens 0x30-0x39); walk back 0x30
    tokens to the table's start, which must be 8-aligned, then check that
    ``kallsyms_token_index`` right after the table lists its offsets.
    """
    pos = start - 1
    while True:
        pos = image.find(_DIGIT_TOKENS, pos + 1)
        if pos < 0:
            return
        table = _token_table_start(image, pos)
        if table is None:
            continue
        found = _check_token_index(image, table)
        if found is not None:
            index, tokens = found
            yield table, index, tokens


def _token_table_start(image: bytes, digits: int) -> int | None:
    p = digits
    for _ in range(ord("0")):
        # p is the start of a token; the byte before it ends the previous one.
        if p < 2 or image[p - 1] != 0:
            return None
        q = image.rfind(b"\0", max(0, p - 2 - _MAX_NAME), p - 1)
        if q < 0 or p - 1 - (q + 1) < 1:  # tokens are never empty
            return None
        p = q + 1
    return p if p % _ALIGN == 0 else None


def _check_token_index(image: bytes, table: int) -> tuple[int, list[bytes]] | None:
    offsets: list[int] = []
    tokens: list[bytes] = []
    p = table
    for _ in range(256):
        end = image.find(b"\0", p, p + _MAX_NAME)
        if end <= p:
            return None
        offsets.append(p - table)
        tokens.append(image[p:end])
        p = end + 1
    if offsets[-1] > 0xFFFF:
        return None
    index = _align(p)
    if image[index : index + 512] != struct.pack("<256H", *offsets):
        return None
    return index, tokens


def _marker_runs(image: bytes, token_table: int, limit: int) -> Iterator[tuple[int, int]]:
    """Yield ``(position, length)`` of marker-array candidates below the token
    table, nearest first: an 8-aligned u32 zero followed by increasing u32."""
    p = (token_table - 4) & ~(_ALIGN - 1)
    while p >= max(0, token_table - limit):
        if image[p : p + 4] == b"\0\0\0\0":
            n = 1
            prev = 0
            q = p + 4
            while q + 4 <= len(image):
                v = _u32(image, q)
                # 256 names take at least 512 bytes and rarely more than 64 KiB.
                if not prev + 256 * 2 <= v <= prev + 256 * (_MAX_NAME + 2):
                    break
                prev = v
                n += 1
                q += 4
            yield p, n
        p -= _ALIGN


def _walk_names(
    image: bytes, start: int, count: int, stop: int, markers: list[int] | None = None
) -> tuple[list[tuple[int, int]], int] | None:
    """(data offset, length) of ``count`` entries of ``kallsyms_names`` from
    ``start``, and the end offset; None if they run past ``stop``, hold an
    impossible length, or (given ``markers``) disagree with the markers."""
    out: list[tuple[int, int]] = []
    p = start
    for i in range(count):
        if p >= stop:
            return None
        if markers is not None and i & 0xFF == 0 and p - start != markers[i >> 8]:
            return None
        n = image[p]
        p += 1
        if n & 0x80:  # "big" symbol: ULEB128 in two bytes (v6.1, for Rust)
            n = (n & 0x7F) | (image[p] << 7)
            p += 1
        if n == 0:
            return None
        out.append((p, n))
        p += n
    if p > stop:
        return None
    return out, p


def _find_names(
    image: bytes, markers: int, marker_vals: list[int]
) -> tuple[int, int, list[tuple[int, int]]] | None:
    """Find ``kallsyms_names`` ending at ``markers``: returns (start, N, entries).

    ``kallsyms_num_syms`` (a ``.long`` then padding to 8) sits 8 bytes before
    the names, and N must fit the marker count m: 256 (m - 1) < N <= 256 m.
    The last block of names (from the last marker) must end at the markers.
    """
    m = len(marker_vals)
    last = marker_vals[-1]
    hi = (markers - last - 2) & ~(_ALIGN - 1)
    lo = max(8, markers - last - 256 * (_MAX_NAME + 2))
    s = hi
    while s >= lo:
        n = _u32(image, s - 8)
        if 256 * (m - 1) < n <= 256 * m and _u32(image, s - 4) == 0:
            tail = _walk_names(image, s + last, n - 256 * (m - 1), markers)
            if tail is not None and markers - _ALIGN < tail[1] <= markers:
                full = _walk_names(image, s, n, markers, marker_vals)
                if full is not None:
                    return s, n, full[0]
        s -= _ALIGN
    return None


def _decode_addresses(
    image: bytes, offsets: int, n: int, relative_base: int
) -> tuple[list[int], list[bool]] | None:
    """``kallsyms_sym_address()`` for every symbol; None unless sorted."""
    if offsets < 0 or offsets + 4 * n > len(image):
        return None
    raw = array.array("i")
    raw.frombytes(image[offsets : offsets + 4 * n])
    if sys.byteorder != "little":
        raw.byteswap()
    absolute_percpu = any(v < 0 for v in raw)
    addrs: list[int] = []
    absolute: list[bool] = []
    mask = (1 << 64) - 1
    for v in raw:
        if not absolute_percpu:
            addrs.append((relative_base + (v & 0xFFFF_FFFF)) & mask)
            absolute.append(False)
        elif v >= 0:
            addrs.append(v)
            absolute.append(True)
        else:
            addrs.append((relative_base - 1 - v) & mask)
            absolute.append(False)
    if any(a > b for a, b in zip(addrs, addrs[1:], strict=False)):
        return None
    return addrs, absolute


def _decode_pointers(image: bytes, start: int, n: int) -> tuple[list[int], list[bool]] | None:
    """``kallsyms_addresses`` (no CONFIG_KALLSYMS_BASE_RELATIVE): one pointer each."""
    if start < 0 or start + 8 * n > len(image):
        return None
    addrs = list(struct.unpack_from(f"<{n}Q", image, start))
    if any(a > b for a, b in zip(addrs, addrs[1:], strict=False)):
        return None
    return addrs, [not in_kernel_image(a) for a in addrs]


def find_kallsyms(image: bytes, base: int = 0) -> RawKallsyms:
    """Find and decode the kallsyms tables in ``image`` (pure).

    ``image`` is a piece of kernel memory (or a raw kernel image) holding the
    tables; ``base`` is the address of ``image[0]``, used only to report
    positions. Addresses come out as stored: link-time ones from a file,
    relocated ones from a booted kernel's memory.
    """
    del base  # the tables hold their own addresses; kept for the signature
    tried = 0
    for token_table, token_index, tokens in _find_token_table(image):
        tried += 1
        for markers, run in _marker_runs(image, token_table, 4 * _MAX_SYMS):
            for m in (run, run - 1):
                if m < 1:
                    continue
                raw = _try_markers(image, markers, m, token_table, token_index, tokens)
                if raw is not None:
                    return raw
    if tried == 0:
        raise KallsymsNotFound("no kallsyms_token_table in the image (digit tokens not found)")
    raise KallsymsNotFound(
        f"found {tried} kallsyms_token_table candidate(s) but no consistent "
        "kallsyms_markers / kallsyms_names / kallsyms_num_syms before them"
    )


def _try_markers(
    image: bytes,
    markers: int,
    m: int,
    token_table: int,
    token_index: int,
    tokens: list[bytes],
) -> RawKallsyms | None:
    markers_end = markers + 4 * m
    gap = token_table - _align(markers_end)
    # Directly before the token table (<= v6.1, >= v6.4), or with
    # kallsyms_seqs_of_names (3 bytes a symbol) in between (v6.2, v6.3).
    if gap != 0 and not 3 * 256 * (m - 1) < gap <= 3 * 256 * m + _ALIGN:
        return None
    vals = list(struct.unpack_from(f"<{m}I", image, markers))
    found = _find_names(image, markers, vals)
    if found is None:
        return None
    names_start, n, entries = found
    seqs: int | None = None
    if gap:
        seqs = _align(markers_end)
        if _align(seqs + 3 * n) != token_table:
            return None
    num_syms = names_start - 8
    decoded = None
    layout_offsets = 0
    relative_base: int | None = None
    # Old order: offsets, relative_base, then num_syms.
    rb = num_syms - 8
    if rb >= 0:
        base_value = int.from_bytes(image[rb : rb + 8], "little")
        start = (rb - 4 * n) & ~(_ALIGN - 1)
        decoded = _decode_addresses(image, start, n, base_value)
        if decoded is not None:
            layout_offsets, relative_base = start, rb
        else:
            start = (num_syms - 8 * n) & ~(_ALIGN - 1)
            decoded = _decode_pointers(image, start, n)
            if decoded is not None:
                layout_offsets, relative_base = start, None
    if decoded is None:
        # v6.4 order: offsets and relative_base after the token index.
        start = _align(token_index + 512)
        rb = _align(start + 4 * n)
        if rb + 8 <= len(image):
            base_value = int.from_bytes(image[rb : rb + 8], "little")
            decoded = _decode_addresses(image, start, n, base_value)
            if decoded is not None:
                layout_offsets, relative_base = start, rb
                seqs = _align(rb + 8)
    if decoded is None:
        return None
    addrs, absolute = decoded
    names: list[str] = []
    types: list[str] = []
    getter = tokens.__getitem__
    for p, length in entries:
        text = b"".join(map(getter, image[p : p + length]))
        if not text or text[0] not in _TYPE_LETTERS:
            return None
        types.append(chr(text[0]))
        names.append(text[1:].decode("latin-1"))
    base_val = 0
    if relative_base is not None:
        base_val = int.from_bytes(image[relative_base : relative_base + 8], "little")
    layout = KallsymsLayout(
        token_table=token_table,
        token_index=token_index,
        markers=markers,
        names=names_start,
        num_syms=num_syms,
        offsets=layout_offsets,
        relative_base=relative_base,
        seqs_of_names=seqs,
    )
    return RawKallsyms(names, "".join(types), addrs, absolute, base_val, layout)


def parse_kallsyms(image: bytes, base: int = 0) -> KallsymsTable:
    """The symbol table held by the kallsyms tables in ``image`` (pure).

    ``base`` is the address of ``image[0]`` (informational). The slide is
    derived from ``_text``: zero for a file's link-time addresses.
    """
    raw = find_kallsyms(image, base)
    table = KallsymsTable(list(raw.symbols()))
    table.slide = _slide_from(raw)
    table.banner = find_banner(image)
    return table


def _slide_from(raw: RawKallsyms) -> int:
    for name in ("_text", "_stext", "startup_64"):
        try:
            i = raw.names.index(name)
        except ValueError:
            continue
        return raw.addrs[i] - DEFAULT_TEXT
    return 0


_BANNER_RE = re.compile(rb"Linux version \d+\.\d+[^\0\n]*\n?")


def find_banner(image: bytes) -> str | None:
    """The ``linux_banner`` string in ``image`` ("Linux version 6.1.0-... \\n")."""
    for match in _BANNER_RE.finditer(image):
        # linux_banner is NUL-terminated and contains "(" ... ")" parts;
        # linux_proc_banner is a "%s version %s" format and does not match.
        text = match.group(0)
        end = match.end()
        if b"(" in text and (end >= len(image) or image[end] == 0):
            return text.decode("latin-1")
    return None
