"""Compile parsed FETCHARGS into fetch programs, run them on a probe hit, and
print the values the way ftrace does.

:func:`compile_fetchargs` resolves what parsing left open (``@SYM``
through a symbol table, BTF-style parameters and members through a
:class:`~qprobes.tracing.types.TypeResolver`) and lowers each
argument to Linux's ``fetch_insn`` stages. :func:`evaluate` is
``process_fetch_insn``/``process_fetch_insn_bottom`` (``kernel/trace/
trace_kprobe.c``, ``trace_probe_tmpl.h``) over a :class:`FetchContext`, a
small protocol a test can fake in a few lines. :func:`format_value` is
``trace_probe_print_args`` and the ``print_type_*`` functions
(``trace_probe.c``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from qprobes.errors import (
    MemoryAccessError,
    ProbeError,
    ProbeSyntaxError,
    SymbolError,
    TargetError,
)
from qprobes.probes.context import HitContext
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
    Retval,
    StackEntry,
    StackPointer,
    SymbolRef,
)
from qprobes.tracing.numbers import to_signed, truncate
from qprobes.tracing.parser import (
    REGISTERS,
    RESERVED_FIELD_NAMES,
    TpErr,
)
from qprobes.tracing.program import FetchInsn, FetchOp, StoreError, plan_store
from qprobes.tracing.types import (
    DEFAULT_FETCH_TYPE,
    FAULT_STRING,
    FETCH_TYPES,
    MAX_STRING_SIZE,
    MAX_TRACE_ARGS,
    TASK_COMM_LEN,
    Bitfield,
    CKind,
    CType,
    FetchType,
    PrintStyle,
    TypeResolver,
)

__all__ = [
    "FAULT",
    "CompiledArg",
    "FetchContext",
    "FilterField",
    "HitFetchContext",
    "RegisterFile",
    "Scalar",
    "SymbolLike",
    "SymbolSource",
    "Value",
    "compile_fetchargs",
    "evaluate",
    "format_args",
    "format_value",
]


class Fault(enum.Enum):
    """The value of an argument whose memory could not be read."""

    FAULT = FAULT_STRING

    def __repr__(self) -> str:
        return "FAULT"


FAULT: Literal[Fault.FAULT] = Fault.FAULT

Scalar = int | str | Literal[Fault.FAULT]
Value = Scalar | list[Scalar]


# --- what the compiler and the evaluator need from the rest of qprobes ------------


class SymbolLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...


class SymbolSource(Protocol):
    """Name to address and back; :class:`qprobes.symbols.elf.SymbolTable` is one."""

    def address(self, name: str) -> int:
        """The address of ``name``; raises :class:`~qprobes.errors.SymbolError` if unknown."""
        ...

    def resolve(self, addr: int) -> tuple[SymbolLike, int] | None:
        """The symbol containing ``addr`` and the offset into it."""
        ...


class RegisterFile(Protocol):
    """Registers by pt_regs name (``regs.rdi``), as :class:`~qprobes.probes.context.PtRegs`."""

    def __getattr__(self, name: str) -> int: ...


class FetchContext(Protocol):
    """What fetching arguments reads at a hit.

    ``read`` reads kernel memory through the kernel's page tables (``cr3``);
    ``read_user`` reads the interrupted task's memory (for ``+uOFFS(...)``,
    ``ustring``). Both raise :class:`~qprobes.errors.TargetError` (a page is
    not mapped) or :class:`~qprobes.errors.MemoryAccessError` where memory
    cannot be read. ``retval`` is rax at a function return; ``entry_regs``
    are the registers at the function's entry, for ``$argN`` in a return
    probe; ``comm()`` names the current task.
    """

    @property
    def regs(self) -> RegisterFile: ...

    @property
    def retval(self) -> int | None: ...

    @property
    def entry_regs(self) -> Mapping[str, int] | None: ...

    @property
    def cr3(self) -> int: ...

    def read(self, addr: int, length: int) -> bytes: ...

    def read_user(self, addr: int, length: int) -> bytes: ...

    def comm(self) -> str: ...


@dataclass
class HitFetchContext:
    """A :class:`FetchContext` over a handler's :class:`HitContext`; the caller
    says how to name the current task (qprobes has no view of ``current``)."""

    hit: HitContext
    comm_of: Callable[[], str]

    @property
    def regs(self) -> RegisterFile:
        return self.hit.regs

    @property
    def retval(self) -> int | None:
        return self.hit.retval

    @property
    def entry_regs(self) -> Mapping[str, int] | None:
        return self.hit.entry_regs

    @property
    def cr3(self) -> int:
        return self.hit.cr3

    def read(self, addr: int, length: int) -> bytes:
        return self.hit.read(addr, length)

    def read_user(self, addr: int, length: int) -> bytes:
        return self.hit.read_user(addr, length)

    def comm(self) -> str:
        return self.comm_of()


# --- compiled arguments --------------------------------------------------------


@dataclass(frozen=True)
class FilterField:
    """How an event filter may test a field (``struct ftrace_event_field``'s
    filter type, size and sign)."""

    name: str
    is_string: bool = False
    size: int = 8
    signed: bool = False
    is_array: bool = False


@dataclass(frozen=True)
class CompiledArg:
    """One argument ready to run: name, fetch type, array count and program."""

    name: str
    type: FetchType
    code: tuple[FetchInsn, ...]
    count: int = 0
    bitfield: Bitfield | None = None
    text: str = ""
    symbols: SymbolSource | None = field(default=None, compare=False, repr=False)

    @property
    def filter_field(self) -> FilterField:
        return FilterField(
            self.name, self.type.is_string, self.type.size, self.type.signed, self.count > 0
        )

    def __str__(self) -> str:
        return f"{self.name}={self.text}"


_X86_64_ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")


def _default_type(ctype: CType | None) -> str:
    """fetch_type_from_btf_type: the fetch type a C type gets without ``:TYPE``."""
    if ctype is None:
        return DEFAULT_FETCH_TYPE
    if ctype.kind is CKind.ENUM:
        return "s64" if ctype.size == 8 else "s32"
    if ctype.kind is CKind.PTR:
        return "x64"
    if ctype.kind is CKind.INT and ctype.size in (1, 2, 4, 8):
        return f"{'s' if ctype.signed else 'u'}{ctype.size * 8}"
    if ctype.kind is CKind.INT:
        return "u64"
    return DEFAULT_FETCH_TYPE


@dataclass
class _Compiler:
    spec: ProbeSpec
    symbols: SymbolSource | None
    resolver: TypeResolver | None
    btf_defaults: bool = True

    def error(self, column: int, message: str) -> ProbeSyntaxError:
        return ProbeSyntaxError(self.spec.text, column, message)

    @property
    def func(self) -> str:
        return self.spec.symbol or ""

    def param_names(self, pos: int) -> Sequence[str]:
        if self.resolver is None:
            raise self.error(pos, TpErr.NOSUP_BTFARG)
        names = self.resolver.arg_names(self.func) if self.spec.symbol else None
        if names is None:
            raise self.error(pos, TpErr.NO_BTF_ENTRY)
        return names

    def compile(self) -> list[CompiledArg]:
        out: list[tuple[CompiledArg, int]] = []  # with the column of its source
        for arg in self.spec.args:
            if isinstance(arg.fetch, AllArgs):
                # traceprobe_expand_meta_args: one argument per parameter.
                names = self.param_names(arg.pos)
                if not names:
                    raise self.error(arg.pos, TpErr.NOSUP_BTFARG)
                out += [(self.arg(arg, BtfVar(n, arg.pos), n, n), arg.pos) for n in names]
                continue
            fetch, name = arg.fetch, arg.name
            if (isinstance(fetch, Arg) and not arg.named and self.resolver is not None
                    and self.btf_defaults):  # fmt: skip
                # With BTF, Linux rewrites a bare "$argN" to the parameter's
                # name, which then names and types the argument.
                known = self.resolver.arg_names(self.func) if self.spec.symbol else None
                if known is not None:
                    if fetch.n > len(known):
                        raise self.error(arg.pos, TpErr.NO_BTFARG)
                    name = known[fetch.n - 1]
                    fetch = BtfVar(name, fetch.pos)
            out.append((self.arg(arg, fetch, name, arg.text), arg.pos))
        if len(out) > MAX_TRACE_ARGS:
            raise self.error(self.spec.args[0].pos, TpErr.TOO_MANY_ARGS)
        seen: set[str] = set()
        for compiled, pos in out:
            if compiled.name in seen or compiled.name in RESERVED_FIELD_NAMES:
                raise self.error(pos, TpErr.USED_ARG_NAME)
            seen.add(compiled.name)
        return [compiled for compiled, _ in out]

    def arg(self, arg: ProbeArg, fetch: FetchArg, name: str, text: str) -> CompiledArg:
        code, ctype, bits = self.lower(fetch)
        if isinstance(fetch, Retval) and not self.btf_defaults:
            ctype = None  # a bare $retval is x64, as before Linux 6.6
        tspec = arg.type
        bitfield = tspec.bitfield
        if tspec.name is not None:
            ftype = FETCH_TYPES[tspec.name]
        elif isinstance(fetch, Comm | ImmString):
            ftype = FETCH_TYPES["string"]
        else:
            ftype = FETCH_TYPES[_default_type(ctype)]
            if bits is not None and bitfield is None:
                # A bitfield member, typed from BTF: its storage unit, shifted.
                offset, width = bits
                ftype = FETCH_TYPES[f"u{ftype.size * 8}"]
                bitfield = Bitfield(width, offset, ftype.bits)
        if ftype.is_string and ftype.name != "symstr" and ctype is not None:
            # check_prepare_btf_string_fetch: char[] is the string itself,
            # char * must be followed, anything else is not a string.
            if ctype.kind is CKind.PTR and ctype.target is not None and ctype.target.is_char:
                user = ftype.name == "ustring"
                code.append(FetchInsn(FetchOp.UDEREF if user else FetchOp.DEREF))
            elif not (
                ctype.kind is CKind.ARRAY and ctype.target is not None and ctype.target.is_char
            ):
                raise self.error(tspec.pos, TpErr.BAD_TYPE4STR)
        try:
            replace, tail = plan_store(code[-1], ftype, tspec.count, bitfield)
        except StoreError as exc:
            raise self.error(tspec.pos, exc.message) from None
        if replace:
            code.pop()
        code += tail
        return CompiledArg(
            name, ftype, tuple(code), tspec.count, bitfield, text, symbols=self.symbols
        )

    def lower(self, node: FetchArg) -> tuple[list[FetchInsn], CType | None, tuple[int, int] | None]:
        """The load and dereference instructions of ``node``, the C type of
        what they fetch (when known), and (bit offset, bit size) of a bitfield."""
        match node:
            case Register(name):
                return [FetchInsn(FetchOp.REG, name=REGISTERS[name])], None, None
            case StackEntry(n):
                return [FetchInsn(FetchOp.STACK, param=n)], None, None
            case StackPointer():
                return [FetchInsn(FetchOp.STACKP)], None, None
            case Retval():
                ctype = None
                if self.resolver is not None and self.spec.symbol:
                    ctype = self.resolver.return_type(self.func)
                    if ctype is not None and ctype.kind is CKind.VOID and self.btf_defaults:
                        raise self.error(node.pos, TpErr.NO_RETVAL)
                return [FetchInsn(FetchOp.RETVAL)], ctype, None
            case Comm():
                return [FetchInsn(FetchOp.COMM)], None, None
            case Immediate(value):
                return [FetchInsn(FetchOp.IMM, param=truncate(value, 8))], None, None
            case ImmString(value):
                return [FetchInsn(FetchOp.DATA, data=value)], None, None
            case Arg(n):
                # Untyped, as Linux leaves "$argN" that it did not rewrite to
                # a parameter name (see compile()).
                return [self._param(n - 1)], None, None
            case BtfVar(name):
                names = self.param_names(node.pos)
                if name not in names:
                    raise self.error(node.pos, TpErr.NO_BTFARG)
                index = list(names).index(name)
                assert self.resolver is not None
                return [self._param(index)], self.resolver.arg_type(self.func, index), None
            case Memory(addr):
                return [FetchInsn(FetchOp.IMM, param=addr), FetchInsn(FetchOp.DEREF)], None, None
            case SymbolRef(symbol, offset):
                if self.symbols is None:
                    raise self.error(node.pos, TpErr.NEED_SYMBOLS)
                try:
                    addr = self.symbols.address(symbol)
                except SymbolError as exc:
                    raise self.error(node.pos, TpErr.NO_SYMBOL) from exc
                imm = FetchInsn(FetchOp.IMM, param=truncate(addr + offset, 8))
                return [imm, FetchInsn(FetchOp.DEREF)], None, None
            case Deref(offset, base, user):
                code, _, _ = self.lower(base)
                op = FetchOp.UDEREF if user else FetchOp.DEREF
                return [*code, FetchInsn(op, offset=offset)], None, None
            case MemberAccess(base, chain):
                return self._members(node, base, chain)
        raise AssertionError(node)  # pragma: no cover

    def _param(self, index: int) -> FetchInsn:
        # Return probes fetch parameters saved at the entry (FETCH_OP_EDATA).
        return FetchInsn(FetchOp.EDATA if self.spec.is_return else FetchOp.ARG, param=index)

    def _members(
        self, node: MemberAccess, base: FetchArg, chain: tuple[tuple[str, ...], ...]
    ) -> tuple[list[FetchInsn], CType | None, tuple[int, int] | None]:
        """parse_btf_field: each ``->`` dereferences the pointer so far at the
        offset of the dot-connected member path that follows it."""
        if self.resolver is None:
            raise self.error(node.pos, TpErr.NOSUP_BTFARG)
        code, ctype, _ = self.lower(base)
        if isinstance(base, Arg) and self.spec.symbol:
            ctype = self.resolver.arg_type(self.func, base.n - 1)
        if ctype is None:
            raise self.error(node.pos, TpErr.NO_BTF_ENTRY)
        bits = None
        columns = node.field_pos or (node.pos,) * len(chain)
        for path, column in zip(chain, columns, strict=True):
            target = ctype.target if ctype is not None and ctype.kind is CKind.PTR else None
            if target is None or not target.is_record:
                raise self.error(column, TpErr.NO_PTR_STRCT)
            member = self.resolver.member(target.name, path)
            if member is None:
                raise self.error(column, TpErr.NO_BTF_FIELD)
            code.append(FetchInsn(FetchOp.DEREF, offset=member.offset))
            ctype = member.type
            bits = (member.bit_offset, member.bit_size) if member.bit_size else None
        return code, ctype, bits


def compile_fetchargs(
    spec: ProbeSpec,
    symbols: SymbolSource | None = None,
    resolver: TypeResolver | None = None,
    btf_defaults: bool = True,
) -> list[CompiledArg]:
    """Compile the arguments of a parsed definition.

    ``symbols`` resolves ``@SYM`` and prints ``symbol``/``symstr`` values;
    ``resolver`` types ``$argN``, ``$retval`` and named parameters and
    resolves ``->member`` paths (without it those are refused, as on a
    kernel without BTF). ``btf_defaults=False`` leaves a bare ``$retval``
    and ``$argN`` untyped (``x64``, named ``argN``) as kernels before
    Linux 6.6 (BTF function arguments) do; BTF names and ``->`` still work.
    Raises :class:`~qprobes.errors.ProbeSyntaxError` pointing into
    ``spec.text``.
    """
    return _Compiler(spec, symbols, resolver, btf_defaults).compile()


# --- evaluation ------------------------------------------------------------------


class _Faulted(Exception):
    """Memory could not be read; the argument's value is FAULT. Internal."""


