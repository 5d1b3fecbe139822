"""Small static x86-64 Linux programs that qprobes writes into a guest.

The default guest has busybox and shell scripts only, and a shell loop costs
a few hundred microseconds a round under TCG, which buries a probe hit of
ten. :func:`openat_loop` is ``qp-openat N FILE``: N rounds of ``openat``,
``read`` (64 bytes) and ``close`` of FILE in a tight loop, exit status 0,
or 1 on bad arguments or a failed open. It has no libc and no dynamic
linker: one ELF header, one ``PT_LOAD`` segment (its bss is the read
buffer) and hand-assembled code, so the same bytes run on any x86-64 Linux.

:func:`upload_command` is the one shell line that writes such a program
into a guest through its console (``base64 -d``, busybox has it).
"""

from __future__ import annotations

import base64
import struct

__all__ = ["OPENAT_LOOP_NAME", "openat_loop", "upload_command"]

#: The program's name in the guest (its comm).
OPENAT_LOOP_NAME = "qp-openat"

_BASE = 0x400000
_EHDR = 64
_PHDR = 56
_BSS = 4096


class _Code:
    """Bytes with rel32 fixups to labels."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    def emit(self, data: bytes) -> None:
        self.buf += data

    def rel32(self, opcode: bytes, label: str) -> None:
        """``opcode`` then a rel32 to ``label`` (a jump, or a rip-relative operand)."""
        self.buf += opcode
        self.fixups.append((len(self.buf), label))
        self.buf += bytes(4)

    def label(self, name: str) -> None:
        self.labels[name] = len(self.buf)

    def link(self) -> bytes:
        for pos, name in self.fixups:
            struct.pack_into("<i", self.buf, pos, self.labels[name] - (pos + 4))
        return bytes(self.buf)


def _openat_loop_code() -> bytes:
    c = _Code()
    # At the entry rsp points at argc, then argv[0], argv[1], argv[2].
    c.emit(b"\x48\x8b\x0c\x24")  # mov rcx, [rsp]
    c.emit(b"\x48\x83\xf9\x03")  # cmp rcx, 3
    c.rel32(b"\x0f\x82", "bad")  # jb bad
    c.emit(b"\x48\x8b\x7c\x24\x10")  # mov rdi, [rsp + 16]: N
    c.emit(b"\x4c\x8b\x6c\x24\x18")  # mov r13, [rsp + 24]: FILE
    c.emit(b"\x31\xc0")  # xor eax, eax
    c.emit(b"\x80\x3f\x00")  # cmp byte [rdi], 0
    c.rel32(b"\x0f\x84", "bad")  # je bad: an empty N
    c.label("digit")
    c.emit(b"\x0f\xb6\x0f")  # movzx ecx, byte [rdi]
    c.emit(b"\x85\xc9")  # test ecx, ecx
    c.rel32(b"\x0f\x84", "parsed")  # jz parsed
    c.emit(b"\x83\xe9\x30")  # sub ecx, '0'
    c.emit(b"\x83\xf9\x09")  # cmp ecx, 9
    c.rel32(b"\x0f\x87", "bad")  # ja bad: not a digit
    c.emit(b"\x48\x6b\xc0\x0a")  # imul rax, rax, 10
    c.rel32(b"\x0f\x80", "bad")  # jo bad
    c.emit(b"\x48\x01\xc8")  # add rax, rcx
    c.rel32(b"\x0f\x88", "bad")  # js bad: too large
    c.emit(b"\x48\xff\xc7")  # inc rdi
    c.rel32(b"\xe9", "digit")  # jmp digit
    c.label("parsed")
    c.emit(b"\x49\x89\xc4")  # mov r12, rax: rounds left
    c.label("round")
    c.emit(b"\x4d\x85\xe4")  # test r12, r12
    c.rel32(b"\x0f\x84", "done")  # jz done
    c.emit(b"\xb8\x01\x01\x00\x00")  # mov eax, 257: openat
    c.emit(b"\xbf\x9c\xff\xff\xff")  # mov edi, -100: AT_FDCWD
    c.emit(b"\x4c\x89\xee")  # mov rsi, r13
    c.emit(b"\x31\xd2")  # xor edx, edx: O_RDONLY
    c.emit(b"\x45\x31\xd2")  # xor r10d, r10d
    c.emit(b"\x0f\x05")  # syscall
    c.emit(b"\x48\x85\xc0")  # test rax, rax
    c.rel32(b"\x0f\x88", "bad")  # js bad
    c.emit(b"\x49\x89\xc6")  # mov r14, rax: the fd
    c.emit(b"\x44\x89\xf7")  # mov edi, r14d
    c.rel32(b"\x48\x8d\x35", "buffer")  # lea rsi, [rip + buffer]
    c.emit(b"\xba\x40\x00\x00\x00")  # mov edx, 64
    c.emit(b"\x31\xc0")  # xor eax, eax: read
    c.emit(b"\x0f\x05")  # syscall
    c.emit(b"\xb8\x03\x00\x00\x00")  # mov eax, 3: close
    c.emit(b"\x44\x89\xf7")  # mov edi, r14d
    c.emit(b"\x0f\x05")  # syscall
    c.emit(b"\x49\xff\xcc")  # dec r12
    c.rel32(b"\xe9", "round")  # jmp round
    c.label("done")
    c.emit(b"\xb8\x3c\x00\x00\x00\x31\xff\x0f\x05")  # exit(0)
    c.label("bad")
    c.emit(b"\xb8\x3c\x00\x00\x00\xbf\x01\x00\x00\x00\x0f\x05")  # exit(1)
    while len(c.buf) % 16:
        c.emit(b"\xcc")
    c.label("buffer")  # the bss, just after the file's bytes
    return c.link()


def _elf(code: bytes, bss: int) -> bytes:
    entry = _BASE + _EHDR + _PHDR
    ehdr = struct.pack(
        "<4sBBBBB7xHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little-endian, version 1, System V
        2, 62, 1,  # ET_EXEC, EM_X86_64, EV_CURRENT
        entry, _EHDR, 0,  # entry, program headers, no section headers
        0, _EHDR, _PHDR, 1, 0, 0, 0,
    )  # fmt: skip
    size = _EHDR + _PHDR + len(code)
    # One PT_LOAD, read/write/execute, the whole file at _BASE, the bss after it.
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0, _BASE, _BASE, size, size + bss, 4096)
    return ehdr + phdr + code


def openat_loop() -> bytes:
    """The ``qp-openat N FILE`` program (see the module docstring)."""
    return _elf(_openat_loop_code(), _BSS)


def upload_command(path: str, program: bytes) -> str:
    """A shell line that writes ``program`` to ``path`` in the guest and
    makes it executable (one line: a console takes it in one go)."""
    text = base64.b64encode(program).decode()
    return f"echo {text} | base64 -d > {path} && chmod 0755 {path}"
