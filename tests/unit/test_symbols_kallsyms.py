"""kallsyms recovery over synthetic tables built the way scripts/kallsyms.c builds them.

The builder mirrors ``scripts/kallsyms.c``: the type letter is the first
byte of each name, every character in use is its own token
(``insert_real_symbols_in_table``), the unused codes 255..0 take the most
profitable adjacent pair in turn (``optimize_result``), and ``write_src``
lays the tables out with ``ALGN`` (8) before each label, in the order of
v6.1, v6.2 (``kallsyms_seqs_of_names``) or v6.4 (offsets last).
"""

from __future__ import annotations

import itertools
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qprobes.symbols.kallsyms import (
    KallsymsNotFound,
    KallsymsTable,
    KernelImage,
    cached_kallsyms,
    find_banner,
    find_kallsyms,
    parse_kallsyms,
    read_guest_kallsyms,
    remember_boot,
)
from qprobes.symbols.sysmap import DEFAULT_TEXT, KernelSymbol
from qprobes.target.paging import PTE_NX, PTE_PRESENT, PTE_PS, PTE_RW, walk
from qprobes.target.registers import Registers
from qprobes.target.target import DescriptorTable

BANNER = (
    "Linux version 6.1.0-99-test-amd64 (builder@example.org) (gcc-12 (Debian 12.2.0-14) "
    "12.2.0, GNU ld 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.999-1 (2026-11-16)\n"
)

# --- the builder ------------------------------------------------------------------


