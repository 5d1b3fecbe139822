"""The guest's serial console as a pwntools tube.

pwntools is imported here only, and lazily by the machine, because importing
it costs about a second. The tube gives the expect-style calls users know:
``recvuntil``, ``recvline``, ``sendline``, ``sendlineafter``, ``interactive``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
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

    def interact(self, stdin: int, stdout: int, on_output: Callable[[bytes], None] | None = None
                 ) -> str:  # fmt: skip
        """Connect the terminal on ``stdin``/``stdout`` to the console until the
        guest closes it (returns ``"closed"``) or the user types QEMU's own
        escape, ``Ctrl-A x`` (returns ``"quit"``; ``Ctrl-A Ctrl-A`` sends one
        ``Ctrl-A``).

        A terminal is put in raw mode meanwhile, so that every key (Ctrl-C,
        Ctrl-D, arrows) reaches the guest and only the guest echoes; the
        terminal's own answers (the cursor position that busybox's line
        editor asks for) reach the guest too, instead of the screen.
        ``on_output`` sees everything the guest prints.
        """
        import os
        import select
        import termios
        import tty

        sock = self._tube.sock
        saved = None
        if os.isatty(stdin):
            saved = termios.tcgetattr(stdin)
            tty.setraw(stdin)
        escape = False  # a Ctrl-A waits for its second key
        inputs = [sock, stdin]
        try:
            # What the tube already buffered (the boot) comes first.
            early = self._tube.recv(1 << 20, timeout=0) if len(self._tube.buffer) else b""
            if early:
                os.write(stdout, early)
                if on_output is not None:
                    on_output(early)
            while True:
                ready, _, _ = select.select(inputs, [], [])
                if sock in ready:
                    data = sock.recv(4096)
                    if not data:
                        return "closed"
                    os.write(stdout, data)
                    if on_output is not None:
                        on_output(data)
                if stdin in ready:
                    keys = os.read(stdin, 4096)
                    if not keys:  # stdin closed: the guest's output still flows
                        inputs = [sock]
                        continue
                    out = bytearray()
                    for key in keys:
                        if escape:
                            escape = False
                            if key in (ord("x"), ord("X")):
                                return "quit"
                            out += b"\x01" if key == 1 else bytes([1, key])
                        elif key == 1:
                            escape = True
                        else:
                            out.append(key)
                    if out:
                        sock.sendall(bytes(out))
        finally:
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)

    def close(self) -> None:
        self._tube.close()
