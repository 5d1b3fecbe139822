"""BtfTypeResolver: the probe language's TypeResolver over a small synthesized BTF blob."""

from __future__ import annotations

import pytest

from qprobes.errors import ProbeSyntaxError
from qprobes.symbols.btf import BTF_INT_CHAR, BTF_INT_SIGNED, BtfKind, parse_btf
from qprobes.tracing import ProbeSpec, compile_fetchargs, evaluate, parse_probe
from qprobes.tracing.btf_resolver import BtfTypeResolver
from qprobes.tracing.parser import TpErr
from qprobes.tracing.program import FetchInsn, FetchOp
from qprobes.tracing.types import VOID, CKind, CType, Member, TypeResolver
from tests.unit.test_probe_language import FakeContext, make_regs, q
from tests.unit.test_symbols_btf import BtfBuilder

INT = CType.int_(4)
UINT = CType.int_(4, signed=False)
CHAR = CType.int_(1)
LONG = CType.int_(8)
ITEM = CType.struct("item", 0x50)
CONTAINER = CType.struct("container", 0x10)


def item_btf() -> BtfBuilder:
    """Roughly::

    struct item;                                   // also forward-declared
    struct inner { long a; unsigned short b; };
    typedef struct { int counter; } atomic_t;
    struct item {
        int id;                                    // 0x00
        char name[16];                             // 0x04
        unsigned int flags:3, mode:5;              // 0x14, bits 160.. and 163..
        struct inner inner;                        // 0x18
        union { long x; struct { int y; int z; }; };   // 0x28
        struct item *next;                         // 0x30
        const char *label;                         // 0x38
        atomic_t refs;                             // 0x40
        enum state state;                          // 0x44
        double weight;                             // 0x48
    };
    struct __packed odd { char c; unsigned int wide:28 @ bit 7; };  // straddles
    struct legacy { unsigned int old:3 @ bit 9; };  // pre-kind_flag bitfield
    struct container { struct item *first; struct item *last; };

    long myfunc(int count, struct item *item);
    void oddfunc(struct odd *o, struct legacy *l);
    void vfunc(const volatile struct item *restrict __user p, atomic_t *refs, ...);
    double fmath(double x, void *opaque, enum state st, item_t arr[4]);
    // (arr an array type, as C would not leave it)
    """
    b = BtfBuilder()
    int_ = b.integer("int", 4, BTF_INT_SIGNED)
    uint = b.integer("unsigned int", 4)
    char = b.integer("char", 1, BTF_INT_CHAR | BTF_INT_SIGNED)
    long_ = b.integer("long int", 8, BTF_INT_SIGNED)
    ushort = b.integer("short unsigned int", 2)
    index = b.integer("__ARRAY_SIZE_TYPE__", 4)
    double = b._add("double", BtfKind.FLOAT, 0, 8)
    fwd = b.fwd("item")
    fwd_ptr = b.ref(BtfKind.PTR, fwd)
    inner = b.composite("inner", 0x10, [("a", long_, 0, 0), ("b", ushort, 64, 0)])
    anon_atomic = b.composite("", 4, [("counter", int_, 0, 0)])
    atomic_t = b.ref(BtfKind.TYPEDEF, anon_atomic, "atomic_t")
    yz = b.composite("", 8, [("y", int_, 0, 0), ("z", int_, 32, 0)])
    anon_union = b.composite("", 8, [("x", long_, 0, 0), ("", yz, 0, 0)], union=True)
    name = b.array(char, index, 16)
    const_char = b.ref(BtfKind.CONST, char)
    label = b.ref(BtfKind.PTR, const_char)
    state = b.enum("state", [("NEG", -1), ("ONE", 1)], signed=True)
    item = b.composite(
        "item",
        0x50,
        [
            ("id", int_, 0, 0),
            ("name", name, 0x04 * 8, 0),
            ("flags", uint, 0x14 * 8, 3),
            ("mode", uint, 0x14 * 8 + 3, 5),
            ("inner", inner, 0x18 * 8, 0),
            ("", anon_union, 0x28 * 8, 0),
            ("next", fwd_ptr, 0x30 * 8, 0),
            ("label", label, 0x38 * 8, 0),
            ("refs", atomic_t, 0x40 * 8, 0),
            ("state", state, 0x44 * 8, 0),
            ("weight", double, 0x48 * 8, 0),
        ],
    )
    odd = b.composite("odd", 5, [("c", char, 0, 0), ("wide", uint, 7, 28)])
    old = b._add("unsigned int", BtfKind.INT, 0, 4, (0 << 24 | 2 << 16 | 3).to_bytes(4, "little"))
    legacy = b.composite("legacy", 4, [("old", old, 9, 0)])
    b.func(
        "oddfunc",
        b.proto(0, [("o", b.ref(BtfKind.PTR, odd)), ("l", b.ref(BtfKind.PTR, legacy))]),
    )
    item_ptr = b.ref(BtfKind.PTR, item)
    b.composite("container", 0x10, [("first", item_ptr, 0, 0), ("last", fwd_ptr, 64, 0)])
    b.func("myfunc", b.proto(long_, [("count", int_), ("item", item_ptr)]))
    cv_item = b.ref(BtfKind.CONST, b.ref(BtfKind.VOLATILE, item))
    user_ptr = b.ref(BtfKind.RESTRICT, b.ref(BtfKind.PTR, b.ref(BtfKind.TYPE_TAG, cv_item, "user")))
    atomic_ptr = b.ref(BtfKind.PTR, atomic_t)
    b.func("vfunc", b.proto(0, [("p", user_ptr), ("refs", atomic_ptr), ("", 0)]))
    void_ptr = b.ref(BtfKind.PTR, 0)
    item_t = b.ref(BtfKind.TYPEDEF, item, "item_t")
    items = b.array(item_t, index, 4)
    b.func(
        "fmath",
        b.proto(double, [("x", double), ("opaque", void_ptr), ("st", state), ("arr", items)]),
    )
    return b