def _read(ctx: FetchContext, addr: int, size: int, user: bool = False) -> bytes:
    """probe_mem_read / probe_mem_read_user."""
    try:
        reader = ctx.read_user if user else ctx.read
        data = reader(truncate(addr, 8), size)
    except (TargetError, MemoryAccessError) as exc:
        raise _Faulted from exc
    if len(data) != size:
        raise _Faulted
    return data


def _read_ulong(ctx: FetchContext, addr: int, user: bool = False) -> int:
    return int.from_bytes(_read(ctx, addr, 8, user), "little")


def _read_string(ctx: FetchContext, addr: int, user: bool = False) -> str:
    """strncpy_from_kernel_nofault up to MAX_STRING_SIZE: at most 4095
    characters; a fault before the NUL loses the whole string."""
    out = bytearray()
    limit = MAX_STRING_SIZE - 1
    while len(out) < limit:
        here = addr + len(out)
        # Never cross a page in one read, so a string that ends before an
        # unmapped page is still read.
        chunk = min(limit - len(out), 4096 - here % 4096, 256)
        data = _read(ctx, here, chunk, user)
        nul = data.find(b"\0")
        if nul >= 0:
            out += data[:nul]
            break
        out += data
    return out.decode("utf-8", "replace")


def _stack_nth(ctx: FetchContext, sp: int, n: int) -> int:
    """regs_get_kernel_stack_nth: 0 where the stack cannot be read."""
    try:
        return _read_ulong(ctx, sp + 8 * n)
    except _Faulted:
        return 0


