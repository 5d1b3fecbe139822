"""Histograms by key, as ftrace's ``hist`` trigger computes and prints them.

``hist:keys=KEY[.MOD][,...][:vals=VAL[.hex][,...]][:sort=FIELD[.descending][,...]]
[:size=N] [if FILTER]`` (``Documentation/trace/histogram.rst``), computed on
the host from the events a :class:`~qprobes.tracing.tracer.Tracer` records.
What is mirrored from ``kernel/trace/trace_events_hist.c`` and
``tracing_map.c``:

- the limits: 3 keys, 3 values besides ``hitcount``, 2 sort fields, a map of
  ``size`` entries (rounded up to a power of two, 128 to 131072; 2048 by
  default) past which new keys are dropped and counted;
- the key modifiers ``.hex``, ``.sym``, ``.sym-offset``, ``.execname`` (on
  ``common_pid``), ``.syscall``, ``.log2``, ``.buckets=N``, and ``.hex`` on
  values; ``stacktrace`` as a key when the session can unwind stacks;
- values as ``u64``: a signed field is sign-extended, as the kernel's
  ``hist_field_s32`` and friends do, so ``-100`` prints as
  ``18446744073709551516`` and its ``.log2`` is ``2^64``;
- the ``hist`` file's text: the header with the trigger's own description,
  one ``{ key: ... } hitcount: N`` line per entry in the kernel's widths, the
  totals.

The kernel leaves the order of entries whose sort fields tie to its sort;
here they tie-break by key, so the output is stable. As in the kernel, a
trigger sees every hit of its event, whatever the event's own filter says;
the trigger's ``if FILTER`` chooses what it counts.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qprobes.errors import ProbeSyntaxError
from qprobes.tracing.events import TraceEvent
from qprobes.tracing.fetch import FAULT, FilterField, Value
from qprobes.tracing.filter import COMMON_FIELDS, FilterExpr, evaluate_filter, parse_filter
from qprobes.tracing.numbers import kstrtoul

#: tracing_map.h: TRACING_MAP_KEYS_MAX, TRACING_MAP_VALS_MAX (hitcount is one).
KEYS_MAX = 3
VALS_MAX = 3
#: trace_events_hist.c: "Too many sort fields (Max = 2)".
SORT_KEYS_MAX = 2
#: TRACING_MAP_BITS_DEFAULT, _MIN, _MAX.
MAP_BITS_DEFAULT = 11
MAP_BITS_MIN = 7
MAP_BITS_MAX = 17
#: HIST_STACKTRACE_DEPTH: frames kept in a stacktrace key.
STACKTRACE_DEPTH = 16

_U64 = (1 << 64) - 1


class KeyMod(enum.Enum):
    """A key's modifier (``hist_field_flags``) and how it prints."""

    NONE = ""
    HEX = "hex"
    SYM = "sym"
    SYM_OFFSET = "sym-offset"
    EXECNAME = "execname"
    SYSCALL = "syscall"
    LOG2 = "log2"
    BUCKETS = "buckets"


@dataclass(frozen=True)
class HistKey:
    name: str
    mod: KeyMod = KeyMod.NONE
    buckets: int = 0
    is_string: bool = False

    def describe(self) -> str:
        """``hist_field_print``: the name and its modifier."""
        if self.name == "stacktrace":
            return "stacktrace"
        if self.mod is KeyMod.BUCKETS:
            return f"{self.name}.buckets={self.buckets}"
        return f"{self.name}.{self.mod.value}" if self.mod is not KeyMod.NONE else self.name


@dataclass(frozen=True)
class HistVal:
    name: str
    hex: bool = False

    def describe(self) -> str:
        return f"{self.name}.hex" if self.hex else self.name


@dataclass(frozen=True)
class SortKey:
    name: str  # "hitcount", a key's or a value's name
    descending: bool = False


