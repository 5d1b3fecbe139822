"""The kernel's text: where a probe may go, and what the kernel patches itself.

Linux's ``check_kprobe_address_safe()`` and ``arch_prepare_kprobe()``
(``kernel/kprobes.c``, ``arch/x86/kernel/kprobes/core.c``, 6.1) accept a
probe only

* in kernel text (``core_kernel_text()``: ``_stext.._etext``, and
  ``.init.text`` until ``system_state`` reaches ``SYSTEM_FREEING_INITMEM``)
  or module text (``is_module_text_address()``);
* outside the kprobe blacklist (``within_kprobe_blacklist()``, suffixed
  names like ``foo.cold`` included; the ranges themselves come from
  :meth:`qprobes.symbols.linux.LinuxKernel.blacklist`);
* not on text the kernel rewrites: static-key jump sites
  (``jump_label_text_reserved()``: ``__jump_table``), static-call sites
  (``static_call_text_reserved()``: ``static_call_sites``), SMP lock
  prefixes (``alternatives_text_reserved()``: ``smp_alt_modules``, kept
  only on a uniprocessor-patched kernel that may still bring up CPUs), and
  not on a ``BUG()``/``WARN()`` site (``find_bug()``).

qprobes adds what an outside tool must check itself: a function's code
only (a kallsyms text symbol), the static call trampolines (which
``arch_static_call_transform()`` validates and would ``BUG()`` on an int3),
instructions overlapping any such site (not only the probed address), the
inside of the guest's own optimized kprobes (a 5-byte ``jmp`` over several
instructions: ``get_optimized_kprobe()``), and whether the guest is
patching its text right now (``text_mutex`` held).

The tables are parsed by pure functions; :class:`KernelText` reads them
from a stopped guest, with layouts from BTF.
"""

from __future__ import annotations

import bisect
import logging
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qprobes.errors import ProbeError, SymbolError
from qprobes.symbols.btf import Btf, BtfKind

if TYPE_CHECKING:
    from qprobes.symbols.linux import LinuxKernel

log = logging.getLogger(__name__)

ReadMem = Callable[[int, int], bytes]

# include/linux/kprobes.h
KPROBE_FLAG_OPTIMIZED = 4
# kernel/kprobes.c: KPROBE_TABLE_SIZE (1 << KPROBE_HASH_BITS); kprobe_table is
# static, so BTF has no variable for it (its kallsyms size is checked).
KPROBE_TABLE_SIZE = 64
# kernel/locking/mutex.h: the low bits of mutex.owner are flags, not the owner.
MUTEX_FLAGS = 0x07
# include/linux/jump_label.h (JUMP_TYPE_MASK) and
# include/linux/static_call_types.h (STATIC_CALL_SITE_TAIL | STATIC_CALL_SITE_INIT):
# the low bits of an entry's key are flags.
JUMP_TYPE_MASK = 3
STATIC_CALL_SITE_FLAGS = 3
STATIC_CALL_SITE_INIT = 2
CALL_INSN_SIZE = 5  # a static call site: call/jmp rel32 or a 5-byte nop
JUMP_SITE_MAX = 5  # a jump label site: a 2- or 5-byte jmp or nop
BUG_INSN_SIZE = 2  # ud2
LOCK_PREFIX_SIZE = 1
MAX_OPTIMIZED_LENGTH = 5 + 15  # arch/x86/include/asm/kprobes.h (JMP32 + MAX_INSN_SIZE)
MAX_SITE = max(CALL_INSN_SIZE, JUMP_SITE_MAX, BUG_INSN_SIZE, LOCK_PREFIX_SIZE)
_LIST_LIMIT = 1 << 16  # a longer list is torn (or not a list)


# --- pure parsers ---------------------------------------------------------------


@dataclass(frozen=True)
class JumpEntryLayout:
    """``struct jump_entry`` (CONFIG_HAVE_ARCH_JUMP_LABEL_RELATIVE): ``s32
    code; s32 target; long key``, each relative to its own field's address."""

    size: int
    code: int
    target: int
    key: int


@dataclass(frozen=True)
class JumpEntry:
    code: int  # the patched site
    target: int  # where the jump goes when enabled
    key: int  # the static_key, flag bits cleared
    flags: int


