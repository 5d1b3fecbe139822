"""The default Linux guest (Debian cloud kernel + busybox initramfs), one per module.

The guest is built on first use by scripts/build-linux-guest.sh (a 27 MB
download from Debian's mirrors); where that cannot happen the tests skip, or
fail under QPROBES_REQUIRE_VM=1.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from qprobes.machine.linux import (
    LINUX_HOSTNAME,
    LINUX_PROMPT,
    LINUX_READY,
    LinuxGuest,
    linux_config,
)
from qprobes.machine.qemu import MachineConfig, QemuMachine

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 120.0
# _text without KASLR (CONFIG_PHYSICAL_START=0x1000000).
NOKASLR_TEXT = 0xFFFF_FFFF_8100_0000
# busybox ash's line editor asks for the cursor position after each prompt.
CURSOR_QUERY = "\x1b[6n"


@dataclass
class Booted:
    machine: QemuMachine
    boot_seconds: float  # from resume to the first prompt
    banner: bytes  # console output up to and including the first prompt

    def run(self, command: str, timeout: float = 60.0) -> str:
        """Run ``command`` in the guest shell; its output with ``\\n`` line ends."""
        console = self.machine.console
        console.sendline(command)
        raw = console.recvuntil(LINUX_PROMPT, timeout=timeout)
        text = raw[: -len(LINUX_PROMPT)].decode(errors="replace")
        text = text.replace(CURSOR_QUERY, "").replace("\r\n", "\n")
        first, _, rest = text.partition("\n")
        return rest if first.strip() == command.strip() else text


def boot(config: MachineConfig) -> Booted:
    machine = QemuMachine(config)
    machine.launch()
    try:
        console = machine.console  # connect before the guest prints anything
        start = time.monotonic()
        machine.target.resume()
        banner = console.recvuntil(LINUX_READY, timeout=BOOT_TIMEOUT)
        banner += console.recvuntil(LINUX_PROMPT, timeout=BOOT_TIMEOUT)
        return Booted(machine, time.monotonic() - start, banner)
    except BaseException:
        machine.shutdown()
        raise


@pytest.fixture(scope="module")
def booted(guest: LinuxGuest) -> Iterator[Booted]:
    b = boot(linux_config())
    try:
        yield b
    finally:
        b.machine.shutdown()


@pytest.fixture
def run(booted: Booted) -> Callable[[str], str]:
    return booted.run


def test_linux_config(guest: LinuxGuest) -> None:
    config = linux_config()
    assert config.kernel == guest.kernel and config.initrd == guest.initrd
    assert config.memory_mib == 512 and config.cpu is None
    cmdline = config.kernel_cmdline().split()
    assert cmdline[:4] == ["console=ttyS0", "quiet", "panic=-1", "nokaslr"]
    assert cmdline[-1].startswith("memmap=")
    assert "nokaslr" not in linux_config(kaslr=True, append="foo=1").kernel_cmdline().split()
    assert "foo=1" in linux_config(append="foo=1").kernel_cmdline().split()
    assert linux_config(smp=2, memory_mib=256).smp == 2
    with pytest.raises(TypeError):
        linux_config(no_such_field=1)
    assert guest.kernel_config.is_file()
    assert "CONFIG_KPROBE_EVENTS=y" in guest.kernel_config.read_text().splitlines()


def test_boots_quickly_to_the_prompt(
    booted: Booted, record_property: Callable[[str, object], None]
) -> None:
    record_property("linux_boot_seconds", round(booted.boot_seconds, 2))
    print(f"linux guest boot: {booted.boot_seconds:.2f} s to the first prompt")
    assert booted.boot_seconds < BOOT_TIMEOUT
    # The marker comes before the prompt, on a line of its own.
    assert (b"\r\n" + LINUX_READY + b"\r\n") in booted.banner
    assert booted.banner.endswith(LINUX_PROMPT)


def test_shell_works(run: Callable[[str], str]) -> None:
    assert run("cat /etc/hostname") == LINUX_HOSTNAME + "\n"
    assert run("hostname") == LINUX_HOSTNAME + "\n"
    assert run("id -u") == "0\n"
    assert run("echo $((6 * 7))") == "42\n"
    assert run("false; echo $?") == "1\n"


def test_console_echo_and_crlf(booted: Booted) -> None:
    """The shell echoes commands (after a cursor query) and ends lines with CRLF."""
    console = booted.machine.console
    console.sendline("echo one; echo two")
    raw = console.recvuntil(LINUX_PROMPT, timeout=30)
    assert raw.removeprefix(CURSOR_QUERY.encode()) == (
        b"echo one; echo two\r\none\r\ntwo\r\n" + LINUX_PROMPT
    )
    long = "x" * 300  # longer than 80 columns: must not wrap in the line editor
    assert booted.run(f"echo {long}") == long + "\n"


def test_kernel_matches_the_manifest(guest: LinuxGuest, run: Callable[[str], str]) -> None:
    assert guest.release and guest.version
    assert run("uname -r").strip() == guest.release
    assert guest.version in run("uname -v")
    assert guest.manifest["package"] == f"linux-image-{guest.release}"
    cmdline = run("cat /proc/cmdline").split()
    assert "nokaslr" in cmdline and "console=ttyS0" in cmdline
    text = run("grep -w _text /proc/kallsyms").split()
    assert int(text[0], 16) == NOKASLR_TEXT


def test_pseudo_filesystems(run: Callable[[str], str]) -> None:
    mounts = {line.split()[1]: line.split()[2] for line in run("cat /proc/mounts").splitlines()}
    assert mounts["/proc"] == "proc"
    assert mounts["/sys"] == "sysfs"
    assert mounts["/dev"] == "devtmpfs"
    assert mounts["/sys/kernel/tracing"] == "tracefs"
    assert mounts["/sys/kernel/debug"] == "debugfs"
    assert run("test -f /sys/kernel/tracing/kprobe_events && echo yes") == "yes\n"


def test_guest_kprobe_events_work(run: Callable[[str], str]) -> None:
    """The guest's own kprobes (the oracle for qprobes) see the workload's opens."""
    tracing = "/sys/kernel/tracing"
    assert run(f"echo 'p:qp_oracle do_sys_openat2' > {tracing}/kprobe_events; echo $?") == "0\n"
    try:
        assert "qp_oracle do_sys_openat2" in run(f"cat {tracing}/kprobe_events")
        run(f"echo > {tracing}/trace; echo 1 > {tracing}/events/kprobes/qp_oracle/enable")
        assert run("qp-open 25 /etc/hostname") == "qp-open: 25 opens of /etc/hostname\n"
        run(f"echo 0 > {tracing}/events/kprobes/qp_oracle/enable")
        hits = int(run(f"grep -c 'qp_oracle:' {tracing}/trace").strip())
        assert hits >= 25
    finally:
        run(f"echo 0 > {tracing}/events/kprobes/qp_oracle/enable 2>/dev/null")
        run(f"echo '-:qp_oracle' >> {tracing}/kprobe_events")
    assert "qp_oracle" not in run(f"cat {tracing}/kprobe_events")


def test_workload_helpers(run: Callable[[str], str]) -> None:
    assert run("qp-open 200 /usr/share/qprobes/hello.txt") == (
        "qp-open: 200 opens of /usr/share/qprobes/hello.txt\n"
    )
    assert run("qp-work 3") == "qp-work: 3 rounds\n"
    assert run("qp-open 1 /no/such/file; echo $?").endswith("1\n")


def _iomem(run: Callable[[str], str]) -> list[tuple[int, int, str]]:
    """Top-level /proc/iomem entries: (start, end inclusive, name)."""
    entries = []
    for line in run("cat /proc/iomem").splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) : (.*)$", line)
        if m:
            entries.append((int(m[1], 16), int(m[2], 16), m[3].strip()))
    return entries


def test_reserved_memory_is_reserved(booted: Booted, run: Callable[[str], str]) -> None:
    start, size = booted.machine.config.reserved
    end = start + size - 1
    assert f"memmap={size >> 20}M${start:#x}" in run("cat /proc/cmdline")
    iomem = _iomem(run)
    assert any(s <= start and end <= e and name == "Reserved" for s, e, name in iomem), iomem
    overlapping = [(s, e, n) for s, e, n in iomem if s <= end and start <= e]
    assert all(name == "Reserved" for _, _, name in overlapping), overlapping


def test_reserved_memory_is_plain_ram(booted: Booted, run: Callable[[str], str]) -> None:
    """The firmware's own map must call the whole reservation usable RAM."""
    start, size = booted.machine.config.reserved
    end = start + size - 1
    usable = []
    for line in run("dmesg | grep 'BIOS-e820:'").splitlines():
        m = re.search(r"\[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (\w+)", line)
        if m and m[3] == "usable":
            usable.append((int(m[1], 16), int(m[2], 16)))
    assert usable
    assert any(s <= start and end <= e for s, e in usable), (hex(start), hex(end), usable)


def test_kaslr_boot_without_echo(guest: LinuxGuest) -> None:
    """kaslr=True boots too (a second machine); qprobes.echo=0 turns off echo and editing."""
    b = boot(linux_config(kaslr=True, append="qprobes.echo=0"))
    try:
        print(f"linux guest boot with KASLR: {b.boot_seconds:.2f} s to the first prompt")
        console = b.machine.console
        console.sendline("cat /etc/hostname")
        raw = console.recvuntil(LINUX_PROMPT, timeout=30)
        assert raw == LINUX_HOSTNAME.encode() + b"\r\n" + LINUX_PROMPT
        cmdline = b.run("cat /proc/cmdline").split()
        assert "nokaslr" not in cmdline
        text = int(b.run("grep -w _text /proc/kallsyms").split()[0], 16)
        assert text >= 0xFFFF_FFFF_8000_0000
        assert b.run("uname -r").strip() == guest.release
    finally:
        b.machine.shutdown()