def _kernel_argument(ctx: FetchContext, regs: Mapping[str, int] | RegisterFile, n: int) -> int:
    """regs_get_kernel_argument (x86_64): rdi, rsi, rdx, rcx, r8, r9, then the stack."""
    if n < len(_X86_64_ARG_REGS):
        name = _X86_64_ARG_REGS[n]
        return regs[name] if isinstance(regs, Mapping) else int(getattr(regs, name))
    sp = regs["rsp"] if isinstance(regs, Mapping) else int(regs.rsp)
    return _stack_nth(ctx, sp, n - len(_X86_64_ARG_REGS) + 1)


def symbolize(symbols: SymbolSource | None, addr: int) -> str:
    """``%pS``/``sprint_symbol``: ``name+0xoff/0xsize``, or ``0xaddr`` when no symbol holds it."""
    found = symbols.resolve(addr) if symbols is not None else None
    if found is None:
        return f"{addr:#x}"
    sym, off = found
    # Linux's vsprintf prints "%#lx" of 0 as "0x0".
    return f"{sym.name}+0x{off:x}/0x{sym.size:x}" if sym.size else f"{sym.name}+0x{off:x}"


def _load(insn: FetchInsn, ctx: FetchContext) -> int | str:
    """Stage 1: a value, or (COMM, DATA) the string itself."""
    op = insn.op
    if op is FetchOp.REG:
        return int(getattr(ctx.regs, insn.name))
    if op is FetchOp.STACK:
        return _stack_nth(ctx, int(ctx.regs.rsp), insn.param)
    if op is FetchOp.STACKP:
        return int(ctx.regs.rsp)
    if op is FetchOp.RETVAL:
        if ctx.retval is not None:
            return ctx.retval
        return int(ctx.regs.rax)  # regs_return_value
    if op is FetchOp.IMM:
        return insn.param
    if op is FetchOp.ARG:
        return _kernel_argument(ctx, ctx.regs, insn.param)
    if op is FetchOp.EDATA:
        entry = ctx.entry_regs
        if entry is None:
            raise ProbeError("$argN in a return probe needs the registers saved at entry")
        return _kernel_argument(ctx, entry, insn.param)
    if op is FetchOp.COMM:
        return ctx.comm()[: TASK_COMM_LEN - 1]
    if op is FetchOp.DATA:
        return insn.data
    raise ProbeError(f"fetch program does not start with a load: {insn}")


