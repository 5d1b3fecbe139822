"""Probe objects and per-vCPU control blocks, named as in Linux kprobes."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qprobes.probes.ftrace_site import MCOUNT_INSN_SIZE

if TYPE_CHECKING:
    from qprobes.probes.context import HitContext

PreHandler = Callable[["Kprobe", "HitContext"], "bool | None"]
PostHandler = Callable[["Kprobe", "HitContext", int], None]
FaultHandler = Callable[["Kprobe", "HitContext", int], bool]


@dataclass(eq=False)
class Kprobe:
    """A probe at one instruction (``struct kprobe``).

    Give ``addr``, or ``symbol_name`` and ``offset``. ``pre_handler`` runs
    before the probed instruction; returning true means it set rip itself
    and the instruction is skipped. ``post_handler`` runs after the
    instruction was single-stepped. ``fault_handler`` runs when the
    instruction faults in its slot; returning true means it handled the
    fault. ``boost=False`` forces a TF single-step even where the
    instruction could run boosted (copy + jmp back).

    ``on_ftrace`` (Linux's ``KPROBE_FLAG_FTRACE``) is set at registration
    when ``addr`` is an ftrace site: the int3 then sits at ``arm_addr``, the
    instruction after the site, while the handlers see ``rip == addr`` (see
    :mod:`qprobes.probes.ftrace_site`).
    """

    addr: int | None = None
    symbol_name: str | None = None
    offset: int = 0
    pre_handler: PreHandler | None = None
    post_handler: PostHandler | None = None
    fault_handler: FaultHandler | None = None
    boost: bool = True
    name: str | None = None
    data: Any = None  # free for the user

    nhit: int = 0
    nmissed: int = 0
    disabled: bool = False
    registered: bool = field(default=False, init=False)
    lost: bool = False
    """The guest rewrote the byte qprobes armed (``probe lost``), or the code
    went away (its module unloaded): the probe no longer fires."""
    lost_why: str | None = None  # what happened, for reports
    on_ftrace: bool = field(default=False, init=False)
    detoured: bool = field(default=False, init=False)
    """Its hits go through a jump to a detour buffer, with no exception
    (Linux's ``kprobe_optimized()``); set by the engine."""
    detour_refused: str | None = field(default=None, init=False)
    """Why the engine left this fast-path probe on its int3, if it tried."""

    @property
    def arm_addr(self) -> int | None:
        """Where this probe's int3 is: ``addr``, or just after its ftrace site."""
        if self.addr is None:
            return None
        return self.addr + MCOUNT_INSN_SIZE if self.on_ftrace else self.addr

    def __repr__(self) -> str:
        where = f"{self.addr:#x}" if self.addr is not None else f"{self.symbol_name}+{self.offset}"
        label = f" {self.name}" if self.name else ""
        lost = " lost" if self.lost else ""
        return f"<Kprobe{label} at {where} nhit={self.nhit} nmissed={self.nmissed}{lost}>"


class KprobeStatus(enum.Enum):
    """What a vCPU is doing with a probe (``kcb->kprobe_status``)."""

    NONE = 0
    HIT_ACTIVE = 1  # handlers running
    HIT_SS = 2  # single-stepping the slot
    REENTER = 3  # single-stepping a probe hit while another was active


@dataclass
class PrevKprobe:
    """What a reentrant hit saves (``struct prev_kprobe``)."""

    current: ProbePoint | None
    status: KprobeStatus
    old_rflags: int
    saved_rflags: int
    popped_tf: int = 0


@dataclass
class KprobeCtlblk:
    """Per-vCPU state (``struct kprobe_ctlblk``)."""

    status: KprobeStatus = KprobeStatus.NONE
    current: ProbePoint | None = None
    vcpu: int = 0  # whose (the engine's vCPU id; the journal records the state by it)
    old_rflags: int = 0  # TF|IF of the interrupted code (kprobe_old_rflags)
    saved_rflags: int = 0  # TF|IF to OR back after the step (kprobe_saved_rflags)
    popped_tf: int = 0  # popf/iret: the TF bit the instruction loads
    # Saved states of the steps a reentrant hit interrupted, innermost last.
    # Linux keeps one (``prev_kprobe``) and BUG()s on a second reentry; here
    # a nested reentry is stepped too and each level unwinds in turn.
    prev: list[PrevKprobe] = field(default_factory=list)


@dataclass(eq=False)
class ProbePoint:
    """Everything at one address: the aggregate of its kprobes (``aggr_kprobe``)."""

    addr: int
    opcode: int  # the original first byte
    insn: Any  # qprobes.arch.x86_64.insn.Insn
    analysis: Any  # its kprobes analysis
    slot: int  # address of the instruction slot: the copy that is single-stepped
    boosted: bool  # the slot holds a copy + jmp back too (at boost_slot)
    kprobes: list[Kprobe] = field(default_factory=list)
    armed: bool = False
    nhit: int = 0
    boost_slot: int | None = None  # where the boosted copy starts, if not at slot
    lost: bool = False  # the guest rewrote the int3 (see KprobeEngine.check_lost)

    @property
    def boost_entry(self) -> int:
        """Where a boosted hit enters the slot."""
        return self.slot if self.boost_slot is None else self.boost_slot

    def boost_now(self) -> bool:
        """Whether a hit may run boosted now (Linux never boosts with a
        post_handler, which needs the single-step; a ``boost=False`` kprobe
        on the same address asks for the step too)."""
        if not self.boosted:
            return False
        active = [kp for kp in self.kprobes if not kp.disabled]
        # (A probe on an ftrace site runs its post_handler at the hit.)
        return all(kp.boost and (kp.post_handler is None or kp.on_ftrace) for kp in active)

    @property
    def is_int3(self) -> bool:
        return self.opcode == 0xCC

    @property
    def enabled(self) -> bool:
        return any(not kp.disabled for kp in self.kprobes)

    def has_post_handler(self) -> bool:
        """A probe here wants a post_handler after the instruction (probes on an
        ftrace site run theirs at the hit, after the site's "nop")."""
        return any(kp.post_handler is not None and not kp.disabled and not kp.on_ftrace
                   for kp in self.kprobes)  # fmt: skip
