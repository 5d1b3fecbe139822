"""qprobes' pytest plugin: guests, a tracer per test, artifacts of failures.

Installed with the package (a ``pytest11`` entry point), so a test file
needs no set-up::

    def test_open(qprobes_linux, tracer):
        tracer.add("p:myopen do_sys_openat2 path=+0(%si):string")
        tracer.run("cat /etc/hostname")
        assert tracer.of("myopen")[-1].fields["path"] == "/etc/hostname"

Fixtures:

* ``qprobes_linux``, ``qprobes_qtest``: a :class:`~qprobes.frontends.session.Session`
  on the default Linux guest or on qtest, booted once per test session (per
  pytest-xdist worker: each worker has its own guest) with the options below.
* ``qprobes_guest``: the guest the test's ``@pytest.mark.qprobes_guest(...)``
  asks for (``kind="linux"`` or ``"qtest"``, ``smp``, ``kaslr``, ``append``,
  ``kernel``, ``initrd``, ``qemu_args``), else the default Linux guest;
  each variant is booted once and kept for the session.
* ``tracer``: a :class:`GuestTracer` on ``qprobes_guest``: kprobe_events
  definitions armed for one test, hits as typed
  :class:`~qprobes.tracing.events.TraceEvent` records, ``hist`` and
  ``latency`` answers; every probe is removed after the test.
* ``qprobes_guests``: the session's :class:`GuestPool` (``get(spec)``,
  ``boot(spec)`` for a guest of the caller's own).

Options (command line, or the ini key in brackets): ``--qprobes-smp N``
[``qprobes_smp``], ``--qprobes-kaslr`` [``qprobes_kaslr``],
``--qprobes-kernel``/``--qprobes-initrd`` [``qprobes_kernel``,
``qprobes_initrd``], ``--qprobes-append`` [``qprobes_append``],
``--qprobes-qemu-arg ARG`` (repeatable) [``qprobes_qemu_args``],
``--qprobes-artifacts DIR`` [``qprobes_artifacts``, default
``qprobes-artifacts``], ``--qprobes-artifacts-on failed|always``
[``qprobes_artifacts_on``].

A test marked ``qprobes_vm`` (and every test that uses these fixtures)
skips with the reason when QEMU or a guest cannot be had, or fails under
``QPROBES_REQUIRE_VM=1``. When a test fails, its tracer's events (ftrace
text, ``trace.txt``) and the console of every guest it used
(``console.txt``) are saved in ``DIR/<test id>/``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from qprobes.errors import ProbeError, QprobesError

if TYPE_CHECKING:
    from qprobes.frontends.session import Session
    from qprobes.tracing.events import TraceEvent
    from qprobes.tracing.hist import Histogram
    from qprobes.tracing.tracer import TraceProbe, Tracer

#: Set to 1 (as CI and scripts/test.sh do), a test that cannot get its guest fails.
REQUIRE_VM = "QPROBES_REQUIRE_VM"
DEFAULT_ARTIFACTS = "qprobes-artifacts"
KINDS = ("linux", "qtest")


def require_vm(reason: str) -> None:
    """Skip the running test with ``reason``, or fail it under ``QPROBES_REQUIRE_VM=1``."""
    if os.environ.get(REQUIRE_VM) == "1":
        pytest.fail(f"VM test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def qemu_missing() -> str | None:
    """Why no guest can boot here (QEMU not installed), or None."""
    from qprobes.machine.qemu import QEMU_BINARY

    if shutil.which(QEMU_BINARY) is None:
        return f"{QEMU_BINARY} is not installed (scripts/install.sh installs it)"
    return None


@dataclass(frozen=True)
class GuestSpec:
    """Which guest, booted how (a key of :class:`GuestPool`)."""

    kind: str = "linux"
    smp: int = 1
    kaslr: bool = False
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    qemu_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ProbeError(f"qprobes_guest: kind={self.kind!r}; want one of {', '.join(KINDS)}")
        if self.smp < 1:
            raise ProbeError(f"qprobes_guest: smp={self.smp}; want a positive number")

    def with_marker(self, mark: pytest.Mark | None) -> GuestSpec:
        """This spec changed by a ``qprobes_guest(...)`` marker's arguments."""
        if mark is None:
            return self
        if mark.args:
            raise ProbeError("qprobes_guest takes keyword arguments only (kind=, smp=, "
                             "kaslr=, kernel=, initrd=, append=, qemu_args=)")  # fmt: skip
        known = set(self.__dataclass_fields__)
        bad = sorted(set(mark.kwargs) - known)
        if bad:
            raise ProbeError(f"qprobes_guest: unknown argument {bad[0]!r}; "
                             f"want {', '.join(sorted(known))}")  # fmt: skip
        kwargs = dict(mark.kwargs)
        if "qemu_args" in kwargs:
            kwargs["qemu_args"] = tuple(kwargs["qemu_args"])
        return replace(self, **kwargs)

    def describe(self) -> str:
        parts = [self.kind, f"smp={self.smp}"]
        if self.kaslr:
            parts.append("kaslr")
        for name in ("kernel", "initrd"):
            if getattr(self, name):
                parts.append(f"{name}={getattr(self, name)}")
        if self.append:
            parts.append(f"append={self.append!r}")
        if self.qemu_args:
            parts.append(f"qemu_args={list(self.qemu_args)}")
        return " ".join(parts)