@pytest.fixture(scope="module")
def resolver() -> BtfTypeResolver:
    return BtfTypeResolver(parse_btf(item_btf().blob()))


def test_is_a_type_resolver(resolver: BtfTypeResolver) -> None:
    typed: TypeResolver = resolver  # checked by mypy
    assert typed.arg_names("myfunc") == ["count", "item"]


def test_arg_names(resolver: BtfTypeResolver) -> None:
    assert resolver.arg_names("myfunc") == ["count", "item"]
    assert resolver.arg_names("vfunc") == ["p", "refs"]  # the varargs "..." is not one
    assert resolver.arg_names("fmath") == ["x", "opaque", "st", "arr"]
    assert resolver.arg_names("nosuch") is None
    assert resolver.arg_names("item") is None  # a struct, not a FUNC


def test_arg_types(resolver: BtfTypeResolver) -> None:
    assert resolver.arg_type("myfunc", 0) == INT
    assert resolver.arg_type("myfunc", 1) == CType.ptr(ITEM)
    # restrict, pointer, type tag, const and volatile all skipped.
    assert resolver.arg_type("vfunc", 0) == CType.ptr(ITEM)
    # An anonymous struct is named after its typedef.
    assert resolver.arg_type("vfunc", 1) == CType.ptr(CType.struct("atomic_t", 4))
    assert resolver.arg_type("vfunc", 2) is None  # the "..."
    assert resolver.arg_type("fmath", 0) is None  # double: not in the model
    assert resolver.arg_type("fmath", 1) == CType.ptr(VOID)
    assert resolver.arg_type("fmath", 2) == CType(CKind.ENUM, 4, signed=True, name="state")
    arr = resolver.arg_type("fmath", 3)
    assert arr == CType.array(ITEM, 4)
    assert arr is not None and (arr.size, arr.count) == (0x140, 4)
    assert resolver.arg_type("myfunc", 2) is None
    assert resolver.arg_type("myfunc", -1) is None
    assert resolver.arg_type("nosuch", 0) is None