def _store(arg: CompiledArg, insn: FetchInsn, val: int, ctx: FetchContext) -> Scalar:
    """Stage 3 for one element: raw value, memory, string or symbol string."""
    op = insn.op
    if op is FetchOp.ST_RAW:
        return truncate(val, insn.size)
    if op in (FetchOp.ST_MEM, FetchOp.ST_UMEM):
        data = _read(ctx, val + insn.offset, insn.size, op is FetchOp.ST_UMEM)
        return int.from_bytes(data, "little")
    if op in (FetchOp.ST_STRING, FetchOp.ST_USTRING):
        return _read_string(ctx, val + insn.offset, op is FetchOp.ST_USTRING)
    if op is FetchOp.ST_SYMSTR:
        return symbolize(arg.symbols, truncate(val + insn.offset, 8))
    raise ProbeError(f"not a store: {insn}")


def _finish(arg: CompiledArg, value: Scalar, bf: FetchInsn | None) -> Scalar:
    """Stage 4 (bitfield) and the sign of the type."""
    if not isinstance(value, int):
        return value
    size = arg.type.size
    if bf is not None:
        bits = bf.basesize * 8
        value = truncate(value << bf.lshift, bf.basesize) >> bf.rshift
        size = bits // 8
    if arg.type.signed:
        return to_signed(value, size)
    return value


