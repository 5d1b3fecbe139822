"""The guest's serial console as a pwntools tube.

pwntools is imported here only, and lazily by the machine, because importing
it costs about a second. The tube gives the expect-style calls users know:
``recvuntil``, ``recvline``, ``sendline``, ``sendlineafter``, ``interactive``.
"""

from __future__ import annotations

import socket
from typing import Any


class Console:
    """A serial console connected through QEMU's socket chardev."""

    def __init__(self, sock: socket.socket) -> None:
        from pwnlib.tubes.sock import sock as socktube

        # pwntools' remote() wants an inet socket; its base class takes any.
        tube: Any = socktube()
        tube.sock = sock
        tube.rhost, tube.rport = "qemu-serial", str(sock.getpeername())
        tube.settimeout(tube.timeout)
        self._tube = tube

    @property
    def tube(self) -> Any:
        """The underlying :class:`pwnlib.tubes.remote.remote`."""
        return self._tube

    def recvuntil(self, delim: bytes, timeout: float = 30.0) -> bytes:
        data: bytes = self._tube.recvuntil(delim, timeout=timeout)
        if not data.endswith(delim):
            from qprobes.errors import MachineError

            raise MachineError(
                f"console: no {delim!r} within {timeout} s; last output: {data[-300:]!r}"
            )
        return data

    def recvline(self, timeout: float = 30.0) -> bytes:
        line: bytes = self._tube.recvline(timeout=timeout)
        return line

    def send(self, data: bytes) -> None:
        self._tube.send(data)

    def sendline(self, data: bytes | str) -> None:
        self._tube.sendline(data.encode() if isinstance(data, str) else data)

    def command(self, line: str, prompt: bytes, timeout: float = 30.0) -> str:
        """Send ``line``, wait for ``prompt``, and return what came in between."""
        self.sendline(line)
        out = self.recvuntil(prompt, timeout=timeout)
        # busybox's line editor asks for the cursor position after each prompt.
        out = out.replace(b"\x1b[6n", b"")
        text = out[: -len(prompt)].decode(errors="replace").replace("\r\n", "\n")
        # Drop the echoed command line, if the guest echoes.
        first, _, rest = text.partition("\n")
        return rest if first.strip() == line.strip() else text

    def interactive(self) -> None:
        """Hand the console to the user's terminal (pwntools ``interactive``)."""
        self._tube.interactive(prompt="")

    def close(self) -> None:
        self._tube.close()
