"""Launching and stopping a QEMU x86_64 machine with its gdbstub.

Modelled on QEMU's own ``python/qemu/machine``: the machine is a context
manager with a state guard; shutdown is polite first (the monitor's ``quit``
through the gdbstub), then ``SIGTERM``, then ``SIGKILL``, and the scratch
directory is removed in ``finally``. A launch failure raises
:class:`~qprobes.errors.LaunchError` with the command line and QEMU's output.
"""

from __future__ import annotations

import contextlib
import enum
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from qprobes.errors import ConnectionClosedError, LaunchError, MachineError, QprobesError
from qprobes.remote.client import GdbClient
from qprobes.target.target import Target

if TYPE_CHECKING:
    from qprobes.machine.console import Console

QEMU_BINARY = "qemu-system-x86_64"

# isa-debug-exit: writing v to this port ends QEMU with status (v << 1) | 1.
DEBUG_EXIT_PORT = 0xF4

MiB = 1024 * 1024

#: Scratch directories are ``$TMPDIR/qprobes-XXXXXXXX``.
WORKDIR_PREFIX = "qprobes-"
#: The file in a scratch directory that names its owner processes.
OWNER_FILE = "owner"
#: A scratch directory kept on purpose (``QPROBES_KEEP_WORKDIR=1``) holds this file.
KEPT_FILE = "kept"
#: A scratch directory without an owner file (made by an older qprobes) is
#: removed only when no process names it and it was left alone this long.
LEGACY_STALE_AFTER = 3600.0


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot, field 22 of
    ``/proc/PID/stat``), or None when there is no such process (or only its
    zombie). A pid and its start time name one process even after the pid
    is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = stat.rpartition(")")[2].split()
    if not fields or fields[0] in ("Z", "X"):
        return None  # a zombie, its parent not yet told: it has ended
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def owner_record(role: str, pid: int) -> str:
    """One line of an owner file: ``ROLE PID START``."""
    return f"{role} {pid} {process_start_time(pid)}\n"


