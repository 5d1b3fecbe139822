"""What :func:`~qprobes.tracing.parser.parse_probe` returns: plain frozen data.

Positions (``pos``) are 0-based columns in the definition text; they are
left out of comparisons so tests can write expected trees without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qprobes.tracing.types import Bitfield

__all__ = [
    "AllArgs",
    "Arg",
    "BtfVar",
    "Comm",
    "Deref",
    "FetchArg",
    "ImmString",
    "Immediate",
    "MemberAccess",
    "Memory",
    "ProbeArg",
    "ProbeSpec",
    "Register",
    "RemoveSpec",
    "Retval",
    "StackEntry",
    "StackPointer",
    "SymbolRef",
    "TypeSpec",
]


def _pos() -> int:
    return field(default=0, compare=False, repr=False)


# --- FETCHARG ------------------------------------------------------------------


@dataclass(frozen=True)
class Register:
    """``%REG``; ``name`` is the kernel's name (``ax``, ``r8``, ``ip``, ``flags``, ``orig_ax``)."""

    name: str
    pos: int = _pos()

    def __str__(self) -> str:
        return f"%{self.name}"


@dataclass(frozen=True)
class Memory:
    """``@ADDR``: memory at an absolute kernel address."""

    addr: int
    pos: int = _pos()

    def __str__(self) -> str:
        return f"@{self.addr:#x}"


@dataclass(frozen=True)
class SymbolRef:
    """``@SYM[+|-offs]``: memory at a data symbol plus an offset."""

    symbol: str
    offset: int = 0
    pos: int = _pos()

    def __str__(self) -> str:
        if self.offset:
            return f"@{self.symbol}{self.offset:+d}"
        return f"@{self.symbol}"


@dataclass(frozen=True)
class StackEntry:
    """``$stackN``: the Nth word on the kernel stack (N >= 0)."""

    n: int
    pos: int = _pos()

    def __str__(self) -> str:
        return f"$stack{self.n}"


@dataclass(frozen=True)
class StackPointer:
    """``$stack``: the stack address."""

    pos: int = _pos()

    def __str__(self) -> str:
        return "$stack"


@dataclass(frozen=True)
class Retval:
    """``$retval`` (return probes only)."""

    pos: int = _pos()

    def __str__(self) -> str:
        return "$retval"


@dataclass(frozen=True)
class Comm:
    """``$comm``: the current task's name."""

    pos: int = _pos()

    def __str__(self) -> str:
        return "$comm"


@dataclass(frozen=True)
class Arg:
    """``$argN``: the Nth (1-based) function argument."""

    n: int
    pos: int = _pos()

    def __str__(self) -> str:
        return f"$arg{self.n}"


@dataclass(frozen=True)
class AllArgs:
    """``$arg*``: every parameter of the function, expanded when compiled with types."""

    pos: int = _pos()

    def __str__(self) -> str:
        return "$arg*"


@dataclass(frozen=True)
class Immediate:
    """``\\IMM``: a constant."""

    value: int
    pos: int = _pos()

    def __str__(self) -> str:
        return f"\\{self.value}"


@dataclass(frozen=True)
class ImmString:
    """``\\"STR"``: a constant string."""

    value: str
    pos: int = _pos()

    def __str__(self) -> str:
        return f'\\"{self.value}"'


@dataclass(frozen=True)
class BtfVar:
    """A function parameter by name (BTF-style), e.g. ``count``."""

    name: str
    pos: int = _pos()

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Deref:
    """``+|-[u]OFFS(FETCHARG)``: memory at FETCHARG's value plus OFFS; ``user``
    for the ``u`` (user-space) form."""

    offset: int
    base: FetchArg
    user: bool = False
    pos: int = _pos()

    def __str__(self) -> str:
        sign = "-" if self.offset < 0 else "+"
        return f"{sign}{'u' if self.user else ''}{abs(self.offset)}({self.base})"


