"""Fixtures shared by the modules that boot guests, on the plugin's
(:mod:`qprobes.frontends.pytest_plugin`): its options choose the guest, its
hook saves a failing test's console."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qprobes.frontends.pytest_plugin import GuestPool
from qprobes.frontends.session import Session


@pytest.fixture(scope="module")
def linux(qprobes_guests: GuestPool) -> Iterator[Session]:
    """The default Linux guest with qprobes attached: one per test module
    (its tests change the guest, so it is not the session's shared one)."""
    session = qprobes_guests.boot()
    try:
        yield session
    finally:
        session.close()