@dataclass(frozen=True)
class HistSpec:
    """A parsed ``hist:`` trigger."""

    text: str
    keys: tuple[HistKey, ...]
    vals: tuple[HistVal, ...]  # besides hitcount
    sort: tuple[SortKey, ...]
    map_bits: int = MAP_BITS_DEFAULT
    filter_text: str | None = None
    filter: FilterExpr | None = None

    @property
    def size(self) -> int:
        return 1 << self.map_bits

    def describe(self) -> str:
        """The trigger as the ``trigger`` file and the hist header print it
        (``event_hist_trigger_print``)."""
        keys = ",".join(k.describe() for k in self.keys)
        vals = ",".join(["hitcount", *(v.describe() for v in self.vals)])
        sort = ",".join(
            self._sort_name(s) + (".descending" if s.descending else "") for s in self.sort
        )
        text = f"hist:keys={keys}:vals={vals}:sort={sort}:size={self.size}"
        if self.filter_text:
            text += f" if {self.filter_text}"
        return text

    def _sort_name(self, sort: SortKey) -> str:
        for key in self.keys:
            if key.name == sort.name:
                return key.describe()
        for val in self.vals:
            if val.name == sort.name:
                return val.describe()
        return sort.name


def _error(text: str, at: str, message: str) -> ProbeSyntaxError:
    column = text.find(at) if at else 0
    return ProbeSyntaxError(text, column if column >= 0 else 0, message)


def _fields_by_name(fields: Iterable[FilterField] | None) -> dict[str, FilterField] | None:
    if fields is None:
        return None
    known = {f.name: f for f in COMMON_FIELDS}
    known["common_cpu"] = FilterField("common_cpu", size=4)
    known.update((f.name, f) for f in fields)
    return known


def _map_bits(text: str, value: str) -> int:
    size = kstrtoul(value)  # parse_map_size
    if size is None:
        raise _error(text, "size=", f"size={value} is not a number")
    if size < 1:
        raise _error(text, "size=", f"size={value} is not a positive number")
    bits = max(0, (size - 1).bit_length())  # ilog2(roundup_pow_of_two(size))
    if not MAP_BITS_MIN <= bits <= MAP_BITS_MAX:
        raise _error(
            text,
            "size=",
            f"size={value}: the map holds {1 << MAP_BITS_MIN} to {1 << MAP_BITS_MAX} entries",
        )
    return bits


def parse_hist(
    text: str,
    fields: Iterable[FilterField] | None = None,
    *,
    stacktrace: bool = False,
) -> HistSpec:
    """Parse a ``hist:...`` trigger. With ``fields`` (the event's, e.g. each
    :attr:`CompiledArg.filter_field <qprobes.tracing.fetch.CompiledArg.filter_field>`),
    names and modifiers are checked against them; ``stacktrace`` says whether
    the session can give stack traces for a ``stacktrace`` key. Raises
    :class:`~qprobes.errors.ProbeSyntaxError` in the kernel's words."""
    body, sep, filter_text = text.partition(" if ")
    body = body.strip()
    if not body.startswith("hist"):
        raise _error(text, "", "not a hist trigger (hist:keys=...)")
    parts = body.split(":")
    if parts[0] != "hist":
        raise _error(text, "", "not a hist trigger (hist:keys=...)")
    known = _fields_by_name(fields)
    keys_str = vals_str = sort_str = None
    map_bits = MAP_BITS_DEFAULT
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if name in ("keys", "key") and eq:
            keys_str = value
        elif name in ("vals", "values", "val") and eq:
            vals_str = value
        elif name == "sort" and eq:
            sort_str = value
        elif name == "size" and eq:
            map_bits = _map_bits(text, value)
        elif name in ("pause", "cont", "continue", "clear", "name") or name.startswith("on"):
            raise _error(text, part, f"{name!r} is not supported in qprobes' hist triggers")
        elif not part:
            raise _error(text, "::", "Empty assignment")
        else:
            raise _error(text, part, f"unknown hist trigger attribute {part!r}")
    if not keys_str:
        raise _error(text, "", "a hist trigger needs keys=")
    keys = tuple(_parse_key(text, k, known, stacktrace) for k in keys_str.split(","))
    if len(keys) > KEYS_MAX:
        raise _error(text, keys_str, f"Too many keys (Max = {KEYS_MAX})")
    vals: tuple[HistVal, ...] = ()
    if vals_str:
        vals = tuple(
            v for v in (_parse_val(text, item, known) for item in vals_str.split(",")) if v
        )
        if len(vals) > VALS_MAX:
            raise _error(text, vals_str, f"Too many values (Max = {VALS_MAX})")
    sort: tuple[SortKey, ...] = (SortKey("hitcount"),)
    if sort_str:
        sort = tuple(_parse_sort(text, item, keys, vals) for item in sort_str.split(","))
        if len(sort) > SORT_KEYS_MAX:
            raise _error(text, sort_str, f"Too many sort fields (Max = {SORT_KEYS_MAX})")
    filt = None
    filter_text = filter_text.strip() if sep else ""
    if sep:
        if not filter_text:
            raise _error(text, " if ", "an empty filter after 'if'")
        filt = _parse_trigger_filter(text, filter_text, fields)
    return HistSpec(body, keys, vals, sort, map_bits, filter_text or None, filt)