def test_return_types(resolver: BtfTypeResolver) -> None:
    assert resolver.return_type("myfunc") == LONG
    assert resolver.return_type("vfunc") == VOID
    assert resolver.return_type("fmath") is None
    assert resolver.return_type("nosuch") is None


@pytest.mark.parametrize(
    ("struct_name", "path", "expected"),
    [
        ("item", ["id"], Member(0, 4, INT)),
        ("item", ["name"], Member(4, 16, CType.array(CHAR, 16))),
        ("item", ["inner", "a"], Member(0x18, 8, LONG)),
        ("item", ("inner", "b"), Member(0x20, 2, CType.int_(2, signed=False))),
        ("item", ["inner"], Member(0x18, 0x10, CType.struct("inner", 0x10))),
        ("item", ["x"], Member(0x28, 8, LONG)),  # in an anonymous union
        ("item", ["z"], Member(0x2C, 4, INT)),  # in an anonymous struct in it
        ("item", ["refs", "counter"], Member(0x40, 4, INT)),
        ("item", ["next"], Member(0x30, 8, CType.ptr(ITEM))),  # FWD: the complete struct
        ("item", ["label"], Member(0x38, 8, CType.ptr(CHAR))),
        ("item", ["state"], Member(0x44, 4, CType(CKind.ENUM, 4, signed=True, name="state"))),
        ("item", ["weight"], Member(0x48, 8, CType(CKind.VOID, 8))),  # opaque
        ("struct item", ["id"], Member(0, 4, INT)),
        ("item_t", ["id"], Member(0, 4, INT)),
        ("atomic_t", ["counter"], Member(0, 4, INT)),
        ("container", ["last"], Member(8, 8, CType.ptr(ITEM))),
        # Bitfields: the byte holding the first bit, then bits within it.
        ("item", ["flags"], Member(0x14, 4, UINT, 0, 3)),
        ("item", ["mode"], Member(0x14, 4, UINT, 3, 5)),
        # Bit 7 + 28 bits do not fit a u32 read from byte 0: read a u64.
        ("odd", ["wide"], Member(0, 8, CType.int_(8, signed=False), 7, 28)),
        # Without kind_flag, an INT of 3 bits at int_offset 2: bit 9 + 2 = 11.
        ("legacy", ["old"], Member(1, 4, UINT, 3, 3)),
    ],
)
def test_member(
    resolver: BtfTypeResolver, struct_name: str, path: list[str], expected: Member
) -> None:
    assert resolver.member(struct_name, path) == expected


@pytest.mark.parametrize(
    ("struct_name", "path"),
    [
        ("item", ["nosuch"]),
        ("item", ["inner", "nosuch"]),
        ("item", ["next", "id"]),  # through a pointer: that is "->", not "."
        ("item", ["id", "x"]),  # into an int
        ("item", []),
        ("nosuch", ["id"]),
        ("int", ["id"]),
    ],
)
def test_member_not_found(resolver: BtfTypeResolver, struct_name: str, path: list[str]) -> None:
    assert resolver.member(struct_name, path) is None


def spec(text: str) -> ProbeSpec:
    parsed = parse_probe(text)
    assert isinstance(parsed, ProbeSpec)
    return parsed


def test_compile_arg2_member_string() -> None:
    """The end-to-end check: ``$arg2->name:string`` through BTF."""
    btf = parse_btf(item_btf().blob())
    args = compile_fetchargs(
        spec("p:grp/ev myfunc $arg2->name:string"), symbols=None, resolver=BtfTypeResolver(btf)
    )
    assert len(args) == 1
    (arg,) = args
    # An unnamed argument is "arg1"; char[] is the string itself (no dereference).
    assert (arg.name, arg.type.name, arg.count) == ("arg1", "string", 0)
    assert arg.code == (
        FetchInsn(FetchOp.ARG, param=1),
        FetchInsn(FetchOp.ST_STRING, offset=4),
        FetchInsn(FetchOp.END),
    )