def boot(spec: GuestSpec) -> Session:
    """Boot and attach the guest ``spec`` names (no skipping: errors propagate)."""
    from qprobes.frontends.session import Session

    extra: dict[str, Any] = {"extra_args": list(spec.qemu_args)} if spec.qemu_args else {}
    if spec.kind == "qtest":
        return Session.qtest(smp=spec.smp, append=spec.append, **extra)
    return Session.linux(smp=spec.smp, kaslr=spec.kaslr, append=spec.append,
                         kernel=spec.kernel, initrd=spec.initrd, **extra)  # fmt: skip


@dataclass
class GuestPool:
    """The guests of one test session (one pytest-xdist worker): one per spec."""

    linux: GuestSpec
    qtest: GuestSpec
    sessions: dict[GuestSpec, Session] = field(default_factory=dict)
    #: Guests handed out by :meth:`boot`, closed by their callers (or at the end).
    own: list[Session] = field(default_factory=list)

    def default(self, kind: str) -> GuestSpec:
        return self.qtest if kind == "qtest" else self.linux

    def get(self, spec: GuestSpec) -> Session:
        """The session's guest for ``spec``, booted on first use; a guest
        that died (a test crashed it) is booted anew."""
        session = self.sessions.get(spec)
        if session is not None and healthy(session):
            return session
        if session is not None:
            self.sessions.pop(spec)
            close_quietly(session)
        session = self.boot(spec, keep=False)
        self.sessions[spec] = session
        return session

    def boot(self, spec: GuestSpec | None = None, *, keep: bool = True) -> Session:
        """A new guest for ``spec`` (default: the Linux default), skipping
        (or failing, under ``QPROBES_REQUIRE_VM=1``) the test when it cannot
        boot. With ``keep``, the pool closes it at the end if its caller did not."""
        spec = spec or self.linux
        why = qemu_missing()
        if why is not None:
            require_vm(why)
        try:
            session = boot(spec)
        except QprobesError as exc:
            require_vm(f"the {spec.describe()} guest cannot be booted: {exc}")
            raise
        if keep:
            self.own.append(session)
        return session

    def close(self) -> None:
        for session in [*self.sessions.values(), *self.own]:
            close_quietly(session)
        self.sessions.clear()
        self.own.clear()


def healthy(session: Session) -> bool:
    machine = session.machine
    return not session._closed and (machine is None or machine.alive())


def close_quietly(session: Session) -> None:
    with contextlib.suppress(QprobesError):  # a guest that died under its test
        session.close()


class GuestTracer:
    """A :class:`~qprobes.tracing.tracer.Tracer` for one test, collecting its events.

    ``add()`` arms a kprobe_events definition; ``run(cmd)`` types a command
    on the guest's console and serves hits until its prompt; ``wait(s)``
    lets the guest run; ``events`` (all) and ``of(event)`` (one event's)
    are :class:`TraceEvent` records; ``hist()`` and ``latency()`` as on the
    Tracer; ``text()`` is the ftrace text; ``close()`` removes every probe.
    """

    def __init__(self, session: Session, *, fast: bool = False) -> None:
        from qprobes.tracing.tracer import Tracer

        self.session = session
        self.events: list[TraceEvent] = []
        self.tracer: Tracer = Tracer(session, self.events.append, fast=fast)

    def add(self, definition: str, filter: str | None = None,
            triggers: Sequence[str] = ()) -> TraceProbe:  # fmt: skip
        return self.tracer.add(definition, filter, triggers)

    def hist(self, event: str, trigger: str) -> Histogram:
        return self.tracer.hist(event, trigger)

    def latency(self, function: str, unit: str = "us") -> TraceProbe:
        return self.tracer.latency(function, unit)

    def run(self, command: str, timeout: float = 60.0) -> str:
        """Run ``command`` in the guest's shell, serving probe hits; its output."""
        out = self.session.command(command, timeout=timeout)
        self.drain()
        return out

    def wait(self, seconds: float) -> None:
        self.session.run(timeout=seconds)
        self.drain()

    def drain(self) -> None:
        if self.session.engine.attached:
            self.tracer.drain()

    def of(self, event: str) -> list[TraceEvent]:
        """The events named ``event`` (``EVENT`` or ``GROUP/EVENT``)."""
        return [e for e in self.events if event in (e.event, f"{e.group}/{e.event}")]

    def text(self) -> str:
        """The events as the guest's ``trace`` file prints them, with its header."""
        return self.tracer.header() + "".join(e.format() + "\n" for e in self.events)

    def summary(self) -> list[dict[str, Any]]:
        return self.tracer.summary(notes=False)

    def clear(self) -> None:
        self.events.clear()

    def close(self) -> None:
        """Remove every probe (the guest stays for the next test)."""
        if not healthy(self.session):
            return
        self.drain()
        self.tracer.remove_many(list(self.tracer.probes))


