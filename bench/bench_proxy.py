"""Proxy overhead: client -> TCP -> proxy -> emulated vsock -> service, vs a direct Unix socket.

Three processes, as in production: the service (a byte echo served both on an emulated
vsock port and on a plain Unix socket), the proxy (``hermetic proxy``), and this client.
The proxy is blind (it relays the attested channel's ciphertext without looking at it), so
raw bytes measure exactly its hop; the Noise session's own cost is bench_channel's. Both
paths are measured in the same run:

* throughput: 64 KiB blocks echoed, 16 in flight, MiB/s of payload sent;
* latency: p50 of sequential small round trips.

The machine is shared (and has few cores), so the two paths are never measured at
different times: both connections stay open for the whole run, latency samples alternate
direct and proxied in batches of 20 round trips (the order flipping every batch), and
throughput alternates short bursts of each path over many rounds. The table reports the p50 of all
round trips and the median of the per-round throughput figures; the throughput ratio is
the median of the per-round ratios.

Where the machine has two or more CPUs, the service and this client are pinned to two
different ones (the same for both paths, as they are the same processes for both); the
proxy is left to the scheduler, as on a parent instance it shares CPUs with whatever runs
there. Left to itself the scheduler sometimes puts client and service on one CPU, where a
round trip costs no cross-CPU wake-up, and sometimes not, so the direct figure flipped
between two values (here ~30 and ~110 us) from run to run; a client and an enclave never
share a CPU in production, and pinned, each run sees the same layout. (Pinning the proxy
too, beside the service, made the service's CPU carry both of them in bulk transfers.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.report import Goal, print_goals, print_table

MESSAGE = 64 * 1024
IN_FLIGHT = 16
THROUGHPUT_SECONDS = 0.25
LATENCY_CALLS = 200
LATENCY_BATCH = 20
ROUNDS = 10

SERVICE = r"""
import asyncio, os, sys
from hermetic.peercred import ProcessIdentity
from hermetic.transport import vsock
async def echo(reader, writer):
    while data := await reader.read(256 * 1024):
        writer.write(data)
        await writer.drain()
    writer.close()
