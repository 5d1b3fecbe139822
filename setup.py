"""Packaging hook: the wheel carries the guests qprobes boots with no set-up.

``build_py`` copies the default Linux guest's builder
(``scripts/build-linux-guest.sh``) and qtest's sources into
``qprobes/_data/``, and builds ``qtest.elf`` there when make and gcc are
present, so that an installed qprobes runs ``qprobes qtest`` with no
compiler and builds the Linux guest with no checkout. Everything else is in
pyproject.toml.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
QTEST_SOURCES = ("*.c", "*.h", "*.S", "linker.ld", "Makefile", "README.md")


class BuildPyWithGuests(build_py):
    def run(self) -> None:
        super().run()
        data = Path(self.build_lib) / "qprobes" / "_data"
        qtest = data / "qtest"
        qtest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(HERE / "scripts" / "build-linux-guest.sh", data / "build-linux-guest.sh")
        for pattern in QTEST_SOURCES:
            for src in (HERE / "kernels" / "qtest").glob(pattern):
                shutil.copy2(src, qtest / src.name)
        if shutil.which("make") and shutil.which("gcc"):
            with tempfile.TemporaryDirectory() as build:
                subprocess.run(["make", "-s", "-C", str(qtest), f"BUILD={build}"], check=True)
                shutil.copy2(Path(build) / "qtest.elf", qtest / "qtest.elf")
        else:
            self.announce("make or gcc missing: the wheel carries qtest's sources only", 2)


setup(cmdclass={"build_py": BuildPyWithGuests})
