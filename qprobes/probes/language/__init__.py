"""The probe-definition language: Linux's ``kprobe_events`` syntax and ftrace filters.

Layers, each importing only those before it: ``types`` (fetch types, limits,
the C-type model) → ``ast`` (what parsing returns) → ``numbers`` (the
kernel's number parsers) → ``program`` (fetch instructions and store rules)
→ ``parser`` (:func:`parse_probe`, pure) → ``fetch`` (:func:`compile_fetchargs`,
:func:`evaluate`, :func:`format_value`) → ``filter`` (:func:`parse_filter`,
:func:`evaluate_filter`).

References: ``Documentation/trace/kprobetrace.rst`` and
``Documentation/trace/events.rst`` for the syntax; ``kernel/trace/
trace_kprobe.c``, ``trace_probe.c``, ``trace_probe.h``, ``trace_probe_tmpl.h``
and ``trace_events_filter.c`` for the behaviour mirrored here.
"""

from qprobes.probes.language.ast import (
    AllArgs,
    Arg,
    BtfVar,
    Comm,
    Deref,
    FetchArg,
    Immediate,
    ImmString,
    MemberAccess,
    Memory,
    ProbeArg,
    ProbeSpec,
    Register,
    RemoveSpec,
    Retval,
    StackEntry,
    StackPointer,
    SymbolRef,
    TypeSpec,
)
from qprobes.probes.language.fetch import (
    FAULT,
    CompiledArg,
    FetchContext,
    FilterField,
    HitFetchContext,
    SymbolSource,
    Value,
    compile_fetchargs,
    evaluate,
    format_args,
    format_value,
)
from qprobes.probes.language.filter import (
    COMMON_FIELDS,
    And,
    FilterExpr,
    FilterOp,
    Not,
    Or,
    Predicate,
    common_values,
    evaluate_filter,
    glob_match,
    parse_filter,
)
from qprobes.probes.language.parser import TpErr, parse_probe
from qprobes.probes.language.types import Bitfield, CKind, CType, Member, TypeResolver

__all__ = [
    "COMMON_FIELDS",
    "FAULT",
    "AllArgs",
    "And",
    "Arg",
    "Bitfield",
    "BtfVar",
    "CKind",
    "CType",
    "Comm",
    "CompiledArg",
    "Deref",
    "FetchArg",
    "FetchContext",
    "FilterExpr",
    "FilterField",
    "FilterOp",
    "HitFetchContext",
    "ImmString",
    "Immediate",
    "Member",
    "MemberAccess",
    "Memory",
    "Not",
    "Or",
    "Predicate",
    "ProbeArg",
    "ProbeSpec",
    "Register",
    "RemoveSpec",
    "Retval",
    "StackEntry",
    "StackPointer",
    "SymbolRef",
    "SymbolSource",
    "TpErr",
    "TypeResolver",
    "TypeSpec",
    "Value",
    "common_values",
    "compile_fetchargs",
    "evaluate",
    "evaluate_filter",
    "format_args",
    "format_value",
    "glob_match",
    "parse_filter",
    "parse_probe",
]
