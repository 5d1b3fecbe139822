"""Kernel types from BTF, the BPF Type Format (``CONFIG_DEBUG_INFO_BTF=y``).

The kernel embeds its BTF between ``__start_BTF`` and ``__stop_BTF`` (the
``.BTF`` section, in read-only data); both symbols are in kallsyms.
:func:`parse_btf` is pure; :func:`read_guest_btf` reads the blob out of a
stopped guest.

Format (include/uapi/linux/btf.h, Documentation/bpf/btf.rst): a header
(``struct btf_header``: magic 0xeB9F, version 1, flags, hdr_len, then the
offsets and lengths of the type and string sections, relative to the header's
end), the type section, and the string section (NUL-terminated strings,
offset 0 is ""). Each type is a ``struct btf_type`` (name_off; info = vlen in
bits 0-15, kind in bits 24-28, kind_flag in bit 31; size or type) followed by
kind-specific data:

=============  ==============================================================
INT            u32: encoding (bits 24-27), bit offset (16-23), bits (0-7)
ARRAY          ``struct btf_array`` {type, index_type, nelems}
STRUCT, UNION  vlen x ``struct btf_member`` {name_off, type, offset}; with
               kind_flag, offset = bitfield size << 24 | bit offset
ENUM           vlen x ``struct btf_enum`` {name_off, s32 val} (kind_flag:
               signed, v6.0)
FUNC_PROTO     vlen x ``struct btf_param`` {name_off, type}
VAR            ``struct btf_var`` {linkage}
DATASEC        vlen x ``struct btf_var_secinfo`` {type, offset, size}
DECL_TAG       ``struct btf_decl_tag`` {s32 component_idx}
ENUM64         vlen x ``struct btf_enum64`` {name_off, val_lo32, val_hi32} (v6.0)
others         nothing (PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC,
               FLOAT, TYPE_TAG)
=============  ==============================================================

Type ids count from 1 in section order; id 0 is ``void``. FUNC's vlen is its
linkage and its ``type`` a FUNC_PROTO, whose ``type`` is the return type.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qprobes.errors import SymbolError

if TYPE_CHECKING:
    from qprobes.symbols.elf import SymbolTable
    from qprobes.symbols.kallsyms import ReadPhys
    from qprobes.target.target import Target

BTF_MAGIC = 0xEB9F
BTF_VERSION = 1
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")


class BtfError(SymbolError):
    """The BTF blob is malformed, or a type or member is not in it."""


class BtfKind(enum.IntEnum):
    """``BTF_KIND_*`` (include/uapi/linux/btf.h)."""

    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Kinds whose btf_type third word is a size; the others name a type id.
_SIZED = frozenset(
    {
        BtfKind.INT,
        BtfKind.STRUCT,
        BtfKind.UNION,
        BtfKind.ENUM,
        BtfKind.DATASEC,
        BtfKind.FLOAT,
        BtfKind.ENUM64,
    }
)
# Qualifiers and aliases that :meth:`Btf.resolve` looks through.
_TRANSPARENT = frozenset(
    {BtfKind.TYPEDEF, BtfKind.VOLATILE, BtfKind.CONST, BtfKind.RESTRICT, BtfKind.TYPE_TAG}
)
_QUALIFIERS = {BtfKind.CONST: "const", BtfKind.VOLATILE: "volatile", BtfKind.RESTRICT: "restrict"}
# Bytes of kind-specific data: fixed, or per vlen entry.
_EXTRA_FIXED = {BtfKind.INT: 4, BtfKind.ARRAY: 12, BtfKind.VAR: 4, BtfKind.DECL_TAG: 4}
_EXTRA_PER_VLEN = {
    BtfKind.STRUCT: 12,
    BtfKind.UNION: 12,
    BtfKind.ENUM: 8,
    BtfKind.FUNC_PROTO: 8,
    BtfKind.DATASEC: 12,
    BtfKind.ENUM64: 12,
}

BTF_INT_SIGNED = 1 << 0
BTF_INT_CHAR = 1 << 1
BTF_INT_BOOL = 1 << 2

POINTER_SIZE = 8  # x86_64


@dataclass(frozen=True)
class BtfMember:
    """A struct or union member; ``bitfield_size`` is 0 for ordinary members."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int = 0