def compress(symbols: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Token-compress ``symbols`` as scripts/kallsyms.c does; returns the
    compressed symbols and the 256 expanded tokens."""
    table: list[bytes | None] = [None] * 256
    for name in symbols:
        for c in name:
            table[c] = bytes([c])
    data = [list(name) for name in symbols]
    for code in range(255, -1, -1):
        if table[code] is not None:
            continue
        profit: Counter[tuple[int, int]] = Counter()
        for sym in data:
            profit.update(itertools.pairwise(sym))
        if not profit:
            break
        # find_best_token(): the highest profit, the lowest token on a tie.
        best = max(profit.items(), key=lambda kv: (kv[1], -(kv[0][0] | kv[0][1] << 8)))[0]
        left, right = table[best[0]], table[best[1]]
        assert left is not None and right is not None
        table[code] = left + right
        for i, sym in enumerate(data):
            out: list[int] = []
            j = 0
            while j < len(sym):
                if j + 1 < len(sym) and (sym[j], sym[j + 1]) == best:
                    out.append(code)
                    j += 2
                else:
                    out.append(sym[j])
                    j += 1
            data[i] = out
    tokens = [t if t is not None else b"" for t in table]
    return [bytes(sym) for sym in data], tokens


@dataclass
class Built:
    image: bytes
    labels: dict[str, int] = field(default_factory=dict)


class Writer:
    def __init__(self, lead: bytes) -> None:
        self.buf = bytearray(lead)
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.buf += b"\0" * (-len(self.buf) % 8)  # ALGN
        self.labels[name] = len(self.buf)

    def __iadd__(self, data: bytes) -> Writer:
        self.buf += data
        return self


def build_kallsyms(
    symbols: list[tuple[str, str, int]],
    *,
    order: str = "6.1",
    relative_base: int = DEFAULT_TEXT,
    absolute_percpu: bool = True,
    lead: bytes = b"",
    trail: bytes = b"",
) -> Built:
    """The kallsyms tables for ``(name, type, addr)`` (sorted by address).

    With ``absolute_percpu``, symbols of type 'A' are stored as absolute values.
    """
    compressed, tokens = compress([t.encode() + n.encode() for n, t, _ in symbols])
    offsets = []
    for _name, type_letter, addr in symbols:
        if not absolute_percpu:
            offsets.append(addr - relative_base)
        elif type_letter == "A":
            offsets.append(addr)
        else:
            offsets.append(relative_base - addr - 1)
    names = bytearray()
    markers = []
    for i, sym in enumerate(compressed):
        if i % 256 == 0:
            markers.append(len(names))
        n = len(sym)
        names += bytes([n]) if n <= 0x7F else bytes([(n & 0x7F) | 0x80, n >> 7])
        names += sym
    seqs = b"".join(
        i.to_bytes(3, "big") for i in sorted(range(len(symbols)), key=lambda i: symbols[i][0])
    )
    token_table = b"".join(t + b"\0" for t in tokens)
    index = []
    off = 0
    for t in tokens:
        index.append(off)
        off += len(t) + 1
    fmt = "<%di" if absolute_percpu else "<%dI"

    w = Writer(lead)

    def addresses() -> None:
        w.label("kallsyms_offsets")
        w.__iadd__(struct.pack(fmt % len(offsets), *offsets))
        w.label("kallsyms_relative_base")
        w.__iadd__(struct.pack("<Q", relative_base))

    if order != "6.4":
        addresses()
    w.label("kallsyms_num_syms")
    w += struct.pack("<I", len(symbols))
    w.label("kallsyms_names")
    w += bytes(names)
    w.label("kallsyms_markers")
    w += struct.pack(f"<{len(markers)}I", *markers)
    if order == "6.2":
        w.label("kallsyms_seqs_of_names")
        w += seqs
    w.label("kallsyms_token_table")
    w += token_table
    w.label("kallsyms_token_index")
    w += struct.pack("<256H", *index)
    if order == "6.4":
        addresses()
        w.label("kallsyms_seqs_of_names")
        w += seqs
    w += trail
    return Built(bytes(w.buf), w.labels)


def sample_symbols(slide: int = 0, count: int = 300) -> list[tuple[str, str, int]]:
    """Per-CPU symbols, text with aliases, a few static functions, data, bss,
    and one name longer than 127 bytes (a two-byte ULEB128 length)."""
    text = DEFAULT_TEXT + slide
    syms = [
        ("__per_cpu_start", "A", 0),
        ("fixed_percpu_data", "A", 0),
        ("cpu_number", "A", 0x1000),
        ("__per_cpu_end", "A", 0x34000),
        ("_text", "T", text),
        ("startup_64", "T", text),
        ("secondary_startup_64", "T", text + 0x60),
        ("asm_exc_divide_error", "T", text + 0x990),
        ("do_sys_openat2", "t", text + 0x34A350),
        ("vfs_read", "T", text + 0x34CC50),
        ("vfs_write", "T", text + 0x34D3D0),
        ("arch_cpu_idle", "W", text + 0x34E000),
        ("big_" + "x" * 150, "t", text + 0x34E100),
    ]
    addr = text + 0x400000
    for i in range(count):
        kind = "TtDdRbB"[i % 7]
        syms.append(
            (f"sym{i}_{['init', 'exit', 'probe', 'read', 'write'][i % 5]}{i % 13}", kind, addr)
        )
        addr += 0x40 + 8 * (i % 5)
    syms.append(("linux_banner", "D", text + 0x600000))
    syms.append(("_end", "B", text + 0x2800000))
    return sorted(syms, key=lambda s: s[2])


DECOY = b"".join(bytes([c]) + b"\0" for c in range(256))  # a 0..255 byte table, as in .rodata


# --- parsing --------------------------------------------------------------------


@pytest.mark.parametrize("order", ["6.1", "6.2", "6.4"])
def test_every_table_order_parses(order: str) -> None:
    syms = sample_symbols()
    built = build_kallsyms(syms, order=order, lead=b"\xcc" * 4096 + DECOY + b"\0" * 8)
    raw = find_kallsyms(built.image)
    assert raw.names == [n for n, _, _ in syms]
    assert raw.types == "".join(t for _, t, _ in syms)
    assert raw.addrs == [a for _, _, a in syms]
    assert raw.layout.token_table == built.labels["kallsyms_token_table"]
    assert raw.layout.names == built.labels["kallsyms_names"]
    assert raw.layout.markers == built.labels["kallsyms_markers"]
    assert raw.layout.offsets == built.labels["kallsyms_offsets"]
    assert raw.layout.seqs_of_names == built.labels.get("kallsyms_seqs_of_names")


def test_symbols_sizes_kinds_and_letters() -> None:
    table = parse_kallsyms(build_kallsyms(sample_symbols()).image)
    openat = table.lookup("do_sys_openat2")
    assert isinstance(openat, KernelSymbol)
    assert (openat.addr, openat.size, openat.kind, openat.type) == (
        DEFAULT_TEXT + 0x34A350, 0x34CC50 - 0x34A350, "func", "t",
    )  # fmt: skip
    assert not openat.is_global and table.lookup("vfs_read").is_global  # type: ignore[attr-defined]
    assert table.lookup("arch_cpu_idle").kind == "func"  # weak: W
    assert table.lookup("linux_banner").kind == "object"
    # Aliases share an address and a size; the size runs to the next address.
    assert table.lookup("_text").size == table.lookup("startup_64").size == 0x60
    # Per-CPU offsets keep their small absolute values; the last gets no size
    # rather than one reaching into the kernel image.
    assert table.lookup("cpu_number").addr == 0x1000
    assert table.lookup("__per_cpu_end").size == 0
    assert table.lookup("_end").size == 0
    assert table.lookup("big_" + "x" * 150).addr == DEFAULT_TEXT + 0x34E100
    assert table.format(DEFAULT_TEXT + 0x34CC58) == "vfs_read+0x8"
    assert table.slide == 0


def test_relocated_tables_give_the_slide() -> None:
    slide = 0x11800000
    table = parse_kallsyms(
        build_kallsyms(sample_symbols(slide), relative_base=DEFAULT_TEXT + slide).image
    )
    assert table.slide == slide
    assert table.address("vfs_write") == DEFAULT_TEXT + slide + 0x34D3D0
    assert table.address("cpu_number") == 0x1000


def test_offsets_without_absolute_percpu() -> None:
    syms = [s for s in sample_symbols() if s[1] != "A"]
    raw = find_kallsyms(build_kallsyms(syms, absolute_percpu=False).image)
    assert raw.addrs == [a for _, _, a in syms]
    assert not any(raw.absolute)


def test_banner_is_found() -> None:
    image = b"x" * 100 + b"%s version %s (x)\0" + BANNER.encode() + b"\0junk"
    assert find_banner(image) == BANNER
    assert find_banner(b"no banner here") is None


@pytest.mark.parametrize(
    "image",
    [
        b"\0" * 4096,
        DECOY * 4,  # digit tokens but no token index after them
    ],
)
def test_no_tables(image: bytes) -> None:
    with pytest.raises(KallsymsNotFound):
        find_kallsyms(image)


def test_damaged_markers_are_refused() -> None:
    built = build_kallsyms(sample_symbols())
    image = bytearray(built.image)
    struct.pack_into("<I", image, built.labels["kallsyms_markers"] + 4, 12345)
    with pytest.raises(KallsymsNotFound, match="no consistent"):
        find_kallsyms(bytes(image))


def test_unsorted_addresses_are_refused() -> None:
    built = build_kallsyms(sample_symbols())
    image = bytearray(built.image)
    struct.pack_into("<i", image, built.labels["kallsyms_offsets"] + 4 * 100, -5)
    with pytest.raises(KallsymsNotFound):
        find_kallsyms(bytes(image))


# --- the guest reader over a fake target ------------------------------------------

MiB = 1 << 20
PHYS_TEXT = 16 * MiB
PML4, USER_PML4, PDPT, PD, PT = 0x100000, 0x101000, 0x102000, 0x103000, 0x104000
USER_PDPT, USER_PD = 0x105000, 0x106000
IDT_OFFSET = 5 * MiB  # in the data region


class FakeTarget:
    """A stopped guest: RAM, a 4-level kernel mapping, an IDT whose #DE gate
    points at ``asm_exc_divide_error``. Image: 2 MiB text (RO, X), 2 MiB of
    rodata as 4 KiB pages (RO, NX) holding the kallsyms tables, 4 MiB of
    data (RW, NX) holding the banner and the IDT."""

    def __init__(
        self,
        slide: int,
        banner: str = BANNER,
        extra: dict[int, int] | None = None,
        pti_user: bool = False,
    ) -> None:
        self.ram = bytearray(24 * MiB)
        self.text = DEFAULT_TEXT + slide
        self.phys_reads = 0
        syms = sample_symbols(slide)
        built = build_kallsyms(syms, relative_base=self.text, lead=b"\0" * 0x1000)
        rodata = PHYS_TEXT + 2 * MiB
        self.ram[rodata : rodata + len(built.image)] = built.image
        banner_at = PHYS_TEXT + {n: a for n, _, a in syms}["linux_banner"] - self.text
        self.ram[banner_at : banner_at + len(banner) + 1] = banner.encode() + b"\0"
        self._map(slide)
        self.cr3 = PML4
        if pti_user:
            # Stopped in user mode under PTI: the user half of the PGD pair maps
            # only the (entry) text of the image.
            self.cr3 = USER_PML4
            struct.pack_into("<Q", self.ram, USER_PML4 + 8 * 511, USER_PDPT | PTE_PRESENT)
            struct.pack_into("<Q", self.ram, USER_PDPT + 8 * 510, USER_PD | PTE_PRESENT)
            index = (self.text >> 21) & 511
            struct.pack_into("<Q", self.ram, USER_PD + 8 * index, PHYS_TEXT | PTE_PRESENT | PTE_PS)
        first = (self.text >> 21) & 511
        for index, entry in (extra or {}).items():  # PD index relative to _text's -> PDE
            struct.pack_into("<Q", self.ram, PD + 8 * (first + index), entry)
        handler = self.text + 0x990
        gate = struct.pack("<HHBBHII", handler & 0xFFFF, 0x10, 0, 0x8E,
                           (handler >> 16) & 0xFFFF, handler >> 32, 0)  # fmt: skip
        self.ram[PHYS_TEXT + IDT_OFFSET : PHYS_TEXT + IDT_OFFSET + 16] = gate
        self.idt_base = self.text + IDT_OFFSET

    def _map(self, slide: int) -> None:
        def put(addr: int, value: int) -> None:
            struct.pack_into("<Q", self.ram, addr, value)

        put(PML4 + 8 * 511, PDPT | PTE_PRESENT | PTE_RW)
        put(PDPT + 8 * 510, PD | PTE_PRESENT | PTE_RW)
        first = (self.text >> 21) & 511
        put(PD + 8 * first, PHYS_TEXT | PTE_PRESENT | PTE_PS)
        put(PD + 8 * (first + 1), PT | PTE_PRESENT | PTE_RW)
        for i in range(512):
            put(PT + 8 * i, (PHYS_TEXT + 2 * MiB + i * 4096) | PTE_PRESENT | PTE_NX)
        for k in range(2, 4):  # data: the banner, the IDT (RW, NX)
            put(PD + 8 * (first + k), (PHYS_TEXT + k * 2 * MiB) | PTE_PRESENT | PTE_PS
                | PTE_RW | PTE_NX)  # fmt: skip

    def registers(self, vcpu: int | None = None) -> Registers:
        return Registers(rip=self.text + 0x1000, cr3=self.cr3, cr4=0)

    def read_phys(self, paddr: int, length: int) -> bytes:
        self.phys_reads += 1
        assert paddr >= 0 and paddr + length <= len(self.ram), hex(paddr)
        return bytes(self.ram[paddr : paddr + length])

    def _u64(self, paddr: int) -> int:
        return int(struct.unpack_from("<Q", self.ram, paddr)[0])

    def read(self, vaddr: int, length: int, vcpu: int | None = None) -> bytes:
        out = b""
        while length:
            n = min(length, 4096 - vaddr % 4096)
            out += self.read_phys(walk(self._u64, self.cr3, vaddr).paddr, n)
            vaddr += n
            length -= n
        return out

    def idt(self, vcpu: int | None = None) -> DescriptorTable:
        return DescriptorTable(self.idt_base, 0xFFF)


def read(fake: FakeTarget, cache: Path, **kwargs: object) -> KallsymsTable:
    return read_guest_kallsyms(fake, cache_dir=cache, **kwargs)  # type: ignore[arg-type]


def test_guest_reader_parses_then_hits_the_cache(tmp_path: Path) -> None:
    fake = FakeTarget(slide=0)
    table = read(fake, tmp_path)
    assert not table.from_cache and table.slide == 0 and table.banner == BANNER
    assert table.address("do_sys_openat2") == DEFAULT_TEXT + 0x34A350
    assert list(tmp_path.glob("kallsyms-*.bin"))
    again = read(fake, tmp_path)
    assert again.from_cache and again.banner == BANNER
    assert again.lookup("do_sys_openat2") == table.lookup("do_sys_openat2")
    assert len(again) == len(table)


def test_cache_survives_a_kaslr_reboot(tmp_path: Path) -> None:
    read(FakeTarget(slide=0), tmp_path)
    slide = 0x2C000000
    moved = FakeTarget(slide=slide)
    table = read(moved, tmp_path)
    assert table.from_cache and table.slide == slide
    assert table.address("vfs_read") == DEFAULT_TEXT + slide + 0x34CC50
    assert table.address("cpu_number") == 0x1000  # per-CPU offsets do not move
    fresh = read(moved, tmp_path, use_cache=False)
    assert not fresh.from_cache and fresh.address("vfs_read") == table.address("vfs_read")


def test_cache_of_another_kernel_is_not_used(tmp_path: Path) -> None:
    read(FakeTarget(slide=0), tmp_path)
    other = read(FakeTarget(slide=0, banner=BANNER.replace("6.1.999-1", "6.1.999-2")), tmp_path)
    assert not other.from_cache
    assert len(list(tmp_path.glob("kallsyms-*.bin"))) == 2


def test_guest_reader_uses_the_given_read_phys(tmp_path: Path) -> None:
    fake = FakeTarget(slide=0)
    calls: list[tuple[int, int]] = []

    def read_phys(paddr: int, length: int) -> bytes:
        calls.append((paddr, length))
        return bytes(fake.ram[paddr : paddr + length])

    table = read(fake, tmp_path, read_phys=read_phys, use_cache=False)
    assert "vfs_write" in table
    # The tables were read from the read-only data run (one large read).
    assert (PHYS_TEXT + 2 * MiB, 2 * MiB) in calls
    # Only the IDT gates came through the target's own (virtual) reads.
    assert fake.phys_reads == 1


def test_layout_gives_addresses_from_base() -> None:
    built = build_kallsyms(sample_symbols(), order="6.2")
    base = 0xFFFF_FFFF_8200_0000
    layout = find_kallsyms(built.image, base).layout
    assert layout.token_table == base + built.labels["kallsyms_token_table"]
    assert layout.relative_base == base + built.labels["kallsyms_relative_base"]
    assert layout.seqs_of_names == base + built.labels["kallsyms_seqs_of_names"]


def test_image_that_is_not_physically_contiguous(tmp_path: Path) -> None:
    # A 2 MiB page after the data, mapped from elsewhere (RO, NX).
    fake = FakeTarget(slide=0, extra={5: 0x200000 | PTE_PRESENT | PTE_PS | PTE_NX})
    assert not KernelImage(fake).contiguous  # type: ignore[arg-type]
    table = read(fake, tmp_path, use_cache=False)
    assert table.address("vfs_read") == DEFAULT_TEXT + 0x34CC50
    assert read(fake, tmp_path).from_cache


def test_cache_hit_through_the_idt_when_text_is_not_the_lowest_mapping(tmp_path: Path) -> None:
    read(FakeTarget(slide=0), tmp_path)
    slide = 0x4000000
    # Something mapped 2 MiB below _text: the lowest mapping is not _text.
    below = FakeTarget(slide=slide, extra={-1: 0x200000 | PTE_PRESENT | PTE_PS | PTE_NX})
    assert KernelImage(below).start == DEFAULT_TEXT + slide - MiB * 2  # type: ignore[arg-type]
    table = read(below, tmp_path)
    assert table.from_cache and table.slide == slide
    assert table.address("do_sys_openat2") == DEFAULT_TEXT + slide + 0x34A350


def test_stopped_on_pti_user_page_tables(tmp_path: Path) -> None:
    fake = FakeTarget(slide=0, pti_user=True)
    image = KernelImage(fake)  # type: ignore[arg-type]
    assert image.cr3 == PML4 and image.end > DEFAULT_TEXT + 2 * MiB
    assert read(fake, tmp_path).address("vfs_write") == DEFAULT_TEXT + 0x34D3D0


def test_alignment_is_taken_from_base() -> None:
    built = build_kallsyms(sample_symbols(), lead=b"\0" * 64)
    image = built.image[3:]  # image[0] is at address 3
    with pytest.raises(KallsymsNotFound):
        find_kallsyms(image)
    raw = find_kallsyms(image, base=3)
    assert raw.layout.token_table == built.labels["kallsyms_token_table"]
    assert raw.names[4] == "_text"


# --- kallsyms without a guest: boot records ------------------------------------------

IMAGE = "ab" * 32  # a kernel image's sha256


def test_a_boot_record_gives_the_same_table_with_no_guest(tmp_path: Path) -> None:
    table = read(FakeTarget(slide=0), tmp_path)
    assert cached_kallsyms(IMAGE, cache_dir=tmp_path) is None  # nothing recorded yet
    assert remember_boot(IMAGE, table, cache_dir=tmp_path)
    again = cached_kallsyms(IMAGE, cache_dir=tmp_path)
    assert again is not None and again.from_cache and again.slide == 0
    assert [(s.name, s.addr, s.size, s.kind) for s in again] == [
        (s.name, s.addr, s.size, s.kind) for s in table
    ]
    assert cached_kallsyms("cd" * 32, cache_dir=tmp_path) is None  # another image


def test_a_boot_record_keeps_the_slide_it_saw(tmp_path: Path) -> None:
    slide = 0x2000000  # a kernel linked elsewhere, booted nokaslr: same place each boot
    table = read(FakeTarget(slide=slide), tmp_path)
    assert remember_boot(IMAGE, table, cache_dir=tmp_path)
    again = cached_kallsyms(IMAGE, cache_dir=tmp_path)
    assert again is not None and again.address("vfs_read") == table.address("vfs_read")
    assert again.address("cpu_number") == 0x1000


def test_a_rewritten_cache_entry_voids_the_record(tmp_path: Path) -> None:
    """Another kernel with the same banner rewrote the entry: boot again."""
    table = read(FakeTarget(slide=0), tmp_path)
    assert remember_boot(IMAGE, table, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("kallsyms-*.bin")
    entry.write_bytes(entry.read_bytes() + b"x")
    assert cached_kallsyms(IMAGE, cache_dir=tmp_path) is None


def test_no_record_without_a_cache_entry(tmp_path: Path) -> None:
    table = read(FakeTarget(slide=0), tmp_path, write_cache=False)
    assert not remember_boot(IMAGE, table, cache_dir=tmp_path)
    assert cached_kallsyms(IMAGE, cache_dir=tmp_path) is None
