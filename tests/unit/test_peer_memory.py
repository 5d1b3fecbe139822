"""Finding the process at the other end of a gdbstub connection, and guest
RAM through a shared file, without a guest: real sockets and files."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from qprobes.errors import TargetError
from qprobes.remote.connection import Connection, tcp_peer_pid
from qprobes.target.hostmem import FileMemory


def test_a_unix_peer_is_named_by_its_credentials() -> None:
    a, b = socket.socketpair()
    try:
        assert Connection(a).peer_pid() == os.getpid()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_a_loopback_tcp_peer_is_found_through_proc(family: int, host: str) -> None:
    try:
        server = socket.socket(family)
        server.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} on this host")
    server.listen()
    client = socket.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    try:
        assert Connection(client).peer_pid() == os.getpid()
        # The listening socket's own entry is not the peer: ends swapped only.
        assert tcp_peer_pid(client.getpeername()[:2], client.getsockname()[:2]) == os.getpid()
        assert tcp_peer_pid(("127.0.0.1", 1), ("127.0.0.1", 2)) is None
    finally:
        for s in (client, accepted, server):
            s.close()


class _Target:
    """Guest-physical memory the gdbstub would show (a bytearray)."""

    def __init__(self, ram: bytearray) -> None:
        self.ram = ram

    def read_phys(self, paddr: int, length: int) -> bytes:
        return bytes(self.ram[paddr : paddr + length])

    def write_phys(self, paddr: int, data: bytes) -> None:
        self.ram[paddr : paddr + len(data)] = data


def test_file_memory_reads_the_file_and_checks_it_is_the_guests(tmp_path: Path) -> None:
    ram = bytearray(os.urandom(64 * 1024))
    path = tmp_path / "guest.ram"
    path.write_bytes(ram)
    mem = FileMemory(_Target(ram), str(path))  # type: ignore[arg-type]
    try:
        assert mem.read_phys(0x1FF0, 32) == bytes(ram[0x1FF0:0x2010])
        assert mem.matches([0x3000, 0x5123])
        mem.write_phys(0x4000, b"qprobes")
        assert path.read_bytes()[0x4000:0x4007] == b"qprobes"
        # Past the file: through the gdbstub.
        assert mem.read_phys(0x10000, 4) == b""
        assert not mem.covers(0x10000, 1) and mem.covers(0, 0x10000)
    finally:
        mem.close()
    other = tmp_path / "other.ram"
    other.write_bytes(bytes(len(ram)))
    mem = FileMemory(_Target(ram), str(other))  # type: ignore[arg-type]
    try:
        assert not mem.matches([0x3000])
    finally:
        mem.close()
    with pytest.raises(TargetError, match="nosuch"):
        FileMemory(_Target(ram), str(tmp_path / "nosuch"))  # type: ignore[arg-type]
