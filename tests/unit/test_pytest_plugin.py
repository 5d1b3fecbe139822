"""The pytest plugin without a guest: options, markers, the skip/fail rule
when QEMU is missing, and the artifacts of a failing test (a fake guest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qprobes.errors import ProbeError
from qprobes.frontends import pytest_plugin as plugin
from qprobes.frontends.session import Session

pytest_plugins = ["pytester"]

USES_GUEST = """
def test_needs_a_guest(qprobes_linux):
    raise AssertionError("never reached")
"""


@pytest.fixture
def no_qemu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A PATH with no QEMU on it."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


def test_missing_qemu_skips_with_the_reason(pytester: pytest.Pytester, no_qemu: None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("QPROBES_REQUIRE_VM", raising=False)
    pytester.makepyfile(USES_GUEST)
    result = pytester.runpytest("-p", "qprobes.frontends.pytest_plugin", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*qemu-system-x86_64 is not installed*"])


def test_missing_qemu_fails_under_require_vm(pytester: pytest.Pytester, no_qemu: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("QPROBES_REQUIRE_VM", "1")
    pytester.makepyfile(USES_GUEST + """
import pytest

@pytest.mark.qprobes_vm
def test_marked():
    pass
""")
    result = pytester.runpytest("-p", "qprobes.frontends.pytest_plugin")
    result.assert_outcomes(errors=2)  # each fails in its set-up
    result.stdout.fnmatch_lines(["*VM test cannot run: qemu-system-x86_64 is not installed*"])


def test_options_and_ini_choose_the_default_guest(pytester: pytest.Pytester) -> None:
    pytester.makeini("""
[pytest]
qprobes_smp = 2
qprobes_qemu_args = -cpu Skylake-Client
qprobes_artifacts = out
""")
    pytester.makepyfile("""
def test_specs(qprobes_guests):
    print("SPEC", qprobes_guests.linux.describe())
""")
    result = pytester.runpytest("-p", "qprobes.frontends.pytest_plugin", "-s",
                                "--qprobes-kaslr", "--qprobes-append", "mitigations=off")
    result.assert_outcomes(passed=1)
    header = ("qprobes: default guest linux smp=2 kaslr append='mitigations=off' "
              f"qemu_args=['-cpu', 'Skylake-Client']; artifacts in {pytester.path}/out/")
    assert header in result.stdout.lines
    result = pytester.runpytest("-p", "qprobes.frontends.pytest_plugin", "--qprobes-smp", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--qprobes-smp 0: want a positive number*"])
    result = pytester.runpytest("-p", "qprobes.frontends.pytest_plugin",
                                "--qprobes-kernel", "/nonexistent")
    result.stderr.fnmatch_lines(["*--qprobes-kernel /nonexistent: no such file*"])


@pytest.mark.parametrize(("kwargs", "want"), [
    ({"smp": 2}, plugin.GuestSpec(smp=2)),
    ({"kind": "qtest", "qemu_args": ["-s"]}, plugin.GuestSpec("qtest", qemu_args=("-s",))),
    ({"kaslr": True, "append": "quiet"}, plugin.GuestSpec(kaslr=True, append="quiet")),
])  # fmt: skip
def test_marker_arguments(kwargs: dict[str, object], want: plugin.GuestSpec) -> None:
    assert plugin.GuestSpec().with_marker(pytest.mark.qprobes_guest(**kwargs).mark) == want


@pytest.mark.parametrize(("args", "kwargs", "error"), [
    ((2,), {}, "keyword arguments only"),
    ((), {"cpus": 2}, "unknown argument 'cpus'"),
    ((), {"kind": "windows"}, "kind='windows'; want one of linux, qtest"),
    ((), {"smp": 0}, "smp=0; want a positive number"),
])  # fmt: skip
def test_bad_marker_arguments(args: tuple[object, ...], kwargs: dict[str, object],
                              error: str) -> None:  # fmt: skip
    with pytest.raises(ProbeError, match=error):
        plugin.GuestSpec().with_marker(pytest.mark.qprobes_guest(*args, **kwargs).mark)


@pytest.mark.parametrize(("nodeid", "name"), [
    ("tests/x.py::test_a", "tests_x.py_test_a"),
    ("t.py::test_b[1-2 3]", "t.py_test_b_1-2_3"),
    ("t.py::TestC::test_d[/etc/*]", "t.py_TestC_test_d_etc"),
])  # fmt: skip
def test_artifact_directory_names(nodeid: str, name: str) -> None:
    assert plugin.artifact_dir_name(nodeid) == name


class FakeMachine:
    def console_text(self) -> str:
        return "qprobes-guest# cat /etc/hostname\r\nqprobes-guest\r\n"


def fake_session() -> Session:
    """A Session with only what the artifact hook reads (no guest)."""
    session = object.__new__(Session)
    session.machine = FakeMachine()  # type: ignore[assignment]
    session.kernel = None
    return session


class FakeItem:
    def __init__(self, **funcargs: object) -> None:
        self.funcargs = funcargs


def test_artifacts_hold_the_trace_and_the_console(tmp_path: Path) -> None:
    from qprobes.tracing.events import TraceEvent

    session = fake_session()
    guest_tracer = plugin.GuestTracer.__new__(plugin.GuestTracer)
    guest_tracer.session = session
    guest_tracer.events = [TraceEvent(
        group="kprobes", event="myopen", kind="p", addr=0xFFFFFFFF81000000,
        location="do_sys_openat2+0x0/0x170", ret_to=None, cpu=0, pid=93, comm="cat",
        timestamp_ns=10_285_659_000, fields={}, text='path="/etc/hostname"')]  # fmt: skip
    from qprobes.tracing.tracer import Tracer

    guest_tracer.tracer = Tracer(session, guest_tracer.events.append)  # type: ignore[arg-type]
    guest_tracer.drain = lambda: None  # type: ignore[method-assign]
    other = fake_session()
    item = FakeItem(tracer=guest_tracer, qprobes_linux=session, pair=(other, 1), n=3)
    written = plugin.save_artifacts(item, tmp_path / "t")  # type: ignore[arg-type]
    names = sorted(p.name for p in written)
    assert names == ["pair0-console.txt", "qprobes_linux-console.txt", "trace.txt"]
    trace = (tmp_path / "t" / "trace.txt").read_text()
    assert trace.startswith("# tracer: nop\n")
    assert trace.rstrip().endswith(
        'cat-93      [000] .....    10.285659: myopen: (do_sys_openat2+0x0/0x170) '
        'path="/etc/hostname"')
    assert "qprobes-guest" in (tmp_path / "t" / "qprobes_linux-console.txt").read_text()
    assert plugin.save_artifacts(FakeItem(n=1), tmp_path / "none") == []  # type: ignore[arg-type]
    assert not (tmp_path / "none").exists()
