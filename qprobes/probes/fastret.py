"""Return probes on the fast path: entry code and trampolines that run in
the guest, with their instances in guest memory, and no VM stop per call.

A fast return probe has an entry kprobe whose "recorder" (the code the #BP
stub calls with the saved ``pt_regs``, see :func:`qprobes.probes.stubs._fast_hit`)
is :func:`entry_source`'s code: it takes a free instance of the probe
(``lock cmpxchg`` of the instance's task word from 0: safe on several
CPUs), saves the real return address, the stack slot holding it, the task
and the TSC, and writes the probe's trampoline over the return address.
The function returns into the trampoline (:func:`trampoline_source`),
which, with interrupts off and no exception, finds the instance as Linux's
rethook does (the newest instance of the current task whose stack slot is
the one being returned through: a task may have migrated since the
entry), builds a ``pt_regs`` as at the return (rip the real return
address, rsp past it), calls the definition's return recorder (its first
two values are the instance's entry TSC and the caller to report: the real
return address, or the one behind the guest's own rethook when its
kretprobes got there first), frees the instance and returns to the real
address with every register and flag as the function left them. A record
that finds its ring full (lossless mode) rings the doorbell with
:data:`FASTRET_SPILL_VECTOR`; the host drains the rings and the trampoline
records again. An instance whose saved return address is
itself a trampoline (a tail call from a return-probed function) makes the
return go through that trampoline next, as Linux chains them.

``maxactive``: an entry that finds no free instance counts ``nmissed`` in
the probe's descriptor and leaves the stack alone (Linux's kretprobe). The
instances of tasks that exited inside the function (``do_exit``) are
freed by the host (:meth:`FastReturns.reclaim`).

Everything written on stacks can be undone from the host: the instances
are plain guest memory (:meth:`FastReturns.instances`), the journal records
where they are (so ``--recover`` and the watchdog find them), and
:meth:`FastReturns.detach` writes every outstanding hijacked return address
back, newest first per slot. A detach frees no instance: a task caught
between the return and the trampoline's ``cli`` still finds its own.

Area pages (see :mod:`qprobes.probes.fastpath` for the pages above them)::

    384      header: u64 sequence counter; then one 64-byte descriptor per
             probe k (1..32) at 64 * k: u64 nmissed, u64 lost (returns
             that found no instance), u64 entries
    385-391  instances, 64 bytes each (INST_*)
    392-399  code: 1 KiB per probe k at (k - 1) * 1024: entry, trampoline
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qprobes.errors import ProbeError, QprobesError
from qprobes.probes.area import PAGE_SIZE, GuestArea
from qprobes.probes.stubs import PT_REGS_NAMES, VAR_PERCPU, _record, assemble_at

if TYPE_CHECKING:
    from qprobes.arch.x86_64.recorder_asm import Recorder

PAGE_HEADER = 384
PAGE_INSTANCES = 385
INSTANCE_PAGES = 7
PAGE_CODE = 392
CODE_PAGES = 8
PAGE_END = 400
CODE_SLOT = 1024
INSTANCE_SIZE = 64
MAX_INSTANCES = INSTANCE_PAGES * PAGE_SIZE // INSTANCE_SIZE
MAX_PROBES = min(PAGE_SIZE // 64 - 1, CODE_PAGES * PAGE_SIZE // CODE_SLOT)

# An instance.
INST_TASK = 0  # 0: free; else the task that owns it (claimed with cmpxchg)
INST_SLOT = 8  # the stack address of the hijacked return address (0 while filled)
INST_RET = 16  # the real return address
INST_TSC = 24  # the TSC at the entry
INST_SEQ = 32  # the store's sequence number at the entry: newest wins
INST_TRAMP = 40  # the trampoline written into the slot
INST_CALLER = 48  # the caller to report: INST_RET, or the one behind the guest's rethook
# A probe's descriptor.
DESC_NMISSED = 0
DESC_LOST = 8
DESC_ENTRIES = 16

# The trampoline's frame, from its rsp at the recorder call: pt_regs, then
# the entry TSC, the caller to report, the pushed flags, the stack slot (the
# real return address goes there), and the caller's stack.
_PT_REGS_SIZE = 8 * len(PT_REGS_NAMES)
FRAME_ENTRY_TSC = _PT_REGS_SIZE
FRAME_CALLER = _PT_REGS_SIZE + 8
FRAME_FLAGS = _PT_REGS_SIZE + 16
FRAME_SLOT = _PT_REGS_SIZE + 24
_FRAME_EXTRA = 2  # words between pt_regs and the flags
_RSP = 8 * PT_REGS_NAMES.index("rsp")
_RIP = 8 * PT_REGS_NAMES.index("rip")
_SAVE = "\n".join(f"    push {r}" for r in reversed(PT_REGS_NAMES[:15]))
_RESTORE = "\n".join(f"    pop {r}" for r in PT_REGS_NAMES[:15])
log = logging.getLogger(__name__)

STACK_REGION = 16 << 10  # a task's kernel stack, when ``current`` cannot be read
#: The doorbell frame's vector when a return record found its ring full
#: (lossless mode): the host drains the rings and answers; the trampoline
#: records again.
FASTRET_SPILL_VECTOR = 0x102


@dataclass(frozen=True)
class ReturnLayout:
    """Addresses one fast return probe's code is assembled against."""

    code: int  # where the entry code starts (the trampoline follows)
    instances: int  # its first instance
    count: int  # maxactive: its instances
    desc: int  # its descriptor
    seq: int  # the store's sequence counter
    recorder: int  # the return recorder (``recorder(regs)``)
    current: int | None = None  # the per-CPU offset of ``current_task``
    lost: int = 0  # where a return with no instance goes (an ud2); 0: our own
    # The guest's own return hooks (its kretprobes through ftrace at +0 run
    # before this entry): (arch_rethook_trampoline, task_struct.rethooks,
    # rethook_node.llist, .ret_addr, .frame), so that the caller reported is
    # the real one, as the slow path's see-through does. Needs ``current``.
    rethook: tuple[int, int, int, int, int] | None = None
    # The stubs' doorbell and vars page (0: a full ring drops the record).
    doorbell: int = 0
    vars: int = 0
    # The per-CPU offset of the guest kernel's CPU number (None: cpuid), as
    # the stubs find the CPU.
    cpu_number: int | None = None


