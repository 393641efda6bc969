"""The WAN relay: its shaping schedule (exact, from the token-bucket model), and real TCP
connections through it (bytes intact and in order, half-closes carried, and never faster
than physics allows). No upper bound on any duration: a loaded machine only makes the
relay slower, never faster than the link it emulates."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from hermetic.cli import cli
from hermetic.errors import WanUsageError
from hermetic.transport.wan import (
    LinkShape,
    TokenBucket,
    WanRelay,
    parse_bandwidth,
    parse_duration,
    release_schedule,
    running_relay,
)

EARLY = 0.002
"""How much earlier than its due time asyncio may run a timer (its clock resolution and
float rounding; far below any delay tested)."""


# --- the schedule, by hand and by property --------------------------------------------------


def test_schedule_matches_the_token_bucket_by_hand() -> None:
    link = LinkShape(bandwidth=1000.0, delay=0.1, burst=100)  # 1000 B/s, 100 ms one way
    # A full bucket passes 100 bytes at once; then each 100 bytes wait 0.1 s for tokens.
    assert release_schedule(link, [100, 100, 100]) == pytest.approx([0.1, 0.2, 0.3])
    # 50 bytes leave 50 tokens; the next 100 wait for the missing 50 (0.05 s).
    assert release_schedule(link, [50, 100]) == pytest.approx([0.1, 0.15])
    # After an idle spell the bucket is full again (capped at the burst, not 5000 tokens).
    assert release_schedule(link, [100, 100, 100], [0.0, 5.0, 5.0]) == pytest.approx(
        [0.1, 5.1, 5.2]
    )
    # Half refilled: 50 tokens at 0.05 s, 50 more by 0.1 s.
    assert release_schedule(link, [100, 100], [0.0, 0.05]) == pytest.approx([0.1, 0.2])
    # A chunk that arrives after its turn leaves when it arrives.
    assert release_schedule(link, [10], [2.5]) == pytest.approx([2.6])


def test_bulk_transfer_takes_exactly_the_serialization_time() -> None:
    link = LinkShape(bandwidth=6.25e6, delay=0.02, burst=16384)  # 50 Mbit/s, 40 ms RTT
    sizes = [16384] * 64  # 1 MiB read in burst-sized chunks, all at once
    last = release_schedule(link, sizes)[-1]
    assert last == pytest.approx((sum(sizes) - link.burst) / link.bandwidth + link.delay)


@given(
    st.lists(
        st.tuples(st.integers(1, 4096), st.floats(0, 0.5, allow_nan=False)),
        min_size=1,
        max_size=60,
    ),
    st.floats(100, 1e7),
    st.floats(0, 0.2),
)
def test_schedule_properties(
    chunks: list[tuple[int, float]], bandwidth: float, delay: float
) -> None:
    link = LinkShape(bandwidth, delay, 4096)
    sizes = [size for size, _ in chunks]
    arrivals, now = [], 0.0
    for _, gap in chunks:
        now += gap
        arrivals.append(now)
    delivered = release_schedule(link, sizes, arrivals)
    slack = 1e-9 * (1 + max(delivered))
    sent = 0
    for k, (size, arrival, at) in enumerate(zip(sizes, arrivals, delivered, strict=True)):
        sent += size
        assert at >= arrival + delay - slack  # nothing arrives before it was sent, plus delay
        assert k == 0 or at >= delivered[k - 1]  # in order
        # Conservation: what has left is at most a full bucket plus what the rate refilled.
        assert sent <= link.burst + bandwidth * (at - delay) * (1 + 1e-9) + 1e-6
    # Work-conserving: a chunk waits only for its own arrival or for tokens.
    bucket = TokenBucket(link, 0.0)
    for size, arrival in zip(sizes, arrivals, strict=True):
        departs = bucket.departure(size, arrival)
        assert departs == pytest.approx(arrival, abs=slack) or bucket._tokens == 0.0


def test_parsing_and_limits() -> None:
    assert parse_bandwidth("50mbit") == 6.25e6
    assert parse_bandwidth("800kbit") == 1e5
    assert parse_bandwidth("1Gbit") == 1.25e8
    assert parse_bandwidth("9600bit") == 1200
    assert parse_duration("40ms") == pytest.approx(0.04)
    assert parse_duration("250us") == pytest.approx(0.00025)
    assert parse_duration("0") == 0
    assert parse_duration("1.5s") == 1.5
    for bad in ("50", "50mbps", "-1mbit", "0mbit", "fast"):
        with pytest.raises(WanUsageError):
            parse_bandwidth(bad)
    for bad in ("40 minutes", "-5ms", "soon"):
        with pytest.raises(WanUsageError):
            parse_duration(bad)
    with pytest.raises(WanUsageError):
        LinkShape(1000.0, 61.0)
    with pytest.raises(WanUsageError):
        LinkShape(1000.0, 0.01, burst=0)
    with pytest.raises(WanUsageError, match="chunk"):
        TokenBucket(LinkShape(1000.0, 0.01, burst=100), 0.0).departure(101, 0.0)


# --- real connections ------------------------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()  # EOF seen: everything echoed, then close


async def _transfer(address: tuple[str, int], payload: bytes) -> tuple[bytes, float]:
    """Send ``payload``, half-close, read the echo until EOF; the bytes and the seconds."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection(*address)

    async def send() -> None:
        for offset in range(0, len(payload), 50000):
            writer.write(payload[offset : offset + 50000])
            await writer.drain()
        writer.write_eof()

    sending = asyncio.create_task(send())
    received = await reader.read(-1)  # until EOF: the relay carried the echo server's close
    elapsed = time.monotonic() - start
    await sending
    writer.close()
    return received, elapsed


