"""Recorders: x86-64 code that fetches values at a probe hit, in the guest,
and appends them as one record to a per-CPU ring buffer. Pure code.

A recorder is a function ``recorder(regs)`` (System V: ``rdi`` points at the
saved ``pt_regs``) that the trap stub calls. It takes a small neutral IR
(:class:`Fetch`: a source, a chain of dereferences, a store, an optional
bitfield) that the tracing layer builds from a kprobe_events fetch program,
and is encoded with iced-x86's :class:`BlockEncoder`. It clobbers only
``rax rcx rdx rsi rdi r8-r11`` (every one of them is in the frame the stub
restores) and uses no string instructions (the direction flag is the
interrupted code's).

Loads that can fault are listed in :attr:`Recorder.extable`, pairs of (rip
of the load, rip to resume at), like Linux's exception tables: the fault
stub that sees a #PF or #GP at a listed rip moves the frame's rip to the
fixup and returns; the guest's own fault handler never runs. A faulting
fetch is recorded as a fault (ftrace's ``(fault)``).

A per-CPU nesting guard (a busy word in the ring header, taken with
``xchg``) drops and counts a record whose hit came in while the same CPU was
appending one (an NMI, a probe hit in the recorder's own path). A full ring
drops and counts the record, or, with :attr:`RecorderSpec.lossless`,
returns :data:`SPILL` so that the stub hands the hit to the host (a
doorbell: the host drains the rings and runs the slow path for it).

Ring header, one per CPU (:data:`RING_HEADER_SIZE` bytes, CPU ``i`` at
``headers + 64 * i``; one more header after the last CPU counts the hits
of CPUs that have no ring)::

    0  u64 head     bytes appended (the guest advances it)
    8  u64 tail     bytes consumed (the host advances it)
    16 u64 busy     the nesting guard
    24 u64 nested   records dropped by the nesting guard
    32 u64 full     records dropped: the ring was full (``lossless`` off)
    40 u64 spilled  hits handed to the host: the ring was full (``lossless``)

Ring data: ``size`` bytes per CPU (a power of two), CPU ``i`` at
``data + size * i``. A record never wraps: when one would not fit before the
end, a padding record (id :data:`PAD_ID`) fills the rest and the record
starts at offset 0. Record layout (8-byte aligned)::

    0  u32 size     bytes of this record
    4  u32 id       the probe's id
    8  u64 tsc      rdtsc at the hit (0 on a CPU without a TSC)
    16 u32 cpu
    20 s32 pid      -1 when the task is unknown
    24 char comm[16]
    40 u64 faults   bit k: value k faulted
    48 values       in order: a scalar is one u64; a string is a u64
                    length then its bytes, padded to 8 (a faulted value
                    is one u64 0)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from iced_x86 import (
    BlockEncoder,
    Code,
    Code_,
    Decoder,
    Instruction,
    MemoryOperand,
    Register,
    Register_,
)

from qprobes.errors import ProbeError

__all__ = [
    "MAX_VALUES",
    "PAD_ID",
    "RECORDED",
    "REC_COMM",
    "REC_CPU",
    "REC_FAULTS",
    "REC_ID",
    "REC_PID",
    "REC_SIZE",
    "REC_TSC",
    "REC_VALUES",
    "RING_BUSY",
    "RING_FULL",
    "RING_HEAD",
    "RING_HEADER_SIZE",
    "RING_NESTED",
    "RING_SPILLED",
    "RING_TAIL",
    "SPILL",
    "Const",
    "CpuFeatures",
    "Deref",
    "Fetch",
    "FrameWord",
    "ModBitfield",
    "PerCpuWord",
    "Recorder",
    "RecorderSpec",
    "RingLayout",
    "RingMemory",
    "RingStats",
    "StackWord",
    "StoreMem",
    "StoreString",
    "StoreValue",
    "TaskLayout",
    "assemble_recorder",
    "drain_ring",
    "extable_lookup",
    "record_header",
    "record_size_max",
    "record_tsc",
    "ring_stats",
]

# Ring header fields.
RING_HEAD = 0
RING_TAIL = 8
RING_BUSY = 16
RING_NESTED = 24
RING_FULL = 32
RING_SPILLED = 40
RING_HEADER_SIZE = 64
# What a recorder returns in eax.
RECORDED = 0  # recorded, or dropped and counted
SPILL = 1  # no room: the stub hands this hit to the host (lossless mode)

# Record fields.
REC_SIZE = 0
REC_ID = 4
REC_TSC = 8
REC_CPU = 16
REC_PID = 20
REC_COMM = 24
REC_FAULTS = 40
REC_VALUES = 48
COMM_SIZE = 16
PAD_ID = 0xFFFF_FFFF
MAX_VALUES = 64  # one bit each in the faults word


# --- the IR ------------------------------------------------------------------


@dataclass(frozen=True)
class FrameWord:
    """The pt_regs word at byte ``offset`` of the frame."""

    offset: int


@dataclass(frozen=True)
class Const:
    """A constant."""

    value: int


@dataclass(frozen=True)
class StackWord:
    """The ``n``th word above the interrupted rsp, or 0 where it cannot be
    read (``regs_get_kernel_stack_nth``)."""

    n: int


@dataclass(frozen=True)
class PerCpuWord:
    """The u64 at per-CPU ``offset`` of the hit's CPU (``this_cpu_read``:
    ``gs:[offset]``; a per-CPU variable cannot fault)."""

    offset: int


Source = FrameWord | Const | StackWord | PerCpuWord


@dataclass(frozen=True)
class Deref:
    """The u64 at the value plus ``offset`` (``user``: a user-space address)."""

    offset: int = 0
    user: bool = False


@dataclass(frozen=True)
class StoreValue:
    """The value itself, truncated to ``size`` bytes."""

    size: int = 8


@dataclass(frozen=True)
class StoreMem:
    """``size`` bytes at the value plus ``offset``, zero-extended."""

    offset: int = 0
    size: int = 8
    user: bool = False


@dataclass(frozen=True)
class StoreString:
    """The NUL-terminated string at the value plus ``offset``, at most
    :attr:`RecorderSpec.string_cap` bytes of it."""

    offset: int = 0
    user: bool = False


Store = StoreValue | StoreMem | StoreString


@dataclass(frozen=True)
class ModBitfield:
    """``truncate(v << lshift, basesize) >> rshift`` (Linux's FETCH_OP_MOD_BF)."""

    basesize: int
    lshift: int
    rshift: int


@dataclass(frozen=True)
class Fetch:
    """One value of a record."""

    source: Source
    derefs: tuple[Deref, ...] = ()
    store: Store = field(default_factory=StoreValue)
    bitfield: ModBitfield | None = None

    @property
    def is_string(self) -> bool:
        return isinstance(self.store, StoreString)

    @property
    def user(self) -> bool:
        return any(d.user for d in self.derefs) or getattr(self.store, "user", False)


@dataclass(frozen=True)
class CpuFeatures:
    """What the guest CPU has, as read at attach (CPUID and CR4).

    ``smap``: CR4.SMAP is on, so user loads need ``stac``/``clac``.
    ``tsc``: CPUID.1:EDX.TSC. ``rdpid``: CPUID.7:ECX.RDPID (the CPU number
    from TSC_AUX, which Linux sets to the CPU number).
    """

    smap: bool = False
    tsc: bool = True
    rdpid: bool = False


@dataclass(frozen=True)
class TaskLayout:
    """Where the current task is: its ``task_struct`` pointer at
    ``gs:[current]`` (a per-CPU offset), ``pid`` (s32) and ``comm`` (16
    bytes) at those offsets in it."""

    current: int
    pid: int
    comm: int


@dataclass(frozen=True)
class RingLayout:
    """The per-CPU rings (see the module docstring)."""

    headers: int
    data: int
    size: int
    ncpus: int

    def header(self, cpu: int) -> int:
        return self.headers + RING_HEADER_SIZE * cpu

    def ring(self, cpu: int) -> int:
        return self.data + self.size * cpu


@dataclass(frozen=True)
class RecorderSpec:
    """Everything a recorder is generated from.

    ``cpu_number``: the per-CPU offset of the CPU number (Linux's
    ``cpu_number``) read through GS; without it, ``rdpid`` where the CPU has
    it, else the initial APIC ID from ``cpuid``. ``kernel_floor``: kernel
    loads below it fault without being tried (Linux's
    ``copy_from_kernel_nofault_allowed``: TASK_SIZE_MAX + PAGE_SIZE); 0 for
    none. ``user_limit``: user loads at or above it fault (``access_ok``).
    ``kernel_reads_user``: a kernel load of an address below ``user_limit``
    reads user memory, as Linux's kprobe_events do on x86
    (``CONFIG_ARCH_HAS_NON_OVERLAPPING_ADDRESS_SPACE``: ``probe_mem_read``
    and ``fetch_store_string`` go to their ``_user`` versions there).
    """

    probe_id: int
    fetches: tuple[Fetch, ...]
    sp_offset: int
    ring: RingLayout
    features: CpuFeatures = CpuFeatures()
    task: TaskLayout | None = None
    cpu_number: int | None = None
    string_cap: int = 255
    kernel_floor: int = 0
    user_limit: int = 0x0000_7FFF_FFFF_F000
    kernel_reads_user: bool = False
    lossless: bool = True


@dataclass(frozen=True)
class Recorder:
    """Encoded recorder code at ``address`` and its exception table."""

    address: int
    code: bytes
    extable: tuple[tuple[int, int], ...]
    max_record: int

    @property
    def end(self) -> int:
        return self.address + len(self.code)


def _align8(n: int) -> int:
    return (n + 7) & ~7


def record_size_max(spec: RecorderSpec) -> int:
    """The largest record ``spec`` appends."""
    size = REC_VALUES
    for f in spec.fetches:
        size += 8 + (_align8(spec.string_cap) if f.is_string else 0)
    return size


# --- a small assembler over iced-x86 ------------------------------------------

R = Register
_R64 = {
    "rax": R.RAX, "rcx": R.RCX, "rdx": R.RDX, "rbx": R.RBX, "rsi": R.RSI, "rdi": R.RDI,
    "r8": R.R8, "r9": R.R9, "r10": R.R10, "r11": R.R11,
}  # fmt: skip
_R32 = {
    "rax": R.EAX, "rcx": R.ECX, "rdx": R.EDX, "rbx": R.EBX, "rsi": R.ESI, "rdi": R.EDI,
    "r8": R.R8D, "r9": R.R9D, "r10": R.R10D, "r11": R.R11D,
}  # fmt: skip


def _fits32(v: int) -> bool:
    return -(2**31) <= v < 2**31


def _mem(
    base: str | None, disp: int = 0, index: str | None = None, seg: Register_ = R.NONE
) -> MemoryOperand:
    if not _fits32(disp):
        raise ProbeError(f"recorder displacement {disp:#x} does not fit in 32 bits")
    return MemoryOperand(
        _R64[base] if base else R.NONE,
        _R64[index] if index else R.NONE,
        1,
        disp,
        4 if base is None else (1 if disp else 0),
        False,
        seg,
    )


@dataclass
class _Item:
    insn: Instruction | None = None
    branch: tuple[Code_, str] | None = None  # (Code, label)
    label: str | None = None
    site: str | None = None  # this instruction may fault: resume at label


class _Asm:
    def __init__(self) -> None:
        self.items: list[_Item] = []

    def emit(self, insn: Instruction, fixup: str | None = None) -> None:
        self.items.append(_Item(insn=insn, site=fixup))

    def label(self, name: str) -> None:
        self.items.append(_Item(label=name))

    def jmp(self, code: Code_, label: str) -> None:
        self.items.append(_Item(branch=(code, label)))

    # Instructions, Intel operand order.
    def mov_imm(self, reg: str, value: int) -> None:
        value &= 2**64 - 1
        if value < 2**32:
            self.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, _R32[reg], value))
        else:
            self.emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, _R64[reg], value))

    def load(self, reg: str, mem: MemoryOperand, size: int = 8, fixup: str | None = None) -> None:
        """reg = zero-extended ``size`` bytes at mem."""
        if size == 8:
            insn = Instruction.create_reg_mem(Code.MOV_R64_RM64, _R64[reg], mem)
        elif size == 4:
            insn = Instruction.create_reg_mem(Code.MOV_R32_RM32, _R32[reg], mem)
        elif size == 2:
            insn = Instruction.create_reg_mem(Code.MOVZX_R32_RM16, _R32[reg], mem)
        elif size == 1:
            insn = Instruction.create_reg_mem(Code.MOVZX_R32_RM8, _R32[reg], mem)
        else:
            raise ProbeError(f"recorder load of {size} bytes")
        self.emit(insn, fixup)

    def store(self, mem: MemoryOperand, reg: str, size: int = 8) -> None:
        if size == 8:
            insn = Instruction.create_mem_reg(Code.MOV_RM64_R64, mem, _R64[reg])
        elif size == 4:
            insn = Instruction.create_mem_reg(Code.MOV_RM32_R32, mem, _R32[reg])
        else:
            raise ProbeError(f"recorder store of {size} bytes")
        self.emit(insn)

    def store_imm(self, mem: MemoryOperand, value: int, size: int = 8) -> None:
        code = Code.MOV_RM64_IMM32 if size == 8 else Code.MOV_RM32_IMM32
        self.emit(Instruction.create_mem_i32(code, mem, value))

    def rr(self, code: Code_, dst: str, src: str) -> None:
        self.emit(Instruction.create_reg_reg(code, _R64[dst], _R64[src]))

    def ri(self, code: Code_, dst: str, value: int) -> None:
        self.emit(Instruction.create_reg_i32(code, _R64[dst], value))

    def rm(self, code: Code_, dst: str, mem: MemoryOperand) -> None:
        self.emit(Instruction.create_reg_mem(code, _R64[dst], mem))

    def lea(self, dst: str, mem: MemoryOperand) -> None:
        self.emit(Instruction.create_reg_mem(Code.LEA_R64_M, _R64[dst], mem))

    def bare(self, code: Code_) -> None:
        self.emit(Instruction.create(code))

    def encode(self, address: int) -> tuple[bytes, list[int], dict[str, int]]:
        """The code, the address of every instruction item, and each label's address."""
        # Give each instruction a unique placeholder ip, so branches can name
        # their targets before the real addresses are known; the
        # BlockEncoder rewrites branches to the final layout.
        step = 16
        placeholder = 0x1000_0000
        ips: list[int | None] = []
        pending: list[str] = []
        labels: dict[str, int] = {}
        n = 0
        for item in self.items:
            if item.label is not None:
                pending.append(item.label)
                ips.append(None)
                continue
            ip = placeholder + step * n
            n += 1
            for name in pending:
                labels[name] = ip
            pending.clear()
            ips.append(ip)
        end_ip = placeholder + step * n
        if pending:  # labels at the very end: a trailing int3 to name them
            self.items.append(_Item(insn=Instruction.create(Code.INT3)))
            ips.append(end_ip)
            for name in pending:
                labels[name] = end_ip
            n += 1
        insns: list[Instruction] = []
        for item, maybe_ip in zip(self.items, ips, strict=True):
            if maybe_ip is None:
                continue
            ip = maybe_ip
            if item.branch is not None:
                code, target = item.branch
                insn = Instruction.create_branch(code, labels[target])
            else:
                assert item.insn is not None
                insn = item.insn
            insn.ip = ip
            insns.append(insn)
        enc = BlockEncoder(64)
        enc.add_many(insns)
        try:
            data = bytes(enc.encode(address))
        except ValueError as exc:
            raise ProbeError(f"cannot encode the recorder at {address:#x}: {exc}") from exc
        real = [insn.ip for insn in Decoder(64, data, ip=address)]
        if len(real) != n:
            raise ProbeError(f"recorder encoding: {len(real)} instructions, wanted {n}")
        by_placeholder = {placeholder + step * i: real[i] for i in range(n)}
        addrs = [by_placeholder[ip] for ip in ips if ip is not None]
        return data, addrs, {name: by_placeholder[ip] for name, ip in labels.items()}


