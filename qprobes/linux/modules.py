"""The guest's loaded modules, read from its memory: names, text, symbols,
BTF and ORC tables.

``modules`` is the kernel's list of ``struct module`` (``kernel/module/``);
layouts come from BTF, so 6.1's ``core_layout`` and 6.4's ``mem[MOD_TEXT]``
both work. Per module:

- its core text (``core_layout.base`` / ``.text_size``, or ``mem[0]``);
- its symbols, from ``mod->kallsyms`` (``struct mod_kallsyms``: an
  ``Elf64_Sym`` table, its string table and, since 5.x, a type letter per
  symbol), as ``/proc/kallsyms`` lists them with ``[module]``;
- its BTF (``btf_data``, split BTF on top of vmlinux's);
- its ORC tables (``arch.orc_unwind_ip``, ``arch.orc_unwind``,
  ``arch.num_orcs``), for the unwinder.

A module that is being loaded or unloaded (``state`` other than
``MODULE_STATE_LIVE``) is listed with its state, so callers can refuse it.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from qprobes.errors import QprobesError, SymbolError
from qprobes.linux.text import ModuleLayout, list_nodes
from qprobes.symbols.btf import Btf, BtfError
from qprobes.symbols.elf import Symbol, SymbolTable

Read = Callable[[int, int], bytes]

MODULE_STATE_LIVE = 0
MODULE_STATES = {0: "live", 1: "coming", 2: "going", 3: "unformed"}
_ELF64_SYM = struct.Struct("<IBBHQQ")  # st_name, st_info, st_other, st_shndx, st_value, st_size
MAX_MODULES = 4096  # btf_modules entries to look through
MAX_SYMBOLS = 1 << 17


class ModuleError(QprobesError):
    """The guest's module list cannot be read, or a module is not there."""


@dataclass
class Module:
    """One ``struct module`` of the guest."""

    addr: int  # of the struct module
    name: str
    state: int
    text: int  # core text base
    text_size: int
    size: int  # the whole core mapping
    kallsyms: int  # struct mod_kallsyms *
    btf_data: int
    btf_size: int
    orc_ip: int
    orc: int
    num_orcs: int
    _symbols: SymbolTable | None = field(default=None, repr=False)
    _btf: Btf | None = field(default=None, repr=False)

    @property
    def live(self) -> bool:
        return self.state == MODULE_STATE_LIVE

    def contains(self, addr: int) -> bool:
        return self.text <= addr < self.text + self.size

    def in_text(self, addr: int) -> bool:
        return self.text <= addr < self.text + self.text_size


def _kallsyms_sizes(syms: list[Symbol], text: int, text_size: int) -> list[Symbol]:
    """Sizes as the kernel reports them (``find_kallsyms_symbol``): for a
    symbol in the module's text, the distance to the next symbol or to the
    end of the text, not the ELF ``st_size`` (``%pS`` prints that size)."""
    end = text + text_size
    values = sorted({s.addr for s in syms})
    out = []
    for sym in syms:
        if text <= sym.addr < end:
            i = bisect.bisect_right(values, sym.addr)
            nxt = min(values[i], end) if i < len(values) else end
            out.append(Symbol(sym.name, sym.addr, nxt - sym.addr, sym.kind))
        else:
            out.append(sym)
    return out


