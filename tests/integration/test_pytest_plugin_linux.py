"""The pytest plugin on real guests, in pytest runs of their own: a user's
test file with ``qprobes_linux`` and ``tracer`` (passing, and failing with
its trace and console saved), and pytest-xdist with one guest per worker."""

from __future__ import annotations

import re

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.serial]
pytest_plugins = ["pytester"]

PLUGIN = ("-p", "qprobes.frontends.pytest_plugin", "-p", "no:cacheprovider")


@pytest.fixture(autouse=True)
def shared_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester gives its runs a HOME of their own: point them at the
    guest cache this run uses, so that they do not build the guest again."""
    from qprobes.machine.linux import linux_cache_dir

    monkeypatch.setenv("QPROBES_CACHE", str(linux_cache_dir().parent))

#: What a user writes: ten lines, no set-up.
USER_TEST = '''
def test_open(qprobes_linux, tracer):
    tracer.add("p:myopen do_sys_openat2 path=+0(%si):string")
    tracer.add("r16:myret do_sys_openat2 ret=$retval:s64")
    hist = tracer.hist("myopen", "hist:keys=comm")
    tracer.run("cat /etc/hostname")
    opens = [e for e in tracer.of("myopen") if e.comm == "cat"]
    assert opens[-1].fields["path"] == "/etc/hostname" and hist["cat"] >= 1
    assert any(e.fields["ret"] >= 0 for e in tracer.of("myret"))

def test_fails(qprobes_linux, tracer):
    tracer.add("p:myopen do_sys_openat2 path=+0(%si):string")
    tracer.run("cat /etc/hostname")
    assert not tracer.events, "fails on purpose"
'''


def test_a_failing_test_leaves_its_trace_and_console(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest_subprocess(*PLUGIN, "--qprobes-artifacts", "arts", timeout=900)
    result.assert_outcomes(passed=1, failed=1)
    where = pytester.path / "arts" / "test_user.py_test_fails"
    assert sorted(p.name for p in where.iterdir()) == ["console.txt", "trace.txt"]
    trace = (where / "trace.txt").read_text()
    assert trace.startswith("# tracer: nop\n")
    line = (r'cat-\d+ +\[00\d\] [.\w]{5} +\d+\.\d{6}: myopen: '
            r'\(do_sys_openat2\+0x0/0x\w+\) path="/etc/hostname"')
    assert re.search(line, trace), trace[-800:]
    console = (where / "console.txt").read_text()
    assert "qprobes-guest# qprobes-guest\n" in console  # the prompt, then the output of cat
    result.stdout.fnmatch_lines(["*qprobes artifacts*", f"*{where}/trace.txt"])
    # Only the failing test's: the passing one left nothing.
    assert [p.name for p in (pytester.path / "arts").iterdir()] == ["test_user.py_test_fails"]


WORKER_TEST = '''
import os, pytest

@pytest.mark.parametrize("n", range(3))
def test_{name}(qprobes_linux, tracer, n):
    tracer.add("p:myopen do_sys_openat2 path=+0(%si):string")
    tracer.run("cat /etc/hostname")
    assert any(e.fields["path"] == "/etc/hostname" for e in tracer.of("myopen"))
    print("GUEST", os.environ.get("PYTEST_XDIST_WORKER"), qprobes_linux.machine.pid)
'''


def test_xdist_runs_one_guest_per_worker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_one=WORKER_TEST.format(name="one"),
                        test_two=WORKER_TEST.format(name="two"))  # fmt: skip
    result = pytester.runpytest_subprocess(*PLUGIN, "-n", "2", "--dist", "loadfile", "-rA",
                                           timeout=900)  # fmt: skip
    result.assert_outcomes(passed=6)
    seen = set(re.findall(r"GUEST (gw\d) (\d+)", result.stdout.str()))
    workers = {w for w, _ in seen}
    assert workers == {"gw0", "gw1"}, seen
    assert len(seen) == 2, f"one guest per worker, kept for its session: {seen}"
