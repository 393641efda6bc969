"""Shared table printing and timing helpers for the benchmarks."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def time_per_call(
    fn: Callable[[], object], *, min_seconds: float = 1.0, min_calls: int = 20
) -> list[float]:
    """Call ``fn`` repeatedly for at least ``min_seconds``; return each call's duration (s)."""
    samples: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(samples) < min_calls or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def p50(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    return str(value)


@contextmanager
def temporary_state_dir() -> Iterator[Path]:
    """A fresh HERMETIC_STATE_DIR for one benchmark, restored afterwards.

    Benchmarks must never touch the developer's dev root, dev log or enclave records.
    """
    previous = os.environ.get("HERMETIC_STATE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HERMETIC_STATE_DIR"] = tmp
        try:
            yield Path(tmp)
        finally:
            if previous is None:
                os.environ.pop("HERMETIC_STATE_DIR", None)
            else:
                os.environ["HERMETIC_STATE_DIR"] = previous
