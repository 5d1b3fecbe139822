"""Target descriptions (``target.xml``) and the register layout they define.

Pure code: included documents come through a callback, so the caller
decides how to fetch them (``qXfer:features:read`` over the wire, or files
in a test). References are to the GDB manual, appendix G "Target
Descriptions", section G.2 "Target Description Format" (its parts
"Inclusion", "Features" and "Registers").

QEMU 7.2's x86_64 ``target.xml`` is a ``<target>`` naming the architecture
and including ``i386-64bit.xml``, one ``org.gnu.gdb.i386.core`` feature that
holds every register the stub serves.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from qprobes.errors import ProtocolError

__all__ = [
    "Fetch",
    "Register",
    "RegisterLayout",
    "parse_target_description",
]

Fetch = Callable[[str], bytes | str]
"""Returns the text of an included document, given its ``href``."""

_MAX_INCLUDE_DEPTH: Final = 8
_XI_NAMESPACE: Final = "http://www.w3.org/2001/XInclude"
_XI_INCLUDE: Final = f"{{{_XI_NAMESPACE}}}include"
_ROOT_TAG = re.compile(rb"<(target|feature)\b")


@dataclass(frozen=True, slots=True)
class Register:
    """One register of the target description.

    ``regnum`` is the number the ``p``/``P`` packets and the stop replies
    use; ``offset_in_g`` is where the register sits in a ``g`` reply;
    ``type`` and ``group`` are as the XML gives them (``group`` is None
    when absent).
    """

    name: str
    regnum: int
    bitsize: int
    offset_in_g: int
    type: str
    group: str | None
    feature: str
    save_restore: bool = True

    @property
    def size(self) -> int:
        """Size in bytes on the wire (``bitsize`` rounded up to bytes)."""
        return (self.bitsize + 7) // 8

    @property
    def offset(self) -> int:
        """Same as :attr:`offset_in_g`."""
        return self.offset_in_g


@dataclass(frozen=True)
class RegisterLayout:
    """The registers of a target description, in regnum order."""

    registers: tuple[Register, ...]
    architecture: str | None = None
    features: tuple[str, ...] = ()
    _by_name: dict[str, Register] = field(init=False, repr=False, compare=False)
    _by_regnum: dict[int, Register] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {r.name: r for r in self.registers})
        object.__setattr__(self, "_by_regnum", {r.regnum: r for r in self.registers})

    @property
    def g_size(self) -> int:
        """Bytes in a full ``g`` packet."""
        if not self.registers:
            return 0
        last = self.registers[-1]
        return last.offset_in_g + last.size

    def __len__(self) -> int:
        return len(self.registers)

    def __iter__(self) -> Iterator[Register]:
        return iter(self.registers)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Register:
        """The register called ``name``; KeyError if there is none."""
        return self._by_name[name]

    def get(self, name: str) -> Register | None:
        return self._by_name.get(name)

    def by_name(self, name: str) -> Register:
        """The register called ``name``; KeyError if there is none."""
        return self._by_name[name]

    def find_regnum(self, regnum: int) -> Register | None:
        """The register numbered ``regnum``, None if there is none."""
        return self._by_regnum.get(regnum)

    def by_regnum(self, regnum: int) -> Register:
        """The register numbered ``regnum``; KeyError if there is none."""
        return self._by_regnum[regnum]

    def regnum(self, name: str) -> int:
        return self._by_name[name].regnum

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.registers]

    def unpack_g(self, data: bytes) -> dict[str, bytes]:
        """Split a ``g`` reply into raw register values; registers past the
        end of a short reply are left out (the stub did not send them)."""
        return {
            r.name: data[r.offset_in_g : r.offset_in_g + r.size]
            for r in self.registers
            if r.offset_in_g + r.size <= len(data)
        }


@dataclass
class _RawReg:
    name: str
    bitsize: int
    regnum: int | None
    type: str
    group: str | None
    feature: str
    save_restore: bool


def _declare_xi(text: bytes) -> bytes:
    # GDB's documents say <xi:include> without declaring the prefix: the
    # DTD (gdb-target.dtd) gives target and feature a #FIXED
    # xmlns:xi="http://www.w3.org/2001/XInclude" attribute. ElementTree does
    # not read DTDs, so add the declaration the DTD would have supplied.
    if b"xi:" not in text or b"xmlns:xi" in text:
        return text
    return _ROOT_TAG.sub(lambda m: m[0] + f' xmlns:xi="{_XI_NAMESPACE}"'.encode(), text, count=1)


def _parse_xml(text: bytes | str, name: str) -> ET.Element:
    try:
        raw = text.encode() if isinstance(text, str) else text
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"target description {name!r} is not text: {exc}") from None
    try:
        return ET.fromstring(_declare_xi(raw))
    except ET.ParseError as exc:
        raise ProtocolError(f"target description {name!r} is not valid XML: {exc}") from exc


def _int_attr(elem: ET.Element, attr: str, doc: str) -> int | None:
    value = elem.get(attr)
    if value is None:
        return None
    try:
        number = int(value, 0)
    except ValueError:
        raise ProtocolError(
            f"target description {doc!r}: {attr}={value!r} on <{elem.tag}> is not a number"
        ) from None
    if number < 0:
        raise ProtocolError(f"target description {doc!r}: negative {attr} on <{elem.tag}>")
    return number


class _Collector:
    def __init__(self, fetch: Fetch | None) -> None:
        self.fetch = fetch
        self.regs: list[_RawReg] = []
        self.features: list[str] = []
        self.architecture: str | None = None

    def include(self, elem: ET.Element, doc: str, depth: int) -> None:
        # "Inclusion": the included document's root takes the place of the
        # <xi:include> element.
        href = elem.get("href")
        if not href:
            raise ProtocolError(f"target description {doc!r}: <xi:include> without href")
        if depth >= _MAX_INCLUDE_DEPTH:
            raise ProtocolError(f"target description includes nest too deep at {href!r}")
        if self.fetch is None:
            raise ProtocolError(f"target description {doc!r} includes {href!r}: no way to fetch")
        self.document(_parse_xml(self.fetch(href), href), href, depth + 1)

    def document(self, root: ET.Element, doc: str, depth: int) -> None:
        if root.tag == "target":
            self.target(root, doc, depth)
        elif root.tag == "feature":
            self.feature(root, doc, depth)
        else:
            raise ProtocolError(f"target description {doc!r}: unexpected root <{root.tag}>")

    def target(self, root: ET.Element, doc: str, depth: int) -> None:
        for child in root:
            if child.tag == "architecture":
                self.architecture = (child.text or "").strip() or None
            elif child.tag == "feature":
                self.feature(child, doc, depth)
            elif child.tag == _XI_INCLUDE:
                self.include(child, doc, depth)
            # osabi, compatible: nothing the register layout needs

    def feature(self, elem: ET.Element, doc: str, depth: int) -> None:
        name = elem.get("name", "")
        self.features.append(name)
        for child in elem:
            if child.tag == "reg":
                self.reg(child, name, doc)
            elif child.tag == _XI_INCLUDE:
                self.include(child, doc, depth)
            # vector, flags, struct, union, enum: type definitions

    def reg(self, elem: ET.Element, feature: str, doc: str) -> None:
        name = elem.get("name")
        bitsize = _int_attr(elem, "bitsize", doc)
        if not name or bitsize is None or bitsize == 0:
            raise ProtocolError(f"target description {doc!r}: <reg> needs name and bitsize")
        self.regs.append(
            _RawReg(
                name=name,
                bitsize=bitsize,
                regnum=_int_attr(elem, "regnum", doc),
                type=elem.get("type", "int"),
                group=elem.get("group"),
                feature=feature,
                save_restore=elem.get("save-restore", "yes") != "no",
            )
        )


def _assign(raw: Sequence[_RawReg]) -> tuple[Register, ...]:
    # "Registers": "regnum: The register's number. If omitted, a register's
    # number is one greater than that of the previous register (either in
    # the current feature or in a preceding feature); the first register in
    # the target description defaults to zero."
    numbered: list[tuple[int, _RawReg]] = []
    next_regnum = 0
    seen: set[int] = set()
    names: set[str] = set()
    for reg in raw:
        regnum = next_regnum if reg.regnum is None else reg.regnum
        if regnum in seen:
            raise ProtocolError(f"target description numbers two registers {regnum}")
        if reg.name in names:
            raise ProtocolError(f"target description names two registers {reg.name!r}")
        seen.add(regnum)
        names.add(reg.name)
        numbered.append((regnum, reg))
        next_regnum = regnum + 1
    # A 'g' packet holds the registers in register-number order, each
    # taking its size in bytes (GDB's map_regcache_remote_table).
    numbered.sort(key=lambda item: item[0])
    out: list[Register] = []
    offset = 0
    for regnum, reg in numbered:
        out.append(
            Register(
                name=reg.name,
                regnum=regnum,
                bitsize=reg.bitsize,
                offset_in_g=offset,
                type=reg.type,
                group=reg.group,
                feature=reg.feature,
                save_restore=reg.save_restore,
            )
        )
        offset += (reg.bitsize + 7) // 8
    return tuple(out)


def parse_target_description(
    text: bytes | str, fetch: Fetch | None = None, name: str = "target.xml"
) -> RegisterLayout:
    """Parse a target description and the documents it includes.

    ``fetch(href)`` returns the text of an included document; it is needed
    only when the description uses ``<xi:include>``. Raises ProtocolError on
    malformed XML, an unknown root element, or duplicate registers.
    """
    collector = _Collector(fetch)
    collector.document(_parse_xml(text, name), name, 0)
    return RegisterLayout(
        registers=_assign(collector.regs),
        architecture=collector.architecture,
        features=tuple(collector.features),
    )