async def test_bytes_arrive_intact_in_order_and_no_faster_than_the_link() -> None:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    target = echo.sockets[0].getsockname()[:2]
    link = LinkShape.from_rtt(parse_bandwidth("32mbit"), parse_duration("30ms"))
    payload = os.urandom(1 << 20)
    async with WanRelay(target, link) as relay, echo:
        received, elapsed = await _transfer(relay.address, payload)
    assert received == payload
    # Up through the bucket and the delay, and the last byte back down the same way.
    bound = (len(payload) - link.burst) / link.bandwidth + 2 * link.delay
    assert elapsed >= bound - EARLY, (elapsed, bound)


async def test_each_exchange_costs_a_round_trip() -> None:
    async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(b"pong " + line)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(ping, "127.0.0.1", 0)
    link = LinkShape.from_rtt(parse_bandwidth("100mbit"), parse_duration("20ms"))
    async with WanRelay(server.sockets[0].getsockname()[:2], link) as relay, server:
        reader, writer = await asyncio.open_connection(*relay.address)
        start = time.monotonic()
        for n in range(5):
            writer.write(b"%d\n" % n)
            await writer.drain()
            assert await reader.readline() == b"pong %d\n" % n
        elapsed = time.monotonic() - start
        writer.close()
    assert elapsed >= 5 * 2 * link.delay - EARLY, elapsed


async def test_connections_are_independent_and_shaped_apart() -> None:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    link = LinkShape.from_rtt(parse_bandwidth("40mbit"), parse_duration("10ms"))
    payloads = [os.urandom(200_000 + n) for n in range(4)]
    async with WanRelay(echo.sockets[0].getsockname()[:2], link) as relay, echo:
        results = await asyncio.gather(*(_transfer(relay.address, p) for p in payloads))
        assert relay.connections == 4
    assert [r for r, _ in results] == payloads


async def test_unreachable_target_closes_the_client_and_the_relay_keeps_serving() -> None:
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[:2]
    link = LinkShape.from_rtt(parse_bandwidth("10mbit"), 0.0)
    async with WanRelay(dead, link) as relay:
        for _ in range(2):
            reader, writer = await asyncio.open_connection(*relay.address)
            assert await reader.read(-1) == b""
            writer.close()
        assert relay.connections == 2


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[:2]  # type: ignore[misc]
    server.shutdown()
    server.server_close()


def _sync_transfer(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=60) as conn:
        sender = threading.Thread(
            target=lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR))
        )
        sender.start()
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        sender.join()
    return b"".join(chunks)


def test_running_relay_serves_synchronous_callers(echo_server: tuple[str, int]) -> None:
    payload = os.urandom(300_000)
    link = LinkShape.from_rtt(parse_bandwidth("50mbit"), parse_duration("10ms"))
    with running_relay(echo_server, link) as relay:
        assert _sync_transfer(relay.address, payload) == payload


def test_cli_relay(echo_server: tuple[str, int]) -> None:
    host, port = echo_server
    proc = subprocess.Popen(
        [sys.executable, "-m", "hermetic", "wan", "relay", "--listen", "127.0.0.1:0",
         "--to", f"{host}:{port}", "--bandwidth", "20mbit", "--rtt", "10ms"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or lines[-1] != "}\n":
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            lines.append(line)
        announced = json.loads("".join(lines))
        assert announced["bandwidth_bits_per_second"] == 20e6
        assert announced["rtt_seconds"] == pytest.approx(0.01)
        relay_host, _, relay_port = announced["listen"].rpartition(":")
        payload = os.urandom(200_000)
        assert _sync_transfer((relay_host, int(relay_port)), payload) == payload
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0
    assert proc.stderr is not None
    assert "Traceback" not in proc.stderr.read()


def test_cli_registered_and_refuses_bad_values() -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["wan", "relay", "--help"]).exit_code == 0
    from helpers import hermetic

    done = hermetic("wan", "relay", "--to", "127.0.0.1:9", "--rtt", "forever")
    assert done.returncode == 2
    assert "WanUsageError" in done.stderr
