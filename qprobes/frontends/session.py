"""The Python API: a guest with the kprobe engine attached.

::

    from qprobes import Session

    with Session.qtest() as s:
        @s.kprobe("t_hot")
        def on_hot(kp, ctx):
            print("t_hot", ctx.regs.rdi)

        @s.kretprobe("t_hot")
        def on_ret(rp, ctx):
            print("returned", ctx.retval)

        print(s.command("run t_hot 3"))

Handlers have Linux's shapes: ``pre_handler(kp, ctx) -> bool``,
``post_handler(kp, ctx, flags)``, ``fault_handler(kp, ctx, trapnr) -> bool``,
a kretprobe ``handler(rp, ctx)``. ``ctx`` is a
:class:`~qprobes.probes.context.HitContext`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from qprobes.errors import (
    ConnectionClosedError,
    GuestDiedError,
    MachineError,
    ProbeError,
    QprobesError,
    StubTimeoutError,
    TargetError,
)
from qprobes.frontends.watchdog import Watchdog
from qprobes.machine.guests import QTEST_PROMPT, qtest_config
from qprobes.machine.qemu import MachineConfig, QemuMachine, attach
from qprobes.probes.engine import KprobeEngine
from qprobes.probes.journal import Contents, JournalError, JournalState, owner_still_running
from qprobes.probes.jprobe import Jprobe, JprobeManager
from qprobes.probes.kprobe import Kprobe
from qprobes.probes.kretprobe import Kretprobe, KretprobeManager
from qprobes.remote.client import GdbClient
from qprobes.symbols.elf import Symbol, SymbolTable, load_elf_symbols
from qprobes.target.hostmem import FileMemory, HostMemory, sample_pages
from qprobes.target.target import Target

if TYPE_CHECKING:
    from qprobes.frontends.gdbserver import GdbServer
    from qprobes.linux.clock import GuestClock
    from qprobes.linux.modules import LinuxModules
    from qprobes.linux.preempt import PreemptState
    from qprobes.linux.text import KernelText
    from qprobes.probes.context import HitContext
    from qprobes.symbols.linux import LinuxKernel

F = TypeVar("F", bound=Callable[..., Any])

#: x86-64 module text (and ftrace/BPF trampolines): MODULES_VADDR upward.
MODULES_START = 0xFFFFFFFFA0000000
MODULES_END = 0xFFFFFFFFFF000000


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`Session.recover` found in the guest's journal."""

    recovered: bool
    contents: Contents | None
    fast_returns: int = 0  # return addresses of fast return instances put back

    def describe(self) -> str:
        c = self.contents
        if c is None:
            return "nothing to recover: the guest holds no qprobes journal"
        if not self.recovered:
            return (f"nothing to recover: the last qprobes session ({c.header.owner()}) "
                    f"left as it should ({c.header.state.name.lower()})")  # fmt: skip
        return (f"recovered the changes of {c.header.owner()}: {len(c.sites)} probe sites, "
                f"{len(c.rets) + self.fast_returns} return addresses, {len(c.gates)} IDT gates and "
                f"{len(c.ptes)} page-table entries put back; {len(c.steps)} vCPUs "
                "were mid-step")  # fmt: skip

CURSOR_QUERY = b"\x1b[6n"

log = logging.getLogger(__name__)


_ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")

#: Under KVM the default guest boots in about a second; where KVM is present
#: but broken, QEMU hangs after the firmware with no error.
KVM_BOOT_TIMEOUT = 30.0


#: Where a kernel's report of a crash begins (the first line shown of it).
_REPORT_START = re.compile(
    r"Kernel panic - not syncing|BUG:|Oops:|general protection fault|sysrq: Trigger a crash|"
    r"unable to handle|double fault|invalid opcode:|WARNING:"
)
#: Console lines shown when the guest died without a kernel report, and at most with one.
CONSOLE_TAIL_LINES = 15
CONSOLE_REPORT_LINES = 40
#: Lines shown before a panic that ends no other report.
CONSOLE_PANIC_CONTEXT = 5


def console_tail(text: str) -> tuple[list[str], bool]:
    """The lines of a guest's console worth showing when it died, and whether
    the guest panicked: from the start of the last kernel report (a panic or
    oops and its stack) that ends in a panic, else the last lines."""
    lines = [line.rstrip() for line in _ANSI.sub("", text.replace("\r\n", "\n")).splitlines()]
    while lines and not lines[-1].strip():
        lines.pop()
    recent = lines[-CONSOLE_REPORT_LINES * 2 :]
    panicked = any("Kernel panic - not syncing" in line for line in recent)
    if panicked:
        panic = max(i for i, line in enumerate(recent) if "Kernel panic - not syncing" in line)
        start = None
        # The report the panic ends (an oops, a BUG, sysrq) begins a little before it.
        for i in range(panic - 1, max(-1, panic - CONSOLE_REPORT_LINES), -1):
            if _REPORT_START.search(recent[i]):
                start = i
        if start is None:
            # A panic of its own (no root file system, say): the lines before
            # it say why.
            start = max(0, panic - CONSOLE_PANIC_CONTEXT)
        return recent[start:][:CONSOLE_REPORT_LINES], True
    return lines[-CONSOLE_TAIL_LINES:], False


