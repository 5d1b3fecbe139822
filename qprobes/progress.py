"""Progress of qprobes' long steps (download, build, boot, reading symbols) on stderr.

Only when stderr is a terminal: each step is one line, rewritten in place
with ``\\r`` as it goes and ended with how long it took. When stderr is a
pipe or a file (CI logs, ``2>log``) nothing at all is written, so output that
scripts read stays what it was.

::

    with progress.step("booting the Linux guest") as step:
        ...
        step.update("12.3 of 26.7 MB, 46%")

A step that raises leaves its line ended with "failed" (the error itself is
the caller's to report).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

_CLEAR_TO_EOL = "\x1b[K"


class Step:
    """One step's line; :meth:`update` rewrites its detail."""

    def __init__(self, reporter: Progress, title: str) -> None:
        self.reporter = reporter
        self.title = title
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, detail: str, *, force: bool = False) -> None:
        """Show ``detail`` after the title (at most ten times a second)."""
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        self.reporter._line(f"{self.title}: {detail}" if detail else f"{self.title} ...")

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Progress:
    """Writes progress lines to ``stream`` (default: ``sys.stderr`` at the
    time of writing) when it is a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def enabled(self) -> bool:
        """True when the stream is a terminal (``QPROBES_PROGRESS=0`` turns it off)."""
        if os.environ.get("QPROBES_PROGRESS") == "0":
            return False
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):  # a closed or odd stream
            return False

    def _line(self, text: str, end: str = "") -> None:
        if not self.enabled:
            return
        line = f"qprobes: {text}"
        width = self._width()
        if 0 < width <= len(line):  # a wrapped line could not be rewritten in place
            line = line[: max(width - 4, 10)] + "..."
        try:
            self.stream.write(f"\r{line}{_CLEAR_TO_EOL}{end}")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # progress is never worth an error

    def _width(self) -> int:
        """The terminal's width (0: unknown, as on a new pseudo-terminal)."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return 0

    @contextmanager
    def step(self, title: str) -> Iterator[Step]:
        """A step: its line while it runs, then ``title: done in N s``."""
        step = Step(self, title)
        step.update("", force=True)
        try:
            yield step
        except BaseException:
            self._line(f"{title}: failed after {step.elapsed():.1f} s", "\n")
            raise
        self._line(f"{title}: done in {step.elapsed():.1f} s", "\n")


def format_bytes(done: int, total: int | None) -> str:
    """``12.3 of 26.7 MB, 46%`` (or ``12.3 MB`` with no total)."""
    if not total:
        return f"{done / 1e6:.1f} MB"
    return f"{done / 1e6:.1f} of {total / 1e6:.1f} MB, {100 * done // total}%"


#: The reporter qprobes' steps use.
progress = Progress()
