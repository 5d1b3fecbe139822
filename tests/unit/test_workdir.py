"""Where QEMU's scratch directory (and its Unix sockets) goes."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from qprobes.machine.qemu import SOCKET_PATH_MAX, WORKDIR_PREFIX, workdir_parent


def test_a_deep_tmpdir_falls_back_to_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    assert workdir_parent() == Path("/tmp")
    shallow = Path(tempfile.mkdtemp(prefix="qpw-", dir="/tmp"))
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(shallow))
        assert workdir_parent() == shallow
        # The longest scratch directory it allows still takes the sockets.
        work = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=workdir_parent()))
        assert len(str(shallow)) <= SOCKET_PATH_MAX
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(work / "console.sock"))
        finally:
            sock.close()
    finally:
        import shutil

        shutil.rmtree(shallow, ignore_errors=True)


def test_the_limit_leaves_room_for_the_socket_names() -> None:
    parent = "/" + "x" * (SOCKET_PATH_MAX - 1)
    longest = f"{parent}/{WORKDIR_PREFIX}abcdefgh/console.sock"
    assert len(longest) <= 107
