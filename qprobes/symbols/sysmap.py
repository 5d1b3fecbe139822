"""System.map files, and the kernel-symbol pieces kallsyms shares with them.

A ``System.map`` is ``nm -n vmlinux`` output: ``ADDRESS TYPE NAME`` per line,
sorted by address, link-time (unslid) addresses. Debian's kernel packages
ship a placeholder instead of the real file::

    ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package

which :func:`parse_system_map` refuses with a :class:`SymbolError` that says
where the symbols can be had.

Neither System.map nor kallsyms records sizes. As users of
``/proc/kallsyms`` do (perf's ``kallsyms__parse`` callers, drgn's kallsyms
finder), a symbol's size is taken as the distance to the next higher
address.

KASLR (x86_64): the kernel image is mapped at ``__START_KERNEL_map``
(0xffffffff80000000) plus a 2 MiB-aligned slide of up to 1 GiB
(``KERNEL_IMAGE_SIZE`` with ``CONFIG_RANDOMIZE_BASE``), and ``_text`` sits at
0xffffffff81000000 + slide (``CONFIG_PHYSICAL_START`` = 16 MiB). Only
addresses inside that 1 GiB window move; per-CPU offsets (small absolute
values) and everything else do not.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qprobes.errors import SymbolError
from qprobes.symbols.elf import Symbol, SymbolTable, load_elf_symbols

#: ``__START_KERNEL_map``: where the kernel image window starts.
KERNEL_MAP_START = 0xFFFF_FFFF_8000_0000
#: ``KERNEL_IMAGE_SIZE`` with ``CONFIG_RANDOMIZE_BASE`` (arch/x86/include/asm/page_64_types.h).
KERNEL_MAP_SIZE = 1 << 30
#: ``_text`` of an unslid kernel (``__START_KERNEL`` with the default 16 MiB start).
DEFAULT_TEXT = 0xFFFF_FFFF_8100_0000
#: KASLR slides are multiples of ``CONFIG_PHYSICAL_ALIGN`` (2 MiB on Debian).
SLIDE_ALIGN = 2 << 20

# nm type letters of code (nm(1)): text, and weak symbols, which in a kernel
# are (almost always) __weak functions.
_FUNC_TYPES = frozenset("TtWw")

# Debian's placeholder; see debian/rules.real in the kernel packaging.
_DUMMY_TEXT = "The real System.map is in the"
_HEX_ADDRESS = re.compile(r"[0-9a-fA-F]+")


@dataclass(frozen=True)
class KernelSymbol(Symbol):
    """A kernel symbol with its ``nm`` type letter, as ``/proc/kallsyms`` shows it.

    Upper case is global, lower case local (``T``/``t`` text, ``D``/``d``
    data, ``R``/``r`` read-only data, ``B``/``b`` bss, ``A`` absolute,
    ``W``/``w`` weak, ``V``/``v`` weak object).
    """

    type: str

    @property
    def is_global(self) -> bool:
        return self.type.isupper()


def symbol_kind(type_letter: str) -> str:
    """:attr:`Symbol.kind` for an ``nm`` type letter: "func" for code, else "object"."""
    return "func" if type_letter in _FUNC_TYPES else "object"


def in_kernel_image(addr: int) -> bool:
    """Whether ``addr`` is in the window KASLR moves (``__START_KERNEL_map`` + 1 GiB)."""
    return KERNEL_MAP_START <= addr < KERNEL_MAP_START + KERNEL_MAP_SIZE


def kernel_symbols(entries: Iterable[tuple[str, str, int]]) -> list[KernelSymbol]:
    """Build sized :class:`KernelSymbol` objects from ``(name, type, addr)``.

    Sizes run to the next higher address of the same region (the kernel image
    window, or outside it: per-CPU offsets, absolute values); the highest
    symbol of a region gets size 0. Aliases (one address, several names) all
    get the same size.
    """
    items = sorted(entries, key=lambda e: e[2])
    addrs = [e[2] for e in items]
    out: list[KernelSymbol] = []
    for name, type_letter, addr in items:
        j = bisect.bisect_right(addrs, addr)
        size = 0
        if j < len(addrs) and in_kernel_image(addrs[j]) == in_kernel_image(addr):
            size = addrs[j] - addr
        out.append(KernelSymbol(name, addr, size, symbol_kind(type_letter), type_letter))
    return out


def slide_of(table: SymbolTable, text_addr: int = DEFAULT_TEXT) -> int:
    """The KASLR slide of a table read from a running kernel: ``_text`` minus
    its unslid address (``startup_64`` when ``_text`` is missing)."""
    # arch/x86/kernel/vmlinux.lds.S puts _text, _stext and startup_64 (the
    # first head text) at one address.
    for name in ("_text", "_stext", "startup_64"):
        if name in table:
            return table.address(name) - text_addr
    raise SymbolError("cannot tell the KASLR slide: no _text, startup_64 or _stext symbol")


def apply_slide(table: SymbolTable, slide: int) -> SymbolTable:
    """A copy of ``table`` with every address in the kernel image window moved
    by ``slide`` (link-time addresses -> a KASLR boot's addresses)."""
    if slide == 0:
        return table
    if slide % SLIDE_ALIGN:
        raise SymbolError(f"KASLR slide {slide:#x} is not a multiple of 2 MiB")
    moved = [
        dataclasses.replace(sym, addr=sym.addr + slide) if in_kernel_image(sym.addr) else sym
        for sym in _all_symbols(table)
    ]
    return SymbolTable(moved)


def _all_symbols(table: SymbolTable) -> list[Symbol]:
    # SymbolTable iterates one symbol per name; the address index holds all.
    return table.all_symbols()


def parse_system_map(text: str, slide: int = 0, *, source: str = "System.map") -> SymbolTable:
    """Parse ``nm -n`` style lines (System.map, or ``/proc/kallsyms``, whose
    optional ``[module]`` column is ignored) and apply ``slide``.

    Raises :class:`SymbolError` for Debian's placeholder file and for text
    with no symbol lines.
    """
    entries: list[tuple[str, str, int]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if _DUMMY_TEXT in line:
            raise SymbolError(
                f"{source} is Debian's placeholder ({line.strip()!r}): the real symbols are in "
                "the matching linux-image-<version>-dbg package "
                "(/usr/lib/debug/boot/System.map-<version>, or its vmlinux), "
                "or read them from the running guest's kallsyms "
                "(qprobes.symbols.kallsyms.read_guest_kallsyms)"
            )
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (3, 4) or len(fields[1]) != 1:
            raise SymbolError(f"{source}:{lineno}: not a System.map line: {line.strip()!r}")
        if _HEX_ADDRESS.fullmatch(fields[0]) is None:  # int(x, 16) takes "-1", "0x1", "1_0"
            raise SymbolError(f"{source}:{lineno}: bad address {fields[0]!r}")
        addr = int(fields[0], 16)
        type_letter, name = fields[1], fields[2]
        if type_letter in "UuNn":  # undefined or debugging: no address to use
            continue
        entries.append((name, type_letter, addr))
    if not entries:
        raise SymbolError(f"{source} holds no symbols")
    table = SymbolTable(list(kernel_symbols(entries)))
    return apply_slide(table, slide)


def load_system_map(path: str | Path, slide: int = 0) -> SymbolTable:
    """Read a System.map file; ``slide`` is the running kernel's KASLR slide."""
    try:
        text = Path(path).read_text(encoding="latin-1")
    except OSError as exc:
        raise SymbolError(f"cannot read {path}: {exc}") from exc
    return parse_system_map(text, slide, source=str(path))


def load_vmlinux_symbols(path: str | Path, slide: int = 0) -> SymbolTable:
    """The symbols of an (unstripped) vmlinux ELF, moved by ``slide``."""
    return apply_slide(load_elf_symbols(path), slide)
