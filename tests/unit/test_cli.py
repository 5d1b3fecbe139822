"""The command line's parsing, help and generated docs (no guest)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qprobes.frontends.cli import build_parser, parse_args, reference_markdown
from qprobes.frontends.completion import bash_completion

REPO = Path(__file__).resolve().parents[2]


def test_removals_and_the_guest_command_get_past_argparse() -> None:
    args = parse_args(build_parser(), ["trace", "p:a vfs_read", "-:a", "p:b vfs_write",
                                       "--", "sh", "-c", "echo -:x"])  # fmt: skip
    assert args.probes == ["p:a vfs_read", "-:a", "p:b vfs_write"]
    assert args.guest_command == ["sh", "-c", "echo -:x"]


@pytest.mark.parametrize("bad", [["trace", "--smp", "0", "p:a x"], ["qtest", "--smp", "-1"],
                                 ["boot", "--memory", "zero"]])  # fmt: skip
def test_non_positive_numbers_are_usage_errors(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(build_parser(), bad)
    assert info.value.code == 2


def test_every_command_has_a_description_and_trace_documents_its_language() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():  # type: ignore[attr-defined]
        assert p.description, f"qprobes {name} has no description"
    text = sub.choices["trace"].format_help()  # type: ignore[attr-defined]
    assert "%%" not in text and "+0(%si):string" in text
    for word in ("$argN", "$retval", "+|-[u]OFFS(FETCHARG)", "-:[GRP/]EVENT", "124", "130"):
        assert word in text, word


def test_the_exit_status_table_names_every_signal() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = sub.choices["trace"].format_help()  # type: ignore[attr-defined]
    table = text[text.index("exit status:") : text.index("examples:")]
    for status, what in (("129", "SIGHUP"), ("130", "SIGINT"), ("143", "SIGTERM"),
                         ("141", "stdout was closed")):  # fmt: skip
        line = next((row for row in table.splitlines() if row.strip().startswith(status)), "")
        assert what in line, (status, table)
    assert "detaching, please wait" in table
    readme = (REPO / "README.md").read_text()
    for row in ("| 129 |", "| 143 |", "| 130 |"):
        assert row in readme, row


def test_docs_commands_md_is_up_to_date() -> None:
    assert (REPO / "docs" / "commands.md").read_text() == reference_markdown(), (
        "regenerate: python -m qprobes.frontends.cli --reference > docs/commands.md"
    )


def complete(words: list[str]) -> list[str]:
    script = bash_completion(build_parser())
    line = " ".join(f"'{w}'" for w in words)
    probe = (f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _qprobes; '
             'printf "%s\\n" "${COMPREPLY[@]}"')  # fmt: skip
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_bash_completion_in_a_real_bash() -> None:
    assert complete(["qprobes", "tr"]) == ["trace"]
    assert "--duration" in complete(["qprobes", "trace", "--d"])
    assert complete(["qprobes", "trace", "--accel", ""]) == ["tcg", "kvm"]
    assert complete(["qprobes", "completion", "z"]) == ["zsh"]
    assert "--no-probes" in complete(["qprobes", "qtest", "--smp", "2", "--no"])


def test_kvm_unavailable_is_one_line_before_anything_starts(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import os

    from qprobes.frontends import cli

    real_open = os.open

    def no_kvm(path: str, *args: object, **kwargs: object) -> int:
        if path == "/dev/kvm":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    def no_boot(**machine: object) -> object:
        raise AssertionError("a guest was started")

    monkeypatch.setattr(os, "open", no_kvm)
    monkeypatch.setattr("qprobes.frontends.api._session_for", no_boot)
    assert cli.main(["trace", "--accel", "kvm", "p:x vfs_read"]) == 1
    err = capsys.readouterr().err
    assert err == ("qprobes: error: --accel kvm: cannot open /dev/kvm (Permission denied); "
                   "use --accel tcg\n")  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["trace", "--attach", "/x.sock", "--reserve", "zz", "p:x vfs_read"],
            "qprobes: error: --reserve zz: want START:SIZE, e.g. 0x1f800000:0x400000",
        ),
        (
            ["trace", "-o", "trace.bin", "p:x vfs_read"],
            "qprobes: error: -o trace.bin: say which format",
        ),
        (
            ["trace", "--duration", "0", "p:x vfs_read"],
            "qprobes: error: --duration 0: give a positive number of seconds",
        ),
    ],
    ids=["bad-reserve", "unknown-output-format", "zero-duration"],
)
def test_bad_options_are_one_line_before_anything_starts(
        argv: list[str], line: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from qprobes.frontends import cli

    def no_boot(**machine: object) -> object:
        raise AssertionError("a guest was started")

    monkeypatch.setattr("qprobes.frontends.api._session_for", no_boot)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err


def test_recover_needs_the_reserve() -> None:
    from qprobes.frontends import cli

    with pytest.raises(SystemExit, match="--recover needs --reserve START:SIZE"):
        cli.main(["attach", "/x.sock", "--recover"])


def test_a_bad_gdb_listen_address_is_one_line_before_booting(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    from qprobes.frontends.cli import main

    # --kernel names a file that does not exist: had anything booted, that
    # would be the error instead.
    status = main(["trace", "--gdb-listen", "nowhere", "--kernel", str(tmp_path / "none"),
                   "p:myopen do_sys_openat2"])  # fmt: skip
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qprobes: error: --gdb-listen 'nowhere': give HOST:PORT (a port from 0 to "
                   "65535), or unix:PATH for a Unix socket"]  # fmt: skip


def test_no_detour_reaches_the_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    """``trace --fast --no-detour`` asks the API for no detours; the default asks for them."""
    from qprobes.frontends import api
    from qprobes.frontends.cli import main

    seen: list[dict[str, object]] = []

    def fake_trace(probes: list[str], command: list[str], **kw: object) -> int:
        seen.append(kw)
        return 0

    monkeypatch.setattr(api, "trace", fake_trace)
    assert main(["trace", "--fast", "--no-detour", "p:x vfs_read"]) == 0
    assert main(["trace", "--fast", "p:x vfs_read"]) == 0
    assert [(kw["fast"], kw["detour"]) for kw in seen] == [(True, False), (True, True)]
