"""Progress on a terminal, and ``qprobes symbols`` without a boot.

Each test runs the CLI as a subprocess with a cache of its own
(``QPROBES_CACHE``) and the built guest (``QPROBES_LINUX_GUEST``). Whether a
guest booted is seen without any timing: the no-boot runs have an empty
``PATH``, so a boot would fail with "qemu-system-x86_64 not found".
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.terminal import CLI, PtySession

pytestmark = pytest.mark.vm

PATTERN = "do_sys_open*"


def qprobes(*args: str, env: dict[str, str], timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          check=False, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def env(guest: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The CLI's environment: the built guest, and a cache with no kallsyms yet."""
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "QPROBES_CACHE": str(cache),
            "QPROBES_LINUX_GUEST": str(guest.directory)}  # fmt: skip


@pytest.fixture(scope="module")
def no_qemu(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The same, with nothing on PATH: a run that tries to boot fails."""
    empty = tmp_path_factory.mktemp("empty-path")
    return {**env, "PATH": str(empty)}


@pytest.fixture(scope="module")
def booted(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``qprobes symbols '*'`` with stderr piped, on a guest it boots (the
    first boot of this kernel for this cache)."""
    result = qprobes("symbols", "*", env=env)
    assert result.returncode == 0, result.stderr
    return result


def test_piped_stderr_carries_no_progress(booted: subprocess.CompletedProcess[str]) -> None:
    assert booted.stderr.count("\n") == 1, booted.stderr
    assert booted.stderr.startswith("# KASLR slide 0x0; "), booted.stderr
    assert "\r" not in booted.stderr and "\x1b" not in booted.stderr
    assert "booting" not in booted.stderr


def test_symbols_of_the_same_kernel_need_no_boot(
    booted: subprocess.CompletedProcess[str], no_qemu: dict[str, str]
) -> None:
    again = qprobes("symbols", "*", env=no_qemu)
    assert again.returncode == 0, again.stderr
    assert again.stdout == booted.stdout
    assert "from an earlier boot of this kernel" in again.stderr
    some = qprobes("symbols", PATTERN, env=no_qemu)
    assert some.returncode == 0, some.stderr
    wanted = [line for line in booted.stdout.splitlines()
              if line.split()[-1].startswith("do_sys_open")]  # fmt: skip
    assert some.stdout.splitlines() == wanted and len(wanted) >= 2, some.stdout


def test_same_image_elsewhere_is_served_another_is_booted(
    booted: subprocess.CompletedProcess[str], guest: Any, no_qemu: dict[str, str],
    tmp_path: Path,
) -> None:  # fmt: skip
    copy = tmp_path / "bzImage"
    shutil.copyfile(guest.kernel, copy)
    same = qprobes("symbols", PATTERN, "--kernel", str(copy), env=no_qemu)
    assert same.returncode == 0, same.stderr
    # One byte more is another image: no record of it, so qprobes boots.
    with copy.open("ab") as f:
        f.write(b"\0")
    other = qprobes("symbols", PATTERN, "--kernel", str(copy), env=no_qemu)
    assert other.returncode == 1 and "qemu-system-x86_64 not found" in other.stderr, other.stderr


def test_kaslr_boots_instead_of_printing_unslid_addresses(
    booted: subprocess.CompletedProcess[str], no_qemu: dict[str, str]
) -> None:
    result = qprobes("symbols", PATTERN, "--kaslr", env=no_qemu)
    assert result.returncode == 1, result.stdout
    assert "qemu-system-x86_64 not found" in result.stderr and not result.stdout


def test_progress_on_a_terminal(env: dict[str, str], tmp_path: Path) -> None:
    """Each long step is one line on the terminal, rewritten in place, then
    ended with its time; the symbols follow on their own lines."""
    fresh = {**env, "QPROBES_CACHE": str(tmp_path)}  # boots: nothing cached here
    session = PtySession(["symbols", PATTERN], env=fresh)
    status = session.wait(timeout=300)
    text = session.output.decode(errors="replace")
    assert status == 0, text
    for step in ("booting vmlinuz (TCG, 1 vCPU)", "reading the kernel's symbols (kallsyms)",
                 "reading the kernel's types (BTF)"):  # fmt: skip
        assert f"\rqprobes: {step}" in text, text
        assert f"{step}" in text and "done in " in text.split(step, 1)[1].split("\n", 1)[0], text
    assert "do_sys_openat2\r\n" in text, text