def owners_alive(text: str) -> bool:
    """Whether any process an owner file names still runs (same pid, same
    start time). A file that cannot be read counts as alive: keep the directory."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines:
        return True  # written a moment ago, or by something else: not ours to judge
    for fields in lines:
        if len(fields) != 3 or not fields[1].isdigit():
            return True
        started = process_start_time(int(fields[1]))
        if started is not None and str(started) == fields[2]:
            return True
    return False


def _named_by_a_process(path: Path) -> bool:
    """Whether a running process has ``path`` in its command line (a QEMU
    started by an older qprobes names its sockets there)."""
    needle = str(path).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


#: Room a scratch directory's path leaves for its sockets' names
#: ("/console.sock") within a Unix socket path's 107 bytes.
SOCKET_PATH_MAX = 107 - len("/console.sock") - len(WORKDIR_PREFIX) - 8 - 1


def workdir_parent() -> Path:
    """Where scratch directories go: ``$TMPDIR``, or ``/tmp`` when ``$TMPDIR``
    is too deep for the Unix sockets inside (a socket path holds at most 107
    bytes; CI runners and pytest's temporary directories nest deep). Stale
    directories of dead processes are cleaned in both on the way."""
    parent = Path(tempfile.gettempdir())
    clean_stale_workdirs(parent)
    if len(str(parent)) <= SOCKET_PATH_MAX:
        return parent
    short = Path("/tmp")
    clean_stale_workdirs(short)
    return short


def clean_stale_workdirs(parent: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the scratch directories qprobes processes left behind when they
    died without cleaning up (SIGKILL, a crash), and return them.

    A directory goes only when every process its owner file names is gone
    (and not when it was kept on purpose, ``QPROBES_KEEP_WORKDIR=1``);
    one with no owner file (an older qprobes made it) only when no process
    names it in its command line and nothing in it changed for
    :data:`LEGACY_STALE_AFTER` seconds. Directories of live qprobes are left alone.
    """
    parent = Path(tempfile.gettempdir()) if parent is None else parent
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        candidates = sorted(parent.glob(WORKDIR_PREFIX + "*"))
    except OSError:
        return removed
    for path in candidates:
        try:
            if not path.is_dir() or path.is_symlink() or path.stat().st_uid != os.getuid():
                continue
            owner = path / OWNER_FILE
            if (path / KEPT_FILE).exists():
                continue
            if owner.exists():
                if owners_alive(owner.read_text(errors="replace")):
                    continue
            else:
                newest = max([path.stat().st_mtime]
                             + [p.stat().st_mtime for p in path.iterdir()])  # fmt: skip
                if now - newest < LEGACY_STALE_AFTER or _named_by_a_process(path):
                    continue
        except OSError:
            continue  # vanished meanwhile, or not ours to read
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _die_with_parent() -> None:
    """In the QEMU child: get SIGTERM when qprobes dies, even by SIGKILL, so no
    guest outlives the process that owns it (Linux's PR_SET_PDEATHSIG)."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class MachineState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    SHUT_DOWN = "shut down"


@dataclass
class MachineConfig:
    """What to boot and how.

    ``reserve_mib`` of guest-physical memory at the top of RAM are kept for
    qprobes (instruction slots, trap stubs, page tables): the machine adds a
    ``memmap=SIZE$ADDR`` argument to the kernel command line so Linux never
    uses them. Freestanding kernels such as qtest ignore the argument and stay
    below that memory on their own.
    """

    kernel: Path
    initrd: Path | None = None
    append: str = ""
    memory_mib: int = 128
    smp: int = 1
    accel: str = "tcg"  # "tcg" or "kvm"
    cpu: str | None = None  # QEMU -cpu model; None: QEMU's default (or "host" with KVM)
    reserve_mib: int = 4
    debug_exit: bool = True
    extra_args: list[str] = field(default_factory=list)
    binary: str = QEMU_BINARY

    @property
    def reserved(self) -> tuple[int, int]:
        """(guest-physical start, size) of the memory kept for qprobes."""
        size = self.reserve_mib * MiB
        # Below 4 GiB, RAM is contiguous from 0 up to the machine's hole. The
        # firmware keeps its ACPI tables in the top 128 KiB, so the
        # reservation ends 2 MiB below the top.
        low_ram = min(self.memory_mib * MiB, 0xB000_0000)
        return (low_ram - 2 * MiB - size, size)

    def kernel_cmdline(self) -> str:
        parts = [self.append.strip()] if self.append.strip() else []
        if self.reserve_mib:
            start, size = self.reserved
            parts.append(f"memmap={size // MiB}M${start:#x}")
        return " ".join(parts)


class QemuMachine:
    """A QEMU process with its gdbstub on a unix socket, started halted (``-S``).

    Usage::

        with QemuMachine(MachineConfig(kernel=path)) as machine:
            target = machine.target        # connected, guest still halted
            target.resume()
            machine.console.recvuntil(b"qtest> ")
    """

    def __init__(self, config: MachineConfig, *, start_timeout: float = 20.0) -> None:
        self.config = config
        self.start_timeout = start_timeout
        self.state = MachineState.NEW
        self._workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: GdbClient | None = None
        self._target: Target | None = None
        self._console: Console | None = None
        self._console_sock: socket.socket | None = None
        self.exitcode: int | None = None
        #: The guest's whole console output, kept after shutdown.
        self.console_output = ""

    # --- paths --------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if self._workdir is None:
            raise MachineError("the machine has not been launched")
        return self._workdir / name

    @property
    def gdb_socket(self) -> Path:
        return self._path("gdb.sock")

    @property
    def console_log(self) -> Path:
        """Everything the guest wrote to its serial port."""
        return self._path("console.log")

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise MachineError("the machine has not been launched")
        return self._proc.pid

    def command_line(self) -> list[str]:
        """The QEMU command line this machine runs (paths filled in at launch)."""
        c = self.config
        accel = c.accel
        args = [
            c.binary,
            "-nodefaults", "-nographic", "-no-reboot", "-S",
            "-accel", accel,
            "-m", f"{c.memory_mib}M",
            "-smp", str(c.smp),
            "-kernel", str(c.kernel),
            "-append", c.kernel_cmdline(),
            "-gdb", f"unix:{self.gdb_socket},server=on,wait=off",
            "-chardev", f"socket,id=con0,path={self._path('console.sock')},server=on,wait=off,"
            f"logfile={self.console_log},logappend=on",
            "-serial", "chardev:con0",
            "-monitor", "none",
        ]  # fmt: skip
        cpu = c.cpu if c.cpu else ("host" if accel == "kvm" else None)
        if cpu:
            args += ["-cpu", cpu]
        if c.initrd is not None:
            args += ["-initrd", str(c.initrd)]
        if c.debug_exit:
            args += ["-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=4"]
        if "-name" not in c.extra_args:
            # Threads named "CPU 0/TCG" and so on: in top -H, and for
            # vcpu_cpu_time().
            args += ["-name", "qprobes,debug-threads=on"]
        return args + list(c.extra_args)

    def vcpu_cpu_time(self) -> float | None:
        """Seconds of host CPU QEMU's vCPU threads have run so far (the
        scheduler's count, ``/proc/PID/task/*/schedstat``): what the guest's
        own execution costs, apart from the time its vCPUs wait for a host
        CPU or are stopped. None when they cannot be told apart (a ``-name``
        of the user's without ``debug-threads=on``) or not read."""
        if self._proc is None:
            return None
        total, found = 0, False
        try:
            tasks = list(Path(f"/proc/{self._proc.pid}/task").iterdir())
        except OSError:
            return None
        for task in tasks:
            try:
                if not (task / "comm").read_text().startswith("CPU "):
                    continue
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that just ended
            found = True
        return total / 1e9 if found else None

    # --- lifecycle --------------------------------------------------------------

    def launch(self) -> None:
        """Start QEMU, connect the gdbstub and the console. The guest stays halted."""
        if self.state is not MachineState.NEW:
            raise MachineError(f"cannot launch a machine that is {self.state.value}")
        if shutil.which(self.config.binary) is None:
            raise LaunchError(f"{self.config.binary} not found on PATH", [self.config.binary], "")
        if not Path(self.config.kernel).is_file():
            raise LaunchError(f"kernel {self.config.kernel} does not exist", [], "")
        self._workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=workdir_parent()))
        try:
            self._start()
        except BaseException:
            # Whatever stopped the start (an error, a signal): no QEMU and no
            # scratch directory outlive it.
            self._close_connections()
            self._kill()
            self._cleanup()
            self.state = MachineState.SHUT_DOWN
            raise

    def _start(self) -> None:
        owner = self._path(OWNER_FILE)
        owner.write_text(owner_record("qprobes", os.getpid()))
        cmdline = self.command_line()
        output = self._path("qemu.out").open("wb")
        try:
            # A session of its own: a Ctrl-C at qprobes' terminal goes to
            # qprobes' process group, which detaches first; QEMU must not get
            # it too. It still dies with qprobes (_die_with_parent).
            self._proc = subprocess.Popen(
                cmdline, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise LaunchError(f"cannot run QEMU: {exc}", cmdline, "") from exc
        finally:
            output.close()
        with owner.open("a") as f:
            f.write(owner_record("qemu", self._proc.pid))
        self.state = MachineState.RUNNING
        try:
            self._wait_for_socket(self.gdb_socket, cmdline)
            self._client = self._connect_gdb(cmdline)
            self._target = Target(self._client)
        except LaunchError:
            raise
        except QprobesError as exc:
            raise LaunchError(
                f"cannot talk to QEMU's gdbstub: {exc}", cmdline, self.output()
            ) from exc

    def _wait_for_socket(self, path: Path, cmdline: list[str]) -> None:
        deadline = time.monotonic() + self.start_timeout
        assert self._proc is not None
        while not path.exists():
            if self._proc.poll() is not None:
                raise LaunchError(
                    f"QEMU exited with status {self._proc.returncode} during start-up",
                    cmdline, self.output(),
                )  # fmt: skip
            if time.monotonic() > deadline:
                raise LaunchError("QEMU did not open its gdbstub socket in time", cmdline,
                                  self.output())  # fmt: skip
            time.sleep(0.005)

    def _read_console_log(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except (OSError, MachineError):
            return self.console_output

    def console_text(self) -> str:
        """Everything the guest printed so far."""
        if self.state is MachineState.RUNNING:
            return self._read_console_log()
        return self.console_output

    def _connect_gdb(self, cmdline: list[str]) -> GdbClient:
        """Connect to the stub; QEMU binds its socket a moment before it listens."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                return GdbClient.connect(str(self.gdb_socket))
            except ConnectionClosedError:
                if time.monotonic() > deadline or not self.alive():
                    raise
                time.sleep(0.01)

    def output(self) -> str:
        """What QEMU itself printed (not the guest console)."""
        try:
            return self._path("qemu.out").read_text(errors="replace")
        except (OSError, MachineError):
            return ""

    @property
    def client(self) -> GdbClient:
        if self._client is None:
            raise MachineError("the machine is not connected")
        return self._client

    @property
    def target(self) -> Target:
        if self._target is None:
            raise MachineError("the machine is not connected")
        return self._target

    @property
    def console(self) -> Console:
        """The serial console as a pwntools tube (created on first use)."""
        if self._console is None:
            from qprobes.machine.console import Console

            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self._path("console.sock")))
            self._console_sock = sock
            self._console = Console(sock)
        return self._console

    def adopt_client(self, client: GdbClient, target: Target) -> None:
        """Use a new stub connection (after the old one dropped)."""
        self._client = client
        self._target = target

    def release_gdbstub(self) -> None:
        """Disconnect qprobes from the gdbstub (it serves one client), leaving
        the guest running, so that another debugger can attach."""
        if self._client is not None:
            if self._client.running is False:
                self._client.detach()
            self._client.close()
            self._client = None
            self._target = None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_description(self) -> str | None:
        """How QEMU ended, in one phrase (``QEMU exited with status 1``,
        ``QEMU was killed by signal 9 (SIGKILL)``), with the last line QEMU
        printed, if any; None while it runs."""
        if self._proc is None or self._proc.poll() is None:
            return None
        code = self._proc.returncode
        self.exitcode = code
        if code < 0:
            try:
                name = f" ({signal.Signals(-code).name})"
            except ValueError:
                name = ""
            text = f"QEMU was killed by signal {-code}{name}"
        else:
            text = f"QEMU exited with status {code}"
        said = [line.strip() for line in self.output().splitlines() if line.strip()]
        if said:
            text += f" ({said[-1]})"
        return text

    def wait(self, timeout: float | None = None) -> int:
        """Wait for QEMU to exit (for example through isa-debug-exit)."""
        if self._proc is None:
            raise MachineError("the machine has not been launched")
        try:
            self.exitcode = self._proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise MachineError(f"QEMU still running after {timeout} s") from exc
        return self.exitcode

    def shutdown(self, timeout: float = 5.0) -> int | None:
        """Stop QEMU: politely (monitor ``quit``), then SIGTERM, then SIGKILL."""
        if self.state is not MachineState.RUNNING:
            return self.exitcode
        try:
            if self._proc is not None and self._proc.poll() is None and self._client is not None:
                try:
                    if self._client.running:
                        self._client.interrupt()
                        self._client.wait_stop(timeout=2.0)
                    self._client.kill()
                except QprobesError:
                    pass  # QEMU is going away anyway; the signals below finish it.
            if self._proc is not None:
                if self._client is None:
                    self._kill()  # no stub connection to ask politely through
                try:
                    self.exitcode = self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
        finally:
            self._close_connections()
            self.console_output = self._read_console_log()
            self._cleanup()
            self.state = MachineState.SHUT_DOWN
        return self.exitcode

    def _kill(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(3.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self.exitcode = self._proc.returncode

    def _close_connections(self) -> None:
        if self._client is not None:
            with contextlib.suppress(QprobesError):
                self._client.close()
            self._client = None
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._console_sock is not None:
            self._console_sock.close()
            self._console_sock = None

    def _cleanup(self) -> None:
        if self._workdir is None:
            return
        if os.environ.get("QPROBES_KEEP_WORKDIR"):
            # Kept for a look at its logs: no later start removes it either.
            with contextlib.suppress(OSError):
                (self._workdir / KEPT_FILE).touch()
            return
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> QemuMachine:
        self.launch()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def attach(address: str, timeout: float = 10.0) -> Target:
    """Connect to an already running QEMU's gdbstub (``host:port`` or a socket path)."""
    return Target(GdbClient.connect(address, timeout=timeout))
