"""jprobes: guest code run at a function's entry with the function's arguments.

Linux 2.6 (``setjmp_pre_handler``, ``jprobe_return``,
``longjmp_break_handler``): at the probe hit the registers and
``MIN_STACK_SIZE`` bytes of stack are saved, rip goes to the jprobe's entry
(a function with the probed function's signature), interrupts stay off, and
the entry ends in ``jprobe_return``, after which registers and stack are
restored and the probed instruction is stepped as for any kprobe.

Here the saving happens on the host, the entry is guest code that qprobes
assembles (with pwntools) into its own area, and ``jprobe_return`` is a
stub that rings the doorbell. A jprobe can also have a host ``handler``
that receives the arguments (System V AMD64: rdi, rsi, rdx, rcx, r8, r9,
then the stack).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qprobes.errors import ProbeError
from qprobes.probes.context import HitContext
from qprobes.probes.kprobe import Kprobe
from qprobes.probes.stubs import PT_REGS_NAMES

if TYPE_CHECKING:
    from qprobes.probes.engine import KprobeEngine

MAX_STACK_SIZE = 64  # 2.6: #define MAX_STACK_SIZE 64
THREAD_SIZE = 16384  # x86_64 kernel stacks (with KASAN off)
IF = 0x200

JprobeHandler = Callable[["Jprobe", HitContext], None]


def min_stack_size(rsp: int) -> int:
    """2.6's ``MIN_STACK_SIZE``: at most 64 bytes, never past the stack's top."""
    top = (rsp | (THREAD_SIZE - 1)) + 1
    return min(MAX_STACK_SIZE, top - rsp)


@dataclass(eq=False)
class Jprobe:
    """A jprobe (``struct jprobe``).

    ``entry`` is guest assembly (Intel syntax) for the handler, which must
    end with ``jmp jprobe_return``; or a guest address of existing code.
    ``handler`` runs on the host with the arguments before the guest entry.
    """

    symbol_name: str | None = None
    addr: int | None = None
    offset: int = 0
    entry: str | int | None = None
    handler: JprobeHandler | None = None
    name: str | None = None
    data: Any = None
    nhit: int = 0
    kp: Kprobe = field(init=False)
    entry_addr: int = field(default=0, init=False)


@dataclass
class JprobeSaved:
    """What the setjmp half saved for one vCPU."""

    jp: Jprobe
    words: list[int]  # the stub frame (action, vector, pt_regs)
    stack_addr: int
    stack: bytes
    cr3: int


class JprobeManager:
    """The jprobes of one engine."""

    def __init__(self, engine: KprobeEngine) -> None:
        self.engine = engine
        self.saved: dict[int, JprobeSaved] = {}  # vCPU (gdbstub thread id) -> saved state
        engine.jprobes = self

    def register(self, jp: Jprobe) -> Jprobe:
        """``register_jprobe``: place the entry code, then the entry kprobe."""
        if jp.offset:
            raise ProbeError("a jprobe must be at a function's entry (offset 0)")
        if isinstance(jp.entry, str):
            jp.entry_addr = self.engine.place_code(jp.entry)
        elif isinstance(jp.entry, int):
            jp.entry_addr = jp.entry
        elif jp.handler is None:
            raise ProbeError("a jprobe needs guest entry code or a host handler")
        jp.kp = Kprobe(addr=jp.addr, symbol_name=jp.symbol_name, name=jp.name,
                       pre_handler=self._make_pre_handler(jp))  # fmt: skip
        self.engine.register_kprobe(jp.kp)
        return jp

    def unregister(self, jp: Jprobe) -> None:
        self.engine.unregister_kprobe(jp.kp)

    def _make_pre_handler(self, jp: Jprobe) -> Callable[[Kprobe, HitContext], bool]:
        def setjmp_pre_handler(kp: Kprobe, ctx: HitContext) -> bool:
            jp.nhit += 1
            if jp.handler is not None:
                ctx.kind = "jprobe"
                jp.handler(jp, ctx)
            if not jp.entry_addr:
                return False
            if ctx.thread in self.saved:
                raise ProbeError(f"vCPU {ctx.vcpu} entered a jprobe inside another")
            regs = ctx.regs
            size = min_stack_size(regs.rsp)
            self.saved[ctx.thread] = JprobeSaved(
                jp, list(regs.words), regs.rsp, ctx.read(regs.rsp, size), ctx.cr3
            )
            regs.eflags = regs.eflags & ~IF
            regs.rip = jp.entry_addr
            return True

        return setjmp_pre_handler

    def longjmp(self, thread: int) -> tuple[JprobeSaved, dict[str, int]]:
        """``longjmp_break_handler`` for the vCPU whose gdbstub thread id is
        ``thread``: restore the stack, return the registers to set."""
        saved = self.saved.pop(thread, None)
        if saved is None:
            raise ProbeError(f"jprobe_return on vCPU {thread - 1} with no jprobe active")
        self.engine.write_data(saved.stack_addr, saved.stack, saved.cr3)
        regs = {name: saved.words[2 + i] for i, name in enumerate(PT_REGS_NAMES)}
        return saved, regs

    def detach(self) -> None:
        self.saved.clear()


def jprobe_source_prelude(jprobe_return: int, here: int) -> str:
    """Defines ``jprobe_return`` for entry code assembled at ``here``."""
    return f".set jprobe_return, qp_code_base + {jprobe_return - here:#x}\n"


def pack_u64(value: int) -> bytes:
    return struct.pack("<Q", value & (2**64 - 1))