@dataclass(frozen=True)
class BtfParam:
    """A FUNC_PROTO parameter (``type_id`` 0 and no name: the ``...`` of a varargs)."""

    name: str
    type_id: int


@dataclass(frozen=True)
class BtfEnumValue:
    name: str
    value: int


@dataclass(frozen=True)
class BtfArray:
    type_id: int
    index_type_id: int
    nelems: int


@dataclass(frozen=True)
class BtfVarSecinfo:
    type_id: int
    offset: int
    size: int


@dataclass(frozen=True)
class BtfType:
    """One decoded type. ``size`` is set for sized kinds (INT, STRUCT, UNION,
    ENUM, ENUM64, DATASEC, FLOAT), ``type_id`` for the kinds that refer to
    another type; the tuples hold the kind's vlen entries."""

    id: int
    kind: BtfKind
    name: str
    kind_flag: bool = False
    vlen: int = 0
    size: int = 0
    type_id: int = 0
    int_encoding: int = 0
    int_offset: int = 0
    int_bits: int = 0
    members: tuple[BtfMember, ...] = ()
    params: tuple[BtfParam, ...] = ()
    values: tuple[BtfEnumValue, ...] = ()
    array: BtfArray | None = None
    linkage: int = 0
    secinfos: tuple[BtfVarSecinfo, ...] = ()
    component_idx: int = -1


@dataclass(frozen=True)
class MemberInfo:
    """Where a member is, relative to the start of the object searched.

    ``bit_offset`` counts from that object's start; ``size`` is the size in
    bytes of the member's type (for a bitfield, of its underlying integer).
    """

    path: str
    type_id: int
    bit_offset: int
    size: int
    bitfield_size: int = 0

    @property
    def offset(self) -> int:
        """Byte offset (of the byte holding the first bit, for a bitfield)."""
        return self.bit_offset // 8

    @property
    def is_bitfield(self) -> bool:
        return self.bitfield_size != 0


VOID = BtfType(0, BtfKind.UNKN, "void")

_PATH_RE = re.compile(r"\s*(->|\.)?\s*([A-Za-z_]\w*)\s*((?:\[\s*\d+\s*\]\s*)*)")


def _parse_path(path: str) -> list[tuple[str, str, list[int]]]:
    """``"a.b[2]->c"`` -> ``[("", "a", []), (".", "b", [2]), ("->", "c", [])]``."""
    out: list[tuple[str, str, list[int]]] = []
    pos = 0
    text = path.strip()
    while pos < len(text):
        match = _PATH_RE.match(text, pos)
        if match is None or (out and not match.group(1)) or (not out and match.group(1)):
            raise BtfError(f"bad member path {path!r} at {text[pos:]!r}")
        indices = [int(i) for i in re.findall(r"\d+", match.group(3))]
        out.append((match.group(1) or "", match.group(2), indices))
        pos = match.end()
    if not out:
        raise BtfError("empty member path")
    return out


