"""The guest kernel's live ftrace records (``kernel/trace/ftrace.c``).

``__mcount_loc`` (the linker's table of ``__fentry__`` call sites) is init
data, freed after boot; what the running kernel keeps is a list of
``struct ftrace_page`` from ``ftrace_pages_start``::

    struct ftrace_page {
        struct ftrace_page *next;
        struct dyn_ftrace  *records;   /* an array of index records */
        int                 index;
        int                 order;
    };
    struct dyn_ftrace {
        unsigned long       ip;        /* address of the 5-byte site */
        unsigned long       flags;     /* FTRACE_FL_* | count of ops */
        struct dyn_arch_ftrace arch;   /* empty on x86 */
    };

The layouts and the ``FTRACE_FL_*`` values (an anonymous enum in
``include/linux/ftrace.h``) come from BTF; the reference count is the bits
below the lowest flag (``FTRACE_REF_MAX``). Loading a module appends pages
(``ftrace_process_locs``) and unloading one frees them, so the list is
walked again at each lookup, and records are read again only for pages
that changed. Flags are always read live.

Jump-label sites (``__jump_table``, ``struct jump_entry`` {s32 code;
s32 target; long key;}, addresses relative to each field) are read here
too, for :meth:`FtraceRecords.text_reserved`: a probe moved off an ftrace
site must not land on text the kernel patches.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass

from qprobes.errors import QprobesError, SymbolError
from qprobes.probes.ftrace_site import FtraceSite
from qprobes.symbols.btf import Btf
from qprobes.symbols.elf import SymbolTable

Read = Callable[[int, int], bytes]

MAX_PAGES = 1 << 16  # a list longer than this is torn or a loop


@dataclass(frozen=True)
class FtraceLayout:
    """Offsets (bytes) in ``struct ftrace_page`` and ``struct dyn_ftrace``,
    and the ``FTRACE_FL_*`` values, from BTF."""

    page_next: int
    page_records: int
    page_index: int
    rec_size: int
    rec_ip: int
    rec_flags: int
    fl_enabled: int
    fl_direct: int
    fl_ipmodify: int
    fl_disabled: int
    ref_mask: int

    @classmethod
    def from_btf(cls, btf: Btf) -> FtraceLayout:
        fl = btf.enumerators("FTRACE_FL_")
        needed = ("FTRACE_FL_ENABLED", "FTRACE_FL_DIRECT", "FTRACE_FL_IPMODIFY")
        missing = [name for name in needed if name not in fl]
        if missing:
            raise SymbolError(f"the kernel's BTF has no {', '.join(missing)}")
        lowest = min(v for v in fl.values() if v > 0)
        return cls(
            page_next=btf.struct_member_offset("ftrace_page", "next")[0],
            page_records=btf.struct_member_offset("ftrace_page", "records")[0],
            page_index=btf.struct_member_offset("ftrace_page", "index")[0],
            rec_size=btf.find_struct("dyn_ftrace").size,
            rec_ip=btf.struct_member_offset("dyn_ftrace", "ip")[0],
            rec_flags=btf.struct_member_offset("dyn_ftrace", "flags")[0],
            fl_enabled=fl["FTRACE_FL_ENABLED"],
            fl_direct=fl["FTRACE_FL_DIRECT"],
            fl_ipmodify=fl["FTRACE_FL_IPMODIFY"],
            fl_disabled=fl.get("FTRACE_FL_DISABLED", 0),
            ref_mask=lowest - 1,  # FTRACE_REF_MAX: the bits below every flag
        )

    def decode(self, ip: int, flags: int) -> FtraceSite:
        """A record's ``flags`` as an :class:`FtraceSite` (pure)."""
        return FtraceSite(
            ip=ip,
            flags=flags,
            refs=flags & self.ref_mask,
            enabled=bool(flags & self.fl_enabled),
            direct=bool(flags & self.fl_direct),
            ipmodify=bool(flags & self.fl_ipmodify),
            disabled=bool(flags & self.fl_disabled),
        )


@dataclass(frozen=True)
class FtracePage:
    """One ``struct ftrace_page`` as read: its address, records array, count."""

    addr: int
    records: int
    index: int


def parse_page(data: bytes, addr: int, layout: FtraceLayout) -> tuple[FtracePage, int]:
    """A ``struct ftrace_page`` from its bytes: the page and its ``next``."""
    (nxt,) = struct.unpack_from("<Q", data, layout.page_next)
    (records,) = struct.unpack_from("<Q", data, layout.page_records)
    (index,) = struct.unpack_from("<i", data, layout.page_index)
    return FtracePage(addr, records, index), nxt


def parse_records(data: bytes, count: int, layout: FtraceLayout) -> list[tuple[int, int]]:
    """(ip, flags) of ``count`` ``struct dyn_ftrace`` records from their bytes."""
    size = layout.rec_size
    if len(data) < count * size:
        raise SymbolError(f"{count} ftrace records need {count * size} bytes, got {len(data)}")
    out = []
    for pos in range(0, count * size, size):
        (ip,) = struct.unpack_from("<Q", data, pos + layout.rec_ip)
        (flags,) = struct.unpack_from("<Q", data, pos + layout.rec_flags)
        out.append((ip, flags))
    return out


