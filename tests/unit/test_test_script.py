"""scripts/test.sh: the suite in two parts (the non-serial tests two at a
time under pytest-xdist, then the serial ones alone), or one pytest as given."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    """A venv whose python records its arguments (one line per run) and
    fails with $FAKE_STATUS when they contain $FAKE_FAIL_ON."""
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    log = tmp_path / "runs"
    (bindir / "python").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in *"${FAKE_FAIL_ON:-@@}"*) exit "${FAKE_STATUS:-1}" ;; esac\n'
    )
    (bindir / "pip").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "qprobes").write_text("#!/bin/sh\necho 'qprobes 0'\n")
    for name in ("python", "pip", "qprobes"):
        (bindir / name).chmod(0o755)
    (tmp_path / "venv" / ".qprobes-installed").touch()  # newer than pyproject.toml
    return tmp_path


def run(fake: Path, *args: str, **env: str) -> tuple[int, list[str]]:
    result = subprocess.run([str(REPO / "scripts" / "test.sh"), *args],
                            env={**os.environ, "QPROBES_VENV": str(fake / "venv"), **env},
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    log = fake / "runs"
    return result.returncode, log.read_text().splitlines() if log.exists() else []


def test_no_arguments_runs_the_parallel_part_then_the_serial_one(fake_venv: Path) -> None:
    status, runs = run(fake_venv)
    assert status == 0
    assert runs == ["-m pytest -ra -n 2 -m not serial", "-m pytest -ra -m serial"]


def test_a_failing_parallel_part_still_runs_the_serial_one(fake_venv: Path) -> None:
    status, runs = run(fake_venv, FAKE_FAIL_ON="not serial", FAKE_STATUS="1")
    assert status == 1 and len(runs) == 2
    status, runs = run(fake_venv, FAKE_FAIL_ON="-m serial", FAKE_STATUS="3")
    assert status == 3


@pytest.mark.parametrize(("args", "env", "want"), [
    (("tests/unit", "-q"), {}, "-m pytest -ra tests/unit -q"),
    ((), {"QPROBES_TEST_JOBS": "1"}, "-m pytest -ra"),
])  # fmt: skip
def test_arguments_or_one_job_run_one_pytest(fake_venv: Path, args: tuple[str, ...],
                                             env: dict[str, str], want: str) -> None:  # fmt: skip
    status, runs = run(fake_venv, *args, **env)
    assert status == 0 and runs == [want]
