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


def step_until(session: Session, rip: int, max_steps: int = 100_000) -> None:
    """Single-step the first vCPU through the gdbstub until it reaches ``rip``."""
    client = session.target.client
    vcpu = session.target.vcpus[0]
    for _ in range(max_steps):
        client.step(vcpu)
        client.wait_stop(10)
        if session.target.read_register("rip", vcpu) == rip:
            return
    raise AssertionError(f"the vCPU never reached {rip:#x}")
