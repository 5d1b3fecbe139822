"""Shared test plumbing.

Tests marked ``vm`` boot real QEMU guests. Where QEMU or a guest cannot be
had they skip with the reason, unless ``QPROBES_REQUIRE_VM=1`` (set by
scripts/test.sh and CI), which turns the skip into a failure. The guests
come from qprobes' own pytest plugin (:mod:`qprobes.frontends.pytest_plugin`,
loaded by pyproject.toml's ``addopts``): its options (``--qprobes-smp``...)
and its artifacts of failing tests apply to these tests too.
"""

from __future__ import annotations

import shutil

import pytest

from qprobes.frontends.pytest_plugin import require_vm

__all__ = ["require_vm"]


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        require_vm("qemu-system-x86_64 is not installed (scripts/install.sh installs it)")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def qtest_image(qemu_binary: str):  # type: ignore[no-untyped-def]
    from qprobes.errors import MachineError
    from qprobes.machine.guests import qtest_kernel

    try:
        return qtest_kernel()
    except MachineError as exc:
        require_vm(f"qtest cannot be built: {exc}")


@pytest.fixture(scope="session")
def guest(qemu_binary: str):  # type: ignore[no-untyped-def]
    """The default Linux guest's kernel and initramfs (built on first use).

    Test modules that boot qtest define their own ``guest`` fixture."""
    from qprobes.errors import MachineError
    from qprobes.machine.linux import linux_guest

    try:
        return linux_guest()
    except MachineError as exc:
        require_vm(f"the Linux guest cannot be built: {exc}")
        raise
