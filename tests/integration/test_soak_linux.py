"""The soak's short form (about 2 minutes of workload): see
:mod:`tests.integration.soak`. ``scripts/soak.sh --minutes 30`` runs the same
test longer (``QPROBES_SOAK_SECONDS``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from qprobes.errors import QprobesError
from qprobes.frontends.session import Session
from tests.conftest import require_vm
from tests.integration import soak

pytestmark = [pytest.mark.vm, pytest.mark.serial]

SECONDS = float(os.environ.get("QPROBES_SOAK_SECONDS", "120"))


@pytest.fixture(scope="module")
def guest2() -> Iterator[Session]:
    try:
        session = Session.linux(smp=2)
    except QprobesError as exc:
        require_vm(f"the default Linux guest cannot be booted: {exc}")
        raise
    try:
        yield session
    finally:
        session.close()


def test_soak(guest2: Session, capsys: pytest.CaptureFixture[str]) -> None:
    def log(line: str) -> None:
        with capsys.disabled():
            print(line, flush=True)

    result = soak.soak(guest2, SECONDS, log)
    log(result.line())
    log("soak: hits " + " ".join(f"{k.split('/')[-1]}={v}" for k, v in result.hits.items()))
    # A ping every PING_EVERY s of running, each answered (soak() checks the answer).
    assert result.pings >= max(1, int(SECONDS // (2 * soak.PING_EVERY))), result.line()
    never = [name for name, n in result.hits.items() if n == 0]
    assert not never, f"probes never hit: {never}"
    assert result.explained, f"misses without a counted cause: {result.missed} {result.causes}"
    assert not result.lost, result.lost
    assert not result.bad, result.bad[:10]
    assert not result.changed, f"not as before attaching: {result.changed}"
    assert result.answered and result.alive, "the guest stopped answering after detach"