#: Live rethook nodes of a task the entry code looks through.
RETHOOK_NODES = 64


def _missed(layout: ReturnLayout) -> str:
    """No free instance: count it and go on (Linux's nmissed); in lossless
    mode (a doorbell) hand the hit to the host instead (return 1: the #BP
    stub rings the doorbell), which frees the instances of tasks gone and
    takes this call on the slow path, or counts it missed."""
    if layout.doorbell:
        return "    mov eax, 1\n    ret"
    return f"""    mov rax, {layout.desc + DESC_NMISSED:#x}
    lock inc qword ptr [rax]
    xor eax, eax
    ret"""


def _see_rethook(layout: ReturnLayout) -> str:
    """With rdx = task, rsi = slot, r9 = the return address found and r8 the
    instance: its caller is the rethook node's ret_addr when r9 is the
    guest's rethook trampoline (``rethook_find_ret_addr``). Clobbers r10, r11, rcx."""
    if layout.rethook is None or layout.current is None:
        return ""
    tramp, head, llist, ret, frame = layout.rethook
    return f"""
    mov r10, {tramp:#x}
    cmp r9, r10
    jne qpfr_seen
    mov r10, [rdx + {head:#x}]
    mov ecx, {RETHOOK_NODES}
qpfr_node:
    test r10, r10
    jz qpfr_seen
    cmp [r10 + {frame - llist:#x}], rsi
    jne qpfr_nextnode
    mov r11, [r10 + {ret - llist:#x}]
    mov [r8 + {INST_CALLER}], r11
    jmp qpfr_seen
qpfr_nextnode:
    mov r10, [r10]
    dec ecx
    jnz qpfr_node
qpfr_seen:
"""


