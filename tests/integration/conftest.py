"""Fixtures shared by the modules that boot guests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qprobes.errors import QprobesError
from qprobes.frontends.session import Session
from tests.conftest import require_vm


@pytest.fixture(scope="module")
def linux() -> Iterator[Session]:
    """The default Linux guest with qprobes attached: one per test module."""
    try:
        session = Session.linux()
    except QprobesError as exc:
        require_vm(f"the default Linux guest cannot be booted: {exc}")
        raise
    try:
        yield session
    finally:
        session.close()