# --- the recorder ---------------------------------------------------------------


class _Gen:
    """Registers: rdi = pt_regs, r8 = ring header, r9 = record, r10 = write
    cursor, r11 = padding bytes before the record; rax rcx rdx rsi scratch."""

    def __init__(self, spec: RecorderSpec) -> None:
        self.spec = spec
        self.a = _Asm()
        self.labels = 0
        size = spec.ring.size
        if size < 64 or size & (size - 1) or size >= 2**31:
            raise ProbeError(f"ring size {size:#x} is not a power of two in [64, 2 GiB)")
        if len(spec.fetches) > MAX_VALUES:
            raise ProbeError(f"a recorder holds at most {MAX_VALUES} values, "
                             f"not {len(spec.fetches)}")  # fmt: skip
        if not 0 < spec.string_cap < 2**16:
            raise ProbeError(f"string cap {spec.string_cap} out of range")
        self.max = record_size_max(spec)
        if self.max > size:
            raise ProbeError(f"a record of up to {self.max} bytes does not fit a ring "
                             f"of {size} bytes")  # fmt: skip
        if not 0 <= spec.probe_id < PAD_ID:
            raise ProbeError(f"probe id {spec.probe_id} out of range")

    def gen(self) -> _Asm:
        a, s = self.a, self.spec
        ring = s.ring
        self.cpu_number()
        a.ri(Code.CMP_RM64_IMM32, "rax", ring.ncpus)
        a.jmp(Code.JAE_REL32_64, "nocpu")
        a.rr(Code.MOV_R64_RM64, "rdx", "rax")
        # r8 = header, r9 = ring data of this CPU.
        a.rr(Code.MOV_R64_RM64, "r8", "rax")
        a.emit(Instruction.create_reg_i32(Code.SHL_RM64_IMM8, R.R8, 6))
        a.mov_imm("rcx", ring.headers)
        a.rr(Code.ADD_R64_RM64, "r8", "rcx")
        a.rr(Code.MOV_R64_RM64, "r9", "rax")
        a.emit(Instruction.create_reg_i32(Code.SHL_RM64_IMM8, R.R9, ring.size.bit_length() - 1))
        a.mov_imm("rcx", ring.data)
        a.rr(Code.ADD_R64_RM64, "r9", "rcx")
        # The nesting guard: xchg with memory is atomic, and a hit nested on
        # this CPU runs to its end before this one goes on.
        a.mov_imm("rcx", 1)
        a.emit(Instruction.create_mem_reg(Code.XCHG_RM64_R64, _mem("r8", RING_BUSY), R.RCX))
        a.rr(Code.TEST_RM64_R64, "rcx", "rcx")
        a.jmp(Code.JNE_REL32_64, "nested")
        # Room: used = head - tail; pos = head % size; a record that would
        # pass the end is preceded by padding up to it.
        a.rm(Code.MOV_R64_RM64, "rax", _mem("r8", RING_HEAD))
        a.rr(Code.MOV_R64_RM64, "rcx", "rax")
        a.rm(Code.SUB_R64_RM64, "rcx", _mem("r8", RING_TAIL))
        a.rr(Code.MOV_R64_RM64, "rsi", "rax")
        a.ri(Code.AND_RM64_IMM32, "rsi", ring.size - 1)
        a.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.R11D, R.R11D))
        a.lea("r10", _mem("rsi", self.max))
        a.ri(Code.CMP_RM64_IMM32, "r10", ring.size)
        a.jmp(Code.JBE_REL32_64, "nopad")
        a.mov_imm("r11", ring.size)
        a.rr(Code.SUB_R64_RM64, "r11", "rsi")
        a.label("nopad")
        a.lea("r10", _mem("rcx", self.max, "r11"))
        a.ri(Code.CMP_RM64_IMM32, "r10", ring.size)
        a.jmp(Code.JA_REL32_64, "full")
        a.rr(Code.TEST_RM64_R64, "r11", "r11")
        a.jmp(Code.JE_REL32_64, "padded")
        pad = _mem("r9", 0, "rsi")
        a.emit(Instruction.create_mem_reg(Code.MOV_RM32_R32, pad, R.R11D))
        a.emit(Instruction.create_mem_u32(Code.MOV_RM32_IMM32,
                                          _mem("r9", REC_ID, "rsi"), PAD_ID))  # fmt: skip
        a.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.ESI, R.ESI))
        a.label("padded")
        a.rr(Code.ADD_R64_RM64, "r9", "rsi")
        # The record's header.
        a.store(_mem("r9", REC_CPU), "rdx", 4)
        a.store_imm(_mem("r9", REC_ID), s.probe_id, 4)
        if s.features.tsc:
            a.bare(Code.RDTSC)
            a.emit(Instruction.create_reg_i32(Code.SHL_RM64_IMM8, R.RDX, 32))
            a.rr(Code.OR_R64_RM64, "rax", "rdx")
            a.store(_mem("r9", REC_TSC), "rax")
        else:
            a.store_imm(_mem("r9", REC_TSC), 0)
        self.task()
        a.store_imm(_mem("r9", REC_FAULTS), 0)
        a.lea("r10", _mem("r9", REC_VALUES))
        for k, fetch in enumerate(s.fetches):
            self.fetch(k, fetch)
        # Commit: the size, then head (x86 stores are seen in order).
        a.rr(Code.MOV_R64_RM64, "rax", "r10")
        a.rr(Code.SUB_R64_RM64, "rax", "r9")
        a.store(_mem("r9", REC_SIZE), "rax", 4)
        a.rr(Code.ADD_R64_RM64, "rax", "r11")
        a.emit(Instruction.create_mem_reg(Code.ADD_RM64_R64, _mem("r8", RING_HEAD), R.RAX))
        a.store_imm(_mem("r8", RING_BUSY), 0)
        self.ret(RECORDED)
        # A full ring (or a CPU with none): counted, and dropped or spilled.
        missed = RING_SPILLED if s.lossless else RING_FULL
        answer = SPILL if s.lossless else RECORDED
        a.label("full")
        a.emit(Instruction.create_mem(Code.INC_RM64, _mem("r8", missed)))
        a.store_imm(_mem("r8", RING_BUSY), 0)
        self.ret(answer)
        a.label("nested")
        # Dropped: the host cannot take a hit nested in an append (an NMI).
        a.emit(Instruction.create_mem(Code.INC_RM64, _mem("r8", RING_NESTED)))
        self.ret(RECORDED)
        a.label("nocpu")
        a.mov_imm("r8", ring.header(ring.ncpus))
        a.emit(Instruction.create_mem(Code.INC_RM64, _mem("r8", missed)))
        self.ret(answer)
        return a

    def ret(self, value: int) -> None:
        if value:
            self.a.mov_imm("rax", value)
        else:
            self.a.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EAX, R.EAX))
        self.a.bare(Code.RETNQ)

    def cpu_number(self) -> None:
        """eax = this CPU's number (rax zero-extended)."""
        a, s = self.a, self.spec
        if s.cpu_number is not None:
            a.load("rax", _mem(None, s.cpu_number, seg=R.GS), 4)
        elif s.features.rdpid:
            a.emit(Instruction.create_reg(Code.RDPID_R64, R.RAX))
            a.ri(Code.AND_RM64_IMM32, "rax", 0xFFF)  # Linux: TSC_AUX = node << 12 | cpu
        else:
            a.emit(Instruction.create_reg(Code.PUSH_R64, R.RBX))
            a.mov_imm("rax", 1)
            a.bare(Code.CPUID)
            a.emit(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.EBX))
            a.emit(Instruction.create_reg_i32(Code.SHR_RM32_IMM8, R.EAX, 24))
            a.emit(Instruction.create_reg(Code.POP_R64, R.RBX))

    def task(self) -> None:
        """pid and comm of the current task, or -1 and zeros."""
        a, t = self.a, self.spec.task
        if t is not None:
            a.load("rax", _mem(None, t.current, seg=R.GS), fixup="notask")
            a.rr(Code.TEST_RM64_R64, "rax", "rax")
            a.jmp(Code.JE_REL32_64, "notask")
            a.load("rcx", _mem("rax", t.pid), 4, fixup="notask")
            a.store(_mem("r9", REC_PID), "rcx", 4)
            for i in (0, 8):
                a.load("rcx", _mem("rax", t.comm + i), fixup="notask")
                a.store(_mem("r9", REC_COMM + i), "rcx")
            a.jmp(Code.JMP_REL32_64, "taskdone")
        a.label("notask")
        a.store_imm(_mem("r9", REC_PID), -1, 4)
        a.store_imm(_mem("r9", REC_COMM), 0)
        a.store_imm(_mem("r9", REC_COMM + 8), 0)
        a.label("taskdone")

    def add_offset(self, reg: str, offset: int) -> None:
        offset = ((offset + 2**63) % 2**64) - 2**63
        if not offset:
            return
        if _fits32(offset):
            self.a.lea(reg, _mem(reg, offset))
        else:
            self.a.mov_imm("rcx", offset)
            self.a.rr(Code.ADD_R64_RM64, reg, "rcx")

    def check(self, user: bool, fault: str) -> None:
        """Jump to ``fault`` unless rax may be read: a user address below
        ``user_limit`` (access_ok), a kernel address at or above ``kernel_floor``."""
        a, s = self.a, self.spec
        if user:
            a.mov_imm("rcx", s.user_limit)
            a.rr(Code.CMP_R64_RM64, "rax", "rcx")
            a.jmp(Code.JAE_REL32_64, fault)
        elif s.kernel_floor:
            a.mov_imm("rcx", s.kernel_floor)
            a.rr(Code.CMP_R64_RM64, "rax", "rcx")
            a.jmp(Code.JB_REL32_64, fault)

    def user_access(self, user: bool, on: bool) -> None:
        if user and self.spec.features.smap:
            self.a.bare(Code.STAC if on else Code.CLAC)

    def may_be_user(self, user: bool) -> bool:
        return user or self.spec.kernel_reads_user

    def open_access(self, user: bool, fault: str) -> None:
        """Check rax before a load (jump to ``fault`` where it may not be
        read) and open user access where it is a user address on a CPU
        with SMAP."""
        a, s = self.a, self.spec
        if user or not s.kernel_reads_user:
            self.check(user, fault)
            self.user_access(user, True)
            return
        smap = s.features.smap
        if not (smap or s.kernel_floor):
            return
        self.labels += 1
        kernel, ok = f"kernel{self.labels}", f"open{self.labels}"
        a.mov_imm("rcx", s.user_limit)
        a.rr(Code.CMP_R64_RM64, "rax", "rcx")
        a.jmp(Code.JAE_REL32_64, kernel)
        self.user_access(True, True)
        a.jmp(Code.JMP_REL32_64, ok)
        a.label(kernel)
        self.check(False, fault)
        a.label(ok)

    def close_access(self, user: bool) -> None:
        """clac after a load that may have opened user access (harmless when
        it did not)."""
        self.user_access(self.may_be_user(user), False)

    def fetch(self, k: int, f: Fetch) -> None:
        a, s = self.a, self.spec
        fault, done = f"fault{k}", f"done{k}"
        match f.source:
            case FrameWord(offset):
                a.load("rax", _mem("rdi", offset))
            case Const(value):
                a.mov_imm("rax", value)
            case PerCpuWord(offset):
                a.load("rax", _mem(None, offset, seg=R.GS))
            case StackWord(n):
                zero, loaded = f"stackzero{k}", f"stackok{k}"
                a.load("rax", _mem("rdi", s.sp_offset))
                self.add_offset("rax", 8 * n)
                self.check(False, zero)
                a.load("rax", _mem("rax"), fixup=zero)
                a.jmp(Code.JMP_REL32_64, loaded)
                a.label(zero)
                a.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EAX, R.EAX))
                a.label(loaded)
        for d in f.derefs:
            self.add_offset("rax", d.offset)
            self.open_access(d.user, fault)
            a.load("rax", _mem("rax"), fixup=fault)
            self.close_access(d.user)
        st = f.store
        if isinstance(st, StoreString):
            self.string(k, st, fault, done)
        else:
            if isinstance(st, StoreValue):
                if st.size == 4:
                    a.emit(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.EAX))
                elif st.size == 2:
                    a.emit(Instruction.create_reg_reg(Code.MOVZX_R32_RM16, R.EAX, R.AX))
                elif st.size == 1:
                    a.emit(Instruction.create_reg_reg(Code.MOVZX_R32_RM8, R.EAX, R.AL))
            else:
                self.add_offset("rax", st.offset)
                self.open_access(st.user, fault)
                a.load("rax", _mem("rax"), st.size, fixup=fault)
                self.close_access(st.user)
            if f.bitfield is not None:
                bf = f.bitfield
                spare = 64 - 8 * bf.basesize
                if bf.lshift + spare:
                    a.emit(Instruction.create_reg_i32(Code.SHL_RM64_IMM8, R.RAX,
                                                      bf.lshift + spare))  # fmt: skip
                if bf.rshift + spare:
                    a.emit(Instruction.create_reg_i32(Code.SHR_RM64_IMM8, R.RAX,
                                                      bf.rshift + spare))  # fmt: skip
            a.store(_mem("r10"), "rax")
            a.ri(Code.ADD_RM64_IMM8, "r10", 8)
            if not f.derefs and isinstance(st, StoreValue):
                return  # nothing here can fault
            a.jmp(Code.JMP_REL32_64, done)
        a.label(fault)
        # A fault between stac and clac comes back here with AC still set.
        self.close_access(f.user)
        a.emit(Instruction.create_mem_i32(Code.BTS_RM64_IMM8, _mem("r9", REC_FAULTS), k))
        a.store_imm(_mem("r10"), 0)
        a.ri(Code.ADD_RM64_IMM8, "r10", 8)
        a.label(done)

    def string(self, k: int, st: StoreString, fault: str, done: str) -> None:
        """Copy bytes up to the NUL or the cap; a fault before the end loses
        the whole string (``strncpy_from_kernel_nofault``)."""
        a, s = self.a, self.spec
        loop, end = f"strloop{k}", f"strend{k}"
        self.add_offset("rax", st.offset)
        self.open_access(st.user, fault)
        a.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.ECX, R.ECX))
        a.label(loop)
        a.ri(Code.CMP_RM64_IMM32, "rcx", s.string_cap)
        a.jmp(Code.JAE_REL32_64, end)
        a.emit(Instruction.create_reg_mem(Code.MOVZX_R32_RM8, R.ESI,
                                          _mem("rax", 0, "rcx")), fault)  # fmt: skip
        a.emit(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.ESI, R.ESI))
        a.jmp(Code.JE_REL32_64, end)
        a.emit(Instruction.create_mem_reg(Code.MOV_RM8_R8, _mem("r10", 8, "rcx"),
                                          R.SIL))  # fmt: skip
        a.emit(Instruction.create_reg(Code.INC_RM64, R.RCX))
        a.jmp(Code.JMP_REL32_64, loop)
        a.label(end)
        self.close_access(st.user)
        a.store(_mem("r10"), "rcx")
        a.ri(Code.ADD_RM64_IMM8, "rcx", 15)
        a.ri(Code.AND_RM64_IMM8, "rcx", -8)
        a.rr(Code.ADD_R64_RM64, "r10", "rcx")
        a.jmp(Code.JMP_REL32_64, done)


