"""Return probes (kretprobes) and jprobes on top of the kprobe engine.

kretprobes (Linux ``kernel/kprobes.c``: ``pre_handler_kretprobe``,
``kretprobe_trampoline_handler``): an entry kprobe saves the return address
at the top of the stack in an instance and replaces it with the address of
qprobes' trampoline; the function returns into the trampoline, which rings
the doorbell; the host runs the return handler, writes the real return
address back into the trampoline's frame, and the trampoline returns there.

Instances are kept as Linux 5.11+ keeps them (``current->kretprobe_instances``,
``__kretprobe_find_ret_addr``, ``__kretprobe_trampoline_handler``): a chain
per task, newest first, each instance remembering the stack slot (Linux's
``ri->fp``) it hijacked. An entry that finds the trampoline already in its
slot (a second return probe on the function, or a tail call from a
return-probed function) saves the trampoline as its return address and
chains onto the instance already holding the slot; at the trampoline every
instance of the task on the slot being returned through runs, newest first,
with the first real return address found among them. The task is the
kernel's ``current`` when a :class:`TaskHooks` implementation says so (set
by the Linux front end), else the stack the slot is on.

Instances die without returning (a call that never returns, ``do_exit``, a
task killed while asleep): one is reclaimed when a new call reuses its slot
(the slot no longer holds the trampoline), and, when a probe runs out of
instances, when its slot no longer holds the trampoline or its task is gone.
``maxactive`` bounds the live instances per probe and ``nmissed`` counts
entries that found none free.

jprobes (2.6 ``setjmp_pre_handler``/``longjmp_break_handler``): at the
probed function's entry the registers and ``MIN_STACK_SIZE`` bytes of stack
are saved on the host and the guest jumps to guest code with the same
arguments; that code ends in ``jmp jprobe_return``, where the host restores
the registers and stack and single-steps the probed instruction as usual.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from qprobes.errors import ProbeError, QprobesError
from qprobes.probes.context import HitContext, PtRegs
from qprobes.probes.kprobe import Kprobe
from qprobes.probes.stubs import FRAME_WORDS, PT_REGS_NAMES

if TYPE_CHECKING:
    from qprobes.probes.engine import KprobeEngine

log = logging.getLogger(__name__)

RetHandler = Callable[["Kretprobe", HitContext], None]
# (ctx at the return, stack slot, address found there) -> the real caller,
# behind the guest's own return hooks (set by Session.use_linux).
SeeThrough = Callable[[HitContext, int, int], int]
EntryHandler = Callable[["Kretprobe", HitContext], "bool | None"]

# Trampoline frame at the doorbell (see stubs.py): action, vector, 15 GPRs,
# -1, rflags, return-address slot.
_KRET_FLAGS = 2 + 16
_KRET_RETSLOT = 2 + 17
_KRET_WORDS = 2 + 18
_GPR_INDEXES = range(2, 17)
_IDX = {name: 2 + i for i, name in enumerate(PT_REGS_NAMES)}


# The kernel stacks qprobes tells apart when it cannot name the task: a
# stack slot belongs to the 16 KiB-aligned region it is in (x86_64 kernel
# and IRQ stacks are 16 KiB). Any function of the slot pairs correctly; this
# one keeps each chain short.
STACK_REGION = 16 << 10
# Return addresses remembered per (task, slot) after their instance went
# away: the answer for a trampoline hit whose instance is no longer known.
RETIRED_MAX = 4096


class TaskHooks(Protocol):
    """What the kretprobe manager asks about the guest's tasks.

    The Linux front end plugs in an implementation that reads ``current``
    and ``task_struct``; without one, a stack slot's task is its stack.
    """

    def current(self, ctx: HitContext) -> int | None:
        """An identity of the task the hit interrupted (its ``task_struct``)."""
        ...

    def stack_of(self, task: int) -> int | None:
        """What identifies the task's kernel stack now (``task->stack``)."""
        ...

    def is_gone(self, task: int, stack: int | None) -> bool:
        """Whether ``task`` exited (or no longer owns ``stack``), so none of
        its instances can return."""
        ...


