"""10,000 messages of 0..1 MiB over one session, client and server in different processes."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time

import pytest

from hermetic.channel import aio
from hermetic.errors import PolicyError

MESSAGES = 10_000
IN_FLIGHT = 8
MAX_SIZE = 1 << 20

SERVER = """
import asyncio, sys
from hermetic.channel import aio
from hermetic.channel.noise import StaticKeypair

KEY = StaticKeypair.generate()
totals = {"count": 0, "bytes": 0}

def make_evidence(h, static):
    return b"stress-evidence:" + h + static

async def echo(payload):
    totals["count"] += 1
    totals["bytes"] += len(payload)
    return [len(payload), payload]

async def summary(_):
    return [totals["count"], totals["bytes"]]

async def main():
    done = asyncio.Event()
    async def on_connection(reader, writer):
        try:
            await aio.serve_connection(reader, writer, make_evidence,
                                       {"echo": echo, "summary": summary}, static=KEY)
        finally:
            done.set()
    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await done.wait()

asyncio.run(main())
"""


def verify(bundle: bytes, handshake_hash: bytes, remote_static: bytes) -> object:
    if bundle != b"stress-evidence:" + handshake_hash + remote_static:
        raise PolicyError("stress evidence: not bound to this session")
    return remote_static


def payloads(seed: int) -> tuple[bytes, random.Random]:
    """A random pool that each payload is a slice of, at a random offset, and its chooser.

    ``random.randbytes`` makes about 300 MB/s, so fresh bytes for 5 GiB would take most of
    the test's time; slicing a pool copies at memory speed. Payloads of one size still
    differ (their offsets do), so a reply matched to the wrong call fails the check.
    """
    rng = random.Random(seed)
    return rng.randbytes(2 * MAX_SIZE), rng


def sizes(rng: random.Random) -> list[int]:
    """Uniform over 0..1 MiB, the two ends included (about 5 GiB each way in all)."""
    out = [0, 1, MAX_SIZE - 1, MAX_SIZE]
    out += [rng.randint(0, MAX_SIZE) for _ in range(MESSAGES - len(out))]
    rng.shuffle(out)
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_ten_thousand_concurrent_messages_up_to_one_mib_arrive_intact() -> None:
    process = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        port = int(await asyncio.to_thread(process.stdout.readline))
        channel = await aio.open_client(*await asyncio.open_connection("127.0.0.1", port), verify)
        rng = random.Random(20261128)
        plan = sizes(rng)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for size in plan:
            queue.put_nowait(size)
        checked = {"count": 0, "bytes": 0}
        max_in_flight = {"now": 0, "max": 0}

        async def worker(seed: int) -> None:
            pool, local = payloads(seed)
            while not queue.empty():
                size = queue.get_nowait()
                offset = local.randint(0, len(pool) - size)
                payload = pool[offset : offset + size]
                max_in_flight["now"] += 1
                max_in_flight["max"] = max(max_in_flight["max"], max_in_flight["now"])
                # The length the server saw and the bytes it sent back: AEAD already
                # rejects a corrupted record, so what is left to catch is chunks lost,
                # repeated, reordered or joined across calls, and an exact echo does.
                received, echoed = await channel.call("echo", payload)
                max_in_flight["now"] -= 1
                assert received == len(payload)
                assert echoed == payload
                checked["count"] += 1
                checked["bytes"] += len(payload)

        start = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(IN_FLIGHT)))
        elapsed = time.perf_counter() - start
        assert checked == {"count": MESSAGES, "bytes": sum(plan)}
        assert max_in_flight["max"] == IN_FLIGHT
        assert await channel.call("summary") == [MESSAGES, sum(plan)]
        await channel.close()
        print(
            f"\n{MESSAGES} round trips, {2 * sum(plan) / 1e6:.0f} MB both ways, "
            f"{elapsed:.1f} s, {2 * sum(plan) / 1e6 / elapsed:.0f} MB/s"
        )
    finally:
        try:  # the server exits once its one connection ends
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
