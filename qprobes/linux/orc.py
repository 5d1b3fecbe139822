"""Kernel stack traces from the guest's own ORC tables, unwound on the host.

The default guest's kernel has no frame pointers; it unwinds with ORC
(``arch/x86/kernel/unwind_orc.c``). qprobes reads the same tables from guest
memory and follows the same rules, from a hit's ``pt_regs``:

- the tables: ``__start_orc_unwind_ip`` (sorted ``s32`` offsets, each
  relative to its own address), ``__start_orc_unwind`` (one ``struct
  orc_entry`` per ip) and the ``orc_lookup`` block index over
  ``[_stext, _etext)`` in blocks of 256 bytes, as ``orc_find`` uses them;
  init text searches the whole table. The ``orc_entry`` bitfields come from
  BTF: 6.1 has ``type:2, end:1``; 6.3 added ``signal``; 6.4 made ``type``
  three bits with ``ORC_TYPE_UNDEFINED`` and ``END_OF_STACK``;
- ``unwind_next_frame``: the CFA from ``sp_reg``/``sp_offset`` (``SP``,
  ``BP``, their ``_INDIRECT`` forms, which is how the IRQ stack's saved
  previous sp is followed, and ``R10``/``R13``/``DI``/``DX`` from the last
  full ``pt_regs``), then by type: a call frame's return address below the
  CFA, a ``pt_regs`` or an iret frame at the CFA (interrupts, exceptions,
  syscalls), ``bp`` from ``bp_reg``; the frame-pointer fallback entry when an
  ip has no ORC data; the end of the stack at user-mode registers or an
  ``end``/``UNDEFINED`` entry;
- ``arch_stack_walk``: the regs' ip first, then each frame's return
  address (a ``pt_regs`` frame's is its ip) while it is kernel text;
- return addresses the guest's rethook (its kretprobes), the function graph
  tracer's ``return_to_handler`` or qprobes' own kretprobe trampoline put on
  the stack are replaced by the real ones (``unwind_recover_ret_addr``),
  through the ``recover`` callback.

A module's frames use the module's own tables (``mod->arch``), found
through the module list; an ftrace trampoline's, the entry of the code it
was copied from (``ftrace_regs_caller`` or ``ftrace_caller``, as
``orc_ftrace_find`` does). BPF has no ORC data: the frame-pointer guess is
tried there, as the kernel does for an ip it has no entry for.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qprobes.errors import QprobesError, SymbolError
from qprobes.linux.modules import LinuxModules, Module
from qprobes.symbols.btf import Btf
from qprobes.symbols.elf import SymbolTable

Read = Callable[[int, int], bytes]
#: ``recover(slot, ret_addr)``: the real return address behind a
#: trampoline's address found at stack address ``slot``.
Recover = Callable[[int, int], int]

LOOKUP_BLOCK_SIZE = 256  # 1 << LOOKUP_BLOCK_ORDER
MAX_FRAMES = 64

# orc_types.h: registers.
ORC_REG_UNDEFINED = 0
ORC_REG_PREV_SP = 1
ORC_REG_DX = 2
ORC_REG_DI = 3
ORC_REG_BP = 4
ORC_REG_SP = 5
ORC_REG_R10 = 6
ORC_REG_R13 = 7
ORC_REG_BP_INDIRECT = 8
ORC_REG_SP_INDIRECT = 9


class OrcError(QprobesError):
    """The guest's ORC tables cannot be read."""


@dataclass(frozen=True)
class OrcEntry:
    sp_offset: int
    bp_offset: int
    sp_reg: int
    bp_reg: int
    type: str  # "call", "regs", "regs_partial", "undefined", "end"
    end: bool = False
    signal: bool = False


#: The frame-pointer guess for an ip with no ORC data (``orc_fp_entry``).
ORC_FP_ENTRY = OrcEntry(16, -16, ORC_REG_BP, ORC_REG_PREV_SP, "call")


