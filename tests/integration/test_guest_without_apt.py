"""The default guest on a host without apt (Fedora, Arch), built from the
pinned Debian packages that qprobes downloads itself, here from a local HTTP
server on 127.0.0.1 that serves the real packages.

The CLI runs with a PATH that holds every tool of this host except apt,
dpkg and busybox, and with a cache of its own.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qprobes.errors import MachineError
from qprobes.machine.debfetch import DebPin, fetch, read_pins, sha256_of
from qprobes.machine.linux import BUILD_SCRIPT, linux_cache_dir
from tests.conftest import require_vm
from tests.integration.terminal import CLI, PtySession

pytestmark = pytest.mark.vm

HIDDEN = ("apt", "dpkg", "busybox")


def _package(pin: DebPin) -> Path:
    """The pinned package: kept by an earlier build, in apt's cache, or
    downloaded once from Debian's archive."""
    for path in (linux_cache_dir() / "packages" / pin.filename,
                 Path("/var/cache/apt/archives") / pin.apt_filename):  # fmt: skip
        if path.is_file() and sha256_of(path) == pin.sha256:
            return path
    try:
        return fetch(pin, linux_cache_dir() / "packages")
    except MachineError as exc:
        require_vm(f"the pinned {pin.package} cannot be had: {exc}")
        raise


class Mirror:
    """A Debian mirror on 127.0.0.1: ``ROOT/POOL-PATH`` -> a file."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                path = mirror.files.get(self.path)
                if path is None:
                    self.send_error(404)
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def pins() -> tuple[DebPin, DebPin]:
    kernel, busybox, _ = read_pins(BUILD_SCRIPT)
    return kernel, busybox


@pytest.fixture(scope="module")
def mirror(pins: tuple[DebPin, DebPin], qemu_binary: str) -> Iterator[Mirror]:
    m = Mirror()
    for pin in pins:
        m.files["/" + pin.pool] = _package(pin)
    yield m
    m.httpd.shutdown()
    m.httpd.server_close()


@pytest.fixture(scope="module")
def no_apt_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PATH with this host's tools, less apt, dpkg and busybox."""
    bin_dir = tmp_path_factory.mktemp("no-apt-bin")
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            name = entry.name
            if name.startswith(HIDDEN) or (bin_dir / name).exists():
                continue
            if os.access(entry.path, os.X_OK) and not entry.is_dir():
                (bin_dir / name).symlink_to(entry.path)
    return str(bin_dir)


def environment(mirror: Mirror, path: str, cache: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": path, "QPROBES_CACHE": str(cache),
           "QPROBES_DEBIAN_MIRROR": mirror.url}  # fmt: skip
    env.pop("QPROBES_LINUX_GUEST", None)
    return env


def test_a_host_without_apt_builds_the_same_guest(
    mirror: Mirror, no_apt_path: str, pins: tuple[DebPin, DebPin], guest: Any, tmp_path: Path
) -> None:
    """Download (with progress on the terminal), unpack, build, boot: the
    guest is byte for byte the one apt's path builds."""
    kernel, busybox = pins
    session = PtySession(["symbols", "do_sys_open*"], env=environment(mirror, no_apt_path,
                                                                      tmp_path))  # fmt: skip
    status = session.wait(timeout=600)
    text = session.output.decode(errors="replace")
    assert status == 0, text
    host = mirror.url.removeprefix("http://")
    assert f"\rqprobes: downloading {kernel.filename} from {host}: " in text, text
    assert "%" in text.split(kernel.filename, 1)[1].split("\n", 1)[0], text
    for step in (f"unpacking {kernel.filename}", f"downloading {busybox.filename}",
                 "building the default Linux guest", "booting vmlinuz"):  # fmt: skip
        assert f"\rqprobes: {step}" in text, text
    assert "do_sys_openat2\r\n" in text, text
    assert sorted(mirror.requests) == sorted("/" + p.pool for p in pins)
    built = json.loads((tmp_path / "linux" / "guest.json").read_text())
    assert built["sha256"] == kernel.sha256 and built["pinned"] is True
    assert built["busybox_version"] == busybox.version
    # The kernel is the pinned package's; the initramfs is the same bytes
    # when this host's own busybox is the pinned one (as on the Debian host
    # the default guest was built on).
    assert built["vmlinuz_sha256"] == guest.manifest["vmlinuz_sha256"]
    if guest.manifest.get("busybox_version") == busybox.version:
        assert built["initramfs_sha256"] == guest.manifest["initramfs_sha256"]
    kept = sorted(p.name for p in (tmp_path / "linux" / "packages").iterdir())
    assert kept == sorted(p.filename for p in pins)


def test_a_wrong_checksum_is_refused_in_one_line(
    mirror: Mirror, no_apt_path: str, pins: tuple[DebPin, DebPin], tmp_path: Path
) -> None:
    kernel, busybox = pins
    wrong = Mirror()
    try:
        wrong.files["/" + kernel.pool] = mirror.files["/" + busybox.pool]  # another package
        result = subprocess.run([*CLI, "symbols", "do_sys_open*"], capture_output=True,
                                text=True, timeout=300, check=False,
                                env=environment(wrong, no_apt_path, tmp_path))  # fmt: skip
    finally:
        wrong.httpd.shutdown()
        wrong.httpd.server_close()
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qprobes: error: ") and "checksum mismatch" in lines[0]
    assert kernel.sha256 in lines[0] and f"refusing {kernel.package} {kernel.version}" in lines[0]
    assert not (tmp_path / "linux" / "vmlinuz").exists()
    assert not list((tmp_path / "linux" / "packages").glob("*"))


def test_an_apt_that_fails_falls_back_to_the_archive(
    mirror: Mirror, no_apt_path: str, pins: tuple[DebPin, DebPin], tmp_path: Path
) -> None:
    """apt is there but cannot download (no network to its mirror, a broken
    list): the build gets the same pins over HTTPS instead."""
    broken = tmp_path / "broken-apt"
    broken.mkdir()
    for tool in ("apt-get", "apt-cache"):
        script = broken / tool
        script.write_text(f"#!/bin/sh\necho '{tool}: cannot reach the mirror' >&2\nexit 100\n")
        script.chmod(0o755)
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is not None:  # apt's own unpacker works; only downloads fail
        (broken / "dpkg-deb").symlink_to(dpkg_deb)
    before = len(mirror.requests)
    env = environment(mirror, f"{broken}{os.pathsep}{no_apt_path}", tmp_path / "cache")
    result = subprocess.run([*CLI, "symbols", "do_sys_open*"], capture_output=True, text=True,
                            timeout=600, check=False, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "do_sys_openat2" in result.stdout
    assert sorted(mirror.requests[before:]) == sorted("/" + p.pool for p in pins)
    built = json.loads((tmp_path / "cache" / "linux" / "guest.json").read_text())
    assert built["sha256"] == pins[0].sha256 and built["pinned"] is True
