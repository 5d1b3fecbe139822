"""Finding 10: what qprobes read about a module must never be used for
another module at the same addresses (one unloaded, the next loaded where it
was: vmalloc hands the same range out again, and struct module lives in the
module's own memory). And the module list is walked once per generation of
the kernel's module tree, not at every symbolized address.

A fake guest holds ``struct module``s (offsets of our own choosing, as BTF
would give them), their ``mod_kallsyms`` and ORC tables, and the module
tree's latch seqcount (``mod_tree.root.seq``, +2 per module added or removed).
"""

from __future__ import annotations

import struct

import pytest

from qprobes.linux.modules import LinuxModules
from qprobes.linux.orc import OrcEntry, OrcTable
from qprobes.linux.text import ModuleLayout
from tests.unit.test_linux_orc import V61, raw

HEAD = 0xFFFFFFFF82000000  # the modules list head
SEQ = 0xFFFFFFFF82000100  # mod_tree.root.seq
MOD = 0xFFFFFFFFC0002000  # struct module (in the module's own mapping)
TEXT = 0xFFFFFFFFC0000000
TEXT_SIZE = 0x1000
LAYOUT = ModuleLayout(list=0, state=16, name=24, name_size=56, text_base=80, text_size=88,
                      text_size_width=4, unformed=3)  # fmt: skip


