"""The journal: qprobes' record, in the guest, of everything it changed there.

A controller can die without detaching (SIGKILL, a crash, a lost host). Its
int3s, its IDT gates, its page-table entries and its kretprobes' hijacked
return addresses stay in the guest; a later session must be able to find
them and put them back, with nothing but the guest's memory to go on. So
every change is written to the journal *before* it is made in the guest,
and taken out after it is undone:

- the header: magic, format version, the owner (host name, pid, start
  time), a generation number that grows with each session on this
  reservation, and the state (active, detached, abandoned);
- the area: its base, the kernel page-table root it was mapped under, the
  stub layout, and the first physical page no session has used yet;
- each IDT gate's original (IDT physical address, vector, 16 bytes);
- each page-table entry of the guest's own tables that qprobes wrote, with
  the value it replaced (the entries of qprobes' own page table live in
  the reservation and need no record);
- each armed probe site: address, original byte, slot, boosted;
- each detoured (jump-optimized) site: address, the original bytes of its
  whole window and the jump written over them, so a recovery can put the
  int3 and the original tail back before the site's own record restores
  the first byte;
- each stack slot a kretprobe hijacked: the real return address and cr3;
- where the fast return probes' instance store is (its instances hold
  the hijacked return addresses of the calls that return in the guest);
- each vCPU in the middle of a single-step: the point stepped and the
  flags ``resume_execution`` restores (up to :data:`STEP_LEVELS` nested
  levels).

The journal sits in the first :data:`JOURNAL_PAGES` pages of the physical
reservation, where a later session with the same reservation reads it. It
is written through the host's view of guest memory when qprobes launched
QEMU, and through the gdbstub otherwise.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qprobes.errors import ProbeError
from qprobes.machine.qemu import process_start_time

PAGE_SIZE = 4096
MAGIC = b"QPJRNL01"
VERSION = 4  # 2: the sites last, as many as the reservation gives room for; 3: detours;
# 4: a site may be a boosted call (its slot a push and a jmp: older builds cannot rebuild it)

#: Capacities: the journal's size follows from them.
MAX_GATES = 64  # (IDT, vector) pairs
MAX_PTES = 64  # entries of the guest's own page tables
MAX_SITES = 4096  # armed probe addresses, in the smallest journal (see sites_for)
MAX_RETS = 2048  # hijacked return addresses
MAX_VCPUS = 64
STEP_LEVELS = 4  # a step and up to three reentries it interrupted
MAX_DETOURS = 256  # detour buffers (qprobes.probes.engine: pages 400-415)

_HEADER = struct.Struct("<8sIIQIIQ32s16sQQB7xQQQQQQQQ")
_GATE = struct.Struct("<QI4x16s")  # 32 bytes
_PTE = struct.Struct("<QQ")  # 16
_SITE = struct.Struct("<QQBB6xQ")  # 32 (addr, slot, opcode, flags, module text base)
_RET = struct.Struct("<QQQ")  # 24 (slot, real return address, cr3)
_STEP = struct.Struct("<BB6xQQQQ")  # 40 per level (status, used, point, old, saved, popped)
_DETOUR = struct.Struct("<QB7x24s8s")  # 48 (addr, window length, original window, jump)

HEADER_SIZE = 512
# In the header's spare bytes: the fast return probes' store (address,
# instances, bytes per instance, trampoline code [lo, hi)); zeros: none.
_FASTRET = struct.Struct("<QQQQQ")
FASTRET_OFF = 384
GATES_OFF = HEADER_SIZE
PTES_OFF = GATES_OFF + MAX_GATES * _GATE.size
STEPS_OFF = PTES_OFF + MAX_PTES * _PTE.size
RETS_OFF = STEPS_OFF + MAX_VCPUS * STEP_LEVELS * _STEP.size
DETOURS_OFF = RETS_OFF + MAX_RETS * _RET.size
SITES_OFF = DETOURS_OFF + MAX_DETOURS * _DETOUR.size
END = SITES_OFF + MAX_SITES * _SITE.size  # of the smallest journal
JOURNAL_PAGES = (END + PAGE_SIZE - 1) // PAGE_SIZE
JOURNAL_SIZE = JOURNAL_PAGES * PAGE_SIZE
#: The most sites any journal records (the largest probe table's load limit).
SITES_LIMIT = 1 << 17


def sites_for(reserve_size: int) -> int:
    """How many probe sites the journal of a reservation of ``reserve_size``
    bytes records: an eighth of the reservation, at least :data:`MAX_SITES`
    and at most :data:`SITES_LIMIT`. (A recovering session with the same
    reservation finds the same layout.)"""
    return max(MAX_SITES, min(SITES_LIMIT, reserve_size // 8 // _SITE.size))


def journal_size(max_sites: int) -> int:
    """The bytes a journal of ``max_sites`` sites takes, in whole pages."""
    end = SITES_OFF + max_sites * _SITE.size
    return (end + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE

SITE_ARMED = 1  # the record is in use
SITE_BOOSTED = 2
# The int3 is gone (the probe was disarmed or lost) but a vCPU is still
# single-stepping the site's slot: the record stays, for a recovery to
# finish that step, and nothing is written back at the site.
SITE_STEP_ONLY = 4
_SITE_FLAGS_AT = 17  # the flags byte's offset in a site record


class JournalState(enum.IntEnum):
    EMPTY = 0
    ACTIVE = 1  # a session is attached (or died attached)
    DETACHED = 2  # everything was put back
    ABANDONED = 3  # put back but the area left mapped (something pointed in)


class JournalError(ProbeError):
    """The guest holds a journal this session cannot take over, or none."""


@dataclass(frozen=True)
class Header:
    state: JournalState
    generation: int
    owner_pid: int
    started: float
    host: str
    qprobes_version: str
    area: int  # vbase
    kcr3: int
    la57: bool
    code: int
    doorbell: int
    vars: int
    ptable: int
    slot_lo: int
    slot_hi: int
    phys_next: int  # the first reserved page this session has not used
    # Pages below this may still be mapped by an abandoned area: never reuse
    # them (carried from session to session).
    phys_floor: int = 0
    n_gates: int = 0
    n_ptes: int = 0

    def owner(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.owner_pid} on {self.host}, started {when}"


@dataclass(frozen=True)
class StepLevel:
    status: int
    point: int
    old_rflags: int
    saved_rflags: int
    popped_tf: int


@dataclass
class Contents:
    """Everything a journal records (see :meth:`Journal.load`)."""

    header: Header
    gates: list[tuple[int, int, bytes]] = field(default_factory=list)  # (idt paddr, vector, gate)
    ptes: list[tuple[int, int]] = field(default_factory=list)  # (entry paddr, original)
    # (addr, slot, opcode, boosted, module text base or 0 for vmlinux)
    sites: list[tuple[int, int, int, bool, int]] = field(default_factory=list)
    # Sites whose int3 is gone, kept for a vCPU still stepping their slot (same tuples).
    step_sites: list[tuple[int, int, int, bool, int]] = field(default_factory=list)
    rets: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, real, cr3)
    steps: dict[int, list[StepLevel]] = field(default_factory=dict)  # vcpu -> levels
    # (store, instances, instance size, trampolines lo, hi), or None
    fast_returns: tuple[int, int, int, int, int] | None = None
    detours: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (addr, window, jump)


def _pack_header(h: Header, n_sites: int, n_rets: int) -> bytes:
    return _HEADER.pack(
        MAGIC, VERSION, int(h.state), h.generation, h.owner_pid, 0, int(h.started),
        h.host.encode()[:32], h.qprobes_version.encode()[:16], h.area, h.kcr3, int(h.la57),
        h.code, h.doorbell, h.vars, h.ptable, h.slot_lo, h.slot_hi, h.phys_next, h.phys_floor,
    ) + struct.pack("<IIII", h.n_gates, h.n_ptes, n_sites, n_rets)  # fmt: skip


def unpack_header(raw: bytes) -> Header | None:
    """The header in ``raw`` (the journal's first bytes), or None when there
    is no journal there. Raises :class:`JournalError` for a journal of
    another format version."""
    if raw[:8] != MAGIC:
        return None
    if len(raw) < _HEADER.size + 16:
        raise JournalError(f"the guest's qprobes journal header is cut short: {len(raw)} of "
                           f"{_HEADER.size + 16} bytes")  # fmt: skip
    fields = _HEADER.unpack_from(raw)
    version = fields[1]
    if version != VERSION:
        raise JournalError(f"the guest holds a qprobes journal of format {version}; this "
                           f"qprobes reads format {VERSION}")  # fmt: skip
    n_gates, n_ptes, _sites, _rets = struct.unpack_from("<IIII", raw, _HEADER.size)
    (_m, _v, state, gen, pid, _pad, started, host, ver, area, kcr3, la57, code, bell, vars_,
     ptable, slot_lo, slot_hi, phys_next, phys_floor) = fields  # fmt: skip
    return Header(
        JournalState(state) if state in JournalState._value2member_map_ else JournalState.EMPTY,
        gen, pid, float(started), host.rstrip(b"\0").decode(errors="replace"),
        ver.rstrip(b"\0").decode(errors="replace"), area, kcr3, bool(la57), code, bell, vars_,
        ptable, slot_lo, slot_hi, phys_next, phys_floor, n_gates, n_ptes,
    )  # fmt: skip


def process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when
    there is no such process (or only its zombie)."""
    ticks = process_start_time(pid)
    if ticks is None:
        return None
    try:
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


#: Slack between a process's start time as /proc tells it (whole seconds of
#: boot time, clock ticks) and the journal's (whole seconds).
_START_SLACK = 2.0


def owner_still_running(
    header: Header, *, host: str | None = None,
    started: Callable[[int], float | None] = process_started,
) -> str | None:  # fmt: skip
    """Why the session that owns the journal may still be running (None: it
    is gone). Its pid on its host names it as long as that process started
    before the journal did; a pid reused later names another process. On
    another host nothing can tell, so it counts as running."""
    here = (host if host is not None else socket.gethostname()).encode()[:32]
    here_name = here.decode(errors="replace")
    if header.host != here_name:
        return (f"it ran on another host ({header.host}; this is {here_name}), where "
                "qprobes cannot tell whether it still runs")  # fmt: skip
    when = started(header.owner_pid)
    if when is None or when > header.started + _START_SLACK:
        return None  # gone (or its pid now names a process started after it)
    return f"process {header.owner_pid} is still running"


class Journal:
    """The journal at guest-physical ``base``, written with ``write`` and
    read with ``read`` (physical addresses)."""

    def __init__(self, base: int, read: Callable[[int, int], bytes],
                 write: Callable[[int, bytes], None],
                 max_sites: int = MAX_SITES) -> None:  # fmt: skip
        self.base = base
        self.max_sites = max_sites
        self.size = journal_size(max_sites)
        self.read = read
        self.write = write
        self.header: Header | None = None
        self._sites: dict[int, int] = {}  # addr -> index
        self._free_sites: list[int] = []
        self._next_site = 0
        self._rets: dict[int, int] = {}  # slot -> index
        self._free_rets: list[int] = []
        self._next_ret = 0
        self._gates = 0
        self._ptes = 0
        self._detours: dict[int, int] = {}  # addr -> index
        self._free_detours: list[int] = []
        self._next_detour = 0
        # Inside an engine batch the sites' high-water mark goes into the
        # header once, at the end (:meth:`hold_sites`): still after every
        # record it covers and before any int3 of the batch is written.
        self._holding = False
        self._held = False  # the header's high-water mark is behind
        self._held_records: dict[int, bytes] = {}  # site index -> its record, not written yet

    # --- reading ----------------------------------------------------------------

    def _used_sites(self, header: Header) -> int:
        """The sites' high-water mark the header records (every record past
        it is stale or zero)."""
        raw = self.read(self.base, HEADER_SIZE)
        (n_sites,) = struct.unpack_from("<I", raw, _HEADER.size + 8)
        return min(int(n_sites), self.max_sites)

    def read_header(self) -> Header | None:
        return unpack_header(self.read(self.base, HEADER_SIZE))

    def load(self) -> Contents | None:
        """Every record of the journal in the guest, or None without one."""
        self._write_held()
        header = self.read_header()
        if header is None:
            return None
        used = self._used_sites(header)
        raw = self.read(self.base, SITES_OFF + used * _SITE.size)
        out = Contents(header)
        for i in range(min(header.n_gates, MAX_GATES)):
            idt, vector, gate = _GATE.unpack_from(raw, GATES_OFF + i * _GATE.size)
            out.gates.append((idt, vector, gate))
        for i in range(min(header.n_ptes, MAX_PTES)):
            out.ptes.append(_PTE.unpack_from(raw, PTES_OFF + i * _PTE.size))
        for i in range(used):
            addr, slot, opcode, flags, module = _SITE.unpack_from(raw, SITES_OFF + i * _SITE.size)
            if flags & SITE_ARMED:
                found = out.step_sites if flags & SITE_STEP_ONLY else out.sites
                found.append((addr, slot, opcode, bool(flags & SITE_BOOSTED), module))
        for i in range(MAX_RETS):
            slot, real, cr3 = _RET.unpack_from(raw, RETS_OFF + i * _RET.size)
            if slot:
                out.rets.append((slot, real, cr3))
        for vcpu in range(MAX_VCPUS):
            levels = []
            for lvl in range(STEP_LEVELS):
                off = STEPS_OFF + (vcpu * STEP_LEVELS + lvl) * _STEP.size
                status, used, point, old, saved, popped = _STEP.unpack_from(raw, off)
                if used:
                    levels.append(StepLevel(status, point, old, saved, popped))
            if levels:
                out.steps[vcpu] = levels
        store, count, size, lo, hi = _FASTRET.unpack_from(raw, FASTRET_OFF)
        if store:
            out.fast_returns = (store, count, size, lo, hi)
        for i in range(MAX_DETOURS):
            addr, n, window, jump = _DETOUR.unpack_from(raw, DETOURS_OFF + i * _DETOUR.size)
            if addr and 0 < n <= len(window):
                out.detours.append((addr, window[:n], jump[:5]))
        return out

    # --- writing ----------------------------------------------------------------

    def begin(self, previous: Header | None, phys_next: int, version: str) -> None:
        """Start this session's journal: clear the records, state active. The
        physical floor grows past an abandoned area's pages and stays."""
        generation = previous.generation + 1 if previous is not None else 1
        floor = 0
        if previous is not None:
            floor = previous.phys_floor
            if previous.state is JournalState.ABANDONED:
                floor = max(floor, previous.phys_next)
        self._sites.clear()
        self._free_sites.clear()
        self._next_site = 0
        self._rets.clear()
        self._free_rets.clear()
        self._next_ret = 0
        self._gates = self._ptes = 0
        self._detours.clear()
        self._free_detours.clear()
        self._next_detour = 0
        # The records before the sites; the sites are read only up to the
        # high-water mark, which starts at 0.
        self._w(self.base + HEADER_SIZE, bytes(SITES_OFF - HEADER_SIZE))
        self._w(self.base + FASTRET_OFF, bytes(_FASTRET.size))
        self.header = Header(
            JournalState.ACTIVE, generation, os.getpid(), time.time(), socket.gethostname(),
            version, 0, 0, False, 0, 0, 0, 0, 0, 0, max(phys_next, floor), floor,
        )  # fmt: skip
        self._flush()

    def take_over(self, contents: Contents) -> None:
        """Continue a dead session's journal (``--recover``): its records
        stay, this process becomes the owner, the generation grows."""
        used = self._used_sites(contents.header)
        raw = self.read(self.base, SITES_OFF + used * _SITE.size)
        self._sites.clear()
        self._rets.clear()
        used_sites = []
        for i in range(used):
            addr, _slot, _op, flags, _mod = _SITE.unpack_from(raw, SITES_OFF + i * _SITE.size)
            if flags & SITE_ARMED:
                self._sites[addr] = i
                used_sites.append(i)
        self._next_site = used
        self._free_sites = [i for i in range(self._next_site) if i not in set(used_sites)]
        used_rets = []
        for i in range(MAX_RETS):
            (slot,) = struct.unpack_from("<Q", raw, RETS_OFF + i * _RET.size)
            if slot:
                self._rets[slot] = i
                used_rets.append(i)
        self._next_ret = max(used_rets, default=-1) + 1
        self._free_rets = [i for i in range(self._next_ret) if i not in set(used_rets)]
        self._detours.clear()
        used_detours = []
        for i in range(MAX_DETOURS):
            (addr,) = struct.unpack_from("<Q", raw, DETOURS_OFF + i * _DETOUR.size)
            if addr:
                self._detours[addr] = i
                used_detours.append(i)
        self._next_detour = max(used_detours, default=-1) + 1
        self._free_detours = [i for i in range(self._next_detour) if i not in set(used_detours)]
        self._gates, self._ptes = len(contents.gates), len(contents.ptes)
        self.header = dataclasses.replace(
            contents.header, generation=contents.header.generation + 1, owner_pid=os.getpid(),
            host=socket.gethostname(), started=time.time(),
        )  # fmt: skip
        self._flush()

    def _flush(self) -> None:
        assert self.header is not None
        self._held = False
        self._w(self.base, _pack_header(self.header, self._next_site, len(self._rets)))

    def _w(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr``, after the site records held back."""
        if self._held_records:
            self._write_held()
        self.write(addr, data)

    def _site_record(self, index: int, data: bytes) -> None:
        if self._holding:
            self._held_records[index] = data  # the last one of a site's index wins
        else:
            self._w(self.base + SITES_OFF + index * _SITE.size, data)

    def _write_held(self) -> None:
        """The held site records, adjacent ones in one write."""
        held, self._held_records = self._held_records, {}
        run: list[bytes] = []
        first = prev = -2
        for index in sorted(held):
            if index != prev + 1 and run:
                self.write(self.base + SITES_OFF + first * _SITE.size, b"".join(run))
                run = []
            if not run:
                first = index
            run.append(held[index])
            prev = index
        if run:
            self.write(self.base + SITES_OFF + first * _SITE.size, b"".join(run))

    def hold_sites(self, holding: bool) -> None:
        """From ``True`` to ``False``, site records are written, adjacent ones
        together, and the header's high-water mark moved, only when holding
        ends (a few writes for a batch of thousands, not two per site). The
        caller writes the batch's int3s after that: a site's record is in the
        guest, covered by the header, before its int3 is."""
        self._holding = holding
        if not holding:
            self._write_held()
            if self._held and self.header is not None:
                self._flush()

    def _update(self, **changes: object) -> None:
        assert self.header is not None
        self.header = dataclasses.replace(self.header, **changes)  # type: ignore[arg-type]
        self._flush()

    def set_area(self, *, area: int, kcr3: int, la57: bool, code: int, doorbell: int,
                 vars_: int, ptable: int, slot_lo: int, slot_hi: int) -> None:  # fmt: skip
        self._update(area=area, kcr3=kcr3, la57=la57, code=code, doorbell=doorbell,
                     vars=vars_, ptable=ptable, slot_lo=slot_lo, slot_hi=slot_hi)  # fmt: skip

    def fast_returns(self, store: int, count: int, size: int, lo: int, hi: int) -> None:
        """Record where the fast return instances are, before the first is used."""
        if self.header is None:
            return  # not attached: nothing to record
        self._w(self.base + FASTRET_OFF, _FASTRET.pack(store, count, size, lo, hi))

    def set_phys_next(self, phys_next: int) -> None:
        """Record the allocator's high-water mark (before a new page is used)."""
        if self.header is None or phys_next <= self.header.phys_next:
            return
        self._update(phys_next=phys_next)

    def gate(self, idt: int, vector: int, gate: bytes) -> None:
        """Record a gate's original, before it is rewritten."""
        if self.header is None:
            return  # not attached: nothing to record
        if self._gates >= MAX_GATES:
            raise JournalError(f"more than {MAX_GATES} IDT gates to record")
        self._w(self.base + GATES_OFF + self._gates * _GATE.size, _GATE.pack(idt, vector, gate))
        self._gates += 1
        self._update(n_gates=self._gates)

    def pte(self, paddr: int, old: int) -> None:
        """Record a guest page-table entry's original, before it is rewritten."""
        if self.header is None:
            return  # not attached: nothing to record
        if self._ptes >= MAX_PTES:
            raise JournalError(f"more than {MAX_PTES} page-table entries to record")
        self._w(self.base + PTES_OFF + self._ptes * _PTE.size, _PTE.pack(paddr, old))
        self._ptes += 1
        self._update(n_ptes=self._ptes)

    def site(self, addr: int, slot: int, opcode: int, boosted: bool, module: int = 0) -> None:
        """Record a probe site before its int3 is written."""
        if self.header is None:
            return  # not attached: nothing to record
        index = self._sites.get(addr)
        if index is None:
            if self._free_sites:
                index = self._free_sites.pop()
            elif self._next_site < self.max_sites:
                index = self._next_site
            else:
                raise JournalError(f"more than {self.max_sites} probe sites to record")
            self._sites[addr] = index
        flags = SITE_ARMED | (SITE_BOOSTED if boosted else 0)
        self._site_record(index, _SITE.pack(addr, slot, opcode, flags, module))
        if index >= self._next_site:
            # The high-water mark moves after the record is written.
            self._next_site = index + 1
            if self._holding:
                self._held = True
            else:
                self._flush()

    def has_room(self, addr: int) -> bool:
        """Whether a site at ``addr`` can be recorded."""
        return (self.header is None or addr in self._sites or bool(self._free_sites)
                or self._next_site < self.max_sites)  # fmt: skip

    def has_site_room(self, addr: int) -> bool:
        """Whether :meth:`site` can record ``addr`` (asked before anything is written)."""
        return self.has_room(addr)

    def has_ret_room(self, slot: int) -> bool:
        """Whether :meth:`ret` can record ``slot`` (asked before anything is written)."""
        return (self.header is None or slot in self._rets or bool(self._free_rets)
                or self._next_ret < MAX_RETS)  # fmt: skip

    def site_step_only(self, addr: int) -> None:
        """Keep the record of a site whose int3 is gone while a vCPU still
        steps its slot (see :data:`SITE_STEP_ONLY`); :meth:`unsite` once the
        step is over."""
        if self.header is None:
            return  # not attached: nothing to record
        index = self._sites.get(addr)
        if index is None:
            return
        at = self.base + SITES_OFF + index * _SITE.size + _SITE_FLAGS_AT
        self._write_held()
        flags = self.read(at, 1)[0]
        self._w(at, bytes([flags | SITE_STEP_ONLY]))

    def unsite(self, addr: int) -> None:
        """Forget a site whose original byte is back (or that the guest rewrote)."""
        if self.header is None:
            return  # not attached: nothing to record
        index = self._sites.pop(addr, None)
        if index is None:
            return
        self._site_record(index, bytes(_SITE.size))
        self._free_sites.append(index)

    def ret(self, slot: int, real: int, cr3: int) -> None:
        """Record a stack slot's real return address before the trampoline goes there."""
        if self.header is None:
            return  # not attached: nothing to record
        index = self._rets.get(slot)
        if index is None:
            if self._free_rets:
                index = self._free_rets.pop()
            elif self._next_ret < MAX_RETS:
                index, self._next_ret = self._next_ret, self._next_ret + 1
            else:
                raise JournalError(f"more than {MAX_RETS} return addresses to record")
            self._rets[slot] = index
        self._w(self.base + RETS_OFF + index * _RET.size, _RET.pack(slot, real, cr3))

    def unret(self, slot: int) -> None:
        index = self._rets.pop(slot, None)
        if index is None:
            return
        self._w(self.base + RETS_OFF + index * _RET.size, bytes(_RET.size))
        self._free_rets.append(index)

    def detour(self, addr: int, window: bytes, jump: bytes) -> None:
        """Record a detoured site (its whole window's original bytes and the
        jump) before the jump is written over the window."""
        if self.header is None:
            return  # not attached: nothing to record
        if not 0 < len(window) <= 24 or len(jump) > 8:
            raise JournalError(f"a {len(window)}-byte detour window at {addr:#x} does not fit "
                               "the journal")  # fmt: skip
        index = self._detours.get(addr)
        if index is None:
            if self._free_detours:
                index = self._free_detours.pop()
            elif self._next_detour < MAX_DETOURS:
                index, self._next_detour = self._next_detour, self._next_detour + 1
            else:
                raise JournalError(f"more than {MAX_DETOURS} detours to record")
            self._detours[addr] = index
        self._w(self.base + DETOURS_OFF + index * _DETOUR.size,
                   _DETOUR.pack(addr, len(window), window, jump))  # fmt: skip

    def undetour(self, addr: int) -> None:
        """Forget a detour whose int3 and original tail are back."""
        if self.header is None:
            return  # not attached: nothing to record
        index = self._detours.pop(addr, None)
        if index is None:
            return
        self._w(self.base + DETOURS_OFF + index * _DETOUR.size, bytes(_DETOUR.size))
        self._free_detours.append(index)

    def steps(self, vcpu: int, levels: list[StepLevel]) -> None:
        """Record vCPU ``vcpu``'s single-step state (empty: none)."""
        if self.header is None:
            return  # not attached: nothing to record
        if not 0 <= vcpu < MAX_VCPUS:
            raise JournalError(f"vCPU {vcpu}: the journal records {MAX_VCPUS} vCPUs")
        if len(levels) > STEP_LEVELS:
            # The engine never nests deeper (KprobeEngine._reenter_kprobe).
            raise JournalError(f"a reentry {len(levels)} deep: the journal records "
                               f"{STEP_LEVELS}")  # fmt: skip
        data = b"".join(_STEP.pack(lv.status, 1, lv.point, lv.old_rflags, lv.saved_rflags,
                                   lv.popped_tf) for lv in levels)  # fmt: skip
        data = data.ljust(STEP_LEVELS * _STEP.size, b"\0")
        self._w(self.base + STEPS_OFF + vcpu * STEP_LEVELS * _STEP.size, data)

    def end(self, state: JournalState, phys_next: int | None = None) -> None:
        """Close this session's journal: everything is back (DETACHED), or
        back but the area is left mapped (ABANDONED)."""
        if self.header is None:
            return
        changes: dict[str, object] = {"state": state}
        if phys_next is not None:
            changes["phys_next"] = phys_next
        self._update(**changes)
