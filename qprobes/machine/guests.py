"""The guests qprobes can boot with no set-up: the qtest kernel built from this tree."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from qprobes.errors import MachineError
from qprobes.machine.cachelock import cache_lock
from qprobes.machine.qemu import MachineConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
#: qtest's sources: the checkout's, or the copy an installed package carries
#: (with ``qtest.elf`` prebuilt when the wheel was built; see setup.py).
QTEST_DIR = REPO_ROOT / "kernels" / "qtest"
PACKAGED_QTEST = Path(__file__).resolve().parents[1] / "_data" / "qtest"


def _cache_root() -> Path:
    base = os.environ.get("QPROBES_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "qprobes"

# isa-debug-exit statuses qtest uses: QEMU exits with (v << 1) | 1.
QTEST_EXIT_PASS = (0x10 << 1) | 1
QTEST_EXIT_FAIL = (0x11 << 1) | 1
QTEST_PROMPT = b"qtest> "


def qtest_kernel(build: bool = True) -> Path:
    """The qtest ELF, built with ``make`` when missing or out of date.

    ``QPROBES_QTEST`` names a prebuilt image instead.
    """
    override = os.environ.get("QPROBES_QTEST")
    if override:
        path = Path(override)
        if not path.is_file():
            raise MachineError(f"QPROBES_QTEST={override} does not exist")
        return path
    source, build_dir = QTEST_DIR, QTEST_DIR / "build"
    if not (QTEST_DIR / "Makefile").is_file():  # an installed package, not a checkout
        prebuilt = PACKAGED_QTEST / "qtest.elf"
        if prebuilt.is_file():
            return prebuilt
        source, build_dir = PACKAGED_QTEST, _cache_root() / "qtest"
        if not (source / "Makefile").is_file():
            raise MachineError(f"qtest's sources are missing from this installation ({source})")
    image = build_dir / "qtest.elf"
    if build:
        if shutil.which("make") is None or shutil.which("gcc") is None:
            if image.is_file():
                return image
            raise MachineError("building qtest needs make and gcc (run scripts/install.sh)")
        # Two makes in one build directory at once (xdist workers) would
        # write the same objects: one at a time.
        with cache_lock(build_dir.parent, f".{build_dir.name}.lock"):
            result = subprocess.run(
                ["make", "-s", "-C", str(source), f"BUILD={build_dir}"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise MachineError(f"building qtest failed:\n{result.stdout}{result.stderr}")
    if not image.is_file():
        raise MachineError(f"{image} is missing; run 'make -C {source} BUILD={build_dir}'")
    return image


def qtest_config(append: str = "", **kwargs: object) -> MachineConfig:
    """A :class:`MachineConfig` that boots qtest."""
    config = MachineConfig(kernel=qtest_kernel(), append=append)
    for key, value in kwargs.items():
        if not hasattr(config, key):
            raise TypeError(f"MachineConfig has no field {key!r}")
        setattr(config, key, value)
    return config
