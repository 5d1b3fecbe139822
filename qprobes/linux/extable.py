"""The kernel's exception table (``__ex_table``) and the other rules Linux's
kprobe optimizer applies to a function before it puts a jump in it.

``struct exception_table_entry`` (arch/x86/include/asm/extable.h) is
``{int insn, fixup, data;}`` on x86-64, each address relative to its own
field. An instruction with an entry may fault on purpose (a user access, a
``_safe`` MSR read); the fault handler then searches the table by rip and
jumps to the fixup, which may jump back into the function. Linux's
``can_optimize()`` therefore refuses a detour anywhere in a function that
holds such an instruction (``search_exception_tables(addr)`` on each
address of it); :class:`ExceptionTable` answers the same question from the
guest's own table, read once (vmlinux's table is sorted at build time and
never changes; modules are not detoured).

The retpoline thunks (``__indirect_thunk_start`` .. ``__indirect_thunk_end``)
are where a compiled indirect jump goes with ``CONFIG_RETPOLINE``: a jmp to
them counts as an indirect jump (``insn_is_indirect_jump()``).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass

from qprobes.errors import SymbolError
from qprobes.symbols.btf import Btf
from qprobes.symbols.elf import SymbolTable

Read = Callable[[int, int], bytes]


@dataclass(frozen=True)
class ExtableLayout:
    """The entry size and the offset of ``insn`` in it, from BTF."""

    size: int
    insn: int

    @classmethod
    def from_btf(cls, btf: Btf) -> ExtableLayout:
        entry = btf.find_struct("exception_table_entry")
        insn, _ = btf.struct_member_offset("exception_table_entry", "insn")
        return cls(entry.size, insn)


def parse_extable(data: bytes, base: int, layout: ExtableLayout) -> list[int]:
    """The (sorted) instruction addresses of the entries in ``data``, the
    table read at ``base``."""
    out = []
    for off in range(0, len(data) - layout.size + 1, layout.size):
        (rel,) = struct.unpack_from("<i", data, off + layout.insn)
        out.append((base + off + layout.insn + rel) & (2**64 - 1))
    out.sort()
    return out


class ExceptionTable:
    """vmlinux's exception-table entries."""

    def __init__(self, insns: list[int]) -> None:
        self.insns = insns

    @classmethod
    def load(cls, symbols: SymbolTable, btf: Btf, read: Read) -> ExceptionTable:
        try:
            start = symbols.address("__start___ex_table")
            stop = symbols.address("__stop___ex_table")
        except SymbolError:
            return cls([])
        layout = ExtableLayout.from_btf(btf)
        return cls(parse_extable(read(start, stop - start), start, layout) if stop > start else [])

    def in_range(self, start: int, end: int) -> list[int]:
        """The entries' instruction addresses in ``[start, end)``."""
        i = bisect.bisect_left(self.insns, start)
        j = bisect.bisect_left(self.insns, end)
        return self.insns[i:j]

    def detour_check(self, start: int, end: int) -> str | None:
        """Why no detour may go into the function ``[start, end)``, or None."""
        found = self.in_range(start, end)
        if found:
            return (f"the function has {len(found)} exception-table entries (the first at "
                    f"{found[0]:#x}), whose fixups may jump back into it")  # fmt: skip
        return None


def indirect_thunks(symbols: SymbolTable) -> tuple[int, int] | None:
    """The retpoline thunks' range, when the kernel has one."""
    if "__indirect_thunk_start" in symbols and "__indirect_thunk_end" in symbols:
        return symbols.address("__indirect_thunk_start"), symbols.address("__indirect_thunk_end")
    return None
