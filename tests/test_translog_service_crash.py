"""Crash safety: the real server is SIGKILLed at random moments under concurrent appends
(after a random count of acknowledged adds, with the other writers' adds in flight).

After every restart, every entry whose add was acknowledged must be at its index, and the
new checkpoint must be consistent with every checkpoint seen before (each one verified
with the log key when it was received).
"""

from __future__ import annotations

import asyncio
import base64
import random
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from hermetic.translog.checkpoint import VerifiedCheckpoint, open_checkpoint
from hermetic.translog.merkle import leaf_hash, verify_consistency, verify_inclusion
from hermetic.translog.note import NoteVerifier
from hermetic.translog.tiles import TILE_WIDTH, decode_entry_bundle, entries_path
from test_translog_service_support import LogServerProcess, make_log_key

ROUNDS = 20
KILL_AFTER_ACKS = (5, 40)
"""Each round the server is killed once this many adds (drawn uniformly) were acknowledged."""
DEADLINE = 120.0
"""Seconds a round may take to reach its count before the test calls the server hung."""


async def _append_until_killed(
    url: str,
    round_no: int,
    verifier: NoteVerifier,
    acked: dict[int, bytes],
    seen: dict[int, VerifiedCheckpoint],
    kill_after_acks: int,
    kill: Callable[[], None],
) -> int:
    """Eight writers append; the server is SIGKILLed as soon as ``kill_after_acks`` adds were
    acknowledged, while the other writers' adds are still in flight. Returns how many adds
    were acknowledged in all.

    The kill is tied to a count of acknowledged appends, not to a timer, so the round does
    the same work on a loaded machine as on an idle one.
    """
    count = 0
    reached = asyncio.Event()
    killed = asyncio.Event()
    tls = ssl.create_default_context()  # unused over http://; httpx would load one per client

    async def writer(w: int) -> None:
        nonlocal count
        n = 0
        async with httpx.AsyncClient(timeout=DEADLINE, verify=tls) as client:
            while not killed.is_set():
                item = f"round {round_no} writer {w} entry {n}".encode()
                n += 1
                try:
                    response = await client.post(f"{url}/add", content=item)
                except httpx.HTTPError:
                    if killed.is_set():
                        return  # the server is gone: this add was not acknowledged
                    raise
                if response.status_code != 200:
                    if killed.is_set():
                        return
                    raise AssertionError(f"add refused before the kill: {response.text}")
                body = response.json()
                cp = open_checkpoint(body["checkpoint"], verifier)
                proof = [base64.b64decode(h) for h in body["inclusion_proof"]]
                verify_inclusion(leaf_hash(item), body["index"], cp.size, proof, cp.root_hash)
                acked[body["index"]] = item
                seen.setdefault(cp.size, cp)
                assert seen[cp.size].root_hash == cp.root_hash, "two trees for one size"
                count += 1
                if count >= kill_after_acks:
                    reached.set()

    tasks = [asyncio.create_task(writer(w)) for w in range(8)]
    waiter = asyncio.create_task(reached.wait())
    # A writer that fails ends the wait too, so its error is raised below, not a timeout.
    await asyncio.wait([waiter, *tasks], timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    kill()
    killed.set()
    await asyncio.gather(*tasks)
    assert reached.is_set(), (
        f"round {round_no}: {count} of {kill_after_acks} adds acknowledged in {DEADLINE} s"
    )
    return count


def _check_log(
    url: str,
    verifier: NoteVerifier,
    acked: dict[int, bytes],
    seen: dict[int, VerifiedCheckpoint],
) -> VerifiedCheckpoint:
    with httpx.Client(base_url=url, timeout=30) as http:
        current = open_checkpoint(http.get("/checkpoint").text, verifier)
        for size, old in seen.items():
            assert size <= current.size, f"checkpoint went back from {size} to {current.size}"
            body = http.get("/proof/consistency", params={"old": size, "new": current.size}).json()
            proof = [base64.b64decode(h) for h in body["consistency_proof"]]
            verify_consistency(size, current.size, old.root_hash, current.root_hash, proof)
        if acked:
            assert max(acked) < current.size
        for bundle in range((current.size + TILE_WIDTH - 1) // TILE_WIDTH):
            width = min(TILE_WIDTH, current.size - bundle * TILE_WIDTH)
            items = decode_entry_bundle(http.get(f"/{entries_path(bundle, width)}").content, width)
            for offset, item in enumerate(items):
                expected = acked.get(bundle * TILE_WIDTH + offset)
                assert expected is None or item == expected
    return current


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_during_appends_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    keys = make_log_key(tmp_path, "crash.example/log")
    verifier = NoteVerifier.from_vkey(keys.vkey)
    server = LogServerProcess(str(tmp_path / "log.db"), keys, "--batch-delay", "0.002")
    rng = random.Random(99)
    acked: dict[int, bytes] = {}
    seen: dict[int, VerifiedCheckpoint] = {}
    total_acked = planned = 0
    for round_no in range(ROUNDS):
        server.start()
        current = _check_log(server.url, verifier, acked, seen)
        seen.setdefault(current.size, current)
        kill_after_acks = rng.randint(*KILL_AFTER_ACKS)
        planned += kill_after_acks
        total_acked += asyncio.run(
            _append_until_killed(
                server.url, round_no, verifier, acked, seen, kill_after_acks, server.kill
            )
        )
    server.start()
    try:
        final = _check_log(server.url, verifier, acked, seen)
    finally:
        server.stop()
    # Every acknowledged add has an index of its own, and every round reached its count.
    assert total_acked == len(acked) >= planned
    assert final.size >= len(acked)