def guest_died(machine: QemuMachine, when: str = "") -> GuestDiedError:
    """What to tell the user about a guest whose QEMU exited: one line (the
    guest panicked, or how QEMU ended), ``when`` appended (``before its
    prompt``), and the tail of its console."""
    how = machine.exit_description() or "QEMU stopped answering"
    tail, panicked = console_tail(machine.console_text())
    suffix = f" {when}" if when else ""
    why = f"the guest panicked{suffix} ({how})" if panicked else f"{how}{suffix}"
    return GuestDiedError(why, tail or ["(no console output)"])


def _boot_to(machine: QemuMachine, until: bytes, timeout: float) -> None:
    """Run the console until ``until``; a guest that dies or hangs first is
    one error line with the tail of its console (a panic, say)."""
    kvm = machine.config.accel == "kvm"
    if kvm:
        timeout = min(timeout, KVM_BOOT_TIMEOUT)
    try:
        data = machine.console.tube.recvuntil(until, timeout=timeout)
        if data.endswith(until):
            return
        why = f"no guest prompt within {timeout:g} s"
        if kvm:
            why += " under --accel kvm: KVM does not work on this host; use --accel tcg"
    except EOFError:  # QEMU closed the console: it is exiting
        why = "QEMU closed the guest's console before its prompt"
        with contextlib.suppress(MachineError):
            machine.wait(5.0)
    if not machine.alive():
        raise guest_died(machine, "before its prompt")
    tail, _ = console_tail(machine.console_text())
    lines = "\n".join(f"    {line}" for line in tail) if tail else "    (no console output)"
    raise MachineError(f"{why}; the last lines of its console:\n{lines}")


def kaslr_off(cmdline: str) -> bool:
    """Whether a kernel command line turns KASLR off (``nokaslr`` anywhere
    in it: the decompressor's ``cmdline_find_option_bool``)."""
    return "nokaslr" in cmdline.split()



def attached_memory(target: Target, *, host_memory: bool = True,
                    guest_memory: str | Path | None = None) -> HostMemory | None:  # fmt: skip
    """A way to guest RAM past the gdbstub for an attached QEMU, or None.

    ``guest_memory`` (a file QEMU shares the guest's RAM in) must show the
    same pages as the gdbstub, or it is refused. Otherwise the process at
    the other end of the connection, when it is on this host, is asked
    for its RAM through ``/proc/PID/mem``; a process that is not QEMU
    (a proxy), or one this process may not read, gives None: the gdbstub
    does everything, as before.
    """
    samples = sample_pages(target)
    if guest_memory is not None:
        mem: HostMemory = FileMemory(target, str(guest_memory))
        if not samples or not mem.matches(samples):
            mem.close()
            raise TargetError(f"guest memory {guest_memory}: its pages are not this guest's "
                              "(give the mem-path of its memory-backend-file, share=on)")
        log.info("guest RAM through %s", guest_memory)
        return mem
    if not host_memory:
        return None
    pid = target.client.conn.peer_pid()
    if pid is None:
        return None
    try:
        mem = HostMemory(target, pid)
    except OSError as exc:
        log.info("no /proc/%d/mem (%s): guest RAM through the gdbstub", pid, exc.strerror)
        return None
    if not samples or not mem.matches(samples):
        log.info("process %d does not show the guest's RAM: through the gdbstub", pid)
        mem.close()
        return None
    mem.prime_low()
    log.info("guest RAM through /proc/%d/mem", pid)
    return mem

