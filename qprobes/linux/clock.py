"""The guest's own clock at a probe hit: ``sched_clock()`` from the hit's TSC.

ftrace stamps each event with its trace clock; the default, ``local``, is
``trace_clock_local()`` = ``sched_clock()`` (kernel/trace/trace_clock.c).
On x86 ``sched_clock()`` is ``native_sched_clock()`` (arch/x86/kernel/tsc.c)
while the TSC is in use (the ``__use_tsc`` static key): the TSC scaled by
the CPU's ``cyc2ns`` data, ::

    ns = cyc2ns_offset + mul_u64_u32_shr(tsc, cyc2ns_mul, cyc2ns_shift)

read from the per-CPU ``struct cyc2ns { struct cyc2ns_data data[2];
seqcount_latch_t seq; }`` under its latch (``cyc2ns_read_begin``: the copy
``data[seq & 1]`` is the one to read). qprobes' trap stub reads the TSC
(``rdtsc``) just before it rings the doorbell, so a hit is stamped on the
guest's clock and its events sort among the guest's own ftrace output.
Under TCG QEMU derives the guest TSC from the host's and stops it while the
guest is stopped, as at every doorbell.

``local_clock()`` (printk's clock, what dmesg shows) is ``sched_clock()``
plus ``__sched_clock_offset`` while ``sched_clock_stable()``
(kernel/sched/clock.c); on an unstable clock it is a per-CPU filtered
clock qprobes does not reproduce.

Layouts come from BTF, addresses from kallsyms; nothing is hard-coded but
the formula.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from qprobes.errors import QprobesError, SymbolError
from qprobes.probes.context import HitContext
from qprobes.symbols.linux import LinuxKernel

Read = Callable[[int, int], bytes]

U64 = (1 << 64) - 1


class ClockError(SymbolError):
    """The guest's sched_clock() cannot be computed from outside."""


@dataclass(frozen=True)
class Cyc2nsData:
    """``struct cyc2ns_data`` (arch/x86/include/asm/timer.h)."""

    cyc2ns_mul: int
    cyc2ns_shift: int
    cyc2ns_offset: int


def mul_u64_u32_shr(a: int, mul: int, shift: int) -> int:
    """include/linux/math64.h: ``(a * mul) >> shift`` with a 96-bit product."""
    return ((a & U64) * (mul & 0xFFFF_FFFF)) >> shift & U64


def cycles_2_ns(tsc: int, data: Cyc2nsData) -> int:
    """``__cycles_2_ns``: TSC cycles to sched_clock() nanoseconds."""
    return (data.cyc2ns_offset + mul_u64_u32_shr(tsc, data.cyc2ns_mul, data.cyc2ns_shift)) & U64


@dataclass(frozen=True)
class _Layout:
    cyc2ns: int  # per-CPU offset of the cyc2ns variable
    data: int  # offsetof(struct cyc2ns, data)
    data_size: int  # sizeof(struct cyc2ns_data)
    seq: int  # offsetof(struct cyc2ns, seq.seqcount.sequence)
    mul: tuple[int, int]
    shift: tuple[int, int]
    offset: tuple[int, int]


def _field(data: bytes, where: tuple[int, int]) -> int:
    off, size = where
    return int.from_bytes(data[off : off + size], "little")


