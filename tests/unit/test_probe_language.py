"""The probe-definition language: kprobe_events definitions, fetch programs,
ftrace-style printing and event filters.

Error cases are written as Linux's own selftests write them
(tools/testing/selftests/ftrace/test.d/kprobe/kprobe_syntax_errors.tc): a
``^`` marks the column the error must point at, and is removed before
parsing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from qprobes.errors import ProbeError, ProbeSyntaxError, TranslationError
from qprobes.probes.context import HitContext, PtRegs
from qprobes.probes.stubs import FRAME_WORDS, PT_REGS_NAMES
from qprobes.symbols.elf import Symbol, SymbolTable
from qprobes.tracing import (
    FAULT,
    AllArgs,
    And,
    Arg,
    Bitfield,
    BtfVar,
    Comm,
    CType,
    Deref,
    FilterField,
    FilterOp,
    HitFetchContext,
    Immediate,
    ImmString,
    Member,
    MemberAccess,
    Memory,
    Not,
    Or,
    Predicate,
    ProbeArg,
    ProbeSpec,
    Register,
    RemoveSpec,
    Retval,
    StackEntry,
    StackPointer,
    SymbolRef,
    TpErr,
    TypeSpec,
    common_values,
    compile_fetchargs,
    evaluate,
    evaluate_filter,
    format_args,
    format_value,
    glob_match,
    parse_filter,
    parse_probe,
)
from qprobes.tracing.filter import FiltErr
from qprobes.tracing.types import VOID


def caret(marked: str) -> tuple[str, int]:
    """'p vfs_read ^$retval' -> ('p vfs_read $retval', 11)."""
    column = marked.index("^")
    return marked[:column] + marked[column + 1 :], column


def parse_ok(spec: str) -> ProbeSpec:
    parsed = parse_probe(spec)
    assert isinstance(parsed, ProbeSpec)
    return parsed


def a(name: str, fetch: object, type: TypeSpec | None = None) -> ProbeArg:
    return ProbeArg(name, fetch, type or TypeSpec())  # type: ignore[arg-type]


# --- parsing: (definition, expected tree) -----------------------------------------

PARSED = [
    # The examples of Documentation/trace/kprobetrace.rst.
    (
        "p:myprobe do_sys_open dfd=%ax filename=%dx flags=%cx mode=+4($stack)",
        ProbeSpec(
            False,
            "kprobes",
            "myprobe",
            "do_sys_open",
            args=(
                a("dfd", Register("ax")),
                a("filename", Register("dx")),
                a("flags", Register("cx")),
                a("mode", Deref(4, StackPointer())),
            ),
        ),
    ),
    (
        "r:myretprobe do_sys_open $retval",
        ProbeSpec(True, "kprobes", "myretprobe", "do_sys_open", args=(a("arg1", Retval()),)),
    ),
    # Default group and event names (trace_kprobe_create_internal).
    ("p vfs_read", ProbeSpec(False, "kprobes", "p_vfs_read_0", "vfs_read")),
    ("p vfs_read+0x1a", ProbeSpec(False, "kprobes", "p_vfs_read_26", "vfs_read", offset=26)),
    ("r vfs_read+0", ProbeSpec(True, "kprobes", "r_vfs_read_0", "vfs_read")),
    ("p vfs_read%return", ProbeSpec(True, "kprobes", "r_vfs_read_0", "vfs_read")),
    ("r100 vfs_read", ProbeSpec(True, "kprobes", "r_vfs_read_0", "vfs_read", maxactive=100)),
    ("r0x10:ev vfs_read", ProbeSpec(True, "kprobes", "ev", "vfs_read", maxactive=16)),
    (
        "p ext4:ext4_file_open",
        ProbeSpec(False, "kprobes", "p_ext4_ext4_file_open_0", "ext4_file_open", module="ext4"),
    ),
    ("p foo.isra.0", ProbeSpec(False, "kprobes", "p_foo_isra_0_0", "foo.isra.0")),
    (
        "p 0xffffffff81000010",
        ProbeSpec(False, "kprobes", "p_0xffffffff81000010", address=0xFFFFFFFF81000010),
    ),
    ("r 4096", ProbeSpec(True, "kprobes", "r_0x0000000000001000", address=4096)),
    ("p:grp/ vfs_read", ProbeSpec(False, "grp", "p_vfs_read_0", "vfs_read")),
    ("p:my-grp/ev vfs_read", ProbeSpec(False, "my-grp", "ev", "vfs_read")),
    ("p:grp.ev vfs_read", ProbeSpec(False, "grp", "ev", "vfs_read")),
    ("  p:ev\tvfs_read  # a comment", ProbeSpec(False, "kprobes", "ev", "vfs_read")),
    # Every kind of FETCHARG, and the types.
    (
        r"p f %ax %r8:s32 %rdi %flags @0x1000:x8[4] @jiffies+8:u64 @jiffies-8 $stack $stack3:x16",
        ProbeSpec(
            False,
            "kprobes",
            "p_f_0",
            "f",
            args=(
                a("arg1", Register("ax")),
                a("arg2", Register("r8"), TypeSpec("s32")),
                a("arg3", Register("di")),
                a("arg4", Register("flags")),
                a("arg5", Memory(0x1000), TypeSpec("x8", 4)),
                a("arg6", SymbolRef("jiffies", 8), TypeSpec("u64")),
                a("arg7", SymbolRef("jiffies", -8)),
                a("arg8", StackPointer()),
                a("arg9", StackEntry(3), TypeSpec("x16")),
            ),
        ),
    ),
    (
        r'p f $comm $COMM:string \123 \-1:s8 \"hi" $arg1 $arg7 x=%rax',
        ProbeSpec(
            False,
            "kprobes",
            "p_f_0",
            "f",
            args=(
                a("arg1", Comm()),
                a("arg2", Comm(), TypeSpec("string")),
                a("arg3", Immediate(123)),
                a("arg4", Immediate(-1), TypeSpec("s8")),
                a("arg5", ImmString("hi")),
                a("arg6", Arg(1)),
                a("arg7", Arg(7)),
                a("x", Register("ax")),
            ),
        ),
    ),
    (
        "p f +0(%di):string +8(+16(%si)):u32 -8(%sp) +u4(%si):ustring +u0(%si):string "
        "+0(%di):string[2] %di:symbol %di:symstr +0(%di):b3@4/32 +0(%di):char",
        ProbeSpec(
            False,
            "kprobes",
            "p_f_0",
            "f",
            args=(
                a("arg1", Deref(0, Register("di")), TypeSpec("string")),
                a("arg2", Deref(8, Deref(16, Register("si"))), TypeSpec("u32")),
                a("arg3", Deref(-8, Register("sp"))),
                a("arg4", Deref(4, Register("si"), user=True), TypeSpec("ustring")),
                a("arg5", Deref(0, Register("si"), user=True), TypeSpec("string")),
                a("arg6", Deref(0, Register("di")), TypeSpec("string", 2)),
                a("arg7", Register("di"), TypeSpec("symbol")),
                a("arg8", Register("di"), TypeSpec("symstr")),
                a("arg9", Deref(0, Register("di")), TypeSpec("u32", bitfield=Bitfield(3, 4, 32))),
                a("arg10", Deref(0, Register("di")), TypeSpec("char")),
            ),
        ),
    ),
    # BTF-style parameters and members stay in the tree until compiled.
    (
        "p vfs_read $arg1->f_path.dentry->d_name.name:string count pos=pos",
        ProbeSpec(
            False,
            "kprobes",
            "p_vfs_read_0",
            "vfs_read",
            args=(
                a(
                    "arg1",
                    MemberAccess(Arg(1), (("f_path", "dentry"), ("d_name", "name"))),
                    TypeSpec("string"),
                ),
                a("count", BtfVar("count")),
                a("pos", BtfVar("pos")),
            ),
        ),
    ),
    (
        "r vfs_read $retval->f_flags file->f_mode:u8 $arg*",
        ProbeSpec(
            True,
            "kprobes",
            "r_vfs_read_0",
            "vfs_read",
            args=(
                a("arg1", MemberAccess(Retval(), (("f_flags",),))),
                a("arg2", MemberAccess(BtfVar("file"), (("f_mode",),)), TypeSpec("u8")),
                a("$arg*", AllArgs()),
            ),
        ),
    ),
    ("-:myprobe", RemoveSpec("myprobe")),
    ("-:grp/myprobe", RemoveSpec("myprobe", "grp")),
    ("-:grp/myprobe a=%ax", RemoveSpec("myprobe", "grp", ("a=%ax",))),
]


@pytest.mark.parametrize(("spec", "expected"), PARSED, ids=[s for s, _ in PARSED])
def test_parse(spec: str, expected: ProbeSpec | RemoveSpec) -> None:
    assert parse_probe(spec) == expected


def test_parse_keeps_text_and_columns() -> None:
    spec = parse_ok("p:ev vfs_read a=+8(%di):u32")
    assert spec.text == "p:ev vfs_read a=+8(%di):u32"
    arg = spec.args[0]
    assert arg.text == "+8(%di):u32" and arg.named
    assert (arg.pos, arg.fetch.pos, arg.type.pos) == (14, 16, 24)
    assert isinstance(arg.fetch, Deref) and arg.fetch.base.pos == 19


# --- parsing errors: Linux's selftest table, then more --------------------------------

SYNTAX_ERRORS = [
    ("p^100 vfs_read", TpErr.BAD_MAXACT_TYPE),
    ("r^1a111 vfs_read", TpErr.BAD_MAXACT),
    ("r^100000 vfs_read", TpErr.MAXACT_TOO_BIG),
    ("r^0 vfs_read", TpErr.BAD_MAXACT),
    ("p ^hoge-fuga", TpErr.BAD_PROBE_ADDR),
    ("p ^hoge+1000-1000", TpErr.BAD_PROBE_ADDR),
    ("r ^vfs_read+10", TpErr.BAD_RETPROBE),
    ("p:^/bar vfs_read", TpErr.NO_GROUP_NAME),
    ("p:^" + "1234567890" * 6 + "12345/bar vfs_read", TpErr.GROUP_TOO_LONG),
    ("p:^foo.1/bar vfs_read", TpErr.BAD_GROUP_NAME),
    ("p:^ vfs_read", TpErr.NO_EVENT_NAME),
    ("p:foo/^" + "1234567890" * 6 + "12345 vfs_read", TpErr.EVENT_TOO_LONG),
    ("p:foo/^bar.1 vfs_read", TpErr.BAD_EVENT_NAME),
    ("p vfs_read ^$retval", TpErr.RETVAL_ON_PROBE),
    ("p vfs_read ^$stack10000", TpErr.BAD_STACK_NUM),
    ("p vfs_read ^$arg10000", TpErr.BAD_ARG_NUM),
    ("p vfs_read ^$none_var", TpErr.BAD_VAR),
    ("p vfs_read ^%none_reg", TpErr.BAD_REG_NAME),
    ("p vfs_read ^@12345678abcde", TpErr.BAD_MEM_ADDR),
    ("p vfs_read ^@+10", TpErr.FILE_ON_KPROBE),
    ("p vfs_read arg1=\\^x", TpErr.BAD_IMM),
    ('p vfs_read arg1=\\"abcd^', TpErr.IMMSTR_NO_CLOSE),
    ("p vfs_read ^+0@0)", TpErr.DEREF_NEED_BRACE),
    ("p vfs_read ^+0ab1(@0)", TpErr.BAD_DEREF_OFFS),
    ("p vfs_read +0(+0(@0^)", TpErr.DEREF_OPEN_BRACE),
    ("p vfs_read +0(^$comm)", TpErr.COMM_CANT_DEREF),
    ("p vfs_read ^&1", TpErr.BAD_FETCH_ARG),
    ("p vfs_read +0(^" + "+0(" * 13 + "@0" + ")" * 14, TpErr.TOO_MANY_OPS),
    ("p vfs_read +0(@11):u8[10^", TpErr.ARRAY_NO_CLOSE),
    ("p vfs_read +0(@11):u8[10]^a", TpErr.BAD_ARRAY_SUFFIX),
    ("p vfs_read +0(@11):u8[^10a]", TpErr.BAD_ARRAY_NUM),
    ("p vfs_read +0(@11):u8[^256]", TpErr.ARRAY_TOO_BIG),
    ("p vfs_read @11:^unknown_type", TpErr.BAD_TYPE),
    ("p vfs_read $stack0:^string", TpErr.BAD_STRING),
    ("p vfs_read @11:^b10@a/16", TpErr.BAD_BITFIELD),
    ("p vfs_read ^arg123456789012345678901234567890=@11", TpErr.ARG_NAME_TOO_LONG),
    ("p vfs_read ^=@11", TpErr.NO_ARG_NAME),
    ("p vfs_read ^var.1=@11", TpErr.BAD_ARG_NAME),
    ("p vfs_read var1=@11 ^var1=@12", TpErr.USED_ARG_NAME),
    ("p vfs_read ^" + "+1234567(" * 6 + "@1234" + ")" * 6, TpErr.ARG_TOO_LONG),
    ("p vfs_read arg1=^", TpErr.NO_ARG_BODY),
    ("p vfs_read^%hoge", TpErr.BAD_ADDR_SUFFIX),
    ("p ^vfs_read+10%return", TpErr.BAD_RETPROBE),
    ("p vfs_read args=^$arg*", TpErr.BAD_VAR_ARGS),
    ("p vfs_read +0(^$arg*)", TpErr.BAD_VAR_ARGS),
    ("p vfs_read $arg* ^$arg*", TpErr.DOUBLE_ARGS),
    ("p vfs_read+8 ^$arg*", TpErr.NOFENTRY_ARGS),
    # Beyond the selftest: the checks it does not reach.
    ("^", TpErr.EMPTY),
    ("^# only a comment", TpErr.EMPTY),
    ("^x vfs_read", TpErr.BAD_COMMAND),
    ("p^x vfs_read", TpErr.BAD_COMMAND),
    ("p ^", TpErr.NO_PROBE_POINT),
    ("p ^/bin/sh:0x4", TpErr.NO_UPROBE),
    ("p ^1abc", TpErr.BAD_PROBE_ADDR),
    ("-^x", TpErr.BAD_COMMAND),
    ("-:^", TpErr.NO_EVENT_NAME),
    ("p 0x1000 ^$arg1", TpErr.NOFENTRY_ARGS),
    ("p vfs_read+4 x=+0(^$arg1)", TpErr.NOFENTRY_ARGS),
    ("p vfs_read ^$arg", TpErr.BAD_VAR),
    ("p vfs_read ^$arg0", TpErr.BAD_ARG_NUM),
    ("p vfs_read ^$stack1x", TpErr.BAD_VAR),
    ("p vfs_read $arg1^.f", TpErr.NOSUP_DAT_ARG),
    ("p vfs_read $arg1^-f", TpErr.BAD_HYPHEN),
    ("p vfs_read file->^", TpErr.NO_BTF_FIELD),
    ("p vfs_read+4 ^count", TpErr.NOSUP_BTFARG),
    ("p vfs_read ^(struct file)$arg1", TpErr.NOSUP_BTFARG),
    ("p vfs_read a=%ax ^common_pid=%bx", TpErr.USED_ARG_NAME),
    ("p vfs_read +0(%di)^x", TpErr.BAD_FETCH_ARG),
    ("p vfs_read $comm:^u8", TpErr.NEED_STRING_TYPE),
    ('p vfs_read \\"a":^string[2]', TpErr.NEED_STRING_TYPE),
    ("p vfs_read %ax:^string", TpErr.BAD_STRING),
    ("p vfs_read %ax:^u8[2]", TpErr.BAD_STRING),
    ("p vfs_read $stack:^symstr", TpErr.BAD_SYMSTRING),
    ("p vfs_read +u0(%di):^symstr", TpErr.BAD_SYMSTRING),
    ("p vfs_read %ax:^b8@1/8", TpErr.BAD_BITFIELD),
    ("p vfs_read %ax:^b0@1/8", TpErr.BAD_BITFIELD),
    ("p vfs_read %ax:^b4@1/12", TpErr.BAD_TYPE),
    ("p vfs_read %ax:^", TpErr.BAD_TYPE),
    ("p vfs_read ^@", TpErr.BAD_MEM_ADDR),
    ("p vfs_read +0(^" + "+0(" * 12 + "@0" + ")" * 13 + ":u8[2]", TpErr.TOO_MANY_OPS),
    ("p vfs_read " + "+0(" * 12 + "@a" + ")" * 12 + ":^b1@0/8", TpErr.BAD_BITFIELD),
    ("p vfs_read ^" + " ".join(["%ax"] * 129), TpErr.TOO_MANY_ARGS),
]


@pytest.mark.parametrize(("marked", "message"), SYNTAX_ERRORS, ids=[m for m, _ in SYNTAX_ERRORS])
def test_syntax_error(marked: str, message: str) -> None:
    spec, column = caret(marked)
    with pytest.raises(ProbeSyntaxError) as info:
        parse_probe(spec)
    assert (info.value.message, info.value.column) == (message, column)
    assert info.value.spec == spec


def test_error_prints_like_error_log() -> None:
    with pytest.raises(ProbeSyntaxError) as info:
        parse_probe("p vfs_read\t%none_reg")
    err = info.value
    assert str(err) == "error: Invalid register name: 'p vfs_read\\t%none_reg' at column 11"
    assert err.format_caret() == "p vfs_read\t%none_reg\n          \t^"


def test_limits_that_pass() -> None:
    parse_ok("r4096 vfs_read")
    parse_ok("p vfs_read $stack2048 $arg2048 +0(%di):u8[64]")
    parse_ok("p vfs_read " + "+0(" * 13 + "@0" + ")" * 13)  # 15 of 16 fetch_insn slots
    parse_ok("p vfs_read " + " ".join(["%ax"] * 128))
    parse_ok("p vfs_read " + "a" * 32 + "=%ax")


def test_format_is_kprobe_events_listing() -> None:
    spec = parse_ok("r5:grp/ev vfs_read a=%ax +0(%di):u8[2]")
    assert spec.format() == "r5:grp/ev vfs_read a=%ax arg2=+0(%di):u8[2]"
    assert parse_ok(spec.format()) == spec
    assert parse_ok("p ext4:open+4").format() == "p:kprobes/p_ext4_open_4 ext4:open+4"
    assert parse_ok("p 0x1000").format() == "p:kprobes/p_0x0000000000001000 0x0000000000001000"
    assert str(parse_probe("-:grp/ev")) == "-:grp/ev"


# --- compiling and evaluating ------------------------------------------------------


class Regs:
    """pt_regs with attribute access, like PtRegs."""

    def __init__(self, **values: int) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> int:
        raise AttributeError(name)


def make_regs(**overrides: int) -> Regs:
    values = dict.fromkeys(PT_REGS_NAMES, 0)
    values.update(
        rax=0xFFFFFFFF, rdi=0x1000, rsi=0x2000, rdx=42, rsp=0x3000, rip=0xFFFFFFFF81000004
    )
    values.update(overrides)
    return Regs(**values)


@dataclass
class FakeContext:
    """A FetchContext over a few sparse pages of kernel and of user memory."""

    regs: Regs = field(default_factory=make_regs)
    pages: dict[int, bytearray] = field(default_factory=dict)
    user_pages: dict[int, bytearray] = field(default_factory=dict)
    retval: int | None = None
    entry_regs: dict[str, int] | None = None
    cr3: int = 0x1000
    task: str = "bash"

    def poke(self, addr: int, data: bytes, user: bool = False) -> FakeContext:
        pages = self.user_pages if user else self.pages
        for i, byte in enumerate(data):
            page = pages.setdefault((addr + i) & ~0xFFF, bytearray(4096))
            page[(addr + i) & 0xFFF] = byte
        return self

    def read(self, addr: int, length: int, user: bool = False) -> bytes:
        out = bytearray()
        for at in range(addr, addr + length):
            page = (self.user_pages if user else self.pages).get(at & ~0xFFF)
            if page is None:
                raise TranslationError(at, "PTE")
            out.append(page[at & 0xFFF])
        return bytes(out)

    def read_user(self, addr: int, length: int) -> bytes:
        return self.read(addr, length, user=True)

    def comm(self) -> str:
        return self.task


def q(value: int) -> bytes:
    return value.to_bytes(8, "little")


def memory() -> FakeContext:
    ctx = FakeContext()
    # rdi -> 0x1000: two char pointers, then bytes f5 02 03 04, then a pointer to nowhere.
    ctx.poke(0x1000, q(0x2000) + q(0x2008) + bytes([0xF5, 2, 3, 4]) + bytes(4) + q(0x9000))
    ctx.poke(0x2000, b"hello\0world\0")  # rsi
    ctx.poke(0x2000, b"USER\0SPACE\0" + q(0x2005), user=True)  # rsi in the task's memory
    ctx.poke(0x3000, q(0xAAAA) + q(77) + q(0x2000))  # the stack
    ctx.poke(0x7FF8, q(5))  # jiffies, the last word before an unmapped page
    return ctx


SYMBOLS = SymbolTable(
    [
        Symbol("vfs_read", 0xFFFFFFFF81000000, 0x100, "func"),
        Symbol("jiffies", 0x7FF8, 8, "object"),
    ]
)


def run(spec: str, ctx: FakeContext | None = None) -> dict[str, object]:
    args = compile_fetchargs(parse_ok(spec), SYMBOLS)
    return dict(evaluate(args, ctx or memory()))


EVALUATED = [
    ("%ax", 0xFFFFFFFF),
    ("%ax:s32", -1),
    ("%ax:u16", 0xFFFF),
    ("%rax:s8", -1),
    ("%flags", 0),
    ("%ip:symbol", 0xFFFFFFFF81000004),
    ("%ip:symstr", "vfs_read+0x4/0x100"),
    ("$stack0:symstr", "0xaaaa"),
    ("$stack", 0x3000),
    ("$stack0", 0xAAAA),
    ("$stack1:u8", 77),
    ("$stack2000", 0),  # regs_get_kernel_stack_nth gives 0 off the stack
    ("$arg1", 0x1000),
    ("$arg3:u32", 42),
    ("$arg7", 77),  # the 7th argument is the first stack word above the return address
    ("$comm", "bash"),
    ('\\"imm"', "imm"),
    ("\\-1:s16", -1),
    ("@0x1000", 0x2000),
    ("@0x1010:u16", 0x2F5),
    ("@jiffies:u32", 5),
    ("@jiffies+8", FAULT),
    ("+16(%di):u8", 0xF5),
    ("+16(%di):s8", -11),
    ("+16(%di):char", 0xF5),
    ("+16(%di):b4@4/8", 0xF),
    ("+16(%di):b4@0/8", 5),
    ("+16(%di):b3@1/32", 0b010),  # bits 1-3 of 0x040302f5
    ("+0(%si):string", "hello"),
    ("+6(%si):string", "world"),
    ("+0(%si):ustring", "USER"),
    ("+u5(%si):string", "SPACE"),
    ("+u0(%si):u32", int.from_bytes(b"USER", "little")),
    ("+0(+u11(%si)):ustring", "SPACE"),
    ("+0(+u11(%si)):string", ""),  # a user pointer followed in kernel memory
    ("+u0(+u11(%si)):string", "SPACE"),
    ("+u11(%si):string[1]", ["SPACE"]),
    ("+0(+0(%di)):string", "hello"),
    ("@0x1000:symstr", "0x2000"),
    ("+0(%di):string[2]", ["hello", "rld"]),
    ("+16(%di):u8[4]", [0xF5, 2, 3, 4]),
    ("+16(%di):x16[2]", [0x2F5, 0x403]),
    ("+16(%di):s8[2]", [-11, 2]),
    ("+0(+24(%di)):u64", FAULT),  # the pointer leads nowhere
    ("+0(+24(%di)):string", FAULT),
    ("@0x7ff8:u64[2]", [5, FAULT]),  # an array runs into an unmapped page
    ("+0(%bx):u8", FAULT),  # rbx is 0
]


@pytest.mark.parametrize(("arg", "expected"), EVALUATED, ids=[s for s, _ in EVALUATED])
def test_evaluate(arg: str, expected: object) -> None:
    assert run(f"p vfs_read {arg}") == {"arg1": expected}


def test_string_stops_before_an_unmapped_page_and_at_4095_chars() -> None:
    ctx = memory().poke(0x5FFC, b"end\0")
    assert run("p f @0x5ffc:string", ctx) == {"arg1": "end"}
    ctx.poke(0x6000, b"x" * 5000)
    assert run("p f @0x6000:string", ctx) == {"arg1": "x" * 4095}


def test_return_probe_fetches_retval_and_entry_arguments() -> None:
    ctx = memory()
    ctx.retval = (1 << 64) - 2
    ctx.entry_regs = {"rdi": 7, "rsi": 8, "rsp": 0x3000}
    assert run("r vfs_read $retval $retval:s64 $arg1 $arg2 $arg7", ctx) == {
        "arg1": (1 << 64) - 2,
        "arg2": -2,
        "arg3": 7,
        "arg4": 8,
        "arg5": 77,
    }
    ctx.entry_regs = None
    with pytest.raises(ProbeError):
        run("r vfs_read $arg1", ctx)


def test_hit_context_adapter() -> None:
    words = [0] * FRAME_WORDS
    words[2 + PT_REGS_NAMES.index("rdi")] = 0x2000
    words[2 + PT_REGS_NAMES.index("rax")] = 3
    mem = memory()
    hit = HitContext(thread=1, regs=PtRegs(words), read_virt=mem.read, cr3=0x1000)
    ctx = HitFetchContext(hit, lambda: "systemd-journald")
    args = compile_fetchargs(parse_ok("p f +0(%di):string %ax:u8 $comm"))
    # TASK_COMM_LEN is 16: the name keeps 15 characters.
    assert evaluate(args, ctx) == {"arg1": "hello", "arg2": 3, "arg3": "systemd-journal"}


def test_compiled_program_mirrors_fetch_insn() -> None:
    (arg,) = compile_fetchargs(parse_ok("p f +8(+16(%si)):u32[2]"))
    assert [str(insn) for insn in arg.code] == [
        "REG(name='rsi')",
        "DEREF(offset=16)",
        "ST_MEM(offset=8 size=4)",
        "LP_ARRAY(param=2)",
        "END()",
    ]
    assert arg.filter_field == FilterField("arg1", size=4, is_array=True)


COMPILE_ERRORS = [
    ("p f ^@nosuch", TpErr.NO_SYMBOL, SYMBOLS),
    ("p f ^@jiffies", TpErr.NEED_SYMBOLS, None),
    ("p vfs_read ^count", TpErr.NOSUP_BTFARG, None),
    ("p vfs_read ^$arg1->f_flags", TpErr.NOSUP_BTFARG, None),
    ("p vfs_read ^$arg*", TpErr.NOSUP_BTFARG, None),
    ("p vfs_read $arg1:^string", TpErr.BAD_STRING, None),
    ("r vfs_read $retval:^string", TpErr.BAD_STRING, None),
]


@pytest.mark.parametrize(
    ("marked", "message", "symbols"), COMPILE_ERRORS, ids=[m for m, _, _ in COMPILE_ERRORS]
)
def test_compile_error(marked: str, message: str, symbols: SymbolTable | None) -> None:
    spec, column = caret(marked)
    with pytest.raises(ProbeSyntaxError) as info:
        compile_fetchargs(parse_ok(spec), symbols)
    assert (info.value.message, info.value.column) == (message, column)


# --- BTF-style arguments through a TypeResolver ------------------------------------

CHAR = CType.int_(1, signed=False)
FILE = CType.struct("file", 0x100)
DENTRY = CType.struct("dentry", 0xC0)


class FakeResolver:
    """``ssize_t vfs_read(struct file *file, char *buf, size_t count, loff_t *pos)``
    and ``void kfree(const void *objp)``, with a few members of file and dentry."""

    params: ClassVar[dict[str, list[tuple[str, CType]]]] = {
        "vfs_read": [
            ("file", CType.ptr(FILE)),
            ("buf", CType.ptr(CHAR)),
            ("count", CType.int_(8, signed=False)),
            ("pos", CType.ptr(CType.int_(8))),
        ],
        "kfree": [("objp", CType.ptr(VOID))],
    }
    returns: ClassVar[dict[str, CType]] = {"vfs_read": CType.int_(8), "kfree": VOID}
    members: ClassVar[dict[tuple[str, tuple[str, ...]], Member]] = {
        ("file", ("f_path", "dentry")): Member(0x10, 8, CType.ptr(DENTRY)),
        ("file", ("f_flags",)): Member(0x40, 4, CType.int_(4, signed=False)),
        ("file", ("f_mode",)): Member(0x44, 4, CType.int_(4, signed=False), 3, 3),
        ("dentry", ("d_name", "name")): Member(0x28, 8, CType.ptr(CHAR)),
        ("dentry", ("d_iname",)): Member(0x38, 32, CType.array(CHAR, 32)),
    }

    def arg_names(self, func: str) -> Sequence[str] | None:
        params = self.params.get(func)
        return None if params is None else [name for name, _ in params]

    def arg_type(self, func: str, index: int) -> CType | None:
        params = self.params.get(func, [])
        return params[index][1] if index < len(params) else None

    def return_type(self, func: str) -> CType | None:
        return self.returns.get(func)

    def member(self, struct_name: str, path: Sequence[str]) -> Member | None:
        return self.members.get((struct_name, tuple(path)))


def btf_memory() -> FakeContext:
    ctx = FakeContext(make_regs(rdi=0x4000, rsi=0x6000, rdx=42, rcx=0x7000))
    ctx.poke(0x4010, q(0x5000))  # file->f_path.dentry
    ctx.poke(0x4040, (0x8002).to_bytes(4, "little"))  # file->f_flags
    ctx.poke(0x4044, (0b101000).to_bytes(4, "little"))  # file->f_mode = 5 in bits 3-5
    ctx.poke(0x5028, q(0x6000))  # dentry->d_name.name
    ctx.poke(0x5038, b"passwd\0")  # dentry->d_iname
    ctx.poke(0x6000, b"/etc/passwd\0")
    return ctx


def btf_run(spec: str, ctx: FakeContext | None = None) -> tuple[list[str], dict[str, object]]:
    args = compile_fetchargs(parse_ok(spec), SYMBOLS, FakeResolver())
    return [f"{arg.name}:{arg.type.name}" for arg in args], dict(
        evaluate(args, ctx or btf_memory())
    )


BTF_EVALUATED = [
    (
        "$arg1->f_path.dentry->d_name.name:string",
        ["arg1:string"],
        {"arg1": "/etc/passwd"},
    ),
    ("file->f_path.dentry->d_iname:string", ["arg1:string"], {"arg1": "passwd"}),
    ("file->f_flags", ["arg1:u32"], {"arg1": 0x8002}),
    ("flags=file->f_flags:x16", ["flags:x16"], {"flags": 0x8002}),
    ("file->f_mode", ["arg1:u32"], {"arg1": 5}),
    ("count", ["count:u64"], {"count": 42}),
    ("$arg3", ["count:u64"], {"count": 42}),  # Linux renames a bare $argN after the parameter
    ("n=$arg3", ["n:x64"], {"n": 42}),  # ...but not a named one
    ("buf:string", ["buf:string"], {"buf": "/etc/passwd"}),
    ("buf", ["buf:x64"], {"buf": 0x6000}),
    (
        "$arg*",
        ["file:x64", "buf:x64", "count:u64", "pos:x64"],
        {
            "file": 0x4000,
            "buf": 0x6000,
            "count": 42,
            "pos": 0x7000,
        },
    ),
]


@pytest.mark.parametrize(
    ("arg", "types", "expected"), BTF_EVALUATED, ids=[s for s, _, _ in BTF_EVALUATED]
)
def test_btf_evaluate(arg: str, types: list[str], expected: dict[str, object]) -> None:
    assert btf_run(f"p vfs_read {arg}") == (types, expected)


def test_btf_return_probe() -> None:
    ctx = btf_memory()
    ctx.retval = (1 << 64) - 14
    ctx.entry_regs = {"rdi": 0x4000, "rdx": 9}
    assert btf_run("r vfs_read $retval count file->f_flags", ctx) == (
        ["arg1:s64", "count:u64", "arg3:u32"],
        {"arg1": -14, "count": 9, "arg3": 0x8002},
    )


BTF_ERRORS = [
    ("p vfs_read ^nosuch", TpErr.NO_BTFARG),
    ("p vfs_read ^$arg5", TpErr.NO_BTFARG),
    ("p vfs_read file->^nosuch", TpErr.NO_BTF_FIELD),
    ("p vfs_read file->f_flags->^x", TpErr.NO_PTR_STRCT),
    ("p vfs_read count->^x", TpErr.NO_PTR_STRCT),
    ("p vfs_read count:^string", TpErr.BAD_TYPE4STR),
    ("p nosuch ^x", TpErr.NO_BTF_ENTRY),
    ("r kfree ^$retval", TpErr.NO_RETVAL),
    ("p vfs_read file=%ax ^file", TpErr.USED_ARG_NAME),
]


@pytest.mark.parametrize(("marked", "message"), BTF_ERRORS, ids=[m for m, _ in BTF_ERRORS])
def test_btf_error(marked: str, message: str) -> None:
    spec, column = caret(marked)
    with pytest.raises(ProbeSyntaxError) as info:
        compile_fetchargs(parse_ok(spec), SYMBOLS, FakeResolver())
    assert (info.value.message, info.value.column) == (message, column)


# --- printing like ftrace ------------------------------------------------------------

FORMATTED = [
    ("%ax", 0x1234, "arg1=0x1234"),
    ("%ax:x8", 0xAB, "arg1=0xab"),
    ("%ax:u32", 4294967295, "arg1=4294967295"),
    ("%ax:s32", -1, "arg1=-1"),
    ("%ax:char", 0x61, "arg1='a'"),
    ("%ax:symbol", 0xFFFFFFFF81000004, "arg1=vfs_read+0x4/0x100"),
    ("%ax:symbol", 0xFFFFFFFF81000000, "arg1=vfs_read+0x0/0x100"),
    ("%ax:symbol", 0x10, "arg1=0x10"),
    ("name=+0(%di):string", "x y", 'name="x y"'),
    ("+0(%di):string", "", 'arg1=""'),
    ("+0(%di):string", FAULT, "arg1=(fault)"),
    ("+0(%di):u8", FAULT, "arg1=(fault)"),
    ("%ax:symstr", "vfs_read+0x4/0x100", 'arg1="vfs_read+0x4/0x100"'),
    ("+0(%di):u8[3]", [1, 2, 3], "arg1={1,2,3}"),
    ("+0(%di):x16[2]", [1, FAULT], "arg1={0x1,(fault)}"),
    ("+0(%di):string[2]", ["a", "b"], 'arg1={"a","b"}'),
]


@pytest.mark.parametrize(
    ("arg", "value", "text"), FORMATTED, ids=[f"{s}-{t}" for s, _, t in FORMATTED]
)
def test_format_value(arg: str, value: object, text: str) -> None:
    (compiled,) = compile_fetchargs(parse_ok(f"p f {arg}"), SYMBOLS)
    assert format_value(compiled, value) == text  # type: ignore[arg-type]


def test_format_args_is_the_trace_line_tail() -> None:
    args = compile_fetchargs(parse_ok("p:myprobe do_sys_open dfd=%ax:s32 mode=+4($stack):x16"))
    line = format_args(args, evaluate(args, memory().poke(0x3004, b"\xa4\x01")))
    assert line == "dfd=-1 mode=0x1a4"


# --- event filters ----------------------------------------------------------------------

FILTERS = [
    ("a == 1", Predicate("a", FilterOp.EQ, 1)),
    ("a==0x10", Predicate("a", FilterOp.EQ, 16)),
    ("a & 4", Predicate("a", FilterOp.BAND, 4)),
    ("a <= -1", Predicate("a", FilterOp.LE, -1)),
    ('comm ~ "*sh"', Predicate("comm", FilterOp.GLOB, "*sh")),
    ("comm != 'bash'", Predicate("comm", FilterOp.NE, "bash")),
    (
        "a == 1 || b == 2 && c == 3",
        Or(
            Predicate("a", FilterOp.EQ, 1),
            And(Predicate("b", FilterOp.EQ, 2), Predicate("c", FilterOp.EQ, 3)),
        ),
    ),
    (
        '((sig >= 10 && sig < 15) || sig == 17) && comm != "bash"',
        And(
            Or(
                And(Predicate("sig", FilterOp.GE, 10), Predicate("sig", FilterOp.LT, 15)),
                Predicate("sig", FilterOp.EQ, 17),
            ),
            Predicate("comm", FilterOp.NE, "bash"),
        ),
    ),
    (
        "!(a == 1) && !b > 2",
        And(Not(Predicate("a", FilterOp.EQ, 1)), Not(Predicate("b", FilterOp.GT, 2))),
    ),
]


@pytest.mark.parametrize(("text", "expected"), FILTERS, ids=[t for t, _ in FILTERS])
def test_parse_filter(text: str, expected: object) -> None:
    assert parse_filter(text) == expected


FIELDS = [
    FilterField("n", size=4, signed=True),
    FilterField("u", size=1),
    FilterField("s", is_string=True),
    FilterField("arr", size=2, is_array=True),
]

FILTER_ERRORS = [
    ("^", FiltErr.NO_FILTER, None),
    ("a ^=< 1", FiltErr.INVALID_OP, None),
    ("a ^&& b", FiltErr.INVALID_OP, None),
    ("a == ^'x", FiltErr.MISSING_QUOTE, None),
    ("a == ^bash", FiltErr.INVALID_VALUE, None),
    ("a == ^", FiltErr.INVALID_VALUE, None),
    ("^(a == 1", FiltErr.TOO_MANY_OPEN, None),
    ("a == 1^)", FiltErr.TOO_MANY_CLOSE, None),
    ("a == 1 ^b == 2", FiltErr.TOO_MANY_PREDS, None),
    ("a ~ ^1", FiltErr.ILLEGAL_FIELD_OP, None),
    ("a < ^'x'", FiltErr.ILLEGAL_FIELD_OP, None),
    ("a == ^0xzz", FiltErr.ILLEGAL_INTVAL, None),
    ("a == ^1" + "0" * 23, FiltErr.OPERAND_TOO_LONG, None),
    ("^&& a == 1", FiltErr.MISSING_FIELD, None),
    ("^nosuch == 1", FiltErr.FIELD_NOT_FOUND, FIELDS),
    ("s == ^1", FiltErr.EXPECT_STRING, FIELDS),
    ("n == ^'x'", FiltErr.EXPECT_DIGIT, FIELDS),
    ("u == ^-1", FiltErr.ILLEGAL_INTVAL, FIELDS),
    ("arr == ^1", FiltErr.ILLEGAL_FIELD_OP, FIELDS),
]


@pytest.mark.parametrize(
    ("marked", "message", "fields"), FILTER_ERRORS, ids=[m for m, _, _ in FILTER_ERRORS]
)
def test_filter_error(marked: str, message: str, fields: list[FilterField] | None) -> None:
    text, column = caret(marked)
    with pytest.raises(ProbeSyntaxError) as info:
        parse_filter(text, fields)
    assert (info.value.message, info.value.column) == (message, column)


FILTER_EVALUATIONS = [
    ("a == 1", {"a": 1}, True),
    ("a != 1", {"a": 1}, False),
    ("a > 1 && a < 5", {"a": 3}, True),
    ("a > 1 && a < 5", {"a": 5}, False),
    ("a < 1 || a >= 5", {"a": 5}, True),
    ("a & 4", {"a": 6}, True),
    ("a & 4", {"a": 2}, False),
    ("!(a == 1)", {"a": 2}, True),
    ('comm == "bash"', {"comm": "bash"}, True),
    ('comm ~ "ba*"', {"comm": "bash"}, True),
    ('comm ~ "*sh"', {"comm": "zsh"}, True),
    ('comm ~ "*as*"', {"comm": "bash"}, True),
    ('comm ~ "b?s[gh]"', {"comm": "bash"}, True),
    ('comm ~ "!ba*"', {"comm": "bash"}, False),  # filter_parse_regex: '!' inverts
    ('comm ~ "ba"', {"comm": "bash"}, False),
    ('comm != "bash"', {"comm": FAULT}, False),  # what could not be read matches nothing
    ("a == 1", {"a": FAULT}, False),
    ("a == 1", {"a": "1"}, False),
    ("a == 1", {"a": [1]}, False),
]


@pytest.mark.parametrize(
    ("text", "values", "expected"),
    FILTER_EVALUATIONS,
    ids=[f"{t}-{v}" for t, v, _ in FILTER_EVALUATIONS],
)
def test_evaluate_filter(text: str, values: dict[str, object], expected: bool) -> None:
    assert evaluate_filter(parse_filter(text), values) is expected  # type: ignore[arg-type]


def test_filter_constant_takes_the_field_type() -> None:
    # "(type)pred->val": 0xffffffff against an s32 field is -1.
    expr = parse_filter("n == 0xffffffff && u == 0x101", FIELDS)
    assert expr == And(Predicate("n", FilterOp.EQ, -1), Predicate("u", FilterOp.EQ, 1))
    assert evaluate_filter(expr, {"n": -1, "u": 1})


def test_filter_over_evaluated_arguments() -> None:
    args = compile_fetchargs(parse_ok("p vfs_read len=%ax:s32 name=+0(%si):string"))
    expr = parse_filter('len < 0 && name ~ "hel*"', [arg.filter_field for arg in args])
    assert evaluate_filter(expr, evaluate(args, memory()))
    with pytest.raises(ProbeError):
        evaluate_filter(parse_filter("missing == 1"), {})


GLOBS = [
    ("*.txt", "a.txt", True),
    ("*.txt", "a.txt1", False),
    ("*.txt*", "a.txt1", True),
    ("a*b*c", "axxbyyc", True),
    ("a*b*c", "axxbyy", False),
    ("*", "", True),
    ("?", "", False),
    ("?", "x", True),
    ("[a-c]x", "bx", True),
    ("[!a-c]x", "bx", False),
    ("[!a-c]x", "dx", True),
    ("[]]", "]", True),
    ("[a-]", "-", True),
    ("\\*", "*", True),
    ("\\*", "x", False),
    ("a[", "a[", True),
    ("a[b", "ab", False),
]


@pytest.mark.parametrize(
    ("pattern", "text", "expected"), GLOBS, ids=[f"{p}-{t}" for p, t, _ in GLOBS]
)
def test_glob_match(pattern: str, text: str, expected: bool) -> None:
    assert glob_match(pattern, text) is expected


def test_common_fields_are_known_to_every_event() -> None:
    """ftrace's generic and common fields (common_pid, comm/COMM, cpu/CPU)
    pass the field check and take their kinds; an event's own field of the
    same name shadows them."""
    args = compile_fetchargs(parse_ok("p vfs_read len=%ax:s32"))
    fields = [arg.filter_field for arg in args]
    expr = parse_filter('common_pid == 42 && COMM ~ "ca*" && CPU == 1 && len > 0', fields)
    values = {**common_values(42, "cat", 1), "len": 5}
    assert evaluate_filter(expr, values)
    assert not evaluate_filter(expr, {**common_values(43, "cat", 1), "len": 5})
    assert not evaluate_filter(parse_filter("common_pid == -1", fields),
                               common_values(7, "cat", 0))  # fmt: skip
    assert evaluate_filter(parse_filter('comm == "<...>"', fields), common_values(None, None, 0))
    with pytest.raises(ProbeSyntaxError):
        parse_filter("comm == 1", fields)  # comm is a string
    own = compile_fetchargs(parse_ok("p vfs_read comm=%ax:u32"))
    shadowed = parse_filter("comm == 3", [arg.filter_field for arg in own])
    assert evaluate_filter(shadowed, {**common_values(1, "cat", 0), "comm": 3})


def test_bare_retval_and_argn_stay_x64_before_btf_args() -> None:
    """A kernel before Linux 6.6 (the default guest's 6.1) types neither a bare
    ``$retval`` nor ``$argN`` from BTF: both are x64, named ``argN`` by
    position, and ``$retval`` on a void function is taken; BTF names and
    ``->`` still work (qprobes reads BTF itself)."""
    ctx = btf_memory()
    ctx.retval = 3
    ctx.entry_regs = {"rdi": 0x4000, "rdx": 9}
    spec = "r vfs_read $retval $arg3 count file->f_flags"
    args = compile_fetchargs(parse_ok(spec), SYMBOLS, FakeResolver(), btf_defaults=False)
    assert [f"{a.name}:{a.type.name}" for a in args] == [
        "arg1:x64", "arg2:x64", "count:u64", "arg4:u32",
    ]  # fmt: skip
    assert format_args(args, evaluate(args, ctx)) == "arg1=0x3 arg2=0x9 count=9 arg4=32770"
    (void,) = compile_fetchargs(parse_ok("r kfree $retval"), SYMBOLS, FakeResolver(),
                                btf_defaults=False)  # fmt: skip
    assert void.type.name == "x64"