def _task(layout: ReturnLayout, slot_reg: str) -> str:
    """rdx = the current task (or the 16 KiB stack region of the slot in ``slot_reg``)."""
    if layout.current is not None:
        return f"    mov rdx, qword ptr gs:[{layout.current:#x}]"
    return f"    mov rdx, {slot_reg}\n    and rdx, {-STACK_REGION}"


def entry_source(layout: ReturnLayout) -> str:
    """The entry code (``entry(regs)``, called by the #BP stub; returns 0)."""
    return f"""
.globl qpfr_entry
qpfr_entry:
    mov rsi, [rdi + {_RSP:#x}]
    mov r9, [rsi]
{_task(layout, "rsi")}
    test rdx, rdx
    jz qpfr_missed
    mov r8, {layout.instances:#x}
    mov ecx, {layout.count}
qpfr_claim:
    xor eax, eax
    lock cmpxchg [r8], rdx
    je qpfr_got
    add r8, {INSTANCE_SIZE}
    dec ecx
    jnz qpfr_claim
qpfr_missed:
{_missed(layout)}
qpfr_got:
    mov [r8 + {INST_RET}], r9
    mov [r8 + {INST_CALLER}], r9
{_see_rethook(layout)}
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [r8 + {INST_TSC}], rax
    mov eax, 1
    mov rcx, {layout.seq:#x}
    lock xadd [rcx], rax
    mov [r8 + {INST_SEQ}], rax
    lea rax, [rip + qpfr_trampoline]
    mov [r8 + {INST_TRAMP}], rax
    mov [r8 + {INST_SLOT}], rsi
    mov rcx, {layout.desc + DESC_ENTRIES:#x}
    lock inc qword ptr [rcx]
    mov [rsi], rax
    xor eax, eax
    ret
"""


def _spill(layout: ReturnLayout) -> str:
    """After the recorder: a nonzero eax (no room in the ring) rings the
    doorbell, as the stubs do (the frame: action, vector, pt_regs), and
    records again once the host has drained the rings."""
    if not layout.doorbell:
        return ""
    stub_record = _record("qpfr_spill", layout.cpu_number)
    old = f"lea rcx, [rip + VARS + {VAR_PERCPU:#x}]"
    if old not in stub_record:
        raise ProbeError("the stubs' per-CPU record changed: update fastret's spill")
    record = stub_record.replace(old, f"mov rcx, {layout.vars + VAR_PERCPU:#x}")
    return f"""
    test eax, eax
    jz qpfr_recorded
qpfr_spill:
    push {FASTRET_SPILL_VECTOR:#x}
    push 0
{record}
    mov rsi, {layout.doorbell:#x}
.globl qpfr_ring
qpfr_ring:
    mov byte ptr [rsi], 1
.globl qpfr_doorbell_ret
qpfr_doorbell_ret:
    mov rax, [rsp]
    test rax, rax
    jz qpfr_ring
    add rsp, 16
    mov rdi, rsp
    mov rax, {layout.recorder:#x}
    call rax
    test eax, eax
    jnz qpfr_spill
qpfr_recorded:
"""


