"""Tracing: kprobe_events definitions in, typed event records out.

Above :mod:`qprobes.probes` (the engine that arms and runs probes) and
:mod:`qprobes.symbols` (kallsyms and BTF that resolve names and types); the
front ends are thin code on top of it.

The probe-definition language is Linux's ``kprobe_events`` syntax with
ftrace filters. Its modules, each importing only those before it:
``types`` (fetch types, limits,
the C-type model) → ``ast`` (what parsing returns) → ``numbers`` (the
kernel's number parsers) → ``program`` (fetch instructions and store rules)
→ ``parser`` (:func:`parse_probe`, pure) → ``fetch`` (:func:`compile_fetchargs`,
:func:`evaluate`, :func:`format_value`) → ``filter`` (:func:`parse_filter`,
:func:`evaluate_filter`); ``btf_resolver`` gives the language BTF types.
On the language: ``events`` (:class:`TraceEvent`, printed as ftrace prints
it) and ``tracer`` (:class:`Tracer`: definitions to probes, hits to events).

References: ``Documentation/trace/kprobetrace.rst`` and
``Documentation/trace/events.rst`` for the syntax; ``kernel/trace/
trace_kprobe.c``, ``trace_probe.c``, ``trace_probe.h``, ``trace_probe_tmpl.h``
and ``trace_events_filter.c`` for the behaviour mirrored here.
"""

from qprobes.tracing.ast import (
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

# The Tracer and its records sit on the language (imported last: they import it).
from qprobes.tracing.events import TraceEvent
from qprobes.tracing.fetch import (
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
from qprobes.tracing.filter import (
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
from qprobes.tracing.parser import TpErr, parse_probe
from qprobes.tracing.tracer import ProbeHost, TraceProbe, Tracer
from qprobes.tracing.types import Bitfield, CKind, CType, Member, TypeResolver

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
    "ProbeHost",
    "ProbeSpec",
    "Register",
    "RemoveSpec",
    "Retval",
    "StackEntry",
    "StackPointer",
    "SymbolRef",
    "SymbolSource",
    "TpErr",
    "TraceEvent",
    "TraceProbe",
    "Tracer",
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
