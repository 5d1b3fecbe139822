"""The default Linux guest: a pinned Debian cloud kernel and a busybox initramfs.

``scripts/build-linux-guest.sh`` downloads the kernel package (pinned, with its
checksum; falling back to the current ``linux-image-cloud-amd64`` dependency
when the pin has left Debian's archive), extracts ``vmlinuz`` and builds a
tiny initramfs (with one small module of the kernel package, see
:attr:`LinuxGuest.test_module`) whose ``/init`` mounts proc, sys, devtmpfs,
tracefs and debugfs, prints :data:`LINUX_READY` and runs a root shell on the serial
console with the prompt :data:`LINUX_PROMPT`. The result is cached (by
default in ``~/.cache/qprobes/linux``) and built on first use.

Usage::

    with QemuMachine(linux_config()) as machine:
        machine.console          # connect before the guest prints anything
        machine.target.resume()
        machine.console.recvuntil(LINUX_READY)
        machine.console.recvuntil(LINUX_PROMPT)
        machine.console.command("cat /etc/hostname", LINUX_PROMPT)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qprobes.errors import MachineError
from qprobes.machine.cachelock import cache_lock
from qprobes.machine.debfetch import DebPin, fetch, read_pins, unpack_deb
from qprobes.machine.qemu import MachineConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The guest builder: the checkout's, or the copy an installed package carries.
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-linux-guest.sh"
if not BUILD_SCRIPT.is_file():
    BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "_data" / "build-linux-guest.sh"

#: The guest shell's prompt (``PS1``), exactly.
LINUX_PROMPT = b"qprobes-guest# "
#: The line ``/init`` prints once the file systems are mounted, before the first prompt.
LINUX_READY = b"qprobes-guest: ready"
#: What ``/etc/hostname`` holds in the guest.
LINUX_HOSTNAME = "qprobes-guest"

#: Kernel command line of every Linux guest (``nokaslr`` is added unless asked for KASLR).
LINUX_CMDLINE = "console=ttyS0 quiet panic=-1"
LINUX_MEMORY_MIB = 512

# How long a build may take (a 27 MB download and an initramfs).
BUILD_TIMEOUT = 900.0


def linux_cache_dir() -> Path:
    """Where the guest is cached: ``${QPROBES_CACHE:-~/.cache/qprobes}/linux``."""
    base = os.environ.get("QPROBES_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "qprobes"
    return root / "linux"


@dataclass(frozen=True)
class LinuxGuest:
    """A built Linux guest: kernel, initramfs and the build's manifest (``guest.json``)."""

    kernel: Path
    initrd: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.kernel.parent

    @property
    def kernel_config(self) -> Path:
        """The kernel's build configuration (``/boot/config-*`` of the package)."""
        return self.directory / "config"

    @property
    def release(self) -> str:
        """``uname -r`` of the guest kernel, e.g. ``6.1.0-56-cloud-amd64``."""
        return str(self.manifest.get("release", ""))

    @property
    def package(self) -> str:
        return str(self.manifest.get("package", ""))

    @property
    def test_module(self) -> str:
        """Path in the guest of a small module of the kernel package with no
        dependencies (``crc7.ko``), for tests that load a module."""
        return str(self.manifest.get("test_module", ""))

    @property
    def version(self) -> str:
        """The Debian package version, e.g. ``6.1.192-2`` (it shows in ``uname -v``)."""
        return str(self.manifest.get("version", ""))


