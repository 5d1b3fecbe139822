"""Function latency and saved traces, through the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qprobes.tracing.output import parse_trace_text

pytestmark = [pytest.mark.vm, pytest.mark.serial]


def qprobes(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qprobes.frontends.cli", *args],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def test_latency_histogram_and_chrome_slices_agree(tmp_path: Path) -> None:
    out = tmp_path / "t.chrome.json"
    proc = qprobes("trace", "--json", "--latency", "do_sys_openat2", "-o", str(out),
                   "--", "cat /etc/hostname; ls / >/dev/null; cat /proc/version")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (lat,) = [json.loads(line)["latency"] for line in proc.stdout.splitlines()
              if line.startswith('{"latency"')]  # fmt: skip
    assert lat["function"] == "do_sys_openat2" and lat["count"] >= 3
    assert 0 < lat["min_ns"] <= lat["p50_ns"] <= lat["p90_ns"] <= lat["max_ns"]
    data = json.loads(out.read_text())
    slices = [e for e in data["traceEvents"] if e["ph"] == "X" and e["pid"] == 1]
    assert len(slices) == lat["count"]
    durs = sorted(round(e["dur"] * 1000) for e in slices)
    assert abs(durs[0] - lat["min_ns"]) <= 1 and abs(durs[-1] - lat["max_ns"]) <= 1
    assert sum(lat["log2_buckets"].values()) == lat["count"]
    assert any(e["name"] == "thread_name" and e["args"]["name"].startswith("cat-")
               for e in data["traceEvents"])  # fmt: skip
    assert f"wrote {2 * lat['count']}" not in proc.stderr  # counted once per event
    assert re.search(rf"wrote {lat['count']} events to .*t\.chrome\.json \(chrome\)", proc.stderr)


def test_text_output_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "t.txt"
    proc = qprobes("trace", "p:myopen do_sys_openat2 path=+0(%si):string", "--latency", "vfs_read",
                   "-o", str(out), "--", "cat /etc/hostname")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "myopen" not in proc.stdout  # the events went to the file
    assert re.search(r"^vfs_read: \d+ calls, latency min ", proc.stdout, re.M), proc.stdout
    assert "@us:" in proc.stdout
    rows = parse_trace_text(out.read_text())
    printed = int(re.search(r"myopen: \d+ hits, (\d+) printed", proc.stderr).group(1))  # type: ignore[union-attr]
    assert len([r for r in rows if r["event"] == "myopen"]) == printed
    assert any(r["fields"].get("path") == '"/etc/hostname"' and r["comm"] == "cat" for r in rows)


def test_a_bad_output_name_is_refused_before_booting(tmp_path: Path) -> None:
    proc = qprobes("trace", "--latency", "vfs_read", "-o", str(tmp_path / "t.bin"), "--", "true")
    assert proc.returncode == 1
    assert "say which format" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t.bin").exists()
