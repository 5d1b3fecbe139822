"""The package as pip installs it: a wheel in a fresh virtual environment,
run from outside the checkout, boots qtest and traces the Linux guest.

The wheel's dependencies come from the test's own environment (a ``.pth``
file), so that the test exercises what the wheel itself carries (the guest
builder, qtest's sources and its prebuilt image) without downloading
pwntools again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, guest: object) -> Path:
    """The bin/ directory of a fresh venv with the wheel of this checkout."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(work / "dist"), str(REPO)], check=True, timeout=600)  # fmt: skip
    (wheel,) = (work / "dist").glob("qprobes-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # Install first: with the .pth in place pip would see the checkout's
    # editable install and skip the wheel.
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=300, env=clean_env())  # fmt: skip
    Path(purelib, "qprobes-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def clean_env() -> dict[str, str]:
    """The environment with nothing that points back into the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QPROBES_QTEST")}


def run(bindir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bindir / "qprobes"), *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=clean_env(), check=False)  # fmt: skip


def test_the_wheel_carries_its_guests(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(installed / "python"), "-c",
                            "import qprobes.machine.guests as g, qprobes.machine.linux as l; "
                            "print(g.qtest_kernel()); print(l.BUILD_SCRIPT)"],
                           capture_output=True, text=True, cwd=tmp_path, env=clean_env(),
                           check=True)  # fmt: skip
    qtest, builder = where.stdout.split()
    venv = str(installed.parent)
    assert qtest.startswith(venv) and qtest.endswith("_data/qtest/qtest.elf"), qtest
    assert builder.startswith(venv) and Path(builder).read_bytes() == (
        REPO / "scripts" / "build-linux-guest.sh"
    ).read_bytes()


def test_qtest_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    result = run(installed, "qtest", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "identical to before attaching" in result.stdout


def test_linux_trace_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    result = run(installed, "trace", "p:myopen do_sys_openat2 path=+0(%si):string",
                 "--", "cat /etc/hostname", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'path="/etc/hostname"' in result.stdout


def readme_pytest_example() -> str:
    """The test file the README's "In pytest and CI" section shows."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## In pytest and CI"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_pytest_plugin_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    """The README's ten-line test file, in a directory of its own, run by the
    fresh venv's pytest: the entry point brings the fixtures, nothing else is set up."""
    example = readme_pytest_example()
    assert "qprobes_linux" in example and "tracer" in example and len(example.splitlines()) <= 10
    (tmp_path / "test_example.py").write_text(example)
    result = subprocess.run([str(installed / "python"), "-m", "pytest", "-q", "-p",
                             "no:cacheprovider", "test_example.py"], capture_output=True,
                            text=True, timeout=900, cwd=tmp_path, env=clean_env(),
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout
    plugin = subprocess.run([str(installed / "python"), "-c", "import qprobes.frontends."
                             "pytest_plugin as p; print(p.__file__)"], capture_output=True,
                            text=True, cwd=tmp_path, env=clean_env(), check=True)  # fmt: skip
    assert plugin.stdout.startswith(str(installed.parent)), plugin.stdout