def _run(arg: CompiledArg, ctx: FetchContext) -> Value:
    code = arg.code
    first = _load(code[0], ctx)
    i = 1
    if isinstance(first, str):
        # $comm and immediate strings: stored as they are.
        return first
    val = lval = first
    last_deref: FetchInsn | None = None
    try:
        # Stage 2: dereference (an unsigned long each time).
        while code[i].op in (FetchOp.DEREF, FetchOp.UDEREF):
            lval, last_deref = val, code[i]
            val = _read_ulong(ctx, val + code[i].offset, code[i].op is FetchOp.UDEREF)
            i += 1
    except _Faulted:
        return FAULT
    store = code[i]
    bf = code[i + 1] if code[i + 1].op is FetchOp.MOD_BF else None
    loop = next((insn for insn in code[i + 1 :] if insn.op is FetchOp.LP_ARRAY), None)

    def element(address: int) -> Scalar:
        try:
            return _finish(arg, _store(arg, store, address, ctx), bf)
        except _Faulted:
            return FAULT

    if loop is None:
        return element(val)
    values: list[Scalar] = []
    for n in range(loop.param):
        if store.op in (FetchOp.ST_STRING, FetchOp.ST_USTRING) and last_deref is not None:
            # An array of strings is an array of char pointers: follow the
            # nth pointer (the final dereference is redone one word along).
            try:
                user = last_deref.op is FetchOp.UDEREF
                pointer = _read_ulong(ctx, lval + 8 * n + last_deref.offset, user)
            except _Faulted:
                values.append(FAULT)
                continue
            values.append(element(pointer))
        else:
            values.append(element(val + n * arg.type.size))
    return values