def trampoline_source(layout: ReturnLayout) -> str:
    """The trampoline: where the hijacked return lands."""
    lost = f"    mov rax, {layout.lost:#x}\n    jmp rax" if layout.lost else "    ud2"
    return f"""
.globl qpfr_trampoline
qpfr_trampoline:
    lea rsp, [rsp - 8]
    pushfq
    cli
    push 0
    push 0
    push 0
    push 0
    push qword ptr [rsp + 32]
    push 0
    push 0
    push -1
{_SAVE}
    lea rsi, [rsp + {FRAME_SLOT:#x}]
    lea rax, [rsi + 8]
    mov [rsp + {_RSP:#x}], rax
{_task(layout, "rsi")}
    mov r8, {layout.instances:#x}
    mov ecx, {layout.count}
    xor r9d, r9d
    xor r10d, r10d
qpfr_find:
    cmp [r8 + {INST_TASK}], rdx
    jne qpfr_next
    cmp [r8 + {INST_SLOT}], rsi
    jne qpfr_next
    mov r11, [r8 + {INST_SEQ}]
    test r9, r9
    jz qpfr_take
    cmp r11, r10
    jbe qpfr_next
qpfr_take:
    mov r9, r8
    mov r10, r11
qpfr_next:
    add r8, {INSTANCE_SIZE}
    dec ecx
    jnz qpfr_find
    test r9, r9
    jz qpfr_lost
    mov rax, [r9 + {INST_RET}]
    mov [rsp + {_RIP:#x}], rax
    mov [rsp + {FRAME_SLOT:#x}], rax
    mov rax, [r9 + {INST_TSC}]
    mov [rsp + {FRAME_ENTRY_TSC:#x}], rax
    mov rax, [r9 + {INST_CALLER}]
    mov [rsp + {FRAME_CALLER:#x}], rax
    mov r12, r9
    mov rdi, rsp
    mov rax, {layout.recorder:#x}
    call rax
{_spill(layout)}
    mov r9, r12
    mov qword ptr [r9 + {INST_SLOT}], 0
    mov qword ptr [r9 + {INST_TASK}], 0
{_RESTORE}
    add rsp, {8 * (6 + _FRAME_EXTRA)}
    popfq
    ret
qpfr_lost:
    mov rax, {layout.desc + DESC_LOST:#x}
    lock inc qword ptr [rax]
{lost}
.globl qpfr_end
qpfr_end:
"""


def assemble_return(layout: ReturnLayout) -> tuple[bytes, dict[str, int]]:
    """The code of one probe, at ``layout.code``, and its labels
    (``qpfr_entry``, ``qpfr_trampoline``, with a doorbell ``qpfr_ring`` and
    ``qpfr_doorbell_ret``)."""
    code, symbols = assemble_at(entry_source(layout) + trampoline_source(layout), layout.code)
    if len(code) > CODE_SLOT:
        raise ProbeError(f"fast return code takes {len(code)} bytes, more than {CODE_SLOT}")
    return code, symbols


@dataclass(frozen=True)
class Instance:
    """An instance as read from the guest."""

    index: int
    task: int
    slot: int
    ret: int
    tsc: int
    seq: int
    tramp: int

    @property
    def live(self) -> bool:
        return self.task != 0 and self.slot != 0


