"""Kernel symbols recovered from the kallsyms tables in kernel memory.

Distribution kernels such as Debian's ``linux-image-*-cloud-amd64`` ship a
placeholder System.map; with ``CONFIG_KALLSYMS_ALL=y`` every symbol is still
inside the kernel, in the tables ``scripts/kallsyms.c`` generates into
``.rodata`` (``write_src()``). Each label is aligned to 8 bytes (``ALGN``,
``.balign 8`` on 64-bit) and the tables come in this order:

1. ``kallsyms_offsets``: one ``.long`` per symbol
   (``CONFIG_KALLSYMS_BASE_RELATIVE``; without it ``kallsyms_addresses``,
   one pointer each);
2. ``kallsyms_relative_base``: a pointer, relocated at boot (KASLR);
3. ``kallsyms_num_syms``: ``.long`` N;
4. ``kallsyms_names``: N entries, each a length (ULEB128, one or two bytes
   since v6.1's "kallsyms: support big kernel symbols") then token bytes;
   the expanded string is the type letter followed by the name;
5. ``kallsyms_markers``: ``.long`` offset in ``kallsyms_names`` of every
   256th entry;
6. ``kallsyms_seqs_of_names``: 3 bytes per symbol (v6.2, "kallsyms: Reduce
   the memory occupied by kallsyms_seqs_of_names[]"; 4 before it). Plain
   v6.1 lacks it; Debian's 6.1.y has the stable backport (measured on
   6.1.0-56-cloud-amd64);
7. ``kallsyms_token_table``: 256 NUL-terminated tokens;
8. ``kallsyms_token_index``: 256 ``.short`` offsets into the token table.

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
import dataclasses
import hashlib
import itertools
import json
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qprobes.arch.x86_64.idt import GATE_SIZE, gate_offset
from qprobes.errors import QprobesError, SymbolError
from qprobes.symbols.elf import Symbol, SymbolTable
from qprobes.symbols.sysmap import (
    DEFAULT_TEXT,
    KERNEL_MAP_START,
    SLIDE_ALIGN,
    KernelSymbol,
    in_kernel_image,
    kernel_symbols,
)
from qprobes.target.paging import (
    ADDR_MASK,
    CR3_ADDR_MASK,
    CR4_LA57,
    PTE_NX,
    PTE_PRESENT,
    PTE_PS,
    PTE_RW,
)
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
    """Where each table was found: ``base`` + offset into the image, that is
    the tables' addresses when ``base`` is the image's (``None``: absent)."""

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
    table came from the on-disk cache; ``entries`` every symbol, repeated
    names included, in kallsyms (address) order, as ``/proc/kallsyms`` lists
    them.
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
        self.entries = list(symbols)
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
        # Tokens are not empty in real kernels (all 256 codes get used), but
        # scripts/kallsyms.c would emit "" for a code it found no use for.
        q = image.rfind(b"\0", max(0, p - 2 - _MAX_NAME), p - 1)
        if q < 0:
            return None
        p = q + 1
    return p if p % _ALIGN == 0 else None


def _check_token_index(image: bytes, table: int) -> tuple[int, list[bytes]] | None:
    offsets: list[int] = []
    tokens: list[bytes] = []
    p = table
    for _ in range(256):
        end = image.find(b"\0", p, p + _MAX_NAME)
        if end < 0:
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
    if any(a > b for a, b in itertools.pairwise(addrs)):
        return None
    return addrs, absolute


def _decode_pointers(image: bytes, start: int, n: int) -> tuple[list[int], list[bool]] | None:
    """``kallsyms_addresses`` (no CONFIG_KALLSYMS_BASE_RELATIVE): one pointer each."""
    if start < 0 or start + 8 * n > len(image):
        return None
    addrs = list(struct.unpack_from(f"<{n}Q", image, start))
    if any(a > b for a, b in itertools.pairwise(addrs)):
        return None
    return addrs, [not in_kernel_image(a) for a in addrs]


def find_kallsyms(image: bytes, base: int = 0) -> RawKallsyms:
    """Find and decode the kallsyms tables in ``image`` (pure).

    ``image`` is a piece of kernel memory (or a raw kernel image) holding the
    tables; ``base`` is the address of ``image[0]``, used only to report
    where the tables are (:class:`KallsymsLayout`). Symbol addresses come out
    as stored: link-time ones from a file, relocated ones from a booted
    kernel's memory.
    """
    if base % _ALIGN:
        # The tables' alignment is in the address space: realign the buffer.
        pad = base % _ALIGN
        return find_kallsyms(b"\0" * pad + image, base - pad)
    tried = 0
    for token_table, token_index, tokens in _find_token_table(image):
        tried += 1
        for markers, run in _marker_runs(image, token_table, 4 * _MAX_SYMS):
            for m in (run, run - 1):
                if m < 1:
                    continue
                raw = _try_markers(image, markers, m, token_table, token_index, tokens)
                if raw is not None:
                    return _rebase(raw, base)
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
    # kallsyms_seqs_of_names (3 bytes a symbol; 4 in its first form) in
    # between (v6.2, v6.3, and stable backports such as Debian's 6.1.y).
    if gap != 0 and not 3 * 256 * (m - 1) < gap <= 4 * 256 * m + _ALIGN:
        return None
    vals = list(struct.unpack_from(f"<{m}I", image, markers))
    found = _find_names(image, markers, vals)
    if found is None:
        return None
    names_start, n, entries = found
    seqs: int | None = None
    if gap:
        seqs = _align(markers_end)
        if token_table not in (_align(seqs + 3 * n), _align(seqs + 4 * n)):
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


def _rebase(raw: RawKallsyms, base: int) -> RawKallsyms:
    if not base:
        return raw
    lay = raw.layout
    layout = KallsymsLayout(
        token_table=base + lay.token_table,
        token_index=base + lay.token_index,
        markers=base + lay.markers,
        names=base + lay.names,
        num_syms=base + lay.num_syms,
        offsets=base + lay.offsets,
        relative_base=None if lay.relative_base is None else base + lay.relative_base,
        seqs_of_names=None if lay.seqs_of_names is None else base + lay.seqs_of_names,
    )
    return dataclasses.replace(raw, layout=layout)


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


# --- the kernel image in a running guest ----------------------------------------

ReadPhys = Callable[[int, int], bytes]
"""Reads ``length`` bytes of guest-physical memory (``Target.read_phys``,
``HostMemory.read_phys``)."""

_PAGE = 4096
_PMD = 2 << 20
_MASK64 = (1 << 64) - 1
# IDT vectors whose gates point into kernel text and that qprobes leaves alone
# (it redirects 1, 3, 13 and 14): #DE, #UD, NMI, #DF, #MF, #AC, #MC, #XM.
_IDT_VECTORS = (0, 6, 2, 8, 16, 17, 18, 19)
_PTI_USER_BIT = 1 << 12


@dataclass(frozen=True)
class KernelMapping:
    """One present leaf of the kernel image window's page tables."""

    vaddr: int
    paddr: int
    size: int
    writable: bool
    executable: bool

    @property
    def end(self) -> int:
        return self.vaddr + self.size


