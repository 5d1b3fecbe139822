"""What qprobes knows about a running Linux kernel: symbols, types, ``current``.

Symbols come from the kernel's own kallsyms tables and types from its BTF,
both read from guest memory, so a stock distribution kernel needs no debug
package. ``current`` (the task a probe hit interrupted) is the per-CPU
``current_task`` read through the vCPU's GS base, and ``comm``/``pid`` are
read at the ``task_struct`` offsets BTF gives.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from qprobes.errors import ProbeError, QprobesError, SymbolError
from qprobes.progress import progress
from qprobes.symbols.btf import Btf, read_guest_btf
from qprobes.symbols.elf import SymbolTable
from qprobes.symbols.kallsyms import read_guest_kallsyms
from qprobes.target.target import Target

ReadPhys = Callable[[int, int], bytes]

# Text that must not be probed (Linux's kprobe blacklist: the NOKPROBE
# sections and the entry code, which runs on stacks and GS bases an int3
# handler cannot trust). Pairs of linker symbols.
BLACKLIST_SECTIONS = (
    ("__entry_text_start", "__entry_text_end", "entry code (.entry.text)"),
    ("__irqentry_text_start", "__irqentry_text_end", "interrupt entry (.irqentry.text)"),
    ("__softirqentry_text_start", "__softirqentry_text_end", "softirq entry"),
    ("__noinstr_text_start", "__noinstr_text_end", "noinstr code (.noinstr.text)"),
    ("__kprobes_text_start", "__kprobes_text_end", "NOKPROBE code (.kprobes.text)"),
)


def _read_btf(target: Target, symbols: SymbolTable, read_phys: ReadPhys | None) -> Btf | None:
    """The kernel's BTF from guest memory, or None when it has none."""
    with progress.step("reading the kernel's types (BTF) from guest memory"):
        try:
            return read_guest_btf(target, symbols, read_phys=read_phys)
        except SymbolError:
            return None


@dataclass
class TaskLayout:
    """Offsets into ``struct task_struct`` from BTF."""

    comm: int
    comm_size: int
    pid: int
    tgid: int


