"""Debian packages without apt: pins, ar and data.tar unpacking, checked
downloads (from a local HTTP server), and the progress lines they show."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import lzma
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qprobes.errors import MachineError
from qprobes.machine import debfetch
from qprobes.machine.debfetch import DebPin, ar_members, fetch, read_pins, unpack_deb
from qprobes.machine.linux import BUILD_SCRIPT
from qprobes.progress import Progress, format_bytes


def ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{0o100644:<8o}{len(data):<10}`\n"
        assert len(header) == 60
        out += header.encode() + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def data_tar(files: dict[str, bytes], extra: tuple[tarfile.TarInfo, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mode = len(data), 0o755 if name.startswith("bin/") else 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


FILES = {
    "boot/vmlinuz-6.1.0-9-cloud-amd64": b"\x4d\x5a kernel" * 100,
    "boot/config-6.1.0-9-cloud-amd64": b"CONFIG_KPROBES=y\n",
    "lib/modules/6.1.0-9-cloud-amd64/kernel/lib/crc7.ko": b"\x7fELF module",
    "lib/modules/6.1.0-9-cloud-amd64/kernel/fs/big.ko": b"\x7fELF" + b"\0" * 5000,
    "bin/busybox": b"\x7fELF busybox",
}


def deb(compress: str = "xz", files: dict[str, bytes] = FILES) -> bytes:
    tar = data_tar(files)
    blob = {"xz": lzma.compress, "gz": gzip.compress, "": lambda b: b}[compress](tar)
    name = "data.tar" + (f".{compress}" if compress else "")
    return ar([("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")),
               (name, blob)])  # fmt: skip


def test_ar_members_of_odd_sizes() -> None:
    data = ar([("debian-binary", b"2.0\n"), ("odd", b"abc"), ("data.tar.xz", b"xyz!")])
    assert list(ar_members(data)) == [("debian-binary", b"2.0\n"), ("odd", b"abc"),
                                      ("data.tar.xz", b"xyz!")]  # fmt: skip


@pytest.mark.parametrize("data, why", [
    (b"PK\x03\x04 a zip", "not a Debian package"),
    (b"!<arch>\n" + b"x" * 60, "corrupt ar member header"),
    (ar([("data.tar.xz", b"12345678")])[:-4], "truncated"),
])  # fmt: skip
def test_bad_ar_archives_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(MachineError, match=why):
        list(ar_members(data))


@pytest.mark.parametrize("compress", ["xz", "gz", ""])
def test_unpack_takes_only_the_files_asked_for(compress: str, tmp_path: Path) -> None:
    path = tmp_path / "k.deb"
    path.write_bytes(deb(compress))
    written = unpack_deb(path, tmp_path / "out", ["boot/*", "lib/modules/*/kernel/lib/crc7.ko"])
    assert sorted(written) == sorted(n for n in FILES if n.startswith("boot/") or "crc7" in n)
    for name in written:
        assert (tmp_path / "out" / name).read_bytes() == FILES[name]
    assert not (tmp_path / "out" / "bin").exists()


def test_unpack_keeps_the_executable_bit(tmp_path: Path) -> None:
    path = tmp_path / "b.deb"
    path.write_bytes(deb())
    unpack_deb(path, tmp_path / "out", ["bin/busybox"])
    assert (tmp_path / "out" / "bin" / "busybox").stat().st_mode & 0o100


def test_unpack_refuses_paths_outside_the_destination(tmp_path: Path) -> None:
    evil = tarfile.TarInfo("../../etc/evil")
    evil.size = 0
    tar = data_tar({}, (evil,))
    path = tmp_path / "e.deb"
    path.write_bytes(ar([("debian-binary", b"2.0\n"), ("data.tar", tar)]))
    with pytest.raises(MachineError, match=r"e\.deb: refusing \.\./\.\./etc/evil"):
        unpack_deb(path, tmp_path / "out")
    assert not (tmp_path / "etc").exists()


def test_zstd_data_needs_zstandard_or_unpacks(tmp_path: Path) -> None:
    try:
        import zstandard
    except ImportError:
        path = tmp_path / "z.deb"
        path.write_bytes(ar([("data.tar.zst", b"\x28\xb5\x2f\xfd")]))
        with pytest.raises(MachineError, match="needs the zstandard Python package"):
            unpack_deb(path, tmp_path / "out")
        return
    blob = zstandard.ZstdCompressor().compress(data_tar(FILES))
    path = tmp_path / "z.deb"
    path.write_bytes(ar([("debian-binary", b"2.0\n"), ("data.tar.zst", blob)]))
    assert "bin/busybox" in unpack_deb(path, tmp_path / "out", ["bin/*"])


def test_pins_come_from_the_builder_script() -> None:
    """One place: the builder's PIN_* lines; each pool path names its package."""
    kernel, busybox, module = read_pins(BUILD_SCRIPT)
    text = BUILD_SCRIPT.read_text()
    assert f"PIN_SHA256={kernel.sha256}\n" in text and len(kernel.sha256) == 64
    assert f"BUSYBOX_PIN_SHA256={busybox.sha256}\n" in text
    assert module == ["kernel/lib/crc7.ko", "kernel/fs/binfmt_misc.ko"]
    for pin in (kernel, busybox):
        epochless = pin.version.split(":", 1)[-1]
        assert pin.filename == f"{pin.package}_{epochless}_amd64.deb"
        assert pin.pool.startswith(("debian/pool/", "debian-security/pool/"))
    assert kernel.urls()[0] == f"https://deb.debian.org/{kernel.pool}"


