"""qp-openat, the static program the bench writes into a guest: run under
unicorn with its system calls counted and answered, and once on this host."""

from __future__ import annotations

import os
import platform
import struct
import subprocess
from pathlib import Path

import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, Uc
from unicorn.x86_const import (
    UC_X86_INS_SYSCALL,
    UC_X86_REG_RAX,
    UC_X86_REG_RDI,
    UC_X86_REG_RDX,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
)

from qprobes.machine.guestprog import openat_loop, upload_command

STACK = 0x7FF0_0000


class Exited(Exception):
    pass


def run(args: list[bytes], *, open_fails_at: int | None = None) -> tuple[int, list[tuple]]:
    """Load the ELF's one segment, lay out argc/argv as the kernel does, and
    run it: (exit status, the system calls made)."""
    elf = openat_loop()
    assert elf[:4] == b"\x7fELF"
    entry = struct.unpack_from("<Q", elf, 24)[0]
    _, _, _, vaddr, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", elf, 64)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(vaddr, (memsz + 0xFFF) & ~0xFFF)
    uc.mem_write(vaddr, elf[:filesz])
    uc.mem_map(STACK - 0x10000, 0x20000)
    strings = STACK + 0x1000
    pointers = []
    for arg in args:
        uc.mem_write(strings, arg + b"\0")
        pointers.append(strings)
        strings += len(arg) + 1
    frame = struct.pack(f"<Q{len(pointers)}QQ", len(pointers), *pointers, 0)
    uc.mem_write(STACK, frame)
    uc.reg_write(UC_X86_REG_RSP, STACK)
    calls: list[tuple] = []
    status: list[int] = []

    def syscall(uc: Uc, _data: object) -> None:
        nr = uc.reg_read(UC_X86_REG_RAX)
        rdi, rsi, rdx = (uc.reg_read(r) for r in (UC_X86_REG_RDI, UC_X86_REG_RSI, UC_X86_REG_RDX))
        if nr == 60:
            status.append(rdi)
            uc.emu_stop()
            return
        if nr == 257:
            path = bytes(uc.mem_read(rsi, 64)).split(b"\0")[0]
            dfd = struct.unpack("<i", struct.pack("<I", rdi & 0xFFFF_FFFF))[0]  # an int
            calls.append(("openat", dfd, path, rdx))
            opens = sum(1 for c in calls if c[0] == "openat")
            uc.reg_write(UC_X86_REG_RAX, 2**64 - 2 if opens == open_fails_at else 3)
        elif nr == 0:
            uc.mem_write(rsi, b"qprobes-guest\n")  # the buffer is writable
            calls.append(("read", rdi, rdx))
            uc.reg_write(UC_X86_REG_RAX, 14)
        elif nr == 3:
            calls.append(("close", rdi))
            uc.reg_write(UC_X86_REG_RAX, 0)
        else:
            raise AssertionError(f"unexpected system call {nr}")

    uc.hook_add(UC_HOOK_INSN, syscall, None, 1, 0, UC_X86_INS_SYSCALL)
    uc.emu_start(entry, 0, count=1_000_000)
    assert status, f"did not exit (rip {uc.reg_read(UC_X86_REG_RIP):#x})"
    return status[0], calls


def test_n_rounds_of_openat_read_close() -> None:
    status, calls = run([b"qp-openat", b"12", b"/etc/hostname"])
    assert status == 0
    one = [("openat", -100, b"/etc/hostname", 0), ("read", 3, 64), ("close", 3)]
    assert calls == one * 12


@pytest.mark.parametrize("n", [b"0", b"1", b"1000"])
def test_counts(n: bytes) -> None:
    status, calls = run([b"qp-openat", n, b"/f"])
    assert status == 0 and len(calls) == 3 * int(n)


@pytest.mark.parametrize(
    "args",
    [[b"qp-openat"], [b"qp-openat", b"3"], [b"qp-openat", b"", b"/f"],
     [b"qp-openat", b"3x", b"/f"], [b"qp-openat", b"-1", b"/f"],
     [b"qp-openat", b"99999999999999999999", b"/f"]],
    ids=["no-args", "no-file", "empty-n", "not-a-number", "negative", "too-large"],
)  # fmt: skip
def test_bad_arguments_exit_1_before_any_call(args: list[bytes]) -> None:
    assert run(args) == (1, [])


def test_a_failed_open_exits_1() -> None:
    status, calls = run([b"qp-openat", b"5", b"/f"], open_fails_at=3)
    assert status == 1
    assert [c[0] for c in calls] == ["openat", "read", "close"] * 2 + ["openat"]


@pytest.mark.skipif(platform.machine() != "x86_64" or os.uname().sysname != "Linux",
                    reason="runs the program itself: an x86-64 Linux host")  # fmt: skip
def test_it_runs_on_this_host(tmp_path: Path) -> None:
    prog = tmp_path / "qp-openat"
    prog.write_bytes(openat_loop())
    prog.chmod(0o755)
    target = tmp_path / "file"
    target.write_text("x\n")
    assert subprocess.run([prog, "1000", target], timeout=30).returncode == 0
    assert subprocess.run([prog, "1", tmp_path / "missing"], timeout=30).returncode == 1


def test_the_upload_line_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "prog"
    line = upload_command(str(path), openat_loop())
    assert "\n" not in line
    subprocess.run(["sh", "-c", line], check=True, timeout=30)
    assert path.read_bytes() == openat_loop() and os.access(path, os.X_OK)
