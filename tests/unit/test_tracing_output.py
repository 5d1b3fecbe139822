"""Latency statistics and saved trace formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qprobes.tracing.events import TraceEvent
from qprobes.tracing.latency import Latency
from qprobes.tracing.output import OutputError, TraceWriter, format_for, parse_trace_text


def _event(
    kind: str = "p", ts: float = 1.5, duration: float | None = None, **fields: object
) -> TraceEvent:
    return TraceEvent(
        group="kprobes",
        event="myopen" if kind == "p" else "myret",
        kind=kind,
        addr=0xFFFFFFFF81000000,
        location="do_sys_openat2+0x0/0x170",
        ret_to="__x64_sys_openat+0x6a/0xa0" if kind == "r" else None,
        cpu=1,
        pid=93,
        comm="cat",
        timestamp_ns=round(ts * 1e9),
        fields=dict(fields),  # type: ignore[arg-type]
        text=" ".join(
            f'{k}="{v}"' if isinstance(v, str) else f"{k}={v:#x}" for k, v in fields.items()
        ),  # type: ignore[str-format]
        duration=duration,
    )


def test_latency_stats_and_buckets() -> None:
    lat = Latency("do_sys_openat2", unit="us")
    for us in (1, 2, 3, 100, 1000):
        lat.add(us / 1e6)
    st = lat.stats()
    assert st["count"] == 5 and st["min_ns"] == 1000 and st["max_ns"] == 1_000_000
    assert st["mean_ns"] == round(1106 * 1000 / 5)
    assert st["p50_ns"] == 3000 and st["p99_ns"] == 1_000_000
    assert lat.buckets() == {0: 1, 1: 2, 6: 1, 9: 1}
    text = lat.format()
    assert text.startswith(
        "do_sys_openat2: 5 calls, latency min 1.0 us, mean 221.2 us, max 1000.0 us"
    )
    assert "[1, 2)" in text and "[512, 1K)" in text and "@us:" in text
    assert Latency("f").format() == "f: 0 calls\n"


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("t.txt", "txt"),
        ("t.ndjson", "ndjson"),
        ("t.jsonl", "ndjson"),
        ("t.chrome.json", "chrome"),
        ("x.json", "chrome"),
    ],
)
def test_format_by_name(name: str, fmt: str) -> None:
    assert format_for(name) == fmt


def test_unknown_format_is_one_clear_error() -> None:
    with pytest.raises(OutputError, match="say which format"):
        format_for("trace.bin")
    with pytest.raises(OutputError, match="choose one of"):
        format_for("t.txt", "pcap")


def test_text_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    with TraceWriter(str(path), header="# tracer: nop\n#") as w:
        w.write(_event(path="/etc/hostname"))
        w.write(_event("r", ts=1.75, duration=0.25, ret=3))
    rows = parse_trace_text(path.read_text())
    assert [r["event"] for r in rows] == ["myopen", "myret"]
    assert rows[0]["comm"] == "cat" and rows[0]["pid"] == 93 and rows[0]["cpu"] == 1
    assert rows[0]["fields"] == {"path": '"/etc/hostname"'}
    assert rows[1]["where"] == "__x64_sys_openat+0x6a/0xa0 <- do_sys_openat2"
    assert rows[1]["timestamp"] == 1.75


def test_ndjson_and_chrome(tmp_path: Path) -> None:
    nd = tmp_path / "t.ndjson"
    with TraceWriter(str(nd)) as w:
        w.write(_event("r", ts=2.0, duration=0.5, ret=3))
    (obj,) = [json.loads(line) for line in nd.read_text().splitlines()]
    assert obj["duration_ns"] == 500_000_000 and obj["fields"] == {"ret": 3}

    ch = tmp_path / "t.chrome.json"
    with TraceWriter(str(ch)) as w:
        w.write(_event("p", ts=1.0, path="/etc/hostname"))
        w.write(_event("r", ts=2.0, duration=0.5, ret=3))
    data = json.loads(ch.read_text())
    events = data["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == 2  # the task's track and the CPU's
    for e in slices:
        assert e["ts"] == 1.5e6 and e["dur"] == 0.5e6 and e["name"] == "do_sys_openat2"
    assert {e["pid"] for e in slices} == {1, 2} and {e["tid"] for e in slices} == {93, 1}
    instants = [e for e in events if e["ph"] == "i"]
    assert len(instants) == 2 and instants[0]["args"] == {"path": "/etc/hostname"}
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {(1, 93): "cat-93", (2, 1): "CPU 1"}
    for e in events:  # every event has the format's required fields
        assert {"name", "ph", "pid", "tid"} <= set(e)
        if e["ph"] != "M":
            assert isinstance(e["ts"], float | int)