def assemble_recorder(spec: RecorderSpec, address: int) -> Recorder:
    """Generate and encode the recorder of ``spec`` at ``address``."""
    gen = _Gen(spec)
    asm = gen.gen()
    data, addrs, labels = asm.encode(address)
    insn_items = [item for item in asm.items if item.label is None]
    extable = tuple(
        (addr, labels[item.site])
        for item, addr in zip(insn_items, addrs, strict=True)
        if item.site is not None
    )
    return Recorder(address, data, extable, gen.max)


def assemble_chain(recorders: Sequence[int], address: int, progress_at: int,
                   tag: int) -> Recorder:  # fmt: skip
    """A recorder at ``address`` that calls the recorders at ``recorders``
    in turn with the same ``pt_regs`` (the probes of an aggregate point, in
    their order), each as the #BP stub or a detour calls one: ``rdi`` =
    ``pt_regs``, ``eax`` = 0 when it recorded. The first that hands its hit
    to the host (nonzero) ends the chain with its answer, after writing
    ``tag << 32 | n`` (n: how many recorded before it) into the frame's
    word at ``progress_at`` (``orig_ax``, -1 otherwise): the host, which
    knows the kprobes of chain ``tag``, runs the handlers of the others
    only. No load of guest data: no exception-table entries.

    ::

        push rdi; push 0
        (mov rdi, [rsp + 8]; call REC; test eax, eax; jnz spill;
         inc qword ptr [rsp]) for each
        add rsp, 16; xor eax, eax; ret
      spill:
        mov rdi, [rsp + 8]; mov rcx, [rsp]; mov rdx, tag << 32; or rcx, rdx
        mov [rdi + progress_at], rcx
        add rsp, 16; ret
    """
    if len(recorders) < 2:
        raise ProbeError("a chain calls two recorders or more")
    if not 0 < tag < 2**32 - 1:
        raise ProbeError(f"chain tag {tag} out of range")
    if not 0 <= progress_at < 2**31:
        raise ProbeError(f"frame offset {progress_at} out of range")
    step = 5 + 5 + 2 + 6 + 4
    spill = address + 3 + step * len(recorders) + 4 + 2 + 1
    code = bytearray(b"\x57\x6a\x00")  # push rdi; push 0
    for rec in recorders:
        at = address + len(code)
        call = rec - (at + 10)
        jnz = spill - (at + 18)
        if not (_fits32(call) and _fits32(jnz)):
            raise ProbeError(f"recorder {rec:#x} is out of reach of a chain at {address:#x}")
        code += b"\x48\x8b\x7c\x24\x08"  # mov rdi, [rsp + 8]
        code += b"\xe8" + struct.pack("<i", call)  # call rec
        code += b"\x85\xc0"  # test eax, eax
        code += b"\x0f\x85" + struct.pack("<i", jnz)  # jnz spill
        code += b"\x48\xff\x04\x24"  # inc qword ptr [rsp]
    code += b"\x48\x83\xc4\x10\x31\xc0\xc3"  # add rsp, 16; xor eax, eax; ret
    assert address + len(code) == spill
    code += b"\x48\x8b\x7c\x24\x08"  # mov rdi, [rsp + 8]
    code += b"\x48\x8b\x0c\x24"  # mov rcx, [rsp]
    code += b"\x48\xba" + struct.pack("<Q", tag << 32)  # mov rdx, tag << 32
    code += b"\x48\x09\xd1"  # or rcx, rdx
    code += b"\x48\x89\x8f" + struct.pack("<i", progress_at)  # mov [rdi + progress_at], rcx
    code += b"\x48\x83\xc4\x10\xc3"  # add rsp, 16; ret
    return Recorder(address, bytes(code), (), 0)


