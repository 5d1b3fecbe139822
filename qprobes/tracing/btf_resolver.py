"""A :class:`~qprobes.tracing.types.TypeResolver` over parsed BTF.

:class:`BtfTypeResolver` answers the probe language's questions (a
function's parameter names and types, its return type, where a member
lies) from a :class:`~qprobes.symbols.btf.Btf`, turning BTF types into the
language's :class:`~qprobes.tracing.types.CType` the way Linux's
``trace_probe.c`` reads them: typedefs, ``const``, ``volatile``,
``restrict`` and type tags are skipped (``btf_type_skip_modifiers``), the
``...`` of a varargs prototype is not a parameter (``get_btf_args``), and
member paths search anonymous structs and unions
(``btf_find_struct_member``) but never cross a pointer (each ``->`` is a
separate dereference, which the compiler does).

Mapping of BTF kinds to :class:`~qprobes.tracing.types.CKind`:

==========================  ===================================================
INT                         INT with its size; signed when BTF_INT_SIGNED
ENUM, ENUM64                ENUM with its size and name, signed with kind_flag
                            (an integer: Linux fetches it as s32/s64)
PTR                         PTR (8 bytes) to the pointee; to VOID for ``void *``
                            and for pointers to functions
STRUCT, UNION               STRUCT or UNION with its size and tag; an anonymous
                            one takes the name of the typedef that led to it
FWD                         the complete struct or union of that name, else
                            an empty (size 0) one
ARRAY                       ARRAY of the element type
void (id 0)                 VOID
FLOAT, FUNC_PROTO, others   no CType (None: "not known")
==========================  ===================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from qprobes.symbols.btf import (
    BTF_INT_SIGNED,
    Btf,
    BtfError,
    BtfKind,
    BtfMember,
    BtfParam,
    BtfType,
)
from qprobes.tracing.types import VOID, CKind, CType, Member

__all__ = ["BtfTypeResolver"]

# What btf_type_skip_modifiers skips (and TYPE_TAG, which Btf.resolve skips too).
_MODIFIERS = frozenset(
    {BtfKind.TYPEDEF, BtfKind.VOLATILE, BtfKind.CONST, BtfKind.RESTRICT, BtfKind.TYPE_TAG}
)
_RECORDS = (BtfKind.STRUCT, BtfKind.UNION)
_MAX_DEPTH = 64  # modifier chains, pointer/array nesting, anonymous-member nesting


class BtfTypeResolver:
    """The probe language's :class:`~qprobes.tracing.types.TypeResolver`
    over a parsed BTF blob.

    Every method answers None where BTF does not know (no FUNC of that name,
    no such parameter or member, a malformed type) rather than raising.
    """

    def __init__(self, btf: Btf) -> None:
        self.btf = btf
        self._ctypes: dict[int, CType | None] = {}
        self._protos: dict[str, tuple[tuple[BtfParam, ...], int] | None] = {}

    # --- TypeResolver ------------------------------------------------------------

    def arg_names(self, func: str) -> Sequence[str] | None:
        """The parameter names of ``func``, in order (a varargs ``...`` is left out)."""
        proto = self._proto(func)
        return None if proto is None else [p.name for p in proto[0]]

    def arg_type(self, func: str, index: int) -> CType | None:
        """The type of parameter ``index`` (0-based) of ``func``."""
        proto = self._proto(func)
        if proto is None or not 0 <= index < len(proto[0]):
            return None
        return self.ctype(proto[0][index].type_id)

    def return_type(self, func: str) -> CType | None:
        """The return type of ``func``: :data:`~qprobes.tracing.types.VOID`
        for void, None when unknown (or, like ``double``, not in the model)."""
        proto = self._proto(func)
        return None if proto is None else self.ctype(proto[1])

    def member(self, struct_name: str, path: Sequence[str]) -> Member | None:
        """The member at dot-connected ``path`` of the struct or union ``struct_name``.

        ``offset`` is in bytes from the start of the struct. For a bitfield,
        as in Linux's ``parse_btf_field``, ``offset`` is the byte holding its
        first bit, ``bit_offset`` (0-7) where it starts in that byte and
        ``bit_size`` its width; ``size`` and ``type`` are those of the
        storage the compiler reads there (the declared integer type, made
        wider when the bits would not fit in it from that byte).
        """
        if not path:
            return None
        try:
            obj = self.btf.find_struct(struct_name)
            bits = 0
            found: BtfMember | None = None
            for name in path:
                if found is not None:
                    obj = self.btf.resolve(found.type_id)
                    if obj.kind not in _RECORDS:
                        return None  # a "." after a non-struct (a pointer: "->" it)
                hit = self._find_member(obj, name, 0)
                if hit is None:
                    return None
                found, offset = hit
                bits += offset
            assert found is not None
            return self._member(found, bits)
        except BtfError:
            return None

    # --- C types -------------------------------------------------------------------

    def ctype(self, type_id: int) -> CType | None:
        """The language's C type for BTF type ``type_id`` (None: not representable)."""
        if type_id not in self._ctypes:
            try:
                self._ctypes[type_id] = self._convert(type_id, 0)
            except BtfError:
                self._ctypes[type_id] = None
        return self._ctypes[type_id]

    def _convert(self, type_id: int, depth: int) -> CType | None:
        if depth > _MAX_DEPTH:
            raise BtfError(f"type id {type_id}: nested too deeply")
        t, alias = self._skip_modifiers(type_id)
        kind = t.kind
        if kind is BtfKind.UNKN:
            return VOID
        if kind is BtfKind.INT:
            return CType.int_(t.size, signed=bool(t.int_encoding & BTF_INT_SIGNED))
        if kind in (BtfKind.ENUM, BtfKind.ENUM64):
            return CType(CKind.ENUM, t.size, signed=t.kind_flag, name=t.name)
        if kind is BtfKind.PTR:
            target = self._convert(t.type_id, depth + 1)
            return CType.ptr(target or VOID)
        if kind in _RECORDS:
            return self._record(t, alias)
        if kind is BtfKind.FWD:
            complete = self._complete(t)
            if complete is not None:
                return self._record(complete, alias)
            return CType(CKind.UNION if t.kind_flag else CKind.STRUCT, 0, name=t.name or alias)
        if kind is BtfKind.ARRAY:
            assert t.array is not None
            elem = self._convert(t.array.type_id, depth + 1)
            return None if elem is None else CType.array(elem, t.array.nelems)
        return None

    def _skip_modifiers(self, type_id: int) -> tuple[BtfType, str]:
        """The type behind modifiers and typedefs, and the first typedef's name."""
        t = self.btf.type(type_id)
        alias = ""
        for _ in range(_MAX_DEPTH):
            if t.kind not in _MODIFIERS:
                return t, alias
            if t.kind is BtfKind.TYPEDEF and not alias:
                alias = t.name
            t = self.btf.type(t.type_id)
        raise BtfError(f"type id {type_id}: modifier loop")

    @staticmethod
    def _record(t: BtfType, alias: str) -> CType:
        # An anonymous struct is named after its typedef, which
        # Btf.find_struct (and so member()) follows back to it.
        kind = CKind.UNION if t.kind is BtfKind.UNION else CKind.STRUCT
        return CType(kind, t.size, name=t.name or alias)

    def _complete(self, fwd: BtfType) -> BtfType | None:
        """The struct or union a forward declaration declares, if BTF has it."""
        want = BtfKind.UNION if fwd.kind_flag else BtfKind.STRUCT
        for type_id in self.btf.ids(fwd.name):
            t = self.btf.type(type_id)
            if t.kind is want:
                return t
        return None

    # --- functions and members -----------------------------------------------------

    def _proto(self, func: str) -> tuple[tuple[BtfParam, ...], int] | None:
        """(parameters without a varargs ``...``, return type id) of ``func``."""
        if func not in self._protos:
            try:
                proto = self.btf.func_proto(func)
            except BtfError:
                self._protos[func] = None
            else:
                params = proto.params
                if params and params[-1].type_id == 0:
                    params = params[:-1]
                self._protos[func] = (params, proto.type_id)
        return self._protos[func]

    def _find_member(self, obj: BtfType, name: str, depth: int) -> tuple[BtfMember, int] | None:
        """The member ``name`` of ``obj`` and its bit offset in ``obj``,
        searching anonymous struct and union members as C does."""
        if depth > _MAX_DEPTH:
            raise BtfError(f"{obj.name or obj.id}: anonymous members nested too deeply")
        for member in obj.members:
            if member.name == name:
                return member, member.bit_offset
        for member in obj.members:
            if not member.name:
                inner = self.btf.resolve(member.type_id)
                if inner.kind in _RECORDS:
                    found = self._find_member(inner, name, depth + 1)
                    if found is not None:
                        return found[0], member.bit_offset + found[1]
        return None

    def _member(self, member: BtfMember, bits: int) -> Member | None:
        ctype = self.ctype(member.type_id)
        width = member.bitfield_size
        resolved = self.btf.resolve(member.type_id)
        if (
            not width
            and resolved.kind is BtfKind.INT
            and (resolved.int_offset or resolved.int_bits != resolved.size * 8)
        ):
            # An old-style bitfield (a struct without kind_flag): the member's
            # INT type carries the width and an extra bit offset.
            width = resolved.int_bits
            bits += resolved.int_offset
        if ctype is None:
            # Not a type the model has (a float): opaque storage of its size,
            # which the compiler fetches with the default type.
            ctype = CType(CKind.VOID, self._sizeof(member.type_id))
        if not width:
            return Member(bits // 8, self._sizeof(member.type_id) or ctype.size, ctype)
        offset, bit_offset = divmod(bits, 8)
        if bit_offset + width > ctype.size * 8:
            # A bitfield straddling its storage unit (packed structs): read a
            # wider integer from the same byte.
            size = next((s for s in (1, 2, 4, 8) if bit_offset + width <= s * 8), None)
            if size is None:
                return None
            ctype = dataclasses.replace(ctype, kind=CKind.INT, size=size, name="")
        return Member(offset, ctype.size, ctype, bit_offset, width)

    def _sizeof(self, type_id: int) -> int:
        try:
            return self.btf.sizeof(type_id)
        except BtfError:
            return 0
