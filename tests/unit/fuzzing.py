"""Shared strategies and settings for the hypothesis fuzz tests (test_fuzz_*.py)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Modest example counts: the fuzz set runs on every `pytest tests/unit`.
# QPROBES_FUZZ_SCALE=N runs N times as many examples (a deeper search).
_SCALE = max(1, int(os.environ.get("QPROBES_FUZZ_SCALE", "1")))
FUZZ = settings(
    max_examples=150 * _SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
FUZZ_SLOW = settings(FUZZ, max_examples=50 * _SCALE)


def mutated(seed: bytes, max_edits: int = 8) -> st.SearchStrategy[bytes]:
    """``seed`` with a few bytes flipped, inserted, deleted, or cut off at the end."""

    edit = st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
        st.integers(0, max(0, len(seed))),
        st.integers(0, 255),
    )

    def apply(edits: list[tuple[str, int, int]]) -> bytes:
        out = bytearray(seed)
        for op, pos, value in edits:
            if not out and op != "insert":
                continue
            at = pos % (len(out) + (1 if op == "insert" else 0)) if out else 0
            if op == "flip":
                out[at] ^= 1 << (value & 7)
            elif op == "set":
                out[at] = value
            elif op == "insert":
                out[at:at] = bytes((value,))
            elif op == "delete":
                del out[at]
            else:
                del out[at:]
        return bytes(out)

    return st.lists(edit, min_size=1, max_size=max_edits).map(apply)


def mutated_text(seeds: list[str], alphabet: str, max_edits: int = 4) -> st.SearchStrategy[str]:
    """One of ``seeds`` with a few characters replaced, inserted or deleted
    (drawn from ``alphabet``, plus any character now and then)."""
    chars = st.one_of(st.sampled_from(alphabet), st.characters())
    edit = st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 10_000), chars)

    def apply(seed: str, edits: list[tuple[str, int, str]]) -> str:
        out = list(seed)
        for op, pos, ch in edits:
            if op == "insert":
                out.insert(pos % (len(out) + 1), ch)
            elif out and op == "set":
                out[pos % len(out)] = ch
            elif out:
                del out[pos % len(out)]
        return "".join(out)

    return st.builds(apply, st.sampled_from(seeds), st.lists(edit, max_size=max_edits))
