"""SIGINT, SIGTERM and SIGHUP end a trace the way Ctrl-C does: qprobes
detaches, restoring the guest, prints its summary and exits 128 + the
signal's number (130, 143, 129), as a shell reports a process the signal
ended.

A process that writes into a running kernel must not die halfway through
restoring it, so a :class:`SignalGuard` goes through three phases:

* **raising** (a guest of qprobes' own is booting: nothing in any guest
  needs restoring, and QEMU dies with qprobes): the first signal raises
  :class:`Interrupted` where the program is, and the machine is shut down
  on the way out;
* **deferring** (probes are being armed or are armed, or qprobes is
  attached to a QEMU it did not start): the first signal is only noted;
  the run loops poll :attr:`SignalGuard.signum` and stop, then detach;
* **detaching**: every further signal is ignored (the first of them says
  once ``detaching, please wait``), so that a second or third Ctrl-C, or a
  SIGTERM after a SIGHUP, cannot leave a half-restored guest. Only SIGKILL
  ends qprobes at once.

A guard restores the handlers it found when it exits, so that a Python
program goes on as before. A program that exits once a signal was noted
(the CLI, which exits 128 + the signal) runs inside :func:`held_until_exit`:
a guard that saw a signal then leaves the signals ignored, so that one
between the end of the detach and the process's exit cannot end it by that
signal (and change its status).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

#: The signals that end a trace cleanly.
EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: What a second signal prints (once).
PLEASE_WAIT = "qprobes: detaching, please wait"


_held = 0


@contextmanager
def held_until_exit() -> Iterator[None]:
    """While entered, a :class:`SignalGuard` that received a signal keeps
    handling signals after it exits (see the module docstring)."""
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1


def exit_status(signum: int) -> int:
    """The exit status after ``signum`` ended qprobes: 128 + its number."""
    return 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """A signal of :data:`EXIT_SIGNALS` stopped qprobes where nothing needed
    restoring (a guest of its own was booting). A KeyboardInterrupt, so that
    code written for Ctrl-C cleans up for SIGTERM and SIGHUP too."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal_name(signum))

    @property
    def status(self) -> int:
        return exit_status(self.signum)


class SignalGuard:
    """While entered, :data:`EXIT_SIGNALS` are handled as the module
    docstring says. ``say`` prints one line to the user (stderr)."""

    def __init__(self, say: Callable[[str], None], *, raising: bool = False) -> None:
        self.say = say
        #: Raise :class:`Interrupted` at the first signal (nothing to restore yet).
        self.raising = raising
        #: The first signal received, or None.
        self.signum: int | None = None
        #: Signals received after the first.
        self.repeats = 0
        self._closing = False
        self._told = False
        self._previous: dict[int, object] = {}

    def received(self) -> bool:
        return self.signum is not None

    @property
    def status(self) -> int | None:
        """128 + the first signal's number, or None when none came."""
        return None if self.signum is None else exit_status(self.signum)

    def detaching(self) -> None:
        """From now on no signal raises: qprobes has written to a guest, and
        a signal only ends what it is doing (it detaches next)."""
        self.raising = False

    def closing(self) -> None:
        """qprobes is restoring the guest: any signal from now on, the first
        one included, says ``detaching, please wait`` (once)."""
        self.raising = False
        self._closing = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
            if self.raising:
                self.raising = False  # the clean-up that follows is not interrupted
                raise Interrupted(signum)
        else:
            self.repeats += 1
        if (self._closing or not first) and not self._told:
            self._told = True
            self.say(PLEASE_WAIT)

    def __enter__(self) -> SignalGuard:
        for signum in EXIT_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        if self.signum is not None and _held:
            # The process exits next. Ignored, not left to our handler: the
            # interpreter puts Python handlers back to SIG_DFL as it shuts
            # down, and a signal then would still end it by that signal.
            for signum in self._previous:
                signal.signal(signum, signal.SIG_IGN)
            self._previous.clear()
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()
