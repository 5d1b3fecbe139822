"""The default guest's Debian packages on hosts without apt (Fedora, Arch).

``scripts/build-linux-guest.sh`` pins the kernel package (and busybox-static)
by name, version, sha256 and path in Debian's archive; this module reads
those pins from the script (they are written in one place only), downloads
a package over HTTPS from Debian's archive (``https://deb.debian.org/``, then
snapshot.debian.org), refuses it unless its sha256 is the pinned one, and
unpacks it with Python alone: a ``.deb`` is an ``ar`` archive whose
``data.tar.xz`` (or ``.gz``, ``.zst`` with the ``zstandard`` package, or
plain ``.tar``) holds the files.

``QPROBES_DEBIAN_MIRROR`` replaces the mirrors (space-separated roots, e.g.
``http://127.0.0.1:8000``: ``ROOT/debian-security/pool/...``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qprobes.errors import MachineError
from qprobes.progress import format_bytes, progress

#: Debian's archive, through its CDN; snapshot.debian.org keeps every
#: package ever published (``archive/ARCHIVE/TIMESTAMP/...``).
DEFAULT_MIRROR = "https://deb.debian.org"
SNAPSHOT = "https://snapshot.debian.org/archive"
TIMEOUT = 60.0
_CHUNK = 1 << 16


@dataclass(frozen=True)
class DebPin:
    """A package pinned in the guest builder: ``pool`` is its path under a
    mirror's root (``debian-security/pool/updates/main/l/...deb``)."""

    package: str
    version: str
    sha256: str
    pool: str
    snapshot: str = ""

    @property
    def filename(self) -> str:
        return self.pool.rsplit("/", 1)[-1]

    @property
    def apt_filename(self) -> str:
        """The name ``apt-get download`` gives the same package (epoch quoted)."""
        return f"{self.package}_{self.version.replace(':', '%3a')}_amd64.deb"

    def urls(self, mirrors: Iterable[str] | None = None) -> list[str]:
        """Where to download it, in order."""
        if mirrors is None:
            env = os.environ.get("QPROBES_DEBIAN_MIRROR", "").split()
            mirrors = env or [DEFAULT_MIRROR]
            if not env and self.snapshot:
                archive, _, rest = self.pool.partition("/")
                return [f"{DEFAULT_MIRROR}/{self.pool}",
                        f"{SNAPSHOT}/{archive}/{self.snapshot}/{rest}"]  # fmt: skip
        return [f"{m.rstrip('/')}/{self.pool}" for m in mirrors]


_ASSIGNMENT = re.compile(r'^([A-Z][A-Z0-9_]*)=(?:"([^"$`]*)"|([^\s$`"]*))$', re.M)


def script_values(text: str) -> dict[str, str]:
    """The builder's plain ``NAME=value`` and ``NAME="a b"`` lines (no expansion)."""
    return {m.group(1): m.group(2) if m.group(2) is not None else m.group(3)
            for m in _ASSIGNMENT.finditer(text)}  # fmt: skip


def read_pins(script: Path) -> tuple[DebPin, DebPin, list[str]]:
    """The kernel pin, the busybox-static pin and the kernel package's test
    module paths (``TEST_MODULE_PATHS``), as the builder script writes them."""
    try:
        values = script_values(script.read_text())
    except OSError as exc:
        raise MachineError(f"cannot read the guest builder {script}: {exc}") from exc
    try:
        kernel = DebPin(values["PIN_PACKAGE"], values["PIN_VERSION"], values["PIN_SHA256"],
                        values["PIN_POOL"], values.get("PIN_SNAPSHOT", ""))  # fmt: skip
        busybox = DebPin(values["BUSYBOX_PIN_PACKAGE"], values["BUSYBOX_PIN_VERSION"],
                         values["BUSYBOX_PIN_SHA256"], values["BUSYBOX_PIN_POOL"],
                         values.get("PIN_SNAPSHOT", ""))  # fmt: skip
        modules = (values.get("TEST_MODULE_PATHS") or values["TEST_MODULE_PATH"]).split()
    except KeyError as exc:
        raise MachineError(f"{script} pins no {exc.args[0]}") from None
    return kernel, busybox, modules


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(pin: DebPin, directory: Path, *, mirrors: Iterable[str] | None = None) -> Path:
    """The pinned package in ``directory``: kept from an earlier download when
    its checksum holds, else downloaded (progress on a terminal). A package
    whose sha256 is not the pin's is refused (:class:`MachineError`, one line
    per mirror tried)."""
    for name in (pin.filename, pin.apt_filename):
        kept = directory / name
        if kept.is_file() and sha256_of(kept) == pin.sha256:
            return kept
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / pin.filename
    errors = []
    for url in pin.urls(mirrors):
        try:
            _download(url, dest, pin)
            return dest
        except MachineError as exc:
            errors.append(str(exc))
    raise MachineError("; ".join(errors))