class Btf:
    """A parsed BTF blob: types by id and by name, and C-level lookups.

    With ``base``, the blob is *split* BTF (a module's, ``btf_data``, built
    against vmlinux): its type ids continue after the base's and its string
    offsets after the base's string section (``btf_parse_module``); lookups
    see the base's types too.
    """

    def __init__(self, data: bytes, base: Btf | None = None) -> None:
        if len(data) < _HEADER.size:
            raise BtfError(f"BTF blob of {len(data)} bytes is shorter than its header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(
            data
        )
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#06x} (expected {BTF_MAGIC:#06x})")
        if version != BTF_VERSION:
            raise BtfError(f"unsupported BTF version {version}")
        types_start = hdr_len + type_off
        strs_start = hdr_len + str_off
        if types_start + type_len > len(data) or strs_start + str_len > len(data):
            raise BtfError("BTF sections run past the end of the blob")
        self.data = bytes(data)
        self.base = base
        self._strings = self.data[strs_start : strs_start + str_len]
        self._str_base: int = len(base._strings) + base._str_base if base is not None else 0
        # The first type id of this blob (1, or after the base's types).
        self._first = len(base._offsets) if base is not None else 1
        # type id -> offset of its btf_type (id 0: void; a split blob's base ids unused).
        self._offsets: list[int] = [0] * self._first
        self._cache: dict[int, BtfType] = {0: VOID}
        self._names: dict[str, list[int]] | None = None
        self._param_names: dict[int, str] = {}
        self._scan(types_start, types_start + type_len)

    def _scan(self, pos: int, end: int) -> None:
        data = self.data
        unpack = _TYPE.unpack_from
        offsets = self._offsets
        while pos < end:
            if pos + _TYPE.size > end:
                raise BtfError(f"truncated btf_type at type section offset {pos:#x}")
            _name_off, info, _size = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            try:
                k = BtfKind(kind)
            except ValueError:
                raise BtfError(f"unknown BTF kind {kind} for type id {len(offsets)}") from None
            offsets.append(pos)
            pos += _TYPE.size + _EXTRA_FIXED.get(k, 0) + _EXTRA_PER_VLEN.get(k, 0) * vlen
        if pos != end:
            raise BtfError("the last BTF type runs past the type section")

    def __len__(self) -> int:
        """The number of types, ``void`` not counted."""
        return len(self._offsets) - 1

    def string(self, offset: int) -> str:
        """The string at ``offset`` in the string section."""
        if self.base is not None:
            if offset < self._str_base:
                return self.base.string(offset)
            offset -= self._str_base
        end = self._strings.find(b"\0", offset)
        if offset < 0 or end < 0:
            raise BtfError(f"string offset {offset:#x} is outside the string section")
        return self._strings[offset:end].decode("utf-8", "replace")

    # --- types by id and by name ------------------------------------------------

    def type(self, type_id: int) -> BtfType:
        """The type with id ``type_id`` (0 is ``void``)."""
        cached = self._cache.get(type_id)
        if cached is not None:
            return cached
        if self.base is not None and 0 < type_id < self._first:
            return self.base.type(type_id)
        if not 0 < type_id < len(self._offsets):
            raise BtfError(f"no BTF type id {type_id} (the blob has {len(self)})")
        decoded = self._decode(type_id)
        self._cache[type_id] = decoded
        return decoded

    def _decode(self, type_id: int) -> BtfType:
        data = self.data
        pos = self._offsets[type_id]
        name_off, info, size_or_type = _TYPE.unpack_from(data, pos)
        kind = BtfKind((info >> 24) & 0x1F)
        vlen = info & 0xFFFF
        kflag = bool(info >> 31)
        name = self.string(name_off)
        extra = pos + _TYPE.size
        common: dict[str, object] = {}
        if kind in _SIZED:
            common["size"] = size_or_type
        elif kind is not BtfKind.FWD and kind is not BtfKind.UNKN:
            common["type_id"] = size_or_type
        if kind is BtfKind.INT:
            (word,) = struct.unpack_from("<I", data, extra)
            common.update(
                int_encoding=(word >> 24) & 0x0F, int_offset=(word >> 16) & 0xFF,
                int_bits=word & 0xFF,
            )  # fmt: skip
        elif kind is BtfKind.ARRAY:
            common["array"] = BtfArray(*struct.unpack_from("<III", data, extra))
        elif kind in (BtfKind.STRUCT, BtfKind.UNION):
            members = []
            for m_name, m_type, m_off in struct.iter_unpack(
                "<III", data[extra : extra + 12 * vlen]
            ):
                if kflag:
                    bits, offset = m_off >> 24, m_off & 0xFFFFFF
                else:
                    bits, offset = 0, m_off
                members.append(BtfMember(self.string(m_name), m_type, offset, bits))
            common["members"] = tuple(members)
        elif kind is BtfKind.ENUM:
            # Signed when kind_flag is set (v6.0), unsigned otherwise (libbpf's
            # btf_enum value reading does the same).
            values = []
            for n, v in struct.iter_unpack("<II", data[extra : extra + 8 * vlen]):
                if kflag and v >> 31:
                    v -= 1 << 32
                values.append(BtfEnumValue(self.string(n), v))
            common["values"] = tuple(values)
        elif kind is BtfKind.ENUM64:
            values = []
            for n, lo, hi in struct.iter_unpack("<III", data[extra : extra + 12 * vlen]):
                value = lo | hi << 32
                if kflag and value >> 63:
                    value -= 1 << 64
                values.append(BtfEnumValue(self.string(n), value))
            common["values"] = tuple(values)
        elif kind is BtfKind.FUNC_PROTO:
            common["params"] = tuple(
                BtfParam(self.string(n), t)
                for n, t in struct.iter_unpack("<II", data[extra : extra + 8 * vlen])
            )
        elif kind is BtfKind.VAR:
            (common["linkage"],) = struct.unpack_from("<I", data, extra)
        elif kind is BtfKind.FUNC:
            common["linkage"] = vlen
        elif kind is BtfKind.DATASEC:
            common["secinfos"] = tuple(
                BtfVarSecinfo(*entry)
                for entry in struct.iter_unpack("<III", data[extra : extra + 12 * vlen])
            )
        elif kind is BtfKind.DECL_TAG:
            (common["component_idx"],) = struct.unpack_from("<i", data, extra)
        return BtfType(type_id, kind, name, kflag, vlen, **common)  # type: ignore[arg-type]

    def _name_index(self) -> dict[str, list[int]]:
        if self._names is None:
            names: dict[str, list[int]] = {}
            if self.base is not None:
                names = {k: list(v) for k, v in self.base._name_index().items()}
            data = self.data
            for type_id in range(self._first, len(self._offsets)):
                (name_off,) = struct.unpack_from("<I", data, self._offsets[type_id])
                if name_off:
                    names.setdefault(self.string(name_off), []).append(type_id)
            self._names = names
        return self._names

    def ids(self, name: str) -> list[int]:
        """Ids of every type called ``name``, in id order."""
        return list(self._name_index().get(name, ()))

    def find(self, name: str, kind: BtfKind | tuple[BtfKind, ...] | None = None) -> BtfType:
        """The type called ``name`` (of ``kind``, if given). A complete struct or
        union is preferred to a forward declaration of the same name."""
        kinds = (kind,) if isinstance(kind, BtfKind) else kind
        found = [self.type(i) for i in self.ids(name)]
        if kinds is not None:
            found = [t for t in found if t.kind in kinds]
        if not found:
            what = "/".join(k.name for k in kinds) if kinds else "type"
            raise BtfError(f"no BTF {what} named {name!r}")
        complete = [t for t in found if t.kind is not BtfKind.FWD]
        return (complete or found)[0]

    def enumerators(self, prefix: str) -> dict[str, int]:
        """Every enumerator whose name starts with ``prefix``, from any ENUM or
        ENUM64 (anonymous ones too: ``enum { FTRACE_FL_ENABLED = ... }``)."""
        data = self.data
        out: dict[str, int] = self.base.enumerators(prefix) if self.base is not None else {}
        for type_id in range(self._first, len(self._offsets)):
            (info,) = struct.unpack_from("<I", data, self._offsets[type_id] + 4)
            if (info >> 24) & 0x1F in (BtfKind.ENUM, BtfKind.ENUM64):
                for value in self.type(type_id).values:
                    if value.name.startswith(prefix):
                        out.setdefault(value.name, value.value)
        return out

    def find_struct(self, name: str) -> BtfType:
        """The struct or union ``name`` (a typedef of one is followed too)."""
        name = name.removeprefix("struct ").removeprefix("union ").strip()
        try:
            return self.find(name, (BtfKind.STRUCT, BtfKind.UNION))
        except BtfError:
            pass
        for type_id in self.ids(name):
            resolved = self.resolve(type_id)
            if resolved.kind in (BtfKind.STRUCT, BtfKind.UNION):
                return resolved
        if self.ids(name):
            raise BtfError(f"{name!r} is not a struct or union")
        raise BtfError(f"no BTF struct or union named {name!r}")

    # --- type arithmetic -----------------------------------------------------------

    def resolve(self, type_id: int) -> BtfType:
        """The type behind typedefs, const, volatile, restrict and type tags."""
        seen = 0
        t = self.type(type_id)
        while t.kind in _TRANSPARENT:
            seen += 1
            if seen > 64:
                raise BtfError(f"type id {type_id}: qualifier loop")
            t = self.type(t.type_id)
        return t

    def sizeof(self, type_id: int) -> int:
        """``sizeof`` the type, in bytes."""
        return self._sizeof(type_id, 0)

    def _sizeof(self, type_id: int, depth: int) -> int:
        _check_depth(type_id, depth)
        t = self.resolve(type_id)
        if t.kind in (BtfKind.INT, BtfKind.STRUCT, BtfKind.UNION, BtfKind.ENUM, BtfKind.ENUM64,
                      BtfKind.FLOAT, BtfKind.DATASEC):  # fmt: skip
            return t.size
        if t.kind is BtfKind.PTR:
            return POINTER_SIZE
        if t.kind is BtfKind.ARRAY:
            assert t.array is not None
            return t.array.nelems * self._sizeof(t.array.type_id, depth + 1)
        if t.kind is BtfKind.VAR:
            return self._sizeof(t.type_id, depth + 1)
        raise BtfError(f"type id {type_id} ({t.kind.name} {t.name!r}) has no size")

    def type_name(self, type_id: int) -> str:
        """The type as C spells it: ``const char *``, ``struct open_how *``,
        ``int [16]``, ``void (*)(int)``."""
        return self._declare(type_id, "", 0).strip()

    def _param_name(self, type_id: int, depth: int) -> str:
        # Cached: prototypes whose parameters name prototypes would otherwise
        # spell the same types over and over (exponentially, in a crafted blob).
        name = self._param_names.get(type_id)
        if name is None:
            name = self._declare(type_id, "", depth + 1).strip()
            self._param_names[type_id] = name
        return name

    def _declare(self, type_id: int, inner: str, depth: int) -> str:
        _check_depth(type_id, depth)
        t = self.type(type_id)
        kind = t.kind
        if kind is BtfKind.UNKN:
            return _join("void", inner)
        if kind in (BtfKind.INT, BtfKind.FLOAT, BtfKind.TYPEDEF):
            return _join(t.name, inner)
        if kind in (BtfKind.STRUCT, BtfKind.UNION, BtfKind.ENUM, BtfKind.ENUM64):
            tag = {BtfKind.STRUCT: "struct", BtfKind.UNION: "union"}.get(kind, "enum")
            return _join(f"{tag} {t.name or '(anon)'}", inner)
        if kind is BtfKind.FWD:
            return _join(f"{'union' if t.kind_flag else 'struct'} {t.name}", inner)
        if kind in _QUALIFIERS:
            base = self.type(t.type_id)
            if base.kind in (BtfKind.PTR,):
                return self._declare(t.type_id, _join(_QUALIFIERS[kind], inner), depth + 1)
            return _QUALIFIERS[kind] + " " + self._declare(t.type_id, inner, depth + 1)
        if kind is BtfKind.TYPE_TAG:
            return self._declare(t.type_id, inner, depth + 1)
        if kind is BtfKind.PTR:
            target = self.type(t.type_id)
            star = "*" + inner.lstrip() if inner.strip() else "*"
            if target.kind in (BtfKind.ARRAY, BtfKind.FUNC_PROTO):
                star = f"({star})"
            return self._declare(t.type_id, star, depth + 1)
        if kind is BtfKind.ARRAY:
            assert t.array is not None
            return self._declare(t.array.type_id, f"{inner}[{t.array.nelems}]", depth + 1)
        if kind is BtfKind.FUNC_PROTO:
            args = ", ".join(
                "..." if p.type_id == 0 and not p.name else self._param_name(p.type_id, depth)
                for p in t.params
            )
            if len(args) > _MAX_NAME:
                raise BtfError(
                    f"type id {type_id}: its C spelling runs past {_MAX_NAME} characters"
                )
            return self._declare(t.type_id, f"{inner}({args or 'void'})", depth + 1)
        if kind in (BtfKind.FUNC, BtfKind.VAR):
            return self._declare(t.type_id, inner or t.name, depth + 1)
        return _join(f"<{kind.name.lower()} {t.name}>", inner)

    # --- members ------------------------------------------------------------------

    def member_chain(self, struct_name: str, path: str) -> list[MemberInfo]:
        """Resolve a member path into one :class:`MemberInfo` per object.

        ``path`` is C-like: ``se.vruntime``, ``comm``, ``cpus_mask.bits[0]``,
        ``mm->pgd``; a ``.`` after a pointer member is read as ``->``.
        Anonymous struct and union members are searched through, as C does.
        The first element is relative to ``struct_name``; each further element
        is relative to the object the previous one points to (kprobe-events
        style: ``+off2(+off1(%di))``).
        """
        tokens = _parse_path(path)
        obj = self.find_struct(struct_name)
        base_bits = 0
        chain: list[MemberInfo] = []
        cur: MemberInfo | None = None
        for sep, name, indices in tokens:
            if cur is not None:
                t = self.resolve(cur.type_id)
                if t.kind is BtfKind.PTR:
                    chain.append(cur)
                    obj, base_bits = self.resolve(t.type_id), 0
                elif sep == "->":
                    raise BtfError(f"{cur.path!r} is not a pointer ({self.type_name(t.id)})")
                else:
                    obj, base_bits = t, cur.bit_offset
                if obj.kind not in (BtfKind.STRUCT, BtfKind.UNION):
                    raise BtfError(
                        f"{cur.path!r} is {self.type_name(cur.type_id)!r}, not a struct or union"
                    )
            found = self._find_member(obj, name)
            if found is None:
                raise BtfError(f"{_describe(obj)} has no member {name!r}")
            member, bits = found
            prefix = "" if cur is None else f"{cur.path}{sep}"
            cur = MemberInfo(
                path=prefix + name,
                type_id=member.type_id,
                bit_offset=base_bits + bits,
                size=self._member_size(member),
                bitfield_size=member.bitfield_size,
            )
            for index in indices:
                arr = self.resolve(cur.type_id)
                if arr.kind is not BtfKind.ARRAY or arr.array is None:
                    raise BtfError(f"{cur.path!r} is not an array")
                nelems = arr.array.nelems
                if nelems and index >= nelems:
                    raise BtfError(f"{cur.path}[{index}] is out of bounds (it has {nelems})")
                esize = self.sizeof(arr.array.type_id)
                cur = MemberInfo(
                    f"{cur.path}[{index}]", arr.array.type_id,
                    cur.bit_offset + 8 * esize * index, esize,
                )  # fmt: skip
        assert cur is not None
        chain.append(cur)
        return chain

    def _find_member(
        self, struct_type: BtfType, name: str, depth: int = 0, seen: set[int] | None = None
    ) -> tuple[BtfMember, int] | None:
        """The member ``name`` and its bit offset, looking inside anonymous members."""
        _check_depth(struct_type.id, depth)
        seen = set() if seen is None else seen
        seen.add(struct_type.id)  # searched once is enough (and no loop runs forever)
        for member in struct_type.members:
            if member.name == name:
                return member, member.bit_offset
        for member in struct_type.members:
            if not member.name:
                inner = self.resolve(member.type_id)
                if inner.kind in (BtfKind.STRUCT, BtfKind.UNION) and inner.id not in seen:
                    found = self._find_member(inner, name, depth + 1, seen)
                    if found is not None:
                        return found[0], member.bit_offset + found[1]
        return None

    def _member_size(self, member: BtfMember) -> int:
        try:
            return self.sizeof(member.type_id)
        except BtfError:
            return 0  # flexible or incomplete types

    def member(self, struct_name: str, path: str) -> MemberInfo:
        """The member at ``path`` inside ``struct_name`` (no pointer crossing)."""
        chain = self.member_chain(struct_name, path)
        if len(chain) != 1:
            hops = " then ".join(f"{m.path} at {m.offset:#x}" for m in chain)
            raise BtfError(
                f"{struct_name}.{path} goes through a pointer ({hops}): its offset is not "
                "relative to the struct; use member_chain() for one offset per dereference"
            )
        return chain[0]

    def struct_member_offset(self, struct_name: str, path: str) -> tuple[int, int]:
        """``(offset in bytes, size in bytes)`` of a (possibly nested) member.

        ``struct_member_offset("task_struct", "comm")`` -> ``(offset, 16)``.
        For a bitfield the offset is the byte holding its first bit and the
        size covers the bytes it spans; :meth:`member` gives the bits.
        """
        info = self.member(struct_name, path)
        if info.is_bitfield:
            first = info.bit_offset // 8
            last = (info.bit_offset + info.bitfield_size - 1) // 8
            return first, last - first + 1
        return info.offset, info.size

    # --- functions ------------------------------------------------------------------

    def func_proto(self, name: str) -> BtfType:
        """The FUNC_PROTO of the function ``name``."""
        func = self.find(name, BtfKind.FUNC)
        proto = self.type(func.type_id)
        if proto.kind is not BtfKind.FUNC_PROTO:
            raise BtfError(f"function {name!r} has no prototype (type {proto.kind.name})")
        return proto

    def func_args(self, name: str) -> list[tuple[str, str]]:
        """``[(argument name, C type), ...]`` of the function ``name``.

        ``func_args("do_sys_openat2")`` -> ``[("dfd", "int"), ("filename",
        "const char *"), ("how", "struct open_how *")]``. A varargs function
        ends with ``("", "...")``.
        """
        out = []
        for p in self.func_proto(name).params:
            if p.type_id == 0 and not p.name:
                out.append(("", "..."))
            else:
                out.append((p.name, self.type_name(p.type_id)))
        return out

    def func_return(self, name: str) -> str:
        """The C return type of the function ``name``."""
        return self.type_name(self.func_proto(name).type_id)