class Guest:
    def __init__(self) -> None:
        self.mem: dict[int, int] = {}
        self.reads = 0
        self.seq = 0
        self.order: list[int] = []
        self.put(HEAD, struct.pack("<QQ", HEAD, HEAD))
        self.put(SEQ, struct.pack("<I", 0))

    def put(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.mem[addr + i] = b

    def read(self, addr: int, n: int) -> bytes:
        self.reads += 1
        return bytes(self.mem.get(addr + i, 0) for i in range(n))

    def _tree_changed(self) -> None:
        self.seq += 2
        self.put(SEQ, struct.pack("<I", self.seq))

    def _link(self) -> None:
        nodes = [HEAD, *self.order, HEAD]
        for prev, node, nxt in zip(nodes, nodes[1:], nodes[2:], strict=False):
            self.put(node, struct.pack("<QQ", nxt, prev))
        self.put(HEAD, struct.pack("<QQ", nodes[1], nodes[-2]))

    def load(self, name: str, symbol: str, orc_sp: int = 8, mod: int = MOD,
             text: int = TEXT) -> None:  # fmt: skip
        """A module at ``mod`` whose text has one function, ``symbol`` at +0x100."""
        kallsyms, symtab, strtab = mod + 0x1000, mod + 0x1100, mod + 0x1800
        orc_ip, orc = mod + 0x2000, mod + 0x2100
        m = bytearray(128)
        m[24 : 24 + len(name)] = name.encode()
        struct.pack_into("<QI", m, 80, text, TEXT_SIZE)
        struct.pack_into("<IQQQI", m, 92, TEXT_SIZE, kallsyms, orc_ip, orc, 2)
        self.put(mod, bytes(m))
        self.put(kallsyms, struct.pack("<QI4xQQ", symtab, 2, strtab, 0))
        self.put(strtab, b"\0" + symbol.encode() + b"\0")
        sym = struct.pack("<IBBHQQ", 1, 0x12, 0, 1, text + 0x100, 0x80)
        self.put(symtab, bytes(24) + sym)
        # ORC: an entry at +0x100 (sp + orc_sp), the end at +0x180.
        self.put(orc_ip, struct.pack("<ii", text + 0x100 - orc_ip, text + 0x180 - orc_ip - 4))
        self.put(orc, raw(orc_sp, 0, 4, 0, 0) + raw(0, 0, 0, 0, 0, 1 << 10))
        self.order.append(mod)
        self._link()
        self._tree_changed()

    def unload(self, mod: int = MOD) -> None:
        self.order.remove(mod)
        self._link()
        self.put(mod + 16, struct.pack("<i", 3))
        self._tree_changed()


def modules(guest: Guest, seq: bool = True) -> LinuxModules:
    mods = LinuxModules.__new__(LinuxModules)
    mods.read, mods.head, mods.layout = guest.read, HEAD, LAYOUT
    mods.o_kallsyms, mods.o_size, mods.o_btf, mods.o_btf_size = 96, 92, None, None
    mods.o_orc_ip, mods.o_orc, mods.o_num_orcs = 104, 112, 120
    mods.k_symtab, mods.k_num, mods.k_strtab, mods.k_typetab = 0, 8, 16, None
    mods.btf_modules = None
    mods._cache = {}
    mods.tree_seq = SEQ if seq else None
    mods._invalidations, mods._cache_gen, mods._listed = 0, None, None
    return mods


def orc_table(guest: Guest, mods: LinuxModules) -> OrcTable:
    table = OrcTable.__new__(OrcTable)
    table.stext, table.etext, table.init = 0xFFFFFFFF81000000, 0xFFFFFFFF81800000, None
    table.layout, table.read = V61, guest.read
    table._cache, table._all_ips = {}, None
    table._module_cache, table._module_gen = {}, None
    table.modules, table._module_tables, table.ftrace = mods, {}, None
    return table


def name_at(mods: LinuxModules, addr: int) -> str | None:
    found = mods.resolve(addr)
    return f"{found[2].name}:{found[0].name}+{found[1]:#x}" if found is not None else None


@pytest.mark.parametrize("seq", [True, False], ids=["generation", "no-generation"])
def test_a_module_loaded_where_an_unloaded_one_was_is_read_anew(seq: bool) -> None:
    guest = Guest()
    guest.load("alpha", "alpha_fn")
    mods = modules(guest, seq)
    assert name_at(mods, TEXT + 0x110) == "alpha:alpha_fn+0x10"
    guest.unload()
    guest.load("beta", "beta_fn")  # the same struct module address, the same text
    assert name_at(mods, TEXT + 0x110) == "beta:beta_fn+0x10"  # was: alpha:alpha_fn


def test_the_same_module_rebuilt_and_reloaded_in_place_is_read_anew() -> None:
    guest = Guest()
    guest.load("alpha", "alpha_fn")
    mods = modules(guest)
    assert name_at(mods, TEXT + 0x110) == "alpha:alpha_fn+0x10"
    guest.unload()
    guest.load("alpha", "alpha_v2_fn")  # name, addresses and sizes all alike
    assert name_at(mods, TEXT + 0x110) == "alpha:alpha_v2_fn+0x10"


def test_orc_entries_of_a_module_do_not_outlive_it() -> None:
    guest = Guest()
    guest.load("alpha", "alpha_fn", orc_sp=8)
    mods = modules(guest)
    table = orc_table(guest, mods)
    found = table.find(TEXT + 0x110)
    assert found == OrcEntry(8, 0, 4, 0, "call")
    guest.unload()
    guest.load("beta", "beta_fn", orc_sp=24)
    assert table.find(TEXT + 0x110) == OrcEntry(24, 0, 4, 0, "call")  # was: alpha's sp+8


def test_the_module_watch_invalidates_what_was_read() -> None:
    guest = Guest()
    guest.load("alpha", "alpha_fn")
    mods = modules(guest)
    assert name_at(mods, TEXT + 0x110) == "alpha:alpha_fn+0x10"
    # free_module's entry: the tree has not changed yet, the module is going.
    mods.invalidate()
    assert mods._cache == {} and mods._listed is None
    assert name_at(mods, TEXT + 0x110) == "alpha:alpha_fn+0x10"  # read anew, still there


def test_symbolizing_a_module_address_reads_one_word_while_no_module_comes_or_goes() -> None:
    guest = Guest()
    for i in range(20):  # other modules on the list, elsewhere
        guest.load(f"m{i}", f"f{i}", mod=MOD + 0x100000 * (i + 1), text=TEXT + 0x100000 * (i + 1))
    mods = modules(guest)
    assert name_at(mods, TEXT + 0x100000 + 0x110) == "m0:f0+0x10"
    guest.reads = 0
    for _ in range(10):
        assert name_at(mods, TEXT + 0x100000 + 0x110) == "m0:f0+0x10"
    assert guest.reads == 10  # the module tree's seqcount, once per address
