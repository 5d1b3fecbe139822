"""BTF parsing and C-level lookups over a small synthesized blob.

The builder writes the format of include/uapi/linux/btf.h: a 24-byte
``struct btf_header``, the type section (``struct btf_type`` plus each
kind's trailing data) and the string section.
"""

from __future__ import annotations

import struct

import pytest

from qprobes.symbols.btf import (
    BTF_INT_CHAR,
    BTF_INT_SIGNED,
    BtfError,
    BtfKind,
    parse_btf,
)


class BtfBuilder:
    def __init__(self) -> None:
        self.types: list[bytes] = []
        self.strings = bytearray(b"\0")
        self._offsets: dict[str, int] = {"": 0}

    def _str(self, name: str) -> int:
        if name not in self._offsets:
            self._offsets[name] = len(self.strings)
            self.strings += name.encode() + b"\0"
        return self._offsets[name]

    def _add(self, name: str, kind: BtfKind, vlen: int, size_or_type: int, extra: bytes = b"",
             kflag: bool = False) -> int:  # fmt: skip
        info = (int(kind) << 24) | vlen | (int(kflag) << 31)
        self.types.append(struct.pack("<III", self._str(name), info, size_or_type) + extra)
        return len(self.types)

    def integer(self, name: str, size: int, encoding: int = 0) -> int:
        return self._add(name, BtfKind.INT, 0, size, struct.pack("<I", encoding << 24 | size * 8))

    def ref(self, kind: BtfKind, target: int, name: str = "") -> int:
        return self._add(name, kind, 0, target)

    def array(self, elem: int, index: int, nelems: int) -> int:
        return self._add("", BtfKind.ARRAY, 0, 0, struct.pack("<III", elem, index, nelems))

    def composite(self, name: str, size: int, members: list[tuple[str, int, int, int]],
               union: bool = False) -> int:  # fmt: skip
        """members: (name, type, bit offset, bitfield size)."""
        kflag = any(bits for *_, bits in members)
        extra = b"".join(
            struct.pack("<III", self._str(n), t, (bits << 24 | off) if kflag else off)
            for n, t, off, bits in members
        )
        kind = BtfKind.UNION if union else BtfKind.STRUCT
        return self._add(name, kind, len(members), size, extra, kflag)

    def enum(self, name: str, values: list[tuple[str, int]], signed: bool = False) -> int:
        extra = b"".join(struct.pack("<II", self._str(n), v & 0xFFFFFFFF) for n, v in values)
        return self._add(name, BtfKind.ENUM, len(values), 4, extra, signed)

    def enum64(self, name: str, values: list[tuple[str, int]], signed: bool = False) -> int:
        extra = b"".join(
            struct.pack("<III", self._str(n), v & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF)
            for n, v in values
        )
        return self._add(name, BtfKind.ENUM64, len(values), 8, extra, signed)

    def fwd(self, name: str, union: bool = False) -> int:
        return self._add(name, BtfKind.FWD, 0, 0, kflag=union)

    def proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        extra = b"".join(struct.pack("<II", self._str(n), t) for n, t in params)
        return self._add("", BtfKind.FUNC_PROTO, len(params), ret, extra)

    def func(self, name: str, proto: int, linkage: int = 0) -> int:
        return self._add(name, BtfKind.FUNC, linkage, proto)

    def var(self, name: str, type_id: int, linkage: int = 1) -> int:
        return self._add(name, BtfKind.VAR, 0, type_id, struct.pack("<I", linkage))

    def datasec(self, name: str, size: int, entries: list[tuple[int, int, int]]) -> int:
        extra = b"".join(struct.pack("<III", *e) for e in entries)
        return self._add(name, BtfKind.DATASEC, len(entries), size, extra)

    def decl_tag(self, name: str, type_id: int, component: int) -> int:
        return self._add(name, BtfKind.DECL_TAG, 0, type_id, struct.pack("<i", component))

    def blob(self) -> bytes:
        types = b"".join(self.types)
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                             len(self.strings))  # fmt: skip
        return header + types + bytes(self.strings)


