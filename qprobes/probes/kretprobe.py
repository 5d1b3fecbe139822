"""Return probes (kretprobes) and jprobes on top of the kprobe engine.

kretprobes (Linux ``kernel/kprobes.c``: ``pre_handler_kretprobe``,
``kretprobe_trampoline_handler``): an entry kprobe saves the return address
at the top of the stack in an instance and replaces it with the address of
qprobes' trampoline; the function returns into the trampoline, which rings
the doorbell; the host runs the return handler, writes the real return
address back into the trampoline's frame, and the trampoline returns there.
Instances pair by the stack slot that held the return address (unique per
task and call depth); ``maxactive`` bounds the live instances per probe and
``nmissed`` counts entries that found none free.

jprobes (2.6 ``setjmp_pre_handler``/``longjmp_break_handler``): at the
probed function's entry the registers and ``MIN_STACK_SIZE`` bytes of stack
are saved on the host and the guest jumps to guest code with the same
arguments; that code ends in ``jmp jprobe_return``, where the host restores
the registers and stack and single-steps the probed instruction as usual.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qprobes.errors import ProbeError
from qprobes.probes.context import HitContext, PtRegs
from qprobes.probes.kprobe import Kprobe
from qprobes.probes.stubs import FRAME_WORDS, PT_REGS_NAMES

if TYPE_CHECKING:
    from qprobes.probes.engine import KprobeEngine

RetHandler = Callable[["Kretprobe", HitContext], None]
EntryHandler = Callable[["Kretprobe", HitContext], "bool | None"]

# Trampoline frame at the doorbell (see stubs.py): action, vector, 15 GPRs,
# -1, rflags, return-address slot.
_KRET_FLAGS = 2 + 16
_KRET_RETSLOT = 2 + 17
_KRET_WORDS = 2 + 18
_GPR_INDEXES = range(2, 17)
_IDX = {name: 2 + i for i, name in enumerate(PT_REGS_NAMES)}


@dataclass
class KretprobeInstance:
    """One live call (``struct kretprobe_instance``)."""

    rp: Kretprobe
    ret_addr: int  # the real return address
    stack_slot: int  # where it was on the guest stack
    cr3: int
    vcpu: int
    entry_time: float
    entry_regs: dict[str, int]
    data: object = None  # what the entry handler left in ctx.entry_data


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
    kp: Kprobe = field(init=False)
    instances: list[KretprobeInstance] = field(default_factory=list, init=False)


class KretprobeManager:
    """The kretprobes of one engine and its trampoline."""

    def __init__(self, engine: KprobeEngine) -> None:
        self.engine = engine
        # Kernel stacks have distinct virtual addresses, so the slot alone pairs.
        self.live: dict[int, KretprobeInstance] = {}  # stack slot -> instance
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
            found = self.engine.symbols.resolve(rp.addr)
            if found is None or found[0].kind != "func" or found[1] != 0:
                where = self.engine.symbols.format(rp.addr)
                raise ProbeError(
                    f"a return probe must be at a function's entry: {rp.addr:#x} is {where}"
                )
        self.engine.register_kprobe(rp.kp)
        return rp

    def unregister(self, rp: Kretprobe) -> None:
        """Remove the entry probe; live instances keep their trampoline until they return."""
        self.engine.unregister_kprobe(rp.kp)

    def _make_pre_handler(self, rp: Kretprobe) -> Callable[[Kprobe, HitContext], bool]:
        def pre_handler_kretprobe(kp: Kprobe, ctx: HitContext) -> bool:
            regs = ctx.regs
            if len(rp.instances) >= rp.maxactive:
                rp.nmissed += 1
                return False
            slot = regs.rsp
            ret_addr = struct.unpack("<Q", ctx.read(slot, 8))[0]
            inst = KretprobeInstance(rp, ret_addr, slot, ctx.cr3, ctx.vcpu, time.monotonic(),
                                     regs.as_dict())  # fmt: skip
            if rp.entry_handler is not None:
                ctx.kind = "kretprobe-entry"
                ctx.entry_data = None
                if rp.entry_handler(rp, ctx):
                    return False  # the entry handler declined this call
                inst.data = ctx.entry_data
            self.engine.write_data(slot, struct.pack("<Q", self.trampoline), ctx.cr3)
            rp.instances.append(inst)
            self.live[slot] = inst
            return False

        return pre_handler_kretprobe

    def trampoline_handler(self, ctx: HitContext) -> None:
        """``kretprobe_trampoline_handler``: run the return handler, restore the address."""
        words = ctx.regs.words
        doorbell_rsp = ctx.frame_addr
        slot = doorbell_rsp + 8 * _KRET_RETSLOT
        inst = self.live.pop(slot, None)
        if inst is None:
            raise ProbeError(
                f"kretprobe trampoline hit on vCPU {ctx.vcpu} with no instance for "
                f"stack slot {slot:#x}"
            )
        rp = inst.rp
        rp.instances.remove(inst)
        rp.nhit += 1
        # A pt_regs view as at the return: rip is the real return address, rsp
        # is past it, rflags as the function left them.
        fake = list(words[:FRAME_WORDS])
        fake[_IDX["orig_rax"]] = 2**64 - 1
        fake[_IDX["rip"]] = inst.ret_addr
        fake[_IDX["cs"]] = 0
        fake[_IDX["eflags"]] = words[_KRET_FLAGS]
        fake[_IDX["rsp"]] = slot + 8
        fake[_IDX["ss"]] = 0
        view = PtRegs(fake)
        rctx = HitContext(ctx.vcpu, view, ctx.read_virt, ctx.cr3, kind="kretprobe",
                          probe=rp.kp, retval=words[_IDX["rax"]], ret_addr=inst.ret_addr,
                          entry_data=inst.data, frame_addr=ctx.frame_addr,
                          gs_base=ctx.gs_base, read_current=ctx.read_current)  # fmt: skip
        rctx.entry_regs = inst.entry_regs
        rctx.duration = time.monotonic() - inst.entry_time
        if rp.handler is not None:
            rp.handler(rp, rctx)
        for i in view.dirty & set(_GPR_INDEXES):
            ctx.regs.words[i] = fake[i]
            ctx.regs.dirty.add(i)
        ctx.regs.words[_KRET_RETSLOT] = inst.ret_addr
        ctx.regs.dirty.add(_KRET_RETSLOT)

    def detach(self) -> None:
        """Put back every hijacked return address still on a guest stack."""
        tramp = self.trampoline
        for slot, inst in list(self.live.items()):
            current = struct.unpack("<Q", self.engine.read_data(slot, 8, inst.cr3))[0]
            if current == tramp:
                self.engine.write_data(slot, struct.pack("<Q", inst.ret_addr), inst.cr3)
        self.live.clear()