def evaluate(args: Sequence[CompiledArg], ctx: FetchContext) -> dict[str, Value]:
    """Fetch every argument at a hit: name to value.

    Integers are unsigned, or signed for ``sN`` types; strings are ``str``;
    arrays are lists; ``symbol`` values stay integers (``symstr`` gives the
    string). Memory that cannot be read gives :data:`FAULT` (for the whole
    argument when a dereference faults, per element in an array).
    """
    return {arg.name: _run(arg, ctx) for arg in args}


# --- printing ---------------------------------------------------------------------


def _format_scalar(arg: CompiledArg, value: Scalar) -> str:
    if value is FAULT:
        return FAULT_STRING
    style = arg.type.style
    if isinstance(value, str):
        return f'"{value}"' if style is PrintStyle.STRING else value
    if style is PrintStyle.HEX:
        return f"0x{truncate(value, arg.type.size):x}"
    if style is PrintStyle.CHAR:
        return f"'{chr(truncate(value, 1))}'"
    if style is PrintStyle.SYMBOL:
        return symbolize(arg.symbols, value)
    return str(value)


def format_value(arg: CompiledArg, value: Value) -> str:
    """``name=value`` as ftrace prints it: ``0x..`` for ``xN``, decimal for
    ``uN``/``sN``, ``"..."`` for strings, ``(fault)`` for a string (or, in
    qprobes, any value) that could not be read, ``sym+0xoff/0xsize`` for
    ``symbol``, ``{a,b,c}`` for arrays."""
    if isinstance(value, list):
        text = "{" + ",".join(_format_scalar(arg, v) for v in value) + "}"
    else:
        text = _format_scalar(arg, value)
    return f"{arg.name}={text}"


def format_args(args: Sequence[CompiledArg], values: Mapping[str, Value]) -> str:
    """All arguments as they follow the probe address on a trace line."""
    return " ".join(format_value(arg, values[arg.name]) for arg in args)
