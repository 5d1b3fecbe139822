"""The Dockerfile builds through the install script CI uses, and nothing else
(no Docker engine runs here: CI proves the script, this checks the file)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ALLOWED = {"FROM", "WORKDIR", "COPY", "ENV", "RUN", "USER", "CMD"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "a continuation line with nothing after it"
    return out


def words(args: str) -> list[str]:
    """The words of an exec-form (JSON) or shell-form argument."""
    import json

    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list)
        return [str(v) for v in value]
    return shlex.split(args)


def test_the_image_is_built_by_the_install_script_and_nothing_else() -> None:
    steps = instructions((REPO / "Dockerfile").read_text())
    assert {word for word, _ in steps} <= ALLOWED, steps
    assert steps[0] == ("FROM", "debian:12")  # what install.sh targets
    runs = [words(args) for word, args in steps if word == "RUN"]
    assert len(runs) == 1, runs
    (run,) = runs
    assert run[0] == "./scripts/install.sh" and set(run[1:]) <= {"--guest", "--user", "qprobes"}
    assert "--guest" in run  # the default guest is built into the image
    users = [args for word, args in steps if word == "USER"]
    assert users == ["qprobes"] and run[run.index("--user") + 1] == "qprobes"
    # The user runs after the install (root installs, the user owns).
    assert [w for w, _ in steps].index("USER") > [w for w, _ in steps].index("RUN")
    env = " ".join(args for word, args in steps if word == "ENV")
    assert "QPROBES_CACHE=" in env and "QPROBES_VENV=" in env
    # The script itself installs what the Dockerfile used to: Python and venv.
    script = (REPO / "scripts" / "install.sh").read_text()
    assert "missing+=(python3)" in script and "missing+=(python3-venv)" in script


def test_the_build_context_leaves_out_local_state() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "kernels/qtest/build", "qprobes-artifacts"} <= set(ignored)


def test_install_script_options_are_checked_first() -> None:
    result = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--bogus"],
                            capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "install.sh: unknown option --bogus (--guest, --user NAME)"


def test_the_parser_joins_continuations() -> None:
    text = "# c\nFROM x\nENV A=1 \\\n    B=2\nRUN [\"a\", \"b\"]\n"
    assert instructions(text) == [("FROM", "x"), ("ENV", "A=1  B=2"), ("RUN", '["a", "b"]')]
