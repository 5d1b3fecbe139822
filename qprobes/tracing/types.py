"""Fetch types, limits, and the C-type model a :class:`TypeResolver` speaks.

Pure code. The fetch types and their print formats mirror
``probe_fetch_types[]`` and ``DEFINE_BASIC_PRINT_TYPE_FUNC`` in Linux's
``kernel/trace/trace_probe.c``; the limits are ``trace_probe.h``'s.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

__all__ = [
    "DEFAULT_FETCH_TYPE",
    "FAULT_STRING",
    "FETCH_INSN_MAX",
    "FETCH_TYPES",
    "KRETPROBE_MAXACTIVE_MAX",
    "MAX_ARGSTR_LEN",
    "MAX_ARG_NAME_LEN",
    "MAX_ARRAY_LEN",
    "MAX_EVENT_NAME_LEN",
    "MAX_STRING_SIZE",
    "MAX_TRACE_ARGS",
    "PARAM_MAX_STACK",
    "TASK_COMM_LEN",
    "Bitfield",
    "CKind",
    "CType",
    "FetchType",
    "Member",
    "PrintStyle",
    "TypeResolver",
]

# --- limits (kernel/trace/trace_probe.h, trace_kprobe.c) ------------------------

MAX_TRACE_ARGS: Final = 128
MAX_ARGSTR_LEN: Final = 63
MAX_ARRAY_LEN: Final = 64
MAX_ARG_NAME_LEN: Final = 32
MAX_EVENT_NAME_LEN: Final = 64  # include/linux/trace_events.h; names keep 63 characters
MAX_STRING_SIZE: Final = 4096  # PATH_MAX: a string keeps at most 4095 characters
FETCH_INSN_MAX: Final = 16  # "fetch + deref*N + store + mod + end <= 16"
KRETPROBE_MAXACTIVE_MAX: Final = 4096
# THREAD_SIZE / sizeof(unsigned long) for x86_64's 16 KiB stacks (no KASAN).
PARAM_MAX_STACK: Final = 16384 // 8
TASK_COMM_LEN: Final = 16
FAULT_STRING: Final = "(fault)"  # what ftrace prints for a string it could not read


class PrintStyle(enum.Enum):
    """How ftrace prints a type (the ``fmt`` of ``struct fetch_type``)."""

    UNSIGNED = "%u"
    SIGNED = "%d"
    HEX = "0x%x"
    CHAR = "'%c'"
    SYMBOL = "%pS"
    STRING = '"%s"'


@dataclass(frozen=True)
class FetchType:
    """One entry of ``probe_fetch_types[]``: name, size in bytes, signedness, print style.

    ``string``, ``ustring`` and ``symstr`` are strings (``__data_loc char[]``);
    ``symbol`` is an unsigned long shown as ``sym+0xoff/0xsize``.
    """

    name: str
    size: int
    signed: bool
    style: PrintStyle

    @property
    def is_string(self) -> bool:
        return self.style is PrintStyle.STRING

    @property
    def bits(self) -> int:
        return self.size * 8


def _table() -> dict[str, FetchType]:
    types: dict[str, FetchType] = {}
    for name, style in (
        ("string", PrintStyle.STRING),
        ("ustring", PrintStyle.STRING),
        ("symstr", PrintStyle.STRING),
    ):
        types[name] = FetchType(name, 4, False, style)
    for size in (1, 2, 4, 8):
        bits = size * 8
        types[f"u{bits}"] = FetchType(f"u{bits}", size, False, PrintStyle.UNSIGNED)
        types[f"s{bits}"] = FetchType(f"s{bits}", size, True, PrintStyle.SIGNED)
        types[f"x{bits}"] = FetchType(f"x{bits}", size, False, PrintStyle.HEX)
    types["char"] = FetchType("char", 1, False, PrintStyle.CHAR)
    types["symbol"] = FetchType("symbol", 8, False, PrintStyle.SYMBOL)
    return types


FETCH_TYPES: Final[dict[str, FetchType]] = _table()

# "Without type casting, 'x32' or 'x64' is used depends on the architecture"
# (kprobetrace.rst, Types; DEFAULT_FETCH_TYPE is x##BITS_PER_LONG).
DEFAULT_FETCH_TYPE: Final = "x64"


@dataclass(frozen=True)
class Bitfield:
    """``b<bit-width>@<bit-offset>/<container-size>``, all in bits."""

    width: int
    offset: int
    container: int

    def __str__(self) -> str:
        return f"b{self.width}@{self.offset}/{self.container}"


# --- C types, as BTF would describe them ------------------------------------------


class CKind(enum.Enum):
    INT = "int"
    ENUM = "enum"
    PTR = "ptr"
    STRUCT = "struct"
    UNION = "union"
    ARRAY = "array"
    VOID = "void"


@dataclass(frozen=True)
class CType:
    """A C type with modifiers and typedefs already skipped (``btf_type_skip_modifiers``).

    ``size`` is in bytes; ``name`` is the struct, union or enum tag;
    ``target`` is what a pointer points to or an array holds.
    """

    kind: CKind
    size: int = 0
    signed: bool = False
    name: str = ""
    target: CType | None = None
    count: int = 0

    @classmethod
    def int_(cls, size: int, signed: bool = True) -> CType:
        return cls(CKind.INT, size, signed)

    @classmethod
    def ptr(cls, target: CType) -> CType:
        return cls(CKind.PTR, 8, target=target)

    @classmethod
    def struct(cls, name: str, size: int = 0) -> CType:
        return cls(CKind.STRUCT, size, name=name)

    @classmethod
    def array(cls, target: CType, count: int) -> CType:
        return cls(CKind.ARRAY, target.size * count, target=target, count=count)

    @property
    def is_char(self) -> bool:
        return self.kind is CKind.INT and self.size == 1

    @property
    def is_record(self) -> bool:
        return self.kind in (CKind.STRUCT, CKind.UNION)


VOID: Final = CType(CKind.VOID)


class Member(NamedTuple):
    """Where a (dot-connected) member path lies in a struct.

    ``offset`` is in bytes from the start of the struct to the member's
    storage; a bitfield member also has ``bit_size`` bits starting
    ``bit_offset`` bits into that storage (``size`` bytes of it).
    """

    offset: int
    size: int
    type: CType
    bit_offset: int = 0
    bit_size: int = 0


class TypeResolver(Protocol):
    """What compiling BTF-style arguments needs to know about the kernel's types.

    Every method answers None when it does not know (no BTF for that function,
    no such member); the compiler turns that into Linux's error message.
    """

    def arg_names(self, func: str) -> Sequence[str] | None:
        """The parameter names of ``func``, in order."""

    def arg_type(self, func: str, index: int) -> CType | None:
        """The type of parameter ``index`` (0-based) of ``func``."""

    def return_type(self, func: str) -> CType | None:
        """The return type of ``func`` (a ``CKind.VOID`` type for void)."""

    def member(self, struct_name: str, path: Sequence[str]) -> Member | None:
        """The member at dot-connected ``path`` (``("f_path", "dentry")``) of a
        struct or union called ``struct_name``."""