def kernel_like() -> tuple[bytes, dict[str, int]]:
    b = BtfBuilder()
    ids: dict[str, int] = {}
    ids["int"] = b.integer("int", 4, BTF_INT_SIGNED)
    ids["uint"] = b.integer("unsigned int", 4)
    ids["char"] = b.integer("char", 1, BTF_INT_CHAR | BTF_INT_SIGNED)
    ids["long"] = b.integer("long int", 8, BTF_INT_SIGNED)
    ids["u64raw"] = b.integer("long long unsigned int", 8)
    ids["u64"] = b.ref(BtfKind.TYPEDEF, ids["u64raw"], "u64")
    ids["const_char"] = b.ref(BtfKind.CONST, ids["char"])
    ids["user_char"] = b.ref(BtfKind.TYPE_TAG, ids["const_char"], "user")
    ids["const_char_ptr"] = b.ref(BtfKind.PTR, ids["user_char"])
    ids["fwd_how"] = b.fwd("open_how")
    ids["how_ptr"] = b.ref(BtfKind.PTR, ids["fwd_how"])
    ids["open_how"] = b.composite("open_how", 24, [("flags", ids["u64"], 0, 0),
                                               ("mode", ids["u64"], 64, 0),
                                               ("resolve", ids["u64"], 128, 0)])  # fmt: skip
    ids["pgd_ptr"] = b.ref(BtfKind.PTR, ids["u64"])
    mm_members = [("mmap_base", ids["long"], 0, 0), ("pgd", ids["pgd_ptr"], 0x50 * 8, 0)]
    ids["mm_struct"] = b.composite("mm_struct", 0x400, mm_members)
    ids["mm_ptr"] = b.ref(BtfKind.PTR, ids["mm_struct"])
    ids["se"] = b.composite("sched_entity", 0x100, [("vruntime", ids["u64"], 0x58 * 8, 0)])
    ids["inner"] = b.composite("", 8, [("b", ids["int"], 0, 0), ("c", ids["int"], 32, 0)])
    ids["anon"] = b.composite(
        "", 8, [("a", ids["long"], 0, 0), ("", ids["inner"], 0, 0)], union=True
    )
    ids["index"] = b.integer("__ARRAY_SIZE_TYPE__", 4)
    ids["comm"] = b.array(ids["char"], ids["index"], 16)
    ids["vol_uint"] = b.ref(BtfKind.VOLATILE, ids["uint"])
    ids["fn_proto"] = b.proto(ids["int"], [("", ids["int"]), ("", ids["const_char_ptr"])])
    ids["fn_ptr"] = b.ref(BtfKind.PTR, ids["fn_proto"])
    ids["const_fn_ptr"] = b.ref(BtfKind.CONST, ids["fn_ptr"])
    ids["task_struct"] = b.composite(
        "task_struct",
        0x300,
        [
            ("__state", ids["vol_uint"], 0, 0),
            ("", ids["anon"], 64, 0),
            ("sched_reset_on_fork", ids["uint"], 96 + 32, 1),
            ("sched_contributes_to_load", ids["uint"], 97 + 32, 1),
            ("sched_wide", ids["uint"], 100 + 32, 12),
            ("se", ids["se"], 0x40 * 8, 0),
            ("mm", ids["mm_ptr"], 0x180 * 8, 0),
            ("comm", ids["comm"], 0x200 * 8, 0),
            ("callback", ids["const_fn_ptr"], 0x210 * 8, 0),
        ],
    )
    ids["task_t"] = b.ref(BtfKind.TYPEDEF, ids["task_struct"], "task_t")
    ids["openat2_proto"] = b.proto(
        ids["long"], [("dfd", ids["int"]), ("filename", ids["const_char_ptr"]),
                      ("how", ids["how_ptr"])]
    )  # fmt: skip
    ids["do_sys_openat2"] = b.func("do_sys_openat2", ids["openat2_proto"], linkage=0)
    ids["printk_proto"] = b.proto(ids["int"], [("fmt", ids["const_char_ptr"]), ("", 0)])
    ids["_printk"] = b.func("_printk", ids["printk_proto"], linkage=1)
    ids["void_proto"] = b.proto(0, [])
    ids["cpu_idle"] = b.func("cpu_idle", ids["void_proto"], linkage=1)
    ids["state_enum"] = b.enum("state", [("NEG", -2), ("ZERO", 0), ("BIG", 0x80000000)], True)
    ids["flags_enum"] = b.enum("flags", [("HIGH", 0x80000000)])
    ids["enum64"] = b.enum64("wide", [("HUGE", 1 << 40), ("MINUS", -1)], signed=True)
    ids["float"] = b._add("double", BtfKind.FLOAT, 0, 8)
    ids["jiffies"] = b.var("jiffies", ids["long"])
    ids["datasec"] = b.datasec(".data..percpu", 16, [(ids["jiffies"], 8, 8)])
    ids["restrict"] = b.ref(BtfKind.RESTRICT, ids["const_char_ptr"])
    ids["decl_tag"] = b.decl_tag("noinline", ids["do_sys_openat2"], -1)
    ids["task_array_ptr"] = b.ref(BtfKind.PTR, b.array(ids["task_struct"], ids["index"], 4))
    return b.blob(), ids


