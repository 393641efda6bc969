"""Shared table printing, timing and goal helpers for the benchmarks.

Every benchmark module's ``main()`` returns the :class:`Goal` values it measured, met or
not, so ``python -m bench`` can say which goals were missed and exit non-zero; each module
prints its own goals with :func:`print_goals`, margin included, because a goal met by a
few percent on a quiet machine is missed on the next noisy run.
"""

from __future__ import annotations

import operator
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Comparison = Literal["<", "<=", ">=", ">"]
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">=": operator.ge,
    ">": operator.gt,
}
THIN_MARGIN = 0.2
"""Margins under this fraction of the limit are flagged: run-to-run noise can eat them."""


@dataclass(frozen=True)
class Goal:
    """One goal of a benchmark: a figure measured in this run, compared with its limit.

    ``measured`` and ``limit`` are in ``unit`` (``"x"`` for a ratio to a peer measured in
    the same run); ``compare`` says which side of the limit the figure must be on.
    """

    name: str
    measured: float
    compare: Comparison
    limit: float
    unit: str = "x"

    @property
    def met(self) -> bool:
        return _COMPARE[self.compare](self.measured, self.limit)

    @property
    def margin(self) -> float:
        """How far inside the limit the figure is, as a fraction of it (< 0 when missed).

        A limit of zero (a count that must stay at none, e.g. KMS calls in steady state)
        has no fraction: its margin is 1 when met and -1 when missed, since an exact count
        is not eaten by run-to-run noise.
        """
        if self.limit == 0:
            return 1.0 if self.met else -1.0
        if self.compare in ("<", "<="):
            return (self.limit - self.measured) / self.limit
        return (self.measured - self.limit) / self.limit

    def describe(self) -> str:
        return (
            f"{self.name}: {_figure(self.measured, self.unit)}, goal {self.compare} "
            f"{_figure(self.limit, self.unit)}"
        )


def _figure(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"


def settle_allocator() -> None:
    """Put this process's malloc in the state a long-running process reaches anyway.

    glibc serves requests of 128 KiB or more with a fresh mmap until it has freed one such
    block, and asyncio reads 256 KiB per ``recv``: until then every read of a stock asyncio
    stream maps, faults in and unmaps a buffer. Which benchmark first frees a big block
    then decides which peers pay that (seen: the plain TCP peer of bench_channel at
    1,118-1,372 MB/s alone, 1,550-1,669 MB/s after one such block was freed), so the runner
    frees one 16 MiB block first and every benchmark sees the same allocator, alone or not.
    """
    block = bytearray(16 << 20)
    del block


def print_goals(goals: Sequence[Goal]) -> None:
    """The goals of one benchmark with their margins (a thin margin is flagged)."""
    rows = []
    for goal in goals:
        state = "met" if goal.met else "NOT MET"
        if goal.met and goal.margin < THIN_MARGIN:
            state = f"met (margin under {THIN_MARGIN:.0%})"
        rows.append(
            [goal.name, _figure(goal.measured, goal.unit),
             f"{goal.compare} {_figure(goal.limit, goal.unit)}", f"{goal.margin:+.0%}", state]
        )  # fmt: skip
    print()
    print_table(["goal", "measured", "limit", "margin", "result"], rows)


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


def interleaved_p50(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 10,
    seconds: float = 0.1,
    min_calls: int = 5,
) -> dict[str, float]:
    """p50 (s) of each function, sampled in ``rounds`` alternating rounds.

    A peer and the path compared with it must see the same machine: on a shared one, load
    comes and goes, and timing each for a second in turn lets a burst land on one of them
    only. Round by round, each function runs for ``seconds`` (and at least ``min_calls``
    times); every function is called once first, unmeasured, to warm caches up.
    """
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += time_per_call(fn, min_seconds=seconds, min_calls=min_calls)
    return {name: p50(values) for name, values in samples.items()}


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
