"""The ``qprobes`` command line as a user meets it, on the default Linux guest.

Each test runs the CLI as a subprocess; Ctrl-C is typed into a real
pseudo-terminal (the kernel then signals the whole foreground process group,
as at a user's terminal), not sent to one process.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.terminal import CLI, PtySession

pytestmark = pytest.mark.vm

PROBE = "p:myopen do_sys_openat2 path=+0(%si):string"


def qprobes(*args: str, timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          check=False, **kw)  # type: ignore[call-overload]  # fmt: skip


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


@pytest.mark.parametrize(
    "command",
    [[], ["--", "cat /etc/hostname; sleep 100"]],
    ids=["tracing-until-ctrl-c", "during-a-guest-command"],
)
def test_ctrl_c_at_a_terminal_detaches_and_prints_the_summary(command: list[str]) -> None:
    session = PtySession(["trace", "--duration", "120", PROBE, *command])
    ready = b"Ctrl-C to stop" if not command else b"myopen: (do_sys_openat2"
    session.read_until(ready, timeout=240)
    if command:
        time.sleep(1.0)  # the guest is now in its sleep
    session.ctrl_c()
    status = session.wait(timeout=120)
    text = session.output.decode(errors="replace")
    assert status == 130, text
    assert "qprobes: kprobes/myopen:" in text and " hits," in text, text
    assert "reconnecting" not in text and "cannot connect" not in text, text
    no_traceback(text)


def test_machine_options_reach_the_built_in_guest() -> None:
    """--append, --smp and --memory apply without --kernel; several words
    after -- are an argv, quoted for the guest shell."""
    script = "for f in /proc/cmdline; do cat $f; done; nproc; grep MemTotal /proc/meminfo"
    result = qprobes("trace", "--append", "pti=on qprobes.marker=1", "--smp", "2",
                     "--memory", "384", PROBE, "--", "sh", "-c", script)  # fmt: skip
    assert result.returncode == 0, result.stderr
    err = result.stderr
    cmdline = next(line for line in err.splitlines() if line.startswith("console="))
    assert "pti=on" in cmdline.split() and "qprobes.marker=1" in cmdline.split(), err
    assert "\n2\n" in err, err
    mem_kib = int(next(line for line in err.splitlines() if line.startswith("MemTotal")).split()[1])
    assert 300_000 < mem_kib < 384 * 1024, err
    assert 'path="/proc/cmdline"' in result.stdout, result.stdout


def test_guest_command_status_and_duration() -> None:
    assert qprobes("trace", PROBE, "--", "false").returncode == 1
    result = qprobes("trace", PROBE, "--", "sh", "-c", "cat /etc/hostname; exit 7")
    assert result.returncode == 7, result.stderr
    assert 'path="/etc/hostname"' in result.stdout
    started = time.monotonic()
    result = qprobes("trace", "--duration", "3", PROBE, "--", "cat /etc/hostname; sleep 60")
    elapsed = time.monotonic() - started
    assert result.returncode == 124, result.stderr
    assert "--duration 3 s ended the guest command" in result.stderr
    assert 'path="/etc/hostname"' in result.stdout
    assert elapsed < 60, elapsed  # the guest's sleep did not run out


def test_kernel_without_initrd_boots_the_built_in_userland(guest: object) -> None:
    kernel = str(guest.kernel)  # type: ignore[attr-defined]
    result = qprobes("trace", "--kernel", kernel, PROBE, "--", "cat /etc/hostname")
    assert result.returncode == 0, result.stderr
    assert 'path="/etc/hostname"' in result.stdout


def test_a_guest_that_panics_is_one_line_and_its_console(guest: object, tmp_path: Path) -> None:
    kernel = str(guest.kernel)  # type: ignore[attr-defined]
    junk = tmp_path / "not-an-initramfs"
    junk.write_bytes(b"\x00" * 4096)
    result = qprobes("trace", "--kernel", kernel, "--initrd", str(junk), PROBE)
    assert result.returncode == 1
    no_traceback(result.stderr)
    first, *rest = result.stderr.splitlines()
    # Said as a panic mid-trace is (tests/integration/test_faults_linux.py).
    assert first.startswith("qprobes: error: the guest panicked before its prompt (QEMU "
                            "exited with status 0)"), result.stderr  # fmt: skip
    assert first.endswith("the last lines of its console:"), first
    assert any("Kernel panic" in line for line in rest), result.stderr
    assert any("VFS: Unable to mount root fs" in line for line in rest), result.stderr


def test_inputs_are_checked_before_booting(tmp_path: Path) -> None:
    cases = [
        (["trace", "--symbols", "/nonexistent", PROBE], "--symbols /nonexistent: no such file"),
        (["trace", "--kernel", "/nonexistent", PROBE], "--kernel /nonexistent: no such file"),
        (["trace", "--filter", "other:path == \"x\"", PROBE], "no probe defines event 'other'"),
        (["trace", "--filter", "myopen:path ==", PROBE], "qprobes: error:"),
        (["trace", "--attach", "/nonexistent.sock", PROBE], "--attach needs --reserve"),
    ]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    for args, expected in cases:
        started = time.monotonic()
        result = qprobes(*args, env=env, timeout=60)
        assert result.returncode in (1, 2), (args, result.stderr)
        assert expected in result.stderr, (args, result.stderr)
        no_traceback(result.stderr)
        assert time.monotonic() - started < 30, args  # nothing booted
    assert not list(tmp_path.glob("qprobes-*")), "a machine was started"
    result = qprobes("trace", "--smp", "0", PROBE, timeout=60)
    assert result.returncode == 2 and "not a positive number" in result.stderr


def test_two_filters_for_one_event_are_combined() -> None:
    result = qprobes("trace", "--filter", 'myopen:path ~ "/etc/*"',
                     "--filter", 'myopen:path != "/etc/passwd"', PROBE,
                     "--", "cat /etc/hostname /etc/passwd /proc/version >/dev/null")  # fmt: skip
    assert result.returncode == 0, result.stderr
    paths = [line.split("path=")[1] for line in result.stdout.splitlines() if "path=" in line]
    assert paths == ['"/etc/hostname"'], result.stdout
    # Text output starts with the header of the guest's own trace file, once.
    from qprobes.tracing.events import trace_header

    assert result.stdout.startswith(trace_header()), result.stdout
    assert result.stdout.count("# tracer: nop") == 1
    (line,) = [line for line in result.stdout.splitlines() if "path=" in line]
    assert re.match(r"^ +cat-\d+ +\[000\] [.dDbXNnpHhsZz0-9]{5} +\d+\.\d{6}: myopen: ", line), line


def test_a_closed_pipe_ends_quietly() -> None:
    shell = (f"{' '.join(CLI)} trace '{PROBE}' -- "
             "'for i in 1 2 3 4 5 6 7 8; do cat /etc/hostname; done' | head -2")  # fmt: skip
    result = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True,
                            text=True, timeout=300, check=False)  # fmt: skip
    assert len(result.stdout.splitlines()) == 2, result.stdout
    no_traceback(result.stderr)
    assert "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode == 141, result.stderr


def test_symbols_with_no_match_says_so() -> None:
    result = qprobes("symbols", "zzz_no_such_symbol*")
    assert result.returncode == 1
    assert "no kernel symbol matches 'zzz_no_such_symbol*'" in result.stderr, result.stderr


def test_filters_on_common_fields() -> None:
    """comm, COMM, common_pid and CPU filter as in ftrace; a group-qualified
    event name works."""
    result = qprobes("trace", "--json", "--filter", 'kprobes/myopen:comm == "cat" && CPU == 0',
                     PROBE, "--", "cat /etc/hostname; head -1 /etc/passwd >/dev/null")  # fmt: skip
    assert result.returncode == 0, result.stderr
    import json

    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert hits and {h["comm"] for h in hits} == {"cat"}, hits
    assert any(h["fields"]["path"] == "/etc/hostname" for h in hits), hits
    result = qprobes("trace", "--filter", 'myopen:common_pid > 1 && COMM ~ "he*"', PROBE,
                     "--", "cat /etc/hostname; head -1 /etc/passwd >/dev/null")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert 'path="/etc/passwd"' in result.stdout, result.stdout
    assert "/etc/hostname" not in result.stdout, result.stdout