def _parse_trigger_filter(
    text: str, filter_text: str, fields: Iterable[FilterField] | None
) -> FilterExpr:
    """The filter after a trigger's ``if``; an error in it names the whole
    trigger, with its column in the trigger's text."""
    try:
        return parse_filter(filter_text, fields)
    except ProbeSyntaxError as exc:
        start = text.find(filter_text, text.find(" if ") + 4)
        raise ProbeSyntaxError(text, start + exc.column, exc.message) from None


def _parse_key(
    text: str, item: str, known: Mapping[str, FilterField] | None, stacktrace: bool
) -> HistKey:
    if not item:
        raise _error(text, "keys=", "Empty key")
    if item in ("stacktrace", "common_stacktrace"):
        if not stacktrace:
            raise _error(
                text,
                item,
                "stacktrace keys need kernel stack traces, which this session cannot take",
            )
        return HistKey("stacktrace")
    name, dot, mod_text = item.partition(".")
    if name in ("stacktrace", "common_stacktrace"):
        raise _error(text, item, "Invalid field modifier")
    if name == "cpu":
        name = "common_cpu"
    info = _field(text, name, known)
    is_string = info.is_string if info is not None else False
    if info is not None and info.is_array:
        raise _error(text, item, f"{name} is an array: it cannot be a hist key")
    if not dot:
        return HistKey(name, is_string=is_string)
    mod_name, eq, number = mod_text.partition("=")
    try:
        mod = KeyMod(mod_name)
    except ValueError:
        raise _error(text, item, "Invalid field modifier") from None
    if mod is KeyMod.NONE or is_string:
        raise _error(text, item, "Invalid field modifier")
    if mod is KeyMod.EXECNAME and name != "common_pid":
        raise _error(text, item, "Invalid field modifier: .execname is for common_pid")
    buckets = 0
    if mod is KeyMod.BUCKETS:
        buckets = (kstrtoul(number) or 0) if eq else 0
        if buckets < 2:
            raise _error(text, item, "Invalid field modifier: .buckets=N wants N of 2 or more")
    elif eq:
        raise _error(text, item, "Invalid field modifier")
    return HistKey(name, mod, buckets)


def _parse_val(text: str, item: str, known: Mapping[str, FilterField] | None) -> HistVal | None:
    if not item:
        raise _error(text, "vals=", "Empty value")
    name, dot, mod = item.partition(".")
    if name == "hitcount":
        if dot:
            raise _error(text, item, "Invalid field modifier")
        return None
    if dot and mod != "hex":
        raise _error(text, item, "Invalid field modifier")
    info = _field(text, name, known)
    if info is not None and (info.is_string or info.is_array):
        raise _error(text, item, f"{name} is not a number: it cannot be a hist value")
    return HistVal(name, hex=bool(dot))


def _parse_sort(text: str, item: str, keys: Sequence[HistKey], vals: Sequence[HistVal]) -> SortKey:
    name, dot, order = item.partition(".")
    if not name:
        raise _error(text, "sort=", "Empty sort field")
    if dot and order not in ("descending", "ascending"):
        raise _error(text, item, "Invalid sort modifier")
    if name == "cpu":
        name = "common_cpu"
    if name != "hitcount" and name not in {k.name for k in keys} | {v.name for v in vals}:
        raise _error(text, item, "Sort field must be a key or a val")
    return SortKey(name, order == "descending")


def _field(text: str, name: str, known: Mapping[str, FilterField] | None) -> FilterField | None:
    if known is None:
        return None
    info = known.get(name)
    if info is None:
        raise _error(text, name, f"Couldn't find field {name!r}")
    return info