def item_memory(rdi: int, rsi: int) -> FakeContext:
    ctx = FakeContext(make_regs(rdi=rdi, rsi=rsi, rax=(1 << 64) - 2))
    ctx.poke(0x4000, (42).to_bytes(4, "little"))  # id
    ctx.poke(0x4004, b"widget\0")  # name
    ctx.poke(0x4014, bytes([0b1010_0110]))  # flags = 6, mode = 0b10100 = 20
    ctx.poke(0x4020, (0xBEEF).to_bytes(2, "little"))  # inner.b
    ctx.poke(0x4030, q(0x5000))  # next
    ctx.poke(0x5004, b"second\0")  # next->name
    ctx.poke(0x4038, q(0x6000))  # label
    ctx.poke(0x6000, b"a label\0")
    ctx.poke(0x4044, (0xFFFFFFFF).to_bytes(4, "little"))  # state = NEG
    ctx.poke(0x7000, ((0xABCDEF1 << 7) | 0x55).to_bytes(8, "little"))  # odd: wide, c
    ctx.poke(0x8000, (0b101 << 11 | 0x7FF).to_bytes(4, "little"))  # legacy: old = 5
    return ctx


EVALUATED = [
    ("p myfunc $arg2->name:string", ["arg1:string"], {"arg1": "widget"}),
    ("p myfunc item->id", ["arg1:s32"], {"arg1": 42}),
    ("p myfunc n=item->inner.b", ["n:u16"], {"n": 0xBEEF}),
    ("p myfunc f=item->flags m=item->mode", ["f:u32", "m:u32"], {"f": 6, "m": 20}),
    ("p myfunc item->next->name:string", ["arg1:string"], {"arg1": "second"}),
    ("p myfunc item->label:string", ["arg1:string"], {"arg1": "a label"}),
    ("p myfunc item->state", ["arg1:s32"], {"arg1": -1}),
    ("p myfunc $arg*", ["count:s32", "item:x64"], {"count": 7, "item": 0x4000}),
    ("r myfunc $retval", ["arg1:s64"], {"arg1": -2}),
    # A straddling bitfield (read as a u64) and an old-style one (kind_flag unset).
    ("p oddfunc o->wide l->old", ["arg1:u64", "arg2:u32"], {"arg1": 0xABCDEF1, "arg2": 5}),
]


@pytest.mark.parametrize(("text", "types", "expected"), EVALUATED, ids=[t for t, _, _ in EVALUATED])
def test_compile_and_evaluate(
    resolver: BtfTypeResolver, text: str, types: list[str], expected: dict[str, object]
) -> None:
    args = compile_fetchargs(spec(text), None, resolver)
    assert [f"{a.name}:{a.type.name}" for a in args] == types
    rdi, rsi = (0x7000, 0x8000) if "oddfunc" in text else (7, 0x4000)
    ctx = item_memory(rdi, rsi)
    ctx.entry_regs = {"rdi": rdi, "rsi": rsi}
    assert dict(evaluate(args, ctx)) == expected


BTF_ERRORS = [
    ("p myfunc item->nosuch", TpErr.NO_BTF_FIELD),
    ("p myfunc item->id->x", TpErr.NO_PTR_STRCT),
    ("p myfunc item->id:string", TpErr.BAD_TYPE4STR),
    ("p myfunc $arg3", TpErr.NO_BTFARG),
    ("p nosuch $arg1->id", TpErr.NO_BTF_ENTRY),
    ("r vfunc $retval", TpErr.NO_RETVAL),
]


@pytest.mark.parametrize(("text", "message"), BTF_ERRORS, ids=[t for t, _ in BTF_ERRORS])
def test_compile_errors(resolver: BtfTypeResolver, text: str, message: str) -> None:
    with pytest.raises(ProbeSyntaxError) as info:
        compile_fetchargs(spec(text), None, resolver)
    assert info.value.message == message
