"""Function latency: entry-to-return times per call, as a log2 histogram.

What ``funclatency`` (bcc) and bpftrace's ``hist()`` give, for a qprobes
return probe: each call's time from its entry to its return on the trace
clock (the guest's clock once the session reads it; entry and return are
paired by the return probe's instance, so a task that migrates between
them still pairs), then count, min, mean, max and percentiles, and a log2
bar chart in bpftrace's format (``[lo, hi)`` buckets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

_UNITS = {"ns": 1e9, "us": 1e6, "ms": 1e3}


@dataclass
class Latency:
    """The latencies of one function's calls, in nanoseconds."""

    function: str
    unit: str = "us"  # how format() prints
    samples: list[int] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.samples.append(max(0, round(seconds * 1e9)))

    @property
    def count(self) -> int:
        return len(self.samples)

    def percentile(self, p: float) -> int:
        """The nearest-rank percentile (``p`` in 0-100) in ns."""
        if not self.samples:
            raise ValueError("no calls")
        ordered = sorted(self.samples)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1]

    def stats(self) -> dict[str, Any]:
        """count, min, mean, max, p50, p90, p99 (ns); zeros for no calls."""
        if not self.samples:
            return {"count": 0, "min_ns": 0, "mean_ns": 0, "max_ns": 0,
                    "p50_ns": 0, "p90_ns": 0, "p99_ns": 0}  # fmt: skip
        return {
            "count": self.count,
            "min_ns": min(self.samples),
            "mean_ns": round(sum(self.samples) / self.count),
            "max_ns": max(self.samples),
            "p50_ns": self.percentile(50),
            "p90_ns": self.percentile(90),
            "p99_ns": self.percentile(99),
        }

    def buckets(self) -> dict[int, int]:
        """Calls by log2 bucket of the latency in :attr:`unit`: bucket ``k``
        holds [2^k, 2^(k+1)); bucket -1 holds 0."""
        scale = _UNITS[self.unit] / 1e9
        out: dict[int, int] = {}
        for ns in self.samples:
            value = int(ns * scale)
            k = value.bit_length() - 1  # 0 -> -1
            out[k] = out.get(k, 0) + 1
        return out

    def format(self) -> str:
        """A summary line and the bar chart."""
        st = self.stats()
        scale = _UNITS[self.unit] / 1e9
        unit = self.unit

        def show(ns: int) -> str:
            return f"{ns * scale:.1f} {unit}"

        head = f"{self.function}: {st['count']} calls"
        if st["count"]:
            head += (
                f", latency min {show(st['min_ns'])}, mean {show(st['mean_ns'])}, "
                f"max {show(st['max_ns'])}, p50 {show(st['p50_ns'])}, "
                f"p90 {show(st['p90_ns'])}, p99 {show(st['p99_ns'])}"
            )
        lines = [head]
        buckets = self.buckets()
        if buckets:
            top = max(buckets.values())
            width = 52
            lines.append(f"@{unit}:")
            for k in range(min(buckets), max(buckets) + 1):
                n = buckets.get(k, 0)
                label = "[0]" if k < 0 else f"[{_human(1 << k)}, {_human(1 << (k + 1))})"
                bar = "@" * (math.ceil(n * width / top) if n else 0)
                lines.append(f"{label:<20} {n:8d} |{bar:<{width}}|")
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, Any]:
        return {
            "function": self.function,
            **self.stats(),
            "log2_buckets": {
                ("0" if k < 0 else f"{1 << k}"): n for k, n in sorted(self.buckets().items())
            },
            "unit": self.unit,
        }


def _human(value: int) -> str:
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value >> shift}{suffix}"
    return str(value)
