"""What a handler sees: the vCPU, its registers (read and write) and memory."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from qprobes.probes.stubs import FRAME_WORDS, PT_REGS_NAMES

if TYPE_CHECKING:
    from qprobes.probes.kprobe import Kprobe

_OFFSETS = {name: 2 + i for i, name in enumerate(PT_REGS_NAMES)}
# The two words the stub pushes below pt_regs: the host's answer and the vector.
_FRAME_OFFSETS = {"action": 0, "vector": 1, **_OFFSETS}


class PtRegs:
    """The interrupted registers as the trap stub saved them (Linux ``pt_regs``).

    Reading and writing attributes (``regs.rdi``, ``regs.rip = x``) works on
    the saved frame; changes are written back to the guest before it resumes.
    ``eflags`` and ``flags`` are the same register; ``ip``/``sp`` alias
    ``rip``/``rsp``.
    """

    __slots__ = ("_dirty", "_words")
    _words: list[int]
    _dirty: set[int]

    _ALIASES: ClassVar[dict[str, str]] = {
        "ip": "rip",
        "sp": "rsp",
        "flags": "eflags",
        "rflags": "eflags",
    }

    def __init__(self, words: list[int]) -> None:
        if len(words) != FRAME_WORDS:
            raise ValueError(f"a frame has {FRAME_WORDS} words, got {len(words)}")
        object.__setattr__(self, "_words", words)
        object.__setattr__(self, "_dirty", set())

    def __getattr__(self, name: str) -> int:
        name = PtRegs._ALIASES.get(name, name)
        try:
            return self._words[_FRAME_OFFSETS[name]]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: int) -> None:
        name = PtRegs._ALIASES.get(name, name)
        if name not in _FRAME_OFFSETS or name == "vector":
            raise AttributeError(f"pt_regs has no writable register {name!r}")
        index = _FRAME_OFFSETS[name]
        self._words[index] = value & (2**64 - 1)
        self._dirty.add(index)

    @property
    def words(self) -> list[int]:
        return self._words

    @property
    def dirty(self) -> set[int]:
        return self._dirty

    def args(self) -> tuple[int, int, int, int, int, int]:
        """The first six integer arguments (System V AMD64)."""
        w, o = self._words, _OFFSETS
        return (w[o["rdi"]], w[o["rsi"]], w[o["rdx"]], w[o["rcx"]], w[o["r8"]], w[o["r9"]])

    def as_dict(self) -> dict[str, int]:
        return {name: self._words[i] for name, i in _OFFSETS.items()}

    def __repr__(self) -> str:
        inner = " ".join(f"{k}={v:#x}" for k, v in self.as_dict().items())
        return f"<PtRegs {inner}>"


@dataclass
class HitContext:
    """Passed to every handler with the probe.

    ``vcpu`` is the CPU that hit, 0-based as QEMU and the kernel number them
    (``smp_processor_id()`` on a Linux guest); ``thread`` is the gdbstub's
    thread id of that vCPU (``vcpu + 1``), which the engine uses to address
    its registers.
    """

    thread: int
    regs: PtRegs
    read_virt: Callable[[int, int], bytes]
    cr3: int
    kind: str = "kprobe"  # "kprobe", "kretprobe", "jprobe"
    probe: Kprobe | None = None
    retval: int | None = None  # kretprobes: rax at the return
    ret_addr: int | None = None  # kretprobes: where the function returns to
    entry_data: object = None  # kretprobes: what the entry handler stored
    entry_regs: dict[str, int] | None = None  # kretprobes: registers at the entry
    duration: float | None = None  # kretprobes: host seconds from entry to return
    frame_addr: int = 0  # guest address of the stub's frame
    gs_base: int = 0  # the vCPU's GS base at the hit (Linux: its per-CPU area)
    # Reads through the vCPU's *current* page tables (user memory of the
    # interrupted task), by the gdbstub; ``read`` uses the kernel's.
    read_current: Callable[[int, int], bytes] | None = None
    # The vCPU's time-stamp counter as the trap stub read it (``rdtsc``)
    # just before the doorbell; None when unknown.
    tsc: int | None = None
    # The session's kernel stack unwinder (Linux: ORC), if it has one.
    unwinder: Callable[[HitContext], list[int]] | None = None

    @property
    def vcpu(self) -> int:
        """The CPU that hit, 0-based (the kernel's CPU number)."""
        return self.thread - 1

    def stack(self) -> list[int]:
        """The kernel stack trace at this hit, innermost first: the probed
        address (a return probe's: the address returned to), then each
        caller's return address, across interrupt and exception frames down
        to the syscall entry. Empty when the session cannot unwind."""
        return self.unwinder(self) if self.unwinder is not None else []

    def read(self, addr: int, length: int) -> bytes:
        """Read guest-virtual memory through this vCPU's page tables."""
        return self.read_virt(addr, length)

    def read_user(self, addr: int, length: int) -> bytes:
        """Read user memory of the task that was interrupted."""
        reader = self.read_current or self.read_virt
        return reader(addr, length)

    def _unpack(self, fmt: str, addr: int) -> int:
        size = struct.calcsize(fmt)
        return int(struct.unpack(fmt, self.read(addr, size))[0])

    def read_u8(self, addr: int) -> int:
        return self._unpack("<B", addr)

    def read_u16(self, addr: int) -> int:
        return self._unpack("<H", addr)

    def read_u32(self, addr: int) -> int:
        return self._unpack("<I", addr)

    def read_u64(self, addr: int) -> int:
        return self._unpack("<Q", addr)

    def read_s32(self, addr: int) -> int:
        return self._unpack("<i", addr)

    def read_s64(self, addr: int) -> int:
        return self._unpack("<q", addr)

    def read_struct(self, fmt: str, addr: int) -> tuple[object, ...]:
        """``struct.unpack`` of guest memory at ``addr``."""
        return struct.unpack(fmt, self.read(addr, struct.calcsize(fmt)))

    def read_string(self, addr: int, limit: int = 256) -> str:
        """A NUL-terminated string (read page by page, at most ``limit`` bytes)."""
        out = bytearray()
        while len(out) < limit:
            chunk = min(limit - len(out), 4096 - (addr + len(out)) % 4096, 64)
            data = self.read(addr + len(out), chunk)
            nul = data.find(b"\0")
            if nul >= 0:
                out += data[:nul]
                break
            out += data
        return out.decode(errors="replace")

    def arg(self, n: int) -> int:
        """Integer argument ``n`` (1-based, as kprobe_events' ``$argN``)."""
        if 1 <= n <= 6:
            return self.regs.args()[n - 1]
        # Arguments 7 and up are on the stack above the return address.
        return self.read_u64(self.regs.rsp + 8 * (n - 6))
