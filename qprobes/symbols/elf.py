"""Symbols from an ELF image (vmlinux, qtest) through pyelftools."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qprobes.errors import SymbolError


@dataclass(frozen=True)
class Symbol:
    """A named address; ``size`` is 0 when the symbol table gives none."""

    name: str
    addr: int
    size: int
    kind: str  # "func", "object", "notype"

    @property
    def end(self) -> int:
        return self.addr + self.size

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.addr <= addr < self.end


class SymbolTable:
    """Symbols by name and by address."""

    def __init__(self, symbols: list[Symbol]) -> None:
        self._by_name: dict[str, Symbol] = {}
        for sym in symbols:
            # Prefer sized function symbols when names repeat.
            old = self._by_name.get(sym.name)
            if old is None or (old.size == 0 and sym.size):
                self._by_name[sym.name] = sym
        self._sorted = sorted(symbols, key=lambda s: (s.addr, -s.size))
        self._addrs = [s.addr for s in self._sorted]

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Symbol]:
        """One symbol per name."""
        return iter(self._by_name.values())

    def all_symbols(self) -> list[Symbol]:
        """Every symbol, repeated names included, by address."""
        return list(self._sorted)

    def lookup(self, name: str) -> Symbol:
        """The symbol called ``name``; :class:`SymbolError` if there is none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise SymbolError(f"unknown symbol {name!r}") from None

    def address(self, name: str) -> int:
        return self.lookup(name).addr

    def resolve(self, addr: int) -> tuple[Symbol, int] | None:
        """The symbol containing ``addr`` and the offset into it, if any."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        while i >= 0:
            sym = self._sorted[i]
            if sym.addr <= addr < sym.end or (sym.size == 0 and sym.addr == addr):
                return sym, addr - sym.addr
            if sym.addr < addr and sym.size:
                return None
            i -= 1
        return None

    def format(self, addr: int) -> str:
        """``name+0xoff`` for ``addr``, or its hex value."""
        found = self.resolve(addr)
        if found is None:
            return f"{addr:#x}"
        sym, off = found
        return f"{sym.name}+{off:#x}" if off else sym.name


def load_elf_symbols(path: str | Path) -> SymbolTable:
    """Read the ``.symtab`` (or ``.dynsym``) of an ELF file."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    kinds = {"STT_FUNC": "func", "STT_OBJECT": "object", "STT_NOTYPE": "notype"}
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            symbols: list[Symbol] = []
            for section in elf.iter_sections():
                if not isinstance(section, SymbolTableSection):
                    continue
                for sym in section.iter_symbols():
                    kind = kinds.get(sym["st_info"]["type"])
                    if kind is None or not sym.name or sym["st_shndx"] == "SHN_UNDEF":
                        continue
                    symbols.append(Symbol(sym.name, sym["st_value"], sym["st_size"], kind))
    except OSError as exc:
        raise SymbolError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:  # pyelftools raises its own ELFError and others
        raise SymbolError(f"{path} is not a readable ELF file: {exc}") from exc
    if not symbols:
        raise SymbolError(f"{path} has no symbol table")
    return SymbolTable(symbols)