async def main():
    block = bytearray(16 << 20)  # the allocator state of the runner (bench.report.settle_allocator)
    del block
    # This process plays enclave 16: the proxy checks who listens on its port.
    vsock.publish_identity(vsock.emulation_root(), 16, ProcessIdentity.of_process(os.getpid()))
    await vsock.listen(16, 5000, lambda s: echo(s.reader, s.writer))
    await asyncio.start_unix_server(echo, path=sys.argv[1])
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def _throughput(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    block = os.urandom(MESSAGE)
    sent = 0
    start = time.perf_counter()
    for _ in range(IN_FLIGHT):
        writer.write(block)
    outstanding = IN_FLIGHT
    while True:
        reply = await reader.readexactly(MESSAGE)
        assert reply == block
        sent += MESSAGE
        outstanding -= 1
        if time.perf_counter() - start < THROUGHPUT_SECONDS:
            writer.write(block)
            outstanding += 1
        elif outstanding == 0:
            break
    return sent / (time.perf_counter() - start) / (1024 * 1024)


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _round_trip(stream: Stream, message: bytes) -> float:
    reader, writer = stream
    start = time.perf_counter()
    writer.write(message)
    assert await reader.readexactly(len(message)) == message
    return time.perf_counter() - start


async def _latency(direct: Stream, proxied: Stream) -> tuple[list[float], list[float]]:
    """Round trips (s) on both paths, in alternating batches, each path first in turn."""
    samples: tuple[list[float], list[float]] = ([], [])
    for batch in range(LATENCY_CALLS // LATENCY_BATCH):
        for path in (0, 1) if batch % 2 else (1, 0):
            for i in range(LATENCY_BATCH):
                message = i.to_bytes(16, "big")
                samples[path].append(await _round_trip((direct, proxied)[path], message))
    return samples


async def _measure(
    open_direct: Callable[[], Awaitable[Stream]], open_proxied: Callable[[], Awaitable[Stream]]
) -> tuple[list[tuple[float, float]], tuple[list[float], list[float]]]:
    direct, proxied = await open_direct(), await open_proxied()
    await _latency(direct, proxied)  # warm up both paths
    latency: tuple[list[float], list[float]] = ([], [])
    rounds = []
    for round_ in range(ROUNDS):
        if round_ % 2:
            proxied_rate = await _throughput(*proxied)
            direct_rate = await _throughput(*direct)
        else:
            direct_rate = await _throughput(*direct)
            proxied_rate = await _throughput(*proxied)
        rounds.append((direct_rate, proxied_rate))
        direct_rtt, proxied_rtt = await _latency(direct, proxied)
        latency[0].extend(direct_rtt)
        latency[1].extend(proxied_rtt)
    for _, writer in (direct, proxied):
        writer.close()
    return rounds, latency


@contextmanager
def _pinned(service: int) -> Iterator[str]:
    """Pin the service and this client to two CPUs as the module docstring says (Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        yield "not pinned (no sched_setaffinity here)"
        return
    own = os.sched_getaffinity(0)
    cpus = sorted(own)
    if len(cpus) < 2:
        yield "not pinned (one CPU)"
        return
    for thread in os.listdir(f"/proc/{service}/task"):  # every thread the service has
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(thread), {cpus[0]})
    os.sched_setaffinity(0, {cpus[1]})
    try:
        yield f"service on {cpus[0]}, client on {cpus[1]}, proxy unpinned"
    finally:
        os.sched_setaffinity(0, own)


def main() -> list[Goal]:
    with tempfile.TemporaryDirectory(prefix="hbp") as tmp:
        env = {**os.environ, "HERMETIC_STATE_DIR": tmp, "HERMETIC_VSOCK": "emulated"}
        direct_path = str(Path(tmp) / "direct.sock")
        service = subprocess.Popen(
            [sys.executable, "-c", SERVICE, direct_path], env=env, stdout=subprocess.PIPE, text=True
        )
        proxy = None
        try:
            assert service.stdout is not None
            assert service.stdout.readline().strip() == "ready"
            proxy = subprocess.Popen(
                [sys.executable, "-m", "hermetic", "proxy", "--cid", "16", "--port", "5000",
                 "--listen", "127.0.0.1:0"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            assert proxy.stdout is not None
            text = ""
            while True:
                text += proxy.stdout.readline()
                try:
                    address = json.loads(text)["tcp"]
                    break
                except ValueError:
                    continue
            host, port = address.rsplit(":", 1)
            with _pinned(service.pid) as layout:
                rounds, latency = asyncio.run(
                    _measure(
                        lambda: asyncio.open_unix_connection(direct_path),
                        lambda: asyncio.open_connection(host, int(port)),
                    )
                )
        finally:
            for process in (proxy, service):
                if process is not None:
                    process.terminate()
                    process.wait(10)
    med = statistics.median
    direct = (med(d for d, _ in rounds), med(latency[0]) * 1e6)
    proxied = (med(p for _, p in rounds), med(latency[1]) * 1e6)
    throughput_ratio = med(p / d for d, p in rounds)
    latency_ratio = proxied[1] / direct[1]
    print(f"CPUs: {layout}")
    print_table(
        ["path", "64 KiB echo MiB/s", "p50 round trip us"],
        [
            ["direct Unix socket", direct[0], direct[1]],
            ["TCP -> proxy -> vsock emulation", proxied[0], proxied[1]],
            ["ratio", throughput_ratio, latency_ratio],
        ],
    )
    goals = [
        Goal("proxied / direct throughput", throughput_ratio, ">=", 0.5),
        Goal("proxied / direct round trip, p50", latency_ratio, "<=", 2.0),
    ]
    print_goals(goals)
    return goals
