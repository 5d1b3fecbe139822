"""Event filters in ftrace's syntax, parsed to a tree and evaluated over a
dict of field values.

The language is ``Documentation/trace/events.rst`` section 5::

    field-name relational-operator value

joined with ``&&`` and ``||``, negated with ``!``, grouped with parentheses.
Numeric fields take ``== != < <= > >= &``, string fields ``== != ~`` (``~``
is a glob: ``*``, ``?``, ``[...]``); strings are quoted. Checks and messages
follow ``parse_pred`` and ``predicate_parse`` in ``kernel/trace/
trace_events_filter.c``; ``&&`` binds tighter than ``||``. Pure code.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from qprobes.errors import ProbeError, ProbeSyntaxError
from qprobes.tracing.fetch import FAULT, FilterField, Value
from qprobes.tracing.numbers import kstrtol, kstrtoul, to_signed, truncate

__all__ = [
    "MAX_FILTER_STR_VAL",
    "And",
    "FiltErr",
    "FilterExpr",
    "FilterOp",
    "Not",
    "Or",
    "Predicate",
    "evaluate_filter",
    "glob_match",
    "parse_filter",
]

MAX_FILTER_STR_VAL = 256  # kernel/trace/trace.h
# How deep a filter's tree may nest (a chain of N terms is N deep): qprobes
# evaluates and prints filters recursively.
MAX_FILTER_DEPTH = 100
_MAX_NUMBER_LEN = 23  # parse_pred's num_buf[24]: "0xfeedfacedeadbeef is 18 chars max"


class FilterOp(enum.StrEnum):
    EQ = "=="
    NE = "!="
    LE = "<="
    LT = "<"
    GE = ">="
    GT = ">"
    BAND = "&"
    GLOB = "~"


# Longest first, so "<=" is not read as "<".
_OPS = sorted(FilterOp, key=lambda op: -len(op.value))
_STRING_OPS = frozenset({FilterOp.EQ, FilterOp.NE, FilterOp.GLOB})


class FiltErr(enum.StrEnum):
    """``trace_events_filter.c``'s ``ERRORS`` texts (the ones a predicate can hit)."""

    INVALID_OP = "Invalid operator"
    TOO_MANY_OPEN = "Too many '('"
    TOO_MANY_CLOSE = "Too few '('"
    MISSING_QUOTE = "Missing matching quote"
    OPERAND_TOO_LONG = "Operand too long"
    EXPECT_STRING = "Expecting string field"
    EXPECT_DIGIT = "Expecting numeric field"
    ILLEGAL_FIELD_OP = "Illegal operation for field type"
    FIELD_NOT_FOUND = "Field not found"
    ILLEGAL_INTVAL = "Illegal integer value"
    TOO_MANY_PREDS = "Too many terms in predicate expression"
    INVALID_VALUE = "Invalid value (did you forget quotes)?"
    NO_FILTER = "No filter found"
    MISSING_FIELD = "Missing field name and/or value"  # older kernels' FILT_ERR_MISSING_FIELD
    # qprobes' own: Linux takes up to MAX_FILTER_PRED (16384) terms.
    TOO_DEEP = f"Filter nests more than {MAX_FILTER_DEPTH} deep (terms, '(' and '!')"


@dataclass(frozen=True)
class Predicate:
    """``field op value``; ``value`` is an int or a (unquoted) string."""

    field: str
    op: FilterOp
    value: int | str
    pos: int = dataclasses.field(default=0, compare=False, repr=False)

    def __str__(self) -> str:
        value = f'"{self.value}"' if isinstance(self.value, str) else str(self.value)
        return f"{self.field} {self.op} {value}"


@dataclass(frozen=True)
class Not:
    expr: FilterExpr

    def __str__(self) -> str:
        return f"!({self.expr})"


@dataclass(frozen=True)
class And:
    left: FilterExpr
    right: FilterExpr

    def __str__(self) -> str:
        return f"({self.left} && {self.right})"


@dataclass(frozen=True)
class Or:
    left: FilterExpr
    right: FilterExpr

    def __str__(self) -> str:
        return f"({self.left} || {self.right})"


FilterExpr = Predicate | Not | And | Or

_FIELD_NAME = re.compile(r"[A-Za-z0-9_]+")  # parse_pred: isalnum() or '_'
_NUMBER = re.compile(r"-?[A-Za-z0-9]*")  # "We allow 0xDEADBEEF"