@pytest.fixture(scope="module")
def btf_and_ids() -> tuple[object, dict[str, int]]:
    blob, ids = kernel_like()
    return parse_btf(blob), ids


def test_every_kind_decodes() -> None:
    blob, ids = kernel_like()
    btf = parse_btf(blob)
    assert len(btf) == max(ids.values())
    kinds = {btf.type(i).kind for i in range(len(btf) + 1)}
    assert kinds == set(BtfKind)  # UNKN is void, id 0
    assert btf.type(ids["int"]).int_encoding == BTF_INT_SIGNED
    assert btf.type(ids["int"]).int_bits == 32
    assert btf.type(ids["jiffies"]).linkage == 1
    assert btf.type(ids["do_sys_openat2"]).linkage == 0
    assert btf.type(ids["datasec"]).secinfos[0].offset == 8
    assert btf.type(ids["decl_tag"]).component_idx == -1
    assert btf.type(ids["comm"]).array is not None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("comm", (0x200, 16)),
        ("__state", (0, 4)),
        ("se.vruntime", (0x40 + 0x58, 8)),
        ("a", (8, 8)),  # in an anonymous union
        ("b", (8, 4)),  # in an anonymous struct in that union
        ("c", (12, 4)),
        ("mm", (0x180, 8)),
        ("comm[3]", (0x203, 1)),
        (" se . vruntime ", (0x98, 8)),
        ("sched_reset_on_fork", (16, 1)),  # bitfield: the byte holding bit 128
        ("sched_wide", (16, 2)),  # bits 132..143 span bytes 16 and 17
    ],
)
def test_struct_member_offset(btf_and_ids: tuple[object, dict[str, int]], path: str,
                              expected: tuple[int, int]) -> None:  # fmt: skip
    btf, _ = btf_and_ids
    assert btf.struct_member_offset("task_struct", path) == expected  # type: ignore[attr-defined]


def test_bitfields_keep_their_bits() -> None:
    btf = parse_btf(kernel_like()[0])
    info = btf.member("task_struct", "sched_contributes_to_load")
    assert (info.bit_offset, info.bitfield_size, info.is_bitfield) == (129, 1, True)
    assert btf.member("task_struct", "comm").is_bitfield is False


def test_member_chain_crosses_pointers() -> None:
    btf = parse_btf(kernel_like()[0])
    for path in ("mm.pgd", "mm->pgd"):
        chain = btf.member_chain("task_struct", path)
        assert [(m.offset, m.size) for m in chain] == [(0x180, 8), (0x50, 8)]
    assert btf.member_chain("task_struct", "mm->pgd")[-1].path == "mm->pgd"
    with pytest.raises(BtfError, match="goes through a pointer"):
        btf.struct_member_offset("task_struct", "mm.pgd")


@pytest.mark.parametrize(
    ("struct_name", "path", "message"),
    [
        ("task_struct", "nope", "struct task_struct has no member 'nope'"),
        ("task_struct", "se.nope", "struct sched_entity has no member 'nope'"),
        ("task_struct", "comm->x", "is not a pointer"),
        ("task_struct", "__state.x", "not a struct or union"),
        ("task_struct", "comm[16]", "out of bounds"),
        ("task_struct", "se[1]", "not an array"),
        ("task_struct", "", "empty member path"),
        ("task_struct", "comm..x", "bad member path"),
        ("no_such_struct", "x", "no BTF struct or union named 'no_such_struct'"),
        ("u64", "x", "not a struct or union"),
    ],
)
def test_member_errors(struct_name: str, path: str, message: str) -> None:
    btf = parse_btf(kernel_like()[0])
    with pytest.raises(BtfError, match=message):
        btf.struct_member_offset(struct_name, path)


