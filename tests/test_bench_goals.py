"""The benchmark runner's goal bookkeeping (no timing: the goals here are made-up figures).

``python -m bench`` must end with one line per missed goal and exit 1 when any goal was
missed or any benchmark failed to run, so a slow path cannot hide behind a summary count.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RUNNER = textwrap.dedent(
    """
    import sys, types
    import bench.__main__ as runner
    from bench.report import Goal

    def fake(goals=None, error=None):
        def main():
            if error:
                raise RuntimeError(error)
            return goals
        return types.SimpleNamespace(main=main)

    modules = {
        "bench.bench_fast": fake([Goal("fast path", 0.5, "<=", 1.0)]),
        "bench.bench_slow": fake([Goal("slow path", 2.5, "<=", 2.0),
                                  Goal("rate", 900.0, ">=", 1000.0, "ops/s")]),
        "bench.bench_broken": fake(error="peer unavailable"),
    }
    runner.importlib.import_module = modules.__getitem__
    sys.exit(runner.main(sys.argv[1:]))
    """
)


def _run(*names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUNNER, *names],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_run_with_a_missed_goal_exits_1_and_ends_with_one_line_per_miss() -> None:
    done = _run("fast", "slow")
    assert done.returncode == 1, done.stderr
    last = done.stdout.strip().splitlines()[-2:]
    assert last == [
        "MISSED bench_slow: slow path: 2.50x, goal <= 2.00x",
        "MISSED bench_slow: rate: 900 ops/s, goal >= 1,000 ops/s",
    ]


def test_run_with_a_benchmark_that_raises_exits_1_and_names_it() -> None:
    done = _run("fast", "broken")
    assert done.returncode == 1
    assert done.stdout.strip().splitlines()[-1] == (
        "MISSED bench_broken: did not run: RuntimeError: peer unavailable"
    )
    assert "RuntimeError: peer unavailable" in done.stderr  # the traceback is shown


def test_run_with_every_goal_met_exits_0_and_lists_no_miss() -> None:
    done = _run("fast")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MISSED" not in done.stdout


@pytest.mark.parametrize(
    ("measured", "compare", "limit", "met", "margin"),
    [
        (0.8, "<=", 1.0, True, 0.2),
        (1.0, "<=", 1.0, True, 0.0),
        (1.0, "<", 1.0, False, 0.0),
        (1.5, "<=", 1.0, False, -0.5),
        (0.6, ">=", 0.5, True, 0.2),
        (0.4, ">=", 0.5, False, -0.2),
    ],
)
def test_goal_is_met_on_the_right_side_of_its_limit_with_margin_as_fraction_of_it(
    measured: float, compare: str, limit: float, met: bool, margin: float
) -> None:
    sys.path.insert(0, str(REPO))
    try:
        from bench.report import Goal
    finally:
        sys.path.remove(str(REPO))
    goal = Goal("figure", measured, compare, limit)  # type: ignore[arg-type]
    assert goal.met is met
    assert goal.margin == pytest.approx(margin)
