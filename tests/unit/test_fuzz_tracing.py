"""Fuzzing the tracing languages (hypothesis): ``kprobe_events``
definitions, event filters, hist and stacktrace triggers.

Each parser gives a value or a :class:`~qprobes.errors.ProbeSyntaxError`
whose ``spec`` is the text it was given and whose column lies inside it;
nothing else escapes. Definitions and filters round-trip through their
printed forms.
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from qprobes.errors import ProbeSyntaxError
from qprobes.tracing.ast import ProbeSpec, RemoveSpec
from qprobes.tracing.fetch import FilterField
from qprobes.tracing.filter import And, FilterExpr, FilterOp, Not, Or, Predicate, parse_filter
from qprobes.tracing.hist import HistSpec, StackTrigger, parse_hist, parse_stacktrace
from qprobes.tracing.numbers import kstrtol, kstrtoul, simple_strtoul
from qprobes.tracing.parser import is_good_name, parse_probe
from tests.unit.fuzzing import FUZZ, mutated_text

PROBES = [
    "p:myprobe do_sys_open dfd=%ax filename=%dx flags=%cx mode=+4($stack)",
    "r:myretprobe do_sys_open $retval",
    "p vfs_read+0x1a",
    "r vfs_read+0",
    "p vfs_read%return",
    "r100 vfs_read",
    "r0x10:ev vfs_read",
    "p ext4:ext4_file_open",
    "p foo.isra.0",
    "p 0xffffffff81000010",
    "p:grp/ vfs_read",
    "p:my-grp/ev vfs_read",
    "p f %ax %r8:s32 %rdi %flags @0x1000:x8[4] @jiffies+8:u64 @jiffies-8 $stack $stack3:x16",
    "p f +0(%di):string +8(+16(%si)):u32 -8(%sp) +u4(%si):ustring +u0(%si):string",
    "p vfs_read $arg1->f_path.dentry->d_name.name:string count pos=pos",
    "r vfs_read $retval->f_flags file->f_mode:u8 $arg*",
    'p:ev vfs_read a=+8(%di):u32 b=%di:b4@3/32 c=\\1 d=\\"str\\" e=$comm:string',
    "p^100 vfs_read",
    "-:ev",
    "-:grp/ev a=%di",
    "p vfs_read # comment",
]
PROBE_ALPHABET = "pr-:/+%$@()[]{}=\\\"',.*^#01289xabsdiu_ \t>-<"


def check_syntax_error(exc: ProbeSyntaxError, text: str) -> None:
    assert exc.spec == text
    assert 0 <= exc.column <= len(text)
    assert exc.message
    assert "\n" in exc.format_caret()


@FUZZ
@given(st.one_of(mutated_text(PROBES, PROBE_ALPHABET), st.text(PROBE_ALPHABET, max_size=40)))
@example("p f +0(")
@example("p f $stack99999999999999999999")
@example("p f @0x" + "f" * 40)
@example("p f +" + "9" * 5000 + "(%di)")
@example("p f a=%di:b99@99/32")
@example("r" + "9" * 5000 + " f")
@example("p f+" + "9" * 5000)
@example("p " + "9" * 5000)
@example("r vfs_read $arg*")
@example("p v$s_read+0x1a")
def test_definitions_parse_or_raise_naming_the_text(text: str) -> None:
    try:
        spec = parse_probe(text)
    except ProbeSyntaxError as exc:
        check_syntax_error(exc, text)
        return
    assert isinstance(spec, (ProbeSpec, RemoveSpec))
    if not is_good_name(spec.event):
        return  # a default name from an odd symbol ("v$s"): Linux keeps it too, unparseable
    again = parse_probe(spec.format())
    assert again == spec, (text, spec.format())


@FUZZ
@given(mutated_text(PROBES, PROBE_ALPHABET, max_edits=2))
def test_definitions_round_trip(text: str) -> None:
    try:
        spec = parse_probe(text)
    except ProbeSyntaxError:
        return
    if is_good_name(spec.event):
        assert parse_probe(spec.format()).format() == spec.format()


# --- filters ------------------------------------------------------------------

FILTERS = [
    "a == 1",
    "a==0x10",
    "a & 4",
    "a <= -1",
    'comm ~ "*sh"',
    "comm != 'bash'",
    "a == 1 || b == 2 && c == 3",
    '((sig >= 10 && sig < 15) || sig == 17) && comm != "bash"',
    "!(a == 1) && !b > 2",
    "common_pid == -1",
    "n == 0xffffffff && u == 0x101",
]
FILTER_ALPHABET = "abcnu_01x9 \t()!&|=<>~\"'*-"
FIELDS = [
    FilterField("a", size=4, signed=True),
    FilterField("b", size=1),
    FilterField("c"),
    FilterField("n", size=4),
    FilterField("u", size=2),
    FilterField("sig", size=4, signed=True),
    FilterField("s", is_string=True),
]


@FUZZ
@given(
    st.one_of(mutated_text(FILTERS, FILTER_ALPHABET), st.text(FILTER_ALPHABET, max_size=40)),
    st.booleans(),
)
@example("a == 0x" + "f" * 30, False)
@example("((((((((((((((((((((((((((((((((a == 1", False)
@example("(" * 5000 + "a == 1" + ")" * 5000, False)
@example("!" * 5000 + "a == 1", False)
@example("a == " + "9" * 5000, True)
@example("a == 1 && " * 200 + "a == 1", False)
def test_filters_parse_or_raise_naming_the_text(text: str, typed: bool) -> None:
    try:
        expr = parse_filter(text, FIELDS if typed else None)
    except ProbeSyntaxError as exc:
        check_syntax_error(exc, text)
        return
    assert parse_filter(str(expr), FIELDS if typed else None) == expr, (text, str(expr))


field_names = st.sampled_from(["a", "b", "c", "sig", "x_1", "comm"])
predicates = st.one_of(
    st.builds(
        Predicate,
        field_names,
        st.sampled_from([op for op in FilterOp if op is not FilterOp.GLOB]),
        st.integers(-(2**63), 2**64 - 1),
    ),
    st.builds(
        Predicate,
        field_names,
        st.sampled_from([FilterOp.EQ, FilterOp.NE, FilterOp.GLOB]),
        st.text("abcxyz*?. _-", max_size=12),
    ),
)
exprs: st.SearchStrategy[FilterExpr] = st.recursive(
    predicates,
    lambda inner: st.one_of(
        st.builds(Not, inner), st.builds(And, inner, inner), st.builds(Or, inner, inner)
    ),
    max_leaves=8,
)


@FUZZ
@given(exprs)
def test_filter_round_trip(expr: FilterExpr) -> None:
    assert parse_filter(str(expr)) == expr


# --- triggers -------------------------------------------------------------------

HISTS = [
    "hist:keys=common_pid.execname,path:vals=hitcount,flags:sort=hitcount.descending",
    "hist:keys=flags.hex:vals=hitcount",
    "hist:keys=dfd.log2",
    "hist:keys=x.buckets=4096",
    "hist:keys=cpu,x.sym-offset:vals=hitcount:sort=hitcount.descending:size=200",
    "hist:key=path:size=3000 if dfd < 0",
    "hist:keys=path,dfd:sort=path,dfd.descending",
    "hist:keys=stacktrace:vals=hitcount",
    "hist:keys=a.sym,b.syscall:vals=c:sort=c.ascending",
]
HIST_ALPHABET = "hist:keys=valsort,.=abcdxz0123489_ -if<>&|ascendingdescendinglog2buckets"
HIST_FIELDS = [
    FilterField("path", is_string=True),
    FilterField("dfd", size=4, signed=True),
    FilterField("flags", size=4),
    FilterField("x"),
    FilterField("a"),
    FilterField("b", size=4),
    FilterField("c"),
]


@FUZZ
@given(
    st.one_of(mutated_text(HISTS, HIST_ALPHABET), st.text(HIST_ALPHABET, max_size=40)),
    st.booleans(),
    st.booleans(),
)
@example("hist:keys=x.buckets=0", False, False)
@example("hist:keys=x.buckets=-1", False, False)
@example("hist:keys=x.buckets=" + "9" * 5000, False, False)
@example("hist:keys=x:size=0", False, False)
@example("hist:keys=x:size=" + "9" * 5000, False, False)
@example("hist:keys=x:sort=", False, False)
@example("hist:keys=x: if ", False, False)
@example("hist:keys=x:size= 8", False, False)
@example("hist:keys=x:size=1_0", False, False)
def test_hist_triggers_parse_or_raise_naming_the_text(
    text: str, typed: bool, stacktrace: bool
) -> None:
    try:
        spec = parse_hist(text, HIST_FIELDS if typed else None, stacktrace=stacktrace)
    except ProbeSyntaxError as exc:
        check_syntax_error(exc, text)
        return
    assert isinstance(spec, HistSpec)
    assert spec.keys
    for part in text.partition(" if ")[0].split(":"):
        if part.startswith("size="):
            assert kstrtoul(part[5:]) is not None, part


STACKS = ["stacktrace", "stacktrace:5", "stacktrace if dfd < 0", "stacktrace:1 if comm == 'sh'"]


@FUZZ
@given(st.one_of(mutated_text(STACKS, "stacktrace:0159 -if<>=&|'"), st.text(max_size=20)))
@example("stacktrace:" + "9" * 5000)
@example("stacktrace:0")
@example("stacktrace: 1")
@example("stacktrace:+1")
@example("stacktrace:1_0")
@example("stacktrace:\u0661")
def test_stacktrace_triggers_parse_or_raise_naming_the_text(text: str) -> None:
    try:
        trigger = parse_stacktrace(text)
    except ProbeSyntaxError as exc:
        check_syntax_error(exc, text)
        return
    assert isinstance(trigger, StackTrigger)
    assert trigger.count is None or trigger.count >= 1
    if trigger.count is not None:
        # kstrtoul(number, 0): an optional '+', then C digits; no spaces, '_' or other scripts.
        count_text = text.partition(" if ")[0].strip().partition(":")[2]
        assert count_text.lstrip("+").isascii() and count_text.strip() == count_text


def test_stacktrace_counts_are_c_numbers() -> None:
    assert parse_stacktrace("stacktrace:0x10").count == 16
    assert parse_stacktrace("stacktrace:010").count == 8
    assert parse_stacktrace("stacktrace:+3").count == 3


@FUZZ
@given(
    st.one_of(st.text("0123456789abcdefxX+-_ \n", max_size=30), st.text(max_size=10)),
    st.sampled_from([0, 8, 10, 16]),
)
@example("9" * 5000, 0)
@example("0x" + "f" * 5000, 0)
@example("0" * 5000 + "1", 10)
@example("\u0661", 10)
def test_kernel_numbers_are_ints_or_none(text: str, base: int) -> None:
    value = kstrtoul(text, base)
    assert value is None or 0 <= value < 2**64
    signed = kstrtol(text, base)
    assert signed is None or -(2**63) <= signed < 2**63
    if value is not None:
        assert text.isascii()
        body = text.removesuffix("\n").lstrip("+")
        assert body.strip() == body and "_" not in body and "-" not in body
    number, end = simple_strtoul(text, base)
    assert 0 <= end <= len(text) and number >= 0