class Session:
    """A guest, its symbols, and a :class:`KprobeEngine` attached to it."""

    def __init__(
        self,
        target: Target,
        *,
        reserve: tuple[int, int],
        near: int,
        symbols: SymbolTable | None = None,
        machine: QemuMachine | None = None,
        prompt: bytes | None = None,
        host_memory: bool = True,
        hostmem: HostMemory | None = None,
    ) -> None:
        self.target = target
        self.machine = machine
        self.symbols = symbols
        self.prompt = prompt
        # Reading guest RAM through /proc/PID/mem needs the QEMU process
        # (ours, or an attached one found on this host: ``hostmem``);
        # host_memory=False uses the gdbstub for everything.
        if machine is not None and host_memory and hostmem is None:
            hostmem = HostMemory(target, machine.pid)
            # Low RAM above the first MiB (below it sit the BIOS and VGA holes).
            low = min(machine.config.memory_mib << 20, 0xB000_0000)
            hostmem.prime(0x100000, low - 0x100000)
        self.hostmem = hostmem
        self.engine = KprobeEngine(target, reserve, near, symbols=symbols, hostmem=hostmem)
        self.kernel: LinuxKernel | None = None
        self.text: KernelText | None = None  # a Linux guest's text rules
        self.modules: LinuxModules | None = None  # a Linux guest's loaded modules
        self._recovering = False
        self.recovered: bool | None = None  # Session.recover: whether there was anything
        self._module_watch: Kprobe | None = None
        # A Linux guest's trace clock and context reader (set by use_linux):
        # trace events then carry the guest's own timestamps and flags.
        self.trace_clock: GuestClock | None = None
        self.trace_state: PreemptState | None = None
        self.kretprobes = KretprobeManager(self.engine)
        self.jprobes = JprobeManager(self.engine)
        self._closed = False
        self._fault_said = False  # a GuestDiedError was raised already
        self._address: str | None = None  # the gdbstub of an attached QEMU
        #: The watchdog of an attached Linux guest (see qprobes.frontends.watchdog).
        self.watchdog: Watchdog | None = None
        #: The gdb endpoint, once :meth:`serve_gdb` started it.
        self.gdb_server: GdbServer | None = None

    # --- construction -------------------------------------------------------

    @classmethod
    def boot(cls, config: MachineConfig, *, symbols: SymbolTable | None = None,
             near: int | None = None, prompt: bytes | None = None,
             boot_until: bytes | None = None, boot_timeout: float = 60.0,
             attach: bool = True, host_memory: bool = True) -> Session:  # fmt: skip
        """Boot ``config`` and attach; with ``boot_until``, run until the console shows it."""
        from qprobes.progress import progress

        machine = QemuMachine(config)
        vcpus = f"{config.smp} vCPU" + ("s" if config.smp > 1 else "")
        title = f"booting {Path(config.kernel).name} ({config.accel.upper()}, {vcpus})"
        with progress.step(title):
            machine.launch()
            try:
                if boot_until is not None:
                    machine.target.resume()
                    _boot_to(machine, boot_until, boot_timeout)
                    machine.target.stop()
            except BaseException:
                machine.shutdown()
                raise
        try:
            if near is None:
                if symbols is None:
                    raise ProbeError("give a kernel text address (near=) or symbols")
                near = min(s.addr for s in symbols if s.kind == "func")
            session = cls(machine.target, reserve=config.reserved, near=near, symbols=symbols,
                          machine=machine, prompt=prompt, host_memory=host_memory)  # fmt: skip
            if attach:
                session.engine.attach()
        except BaseException:
            machine.shutdown()
            raise
        return session

    @classmethod
    def qtest(cls, smp: int = 1, append: str = "", attach: bool = True,
              host_memory: bool = True, **config: Any) -> Session:  # fmt: skip
        """Boot the built-in qtest kernel to its shell prompt and attach
        (``attach=False``: call ``session.engine.attach()`` yourself)."""
        cfg = qtest_config(append=append, smp=smp, **config)
        symbols = load_elf_symbols(cfg.kernel)
        return cls.boot(cfg, symbols=symbols, near=symbols.address("t_hot"),
                        prompt=QTEST_PROMPT, boot_until=QTEST_PROMPT, attach=attach,
                        host_memory=host_memory)  # fmt: skip

    @classmethod
    def linux(cls, config: MachineConfig | None = None, *, kaslr: bool = False, smp: int = 1,
              boot_timeout: float = 120.0, symbols_file: str | None = None, append: str = "",
              kernel: str | Path | None = None, initrd: str | Path | None = None,
              **config_args: Any) -> Session:  # fmt: skip
        """Boot a Linux guest (default: the built-in one) to its shell prompt,
        recover its symbols and types from memory, and attach.

        ``append`` is added to the kernel command line; ``kernel`` and
        ``initrd`` replace the built-in guest's (a kernel alone boots with
        the built-in busybox initramfs)."""
        from qprobes.machine.linux import LINUX_PROMPT, linux_config

        if config is None:
            # Echo off: the console then carries only output and prompts.
            config = linux_config(append=f"qprobes.echo=0 {append}".strip(), kaslr=kaslr,
                                  smp=smp, **config_args)  # fmt: skip
            if kernel is not None:
                config.kernel = Path(kernel)
            if initrd is not None:
                config.initrd = Path(initrd)
        session = cls.boot(config, near=0, prompt=LINUX_PROMPT, boot_until=LINUX_PROMPT,
                           boot_timeout=boot_timeout, attach=False)  # fmt: skip
        try:
            session.use_linux(symbols_file)
        except BaseException:
            session.close()
            raise
        return session

    def use_linux(self, symbols_file: str | None = None) -> None:
        """Load the guest kernel's symbols (its kallsyms, or ``symbols_file``:
        a System.map or vmlinux) and BTF (guest stopped), then attach with
        Linux's kprobe blacklist."""
        from qprobes.linux.text import KernelText
        from qprobes.symbols.linux import LinuxKernel

        read_phys = self.hostmem.read_phys if self.hostmem is not None else None
        if symbols_file is not None:
            kernel = LinuxKernel.from_file(self.target, symbols_file, read_phys=read_phys)
        else:
            kernel = LinuxKernel.load(self.target, read_phys=read_phys)
            self._remember_boot(kernel)
        self.kernel = kernel
        self.symbols = kernel.symbols
        self.engine.symbols = kernel.symbols
        self.engine.area.near = kernel.text
        from qprobes.linux.current import LinuxTasks

        # Return probes chain their instances per task (Linux's current).
        self.kretprobes.tasks = LinuxTasks(kernel, self.engine.read_data)
        if "init_top_pgt" in kernel.symbols:
            # Walk kernel memory through init_mm's page table, which lives as
            # long as the kernel: the cr3 of whatever task runs at attach is
            # freed when that task exits.
            self.engine.area.root_vaddr = kernel.symbols.address("init_top_pgt")
        if "_end" in kernel.symbols:
            # The unused tail of the kernel image mapping: no allocator of the
            # guest hands it out (a module or BPF program could land in the
            # module area).
            self.engine.area.image = (kernel.text, kernel.symbols.address("_end"))
        from qprobes.progress import progress

        # Modules first: the journal records which module a probe site is in,
        # and a recovery checks it is still that module's code.
        self._use_modules(kernel)
        self._use_cpu_number(kernel)
        with progress.step("attaching (kprobe blacklist, the text the kernel rewrites)"):
            if self._recovering:
                self.recovered = self.engine.adopt()
                if not self.recovered:
                    return  # nothing of a dead session's to put back
            else:
                self.engine.attach()
            try:
                # Linux's blacklist and the text the kernel rewrites, read through
                # the kernel's page tables (known once attached); without them no
                # probe is safe, so a failure detaches again.
                blacklist = kernel.blacklist(self.engine.read_data)
                text = KernelText.load(kernel, self.engine.read_data, blacklist)
            except BaseException:
                self.engine.detach()
                raise
        for start, end, why in blacklist:
            self.engine.blacklist(start, end, why)
        self.text = text
        self.engine.text_check = text.check_text
        self.engine.address_check = text.check_insn
        self.engine.text_lock_held = text.text_mutex_held
        self.engine.recover_text = text.recover
        self.engine.batch_hooks.append(text.batch)
        self._use_ftrace(kernel)
        self._use_linux_stacks(kernel)
        self._use_orc(kernel)
        self._use_linux_clock(kernel)
        self._use_extable(kernel)

    def _use_cpu_number(self, kernel: LinuxKernel) -> None:
        """Let the stubs find the CPU through GS (Linux's per-CPU CPU
        number) instead of cpuid, which exits to the hypervisor under KVM."""
        from qprobes.linux.percpu import cpu_number_offset, numbering_matches

        offset = cpu_number_offset(kernel)
        if offset is None:
            return
        if numbering_matches(self.target, lambda a, n: self.target.read(a, n), offset):
            self.engine.cpu_number_offset = offset
        else:
            log.info("the guest's CPU numbers do not follow the vCPUs: the stubs use cpuid")

    def _use_extable(self, kernel: LinuxKernel) -> None:
        """Linux's rules for detours (jump-optimized probes): no detour in a
        function with exception-table entries, and a jmp to a retpoline thunk
        is an indirect jump. Without the table no probe is detoured."""
        from qprobes.linux.extable import ExceptionTable, indirect_thunks

        self.engine.indirect_thunks = indirect_thunks(kernel.symbols)
        if kernel.btf is None:
            self.engine.detour_function_check = lambda _s, _e: "no BTF to read __ex_table with"
            return
        try:
            table = ExceptionTable.load(kernel.symbols, kernel.btf, self.engine.read_data)
        except QprobesError as exc:
            why = f"the exception table cannot be read ({exc})"
            self.engine.detour_function_check = lambda _s, _e: why
            return
        self.engine.detour_function_check = table.detour_check

    def _use_modules(self, kernel: LinuxKernel) -> None:
        """The guest's module list, for ``MOD:SYM`` probes, module symbols,
        module BTF and module stack frames."""
        from qprobes.linux.modules import LinuxModules, ModuleError

        if kernel.btf is None:
            return
        try:
            self.modules = LinuxModules(kernel.symbols, kernel.btf, self.engine.read_data)
        except ModuleError as exc:
            log.info("no module support: %s", exc)
            return
        modules = self.modules

        def resolve(addr: int) -> tuple[Symbol, int] | None:
            try:
                found = modules.resolve(addr)
            except QprobesError:
                return None
            return (found[0], found[1]) if found is not None else None

        self.engine.resolve_more = resolve

        def module_base(addr: int) -> int | None:
            if not MODULES_START <= addr < MODULES_END:
                return 0
            try:
                found = modules.module_at(addr, fresh=True)  # its state as it is now
            except QprobesError:
                return None
            return found.text if found is not None and found.live else None

        self.engine.module_base = module_base
        self.engine.on_module_probe = lambda addr: self.watch_modules()

    def watch_modules(self) -> None:
        """Drop the probes of a module when it unloads, before its memory is
        freed (Linux's ``kprobes_module_callback``): a probe on the guest's
        ``free_module`` kills every probe in the module's core mapping and
        reports it; their saved bytes are never written into freed memory.
        Armed the first time a probe goes into a module."""
        if self._module_watch is not None or self.modules is None or self.kernel is None:
            return
        if "free_module" not in self.kernel.symbols:
            log.warning("the guest has no free_module: probes in a module that unloads "
                        "are not dropped")  # fmt: skip
            return
        modules, engine = self.modules, self.engine

        def going(kp: Kprobe, ctx: HitContext) -> bool:
            mod_addr = ctx.regs.rdi
            gone = next((m for m in modules.modules() if m.addr == mod_addr), None)
            # Whatever was read about modules may be another module's soon
            # (its successor can get the same addresses).
            modules.invalidate()
            if self.text is not None:
                self.text.forget_modules()
            if gone is None:
                return False
            killed = engine.kill_range(gone.text, gone.text + gone.size,
                                       f"its module {gone.name} was unloaded")  # fmt: skip
            for probe in killed:
                log.warning("probe dropped: %s (module %s unloaded)", probe.name or probe,
                            gone.name)  # fmt: skip
            return False

        self._module_watch = self.engine.register_kprobe(
            Kprobe(symbol_name="free_module", pre_handler=going, name="qprobes/module-watch")
        )

    def _use_orc(self, kernel: LinuxKernel) -> None:
        """Kernel stack traces for ``ctx.stack()``, from the guest's ORC
        tables; return addresses qprobes' and the guest's own trampolines
        replaced are shown as the real ones."""
        from qprobes.linux.orc import OrcError, OrcUnwinder

        if kernel.btf is None:
            return
        try:
            unwinder = OrcUnwinder.for_kernel(
                kernel.symbols, kernel.btf, self.engine.read_data, modules=self.modules
            )
        except OrcError as exc:
            log.info("no kernel stack traces: %s", exc)
            return
        kretprobes = self.kretprobes

        def stack(ctx: HitContext) -> list[int]:
            def recover(slot: int, ret: int) -> int:
                fastret = self.engine.fastret
                for _ in range(4):  # a fast and a slow trampoline can chain
                    if fastret is not None and fastret.is_trampoline(ret):
                        ret = fastret.find_ret_addr(slot, ret)
                    elif ret == kretprobes.trampoline:
                        ret = kretprobes.find_ret_addr(slot) or ret
                    else:
                        break
                see = kretprobes.see_through
                return see(ctx, slot, ret) if see is not None else ret

            return unwinder.unwind(
                ctx.regs.as_dict(), ctx.read, recover, return_address=ctx.kind == "kretprobe"
            )

        self.engine.stack_unwinder = stack

    def _remember_boot(self, kernel: LinuxKernel) -> None:
        """A guest of ours booted with KASLR off: record its kallsyms under the
        kernel image's sha256, so that ``qprobes symbols`` of the same image
        needs no boot next time."""
        from qprobes.machine.linux import sha256_file
        from qprobes.symbols.kallsyms import KallsymsTable, remember_boot

        if self.machine is None or not isinstance(kernel.symbols, KallsymsTable):
            return
        if not kaslr_off(self.machine.config.kernel_cmdline()):
            return
        with contextlib.suppress(OSError):
            remember_boot(sha256_file(Path(self.machine.config.kernel)), kernel.symbols)

    def _use_linux_clock(self, kernel: LinuxKernel) -> None:
        """The guest's clocks (its sched_clock() and ftrace's current trace
        clock) and the state of an interrupted context (preempt count,
        need-resched) for trace events."""
        from qprobes.linux.clock import ClockError, GuestClock
        from qprobes.linux.memory import KernelMemory
        from qprobes.linux.preempt import PreemptState

        # Every event reads per-CPU data and its task: by __pa, not page walks.
        read_phys = self.hostmem.read_phys if self.hostmem is not None else None
        read = KernelMemory.from_kernel(kernel, self.engine.read_data, read_phys)
        try:
            self.trace_clock = GuestClock(kernel, read)
        except (ClockError, QprobesError) as exc:
            log.warning("%s: trace timestamps are host time since the trace began", exc)
        try:
            self.trace_state = PreemptState(kernel, read)
        except QprobesError as exc:
            log.warning("%s: trace events show only the interrupt flag", exc)

    def _use_ftrace(self, kernel: LinuxKernel) -> None:
        """Give the engine the guest's ftrace records: probes at an ftrace
        site then go on the next instruction instead of breaking ftrace."""
        from qprobes.linux.ftrace import FtraceRecords

        if "ftrace_pages_start" not in kernel.symbols:
            return  # no dynamic ftrace: nothing patches function entries
        if kernel.btf is None:
            log.warning("no BTF: qprobes cannot read the guest's ftrace records, and a probe "
                        "at an ftrace site (SYM+0) breaks the guest's ftrace")  # fmt: skip
            return
        from qprobes.linux.retaddr import GuestReturnHooks

        self.kretprobes.see_through = GuestReturnHooks(kernel)
        try:
            self.engine.ftrace = ftrace = FtraceRecords.from_kernel(
                kernel.symbols, kernel.btf, self.engine.read_data
            )
        except QprobesError as exc:
            raise ProbeError(f"cannot read the guest's ftrace records: {exc}") from exc
        self.engine.batch_hooks.append(ftrace.batch)

    def _use_linux_stacks(self, kernel: LinuxKernel) -> None:
        """Let the engine look at the guest's task and interrupt stacks, so that
        freed slots and the area are released only when nothing points in."""
        from qprobes.linux.tasks import LinuxStacks, TaskError

        if kernel.btf is None:
            log.warning("the guest kernel has no BTF: detach checks only the vCPUs' rips, "
                        "and a task interrupted inside a slot may crash after detach")  # fmt: skip
            return
        try:
            self.engine.stack_scanner = LinuxStacks(
                kernel.symbols, kernel.btf, self.engine.read_data, len(self.target.vcpus)
            )
        except TaskError as exc:
            log.warning("%s: detach checks only the vCPUs' rips", exc)

    @classmethod
    def attach(cls, address: str, *, reserve: tuple[int, int], near: int | None = None,
               symbols: str | Path | None = None, linux: bool = False,
               watchdog: bool = True, host_memory: bool = True,
               guest_memory: str | Path | None = None) -> Session:  # fmt: skip
        """Attach to a running QEMU's gdbstub. ``reserve`` names guest-physical
        memory the guest does not use (see the README).

        Guest RAM is then read and written past the gdbstub where it can be
        (:func:`attached_memory`): through the file QEMU shares it in
        (``guest_memory``), or through ``/proc/PID/mem`` of the QEMU process
        at the other end of the connection when it runs on this host and
        this process may read its memory (``host_memory=False``: never).
        Fast-path rings are then drained while the guest runs; without
        either, by short stops a few times a second.

        A Linux guest gets a watchdog (``watchdog=False``: none): a process
        of its own that puts the guest back from the journal if this process
        ends without detaching (see :mod:`qprobes.frontends.watchdog`);
        :attr:`watchdog` names it. One that cannot start is a warning:
        :meth:`recover` is then the way back."""
        target = attach(address)
        try:
            hostmem = attached_memory(target, host_memory=host_memory,
                                      guest_memory=guest_memory)  # fmt: skip
        except BaseException:
            target.client.close()
            raise
        if linux or (symbols is None and near is None):
            # A Linux guest: symbols from its own memory (or the file given)
            # and types from its BTF.
            session = cls(target, reserve=reserve, near=0, hostmem=hostmem)
            session._address = address
            try:
                if watchdog:
                    try:
                        session.watchdog = Watchdog.start(address, reserve)
                    except MachineError as exc:
                        log.warning("%s: if qprobes dies attached, run qprobes attach %s "
                                    "--recover", exc, address)  # fmt: skip
                session.use_linux(str(symbols) if symbols is not None else None)
            except BaseException:
                session.close()
                raise
            return session
        table = load_elf_symbols(symbols) if symbols is not None else None
        if near is None:
            assert table is not None
            near = min(s.addr for s in table if s.kind == "func")
        session = cls(target, reserve=reserve, near=near, symbols=table, hostmem=hostmem)
        session._address = address
        session.engine.attach()
        return session

    @classmethod
    def recover(cls, address: str, *, reserve: tuple[int, int],
                force: bool = False) -> RecoveryReport:  # fmt: skip
        """Put back what a qprobes session that died attached left in a Linux
        guest (``qprobes attach ADDRESS --recover``), from the journal it
        kept in ``reserve``: its int3s, hijacked return addresses, IDT gates
        and page-table entries, with vCPUs parked in its stubs answered and
        the area released only once nothing points into it, as a normal
        detach does. Returns what was found (``recovered`` False: nothing
        to do). Refuses (:class:`JournalError`, nothing written) while the
        session that owns the journal may still run, unless ``force``."""
        target = attach(address)
        session = cls(target, reserve=reserve, near=0)
        session._address = address
        session._recovering = True
        try:
            contents = session.engine.journal_contents()
            if contents is not None and contents.header.state is JournalState.ACTIVE \
                    and not force:  # fmt: skip
                why = owner_still_running(contents.header)
                if why is not None:
                    raise JournalError(
                        f"not recovering the changes of {contents.header.owner()}: {why}; "
                        "stop it first (or --force if it is gone)"
                    )
            session.use_linux()
            recovered = bool(session.recovered)
        finally:
            session.close()
        fastret = session.engine.fastret
        return RecoveryReport(recovered, contents, fastret.stats.restored if fastret else 0)

    # --- probes -----------------------------------------------------------------

    def _where(self, where: str | int) -> dict[str, Any]:
        if isinstance(where, int):
            return {"addr": where}
        name, plus, off = where.partition("+")
        return {"symbol_name": name, "offset": int(off, 0) if plus else 0}

    def kprobe(self, where: str | int, pre_handler: Callable[..., Any] | None = None, *,
               post_handler: Callable[..., Any] | None = None,
               fault_handler: Callable[..., Any] | None = None,
               boost: bool = True, name: str | None = None) -> Any:  # fmt: skip
        """Register a kprobe at ``SYMBOL[+OFFS]`` or an address.

        With ``pre_handler`` (or neither handler) returns the :class:`Kprobe`;
        used bare as a decorator, registers the function as pre_handler.
        """

        def register(pre: Callable[..., Any] | None) -> Kprobe:
            kp = Kprobe(**self._where(where), pre_handler=pre, post_handler=post_handler,
                        fault_handler=fault_handler, boost=boost, name=name)  # fmt: skip
            return self.engine.register_kprobe(kp)

        if pre_handler is not None or post_handler is not None or fault_handler is not None:
            return register(pre_handler)

        def decorator(fn: F) -> F:
            fn.kprobe = register(fn)  # type: ignore[attr-defined]
            return fn

        return decorator

    def kprobe_many(self, wheres: Sequence[str | int],
                    pre_handler: Callable[..., Any] | None = None, *, boost: bool = True,
                    ) -> list[Kprobe | QprobesError]:  # fmt: skip
        """Register a kprobe at each of ``wheres`` (``SYMBOL[+OFFS]`` or
        addresses) in one pass with the guest stopped once
        (:meth:`~qprobes.probes.engine.KprobeEngine.register_many`): for each,
        its :class:`Kprobe`, or the error that refused it (the same error it
        would meet registered alone)."""
        out: list[Kprobe | QprobesError] = []
        kps: list[Kprobe] = []
        for where in wheres:
            try:
                kp = Kprobe(**self._where(where), pre_handler=pre_handler, boost=boost)
            except ValueError:
                out.append(ProbeError(f"{where!r} is not SYMBOL[+OFFS] or an address"))
                continue
            kps.append(kp)
            out.append(kp)
        results = iter(self.engine.register_many(kps))
        return [got if isinstance(got, QprobesError) else (next(results) or got) for got in out]

    def kretprobe(self, where: str | int, handler: Callable[..., Any] | None = None, *,
                  entry_handler: Callable[..., Any] | None = None, maxactive: int = 0,
                  name: str | None = None) -> Any:  # fmt: skip
        """Register a return probe; as a decorator, the function is the return handler."""

        def register(fn: Callable[..., Any] | None) -> Kretprobe:
            rp = Kretprobe(**self._where(where), handler=fn, entry_handler=entry_handler,
                           maxactive=maxactive, name=name)  # fmt: skip
            return self.kretprobes.register(rp)

        if handler is not None or entry_handler is not None:
            return register(handler)

        def decorator(fn: F) -> F:
            fn.kretprobe = register(fn)  # type: ignore[attr-defined]
            return fn

        return decorator

    def jprobe(self, where: str | int, entry: str | int | None = None,
               handler: Callable[..., Any] | None = None) -> Jprobe:  # fmt: skip
        """Register a jprobe: guest ``entry`` code and/or a host ``handler``."""
        jp = Jprobe(**self._where(where), entry=entry, handler=handler)
        return self.jprobes.register(jp)

    def unregister(self, probe: Kprobe | Kretprobe | Jprobe) -> None:
        if isinstance(probe, Kretprobe):
            self.kretprobes.unregister(probe)
        elif isinstance(probe, Jprobe):
            self.jprobes.unregister(probe)
        else:
            self.engine.unregister_kprobe(probe)

    def unregister_many(self, probes: Sequence[Kprobe | Kretprobe | Jprobe],
                        ) -> list[QprobesError | None]:  # fmt: skip
        """Unregister each of ``probes``: the kprobes in one pass with the guest
        stopped once (:meth:`~qprobes.probes.engine.KprobeEngine.unregister_many`),
        return probes and jprobes one by one. For each, None or the error that
        kept it registered."""
        out: list[QprobesError | None] = [None] * len(probes)
        kps = [(n, p) for n, p in enumerate(probes) if isinstance(p, Kprobe)]
        for (n, _kp), got in zip(kps, self.engine.unregister_many([kp for _n, kp in kps]),
                                 strict=True):  # fmt: skip
            out[n] = got
        for n, probe in enumerate(probes):
            if not isinstance(probe, Kprobe):
                try:
                    self.unregister(probe)
                except QprobesError as exc:
                    out[n] = exc
        return out

    # --- running ------------------------------------------------------------------

    def run(self, until: Callable[[], bool] | None = None, timeout: float | None = None,
            poll: float = 0.002) -> None:  # fmt: skip
        """Let the guest run, handling probe hits, until ``until()`` or ``timeout``.

        ``until`` is checked after each stop and every ``poll`` seconds.
        A guest that dies meanwhile (a panic, QEMU killed) raises
        :class:`~qprobes.errors.GuestDiedError`."""
        with self._faults():
            self.engine.run(until=until, timeout=timeout, poll=poll)

    #: How long QEMU may take to exit after its gdbstub connection dropped
    #: (a panicking guest reboots, and -no-reboot then ends QEMU; after a panic
    #: QEMU was gone 40 ms after the gdbstub's exit reply, measured).
    EXIT_WAIT = 2.0

    def fault(self, wait: float = 0.0) -> GuestDiedError | None:
        """What ended the guest, if it died (its QEMU exited), waiting up to
        ``wait`` seconds for QEMU to exit; None while it runs, and for an
        attached QEMU (qprobes cannot see that process)."""
        import time

        machine = self.machine
        if machine is None:
            return None
        deadline = time.monotonic() + wait
        while machine.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if machine.alive():
            return None
        return guest_died(machine)

    @contextlib.contextmanager
    def _faults(self) -> Iterator[None]:
        """Turn the errors a dead guest causes (a closed connection, failed
        reads) into one :class:`GuestDiedError` that says what happened."""
        try:
            yield
        except GuestDiedError:
            raise
        except Exception as exc:
            # A closed connection or console means QEMU is on its way out;
            # other errors may be its last words (the gdbstub's ``W`` exit
            # reply, a read of memory that is gone): a moment for those.
            closed = isinstance(exc, (ConnectionClosedError, EOFError))
            fault = self.fault(self.EXIT_WAIT if closed else 1.0)
            if fault is not None:
                self._fault_said = True
                raise fault from exc
            raise

    @property
    def console(self) -> Any:
        if self.machine is None:
            raise MachineError("an attached session has no console")
        return self.machine.console

    def command(self, line: str, timeout: float = 60.0) -> str:
        """Type ``line`` on the guest console and handle probe hits until the prompt returns."""
        text, finished = self.run_command(line, timeout=timeout)
        if not finished:
            raise MachineError(
                f"no prompt after {line!r} within {timeout} s; console: {text[-400:]!r}"
            )
        return text

    def run_command(self, line: str, *, timeout: float | None = None,
                    interrupted: Callable[[], bool] | None = None) -> tuple[str, bool]:  # fmt: skip
        """Type ``line`` on the console and serve probe hits until the prompt
        returns, ``timeout`` passes or ``interrupted()`` is true (then the
        guest command gets a Ctrl-C too). Returns the output and whether the
        prompt came back."""
        if self.prompt is None:
            raise MachineError("this guest has no known shell prompt")
        tube = self.console.tube
        prompt = self.prompt
        buf = bytearray()

        def done() -> bool:
            # A select() on the socket costs a microsecond; pwntools' own
            # zero-timeout recv about 60 (this runs after every probe hit).
            while len(tube.buffer) or select.select([tube.sock], [], [], 0)[0]:
                data = tube.recv(4096, timeout=0)
                if not data:
                    break
                # busybox's line editor asks for the cursor position after
                # each prompt; that query is not output.
                buf.extend(data.replace(CURSOR_QUERY, b""))
            return buf.endswith(prompt) or (interrupted is not None and interrupted())

        with self._faults():
            tube.sendline(line.encode())
        self.run(until=done, timeout=timeout)
        finished = buf.endswith(prompt)
        if not finished and interrupted is not None and interrupted():
            tube.send(b"\x03")
        raw = bytes(buf[: -len(prompt)] if finished else buf)
        text = raw.decode(errors="replace").replace("\r\n", "\n")
        first, _, rest = text.partition("\n")
        return (rest if first.strip() == line.strip() else text), finished

    def last_status(self, timeout: float = 30.0) -> int:
        """The exit status of the last command the guest shell ran (``$?``)."""
        text = self.command("echo $?", timeout=timeout)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines or not lines[-1].isdigit():
            raise MachineError(f"cannot read the guest command's exit status from {text!r}")
        return int(lines[-1])

    # --- a gdb beside the probes ----------------------------------------------------

    def serve_gdb(self, listen: str, *, stopping: Callable[[], bool] | None = None) -> GdbServer:
        """Serve a GDB remote endpoint on ``listen`` (``HOST:PORT``, ``:0`` for
        any free port, or ``unix:PATH``) while the probes stay armed: gdb
        (``target remote ADDRESS``) sees the guest as if no probe were there
        (see :mod:`qprobes.frontends.gdbserver`). It is served while
        :meth:`run` or :meth:`command` runs the guest; ``stopping()`` true
        makes a gdb that holds the guest stopped give it back. :meth:`close`
        ends it with a message to gdb."""
        from qprobes.frontends.gdbserver import GdbServerError, serve

        if self.gdb_server is not None:
            raise GdbServerError(f"a gdb endpoint is already served at {self.gdb_server.address}")
        self.gdb_server = serve(self.engine, listen, kretprobes=self.kretprobes,
                                stopping=stopping)  # fmt: skip
        return self.gdb_server

    def end_gdb(self) -> None:
        """End the gdb endpoint (guest stopped): gdb gets a message and the
        connection closes; the probes stay."""
        from qprobes.frontends.gdbserver import unplug

        server, self.gdb_server = self.gdb_server, None
        if server is None:
            return
        unplug(self.engine, server)
        try:
            server.close()
        except QprobesError as exc:
            log.warning("closing the gdb endpoint: %s", exc)

    # --- lifecycle ------------------------------------------------------------------

    def reconnect(self) -> None:
        """Open a new gdbstub connection after the old one dropped, and re-arm
        the doorbell watchpoint (QEMU drops watchpoints when a client
        connects). QEMU stops the guest when a client connects."""
        if self.machine is not None:
            address = str(self.machine.gdb_socket)
        elif self._address is not None:
            address = self._address
        else:
            raise MachineError("nothing to reconnect to")
        with contextlib.suppress(QprobesError):  # the old connection is gone already
            self.target.client.close()
        client = GdbClient.connect(address)
        self.target.client = client
        self.engine.client = client
        if self.machine is not None:
            self.machine.adopt_client(client, self.target)
        if self.engine.attached:
            self.engine.rearm_doorbell()

    def close(self) -> None:
        """Detach (restoring every byte written) and shut the machine down, if ours.

        If the gdbstub connection dropped, reconnect first, so that the guest
        is left running with nothing of qprobes' in it. A guest that is gone
        (its QEMU exited) has nothing left to restore: the machine is only
        cleaned up, and :class:`~qprobes.errors.GuestDiedError` says what
        happened (unless a run said it already); so it does for an attached
        QEMU whose gdbstub takes no new connection.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._close()
        except BaseException:
            if self.watchdog is not None:
                self.watchdog.abandon()  # it recovers the guest once we are gone
            raise
        if self.watchdog is not None:
            self.watchdog.detached()

    def _close(self) -> None:
        connected = True  # whether the gdbstub connection still works
        try:
            if self.machine is not None and not self.machine.alive():
                with contextlib.suppress(QprobesError):
                    self.end_gdb()
                self._died()  # nothing left to detach from
                return
            try:
                if self.target.running:
                    self.engine._stop_quietly()
                self.end_gdb()
                self.engine.detach()
            except ConnectionClosedError:
                connected = False
                if self.machine is not None and self.fault(0.2) is not None:
                    self._died()  # it died while qprobes detached: nothing to restore
                    return
                try:
                    self.reconnect()
                except (ConnectionClosedError, StubTimeoutError) as again:
                    if self.machine is not None and self.fault(self.EXIT_WAIT) is not None:
                        self._died()
                        return
                    where = self._address if self.machine is None else self.machine.gdb_socket
                    raise GuestDiedError(
                        f"the connection to QEMU's gdbstub at {where} dropped and it takes no "
                        "new one: QEMU exited or was killed"
                    ) from again
                connected = True
                log.warning("the gdbstub connection dropped; reconnected to detach")
                self.engine.detach()
        finally:
            with contextlib.suppress(QprobesError):
                self.end_gdb()  # still open if the detach failed before it
            if self.hostmem is not None:
                self.hostmem.close()
            if self.machine is not None:
                self.machine.shutdown()
            else:
                if connected:
                    self.target.client.detach()  # the guest runs on, qprobes gone
                self.target.client.close()

    def _died(self) -> None:
        """Our QEMU is gone: say so, unless a run already did."""
        if not self._fault_said:
            fault = self.fault()
            if fault is not None:
                self._fault_said = True
                raise fault

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()