@dataclass(frozen=True)
class MemberAccess:
    """``BASE->a.b->c``: each element of ``chain`` is the dot-connected path
    followed after one ``->``; resolved through a TypeResolver when compiled.
    ``field_pos`` has the column of each chain element."""

    base: FetchArg
    chain: tuple[tuple[str, ...], ...]
    pos: int = _pos()
    field_pos: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def __str__(self) -> str:
        return str(self.base) + "".join("->" + ".".join(path) for path in self.chain)


FetchArg = (
    Register
    | Memory
    | SymbolRef
    | StackEntry
    | StackPointer
    | Retval
    | Comm
    | Arg
    | AllArgs
    | Immediate
    | ImmString
    | BtfVar
    | Deref
    | MemberAccess
)


# --- arguments and definitions --------------------------------------------------


@dataclass(frozen=True)
class TypeSpec:
    """``:TYPE`` as written: ``name`` is None when no type was given (the
    compiler picks the default), ``count`` is the ``[N]`` of an array (0 for
    none), ``bitfield`` is set for ``b<w>@<o>/<c>`` (``name`` is then the
    container's ``uN``)."""

    name: str | None = None
    count: int = 0
    bitfield: Bitfield | None = None
    pos: int = _pos()

    def __str__(self) -> str:
        base = str(self.bitfield) if self.bitfield else (self.name or "")
        return base + (f"[{self.count}]" if self.count else "")


@dataclass(frozen=True)
class ProbeArg:
    """One ``[NAME=]FETCHARG[:TYPE]``. ``name`` is the given name or the one
    Linux would generate (``argN``, or a bare parameter name); ``text`` is
    the part after ``NAME=``."""

    name: str
    fetch: FetchArg
    type: TypeSpec = TypeSpec()
    text: str = field(default="", compare=False)
    pos: int = _pos()
    named: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        if isinstance(self.fetch, AllArgs):
            return self.text  # "$arg*" takes no name (it becomes one argument per parameter)
        return f"{self.name}={self.text}"


@dataclass(frozen=True)
class ProbeSpec:
    """A parsed ``p``/``r`` definition.

    Either ``symbol`` (with ``module`` and ``offset``) or ``address`` is set.
    ``maxactive`` is 0 for the default.
    """

    is_return: bool
    group: str
    event: str
    symbol: str | None = None
    offset: int = 0
    address: int | None = None
    module: str | None = None
    maxactive: int = 0
    args: tuple[ProbeArg, ...] = ()
    text: str = field(default="", compare=False)
    symbol_pos: int = _pos()

    @property
    def is_function_entry(self) -> bool:
        """On a function entry (``SYM`` or ``SYM+0``), where ``$argN`` may be used."""
        return not self.is_return and self.symbol is not None and self.offset == 0

    @property
    def location(self) -> str:
        """``[MOD:]SYM[+offs]`` or the address, as ``kprobe_events`` lists it."""
        if self.symbol is None:
            return f"0x{self.address or 0:016x}"
        sym = f"{self.module}:{self.symbol}" if self.module else self.symbol
        return f"{sym}+{self.offset}" if self.offset else sym

    def format(self) -> str:
        """The definition as reading ``kprobe_events`` shows it (``trace_kprobe_show``)."""
        head = "r" if self.is_return else "p"
        if self.is_return and self.maxactive:
            head += str(self.maxactive)
        parts = [f"{head}:{self.group}/{self.event}", self.location]
        parts += [str(arg) for arg in self.args]
        return " ".join(parts)

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class RemoveSpec:
    """``-:[GRP/]EVENT [ARGS]``: remove an event. ``group`` None matches any
    group; ``match_args`` (raw text), when given, must match the event's."""

    event: str
    group: str | None = None
    match_args: tuple[str, ...] = ()
    text: str = field(default="", compare=False)

    def format(self) -> str:
        name = f"{self.group}/{self.event}" if self.group else self.event
        return " ".join([f"-:{name}", *self.match_args])

    def __str__(self) -> str:
        return self.format()
