"""Kernel text rules with byte tables and fakes: the parsers of the kernel's
``__jump_table``, ``static_call_sites``, ``__bug_table`` and ``.smp_locks``,
overlap with an instruction, the blacklist reader, and the engine's rules
for a symbol table with no Linux behind it (qtest)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from qprobes.errors import ProbeError
from qprobes.linux.text import (
    BugEntryLayout,
    JumpEntryLayout,
    KernelText,
    KprobeLayout,
    ModuleLayout,
    Site,
    SiteIndex,
    StaticCallSiteLayout,
    TextLayouts,
    jump_entry_size,
    jump_sites,
    parse_bug_entries,
    parse_jump_entries,
    parse_rel32_sites,
    parse_static_call_sites,
)
from qprobes.probes.engine import KprobeEngine
from qprobes.probes.kprobe import Kprobe
from qprobes.probes.kretprobe import Kretprobe, KretprobeManager
from qprobes.symbols.elf import Symbol, SymbolTable
from qprobes.symbols.linux import LinuxKernel

M64 = 2**64 - 1
BASE = 0xFFFFFFFF823BB1F0  # where the table sits
JUMP = JumpEntryLayout(size=16, code=0, target=4, key=8)


def jump_entry(at: int, code: int, target: int, key: int, flags: int = 0) -> bytes:
    """One ``struct jump_entry`` at ``at``, each field relative to itself."""
    return struct.pack("<iiq", code - at, target - (at + 4), (key | flags) - (at + 8))


def test_jump_entries_are_relative_to_each_field() -> None:
    sites = [(0xFFFFFFFF810DE9C5, 0xFFFFFFFF810DEA10, 0xFFFFFFFF82C3A000, 1),
             (0xFFFFFFFF81000100, 0xFFFFFFFF81000080, 0xFFFFFFFF82C3A010, 2)]  # fmt: skip
    data = b"".join(jump_entry(BASE + 16 * i, *s) for i, s in enumerate(sites))
    entries = parse_jump_entries(data, BASE, JUMP)
    assert [(e.code, e.target, e.key, e.flags) for e in entries] == sites


def test_jump_entry_layout_comes_from_the_caller() -> None:
    # A layout with the fields in another order (as BTF could say).
    layout = JumpEntryLayout(size=16, code=8, target=12, key=0)
    at = BASE
    raw = struct.pack("<qii", 0xFFFFFFFF82C3A000 - at, 0xFFFFFFFF81000010 - (at + 8),
                      0xFFFFFFFF81000040 - (at + 12))  # fmt: skip
    (entry,) = parse_jump_entries(raw, at, layout)
    assert (entry.code, entry.target, entry.key) == (
        0xFFFFFFFF81000010, 0xFFFFFFFF81000040, 0xFFFFFFFF82C3A000,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("code", "size"),
    [
        ("6690", 2),  # the 2-byte nop (update_curr+0x45 on the default guest)
        ("eb10", 2),  # jmp rel8
        ("0f1f440000", 5),  # the 5-byte nop
        ("e900100000", 5),  # jmp rel32
        ("cccccccccc", 5),  # anything else: the larger
    ],
)
def test_jump_entry_size(code: str, size: int) -> None:
    assert jump_entry_size(bytes.fromhex(code)) == size


def test_static_call_sites_strip_the_key_flags() -> None:
    layout = StaticCallSiteLayout(size=8, addr=0, key=4)
    at = 0xFFFFFFFF823D27B0
    rows = [(0xFFFFFFFF8100254C, 0xFFFFFFFF82A10000, 0),
            (0xFFFFFFFF83078474, 0xFFFFFFFF82A10010, 2),  # an init site
            (0xFFFFFFFF81001000, 0xFFFFFFFF82A10020, 1)]  # a tail call  # fmt: skip
    data = b"".join(struct.pack("<ii", addr - (at + 8 * i), (key | fl) - (at + 8 * i + 4))
                    for i, (addr, key, fl) in enumerate(rows))  # fmt: skip
    calls = parse_static_call_sites(data, at, layout)
    assert [(c.addr, c.key, c.flags) for c in calls] == rows
    assert [c.is_init for c in calls] == [False, True, False]


def test_bug_entries_relative_and_absolute() -> None:
    at = 0xFFFFFFFF82C45E00
    rel = BugEntryLayout(size=12, addr=0, relative=True)
    data = struct.pack("<iiHH", 0xFFFFFFFF81001234 - at, 0, 10, 0)
    data += struct.pack("<iiHH", 0xFFFFFFFF81005678 - (at + 12), 0, 11, 0)
    assert parse_bug_entries(data, at, rel) == [0xFFFFFFFF81001234, 0xFFFFFFFF81005678]
    absolute = BugEntryLayout(size=24, addr=0, relative=False)
    data = struct.pack("<QQHH4x", 0xFFFFFFFF81009ABC, 0, 1, 0)
    assert parse_bug_entries(data, at, absolute) == [0xFFFFFFFF81009ABC]


def test_rel32_sites() -> None:
    at = 0xFFFFFFFF832A7000
    data = struct.pack("<ii", 0xFFFFFFFF81000010 - at, 0xFFFFFFFF81000020 - (at + 4))
    assert parse_rel32_sites(data, at) == [0xFFFFFFFF81000010, 0xFFFFFFFF81000020]


def test_site_index_finds_overlap_with_an_instruction() -> None:
    index = SiteIndex([Site(0x1000, 5, "call", ""), Site(0x2000, 2, "nop2", ""),
                       Site(0x3000, 1, "lock", "")])  # fmt: skip
    assert [s.addr for s in index.near(0x1000, 0x1001)] == [0x1000]
    assert [s.addr for s in index.near(0x1004, 0x1006)] == [0x1000]  # inside the site
    assert list(index.near(0x1005, 0x1008)) == []  # just after it
    assert list(index.near(0x0FF0, 0x1000)) == []  # an instruction that ends where it starts
    assert [s.addr for s in index.near(0x0FFE, 0x1001)] == [0x1000]  # overlaps its first byte
    assert [s.addr for s in index.near(0x1FFF, 0x2001)] == [0x2000]
    assert list(index.near(0x2002, 0x2004)) == []
    assert [s.addr for s in index.near(0x2FFD, 0x3004)] == [0x3000]


# --- KernelText with a fake kernel ---------------------------------------------------


@dataclass
class FakeMemory:
    mem: dict[int, int] = field(default_factory=dict)

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.mem.get(addr + i, 0) for i in range(n))

    def write(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.mem[addr + i] = b


TEXT, ETEXT = 0xFFFFFFFF81000000, 0xFFFFFFFF81E00000
FUNC = 0xFFFFFFFF81001000


MODULES, MOD, MOD_TEXT = 0xFFFFFFFF82B27160, 0xFFFFFFFFC0010000, 0xFFFFFFFFC0000000
KPROBE_TABLE, TEXT_MUTEX = 0xFFFFFFFF833441A0, 0xFFFFFFFF82A59540


def fake_kernel() -> LinuxKernel:
    syms = [
        Symbol("modules", MODULES, 16, "object"),
        Symbol("kprobe_table", KPROBE_TABLE, 512, "object"),
        Symbol("text_mutex", TEXT_MUTEX, 32, "object"),
        Symbol("_stext", TEXT, 0x1000, "func"),
        Symbol("_etext", ETEXT, 0, "func"),
        Symbol("f", FUNC, 0x40, "func"),
        Symbol("f.cold", FUNC + 0x40, 0x10, "func"),
        Symbol("g", FUNC + 0x50, 0x30, "func"),
        Symbol("jiffies_64", 0xFFFFFFFF82A079C0, 8, "object"),
        Symbol("a_key", 0xFFFFFFFF82C3A000, 16, "object"),
    ]
    return LinuxKernel(SymbolTable(syms), None)


def fake_text(sites: list[Site], blacklist: list[tuple[int, int, str]] | None = None,
              mem: FakeMemory | None = None) -> KernelText:  # fmt: skip
    memory = mem if mem is not None else FakeMemory()
    if not memory.mem:
        memory.write(MODULES, struct.pack("<Q", MODULES))  # an empty list
    return KernelText(fake_kernel(), memory.read, blacklist or [], SiteIndex(sites), LAYOUTS)


# The default guest's offsets (6.1), as BTF gives them.
LAYOUTS = TextLayouts(
    jump=JUMP,
    module=ModuleLayout(list=8, state=0, name=24, name_size=56, text_base=320, text_size=332,
                        text_size_width=4, unformed=3, jump_entries=(696, 704)),
    kprobe=KprobeLayout(hlist=0, addr=40, flags=120, op_kp=0, op_size=160, opcode=96,
                        op_copied=152, copied_size=4),
    mutex_owner=0,
)


def test_check_text_refuses_what_is_not_a_functions_code() -> None:
    text = fake_text([])
    text.check_text(FUNC + 3)
    with pytest.raises(ProbeError, match="0x401000 is a user-space address, not kernel text"):
        text.check_text(0x401000)
    with pytest.raises(ProbeError, match=r"jiffies_64 .* is not kernel text: jiffies_64 is data"):
        text.check_text(0xFFFFFFFF82A079C0)


def test_a_suffixed_function_shares_its_parents_blacklisting() -> None:
    text = fake_text([], [(FUNC, FUNC + 0x40, "Linux's kprobe blacklist lists f")])
    with pytest.raises(ProbeError, match=r"f.cold\+0x4 .* is blacklisted as part of f"):
        text.check_text(FUNC + 0x44)
    text.check_text(FUNC + 0x50)  # g is not


def test_check_insn_refuses_an_instruction_over_a_jump_site() -> None:
    mem = FakeMemory()
    site = FUNC + 0x10
    mem.write(site, bytes.fromhex("6690"))  # a 2-byte nop: the site is 2 bytes
    (entry,) = parse_jump_entries(jump_entry(BASE, site, FUNC + 0x30, 0xFFFFFFFF82C3A000), BASE,
                                  JUMP)  # fmt: skip
    text = fake_text(jump_sites([entry]), mem=mem)
    with pytest.raises(ProbeError, match=r"f\+0x10 .* is a 2-byte static-key jump site "
                                         r"\(__jump_table, key a_key\), which the kernel "
                                         r"rewrites at run time"):  # fmt: skip
        text.check_insn(site, 2)
    with pytest.raises(ProbeError, match=r"f\+0xe .*: its 3-byte instruction overlaps the 2-byte"):
        text.check_insn(site - 2, 3)
    text.check_insn(site - 2, 2)  # ends where the site starts
    text.check_insn(site + 2, 5)  # starts where the 2-byte site ends
    mem.write(site, bytes.fromhex("0f1f440000"))  # now a 5-byte site
    with pytest.raises(ProbeError, match="overlaps the 5-byte"):
        text.check_insn(site + 2, 1)  # (not a boundary; the overlap alone refuses it)


def test_module_text_and_its_own_jump_sites() -> None:
    mem = FakeMemory()
    node = MOD + 8
    mem.write(MODULES, struct.pack("<Q", node))
    mem.write(node, struct.pack("<Q", MODULES))
    mem.write(MOD + 24, b"qp_mod\0")
    mem.write(MOD + 320, struct.pack("<Q", MOD_TEXT))
    mem.write(MOD + 332, struct.pack("<I", 0x1000))
    entries = MOD + 0x800
    site = MOD_TEXT + 0x10
    mem.write(entries, jump_entry(entries, site, MOD_TEXT + 0x40, 0xFFFFFFFFC0020000))
    mem.write(MOD + 696, struct.pack("<Q", entries))
    mem.write(MOD + 704, struct.pack("<I", 1))
    mem.write(site, bytes.fromhex("0f1f440000"))
    text = fake_text([], mem=mem)
    (module,) = text.modules()
    assert (module.name, module.text, module.text_size, len(module.sites)) == (
        "qp_mod", MOD_TEXT, 0x1000, 1)
    text.check_text(MOD_TEXT + 0x20)
    with pytest.raises(ProbeError, match="0xffffffffc0001000 is not kernel text"):
        text.check_text(MOD_TEXT + 0x1000)
    with pytest.raises(ProbeError, match="5-byte static-key jump site"):
        text.check_insn(site + 1, 1)
    text.check_insn(site + 5, 3)
    mem.write(MOD, struct.pack("<i", 3))  # MODULE_STATE_UNFORMED: not text yet
    with pytest.raises(ProbeError, match="not kernel text"):
        fake_text([], mem=mem).check_text(MOD_TEXT + 0x20)


def test_inside_an_optimized_kprobe_of_the_guest() -> None:
    mem = FakeMemory()
    mem.write(MODULES, struct.pack("<Q", MODULES))
    kp = 0xFFFF888003E70000
    mem.write(KPROBE_TABLE + 8 * 5, struct.pack("<Q", kp))  # bucket 5 -> kp.hlist
    mem.write(kp + 40, struct.pack("<Q", FUNC + 0x20))
    mem.write(kp + 120, struct.pack("<I", 4))  # KPROBE_FLAG_OPTIMIZED
    mem.write(kp + 160, struct.pack("<Q", 13))
    mem.write(kp + 96, b"\x48")  # kp.opcode
    mem.write(kp + 152, bytes.fromhex("8b042528"))  # optinsn.copied_insn
    mem.write(FUNC + 0x20, bytes.fromhex("e9aabbccdd"))  # the guest's jump
    text = fake_text([], mem=mem)
    assert text.optimized_kprobes() == [(FUNC + 0x20, 13)]
    live = mem.read(FUNC + 0x1E, 8)
    assert text.recover(FUNC + 0x1E, live) == live[:2] + bytes.fromhex("488b042528") + live[7:]
    assert text.recover(FUNC + 0x22, mem.read(FUNC + 0x22, 2)) == bytes.fromhex("0425")
    with pytest.raises(ProbeError, match=r"inside the guest's own optimized kprobe at f\+0x20 "
                                         r"\(a jump over 13 bytes\)"):  # fmt: skip
        text.check_text(FUNC + 0x24)
    with pytest.raises(ProbeError, match="optimized kprobe"):
        text.check_insn(FUNC + 0x1E, 3)  # an instruction running into it
    text.check_insn(FUNC + 0x2D, 2)
    mem.write(kp + 120, struct.pack("<I", 0))  # a plain (int3) kprobe: nothing to refuse
    text.check_text(FUNC + 0x24)


def test_text_mutex_owner_ignores_the_flag_bits() -> None:
    mem = FakeMemory()
    text = fake_text([], mem=mem)
    assert not text.text_mutex_held()
    mem.write(TEXT_MUTEX, struct.pack("<Q", 0x1))  # MUTEX_FLAG_WAITERS alone
    assert not text.text_mutex_held()
    mem.write(TEXT_MUTEX, struct.pack("<Q", 0xFFFF888003E00000))
    assert text.text_mutex_held()


def test_blacklist_failure_is_never_swallowed() -> None:
    mem = FakeMemory()
    no_list = LinuxKernel(SymbolTable([Symbol("_text", TEXT, 0, "func")]), None)
    with pytest.raises(ProbeError, match=r"cannot read Linux's kprobe blacklist \(no kprobe_b"):
        no_list.blacklist(mem.read)
    no_btf = LinuxKernel(SymbolTable([Symbol("kprobe_blacklist", 0xFFFFFFFF82B38800, 16,
                                             "object")]), None)  # fmt: skip
    with pytest.raises(ProbeError, match="no BTF"):
        no_btf.blacklist(mem.read)


# --- the engine without Linux (qtest's rules) ----------------------------------------


class FakeTarget(FakeMemory):
    client = None
    vcpus = (1,)


def engine_with(symbols: SymbolTable) -> KprobeEngine:
    engine = KprobeEngine(FakeTarget(), (0x7C00000, 4 << 20), FUNC,  # type: ignore[arg-type]
                          symbols=symbols)  # fmt: skip
    return engine


QTEST = SymbolTable([
    Symbol("t_hot", 0xFFFFFFFF80102000, 0x20, "func"),
    Symbol("counter", 0xFFFFFFFF80110000, 8, "object"),
])  # fmt: skip


def test_sym_plus_offset_past_the_end_names_the_size() -> None:
    engine = engine_with(QTEST)
    assert engine.resolve(Kprobe(symbol_name="t_hot", offset=0x1F)) == 0xFFFFFFFF8010201F
    with pytest.raises(ProbeError, match=r"t_hot\+0x20 is outside t_hot, which is 0x20 bytes long"):
        engine.resolve(Kprobe(symbol_name="t_hot", offset=0x20))


def test_without_linux_only_function_symbols_are_code() -> None:
    engine = engine_with(QTEST)
    engine._check_text(0xFFFFFFFF80102004)
    with pytest.raises(ProbeError, match=r"0xffffffff80110000 is not inside a function symbol "
                                         r"\(counter is not a function\)"):  # fmt: skip
        engine._check_text(0xFFFFFFFF80110000)
    with pytest.raises(ProbeError, match="0x401000 is not inside a function symbol"):
        engine._check_text(0x401000)
    calls: list[int] = []
    engine.text_check = calls.append  # a front end's rule replaces the symbol rule
    engine._check_text(0x401000)
    assert calls == [0x401000]


def test_a_return_probe_by_address_must_be_at_a_function_entry() -> None:
    engine = engine_with(QTEST)
    manager = KretprobeManager(engine)
    with pytest.raises(ProbeError, match=r"function's entry: 0xffffffff80102004 is t_hot\+0x4"):
        manager.register(Kretprobe(addr=0xFFFFFFFF80102004))
    with pytest.raises(ProbeError, match="function's entry: 0xffffffff80110000 is counter"):
        manager.register(Kretprobe(addr=0xFFFFFFFF80110000))


def test_text_lock_wait_times_out_with_a_clear_error() -> None:
    engine = engine_with(QTEST)
    runs: list[float | None] = []
    engine.run = lambda until=None, timeout=None, poll=0.002: runs.append(timeout)  # type: ignore[method-assign]
    engine.text_lock_held = lambda: True
    engine.text_lock_timeout = 0.05
    with pytest.raises(ProbeError, match=r"text_mutex held\) for 0.05 s"):
        engine.wait_text_unlocked()
    assert runs  # it ran the guest meanwhile
    held = iter([True, True, False])
    engine.text_lock_held = lambda: next(held)
    engine.wait_text_unlocked()  # freed after a run: returns