def parse_jump_entries(data: bytes, base: int, layout: JumpEntryLayout) -> list[JumpEntry]:
    """Entries of a ``__jump_table`` read at ``base`` (``jump_entry_code()``,
    ``jump_entry_target()``, ``jump_entry_key()``)."""
    out = []
    for off in range(0, len(data) - layout.size + 1, layout.size):
        (code,) = struct.unpack_from("<i", data, off + layout.code)
        (target,) = struct.unpack_from("<i", data, off + layout.target)
        (key,) = struct.unpack_from("<q", data, off + layout.key)
        at = base + off
        key_addr = (at + layout.key + key) & (2**64 - 1)
        out.append(JumpEntry(
            (at + layout.code + code) & (2**64 - 1),
            (at + layout.target + target) & (2**64 - 1),
            key_addr & ~JUMP_TYPE_MASK, key_addr & JUMP_TYPE_MASK,
        ))  # fmt: skip
    return out


def jump_entry_size(code: bytes) -> int:
    """The length of a jump label site (``arch_jump_entry_size()``, which
    decodes it and ``BUG()``s on anything but 2 or 5): ``jmp rel8`` and the
    2-byte nop are 2 bytes; ``jmp rel32`` and the 5-byte nop 5. Unknown
    bytes count as 5, the larger."""
    if code[:1] == b"\xeb" or code[:2] == b"\x66\x90":
        return 2
    return 5


@dataclass(frozen=True)
class StaticCallSiteLayout:
    """``struct static_call_site``: ``s32 addr; s32 key``, relative."""

    size: int
    addr: int
    key: int


@dataclass(frozen=True)
class StaticCallSite:
    addr: int
    key: int  # the static_call_key, flag bits cleared
    flags: int  # STATIC_CALL_SITE_TAIL, STATIC_CALL_SITE_INIT

    @property
    def is_init(self) -> bool:
        return bool(self.flags & STATIC_CALL_SITE_INIT)


def parse_static_call_sites(data: bytes, base: int,
                            layout: StaticCallSiteLayout) -> list[StaticCallSite]:  # fmt: skip
    """Entries of ``static_call_sites`` read at ``base`` (``static_call_addr()``,
    ``static_call_key()``)."""
    out = []
    for off in range(0, len(data) - layout.size + 1, layout.size):
        (addr,) = struct.unpack_from("<i", data, off + layout.addr)
        (key,) = struct.unpack_from("<i", data, off + layout.key)
        at = base + off
        key_addr = (at + layout.key + key) & (2**64 - 1)
        out.append(StaticCallSite((at + layout.addr + addr) & (2**64 - 1),
                                  key_addr & ~STATIC_CALL_SITE_FLAGS,
                                  key_addr & STATIC_CALL_SITE_FLAGS))  # fmt: skip
    return out


@dataclass(frozen=True)
class BugEntryLayout:
    """``struct bug_entry``: ``bug_addr_disp`` (s32, relative) with
    CONFIG_GENERIC_BUG_RELATIVE_POINTERS, else ``bug_addr`` (a pointer)."""

    size: int
    addr: int
    relative: bool


def parse_bug_entries(data: bytes, base: int, layout: BugEntryLayout) -> list[int]:
    """The ``ud2`` addresses of a ``__bug_table`` read at ``base`` (``bug_addr()``)."""
    out = []
    for off in range(0, len(data) - layout.size + 1, layout.size):
        if layout.relative:
            (disp,) = struct.unpack_from("<i", data, off + layout.addr)
            out.append((base + off + layout.addr + disp) & (2**64 - 1))
        else:
            (addr,) = struct.unpack_from("<Q", data, off + layout.addr)
            out.append(addr)
    return out


def parse_rel32_sites(data: bytes, base: int) -> list[int]:
    """A table of s32 offsets, each relative to itself (``.smp_locks``)."""
    return [(base + off + struct.unpack_from("<i", data, off)[0]) & (2**64 - 1)
            for off in range(0, len(data) - 3, 4)]  # fmt: skip


