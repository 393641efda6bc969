"""Run every benchmark module (or those named on the command line) and print their tables.

Each module's ``main()`` returns its :class:`bench.report.Goal` values. The last lines
printed are one per goal missed (module, goal, measured figure, limit), and the exit
status is 1 when any goal was missed or any module failed to run, so ``make bench`` fails
loudly instead of printing a count nobody reads.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback
from pathlib import Path

from bench.report import THIN_MARGIN, Goal, settle_allocator


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    wanted = [n if n.startswith("bench_") else f"bench_{n}" for n in argv] or names
    settle_allocator()
    results: list[tuple[str, Goal]] = []
    broken: list[str] = []
    for name in wanted:
        print(f"\n=== {name} ===", flush=True)
        try:
            goals = importlib.import_module(f"bench.{name}").main()
        except Exception as exc:  # one broken benchmark must not hide the others' results
            traceback.print_exc()
            broken.append(f"{name}: did not run: {type(exc).__name__}: {exc}")
            continue
        results += [(name, goal) for goal in goals]
    missed = [f"{name}: {goal.describe()}" for name, goal in results if not goal.met]
    thin = sum(1 for _, goal in results if goal.met and goal.margin < THIN_MARGIN)
    print(
        f"\n{len(results) - len(missed)} of {len(results)} goal(s) met"
        f" ({thin} with a margin under {THIN_MARGIN:.0%}) in {len(wanted) - len(broken)}"
        f" benchmark(s); {len(missed)} missed, {len(broken)} benchmark(s) did not run"
    )
    for line in broken + missed:
        print(f"MISSED {line}")
    return 1 if broken or missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