class StackTasks:
    """:class:`TaskHooks` for a guest whose tasks qprobes cannot name."""

    def current(self, ctx: HitContext) -> int | None:
        return None

    def stack_of(self, task: int) -> int | None:
        return None

    def is_gone(self, task: int, stack: int | None) -> bool:
        return False


@dataclass
class KretprobeInstance:
    """One live call (``struct kretprobe_instance``)."""

    rp: Kretprobe
    ret_addr: int  # the return address found at entry (the trampoline when chained)
    stack_slot: int  # where it was on the guest stack (Linux's ri->fp)
    cr3: int
    vcpu: int
    entry_time: float
    entry_regs: dict[str, int]
    data: object = None  # what the entry handler left in ctx.entry_data
    task: int = 0  # the task's identity (current, or the stack region)
    task_known: bool = False  # task is a task_struct, not a stack region
    stack: int | None = None  # the task's stack at entry (TaskHooks.stack_of)


@dataclass(eq=False)
class Kretprobe:
    """A return probe (``struct kretprobe``)."""

    symbol_name: str | None = None
    addr: int | None = None
    offset: int = 0
    handler: RetHandler | None = None
    entry_handler: EntryHandler | None = None
    maxactive: int = 0  # 0: max(10, 2 * vCPUs), as Linux
    name: str | None = None
    data: Any = None
    nmissed: int = 0
    nhit: int = 0
    nreclaimed: int = 0  # instances dropped because their call can no longer return
    kp: Kprobe = field(init=False)
    instances: list[KretprobeInstance] = field(default_factory=list, init=False)


@dataclass
class KretprobeStats:
    """What the manager did beyond pairing entries with returns."""

    chained: int = 0  # entries that found the trampoline already in their slot
    reclaimed: int = 0  # dead instances dropped (slot reused, task gone)
    reclaimed_because: dict[str, int] = field(default_factory=dict)  # by reason
    reclaim_scans: int = 0  # on-demand scans when a probe ran out of instances
    orphans: int = 0  # trampoline hits with no live instance, answered from memory
    lost: int = 0  # trampoline hits whose return address was unknown
    journal_full: int = 0  # entries missed: no room in the journal for the return address
    #: Every ``nmissed`` the manager counted, by cause (``maxactive``: all
    #: instances live; ``no instance to chain to``; ``orphan return``).
    missed: dict[str, int] = field(default_factory=dict)

    def miss(self, rp: Kretprobe, cause: str) -> None:
        rp.nmissed += 1
        self.missed[cause] = self.missed.get(cause, 0) + 1