@dataclass(frozen=True)
class OrcLayout:
    """``struct orc_entry``'s bitfields (from BTF) and the type numbering."""

    size: int
    sp_reg: tuple[int, int]  # (bit offset, bits)
    bp_reg: tuple[int, int]
    type: tuple[int, int]
    end: tuple[int, int] | None  # 6.1-6.3
    signal: tuple[int, int] | None  # 6.3+

    @classmethod
    def from_btf(cls, btf: Btf) -> OrcLayout:
        def bits(name: str) -> tuple[int, int] | None:
            try:
                info = btf.member("orc_entry", name)
            except SymbolError:
                return None
            return info.bit_offset, info.bitfield_size or info.size * 8

        try:
            size = btf.find_struct("orc_entry").size
        except SymbolError as exc:
            raise OrcError(f"no struct orc_entry in the guest's BTF: {exc}") from None
        sp_reg, bp_reg, kind = bits("sp_reg"), bits("bp_reg"), bits("type")
        if sp_reg is None or bp_reg is None or kind is None:
            raise OrcError("struct orc_entry lacks sp_reg, bp_reg or type")
        return cls(size, sp_reg, bp_reg, kind, bits("end"), bits("signal"))

    def decode(self, raw: bytes) -> OrcEntry:
        if len(raw) != self.size or self.size < 4:
            raise OrcError(f"an orc_entry is {self.size} bytes; got {len(raw)} ({raw[:16].hex()})")
        sp_offset, bp_offset = struct.unpack_from("<hh", raw)
        word = int.from_bytes(raw, "little")

        def field(where: tuple[int, int] | None) -> int:
            if where is None:
                return 0
            off, n = where
            return (word >> off) & ((1 << n) - 1)

        number = field(self.type)
        if self.end is not None:  # 6.1-6.3: CALL 0, REGS 1, REGS_PARTIAL 2
            kind = {0: "call", 1: "regs", 2: "regs_partial"}.get(number, "undefined")
        else:  # 6.4+: UNDEFINED 0, END_OF_STACK 1, CALL 2, REGS 3, REGS_PARTIAL 4
            kind = {0: "undefined", 1: "end", 2: "call", 3: "regs", 4: "regs_partial"}.get(
                number, "undefined"
            )
        return OrcEntry(
            sp_offset,
            bp_offset,
            field(self.sp_reg),
            field(self.bp_reg),
            kind,
            bool(field(self.end)),
            bool(field(self.signal)),
        )


