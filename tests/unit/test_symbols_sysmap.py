"""System.map parsing, Debian's placeholder, KASLR slides, vmlinux ELF symbols."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from qprobes.errors import SymbolError
from qprobes.symbols.elf import Symbol, SymbolTable
from qprobes.symbols.sysmap import (
    DEFAULT_TEXT,
    KernelSymbol,
    apply_slide,
    in_kernel_image,
    kernel_symbols,
    load_system_map,
    load_vmlinux_symbols,
    parse_system_map,
    slide_of,
    symbol_kind,
)

DATA = Path(__file__).parent / "data" / "symbols"
SLIDE = 0x11800000


def test_system_map_symbols_sizes_and_types() -> None:
    table = load_system_map(DATA / "System.map-sample")
    openat = table.lookup("do_sys_openat2")
    assert openat == KernelSymbol("do_sys_openat2", 0xFFFFFFFF8134A350, 0x170, "func", "t")
    assert table.lookup("linux_banner").kind == "object"
    assert table.lookup("_end").size == 0  # the last symbol
    assert table.lookup("__per_cpu_end").size == 0  # per-CPU offsets stop at their end
    assert table.lookup("cpu_debug_store").addr == 0x1000
    assert table.format(0xFFFFFFFF8134CC51) == "vfs_read+0x1"
    assert slide_of(table) == 0


def test_system_map_with_a_slide() -> None:
    table = load_system_map(DATA / "System.map-sample", slide=SLIDE)
    assert table.address("vfs_read") == 0xFFFFFFFF8134CC50 + SLIDE
    assert table.address("cpu_debug_store") == 0x1000  # not in the image window
    assert slide_of(table) == SLIDE
    found = table.resolve(0xFFFFFFFF8134A360 + SLIDE)
    assert found is not None and found[0].name == "do_sys_openat2" and found[1] == 0x10


def test_debian_placeholder_is_refused() -> None:
    with pytest.raises(SymbolError, match=r"placeholder.*-dbg.*read_guest_kallsyms"):
        load_system_map(DATA / "System.map-6.1.0-56-cloud-amd64")


def test_proc_kallsyms_lines_are_accepted() -> None:
    text = (DATA / "proc-kallsyms-sample").read_text()
    table = parse_system_map(text)
    assert table.address("e1000_probe") == 0xFFFFFFFFC0201000
    assert slide_of(table) == 0xFFFFFFFF92800000 - DEFAULT_TEXT


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no symbols"),
        ("ffffffff81000000 T\n", "not a System.map line"),
        ("zzzz T _text\n", "bad address"),
        ("ffffffff81000000 TT _text\n", "not a System.map line"),
    ],
)
def test_bad_system_maps(text: str, message: str) -> None:
    with pytest.raises(SymbolError, match=message):
        parse_system_map(text)


def test_missing_file() -> None:
    with pytest.raises(SymbolError, match="cannot read"):
        load_system_map(DATA / "no-such-file")


@pytest.mark.parametrize(("letter", "kind"), [("T", "func"), ("t", "func"), ("W", "func"),
                                              ("w", "func"), ("D", "object"), ("r", "object"),
                                              ("B", "object"), ("A", "object")])  # fmt: skip
def test_symbol_kinds(letter: str, kind: str) -> None:
    assert symbol_kind(letter) == kind


def test_sizes_stop_at_region_edges() -> None:
    syms = kernel_symbols([("a", "A", 0), ("b", "A", 0x10), ("t", "T", DEFAULT_TEXT),
                           ("u", "T", DEFAULT_TEXT), ("v", "t", DEFAULT_TEXT + 0x40)])  # fmt: skip
    assert [(s.name, s.size) for s in syms] == [("a", 0x10), ("b", 0), ("t", 0x40), ("u", 0x40),
                                                ("v", 0)]  # fmt: skip
    assert in_kernel_image(DEFAULT_TEXT) and not in_kernel_image(0xFFFFFFFFC0000000)


def test_apply_slide_checks_alignment() -> None:
    table = SymbolTable([Symbol("f", DEFAULT_TEXT, 4, "func")])
    assert apply_slide(table, 0) is table
    assert apply_slide(table, 2 << 20).address("f") == DEFAULT_TEXT + (2 << 20)
    with pytest.raises(SymbolError, match="not a multiple of 2 MiB"):
        apply_slide(table, 0x1000)


def test_slide_needs_text() -> None:
    with pytest.raises(SymbolError, match="no _text"):
        slide_of(SymbolTable([Symbol("f", DEFAULT_TEXT, 4, "func")]))


def tiny_elf(symbols: list[tuple[str, int, int, int]]) -> bytes:
    """An ELF64 x86_64 file with a .symtab: (name, value, size, st_info)."""
    strtab = b"\0"
    entries = [b"\0" * 24]
    for name, value, size, info in symbols:
        entries.append(struct.pack("<IBBHQQ", len(strtab), info, 0, 1, value, size))
        strtab += name.encode() + b"\0"
    symtab = b"".join(entries)
    shstrtab = b"\0.text\0.symtab\0.strtab\0.shstrtab\0"
    text = b"\x90" * 16
    body = text + symtab + strtab + shstrtab
    off_text = 64
    off_sym = off_text + len(text)
    off_str = off_sym + len(symtab)
    off_shs = off_str + len(strtab)
    shoff = (64 + len(body) + 7) & ~7
    header = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
        2, 62, 1, DEFAULT_TEXT, 0, shoff, 0, 64, 0, 0, 64, 5, 4,
    )  # fmt: skip

    def shdr(name: int, kind: int, flags: int, addr: int, off: int, size: int, link: int = 0,
             info: int = 0, align: int = 1, entsize: int = 0) -> bytes:  # fmt: skip
        return struct.pack("<IIQQQQIIQQ", name, kind, flags, addr, off, size, link, info, align,
                           entsize)  # fmt: skip

    sections = b"".join(
        [
            b"\0" * 64,
            shdr(1, 1, 6, DEFAULT_TEXT, off_text, len(text), align=16),
            shdr(7, 2, 0, 0, off_sym, len(symtab), link=3, info=1, align=8, entsize=24),
            shdr(15, 3, 0, 0, off_str, len(strtab)),
            shdr(23, 3, 0, 0, off_shs, len(shstrtab)),
        ]
    )
    image = header + body
    return image + b"\0" * (shoff - len(image)) + sections


def test_vmlinux_symbols_with_a_slide(tmp_path: Path) -> None:
    stt_func_global = (1 << 4) | 2
    stt_object_local = 1
    path = tmp_path / "vmlinux"
    symbols = [
        ("_text", DEFAULT_TEXT, 0, stt_func_global),
        ("vfs_read", DEFAULT_TEXT + 0x34CC50, 0x310, stt_func_global),
        ("jiffies_64", DEFAULT_TEXT + 0x1A00000, 8, stt_object_local),
    ]
    path.write_bytes(tiny_elf(symbols))
    table = load_vmlinux_symbols(path, slide=SLIDE)
    sym = table.lookup("vfs_read")
    assert (sym.addr, sym.size, sym.kind) == (DEFAULT_TEXT + 0x34CC50 + SLIDE, 0x310, "func")
    assert table.lookup("jiffies_64").kind == "object"
    assert slide_of(table) == SLIDE
