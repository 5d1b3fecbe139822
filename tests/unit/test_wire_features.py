"""Target descriptions: the real QEMU 7.2 x86_64 set (saved from a live
stub through GdbClient, in data/qemu-7.2-x86_64/), and small documents
for the numbering and inclusion rules of the GDB manual (G.2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qprobes.errors import ProtocolError
from qprobes.wire.features import Register, RegisterLayout, parse_target_description

DATA = Path(__file__).parent / "data" / "qemu-7.2-x86_64"


def _fetch_from(files: dict[str, str]):  # type: ignore[no-untyped-def]
    fetched: list[str] = []

    def fetch(name: str) -> str:
        fetched.append(name)
        return files[name]

    return fetch, fetched


@pytest.fixture(scope="module")
def qemu_layout() -> RegisterLayout:
    def fetch(name: str) -> bytes:
        return (DATA / name).read_bytes()

    return parse_target_description(fetch("target.xml"), fetch)


# (name, regnum, offset in 'g', bitsize, type, group)
QEMU_REGISTERS = [
    ("rax", 0, 0, 64, "int64", None),
    ("rbx", 1, 8, 64, "int64", None),
    ("rcx", 2, 16, 64, "int64", None),
    ("rdx", 3, 24, 64, "int64", None),
    ("rsi", 4, 32, 64, "int64", None),
    ("rdi", 5, 40, 64, "int64", None),
    ("rbp", 6, 48, 64, "data_ptr", None),
    ("rsp", 7, 56, 64, "data_ptr", None),
    ("r8", 8, 64, 64, "int64", None),
    ("r15", 15, 120, 64, "int64", None),
    ("rip", 16, 128, 64, "code_ptr", None),
    ("eflags", 17, 136, 32, "x64_eflags", None),
    ("cs", 18, 140, 32, "int32", None),
    ("ss", 19, 144, 32, "int32", None),
    ("ds", 20, 148, 32, "int32", None),
    ("es", 21, 152, 32, "int32", None),
    ("fs", 22, 156, 32, "int32", None),
    ("gs", 23, 160, 32, "int32", None),
    ("fs_base", 24, 164, 64, "int64", None),
    ("gs_base", 25, 172, 64, "int64", None),
    ("k_gs_base", 26, 180, 64, "int64", None),
    ("cr0", 27, 188, 64, "x64_cr0", None),
    ("cr2", 28, 196, 64, "int64", None),
    ("cr3", 29, 204, 64, "x64_cr3", None),
    ("cr4", 30, 212, 64, "x64_cr4", None),
    ("cr8", 31, 220, 64, "int64", None),
    ("efer", 32, 228, 64, "x64_efer", None),
    ("st0", 33, 236, 80, "i387_ext", None),
    ("st7", 40, 306, 80, "i387_ext", None),
    ("fctrl", 41, 316, 32, "int", "float"),
    ("fstat", 42, 320, 32, "int", "float"),
    ("ftag", 43, 324, 32, "int", "float"),
    ("fiseg", 44, 328, 32, "int", "float"),
    ("fioff", 45, 332, 32, "int", "float"),
    ("foseg", 46, 336, 32, "int", "float"),
    ("fooff", 47, 340, 32, "int", "float"),
    ("fop", 48, 344, 32, "int", "float"),
    ("xmm0", 49, 348, 128, "vec128", None),
    ("xmm15", 64, 588, 128, "vec128", None),
    ("mxcsr", 65, 604, 32, "x64_mxcsr", "vector"),
]


@pytest.mark.parametrize(("name", "regnum", "offset", "bitsize", "type_", "group"), QEMU_REGISTERS)
def test_qemu_register(
    qemu_layout: RegisterLayout,
    name: str,
    regnum: int,
    offset: int,
    bitsize: int,
    type_: str,
    group: str | None,
) -> None:
    reg = qemu_layout[name]
    assert (reg.regnum, reg.offset_in_g, reg.bitsize, reg.type, reg.group) == (
        regnum,
        offset,
        bitsize,
        type_,
        group,
    )
    assert reg.offset == offset
    assert reg.feature == "org.gnu.gdb.i386.core"
    assert qemu_layout.by_regnum(regnum) is reg
    assert qemu_layout.by_name(name) is reg
    assert qemu_layout.regnum(name) == regnum


def test_qemu_layout_whole(qemu_layout: RegisterLayout) -> None:
    assert qemu_layout.g_size == 608
    assert len(qemu_layout) == 66
    assert qemu_layout.architecture == "i386:x86-64"
    assert qemu_layout.features == ("org.gnu.gdb.i386.core",)
    assert [r.name for r in qemu_layout][:18] == [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "eflags",
    ]  # fmt: skip
    assert [f"st{i}" for i in range(8)] == qemu_layout.names[33:41]
    assert [f"xmm{i}" for i in range(16)] == qemu_layout.names[49:65]
    assert [r.regnum for r in qemu_layout] == list(range(66))
    # offsets are contiguous in regnum order
    end = 0
    for reg in qemu_layout:
        assert reg.offset_in_g == end
        end += reg.size
    assert "rip" in qemu_layout and "cs_base" not in qemu_layout  # commented out in the XML
    assert qemu_layout.get("nope") is None
    assert qemu_layout.find_regnum(66) is None
    with pytest.raises(KeyError):
        qemu_layout["nope"]


def test_unpack_g(qemu_layout: RegisterLayout) -> None:
    g = bytearray(608)
    g[128:136] = (0xFFF0).to_bytes(8, "little")
    g[136:140] = (2).to_bytes(4, "little")
    values = qemu_layout.unpack_g(bytes(g))
    assert int.from_bytes(values["rip"], "little") == 0xFFF0
    assert int.from_bytes(values["eflags"], "little") == 2
    assert len(values) == 66
    assert set(qemu_layout.unpack_g(bytes(g[:140]))) == set(qemu_layout.names[:18])


def test_include_is_fetched_through_the_callback() -> None:
    fetch, fetched = _fetch_from({"i386-64bit.xml": (DATA / "i386-64bit.xml").read_text()})
    layout = parse_target_description((DATA / "target.xml").read_text(), fetch)
    assert fetched == ["i386-64bit.xml"]
    assert layout.g_size == 608


# --- numbering and inclusion rules (G.2 "Registers", "Inclusion") ---------------

TARGET = '<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target>{}</target>'


def _regs(layout: RegisterLayout) -> list[tuple[str, int, int]]:
    return [(r.name, r.regnum, r.offset_in_g) for r in layout]


NUMBERING = [
    # numbers default to the previous one plus one, the first to zero
    (
        '<feature name="a"><reg name="x" bitsize="32"/><reg name="y" bitsize="16"/></feature>',
        [("x", 0, 0), ("y", 1, 4)],
    ),
    # regnum= resets the sequence, across features too
    (
        '<feature name="a"><reg name="x" bitsize="64"/><reg name="y" bitsize="64" regnum="5"/>'
        '</feature><feature name="b"><reg name="z" bitsize="8"/></feature>',
        [("x", 0, 0), ("y", 5, 8), ("z", 6, 16)],
    ),
    # 'g' offsets follow register numbers, not document order
    (
        '<feature name="a"><reg name="hi" bitsize="32" regnum="1"/>'
        '<reg name="lo" bitsize="64" regnum="0"/></feature>',
        [("lo", 0, 0), ("hi", 1, 8)],
    ),
    # odd bit sizes take whole bytes
    (
        '<feature name="a"><reg name="f" bitsize="80"/><reg name="b" bitsize="1"/>'
        '<reg name="c" bitsize="8"/></feature>',
        [("f", 0, 0), ("b", 1, 10), ("c", 2, 11)],
    ),
    # no registers at all
    ("<architecture>i386</architecture>", []),
]


@pytest.mark.parametrize(("body", "expected"), NUMBERING)
def test_numbering(body: str, expected: list[tuple[str, int, int]]) -> None:
    assert _regs(parse_target_description(TARGET.format(body))) == expected


def test_register_attributes() -> None:
    layout = parse_target_description(
        TARGET.format(
            '<feature name="f"><reg name="r" bitsize="64"/>'
            '<reg name="s" bitsize="32" type="code_ptr" group="general" save-restore="no"/>'
            "</feature>"
        )
    )
    assert layout["r"] == Register("r", 0, 64, 0, "int", None, "f", True)
    assert layout["s"] == Register("s", 1, 32, 8, "code_ptr", "general", "f", False)
    assert layout["s"].size == 4


def test_nested_includes_and_declared_namespace() -> None:
    files = {
        "a.xml": '<feature name="a"><reg name="a0" bitsize="64"/>'
        '<xi:include href="b.xml"/></feature>',
        "b.xml": '<feature name="b"><reg name="b0" bitsize="32" regnum="10"/></feature>',
    }
    fetch, fetched = _fetch_from(files)
    doc = (
        '<target xmlns:xi="http://www.w3.org/2001/XInclude"><xi:include href="a.xml"/>'
        '<feature name="c"><reg name="c0" bitsize="8"/></feature></target>'
    )
    layout = parse_target_description(doc, fetch)
    assert fetched == ["a.xml", "b.xml"]
    assert _regs(layout) == [("a0", 0, 0), ("b0", 10, 8), ("c0", 11, 12)]
    assert layout.features == ("a", "b", "c")


BAD = [
    ("not xml", "not valid XML"),
    ("<regs/>", "unexpected root"),
    (TARGET.format('<feature name="a"><reg bitsize="8"/></feature>'), "name and bitsize"),
    (TARGET.format('<feature name="a"><reg name="x"/></feature>'), "name and bitsize"),
    (TARGET.format('<feature name="a"><reg name="x" bitsize="big"/></feature>'), "not a number"),
    (
        TARGET.format('<feature name="a"><reg name="x" bitsize="8" regnum="-1"/></feature>'),
        "negative",
    ),
    (
        TARGET.format(
            '<feature name="a"><reg name="x" bitsize="8"/><reg name="x" bitsize="8"/></feature>'
        ),
        "names two",
    ),
    (
        TARGET.format(
            '<feature name="a"><reg name="x" bitsize="8" regnum="1"/>'
            '<reg name="y" bitsize="8" regnum="1"/></feature>'
        ),
        "numbers two",
    ),
    (TARGET.format("<xi:include/>"), "without href"),
    (TARGET.format('<xi:include href="x.xml"/>'), "no way to fetch"),
]


@pytest.mark.parametrize(("doc", "message"), BAD)
def test_malformed(doc: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_target_description(doc)


def test_include_loop_is_bounded() -> None:
    def fetch(name: str) -> str:
        return '<feature name="loop"><xi:include href="loop.xml"/></feature>'

    with pytest.raises(ProtocolError, match="too deep"):
        parse_target_description(TARGET.format('<xi:include href="loop.xml"/>'), fetch)