class OrcTable:
    """``orc_find`` over the guest's vmlinux ORC tables (read on demand)."""

    def __init__(
        self, symbols: SymbolTable, btf: Btf, read: Read, modules: LinuxModules | None = None
    ) -> None:
        self.modules = modules
        self._module_tables: dict[int, tuple[Module, list[int]]] = {}
        try:
            self.ip_start = symbols.address("__start_orc_unwind_ip")
            self.ip_stop = symbols.address("__stop_orc_unwind_ip")
            self.orc_start = symbols.address("__start_orc_unwind")
            self.lookup = symbols.address("orc_lookup")
            self.stext = symbols.address("_stext")
            self.etext = symbols.address("_etext")
            num_blocks = symbols.address("lookup_num_blocks")
        except SymbolError as exc:
            raise OrcError(f"the guest has no ORC tables ({exc})") from None
        self.layout = OrcLayout.from_btf(btf)
        self.read = read
        self.count = (self.ip_stop - self.ip_start) // 4
        self.num_blocks = int.from_bytes(read(num_blocks, 4), "little")
        self.init = self._range(symbols, "_sinittext", "_einittext")
        self.ftrace = _FtraceTrampolines.from_kernel(symbols, btf, read)
        self._cache: dict[int, OrcEntry | None] = {}  # vmlinux ips
        self._module_cache: dict[int, OrcEntry | None] = {}  # others, for _module_gen
        self._module_gen: object = None
        self._all_ips: list[int] | None = None

    @staticmethod
    def _range(symbols: SymbolTable, start: str, end: str) -> tuple[int, int] | None:
        try:
            return symbols.address(start), symbols.address(end)
        except SymbolError:
            return None

    def _ips(self, first: int, count: int) -> list[int]:
        raw = self.read(self.ip_start + 4 * first, 4 * count)
        base = self.ip_start + 4 * first
        return [base + 4 * i + off for i, off in enumerate(struct.unpack(f"<{count}i", raw))]

    def _entry(self, index: int) -> OrcEntry:
        size = self.layout.size
        return self.layout.decode(self.read(self.orc_start + size * index, size))

    def find(self, ip: int) -> OrcEntry | None:
        """``orc_find``: the entry that covers ``ip``, or None."""
        if self._in_vmlinux(ip):
            cache = self._cache
        else:
            # Module (and trampoline) code: valid while no module comes or
            # goes; another module may take the same addresses after.
            gen = self.modules.generation() if self.modules is not None else None
            if gen is None:
                return self._find(ip)
            if gen != self._module_gen:
                self._module_cache.clear()
                self._module_gen = gen
            cache = self._module_cache
        if ip in cache:
            return cache[ip]
        found = self._find(ip)
        cache[ip] = found
        return found

    def _in_vmlinux(self, ip: int) -> bool:
        if self.stext <= ip < self.etext:
            return True
        return self.init is not None and self.init[0] <= ip < self.init[1]

    def _find(self, ip: int) -> OrcEntry | None:
        if ip == 0:
            return None
        if self.stext <= ip < self.etext:
            idx = (ip - self.stext) // LOOKUP_BLOCK_SIZE
            if idx >= self.num_blocks - 1:
                return None
            start, stop = struct.unpack("<II", self.read(self.lookup + 4 * idx, 8))
            stop += 1
            if start >= self.count or stop > self.count or stop <= start:
                return None
            ips = self._ips(start, stop - start)
            i = bisect.bisect_right(ips, ip) - 1
            return self._entry(start + max(i, 0))
        if self.init is not None and self.init[0] <= ip < self.init[1]:
            if self._all_ips is None:
                self._all_ips = self._ips(0, self.count)
            i = bisect.bisect_right(self._all_ips, ip) - 1
            return self._entry(max(i, 0))
        found = self._module_find(ip)
        if found is None and self.ftrace is not None:
            # orc_ftrace_find: a trampoline is a copy of ftrace_(regs_)caller.
            twin = self.ftrace.twin(ip)
            if twin is not None and twin != ip:
                return self.find(twin)
        return found

    def _module_find(self, ip: int) -> OrcEntry | None:
        """``orc_module_find``: the module's own table."""
        if self.modules is None:
            return None
        module = self.modules.module_at(ip)
        if module is None or not module.num_orcs or not module.in_text(ip):
            return None
        cached = self._module_tables.get(module.addr)
        # The very Module read for this generation (a new one when modules
        # came or went), not merely one at the same address.
        if cached is None or cached[0] is not module:
            raw = self.read(module.orc_ip, 4 * module.num_orcs)
            offs = struct.unpack(f"<{module.num_orcs}i", raw)
            ips = [module.orc_ip + 4 * i + off for i, off in enumerate(offs)]
            cached = (module, ips)
            self._module_tables[module.addr] = cached
        ips = cached[1]
        i = bisect.bisect_right(ips, ip) - 1
        if i < 0:
            return None
        size = self.layout.size
        return self.layout.decode(self.read(module.orc + size * i, size))


@dataclass
class _FtraceTrampolines:
    """``ftrace_ops_trampoline``: the ``ftrace_ops`` whose allocated
    trampoline holds an ip, found on ``ftrace_ops_list``."""

    read: Read
    head: int  # &ftrace_ops_list
    end: int  # &ftrace_list_end
    o_next: int
    o_flags: int
    o_tramp: int
    o_tramp_size: int
    save_regs: int  # FTRACE_OPS_FL_SAVE_REGS
    regs_caller: int
    caller: int

    @classmethod
    def from_kernel(cls, symbols: SymbolTable, btf: Btf, read: Read) -> _FtraceTrampolines | None:
        names = ("ftrace_ops_list", "ftrace_list_end", "ftrace_regs_caller", "ftrace_caller")
        if not all(n in symbols for n in names):
            return None
        try:
            off = btf.struct_member_offset
            flag = btf.enumerators("FTRACE_OPS_FL_SAVE_REGS").get("FTRACE_OPS_FL_SAVE_REGS")
            if flag is None:
                return None
            return cls(
                read, symbols.address("ftrace_ops_list"), symbols.address("ftrace_list_end"),
                off("ftrace_ops", "next")[0], off("ftrace_ops", "flags")[0],
                off("ftrace_ops", "trampoline")[0], off("ftrace_ops", "trampoline_size")[0],
                flag, symbols.address("ftrace_regs_caller"), symbols.address("ftrace_caller"),
            )  # fmt: skip
        except SymbolError:
            return None

    def twin(self, ip: int) -> int | None:
        """The address in ``ftrace_(regs_)caller`` that trampoline code at
        ``ip`` was copied from, or None."""

        def u64(addr: int) -> int:
            return int.from_bytes(self.read(addr, 8), "little")

        ops = u64(self.head)
        for _ in range(256):
            if not ops or ops == self.end:
                return None
            tramp, size = u64(ops + self.o_tramp), u64(ops + self.o_tramp_size)
            if tramp and tramp <= ip < tramp + size:
                base = self.regs_caller if u64(ops + self.o_flags) & self.save_regs else self.caller
                return base + (ip - tramp)
            ops = u64(ops + self.o_next)
        return None