class LinuxModules:
    """Reads the guest's module list through ``read`` (kernel virtual memory)."""

    def __init__(self, symbols: SymbolTable, btf: Btf, read: Read) -> None:
        self.vmlinux_btf = btf
        self.read = read
        try:
            self.head = symbols.address("modules")
        except SymbolError as exc:
            raise ModuleError(f"the guest has no module list ({exc})") from None
        off = btf.struct_member_offset
        try:
            # list, state, name and text: the layout the text rules read with.
            self.layout = ModuleLayout.from_btf(btf)
            self.o_kallsyms = off("module", "kallsyms")[0]
        except SymbolError as exc:
            raise ModuleError(f"struct module in the guest's BTF: {exc}") from None
        # The whole core mapping (6.1-6.3); 6.4+ keeps text alone in mem[MOD_TEXT].
        self.o_size = self._optional(btf, "core_layout.size")
        self.o_btf = self._optional(btf, "btf_data")
        self.o_btf_size = self._optional(btf, "btf_data_size")
        self.o_orc_ip = self._optional(btf, "arch.orc_unwind_ip")
        self.o_orc = self._optional(btf, "arch.orc_unwind")
        self.o_num_orcs = self._optional(btf, "arch.num_orcs")
        self.k_symtab = off("mod_kallsyms", "symtab")[0]
        self.k_num = off("mod_kallsyms", "num_symtab")[0]
        self.k_strtab = off("mod_kallsyms", "strtab")[0]
        self.k_typetab = self._optional(btf, "typetab", "mod_kallsyms")
        # After its init a module's .BTF section is gone (do_init_module sets
        # btf_data to NULL); the parsed copy stays on kernel/bpf/btf.c's
        # btf_modules list (struct btf_module {list, module, btf}; struct btf
        # {data, data_size}).
        self.btf_modules = symbols.address("btf_modules") if "btf_modules" in symbols else None
        self.bm_list = self._optional(btf, "list", "btf_module")
        self.bm_module = self._optional(btf, "module", "btf_module")
        self.bm_btf = self._optional(btf, "btf", "btf_module")
        self.b_data = self._optional(btf, "data", "btf")
        self.b_size = self._optional(btf, "data_size", "btf")
        self._cache: dict[int, Module] = {}
        # The module tree's latch seqcount (kernel/module/tree_lookup.c:
        # mod_tree.root.seq), +2 at every module added or removed: the
        # generation the caches are valid for. None: no such count.
        self.tree_seq: int | None = None
        if "mod_tree" in symbols:
            for path in ("root.seq.seqcount.sequence", "root.seq.sequence"):
                try:
                    self.tree_seq = symbols.address("mod_tree") + btf.struct_member_offset(
                        "mod_tree_root", path)[0]  # fmt: skip
                    break
                except SymbolError:
                    continue
        self._invalidations = 0  # bumped by invalidate() (the module watch)
        self._cache_gen: tuple[int, int] | None = None
        self._listed: list[Module] | None = None  # modules() as of _cache_gen

    @staticmethod
    def _optional(btf: Btf, path: str, struct_name: str = "module") -> int | None:
        try:
            return btf.struct_member_offset(struct_name, path)[0]
        except SymbolError:
            return None

    def _u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def _u32(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 4), "little")

    def generation(self) -> tuple[int, int] | None:
        """A value that changes whenever a module is added to or removed from
        the guest's module tree, or :meth:`invalidate` was called; None when
        the guest keeps no such count, or is changing the tree right now
        (an odd seqcount)."""
        if self.tree_seq is None:
            return None
        try:
            seq = self._u32(self.tree_seq)
        except QprobesError:
            return None
        return None if seq & 1 else (seq, self._invalidations)

    def invalidate(self) -> None:
        """A module is going (or coming): forget everything read about
        modules, so that an address its successor reuses is never taken for
        its code (symbols, BTF, ORC tables)."""
        self._invalidations += 1
        self._cache.clear()
        self._cache_gen = None
        self._listed = None

    def listed(self) -> list[Module]:
        """:meth:`modules` as of the current generation: one read while no
        module came or went (the states as they were then; :meth:`modules`
        reads them anew)."""
        gen = self.generation()
        if gen is None or gen != self._cache_gen or self._listed is None:
            return self.modules()
        return self._listed

    def modules(self) -> list[Module]:
        """Every formed module on the list now (symbols and BTF read on demand)."""
        layout = self.layout
        gen = self.generation()
        if gen is not None and gen != self._cache_gen:
            # Modules came or went: what was read about them may be another
            # module's now.
            self._cache.clear()
        out = []
        for node in list_nodes(self.read, self.head, "modules"):
            addr = node - layout.list
            state = int.from_bytes(self.read(addr + layout.state, 4), "little", signed=True)
            if state == layout.unformed:
                continue
            text = self._u64(addr + layout.text_base)
            cached = self._cache.get(addr)
            if cached is not None and cached.text == text and gen is not None:
                cached.state = state
                out.append(cached)
                continue
            raw_name = self.read(addr + layout.name, layout.name_size)
            name = raw_name.split(b"\0", 1)[0].decode("ascii", "replace")
            text_size = int.from_bytes(
                self.read(addr + layout.text_size, layout.text_size_width), "little"
            )
            if cached is not None and (cached.text, cached.name, cached.text_size) == (
                text, name, text_size):  # fmt: skip
                # No generation to go by: the same module if it looks the same.
                cached.state = state
                out.append(cached)
                continue

            def get(offset: int | None, size: int = 8, base: int = addr) -> int:
                if offset is None:
                    return 0
                return self._u64(base + offset) if size == 8 else self._u32(base + offset)

            module = Module(
                addr=addr, name=name, state=state, text=text, text_size=text_size,
                size=get(self.o_size, 4) or text_size,
                kallsyms=self._u64(addr + self.o_kallsyms),
                btf_data=get(self.o_btf), btf_size=get(self.o_btf_size, 4),
                orc_ip=get(self.o_orc_ip), orc=get(self.o_orc), num_orcs=get(self.o_num_orcs, 4),
            )  # fmt: skip
            self._cache[addr] = module
            out.append(module)
        if gen is not None and gen == self.generation():
            self._cache_gen, self._listed = gen, out
        else:
            self._cache_gen, self._listed = None, None
        return out

    def find(self, name: str) -> Module | None:
        for module in self.modules():
            if module.name == name:
                return module
        return None

    def module_at(self, addr: int, modules: list[Module] | None = None, *,
                  fresh: bool = False) -> Module | None:  # fmt: skip
        """The module whose core mapping holds ``addr``; from the list of this
        generation (:meth:`listed`), or read anew with ``fresh`` (states too)."""
        if modules is None:
            modules = self.modules() if fresh else self.listed()
        for module in modules:
            if module.contains(addr):
                return module
        return None

    def symbols(self, module: Module) -> SymbolTable:
        """The module's symbols (``mod->kallsyms``: the core ones, as
        ``/proc/kallsyms`` shows after its init)."""
        if module._symbols is not None:
            return module._symbols
        ks = module.kallsyms
        if not ks:
            raise ModuleError(f"module {module.name} has no symbol table")
        symtab, num = self._u64(ks + self.k_symtab), self._u32(ks + self.k_num)
        strtab = self._u64(ks + self.k_strtab)
        typetab = self._u64(ks + self.k_typetab) if self.k_typetab is not None else 0
        if num > MAX_SYMBOLS:
            raise ModuleError(f"module {module.name}: {num} symbols is not believable")
        raw = self.read(symtab, num * _ELF64_SYM.size) if num else b""
        entries = [_ELF64_SYM.unpack_from(raw, i * _ELF64_SYM.size) for i in range(num)]
        span = max((e[0] for e in entries), default=0) + 256
        strings = self._read_strings(strtab, span)
        types = self.read(typetab, num) if typetab and num else b""
        syms = []
        for i, (st_name, st_info, _other, shndx, value, size) in enumerate(entries):
            end = strings.find(b"\0", st_name)
            name = strings[st_name : end if end >= 0 else None].decode("ascii", "replace")
            if not name or not value or shndx == 0:
                continue
            letter = chr(types[i]) if types else ""
            kind = "func" if (st_info & 0xF) == 2 or letter in ("t", "T") else (
                "object" if (st_info & 0xF) == 1 else "notype")  # fmt: skip
            syms.append(Symbol(name, value, size, kind))
        module._symbols = SymbolTable(_kallsyms_sizes(syms, module.text, module.text_size))
        return module._symbols

    def _read_strings(self, addr: int, span: int) -> bytes:
        """The string table, read page by page (its end may be unmapped)."""
        out = bytearray()
        while len(out) < span:
            chunk = min(span - len(out), 4096 - (addr + len(out)) % 4096)
            try:
                out += self.read(addr + len(out), chunk)
            except QprobesError:
                break
        return bytes(out)

    def btf(self, module: Module) -> Btf | None:
        """The module's own BTF (split on vmlinux's), or None without it."""
        if module._btf is not None:
            return module._btf
        data, size = module.btf_data, module.btf_size
        if not data or not size:
            data, size = self._btf_of_loaded(module)
        if not data or not size:
            return None
        try:
            module._btf = Btf(self.read(data, size), base=self.vmlinux_btf)
        except BtfError as exc:
            raise ModuleError(f"module {module.name}: its BTF does not parse: {exc}") from None
        return module._btf

    def _btf_of_loaded(self, module: Module) -> tuple[int, int]:
        """The module's BTF as kernel/bpf/btf.c keeps it: (data, size) or (0, 0)."""
        needed = (self.btf_modules, self.bm_list, self.bm_module, self.bm_btf, self.b_data,
                  self.b_size)  # fmt: skip
        if any(x is None for x in needed):
            return 0, 0
        assert self.btf_modules is not None and self.bm_list is not None
        assert self.bm_module is not None and self.bm_btf is not None
        assert self.b_data is not None and self.b_size is not None
        node = self._u64(self.btf_modules)
        for _ in range(MAX_MODULES):
            if node in (0, self.btf_modules):
                break
            entry = node - self.bm_list
            if self._u64(entry + self.bm_module) == module.addr:
                btf = self._u64(entry + self.bm_btf)
                return self._u64(btf + self.b_data), self._u32(btf + self.b_size)
            node = self._u64(node)
        return 0, 0

    def resolve(self, addr: int) -> tuple[Symbol, int, Module] | None:
        """The module symbol containing ``addr`` (and the module)."""
        module = self.module_at(addr)
        if module is None:
            return None
        try:
            found = self.symbols(module).resolve(addr)
        except ModuleError:
            return None
        return (found[0], found[1], module) if found is not None else None

    def lookup(self, name: str, module_name: str | None = None) -> tuple[Symbol, Module]:
        """``MOD:SYM`` (or a plain ``SYM`` in any module) to its symbol.
        Raises :class:`ModuleError` naming what is missing."""
        modules = self.modules()
        if module_name is not None:
            module = next((m for m in modules if m.name == module_name), None)
            if module is None:
                loaded = ", ".join(sorted(m.name for m in modules)) or "none"
                raise ModuleError(
                    f"module {module_name} is not loaded (loaded: {loaded}); qprobes probes "
                    "loaded modules only"
                )
            candidates = [module]
        else:
            candidates = modules
        for module in candidates:
            table = self.symbols(module)
            if name in table:
                if not module.live:
                    raise ModuleError(f"module {module.name} is {MODULE_STATES.get(module.state)}")
                return table.lookup(name), module
        where = f"module {module_name}" if module_name else "vmlinux or any loaded module"
        raise ModuleError(f"unknown symbol {name!r} in {where}")
