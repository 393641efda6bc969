"""The log service's store: durable append throughput and proof latency from the database.

Two goals from the issue, measured in one run on a real SQLite file (WAL,
``synchronous=FULL``, so every batch commit is fsynced):

* sustained appends through the service's path (asyncio ``Sequencer`` grouping concurrent
  adds, ``LogStore.integrate`` committing each batch with its signed checkpoint): at least
  5,000 durable entries/s;
* inclusion-proof generation from the stored hashes at 10^5 and 10^6 entries: under 1 ms
  at 10^6, and logarithmic growth (10x the entries may cost at most 2x, where linear
  growth would cost 10x). The in-memory tree of the core (no database) is the peer.
"""

from __future__ import annotations

import asyncio
import math
import random
import tempfile
import time
from pathlib import Path

from bench.report import Goal, p50, print_goals, print_table, time_per_call
from hermetic.translog.merkle import MemoryTree, inclusion_proof
from hermetic.translog.note import Ed25519NoteSigner, generate_key
from hermetic.translog.service import LogService, Sequencer
from hermetic.translog.store import SQLiteLogStore

APPENDS = 40_000
APPEND_GOAL = 5_000.0
PROOF_LIMIT_MS = 1.0
SIZES = (100_000, 1_000_000)
BATCH = 1000


def _entry(i: int) -> bytes:
    return b"bench entry %d" % i


async def _sequenced_appends(service: LogService, start: int, count: int) -> float:
    sequencer = Sequencer(service.integrate, max_batch=BATCH, max_delay=0.002)
    sequencer.start()
    t0 = time.perf_counter()
    pending = [asyncio.ensure_future(sequencer.add(_entry(i))) for i in range(start, start + count)]
    results = await asyncio.gather(*pending)
    elapsed = time.perf_counter() - t0
    await sequencer.stop()
    assert sorted(r.index for r in results) == list(range(start, start + count))
    return elapsed


def _fill(service: LogService, start: int, end: int) -> None:
    for n in range(start, end, BATCH):
        service.integrate([_entry(i) for i in range(n, min(n + BATCH, end))])


def main() -> list[Goal]:
    signer = Ed25519NoteSigner.from_skey(generate_key("bench.example/log")[0])
    with tempfile.TemporaryDirectory(prefix="bench-translog-", dir="/var/tmp") as tmp:
        store = SQLiteLogStore(Path(tmp) / "log.db")
        service = LogService(store, signer)

        elapsed = asyncio.run(_sequenced_appends(service, 0, APPENDS))
        rate = APPENDS / elapsed
        print_table(
            ["measure", "entries", "seconds", "entries/s"],
            [["durable appends via Sequencer", APPENDS, elapsed, rate]],
        )
        print()

        rows = []
        latencies = {}
        filled = APPENDS
        memory = MemoryTree()
        rng = random.Random(7)
        for size in SIZES:
            t0 = time.perf_counter()
            _fill(service, filled, size)
            for i in range(memory.size, size):
                memory.append(_entry(i))
            filled = size
            fill_s = time.perf_counter() - t0

            def from_store(size: int = size) -> None:
                inclusion_proof(rng.randrange(size), size, store.read_hash)

            def from_memory(size: int = size) -> None:
                inclusion_proof(rng.randrange(size), size, memory.read)

            db_ms = p50(time_per_call(from_store, min_seconds=1.0)) * 1e3
            mem_ms = p50(time_per_call(from_memory, min_seconds=0.5)) * 1e3
            latencies[size] = db_ms
            rows.append([f"{size:,}", fill_s, db_ms, mem_ms, math.ceil(math.log2(size))])
        store.close()

    print_table(
        ["tree size", "fill s", "proof p50 ms (SQLite)", "peer: in-memory ms", "proof hashes"],
        rows,
    )
    small, large = latencies[SIZES[0]], latencies[SIZES[1]]
    growth = large / small
    print(
        f"\nproof cost x{growth:.2f} for x10 entries (log2 ratio "
        f"{math.log2(SIZES[1]) / math.log2(SIZES[0]):.2f}; linear would be x10; goal <= x2)"
    )
    goals = [
        Goal("durable appends via Sequencer", rate, ">=", APPEND_GOAL, "entries/s"),
        Goal(f"inclusion proof from SQLite at {SIZES[1]:,}, p50", large, "<", PROOF_LIMIT_MS, "ms"),
        Goal("proof cost growth for 10x the entries", growth, "<=", 2.0),
    ]
    print_goals(goals)
    return goals
