"""``hermetic wan relay``: a TCP relay shaped like a WAN link (bandwidth, round-trip time).

For the reporting benchmark: put it between the admin client and the parent, so the
client-side baseline downloads its batches over an emulated 50 Mbit/s, 40 ms link. See
:mod:`hermetic.transport.wan` for the model.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from hermetic.cli import echo_json


@click.group("wan")
def wan() -> None:
    """WAN emulation: a shaping TCP relay."""


@wan.command("relay")
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="HOST:PORT to bind.")
@click.option("--to", "target", required=True, help="HOST:PORT to relay each connection to.")
@click.option(
    "--bandwidth", default="50mbit", show_default=True, help="Per direction: 50mbit, 800kbit..."
)
@click.option("--rtt", default="40ms", show_default=True, help="Round-trip time (half each way).")
@click.option(
    "--burst", type=int, default=None, help="Token bucket depth in bytes (default 16384)."
)
def relay(listen: str, target: str, bandwidth: str, rtt: str, burst: int | None) -> None:
    """Relay TCP connections from --listen to --to, each direction shaped to the bandwidth
    and delayed by rtt/2; print the address as JSON once listening. Runs until SIGINT or
    SIGTERM."""
    from hermetic.transport.tcp import parse_hostport
    from hermetic.transport.wan import (
        DEFAULT_BURST,
        LinkShape,
        WanRelay,
        parse_bandwidth,
        parse_duration,
    )

    bind = parse_hostport(listen, field="--listen", allow_port_zero=True)
    to = parse_hostport(target, field="--to")
    shape = LinkShape.from_rtt(
        parse_bandwidth(bandwidth), parse_duration(rtt), DEFAULT_BURST if burst is None else burst
    )
    server = WanRelay((to.host, to.port), shape, listen=(bind.host, bind.port))

    async def run() -> None:
        host, port = await server.start()
        shown = f"[{host}]" if ":" in host else host
        echo_json({
            "listen": f"{shown}:{port}",
            "to": f"{to.host}:{to.port}",
            "bandwidth_bits_per_second": shape.bandwidth * 8,
            "rtt_seconds": shape.delay * 2,
            "burst_bytes": shape.burst,
        })  # fmt: skip
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await server.close()

    asyncio.run(run())
