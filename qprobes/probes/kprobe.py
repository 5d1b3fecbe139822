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
    on_ftrace: bool = field(default=False, init=False)

    @property
    def arm_addr(self) -> int | None:
        """Where this probe's int3 is: ``addr``, or just after its ftrace site."""
        if self.addr is None:
            return None
        return self.addr + MCOUNT_INSN_SIZE if self.on_ftrace else self.addr

    def __repr__(self) -> str:
        where = f"{self.addr:#x}" if self.addr is not None else f"{self.symbol_name}+{self.offset}"
        label = f" {self.name}" if self.name else ""
        return f"<Kprobe{label} at {where} nhit={self.nhit} nmissed={self.nmissed}>"


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


@dataclass
class KprobeCtlblk:
    """Per-vCPU state (``struct kprobe_ctlblk``)."""

    status: KprobeStatus = KprobeStatus.NONE
    current: ProbePoint | None = None
    old_rflags: int = 0  # TF|IF of the interrupted code (kprobe_old_rflags)
    saved_rflags: int = 0  # TF|IF to OR back after the step (kprobe_saved_rflags)
    popped_tf: int = 0  # popf/iret: the TF bit the instruction loads
    prev: PrevKprobe | None = None


@dataclass(eq=False)
class ProbePoint:
    """Everything at one address: the aggregate of its kprobes (``aggr_kprobe``)."""

    addr: int
    opcode: int  # the original first byte
    insn: Any  # qprobes.arch.x86_64.insn.Insn
    analysis: Any  # its kprobes analysis
    slot: int  # address of the instruction slot
    boosted: bool  # the slot holds copy + jmp back
    kprobes: list[Kprobe] = field(default_factory=list)
    armed: bool = False
    nhit: int = 0

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