class KernelImage:
    """The kernel image window (``__START_KERNEL_map`` + 1 GiB) of a stopped guest.

    Built from one read of the window's page directory (plus the page
    tables of 2 MiB regions Linux split into 4 KiB pages). The kernel is
    decompressed to one physically contiguous block, so the image reads as
    guest-physical memory at ``vaddr - phys_offset``: large physical reads are
    much cheaper than virtual ones. ``read_phys`` defaults to
    :meth:`Target.read_phys` (gdbstub); pass ``HostMemory.read_phys`` to read
    QEMU's RAM directly.
    """

    def __init__(self, target: Target, read_phys: ReadPhys | None = None) -> None:
        self.target = target
        self.read_phys: ReadPhys = read_phys or target.read_phys
        regs = target.registers()
        self.la57 = bool(regs.cr4 & CR4_LA57)
        self.rip = regs.rip
        self.cr3 = regs.cr3 & CR3_ADDR_MASK
        self.mappings = self._walk(self.cr3)
        if self.cr3 & _PTI_USER_BIT:
            # Stopped on user page tables under page-table isolation: they map
            # only the entry text of the image. The kernel's half of the 8 KiB
            # PGD pair is the one below (arch/x86/mm/pti.c, PTI_USER_PGTABLE_BIT).
            kernel = self._walk(self.cr3 & ~_PTI_USER_BIT)
            if sum(m.size for m in kernel) > sum(m.size for m in self.mappings):
                self.cr3, self.mappings = self.cr3 & ~_PTI_USER_BIT, kernel
        if not self.mappings:
            raise SymbolError(
                "nothing is mapped in the kernel image window "
                f"{KERNEL_MAP_START:#x}+1GiB (cr3={self.cr3:#x}): is this a Linux guest "
                "past early boot?"
            )
        first = self.mappings[0]
        self.phys_offset = first.vaddr - first.paddr
        self.contiguous = all(m.vaddr - m.paddr == self.phys_offset for m in self.mappings)

    def _u64s(self, paddr: int) -> tuple[int, ...]:
        return struct.unpack("<512Q", self.read_phys(paddr & ADDR_MASK, _PAGE))

    def _walk(self, cr3: int) -> list[KernelMapping]:
        # Upper levels: PML5[511] (LA57), PML4[511], PDPT[510] map the window.
        table = cr3
        levels = [511, 511, 510] if self.la57 else [511, 510]
        for index in levels:
            entry = self._u64s(table)[index]
            if not entry & PTE_PRESENT:
                return []
            if entry & PTE_PS:
                raise SymbolError("the kernel image window is one 1 GiB page: not a Linux layout")
            table = entry & ADDR_MASK
        out: list[KernelMapping] = []
        for i, pde in enumerate(self._u64s(table)):
            if not pde & PTE_PRESENT:
                continue
            vaddr = KERNEL_MAP_START + i * _PMD
            if pde & PTE_PS:
                out.append(_mapping(vaddr, pde & ADDR_MASK & ~(_PMD - 1), _PMD, pde, pde))
                continue
            for j, pte in enumerate(self._u64s(pde)):
                if pte & PTE_PRESENT:
                    page = _mapping(vaddr + j * _PAGE, pte & ADDR_MASK, _PAGE, pde, pte)
                    prev = out[-1] if out else None
                    if (
                        prev is not None
                        and prev.end == page.vaddr
                        and prev.paddr + prev.size == page.paddr
                        and (prev.writable, prev.executable) == (page.writable, page.executable)
                    ):
                        out[-1] = KernelMapping(
                            prev.vaddr, prev.paddr, prev.size + _PAGE, prev.writable,
                            prev.executable,
                        )  # fmt: skip
                    else:
                        out.append(page)
        return out

    @property
    def start(self) -> int:
        """The lowest mapped address: ``_text`` (``cleanup_highmap()`` unmaps below it)."""
        return self.mappings[0].vaddr

    @property
    def end(self) -> int:
        return self.mappings[-1].end

    def mapping(self, vaddr: int) -> KernelMapping | None:
        for m in self.mappings:
            if m.vaddr <= vaddr < m.end:
                return m
        return None

    def read(self, vaddr: int, length: int) -> bytes:
        """Read ``length`` bytes of the image at ``vaddr`` as physical memory.

        A contiguous image is read in one go, unmapped holes (freed init and
        gap pages) included; otherwise each mapping is read on its own and
        holes read as zeros.
        """
        if self.contiguous:
            return self.read_phys(vaddr - self.phys_offset, length)
        out = bytearray(length)
        end = vaddr + length
        for m in self.mappings:
            lo, hi = max(vaddr, m.vaddr), min(end, m.end)
            if lo < hi:
                out[lo - vaddr : hi - vaddr] = self.read_phys(m.paddr + lo - m.vaddr, hi - lo)
        return bytes(out)

    def text_addresses(self) -> list[int]:
        """Kernel text addresses from IDT gates (and rip), executable and mapped."""
        found: list[int] = []
        try:
            idt = self.target.idt()
            gates = self.target.read(idt.base, min(idt.limit + 1, 32 * 16))
        except QprobesError:
            gates = b""
        for vector in _IDT_VECTORS:
            gate = gates[vector * GATE_SIZE : (vector + 1) * GATE_SIZE]
            if len(gate) == GATE_SIZE and gate[5] & 0x80:  # present
                found.append(gate_offset(gate))
        found.append(self.rip)
        out = []
        for addr in found:
            m = self.mapping(addr)
            if m is not None and m.executable and addr not in out:
                out.append(addr)
        return out

    def rodata_range(self, after: int) -> tuple[int, int] | None:
        """The first run of read-only, non-executable pages above ``after``:
        ``__start_rodata`` .. ``__end_rodata`` once ``mark_rodata_ro()`` ran."""
        start = None
        end = 0
        for m in self.mappings:
            if m.end <= after:
                continue
            readonly_data = not m.writable and not m.executable
            if start is None:
                if readonly_data:
                    start, end = m.vaddr, m.end
            elif readonly_data and m.vaddr == end:
                end = m.end
            else:
                break
        return None if start is None else (start, end)


