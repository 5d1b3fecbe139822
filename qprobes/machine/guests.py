"""The guests qprobes can boot with no set-up: the qtest kernel built from this tree."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from qprobes.errors import MachineError
from qprobes.machine.qemu import MachineConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
QTEST_DIR = REPO_ROOT / "kernels" / "qtest"

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
    image = QTEST_DIR / "build" / "qtest.elf"
    if build:
        if shutil.which("make") is None or shutil.which("gcc") is None:
            if image.is_file():
                return image
            raise MachineError("building qtest needs make and gcc (run scripts/install.sh)")
        result = subprocess.run(
            ["make", "-s", "-C", str(QTEST_DIR)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise MachineError(f"building qtest failed:\n{result.stdout}{result.stderr}")
    if not image.is_file():
        raise MachineError(f"{image} is missing; run 'make -C {QTEST_DIR}'")
    return image


def qtest_config(append: str = "", **kwargs: object) -> MachineConfig:
    """A :class:`MachineConfig` that boots qtest."""
    config = MachineConfig(kernel=qtest_kernel(), append=append)
    for key, value in kwargs.items():
        if not hasattr(config, key):
            raise TypeError(f"MachineConfig has no field {key!r}")
        setattr(config, key, value)
    return config
