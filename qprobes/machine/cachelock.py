"""One builder at a time for a shared cache directory.

Several processes (pytest-xdist workers, CI jobs on one runner) may ask for
the default Linux guest or qtest at the same moment. The check-and-build is
done under an exclusive ``flock`` on a lock file in the cache, so one
process builds and the others wait and then find the finished build; a
process that dies holding the lock releases it with its file descriptor.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qprobes.errors import MachineError

#: How long a process waits for another's build (the guest's takes minutes).
LOCK_TIMEOUT = 1800.0


@contextmanager
def cache_lock(directory: Path, name: str = ".lock",
               timeout: float = LOCK_TIMEOUT) -> Iterator[None]:  # fmt: skip
    """Hold an exclusive lock on ``directory/name`` (created) for the block;
    raise :class:`MachineError` after ``timeout`` seconds of waiting."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / name, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise MachineError(f"cannot lock the cache {directory}: {exc}") from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise MachineError(
                        f"another process has held {directory / name} for {timeout:g} s "
                        "(building a guest?)"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