@dataclass(frozen=True)
class Site:
    """A span of text the kernel owns: ``what`` names it, ``why`` says why it
    may not be probed. ``size`` is exact, or the largest the site can be when
    ``exact`` is false (a jump label site, whose length is read from the text
    when it matters)."""

    addr: int
    size: int
    what: str
    why: str
    key: int = 0
    exact: bool = True


REWRITTEN = "which the kernel rewrites at run time"


class SiteIndex:
    """Sites sorted by address, searched for overlap with an instruction."""

    def __init__(self, sites: list[Site]) -> None:
        self.sites = sorted(sites, key=lambda s: s.addr)
        self._addrs = [s.addr for s in self.sites]

    def __len__(self) -> int:
        return len(self.sites)

    def near(self, start: int, end: int) -> Iterator[Site]:
        """Sites that may overlap ``[start, end)`` (by their largest size)."""
        i = bisect.bisect_left(self._addrs, start - MAX_SITE + 1)
        while i < len(self.sites) and self.sites[i].addr < end:
            site = self.sites[i]
            if site.addr + site.size > start:
                yield site
            i += 1


def overlaps(start: int, end: int, site_start: int, site_end: int) -> bool:
    return start < site_end and site_start < end


def jump_sites(entries: list[JumpEntry]) -> list[Site]:
    return [Site(e.code, JUMP_SITE_MAX, "static-key jump site (__jump_table)", REWRITTEN,
                 e.key, exact=False) for e in entries]  # fmt: skip


def static_call_sites(calls: list[StaticCallSite]) -> list[Site]:
    return [Site(c.addr, CALL_INSN_SIZE, "static call site (static_call_sites)", REWRITTEN, c.key)
            for c in calls]  # fmt: skip


def bug_sites(addrs: list[int]) -> list[Site]:
    return [Site(a, BUG_INSN_SIZE, "BUG()/WARN() site (__bug_table)",
                 "which the kernel's #UD handler looks up by address (find_bug)")
            for a in addrs]  # fmt: skip


def lock_sites(addrs: list[int]) -> list[Site]:
    return [Site(a, LOCK_PREFIX_SIZE, "SMP lock prefix (.smp_locks)",
                 "which the kernel rewrites when CPUs come and go (alternatives_smp_switch)")
            for a in addrs]  # fmt: skip


# --- layouts from BTF ------------------------------------------------------------------


def enum_value(btf: Btf, enum: str, name: str) -> int:
    """The value of enumerator ``name`` of ``enum`` in BTF."""
    t = btf.find(enum, (BtfKind.ENUM, BtfKind.ENUM64))
    for value in t.values:
        if value.name == name:
            return int(value.value)
    raise SymbolError(f"BTF enum {enum} has no {name}")


def jump_layout(btf: Btf) -> JumpEntryLayout:
    t = btf.find_struct("jump_entry")
    return JumpEntryLayout(btf.sizeof(t.id), btf.struct_member_offset("jump_entry", "code")[0],
                           btf.struct_member_offset("jump_entry", "target")[0],
                           btf.struct_member_offset("jump_entry", "key")[0])  # fmt: skip


def static_call_layout(btf: Btf) -> StaticCallSiteLayout:
    t = btf.find_struct("static_call_site")
    return StaticCallSiteLayout(btf.sizeof(t.id),
                                btf.struct_member_offset("static_call_site", "addr")[0],
                                btf.struct_member_offset("static_call_site", "key")[0])  # fmt: skip


def bug_entry_layout(btf: Btf) -> BugEntryLayout:
    t = btf.find_struct("bug_entry")
    try:
        off, _ = btf.struct_member_offset("bug_entry", "bug_addr_disp")
        relative = True
    except SymbolError:
        off, _ = btf.struct_member_offset("bug_entry", "bug_addr")
        relative = False
    return BugEntryLayout(btf.sizeof(t.id), off, relative)


