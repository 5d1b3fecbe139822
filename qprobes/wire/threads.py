"""Thread ids as the GDB remote protocol writes them.

GDB manual, E.1 "Overview", thread-id syntax: a thread id is a hex number,
``-1`` meaning all threads and ``0`` any thread. When the multiprocess
extensions are in use it is ``pPID.TID``, and ``pPID`` alone means every
thread of process PID (the same as ``pPID.-1``). QEMU numbers each vCPU as
a thread (cpu_index + 1) of process 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from qprobes.errors import ProtocolError

__all__ = ["ALL_THREADS", "ANY_THREAD", "ThreadId", "parse_thread_id", "parse_thread_list"]

_HEX_NUMBER: Final = re.compile(rb"[0-9a-fA-F]+")

ALL_THREADS: Final = -1
ANY_THREAD: Final = 0


def _parse_part(text: bytes, whole: bytes) -> int:
    if text == b"-1":
        return ALL_THREADS
    if _HEX_NUMBER.fullmatch(text) is None:  # int(text, 16) takes " 1", "0x1", "1_0"
        raise ProtocolError("malformed thread id", whole)
    return int(text, 16)


def _format_part(value: int) -> str:
    return "-1" if value == ALL_THREADS else f"{value:x}"


@dataclass(frozen=True, slots=True)
class ThreadId:
    """A thread id: ``pid`` is None unless the multiprocess form was used;
    ``tid`` is -1 for all threads, 0 for any thread."""

    pid: int | None
    tid: int

    def format(self) -> str:
        """The wire form: ``TID`` or ``pPID.TID`` (hex; -1 stays ``-1``)."""
        if self.pid is None:
            return _format_part(self.tid)
        return f"p{_format_part(self.pid)}.{_format_part(self.tid)}"

    def __str__(self) -> str:
        return self.format()


def parse_thread_id(text: bytes) -> ThreadId:
    """Parse ``TID``, ``-1``, ``0``, ``pPID.TID`` or ``pPID``.

    Raises ProtocolError on anything else.
    """
    if text[:1] == b"p":
        pid_text, dot, tid_text = text[1:].partition(b".")
        pid = _parse_part(pid_text, text)
        tid = _parse_part(tid_text, text) if dot else ALL_THREADS
        return ThreadId(pid, tid)
    return ThreadId(None, _parse_part(text, text))


def parse_thread_list(payload: bytes) -> tuple[list[ThreadId], bool]:
    """Parse a ``qfThreadInfo``/``qsThreadInfo`` reply (E.4 "General Query
    Packets"): ``m id,id,...`` gives ids and asks for more, ``l`` ends.

    Returns (ids, more).
    """
    if payload == b"l":
        return [], False
    if payload[:1] == b"l":
        # Some stubs end with the last ids in the 'l' packet itself.
        return [parse_thread_id(t) for t in payload[1:].split(b",") if t], False
    if payload[:1] != b"m" or len(payload) < 2:
        raise ProtocolError("malformed thread list", payload)
    return [parse_thread_id(t) for t in payload[1:].split(b",")], True
