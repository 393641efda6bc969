"""Merkle proof generation and verification at 10^6 entries, against a 1 ms budget.

The log serves an inclusion proof with every release lookup and the client verifies one
in every handshake, so both must stay far below a millisecond at realistic sizes. Proof
generation is measured over stored perfect-subtree hashes (what the store persists) and
over tiles (what an independent client fetches), both by one long-lived reader (a monitor
or a client that keeps its tiles and the hashes it derived from them) and by a fresh reader
per proof (a client proving one entry with nothing cached; every tile is still served from
memory, so network time is not in the figure).
"""

from __future__ import annotations

import random

from bench.report import Goal, p50, print_goals, print_table, time_per_call
from hermetic.translog.merkle import (
    MemoryTree,
    consistency_proof,
    inclusion_proof,
    verify_consistency,
    verify_inclusion,
)
from hermetic.translog.tiles import TileHashReader, tile_bytes, tiles_for_size

SIZE = 1_000_000
LIMIT_MS = 1.0


def main() -> list[Goal]:
    tree = MemoryTree()
    for i in range(SIZE):
        tree.append(b"entry %d\n" % i)
    root = tree.root()
    rng = random.Random(1)
    tiles = {t.path: tile_bytes(t.level, t.index, t.width, tree.read) for t in tiles_for_size(SIZE)}
    tile_reader = TileHashReader(tiles.__getitem__, SIZE)

    def gen_inclusion() -> None:
        inclusion_proof(rng.randrange(SIZE), SIZE, tree.read)

    def gen_inclusion_tiles() -> None:
        inclusion_proof(rng.randrange(SIZE), SIZE, tile_reader)

    def gen_inclusion_fresh_tiles() -> None:
        inclusion_proof(rng.randrange(SIZE), SIZE, TileHashReader(tiles.__getitem__, SIZE))

    def gen_consistency() -> None:
        consistency_proof(rng.randrange(1, SIZE), SIZE, tree.read)

    index = 123_457
    proof = inclusion_proof(index, SIZE, tree.read)
    leaf = tree.read(0, index)

    def verify_incl() -> None:
        verify_inclusion(leaf, index, SIZE, proof, root)

    old = 654_321
    cproof = consistency_proof(old, SIZE, tree.read)
    old_root = tree.root(old)

    def verify_cons() -> None:
        verify_consistency(old, SIZE, old_root, root, cproof)

    rows = []
    goals = []
    for name, fn in (
        ("inclusion proof, stored hashes", gen_inclusion),
        ("inclusion proof, from tiles", gen_inclusion_tiles),
        ("inclusion proof, from tiles, fresh reader", gen_inclusion_fresh_tiles),
        ("consistency proof, stored hashes", gen_consistency),
        ("verify inclusion", verify_incl),
        ("verify consistency", verify_cons),
    ):
        ms = p50(time_per_call(fn, min_seconds=0.5)) * 1000
        goals.append(Goal(f"{name}, p50", ms, "<", LIMIT_MS, "ms"))
        rows.append((name, f"{SIZE:,}", ms))
    print_table(("operation", "tree size", "p50 ms"), rows)
    print_goals(goals)
    return goals