@dataclass(frozen=True)
class ModuleLayout:
    """Offsets into ``struct module`` from BTF: its text is
    ``mem[MOD_TEXT]`` (6.4 and later) or ``core_layout`` (before); each
    table is a pointer and a count (None: not in this kernel's config)."""

    list: int
    state: int
    name: int
    name_size: int
    text_base: int
    text_size: int
    text_size_width: int
    unformed: int
    jump_entries: tuple[int, int] | None = None
    static_call_sites: tuple[int, int] | None = None
    bug_table: tuple[int, int] | None = None

    @classmethod
    def from_btf(cls, btf: Btf) -> ModuleLayout:
        def member(path: str) -> int | None:
            try:
                return btf.struct_member_offset("module", path)[0]
            except SymbolError:
                return None

        def table(ptr: str, count: str) -> tuple[int, int] | None:
            a, b = member(ptr), member(count)
            return (a, b) if a is not None and b is not None else None

        lst, _ = btf.struct_member_offset("module", "list")
        state, _ = btf.struct_member_offset("module", "state")
        name, name_size = btf.struct_member_offset("module", "name")
        if member("mem") is not None:
            text = enum_value(btf, "mod_mem_type", "MOD_TEXT")
            base, _ = btf.struct_member_offset("module", f"mem[{text}].base")
            size, width = btf.struct_member_offset("module", f"mem[{text}].size")
        else:
            base, _ = btf.struct_member_offset("module", "core_layout.base")
            size, width = btf.struct_member_offset("module", "core_layout.text_size")
        return cls(
            lst, state, name, name_size, base, size, width,
            enum_value(btf, "module_state", "MODULE_STATE_UNFORMED"),
            table("jump_entries", "num_jump_entries"),
            table("static_call_sites", "num_static_call_sites"),
            table("bug_table", "num_bugs"),
        )  # fmt: skip


@dataclass(frozen=True)
class KprobeLayout:
    """Offsets for walking the guest's ``kprobe_table``."""

    hlist: int
    addr: int
    flags: int
    op_kp: int  # struct optimized_kprobe: kp
    op_size: int  # struct optimized_kprobe: optinsn.size
    opcode: int = 0  # struct kprobe: opcode (the byte under the first one of the jump)
    op_copied: int = 0  # struct optimized_kprobe: optinsn.copied_insn (the rest)
    copied_size: int = 0

    @classmethod
    def from_btf(cls, btf: Btf) -> KprobeLayout:
        def kprobe(path: str) -> int:
            return btf.struct_member_offset("kprobe", path)[0]

        def op(path: str) -> tuple[int, int]:
            return btf.struct_member_offset("optimized_kprobe", path)

        # copied_insn: the DISP32_SIZE bytes after the first, which the jump's
        # rel32 covers (arch_prepare_optimized_kprobe()).
        return cls(kprobe("hlist"), kprobe("addr"), kprobe("flags"), op("kp")[0],
                   op("optinsn.size")[0], kprobe("opcode"), *op("optinsn.copied_insn"))  # fmt: skip


@dataclass(frozen=True)
class TextLayouts:
    """Every layout :class:`KernelText` reads with (None: not in this kernel)."""

    jump: JumpEntryLayout | None = None
    static_call: StaticCallSiteLayout | None = None
    bug: BugEntryLayout | None = None
    module: ModuleLayout | None = None
    kprobe: KprobeLayout | None = None
    mutex_owner: int | None = None
    freeing_initmem: int | None = None  # SYSTEM_FREEING_INITMEM

    @classmethod
    def from_btf(cls, btf: Btf, has: Callable[[str], bool]) -> TextLayouts:
        return cls(
            jump_layout(btf) if has("__start___jump_table") else None,
            static_call_layout(btf) if has("__start_static_call_sites") else None,
            bug_entry_layout(btf) if has("__start___bug_table") else None,
            ModuleLayout.from_btf(btf) if has("modules") else None,
            KprobeLayout.from_btf(btf) if has("kprobe_table") else None,
            btf.struct_member_offset("mutex", "owner")[0] if has("text_mutex") else None,
            enum_value(btf, "system_states", "SYSTEM_FREEING_INITMEM")
            if has("system_state") else None,
        )  # fmt: skip


# --- reading the guest ------------------------------------------------------------


def _u64(read: ReadMem, addr: int) -> int:
    return int(struct.unpack("<Q", read(addr, 8))[0])


