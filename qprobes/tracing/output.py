"""Saved traces: ftrace text, NDJSON, and Chrome's trace-event JSON.

``-o FILE`` picks the format by the name (``.txt``, ``.ndjson``/``.jsonl``,
``.chrome.json``/``.json``) or by ``--format``:

- ``txt``: the lines ftrace's ``trace`` file shows, which
  :func:`parse_trace_text` reads back;
- ``ndjson``: one JSON object per event (the ``--json`` objects);
- ``chrome``: the Trace Event Format (``{"traceEvents": [...]}``) that
  Perfetto's UI and ``chrome://tracing`` open. A return probe's call is a
  complete event (``"ph": "X"``, ``ts`` its entry, ``dur`` its latency) and a
  probe hit an instant event (``"ph": "i"``), each on two tracks: its task
  (process "tasks", one thread per guest pid) and its CPU (process "CPUs",
  one thread per CPU). Times are microseconds on the trace clock.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import IO, Any

from qprobes.errors import QprobesError
from qprobes.tracing.events import TraceEvent

FORMATS = ("txt", "ndjson", "chrome")

#: Chrome trace "processes" holding the task and CPU tracks.
TASKS_PID = 1
CPUS_PID = 2


class OutputError(QprobesError):
    """A trace file cannot be written, or its format is unknown."""


def format_for(path: str, given: str | None = None) -> str:
    """The format ``path`` is written in: ``given``, or by its name."""
    if given is not None:
        if given not in FORMATS:
            raise OutputError(f"--format {given!r}: choose one of {', '.join(FORMATS)}")
        return given
    name = Path(path).name.lower()
    if name.endswith((".chrome.json", ".trace.json")) or name.endswith(".json"):
        return "chrome"
    if name.endswith((".ndjson", ".jsonl")):
        return "ndjson"
    if name.endswith((".txt", ".trace")):
        return "txt"
    raise OutputError(
        f"-o {path}: say which format with --format {'|'.join(FORMATS)} "
        "(or name it .txt, .ndjson or .chrome.json)"
    )


class TraceWriter:
    """Writes events to a file as they come, in one of :data:`FORMATS`."""

    def __init__(self, path: str, fmt: str | None = None, header: str = "") -> None:
        self.format = format_for(path, fmt)
        self.path = path
        try:
            self._file: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise OutputError(f"-o {path}: {exc.strerror}") from None
        self._chrome: list[dict[str, Any]] = []
        self._tracks: set[tuple[int, int]] = set()
        self.count = 0
        if self.format == "txt" and header:
            self._file.write(header if header.endswith("\n") else header + "\n")

    def write(self, event: TraceEvent) -> None:
        self.count += 1
        if self.format == "txt":
            self._file.write(event.format() + "\n")
        elif self.format == "ndjson":
            self._file.write(event.to_json() + "\n")
        else:
            self._chrome.extend(chrome_events(event, self._tracks))

    def close(self) -> None:
        if self.format == "chrome":
            json.dump({"traceEvents": self._chrome, "displayTimeUnit": "ns",
                       "otherData": {"producer": "qprobes"}}, self._file)  # fmt: skip
            self._file.write("\n")
        self._file.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chrome_events(event: TraceEvent, tracks: set[tuple[int, int]]) -> list[dict[str, Any]]:
    """The Trace Event Format objects for ``event`` (and the metadata events
    that name a track the first time it is used)."""
    out: list[dict[str, Any]] = []
    pid = event.pid if event.pid is not None else -1
    comm = event.comm or "<...>"
    args = {k: (None if not isinstance(v, (int, str, float)) else v)
            for k, v in event.fields.items()}  # fmt: skip
    if event.ret_to:
        args["ret_to"] = event.ret_to
    function = event.location.split("+")[0]
    for track_pid, tid, label in ((TASKS_PID, pid, f"{comm}-{pid}"),
                                  (CPUS_PID, event.cpu, f"CPU {event.cpu}")):  # fmt: skip
        if (track_pid, -1) not in tracks:
            tracks.add((track_pid, -1))
            name = "tasks" if track_pid == TASKS_PID else "CPUs"
            out.append({"name": "process_name", "ph": "M", "pid": track_pid, "tid": 0,
                        "args": {"name": name}})  # fmt: skip
        if (track_pid, tid) not in tracks:
            tracks.add((track_pid, tid))
            out.append({"name": "thread_name", "ph": "M", "pid": track_pid, "tid": tid,
                        "args": {"name": label}})  # fmt: skip
        end_us = event.timestamp * 1e6
        if event.kind == "r" and event.duration is not None:
            dur = event.duration * 1e6
            out.append({"name": function, "cat": event.event, "ph": "X",
                        "ts": round(end_us - dur, 3), "dur": round(dur, 3),
                        "pid": track_pid, "tid": tid, "args": args})  # fmt: skip
        else:
            out.append({"name": event.event, "cat": event.group, "ph": "i", "s": "t",
                        "ts": round(end_us, 3), "pid": track_pid, "tid": tid,
                        "args": args})  # fmt: skip
    return out


# comm-pid [cpu] [flags] timestamp: event: (where) fields
_LINE = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<pid>-?\d+)\s+\[(?P<cpu>\d+)\]\s+(?:(?P<flags>[.a-zA-Z0-9]{4,5})\s+)?"
    r"(?P<ts>\d+\.\d+):\s+(?P<event>[^:\s]+):\s+(?P<rest>.*)$"
)


def parse_trace_text(text: str) -> list[dict[str, Any]]:
    """Read ftrace ``trace`` text back: one dict per event line (``comm``,
    ``pid``, ``cpu``, ``flags``, ``timestamp``, ``event``, ``where``,
    ``fields``); header lines (``#``) are skipped, a ``<stack trace>``
    entry's frames go to the event before it as ``stack``."""
    rows: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith(" => "):
            if rows:
                rows[-1].setdefault("stack", []).append(line[4:].strip())
            continue
        if line.rstrip().endswith("<stack trace>"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise OutputError(f"not an ftrace line: {line!r}")
        rest = match.group("rest")
        where, fields_text = "", rest
        if rest.startswith("("):
            close = rest.find(")")
            where, fields_text = rest[1:close], rest[close + 1 :].strip()
        rows.append({
            "comm": match.group("comm").strip(), "pid": int(match.group("pid")),
            "cpu": int(match.group("cpu")), "flags": match.group("flags"),
            "timestamp": float(match.group("ts")), "event": match.group("event"),
            "where": where, "fields": _fields(fields_text),
        })  # fmt: skip
    return rows


def _fields(text: str) -> dict[str, str]:
    """``name=value`` pairs as ftrace prints them (strings in double quotes)."""
    out: dict[str, str] = {}
    for match in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', text):
        out[match.group(1)] = match.group(2)
    return out
