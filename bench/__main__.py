"""Run every benchmark module (or those named on the command line) and print their tables."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    wanted = [n if n.startswith("bench_") else f"bench_{n}" for n in argv] or names
    failed = 0
    for name in wanted:
        module = importlib.import_module(f"bench.{name}")
        print(f"\n=== {name} ===", flush=True)
        ok = module.main()
        failed += 0 if ok else 1
    print(f"\n{len(wanted) - failed} benchmark(s) met their goal, {failed} did not")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