class LinuxKernel:
    """Symbols, BTF and task access for one Linux guest."""

    def __init__(self, symbols: SymbolTable, btf: Btf | None) -> None:
        self.symbols = symbols
        self.btf = btf
        self.task: TaskLayout | None = None
        self.current_task: int | None = None
        self._slide: int | None = None
        if "current_task" in symbols:
            self.current_task = symbols.address("current_task")
        if btf is not None:
            comm, comm_size = btf.struct_member_offset("task_struct", "comm")
            pid, _ = btf.struct_member_offset("task_struct", "pid")
            tgid, _ = btf.struct_member_offset("task_struct", "tgid")
            self.task = TaskLayout(comm, comm_size, pid, tgid)

    @classmethod
    def load(cls, target: Target, read_phys: ReadPhys | None = None) -> LinuxKernel:
        """Read kallsyms and BTF from a stopped guest."""
        with progress.step("reading the kernel's symbols (kallsyms) from guest memory"):
            symbols = read_guest_kallsyms(target, read_phys=read_phys)
        return cls(symbols, _read_btf(target, symbols, read_phys))

    @classmethod
    def from_file(cls, target: Target, path: str, read_phys: ReadPhys | None = None) -> LinuxKernel:
        """Symbols from a System.map or vmlinux, slid to where the running
        kernel is: the guest's #DE gate must point at ``asm_exc_divide_error``."""
        from qprobes.arch.x86_64.idt import gate_offset
        from qprobes.symbols.sysmap import apply_slide, load_system_map, load_vmlinux_symbols

        with open(path, "rb") as f:
            is_elf = f.read(4) == b"\x7fELF"
        with progress.step(f"reading the kernel's symbols from {path}"):
            table = load_vmlinux_symbols(path) if is_elf else load_system_map(path)
        idt = target.idt()
        handler = gate_offset(target.read_phys(target.translate(idt.base).paddr, 16))
        anchor = "asm_exc_divide_error"
        if anchor not in table:
            raise SymbolError(f"{path} has no {anchor}: cannot find the KASLR slide")
        slide = handler - table.address(anchor)
        if slide % 0x200000:
            raise SymbolError(
                f"{path} does not match the running kernel (the #DE handler is at "
                f"{handler:#x}, {anchor} at {table.address(anchor):#x} in the file)"
            )
        table = apply_slide(table, slide) if slide else table
        kernel = cls(table, _read_btf(target, table, read_phys))
        kernel._slide = slide
        return kernel

    @property
    def text(self) -> int:
        """The kernel's ``_text`` (slid by KASLR)."""
        return self.symbols.address("_text")

    @property
    def slide(self) -> int:
        if self._slide is not None:
            return self._slide
        return int(getattr(self.symbols, "slide", self.text - 0xFFFF_FFFF_8100_0000))

    def blacklist(self, read: Callable[[int, int], bytes]) -> list[tuple[int, int, str]]:
        """Address ranges kprobes refuses: the sections above and every entry
        of the kernel's runtime blacklist (:meth:`nokprobe_list`).

        Raises :class:`ProbeError` when the kernel's list cannot be read:
        probing without it would let an int3 into the int3 handler's path.
        """
        ranges = []
        for first, last, why in BLACKLIST_SECTIONS:
            if first in self.symbols and last in self.symbols:
                ranges.append((self.symbols.address(first), self.symbols.address(last), why))
        ranges += self.nokprobe_list(read)
        return ranges

    def nokprobe_list(self, read: Callable[[int, int], bytes]) -> list[tuple[int, int, str]]:
        """The kernel's ``kprobe_blacklist`` list (kernel/kprobes.c: one
        ``struct kprobe_blacklist_entry`` per ``NOKPROBE_SYMBOL`` function and
        per function of the ``.kprobes.text``, ``.noinstr.text`` and
        ``.entry.text`` areas, filled by ``populate_kprobe_blacklist()``; the
        ``_kprobe_blacklist`` section it comes from is init data, freed after
        boot), walked with BTF's layout. What ``/sys/kernel/debug/kprobes/blacklist``
        lists, in the same order."""
        head_name, entry = "kprobe_blacklist", "kprobe_blacklist_entry"

        def refuse(reason: str) -> ProbeError:
            return ProbeError(f"cannot read Linux's kprobe blacklist ({reason}): "
                              "refusing to probe this kernel")  # fmt: skip

        if head_name not in self.symbols:
            raise refuse(f"no {head_name} symbol: a kernel built without CONFIG_KPROBES?")
        if self.btf is None:
            raise refuse(f"the kernel has no BTF to give struct {entry}")
        try:
            link, _ = self.btf.struct_member_offset(entry, "list")
            start_off, _ = self.btf.struct_member_offset(entry, "start_addr")
            end_off, _ = self.btf.struct_member_offset(entry, "end_addr")
        except SymbolError as exc:
            raise refuse(str(exc)) from exc
        head = self.symbols.address(head_name)
        ranges: list[tuple[int, int, str]] = []
        try:
            (node,) = struct.unpack("<Q", read(head, 8))
            while node != head:
                if len(ranges) >= 1 << 20:
                    raise refuse(f"{head_name} does not end")
                entry_addr = node - link
                (start,) = struct.unpack("<Q", read(entry_addr + start_off, 8))
                (end,) = struct.unpack("<Q", read(entry_addr + end_off, 8))
                found = self.symbols.resolve(start)
                name = found[0].name if found else f"{start:#x}"
                ranges.append((start, end, f"Linux's kprobe blacklist lists {name}"))
                (node,) = struct.unpack("<Q", read(node, 8))
        except QprobesError as exc:
            if isinstance(exc, ProbeError):
                raise
            raise refuse(f"{head_name} could not be walked: {exc}") from exc
        if not ranges:
            raise refuse(f"{head_name} is empty (kprobes not initialised yet?)")
        return ranges

    def current(self, gs_base: int, read: Callable[[int, int], bytes]) -> int | None:
        """The ``task_struct`` address running on the vCPU whose GS base is given."""
        if self.current_task is None or not gs_base:
            return None
        (task,) = struct.unpack("<Q", read(gs_base + self.current_task, 8))
        return int(task) or None

    def comm_pid(self, gs_base: int, read: Callable[[int, int], bytes]) -> tuple[str, int] | None:
        """(comm, pid) of the current task, or None when it cannot be read."""
        if self.task is None:
            return None
        try:
            task = self.current(gs_base, read)
            if task is None:
                return None
            comm = read(task + self.task.comm, self.task.comm_size).split(b"\0", 1)[0]
            (pid,) = struct.unpack("<i", read(task + self.task.pid, 4))
        except (QprobesError, struct.error):  # unmapped or torn: report no task
            return None
        return comm.decode(errors="replace"), int(pid)