def extable_lookup(tables: Sequence[tuple[int, int]], rip: int) -> int | None:
    """The fixup rip of the load at ``rip``, if it is one (what the fault stub does)."""
    for load, fixup in tables:
        if load == rip:
            return fixup
    return None


# --- the host's side of a ring ------------------------------------------------


def record_header(data: bytes) -> tuple[int, int]:
    """(size, probe id) of the record at the start of ``data``."""
    size, probe_id = struct.unpack_from("<II", data, 0)
    return int(size), int(probe_id)


def record_tsc(data: bytes) -> int:
    """The TSC of the record at the start of ``data``."""
    (tsc,) = struct.unpack_from("<Q", data, REC_TSC)
    return int(tsc)


class RingMemory(Protocol):
    """Reads and writes guest memory at virtual addresses (the rings' mapping)."""

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class RingStats:
    """A ring's counters: records dropped by the nesting guard, for a full ring."""

    nested: int
    full: int
    spilled: int = 0


def ring_stats(mem: RingMemory, layout: RingLayout, cpu: int) -> RingStats:
    hdr = mem.read(layout.header(cpu), RING_SPILLED + 8)
    nested, full, spilled = struct.unpack_from("<3Q", hdr, RING_NESTED)
    return RingStats(int(nested), int(full), int(spilled))