class FtraceRecords:
    """The guest's ftrace sites, for the engine's ftrace hook
    (:class:`qprobes.probes.ftrace_site.FtraceRecords`).

    ``read`` reads kernel memory (the guest is stopped whenever a lookup
    runs: registration time).
    """

    def __init__(self, layout: FtraceLayout, pages_start: int, read: Read, *,
                 jump_table: tuple[int, int, int, int] | None = None) -> None:  # fmt: skip
        self.layout = layout
        self.read = read
        self.pages_start = pages_start
        # (start, stop, offsetof(jump_entry, code), sizeof(jump_entry))
        self.jump_table = jump_table
        self._pages: list[FtracePage] = []
        self._by_page: dict[FtracePage, list[int]] = {}  # page -> its record ips
        self._ips: list[int] = []  # every record ip, sorted
        self._where: list[int] = []  # the record's address, in the order of _ips
        self._jump_sites: list[int] | None = None
        self._frozen = False  # in a batch: the page list is not walked again
        self.refresh()

    def batch(self, starting: bool) -> None:
        """The engine's batch hook: the guest stays stopped from ``True`` to
        ``False``, so the page list is walked once for the batch (each
        record's flags are still read at each lookup)."""
        if starting:
            self.refresh()
        self._frozen = starting

    @classmethod
    def from_kernel(cls, symbols: SymbolTable, btf: Btf, read: Read) -> FtraceRecords:
        """The records of the kernel whose symbols and BTF are given."""
        if "ftrace_pages_start" not in symbols:
            raise SymbolError("the kernel has no ftrace_pages_start (no dynamic ftrace?)")
        jump_table = None
        if "__start___jump_table" in symbols and "__stop___jump_table" in symbols:
            jump_table = (symbols.address("__start___jump_table"),
                          symbols.address("__stop___jump_table"),
                          btf.struct_member_offset("jump_entry", "code")[0],
                          btf.find_struct("jump_entry").size)  # fmt: skip
        return cls(FtraceLayout.from_btf(btf), symbols.address("ftrace_pages_start"), read,
                   jump_table=jump_table)  # fmt: skip

    # --- records ----------------------------------------------------------------

    def _walk(self) -> list[FtracePage]:
        layout = self.layout
        size = max(layout.page_next, layout.page_records, layout.page_index) + 8
        (addr,) = struct.unpack("<Q", self.read(self.pages_start, 8))
        pages: list[FtracePage] = []
        while addr:
            if len(pages) >= MAX_PAGES:
                raise SymbolError(f"the ftrace_page list from {self.pages_start:#x} does not end")
            page, addr = parse_page(self.read(addr, size), addr, layout)
            pages.append(page)
        return pages

    def refresh(self) -> bool:
        """Walk the page list again; re-read the records of new pages.
        True when something changed (a module was loaded or unloaded)."""
        pages = self._walk()
        if pages == self._pages:
            return False
        size = self.layout.rec_size
        by_page: dict[FtracePage, list[int]] = {}
        pairs: list[tuple[int, int]] = []
        for page in pages:
            ips = self._by_page.get(page)
            if ips is None:
                data = self.read(page.records, page.index * size) if page.index > 0 else b""
                ips = [ip for ip, _flags in parse_records(data, page.index, self.layout)]
            by_page[page] = ips
            pairs += [(ip, page.records + i * size) for i, ip in enumerate(ips)]
        pairs.sort()
        self._pages, self._by_page = pages, by_page
        self._ips = [ip for ip, _ in pairs]
        self._where = [rec for _, rec in pairs]
        return True

    def __len__(self) -> int:
        return len(self._ips)

    @property
    def ips(self) -> list[int]:
        """Every record's ip, sorted (as of the last refresh)."""
        return list(self._ips)

    def record(self, addr: int) -> int | None:
        """The address of the ``struct dyn_ftrace`` whose ip is ``addr``, if any."""
        if not self._frozen:
            self.refresh()
        i = bisect.bisect_left(self._ips, addr)
        if i == len(self._ips) or self._ips[i] != addr:
            return None
        return self._where[i]

    def site(self, addr: int) -> FtraceSite | None:
        """The live record at ``addr``, or None when ``addr`` is no ftrace site."""
        for _ in range(2):
            rec = self.record(addr)
            if rec is None:
                return None
            ((ip, flags),) = parse_records(self.read(rec, self.layout.rec_size), 1, self.layout)
            if ip == addr:
                return self.layout.decode(ip, flags)
            # The page was freed and reused under the cache (a module went
            # away and another came): read every page again.
            self._pages, self._by_page = [], {}
        raise SymbolError(f"the ftrace record for {addr:#x} changed while it was read")

    # --- jump labels ----------------------------------------------------------------

    def jump_sites(self) -> list[int]:
        """The code address of every ``__jump_table`` entry (built-in), sorted."""
        if self._jump_sites is None:
            sites: list[int] = []
            if self.jump_table is not None:
                start, stop, code_off, size = self.jump_table
                data = self.read(start, stop - start)
                for pos in range(0, len(data) - size + 1, size):
                    (rel,) = struct.unpack_from("<i", data, pos + code_off)
                    if rel:
                        sites.append((start + pos + code_off + rel) % (1 << 64))
            sites.sort()
            self._jump_sites = sites
        return self._jump_sites

    def text_reserved(self, start: int, end: int) -> str | None:
        """Why the kernel may patch a byte of ``[start, end)``, or None
        (``jump_label_text_reserved``: a jump-label site is 5 bytes, or 2)."""
        try:
            sites = self.jump_sites()
        except QprobesError as exc:
            return f"the jump-label table could not be read ({exc})"
        i = bisect.bisect_left(sites, start - 4)
        while i < len(sites) and sites[i] < end:  # (no copy of the list's tail)
            code = sites[i]
            if code + 5 > start:  # JUMP_LABEL_NOP_SIZE: the site's 5 bytes
                return f"a jump-label (static key) site at {code:#x}"
            i += 1
        return None