def _mapping(vaddr: int, paddr: int, size: int, pde: int, leaf: int) -> KernelMapping:
    writable = bool(pde & PTE_RW and leaf & PTE_RW)
    executable = not (pde & PTE_NX or leaf & PTE_NX)
    return KernelMapping(vaddr, paddr, size, writable, executable)


# --- the on-disk cache ------------------------------------------------------------

_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``${QPROBES_CACHE:-~/.cache/qprobes}/symbols``."""
    base = os.environ.get("QPROBES_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "qprobes"
    return root / "symbols"


def _cache_path(cache_dir: Path, banner: str) -> Path:
    digest = hashlib.sha256(banner.encode("latin-1")).hexdigest()[:32]
    return cache_dir / f"kallsyms-{digest}.bin"


def _write_cache(
    cache_dir: Path, table: KallsymsTable, raw: RawKallsyms, handlers: list[int]
) -> None:
    """Store unslid addresses, so a KASLR reboot of the same kernel hits.
    ``handlers`` are the kernel text addresses the IDT named (slid)."""
    if table.banner is None:
        return
    slide = table.slide
    addrs = array.array("Q", ((a - slide) & _MASK64 if not ab else a
                              for a, ab in zip(raw.addrs, raw.absolute, strict=True)))  # fmt: skip
    if sys.byteorder != "little":
        addrs.byteswap()
    header = {
        "format": _CACHE_FORMAT,
        "banner": table.banner,
        "count": len(raw),
        "text": DEFAULT_TEXT + _slide_from(raw) - slide,
        "linux_banner": _unslid(table, "linux_banner"),
        "handlers": [t - slide for t in handlers],
    }
    blob = b"".join(
        (
            json.dumps(header).encode() + b"\n",
            raw.types.encode("latin-1"),
            bytes(bytearray(raw.absolute)),
            addrs.tobytes(),
            "\n".join(raw.names).encode("latin-1"),
        )
    )
    path = _cache_path(cache_dir, table.banner)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


def _unslid(table: KallsymsTable, name: str) -> int | None:
    if name not in table:
        return None
    return table.address(name) - table.slide


def _read_cache_header(path: Path) -> dict[str, object] | None:
    try:
        with path.open("rb") as f:
            line = f.readline(1 << 16)
        header = json.loads(line)
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or header.get("format") != _CACHE_FORMAT:
        return None
    return header


def _load_cache(path: Path, slide: int) -> RawKallsyms | None:
    try:
        data = path.read_bytes()
        nl = data.index(b"\n")
        header = json.loads(data[:nl])
        n = int(header["count"])
        p = nl + 1
        types = data[p : p + n].decode("latin-1")
        p += n
        absolute = [bool(b) for b in data[p : p + n]]
        p += n
        addrs = array.array("Q")
        addrs.frombytes(data[p : p + 8 * n])
        if sys.byteorder != "little":
            addrs.byteswap()
        p += 8 * n
        names = data[p:].decode("latin-1").split("\n")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(names) != n or len(absolute) != n or len(addrs) != n:
        return None
    slid = [a if ab else (a + slide) & _MASK64 for a, ab in zip(addrs, absolute, strict=True)]
    layout = KallsymsLayout(0, 0, 0, 0, 0, 0, None, None)
    return RawKallsyms(names, types, slid, absolute, 0, layout)


def _try_cache(image: KernelImage, cache_dir: Path, texts: list[int]) -> KallsymsTable | None:
    """Find a cache entry for the running kernel: its ``linux_banner`` must
    read back at the slid address, and an IDT handler must be a symbol start."""
    try:
        paths = sorted(cache_dir.glob("kallsyms-*.bin"), key=lambda p: -p.stat().st_mtime)
    except OSError:
        return None
    for path in paths:
        header = _read_cache_header(path)
        if header is None:
            continue
        banner, text, where = header.get("banner"), header.get("text"), header.get("linux_banner")
        handlers = header.get("handlers")
        if not (isinstance(banner, str) and isinstance(text, int) and isinstance(where, int)):
            continue
        # The slide: _text is the lowest mapped address (cleanup_highmap()),
        # or an IDT handler moved by the same amount.
        slides = [image.start - text]
        if isinstance(handlers, list):
            slides += [t - h for t in texts for h in handlers if isinstance(h, int)]
        for slide in dict.fromkeys(slides):
            if slide % SLIDE_ALIGN or not in_kernel_image(where + slide):
                continue
            try:
                seen = image.read(where + slide, len(banner))
            except QprobesError:
                continue
            if seen != banner.encode("latin-1"):
                continue
            raw = _load_cache(path, slide)
            if raw is None:
                break
            table = KallsymsTable(list(raw.symbols()), slide=slide, banner=banner, from_cache=True)
            if texts and not any(_is_symbol_start(table, addr) for addr in texts):
                break
            return table
    return None


# --- kallsyms without a guest ---------------------------------------------------
#
# The kallsyms tables are part of the kernel image: the same image has the
# same symbols, and without KASLR (``nokaslr``) they sit at the same
# addresses on every boot. A boot record, keyed by the image file's sha256,
# names the banner-keyed cache entry above and the slide that boot had, so a
# later ``qprobes symbols`` of the same image with KASLR off is answered with
# no guest at all. With KASLR each boot has its own slide: no record is used.

_BOOT_FORMAT = 1


def _boot_record_path(cache_dir: Path, image_sha256: str) -> Path:
    return cache_dir / f"boot-{image_sha256[:32]}-nokaslr.json"


def remember_boot(
    image_sha256: str, table: KallsymsTable, *, cache_dir: Path | None = None
) -> bool:
    """Record that the kernel image with this sha256, booted with KASLR off,
    has ``table`` (read from its memory). Returns whether a record was written
    (not when the table's cache entry is missing or is another kernel's)."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    if table.banner is None:
        return False
    entry = _cache_path(cache, table.banner)
    header = _read_cache_header(entry)
    if header is None or header.get("banner") != table.banner:
        return False
    try:
        digest = hashlib.sha256(entry.read_bytes()).hexdigest()
    except OSError:
        return False
    record = {
        "format": _BOOT_FORMAT,
        "image_sha256": image_sha256,
        "kaslr": False,
        "banner": table.banner,
        "slide": table.slide,
        "count": header.get("count"),
        # Another kernel with the same banner could rewrite the entry later.
        "entry_sha256": digest,
    }
    path = _boot_record_path(cache, image_sha256)
    try:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except OSError:
        return False  # only costs a boot next time
    return True