def _u32(read: ReadMem, addr: int) -> int:
    return int(struct.unpack("<I", read(addr, 4))[0])


def _s32(read: ReadMem, addr: int) -> int:
    return int(struct.unpack("<i", read(addr, 4))[0])


def list_nodes(read: ReadMem, head: int, what: str) -> Iterator[int]:
    """The nodes of a ``list_head`` list (``list_for_each``)."""
    node = _u64(read, head)
    for _ in range(_LIST_LIMIT):
        if node == head:
            return
        yield node
        node = _u64(read, node)
    raise ProbeError(f"the guest's {what} list does not end (torn, or not a list)")


def smp_lock_sites(btf: Btf, read: ReadMem, head: int) -> list[Site]:
    """The lock prefixes ``alternatives_text_reserved()`` protects: those of
    each ``smp_alt_modules`` entry. The list is filled only on a kernel
    patched for one CPU that may still bring up others (otherwise
    ``.smp_locks`` is freed at boot and the list stays empty)."""
    nxt, _ = btf.struct_member_offset("smp_alt_module", "next")
    locks, _ = btf.struct_member_offset("smp_alt_module", "locks")
    locks_end, _ = btf.struct_member_offset("smp_alt_module", "locks_end")
    out = []
    for node in list_nodes(read, head, "smp_alt_modules"):
        mod = node - nxt
        start, stop = _u64(read, mod + locks), _u64(read, mod + locks_end)
        if start and stop > start:
            out += lock_sites(parse_rel32_sites(read(start, stop - start), start))
    return out


@dataclass
class Module:
    """A loaded module's text and the sites in it."""

    addr: int
    name: str
    text: int
    text_size: int
    sites: SiteIndex


@dataclass
class TextStats:
    """What :meth:`KernelText.load` read, for reports and tests."""

    jump_entries: int = 0
    static_call_sites: int = 0
    bug_entries: int = 0
    smp_lock_sites: int = 0
    blacklist: int = 0
    seconds: float = 0.0