def sha256_file(path: Path) -> str:
    """The sha256 of a file, in hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load(directory: Path, *, check_builder: bool) -> LinuxGuest | None:
    """The guest cached in ``directory`` if it is complete and current, else None."""
    kernel = directory / "vmlinuz"
    initrd = directory / "initramfs.cpio.gz"
    manifest_path = directory / "guest.json"
    if not (kernel.is_file() and initrd.is_file() and manifest_path.is_file()):
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if manifest.get("vmlinuz_sha256") != sha256_file(kernel):
        return None
    if manifest.get("initramfs_sha256") != sha256_file(initrd):
        return None
    # A changed build script (new pin, new /init) means a rebuild.
    if (
        check_builder
        and BUILD_SCRIPT.is_file()
        and manifest.get("builder_sha256") != sha256_file(BUILD_SCRIPT)
    ):
        return None
    return LinuxGuest(kernel=kernel, initrd=initrd, manifest=manifest)


def build_linux_guest(directory: Path | None = None, timeout: float = BUILD_TIMEOUT) -> str:
    """Run ``scripts/build-linux-guest.sh`` and return its output.

    Where apt is missing (Fedora, Arch), or the script's apt download failed,
    the pinned packages come from Debian's archive over HTTPS instead
    (:mod:`qprobes.machine.debfetch`, checksums checked). On a terminal,
    progress lines show the download and the script's latest step. Raises
    :class:`MachineError` with the script's output when it fails.
    """
    import re
    import tempfile

    directory = directory or linux_cache_dir()
    if not BUILD_SCRIPT.is_file():
        raise MachineError(f"{BUILD_SCRIPT} is missing: cannot build the Linux guest")
    directory.mkdir(parents=True, exist_ok=True)
    if not _apt_usable():
        with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch.") as work:
            env = packages_without_apt(directory, Path(work))
            return _run_builder(directory, timeout, env)
    try:
        return _run_builder(directory, timeout, {})
    except MachineError as exc:
        if not re.search(r"apt|download|archive", str(exc)):
            raise
        first = exc
    # apt could not get the packages (no root for apt-get update, a mirror
    # that fails): the same pins, from Debian's archive over HTTPS.
    try:
        with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch.") as work:
            env = packages_without_apt(directory, Path(work))
            return _run_builder(directory, timeout, env)
    except MachineError as exc:
        raise MachineError(f"{first}\nand without apt: {exc}") from exc


def _apt_usable() -> bool:
    return shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None


def _static_busybox() -> bool:
    """Is there a statically linked busybox on PATH (no ELF interpreter)?"""
    path = shutil.which("busybox")
    if path is None:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # ELF64 only
                return False
            (phoff,) = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except (OSError, struct.error):
        return False
    types = [struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum)
             if (i + 1) * phentsize <= len(table)]  # fmt: skip
    return PT_INTERP not in types


PT_INTERP = 3


def _kernel_cached(directory: Path, pin: DebPin, modules: list[str]) -> bool:
    """Will the builder reuse the cached kernel (its ``kernel_reusable``)?"""
    try:
        info = dict(
            line.split("=", 1)
            for line in (directory / "kernel.info").read_text().splitlines()
            if "=" in line
        )
    except OSError:
        return False
    kernel, config = directory / "vmlinuz", directory / "config"
    kos = [directory / Path(module).name for module in modules]
    if not (kernel.is_file() and config.is_file() and all(ko.is_file() for ko in kos)):
        return False
    if info.get("vmlinuz_sha256") != sha256_file(kernel):
        return False
    wanted = f"{pin.package}={pin.version}"
    return f"{info.get('package')}={info.get('version')}" == wanted or info.get("pin") == wanted


def packages_without_apt(directory: Path, work: Path) -> dict[str, str]:
    """Download (or take from ``directory/packages``) and unpack the builder's
    pinned packages the build needs, into ``work``; the environment that
    hands them to the builder (no busybox when the host has a static one)."""
    from qprobes.progress import progress

    kernel, busybox, modules = read_pins(BUILD_SCRIPT)
    store = directory / "packages"
    env: dict[str, str] = {}
    if not _kernel_cached(directory, kernel, modules):
        deb = fetch(kernel, store)
        with progress.step(f"unpacking {deb.name}"):
            unpack_deb(deb, work / "kernel", ["boot/*", *(f"lib/modules/*/{m}" for m in modules)])
        env["QPROBES_KERNEL_PACKAGE"] = str(work / "kernel")
    if not _static_busybox():
        deb = fetch(busybox, store)
        unpack_deb(deb, work / "busybox", ["bin/busybox"])
        env["QPROBES_BUSYBOX"] = str(work / "busybox" / "bin" / "busybox")
    return env


def _run_builder(directory: Path, timeout: float, env: dict[str, str]) -> str:
    """Run the builder script with ``env`` added to its environment."""
    import select
    import time

    from qprobes.progress import progress

    cmd = ["bash", str(BUILD_SCRIPT), str(directory)]
    lines: list[str] = []
    with progress.step("building the default Linux guest") as step:
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            )  # fmt: skip
        except OSError as exc:
            raise MachineError(f"cannot run {BUILD_SCRIPT}: {exc}") from exc
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        pending = b""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MachineError(
                        f"building the Linux guest timed out after {timeout} s:\n"
                        + "\n".join(lines)
                    )
                if not select.select([proc.stdout], [], [], min(left, 1.0))[0]:
                    continue
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    break
                pending += data
                *done, pending = pending.split(b"\n")
                for raw in done:
                    line = raw.decode(errors="replace").rstrip()
                    lines.append(line)
                    if line.startswith("build-linux-guest: "):
                        step.update(line.removeprefix("build-linux-guest: "), force=True)
            if pending:
                lines.append(pending.decode(errors="replace").rstrip())
            status = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        output = "\n".join(lines) + ("\n" if lines else "")
        if status != 0:
            raise MachineError(
                f"building the Linux guest failed ({' '.join(cmd)} exited with status "
                f"{status}):\n{output.rstrip()}"
            )
    return output


def linux_guest(build: bool = True) -> LinuxGuest:
    """The default Linux guest, built (``scripts/build-linux-guest.sh``) when missing.

    ``QPROBES_LINUX_GUEST`` names a directory with a prebuilt guest (``vmlinuz``,
    ``initramfs.cpio.gz``, ``guest.json``) to use as it is. Otherwise the cache
    is ``${QPROBES_CACHE:-~/.cache/qprobes}/linux``; with ``build=False`` a
    missing or stale cache raises :class:`MachineError` instead of building.
    """
    override = os.environ.get("QPROBES_LINUX_GUEST")
    if override:
        guest = _load(Path(override), check_builder=False)
        if guest is None:
            raise MachineError(
                f"QPROBES_LINUX_GUEST={override} does not hold a valid guest "
                "(vmlinuz, initramfs.cpio.gz and a matching guest.json)"
            )
        return guest
    directory = linux_cache_dir()
    guest = _load(directory, check_builder=True)
    if guest is not None:
        return guest
    if not build:
        raise MachineError(
            f"the Linux guest is not built in {directory}; run {BUILD_SCRIPT} {directory}"
        )
    # One builder at a time (pytest-xdist workers, parallel jobs): the others
    # wait, then find its build. Not the builder's own ``.lock``: the script
    # takes that one itself, and waiting on it while holding it would hang.
    with cache_lock(directory, ".qprobes-build.lock"):
        guest = _load(directory, check_builder=True)
        if guest is not None:
            return guest
        output = build_linux_guest(directory)
        guest = _load(directory, check_builder=True)
    if guest is None:
        raise MachineError(
            f"{BUILD_SCRIPT} succeeded but {directory} holds no valid guest:\n{output.rstrip()}"
        )
    return guest


def linux_config(append: str = "", kaslr: bool = False, **kwargs: Any) -> MachineConfig:
    """A :class:`MachineConfig` that boots the default Linux guest.

    512 MiB of RAM, ``console=ttyS0 quiet panic=-1`` and ``nokaslr`` (unless
    ``kaslr``), then ``append``; :class:`MachineConfig` adds the ``memmap=``
    that hides qprobes' reserved memory from Linux. Other keyword arguments
    set :class:`MachineConfig` fields (``smp``, ``accel``, ``cpu``, ...).
    ``cpu=None`` keeps QEMU's qemu64 model, with which Linux leaves PTI off.
    """
    guest = linux_guest()
    parts = [LINUX_CMDLINE]
    if not kaslr:
        parts.append("nokaslr")
    if append.strip():
        parts.append(append.strip())
    config = MachineConfig(
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=" ".join(parts),
        memory_mib=LINUX_MEMORY_MIB,
    )
    for key, value in kwargs.items():
        if key in ("kernel", "initrd", "append") or not hasattr(config, key):
            raise TypeError(f"linux_config() got an unexpected keyword argument {key!r}")
        setattr(config, key, value)
    return config
