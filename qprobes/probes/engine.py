"""The kprobe engine: probes armed in guest memory, hits handled on the host.

This is Linux's kprobes flow (2.6 ``arch/x86_64/kernel/kprobes.c``:
``kprobe_handler``, ``post_kprobe_handler``, ``kprobe_fault_handler``,
``resume_execution``; ``kernel/kprobes.c``: the probe table, aggregate
probes, ``get_insn_slot``), run from outside the guest:

* arming writes ``int3`` at the probe address through the gdbstub;
* the guest's #BP and #DB gates, and those of the faults an instruction
  can raise in a slot, point at qprobes' stubs
  (:mod:`qprobes.probes.stubs`), which save ``pt_regs`` and ring a watched
  doorbell for exceptions that are qprobes' own;
* at the doorbell stop the host reads the frame, runs the handlers, edits
  the frame (rip to the slot, TF for a single-step, the fixups after it)
  and tells the stub to ``iretq`` or to pass the exception on;
* a fast-path probe (a recorder in the guest) may be jump-optimized, as
  ``arch/x86/kernel/kprobes/opt.c`` does (``can_optimize``,
  ``arch_optimize_kprobes`` through ``text_poke_bp``,
  ``arch_unoptimize_kprobe``): :meth:`KprobeEngine.optimize` puts a
  ``jmp`` to a detour buffer over the armed int3 and the instructions
  after it (:mod:`qprobes.arch.x86_64.detour`); the int3 and its slot stay
  valid underneath, for the hits a detour hands to the host.

The guest must be stopped whenever these methods run, except
:meth:`KprobeEngine.run`, which resumes it and handles stops until told to
stop. All calls come from one thread.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qprobes import __version__
from qprobes.arch.x86_64 import detour as x86detour
from qprobes.arch.x86_64 import fixups as x86fix
from qprobes.arch.x86_64 import insn as x86insn
from qprobes.arch.x86_64.idt import gate_offset, gate_with_offset
from qprobes.arch.x86_64.recorder_asm import CpuFeatures, Recorder, RingLayout
from qprobes.errors import (
    ConnectionClosedError,
    DetourError,
    InstructionError,
    ProbeError,
    QprobesError,
    QuiesceError,
    StubTimeoutError,
    SymbolError,
    TranslationError,
)
from qprobes.probes.area import AREA_SPAN, PAGE_SIZE, REGION_SIZE, GuestArea
from qprobes.probes.context import HitContext, PtRegs
from qprobes.probes.fastpath import FastPath
from qprobes.probes.fastret import FASTRET_SPILL_VECTOR, FastReturns
from qprobes.probes.ftrace_site import MCOUNT_INSN_SIZE, FtraceRecords, branches_to
from qprobes.probes.journal import (
    JOURNAL_SIZE,
    MAX_GATES,
    MAX_SITES,
    MAX_VCPUS,
    STEP_LEVELS,
    Contents,
    Journal,
    JournalError,
    JournalState,
    StepLevel,
    journal_size,
    sites_for,
)
from qprobes.probes.kprobe import (
    Kprobe,
    KprobeCtlblk,
    KprobeStatus,
    PrevKprobe,
    ProbePoint,
)
from qprobes.probes.ptable import TOMBSTONE, ProbeTable, max_probes
from qprobes.probes.quiesce import CpuState, StackScan, StackScanner, pending
from qprobes.probes.slots import SlotAllocator
from qprobes.probes.stubs import (
    ACTION_CHAIN,
    ACTION_RETURN,
    FRAME_SIZE,
    FRAME_WORDS,
    HEADER_SIZE,
    JPROBE_VECTOR,
    KRETPROBE_VECTOR,
    MAX_CPUS,
    PERCPU_STRIDE,
    PT_REGS_NAMES,
    PTABLE_BITS,
    PTABLE_ENTRIES,
    SLOT_FAULT_VECTORS,
    VAR_ORIG,
    VAR_PERCPU,
    VAR_PTABLE,
    VAR_PTABLE_HEADER,
    VAR_SS_ACTIVE,
    StubLayout,
    Stubs,
    assemble_at,
    assemble_stubs,
    fault_label,
)
from qprobes.symbols.elf import Symbol, SymbolTable
from qprobes.target.hostmem import HostMemory
from qprobes.target.paging import Translation, walk
from qprobes.target.registers import Registers
from qprobes.target.target import Target
from qprobes.wire.stop import StopReply

if TYPE_CHECKING:
    from qprobes.probes.jprobe import JprobeManager
    from qprobes.probes.kretprobe import KretprobeManager

log = logging.getLogger(__name__)

INT3 = 0xCC
TF = 0x100
IF = 0x200

# Pages of the guest area.
PAGE_CODE = 0
PAGE_DOORBELL = 1
PAGE_VARS = 2
PAGE_PTABLE = 3  # PTABLE_ENTRIES * 8 bytes = 16 pages
#: The least reservation left for the area once the journal has its pages.
MIN_AREA_RESERVE = 1 << 20
PAGE_USER_CODE = 20  # jprobe handlers and other guest code from users: 20..31
PAGE_SLOTS_FIRST = 32
PAGE_SLOTS_LAST = 383  # 384-399: fast return probes (qprobes.probes.fastret); 400-415:
# detours; 416-511: the fast path (qprobes.probes.fastpath)
# Pages 512 on (the regions after the first 2 MiB, mapped when first used):
# bigger probe tables and more slot pages, handed out by GuestArea.claim_pages.
PAGE_DETOUR_FIRST = 400  # detour buffers (jump-optimized probes): pages 400-415
PAGE_DETOUR_LAST = 415
CR4_SMAP = 1 << 21
LARGE_PAGE = 2 << 20  # a 2 MiB page (a 1 GiB one is cached as its 2 MiB pieces)

TRAPPED_VECTORS = (1, 3, *SLOT_FAULT_VECTORS)
_VECTORS = frozenset((*TRAPPED_VECTORS, KRETPROBE_VECTOR, JPROBE_VECTOR, FASTRET_SPILL_VECTOR))
_STUB_PREFIX = {1: "qp_db", 3: "qp_bp", **{v: fault_label(v) for v in SLOT_FAULT_VECTORS}}

# A boosted relative branch keeps two copies in its slot: the plain copy at
# the start (single-stepped, then relocated by resume_execution) and the
# re-encoded rel32 copy with the jmp back here (run boosted).
BOOST_OFFSET = 16

_ORIG_RAX = 2 + PT_REGS_NAMES.index("orig_rax")  # its word in a doorbell frame


# A nop after a single-stepped sti: QEMU's TCG raises the single-step trap
# only after the instruction in sti's interrupt shadow, which must therefore
# be in the slot too (hardware traps right after sti; both are handled).
STI_PAD = b"\x90"


def _is_sti(insn: x86insn.Insn) -> bool:
    return insn.mnemonic == "sti"


def _loads_flags(insn: x86insn.Insn) -> bool:
    """popf and iretq: instructions that load TF from memory."""
    return x86insn.flags_image(insn) is not None


#: ``push imm32``: the first instruction of a boosted call's copy.
PUSH_IMM32_SIZE = 5


def slot_code(insn: x86insn.Insn, analysis: x86insn.InsnAnalysis, slot: int,
              boosted: bool) -> tuple[bytes, int | None]:  # fmt: skip
    """The bytes of a probe's slot and where its boosted copy starts (None: at
    the slot itself).

    The slot starts with the plain copy, which is what a single-step runs
    and what resume_execution's fixups assume; the boosted copy of an
    ordinary instruction is that same copy with a jmp back after it. A
    boosted relative branch is re-encoded with a rel32 to its absolute
    target, which a single-step cannot run, so that copy sits at
    ``BOOST_OFFSET`` and the plain one stays at the start for hits that are
    stepped (a post_handler, a reentrant hit, a guest single-stepping itself).
    """
    copy = x86insn.copy_instruction(insn, slot)
    if _is_sti(insn):
        copy += STI_PAD
    if boosted and analysis.relocated_branch:
        boost_slot = slot + BOOST_OFFSET
        copy = copy.ljust(BOOST_OFFSET, bytes([INT3]))
        return copy + x86insn.boosted_copy(insn, boost_slot, analysis), boost_slot
    if boosted:
        return x86insn.boosted_copy(insn, slot, analysis), None
    return copy, None


def _segments(ranges: list[tuple[int, int, str]]) -> tuple[list[int], list[int]]:
    """The elementary segments of ``ranges`` ([start, end) each): sorted
    boundaries, and for the segment starting at each boundary the index of
    the first range (in list order) covering it, or -1."""
    bounds = sorted({b for start, end, _ in ranges if start < end for b in (start, end)})
    first = [-1] * len(bounds)
    for n, (start, end, _why) in enumerate(ranges):
        if start >= end:
            continue
        i = bisect.bisect_left(bounds, start)
        while i < len(bounds) and bounds[i] < end:
            if first[i] < 0:
                first[i] = n
            i += 1
    return bounds, first


class _Points(dict[int, ProbePoint]):
    """Probe points by address, with an index by page: which points lie in a
    range, for :meth:`KprobeEngine._original_bytes` over a whole function,
    without a look at every byte of it or at every point."""

    def __init__(self) -> None:
        super().__init__()
        self._pages: dict[int, set[int]] = {}

    def __setitem__(self, addr: int, point: ProbePoint) -> None:
        if addr not in self:
            self._pages.setdefault(addr // PAGE_SIZE, set()).add(addr)
        super().__setitem__(addr, point)

    def __delitem__(self, addr: int) -> None:
        super().__delitem__(addr)
        self._unindex(addr)

    def _unindex(self, addr: int) -> None:
        page = self._pages.get(addr // PAGE_SIZE)
        if page is not None:
            page.discard(addr)
            if not page:
                del self._pages[addr // PAGE_SIZE]

    def pop(self, addr: int, *default: ProbePoint | None) -> ProbePoint | None:  # type: ignore[override]
        if addr in self:
            self._unindex(addr)
        return super().pop(addr, *default)

    def popitem(self) -> tuple[int, ProbePoint]:
        addr, point = super().popitem()
        self._unindex(addr)
        return addr, point

    def clear(self) -> None:
        super().clear()
        self._pages.clear()

    def setdefault(self, addr: int, point: ProbePoint) -> ProbePoint:
        if addr not in self:
            self[addr] = point
        return self[addr]

    def update(self, other: Mapping[int, ProbePoint]) -> None:  # type: ignore[override]
        for addr, point in other.items():
            self[addr] = point

    def within(self, lo: int, hi: int) -> list[int]:
        """The addresses of the points in ``[lo, hi)``."""
        if hi - lo <= 32:  # a few lookups by address
            return [a for a in range(lo, hi) if a in self]
        pages = self._pages
        out: list[int] = []
        for page in range(lo // PAGE_SIZE, (hi - 1) // PAGE_SIZE + 1):
            found = pages.get(page)
            if found:
                out += [a for a in found if lo <= a < hi]
        return out


@dataclass
class _Batch:
    """A batch of registrations (see :meth:`KprobeEngine.register_many`)."""

    pages: dict[int, bytearray] = field(default_factory=dict)  # kernel page vaddr -> bytes
    phys: dict[int, int] = field(default_factory=dict)  # kernel page vaddr -> paddr
    large: dict[int, int] = field(default_factory=dict)  # 2 MiB page vaddr -> its paddr
    writes: list[tuple[int, bytes]] = field(default_factory=list)  # (paddr, code), in order
    # The int3s that arm probes, by paddr: written after every other write of
    # the batch (each after its slot, table entry and journal record, as one
    # at a time; and the slots, one after the other, merge into long writes).
    # A later write over one of them takes its place (see kwrite_code).
    int3s: dict[int, bytes] = field(default_factory=dict)
    int3_pages: set[int] = field(default_factory=set)  # the physical pages they are in
    # Kernel page vaddr -> its original bytes (see KprobeEngine._original_bytes).
    original: dict[int, bytes] = field(default_factory=dict)
    ptable: set[int] = field(default_factory=set)  # probe table entries to write at the end
    decoded: dict[tuple[int, bytes], x86insn.Insn] = field(default_factory=dict)
    text_unlocked: bool = False  # the guest's text_mutex was seen free in the batch
    # Fast-path probes to jump-optimize once the batch is written: a detour
    # waits for the window to empty, which runs the guest, and the guest
    # must stay stopped in a batch (its cached pages, its int3s not out yet).
    optimize: list[Kprobe] = field(default_factory=list)
    handlers_checked: bool = False  # the handler table was found current in the batch
    armed: list[ProbePoint] = field(default_factory=list)  # points whose int3 it writes


@dataclass(frozen=True)
class _TableBuffer:
    """Where one probe table lives in the guest: its header, its array of
    probe addresses, its array of fast-path words, and the area pages it
    took (first, count; None for the first table, which stays)."""

    header: int
    addrs: int
    rtable: int
    pages: tuple[int, int] | None


@dataclass
class EngineStats:
    """Counts of stops by kind, for benchmarks and tests."""

    stops: int = 0
    bp: int = 0
    db: int = 0
    faults: int = 0
    kret: int = 0
    fastret_spills: int = 0  # fast return records whose full ring waited for the host
    chained: int = 0
    foreign: int = 0  # stops not caused by qprobes
    spurious: int = 0  # bare SIGTRAP stops that were not doorbells
    lost: int = 0  # probes lost because the guest rewrote their int3
    reentered: int = 0  # hits while the vCPU stepped another probe (each counted missed)


#: Why a probe is lost when the guest patched the byte it armed.
REWRITTEN = "the guest rewrote the probed text"


class KprobeEngine:
    """Registers, arms and services kprobes in one guest.

    ``reserve`` is (guest-physical start, size) of memory the guest never
    uses; ``near`` an address in kernel text (slots must be within rel32 of
    every probed instruction). ``hostmem`` enables the fast data path through
    ``/proc/PID/mem`` (only for a QEMU that this process launched).
    """

    def __init__(
        self,
        target: Target,
        reserve: tuple[int, int],
        near: int,
        *,
        symbols: SymbolTable | None = None,
        hostmem: HostMemory | None = None,
        area_base: int | None = None,
    ) -> None:
        self.target = target
        self.client = target.client
        self.symbols = symbols
        self.hostmem = hostmem
        # The journal takes the first pages of the reservation (see
        # qprobes.probes.journal); a reservation too small for both keeps none.
        start, size = reserve
        self.journal: Journal | None = None
        if size >= JOURNAL_SIZE + MIN_AREA_RESERVE:
            sites = sites_for(size)
            jsize = journal_size(sites)
            if size < jsize + MIN_AREA_RESERVE:
                sites, jsize = MAX_SITES, JOURNAL_SIZE
            self.journal = Journal(start, self._phys_read, self._phys_write, sites)
            reserve = (start + jsize, size - jsize)
        self.area = GuestArea(target, reserve, near, area_base)
        if hostmem is not None:
            self.area.write_data_phys = hostmem.write_phys  # zero-filling data pages
            self.area.read_data_phys_u64 = hostmem.read_phys_u64
        self.area.write_code_phys = self._code_fill
        self.stats = EngineStats()
        self.points = _Points()
        self.kcb: dict[int, KprobeCtlblk] = {}
        self._steps_to_clear: list[KprobeCtlblk] = []
        # Journal records to take out once the current doorbell frame is
        # answered (a record must outlive the change it undoes: until the
        # answer is in the frame, the journal is the only place the guest's
        # state can be recovered from).
        self.after_answer: list[Callable[[], None]] = []
        # Sites whose int3 went while a vCPU stepped their slot: their journal
        # record stays until no vCPU steps them any more.
        self._unsite_after_step: set[int] = set()
        self.attached = False
        self._ptable = ProbeTable(PTABLE_BITS)
        # Where the table in use lives: its header, address and fast-path
        # arrays, and the area pages it took (None: the first table's, in
        # the first region, never freed); tables left behind at a switch.
        self._tbuf = _TableBuffer(0, 0, 0, None)
        self._retired: list[_TableBuffer] = []
        # The per-CPU offset of the guest kernel's CPU number, for the stubs
        # (set by Session.use_linux before attach; None: cpuid).
        self.cpu_number_offset: int | None = None
        self._ss_active = 0
        self._orig_gates: dict[tuple[int, int], bytes] = {}  # (idt paddr, vector) -> gate
        self._orig_handler: dict[int, int] = {}
        self._stubs: Stubs | None = None
        self._doorbell = 0
        self._vars = 0
        self._ptable_addr = 0
        self._ret_kind: dict[int, int] = {}
        self._slots: SlotAllocator | None = None
        self._extra_stop: Callable[[StopReply], bool] | None = None
        self.kretprobes: KretprobeManager | None = None  # set by KretprobeManager
        self.jprobes: JprobeManager | None = None  # set by JprobeManager
        # Finds references into the area on the guest's stacks (set by the
        # Linux session: qprobes.linux.tasks.LinuxStacks).
        self.stack_scanner: StackScanner | None = None
        # Kernel stack traces for HitContext.stack() (Linux: the ORC unwinder).
        self.stack_unwinder: Callable[[HitContext], list[int]] | None = None
        # The text base of the live module holding an address (0: not in a
        # module; None: not known), so the journal can tell a module's code
        # from whatever later takes its place (set by Session.use_linux).
        self.module_base: Callable[[int], int | None] | None = None
        # Called before a probe goes into module text (Linux: arms the
        # module-unload watch).
        self.on_module_probe: Callable[[int], None] | None = None
        # Symbols beyond self.symbols (Linux: loaded modules'), for checks and messages.
        self.resolve_more: Callable[[int], tuple[Symbol, int] | None] | None = None
        self._user_code = 0
        self._vars_phys = 0
        self._blacklist: list[tuple[int, int, str]] = []
        self._blacklist_index: tuple[list[int], list[int]] | None = None
        self._handler_syms: dict[int, tuple[Symbol, int] | None] = {}
        self._handler_table: tuple[tuple[int, tuple[tuple[int, int], ...]], dict[Symbol, int],
                                   dict[int, int], dict[int, int]] | None = None  # fmt: skip
        # A batch of registrations in progress (register_many): kernel reads
        # served from a page cache, code writes held for one pipelined flush.
        self._batch: _Batch | None = None
        # Called with True when a batch starts (the guest stopped throughout)
        # and False when it ends: hooks that read the guest may keep what they
        # read meanwhile (Linux: the ftrace records, the optimized kprobes).
        self.batch_hooks: list[Callable[[bool], None]] = []
        # The guest's ftrace sites (set by Session.use_linux): a probe at one
        # is armed on the next instruction (see _check_ftrace_location).
        self.ftrace: FtraceRecords | None = None
        self._frame_phys: int | None = None  # the current frame's guest-physical address
        self._spurious = False
        # Kernel page tables (the kernel half is the same in every address
        # space): frames and kernel data are read through them.
        self._kcr3 = 0
        self._la57 = False
        # Hooks a front end sets for a guest it knows (Session.use_linux plugs
        # in qprobes.linux.text.KernelText), all called with the guest stopped:
        # text_check(addr) raises ProbeError unless addr is the code of a
        # function in the guest's text (called first in can_probe);
        # address_check(addr, length) raises ProbeError if the instruction
        # there overlaps text the guest rewrites (called in register_kprobe
        # before anything is written); text_lock_held() is true while the
        # guest patches its own text (its text_mutex is held): qprobes then
        # runs the guest briefly and retries before writing kernel text,
        # for up to text_lock_timeout seconds.
        self.text_check: Callable[[int], None] | None = None
        self.address_check: Callable[[int, int], None] | None = None
        self.text_lock_held: Callable[[], bool] | None = None
        # recover_text(addr, data) gives the original bytes of data read at
        # addr where the guest's own patches hide them (its optimized kprobes).
        self.recover_text: Callable[[int, bytes], bytes] | None = None
        self.text_lock_timeout = 10.0
        # Lost probes are looked for at most this often while run() has the
        # guest stopped anyway (each check reads every armed probe's byte).
        self.lost_check_interval = 1.0
        self._last_lost_check = 0.0
        # The fast path: recorders in the guest, rings the host drains.
        self.fast: FastPath | None = None
        # Fast return probes: their instance store and trampolines.
        self.fastret: FastReturns | None = None
        # Called by run(): poll_hooks(True) every poll interval while the
        # guest runs, poll_hooks(False) after each stop and when run() ends
        # (the guest stopped). The Tracer drains the rings there.
        self.poll_hooks: list[Callable[[bool], None]] = []
        # A front end that serves the guest to a debugger as well (the gdb
        # endpoint, qprobes.frontends.gdbserver) sets these. foreign_stop(stop)
        # is offered every stop that is not a doorbell, before anything else
        # looks at it; true means it is the front end's. Once hold_requested
        # is set, run() stops the guest (at its next poll, or after the stop
        # it is handling) and calls hold(stop) with it stopped: stop is the
        # stop reply of that interrupt (None after a handled stop); run()
        # resumes the guest when hold() returns.
        self.foreign_stop: Callable[[StopReply], bool] | None = None
        self.hold: Callable[[StopReply | None], None] | None = None
        self.hold_requested = False
        # Jump-optimized probes (qprobes.arch.x86_64.detour): probe point
        # address -> its detour. ``detour`` turns them on for the fast path;
        # the front end's rules for the guest: ``detour_function_check(start,
        # end)`` names why no detour may go into the function [start, end)
        # (Linux: it has exception-table entries), ``indirect_thunks`` is the
        # range of the retpoline thunks (a jmp there is an indirect jump).
        self.detour = True
        self.detours: dict[int, x86detour.Detour] = {}
        # Points whose recorder was installed with a detour wanted: one that
        # goes back to its int3 (its probe disabled, a second probe there)
        # is optimized again once it is a single enabled fast probe.
        self._detour_wanted: set[int] = set()
        self.detour_function_check: Callable[[int, int], str | None] | None = None
        self.indirect_thunks: tuple[int, int] | None = None
        # How long to wait for no vCPU and no task inside a window before
        # leaving the probe on its int3.
        self.detour_quiesce_timeout = 3.0
        self._detour_buffers: SlotAllocator | None = None
        self._kernel_selectors: tuple[int, int] | None = None

    # --- attach / detach ----------------------------------------------------

    def _phys_read(self, paddr: int, length: int) -> bytes:
        if self.hostmem is not None:
            return self.hostmem.read_phys(paddr, length)
        return self.target.read_phys(paddr, length)

    def _code_fill(self, paddr: int, data: bytes) -> None:
        """The fill of a new code page: in a batch, in its stream (before the
        slots written into the page and the int3s that lead there)."""
        if self._batch is not None:
            self._batch.writes.append((paddr, bytes(data)))
        else:
            self.target.write_phys(paddr, data)

    def _phys_write(self, paddr: int, data: bytes) -> None:
        if self.hostmem is not None:
            self.hostmem.write_phys(paddr, data)
        elif self._batch is not None:
            self._batch.writes.append((paddr, bytes(data)))  # in order, with the code
        else:
            self.target.write_phys(paddr, data)

    def journal_contents(self) -> Contents | None:
        """What the guest's journal records (None: no journal there)."""
        return self.journal.load() if self.journal is not None else None

    def _check_journal(self) -> None:
        """Refuse to attach over a dead session's changes (they would be taken
        for the guest's own: its stubs as the guest's handlers)."""
        if self.journal is None:
            return
        header = self.journal.read_header()
        if header is not None and header.state is JournalState.ACTIVE:
            raise JournalError(
                f"the guest still holds the changes of a qprobes session that did not "
                f"detach ({header.owner()}, generation {header.generation}): put them back "
                "with `qprobes attach ADDRESS --recover` (Session.recover) first"
            )
        if header is not None and header.area:
            for vector in TRAPPED_VECTORS:
                for paddr, (limit, _vcpu) in self._idts().items():
                    if 16 * vector + 15 > limit:
                        continue
                    handler = gate_offset(self.target.read_phys(paddr + 16 * vector, 16))
                    if header.area <= handler < header.area + AREA_SPAN:
                        raise JournalError(
                            f"IDT vector {vector} still points into the area of an earlier "
                            f"qprobes session ({header.owner()}): run "
                            "`qprobes attach ADDRESS --recover` first"
                        )

    def _check_journal_vcpus(self) -> None:
        """Refuse a guest whose vCPUs the journal cannot tell apart (before
        anything is written: a step record would not fit in a hit)."""
        if self.journal is None:
            return
        beyond = [v for v in self.target.vcpus if not 0 < v <= MAX_VCPUS]
        if beyond:
            raise JournalError(f"the guest has vCPU {beyond[0]}: qprobes' journal records "
                               f"vCPUs 1 to {MAX_VCPUS}")  # fmt: skip

    def attach(self) -> None:
        """Map the area, install the stubs and redirect the IDT gates."""
        if self.attached:
            return
        area = self.area
        self._check_journal()
        self._check_journal_vcpus()
        if self.journal is not None:
            previous = self.journal.read_header()
            self.journal.begin(previous, area.phys.next_free, __version__)
            assert self.journal.header is not None
            # Pages an abandoned area may still map are never reused.
            area.phys.skip_to(self.journal.header.phys_floor)
            area.phys.on_grow = self.journal.set_phys_next
            area.on_guest_write = self.journal.pte
        try:
            area.setup()
        except BaseException:
            area.teardown()
            if self.journal is not None:
                with contextlib.suppress(QprobesError):
                    self.journal.end(JournalState.DETACHED)
            raise
        self.fast = FastPath(area, self.target, self.hostmem, self.kwrite_code, self.write_data)
        self.fastret = self._new_fastret()
        try:
            code = area.map_page(PAGE_CODE, writable=False, executable=True)
            bell = area.map_page(PAGE_DOORBELL, writable=True, executable=False)
            vars_ = area.map_page(PAGE_VARS, writable=True, executable=False)
            ptable = [area.map_page(PAGE_PTABLE + i, writable=True, executable=False)
                      for i in range(PTABLE_ENTRIES * 8 // PAGE_SIZE)]  # fmt: skip
            self._doorbell = bell.vaddr
            self._vars_phys = vars_.paddr
            self._kcr3, self._la57 = area.cr3, area.la57
            self._user_code = area.vbase + PAGE_USER_CODE * PAGE_SIZE
            self._vars = vars_.vaddr
            self._ptable_addr = ptable[0].vaddr
            slot_lo = area.vbase + PAGE_SLOTS_FIRST * PAGE_SIZE
            slot_hi = area.vbase + (PAGE_SLOTS_LAST + 1) * PAGE_SIZE
            fast = self.fast
            fast.map_tables()
            self._tbuf = _TableBuffer(vars_.vaddr + VAR_PTABLE_HEADER, ptable[0].vaddr,
                                      fast.rtable, None)  # fmt: skip
            self._ptable = ProbeTable(PTABLE_BITS)
            self._retired = []
            self._write_table_header(self._tbuf, self._ptable)
            self.write_data(self._vars + VAR_PTABLE, struct.pack("<Q", self._tbuf.header))
            layout = self._layout(code.vaddr, bell.vaddr, vars_.vaddr, ptable[0].vaddr,
                                  slot_lo, slot_hi)  # fmt: skip
            if self.journal is not None:
                self.journal.set_area(area=area.vbase, kcr3=area.cr3, la57=area.la57,
                                      code=code.vaddr, doorbell=bell.vaddr, vars_=vars_.vaddr,
                                      ptable=ptable[0].vaddr, slot_lo=slot_lo,
                                      slot_hi=slot_hi)  # fmt: skip
            stubs = self._use_stubs(layout)
            self.fastret.lost_target = stubs["qp_kretprobe_lost"]
            self.fastret.doorbell, self.fastret.vars = bell.vaddr, vars_.vaddr
            self.fastret.on_doorbells = self._ret_kind.update
            self.target.write_phys(code.paddr, stubs.code)
            self._slots = self._slot_allocator()
            self._detour_buffers = self._detour_allocator()
            area.check_mapping(code.vaddr)
            self._install_gates()
            self.target.add_watchpoint(self._doorbell, 1, "write")
        except BaseException:
            self._restore_gates()
            area.teardown()
            if self.journal is not None:
                with contextlib.suppress(QprobesError):
                    self.journal.end(JournalState.DETACHED)  # everything is back
            raise
        self.attached = True

    def _use_stubs(self, layout: StubLayout) -> Stubs:
        """Assemble the stubs for ``layout`` and learn where their doorbells are."""
        self._stubs = stubs = assemble_stubs(layout)
        # A doorbell stop normally reports rip after the store; when an
        # interrupt races with it, QEMU can report the store itself.
        self._ret_kind = {}
        # (The slot fault stubs share one doorbell; the frame names the vector.)
        for prefix, vector in (("qp_bp", 3), ("qp_db", 1), ("qp_fault", 13),
                               ("qp_kret", KRETPROBE_VECTOR),
                               ("qp_jprobe", JPROBE_VECTOR)):  # fmt: skip
            ret = stubs[f"{prefix}_doorbell_ret"]
            self._ret_kind[ret] = vector
            self._ret_kind[stubs[f"{prefix}_ring"]] = vector
            if prefix != "qp_jprobe":
                # A stop reported an instruction or two late (seen while
                # single-stepping a vCPU out of the area): still before
                # the stub reads the answer, with rsp at the frame
                # (mov rax, [rsp]: 4 bytes; test rax, rax: 3).
                self._ret_kind[ret + 4] = vector
                self._ret_kind[ret + 7] = vector
        return stubs

    def _new_fastret(self) -> FastReturns:
        journal = self.journal
        fastret = FastReturns(self.area, self.read_data, self.write_data, self.kwrite_code,
                              journal.fast_returns if journal is not None else None)  # fmt: skip
        fastret.live_access = self.hostmem is not None
        fastret.cpu_number = self.cpu_number_offset
        fastret.is_gone = self._task_is_gone
        return fastret

    def _task_is_gone(self, task: int) -> bool:
        return self.kretprobes is not None and self.kretprobes.tasks.is_gone(task, None)

    def _slot_allocator(self) -> SlotAllocator:
        area = self.area
        # Slot pages start as int3 everywhere: each slot's unused tail traps.
        return SlotAllocator(
            x86insn.SLOT_SIZE, PAGE_SLOTS_FIRST, PAGE_SLOTS_LAST,
            lambda i: area.map_page(i, writable=False, executable=True, fill=INT3).vaddr,
            area.unmap_page, collect=self._collect_garbage_slots,
            fill=lambda slot: self.kwrite_code(slot, bytes([INT3]) * x86insn.SLOT_SIZE),
            more_pages=lambda: area.claim_pages(1),
        )  # fmt: skip

    def _detour_range(self, vbase: int | None = None) -> tuple[int, int]:
        base = self.area.vbase if vbase is None else vbase
        return (base + PAGE_DETOUR_FIRST * PAGE_SIZE, base + (PAGE_DETOUR_LAST + 1) * PAGE_SIZE)

    def _detour_allocator(self) -> SlotAllocator:
        """Detour buffers: fixed-size slots on pages 400-415, freed dirty and
        handed out again only once nothing points into them (as slots)."""
        area = self.area
        size = x86detour.DETOUR_SIZE
        return SlotAllocator(
            size, PAGE_DETOUR_FIRST, PAGE_DETOUR_LAST,
            lambda i: area.map_page(i, writable=False, executable=True, fill=INT3).vaddr,
            area.unmap_page, collect=lambda bufs: self._collect_garbage_slots(bufs, size),
            fill=lambda buf: self.kwrite_code(buf, bytes([INT3]) * size),
        )  # fmt: skip

    def _restore_detours(self, detours: list[tuple[int, bytes, bytes]]) -> list[int]:
        """``--recover``: put a dead session's detoured sites back to their
        armed int3 (the jump's tail first gets the int3, then the original
        bytes, as :meth:`_unoptimize` does); the site records then restore
        the first byte. A site whose bytes are not the recorded jump any more
        is left alone. Returns the addresses handled (journal records to drop)."""
        done = []
        for addr, window, jump in detours:
            done.append(addr)
            try:
                current = self.kread(addr, len(jump))
            except TranslationError:
                log.warning("not restoring the detour at %#x: its text is no longer mapped", addr)
                continue
            # The jump, or the int3 with the jump's tail (a session that died
            # between the two writes of text_poke_bp's order, either way).
            if current not in (jump, bytes([INT3]) + jump[1:]):
                log.warning("not restoring the detour at %#x: the guest rewrote it", addr)
                continue
            self.kwrite_code(addr, bytes([INT3]))
            self.kwrite_code(addr + 1, window[1 : len(jump)])
        return done

    def adopt(self) -> bool:
        """Take over what a dead session left in the guest, from its journal,
        so that :meth:`detach` puts it all back (``qprobes attach --recover``).

        The guest is stopped. Its probe sites, gates, page-table entries,
        hijacked return addresses and vCPUs in the middle of a step become
        this engine's own, as if this session had made them; vCPUs parked in
        a stub (the dead host never answered their doorbell) are answered
        once the doorbell is watched again. Returns False when the journal
        shows nothing to recover. Raises :class:`JournalError` when the
        journal cannot be taken over (another format, other stubs)."""
        if self.attached:
            raise ProbeError("adopt() is for an engine that is not attached")
        contents = self.journal_contents()
        if contents is None or contents.header.state is not JournalState.ACTIVE:
            return False
        h = contents.header
        assert self.journal is not None
        self._check_journal_vcpus()
        self.area.adopt(h.area, h.kcr3, h.la57, contents.ptes)
        # Whatever this recovery leaves mapped, nobody reuses the dead area's pages.
        self.area.phys.skip_to(max(h.phys_next, h.phys_floor))
        self.area.phys.on_grow = self.journal.set_phys_next
        self._kcr3, self._la57 = h.kcr3, h.la57
        # The fast-path pages sit where the area's layout puts them; the dead
        # session's recorders stay until their probes are disarmed.
        self.fast = FastPath(self.area, self.target, self.hostmem, self.kwrite_code,
                                    self.write_data)  # fmt: skip
        layout = self._layout(h.code, h.doorbell, h.vars, h.ptable, h.slot_lo, h.slot_hi)
        stubs = self._use_stubs(layout)
        code_phys = self._kphys(h.code)
        if self._phys_read(code_phys, len(stubs.code)) != stubs.code:
            self._stubs = None
            raise JournalError(
                f"the stubs in the guest are not this qprobes build's (the journal was "
                f"written by qprobes {h.qprobes_version or '?'}): recover with that version"
            )
        self._doorbell, self._vars, self._ptable_addr = h.doorbell, h.vars, h.ptable
        self._vars_phys = self._kphys(h.vars)
        self._user_code = h.area + PAGE_USER_CODE * PAGE_SIZE
        self._slots = self._slot_allocator()
        self._detour_buffers = self._detour_allocator()
        restored = self._restore_detours(contents.detours)
        for idt, vector, gate in contents.gates:
            self._orig_gates[(idt, vector)] = gate
            self._orig_handler.setdefault(vector, gate_offset(gate))
        marked = self._adopt_sites(contents)
        # The probe table as the dead session left it (its linear-probing
        # order), wherever its last switch put it.
        (header,) = struct.unpack("<Q", self.read_data(h.vars + VAR_PTABLE, 8))
        shift, _mask, addrs, rtable = struct.unpack("<QQQQ", self.read_data(header, HEADER_SIZE))
        entries = 1 << (64 - shift)
        raw = self.read_data(addrs, entries * 8)
        self._ptable = ProbeTable.from_entries(list(struct.unpack(f"<{entries}Q", raw)))
        self._tbuf = _TableBuffer(header, addrs, rtable, None)
        self._ss_active = 0
        for index, levels in contents.steps.items():
            vcpu = index + 1  # the journal's index is the thread id - 1
            kcb = self.kcb.setdefault(vcpu, KprobeCtlblk(vcpu=vcpu))
            *prev, top = levels
            kcb.prev = [PrevKprobe(self.points.get(lv.point), KprobeStatus(lv.status),
                                   lv.old_rflags, lv.saved_rflags, lv.popped_tf)
                        for lv in prev]  # fmt: skip
            kcb.current = self.points.get(top.point)
            kcb.status = KprobeStatus(top.status)
            kcb.old_rflags, kcb.saved_rflags = top.old_rflags, top.saved_rflags
            kcb.popped_tf = top.popped_tf
            self._ss_active += len(levels)
        if self.kretprobes is not None:
            self.kretprobes.adopt(contents.rets)
        self.fastret = self._new_fastret()
        if contents.fast_returns is not None:
            self.fastret.adopt(*contents.fast_returns)
        # From here on this session owns the journal (the records stay as they are).
        self.journal.take_over(contents)
        for addr in restored:
            self.journal.undetour(addr)
        for addr in marked:
            self.journal.site_step_only(addr)
        self.target.add_watchpoint(self._doorbell, 1, "write")
        self.attached = True
        log.warning("recovering the changes of %s", h.owner())
        return True

    def _adopt_sites(self, contents: Contents) -> list[int]:
        """``adopt``: the dead session's probe sites become this engine's
        points: armed where its int3 still is, lost (kept only to finish a
        step, nothing ever written at the site) where a vCPU still steps the
        slot. Returns the sites recorded as armed whose int3 is gone while a
        step level names them (to be marked step-only once the journal is
        taken over).

        A session that died in :meth:`_disarm` between writing the original
        byte back and marking the record step-only left such a record: it is
        a step-only site, not one to drop (the step could not be finished).
        """
        assert self.journal is not None
        stepped = {lv.point for levels in contents.steps.values() for lv in levels}
        step_sites = list(contents.step_sites)
        marked: list[int] = []
        for site in contents.sites:
            addr, slot, opcode, boosted, module = site
            # Only an int3 still in the same code is the dead session's: a
            # module may have gone (and its memory been reused) meanwhile.
            gone = None
            code = bytearray()
            if module and (self.module_base is None or self.module_base(addr) != module):
                gone = "its module is gone"
            else:
                try:
                    code = bytearray(self.kread(addr, x86insn.MAX_INSN_SIZE))
                except TranslationError:
                    gone = "its text is no longer mapped"
                else:
                    if code[0] != INT3:
                        gone = ""  # nothing of ours there any more
            if gone is not None:
                if addr in stepped:
                    step_sites.append(site)
                    marked.append(addr)
                    continue
                if gone:
                    log.warning("not restoring %#x: %s", addr, gone)
                self.journal.unsite(addr)
                continue
            code[0] = opcode
            insn = x86insn.decode(bytes(code), addr)
            analysis = x86insn.analyze(insn)
            _copy, boost_slot = slot_code(insn, analysis, slot, boosted)
            self.points[addr] = ProbePoint(addr, opcode, insn, analysis, slot, boosted, [],
                                           armed=True, boost_slot=boost_slot)  # fmt: skip
        for addr, slot, opcode, boosted, _module in step_sites:
            # Its int3 is gone, but a vCPU steps its slot: the point is needed
            # to finish that step, and nothing is ever written at the site.
            try:
                code = bytearray(self.kread(addr, x86insn.MAX_INSN_SIZE))
            except TranslationError:
                code = bytearray()
            if not code or code[0] != opcode:
                # Rewritten or unmapped since: the slot's copy has the same
                # length and kind (its displacement aside).
                code = bytearray(self.kread(slot, x86insn.MAX_INSN_SIZE))
            insn = x86insn.decode(bytes(code), addr)
            analysis = x86insn.analyze(insn)
            _copy, boost_slot = slot_code(insn, analysis, slot, boosted)
            self.points[addr] = ProbePoint(addr, opcode, insn, analysis, slot, boosted, [],
                                           lost=True, boost_slot=boost_slot)  # fmt: skip
            self._unsite_after_step.add(addr)
        return marked

    def _journal_steps(self, kcb: KprobeCtlblk) -> None:
        if self.journal is None:
            return
        levels = [StepLevel(p.status.value, p.current.addr if p.current else 0, p.old_rflags,
                            p.saved_rflags, p.popped_tf) for p in kcb.prev]  # fmt: skip
        if kcb.status is not KprobeStatus.NONE and kcb.current is not None:
            levels.append(StepLevel(kcb.status.value, kcb.current.addr, kcb.old_rflags,
                                    kcb.saved_rflags, kcb.popped_tf))  # fmt: skip
        if len(levels) > STEP_LEVELS:
            # Deeper than the journal records (_reenter_kprobe refuses such a
            # step: not expected): the innermost levels, the steps a recovery
            # would meet first, are kept. Never raised from the hit path: the
            # guest must get its answer.
            log.error("kprobe reentry %d deep on vCPU %d: the journal records the "
                      "innermost %d levels", len(levels), kcb.vcpu, STEP_LEVELS)  # fmt: skip
            levels = levels[-STEP_LEVELS:]
        self.journal.steps(kcb.vcpu - 1, levels)  # gdb thread ids count from 1

    def rearm_doorbell(self) -> None:
        """Insert the doorbell watchpoint again (after a reconnect: QEMU drops
        breakpoints and watchpoints when a client connects)."""
        with contextlib.suppress(QprobesError):  # already gone, as expected
            self.target.remove_watchpoint(self._doorbell, 1, "write")
        self.target.add_watchpoint(self._doorbell, 1, "write")

    def _idts(self) -> dict[int, tuple[int, int]]:
        """Physical address and limit of each distinct IDT, by a vCPU using it."""
        found: dict[int, tuple[int, int]] = {}
        for vcpu in self.target.vcpus:
            idt = self.target.idt(vcpu)
            paddr = self.target.translate(idt.base, vcpu).paddr
            found.setdefault(paddr, (vcpu, idt.limit))
        return {paddr: (limit, vcpu) for paddr, (vcpu, limit) in found.items()}

    def _install_gates(self) -> None:
        assert self._stubs is not None
        entries = {v: f"{p}_entry" for v, p in _STUB_PREFIX.items()}
        idts = self._idts()
        for paddr, (limit, _vcpu) in idts.items():
            for vector in TRAPPED_VECTORS:
                if 16 * vector + 15 > limit:
                    raise ProbeError(f"the IDT at {paddr:#x} has no gate {vector}")
                gate = self.target.read_phys(paddr + 16 * vector, 16)
                handler = gate_offset(gate)
                prev = self._orig_handler.setdefault(vector, handler)
                if prev != handler:
                    raise ProbeError(
                        f"vCPUs disagree on the handler of vector {vector}: "
                        f"{prev:#x} and {handler:#x}"
                    )
                self._orig_gates[(paddr, vector)] = gate
        if self.journal is not None and len(self._orig_gates) > MAX_GATES:
            raise JournalError(f"{len(self._orig_gates)} IDT gates to redirect: qprobes' "
                               f"journal records {MAX_GATES}")  # fmt: skip
        # The stubs chain to the guest's own handlers through the vars page.
        for vector, handler in self._orig_handler.items():
            self.write_data(self._vars + VAR_ORIG + 8 * vector, struct.pack("<Q", handler))
        for (paddr, vector), gate in self._orig_gates.items():
            if self.journal is not None:
                self.journal.gate(paddr, vector, gate)  # recorded before it changes
            new = gate_with_offset(gate, self._stubs[entries[vector]])
            self.target.write_phys(paddr + 16 * vector, new)

    def _restore_gates(self) -> None:
        for (paddr, vector), gate in self._orig_gates.items():
            self.target.write_phys(paddr + 16 * vector, gate)
        self._orig_gates.clear()

    @property
    def stubs(self) -> Stubs:
        if self._stubs is None:
            raise ProbeError("the engine is not attached")
        return self._stubs

    @property
    def original_handlers(self) -> dict[int, int]:
        """The guest's own handler of each trapped vector."""
        return dict(self._orig_handler)

    def detach(self, drain_timeout: float = 10.0, quiesce_timeout: float = 30.0) -> None:
        """Disarm every probe and restore every byte qprobes wrote.

        The order matters because the guest keeps running while qprobes
        leaves (Linux frees kprobe slots only after ``synchronize_rcu_tasks()``):

        1. vCPUs in the middle of a single-step are run to its end (detaching
           mid-step leaves TF set and rip in a slot);
        2. every int3 is taken out: nothing new enters a slot;
        3. :meth:`synchronize_area`: the guest runs until no vCPU rip and no
           live stack word points into the area, except the trampoline
           return addresses of known kretprobe instances; the stubs stay in
           the IDT meanwhile (a copy that faults in a slot is still rerouted);
        4. the kretprobe manager writes those return addresses back, and the
           area is synchronized again;
        5. the IDT gates go back, vCPUs still inside a stub are stepped out,
           a last synchronization covers frames inside the stubs;
        6. the doorbell watchpoint and the area's page tables go.

        If something still points in after ``quiesce_timeout`` seconds (a
        wait step), :class:`~qprobes.errors.QuiesceError` says what; the
        gates are restored but the area stays mapped in the guest rather
        than pulled from under a task.
        """
        if not self.attached:
            return
        try:
            try:
                self.drain(drain_timeout)
                self.check_lost()
            finally:
                # In one batch (the text read once per page, the bytes
                # written in one stream). A point whose disarm failed (a
                # dropped connection, text locked for too long) stays known
                # and armed, for a detach after a reconnect or a recovery; a
                # probe whose text is gone (a freed module) is lost, nothing
                # put back.
                left = self._disarm_many(list(self.points.values()))
                stuck = [f"{self._where(addr)}: {exc}" for addr, exc in left.items()]
                for addr in [a for a in self.points if a not in left]:
                    del self.points[addr]
                if stuck:
                    raise ProbeError(f"{len(stuck)} probes could not be disarmed ({stuck[0]})")
            tramp = self.kretprobes.trampoline if self.kretprobes is not None else None
            allow = {tramp} if tramp else set()
            if self.fastret is not None:
                allow |= self.fastret.allowed()
            self.synchronize_area(quiesce_timeout, allow=frozenset(allow))
            self._release_returns()
            self.synchronize_area(quiesce_timeout)
            # No new entries into the stubs from here on; then no vCPU may be
            # left inside the area when its pages go away.
            self._restore_gates()
            self._step_out_of_area()
            self.synchronize_area(quiesce_timeout)
        except ConnectionClosedError:
            raise  # nothing can be done now; Session.close reconnects and detaches again
        except BaseException:
            # Whatever failed (a drain, a quiesce timeout, an unexpected
            # stop), leave no way into qprobes' stubs that nobody services:
            # return addresses and gates back, vCPUs out of the stubs. The
            # area stays mapped, since something may still point into it.
            try:
                self._release_returns()
            finally:
                self._abandon_area()
            raise
        try:
            self.target.remove_watchpoint(self._doorbell, 1, "write")
        except QprobesError as exc:
            log.warning("could not remove the doorbell watchpoint: %s", exc)
        self.area.teardown()
        self.attached = False
        if self.fast is not None and self.fast.poll in self.poll_hooks:
            self.poll_hooks.remove(self.fast.poll)  # its rings are gone
        if self.fastret is not None and self.fastret.poll in self.poll_hooks:
            self.poll_hooks.remove(self.fastret.poll)
        if self.journal is not None:
            self.journal.end(JournalState.DETACHED)

    def _release_returns(self) -> None:
        """Put back the return addresses kretprobes and jprobes replaced."""
        # Fast instances, slow ones, fast ones again: either kind's saved
        # return address can be the other's trampoline (a tail call).
        if self.fastret is not None:
            self.fastret.detach()
        if self.kretprobes is not None:
            self.kretprobes.detach()
        if self.fastret is not None:
            self.fastret.detach()
        if self.jprobes is not None:
            self.jprobes.detach()

    def _abandon_area(self) -> None:
        """Leave without unmapping: gates back, no vCPU in a stub, area kept.

        The area forgets its page-table entries without writing them back (a
        later attach maps a new area elsewhere, from the rest of the
        reservation, and never unmaps this one)."""
        armed = [p for p in self.points.values() if p.armed]
        if armed:
            # An int3 is still in the text: without the stubs its next hit
            # would reach Linux's own int3 handler (an oops). Leave gates,
            # doorbell and journal as they are: a recovery finishes the job.
            self.attached = False
            log.error("%d probes are still armed (%s): the guest keeps qprobes' stubs; run "
                      "`qprobes attach ADDRESS --recover` to put everything back",
                      len(armed), self._where(armed[0].addr))  # fmt: skip
            return
        try:
            self._restore_gates()
            self._step_out_of_area()
        finally:
            with contextlib.suppress(QprobesError):
                self.target.remove_watchpoint(self._doorbell, 1, "write")
            if self.journal is not None:
                # Nothing leads into the area any more, but its pages stay
                # mapped and taken: a later session must not reuse them.
                with contextlib.suppress(QprobesError):
                    self.journal.end(JournalState.ABANDONED, self.area.phys.next_free)
            self.area.forget()
            self.attached = False

    # --- synchronize_rcu_tasks(), from the host --------------------------------

    def _in_slots(self, addr: int) -> bool:
        """A slot or a detour buffer: code that never calls out (a detour's
        relocated call pushes the original return address), so a reference
        into it on a task's stack is an interrupt frame, which a voluntary
        switch since proves stale (:func:`~qprobes.probes.quiesce.pending`)."""
        lo = self.area.vbase + PAGE_SLOTS_FIRST * PAGE_SIZE
        if lo <= addr < self.area.vbase + (PAGE_SLOTS_LAST + 1) * PAGE_SIZE:
            return True
        if self.area.vbase + REGION_SIZE <= addr < self.area.end:
            return True  # the later regions hold no code but slots
        d_lo, d_hi = self._detour_range()
        return d_lo <= addr < d_hi

    def _stale_once_switched(self, addr: int) -> bool:
        """Whether a task's voluntary switch (or its sleep off the run queue)
        proves a word holding ``addr`` stale: a slot address, or one in the
        stub code page other than the kretprobe trampoline's entry. That entry
        is the one return address a sleeping task keeps there; the stubs
        never call anything that can sleep (their one ``call``, a recorder,
        runs with interrupts off, and they chain to the guest's handlers with
        ``jmp``), so any other stub rip is an interrupt frame's or a return
        address that was popped (found by the soak: a shell asleep on the
        console for the whole detach kept such words, one from an IRQ at the
        trampoline's ``ret``, another at an int3 stub's recorder call)."""
        if self._in_slots(addr):
            return True
        code = self.area.vbase + PAGE_CODE * PAGE_SIZE
        if not code <= addr < code + PAGE_SIZE:
            return False
        stubs = self._stubs
        return stubs is not None and addr != stubs["qp_kretprobe_trampoline"]

    def area_references(self, lo: int, hi: int, *, allow: frozenset[int] = frozenset(),
                        baseline: dict[int, int] | None = None,
                        ) -> tuple[list[str], StackScan | None]:  # fmt: skip
        """What can still return into ``[lo, hi)`` (guest stopped): vCPU rips
        there, and, with a :attr:`stack_scanner`, live stack words and tasks
        the scanner could not decide (see :func:`qprobes.probes.quiesce.pending`).
        Words equal to a value in ``allow`` are not counted."""
        out: list[str] = []
        cpus: list[CpuState] = []
        for vcpu in self.target.vcpus:
            regs = self.target.registers(vcpu)
            if lo <= regs.rip < hi:
                out.append(f"vCPU {vcpu} is at {regs.rip:#x}")
            cpus.append(CpuState(vcpu - 1, regs.rip, regs.rsp, regs.cs))
        if self.stack_scanner is None:
            return out, None
        scan = self.stack_scanner.scan(lo, hi, cpus)
        scan.refs = [r for r in scan.refs if r.value not in allow]
        return out + pending(scan, baseline, self._stale_once_switched), scan

    def synchronize_area(self, timeout: float = 30.0, *,
                         allow: frozenset[int] = frozenset()) -> None:  # fmt: skip
        """Run the guest until nothing can return into qprobes' area.

        The host's ``synchronize_rcu_tasks()``: between looks the guest runs
        (stops are serviced as usual) for a growing slice; a task the scan
        cannot decide must pass a voluntary context switch. Raises
        :class:`~qprobes.errors.QuiesceError` after ``timeout`` seconds. With
        no :attr:`stack_scanner` (a guest that is not Linux) only the vCPUs'
        rips are checked.
        """
        lo, hi = self.area.vbase, self.area.end
        deadline = time.monotonic() + timeout
        baseline: dict[int, int] | None = None
        pause = 0.005
        looks = 0
        while True:
            blocking, scan = self.area_references(lo, hi, allow=allow, baseline=baseline)
            looks += 1
            if baseline is None and scan is not None:
                baseline = dict(scan.nvcsw)
            if not blocking:
                if looks > 1:
                    log.info("qprobes' area is quiet after %d looks", looks)
                return
            if time.monotonic() >= deadline:
                shown = "; ".join(blocking[:3]) + (" ..." if len(blocking) > 3 else "")
                what = "reference" if len(blocking) == 1 else "references"
                raise QuiesceError(
                    f"{len(blocking)} {what} into qprobes' area at {lo:#x} still there after "
                    f"{timeout:g} s ({shown}); the area stays mapped in the guest (its reserved "
                    "memory stays in use) rather than be unmapped under it",
                    blocking,
                )
            log.debug("waiting for the area to be quiet: %s", blocking[:3])
            self.run(timeout=pause)
            pause = min(2 * pause, 0.2)

    def _collect_garbage_slots(self, slots: list[int], size: int = x86insn.SLOT_SIZE) -> list[int]:
        """The dirty slots (or detour buffers, of ``size`` bytes) nothing
        points into now (one look, guest stopped).

        Any task the scan cannot decide keeps every slot dirty. Without a
        :attr:`stack_scanner` only vCPU rips are checked.
        """
        if not slots or self.client.running:
            return []
        lo, hi = min(slots), max(slots) + size
        try:
            cpus = []
            for vcpu in self.target.vcpus:
                regs = self.target.registers(vcpu)
                cpus.append(CpuState(vcpu - 1, regs.rip, regs.rsp, regs.cs))
            busy = {c.rip - (c.rip - lo) % size for c in cpus if lo <= c.rip < hi}
            if self.stack_scanner is not None:
                scan = self.stack_scanner.scan(lo, hi, cpus)
                if scan.undecided:
                    return []
                busy |= {r.value - (r.value - lo) % size for r in scan.refs}
        except QprobesError as exc:
            log.warning("cannot look for references into freed slots: %s", exc)
            return []
        return [slot for slot in slots if slot not in busy]

    def _step_out_of_area(self, max_steps: int = 10_000) -> None:
        """Single-step every vCPU whose rip is in the area (a stub, a slot, the
        trampoline) until it leaves, answering doorbells met on the way.

        All-stop mode stops vCPUs wherever they are, for instance inside the
        #PF stub while it passes an ordinary page fault on.
        """
        for vcpu in self.target.vcpus:
            for _ in range(max_steps):
                if not self.area.contains(self.target.read_register("rip", vcpu)):
                    break
                stop = self.target.step(vcpu, timeout=5.0)
                if stop.watch_addr == self._doorbell:
                    self.handle_stop(stop)
            else:
                raise ProbeError(f"vCPU {vcpu} did not leave qprobes' area in {max_steps} steps")

    def drain(self, timeout: float = 10.0) -> None:
        """Run the guest until no vCPU is single-stepping a slot."""
        deadline = time.monotonic() + timeout
        while self._busy():
            if time.monotonic() > deadline:
                raise ProbeError("vCPUs did not leave their instruction slots in time")
            self.target.resume()
            stop = self.target.wait(max(0.1, deadline - time.monotonic()))
            self.handle_stop(stop)

    def _busy(self) -> bool:
        return any(k.status is not KprobeStatus.NONE for k in self.kcb.values())

    # --- data writes ----------------------------------------------------------

    # --- kernel memory -------------------------------------------------------
    #
    # Kernel addresses are translated through the kernel's page tables (the
    # ones the area was installed under), never the stopped vCPU's current
    # CR3: under page-table isolation a vCPU stopped in user mode has page
    # tables that map almost no kernel memory. Code goes through the gdbstub
    # in physical mode, which invalidates QEMU's translated blocks.

    def _kphys(self, vaddr: int) -> int:
        batch = self._batch
        if batch is not None:
            page = vaddr - vaddr % PAGE_SIZE
            paddr = batch.phys.get(page)
            if paddr is None:
                # One walk per large page (kernel text is mapped with 2 MiB
                # pages): the batch keeps the mapping, the guest does not run.
                large = vaddr - vaddr % LARGE_PAGE
                base = batch.large.get(large)
                if base is not None:
                    paddr = batch.phys[page] = base + page - large
                else:
                    found = self._kphys_translate(page)
                    paddr = batch.phys[page] = found.paddr
                    if found.page_size >= LARGE_PAGE:
                        batch.large[large] = found.paddr - (page - large)
            return paddr + vaddr % PAGE_SIZE
        return self._kphys_walk(vaddr)

    def _kphys_walk(self, vaddr: int) -> int:
        return self._kphys_translate(vaddr).paddr

    def _kphys_translate(self, vaddr: int) -> Translation:
        if self.hostmem is not None:
            return self.hostmem.translate(self._kcr3, vaddr, self._la57)
        return walk(self.target.read_phys_u64, self._kcr3, vaddr, self._la57)

    def _batch_read(self, batch: _Batch, vaddr: int, length: int) -> bytes:
        """Kernel memory from the batch's page cache (whole pages read once)."""
        off = vaddr % PAGE_SIZE
        if off + length <= PAGE_SIZE:
            data = batch.pages.get(vaddr - off)
            if data is not None:
                return bytes(data[off : off + length])
        out = bytearray()
        while length > 0:
            page = vaddr - vaddr % PAGE_SIZE
            data = batch.pages.get(page)
            if data is None:
                paddr = self._kphys(page)
                if self.hostmem is not None:
                    data = bytearray(self.hostmem.read_phys(paddr, PAGE_SIZE))
                else:
                    data = bytearray(self.target.read_phys(paddr, PAGE_SIZE))
                batch.pages[page] = data
            off = vaddr - page
            n = min(length, PAGE_SIZE - off)
            out += data[off : off + n]
            vaddr, length = vaddr + n, length - n
        return bytes(out)

    def _batch_note_write(self, batch: _Batch, vaddr: int, data: bytes) -> None:
        """Keep the batch's cached pages equal to what the guest will hold."""
        while data:
            page = vaddr - vaddr % PAGE_SIZE
            off = vaddr - page
            n = min(len(data), PAGE_SIZE - off)
            cached = batch.pages.get(page)
            if cached is not None:
                cached[off : off + n] = data[:n]
            vaddr, data = vaddr + n, data[n:]

    def kread(self, vaddr: int, length: int) -> bytes:
        """Read kernel memory (code or data)."""
        if not self._kcr3:
            return self.target.read(vaddr, length)
        batch = self._batch
        if batch is not None and not self.area.contains(vaddr):
            return self._batch_read(batch, vaddr, length)
        out = bytearray()
        while length > 0:
            n = min(length, PAGE_SIZE - vaddr % PAGE_SIZE)
            out += self.target.read_phys(self._kphys(vaddr), n)
            vaddr, length = vaddr + n, length - n
        return bytes(out)

    def kwrite_code(self, vaddr: int, data: bytes, *, arming: bool = False) -> None:
        """Write kernel code (int3, slots, stubs) so that TCG sees the change.
        ``arming``: the int3 that arms a probe, which a batch writes last."""
        if not self._kcr3:
            self.target.write(vaddr, data)
            return
        batch = self._batch
        if batch is not None:
            if not self.area.contains(vaddr):
                # Cache the pages first: reads later in the batch see this write.
                self._batch_read(batch, vaddr, len(data))
                if not arming:  # (arming leaves the original bytes as they are)
                    for page in range(vaddr - vaddr % PAGE_SIZE, vaddr + len(data), PAGE_SIZE):
                        batch.original.pop(page, None)
            self._batch_note_write(batch, vaddr, bytes(data))
        view = memoryview(data)
        while view:
            n = min(len(view), PAGE_SIZE - vaddr % PAGE_SIZE)
            if batch is not None:
                paddr = self._kphys(vaddr)
                if arming:
                    batch.int3s.pop(paddr, None)  # (moved to the end, as written last)
                    batch.int3s[paddr] = bytes(view[:n])
                    batch.int3_pages.add(paddr // PAGE_SIZE)
                else:
                    if paddr // PAGE_SIZE in batch.int3_pages:  # (a write stays in its page)
                        for a in range(paddr, paddr + n):
                            batch.int3s.pop(a, None)  # overwritten: the int3 must not win
                    batch.writes.append((paddr, bytes(view[:n])))
            else:
                self.target.write_phys(self._kphys(vaddr), bytes(view[:n]))
            vaddr, view = vaddr + n, view[n:]

    def write_data(self, vaddr: int, data: bytes, cr3: int | None = None) -> None:
        """Write guest *data* (never code): host memory when possible."""
        default = cr3 is None or cr3 == self._kcr3
        if default and self.hostmem is not None and self.area.contains(vaddr) \
                and vaddr % PAGE_SIZE + len(data) <= PAGE_SIZE:  # fmt: skip
            index = (vaddr - self.area.vbase) // PAGE_SIZE
            if self.area.is_mapped(index):
                # The area's own data page: its physical page is known.
                self.hostmem.write_phys(self.area.page(index).paddr + vaddr % PAGE_SIZE, data)
                return
        cr3 = cr3 if cr3 is not None else self._kcr3
        batch = self._batch
        if batch is not None and default and vaddr >> 63 and self.hostmem is not None:
            self._batch_note_write(batch, vaddr, bytes(data))
        if self.hostmem is not None and cr3:
            self.hostmem.write_virt(cr3, vaddr, data, self._la57)
        elif self._kcr3 and vaddr >> 63:
            self.kwrite_code(vaddr, data)
        else:
            self.target.write(vaddr, data)

    def read_data(self, vaddr: int, length: int, cr3: int | None = None) -> bytes:
        batch = self._batch
        if batch is not None and (cr3 is None or cr3 == self._kcr3) and vaddr >> 63 \
                and self._kcr3 and not self.area.contains(vaddr):  # fmt: skip
            return self._batch_read(batch, vaddr, length)
        cr3 = cr3 if cr3 is not None else self._kcr3
        if self.hostmem is not None and cr3:
            return self.hostmem.read_virt(cr3, vaddr, length, self._la57)
        if vaddr >> 63:
            return self.kread(vaddr, length)
        return self.target.read(vaddr, length)

    def _set_ss_active(self, delta: int, cr3: int | None) -> None:
        self._ss_active += delta
        if self._ss_active < 0:
            raise AssertionError("ss_active below zero")
        self.write_data(self._vars + VAR_SS_ACTIVE, struct.pack("<Q", self._ss_active), cr3)

    # --- registration -------------------------------------------------------

    def resolve(self, kp: Kprobe) -> int:
        """The address a kprobe names (``kprobe_addr``)."""
        if kp.addr is not None:
            if kp.symbol_name is not None:
                raise ProbeError(
                    "give a kprobe an address or a symbol, not both (to register a probe "
                    "again after unregistering it, set its addr back to None)"
                )
            return self._adjust_kprobe_addr(kp.addr + kp.offset)
        if kp.symbol_name is None:
            raise ProbeError("a kprobe needs an address or a symbol name")
        if self.symbols is None:
            raise SymbolError(f"no symbol table to resolve {kp.symbol_name!r}")
        sym = self.symbols.lookup(kp.symbol_name)
        if kp.offset < 0 or (sym.size and kp.offset >= sym.size):
            raise ProbeError(
                f"{kp.symbol_name}+{kp.offset:#x} is outside {kp.symbol_name}, "
                f"which is {sym.size:#x} bytes long"
            )
        return self._adjust_kprobe_addr(sym.addr + kp.offset)

    def _adjust_kprobe_addr(self, addr: int) -> int:
        """A probe on a function's leading endbr64 goes 4 bytes on, past it
        (``arch_adjust_kprobe_addr``: an int3 there faults under IBT)."""
        found = self.symbols.resolve(addr) if self.symbols is not None else None
        if found is None or found[0].kind != "func":
            return addr
        sym, off = found
        new_off, _ = x86insn.adjust_kprobe_offset(self._original_bytes(sym.addr, 4), off)
        return sym.addr + new_off

    def _original_bytes(self, addr: int, length: int) -> bytes:
        """Guest text with qprobes' own int3 bytes replaced by the originals
        (and, through ``recover_text``, the guest's own jumps over its
        optimized kprobes: Linux's ``recover_probed_instruction()``).

        In a batch, a page's original bytes are worked out once: the int3s
        qprobes arms and takes out meanwhile leave them as they are (that
        is what the originals are), and any other code write to the page
        (a debugger's), or a probe lost, makes it be worked out again."""
        batch = self._batch
        if batch is not None and self._kcr3 and length > 0 and not self.area.contains(addr):
            off = addr % PAGE_SIZE
            if off + length <= PAGE_SIZE:
                original = batch.original.get(addr - off)
                if original is not None:
                    return original[off : off + length]
            out = bytearray()
            while length > 0:
                page = addr - addr % PAGE_SIZE
                original = batch.original.get(page)
                if original is None:
                    original = batch.original[page] = self._original_uncached(page, PAGE_SIZE)
                n = min(length, PAGE_SIZE - (addr - page))
                out += original[addr - page : addr - page + n]
                addr, length = addr + n, length - n
            return bytes(out)
        return self._original_uncached(addr, length)

    def _original_uncached(self, addr: int, length: int) -> bytes:
        data = bytearray(self.kread(addr, length))
        points = self.points
        for a in points.within(addr, addr + length):
            at = points[a]
            if at.armed:
                data[a - addr] = at.opcode
        for det in self.detours.values():
            # The bytes under a detour's jump (recover_probed_instruction()).
            for i, byte in enumerate(det.window.original[: x86insn.JMP_REL32_SIZE]):
                if addr <= det.addr + i < addr + length:
                    data[det.addr + i - addr] = byte
        if self.recover_text is not None:
            return self.recover_text(addr, bytes(data))
        return bytes(data)

    def blacklist(self, start: int, end: int, reason: str) -> None:
        """Refuse probes in ``[start, end)`` (Linux's kprobe blacklist)."""
        self._blacklist.append((start, end, reason))
        self._blacklist_index = None

    def _blacklisted(self, addr: int) -> tuple[int, int, str] | None:
        """The first range of the blacklist (in the order given) holding
        ``addr``: a lookup in the ranges' elementary segments."""
        if self._blacklist_index is None:
            self._blacklist_index = _segments(self._blacklist)
        bounds, first = self._blacklist_index
        i = bisect.bisect_right(bounds, addr) - 1
        if i < 0 or first[i] < 0:
            return None
        return self._blacklist[first[i]]

    def _check_blacklist(self, addr: int) -> None:
        if self.attached and self.area.contains(addr):
            raise ProbeError(f"{addr:#x} is inside qprobes' own guest area")
        hit = self._blacklisted(addr)
        if hit is not None:
            where = self.symbols.format(addr) if self.symbols is not None else f"{addr:#x}"
            raise ProbeError(f"{where} is blacklisted: {hit[2]}")

    def can_probe(self, addr: int) -> None:
        """Raise unless ``addr`` may be probed (``can_probe``/``check_kprobe_address_safe``)."""
        self._check_blacklist(addr)
        found_addr = self.symbols.resolve(addr) if self.symbols is not None else None
        vector = self._handler_vector(addr, found_addr)
        if vector is not None:
            raise ProbeError(
                f"{addr:#x} is in the guest's handler for vector {vector}, "
                "which qprobes' stubs chain to"
            )
        self._check_text(addr)
        if self.symbols is None:
            return
        found = found_addr
        if found is None:
            return
        sym, off = found
        if sym.kind != "func" or sym.size == 0:
            return
        code = self._original_bytes(sym.addr, off + x86insn.MAX_INSN_SIZE)
        # Decode from the symbol's start up to addr (Linux's can_probe()).
        try:
            spanning = x86insn.spanning_instruction(code, sym.addr, addr)
        except InstructionError as exc:
            raise ProbeError(
                f"cannot probe {addr:#x} ({sym.name}+{off:#x}): its instruction boundary is "
                f"unknown, {sym.name}+{exc.addr - sym.addr:#x} cannot be decoded with "
                f"certainty ({exc.reason})"
            ) from exc
        if spanning is not None:
            raise ProbeError(
                f"{addr:#x} ({sym.name}+{off:#x}) is not an instruction boundary: "
                f"the instruction at {sym.name}+{spanning.addr - sym.addr:#x} spans it"
            )

    def _decode(self, code: bytes, addr: int) -> x86insn.Insn:
        """:func:`x86insn.decode`, once per (address, bytes) in a batch."""
        batch = self._batch
        if batch is None:
            return x86insn.decode(code, addr)
        key = (addr, bytes(code[: x86insn.MAX_INSN_SIZE]))
        insn = batch.decoded.get(key)
        if insn is None:
            insn = batch.decoded[key] = x86insn.decode(code, addr)
        return insn

    def _check_text(self, addr: int) -> None:
        """Only a function's code may be probed: the front end's rule for its
        guest (``text_check``), else a function symbol must hold ``addr``."""
        if self.text_check is not None:
            self.text_check(addr)
            return
        if self.symbols is None:
            return
        found = self.symbols.resolve(addr)
        if found is None or found[0].kind != "func":
            what = f" ({found[0].name} is not a function)" if found is not None else ""
            raise ProbeError(f"{addr:#x} is not inside a function symbol{what}")

    def wait_text_unlocked(self) -> None:
        """Return once the guest is not patching its own text (``text_lock_held``),
        running it a few milliseconds at a time; :class:`ProbeError` after
        ``text_lock_timeout`` seconds. Writing kernel text meanwhile could race
        a ``text_poke_bp()`` (and take its transient int3 for the original byte)."""
        if self._batch is not None and self._batch.text_unlocked:
            return  # seen unlocked when the batch began; the guest has not run since
        if self.text_lock_held is None or not self.text_lock_held():
            if self._batch is not None:
                self._batch.text_unlocked = True
            return
        if self._batch is not None:
            raise ProbeError("the guest is patching its own text (text_mutex held): not "
                             "writing kernel text in a batch")  # fmt: skip
        deadline = time.monotonic() + self.text_lock_timeout
        while self.text_lock_held():
            if time.monotonic() > deadline:
                raise ProbeError(
                    f"the guest has been patching its own text (text_mutex held) for "
                    f"{self.text_lock_timeout:g} s: not writing kernel text meanwhile"
                )
            self.run(timeout=0.005)

    def _handler_vector(self, addr: int, found: tuple[Symbol, int] | None) -> int | None:
        """The first vector (in :attr:`_orig_handler`'s order) whose handler
        :meth:`_same_function_as` puts in ``addr``'s function (``found``:
        ``addr`` resolved), or None: lookups in tables built once for the
        handlers, not a comparison with each of them."""
        table = self._handler_table
        batch = self._batch
        if batch is not None and table is not None and batch.handlers_checked:
            key = table[0]  # the handlers do not change inside a batch
        else:
            key = (id(self.symbols), tuple(self._orig_handler.items()))
            if batch is not None:
                batch.handlers_checked = True
        if table is None or table[0] != key:
            by_sym: dict[Symbol, int] = {}  # handlers in a function: the first one's position
            by_addr: dict[int, int] = {}  # handlers outside any function
            every: dict[int, int] = {}  # every handler (addr has no function)
            for n, (_vector, handler) in enumerate(key[1]):
                every.setdefault(handler, n)
                if self.symbols is not None and handler not in self._handler_syms:
                    self._handler_syms[handler] = self.symbols.resolve(handler)
                fb = self._handler_syms.get(handler)
                if fb is None:
                    by_addr.setdefault(handler, n)
                else:
                    by_sym.setdefault(fb[0], n)
            table = self._handler_table = (key, by_sym, by_addr, every)
        _key, by_sym, by_addr, every = table
        pos: int | None
        if self.symbols is None or found is None:
            pos = every.get(addr)
        else:
            hits = [p for p in (by_sym.get(found[0]), by_addr.get(addr)) if p is not None]
            pos = min(hits) if hits else None
        return None if pos is None else key[1][pos][0]

    def _same_function(self, a: int, b: int) -> bool:
        if self.symbols is None:
            return a == b
        return self._same_function_as(a, self.symbols.resolve(a), b)

    def _same_function_as(self, a: int, fa: tuple[Symbol, int] | None, b: int) -> bool:
        """Whether ``b`` is in the function ``fa`` (``a`` resolved); the
        symbols of ``b`` (a handler address) are looked up once."""
        if self.symbols is None:
            return a == b
        if b not in self._handler_syms:
            self._handler_syms[b] = self.symbols.resolve(b)
        fb = self._handler_syms[b]
        if fa is None or fb is None:
            return a == b
        return fa[0].addr == fb[0].addr and fa[0] == fb[0]  # the address first: cheaper

    def resolve_addr(self, addr: int) -> tuple[Symbol, int] | None:
        """The symbol holding ``addr`` and the offset into it: vmlinux's, or
        :attr:`resolve_more`'s (a module's)."""
        found = self.symbols.resolve(addr) if self.symbols is not None else None
        if found is None and self.resolve_more is not None:
            found = self.resolve_more(addr)
        return found

    def _where(self, addr: int) -> str:
        if self.symbols is not None and self.symbols.resolve(addr) is not None:
            return self.symbols.format(addr)
        found = self.resolve_addr(addr)
        if found is not None:
            return f"{found[0].name}+{found[1]:#x}"
        return f"{addr:#x}"

    def _check_ftrace_location(self, addr: int) -> int:
        """Where to put the int3 of a probe at ``addr`` (``check_ftrace_location``).

        ``addr`` itself, unless it is one of the guest's ftrace sites: an int3
        there would break ftrace, so the probe goes on the instruction right
        after the site (:mod:`qprobes.probes.ftrace_site`). Refused, before
        anything is written, where that instruction does not see every call
        and only calls: a branch in the function goes to it, the kernel
        reserves it for patching, or what the guest attached to the site
        (a direct trampoline, an IPMODIFY ops such as livepatch) may call it
        itself or skip it.
        """
        if self.ftrace is None:
            return addr
        site = self.ftrace.site(addr)
        if site is None:
            return addr
        new = addr + MCOUNT_INSN_SIZE

        # Named only on the way to a refusal (a batch arms thousands).
        def there() -> str:
            return self._where(new)

        def head() -> str:  # the start of each refusal
            return (f"{self._where(addr)} is an ftrace site, where qprobes probes the next "
                    f"instruction, {there()}")  # fmt: skip

        if site.direct:
            raise ProbeError(
                f"{head()}; but the guest attached a direct trampoline to it (a BPF fentry/fexit "
                f"program: FTRACE_FL_DIRECT, {site.describe()}), which calls {there()} with its "
                "own return address or skips the function: not probing it"
            )
        if site.ipmodify:
            raise ProbeError(
                f"{head()}; but an ftrace_ops that changes the ip (FTRACE_FL_IPMODIFY: "
                f"livepatch or the like, {site.describe()}) is attached, so {there()} may never "
                "run: not probing it"
            )
        # The blacklist names the function itself; the rest of can_probe()
        # (the text, the handlers, the boundary) is asked of the next
        # instruction, in the same function, where the int3 goes.
        self._check_blacklist(addr)
        try:
            next_insn = self._decode(self._original_bytes(new, x86insn.MAX_INSN_SIZE), new)
        except InstructionError as exc:
            raise ProbeError(f"{head()}; but {there()} does not decode ({exc})") from exc
        reason = self.ftrace.text_reserved(new, new + next_insn.length)
        if reason is not None:
            raise ProbeError(f"{head()}; but that is text the kernel patches: {reason}")
        found = self.symbols.resolve(addr) if self.symbols is not None else None
        if found is not None and found[0].size > MCOUNT_INSN_SIZE:
            assert self.symbols is not None
            # The function and its out-of-line part (GCC's SYM.cold), which
            # jumps back into it.
            parts = [found[0]]
            if f"{found[0].name}.cold" in self.symbols:
                parts.append(self.symbols.lookup(f"{found[0].name}.cold"))
            for sym in parts:
                code = self._original_bytes(sym.addr, sym.size)
                # One sweep of both decoders decides most functions; where it
                # cannot (or finds a branch) the full decode gives the answer.
                sources = x86insn.quick_branches_to(code, sym.addr, new)
                if sources is None or sources:
                    try:
                        insns = x86insn.decode_function(code, sym.addr)
                    except InstructionError as exc:
                        raise ProbeError(
                            f"{head()}; but {sym.name} does not decode ({exc}), so qprobes "
                            f"cannot tell whether a branch goes to {there()}: probe {there()} "
                            "explicitly"
                        ) from exc
                    sources = branches_to(insns, new)
                if sources:
                    named = ", ".join(self._where(a) for a in sources)
                    raise ProbeError(
                        f"{head()}; but a branch in {sym.name} goes there too ({named}), whose "
                        f"hits would look like calls: probe {there()} explicitly (every pass "
                        "through it) or another offset"
                    )
        if log.isEnabledFor(logging.INFO):
            log.info("%s is an ftrace site (%s): armed at %s", self._where(addr), site.describe(),
                     there())  # fmt: skip
        return new

    def ftrace_site_changed(self, kp: Kprobe) -> str | None:
        """Read ``kp``'s ftrace record again: what the guest attached to the
        site since it was armed, when that makes its hits unsound (the arm-time
        refusals of :meth:`_check_ftrace_location`, found late). The Tracer
        reports it at the end of a trace. None when all is well."""
        if not kp.on_ftrace or self.ftrace is None or kp.addr is None:
            return None
        where, there = self._where(kp.addr), self._where(kp.addr + MCOUNT_INSN_SIZE)
        site = self.ftrace.site(kp.addr)
        if site is None:
            return f"{where} is no longer one of the guest's ftrace sites"
        if site.direct:
            return (
                f"the guest attached a direct trampoline (BPF) to {where} while qprobes probed "
                f"{there} for it: calls it skipped were missed, and its own calls to {there} "
                "were counted"
            )
        if site.ipmodify:
            return (
                f"the guest attached an IPMODIFY ftrace_ops (livepatch?) to {where} while "
                f"qprobes probed {there} for it: calls it redirected were missed"
            )
        return None

    def register_kprobe(self, kp: Kprobe) -> Kprobe:
        """Register and arm ``kp`` (``register_kprobe``)."""
        if not self.attached:
            raise ProbeError("attach the engine before registering probes")
        if kp.registered:
            raise ProbeError(f"{kp!r} is already registered")
        site = self.resolve(kp)
        kp.on_ftrace = False
        addr = self._check_ftrace_location(site)
        kp.addr = site  # as register_kprobe() fills in p->addr; symbol_name stays
        kp.on_ftrace = addr != site
        covering = self._detour_covering(addr)
        if covering is not None and covering.addr != addr:
            # A probe inside a detour's window: the jump goes first, as Linux
            # unoptimizes an optprobe whose window a new kprobe falls into.
            self._unoptimize(self.points[covering.addr])
        point = self.points.get(addr)
        if point is not None:
            # An aggregate probe: one int3, one slot, several handlers. Its
            # slot holds a copy to single-step in any case; whether a hit
            # runs boosted is decided per hit (ProbePoint.boost_now).
            self.check_lost([point])
            if point.lost:
                raise ProbeError(f"{self._where(addr)}: the probe there was lost (the guest "
                                 "rewrote its text); unregister its kprobes first")  # fmt: skip
            point.kprobes.append(kp)
            kp.registered = True
            self._fast_update(point)
            return kp
        self.wait_text_unlocked()
        self.can_probe(addr)
        if self.on_module_probe is not None and self.module_base is not None \
                and self.module_base(addr):  # fmt: skip
            self.on_module_probe(addr)
        self._table_room(1)
        self._check_site_room(addr)
        code = self._original_bytes(addr, x86insn.MAX_INSN_SIZE)
        insn = self._decode(code, addr)
        if self.address_check is not None:
            self.address_check(addr, insn.length)
        analysis = x86insn.analyze(insn)
        if analysis.rejected is not None:
            raise InstructionError(addr, f"cannot probe {insn.mnemonic}: {analysis.rejected}")
        assert self._slots is not None
        slot = self._slots.get_insn_slot()
        try:
            # popf and iret can load TF: a boosted copy would let the guest's
            # own single-step trap land in the slot.
            boosted = kp.boost and analysis.boostable and not _loads_flags(insn)
            copy, boost_slot = slot_code(insn, analysis, slot, boosted)
            # The unused tail traps, whatever the slot held before.
            self.kwrite_code(slot, copy.ljust(x86insn.SLOT_SIZE, bytes([INT3])))
        except BaseException:
            self._slots.free_insn_slot(slot)
            raise
        point = ProbePoint(addr, code[0], insn, analysis, slot, boosted, [kp],
                           boost_slot=boost_slot)  # fmt: skip
        self.points[addr] = point
        kp.registered = True
        try:
            self._arm(point)
        except BaseException:
            del self.points[addr]
            kp.registered = False
            self._slots.free_insn_slot(slot)
            raise
        return kp

    def register_many(self, kps: Sequence[Kprobe], *,
                      stop_on_error: bool = False) -> list[QprobesError | None]:  # fmt: skip
        """Register and arm many kprobes in one pass, the guest stopped once.

        Each probe goes through :meth:`register_kprobe` and so through every
        check a probe registered alone meets, with the same refusals; what
        the batch saves is guest traffic: kernel memory is read once per
        page (a cache that lives as long as the batch, kept equal to what
        qprobes writes), the probe table grows once for the whole batch, the
        :attr:`batch_hooks` keep what they read (the guest's ftrace records,
        its optimized kprobes), and the code writes (slots, int3s) go out at
        the end in one pipelined stream, in the order they were made (a
        probe's slot, table entry and journal record before its int3).

        Returns, for each probe, None when it is armed or the error that
        refused it; with ``stop_on_error`` the first refusal is raised (the
        probes before it stay registered).
        """
        if not self.attached:
            raise ProbeError("attach the engine before registering probes")
        results: list[QprobesError | None] = [None] * len(kps)
        if not kps:
            return results
        self.wait_text_unlocked()  # once: the guest does not run in a batch
        self.make_room(len(kps))
        with self.batch():
            for n, kp in enumerate(kps):
                try:
                    self.register_kprobe(kp)
                except QprobesError as exc:
                    if stop_on_error:
                        raise
                    results[n] = exc
        return results

    def make_room(self, probes: int) -> None:
        """Grow the probe table once for ``probes`` more addresses (as many
        as fit), before a batch registers them one by one."""
        room = min(probes, max_probes() - self._ptable.live)
        if room > 0:
            self._table_room(room)

    @contextlib.contextmanager
    def batch(self, *, hooks: bool = True) -> Iterator[None]:
        """Group guest accesses (see :meth:`register_many`); the guest must
        stay stopped inside. Nested batches join the outer one. ``hooks``
        false: the :attr:`batch_hooks` are not told (a batch that only puts
        bytes back, at detach, needs none of what they read)."""
        if self._batch is not None:
            yield
            return
        self._batch = _Batch()
        told = self.batch_hooks if hooks else []
        journal = self.journal
        try:
            if journal is not None:
                journal.hold_sites(True)
            for hook in told:
                hook(True)
            yield
        finally:
            held: BaseException | None = None
            if journal is not None:
                # With the batch still open: the header joins its writes
                # after the records, before the int3s.
                try:
                    journal.hold_sites(False)
                except BaseException as exc:  # (the batch must end all the same)
                    held = exc
            batch, self._batch = self._batch, None
            try:
                if held is not None:
                    # Their records may not be in the guest: none of the
                    # batch's int3s goes in (their bytes stay the originals).
                    for point in batch.armed:
                        point.armed = False
                    raise held
                if batch.ptable:
                    self._ptable_write(list(batch.ptable))
                self._flush(batch.writes + list(batch.int3s.items()))
            finally:
                for hook in told:
                    hook(False)
            for kp in batch.optimize:
                if kp.registered:
                    self._optimize_wanted(kp)

    def _flush(self, writes: list[tuple[int, bytes]]) -> None:
        """Physical writes, in order, pipelined (adjacent ones merged)."""
        merged: list[tuple[int, bytearray]] = []
        for paddr, data in writes:
            if merged and merged[-1][0] + len(merged[-1][1]) == paddr:
                merged[-1][1].extend(data)
            else:
                merged.append((paddr, bytearray(data)))
        if not merged:
            return
        self.client.set_phys_mem_mode(True)
        self.client.write_memory_many([(a, bytes(d)) for a, d in merged])

    def _forget_kprobe(self, point: ProbePoint, kp: Kprobe) -> None:
        """``kp`` leaves ``point``, with its recorder and wanted detour."""
        point.kprobes.remove(kp)
        kp.registered = False
        if self.fast is not None and self.fast.recorder_of(kp, point.addr) is not None:
            self.fast.remove(point.addr, kp)
            if point.addr not in self.fast.installed:
                self._detour_wanted.discard(point.addr)

    def unregister_kprobe(self, kp: Kprobe) -> None:
        """Disarm and forget ``kp`` (``unregister_kprobe``)."""
        arm_addr = kp.arm_addr
        if not kp.registered or arm_addr is None:
            raise ProbeError(f"{kp!r} is not registered")
        point = self.points[arm_addr]
        self.check_lost([point])
        self._forget_kprobe(point, kp)
        if point.kprobes:
            self._fast_update(point)
            self._reoptimize(point)
            return
        # A vCPU may be stepping this probe's slot: let it finish first.
        self.drain()
        self._disarm(point)
        del self.points[point.addr]
        assert self._slots is not None
        self._slots.free_insn_slot(point.slot, dirty=point.boosted)
        # A detour this probe's int3 had taken out (it was inside the window)
        # may go back in.
        for addr in [a for a in self._detour_wanted if point.addr - 32 < a < point.addr]:
            near = self.points.get(addr)
            if near is not None:
                self._reoptimize(near)

    def unregister_many(self, kps: Sequence[Kprobe], *,
                        stop_on_error: bool = False) -> list[QprobesError | None]:  # fmt: skip
        """Disarm and forget many kprobes in one pass (:meth:`unregister_kprobe`
        for each, the guest stopped once).

        Every byte goes back as it does for one probe (a detour's jump first,
        the original byte only where qprobes' int3 still is, a probe whose
        text the guest rewrote is lost instead); what the batch saves is guest
        traffic: one look for lost probes, one drain, the text read once per
        page, the original bytes written in one pipelined stream, then the
        probe table entries in runs and the journal records (each record goes
        only once its byte is back). Returns, for each probe, None or the
        error that kept it registered (not registered, or a disarm that
        failed); with ``stop_on_error`` the first such error is raised once
        the others are done.
        """
        results: list[QprobesError | None] = [None] * len(kps)
        mine: list[tuple[int, Kprobe, ProbePoint]] = []
        seen: set[int] = set()
        for n, kp in enumerate(kps):
            point = self.points.get(kp.arm_addr) if kp.arm_addr is not None else None
            if not kp.registered or point is None or id(kp) in seen:
                results[n] = ProbeError(f"{kp!r} is not registered")
                continue
            seen.add(id(kp))
            mine.append((n, kp, point))
        points = list({id(p): p for _n, _kp, p in mine}.values())
        if points:
            self.check_lost(points)
        going: list[ProbePoint] = []
        for _n, kp, point in mine:
            self._forget_kprobe(point, kp)
        for point in points:
            if point.kprobes:
                self._fast_update(point)
                self._reoptimize(point)  # its detour again, with the chain it has now
            else:
                going.append(point)
        if going:
            # A vCPU may be stepping one of these slots: let it finish first.
            self.drain()
            stuck = self._disarm_many(going)
            assert self._slots is not None
            for point in going:
                if point.addr in stuck:
                    continue
                del self.points[point.addr]
                self._slots.free_insn_slot(point.slot, dirty=point.boosted)
            for n, kp, point in mine:
                exc = stuck.get(point.addr)
                if exc is not None:
                    # Still armed: its kprobe stays registered with it.
                    point.kprobes.append(kp)
                    kp.registered = True
                    results[n] = exc
        if stop_on_error:
            for exc in results:
                if exc is not None:
                    raise exc
        return results

    def _disarm_many(self, points: Sequence[ProbePoint]) -> dict[int, QprobesError]:
        """:meth:`_disarm` for each of ``points`` in one batch: detours go
        first, one by one (each in ``text_poke_bp()``'s order); then the
        original bytes, read and written in one batch; once they are in the
        guest, the table entries (in runs) and the journal records. Returns
        the points that stay armed, by address, with the reason."""
        stuck: dict[int, QprobesError] = {}
        for point in points:
            if point.armed and point.addr in self.detours:
                try:
                    self._unoptimize(point)
                except ConnectionClosedError:
                    raise
                except QprobesError as exc:
                    stuck[point.addr] = exc
        todo = [p for p in points if p.armed and p.addr not in stuck]
        if not todo:
            return stuck
        if any(p.opcode != INT3 for p in todo):
            try:
                self.wait_text_unlocked()  # may run the guest: before the batch
            except ProbeError as exc:
                stuck.update((p.addr, exc) for p in todo)
                return stuck
        back: list[ProbePoint] = []
        with self.batch(hooks=False):
            current = self._code_bytes([p.addr for p in todo if p.opcode != INT3])
            for point in todo:
                try:
                    if point.opcode == INT3:
                        back.append(point)
                    elif point.addr not in current:
                        self._lose(point, "its text is no longer mapped")
                    elif current[point.addr] != INT3:
                        # The guest rewrote its own text (ftrace, static keys):
                        # the saved byte is stale, so leave the new one alone.
                        self._lose(point)
                    else:
                        self.kwrite_code(point.addr, bytes([point.opcode]))
                        back.append(point)
                except ConnectionClosedError:
                    raise
                except TranslationError:
                    self._lose(point, "its text is no longer mapped")
                except QprobesError as exc:
                    stuck[point.addr] = exc
        # The bytes are back (the batch flushed them): nothing hits these now.
        # Without host memory the records go through the gdbstub: pipelined.
        with self.batch(hooks=False) if self.hostmem is None else contextlib.nullcontext():
            indexes = [i for i in (self._ptable.remove(p.addr) for p in back) if i is not None]
            if indexes:
                self._ptable_write(indexes)
            for point in back:
                point.armed = False
                self._unsite(point)
        return stuck

    def enable_kprobe(self, kp: Kprobe) -> None:
        kp.disabled = False
        if kp.arm_addr is not None and kp.arm_addr in self.points:
            point = self.points[kp.arm_addr]
            if point.lost:
                raise ProbeError(f"{self._where(point.addr)}: the probe there was lost "
                                 "(the guest rewrote its text)")  # fmt: skip
            if not point.armed:
                self._check_site_room(point.addr)
                self._arm(point)
            self._fast_update(point)
            self._reoptimize(point)

    def _check_site_room(self, addr: int) -> None:
        """Refuse to arm ``addr`` when the journal has no room for its record."""
        if self.journal is not None and not self.journal.has_room(addr):
            raise ProbeError(f"{self._where(addr)}: qprobes' journal records at most "
                             f"{self.journal.max_sites} armed probe sites (an eighth of "
                             "the reservation)")  # fmt: skip

    def disable_kprobe(self, kp: Kprobe) -> None:
        kp.disabled = True
        if kp.arm_addr is not None and kp.arm_addr in self.points:
            point = self.points[kp.arm_addr]
            if point.armed and not point.enabled:
                self._disarm(point)
            self._fast_update(point)

    # --- the fast path ------------------------------------------------------------

    def _fast_update(self, point: ProbePoint) -> None:
        """Rewrite the fast-path word of ``point`` after its kprobes changed.
        A detour goes (back to the int3) once the point's hits may not all
        run the recorder: an aggregate probe, a disabled one."""
        if self.fast is None:
            return
        det = self.detours.get(point.addr)
        if det is not None and self.fast.entry_of(point) != det.recorder:
            # Its hits may not all run a recorder now, or they run another
            # one (a chain that grew or shrank): the int3 until it is redone.
            self._unoptimize(point)
        if not point.armed:
            return
        i = self._ptable_find(point.addr)
        if i is not None:
            self.fast.write_word(i, point, self._tbuf.rtable)

    def cpu_features(self) -> CpuFeatures:
        """What recorders may use on this guest's CPU: SMAP when CR4 has it on.
        (The host cannot run CPUID in the guest: a TSC is assumed, RDPID not.)"""
        cr4 = self.target.registers().cr4
        return CpuFeatures(smap=bool(cr4 & CR4_SMAP), tsc=True, rdpid=False)

    def enable_fast_path(self) -> RingLayout:
        """Map the recorder and ring pages (once); the rings' layout."""
        if self.fast is None or not self.attached:
            raise ProbeError("attach the engine before enabling the fast path")
        if self.fast.poll not in self.poll_hooks:
            self.poll_hooks.append(self.fast.poll)
        if self.fastret is not None and self.fastret.poll not in self.poll_hooks:
            self.poll_hooks.append(self.fastret.poll)
        return self.fast.enable(len(self.target.vcpus))

    def install_recorder(self, kp: Kprobe, build: Callable[[int], Recorder],
                         detour: bool | None = None) -> Recorder | None:  # fmt: skip
        """Give the registered ``kp`` a recorder that runs in the guest at its
        hits, in place of the doorbell. ``build(address)`` generates it. The
        recorder runs only while ``kp`` is the sole, enabled kprobe of a
        boosted probe point; other hits keep the slow path (its pre_handler).
        Returns None where the point can never be fast (not boosted).

        With ``detour`` (default :attr:`detour`) the engine then tries to
        jump-optimize the point (:meth:`optimize`); a refusal leaves it on
        the int3 fast path, with the reason in ``kp.detour_refused``."""
        if self.fast is None or self.fast.ring is None:
            raise ProbeError("enable the fast path before installing recorders")
        if not kp.registered or kp.arm_addr is None:
            raise ProbeError(f"{kp!r} is not registered")
        point = self.points[kp.arm_addr]
        if not point.boosted:
            return None
        rec = self.fast.install(kp, point, build)
        self._fast_update(point)
        if self.detour if detour is None else detour:
            self._detour_wanted.add(point.addr)
            if self._batch is not None:
                self._batch.optimize.append(kp)  # once the batch is out
            else:
                self.optimize(kp)  # its refusal is the caller's to see
        else:
            self._detour_wanted.discard(point.addr)
        return rec

    def _reoptimize(self, point: ProbePoint) -> None:
        """Jump-optimize ``point`` again when its detour was wanted and its
        hits all run the recorder once more (the jump went when they did not)."""
        if (point.addr not in self._detour_wanted or point.addr in self.detours
                or not point.armed or self.fast is None
                or self.fast.word(point) == 0):  # fmt: skip
            return
        installed = self.fast.installed.get(point.addr)
        if installed:
            self._optimize_wanted(installed[0].kp)

    def _optimize_wanted(self, kp: Kprobe) -> None:
        """:meth:`optimize` for a caller whose own work is done (an enable, an
        unregister, a batch): a failure leaves the point on its int3 fast
        path, which records the same, and is only said in ``detour_refused``.
        In a batch it waits for the batch's end (a detour runs the guest)."""
        if self._batch is not None:
            self._batch.optimize.append(kp)
            return
        try:
            self.optimize(kp)
        except ConnectionClosedError:
            raise
        except QprobesError as exc:
            kp.detour_refused = str(exc)
            log.info("%r stays on its int3: %s", kp, exc)

    def not_fast_because(self, kp: Kprobe) -> str | None:
        """Why the registered ``kp``'s point can never run a recorder of
        ``kp`` in the guest, or None when it can."""
        point = self.points.get(kp.arm_addr) if kp.arm_addr is not None else None
        if point is None or not point.boosted:
            return "the probed instruction cannot run boosted"
        if self.fast is not None and self.fast.recorder_of(kp, point.addr) is not None:
            return "it has a recorder already"
        return None

    def install_fast_entry(self, kp: Kprobe, rec: Recorder) -> None:
        """Like :meth:`install_recorder`, for code already in the area (a
        fast return probe's entry code)."""
        if self.fast is None or self.fast.ring is None:
            raise ProbeError("enable the fast path before installing recorders")
        if not kp.registered or kp.arm_addr is None:
            raise ProbeError(f"{kp!r} is not registered")
        point = self.points[kp.arm_addr]
        self.fast.install_placed(kp, point, rec)
        self._fast_update(point)

    # --- jump-optimized probes (Linux's optprobes) --------------------------------

    def optimize(self, kp: Kprobe) -> bool:
        """Replace the int3 of fast-path ``kp`` by a jump to a detour buffer
        (``optimize_kprobe``). False, with ``kp.detour_refused`` saying why,
        when the point stays on its int3 (no error: the int3 fast path
        records the same events)."""
        if kp.arm_addr is None or kp.arm_addr not in self.points:
            raise ProbeError(f"{kp!r} is not registered")
        point = self.points[kp.arm_addr]
        if point.addr in self.detours:
            return True
        try:
            self._optimize(point)
        except (DetourError, InstructionError) as exc:  # InstructionError: a copy out of reach
            kp.detour_refused = exc.reason
            log.info("%s stays on its int3: %s", self._where(point.addr), exc.reason)
            return False
        except ProbeError as exc:
            # Anything else that kept the jump out (the guest patching its
            # text for too long, the buffer not assembling): the int3 fast
            # path is intact, so this is a refusal too.
            kp.detour_refused = str(exc)
            log.info("%s stays on its int3: %s", self._where(point.addr), exc)
            return False
        kp.detour_refused = None
        return True

    def is_detoured(self, kp: Kprobe) -> bool:
        """Whether hits of ``kp`` go through a detour now (no exception)."""
        return kp.arm_addr is not None and kp.arm_addr in self.detours

    def _detour_covering(self, addr: int) -> x86detour.Detour | None:
        for det in self.detours.values():
            if det.addr <= addr < det.window.end:
                return det
        return None

    def _selectors(self) -> tuple[int, int]:
        """The kernel's cs and ss, for the frame a detour builds (which the
        #BP stub's iretq loads when the host takes the hit): a vCPU's in
        kernel mode, else the code selector of the guest's #BP gate and the
        data selector after it (SYSCALL's layout: ss = cs + 8)."""
        if self._kernel_selectors is None:
            for vcpu in self.target.vcpus:
                regs = self.target.registers(vcpu)
                if not regs.cs & 3:
                    self._kernel_selectors = (regs.cs, regs.ss)
                    break
            else:
                gate = next((g for (_idt, v), g in self._orig_gates.items() if v == 3), None)
                if gate is None:
                    raise DetourError(0, "the kernel's code selector is not known")
                cs = int.from_bytes(gate[2:4], "little")
                self._kernel_selectors = (cs, cs + 8)
        return self._kernel_selectors

    def _detour_window(self, point: ProbePoint) -> x86detour.Window:
        """The window of ``point``'s detour, with every rule checked: the
        instruction rules of :func:`~qprobes.arch.x86_64.detour.select_window`,
        then the guest's rules for every byte of it (the same checks a probe
        there passes: blacklist, text the kernel patches, ftrace sites), no
        other probe inside it, and the front end's function rule."""
        addr = point.addr

        def refuse(why: str) -> DetourError:
            return DetourError(addr, why)

        found = self.symbols.resolve(addr) if self.symbols is not None else None
        if found is None or found[0].kind != "func" or not found[0].size:
            raise refuse("no function bounds are known (kallsyms size)")
        if self.module_base is not None and self.module_base(addr):
            raise refuse("module text is not detoured")
        sym = found[0]
        start, end = sym.addr, sym.addr + sym.size
        try:
            insns = x86insn.decode_function(self._original_bytes(start, sym.size), start)
            extra: list[x86insn.Insn] = []
            assert self.symbols is not None
            if f"{sym.name}.cold" in self.symbols:
                cold = self.symbols.lookup(f"{sym.name}.cold")
                extra = x86insn.decode_function(self._original_bytes(cold.addr, cold.size),
                                                cold.addr)  # fmt: skip
        except InstructionError as exc:
            raise refuse(f"{sym.name} does not decode ({exc.reason})") from exc
        window = x86detour.select_window(insns, addr, start, end, self.indirect_thunks, extra)
        lo, hi = window.addr, window.end
        for b_lo, b_hi, reason in self._blacklist:
            if b_lo < hi and lo < b_hi:
                raise refuse(f"the window overlaps blacklisted text: {reason}")
        for insn in window.insns[1:]:
            self._check_text(insn.addr)
        if self.address_check is not None:
            try:
                self.address_check(lo, window.length)
            except ProbeError as exc:
                raise refuse(str(exc)) from exc
        if self.ftrace is not None:
            reserved = self.ftrace.text_reserved(lo, hi)
            if reserved is not None:
                raise refuse(f"the window holds text the kernel patches: {reserved}")
            for site in range(lo - MCOUNT_INSN_SIZE + 1, hi):
                if self.ftrace.site(site) is not None:
                    raise refuse(f"the window overlaps the ftrace site at {self._where(site)}")
        for other in self.points.values():
            if other is not point and lo <= other.addr < hi:
                raise refuse(f"another probe is inside the window, at {self._where(other.addr)}")
        for det in self.detours.values():
            if det.addr < hi and lo < det.window.end:
                raise refuse(f"the window overlaps the detour at {self._where(det.addr)}")
        if self.detour_function_check is not None:
            refused = self.detour_function_check(start, end)
            if refused is not None:
                raise refuse(refused)
        return window

    def _wait_out_of(self, ranges: list[tuple[int, int]], what: str) -> None:
        """Run the guest until no vCPU rip and no live stack word is in any of
        ``ranges`` (the host's ``synchronize_rcu()`` before the jump: Linux's
        optimizer waits for a grace period so that no context interrupted
        inside the window can resume there). DetourError after
        :attr:`detour_quiesce_timeout` seconds."""
        deadline = time.monotonic() + self.detour_quiesce_timeout
        baselines: dict[tuple[int, int], dict[int, int]] = {}
        pause = 0.002
        while True:
            blocking: list[str] = []
            for lo, hi in ranges:
                found, scan = self.area_references(lo, hi, baseline=None)
                if scan is not None:
                    base = baselines.setdefault((lo, hi), dict(scan.nvcsw))
                    found = [f for f in found if f.startswith("vCPU ")]
                    found += pending(scan, base, lambda _value: True)
                blocking += found
            if not blocking:
                return
            if time.monotonic() >= deadline:
                raise DetourError(ranges[0][0], f"something stayed inside {what} for "
                                  f"{self.detour_quiesce_timeout:g} s ({blocking[0]})")  # fmt: skip
            self.run(timeout=pause)
            pause = min(2 * pause, 0.1)

    def _optimize(self, point: ProbePoint) -> None:
        """``arch_optimize_kprobes``: the detour buffer, then the jump over the
        window, with the int3 already armed, in ``text_poke_bp()``'s order.

        1. The buffer is written and checked while nothing can reach it.
        2. The guest runs until no vCPU and no task context is inside the
           window's bytes 1..n-1, nor, for a window of several instructions,
           in the probe's boosted slot (whose jump back lands inside the
           window), nor with a #BP frame of this int3 pending (its rip is
           the probe + 1): :meth:`_wait_out_of`.
        3. The journal records the window's original bytes and the jump.
        4. With the vCPUs stopped (as for every write) and the int3 still at
           the first byte, the jump's four displacement bytes are written,
           then its first byte (``text_poke_bp``: int3, tail, sync, head).
           Any hit meanwhile takes the int3 path, which stays correct: the
           bytes after the int3 are never executed while it is there.
        """
        fast = self.fast
        entry = fast.entry_of(point) if fast is not None else None
        if fast is None or entry is None:
            raise DetourError(point.addr, "the probe is not on the int3 fast path")
        if not point.armed or point.lost or point.opcode == INT3:
            raise DetourError(point.addr, "the probe is not armed")
        refused = fast.detour_refusal(point.addr)
        if refused is not None:
            raise DetourError(point.addr, refused)
        window = self._detour_window(point)
        assert self._detour_buffers is not None
        try:
            buf = self._detour_buffers.get_insn_slot()
        except ProbeError as exc:
            raise DetourError(point.addr, str(exc)) from exc
        try:
            cs, ss = self._selectors()
            source, rel = x86detour.detour_source(window, buf, entry, self.stubs["qp_bp_ours"],
                                                  cs, ss)  # fmt: skip
            try:
                code, _ = assemble_at(source, buf)
            except ProbeError as exc:
                raise DetourError(point.addr, f"the detour does not assemble: {exc}") from exc
            if len(code) != x86detour.DETOUR_SIZE:
                raise DetourError(point.addr, f"the detour assembled to {len(code)} bytes")
            det = x86detour.Detour(
                window, x86detour.DetourCode(buf, code, buf + x86detour.RELOC_OFFSET, rel.copies),
                x86detour.jump_bytes(point.addr, buf), recorder=entry)  # fmt: skip
            self.kwrite_code(buf, code)
            ranges = [(window.addr + 1, window.end)]
            if window.insns[-1].length == 1:
                # A #BP frame of a probe on the window's last instruction of
                # one byte, removed just now (a probe inside the window takes
                # the detour out; its removal puts it back), holds that byte
                # + 1 = the end, and the answer to its hit sends the vCPU back
                # to the byte, inside the jump. (A longer last instruction
                # puts such a frame's rip inside the window, which is waited
                # on anyway.)
                ranges = [(window.addr + 1, window.end + 1)]
            if len(window.insns) > 1:
                ranges.append((point.boost_entry, point.slot + x86insn.SLOT_SIZE))
                # Slots freed dirty (a probe removed here before, on the slow
                # path or the int3 one) may still hold a task interrupted in
                # its copy: their jump back lands inside the window too.
                if self._slots is not None:
                    ranges += [(slot, slot + x86insn.SLOT_SIZE)
                               for slot in self._slots.dirty_slots()]  # fmt: skip
            # Both waits run the guest: the check that nothing is inside
            # the window must be the last thing before the writes, with no
            # run after it (a vCPU let run after the check can enter the
            # #BP path, whose boosted slot jumps back into the window).
            deadline = time.monotonic() + self.detour_quiesce_timeout
            while True:
                self.wait_text_unlocked()
                self._wait_out_of(ranges, "the window")
                if self.text_lock_held is None or not self.text_lock_held():
                    break
                if time.monotonic() > deadline:
                    raise DetourError(point.addr, "the guest kept patching its text")
            if fast.entry_of(point) != entry or not point.armed:
                raise DetourError(point.addr, "the probe changed while waiting")
            expected = bytes([INT3]) + window.original[1:]
            current = self.kread(point.addr, window.length)
            if current != expected:
                raise DetourError(point.addr, f"the window's bytes changed under qprobes "
                                  f"({current.hex()})")  # fmt: skip
            if self.journal is not None:
                self.journal.detour(point.addr, window.original, det.jump)
        except BaseException:
            self._detour_buffers.free_insn_slot(buf)
            raise
        self.kwrite_code(point.addr + 1, det.jump[1:])
        self.kwrite_code(point.addr, det.jump[:1])
        self.detours[point.addr] = det
        for kp in point.kprobes:
            kp.detoured = True
        log.info("%s detoured: a jump over %d bytes (%d instructions) to %#x",
                 self._where(point.addr), window.length, len(window.insns), buf)  # fmt: skip

    def _unoptimize(self, point: ProbePoint) -> None:
        """``arch_unoptimize_kprobe``: back to the armed int3, in
        ``text_poke_bp()``'s order: the int3 over the jump's first byte, then
        the original tail. The buffer is freed dirty: a vCPU or a task
        interrupted in it goes on to the end of the window, so it is handed
        out again only once nothing points into it (the slots' rule). If the
        guest rewrote the jump, nothing is written back and the probe is lost."""
        det = self.detours.get(point.addr)
        if det is None:
            return
        assert self._detour_buffers is not None
        # Nothing is forgotten until the jump is out: if a read or write
        # fails half-way, the detour stays known (its buffer taken, its
        # journal record kept), so detach or a recovery still puts the
        # window back, and its buffer cannot be handed to another site.
        self.wait_text_unlocked()
        current = self.kread(point.addr, len(det.jump))
        half = bytes([INT3]) + det.jump[1:]  # an earlier attempt got this far
        lost = current not in (det.jump, half)
        if lost:
            log.warning("the guest rewrote the detour's jump at %s", self._where(point.addr))
        else:
            if current != half:
                self.kwrite_code(point.addr, bytes([INT3]))
            self.kwrite_code(point.addr + 1, det.window.original[1 : len(det.jump)])
        del self.detours[point.addr]
        for kp in point.kprobes:
            kp.detoured = False
        self._detour_buffers.free_insn_slot(det.buffer, dirty=True)
        if lost:
            self._lose(point)
            return
        if self.journal is not None:
            self.journal.undetour(point.addr)

    def _detour_owner(self, rip: int) -> x86detour.Detour | None:
        for det in self.detours.values():
            if det.buffer <= rip < det.buffer + x86detour.DETOUR_SIZE:
                return det
        return None

    def is_fast(self, kp: Kprobe) -> bool:
        """Whether hits of ``kp`` are recorded in the guest now."""
        if self.fast is None or kp.arm_addr is None:
            return False
        point = self.points.get(kp.arm_addr)
        return point is not None and self.fast.word(point) != 0

    # --- arming ---------------------------------------------------------------

    # The probe table (qprobes.probes.ptable): entries never move while the
    # stub may search them; a bigger or cleaner table is built beside the one
    # in use and switched to with one store of the header pointer.

    def _layout(self, code: int, doorbell: int, vars_: int, ptable: int, slot_lo: int,
                slot_hi: int) -> StubLayout:  # fmt: skip
        assert self.fast is not None
        fast, vbase = self.fast, self.area.vbase
        detour_lo, detour_hi = self._detour_range(vbase)
        return StubLayout(code, doorbell, vars_, ptable, slot_lo, slot_hi, fast.rtable,
                          fast.rec_lo, fast.rec_hi, fast.extable,
                          slot2_lo=vbase + REGION_SIZE, slot2_hi=vbase + AREA_SPAN,
                          detour_lo=detour_lo, detour_hi=detour_hi,
                          cpu_number=self.cpu_number_offset)  # fmt: skip

    def _write_table_header(self, buf: _TableBuffer, table: ProbeTable) -> None:
        self.write_data(buf.header, struct.pack("<QQQQ", table.shift, table.mask, buf.addrs,
                                                buf.rtable))  # fmt: skip

    @property
    def probe_table(self) -> ProbeTable:
        """The host's copy of the probe table the #BP stub searches."""
        return self._ptable

    def _ptable_find(self, addr: int) -> int | None:
        return self._ptable.find(addr)

    def _ptable_write(self, indexes: list[int]) -> None:
        """Write the table entries (and fast-path words) at ``indexes``, in
        runs: one write per stretch of nearby entries."""
        table, buf = self._ptable, self._tbuf
        runs: list[list[int]] = []
        for i in sorted(set(indexes)):
            if runs and i - runs[-1][-1] <= 32:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            lo, hi = run[0], run[-1] + 1
            if self.fast is not None:
                words = [self.fast.word(self.points.get(a)) if a not in (0, TOMBSTONE) else 0
                         for a in table.entries[lo:hi]]  # fmt: skip
                self.write_data(buf.rtable + 8 * lo, struct.pack(f"<{hi - lo}Q", *words))
            self.write_data(buf.addrs + 8 * lo,
                            struct.pack(f"<{hi - lo}Q", *table.entries[lo:hi]))  # fmt: skip

    def _ptable_insert(self, addr: int) -> None:
        self._table_room(1)
        self._ptable_changed(self._ptable.insert(addr))

    def _ptable_remove(self, addr: int) -> None:
        """Take ``addr`` out: a tombstone, nothing moves (a search in progress
        on another vCPU still finds every other address)."""
        i = self._ptable.remove(addr)
        if i is not None:
            self._ptable_changed(i)

    def _ptable_changed(self, index: int) -> None:
        """Write the entry at ``index``; a batch writes its entries in runs
        when it ends, before the code (so before every int3 it arms)."""
        if self._batch is not None:
            self._batch.ptable.add(index)
        else:
            self._ptable_write([index])

    def _table_room(self, more: int) -> None:
        """Make room in the probe table for ``more`` addresses: switch to a
        fresh (bigger, or free of tombstones) table when the load would pass
        1/2. :class:`ProbeError` beyond the largest table."""
        table = self._ptable
        if table.room(more):
            return
        if table.live + more > max_probes():
            raise ProbeError(f"at most {max_probes()} probe addresses at once")
        new = table.rehashed(more)
        self._switch_table(new)

    def _switch_table(self, new: ProbeTable) -> None:
        """Build ``new`` in fresh pages of the later regions, then point the
        stub at it; the old table goes once no vCPU is in the stub's search."""
        area = self.area
        nbytes = new.size * 8
        pages = 1 + 2 * (nbytes // PAGE_SIZE)  # header, addresses, fast-path words
        first = area.claim_pages(pages)
        try:
            for i in range(first, first + pages):
                area.map_page(i, writable=True, executable=False)
        except BaseException:
            area.release_pages(first, pages)
            raise
        base = area.vbase + first * PAGE_SIZE
        buf = _TableBuffer(base, base + PAGE_SIZE, base + PAGE_SIZE + nbytes, (first, pages))
        old, old_buf = self._ptable, self._tbuf
        self._ptable, self._tbuf = new, buf
        if self._batch is not None:
            self._batch.ptable.clear()  # the old table's: the new one is written whole
        try:
            self._ptable_write([i for i, a in enumerate(new.entries) if a])
            self._write_table_header(buf, new)
            # One 8-byte store: a search sees the old table or the new one.
            self.write_data(self._vars + VAR_PTABLE, struct.pack("<Q", buf.header))
        except BaseException:
            self._ptable, self._tbuf = old, old_buf
            area.release_pages(first, pages)
            raise
        log.info("probe table: %d entries now (%d probes)", new.size, new.live)
        if old_buf.pages is not None:
            self._retired.append(old_buf)
        self._free_retired()

    def _free_retired(self) -> None:
        """Unmap the tables left behind, unless a vCPU is inside the stub's
        search (it may still read the table it started with)."""
        if not self._retired or self._stubs is None:
            return
        symbols = self._stubs.symbols
        lo = symbols["qp_bp_entry"]
        hi = symbols.get("qp_bp_table_done", symbols["qp_bp_ours"])
        try:
            if any(lo <= self.target.read_register("rip", v) <= hi for v in self.target.vcpus):
                return
        except QprobesError:
            return
        for buf in self._retired:
            assert buf.pages is not None
            self.area.release_pages(*buf.pages)
        self._retired.clear()

    def _arm(self, point: ProbePoint) -> None:
        """``arch_arm_kprobe``: table entry first, then the int3."""
        if point.armed:
            return
        self.wait_text_unlocked()
        self._ptable_insert(point.addr)
        current = self.kread(point.addr, 1)[0]
        if current != point.opcode:
            self._ptable_remove(point.addr)
            raise ProbeError(
                f"{point.addr:#x} changed under qprobes (byte {current:#04x}, "
                f"expected {point.opcode:#04x})"
            )
        if self.journal is not None:
            # Recorded before the int3 goes in: a later session can put it back.
            module = self.module_base(point.addr) if self.module_base is not None else 0
            self.journal.site(point.addr, point.slot, point.opcode, point.boosted, module or 0)
            self._unsite_after_step.discard(point.addr)  # a full record again
        if point.opcode != INT3:
            self.kwrite_code(point.addr, bytes([INT3]), arming=True)
        point.armed = True
        if self._batch is not None:
            self._batch.armed.append(point)

    def _stepped_sites(self) -> set[int]:
        """Addresses whose slot some vCPU is single-stepping (at any level)."""
        out: set[int] = set()
        for kcb in self.kcb.values():
            if kcb.status is not KprobeStatus.NONE and kcb.current is not None:
                out.add(kcb.current.addr)
            out.update(p.current.addr for p in kcb.prev if p.current is not None)
        return out

    def _unsite(self, point: ProbePoint) -> None:
        """Take ``point``'s site out of the journal, its int3 gone. While a
        vCPU steps its slot the record stays (a recovery needs it to finish
        that step), marked step-only, until the step is over."""
        if self.journal is None:
            return
        if point.addr in self._stepped_sites():
            self.journal.site_step_only(point.addr)
            self._unsite_after_step.add(point.addr)
        else:
            self.journal.unsite(point.addr)

    def _unsite_stepped(self) -> None:
        """The step-only site records whose steps are over go (their answer written)."""
        stepped = self._stepped_sites()
        for addr in sorted(self._unsite_after_step - stepped):
            self._unsite_after_step.discard(addr)
            point = self.points.get(addr)
            if self.journal is not None and not (point is not None and point.armed):
                self.journal.unsite(addr)

    def _disarm(self, point: ProbePoint) -> None:
        """``arch_disarm_kprobe``: the original byte back, if ours is still there
        (a detour goes first: :meth:`_unoptimize`)."""
        if not point.armed:
            return
        self._unoptimize(point)
        if not point.armed:
            return  # lost: the guest rewrote the jump
        if point.opcode != INT3:
            self.wait_text_unlocked()
            current = self.kread(point.addr, 1)[0]
            if current != INT3:
                # The guest rewrote its own text (ftrace, static keys): the
                # saved byte is stale, so leave the new one alone.
                self._lose(point)
                return
            self.kwrite_code(point.addr, bytes([point.opcode]))
        self._ptable_remove(point.addr)
        point.armed = False
        self._unsite(point)

    # --- lost probes ------------------------------------------------------------

    def _code_bytes(self, addrs: list[int]) -> dict[int, int]:
        """The byte at each address: one page walk and one read per page."""
        pages: dict[int, list[int]] = {}
        for addr in addrs:
            pages.setdefault(addr - addr % PAGE_SIZE, []).append(addr)
        out: dict[int, int] = {}
        for group in pages.values():
            lo, hi = min(group), max(group) + 1
            try:
                if self.hostmem is not None and self._kcr3 and self._batch is None:
                    data = self.hostmem.read_phys(self._kphys(lo), hi - lo)
                else:
                    data = self.kread(lo, hi - lo)
            except TranslationError:
                continue  # no longer mapped (a freed module): left out
            out.update((a, data[a - lo]) for a in group)
        return out

    def check_lost(self, points: list[ProbePoint] | None = None) -> list[ProbePoint]:
        """Find armed probes whose int3 the guest rewrote (the guest is stopped).

        Linux patches its own text (ftrace, static keys, alternatives, text
        pokes); a probe whose byte is no longer qprobes' int3 is *lost*: it
        is reported once, taken out of the probe table, and its saved byte is
        never written back over the guest's new code. Checked at register,
        unregister and detach, and every :attr:`lost_check_interval` seconds
        while :meth:`run` has the guest stopped. Returns the probes lost now.
        """
        armed = [p for p in (self.points.values() if points is None else points) if p.armed]
        current = self._code_bytes([p.addr for p in armed])
        # A detoured point holds the jump's first byte instead of the int3.
        def ours(p: ProbePoint) -> int:
            return x86insn.JMP_REL32 if p.addr in self.detours else INT3

        lost = [p for p in armed if current.get(p.addr) != ours(p)]
        for point in lost:
            if point.addr in current:
                self._lose(point)
            else:
                self._lose(point, "its text is no longer mapped")
        self._last_lost_check = time.monotonic()
        return lost

    def _lose(self, point: ProbePoint, why: str = REWRITTEN) -> None:
        if self._batch is not None:
            self._batch.original.clear()  # its bytes (or its detour's) are no longer ours
        if why == REWRITTEN:
            log.warning("probe lost: the guest rewrote %s", self._where(point.addr))
        else:
            log.warning("probe lost: %s (%s)", self._where(point.addr), why)
        self.stats.lost += 1
        det = self.detours.pop(point.addr, None)
        if det is not None:
            # Its jump is no longer ours to take out; the buffer stays dirty.
            assert self._detour_buffers is not None
            self._detour_buffers.free_insn_slot(det.buffer, dirty=True)
            if self.journal is not None:
                self.journal.undetour(point.addr)
            for kp in point.kprobes:
                kp.detoured = False
        self._ptable_remove(point.addr)
        point.armed = False
        point.lost = True
        self._unsite(point)  # never to be written back
        for kp in point.kprobes:
            kp.lost = True
            kp.lost_why = why

    def kill_range(self, lo: int, hi: int, why: str) -> list[Kprobe]:
        """``kill_kprobe`` for code that is going away (a module unloading):
        every probe in ``[lo, hi)`` stops, its table entry goes, and nothing
        is written there, neither now nor at unregister or detach (its saved
        byte would land in freed memory). The guest must be stopped before
        the code is freed (Linux: the module notifier's GOING state; qprobes:
        a probe on ``free_module``). Returns the probes killed."""
        killed: list[Kprobe] = []
        for point in [p for p in self.points.values() if lo <= p.addr < hi]:
            if point.lost:
                continue
            if point.armed:
                self._lose(point, why)
            else:
                point.lost = True
                for kp in point.kprobes:
                    kp.lost, kp.lost_why = True, why
            killed.extend(point.kprobes)
        return killed

    # --- the trap path ----------------------------------------------------------

    def handle_stop(self, stop: StopReply) -> bool:
        """Service one stop; False when the stop is not qprobes' doorbell."""
        self.stats.stops += 1
        vcpu = stop.thread.tid if stop.thread is not None else self.target.vcpus[0]
        if stop.watch_addr != self._doorbell:
            if self._extra_stop is not None and self._extra_stop(stop):
                return True
            if self.foreign_stop is not None and self.foreign_stop(stop):
                return True
            if not self._bare_trap_stop(stop, vcpu):
                self.stats.foreign += 1
                return False
            if self._spurious:
                return True
        self.client.note_stop_thread(vcpu)
        self._frame_phys = None
        self.after_answer.clear()  # (left by a hit whose handling failed)
        located = self._locate_frame_fast(vcpu)
        regs: Registers | None = None
        if located is None:
            regs = Registers.from_g(self.client.layout, self.client.read_registers())
            if regs.rip not in self._ret_kind:
                raise ProbeError(f"doorbell stop at unexpected rip {regs.rip:#x}")
            frame_addr, gs_base, cr3 = regs.rsp, regs.gs_base, regs.cr3
            frame_bytes = self._read_frame(frame_addr, cr3, self._la57)
            frame = PtRegs(list(struct.unpack(f"<{FRAME_WORDS}Q", frame_bytes)))
            tsc = self._record_tsc(vcpu, frame_addr)
        else:
            frame_addr, gs_base, cr3, frame, tsc = located
        if frame.action:
            return True  # a stale stop: this doorbell was already answered
        vector = frame.vector
        la57 = self._la57
        # The interrupted task's page tables: they map the kernel too.
        ctx = HitContext(vcpu, frame, self._reader(cr3, la57, vcpu), cr3, frame_addr=frame_addr,
                         gs_base=gs_base, read_current=self.target.read, tsc=tsc,
                         unwinder=self.stack_unwinder)  # fmt: skip
        kcb = self.kcb.setdefault(vcpu, KprobeCtlblk(vcpu=vcpu))
        if vector == 3:
            self.stats.bp += 1
            self._kprobe_handler(kcb, ctx)
        elif vector == 1:
            self.stats.db += 1
            # The #DB stub put DR6 where orig_rax goes (Linux's is -1).
            dr6 = frame.orig_rax
            frame.words[_ORIG_RAX] = 2**64 - 1
            guest_dr6 = self._post_kprobe_handler(kcb, ctx, dr6)
            # The stub loads the word back into DR6 when it chains.
            frame.words[_ORIG_RAX] = guest_dr6
            if guest_dr6 != dr6:
                frame.dirty.add(_ORIG_RAX)
        elif vector in SLOT_FAULT_VECTORS:
            self.stats.faults += 1
            self._kprobe_fault_handler(kcb, ctx, vector)
        elif vector == KRETPROBE_VECTOR:
            self.stats.kret += 1
            if self.kretprobes is None:
                raise ProbeError("a kretprobe trampoline hit with no kretprobes")
            self.kretprobes.trampoline_handler(ctx)
        elif vector == FASTRET_SPILL_VECTOR:
            # A fast return record found its ring full: drain, then it records again.
            self.stats.fastret_spills += 1
            if self.fast is not None:
                self.fast.drain()
        elif vector == JPROBE_VECTOR:
            if regs is None:
                regs = Registers.from_g(self.client.layout, self.client.read_registers())
            self._jprobe_return(kcb, ctx, regs)
            return True
        else:
            raise ProbeError(f"doorbell frame at {frame_addr:#x} names vector {vector:#x}")
        if frame.action == ACTION_CHAIN:
            self.stats.chained += 1
        if not frame.action:
            frame.action = ACTION_RETURN
        try:
            self._write_frame(frame_addr, frame, cr3, la57, vcpu)
        except BaseException:
            # Unanswered: every record stays for a recovery to finish the job.
            self.after_answer.clear()
            raise
        # A step that ended is taken out of the journal only now that the
        # frame is answered (its record must outlive the change it undoes).
        pending, self._steps_to_clear = self._steps_to_clear, []
        for done in pending:
            self._journal_steps(done)
        if pending and self._unsite_after_step:
            self._unsite_stepped()
        answered, self.after_answer = self.after_answer, []
        for release in answered:
            release()
        return True

    def _bare_trap_stop(self, stop: StopReply, vcpu: int) -> bool:
        """A SIGTRAP stop with no ``watch`` field, or one naming an address
        qprobes watches not: qprobes' to deal with?

        With several vCPUs, QEMU can report a doorbell hit without its
        watchpoint (two vCPUs hit at once; the second report loses the
        field), and, rarely, with a user-space address in the field that no
        watchpoint covers (seen on 2 vCPUs under load). qprobes inserts no
        watchpoint but the doorbell, so either way: if the vCPU sits on a
        doorbell store, it is a doorbell stop; otherwise it is spurious and
        the guest just resumes. Sets ``_spurious`` accordingly.
        """
        self._spurious = False
        if stop.signal != 5 or stop.thread is None:
            return False
        if stop.watch_addr is not None:
            log.debug("a watchpoint stop at %#x, which qprobes does not watch",
                      stop.watch_addr)  # fmt: skip
        self.client.note_stop_thread(vcpu)
        rip = self.target.read_register("rip", vcpu)
        if rip not in self._ret_kind:
            self.stats.spurious += 1
            self._spurious = True
        return True

    def _record_tsc(self, vcpu: int, frame_addr: int) -> int | None:
        """The TSC in ``vcpu``'s per-CPU record (read by the gdbstub), if the
        record is this frame's."""
        if not 0 < vcpu <= MAX_CPUS or not self._vars:
            return None
        record = self._vars + VAR_PERCPU + PERCPU_STRIDE * (vcpu - 1)
        try:
            rsp, _gs, _cr3, tsc = struct.unpack("<QQQQ", self.target.read(record, 32, vcpu))
        except QprobesError:
            return None
        return int(tsc) if rsp == frame_addr else None

    def _locate_frame_fast(self, vcpu: int) -> tuple[int, int, int, PtRegs, int] | None:
        """The doorbell frame from the stub's per-CPU record, with no packet.

        The record is indexed by initial APIC ID, which QEMU numbers like its
        vCPUs (thread id - 1). Anything unexpected (a stale record, an action
        already set) falls back to reading the registers.
        """
        if self.hostmem is None or not 0 < vcpu <= MAX_CPUS:
            return None
        record = self._vars_phys + VAR_PERCPU + PERCPU_STRIDE * (vcpu - 1)
        rsp, gs_base, cr3, tsc = struct.unpack("<QQQQ", self.hostmem.read_phys(record, 32))
        if not rsp:
            return None
        phys: int | None = None
        try:
            if rsp % PAGE_SIZE + FRAME_SIZE <= PAGE_SIZE:
                # One walk serves both the read and the write-back.
                phys = self.hostmem.translate(cr3, rsp, self._la57).paddr
                data = self.hostmem.read_phys(phys, FRAME_SIZE)
            else:
                data = self.hostmem.read_virt(cr3, rsp, FRAME_SIZE, self._la57)
        except QprobesError:
            return None
        words = list(struct.unpack(f"<{FRAME_WORDS}Q", data))
        if words[0] != 0 or words[1] not in _VECTORS:
            # A stale record (another stub on this CPU wrote it since, e.g. an
            # interrupt taken inside the kretprobe trampoline hit a kprobe):
            # the answer must not go to *its* frame, so keep no address of it.
            return None
        self._frame_phys = phys
        return rsp, gs_base, cr3, PtRegs(words), tsc

    def _reader(self, cr3: int, la57: bool, vcpu: int) -> Callable[[int, int], bytes]:
        if self.hostmem is not None:
            hm = self.hostmem
            return lambda addr, n: hm.read_virt(cr3, addr, n, la57)
        # Through the hit's own vCPU: a handler may have read another vCPU's
        # registers meanwhile, which moves the stub's thread selection.
        target = self.target
        return lambda addr, n: target.read(addr, n, vcpu)

    def _read_frame(self, rsp: int, cr3: int, la57: bool) -> bytes:
        if self.hostmem is not None:
            return self.hostmem.read_virt(cr3, rsp, FRAME_SIZE, la57)
        return self.target.read(rsp, FRAME_SIZE)

    def _write_frame(self, rsp: int, frame: PtRegs, cr3: int, la57: bool,
                     vcpu: int | None = None) -> None:  # fmt: skip
        dirty = sorted(frame.dirty)
        if not dirty:
            return
        lo, hi = dirty[0], dirty[-1] + 1
        data = struct.pack(f"<{hi - lo}Q", *frame.words[lo:hi])
        if self.hostmem is not None and self._frame_phys is not None:
            self.hostmem.write_phys(self._frame_phys + 8 * lo, data)
        elif self.hostmem is not None:
            self.hostmem.write_virt(cr3, rsp + 8 * lo, data, la57)
        else:
            self.target.write(rsp + 8 * lo, data, vcpu)

    # 2.6 kprobe_handler
    def _kprobe_handler(self, kcb: KprobeCtlblk, ctx: HitContext) -> None:
        regs = ctx.regs
        addr = regs.rip - 1
        point = self.points.get(addr)
        if kcb.status in (KprobeStatus.HIT_SS, KprobeStatus.REENTER):
            if point is not None and point is kcb.current and point.is_int3:
                # The probed instruction is itself an int3, stepped in place:
                # hand it to the guest's own handler with the flags as they were.
                regs.eflags = x86fix.int3_passthrough(regs.eflags, kcb.saved_rflags)
                self._end_step(kcb, ctx.cr3)
                regs.action = ACTION_CHAIN
                return
            if point is not None and point.armed and point.addr in self.detours:
                # A detour handed this hit over (its ring was full) while the
                # vCPU steps another probe: missed, and on through the
                # detour's relocated copy (the window's tail is the jump).
                recorded = self._recorded_in_guest(regs)
                for kp in point.kprobes:
                    if not any(kp is r for r in recorded):
                        kp.nmissed += 1
                regs.rip = self.detours[point.addr].code.reloc
                return
            if point is not None and point.armed:
                self._reenter_kprobe(kcb, point, ctx)
                return
        if point is None or not point.armed:
            if self.kread(addr, 1)[0] != INT3:
                regs.rip = addr  # removed after this vCPU hit it
                det = self._detour_covering(addr)
                if det is not None and det.addr != addr:
                    # ... and a detour's jump covers it now: its copy in the
                    # detour buffer runs it (and the rest of the window).
                    for copy, _length, orig in det.code.copies:
                        if orig == addr:
                            regs.rip = copy
            else:
                regs.action = ACTION_CHAIN
            return
        regs.rip = addr
        point.nhit += 1
        kcb.current = point
        kcb.status = KprobeStatus.HIT_ACTIVE
        recorded = self._recorded_in_guest(regs)
        for kp in point.kprobes:
            if kp.disabled or any(kp is r for r in recorded):
                continue
            kp.nhit += 1
            if kp.on_ftrace:
                # kprobe_ftrace_handler: registers as at the site.
                assert kp.addr is not None
                regs.rip = kp.addr
            if kp.pre_handler is not None:
                ctx.probe = kp
                if kp.pre_handler(kp, ctx):
                    # The handler changed rip: skip the instruction.
                    kcb.status = KprobeStatus.NONE
                    kcb.current = None
                    return
            if kp.on_ftrace:
                if kp.post_handler is not None:
                    # "Emulate singlestep" of the site's nop, as Linux does.
                    assert kp.addr is not None
                    regs.rip = kp.addr + MCOUNT_INSN_SIZE
                    ctx.probe = kp
                    kp.post_handler(kp, ctx, 0)
                regs.rip = addr
        self._prepare_singlestep(kcb, point, ctx, KprobeStatus.HIT_SS)

    def _recorded_in_guest(self, regs: PtRegs) -> tuple[Kprobe, ...]:
        """The kprobes that recorded this hit in the guest before one handed
        it to the host: a chain of recorders (an aggregate point on the fast
        path, :func:`~qprobes.arch.x86_64.recorder_asm.assemble_chain`) names
        its kprobes and how many recorded in ``orig_ax``, which every other
        #BP frame holds as -1. Known by identity, not position: the point's
        kprobes may have changed since. Their handlers do not run again; the
        word goes back to -1."""
        value = regs.orig_rax
        if value == 2**64 - 1 or self.fast is None:
            return ()
        regs.words[_ORIG_RAX] = 2**64 - 1
        return self.fast.chain_recorded(value)

    # reenter_kprobe
    def _reenter_kprobe(self, kcb: KprobeCtlblk, point: ProbePoint, ctx: HitContext) -> None:
        """A probe hit while this vCPU steps another: count it missed and run
        its instruction out of line without handlers.

        Linux saves the interrupted step once (``save_previous_kprobe``) and
        BUG()s on a hit while already in KPROBE_REENTER. Here each level is
        saved on a stack, so a nested reentry is refused the same way (missed,
        stepped, no handlers) and unwinding restores every level in turn:
        no step is forgotten, so no TF or slot rip is left to the guest.

        The journal records :data:`STEP_LEVELS` levels a vCPU, all a
        recovery needs to finish them. A hit one level deeper runs boosted
        if it can (no step, no record); if its copy needs a step, the probe
        is refused (lost, its original byte back) and the vCPU runs the
        original instruction in place: no step the journal cannot hold.
        """
        regs = ctx.regs
        for kp in point.kprobes:
            kp.nmissed += 1
        self.stats.reentered += 1
        depth = len(kcb.prev) + 2
        if depth > STEP_LEVELS and point.boosted and not regs.eflags & TF:
            # One level more than the journal records for a vCPU: a boosted
            # copy needs no step (and no record).
            log.warning("kprobe reentry %d deep at %s on vCPU %d: run boosted, counted "
                        "missed", depth, self._where(point.addr), ctx.vcpu)  # fmt: skip
            regs.rip = point.boost_entry
            return
        if depth > STEP_LEVELS:
            # The byte goes back before the record goes (a recovery drops a
            # site without its int3); the vCPU then runs the original, as
            # after any probe removed once it was hit.
            log.error("kprobe reentry %d deep at %s on vCPU %d: the journal records %d "
                      "levels of steps; the probe is taken out", depth,
                      self._where(point.addr), ctx.vcpu, STEP_LEVELS)  # fmt: skip
            if point.opcode != INT3:
                self.kwrite_code(point.addr, bytes([point.opcode]))
            self._lose(point, f"hit in a kprobe reentry {depth} deep (the journal records "
                              f"{STEP_LEVELS} levels of steps)")  # fmt: skip
            regs.rip = point.addr
            return
        if kcb.status is KprobeStatus.REENTER:
            log.warning("nested kprobe reentry at %s on vCPU %d (depth %d): counted missed",
                        self._where(point.addr), ctx.vcpu, len(kcb.prev) + 1)  # fmt: skip
        kcb.prev.append(PrevKprobe(kcb.current, kcb.status, kcb.old_rflags, kcb.saved_rflags,
                                   kcb.popped_tf))  # fmt: skip
        regs.rip = point.addr
        self._prepare_singlestep(kcb, point, ctx, KprobeStatus.REENTER)

    def _prepare_singlestep(self, kcb: KprobeCtlblk, point: ProbePoint, ctx: HitContext,
                            status: KprobeStatus) -> None:  # fmt: skip
        regs = ctx.regs
        det = self.detours.get(point.addr)
        if status is KprobeStatus.HIT_SS and det is not None:
            # A detour handed this hit over (a full ring): on through its
            # relocated copy of the window, which jumps back after it (the
            # boosted slot's jump back would land inside the window).
            regs.rip = det.code.reloc
            kcb.status = KprobeStatus.NONE
            kcb.current = None
            return
        if status is KprobeStatus.HIT_SS and point.boost_now() and not regs.eflags & TF:
            # Boosted: copy + jmp back, no single-step, one stop per hit.
            # Decided per hit from what will run: a post_handler needs the
            # step (Linux never boosts then), and a guest single-stepping
            # itself must trap after the original instruction, not after
            # the copy. Reentrant hits are always stepped.
            regs.rip = point.boost_entry
            kcb.status = KprobeStatus.NONE
            kcb.current = None
            return
        flags = x86fix.set_current_kprobe(regs.eflags, point.analysis.if_modifier)
        kcb.old_rflags, kcb.saved_rflags = flags.old_rflags, flags.saved_rflags
        regs.eflags = x86fix.prepare_singlestep(regs.eflags)
        regs.rip = x86fix.singlestep_rip(point.analysis, point.addr, point.slot)
        kcb.popped_tf = 0
        if _loads_flags(point.insn):
            # The flags image popf/iret will load: its TF is the guest's own.
            offset, size = x86insn.flags_image(point.insn) or (0, 8)
            image = int.from_bytes(ctx.read(regs.rsp + offset, size), "little")
            kcb.popped_tf = image & TF
        kcb.current = point
        kcb.status = status
        self._journal_steps(kcb)
        self._set_ss_active(+1, ctx.cr3)

    def _end_step(self, kcb: KprobeCtlblk, cr3: int) -> None:
        self._set_ss_active(-1, cr3)
        if kcb.status is KprobeStatus.REENTER and kcb.prev:
            prev = kcb.prev.pop()  # restore_previous_kprobe
            kcb.current, kcb.status = prev.current, prev.status
            kcb.old_rflags, kcb.saved_rflags = prev.old_rflags, prev.saved_rflags
            kcb.popped_tf = prev.popped_tf
        else:
            kcb.status = KprobeStatus.NONE
            kcb.current = None
            kcb.prev.clear()
        self._steps_to_clear.append(kcb)  # journaled once the frame is written

    @staticmethod
    def _step_ends(point: ProbePoint, rip: int) -> bool:
        """Whether a #DB at ``rip`` is where the step of ``point``'s copy ends."""
        if point.is_int3:
            return False  # stepped in place: it ends with a #BP, never a #DB
        pad = len(STI_PAD) if _is_sti(point.insn) else 0
        ends = x86fix.step_end_rips(point.analysis, point.addr, point.slot, pad)
        return ends is None or rip in ends

    # 2.6 post_kprobe_handler + resume_execution
    def _post_kprobe_handler(self, kcb: KprobeCtlblk, ctx: HitContext, dr6: int) -> int:
        """The #DB that may end a step. ``dr6`` is what the #DB stub read;
        returns the DR6 the guest's handler is to see if the #DB goes on.

        Only a single-step trap (DR6.BS) with rip where this step must end is
        the step's end. Anything else (a #DB in an NMI handler that ran
        mid-step, a guest debug-register hit elsewhere, a #DB with neither BS
        nor B0-B3) goes to the guest with the control block untouched. A guest
        breakpoint (B0-B3) hit by the stepped instruction itself goes to the
        guest after the step is finished, with qprobes' BS taken out of DR6;
        it may come with BS or, if the CPU reports the two traps apart, alone
        (at a step-end rip nothing else can raise it).
        """
        regs = ctx.regs
        point = kcb.current
        if kcb.status not in (KprobeStatus.HIT_SS, KprobeStatus.REENTER) or point is None \
                or not dr6 & (x86fix.DR6_BS | x86fix.DR6_TRAP_BITS) \
                or not self._step_ends(point, regs.rip):  # fmt: skip
            self._foreign_debug(ctx)
            return dr6
        if _is_sti(point.insn) and regs.rip == point.slot + point.insn.length + len(STI_PAD):
            # TCG delays the single-step trap after sti past the next
            # instruction (the interrupt shadow): the pad nop ran too.
            regs.rip = point.slot + point.insn.length
        tos = None
        if point.analysis.fixup.reads_tos:
            tos = struct.unpack("<Q", ctx.read(regs.rsp, 8))[0]
        result = x86fix.resume_execution(point.analysis, point.addr, point.slot, regs.rip,
                                         regs.rsp, tos, kcb.old_rflags, regs.eflags)  # fmt: skip
        regs.rip = result.rip
        regs.eflags = result.rflags
        pass_to_guest = result.pass_to_guest
        if _loads_flags(point.insn):
            # TF now is what the instruction loaded (it traps after the next
            # instruction); this trap is the guest's only if it had TF before.
            regs.eflags = (result.rflags & ~TF) | kcb.popped_tf
            pass_to_guest = bool(kcb.old_rflags & TF)
        if result.tos_write is not None:
            self.write_data(result.tos_addr, struct.pack("<Q", result.tos_write), ctx.cr3)
        reenter = kcb.status is KprobeStatus.REENTER
        if not reenter:
            for kp in point.kprobes:
                if kp.post_handler is not None and not kp.disabled and not kp.on_ftrace:
                    ctx.probe = kp
                    kp.post_handler(kp, ctx, 0)
        self._end_step(kcb, ctx.cr3)
        if pass_to_guest:
            # The guest single-steps itself: its debugger gets this #DB.
            regs.action = ACTION_CHAIN
        elif dr6 & x86fix.DR6_TRAP_BITS:
            # The stepped instruction hit a breakpoint of the guest's own:
            # the guest gets the #DB, as if the original had hit it, and
            # sees only its own bits (Linux warns at a stray BS).
            regs.action = ACTION_CHAIN
            return dr6 & ~x86fix.DR6_BS
        return dr6

    def _foreign_debug(self, ctx: HitContext) -> None:
        """A #DB that does not end a step of this vCPU: the guest's own.

        A boosted copy that hit a guest breakpoint traps with rip right after
        the copy, at the jmp back: the guest sees it after the original
        instruction instead (where the jmp goes).
        """
        regs = ctx.regs
        owner = self._slot_owner(regs.rip)
        if owner is not None and owner.boosted:
            entry = owner.boost_entry
            if owner.boost_slot is None and regs.rip == entry + owner.insn.length:
                regs.rip = owner.insn.next_addr
            elif (owner.insn.opcode == b"\xe8" and owner.insn.branch_target is not None
                  and regs.rip == entry + PUSH_IMM32_SIZE):  # fmt: skip
                # A boosted call's push hit a guest watchpoint on the stack:
                # the call has pushed, the callee is next.
                regs.rip = owner.insn.branch_target
        regs.action = ACTION_CHAIN

    def _slot_owner(self, rip: int) -> ProbePoint | None:
        """The probe whose slot holds ``rip``."""
        slot = rip - rip % x86insn.SLOT_SIZE
        for point in self.points.values():
            if point.slot == slot:
                return point
        return None

    # 2.6 kprobe_fault_handler
    def _kprobe_fault_handler(self, kcb: KprobeCtlblk, ctx: HitContext, trapnr: int) -> None:
        """A fault raised in a slot (the stubs ring only for those).

        The guest sees it at the probe address, as if the original
        instruction had faulted: rip moved back, the flags qprobes changed
        restored, the control block cleared. Then the guest's own handler
        runs (it finds its exception-table entry by rip).
        """
        regs = ctx.regs
        point = kcb.current
        if point is not None and kcb.status in (KprobeStatus.HIT_SS, KprobeStatus.REENTER) \
                and point.slot <= regs.rip < point.slot + x86insn.SLOT_SIZE:  # fmt: skip
            for kp in point.kprobes:
                if kp.fault_handler is not None and not kp.disabled:
                    ctx.probe = kp
                    if kp.fault_handler(kp, ctx, trapnr):
                        return  # the handler dealt with it and set the registers
            # Undo the step: the guest sees the fault at the probed address.
            regs.rip, regs.eflags = x86fix.fault_fixup(point.addr, kcb.old_rflags, regs.eflags)
            self._end_step(kcb, ctx.cr3)
            regs.action = ACTION_CHAIN
            return
        det = self._detour_owner(regs.rip)
        if det is not None:
            # A relocated instruction faulted in a detour buffer: the guest
            # sees the fault at the original instruction, registers as there.
            regs.rip = det.original_rip(regs.rip)
            regs.action = ACTION_CHAIN
            return
        # A boosted copy faulted: no TF to undo, only rip. Only the copy can
        # fault (the jmp back cannot), so its address is the probe's.
        owner = self._slot_owner(regs.rip)
        if owner is not None:
            regs.rip = owner.addr
        else:
            log.warning("fault %d at %#x in an unused slot on vCPU %d", trapnr, regs.rip,
                        ctx.vcpu)  # fmt: skip
        regs.action = ACTION_CHAIN

    def _jprobe_return(self, kcb: KprobeCtlblk, ctx: HitContext, regs: Registers) -> None:
        """``longjmp_break_handler``, then step the probed instruction as usual."""
        if self.jprobes is None:
            raise ProbeError("jprobe_return reached with no jprobes")
        saved, _values = self.jprobes.longjmp(ctx.thread)
        addr = saved.jp.kp.arm_addr
        point = self.points.get(addr) if addr is not None else None
        view = PtRegs(list(saved.words))
        if point is not None and point.armed:
            sctx = HitContext(ctx.thread, view, ctx.read_virt, ctx.cr3, tsc=ctx.tsc,
                              unwinder=ctx.unwinder)
            self._prepare_singlestep(kcb, point, sctx, KprobeStatus.HIT_SS)
        else:
            kcb.status, kcb.current = KprobeStatus.NONE, None
            if addr is not None:
                # Resume where the int3 was: for a probe on an ftrace site the
                # saved rip is the site, which must not run twice.
                view.rip = addr
        new = Registers(**regs.as_dict())
        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9",
                     "r10", "r11", "r12", "r13", "r14", "r15", "rip"):  # fmt: skip
            setattr(new, name, getattr(view, name))
        new.eflags = view.eflags
        self.target.set_registers(new, ctx.thread)

    def place_code(self, source: str) -> int:
        """Assemble guest code into qprobes' area and return its address.

        ``jprobe_return`` is defined for the code to jump to.
        """
        if not self.attached:
            raise ProbeError("attach the engine before placing code")
        addr = self._user_code
        prelude = (
            "qp_code_base:\n"
            f".set jprobe_return, qp_code_base + {self.stubs['qp_jprobe_return'] - addr:#x}\n"
        )
        code, _ = assemble_at(prelude + source, addr)
        end = addr + len(code)
        limit = self.area.vbase + PAGE_SLOTS_FIRST * PAGE_SIZE
        if end > limit:
            raise ProbeError("no room left for guest code in qprobes' area")
        for page in range((addr - self.area.vbase) // PAGE_SIZE,
                          (end - 1 - self.area.vbase) // PAGE_SIZE + 1):  # fmt: skip
            if not self.area.is_mapped(page):
                self.area.map_page(page, writable=False, executable=True)
        self.kwrite_code(addr, code)
        self._user_code = (end + 15) & ~15
        return addr

    # --- running ----------------------------------------------------------------

    def run(self, until: Callable[[], bool] | None = None, timeout: float | None = None,
            poll: float = 0.002) -> None:  # fmt: skip
        """Resume the guest and service stops until ``until()`` is true or time runs out.

        ``until`` is checked after every stop (with the guest still stopped)
        and every ``poll`` seconds while it runs. The guest is stopped when
        this returns.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def done() -> bool:
            if until is not None and until():
                return True
            return deadline is not None and time.monotonic() >= deadline

        if done():
            return
        failed = False
        self.target.resume()
        try:
            while True:
                try:
                    stop = self.target.wait(poll)
                except StubTimeoutError:
                    for hook in self.poll_hooks:
                        hook(True)
                    if self.fast is not None and self.fast.batch_due() and not done():
                        # Rings the host cannot read while the guest runs:
                        # a short stop now and then drains them.
                        self._stop_quietly()
                        self.fast.batches += 1
                        for hook in self.poll_hooks:
                            hook(False)
                        self.target.resume()
                        continue
                    if done():
                        self._stop_quietly()
                        if time.monotonic() - self._last_lost_check >= self.lost_check_interval:
                            self.check_lost()
                        return
                    if self.hold_requested and self.hold is not None:
                        self.hold_requested = False
                        self.hold(self._stop_quietly())
                        self.target.resume()
                    continue
                # Hooks first: a hit a full ring handed over comes after
                # what the rings hold.
                for hook in self.poll_hooks:
                    hook(False)
                if not self.handle_stop(stop):
                    raise ProbeError(f"unexpected stop: {stop}")
                if time.monotonic() - self._last_lost_check >= self.lost_check_interval:
                    self.check_lost()
                if self.hold_requested and self.hold is not None:
                    self.hold_requested = False
                    self.hold(None)
                if done():
                    return
                self.target.resume()
        except BaseException:
            failed = True
            raise
        finally:
            if self.client.running:
                self._stop_quietly()
            if not failed:
                for hook in self.poll_hooks:
                    hook(False)

    def _stop_quietly(self) -> StopReply:
        """Interrupt the guest, servicing doorbells that race with the interrupt.

        A doorbell stop can arrive instead of the interrupt's: answer it,
        resume, and interrupt again until the guest stops for the interrupt
        (or for something else that is not a doorbell, which is returned).
        """
        while True:
            self.client.interrupt()
            stop = self.target.wait(5.0)
            if stop.watch_addr != self._doorbell:
                return stop
            self.handle_stop(stop)
            self.target.resume()

    # --- for a debugger beside the probes (qprobes.frontends.gdbserver) ----------

    def saved_text(self) -> dict[int, int]:
        """The original byte under each int3 qprobes armed, by address."""
        return {p.addr: p.opcode for p in self.points.values() if p.armed}

    def saved_gates(self) -> dict[tuple[int, int], bytes]:
        """The guest's own IDT gates qprobes replaced: (IDT guest-physical
        address, vector) -> the 16 bytes of the gate."""
        return dict(self._orig_gates)

    def area_ranges(self) -> list[tuple[int, int]]:
        """The guest-virtual ranges ``[lo, hi)`` of qprobes' own area (every
        region it may grow to: slots go on past the first)."""
        if not self.attached:
            return []
        return [(self.area.vbase, self.area.end)]

    def park_vcpus(self, vcpus: list[int] | None = None,
                   max_steps: int = 100_000) -> None:  # fmt: skip
        """Bring every vCPU (guest stopped) that is inside qprobes' code (a
        stub, a slot, the trampoline, a recorder) to an instruction boundary
        of the guest's own code, the other vCPUs staying stopped.

        A vCPU single-stepping a slot runs alone until its step's #DB is
        answered (a gdbstub single-step would swallow the TF trap); then it
        is single-stepped until its rip leaves the area, doorbells met on
        the way answered as usual (the probes fire)."""
        for vcpu in self.target.vcpus if vcpus is None else vcpus:
            for _ in range(max_steps):
                kcb = self.kcb.get(vcpu)
                if kcb is not None and kcb.status is not KprobeStatus.NONE:
                    self.client.cont(vcpu)
                    self.handle_stop(self.target.wait(5.0))
                    continue
                if not self.area.contains(self.target.read_register("rip", vcpu)):
                    break
                stop = self.target.step(vcpu, timeout=5.0)
                if stop.watch_addr == self._doorbell:
                    self.handle_stop(stop)
            else:
                raise ProbeError(f"vCPU {vcpu} did not leave qprobes' area in {max_steps} steps")

    def step_original(self, vcpu: int, step_timeout: float = 2.0) -> StopReply:
        """Single-step ``vcpu`` alone over the instruction at its rip as the
        guest's own code has it: an int3 of a probe there is taken out for
        the step (the probe does not fire) and put back; a vCPU the step
        sent into qprobes' area (a fault, the trampoline) is parked after it."""
        rip = self.target.read_register("rip", vcpu)
        point = self.points.get(rip)
        swapped = point is not None and point.armed and point.opcode != INT3
        if swapped:
            assert point is not None
            self.kwrite_code(rip, bytes([point.opcode]))
        try:
            try:
                stop = self.target.step(vcpu, timeout=step_timeout)
            except StubTimeoutError:
                # A vCPU that halted (hlt) does not end its step while QEMU
                # keeps its interrupts masked: take it back where it waits.
                self.client.interrupt()
                stop = self.target.wait(5.0)
        finally:
            if swapped:
                self.kwrite_code(rip, bytes([INT3]))
        if stop.watch_addr == self._doorbell:
            self.handle_stop(stop)
        self.park_vcpus([vcpu])
        return stop

    def write_text(self, addr: int, data: bytes, vcpu: int | None = None) -> None:
        """Write guest memory as if no probe were armed (a debugger's write).

        A byte that lands on a probe's int3 becomes its saved byte and the
        int3 stays. A probed instruction whose bytes change gets a new slot
        copy of the new instruction; one that can no longer be probed is
        lost (its new bytes go in, no int3)."""
        end = addr + len(data)
        hit = [p for p in self.points.values()
               if p.armed and p.addr < end and addr < p.addr + p.insn.length]  # fmt: skip
        if not hit:
            self.target.write(addr, data, vcpu)
            self._lose_rewritten_disarmed(addr, end)
            return
        # Journal first, as for every change: each moment of this one leaves
        # bytes a recovery puts right. The int3s come out (their records
        # still name the old bytes), the new bytes go in without them (a
        # recovery leaves a site without its int3 alone), each site's new
        # byte and slot are recorded, and only then its int3 goes back.
        in_place = [p for p in hit if p.addr not in self.detours]
        for point in in_place:
            self.kwrite_code(point.addr, bytes([point.opcode]))
        buf = bytearray(data)
        for point in hit:
            if addr <= point.addr < end:
                point.opcode = buf[point.addr - addr]
                if point not in in_place:
                    buf[point.addr - addr] = INT3
        self.target.write(addr, bytes(buf), vcpu)
        for point in hit:
            code = self._original_bytes(point.addr, x86insn.MAX_INSN_SIZE)
            if code[: point.insn.length] == point.insn.raw:
                self._journal_site(point)
                self._rearm_written(point, in_place)
                continue
            try:
                insn = x86insn.decode(code, point.addr)
                analysis = x86insn.analyze(insn)
                if analysis.rejected is not None:
                    raise InstructionError(point.addr, analysis.rejected)
            except InstructionError as exc:
                self.kwrite_code(point.addr, bytes([point.opcode]))
                self._lose(point, f"a debugger wrote an instruction it cannot run ({exc})")
                continue
            boosted = point.boosted and analysis.boostable and not _loads_flags(insn)
            slots = self._slots
            try:
                # The new bytes are in already: a probe left on the old
                # slot would run the old instruction at every hit.
                if slots is None:
                    raise ProbeError("qprobes has no instruction slots")
                slot = slots.get_insn_slot()
                try:
                    copy, boost_slot = slot_code(insn, analysis, slot, boosted)
                    self.kwrite_code(slot, copy.ljust(x86insn.SLOT_SIZE, bytes([INT3])))
                except QprobesError:
                    slots.free_insn_slot(slot)
                    raise
            except QprobesError as exc:
                self.kwrite_code(point.addr, bytes([point.opcode]))
                self._lose(point, f"no slot for the instruction a debugger wrote ({exc})")
                continue
            old = point.slot
            point.insn, point.analysis, point.slot = insn, analysis, slot
            point.boosted, point.boost_slot = boosted, boost_slot
            slots.free_insn_slot(old, dirty=True)
            self._journal_site(point)
            self._rearm_written(point, in_place)
            self._fast_update(point)
        self._lose_rewritten_disarmed(addr, end)

    def _rearm_written(self, point: ProbePoint, in_place: list[ProbePoint]) -> None:
        """:meth:`write_text`: the int3 back at a site it took out (recorded)."""
        if point in in_place and point.opcode != INT3:
            self.kwrite_code(point.addr, bytes([INT3]))

    def _lose_rewritten_disarmed(self, lo: int, hi: int) -> None:
        """A disarmed probe (disabled) whose instruction a debugger's write
        in ``[lo, hi)`` changed is lost: arming it again would put its int3
        in front of the old instruction's slot copy."""
        for point in list(self.points.values()):
            if point.armed or point.lost:
                continue
            if not (point.addr < hi and lo < point.addr + point.insn.length):
                continue
            if self._original_bytes(point.addr, point.insn.length) != point.insn.raw:
                self._lose(point, "a debugger rewrote its instruction while it was disabled")

    def _journal_site(self, point: ProbePoint) -> None:
        if self.journal is not None:
            module = self.module_base(point.addr) if self.module_base is not None else 0
            self.journal.site(point.addr, point.slot, point.opcode, point.boosted, module or 0)
