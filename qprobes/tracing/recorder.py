"""The fast path of the tracing language: fetch programs as guest recorders,
and the records they append decoded into the slow path's values.

:func:`plan_recorder` translates the compiled arguments of one definition
(:class:`~qprobes.tracing.fetch.CompiledArg`, Linux's ``fetch_insn``
programs) into the neutral IR of :mod:`qprobes.arch.x86_64.recorder_asm`,
which generates the x86-64 code that runs at the hit in the guest. What the
guest need not fetch stays on the host: ``$comm`` comes from the record's
header, immediate strings are constants, ``symstr`` is the symbolized
address. :func:`decode_record` and :meth:`RecorderPlan.values` turn a record
back into exactly what :func:`~qprobes.tracing.fetch.evaluate` returns for
the same hit. Taking records off a ring (:func:`drain_ring`, re-exported
here) is the record format's business, next to it in the arch layer; the
engine's :class:`~qprobes.probes.fastpath.FastPath` drains every CPU and
hands each record to the consumer of its probe id (a Tracer).

Return probes (:func:`plan_return_recorder`) record at the fast trampoline
(:mod:`qprobes.probes.fastret`): ``$retval`` and the registers as the
function returned them, plus two leading values, the entry's TSC and the
caller (the return address, or the one behind the guest's own return
hook), for the host to give the duration and ``ret_to``.

Not on the fast path (the Tracer keeps the slow one, :class:`NotFastError`
says why): values saved at the entry (``$argN`` of the entry is not kept),
arrays, more than :data:`~qprobes.arch.x86_64.recorder_asm.MAX_VALUES`
fetched values.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from qprobes.arch.x86_64.recorder_asm import (
    MAX_VALUES,
    REC_COMM,
    REC_CPU,
    REC_FAULTS,
    REC_TSC,
    REC_VALUES,
    Const,
    Deref,
    Fetch,
    FrameWord,
    ModBitfield,
    RingMemory,
    RingStats,
    Source,
    StackWord,
    Store,
    StoreMem,
    StoreString,
    StoreValue,
    drain_ring,
    record_header,
    ring_stats,
)
from qprobes.errors import ProbeError
from qprobes.probes.fastret import FRAME_CALLER, FRAME_ENTRY_TSC
from qprobes.probes.stubs import PT_REGS_NAMES
from qprobes.tracing.fetch import FAULT, CompiledArg, Scalar, Value, symbolize
from qprobes.tracing.numbers import to_signed
from qprobes.tracing.program import FetchInsn, FetchOp
from qprobes.tracing.types import TASK_COMM_LEN

__all__ = [
    "ArgPlan",
    "NotFastError",
    "RawRecord",
    "RecorderPlan",
    "RingMemory",
    "RingStats",
    "decode_record",
    "drain_ring",
    "plan_recorder",
    "plan_return_recorder",
    "record_header",
    "return_extra",
    "ring_stats",
]

_X86_64_ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")


class NotFastError(ProbeError):
    """A definition the guest recorder cannot run; the slow path can."""


def _frame(name: str) -> FrameWord:
    return FrameWord(8 * PT_REGS_NAMES.index(name))


@dataclass(frozen=True)
class ArgPlan:
    """How one argument's value is made: from record value ``slot`` (the
    guest fetched it), or on the host (``slot`` None: ``$comm``, immediate
    strings)."""

    arg: CompiledArg
    slot: int | None
    bitfield: ModBitfield | None = None

    def value(self, raw: RawRecord) -> Value:
        arg = self.arg
        first = arg.code[0]
        if first.op is FetchOp.COMM:
            return (raw.comm or "")[: TASK_COMM_LEN - 1]
        if first.op is FetchOp.DATA:
            return first.data
        assert self.slot is not None
        got = raw.values[self.slot]
        if got is FAULT:
            return FAULT
        if isinstance(got, bytes):
            return got.decode("utf-8", "replace")
        assert isinstance(got, int)
        if any(insn.op is FetchOp.ST_SYMSTR for insn in arg.code):
            return symbolize(arg.symbols, got)
        size = self.bitfield.basesize if self.bitfield is not None else arg.type.size
        if arg.type.signed:
            return to_signed(got, size)
        return got


@dataclass(frozen=True)
class RecorderPlan:
    """The guest's fetches for one definition and how to read them back.

    ``context_at``: the first of the :data:`CONTEXT_VALUES` values after the
    definition's that describe the hit's context (see :func:`with_context`),
    or None when the record has none."""

    fetches: tuple[Fetch, ...]
    args: tuple[ArgPlan, ...]
    context_at: int | None = None

    def context(self, raw: RawRecord) -> tuple[int, int, int, int] | None:
        """(rflags, raw ``__preempt_count``, ``thread_info.flags``,
        ``migration_disabled``) at the hit, or None (not recorded, or a load
        of them faulted)."""
        at = self.context_at
        if at is None:
            return None
        got = [v for v in raw.values[at : at + CONTEXT_VALUES] if type(v) is int]
        if len(got) != CONTEXT_VALUES:
            return None  # a load faulted (FAULT), or the record is short
        return got[0], got[1], got[2], got[3]

    @property
    def strings(self) -> tuple[bool, ...]:
        """Per value slot: whether it is a string."""
        return tuple(f.is_string for f in self.fetches)

    def values(self, raw: RawRecord) -> dict[str, Value]:
        """What :func:`~qprobes.tracing.fetch.evaluate` gives for the same hit."""
        return {p.arg.name: p.value(raw) for p in self.args}


def _source(insn: FetchInsn, ip: int, what: str, ret: bool = False) -> Source:
    op = insn.op
    if ret and op is FetchOp.RETVAL:
        return _frame("rax")
    if ret and op is FetchOp.REG and insn.name == "rip":
        return _frame("rip")  # at the return: the real return address
    if op is FetchOp.REG:
        # The slow path shows rip at the probed address (kprobe_int3_handler).
        return Const(ip) if insn.name == "rip" else _frame(insn.name)
    if op is FetchOp.STACK:
        return StackWord(insn.param)
    if op is FetchOp.STACKP:
        return _frame("rsp")
    if op is FetchOp.IMM:
        return Const(insn.param)
    if op is FetchOp.ARG:
        if insn.param < len(_X86_64_ARG_REGS):
            return _frame(_X86_64_ARG_REGS[insn.param])
        return StackWord(insn.param - len(_X86_64_ARG_REGS) + 1)
    if op in (FetchOp.RETVAL, FetchOp.EDATA):
        raise NotFastError(f"{what}: return probes are not on the fast path yet")
    raise NotFastError(f"{what}: {insn} is not on the fast path")


def _arg(arg: CompiledArg, ip: int, ret: bool = False) -> tuple[Fetch | None, ModBitfield | None]:
    what = f"argument {arg.name}"
    code = arg.code
    if code[0].op in (FetchOp.COMM, FetchOp.DATA):
        return None, None
    if arg.count:
        raise NotFastError(f"{what}: arrays are not on the fast path yet")
    source = _source(code[0], ip, what, ret)
    i = 1
    derefs: list[Deref] = []
    while code[i].op in (FetchOp.DEREF, FetchOp.UDEREF):
        derefs.append(Deref(code[i].offset, code[i].op is FetchOp.UDEREF))
        i += 1
    st = code[i]
    store: Store
    if st.op is FetchOp.ST_RAW:
        store = StoreValue(st.size)
    elif st.op in (FetchOp.ST_MEM, FetchOp.ST_UMEM):
        store = StoreMem(st.offset, st.size, st.op is FetchOp.ST_UMEM)
    elif st.op in (FetchOp.ST_STRING, FetchOp.ST_USTRING):
        store = StoreString(st.offset, st.op is FetchOp.ST_USTRING)
    elif st.op is FetchOp.ST_SYMSTR:
        if st.offset:
            derefs.append(Deref(st.offset))  # pragma: no cover - Linux gives none
        store = StoreValue(8)
    else:
        raise NotFastError(f"{what}: {st} is not on the fast path")
    bf = code[i + 1] if code[i + 1].op is FetchOp.MOD_BF else None
    mod = ModBitfield(bf.basesize, bf.lshift, bf.rshift) if bf is not None else None
    return Fetch(source, tuple(derefs), store, mod), mod


def plan_recorder(args: Sequence[CompiledArg], ip: int, *, ret: bool = False) -> RecorderPlan:
    """The recorder IR for ``args`` of a kprobe at ``ip`` (the address the
    slow path reports as ``%ip``), or with ``ret`` of a return probe at its
    return. Raises :class:`NotFastError` naming the argument the guest
    cannot fetch."""
    fetches: list[Fetch] = []
    plans: list[ArgPlan] = []
    for arg in args:
        fetch, mod = _arg(arg, ip, ret)
        if fetch is None:
            plans.append(ArgPlan(arg, None))
            continue
        plans.append(ArgPlan(arg, len(fetches), mod))
        fetches.append(fetch)
    if len(fetches) > MAX_VALUES:
        raise NotFastError(f"{len(fetches)} fetched values, the fast path holds {MAX_VALUES}")
    return RecorderPlan(tuple(fetches), tuple(plans))


#: Values :func:`with_context` appends: rflags, preempt count, TIF flags,
#: migration_disabled.
CONTEXT_VALUES = 4


def with_context(plan: RecorderPlan, fetches: Sequence[Fetch]) -> RecorderPlan:
    """``plan`` with the :data:`CONTEXT_VALUES` fetches of the hit's context
    (as the guest's trace events record it: ``tracing_gen_ctx()``) after
    its own values; ftrace's latency columns come from them."""
    if len(fetches) != CONTEXT_VALUES:
        raise ProbeError(f"{len(fetches)} context fetches, wanted {CONTEXT_VALUES}")
    if any(f.is_string for f in fetches):
        raise ProbeError("a context fetch is a string")
    if len(plan.fetches) + CONTEXT_VALUES > MAX_VALUES:
        return plan  # no room: the latency columns stay unknown
    return RecorderPlan(plan.fetches + tuple(fetches), plan.args, len(plan.fetches))


#: Values a return recorder puts before the definition's: the entry's TSC
#: and the caller to report.
RETURN_EXTRA = 2


def plan_return_recorder(args: Sequence[CompiledArg]) -> RecorderPlan:
    """The return recorder IR for ``args`` of an ``r:`` definition, run by
    the fast trampoline: its first :data:`RETURN_EXTRA` values are the
    instance's entry TSC and the caller (see
    :func:`return_extra`)."""
    plan = plan_recorder(args, 0, ret=True)
    extra = (Fetch(FrameWord(FRAME_ENTRY_TSC)), Fetch(FrameWord(FRAME_CALLER)))
    shifted = tuple(dataclasses.replace(p, slot=p.slot + RETURN_EXTRA) if p.slot is not None
                    else p for p in plan.args)  # fmt: skip
    if len(plan.fetches) + RETURN_EXTRA > MAX_VALUES:
        raise NotFastError(f"{len(plan.fetches)} fetched values, a return probe's fast path "
                           f"holds {MAX_VALUES - RETURN_EXTRA}")  # fmt: skip
    return RecorderPlan(extra + plan.fetches, shifted)


def return_extra(raw: RawRecord) -> tuple[int, int]:
    """(entry TSC, caller) of a return recorder's record."""
    tsc, ret = raw.values[0], raw.values[1]
    assert isinstance(tsc, int) and isinstance(ret, int)
    return tsc, ret


# --- records --------------------------------------------------------------------


@dataclass(frozen=True)
class RawRecord:
    """One record as the guest wrote it."""

    probe_id: int
    cpu: int
    tsc: int
    pid: int | None
    comm: str | None
    values: tuple[int | bytes | Scalar, ...]


def decode_record(data: bytes, strings: Sequence[bool]) -> RawRecord:
    """Decode a record whose value slots are strings where ``strings`` says."""
    size, probe_id = record_header(data)
    if size < REC_VALUES or size > len(data):
        raise ProbeError(f"bad record size {size} (have {len(data)} bytes)")
    (tsc,) = struct.unpack_from("<Q", data, REC_TSC)
    cpu, pid = struct.unpack_from("<Ii", data, REC_CPU)
    comm_raw = data[REC_COMM : REC_COMM + TASK_COMM_LEN]
    (faults,) = struct.unpack_from("<Q", data, REC_FAULTS)
    values: list[int | bytes | Scalar] = []
    pos = REC_VALUES
    for k, is_string in enumerate(strings):
        (word,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        if faults >> k & 1:
            values.append(FAULT)
        elif is_string:
            values.append(data[pos : pos + word])
            pos += (word + 7) & ~7
        else:
            values.append(int(word))
    if pos != size:
        raise ProbeError(f"record of probe {probe_id}: {size} bytes, the values take {pos}")
    known = pid != -1 or any(comm_raw)
    comm = comm_raw.split(b"\0", 1)[0].decode(errors="replace") if known else None
    return RawRecord(int(probe_id), int(cpu), int(tsc), int(pid) if known else None, comm,
                     tuple(values))  # fmt: skip