class SchedClock:
    """The guest's ``sched_clock()`` (ftrace's ``local`` clock) at a hit.

    ``read`` reads kernel memory (the engine's ``read_data``).
    """

    name = "local"  # the trace_clock it stands for

    def __init__(self, kernel: LinuxKernel, read: Read) -> None:
        self.read = read
        btf = kernel.btf
        symbols = kernel.symbols
        if btf is None:
            raise ClockError("no BTF: the layout of the guest's cyc2ns data is unknown")
        for name in ("cyc2ns", "__use_tsc"):
            if name not in symbols:
                raise ClockError(f"the guest kernel has no {name} (not an x86 TSC sched_clock)")
        try:
            data, data_bytes = btf.struct_member_offset("cyc2ns", "data")
            seq, _ = btf.struct_member_offset("cyc2ns", "seq.seqcount.sequence")
            self.layout = _Layout(
                cyc2ns=symbols.address("cyc2ns"),
                data=data,
                data_size=data_bytes // 2,
                seq=seq,
                mul=btf.struct_member_offset("cyc2ns_data", "cyc2ns_mul"),
                shift=btf.struct_member_offset("cyc2ns_data", "cyc2ns_shift"),
                offset=btf.struct_member_offset("cyc2ns_data", "cyc2ns_offset"),
            )
            key, key_size = btf.struct_member_offset("static_key", "enabled")
        except SymbolError as exc:
            raise ClockError(f"cannot lay out the guest's cyc2ns data: {exc}") from exc
        self._static_key = (key, key_size)
        use_tsc = symbols.address("__use_tsc")
        if not self._key_enabled(use_tsc):
            raise ClockError("the guest's sched_clock() does not use the TSC (__use_tsc is off)")
        self._paravirt_check(kernel)
        self.sched_clock_offset: int | None = None
        self.sched_clock_stable: int | None = None
        if "__sched_clock_offset" in symbols:
            self.sched_clock_offset = symbols.address("__sched_clock_offset")
        if "__sched_clock_stable" in symbols:
            self.sched_clock_stable = symbols.address("__sched_clock_stable")

    def _key_enabled(self, addr: int) -> bool:
        off, size = self._static_key
        return int.from_bytes(self.read(addr + off, size), "little", signed=True) > 0

    def _paravirt_check(self, kernel: LinuxKernel) -> None:
        """sched_clock() is ``static_call(pv_sched_clock)`` on a paravirt kernel:
        only ``native_sched_clock`` is the TSC formula (kvmclock is not)."""
        symbols, btf = kernel.symbols, kernel.btf
        if "__SCK__pv_sched_clock" not in symbols or "native_sched_clock" not in symbols:
            return
        assert btf is not None
        try:
            off, size = btf.struct_member_offset("static_call_key", "func")
        except SymbolError:
            return
        func = int.from_bytes(
            self.read(symbols.address("__SCK__pv_sched_clock") + off, size), "little"
        )
        native = symbols.address("native_sched_clock")
        if func != native:
            found = symbols.resolve(func)
            name = found[0].name if found is not None else f"{func:#x}"
            raise ClockError(f"the guest's sched_clock() is {name}, not native_sched_clock")

    def cyc2ns(self, gs_base: int) -> Cyc2nsData:
        """The CPU's current ``cyc2ns_data`` (``cyc2ns_read_begin``: the copy
        the latch's sequence names). The guest is stopped (all-stop) while
        the host reads, so one read of the whole struct is consistent."""
        lay = self.layout
        start = min(lay.data, lay.seq)
        end = max(lay.data + 2 * lay.data_size, lay.seq + 4)
        raw = self.read(gs_base + lay.cyc2ns + start, end - start)
        (seq,) = struct.unpack_from("<I", raw, lay.seq - start)
        at = lay.data - start + (seq & 1) * lay.data_size
        data = raw[at : at + lay.data_size]
        return Cyc2nsData(_field(data, lay.mul), _field(data, lay.shift), _field(data, lay.offset))

    def sched_clock(self, ctx: HitContext) -> int | None:
        """``sched_clock()`` in ns at the hit, or None (no TSC, no per-CPU base)."""
        if ctx.tsc is None or not ctx.gs_base:
            return None
        try:
            return cycles_2_ns(ctx.tsc, self.cyc2ns(ctx.gs_base))
        except (QprobesError, struct.error):
            return None

    def local_clock(self, ctx: HitContext) -> int | None:
        """``local_clock()`` (dmesg's clock) at the hit, while the guest's
        sched_clock is stable; None otherwise."""
        ns = self.sched_clock(ctx)
        if ns is None or self.sched_clock_offset is None or self.sched_clock_stable is None:
            return None
        try:
            if not self._key_enabled(self.sched_clock_stable):
                return None
            (offset,) = struct.unpack("<Q", self.read(self.sched_clock_offset, 8))
        except (QprobesError, struct.error):
            return None
        return (ns + int(offset)) & U64

    def __call__(self, ctx: HitContext) -> int | None:
        return self.sched_clock(ctx)