# How deep a type may nest (pointers, arrays, prototypes, anonymous members)
# before qprobes calls it a loop: Linux's btf_check_all_metas refuses loops;
# a damaged blob may still hold them.
_MAX_NESTING = 64
# The longest C spelling of a type qprobes makes (Linux's longest are a few
# hundred characters: function pointers with many parameters).
_MAX_NAME = 4096


def _check_depth(type_id: int, depth: int) -> None:
    if depth > _MAX_NESTING:
        raise BtfError(f"type id {type_id}: types nest more than {_MAX_NESTING} deep (a loop?)")


def _join(base: str, inner: str) -> str:
    if not inner:
        return base
    if inner.startswith(("[", "(")) and not inner.startswith("(*"):
        return f"{base}{inner}" if inner.startswith("[") else f"{base} {inner}"
    return f"{base} {inner}"


def _describe(t: BtfType) -> str:
    tag = "union" if t.kind is BtfKind.UNION else "struct"
    return f"{tag} {t.name}" if t.name else f"anonymous {tag} (id {t.id})"


def parse_btf(data: bytes) -> Btf:
    """Parse a BTF blob (pure). Raises :class:`BtfError` when it is malformed."""
    return Btf(data)


def read_guest_btf(
    target: Target,
    symbols: SymbolTable | None = None,
    *,
    read_phys: ReadPhys | None = None,
) -> Btf:
    """The running kernel's BTF (``__start_BTF`` .. ``__stop_BTF``).

    ``symbols`` must hold both symbols; by default they come from
    :func:`~qprobes.symbols.kallsyms.read_guest_kallsyms`. The guest must be
    stopped. The blob (a few MiB) is read as guest-physical memory, like the
    kallsyms tables.
    """
    from qprobes.symbols.kallsyms import KernelImage, read_guest_kallsyms

    if symbols is None:
        symbols = read_guest_kallsyms(target, read_phys=read_phys)
    try:
        start = symbols.address("__start_BTF")
        stop = symbols.address("__stop_BTF")
    except SymbolError as exc:
        raise BtfError(
            "the kernel has no __start_BTF/__stop_BTF symbols (CONFIG_DEBUG_INFO_BTF is off?)"
        ) from exc
    if not 0 < stop - start < 1 << 30:
        raise BtfError(f"implausible BTF range {start:#x}..{stop:#x}")
    image = KernelImage(target, read_phys)
    return parse_btf(image.read(start, stop - start))