@dataclass
class _Parser:
    text: str
    fields: Mapping[str, FilterField] | None
    i: int = 0
    nesting: int = 0  # open '(' and '!' around the current position

    def error(self, column: int, message: str) -> ProbeSyntaxError:
        return ProbeSyntaxError(self.text, column, message)

    def skip(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def parse(self) -> FilterExpr:
        self.skip()
        if self.i == len(self.text):
            raise self.error(0, FiltErr.NO_FILTER)
        expr, _depth = self.or_()
        self.skip()
        if self.i < len(self.text):
            if self.text[self.i] == ")":
                raise self.error(self.i, FiltErr.TOO_MANY_CLOSE)
            raise self.error(self.i, FiltErr.TOO_MANY_PREDS)
        return expr

    # Each method returns the expression and the depth of its tree, which
    # stays within MAX_FILTER_DEPTH: the evaluator and the printer recurse.

    def _nested(self, depth: int, pos: int) -> int:
        if depth > MAX_FILTER_DEPTH:
            raise self.error(pos, FiltErr.TOO_DEEP)
        return depth

    def or_(self) -> tuple[FilterExpr, int]:
        left, depth = self.and_()
        while True:
            pos = self.i
            if not self._take("||"):
                return left, depth
            right, rdepth = self.and_()
            left, depth = Or(left, right), self._nested(1 + max(depth, rdepth), pos)

    def and_(self) -> tuple[FilterExpr, int]:
        left, depth = self.unary()
        while True:
            pos = self.i
            if not self._take("&&"):
                return left, depth
            right, rdepth = self.unary()
            left, depth = And(left, right), self._nested(1 + max(depth, rdepth), pos)

    def _take(self, token: str) -> bool:
        self.skip()
        if self.text.startswith(token, self.i):
            self.i += len(token)
            return True
        return False

    def _enter(self, pos: int) -> None:
        self.nesting = self._nested(self.nesting + 1, pos)

    def unary(self) -> tuple[FilterExpr, int]:
        self.skip()
        # is_not(): "!=" and "!~" are not negations.
        after = self.text[self.i + 1 : self.i + 2]
        if self.text.startswith("!", self.i) and after not in ("=", "~"):
            pos = self.i
            self._enter(pos)
            self.i += 1
            inner, depth = self.unary()
            self.nesting -= 1
            return Not(inner), self._nested(depth + 1, pos)
        if self.text.startswith("(", self.i):
            opened = self.i
            self.i += 1
            self._enter(opened)
            expr, depth = self.or_()
            self.nesting -= 1
            if not self._take(")"):
                self.skip()
                if self.i < len(self.text):
                    raise self.error(self.i, FiltErr.TOO_MANY_PREDS)
                raise self.error(opened, FiltErr.TOO_MANY_OPEN)
            return expr, depth
        return self.predicate(), 0

    def predicate(self) -> Predicate:
        """parse_pred."""
        start = self.i
        m = _FIELD_NAME.match(self.text, self.i)
        if m is None:
            raise self.error(start, FiltErr.MISSING_FIELD)
        name = m.group()
        known = None
        if self.fields is not None:
            known = self.fields.get(name)
            if known is None:
                raise self.error(start, FiltErr.FIELD_NOT_FOUND)
        self.i = m.end()
        self.skip()
        op_pos = self.i
        op = next((op for op in _OPS if self.text.startswith(op.value, self.i)), None)
        if op is None or self.text.startswith(("&&", "||"), self.i):
            raise self.error(op_pos, FiltErr.INVALID_OP)
        self.i += len(op.value)
        self.skip()
        vpos = self.i
        c = self.text[vpos : vpos + 1]
        value: int | str
        if c in ("'", '"'):
            end = self.text.find(c, vpos + 1)
            if end < 0:
                raise self.error(vpos, FiltErr.MISSING_QUOTE)
            value = self.text[vpos + 1 : end]
            if op not in _STRING_OPS:
                raise self.error(vpos, FiltErr.ILLEGAL_FIELD_OP)
            if known is not None and (not known.is_string or known.is_array):
                raise self.error(vpos, FiltErr.EXPECT_DIGIT)
            if len(value) >= MAX_FILTER_STR_VAL:
                raise self.error(vpos, FiltErr.OPERAND_TOO_LONG)
            self.i = end + 1
        elif c.isdigit() or c == "-":
            m = _NUMBER.match(self.text, vpos)
            assert m is not None
            self.i = m.end()
            if known is not None and known.is_string:
                raise self.error(vpos, FiltErr.EXPECT_STRING)
            if op is FilterOp.GLOB or (known is not None and known.is_array):
                raise self.error(vpos, FiltErr.ILLEGAL_FIELD_OP)
            if len(m.group()) > _MAX_NUMBER_LEN:
                raise self.error(vpos, FiltErr.OPERAND_TOO_LONG)
            signed = known.signed if known is not None else c == "-"
            number = kstrtol(m.group()) if signed else kstrtoul(m.group())
            if number is None:
                raise self.error(vpos, FiltErr.ILLEGAL_INTVAL)
            if known is not None:
                # "(type)pred->val": the constant is cut to the field's type.
                cast = to_signed if known.signed else truncate
                number = cast(number, known.size)
            value = number
        else:
            raise self.error(vpos, FiltErr.INVALID_VALUE)
        return Predicate(name, op, value, start)


#: Fields every event has (``trace_events.c``: the generic ``CPU``/``cpu`` and
#: ``COMM``/``comm`` fields, and the common ``common_pid``). An event's own
#: field of the same name wins, as in ``trace_find_event_field``.
COMMON_FIELDS = (
    FilterField("common_pid", size=4, signed=True),
    FilterField("comm", is_string=True),
    FilterField("COMM", is_string=True),
    FilterField("cpu", size=4),
    FilterField("CPU", size=4),
)


def common_values(pid: int | None, comm: str | None, cpu: int) -> dict[str, Value]:
    """The values of :data:`COMMON_FIELDS` for one event (a task that cannot
    be read has pid -1 and comm ``"<...>"``, as ftrace prints it)."""
    name = comm if comm is not None else "<...>"
    return {"common_pid": -1 if pid is None else pid, "comm": name, "COMM": name,
            "cpu": cpu, "CPU": cpu}  # fmt: skip


def parse_filter(text: str, fields: Iterable[FilterField] | None = None) -> FilterExpr:
    """Parse a filter expression. With ``fields`` (e.g. each
    :attr:`CompiledArg.filter_field <qprobes.tracing.fetch.CompiledArg.filter_field>`),
    field names and value kinds are checked as Linux checks them against an
    event's format; without, any field name is taken. Raises
    :class:`~qprobes.errors.ProbeSyntaxError`."""
    known = None
    if fields is not None:
        known = {f.name: f for f in COMMON_FIELDS}
        known.update((f.name, f) for f in fields)
    return _Parser(text, known).parse()


def glob_match(pattern: str, text: str) -> bool:
    """``glob_match`` (``lib/glob.c``): ``?``, ``*``, ``[a-z]``/``[!a-z]`` and
    ``\\`` escapes; the whole of ``text`` must match. A ``[`` with no closing
    ``]`` matches itself."""
    p = i = 0
    back_p = back_i = -1
    while True:
        c = text[i] if i < len(text) else ""  # "" is the NUL
        d = pattern[p] if p < len(pattern) else ""
        i += 1
        p += 1
        if d == "?":
            if c == "":
                return False
            continue
        if d == "*":
            if p >= len(pattern):
                return True
            back_p, i = p, i - 1
            back_i = i
            continue
        literal = True
        matched = False
        if d == "[":
            if c == "":
                return False
            inverted = pattern[p : p + 1] == "!"
            k = p + inverted
            a = pattern[k : k + 1]
            k += 1
            in_class = False
            while a:
                b = a
                if pattern[k : k + 1] == "-" and pattern[k + 1 : k + 2] not in ("]", ""):
                    b = pattern[k + 1]
                    k += 2
                elif pattern[k : k + 1] == "-" and pattern[k + 1 : k + 2] == "":
                    break  # malformed: "[a-"
                in_class |= a <= c <= b
                a = pattern[k : k + 1]
                k += 1
                if a == "]":
                    literal = False
                    matched = in_class != inverted
                    if matched:
                        p = k
                    break
        elif d == "\\":
            d = pattern[p : p + 1]
            p += 1
        if literal:
            if c == d:
                if d == "":
                    return True
                continue
        elif matched:
            continue
        # Mismatch: retry from the last '*', one character further on.
        if c == "" or back_p < 0:
            return False
        p = back_p
        back_i += 1
        i = back_i


def _predicate(pred: Predicate, values: Mapping[str, Value]) -> bool:
    try:
        value = values[pred.field]
    except KeyError:
        raise ProbeError(f"the filter tests {pred.field!r}; the event has no such field") from None
    # A value that could not be read matches nothing (events.rst 5.2.1:
    # "the string compare will be treated as not matching"); nor do arrays.
    if value is FAULT or isinstance(value, list):
        return False
    if isinstance(pred.value, str):
        if not isinstance(value, str):
            return False
        if pred.op is FilterOp.EQ:
            return value == pred.value
        if pred.op is FilterOp.NE:
            return value != pred.value
        # filter_parse_regex: a leading '!' inverts the glob.
        pattern, invert = pred.value, False
        if pattern.startswith("!"):
            pattern, invert = pattern[1:], True
        return glob_match(pattern, value) != invert
    if not isinstance(value, int):
        return False
    want = pred.value
    match pred.op:
        case FilterOp.EQ:
            return value == want
        case FilterOp.NE:
            return value != want
        case FilterOp.LT:
            return value < want
        case FilterOp.LE:
            return value <= want
        case FilterOp.GT:
            return value > want
        case FilterOp.GE:
            return value >= want
        case FilterOp.BAND:
            return bool(value & want)
    return False


def evaluate_filter(expr: FilterExpr, values: Mapping[str, Value]) -> bool:
    """Whether an event with these field values passes the filter."""
    match expr:
        case Predicate():
            return _predicate(expr, values)
        case Not(inner):
            return not evaluate_filter(inner, values)
        case And(left, right):
            return evaluate_filter(left, values) and evaluate_filter(right, values)
        case Or(left, right):
            return evaluate_filter(left, values) or evaluate_filter(right, values)
    raise AssertionError(expr)  # pragma: no cover