class KretprobeManager:
    """The kretprobes of one engine and its trampoline."""

    def __init__(self, engine: KprobeEngine, tasks: TaskHooks | None = None) -> None:
        self.engine = engine
        self.tasks: TaskHooks = tasks if tasks is not None else StackTasks()
        # Per task, newest first (current->kretprobe_instances).
        self.chains: dict[int, list[KretprobeInstance]] = {}
        # Per stack slot, newest first: every instance that hijacked it.
        self.live: dict[int, list[KretprobeInstance]] = {}
        # (task, slot) -> (real return address, probe) of instances gone.
        self.retired: OrderedDict[tuple[int, int], tuple[int, Kretprobe]] = OrderedDict()
        self.stats = KretprobeStats()
        self.see_through: SeeThrough | None = None
        engine.kretprobes = self

    @property
    def trampoline(self) -> int:
        return self.engine.stubs["qp_kretprobe_trampoline"]

    def register(self, rp: Kretprobe) -> Kretprobe:
        """``register_kretprobe``: the entry probe must sit at a function's first byte."""
        if rp.offset:
            raise ProbeError("a return probe must be at a function's entry (offset 0)")
        if rp.maxactive <= 0:
            rp.maxactive = max(10, 2 * len(self.engine.target.vcpus))
        rp.kp = Kprobe(addr=rp.addr, symbol_name=rp.symbol_name, name=rp.name,
                       pre_handler=self._make_pre_handler(rp))  # fmt: skip
        if self.engine.symbols is not None and rp.addr is None and rp.symbol_name is not None:
            sym = self.engine.symbols.lookup(rp.symbol_name)
            if sym.kind != "func":
                raise ProbeError(f"{rp.symbol_name} is not a function")
        if self.engine.symbols is not None and rp.addr is not None:
            # kprobe_on_func_entry(): an address must be a function's first byte.
            found = self.engine.resolve_addr(rp.addr)
            if found is None or found[0].kind != "func" or found[1] != 0:
                where = self.engine._where(rp.addr)
                raise ProbeError(
                    f"a return probe must be at a function's entry: {rp.addr:#x} is {where}"
                )
        self.engine.register_kprobe(rp.kp)
        return rp

    def unregister(self, rp: Kretprobe) -> None:
        """Remove the entry probe; live instances keep their trampoline until
        they return (their handler no longer runs, as in Linux)."""
        self.engine.unregister_kprobe(rp.kp)

    # --- the instance chains ------------------------------------------------------

    def _task(self, ctx: HitContext, slot: int) -> tuple[int, bool]:
        try:
            task = self.tasks.current(ctx)
        except QprobesError:
            task = None
        if task:
            return task, True
        return slot & ~(STACK_REGION - 1), False

    def _push(self, inst: KretprobeInstance) -> None:
        inst.rp.instances.append(inst)
        self.chains.setdefault(inst.task, []).insert(0, inst)
        self.live.setdefault(inst.stack_slot, []).insert(0, inst)

    def _unlink(self, inst: KretprobeInstance, real_ret: int | None,
                answering: bool = False) -> None:  # fmt: skip
        """Forget ``inst``; remember the real return address of its slot.
        ``answering``: the real address goes into the trampoline's frame with
        the answer to this doorbell, so its journal record is released only
        once that answer is written (engine ``after_answer``)."""
        for index, key in ((self.chains, inst.task), (self.live, inst.stack_slot)):
            chain = index.get(key)
            if chain is not None and inst in chain:
                chain.remove(inst)
                if not chain:
                    del index[key]
        journal = getattr(self.engine, "journal", None)
        if inst.stack_slot not in self.live and journal is not None:
            # No instance holds the slot: its real address is back or moot.
            after = getattr(self.engine, "after_answer", None)
            if answering and after is not None:
                after.append(self._release_after_answer(journal, inst.stack_slot))
            else:
                journal.unret(inst.stack_slot)
        if inst in inst.rp.instances:
            inst.rp.instances.remove(inst)
        ret = real_ret if real_ret is not None else inst.ret_addr
        if ret != self.trampoline:
            self.retired[(inst.task, inst.stack_slot)] = (ret, inst.rp)
            self.retired.move_to_end((inst.task, inst.stack_slot))
            while len(self.retired) > RETIRED_MAX:
                self.retired.popitem(last=False)

    def _release_after_answer(self, journal: Any, slot: int) -> Callable[[], None]:
        def release() -> None:
            if slot not in self.live:  # no new call hijacked it meanwhile
                journal.unret(slot)

        return release

    def _reclaim(self, inst: KretprobeInstance, why: str) -> None:
        log.debug("kretprobe %s: reclaimed the instance at stack slot %#x (%s)",
                  inst.rp.name or inst.rp.kp, inst.stack_slot, why)  # fmt: skip
        inst.rp.nreclaimed += 1
        self.stats.reclaimed += 1
        self.stats.reclaimed_because[why] = self.stats.reclaimed_because.get(why, 0) + 1
        self._unlink(inst, None)

    def _real_ret_addr(self, nodes: list[KretprobeInstance]) -> int | None:
        """``__kretprobe_find_ret_addr``: skip the trampoline, newest first."""
        tramp = self.trampoline
        for inst in nodes:
            if inst.ret_addr != tramp:
                return inst.ret_addr
        return None

    def adopt(self, rets: list[tuple[int, int, int]]) -> None:
        """Take over a dead session's hijacked return addresses (from its
        journal): each becomes an instance of a handler-less return probe, so
        that a return through the trampoline is answered with the real
        address and :meth:`detach` writes the rest back."""
        rp = Kretprobe(name="qprobes/recovered")
        rp.kp = Kprobe(addr=self.trampoline, name="qprobes/recovered")
        for slot, real, cr3 in rets:
            inst = KretprobeInstance(rp, real, slot, cr3, 0, time.monotonic(), {}, task=slot)
            self._push(inst)

    def find_ret_addr(self, slot: int) -> int | None:
        """``kretprobe_find_ret_addr``: the real return address of the live
        call whose return address at stack ``slot`` is the trampoline (for
        unwinders), or None."""
        return self._real_ret_addr(self.live.get(slot, []))

    def _read_u64(self, addr: int) -> int | None:
        """A word of a kernel stack, through the kernel's page tables (the
        address space an instance was created in may be gone)."""
        try:
            return int(struct.unpack("<Q", self.engine.read_data(addr, 8))[0])
        except QprobesError:
            return None

    def _slot_in_use(self, inst: KretprobeInstance) -> bool:
        """Whether the call ``inst`` hijacked can still return through its slot.

        The slot holds the trampoline until the function returns and the
        host answers (the trampoline leaves it in place); the one moment it
        does not is an interrupt taken on the trampoline's first instruction,
        whose frame may cover the slot: its saved rip is the trampoline and
        its saved rsp the slot + 8.
        """
        tramp, slot = self.trampoline, inst.stack_slot
        if self._read_u64(slot) in (tramp, None):
            return True
        for rip_at, rsp_at in ((slot - 32, slot - 8), (slot - 40, slot - 16)):
            if self._read_u64(rip_at) == tramp and self._read_u64(rsp_at) == slot + 8:
                return True
        return False

    def _in_trampoline(self) -> list[int]:
        """Stack pointers of the vCPUs running the trampoline right now."""
        start = self.trampoline
        end = self.engine.stubs.symbols.get("qp_kretprobe_trampoline_end", start + 0x100)
        found = []
        for vcpu in self.engine.target.vcpus:
            try:
                rip = self.engine.target.read_register("rip", vcpu)
                if start <= rip < end:
                    found.append(self.engine.target.read_register("rsp", vcpu))
            except QprobesError:
                continue
        return found

    def reclaim_dead(self, rp: Kretprobe | None = None) -> int:
        """Drop the instances (of ``rp``, or all) whose call can no longer
        return: their task is gone, or their slot no longer holds the
        trampoline. Returns how many were dropped."""
        self.stats.reclaim_scans += 1
        candidates = list(rp.instances) if rp is not None else \
            [i for chain in self.live.values() for i in chain]  # fmt: skip
        dead: list[tuple[KretprobeInstance, str]] = []
        for inst in candidates:
            gone = False
            if inst.task_known:
                try:
                    gone = self.tasks.is_gone(inst.task, inst.stack)
                except QprobesError:
                    gone = False
            if gone:
                dead.append((inst, "its task is gone"))
            elif not self._slot_in_use(inst):
                dead.append((inst, "its slot no longer holds the trampoline"))
        if not dead:
            return 0
        # A vCPU inside the trampoline is about to be answered for its slot.
        busy = self._in_trampoline()
        count = 0
        for inst, why in dead:
            if any(sp - 8 <= inst.stack_slot <= sp + 8 * (_KRET_WORDS + 8) for sp in busy):
                continue
            self._reclaim(inst, why)
            count += 1
        return count

    # --- entry ----------------------------------------------------------------------

    def _make_pre_handler(self, rp: Kretprobe) -> Callable[[Kprobe, HitContext], bool]:
        def pre_handler_kretprobe(kp: Kprobe, ctx: HitContext) -> bool:
            self.entry(rp, ctx)
            return False

        return pre_handler_kretprobe

    def entry(self, rp: Kretprobe, ctx: HitContext) -> KretprobeInstance | None:
        """``pre_handler_kretprobe`` + ``arch_prepare_kretprobe``."""
        regs = ctx.regs
        slot = regs.rsp
        tramp = self.trampoline
        ret_addr = struct.unpack("<Q", ctx.read(slot, 8))[0]
        task, known = self._task(ctx, slot)
        here = self.live.get(slot, [])
        if ret_addr == tramp:
            # A second return probe on this function, or a tail call from a
            # return-probed one: the instance holding the slot has the real
            # return address; this one chains onto it.
            if self._real_ret_addr(here) is None:
                self.stats.miss(rp, "no instance to chain to")  # leave the slot alone
                return None
        else:
            # A new call in this slot: whatever hijacked it before is dead.
            for old in list(here):
                self._reclaim(old, "its stack slot was reused")
        journal = getattr(self.engine, "journal", None)
        if ret_addr != tramp and journal is not None and not journal.has_ret_room(slot):
            # No room to record the real return address: the call is not
            # hijacked (missed, as when out of instances), nothing written.
            self.stats.miss(rp, "journal full")
            self.stats.journal_full += 1
            if self.stats.journal_full == 1:
                log.warning("kretprobe %s: qprobes' journal holds as many hijacked return "
                            "addresses as it records; calls are counted missed until "
                            "some return", rp.name or rp.kp)  # fmt: skip
            return None
        if len(rp.instances) >= rp.maxactive:
            self.reclaim_dead(rp)
            if len(rp.instances) >= rp.maxactive:
                self.stats.miss(rp, "maxactive")
                return None
        inst = KretprobeInstance(rp, ret_addr, slot, ctx.cr3, ctx.vcpu, time.monotonic(),
                                 regs.as_dict(), task=task, task_known=known)  # fmt: skip
        if known:
            try:
                inst.stack = self.tasks.stack_of(task)
            except QprobesError:
                inst.stack = None
        if rp.entry_handler is not None:
            ctx.kind = "kretprobe-entry"
            ctx.entry_data = None
            if rp.entry_handler(rp, ctx):
                return None  # the entry handler declined this call
            inst.data = ctx.entry_data
        if ret_addr != tramp:
            if journal is not None:
                journal.ret(slot, ret_addr, ctx.cr3)  # recorded before the slot changes
            self.engine.write_data(slot, struct.pack("<Q", tramp), ctx.cr3)
        else:
            self.stats.chained += 1
        self._push(inst)
        return inst

    # --- return -------------------------------------------------------------------

    def trampoline_handler(self, ctx: HitContext) -> None:
        """``__kretprobe_trampoline_handler``: run the return handlers of every
        instance on the slot being returned through, newest first, and send
        the guest to the real return address.

        Never raises for a missing instance: a hit with none is counted
        (``stats.orphans``, the probe's ``nmissed``) and returns to the
        address last restored in that slot for that task; with none known
        (``stats.lost``) the guest is sent to ``qp_kretprobe_lost``, an
        ``ud2``, so that its kernel reports an invalid-opcode oops in that
        task (Linux ``BUG()``s in the same case) rather than run on at a
        guessed address or keep the vCPU in the trampoline.
        """
        words = ctx.regs.words
        slot = ctx.frame_addr + 8 * _KRET_RETSLOT
        task, known = self._task(ctx, slot)
        here = list(self.live.get(slot, []))
        mine = [i for i in here if i.task == task] or here
        real = self._real_ret_addr(mine)
        for other in here:
            if other not in mine:
                self._reclaim(other, "another task returned through its slot")
        if real is None:
            real = self._orphan(ctx, task, known, slot, mine)
            for inst in mine:
                self.stats.miss(inst.rp, "orphan return")
                self._unlink(inst, None)
            mine = []
        # A pt_regs view as at the return: rip is the real return address, rsp
        # is past it, rflags as the function left them.
        fake = list(words[:FRAME_WORDS])
        fake[_IDX["orig_rax"]] = 2**64 - 1
        fake[_IDX["rip"]] = real
        fake[_IDX["cs"]] = 0
        fake[_IDX["eflags"]] = words[_KRET_FLAGS]
        fake[_IDX["rsp"]] = slot + 8
        fake[_IDX["ss"]] = 0
        view = PtRegs(fake)
        ret_to = real
        if self.see_through is not None:
            # A probe armed after an ftrace site can find the guest's own
            # return trampoline there: report the caller behind it.
            ret_to = self.see_through(ctx, slot, real)
        for inst in mine:
            self._unlink(inst, real, answering=True)
            rp = inst.rp
            rp.nhit += 1
            if rp.handler is None or not rp.kp.registered:
                continue
            inst.ret_addr = real  # as Linux sets ri->ret_addr before the handler
            rctx = HitContext(ctx.thread, view, ctx.read_virt, ctx.cr3, kind="kretprobe",
                              probe=rp.kp, retval=words[_IDX["rax"]], ret_addr=ret_to,
                              entry_data=inst.data, frame_addr=ctx.frame_addr,
                              gs_base=ctx.gs_base, read_current=ctx.read_current,
                              tsc=ctx.tsc, unwinder=ctx.unwinder)  # fmt: skip
            rctx.entry_regs = inst.entry_regs
            rctx.duration = time.monotonic() - inst.entry_time
            rp.handler(rp, rctx)
        for i in view.dirty & set(_GPR_INDEXES):
            ctx.regs.words[i] = fake[i]
            ctx.regs.dirty.add(i)
        ctx.regs.words[_KRET_RETSLOT] = real
        ctx.regs.dirty.add(_KRET_RETSLOT)

    def _orphan(self, ctx: HitContext, task: int, known: bool, slot: int,
                nodes: list[KretprobeInstance]) -> int:  # fmt: skip
        """Where a trampoline hit with no usable instance returns to."""
        remembered = self.retired.get((task, slot))
        if remembered is None and not known:
            for (_task, where), value in reversed(self.retired.items()):
                if where == slot:
                    remembered = value
                    break
        if remembered is not None:
            ret, rp = remembered
            self.stats.orphans += 1
            if not nodes:
                self.stats.miss(rp, "orphan return")
            log.warning("kretprobe trampoline hit on vCPU %d for stack slot %#x with no "
                        "instance: counted missed, returning to %#x, the address last "
                        "restored there", ctx.vcpu, slot, ret)  # fmt: skip
            return ret
        self.stats.lost += 1
        lost = self.engine.stubs["qp_kretprobe_lost"]
        log.error("kretprobe trampoline hit on vCPU %d for stack slot %#x with no known "
                  "return address: the guest task is sent to qp_kretprobe_lost (%#x), an "
                  "invalid opcode, as Linux BUG()s here", ctx.vcpu, slot, lost)  # fmt: skip
        return lost

    def detach(self) -> None:
        """Put back every hijacked return address still on a guest stack."""
        tramp = self.trampoline
        for slot, chain in list(self.live.items()):
            real = self._real_ret_addr(chain)
            if real is None:
                continue
            if self._read_u64(slot) == tramp:
                self.engine.write_data(slot, struct.pack("<Q", real))
        for chain in list(self.live.values()):
            for inst in list(chain):
                self._unlink(inst, None)
        self.live.clear()
        self.chains.clear()
