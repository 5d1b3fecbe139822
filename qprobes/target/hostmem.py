"""Guest-physical memory through the QEMU process's own address space.

The monitor's ``gpa2hva`` names the host address behind a guest-physical
address; the controller that launched QEMU can then read and write
``/proc/PID/mem`` directly: about 0.2 µs per small read, against 30-170 µs
for one ``m`` packet (FIELD-NOTES, "Reading guest RAM without the gdbstub").

Only *data* may be written this way: TCG does not notice such writes, so a
guest could keep executing stale translated code. Code (int3, slots, stubs)
goes through the gdbstub, which invalidates translations.
"""

from __future__ import annotations

import os
import struct

from qprobes.errors import TargetError
from qprobes.target.paging import ADDR_MASK, Translation, walk
from qprobes.target.target import Target

_CHUNK = 2 * 1024 * 1024
_PAGE = 4096


class HostMemory:
    """Reads and writes guest RAM through ``/proc/PID/mem``.

    Host addresses are looked up once per 2 MiB chunk (three ``gpa2hva``
    calls: both ends prove the chunk is one contiguous RAM block), or per
    page where a chunk is not contiguous. Lookups need the guest stopped;
    reads and writes of chunks already known work while it runs.
    """

    def __init__(self, target: Target, pid: int) -> None:
        self.target = target
        self.pid = pid
        self._fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        self._chunks: dict[int, int] = {}  # chunk number -> hva of its start
        self._pages: dict[int, int] = {}  # page number -> hva (non-contiguous chunks)
        self._ranges: list[tuple[int, int, int]] = []  # (gpa, size, hva) proven contiguous

    def prime(self, start: int, size: int) -> bool:
        """Look up ``[start, start + size)`` now (guest stopped), so that later
        accesses need no monitor call even while the guest runs. True when the
        range is one contiguous block of QEMU memory."""
        try:
            first = self.target.gpa2hva(start)
            last = self.target.gpa2hva(start + size - _PAGE)
        except TargetError:
            return False
        if last != first + size - _PAGE:
            return False
        self._ranges.append((start, size, first))
        return True

    def prime_low(self) -> int:
        """Look up the guest's RAM from 1 MiB up to where it stops being one
        block below 4 GiB (a binary search of ``gpa2hva``, guest stopped),
        so that reads of kernel data work while the guest runs, as they do
        for a QEMU this process launched. The size primed (0: none)."""
        start = 0x100000
        try:
            base = self.target.gpa2hva(start)
        except TargetError:
            return 0

        def same_block(page: int) -> bool:
            try:
                return self.target.gpa2hva(page) == base + page - start
            except TargetError:
                return False

        lo, hi = start // _PAGE, (1 << 32) // _PAGE  # lo is RAM, hi is not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if same_block(mid * _PAGE):
                lo = mid
            else:
                hi = mid
        size = (lo + 1) * _PAGE - start
        self._ranges.append((start, size, base))
        return size

    def covers(self, paddr: int, length: int) -> bool:
        """Whether ``[paddr, paddr + length)`` is read from the host (all of
        a QEMU process's RAM is)."""
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _hva(self, paddr: int) -> int:
        for gpa, size, base_hva in self._ranges:
            if gpa <= paddr < gpa + size:
                return base_hva + paddr - gpa
        chunk = paddr // _CHUNK
        base = self._chunks.get(chunk)
        if base is not None:
            return base + paddr % _CHUNK
        page = paddr // _PAGE
        hva = self._pages.get(page)
        if hva is not None:
            return hva + paddr % _PAGE
        start = chunk * _CHUNK
        try:
            first = self.target.gpa2hva(start)
            last = self.target.gpa2hva(start + _CHUNK - _PAGE)
        except TargetError:
            first = last = -1
        if first >= 0 and last == first + _CHUNK - _PAGE:
            self._chunks[chunk] = first
            return first + paddr % _CHUNK
        hva = self.target.gpa2hva(page * _PAGE)  # raises for non-RAM addresses
        self._pages[page] = hva
        return hva + paddr % _PAGE

    def read_phys(self, paddr: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            n = min(length, _PAGE - paddr % _PAGE)
            out += os.pread(self._fd, n, self._hva(paddr))
            paddr += n
            length -= n
        return bytes(out)

    def write_phys(self, paddr: int, data: bytes) -> None:
        """Write guest-physical *data* (never code: see the module docstring)."""
        view = memoryview(data)
        while view:
            n = min(len(view), _PAGE - paddr % _PAGE)
            os.pwrite(self._fd, view[:n], self._hva(paddr))
            paddr += n
            view = view[n:]

    def read_phys_u64(self, paddr: int) -> int:
        return int(struct.unpack("<Q", os.pread(self._fd, 8, self._hva(paddr)))[0])

    def translate(self, cr3: int, vaddr: int, la57: bool = False) -> Translation:
        return walk(self.read_phys_u64, cr3, vaddr, la57)

    def read_virt(self, cr3: int, vaddr: int, length: int, la57: bool = False) -> bytes:
        out = bytearray()
        while length > 0:
            n = min(length, _PAGE - vaddr % _PAGE)
            out += self.read_phys(self.translate(cr3, vaddr, la57).paddr, n)
            vaddr += n
            length -= n
        return bytes(out)

    def write_virt(self, cr3: int, vaddr: int, data: bytes, la57: bool = False) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), _PAGE - vaddr % _PAGE)
            self.write_phys(self.translate(cr3, vaddr, la57).paddr, bytes(view[:n]))
            vaddr += n
            view = view[n:]

    # --- attaching to a QEMU this process did not launch -------------------------

    def matches(self, samples: list[int]) -> bool:
        """Whether this memory is the guest's the gdbstub shows: each sample
        page reads the same both ways (guest stopped). A wrong process or
        file gives different bytes or fails to read."""
        try:
            for paddr in samples:
                page = paddr & ~(_PAGE - 1)
                if self.read_phys(page, _PAGE) != self.target.read_phys(page, _PAGE):
                    return False
        except (OSError, TargetError):
            return False
        return True


