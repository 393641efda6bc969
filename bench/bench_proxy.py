"""Proxy overhead: client -> TCP -> proxy -> emulated vsock -> service, vs a direct Unix socket.

Three processes, as in production: the service (a byte echo served both on an emulated
vsock port and on a plain Unix socket), the proxy (``hermetic proxy``), and this client.
The proxy is blind (it relays the attested channel's ciphertext without looking at it), so
raw bytes measure exactly its hop; the Noise session's own cost is bench_channel's. Both
paths are measured in the same run:

* throughput: 64 KiB blocks echoed, 16 in flight, MiB/s of payload sent;
* latency: p50 of sequential small round trips.

The machine is shared, so the two paths are measured alternately in several rounds and
the table reports medians over rounds (ratios are medians of the per-round ratios).

Goal: proxied throughput >= 0.5x direct, proxied p50 <= 2x direct.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Goal, print_goals, print_table

MESSAGE = 64 * 1024
IN_FLIGHT = 16
THROUGHPUT_SECONDS = 0.6
LATENCY_CALLS = 500
ROUNDS = 5

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


async def _latency(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    samples = []
    for i in range(LATENCY_CALLS):
        message = i.to_bytes(16, "big")
        start = time.perf_counter()
        writer.write(message)
        assert await reader.readexactly(len(message)) == message
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


async def _measure(open_stream: object) -> tuple[float, float]:
    reader, writer = await open_stream()  # type: ignore[operator]
    throughput = await _throughput(reader, writer)
    writer.close()
    reader, writer = await open_stream()  # type: ignore[operator]
    await _latency(reader, writer)  # warm up
    latency = await _latency(reader, writer)
    writer.close()
    return throughput, latency


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
            rounds = []
            for _ in range(ROUNDS):
                direct = asyncio.run(_measure(lambda: asyncio.open_unix_connection(direct_path)))
                proxied = asyncio.run(_measure(lambda: asyncio.open_connection(host, int(port))))
                rounds.append((direct, proxied))
        finally:
            for process in (proxy, service):
                if process is not None:
                    process.terminate()
                    process.wait(10)
    med = statistics.median
    direct = (med(d[0] for d, _ in rounds), med(d[1] for d, _ in rounds))
    proxied = (med(p[0] for _, p in rounds), med(p[1] for _, p in rounds))
    throughput_ratio = med(p[0] / d[0] for d, p in rounds)
    latency_ratio = med(p[1] / d[1] for d, p in rounds)
    print_table(
        ["path", "64 KiB echo MiB/s", "p50 round trip us"],
        [
            ["direct Unix socket", direct[0], direct[1]],
            ["TCP -> proxy -> vsock emulation", proxied[0], proxied[1]],
            ["ratio (median of rounds)", throughput_ratio, latency_ratio],
        ],
    )
    goals = [
        Goal("proxied / direct throughput", throughput_ratio, ">=", 0.5),
        Goal("proxied / direct round trip, p50", latency_ratio, "<=", 2.0),
    ]
    print_goals(goals)
    return goals