# --- options -----------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qprobes", "qprobes guests (QEMU) and tracing")
    group.addoption("--qprobes-smp", type=int, default=None,
                    help="vCPUs of the default guests (ini qprobes_smp; default 1)")  # fmt: skip
    group.addoption("--qprobes-kaslr", action="store_true", default=None,
                    help="boot the Linux guest with KASLR (ini qprobes_kaslr)")  # fmt: skip
    group.addoption("--qprobes-kernel", default=None,
                    help="a Linux kernel image instead of the built-in one (ini qprobes_kernel)")
    group.addoption("--qprobes-initrd", default=None,
                    help="an initramfs instead of the built-in one (ini qprobes_initrd)")
    group.addoption("--qprobes-append", default=None,
                    help="added to the guests' kernel command line (ini qprobes_append)")
    group.addoption("--qprobes-qemu-arg", action="append", default=None, metavar="ARG",
                    help="an extra QEMU argument, repeatable (ini qprobes_qemu_args)")  # fmt: skip
    group.addoption("--qprobes-artifacts", default=None, metavar="DIR",
                    help=f"where failing tests' traces and consoles go "
                         f"(ini qprobes_artifacts; default {DEFAULT_ARTIFACTS}/)")  # fmt: skip
    group.addoption("--qprobes-artifacts-on", choices=("failed", "always"), default=None,
                    help="save artifacts of failed tests only (default) or of every test")
    parser.addini("qprobes_smp", "vCPUs of the default guests", default="1")
    parser.addini("qprobes_kaslr", "boot the Linux guest with KASLR", type="bool", default=False)
    parser.addini("qprobes_kernel", "a Linux kernel image instead of the built-in one")
    parser.addini("qprobes_initrd", "an initramfs instead of the built-in one")
    parser.addini("qprobes_append", "added to the guests' kernel command line")
    parser.addini("qprobes_qemu_args", "extra QEMU arguments", type="args", default=[])
    parser.addini("qprobes_artifacts", "where failing tests' artifacts go",
                  default=DEFAULT_ARTIFACTS)  # fmt: skip
    parser.addini("qprobes_artifacts_on", "failed or always", default="failed")


def _option(config: pytest.Config, name: str) -> Any:
    value = config.getoption(f"qprobes_{name}")
    return value if value is not None else config.getini(f"qprobes_{name}")


def default_specs(config: pytest.Config) -> tuple[GuestSpec, GuestSpec]:
    """The default Linux and qtest guests from the options."""
    try:
        smp = int(_option(config, "smp"))
    except ValueError as exc:
        raise pytest.UsageError(f"qprobes_smp: {exc}") from exc
    if smp < 1:
        raise pytest.UsageError(f"--qprobes-smp {smp}: want a positive number")
    append = str(_option(config, "append") or "")
    qemu_args = tuple(config.getoption("qprobes_qemu_arg")
                      or config.getini("qprobes_qemu_args"))  # fmt: skip
    kernel = _option(config, "kernel") or None
    initrd = _option(config, "initrd") or None
    for name, path in (("kernel", kernel), ("initrd", initrd)):
        if path is not None and not Path(path).is_file():
            raise pytest.UsageError(f"--qprobes-{name} {path}: no such file")
    linux = GuestSpec("linux", smp, bool(_option(config, "kaslr")), kernel, initrd, append,
                      qemu_args)  # fmt: skip
    return linux, GuestSpec("qtest", smp, append=append, qemu_args=qemu_args)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "qprobes_guest(kind='linux', smp=1, kaslr=False, kernel=None, initrd=None, append='', "
        "qemu_args=()): the guest the qprobes_guest and tracer fixtures give this test",
    )
    config.addinivalue_line(
        "markers",
        "qprobes_vm: needs QEMU and a guest (skipped with the reason when missing; "
        "QPROBES_REQUIRE_VM=1 turns the skip into a failure)",
    )
    config.stash[_SPECS] = default_specs(config)


_SPECS = pytest.StashKey[tuple[GuestSpec, GuestSpec]]()