@dataclass
class KernelText:
    """Probe placement rules for one Linux guest (see the module docstring).

    :meth:`check_text` and :meth:`check_insn` raise :class:`ProbeError` with
    one line naming the address and the reason; :meth:`text_mutex_held`
    tells whether the guest is patching its own text. ``read`` reads kernel
    memory of the stopped guest.
    """

    kernel: LinuxKernel
    read: ReadMem
    blacklist: list[tuple[int, int, str]]
    sites: SiteIndex
    layouts: TextLayouts = field(default_factory=TextLayouts)
    stats: TextStats = field(default_factory=TextStats)
    _modules: dict[tuple[int, int, int, str], Module] = field(default_factory=dict)
    # The optimized kprobes as read when a batch of registrations began.
    _frozen: list[tuple[int, int, bytes]] | None = field(default=None, repr=False)
    _ranges: dict[tuple[str, str], tuple[int, int] | None] = field(default_factory=dict,
                                                                   repr=False)  # fmt: skip

    # --- loading -------------------------------------------------------------

    @classmethod
    def load(cls, kernel: LinuxKernel, read: ReadMem,
             blacklist: list[tuple[int, int, str]]) -> KernelText:  # fmt: skip
        """Read the kernel's jump table, static call sites, bug table and SMP
        lock sites (the guest stopped). Raises :class:`SymbolError` or
        :class:`ProbeError` when one that the kernel has cannot be read."""
        btf = kernel.btf
        if btf is None:
            raise SymbolError("the kernel has no BTF: its text tables cannot be read")
        started = time.monotonic()
        sym = kernel.symbols
        layouts = TextLayouts.from_btf(btf, sym.__contains__)
        stats = TextStats(blacklist=len(blacklist))
        sites: list[Site] = []

        def table(first: str, last: str) -> tuple[int, bytes]:
            start, stop = sym.address(first), sym.address(last)
            return start, read(start, stop - start)

        if layouts.jump is not None:
            start, data = table("__start___jump_table", "__stop___jump_table")
            entries = parse_jump_entries(data, start, layouts.jump)
            stats.jump_entries = len(entries)
            sites += jump_sites(entries)
        if layouts.static_call is not None:
            start, data = table("__start_static_call_sites", "__stop_static_call_sites")
            calls = parse_static_call_sites(data, start, layouts.static_call)
            stats.static_call_sites = len(calls)
            sites += static_call_sites(calls)
        if layouts.bug is not None:
            start, data = table("__start___bug_table", "__stop___bug_table")
            bugs = parse_bug_entries(data, start, layouts.bug)
            stats.bug_entries = len(bugs)
            sites += bug_sites(bugs)
        if "smp_alt_modules" in sym:
            locks = smp_lock_sites(btf, read, sym.address("smp_alt_modules"))
            stats.smp_lock_sites = len(locks)
            sites += locks
        text = cls(kernel, read, blacklist, SiteIndex(sites), layouts, stats)
        text.modules()  # the module list must be readable too
        stats.seconds = time.monotonic() - started
        log.info("kernel text: %d jump entries, %d static call sites, %d bug sites, "
                 "%d SMP lock sites, %d blacklist ranges read in %.3f s",
                 stats.jump_entries, stats.static_call_sites, stats.bug_entries,
                 stats.smp_lock_sites, stats.blacklist, stats.seconds)  # fmt: skip
        return text

    # --- the checks ------------------------------------------------------------

    def _where(self, addr: int) -> str:
        found = self.kernel.symbols.resolve(addr)
        return f"{self.kernel.symbols.format(addr)} ({addr:#x})" if found else f"{addr:#x}"

    def _sym(self, name: str) -> int | None:
        return self.kernel.symbols.address(name) if name in self.kernel.symbols else None

    def _range(self, first: str, last: str) -> tuple[int, int] | None:
        """Two symbols' addresses (kept: the symbol table does not change)."""
        key = (first, last)
        if key not in self._ranges:
            a, b = self._sym(first), self._sym(last)
            self._ranges[key] = (a, b) if a is not None and b is not None else None
        return self._ranges[key]

    def init_text_freed(self) -> bool:
        """Whether ``free_initmem()`` has run or is running (``system_state``)."""
        addr = self._sym("system_state")
        if addr is None or self.layouts.freeing_initmem is None:
            return True
        return _s32(self.read, addr) >= self.layouts.freeing_initmem

    def check_text(self, addr: int) -> None:
        """Raise unless ``addr`` is in a function's code in kernel or module
        text, and not blacklisted (``core_kernel_text()``,
        ``is_module_text_address()``, ``within_kprobe_blacklist()``)."""
        def where() -> str:  # named only in a refusal
            return self._where(addr)

        if not addr >> 63:
            raise ProbeError(f"{addr:#x} is a user-space address, not kernel text")
        text = self._range("_stext", "_etext")
        if text is None:
            raise SymbolError("the kernel's symbols have no _stext/_etext")
        in_kernel = text[0] <= addr < text[1]
        init = self._range("_sinittext", "_einittext")
        if not in_kernel and init is not None and init[0] <= addr < init[1]:
            if self.init_text_freed():
                raise ProbeError(f"{where()} is in .init.text, which the kernel freed after boot")
            in_kernel = True
        if not in_kernel:
            initmem = self._range("__init_begin", "__init_end")
            if initmem is not None and initmem[0] <= addr < initmem[1]:
                raise ProbeError(f"{where()} is in the kernel's init memory, not text")
            if self.module_at(addr) is None:
                raise ProbeError(f"{where()} is not kernel text{self._kind(addr)}")
            self.check_optimized(addr, addr + 1)
            return  # module symbols are not read: any of its text is allowed
        found = self.kernel.symbols.resolve(addr)
        if found is None or found[0].kind != "func":
            raise ProbeError(f"{where()} is in kernel text but not in a function's code")
        # Before the instruction-boundary walk, which reads the guest's jump there.
        self.check_optimized(addr, addr + 1)
        tramp = self._range("__static_call_text_start", "__static_call_text_end")
        if tramp is not None and tramp[0] <= addr < tramp[1]:
            raise ProbeError(
                f"{where()} is a static call trampoline (.static_call.text), which the kernel "
                "rewrites and checks (arch_static_call_transform)"
            )
        name = found[0].name
        if "." in name:
            # within_kprobe_blacklist(): foo.cold, foo.isra.0 ... share foo's fate.
            base = name.split(".", 1)[0]
            base_addr = self._sym(base)
            if base_addr is not None:
                for start, end, why in self.blacklist:
                    if start <= base_addr < end:
                        raise ProbeError(f"{where()} is blacklisted as part of {base}: {why}")

    def _kind(self, addr: int) -> str:
        found = self.kernel.symbols.resolve(addr)
        if found is None or found[0].kind == "func":
            return ""
        letter = getattr(found[0], "type", "")
        kind = f" (kallsyms type {letter!r})" if letter else ""
        return f": {found[0].name} is data{kind}"

    def check_insn(self, addr: int, length: int) -> None:
        """Raise if the instruction ``[addr, addr + length)`` overlaps text the
        kernel owns (``jump_label_text_reserved()``,
        ``static_call_text_reserved()``, ``alternatives_text_reserved()``,
        ``find_bug()``) or lies inside one of its optimized kprobes."""
        end = addr + length
        sites = self.sites
        text = self._range("_stext", "_etext")
        if text is None or not text[0] <= addr < text[1]:
            module = self.module_at(addr)
            if module is not None:
                sites = module.sites
        for site in sites.near(addr, end):
            size = site.size
            if not site.exact:
                size = jump_entry_size(self.read(site.addr, JUMP_SITE_MAX))
            if overlaps(addr, end, site.addr, site.addr + size):
                self._refuse(addr, length, site, size)
        self.check_optimized(addr, end)

    def _refuse(self, addr: int, length: int, site: Site, size: int) -> None:
        where = self._where(addr)
        what = site.what
        if site.key and what.endswith(")"):  # "... (__jump_table, key sched_schedstats)"
            what = f"{what[:-1]}, key {self.kernel.symbols.format(site.key)})"
        if site.addr == addr:
            raise ProbeError(f"{where} is a {size}-byte {what}, {site.why}")
        raise ProbeError(
            f"{where}: its {length}-byte instruction overlaps the {size}-byte {what} at "
            f"{self.kernel.symbols.format(site.addr)}, {site.why}"
        )

    def check_optimized(self, start: int, end: int) -> None:
        """Raise if ``[start, end)`` overlaps one of the guest's optimized
        kprobes (``get_optimized_kprobe()``/``arch_within_optimized_kprobe()``:
        its jump covers ``addr .. addr + optinsn.size``)."""
        optimized = self._optimized()
        if not optimized:
            return
        for kp_addr, size, _ in optimized:
            if overlaps(start, end, kp_addr, kp_addr + size):
                raise ProbeError(
                    f"{self._where(start)} is inside the guest's own optimized kprobe at "
                    f"{self.kernel.symbols.format(kp_addr)} (a jump over {size} bytes)"
                )

    def optimized_kprobes(self) -> list[tuple[int, int]]:
        """(addr, optinsn.size) of each optimized kprobe in ``kprobe_table``."""
        return [(addr, size) for addr, size, _ in self._optimized()]

    def recover(self, addr: int, data: bytes) -> bytes:
        """``data`` read at ``addr`` with the guest's jumps over its optimized
        kprobes replaced by the bytes they hide (``__recover_optprobed_insn()``:
        ``kp.opcode`` then ``optinsn.copied_insn``)."""
        out = bytearray(data)
        for kp_addr, _, original in self._optimized():
            for i, byte in enumerate(original):
                if addr <= kp_addr + i < addr + len(out):
                    out[kp_addr + i - addr] = byte
        return bytes(out)

    def batch(self, starting: bool) -> None:
        """The engine's batch hook: the guest stays stopped from ``True`` to
        ``False``, so the guest's optimized kprobes are read once for it."""
        self._frozen = self._read_optimized() if starting else None

    def _optimized(self) -> list[tuple[int, int, bytes]]:
        """(addr, optinsn.size, original bytes under the jump) of each
        optimized kprobe in ``kprobe_table``."""
        if self._frozen is not None:
            return self._frozen
        return self._read_optimized()

    def _read_optimized(self) -> list[tuple[int, int, bytes]]:
        layout = self.layouts.kprobe
        if layout is None:
            return []
        table = self.kernel.symbols.lookup("kprobe_table")
        buckets = KPROBE_TABLE_SIZE
        if table.size and table.size < 8 * buckets:
            raise SymbolError(f"kprobe_table is {table.size} bytes, not {8 * buckets}: "
                              "a kernel with another KPROBE_HASH_BITS")  # fmt: skip
        out = []
        for node in struct.unpack(f"<{buckets}Q", self.read(table.addr, 8 * buckets)):
            for _ in range(_LIST_LIMIT):
                if not node:
                    break
                kp = node - layout.hlist
                if _u32(self.read, kp + layout.flags) & KPROBE_FLAG_OPTIMIZED:
                    op = kp - layout.op_kp
                    original = self.read(kp + layout.opcode, 1)
                    original += self.read(op + layout.op_copied, layout.copied_size)
                    out.append((_u64(self.read, kp + layout.addr),
                                _u64(self.read, op + layout.op_size), original))  # fmt: skip
                node = _u64(self.read, node)
            else:
                raise ProbeError("the guest's kprobe_table has a bucket that does not end")
        return out

    def text_mutex_held(self) -> bool:
        """Whether the guest's ``text_mutex`` has an owner (it is patching its
        text: ``text_poke_bp()``, jump labels, static calls, ftrace, its
        kprobe optimizer)."""
        addr = self._sym("text_mutex")
        if addr is None or self.layouts.mutex_owner is None:
            return False
        return bool(_u64(self.read, addr + self.layouts.mutex_owner) & ~MUTEX_FLAGS)

    # --- modules -------------------------------------------------------------------

    def modules(self) -> list[Module]:
        """The guest's loaded modules (``modules`` list), their text and sites."""
        layout = self.layouts.module
        head = self._sym("modules")
        if layout is None or head is None:
            return []
        out = []
        for node in list_nodes(self.read, head, "modules"):
            mod = node - layout.list
            if _s32(self.read, mod + layout.state) == layout.unformed:
                continue
            base = _u64(self.read, mod + layout.text_base)
            width = layout.text_size_width
            size = int.from_bytes(self.read(mod + layout.text_size, width), "little")
            raw = self.read(mod + layout.name, layout.name_size)
            name = raw.split(b"\0", 1)[0].decode(errors="replace")
            # Keyed by what tells modules apart, not by address alone: a
            # module loaded where an unloaded one was gets its own sites.
            cached = self._modules.get((mod, base, size, name))
            if cached is None:
                cached = Module(mod, name, base, size, self._module_sites(mod, layout))
                self._modules[(mod, base, size, name)] = cached
            out.append(cached)
        return out

    def forget_modules(self) -> None:
        """A module is going: its sites are read anew for whatever comes next."""
        self._modules.clear()

    def module_at(self, addr: int) -> Module | None:
        """The module whose text holds ``addr`` (``is_module_text_address()``)."""
        for module in self.modules():
            if module.text <= addr < module.text + module.text_size:
                return module
        return None

    def _module_sites(self, mod: int, layout: ModuleLayout) -> SiteIndex:
        """A module's own jump entries, static call sites and bug table."""
        sites: list[Site] = []

        def table(where: tuple[int, int] | None, entry: int) -> tuple[int, bytes] | None:
            if where is None:
                return None
            start, n = _u64(self.read, mod + where[0]), _u32(self.read, mod + where[1])
            if not start or not n:
                return None
            return start, self.read(start, n * entry)

        jl, sl, bl = self.layouts.jump, self.layouts.static_call, self.layouts.bug
        if jl is not None and (got := table(layout.jump_entries, jl.size)) is not None:
            sites += jump_sites(parse_jump_entries(got[1], got[0], jl))
        if sl is not None and (got := table(layout.static_call_sites, sl.size)) is not None:
            sites += static_call_sites(parse_static_call_sites(got[1], got[0], sl))
        if bl is not None and (got := table(layout.bug_table, bl.size)) is not None:
            sites += bug_sites(parse_bug_entries(got[1], got[0], bl))
        return SiteIndex(sites)