@dataclass
class _State:
    ip: int
    sp: int
    bp: int
    regs: int | None  # address of the pt_regs last crossed (None: a call frame)
    full_regs: bool
    prev_regs: int | None
    signal: bool
    regs_words: dict[str, int] | None = None  # the hit's own regs (not in memory)


class OrcUnwinder:
    """Stack traces for a Linux guest from its ORC tables."""

    def __init__(
        self,
        table: OrcTable,
        pt_regs: dict[str, int],
        is_text: Callable[[int], bool],
    ) -> None:
        self.table = table
        self.pt_regs = pt_regs  # member -> byte offset in struct pt_regs
        self.is_text = is_text

    @classmethod
    def for_kernel(
        cls, symbols: SymbolTable, btf: Btf, read: Read, modules: LinuxModules | None = None
    ) -> OrcUnwinder:
        table = OrcTable(symbols, btf, read, modules)
        names = ("r13", "bp", "r10", "dx", "di", "ip", "cs", "sp")
        try:
            offsets = {n: btf.struct_member_offset("pt_regs", n)[0] for n in names}
        except SymbolError as exc:
            raise OrcError(f"no struct pt_regs in the guest's BTF: {exc}") from None
        stext, etext = table.stext, table.etext
        init = table.init

        def is_text(addr: int) -> bool:
            if stext <= addr < etext or (init is not None and init[0] <= addr < init[1]):
                return True
            return _maybe_module(addr)  # module text, ftrace and BPF trampolines

        return cls(table, offsets, is_text)

    def _u64(self, read: Read, addr: int) -> int:
        return int.from_bytes(read(addr, 8), "little")

    def _get_reg(self, state: _State, read: Read, name: str) -> int | None:
        """``get_reg``: a register of the last full pt_regs crossed."""
        if state.regs_words is not None and state.full_regs:
            return state.regs_words[name]
        base = state.regs if state.full_regs else state.prev_regs
        if base is None:
            return None
        return self._u64(read, base + self.pt_regs[name])

    def unwind(
        self,
        regs: dict[str, int],
        read: Read,
        recover: Recover | None = None,
        max_frames: int = MAX_FRAMES,
        return_address: bool = False,
    ) -> list[int]:
        """``arch_stack_walk`` from ``regs`` (``rip``, ``rsp``, ``rbp``,
        ``r10``, ``r13``, ``rdi``, ``rdx``, ``cs`` as PtRegs names them):
        the addresses of the trace, innermost first. ``return_address``: the
        regs' rip is a return address (a return probe's view), looked up at
        ``rip - 1`` as the unwinder looks up every caller."""
        frames = [regs["rip"]]
        hit = {
            "ip": regs["rip"], "sp": regs["rsp"], "bp": regs["rbp"], "r10": regs["r10"],
            "r13": regs["r13"], "di": regs["rdi"], "dx": regs["rdx"], "cs": regs["cs"],
        }  # fmt: skip
        if hit["cs"] & 3:
            return frames
        state = _State(hit["ip"], hit["sp"], hit["bp"], None, True, None, not return_address, hit)
        try:
            # unwind_start from regs skips the regs frame itself.
            if not self._next(state, read, recover):
                return frames
            while len(frames) < max_frames:
                if not self.is_text(state.ip):
                    break
                frames.append(state.ip)
                if not self._next(state, read, recover):
                    break
        except (QprobesError, struct.error):
            pass  # unreadable stack: the trace so far
        return frames[:max_frames]

    def _next(self, state: _State, read: Read, recover: Recover | None) -> bool:
        """``unwind_next_frame``: False at the end of the stack."""
        if state.regs is not None and state.full_regs:
            cs = (
                state.regs_words["cs"]
                if state.regs_words is not None
                else self._u64(read, state.regs + self.pt_regs["cs"])
            )
            if cs & 3:
                return False
        orc = self.table.find(state.ip if state.signal else state.ip - 1)
        if orc is None:
            orc = ORC_FP_ENTRY
        if orc.type == "end" or orc.sp_reg == ORC_REG_UNDEFINED:
            return False
        prev_sp = state.sp
        indirect = False
        reg = orc.sp_reg
        if reg == ORC_REG_SP:
            sp = state.sp + orc.sp_offset
        elif reg == ORC_REG_BP:
            sp = state.bp + orc.sp_offset
        elif reg == ORC_REG_SP_INDIRECT:
            sp, indirect = state.sp, True
        elif reg == ORC_REG_BP_INDIRECT:
            sp, indirect = state.bp + orc.sp_offset, True
        else:
            name = {ORC_REG_R10: "r10", ORC_REG_R13: "r13", ORC_REG_DI: "di", ORC_REG_DX: "dx"}
            if reg not in name:
                return False
            value = self._get_reg(state, read, name[reg])
            if value is None:
                return False
            sp = value
        if indirect:
            sp = self._u64(read, sp)
            if reg == ORC_REG_SP_INDIRECT:
                sp += orc.sp_offset
        sp &= (1 << 64) - 1
        if orc.type == "call":
            slot = sp - 8
            ip = self._u64(read, slot)
            state.ip = recover(slot, ip) if recover is not None else ip
            state.sp = sp
            state.regs = state.prev_regs = None
            state.regs_words = None
            state.signal = orc.signal
        elif orc.type == "regs":
            state.ip = self._u64(read, sp + self.pt_regs["ip"])
            state.sp = self._u64(read, sp + self.pt_regs["sp"])
            state.regs, state.prev_regs, state.full_regs = sp, None, True
            state.regs_words = None
            state.signal = True
        elif orc.type == "regs_partial":
            # An iret frame at sp: ip, cs, flags, sp, ss.
            state.ip = self._u64(read, sp)
            state.sp = self._u64(read, sp + 24)
            if state.full_regs:
                state.prev_regs = state.regs
            state.regs = sp - self.pt_regs["ip"]
            state.full_regs = False
            state.regs_words = None
            state.signal = True
        else:
            return False
        if orc.bp_reg == ORC_REG_UNDEFINED:
            value = self._get_reg(state, read, "bp")
            if value is not None:
                state.bp = value
        elif orc.bp_reg == ORC_REG_PREV_SP:
            state.bp = self._u64(read, sp + orc.bp_offset)
        elif orc.bp_reg == ORC_REG_BP:
            state.bp = self._u64(read, state.bp + orc.bp_offset)
        else:
            return False
        # Bad ORC data must not loop: on the same stack, sp only grows
        # (unwind_next_frame's check against the previous frame's sp).
        same_stack = (state.sp >> 14) == (prev_sp >> 14)
        return not (same_stack and state.sp <= prev_sp) and state.ip != 0


def _maybe_module(addr: int) -> bool:
    """Module text (``MODULES_VADDR`` upward on x86-64, above the image)."""
    return 0xFFFFFFFFA0000000 <= addr < 0xFFFFFFFFFF000000


def symbolize(symbols: SymbolTable, addrs: Sequence[int], offsets: bool = True) -> list[str]:
    """``%pS`` for each address (``name+0xoff/0xsize``), or ``name`` alone;
    an address kallsyms does not know prints as ``0x...``."""
    out = []
    for addr in addrs:
        found = symbols.resolve(addr)
        if found is None:
            out.append(f"{addr:#x}")
            continue
        sym, off = found
        out.append(f"{sym.name}+{off:#x}/{sym.size:#x}" if offsets else sym.name)
    return out
