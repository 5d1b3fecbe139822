"""Parse probe definitions written in Linux's ``kprobe_events`` syntax.

Pure code: text in, :class:`~qprobes.tracing.ast.ProbeSpec` (or
:class:`~qprobes.tracing.ast.RemoveSpec`) out, nothing looked up.
The grammar is ``Documentation/trace/kprobetrace.rst``::

    p[:[GRP/][EVENT]] [MOD:]SYM[+offs]|MEMADDR [FETCHARGS]
    r[MAXACTIVE][:[GRP/][EVENT]] [MOD:]SYM[+0] [FETCHARGS]
    p[:[GRP/][EVENT]] [MOD:]SYM[+0]%return [FETCHARGS]
    -:[GRP/][EVENT]

and the checks, their order and their messages follow the kernel's parser:
``trace_kprobe_create_internal`` (trace_kprobe.c), ``traceprobe_parse_event_name``,
``traceprobe_parse_probe_arg`` and ``parse_probe_arg`` (trace_probe.c). The
error columns are those ``tools/testing/selftests/ftrace/test.d/kprobe/
kprobe_syntax_errors.tc`` expects (made 0-based).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from qprobes.errors import ProbeSyntaxError
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
from qprobes.tracing.numbers import kstrtol, kstrtoul, simple_strtoul
from qprobes.tracing.program import FetchInsn, FetchOp, StoreError, plan_store
from qprobes.tracing.types import (
    DEFAULT_FETCH_TYPE,
    FETCH_INSN_MAX,
    FETCH_TYPES,
    KRETPROBE_MAXACTIVE_MAX,
    MAX_ARG_NAME_LEN,
    MAX_ARGSTR_LEN,
    MAX_ARRAY_LEN,
    MAX_EVENT_NAME_LEN,
    MAX_TRACE_ARGS,
    PARAM_MAX_STACK,
    Bitfield,
)

__all__ = [
    "KPROBE_EVENT_SYSTEM",
    "REGISTERS",
    "RESERVED_FIELD_NAMES",
    "TpErr",
    "default_event_name",
    "is_good_name",
    "last_op",
    "parse_probe",
]

KPROBE_EVENT_SYSTEM = "kprobes"  # the default group


class TpErr(enum.StrEnum):
    """The ``error_log`` messages of ``kernel/trace/trace_probe.h`` (``ERRORS``),
    verbatim (typos included), plus a few qprobes needs where Linux logs none."""

    BAD_MAXACT_TYPE = "Maxactive is only for function exit"
    BAD_MAXACT = "Invalid maxactive number"
    MAXACT_TOO_BIG = "Maxactive is too big"
    BAD_PROBE_ADDR = "Invalid probed address or symbol"
    BAD_RETPROBE = "Retprobe address must be an function entry"
    BAD_ADDR_SUFFIX = "Invalid probed address suffix"
    NO_GROUP_NAME = "Group name is not specified"
    GROUP_TOO_LONG = "Group name is too long"
    BAD_GROUP_NAME = "Group name must follow the same rules as C identifiers"
    NO_EVENT_NAME = "Event name is not specified"
    EVENT_TOO_LONG = "Event name is too long"
    BAD_EVENT_NAME = "Event name must follow the same rules as C identifiers"
    RETVAL_ON_PROBE = "$retval is not available on probe"
    NO_RETVAL = "This function returns 'void' type"
    BAD_STACK_NUM = "Invalid stack number"
    BAD_ARG_NUM = "Invalid argument number"
    BAD_VAR = "Invalid $-valiable specified"
    BAD_REG_NAME = "Invalid register name"
    BAD_MEM_ADDR = "Invalid memory address"
    BAD_IMM = "Invalid immediate value"
    IMMSTR_NO_CLOSE = "String is not closed with '\"'"
    FILE_ON_KPROBE = "File offset is not available with kprobe"
    TOO_MANY_OPS = "Dereference is too much nested"
    DEREF_NEED_BRACE = "Dereference needs a brace"
    BAD_DEREF_OFFS = "Invalid dereference offset"
    DEREF_OPEN_BRACE = "Dereference brace is not closed"
    COMM_CANT_DEREF = "$comm can not be dereferenced"
    BAD_FETCH_ARG = "Invalid fetch argument"
    ARRAY_NO_CLOSE = "Array is not closed"
    BAD_ARRAY_SUFFIX = "Array has wrong suffix"
    BAD_ARRAY_NUM = "Invalid array size"
    ARRAY_TOO_BIG = "Array number is too big"
    BAD_TYPE = "Unknown type is specified"
    BAD_STRING = "String accepts only memory argument"
    BAD_SYMSTRING = "Symbol String doesn't accept data/userdata"
    BAD_BITFIELD = "Invalid bitfield"
    ARG_NAME_TOO_LONG = "Argument name is too long"
    NO_ARG_NAME = "Argument name is not specified"
    BAD_ARG_NAME = "Argument name must follow the same rules as C identifiers"
    USED_ARG_NAME = "This argument name is already used"
    ARG_TOO_LONG = "Argument expression is too long"
    NO_ARG_BODY = "No argument expression"
    NOSUP_BTFARG = "BTF is not available or not supported"
    NO_BTFARG = "This variable is not found at this probe point"
    NO_BTF_ENTRY = "No BTF entry for this probe point"
    BAD_VAR_ARGS = "$arg* must be an independent parameter without name etc."
    NOFENTRY_ARGS = "$arg* can be used only on function entry or exit"
    DOUBLE_ARGS = "$arg* can be used only once in the parameters"
    NO_PTR_STRCT = "This is not a pointer to union/structure."
    NOSUP_DAT_ARG = "Non pointer structure/union argument is not supported."
    BAD_HYPHEN = "Failed to parse single hyphen. Forgot '>'?"
    NO_BTF_FIELD = "This field is not found."
    BAD_TYPE4STR = "This type does not fit for string."
    NEED_STRING_TYPE = "$comm and immediate-string only accepts string type"
    TOO_MANY_ARGS = "Too many arguments are specified"
    # qprobes' own (Linux returns -EINVAL without a log entry for these).
    EMPTY = "Empty probe definition"
    BAD_COMMAND = "Unknown probe command (expected p, r or -)"
    NO_PROBE_POINT = "No probe point is specified"
    NO_UPROBE = "uprobe definitions are not supported"
    NO_SYMBOL = "Symbol is not found"
    NEED_SYMBOLS = "Resolving a symbol needs a symbol table"


# arch/x86/kernel/ptrace.c, regoffset_table: the names %REG accepts on
# x86_64, and the pt_regs field (as qprobes' PtRegs spells it) each reads.
REGISTERS: dict[str, str] = {
    **{f"r{n}": f"r{n}" for n in range(8, 16)},
    "bx": "rbx",
    "cx": "rcx",
    "dx": "rdx",
    "si": "rsi",
    "di": "rdi",
    "bp": "rbp",
    "ax": "rax",
    "orig_ax": "orig_rax",
    "ip": "rip",
    "cs": "cs",
    "flags": "eflags",
    "sp": "rsp",
    "ss": "ss",
}
# qprobes also takes the instruction-set names (Linux does not).
_REGISTER_ALIASES = {
    "rax": "ax",
    "rbx": "bx",
    "rcx": "cx",
    "rdx": "dx",
    "rsi": "si",
    "rdi": "di",
    "rbp": "bp",
    "rsp": "sp",
    "rip": "ip",
    "eflags": "flags",
    "rflags": "flags",
    "orig_rax": "orig_ax",
}

# trace_probe.c, reserved_field_names.
RESERVED_FIELD_NAMES = frozenset(
    {
        "common_type",
        "common_flags",
        "common_preempt_count",
        "common_pid",
        "common_tgid",
        "__probe_ip",
        "__probe_ret_ip",
        "__probe_func",
    }
)

_GOOD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_GOOD_SYSTEM_NAME = re.compile(r"[A-Za-z_-][A-Za-z0-9_-]*")
_IDENT = _GOOD_NAME
# Kernel symbols: C identifiers plus the '.' of compiler clones (foo.isra.0).
_SYMBOL = re.compile(r"[A-Za-z_.][A-Za-z0-9_.$]*")
_MODULE = re.compile(r"[A-Za-z0-9_-]+")
# split_next_field: a name runs to the next '.' or '-'.
_FIELD = re.compile(r"[^.-]*")


def is_good_name(name: str) -> bool:
    """``is_good_name``: event, field and argument names are C identifiers."""
    return _GOOD_NAME.fullmatch(name) is not None


def _is_good_system_name(name: str) -> bool:
    """``is_good_system_name``: group names may also hold '-'."""
    return _GOOD_SYSTEM_NAME.fullmatch(name) is not None


def default_event_name(is_return: bool, symbol: str | None, offset: int, address: int) -> str:
    """The name Linux gives an event defined without one: ``p_SYM_OFFS`` or
    ``p_0xADDR`` (``r_`` for return probes), with ':', '.' and '*' after the
    first character made '_' (``sanitize_event_name``), cut to 63 characters.

    Linux prints the address with ``%p``, which is hashed unless the kernel
    runs with ``no_hash_pointers``; qprobes uses the real address, zero-padded
    to 16 digits as unhashed ``%p`` prints it.
    """
    kind = "r" if is_return else "p"
    name = f"{kind}_{symbol}_{offset}" if symbol is not None else f"{kind}_0x{address:016x}"
    name = name[0] + re.sub(r"[:.*]", "_", name[1:])
    return name[: MAX_EVENT_NAME_LEN - 1]


def last_op(node: FetchArg) -> FetchInsn:
    """The last instruction ``node`` compiles to before its store, as far as
    the syntax tells (a typed parameter may gain a dereference later)."""
    match node:
        case Register(name):
            return FetchInsn(FetchOp.REG, name=name)
        case StackEntry(n):
            return FetchInsn(FetchOp.STACK, param=n)
        case StackPointer():
            return FetchInsn(FetchOp.STACKP)
        case Retval():
            return FetchInsn(FetchOp.RETVAL)
        case Comm():
            return FetchInsn(FetchOp.COMM)
        case Arg(n):
            return FetchInsn(FetchOp.ARG, param=n - 1)
        case AllArgs() | BtfVar():
            return FetchInsn(FetchOp.ARG)
        case Immediate(value):
            return FetchInsn(FetchOp.IMM, param=value)
        case ImmString(value):
            return FetchInsn(FetchOp.DATA, data=value)
        case Memory() | SymbolRef() | MemberAccess():
            return FetchInsn(FetchOp.DEREF)
        case Deref(offset, _, user):
            return FetchInsn(FetchOp.UDEREF if user else FetchOp.DEREF, offset=offset)
    raise AssertionError(node)  # pragma: no cover


def _typed_by_btf(node: FetchArg, top_level_arg: bool) -> bool:
    """Whether a TypeResolver may give ``node`` a C type when compiled (so the
    string and array checks wait until then, as Linux's BTF code runs before
    ``finalize_fetch_insn``)."""
    return isinstance(node, BtfVar | Retval | MemberAccess | AllArgs) or (
        isinstance(node, Arg) and top_level_arg
    )


@dataclass
class _Fetched:
    """A parsed FETCHARG and the number of ``fetch_insn`` slots it takes."""

    node: FetchArg
    slots: int
    inner_pos: int  # where Linux's ctx->offset rests afterwards


@dataclass
class _Parser:
    text: str
    is_return: bool = False
    on_entry: bool = False
    used_names: set[str] = field(default_factory=set)

    def error(self, column: int, message: str) -> ProbeSyntaxError:
        return ProbeSyntaxError(self.text, column, message)

    # --- the definition -------------------------------------------------------

    def parse(self) -> ProbeSpec | RemoveSpec:
        # trace_parse_run_command cuts a '#' comment off each line.
        body = self.text.split("#", 1)[0]
        tokens = [(m.start(), m.group()) for m in re.finditer(r"\S+", body)]
        if not tokens:
            raise self.error(0, TpErr.EMPTY)
        hpos, head = tokens[0]
        if head[0] == "-":
            return self._remove(hpos, head, tokens[1:])
        if head[0] not in "pr":
            raise self.error(hpos, TpErr.BAD_COMMAND)
        self.is_return = head[0] == "r"
        colon = head.find(":")
        prefix = head[1:colon] if colon >= 0 else head[1:]
        maxactive = self._maxactive(hpos, prefix)

        if len(tokens) < 2:
            raise self.error(hpos + len(head) + 1, TpErr.NO_PROBE_POINT)
        ppos, point = tokens[1]
        symbol, module, offset, address = self._probe_point(ppos, point)
        self.on_entry = not self.is_return and symbol is not None and offset == 0

        group: str | None = KPROBE_EVENT_SYSTEM
        event: str | None = None
        if colon >= 0:
            group, event = self._event_name(hpos + colon + 1, head[colon + 1 :], group)
        if event is None:
            qualified = f"{module}:{symbol}" if module else symbol
            event = default_event_name(self.is_return, qualified, offset, address or 0)

        args = self._args(tokens[2:])
        return ProbeSpec(
            is_return=self.is_return,
            group=group or KPROBE_EVENT_SYSTEM,
            event=event,
            symbol=symbol,
            offset=offset,
            address=address,
            module=module,
            maxactive=maxactive,
            args=args,
            text=self.text,
            symbol_pos=ppos,
        )

    def _remove(self, hpos: int, head: str, rest: list[tuple[int, str]]) -> RemoveSpec:
        # dyn_event_release: "-:[GRP/]EVENT [ARGS]".
        if head[1:2] != ":":
            raise self.error(hpos + 1, TpErr.BAD_COMMAND)
        group, event = self._event_name(hpos + 2, head[2:], None)
        if event is None:
            raise self.error(hpos + len(head), TpErr.NO_EVENT_NAME)
        return RemoveSpec(event, group, tuple(tok for _, tok in rest), self.text)

    def _maxactive(self, hpos: int, prefix: str) -> int:
        if not prefix:
            return 0
        if not prefix[0].isdigit():
            raise self.error(hpos + 1, TpErr.BAD_COMMAND)
        if not self.is_return:
            raise self.error(hpos + 1, TpErr.BAD_MAXACT_TYPE)
        value = kstrtoul(prefix) if len(prefix) <= MAX_EVENT_NAME_LEN - 1 else None
        if value is None or value == 0 or value > 0xFFFFFFFF:
            raise self.error(hpos + 1, TpErr.BAD_MAXACT)
        if value > KRETPROBE_MAXACTIVE_MAX:
            raise self.error(hpos + 1, TpErr.MAXACT_TOO_BIG)
        return value

    def _probe_point(self, ppos: int, point: str) -> tuple[str | None, str | None, int, int | None]:
        """(symbol, module, offset, address) of ``[MOD:]SYM[+offs][%return]|MEMADDR``."""
        address = kstrtoul(point)
        if address is not None:
            return None, None, 0, address
        if "/" in point and ":" in point:
            raise self.error(ppos, TpErr.NO_UPROBE)
        sym = point
        pct = sym.find("%")
        if pct >= 0:
            if sym[pct:] != "%return":
                raise self.error(ppos + pct, TpErr.BAD_ADDR_SUFFIX)
            self.is_return = True
            sym = sym[:pct]
        # traceprobe_split_symbol_offset: the offset starts at the first '+' or '-'.
        offset = 0
        split = re.search(r"[+-]", sym)
        if split is not None:
            value = kstrtol(sym[split.start() :])
            if value is None or value < 0 or value > 0xFFFFFFFF:
                raise self.error(ppos, TpErr.BAD_PROBE_ADDR)
            offset, sym = value, sym[: split.start()]
        module, _, name = sym.rpartition(":")
        if not _SYMBOL.fullmatch(name) or (module and not _MODULE.fullmatch(module)):
            raise self.error(ppos, TpErr.BAD_PROBE_ADDR)
        if self.is_return and offset:
            raise self.error(ppos, TpErr.BAD_RETPROBE)
        return name, module or None, offset, None

    def _event_name(
        self, pos: int, text: str, default_group: str | None
    ) -> tuple[str | None, str | None]:
        """traceprobe_parse_event_name: ``[GROUP/][EVENT]`` (or ``GROUP.EVENT``)."""
        slash = text.find("/")
        if slash < 0:
            slash = text.find(".")
        group = default_group
        event = text
        if slash >= 0:
            if slash == 0:
                raise self.error(pos, TpErr.NO_GROUP_NAME)
            if slash + 1 > MAX_EVENT_NAME_LEN:
                raise self.error(pos, TpErr.GROUP_TOO_LONG)
            group = text[:slash]
            if not _is_good_system_name(group):
                raise self.error(pos, TpErr.BAD_GROUP_NAME)
            event = text[slash + 1 :]
            pos += slash + 1
        if not event:
            if slash >= 0:
                return group, None
            raise self.error(pos, TpErr.NO_EVENT_NAME)
        if len(event) >= MAX_EVENT_NAME_LEN:
            raise self.error(pos, TpErr.EVENT_TOO_LONG)
        if not is_good_name(event):
            raise self.error(pos, TpErr.BAD_EVENT_NAME)
        return group, event

    # --- FETCHARGS ------------------------------------------------------------

    def _args(self, tokens: list[tuple[int, str]]) -> tuple[ProbeArg, ...]:
        # argv_has_var_arg: "$arg..." words are checked before any is parsed.
        seen_all = False
        for pos, tok in tokens:
            if not tok.startswith("$arg"):
                continue
            if not (self.on_entry or self.is_return):
                raise self.error(pos, TpErr.NOFENTRY_ARGS)
            if tok[4:5].isdigit():
                continue
            if tok[4:5] != "*":
                raise self.error(pos, TpErr.BAD_VAR)
            if seen_all:
                raise self.error(pos, TpErr.DOUBLE_ARGS)
            seen_all = True
        if len(tokens) > MAX_TRACE_ARGS:
            raise self.error(tokens[0][0], TpErr.TOO_MANY_ARGS)
        return tuple(self._arg(i, pos, tok) for i, (pos, tok) in enumerate(tokens))

    def _arg(self, index: int, pos: int, tok: str) -> ProbeArg:
        """traceprobe_parse_probe_arg: ``[NAME=]FETCHARG[:TYPE]``."""
        eq = tok.find("=")
        if eq >= 0:
            if eq > MAX_ARG_NAME_LEN:
                raise self.error(pos, TpErr.ARG_NAME_TOO_LONG)
            if eq == 0:
                raise self.error(pos, TpErr.NO_ARG_NAME)
            name, body, bpos = tok[:eq], tok[eq + 1 :], pos + eq + 1
        else:
            # generate_probe_arg_name: a bare parameter name names itself.
            bare = tok.split(":", 1)[0]
            name = bare if is_good_name(bare) else f"arg{index + 1}"
            body, bpos = tok, pos
        if eq < 0 and tok.startswith("$arg*"):
            name = "$arg*"  # stands for the expansion; _var checks the form
        elif not is_good_name(name):
            raise self.error(pos, TpErr.BAD_ARG_NAME)
        elif name in RESERVED_FIELD_NAMES or name in self.used_names:
            raise self.error(pos, TpErr.USED_ARG_NAME)
        if len(body) > MAX_ARGSTR_LEN:
            raise self.error(bpos, TpErr.ARG_TOO_LONG)
        if not body:
            raise self.error(bpos, TpErr.NO_ARG_BODY)

        fbody, tspec, tname, tpos = self._type(body, bpos)
        top_arg = eq < 0 and fbody.startswith("$arg")
        fetched = self._fetcharg(fbody, bpos, bare_all=eq < 0 and tspec.pos < 0)
        tspec = self._finalize(fetched, tspec, tname, tpos, bpos, top_arg)
        self.used_names.add(name)
        return ProbeArg(name, fetched.node, tspec, text=body, pos=pos, named=eq >= 0)

    def _type(self, body: str, bpos: int) -> tuple[str, TypeSpec, str | None, int]:
        """parse_probe_arg_type: split ``:TYPE[N]`` off and check it.

        Returns the FETCHARG text, the TypeSpec (``pos`` -1 when no type was
        written), the written type name and the type's column.
        """
        colon = body.find(":")
        if colon < 0:
            fbody, tname, tpos = body, None, bpos
        else:
            fbody, tname, tpos = body[:colon], body[colon + 1 :], bpos + colon + 1
        count = 0
        if tname is not None:
            bracket = tname.find("[")
            if bracket >= 0:
                close = tname.find("]", bracket + 1)
                if close < 0:
                    raise self.error(bpos + len(body), TpErr.ARRAY_NO_CLOSE)
                if close != len(tname) - 1:
                    raise self.error(tpos + close + 1, TpErr.BAD_ARRAY_SUFFIX)
                value = kstrtoul(tname[bracket + 1 : close])
                if value is None or value == 0 or value > 0xFFFFFFFF:
                    raise self.error(tpos + bracket + 1, TpErr.BAD_ARRAY_NUM)
                if value > MAX_ARRAY_LEN:
                    raise self.error(tpos + bracket + 1, TpErr.ARRAY_TOO_BIG)
                count, tname = value, tname[:bracket]
        # $comm and immediate strings are strings, and not arrays.
        if fbody in ("$comm", "$COMM") or fbody.startswith('\\"'):
            if count or (tname is not None and tname != "string"):
                raise self.error(tpos, TpErr.NEED_STRING_TYPE)
            return fbody, TypeSpec("string", pos=tpos if tname is not None else -1), tname, tpos
        if tname is None:
            return fbody, TypeSpec(None, count, pos=-1), None, tpos
        if tname.startswith("b"):
            # find_fetch_type: a bitfield is stored in its container's uN.
            slash = tname.find("/")
            container = kstrtoul(tname[slash + 1 :]) if slash >= 0 else None
            if container not in (8, 16, 32, 64):
                raise self.error(tpos, TpErr.BAD_TYPE)
            return fbody, TypeSpec(f"u{container}", count, pos=tpos), tname, tpos
        if tname not in FETCH_TYPES:
            raise self.error(tpos, TpErr.BAD_TYPE)
        return fbody, TypeSpec(tname, count, pos=tpos), tname, tpos

    def _finalize(
        self,
        fetched: _Fetched,
        tspec: TypeSpec,
        tname: str | None,
        tpos: int,
        bpos: int,
        top_arg: bool,
    ) -> TypeSpec:
        """finalize_fetch_insn's checks: the store fits the fetch, the slots last."""
        node = fetched.node
        bitfield = None
        if tname is not None and tname.startswith("b"):
            bitfield = self._bitfield(tname, tpos, FETCH_TYPES[tspec.name or ""].bits)
        ftype = FETCH_TYPES[tspec.name or DEFAULT_FETCH_TYPE]
        if not _typed_by_btf(node, top_arg):
            try:
                replace, tail = plan_store(last_op(node), ftype, tspec.count, bitfield)
            except StoreError as exc:
                raise self.error(tpos, exc.message) from None
            # FETCH_INSN_MAX slots, the last kept for END: a store that does
            # not replace the final dereference needs one more, and so do a
            # bitfield and an array loop.
            slots = fetched.slots
            for insn in tail[1:-1] if replace else tail[:-1]:
                slots += 1
                if slots >= FETCH_INSN_MAX:
                    if insn.op is FetchOp.MOD_BF:
                        raise self.error(tpos, TpErr.BAD_BITFIELD)
                    raise self.error(fetched.inner_pos, TpErr.TOO_MANY_OPS)
        pos = tspec.pos
        return TypeSpec(tspec.name if pos >= 0 else None, tspec.count, bitfield, pos=max(pos, bpos))

    def _bitfield(self, tname: str, tpos: int, bits: int) -> Bitfield:
        """__parse_bitfield_probe_arg: ``b<width>@<offset>/<container>``."""
        width, end = simple_strtoul(tname[1:])
        if width == 0 or tname[1 + end : 2 + end] != "@":
            raise self.error(tpos, TpErr.BAD_BITFIELD)
        rest = tname[2 + end :]
        offset, end = simple_strtoul(rest)
        if end == 0 or rest[end : end + 1] != "/" or width + offset > bits:
            raise self.error(tpos, TpErr.BAD_BITFIELD)
        return Bitfield(width, offset, bits)

    def _fetcharg(self, arg: str, pos: int, bare_all: bool = False) -> _Fetched:
        """parse_probe_arg: one FETCHARG (recursive through dereferences)."""
        c = arg[:1]
        if c == "$":
            return self._var(arg, pos, bare_all)
        if c == "%":
            name = _REGISTER_ALIASES.get(arg[1:], arg[1:])
            if name not in REGISTERS:
                raise self.error(pos, TpErr.BAD_REG_NAME)
            return _Fetched(Register(name, pos), 1, pos)
        if c == "@":
            return self._memory(arg, pos)
        if c in ("+", "-"):
            return self._deref(arg, pos)
        if c == "\\":
            return self._immediate(arg, pos)
        if c.isalpha() or c == "_":
            return self._btf_var(arg, pos)
        if c == "(":
            # "(STRUCT)VAR->member" typecasts need BTF struct lookups by name.
            raise self.error(pos, TpErr.NOSUP_BTFARG)
        raise self.error(pos, TpErr.BAD_FETCH_ARG)

    def _var(self, arg: str, pos: int, bare_all: bool) -> _Fetched:
        """parse_probe_vars: ``$retval``, ``$stack[N]``, ``$comm``, ``$argN``, ``$arg*``."""
        name = arg[1:]
        if name.startswith("retval"):
            if not self.is_return:
                raise self.error(pos, TpErr.RETVAL_ON_PROBE)
            return self._members(Retval(pos), 1, arg, pos, len("$retval"))
        if name.startswith("stack"):
            rest = name[5:]
            if not rest:
                return _Fetched(StackPointer(pos), 1, pos)
            n = kstrtoul(rest, 10) if rest[0].isdigit() else None
            if n is None:
                raise self.error(pos, TpErr.BAD_VAR)
            if n > PARAM_MAX_STACK:
                raise self.error(pos, TpErr.BAD_STACK_NUM)
            return _Fetched(StackEntry(n, pos), 1, pos)
        if name in ("comm", "COMM"):
            return _Fetched(Comm(pos), 1, pos)
        if name.startswith("arg"):
            rest = name[3:]
            if rest.startswith("*"):
                if not (bare_all and rest == "*"):
                    raise self.error(pos, TpErr.BAD_VAR_ARGS)
                return _Fetched(AllArgs(pos), 1, pos)
            digits = re.match(r"\d*", rest)
            assert digits is not None
            n = kstrtoul(digits.group(), 10) if digits.group() else None
            if n is None:
                raise self.error(pos, TpErr.BAD_VAR)
            if n == 0 or n > PARAM_MAX_STACK:
                raise self.error(pos, TpErr.BAD_ARG_NUM)
            if not (self.on_entry or self.is_return):
                raise self.error(pos, TpErr.NOFENTRY_ARGS)
            # "$argN->member" is a qprobes extension (Linux allows members
            # only on parameters named through BTF).
            return self._members(Arg(n, pos), 1, arg, pos, 4 + len(digits.group()))
        raise self.error(pos, TpErr.BAD_VAR)

    def _btf_var(self, arg: str, pos: int) -> _Fetched:
        """A parameter named through BTF, ``VAR[->member...]``."""
        if not (self.on_entry or self.is_return):
            raise self.error(pos, TpErr.NOSUP_BTFARG)
        m = _FIELD.match(arg)
        assert m is not None
        if not _IDENT.fullmatch(m.group()):
            raise self.error(pos, TpErr.BAD_FETCH_ARG)
        return self._members(BtfVar(m.group(), pos), 1, arg, pos, m.end())

    def _members(self, base: FetchArg, slots: int, arg: str, pos: int, end: int) -> _Fetched:
        """The ``->a.b->c`` after a base (split_next_field, parse_btf_field)."""
        rest = arg[end:]
        if not rest:
            return _Fetched(base, slots, pos)
        if rest[0] == ".":
            raise self.error(pos + end, TpErr.NOSUP_DAT_ARG)
        if not rest.startswith("->"):
            if rest[0] == "-":
                raise self.error(pos + end, TpErr.BAD_HYPHEN)
            raise self.error(pos, TpErr.BAD_VAR if arg[0] == "$" else TpErr.BAD_FETCH_ARG)
        chain: list[tuple[str, ...]] = []
        columns: list[int] = []
        i = end
        while i < len(arg):
            if not arg.startswith("->", i):
                raise self.error(pos + i, TpErr.BAD_HYPHEN)
            i += 2
            columns.append(pos + i)
            path: list[str] = []
            while True:
                m = _FIELD.match(arg, i)
                assert m is not None
                if not _IDENT.fullmatch(m.group()):
                    raise self.error(pos + i, TpErr.NO_BTF_FIELD)
                path.append(m.group())
                i = m.end()
                if arg[i : i + 1] != ".":
                    break
                i += 1
            chain.append(tuple(path))
            slots += 1
            if slots >= FETCH_INSN_MAX:
                raise self.error(columns[-1], TpErr.TOO_MANY_OPS)
        node = MemberAccess(base, tuple(chain), pos, tuple(columns))
        return _Fetched(node, slots, pos)

    def _memory(self, arg: str, pos: int) -> _Fetched:
        """``@ADDR`` or ``@SYM[+|-offs]``."""
        rest = arg[1:]
        if rest[:1].isdigit():
            addr = kstrtoul(rest)
            if addr is None:
                raise self.error(pos, TpErr.BAD_MEM_ADDR)
            return _Fetched(Memory(addr, pos), 2, pos)
        if rest[:1] == "+":
            raise self.error(pos, TpErr.FILE_ON_KPROBE)
        split = re.search(r"[+-]", rest)
        name, offset = rest, 0
        if split is not None:
            value = kstrtol(rest[split.start() :])
            if value is None:
                raise self.error(pos, TpErr.BAD_MEM_ADDR)
            name, offset = rest[: split.start()], value
        if not _SYMBOL.fullmatch(name):
            raise self.error(pos, TpErr.BAD_MEM_ADDR)
        # FETCH_NOP_SYMBOL holds the name, then IMM and DEREF.
        return _Fetched(SymbolRef(name, offset, pos), 3, pos)

    def _deref(self, arg: str, pos: int) -> _Fetched:
        """``+|-[u]OFFS(FETCHARG)``."""
        user = arg[1:2] == "u"
        sign, text = arg[0], arg[2:] if user else arg[1:]
        brace = text.find("(")
        if brace < 0:
            raise self.error(pos, TpErr.DEREF_NEED_BRACE)
        offset = kstrtol(("-" if sign == "-" else "") + text[:brace])
        if offset is None:
            raise self.error(pos, TpErr.BAD_DEREF_OFFS)
        start = len(arg) - len(text) + brace + 1
        inner_pos = pos + start
        rest = arg[start:]
        close = rest.rfind(")")
        if close < 0:
            raise self.error(inner_pos + len(rest), TpErr.DEREF_OPEN_BRACE)
        if close != len(rest) - 1:
            # Linux ignores what follows the last ')'; qprobes refuses it.
            raise self.error(inner_pos + close + 1, TpErr.BAD_FETCH_ARG)
        inner = self._fetcharg(rest[:close], inner_pos)
        if isinstance(inner.node, Comm | ImmString):
            raise self.error(inner_pos, TpErr.COMM_CANT_DEREF)
        slots = inner.slots + 1
        if slots >= FETCH_INSN_MAX:
            raise self.error(inner_pos, TpErr.TOO_MANY_OPS)
        return _Fetched(Deref(offset, inner.node, user, pos), slots, inner_pos)

    def _immediate(self, arg: str, pos: int) -> _Fetched:
        r"""``\IMM`` or ``\"STRING"``."""
        if arg[1:2] == '"':
            text = arg[2:]
            if not text.endswith('"'):
                raise self.error(pos + len(arg), TpErr.IMMSTR_NO_CLOSE)
            return _Fetched(ImmString(text[:-1], pos), 1, pos)
        # str_to_immediate
        text = arg[1:]
        value: int | None = None
        if text[:1].isdigit():
            value = kstrtoul(text)
        elif text[:1] == "-":
            value = kstrtol(text)
        elif text[:1] == "+":
            value = kstrtol(text[1:])
        if value is None:
            raise self.error(pos + 1, TpErr.BAD_IMM)
        return _Fetched(Immediate(value, pos), 1, pos)


def parse_probe(spec: str) -> ProbeSpec | RemoveSpec:
    """Parse one ``kprobe_events`` line: a ``p``/``r`` definition or a ``-:`` removal.

    Pure: symbols and types are not looked up (see
    :func:`~qprobes.tracing.fetch.compile_fetchargs`). Raises
    :class:`~qprobes.errors.ProbeSyntaxError` with Linux's message and the
    column of the fault.
    """
    return _Parser(spec).parse()
