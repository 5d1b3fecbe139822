"""Guest recorders run outside a guest: unicorn executes the generated code on
a paged x86-64 machine (real 4-level page tables, so an unmapped page raises
#PF and a non-canonical pointer #GP), with a fake pt_regs, kernel and user
memory, a current task and per-CPU rings. Each record is decoded and compared
with what the slow path's ``evaluate()`` gives over the same memory.

The fault stub is played by the harness: an exception at a rip the
recorder's exception table lists resumes at its fixup; any other exception
fails the test.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

unicorn = pytest.importorskip("unicorn")
from iced_x86 import Decoder, Mnemonic, OpKind, Register  # noqa: E402
from unicorn import x86_const as X  # noqa: E402

from qprobes.arch.x86_64.recorder_asm import (  # noqa: E402
    RECORDED,
    RING_BUSY,
    RING_FULL,
    RING_HEAD,
    RING_NESTED,
    SPILL,
    CpuFeatures,
    Recorder,
    RecorderSpec,
    RingLayout,
    TaskLayout,
    assemble_recorder,
    extable_lookup,
)
from qprobes.errors import ProbeError, TranslationError  # noqa: E402
from qprobes.probes.stubs import PT_REGS_NAMES  # noqa: E402
from qprobes.symbols.elf import Symbol, SymbolTable  # noqa: E402
from qprobes.tracing import FAULT, compile_fetchargs, evaluate, parse_probe  # noqa: E402
from qprobes.tracing.ast import ProbeSpec  # noqa: E402
from qprobes.tracing.recorder import (  # noqa: E402
    NotFastError,
    RawRecord,
    RecorderPlan,
    decode_record,
    drain_ring,
    plan_recorder,
    ring_stats,
)
from tests.unit.test_probe_language import FakeResolver  # noqa: E402

PAGE = 4096
PHYS_SIZE = 32 << 20
PTE_P, PTE_W, PTE_U = 1, 2, 4
CR4_PAE, CR4_SMAP = 1 << 5, 1 << 21

# The guest's virtual layout.
CODE = 0xFFFF_FFFF_C000_0000
SENTINEL = CODE + 0xF000  # the recorder's return address: emulation stops here
HEADERS = 0xFFFF_FFFF_C010_0000
DATA = 0xFFFF_FFFF_C020_0000
RING_SIZE = 0x10000
NCPUS = 4
CALL_STACK = 0xFFFF_C900_0000_4000  # where the stub runs (the recorder's stack)
FRAME = 0xFFFF_C900_0000_6000  # pt_regs as the #BP stub saved them
KSTACK = 0xFFFF_C900_0000_8F00  # the interrupted rsp
PERCPU = 0xFFFF_8880_0001_0000  # GS base
CURRENT_TASK, CPU_NUMBER = 0x100, 0x108  # per-CPU offsets
TASK = 0xFFFF_8880_0002_0000
TASK_PID, TASK_COMM = 0x500, 0x700
KDATA = 0xFFFF_8880_0100_0000
DENTRY = KDATA + 0x800
KSTR = KDATA + 0xC00
KDATA2 = KDATA + PAGE  # a long string, and one running into the unmapped page
UNMAPPED = KDATA + 2 * PAGE
USER = 0x40_0000
NONCANONICAL = 0xDEAD_0000_0000_0000
KERNEL_FLOOR = 0x0000_8000_0000_0000  # TASK_SIZE_MAX + PAGE_SIZE
USER_LIMIT = 0x0000_7FFF_FFFF_F000
PROBE_IP = 0xFFFF_FFFF_8100_0000
LONG = "a" * 300

SYMBOLS = SymbolTable(
    [
        Symbol("vfs_read", PROBE_IP, 0x100, "func"),
        Symbol("jiffies", KDATA + 0x100, 8, "object"),
        Symbol("init_task", TASK, 0x1000, "object"),
    ]
)
RING = RingLayout(HEADERS, DATA, RING_SIZE, NCPUS)
QEMU64 = CpuFeatures()  # no SMAP, no RDPID, a TSC
TASK_LAYOUT = TaskLayout(CURRENT_TASK, TASK_PID, TASK_COMM)


def q(v: int) -> bytes:
    return (v % 2**64).to_bytes(8, "little")


REGS = dict.fromkeys(PT_REGS_NAMES, 0) | {
    "rax": 0xFFFFFFFF,
    "rdi": KDATA,
    "rsi": KSTR,
    "rdx": 42,
    "rcx": USER,
    "r8": 0,
    "r9": NONCANONICAL,
    "r10": UNMAPPED,
    "r11": KDATA2,
    "rbx": KDATA2 + PAGE - 3,
    "rbp": 0xFFFF_FFFF_8100_0010,
    "r12": -5 % 2**64,
    "r13": USER_LIMIT + 0x800,  # between user space and the kernel's lowest address
    "orig_rax": 2**64 - 1,
    "rip": PROBE_IP + 1,  # after the int3
    "cs": 0x10,
    "eflags": 0x246,
    "rsp": KSTACK,
    "ss": 0x18,
}


class Guest:
    """A paged x86-64 machine: 4 KiB pages at chosen virtual addresses."""

    def __init__(self, model: int | None = None, smap: bool = False) -> None:
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        if model is not None:
            uc.ctl_set_cpu_model(model)
        uc.mem_map(0, PHYS_SIZE)
        self.uc = uc
        self._next = 0x10_0000
        self.pml4 = self._alloc()
        self.pages: dict[int, tuple[int, bool]] = {}  # vpage -> (ppage, user)
        self.intr: list[int] = []
        self.intr_hook = uc.hook_add(unicorn.UC_HOOK_INTR, self._on_intr)
        uc.reg_write(X.UC_X86_REG_CR3, self.pml4)
        uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | CR4_PAE
                     | (CR4_SMAP if smap else 0))  # fmt: skip
        uc.reg_write(X.UC_X86_REG_CR0, uc.reg_read(X.UC_X86_REG_CR0) | 0x8000_0001)
        uc.reg_write(X.UC_X86_REG_GS_BASE, PERCPU)
        self.clean = uc.context_save()

    def _alloc(self) -> int:
        page = self._next
        self._next += PAGE
        return page

    _GPRS = ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8", "R9", "R10", "R11",
             "R12", "R13", "R14", "R15", "EFLAGS")  # fmt: skip

    def _forget_exception(self) -> None:
        """The harness, not the CPU, handled the exception: QEMU still
        remembers it (and would make the next #PF a double fault), so go
        back to the CPU state from before any exception, registers kept."""
        ids = [getattr(X, f"UC_X86_REG_{r}") for r in self._GPRS]
        values = [self.uc.reg_read(i) for i in ids]
        self.uc.context_restore(self.clean)
        for i, v in zip(ids, values, strict=True):
            self.uc.reg_write(i, v)

    def _on_intr(self, uc: object, intno: int, _data: object) -> None:
        self.intr.append(intno)
        self.uc.emu_stop()

    def map(self, va: int, size: int = PAGE, user: bool = False) -> None:
        flags = PTE_P | PTE_W | (PTE_U if user else 0)
        for page in range(va & ~(PAGE - 1), va + size, PAGE):
            if page in self.pages:
                continue
            table = self.pml4
            for shift in (39, 30, 21):
                at = table + 8 * ((page >> shift) & 511)
                (entry,) = struct.unpack("<Q", self.uc.mem_read(at, 8))
                if not entry & PTE_P:
                    entry = self._alloc() | PTE_P | PTE_W | PTE_U
                    self.uc.mem_write(at, q(entry))
                table = entry & ~(PAGE - 1)
            phys = self._alloc()
            self.uc.mem_write(table + 8 * ((page >> 12) & 511), q(phys | flags))
            self.pages[page] = (phys, user)

    def _phys(self, va: int) -> int:
        phys, _ = self.pages[va & ~(PAGE - 1)]
        return phys + (va & (PAGE - 1))

    def write(self, va: int, data: bytes) -> None:
        for i in range(0, len(data)):
            self.uc.mem_write(self._phys(va + i), data[i : i + 1])

    def read(self, va: int, length: int) -> bytes:
        return b"".join(bytes(self.uc.mem_read(self._phys(va + i), 1)) for i in range(length))

    def call(self, recorder: Recorder, rdi: int = FRAME, stack: int = CALL_STACK,
             stop_at: int | None = None) -> int | None:  # fmt: skip
        """Run ``recorder(rdi)``, playing the fault stub. With ``stop_at``,
        stop when rip gets there and return it (the call is left mid-way)."""
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_RSP, stack - 8)
        self.write(stack - 8, q(SENTINEL))
        uc.reg_write(X.UC_X86_REG_RDI, rdi)
        return self.resume(recorder, recorder.address, stop_at)

    def resume(self, recorder: Recorder, rip: int, stop_at: int | None = None) -> int | None:
        uc = self.uc
        hook = None
        if stop_at is not None:
            hook = uc.hook_add(unicorn.UC_HOOK_CODE, lambda u, a, s, d: u.emu_stop(),
                               begin=stop_at, end=stop_at)  # fmt: skip
        try:
            for _ in range(100):
                self.intr.clear()
                uc.emu_start(rip, SENTINEL, count=100_000)
                rip = uc.reg_read(X.UC_X86_REG_RIP)
                if rip == SENTINEL:
                    return None
                if self.intr:
                    (vector,) = self.intr
                    fixup = extable_lookup(recorder.extable, rip)
                    if vector not in (13, 14) or fixup is None:
                        raise AssertionError(f"exception {vector} at {rip:#x}, not a listed load")
                    self._forget_exception()
                    rip = fixup
                    continue
                if stop_at is not None and rip == stop_at:
                    return rip
                raise AssertionError(f"recorder stopped at {rip:#x}")
            raise AssertionError("recorder does not end")
        finally:
            if hook is not None:
                uc.hook_del(hook)


@dataclass
class GuestMem:
    """drain_ring's view of the guest (virtual addresses)."""

    guest: Guest

    def read(self, addr: int, length: int) -> bytes:
        return self.guest.read(addr, length)

    def write(self, addr: int, data: bytes) -> None:
        self.guest.write(addr, data)


class Regs:
    def __init__(self, values: dict[str, int]) -> None:
        self.__dict__.update(values)


@dataclass
class Oracle:
    """The slow path's FetchContext over the same pages, with Linux's rules:
    user reads of kernel addresses fault, and so do kernel reads below the
    kernel's lowest address, except (``reads_user``, as on x86) of user
    addresses."""

    guest: Guest
    reads_user: bool = True
    regs: Regs = field(default_factory=lambda: Regs(REGS | {"rip": PROBE_IP}))
    retval: int | None = None
    entry_regs: dict[str, int] | None = None
    cr3: int = 0

    def _read(self, addr: int, length: int, user: bool) -> bytes:
        for at in range(addr, addr + length):
            page = self.guest.pages.get(at & ~(PAGE - 1))
            allowed = (
                at < USER_LIMIT
                if user
                else (at >= KERNEL_FLOOR or (self.reads_user and at < USER_LIMIT))
            )
            if page is None or not allowed:
                raise TranslationError(at, "PTE")
        return self.guest.read(addr, length)

    def read(self, addr: int, length: int) -> bytes:
        return self._read(addr, length, False)

    def read_user(self, addr: int, length: int) -> bytes:
        return self._read(addr, length, True)

    def comm(self) -> str:
        return "bash"


def make_guest(model: int | None = None, smap: bool = False, cpu: int = 2) -> Guest:
    g = Guest(model, smap)
    g.map(CODE, 0x10000)
    g.map(HEADERS)
    g.map(DATA, RING_SIZE * NCPUS)
    g.map(CALL_STACK - 0x2000, 0x2000)
    g.map(FRAME)
    g.map(KSTACK & ~(PAGE - 1))
    g.map(PERCPU)
    g.map(TASK, 0x1000)
    g.map(KDATA, 2 * PAGE)
    g.map(USER, user=True)
    g.write(FRAME, b"".join(q(REGS[n]) for n in PT_REGS_NAMES))
    g.write(PERCPU + CURRENT_TASK, q(TASK))
    g.write(PERCPU + CPU_NUMBER, struct.pack("<I", cpu))
    g.write(TASK + TASK_PID, struct.pack("<i", 1234))
    g.write(TASK + TASK_COMM, b"bash".ljust(16, b"\0"))
    g.write(KSTACK, q(0xAAAA) + q(77) + q(KSTR) + q(-2))
    g.write(KDATA, q(KDATA + 0x100) + struct.pack("<I", 0x12345678) + bytes(4)
            + q(DENTRY) + q(KDATA + 0x208))  # fmt: skip
    g.write(KDATA + 0x40, struct.pack("<II", 0x8002, 0b101000))  # f_flags, f_mode
    g.write(KDATA + 0x100, q(0x1122334455667788) + q(0xF5F6F7F8))
    g.write(KDATA + 0x200, q(0xBBBB))
    g.write(DENTRY + 0x28, q(KSTR))  # d_name.name
    g.write(DENTRY + 0x38, b"passwd\0")  # d_iname
    g.write(KSTR, b"/etc/passwd\0")
    g.write(KDATA2, LONG.encode() + b"\0")
    g.write(KDATA2 + PAGE - 3, b"abc")  # no NUL before the unmapped page
    g.write(USER, b"USER\0" + bytes(3) + q(0xCAFE))
    return g


def spec_for(args: str) -> ProbeSpec:
    spec = parse_probe(f"p:test/ev vfs_read {args}")
    assert isinstance(spec, ProbeSpec)
    return spec


@dataclass
class Run:
    guest: Guest
    plan: RecorderPlan
    recorder: Recorder
    records: list[bytes]


def record(args: str, *, btf: bool = False, cap: int = 4095, guest: Guest | None = None,
           features: CpuFeatures = QEMU64, cpu_number: int | None = CPU_NUMBER,
           kernel_floor: int = KERNEL_FLOOR, cpu: int = 2,
           reads_user: bool = True) -> Run:  # fmt: skip
    compiled = compile_fetchargs(spec_for(args), SYMBOLS, FakeResolver() if btf else None)
    plan = plan_recorder(compiled, PROBE_IP)
    rspec = RecorderSpec(5, plan.fetches, 8 * PT_REGS_NAMES.index("rsp"), RING, features,
                         TASK_LAYOUT, cpu_number, cap, kernel_floor, USER_LIMIT,
                         reads_user)  # fmt: skip
    rec = assemble_recorder(rspec, CODE)
    g = guest or make_guest(cpu=cpu)
    g.write(CODE, rec.code)
    g.call(rec)
    return Run(g, plan, rec, drain_ring(GuestMem(g), RING, cpu))


def both(args: str, btf: bool = False) -> tuple[dict[str, object], dict[str, object]]:
    run = record(args, btf=btf)
    assert len(run.records) == 1
    raw = decode_record(run.records[0], run.plan.strings)
    assert (raw.probe_id, raw.cpu, raw.pid, raw.comm) == (5, 2, 1234, "bash")
    assert raw.tsc != 0
    compiled = compile_fetchargs(spec_for(args), SYMBOLS, FakeResolver() if btf else None)
    return dict(run.plan.values(raw)), dict(evaluate(compiled, Oracle(run.guest)))


DEFINITIONS = [
    # registers, sizes, signs, %ip at the probe, symbols
    "%ax %di %si:u32 %ax:s32 %ax:u16 %rax:s8 %r12:s64 %r12:s16 %ip %ip:symbol %ip:symstr "
    "%bp:symstr %flags %sp %orig_ax %cs %ss",
    # the stack and arguments past the sixth
    "$stack $stack0 $stack1 $stack2:x64 $stack3:s64 $stack40 $arg1 $arg2 $arg3 $arg6 $arg7 "
    "$arg8 $arg9:s32 $arg60",
    # dereference chains, offsets of both signs, memory of every size
    "+0(%di) +8(%di):u32 +0(+0(%di)):x64 -8(+24(%di)) +8(%di):x16 +8(%di):s8 +8(%di):char "
    "+8(+0(%di)):u32 +0(+0(+0(%di))):x8 +0(%sp):x64 +16(%sp):string",
    # strings, kernel and user
    "+0(%si):string +0(%cx):ustring +u0(%cx):string +0(%r11):string +u8(%cx):x64 +u0(%cx):u8",
    # faults: NULL, non-canonical (#GP), an unmapped page (#PF), a string cut by an
    # unmapped page, a kernel read of a user address, a user read of a kernel one
    "+0(%r8) +0(%r9) +0(%r10) +0(%r8):string +0(%r9):string +0(%r10):string +0(+0(%r8)) "
    "+12288(%di):u32 +8192(%di) +0(%bx):string +0(%r13) +0(%r13):string +u0(%di) "
    "+0(%di):ustring +0(+0(%r9)):string +u0(%r13)",
    # kernel-form fetches of user addresses read user memory, as on x86 Linux
    "+0(%cx):string +0(%cx):u32 +8(%cx):x64 +0(+8(%cx)) +u0(%cx):u8",
    # @ADDR and @SYM, symbols as raw addresses
    "@jiffies @jiffies+8:u32 @0xffff888001000008:x32 @jiffies:symbol +16(%di):symbol "
    "@jiffies+8:s8 @0xffff888001002000",
    # what the host supplies
    '$comm name=$comm s=\\"const\\" +0(%si):string',
    # bitfields
    "+64(%di):b4@0/32 +68(%di):b3@3/32 +0(%di):b8@56/64 +8(%di):b12@4/16 +8(%di):b1@31/32",
]


@pytest.mark.parametrize("args", DEFINITIONS)
def test_fast_path_equals_slow_path(args: str) -> None:
    fast, slow = both(args)
    assert fast == slow


BTF_DEFINITIONS = [
    "$arg1->f_path.dentry->d_name.name:string $arg1->f_flags $arg1->f_mode "
    "file->f_path.dentry->d_iname:string count buf:string",
    "$arg*",
    "file->f_path.dentry->d_name.name pos:x64 c=$arg3:s8 p=$arg4",
]


@pytest.mark.parametrize("args", BTF_DEFINITIONS)
def test_btf_member_chains(args: str) -> None:
    fast, slow = both(args, btf=True)
    assert fast == slow


def test_table_covers_faults_and_the_oracle_agrees_on_them() -> None:
    """The fault cases really fault (so the comparison above is not empty)."""
    fast, _ = both(DEFINITIONS[4])
    assert list(fast.values()).count(FAULT) == len(fast)
    fast, _ = both(DEFINITIONS[3])
    assert list(fast.values()) == ["/etc/passwd", "USER", "USER", LONG, 0xCAFE, ord("U")]


def test_non_canonical_pointer_is_a_gp_and_unmapped_a_pf() -> None:
    """Both exception kinds reach the fault stub (the harness sees the vector)."""
    seen: list[int] = []
    guest = make_guest()
    original = guest._on_intr

    def spy(uc: object, intno: int, data: object) -> None:
        seen.append(intno)
        original(uc, intno, data)

    guest._on_intr = spy  # type: ignore[method-assign]
    guest.uc.hook_del(guest.intr_hook)
    guest.intr_hook = guest.uc.hook_add(unicorn.UC_HOOK_INTR, guest._on_intr)
    record("+0(%r9) +0(%r10)", guest=guest)
    assert sorted(set(seen)) == [13, 14]


def test_string_truncated_at_the_cap() -> None:
    run = record("+0(%r11):string +0(%si):string", cap=100)
    raw = decode_record(run.records[0], run.plan.strings)
    assert list(run.plan.values(raw).values()) == [LONG[:100], "/etc/passwd"]
    assert run.recorder.max_record == 48 + 2 * (8 + 104)


def test_cpu_from_cpuid_when_no_cpu_number() -> None:
    run = record("%di", cpu_number=None, cpu=0)  # unicorn's APIC ID is 0
    assert decode_record(run.records[0], run.plan.strings).cpu == 0


def test_no_task_gives_no_pid() -> None:
    guest = make_guest()
    guest.write(PERCPU + CURRENT_TASK, q(0))
    run = record("%di $comm", guest=guest)
    raw = decode_record(run.records[0], run.plan.strings)
    assert (raw.pid, raw.comm) == (None, None)
    assert run.plan.values(raw)["arg2"] == ""


def test_kernel_fetches_of_user_addresses_can_fault_instead() -> None:
    """Without kernel_reads_user, a kernel fetch below the kernel's lowest
    address faults without a load (copy_from_kernel_nofault_allowed)."""
    run = record("+0(%cx) +0(%cx):string +u0(%cx):u8", reads_user=False)
    raw = decode_record(run.records[0], run.plan.strings)
    assert list(run.plan.values(raw).values()) == [FAULT, FAULT, ord("U")]
    compiled = compile_fetchargs(spec_for("+0(%cx) +0(%cx):string +u0(%cx):u8"), SYMBOLS)
    assert dict(run.plan.values(raw)) == dict(evaluate(compiled, Oracle(run.guest, False)))


def test_wild_current_is_caught() -> None:
    guest = make_guest()
    guest.write(PERCPU + CURRENT_TASK, q(UNMAPPED))
    run = record("%di", guest=guest)
    assert decode_record(run.records[0], run.plan.strings).pid is None


PREEMPT_COUNT = 0x110  # per-CPU offset
TASK_TIF, TASK_MIGRATE = 0x8, 0x40  # thread_info.flags, migration_disabled


class _PreemptKernel:
    """The kernel's share of PreemptState.record_fetches: current_task."""

    current_task = CURRENT_TASK


def _context_run(guest: Guest) -> tuple[RecorderPlan, RawRecord]:
    from qprobes.linux.preempt import PreemptState
    from qprobes.tracing.recorder import with_context

    state = PreemptState.__new__(PreemptState)  # the layout without a kernel's symbol table
    state.kernel = _PreemptKernel  # type: ignore[assignment]
    state.preempt_count, state.tif, state.migration_disabled = (
        PREEMPT_COUNT, (TASK_TIF, 8), (TASK_MIGRATE, 2))  # fmt: skip
    compiled = compile_fetchargs(spec_for("%di"), SYMBOLS)
    plan = with_context(plan_recorder(compiled, PROBE_IP),
                        state.record_fetches(8 * PT_REGS_NAMES.index("eflags")))  # fmt: skip
    rspec = RecorderSpec(5, plan.fetches, 8 * PT_REGS_NAMES.index("rsp"), RING, task=TASK_LAYOUT,
                         cpu_number=CPU_NUMBER, kernel_floor=KERNEL_FLOOR)  # fmt: skip
    rec = assemble_recorder(rspec, CODE)
    guest.write(CODE, rec.code)
    guest.call(rec)
    (data,) = drain_ring(GuestMem(guest), RING, 2)
    return plan, decode_record(data, plan.strings)


def test_the_hits_context_is_recorded_for_the_latency_columns() -> None:
    """rflags from the frame, __preempt_count through GS, the current task's
    TIF flags and migration_disabled: what tracing_gen_ctx() takes, so the
    fast path's ftrace columns are the slow path's."""
    from qprobes.linux.preempt import tracing_gen_ctx

    guest = make_guest()
    guest.write(PERCPU + PREEMPT_COUNT, struct.pack("<I", 0x8001_0101))  # softirq, 1 deep
    guest.write(TASK + TASK_TIF, q(1 << 3))  # TIF_NEED_RESCHED
    guest.write(TASK + TASK_MIGRATE, struct.pack("<H", 2))
    plan, raw = _context_run(guest)
    assert plan.values(raw) == {"arg1": KDATA}  # the definition's values only
    assert plan.context(raw) == (0x246, 0x8001_0101, 1 << 3, 2)
    ctx = tracing_gen_ctx(*plan.context(raw))  # type: ignore[misc]
    assert ctx.preempt_count == 0x21  # 1 deep, migrate-disabled 2


def test_a_context_that_cannot_be_read_is_unknown() -> None:
    guest = make_guest()
    guest.write(PERCPU + CURRENT_TASK, q(0))  # no current task: its fields fault
    plan, raw = _context_run(guest)
    assert plan.context(raw) is None and plan.values(raw) == {"arg1": KDATA}


def _counters(guest: Guest, cpu: int = 2) -> tuple[int, int, int, int]:
    hdr = guest.read(RING.header(cpu), 64)
    head, _, busy, nested, full = struct.unpack_from("<5Q", hdr, 0)
    return head, busy, nested, full


def test_nesting_guard_drops_and_counts() -> None:
    guest = make_guest()
    guest.write(RING.header(2) + RING_BUSY, q(1))  # this CPU is mid-append
    run = record("%di", guest=guest)
    assert run.records == []
    assert _counters(guest) == (0, 1, 1, 0)
    assert ring_stats(GuestMem(guest), RING, 2).nested == 1


def test_nested_hit_in_the_middle_of_an_append() -> None:
    """An NMI-like hit while the recorder is writing: the inner call drops
    its record and counts it; the outer record comes out whole."""
    args = "+0(%si):string %di"
    compiled = compile_fetchargs(spec_for(args), SYMBOLS)
    plan = plan_recorder(compiled, PROBE_IP)
    rspec = RecorderSpec(5, plan.fetches, 8 * PT_REGS_NAMES.index("rsp"), RING, task=TASK_LAYOUT,
                         cpu_number=CPU_NUMBER, kernel_floor=KERNEL_FLOOR)  # fmt: skip
    rec = assemble_recorder(rspec, CODE)
    guest = make_guest()
    guest.write(CODE, rec.code)
    # Stop at the string loop's load: the guard is taken, the header half written.
    loads = [addr for addr, _ in rec.extable]
    at = guest.call(rec, stop_at=loads[-1])
    assert at == loads[-1]
    saved = guest.uc.context_save()
    guest.call(rec, stack=CALL_STACK - 0x1000)  # the nested hit
    assert _counters(guest)[1:] == (1, 1, 0)
    guest.uc.context_restore(saved)
    guest.resume(rec, at)
    records = drain_ring(GuestMem(guest), RING, 2)
    assert len(records) == 1
    raw = decode_record(records[0], plan.strings)
    assert dict(plan.values(raw)) == dict(evaluate(compiled, Oracle(guest)))
    assert _counters(guest)[1:] == (0, 1, 0)


def _small_ring(lossless: bool) -> tuple[Guest, Recorder, RingLayout, RecorderPlan]:
    small = RingLayout(HEADERS, DATA, 256, NCPUS)
    compiled = compile_fetchargs(spec_for("%di"), SYMBOLS)
    plan = plan_recorder(compiled, PROBE_IP)
    rspec = RecorderSpec(9, plan.fetches, 8 * PT_REGS_NAMES.index("rsp"), small,
                         cpu_number=CPU_NUMBER, lossless=lossless)  # fmt: skip
    rec = assemble_recorder(rspec, CODE)
    assert rec.max_record == 56
    guest = make_guest()
    guest.write(CODE, rec.code)
    return guest, rec, small, plan


def _returned(guest: Guest) -> int:
    return int(guest.uc.reg_read(X.UC_X86_REG_RAX))


def test_full_ring_spills_to_the_host_in_lossless_mode() -> None:
    """The recorder answers SPILL (the stub then rings the doorbell) and
    counts it; nothing is dropped."""
    guest, rec, small, _ = _small_ring(lossless=True)
    answers = []
    for _ in range(5):
        guest.call(rec)
        answers.append(_returned(guest))
    assert answers == [RECORDED] * 4 + [SPILL]
    assert _counters(guest) == (224, 0, 0, 0)
    stats = ring_stats(GuestMem(guest), small, 2)
    assert (stats.full, stats.spilled) == (0, 1)
    assert len(drain_ring(GuestMem(guest), small, 2)) == 4
    guest.call(rec)
    assert _returned(guest) == RECORDED


def test_full_ring_drops_and_counts_then_wraps_with_padding() -> None:
    guest, rec, small, plan = _small_ring(lossless=False)
    for _ in range(5):
        guest.call(rec)
        assert _returned(guest) == RECORDED
    # Four records fit; the fifth would need 32 bytes of padding plus 56.
    assert _counters(guest) == (224, 0, 0, 1)
    mem = GuestMem(guest)
    assert len(drain_ring(mem, small, 2)) == 4
    guest.call(rec)  # padding to the end, then the record at offset 0
    head = _counters(guest)[0]
    assert head == 224 + 32 + 56
    out = drain_ring(mem, small, 2)
    assert len(out) == 1
    assert decode_record(out[0], plan.strings).values == (KDATA,)
    assert struct.unpack("<Q", guest.read(small.header(2) + 8, 8))[0] == head
    assert struct.unpack("<Q", guest.read(small.header(2) + RING_FULL, 8))[0] == 1


def test_cpu_without_a_ring_is_counted_and_spilled() -> None:
    guest = make_guest(cpu=NCPUS)
    run = record("%di", guest=guest, cpu=0)
    assert run.records == []
    assert _returned(guest) == SPILL
    assert ring_stats(GuestMem(guest), RING, NCPUS).spilled == 1


def _mnemonics(rec: Recorder) -> set[int]:
    return {insn.mnemonic for insn in Decoder(64, rec.code, ip=rec.address)}


def test_code_only_for_what_the_cpu_has() -> None:
    """qemu64 has no SMAP: no stac/clac, and the SMAP variant raises #UD there."""
    plain = record("+0(%cx):ustring +u0(%cx):u32").recorder
    assert not _mnemonics(plain) & {Mnemonic.STAC, Mnemonic.CLAC, Mnemonic.RDTSCP}
    smap = CpuFeatures(smap=True)
    with pytest.raises(unicorn.UcError):
        record("+0(%cx):ustring", features=smap)  # qemu64 model: stac is #UD
    # Kernel-only fetches never open user access.
    kernel_only = record("+0(%si):string", features=smap, reads_user=False, guest=make_guest(
        X.UC_CPU_X86_BROADWELL, smap=True)).recorder  # fmt: skip
    assert not _mnemonics(kernel_only) & {Mnemonic.STAC, Mnemonic.CLAC}
    notsc = record("%di", features=CpuFeatures(tsc=False))
    assert decode_record(notsc.records[0], notsc.plan.strings).tsc == 0
    assert Mnemonic.RDTSC not in _mnemonics(notsc.recorder)


def test_smap_user_access_opened_only_for_user_loads() -> None:
    """With CR4.SMAP on a CPU that has it, user fetches work (stac/clac
    around them); a kernel-form fetch of a user address opens user access
    only where kernel fetches read user memory (x86 Linux), else SMAP
    faults it."""
    args = "+0(%cx):ustring +u8(%cx):x64 +0(%cx):x64 +0(%si):string +u0(%r10):u8 +0(%cx):string"
    smap = CpuFeatures(smap=True)
    for reads_user, expected in ((False, FAULT), (True, 0x52455355)):
        guest = make_guest(X.UC_CPU_X86_BROADWELL, smap=True)
        run = record(args, guest=guest, features=smap, kernel_floor=0, reads_user=reads_user)
        raw = decode_record(run.records[0], run.plan.strings)
        string = "USER" if reads_user else FAULT
        assert list(run.plan.values(raw).values()) == [
            "USER",
            0xCAFE,
            expected,
            "/etc/passwd",
            FAULT,
            string,
        ]
        assert {Mnemonic.STAC, Mnemonic.CLAC} <= _mnemonics(run.recorder)


def test_every_load_through_a_fetched_pointer_is_in_the_extable() -> None:
    run = record(DEFINITIONS[2] + " " + DEFINITIONS[3] + " $stack5")
    listed = {addr for addr, _ in run.recorder.extable}
    trusted = {Register.RDI, Register.R8, Register.R9, Register.R10, Register.RSP}
    for insn in Decoder(64, run.recorder.code, ip=run.recorder.address):
        reads = any(insn.op_kind(i) == OpKind.MEMORY for i in range(insn.op_count))
        if not reads or insn.mnemonic in (Mnemonic.LEA, Mnemonic.NOP):
            continue
        writes_ours = insn.memory_base in trusted and insn.op_kind(0) == OpKind.MEMORY
        if insn.memory_base in trusted or writes_ours:
            continue
        if insn.memory_segment == Register.GS and insn.memory_displacement == CPU_NUMBER:
            continue  # this CPU's number: always mapped in kernel mode
        assert insn.ip in listed, f"unlisted load at {insn.ip:#x}"


NOT_FAST = [
    ("+0(%di):u8[4]", "arrays"),
    ("+0(%di):string[2]", "arrays"),
]


@pytest.mark.parametrize(("args", "why"), NOT_FAST)
def test_not_on_the_fast_path(args: str, why: str) -> None:
    compiled = compile_fetchargs(spec_for(args), SYMBOLS)
    with pytest.raises(NotFastError, match=why):
        plan_recorder(compiled, PROBE_IP)


def test_return_probes_are_not_on_the_fast_path() -> None:
    spec = parse_probe("r:test/ev vfs_read $retval")
    assert isinstance(spec, ProbeSpec)
    with pytest.raises(NotFastError, match="return probes"):
        plan_recorder(compile_fetchargs(spec, SYMBOLS), PROBE_IP)


def test_bad_specs_are_refused_before_any_code() -> None:
    spec = RecorderSpec(1, (), 8 * 19, RingLayout(HEADERS, DATA, 1000, 1))
    with pytest.raises(ProbeError, match="power of two"):
        assemble_recorder(spec, CODE)
    compiled = compile_fetchargs(spec_for("+0(%si):string"), SYMBOLS)
    plan = plan_recorder(compiled, PROBE_IP)
    tiny = RecorderSpec(1, plan.fetches, 8 * 19, RingLayout(HEADERS, DATA, 256, 1),
                        string_cap=4095)  # fmt: skip
    with pytest.raises(ProbeError, match="does not fit"):
        assemble_recorder(tiny, CODE)


def test_head_is_committed_after_the_record() -> None:
    """The host never sees a head past a record whose size is not written."""
    run = record("%di +0(%si):string")
    head = struct.unpack("<Q", run.guest.read(RING.header(2) + RING_HEAD, 8))[0]
    assert head == len(run.records[0]) and _counters(run.guest)[2] == 0
    assert RING_NESTED == 24
