"""Emulated NSM: cost of one attestation, in process and through the launcher's socket.

Every attested session asks the NSM for a fresh document (nonce = handshake hash), so the
emulator must not be the slow part of a handshake. Goal: a warm attestation (leaf reused,
as on hardware) through the Unix socket in under 10 ms at the median; the in-process
figure is the peer that shows what the socket costs.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from pathlib import Path

from bench.report import Goal, p50, print_goals, print_table, temporary_state_dir, time_per_call

LIMIT_MS = 10.0


def main() -> list[Goal]:
    with temporary_state_dir() as state:
        from hermetic.nsm import EmulatedNSM, NSMClient, SocketBackend, start_server

        module = EmulatedNSM(now=datetime.now(UTC))
        local = NSMClient(module)
        local.attest()  # issue the chain and the leaf once, like a booted enclave
        in_process = p50(time_per_call(lambda: local.attest(nonce=b"n" * 32)))
        random_local = p50(time_per_call(local.get_random))

        path = Path(state) / "nsm.sock"
        ready = threading.Event()
        control: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}

        async def serve() -> None:
            stop = asyncio.Event()
            control["stop"] = (asyncio.get_running_loop(), stop)
            server = await start_server(module, path)
            ready.set()
            await stop.wait()
            server.close()
            await server.wait_closed()

        thread = threading.Thread(target=lambda: asyncio.run(serve()))
        thread.start()
        ready.wait(10)
        with NSMClient(SocketBackend(path)) as remote:
            socket_attest = p50(time_per_call(lambda: remote.attest(nonce=b"n" * 32)))
            socket_random = p50(time_per_call(remote.get_random))
        loop, stop = control["stop"]
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)

    ms = 1000.0
    print_table(
        ["operation", "in-process p50 (ms)", "unix socket p50 (ms)", "limit (ms)"],
        [
            ["Attestation (32-byte nonce)", in_process * ms, socket_attest * ms, LIMIT_MS],
            ["GetRandom", random_local * ms, socket_random * ms, "-"],
        ],
    )
    goals = [Goal("attestation through the Unix socket, p50", socket_attest * ms, "<", LIMIT_MS,
                  "ms")]  # fmt: skip
    print_goals(goals)
    return goals