def pytest_report_header(config: pytest.Config) -> str:
    linux, _ = config.stash[_SPECS]
    return f"qprobes: default guest {linux.describe()}; artifacts in {artifacts_dir(config)}/"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("qprobes_vm") or item.get_closest_marker("qprobes_guest"):
        why = qemu_missing()
        if why is not None:
            require_vm(why)


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def qprobes_guests(pytestconfig: pytest.Config) -> Iterator[GuestPool]:
    """The guests of this test session (of this pytest-xdist worker)."""
    linux, qtest = pytestconfig.stash[_SPECS]
    pool = GuestPool(linux, qtest)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session")
def qprobes_linux(qprobes_guests: GuestPool) -> Session:
    """The default Linux guest, attached; one per test session (per worker)."""
    return qprobes_guests.get(qprobes_guests.linux)


@pytest.fixture(scope="session")
def qprobes_qtest(qprobes_guests: GuestPool) -> Session:
    """qtest, attached; one per test session (per worker)."""
    return qprobes_guests.get(qprobes_guests.qtest)


@pytest.fixture
def qprobes_guest(request: pytest.FixtureRequest, qprobes_guests: GuestPool) -> Session:
    """The guest ``@pytest.mark.qprobes_guest(...)`` asks for (default: the Linux guest)."""
    mark = request.node.get_closest_marker("qprobes_guest")
    kind = mark.kwargs.get("kind", "linux") if mark is not None else "linux"
    try:
        spec = qprobes_guests.default(kind).with_marker(mark)
    except ProbeError as exc:
        pytest.fail(str(exc), pytrace=False)
    return qprobes_guests.get(spec)


@pytest.fixture
def tracer(qprobes_guest: Session) -> Iterator[GuestTracer]:
    """Probes armed for this test only, their hits as TraceEvents."""
    guest_tracer = GuestTracer(qprobes_guest)
    try:
        yield guest_tracer
    finally:
        guest_tracer.close()


# --- artifacts ---------------------------------------------------------------------


def artifacts_dir(config: pytest.Config) -> Path:
    where = Path(str(_option(config, "artifacts") or DEFAULT_ARTIFACTS))
    return where if where.is_absolute() else config.invocation_params.dir / where


def artifact_dir_name(nodeid: str) -> str:
    """A file name for a test id (``tests/x.py::test_a[1-2]`` -> ``tests_x.py__test_a_1-2_``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid).strip("_")
    return name[:200] or "test"


def _used(item: pytest.Item) -> tuple[dict[str, Session], dict[str, GuestTracer]]:
    """The sessions and tracers among the test's fixtures (one level into tuples)."""
    from qprobes.frontends.session import Session

    sessions: dict[str, Session] = {}
    tracers: dict[str, GuestTracer] = {}
    funcargs: dict[str, Any] = getattr(item, "funcargs", {}) or {}
    values = [(name if not isinstance(value, tuple) else f"{name}{i}", v)
              for name, value in funcargs.items()
              for i, v in enumerate(value if isinstance(value, tuple) else (value,))]  # fmt: skip
    tracers = {name: v for name, v in values if isinstance(v, GuestTracer)}
    # A guest is named after its own fixture where the test has it, else its tracer's.
    found = [(name, v) for name, v in values if isinstance(v, Session)]
    found += [(name, t.session) for name, t in tracers.items()]
    for name, session in found:
        if all(s is not session for s in sessions.values()):
            sessions[name] = session
    return sessions, tracers


def save_artifacts(item: pytest.Item, directory: Path) -> list[Path]:
    """Write the test's traces (``trace.txt``) and its guests' consoles
    (``console.txt``; ``NAME-console.txt`` with several) to ``directory``."""
    sessions, tracers = _used(item)
    written: list[Path] = []
    if not sessions and not tracers:
        return written
    directory.mkdir(parents=True, exist_ok=True)
    for name, guest_tracer in tracers.items():
        path = directory / ("trace.txt" if len(tracers) == 1 else f"{name}-trace.txt")
        with contextlib.suppress(QprobesError):  # else what reached the host so far
            guest_tracer.drain()
        path.write_text(guest_tracer.text())
        written.append(path)
    for name, session in sessions.items():
        if session.machine is None:
            continue
        path = directory / ("console.txt" if len(sessions) == 1 else f"{name}-console.txt")
        path.write_text(session.machine.console_text())
        written.append(path)
    return written


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome: Any = yield
    report: pytest.TestReport = outcome.get_result()
    config = item.config
    always = str(_option(config, "artifacts_on")) == "always"
    if report.when != "call" and not (report.when == "setup" and report.failed):
        return
    if not (report.failed or always):
        return
    directory = artifacts_dir(config) / artifact_dir_name(item.nodeid)
    try:
        written = save_artifacts(item, directory)
    except (OSError, QprobesError) as exc:
        report.sections.append(("qprobes artifacts", f"could not be saved: {exc}"))
        return
    if written:
        report.sections.append(
            ("qprobes artifacts", "\n".join(str(p) for p in written))
        )