def sample_pages(target: Target) -> list[int]:
    """Guest-physical pages that tell one running guest from another: the
    page-table root of every vCPU (its lower half is the running task's own)
    and the page of each vCPU's IDT."""
    pages: list[int] = []
    for vcpu in target.vcpus:
        try:
            cr3 = target.read_register("cr3", vcpu)
            pages.append(cr3 & ADDR_MASK)
            idt = target.idt(vcpu)
            pages.append(target.translate(idt.base, vcpu).paddr)
        except TargetError:
            continue
    return sorted(set(pages))


class FileMemory(HostMemory):
    """Guest RAM through a file QEMU shares it in: ``-object
    memory-backend-file,id=ram,mem-path=FILE,share=on,size=...`` with
    ``-machine memory-backend=ram`` (or a ``memory-backend-memfd`` with
    ``share=on`` opened through ``/proc/PID/fd``).

    On a PC machine the file's first bytes are guest-physical address 0
    onward, up to the start of the PCI hole below 4 GiB: 2 GiB at least on
    both ``pc`` and ``q35``, so this class answers guest-physical addresses
    below ``min(file size, 2 GiB)`` from the file and the rest through the
    gdbstub (guest stopped). Data only, as for :class:`HostMemory`.
    """

    WINDOW_MAX = 0x8000_0000

    def __init__(self, target: Target, path: str) -> None:
        self.target = target
        self.pid = 0
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR)
            self.window = min(os.fstat(self._fd).st_size, self.WINDOW_MAX)
        except OSError as exc:
            raise TargetError(f"guest memory {path}: {exc.strerror or exc}") from exc
        self._chunks = {}
        self._pages = {}
        self._ranges = []

    def prime(self, start: int, size: int) -> bool:
        return start + size <= self.window

    def covers(self, paddr: int, length: int) -> bool:
        return paddr + length <= self.window

    def _hva(self, paddr: int) -> int:
        if paddr >= self.window:
            raise TargetError(f"{paddr:#x} is past {self.path}'s first {self.window:#x} bytes")
        return paddr

    def read_phys(self, paddr: int, length: int) -> bytes:
        if not self.covers(paddr, length):
            return self.target.read_phys(paddr, length)
        return super().read_phys(paddr, length)

    def write_phys(self, paddr: int, data: bytes) -> None:
        if not self.covers(paddr, len(data)):
            self.target.write_phys(paddr, data)
            return
        super().write_phys(paddr, data)

    def read_phys_u64(self, paddr: int) -> int:
        if not self.covers(paddr, 8):
            return self.target.read_phys_u64(paddr)
        return super().read_phys_u64(paddr)