def cached_kallsyms(image_sha256: str, *, cache_dir: Path | None = None) -> KallsymsTable | None:
    """The kallsyms of the kernel image with this sha256 as an earlier boot
    with KASLR off read them (:func:`remember_boot`), or None when no boot of
    that image was recorded. Only valid for a boot with KASLR off."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    try:
        record = json.loads(_boot_record_path(cache, image_sha256).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != _BOOT_FORMAT:
        return None
    banner, slide = record.get("banner"), record.get("slide")
    if record.get("image_sha256") != image_sha256 or record.get("kaslr") is not False:
        return None
    if not isinstance(banner, str) or not isinstance(slide, int):
        return None
    path = _cache_path(cache, banner)
    try:
        if hashlib.sha256(path.read_bytes()).hexdigest() != record.get("entry_sha256"):
            return None
    except OSError:
        return None
    raw = _load_cache(path, slide)
    if raw is None:
        return None
    return KallsymsTable(list(raw.symbols()), slide=slide, banner=banner, from_cache=True)


def _is_symbol_start(table: SymbolTable, addr: int) -> bool:
    found = table.resolve(addr)
    return found is not None and found[1] == 0


# --- the reader -------------------------------------------------------------------


def read_guest_kallsyms(
    target: Target,
    *,
    read_phys: ReadPhys | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    write_cache: bool = True,
) -> KallsymsTable:
    """Recover the running kernel's symbols from its kallsyms tables.

    The guest must be stopped. Steps: walk the page tables of the kernel
    image window; find kernel text through the IDT gates (#DE, #UD, ...; rip
    as a fallback); read the read-only data after it (``__start_rodata`` ..
    ``__end_rodata`` once ``mark_rodata_ro()`` has run, otherwise the image
    from that text to its end) as guest-physical memory; then
    :func:`find_kallsyms`. ``read_phys`` replaces :meth:`Target.read_phys`
    (``HostMemory(target, pid).read_phys`` reads QEMU's RAM directly).

    The result is cached under ``cache_dir`` (default
    ``~/.cache/qprobes/symbols``), keyed by a hash of ``linux_banner``, with
    unslid addresses: a later boot of the same kernel, with any KASLR slide,
    costs a few small reads. A cache entry is used only when the banner reads
    back at its slid address and an IDT handler is a symbol start there.
    ``use_cache=False`` skips the lookup (the entry is still refreshed unless
    ``write_cache=False``).
    """
    image = KernelImage(target, read_phys)
    texts = image.text_addresses()
    if not texts:
        raise SymbolError("found no kernel text address (IDT gates, rip) in the kernel image")
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    if use_cache:
        hit = _try_cache(image, cache, texts)
        if hit is not None:
            return hit
    text = min(texts)
    ranges: list[tuple[int, int]] = []
    rodata = image.rodata_range(text)
    if rodata is not None:
        ranges.append(rodata)
    ranges.append((text & ~(_PMD - 1), image.end))
    ranges.append((image.start, image.end))
    errors: list[str] = []
    for start, end in dict.fromkeys(ranges):
        data = image.read(start, end - start)
        try:
            raw = find_kallsyms(data, start)
        except KallsymsNotFound as exc:
            errors.append(f"{start:#x}-{end:#x}: {exc}")
            continue
        table = KallsymsTable(list(raw.symbols()), slide=_slide_from(raw))
        table.banner = _banner_from(table, image, data, start)
        if write_cache:
            _write_cache(cache, table, raw, [t for t in texts if _is_symbol_start(table, t)])
        return table
    raise KallsymsNotFound("no kallsyms tables in the guest's kernel image: " + "; ".join(errors))


def _banner_from(table: KallsymsTable, image: KernelImage, data: bytes, start: int) -> str | None:
    if "linux_banner" in table:
        addr = table.address("linux_banner")
        if start <= addr < start + len(data):
            chunk = data[addr - start : addr - start + 1024]
        else:
            try:
                chunk = image.read(addr, 1024)
            except QprobesError:
                chunk = b""
        text = chunk.split(b"\0", 1)[0]
        if text.startswith(b"Linux version "):
            return text.decode("latin-1")
    return find_banner(data)
