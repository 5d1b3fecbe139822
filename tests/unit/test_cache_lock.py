"""Two processes that want the guest cache at once: one builds, the other
waits and uses its build (pytest-xdist workers share ``QPROBES_CACHE``)."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from qprobes.errors import MachineError
from qprobes.machine import linux
from qprobes.machine.cachelock import cache_lock


def _fake_build(directory: Path | None = None, timeout: float = 0) -> str:
    """What the builder leaves: kernel, initramfs, then the manifest; slowly,
    so that a second builder running at the same time would overlap."""
    assert directory is not None
    marker = directory / "builds"
    with marker.open("a") as f:
        f.write("start\n")
    time.sleep(0.5)
    (directory / "vmlinuz").write_bytes(b"kernel")
    (directory / "initramfs.cpio.gz").write_bytes(b"initrd")
    manifest = {
        "vmlinuz_sha256": linux.sha256_file(directory / "vmlinuz"),
        "initramfs_sha256": linux.sha256_file(directory / "initramfs.cpio.gz"),
        "builder_sha256": linux.sha256_file(linux.BUILD_SCRIPT),
    }
    (directory / "guest.json").write_text(json.dumps(manifest))
    with marker.open("a") as f:
        f.write("end\n")
    return "built\n"


def test_two_callers_build_the_guest_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QPROBES_CACHE", str(tmp_path))
    monkeypatch.delenv("QPROBES_LINUX_GUEST", raising=False)
    monkeypatch.setattr(linux, "build_linux_guest", _fake_build)
    found: list[linux.LinuxGuest] = []
    threads = [threading.Thread(target=lambda: found.append(linux.linux_guest()))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert (tmp_path / "linux" / "builds").read_text() == "start\nend\n"
    assert len(found) == 3 and {g.kernel for g in found} == {tmp_path / "linux" / "vmlinuz"}


def _hold(directory: str, held: object, release: object) -> None:
    with cache_lock(Path(directory)):
        held.set()  # type: ignore[attr-defined]
        release.wait(10)  # type: ignore[attr-defined]


def test_the_lock_excludes_another_process_and_times_out(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(tmp_path), held, release))
    proc.start()
    try:
        assert held.wait(30)
        busy = r"another process has held .*\.lock for 0.5 s"
        with pytest.raises(MachineError, match=busy), cache_lock(tmp_path, timeout=0.5):
            pass
        release.set()
        proc.join(10)
        with cache_lock(tmp_path, timeout=5):  # free again once the holder let go
            pass
    finally:
        release.set()
        proc.join(10)


def test_a_dead_holder_releases_the_lock(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(tmp_path), held, release))
    proc.start()
    assert held.wait(30)
    proc.kill()
    proc.join(10)
    with cache_lock(tmp_path, timeout=5):
        pass