def test_struct_lookup_through_typedef_and_prefix() -> None:
    btf = parse_btf(kernel_like()[0])
    assert btf.find_struct("task_t").name == "task_struct"
    assert btf.find_struct("struct task_struct").name == "task_struct"
    # A forward declaration loses to the complete struct of the same name.
    assert btf.find("open_how").kind is BtfKind.STRUCT
    assert len(btf.ids("open_how")) == 2


def test_func_args_and_return() -> None:
    btf = parse_btf(kernel_like()[0])
    assert btf.func_args("do_sys_openat2") == [
        ("dfd", "int"), ("filename", "const char *"), ("how", "struct open_how *"),
    ]  # fmt: skip
    assert btf.func_return("do_sys_openat2") == "long int"
    assert btf.func_args("_printk") == [("fmt", "const char *"), ("", "...")]
    assert btf.func_args("cpu_idle") == []
    assert btf.func_return("cpu_idle") == "void"
    with pytest.raises(BtfError, match="no BTF FUNC named 'nope'"):
        btf.func_args("nope")


def test_type_names_and_sizes() -> None:
    blob, ids = kernel_like()
    btf = parse_btf(blob)
    names = {
        "comm": "char[16]",
        "const_fn_ptr": "int (*const)(int, const char *)",
        "mm_ptr": "struct mm_struct *",
        "vol_uint": "volatile unsigned int",
        "u64": "u64",
        "fwd_how": "struct open_how",
        "anon": "union (anon)",
        "restrict": "const char *restrict",
        "task_array_ptr": "struct task_struct (*)[4]",
        "do_sys_openat2": "long int do_sys_openat2(int, const char *, struct open_how *)",
        "state_enum": "enum state",
    }
    for key, text in names.items():
        assert btf.type_name(ids[key]) == text, key
    assert btf.type_name(0) == "void"
    assert btf.sizeof(ids["task_t"]) == 0x300
    assert btf.sizeof(ids["comm"]) == 16
    assert btf.sizeof(ids["mm_ptr"]) == 8
    assert btf.sizeof(ids["jiffies"]) == 8
    assert btf.resolve(ids["task_t"]).kind is BtfKind.STRUCT
    with pytest.raises(BtfError, match="has no size"):
        btf.sizeof(ids["fwd_how"])


def test_enum_values() -> None:
    blob, ids = kernel_like()
    btf = parse_btf(blob)
    assert [(v.name, v.value) for v in btf.type(ids["state_enum"]).values] == [
        ("NEG", -2), ("ZERO", 0), ("BIG", -0x80000000),
    ]  # fmt: skip
    assert btf.type(ids["flags_enum"]).values[0].value == 0x80000000
    assert [v.value for v in btf.type(ids["enum64"]).values] == [1 << 40, -1]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:10], "shorter than its header"),
        (lambda b: b"\x00\x00" + b[2:], "bad BTF magic"),
        (lambda b: b[:2] + b"\x02" + b[3:], "unsupported BTF version"),
        (lambda b: b[:-5], "run past the end"),
    ],
)
def test_malformed_blobs(mutate: object, message: str) -> None:
    blob, _ = kernel_like()
    with pytest.raises(BtfError, match=message):
        parse_btf(mutate(blob))  # type: ignore[operator]


def test_unknown_kind_and_truncated_types() -> None:
    b = BtfBuilder()
    b.integer("int", 4)
    b.types.append(struct.pack("<III", 0, 31 << 24, 0))
    with pytest.raises(BtfError, match="unknown BTF kind 31"):
        parse_btf(b.blob())
    b = BtfBuilder()
    b.composite("s", 8, [("a", 0, 0, 0)])
    b.types[-1] = b.types[-1][:-4]  # the member runs past the type section
    with pytest.raises(BtfError, match="runs past the type section"):
        parse_btf(b.blob())
    with pytest.raises(BtfError, match="no BTF type id 99"):
        parse_btf(kernel_like()[0]).type(99)
