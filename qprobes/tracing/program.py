"""Fetch programs: the instruction set a FETCHARG compiles to, and the rules
for how a value is stored (``finalize_fetch_insn`` in Linux's
``kernel/trace/trace_probe.c``). Pure code.

A program has the kernel's stages: one load (register, stack, immediate,
...), any number of dereferences, one store (raw value, memory, string),
optionally a bitfield modification and an array loop, then END.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from qprobes.errors import QprobesError
from qprobes.tracing.types import Bitfield, FetchType

__all__ = ["LOAD_OPS", "FetchInsn", "FetchOp", "StoreError", "plan_store"]


class FetchOp(enum.Enum):
    """``enum fetch_op`` (trace_probe.h), less what kprobes on x86_64 never use."""

    # Stage 1: load
    REG = "reg"  # .name: the pt_regs attribute
    STACK = "stack"  # .param: the stack entry
    STACKP = "stackp"
    RETVAL = "retval"
    IMM = "imm"  # .param: the value
    COMM = "comm"
    ARG = "arg"  # .param: 0-based argument
    EDATA = "edata"  # .param: 0-based argument, saved at function entry (return probes)
    DATA = "data"  # .data: an immediate string
    # Stage 2: dereference
    DEREF = "deref"  # .offset
    UDEREF = "uderef"  # .offset (user space)
    # Stage 3: store
    ST_RAW = "st_raw"  # .size
    ST_MEM = "st_mem"  # .offset, .size
    ST_UMEM = "st_umem"  # .offset, .size
    ST_STRING = "st_string"  # .offset
    ST_USTRING = "st_ustring"  # .offset
    ST_SYMSTR = "st_symstr"
    # Stage 4: modify
    MOD_BF = "mod_bf"  # .basesize, .lshift, .rshift
    # Stage 5: loop
    LP_ARRAY = "lp_array"  # .param: the count
    END = "end"


LOAD_OPS = frozenset(
    {
        FetchOp.REG,
        FetchOp.STACK,
        FetchOp.STACKP,
        FetchOp.RETVAL,
        FetchOp.IMM,
        FetchOp.COMM,
        FetchOp.ARG,
        FetchOp.EDATA,
        FetchOp.DATA,
    }
)


@dataclass(frozen=True)
class FetchInsn:
    """``struct fetch_insn``."""

    op: FetchOp
    param: int = 0
    offset: int = 0
    size: int = 0
    name: str = ""
    data: str = ""
    basesize: int = 0
    lshift: int = 0
    rshift: int = 0

    def __str__(self) -> str:
        fields = {
            "param": self.param,
            "offset": self.offset,
            "size": self.size,
            "name": self.name,
            "data": self.data,
            "basesize": self.basesize,
            "lshift": self.lshift,
            "rshift": self.rshift,
        }
        shown = " ".join(f"{k}={v!r}" for k, v in fields.items() if v)
        return f"{self.op.name}({shown})"


class StoreError(QprobesError):
    """Why a type cannot be stored from a fetch. Internal to this package: the
    parser and compiler turn it into a positioned ProbeSyntaxError."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# Which last operations each kind of string accepts (finalize_fetch_insn).
_STRING_FROM = frozenset({FetchOp.DEREF, FetchOp.UDEREF, FetchOp.IMM, FetchOp.COMM, FetchOp.DATA})
_SYMSTR_FROM = frozenset(
    {FetchOp.REG, FetchOp.STACK, FetchOp.RETVAL, FetchOp.ARG, FetchOp.EDATA, FetchOp.DEREF}
)
# The array loop steps through memory; Linux allows it after ST_MEM and the
# string stores. qprobes also allows it after ST_UMEM (user-space arrays).
_ARRAY_AFTER = frozenset({FetchOp.ST_MEM, FetchOp.ST_UMEM, FetchOp.ST_STRING, FetchOp.ST_USTRING})


def plan_store(
    last: FetchInsn,
    ftype: FetchType,
    count: int,
    bitfield: Bitfield | None,
    user_string: bool = False,
) -> tuple[bool, list[FetchInsn]]:
    """The instructions that end a program whose last instruction is ``last``.

    Returns (replace, tail): when ``replace`` the tail takes the place of
    ``last`` (a final dereference becomes a memory or string store),
    otherwise it follows it. Raises :class:`StoreError` with Linux's message
    for combinations Linux refuses.
    """
    op = last.op
    replace = False
    if ftype.is_string:
        if ftype.name == "symstr":
            if op not in _SYMSTR_FROM:
                raise StoreError("Symbol String doesn't accept data/userdata")
            store = FetchInsn(FetchOp.ST_SYMSTR)
        else:
            if op not in _STRING_FROM:
                raise StoreError("String accepts only memory argument")
            user = user_string or ftype.name == "ustring" or op is FetchOp.UDEREF
            st = FetchOp.ST_USTRING if user else FetchOp.ST_STRING
            # IMM, DATA and COMM point at the string itself; an array of
            # strings is an array of char pointers, so the dereference stays.
            if op in (FetchOp.DEREF, FetchOp.UDEREF) and not count:
                replace = True
                store = FetchInsn(st, offset=last.offset)
            else:
                store = FetchInsn(st)
    elif op is FetchOp.DEREF:
        replace = True
        store = FetchInsn(FetchOp.ST_MEM, offset=last.offset, size=ftype.size)
    elif op is FetchOp.UDEREF:
        replace = True
        store = FetchInsn(FetchOp.ST_UMEM, offset=last.offset, size=ftype.size)
    else:
        store = FetchInsn(FetchOp.ST_RAW, size=ftype.size)
    tail = [store]
    if bitfield is not None:
        bits = ftype.bits
        tail.append(
            FetchInsn(
                FetchOp.MOD_BF,
                basesize=ftype.size,
                lshift=bits - (bitfield.width + bitfield.offset),
                rshift=bits - bitfield.width,
            )
        )
    if count:
        if store.op not in _ARRAY_AFTER:
            raise StoreError("String accepts only memory argument")
        tail.append(FetchInsn(FetchOp.LP_ARRAY, param=count))
    tail.append(FetchInsn(FetchOp.END))
    return replace, tail