@dataclass
class StackTrigger:
    """ftrace's ``stacktrace[:COUNT] [if FILTER]`` trigger: the events it
    fires on print the kernel stack; ``count`` (None: no limit) counts down."""

    text: str
    count: int | None = None
    filter: FilterExpr | None = None

    def fires(self, values: Mapping[str, Value]) -> bool:
        if self.filter is not None and not evaluate_filter(self.filter, dict(values)):
            return False
        if self.count is not None:
            if self.count <= 0:
                return False
            self.count -= 1
        return True


def parse_stacktrace(text: str, fields: Iterable[FilterField] | None = None) -> StackTrigger:
    """Parse ``stacktrace[:COUNT] [if FILTER]`` (``event_trigger_parse``)."""
    body, sep, filter_text = text.partition(" if ")
    name, colon, count_text = body.strip().partition(":")
    if name != "stacktrace":
        raise _error(text, "", "not a stacktrace trigger")
    count = None
    if colon:
        count = kstrtoul(count_text)  # event_trigger_parse_num
        if count is None:
            raise _error(text, count_text, f"stacktrace:{count_text}: not a count")
        if count < 1:
            raise _error(text, count_text, "stacktrace:COUNT wants a positive count")
    filt = None
    if sep:
        if not filter_text.strip():
            raise _error(text, " if ", "an empty filter after 'if'")
        filt = _parse_trigger_filter(text, filter_text.strip(), fields)
    return StackTrigger(text.strip(), count, filt)


def log2_bucket(value: int) -> int:
    """``ilog2(roundup_pow_of_two(val))`` as the 6.1 kernel computes it for
    a u64: ``fls64(val - 1)`` (so 0 and anything above 2^63 land in 2^64)."""
    return ((value - 1) & _U64).bit_length()


@dataclass
class HistEntry:
    """One key's sums: ``hitcount`` and each value."""

    key: tuple[Any, ...]
    hitcount: int = 0
    sums: list[int] = field(default_factory=list)
    comm: str | None = None  # .execname: the comm of the key's first hit


#: Symbolizes an address: ``(name, offset, size, module)`` or None.
Resolver = Callable[[int], "tuple[str, int, int, str | None] | None"]