def _download(url: str, dest: Path, pin: DebPin) -> None:
    part = dest.with_name(dest.name + f".part{os.getpid()}")
    host = urllib.parse.urlsplit(url).netloc
    digest = hashlib.sha256()
    try:
        with progress.step(f"downloading {pin.filename} from {host}") as step:
            try:
                with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    done = 0
                    with part.open("wb") as out:
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            step.update(format_bytes(done, total))
                    # The whole size, however fast it came (updates are throttled).
                    step.update(format_bytes(done, total), force=True)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                why = getattr(exc, "reason", None) or exc
                raise MachineError(f"cannot download {url}: {why}") from exc
            got = digest.hexdigest()
            if got != pin.sha256:
                raise MachineError(
                    f"{url}: checksum mismatch (sha256 {got}, pinned {pin.sha256}): "
                    f"refusing {pin.package} {pin.version}"
                )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


# --- unpacking ------------------------------------------------------------------

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


def ar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, contents) of each member of an ``ar`` archive (a ``.deb``)."""
    if not data.startswith(_AR_MAGIC):
        raise MachineError("not a Debian package (no ar archive header)")
    pos = len(_AR_MAGIC)
    while pos + _AR_HEADER <= len(data):
        header = data[pos : pos + _AR_HEADER]
        if header[58:60] != b"`\n":
            raise MachineError(f"corrupt ar member header at offset {pos}")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise MachineError(f"corrupt ar member size at offset {pos}") from None
        start = pos + _AR_HEADER
        if start + size > len(data):
            raise MachineError(f"ar member {name} is truncated")
        yield name, data[start : start + size]
        pos = start + size + (size & 1)  # members are 2-byte aligned


def _data_tar(name: str, blob: bytes) -> tarfile.TarFile:
    """The package's file archive, read as a stream."""
    if name == "data.tar":
        return tarfile.open(fileobj=io.BytesIO(blob), mode="r|")
    if name == "data.tar.xz":
        return tarfile.open(fileobj=io.BytesIO(blob), mode="r|xz")
    if name == "data.tar.gz":
        return tarfile.open(fileobj=io.BytesIO(blob), mode="r|gz")
    if name == "data.tar.zst":
        try:
            import zstandard  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            raise MachineError("the package's data.tar.zst needs the zstandard Python "
                               "package (pip install zstandard)") from None  # fmt: skip
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob))
        return tarfile.open(fileobj=reader, mode="r|")
    raise MachineError(f"unknown package data member {name}")


def unpack_deb(deb: Path, dest: Path, only: Iterable[str] | None = None) -> list[str]:
    """Unpack ``deb``'s files into ``dest`` (as ``dpkg-deb -x`` does, less
    links and devices). ``only``: globs of the paths wanted
    (``boot/*``); the rest is skipped. Returns the paths written."""
    data = deb.read_bytes()
    found = [(name, blob) for name, blob in ar_members(data) if name.startswith("data.tar")]
    if not found:
        raise MachineError(f"{deb.name} has no data.tar member")
    wanted = list(only) if only is not None else None
    written: list[str] = []
    dest.mkdir(parents=True, exist_ok=True)
    with _data_tar(*found[0]) as tar:
        for member in tar:
            path = member.name.removeprefix("./")
            if not (member.isfile() or member.isdir()) or not path:
                continue  # links, devices: not needed to build a guest
            if wanted is not None and member.isfile() and not any(
                fnmatch.fnmatchcase(path, g) for g in wanted
            ):
                continue
            if member.isdir() and wanted is not None:
                continue  # made as files need them
            try:
                tar.extract(member, dest, filter="data")
            except tarfile.FilterError as exc:
                raise MachineError(f"{deb.name}: refusing {member.name}: {exc}") from exc
            written.append(path)
    return written