def parse_instances(raw: bytes, first: int = 0) -> list[Instance]:
    """The instances in ``raw`` (64 bytes each), live or not."""
    out = []
    for i in range(len(raw) // INSTANCE_SIZE):
        task, slot, ret, tsc, seq, tramp = struct.unpack_from("<6Q", raw, i * INSTANCE_SIZE)
        out.append(Instance(first + i, task, slot, ret, tsc, seq, tramp))
    return out


def restore_plan(live: list[Instance], read_slot: Callable[[int], int | None],
                 ) -> dict[int, int]:  # fmt: skip
    """The real return address to write back at each stack slot: per slot,
    newest instance first, each undoes its own trampoline (an instance
    whose return address is another trampoline hands on to the next).
    Slots that no longer hold a trampoline (the call is returning now, or
    the slot was reused) are left alone."""
    by_slot: dict[int, list[Instance]] = {}
    for inst in live:
        if inst.live:
            by_slot.setdefault(inst.slot, []).append(inst)
    out: dict[int, int] = {}
    for slot, insts in by_slot.items():
        now = read_slot(slot)
        if now is None:
            continue
        value = now
        for inst in sorted(insts, key=lambda i: i.seq, reverse=True):
            if value == inst.tramp:
                value = inst.ret
        if value != now:
            out[slot] = value
    return out


def real_return(live: list[Instance], slot: int, ret: int, trampolines: set[int]) -> int:
    """``rethook_find_ret_addr``: the real return address behind trampoline
    address ``ret`` found at stack ``slot`` (``ret`` when none is known)."""
    insts = sorted((i for i in live if i.live and i.slot == slot), key=lambda i: i.seq,
                   reverse=True)  # fmt: skip
    for inst in insts:
        if ret not in trampolines:
            break
        if inst.tramp == ret:
            ret = inst.ret
    return ret


@dataclass(eq=False)
class FastReturn:
    """One fast return probe's share of the store."""

    index: int  # its descriptor number k
    first: int  # its first instance
    count: int
    code: int
    entry: int
    trampoline: int
    recorder: Recorder
    removed: bool = False
    doorbell_rets: tuple[int, ...] = ()  # where a spill's doorbell stop may report rip
    host_missed: int = 0  # entries handed to the host with the store full, counted missed


@dataclass
class FastReturnStats:
    restored: int = 0  # return addresses written back at detach
    reclaimed: int = 0  # instances of calls that can never return (their task is gone)


#: How often :meth:`FastReturns.poll` looks for instances of dead tasks.
RECLAIM_PERIOD = 1.0


class FastReturns:
    """The return instance store of an attached engine's area.

    ``read_data``/``write_data`` reach guest (kernel) memory; ``write_code``
    writes guest code so TCG sees it; ``place_recorder(build)`` places a
    recorder in the fast path's recorder pages (its loads' faults go
    through the recorders' exception table); ``record(...)`` tells the
    journal where the store is.
    """

    def __init__(self, area: GuestArea, read_data: Callable[[int, int], bytes],
                 write_data: Callable[[int, bytes], None],
                 write_code: Callable[[int, bytes], None],
                 record: Callable[[int, int, int, int, int], None] | None = None,
                 ) -> None:  # fmt: skip
        self.area = area
        self.read_data = read_data
        self.write_data = write_data
        self.write_code = write_code
        self.record = record
        self.enabled = False
        self.probes: dict[int, FastReturn] = {}
        self.stats = FastReturnStats()
        self.adopted: tuple[int, int, int, int] | None = None  # (store, count, lo, hi)
        self.lost_target = 0
        # The stubs' doorbell and vars page, for lossless return records
        # (0: a full ring drops them); set by the engine.
        self.doorbell = 0
        self.vars = 0
        self.cpu_number: int | None = None  # see ReturnLayout.cpu_number
        self.on_doorbells: Callable[[dict[int, int]], None] | None = None
        # Whether a task exited (Linux: TASK_DEAD), for reclaiming the
        # instances of calls that never return (do_exit); set by the engine.
        self.is_gone: Callable[[int], bool] | None = None
        self.live_access = False  # the store can be read and written while the guest runs
        self._next_reclaim = 0.0

    def _vaddr(self, page: int) -> int:
        return self.area.vbase + page * PAGE_SIZE

    @property
    def header(self) -> int:
        return self._vaddr(PAGE_HEADER)

    @property
    def store(self) -> int:
        return self._vaddr(PAGE_INSTANCES)

    @property
    def code_lo(self) -> int:
        return self._vaddr(PAGE_CODE)

    @property
    def code_hi(self) -> int:
        return self._vaddr(PAGE_END)

    def enable(self) -> None:
        """Map the store and code pages (once) and tell the journal."""
        if self.enabled:
            return
        if self.record is not None:
            self.record(self.store, MAX_INSTANCES, INSTANCE_SIZE, self.code_lo, self.code_hi)
        self.area.map_page(PAGE_HEADER, writable=True, executable=False)
        for page in range(PAGE_INSTANCES, PAGE_INSTANCES + INSTANCE_PAGES):
            self.area.map_page(page, writable=True, executable=False)
        for page in range(PAGE_CODE, PAGE_END):
            self.area.map_page(page, writable=False, executable=True, fill=0xCC)
        self.enabled = True

    def _free_range(self, count: int) -> int:
        """The first instance of ``count`` free ones in a row."""
        taken = sorted((fr.first, fr.first + fr.count) for fr in self.probes.values())
        at = 0
        for lo, hi in taken:
            if lo - at >= count:
                return at
            at = max(at, hi)
        if MAX_INSTANCES - at >= count:
            return at
        raise ProbeError(f"no room for {count} more return instances in qprobes' store "
                         f"({MAX_INSTANCES} in all)")  # fmt: skip

    def _reap(self) -> None:
        """Give back the share of removed probes none of whose instances is live."""
        for k, fr in list(self.probes.items()):
            if fr.removed and not any(i.task for i in self.instances(fr)):
                del self.probes[k]

    def add(self, maxactive: int, current: int | None,
            place_recorder: Callable[[Callable[[int], Recorder]], Recorder],
            build: Callable[[int], Recorder],
            rethook: tuple[int, int, int, int, int] | None = None,
            lossless: bool = False) -> FastReturn:  # fmt: skip
        """Give a probe ``maxactive`` instances, place its return recorder
        (``build(address)``) and write its entry code and trampoline. With
        ``lossless`` (and the engine's doorbell known), a record that finds
        its ring full rings the doorbell and is taken again once the host
        has drained the rings; else it is dropped and counted."""
        if maxactive <= 0:
            raise ProbeError(f"maxactive {maxactive} must be positive")
        self.enable()
        self._reap()
        free = [k for k in range(1, MAX_PROBES + 1) if k not in self.probes]
        if not free:
            raise ProbeError(f"qprobes' store holds {MAX_PROBES} fast return probes")
        k = free[0]
        first = self._free_range(maxactive)
        recorder = place_recorder(build)
        code_at = self.code_lo + (k - 1) * CODE_SLOT
        layout = ReturnLayout(code_at, self.store + first * INSTANCE_SIZE, maxactive,
                              self.header + 64 * k, self.header, recorder.address, current,
                              self.lost_target, rethook,
                              self.doorbell if lossless else 0, self.vars,
                              self.cpu_number)  # fmt: skip
        code, symbols = assemble_return(layout)
        entry, tramp = symbols["qpfr_entry"], symbols["qpfr_trampoline"]
        rets: tuple[int, ...] = ()
        if "qpfr_doorbell_ret" in symbols:
            ret = symbols["qpfr_doorbell_ret"]
            rets = (symbols["qpfr_ring"], ret, ret + 4, ret + 7)  # as the stubs' doorbells
            if self.on_doorbells is not None:
                self.on_doorbells(dict.fromkeys(rets, FASTRET_SPILL_VECTOR))
        # A fresh share: no instance, no counters.
        self.write_data(layout.instances, bytes(maxactive * INSTANCE_SIZE))
        self.write_data(layout.desc, bytes(64))
        self.write_code(code_at, code)
        fr = FastReturn(k, first, maxactive, code_at, entry, tramp, recorder, doorbell_rets=rets)
        self.probes[k] = fr
        return fr

    def remove(self, fr: FastReturn) -> None:
        """The probe is gone: its code and instances stay until none is live
        (a sleeping task still returns through its trampoline)."""
        fr.removed = True

    # --- reading the store ----------------------------------------------------------

    def instances(self, fr: FastReturn | None = None) -> list[Instance]:
        """Instances of ``fr`` (or the whole store), as the guest has them."""
        if not self.enabled and self.adopted is None:
            return []
        store = self.adopted[0] if self.adopted is not None else self.store
        first, count = (fr.first, fr.count) if fr is not None else \
            (0, self.adopted[1] if self.adopted is not None else MAX_INSTANCES)  # fmt: skip
        raw = self.read_data(store + first * INSTANCE_SIZE, count * INSTANCE_SIZE)
        return parse_instances(raw, first)

    def counter(self, fr: FastReturn, offset: int) -> int:
        raw = self.read_data(self.header + 64 * fr.index + offset, 8)
        return int.from_bytes(raw, "little")

    def nmissed(self, fr: FastReturn) -> int:
        return self.counter(fr, DESC_NMISSED) + fr.host_missed

    def full(self, fr: FastReturn) -> bool:
        """Whether every instance of ``fr`` is taken."""
        return all(i.task for i in self.instances(fr))

    def lost(self, fr: FastReturn) -> int:
        return self.counter(fr, DESC_LOST)

    @property
    def trampolines(self) -> set[int]:
        return {fr.trampoline for fr in self.probes.values()}

    def allowed(self) -> set[int]:
        """Every trampoline address an outstanding instance may have left on
        a stack (what a detach's first quiescence lets stay)."""
        out = set(self.trampolines)
        with contextlib.suppress(QprobesError):
            out |= {i.tramp for i in self.instances() if i.live}
        return out

    def is_trampoline(self, addr: int) -> bool:
        if self.adopted is not None:
            return self.adopted[2] <= addr < self.adopted[3]
        return self.enabled and self.code_lo <= addr < self.code_hi

    def find_ret_addr(self, slot: int, ret: int) -> int:
        """The real return address behind fast trampoline ``ret`` at ``slot``."""
        if not self.is_trampoline(ret):
            return ret
        try:
            live = [i for i in self.instances() if i.live]
        except QprobesError:
            return ret
        tramps = {i.tramp for i in live} | self.trampolines
        return real_return(live, slot, ret, tramps)

    # --- instances of calls that never return -------------------------------------

    def poll(self, running: bool) -> None:
        """The engine's poll hook: now and then, :meth:`reclaim` (while the
        guest runs only with :attr:`live_access`)."""
        if not self.probes or self.is_gone is None or (running and not self.live_access):
            return
        now = time.monotonic()
        if now < self._next_reclaim:
            return
        self._next_reclaim = now + RECLAIM_PERIOD
        try:
            self.reclaim()
        except QprobesError as exc:
            log.debug("fast return instances not reclaimed: %s", exc)

    def reclaim(self) -> int:
        """Free the instances whose task is gone and whose stack slot no
        longer holds their trampoline: a call that can never return (a task
        that exited inside the function, as in ``do_exit``), which Linux's
        ``rethook_flush_task`` frees when the task goes. Nothing in the
        guest touches such an instance (no task matches it, none can claim
        it) until its task word is 0, written last. Returns how many."""
        if self.is_gone is None:
            return 0
        freed = 0
        for inst in self.instances():
            if not inst.live or self._read_slot(inst.slot) == inst.tramp:
                continue
            try:
                gone = self.is_gone(inst.task)
            except QprobesError:
                continue
            if not gone:
                continue
            at = self.store + inst.index * INSTANCE_SIZE
            self.write_data(at + INST_SLOT, bytes(8))
            self.write_data(at + INST_TASK, bytes(8))
            freed += 1
        self.stats.reclaimed += freed
        return freed

    # --- undoing ------------------------------------------------------------------

    def _read_slot(self, slot: int) -> int | None:
        try:
            return int.from_bytes(self.read_data(slot, 8), "little")
        except QprobesError:
            return None

    def detach(self) -> int:
        """Put back every hijacked return address of an outstanding instance
        (guest stopped). Returns how many were written."""
        if not self.enabled and self.adopted is None:
            return 0
        try:
            instances = self.instances()
        except QprobesError as exc:
            # The store is not mapped (a session that died while enabling it):
            # no instance was ever taken.
            log.warning("cannot read the fast return instances: %s", exc)
            return 0
        plan = restore_plan(instances, self._read_slot)
        for slot, real in plan.items():
            self.write_data(slot, real.to_bytes(8, "little"))
        self.stats.restored += len(plan)
        return len(plan)

    def adopt(self, store: int, count: int, size: int, lo: int, hi: int) -> None:
        """A dead session's store (from its journal), to put back at detach."""
        if size != INSTANCE_SIZE:
            raise ProbeError(f"the journal's return instances are {size} bytes, this qprobes "
                             f"reads {INSTANCE_SIZE}")  # fmt: skip
        self.adopted = (store, count, lo, hi)