# --- downloads from a local server --------------------------------------------------


class Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


POOL = "debian-security/pool/updates/main/l/x/linux-image-x_6.1-2_amd64.deb"


def pin_for(body: bytes, sha: str | None = None) -> DebPin:
    return DebPin("linux-image-x", "1:6.1-2", sha or hashlib.sha256(body).hexdigest(), POOL)


def test_fetch_downloads_checks_and_keeps(server: Server, tmp_path: Path) -> None:
    body = deb()
    pin = pin_for(body)
    server.files["/" + pin.pool] = body
    path = fetch(pin, tmp_path / "packages", mirrors=[server.url])
    assert path.read_bytes() == body and path.name == pin.filename
    assert server.requests == ["/" + pin.pool]
    assert fetch(pin, tmp_path / "packages", mirrors=[server.url]) == path
    assert len(server.requests) == 1  # kept: no second download


def test_fetch_refuses_a_wrong_checksum_in_one_line(server: Server, tmp_path: Path) -> None:
    body = deb()
    pin = pin_for(body, sha="0" * 64)
    server.files["/" + pin.pool] = body
    with pytest.raises(MachineError) as info:
        fetch(pin, tmp_path / "packages", mirrors=[server.url])
    message = str(info.value)
    assert "\n" not in message and "checksum mismatch" in message, message
    assert f"{server.url}/{pin.pool}" in message and hashlib.sha256(body).hexdigest() in message
    assert list((tmp_path / "packages").iterdir()) == []  # nothing kept, no .part


def test_fetch_tries_the_next_mirror(server: Server, tmp_path: Path) -> None:
    body = deb()
    pin = pin_for(body)
    server.files["/" + pin.pool] = body
    path = fetch(pin, tmp_path, mirrors=[server.url + "/missing", server.url])
    assert path.read_bytes() == body


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_download_progress_on_a_terminal_only(server: Server, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    body = deb(files={"boot/big": bytes(range(256)) * 4096})  # 1 MiB, barely compressible
    pin = pin_for(body)
    server.files["/" + pin.pool] = body
    tty, pipe = Tty(), io.StringIO()
    monkeypatch.setattr(debfetch, "progress", Progress(tty))
    fetch(pin, tmp_path / "a", mirrors=[server.url])
    shown = tty.getvalue()
    assert shown.startswith(f"\rqprobes: downloading {pin.filename} from 127.0.0.1:")
    assert shown.endswith("\x1b[K\n") and ": done in " in shown
    monkeypatch.setattr(debfetch, "progress", Progress(pipe))
    fetch(pin, tmp_path / "b", mirrors=[server.url])
    assert pipe.getvalue() == ""


@pytest.mark.parametrize("done, total, text", [
    (12_300_000, 26_713_492, "12.3 of 26.7 MB, 46%"),
    (26_713_492, 26_713_492, "26.7 of 26.7 MB, 100%"),
    (500_000, None, "0.5 MB"),
])  # fmt: skip
def test_format_bytes(done: int, total: int | None, text: str) -> None:
    assert format_bytes(done, total) == text


def test_progress_steps_rewrite_one_line() -> None:
    tty = Tty()
    reporter = Progress(tty)
    with reporter.step("booting") as step:
        step.update("half", force=True)
    assert tty.getvalue().split("\x1b[K") == [
        "\rqprobes: booting ...", "\rqprobes: booting: half",
        tty.getvalue().split("\x1b[K")[2], "\n",
    ]  # fmt: skip
    assert tty.getvalue().split("\x1b[K")[2].startswith("\rqprobes: booting: done in ")
    with pytest.raises(ValueError), reporter.step("failing"):
        raise ValueError
    assert "\rqprobes: failing: failed after " in tty.getvalue()
