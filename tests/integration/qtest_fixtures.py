"""Helpers shared by the tests that boot qtest."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.frontends.qtest import QtestDriver, QtestTarget
from qprobes.frontends.session import Session


def instructions(session: Session, target: QtestTarget) -> list[x86insn.Insn]:
    """The instructions of a qtest target, decoded from guest memory."""
    code = session.engine._original_bytes(target.addr, target.size)
    return x86insn.decode_function(code, target.addr)


@contextmanager
def qtest_session(**kwargs: object) -> Iterator[tuple[Session, QtestDriver]]:
    session = Session.qtest(**kwargs)  # type: ignore[arg-type]
    try:
        yield session, QtestDriver(session)
    finally:
        session.close()