class Histogram:
    """The state of one hist trigger: entries by key, hits and drops.

    ``hist[key]`` is the hitcount of ``key``: a tuple of the key fields'
    values in order (or the value alone for a one-key histogram), as the
    entries were keyed (after ``.log2``/``.buckets``; ``.execname`` keys are
    pids, ``.sym`` keys addresses). :meth:`get` gives the whole entry.
    """

    def __init__(
        self,
        event: str,
        spec: HistSpec,
        *,
        resolve: Resolver | None = None,
        syscall_name: Callable[[int], str | None] | None = None,
        stack: Callable[[TraceEvent], Sequence[int]] | None = None,
    ) -> None:
        self.event = event
        self.spec = spec
        self.resolve = resolve
        self.syscall_name = syscall_name
        self.stack = stack
        self.entries: dict[tuple[Any, ...], HistEntry] = {}
        self.hits = 0
        self.dropped = 0

    @property
    def wants_stack(self) -> bool:
        return any(k.name == "stacktrace" for k in self.spec.keys)

    # -- counting ---------------------------------------------------------

    def update(self, event: TraceEvent, values: Mapping[str, Value] | None = None) -> None:
        """Count one hit. ``values`` are the fields the trigger's filter and
        keys see (the event's fields plus the common ones); by default they
        are taken from ``event``."""
        fields = values if values is not None else event_values(event)
        if self.spec.filter is not None and not evaluate_filter(self.spec.filter, dict(fields)):
            return
        key = tuple(self._key_value(k, fields, event) for k in self.spec.keys)
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.spec.size:
                self.dropped += 1
                return
            entry = HistEntry(key, sums=[0] * len(self.spec.vals))
            if any(k.mod is KeyMod.EXECNAME for k in self.spec.keys):
                entry.comm = event.comm
            self.entries[key] = entry
        self.hits += 1
        entry.hitcount += 1
        for i, val in enumerate(self.spec.vals):
            entry.sums[i] = (entry.sums[i] + _number(fields.get(val.name))) & _U64

    def _key_value(self, key: HistKey, fields: Mapping[str, Value], event: TraceEvent) -> Any:
        if key.name == "stacktrace":
            frames = tuple(self.stack(event)) if self.stack is not None else ()
            return frames[:STACKTRACE_DEPTH]
        raw = fields.get(key.name)
        if key.is_string or isinstance(raw, str):
            return "" if raw is FAULT or raw is None else str(raw)
        value = _number(raw)
        if key.mod is KeyMod.LOG2:
            return log2_bucket(value)
        if key.mod is KeyMod.BUCKETS:
            return value // key.buckets * key.buckets
        return value

    # -- reading ----------------------------------------------------------

    def _lookup(self, key: Any) -> HistEntry | None:
        if not isinstance(key, tuple):
            key = (key,)
        normalized = tuple(
            (k & _U64) if isinstance(k, int) and not isinstance(k, bool) else k for k in key
        )
        return self.entries.get(normalized)

    def __getitem__(self, key: Any) -> int:
        entry = self._lookup(key)
        if entry is None:
            raise KeyError(key)
        return entry.hitcount

    def __contains__(self, key: object) -> bool:
        return self._lookup(key) is not None

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.entries)

    def get(self, key: Any) -> HistEntry | None:
        return self._lookup(key)

    def counts(self) -> dict[Any, int]:
        """Hitcount by key (one-key histograms keyed by the value alone)."""
        single = len(self.spec.keys) == 1
        return {(k[0] if single else k): e.hitcount for k, e in self.entries.items()}

    def sorted_entries(self) -> list[HistEntry]:
        """Entries in the trigger's sort order (ties broken by key)."""
        rows = sorted(self.entries.values(), key=lambda e: _tiebreak(e.key))
        for sort in reversed(self.spec.sort):
            rows.sort(key=self._sort_value(sort), reverse=sort.descending)
        return rows

    def _sort_value(self, sort: SortKey) -> Callable[[HistEntry], Any]:
        if sort.name == "hitcount":
            return lambda e: e.hitcount
        for i, val in enumerate(self.spec.vals):
            if val.name == sort.name:
                return lambda e, i=i: e.sums[i]  # type: ignore[misc]
        for i, key in enumerate(self.spec.keys):
            if key.name == sort.name:
                return lambda e, i=i: _tiebreak((e.key[i],))  # type: ignore[misc]
        raise AssertionError(sort)

    # -- printing ---------------------------------------------------------

    def format(self) -> str:
        """The event's ``hist`` file for this trigger."""
        lines = [
            "# event histogram",
            "#",
            f"# trigger info: {self.spec.describe()} [active]",
            "#",
            "",
        ]
        rows = self.sorted_entries()
        for entry in rows:
            lines.append(self._format_entry(entry))
        lines += [
            "",
            "Totals:",
            f"    Hits: {self.hits}",
            f"    Entries: {len(rows)}",
            f"    Dropped: {self.dropped}",
        ]
        return "\n".join(lines) + "\n"

    def _format_entry(self, entry: HistEntry) -> str:
        parts = []
        multiline = False
        for key, value in zip(self.spec.keys, entry.key, strict=True):
            if key.name == "stacktrace":
                multiline = True
                frames = "".join(f"{' ' * 9}{self._symbol(a, True)}\n" for a in value if a)
                parts.append(f"stacktrace:\n{frames}")
            else:
                parts.append(self._format_key(key, value, entry))
        text = "{ " + ", ".join(parts) + ("" if multiline else " ") + "}"
        text += f" hitcount: {entry.hitcount:10d}"
        for val, total in zip(self.spec.vals, entry.sums, strict=True):
            text += f"  {val.name}: {total:10x}" if val.hex else f"  {val.name}: {total:10d}"
        return text

    def _format_key(self, key: HistKey, value: Any, entry: HistEntry) -> str:
        name = key.name
        if key.is_string or isinstance(value, str):
            return f"{name}: {value:<50}"
        if key.mod is KeyMod.HEX:
            return f"{name}: {value:x}"
        if key.mod is KeyMod.SYM:
            return f"{name}: [{value:x}] {self._symbol(value, False):<45}"
        if key.mod is KeyMod.SYM_OFFSET:
            return f"{name}: [{value:x}] {self._symbol(value, True):<55}"
        if key.mod is KeyMod.EXECNAME:
            comm = entry.comm if entry.comm is not None else "<...>"
            return f"{name}: {comm:<16}[{value:10d}]"
        if key.mod is KeyMod.SYSCALL:
            found = self.syscall_name(value) if self.syscall_name is not None else None
            return f"{name}: {found or 'unknown_syscall':<30}[{value:3d}]"
        if key.mod is KeyMod.LOG2:
            return f"{name}: ~ 2^{value:<2d}"
        if key.mod is KeyMod.BUCKETS:
            return f"{name}: ~ {value}-{value + key.buckets - 1}"
        return f"{name}: {value:10d}"

    def _symbol(self, addr: int, offset: bool) -> str:
        """``sprint_symbol`` (``%pS``: ``name+0xoff/0xsize [mod]``) or
        ``sprint_symbol_no_offset``; an address kallsyms does not know
        prints as ``0x...``."""
        found = self.resolve(addr) if self.resolve is not None else None
        if found is None:
            return f"{addr:#x}"
        name, off, size, module = found
        text = f"{name}+{off:#x}/{size:#x}" if offset else name
        return f"{text} [{module}]" if module else text

    def as_json(self) -> dict[str, Any]:
        """The histogram as plain data, entries in sort order."""
        rows = []
        for entry in self.sorted_entries():
            key: dict[str, Any] = {}
            for spec_key, value in zip(self.spec.keys, entry.key, strict=True):
                if spec_key.name == "stacktrace":
                    key["stacktrace"] = [self._symbol(a, True) for a in value if a]
                    continue
                key[spec_key.name] = value
                if spec_key.mod is KeyMod.EXECNAME:
                    key["comm"] = entry.comm
                elif spec_key.mod in (KeyMod.SYM, KeyMod.SYM_OFFSET):
                    key[f"{spec_key.name}_sym"] = self._symbol(
                        value, spec_key.mod is KeyMod.SYM_OFFSET
                    )
                elif spec_key.mod is KeyMod.SYSCALL and self.syscall_name is not None:
                    key[f"{spec_key.name}_syscall"] = self.syscall_name(value)
            vals = {v.name: s for v, s in zip(self.spec.vals, entry.sums, strict=True)}
            rows.append({"key": key, "hitcount": entry.hitcount, **vals})
        return {
            "event": self.event,
            "trigger": self.spec.describe(),
            "entries": rows,
            "totals": {"hits": self.hits, "entries": len(rows), "dropped": self.dropped},
        }

    def log2_chart(self) -> str | None:
        """A bpftrace-style bar chart when the histogram has one ``.log2``
        key (``@: [lo, hi) count |@@@@|``), else None."""
        if len(self.spec.keys) != 1 or self.spec.keys[0].mod is not KeyMod.LOG2:
            return None
        counts = {e.key[0]: e.hitcount for e in self.entries.values()}
        if not counts:
            return None
        top = max(counts.values())
        width = 52
        lines = [f"@{self.spec.keys[0].name}:"]
        for power in range(min(counts), max(counts) + 1):
            n = counts.get(power, 0)
            bar = "@" * (math.ceil(n * width / top) if n else 0)
            lines.append(f"{_log2_label(power):<20} {n:8d} |{bar:<{width}}|")
        return "\n".join(lines) + "\n"


def _log2_label(power: int) -> str:
    """The values a ``.log2`` bucket holds: ``2^k`` holds (2^(k-1), 2^k];
    ``2^0`` holds 1; ``2^64`` holds 0 and everything above 2^63."""
    if power == 0:
        return "[1]"
    if power >= 64:
        return "0 or (8E, 16E)"
    return f"({_human(1 << (power - 1))}, {_human(1 << power)}]"


def _human(value: int) -> str:
    for unit, shift in (("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value >> shift}{unit}"
    return str(value)


def _number(value: Value | None) -> int:
    if value is None or value is FAULT or isinstance(value, str):
        return 0
    if isinstance(value, (list, tuple)):
        return 0
    return int(value) & _U64


def _tiebreak(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((0, k) if isinstance(k, int) else (1, str(k)) for k in key)


def event_values(event: TraceEvent) -> dict[str, Value]:
    """The fields a trigger sees for ``event``: its own and the common ones."""
    from qprobes.tracing.filter import common_values

    values: dict[str, Value] = dict(common_values(event.pid, event.comm, event.cpu))
    values["common_cpu"] = event.cpu
    values.update(event.fields)
    return values