def drain_ring(mem: RingMemory, layout: RingLayout, cpu: int) -> list[bytes]:
    """Take every record CPU ``cpu`` has committed, in order, and give their
    space back (the tail moves to the head read). Padding is skipped."""
    hdr = mem.read(layout.header(cpu), 16)
    head, tail = struct.unpack_from("<QQ", hdr, RING_HEAD)
    if head == tail:
        return []
    if head < tail or head - tail > layout.size:
        raise ProbeError(f"CPU {cpu}'s ring is corrupt: head {head:#x}, tail {tail:#x}")
    base = layout.ring(cpu)
    mask = layout.size - 1
    start, used = tail & mask, head - tail
    first = min(used, layout.size - start)
    data = mem.read(base + start, first)
    if used > first:
        data += mem.read(base, used - first)
    out: list[bytes] = []
    pos = 0
    while pos < used:
        size, probe_id = record_header(data[pos : pos + 8])
        if size < 8 or size % 8 or pos + size > used:
            raise ProbeError(f"CPU {cpu}'s ring is corrupt: a record of {size} bytes "
                             f"at {tail + pos:#x}")  # fmt: skip
        if probe_id != PAD_ID:
            out.append(data[pos : pos + size])
        pos += size
    mem.write(layout.header(cpu) + RING_TAIL, struct.pack("<Q", head))
    return out
