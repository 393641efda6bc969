"""A 100,000-entry log served by the real ``hermetic log serve`` (uvicorn, subprocess).

Most entries are loaded through the same store/sequencer integration path the server
uses (``LogService.integrate``), the last few thousand through real concurrent HTTP
``POST /add``. Every proof is then computed *only* from fetched ``/tile/...`` bytes with
the core's :class:`TileHashReader`, as an independent tlog-tiles client would.
"""

from __future__ import annotations

import asyncio
import base64
import random
import ssl
from pathlib import Path

import httpx
import pytest

from hermetic.translog.checkpoint import open_checkpoint
from hermetic.translog.merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from hermetic.translog.note import Ed25519NoteSigner, NoteVerifier
from hermetic.translog.service import LogService
from hermetic.translog.store import SQLiteLogStore
from hermetic.translog.tiles import (
    TILE_HEIGHT,
    TileHashReader,
    decode_entry_bundle,
    entries_path,
    split_tile,
    tile_path,
    tiles_for_size,
)
from test_translog_service_support import LogServerProcess, make_log_key

TOTAL = 100_000
OVER_HTTP = 3_000


def entry(i: int) -> bytes:
    return f"scale entry {i}".encode()


class MemoReader:
    """Memoises a TileHashReader so 100,000 proofs share their subtree hashes.

    Tile-level hashes come straight from the fetched tiles; the levels between them are
    hashed up from those, as tlog-tiles prescribes.
    """

    def __init__(self, tiles: TileHashReader) -> None:
        self.tiles = tiles
        self.memo: dict[tuple[int, int], bytes] = {}

    def __call__(self, level: int, index: int) -> bytes:
        key = (level, index)
        got = self.memo.get(key)
        if got is None:
            if level % TILE_HEIGHT == 0:
                got = self.tiles(level, index)
            else:
                got = node_hash(self(level - 1, 2 * index), self(level - 1, 2 * index + 1))
            self.memo[key] = got
        return got


async def _post_all(url: str, items: list[bytes], concurrency: int = 32) -> dict[int, bytes]:
    """POST every item from ``concurrency`` keep-alive connections at once.

    One client per worker: a single httpx pool shared by 32 tasks spends most of the
    test's time re-scanning its connection list on every request. They share one TLS
    context (unused over http://), which httpx would otherwise load from disk per client.
    """
    acked: dict[int, bytes] = {}
    queue = list(items)
    tls = ssl.create_default_context()

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=60, verify=tls) as client:
            while queue:
                item = queue.pop()
                response = await client.post(f"{url}/add", content=item)
                assert response.status_code == 200, response.text
                acked[response.json()["index"]] = item

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return acked


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_hundred_thousand_entries_prove_from_fetched_tiles(tmp_path: Path) -> None:
    keys = make_log_key(tmp_path, "scale.example/log")
    db = tmp_path / "log.db"
    signer = Ed25519NoteSigner.from_skey(keys.skey_file.read_text().strip())
    with SQLiteLogStore(db) as store:
        service = LogService(store, signer)
        for start in range(0, TOTAL - OVER_HTTP, 1000):
            service.integrate(
                [entry(i) for i in range(start, min(start + 1000, TOTAL - OVER_HTTP))]
            )

    with LogServerProcess(str(db), keys) as server:
        acked = asyncio.run(
            _post_all(server.url, [entry(i) for i in range(TOTAL - OVER_HTTP, TOTAL)])
        )
        assert sorted(acked) == list(range(TOTAL - OVER_HTTP, TOTAL))

        with httpx.Client(base_url=server.url, timeout=30) as http:
            verifier = NoteVerifier.from_vkey(keys.vkey)
            cp = open_checkpoint(http.get("/checkpoint").text, verifier)
            assert cp.size == TOTAL

            fetched: dict[str, bytes] = {}

            def fetch(path: str) -> bytes:
                response = http.get(f"/{path}")
                assert response.status_code == 200, path
                fetched[path] = response.content
                return response.content

            tiles = TileHashReader(fetch, cp.size)
            for tile in tiles_for_size(cp.size):  # exactly the tiles the spec says exist
                tiles.tile(tile)
            assert tiles.fetched == len(list(tiles_for_size(cp.size)))
            assert root_hash(cp.size, tiles) == cp.root_hash

            reader = MemoReader(tiles)
            for index in range(TOTAL):
                value = acked.get(index, entry(index))
                proof = inclusion_proof(index, cp.size, reader)
                verify_inclusion(leaf_hash(value), index, cp.size, proof, cp.root_hash)

            # A sample straight through TileHashReader, without the memo.
            rng = random.Random(2024)
            for index in rng.sample(range(TOTAL), 200):
                proof = inclusion_proof(index, cp.size, tiles)
                value = acked.get(index, entry(index))
                verify_inclusion(leaf_hash(value), index, cp.size, proof, cp.root_hash)

            # Consistency between 200 random pairs of sizes: the server's proof and the one
            # computed from tiles both verify against roots computed from tiles.
            for _ in range(200):
                old, new = sorted(rng.sample(range(1, TOTAL + 1), 2))
                old_root, new_root = root_hash(old, reader), root_hash(new, reader)
                served = http.get("/proof/consistency", params={"old": old, "new": new}).json()
                proof = [base64.b64decode(h) for h in served["consistency_proof"]]
                verify_consistency(old, new, old_root, new_root, proof)
                assert proof == consistency_proof(old, new, reader)

            # Entry bundles hash to the level-0 tiles (a full one and the partial last one).
            for number, width in ((300, 256), (TOTAL // 256, TOTAL % 256)):
                path = entries_path(number, width)
                items = decode_entry_bundle(http.get(f"/{path}").content, width)
                level0 = split_tile(fetched[tile_path(0, number, width)], width)
                assert [leaf_hash(e) for e in items] == level0
