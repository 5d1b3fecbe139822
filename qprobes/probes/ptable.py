"""The probe table: the host's copy of the open-addressing hash the #BP stub
searches, and the rules that keep the stub's search right while the host
changes the table under a stopped guest.

The table maps a probe address to its bucket by a multiplicative hash
(:func:`qprobes.probes.stubs.probe_hash`) with linear probing. The stub
reads a *table header* (``shift``, ``mask``, the probe-address array, the
fast-path array) through one pointer in the vars page, so the host can move
to a bigger table by building it beside the old one and switching that
pointer with one 8-byte store (see :mod:`qprobes.probes.stubs`).

In all-stop mode a vCPU may be stopped in the middle of its search, with
part of the cluster already looked at. Entries therefore never move while
the table is in use: a removed address leaves a *tombstone*
(:data:`TOMBSTONE`, never a probe address), which a search passes over as
it passes over any other address, and an insert fills the first empty or
tombstone bucket of the address's cluster. A search that started before a
change and ends after it sees every address that was in the table for the
whole time, in its own bucket. Tombstones count towards the load: when
live entries and tombstones reach half the buckets the host rehashes into a
fresh table (:meth:`ProbeTable.rehashed`), the stub moves to it at the
pointer switch, and the old table is freed once no vCPU is inside the
search.
"""

from __future__ import annotations

from dataclasses import dataclass

from qprobes.errors import ProbeError

TOMBSTONE = 1
#: The smallest and the largest table (log2 of its buckets).
MIN_BITS = 13
MAX_BITS = 18
HASH_MULT = 0x9E3779B97F4A7C15
_MASK64 = 2**64 - 1


def table_hash(addr: int, bits: int) -> int:
    """The bucket of ``addr`` in a table of ``2**bits`` buckets."""
    return ((addr * HASH_MULT) & _MASK64) >> (64 - bits)


def bits_for(probes: int) -> int:
    """The fewest bits whose table holds ``probes`` at a load of at most 1/2."""
    bits = MIN_BITS
    while (1 << bits) // 2 < probes and bits < MAX_BITS:
        bits += 1
    return bits


def max_probes(bits: int = MAX_BITS) -> int:
    return (1 << bits) // 2


@dataclass
class ProbeTable:
    """One table's buckets (0 empty, :data:`TOMBSTONE`, or a probe address)."""

    bits: int = MIN_BITS

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"table bits {self.bits} outside {MIN_BITS}..{MAX_BITS}")
        self.entries: list[int] = [0] * (1 << self.bits)
        self.live = 0
        self.tombstones = 0

    @property
    def size(self) -> int:
        return 1 << self.bits

    @property
    def mask(self) -> int:
        return self.size - 1

    @property
    def shift(self) -> int:
        return 64 - self.bits

    def find(self, addr: int) -> int | None:
        """The bucket holding ``addr``, searched as the stub searches."""
        i = table_hash(addr, self.bits)
        for _ in range(self.size):
            value = self.entries[i]
            if value == addr:
                return i
            if value == 0:
                return None
            i = (i + 1) & self.mask
        return None

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.find(addr) is not None

    def room(self, more: int = 1) -> bool:
        """Whether ``more`` inserts keep live entries and tombstones at or
        below half the buckets."""
        return self.live + self.tombstones + more <= self.size // 2

    def insert(self, addr: int) -> int:
        """Put ``addr`` in (the first empty or tombstone bucket of its
        cluster, once) and return its bucket. The caller checks :meth:`room`."""
        if addr in (0, TOMBSTONE):
            raise ProbeError(f"{addr:#x} cannot be a probe address")
        found = self.find(addr)
        if found is not None:
            return found
        if not self.room():
            raise ProbeError(f"the probe table of {self.size} entries is full")
        i = table_hash(addr, self.bits)
        while self.entries[i] not in (0, TOMBSTONE):
            i = (i + 1) & self.mask
        if self.entries[i] == TOMBSTONE:
            self.tombstones -= 1
        self.entries[i] = addr
        self.live += 1
        return i

    def remove(self, addr: int) -> int | None:
        """Take ``addr`` out (a tombstone in its bucket); its bucket, or None."""
        i = self.find(addr)
        if i is None:
            return None
        self.entries[i] = TOMBSTONE
        self.live -= 1
        self.tombstones += 1
        return i

    def addresses(self) -> list[int]:
        return [a for a in self.entries if a not in (0, TOMBSTONE)]

    def rehashed(self, more: int = 0) -> ProbeTable:
        """A fresh table with every live address and none of the tombstones,
        big enough for ``more`` more at a load of at most 1/2."""
        want = self.live + more
        if want > max_probes():
            raise ProbeError(f"at most {max_probes()} probe addresses at once")
        new = ProbeTable(max(self.bits if self.live * 4 >= self.size else MIN_BITS,
                             bits_for(want)))  # fmt: skip
        for addr in self.addresses():
            new.insert(addr)
        return new

    @classmethod
    def from_entries(cls, entries: list[int]) -> ProbeTable:
        """The table a guest holds (a recovery reads it back as it is)."""
        bits = len(entries).bit_length() - 1
        if 1 << bits != len(entries):
            raise ProbeError(f"a probe table of {len(entries)} entries is not a power of two")
        table = cls(bits)
        table.entries = list(entries)
        table.live = sum(1 for a in entries if a not in (0, TOMBSTONE))
        table.tombstones = entries.count(TOMBSTONE)
        return table
