"""An independent client, written from docs/protocol.md with dissononce only, talks to our server.

Nothing from hermetic.channel is used on the client side: the Noise state machine is
dissononce's, and the prologue, framing, chunk header, evidence position and RPC shapes are
typed in from the document. If the document or the server drift apart, this fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import cbor2

from dissononce_client import DocClient
from hermetic.channel import aio
from hermetic.channel.noise import StaticKeypair
from hermetic.errors import HermeticError

SERVER_KEY = StaticKeypair.generate()
REKEY_INTERVAL = 2  # small, so the three calls below cross several rekeys each way


def make_evidence(handshake_hash: bytes, static_public: bytes) -> bytes:
    return cbor2.dumps({"nonce": handshake_hash, "public_key": static_public})


async def echo(args: Any) -> Any:
    return args


async def test_independent_dissononce_client_handshakes_verifies_evidence_and_calls() -> None:
    failures: list[BaseException] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await aio.serve_connection(
                reader,
                writer,
                make_evidence,
                {"echo": echo},
                static=SERVER_KEY,
                rekey_interval=REKEY_INTERVAL,
            )
        except HermeticError as exc:
            failures.append(exc)

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = DocClient(
            *await asyncio.open_connection("127.0.0.1", port), rekey_interval=REKEY_INTERVAL
        )
        handshake_hash, server_static = await client.handshake()
        assert server_static == SERVER_KEY.public

        # §3: the first transport message is the evidence, bound to h and the static key.
        bundle = cbor2.loads(await client.read_message())
        assert bundle == {"nonce": handshake_hash, "public_key": server_static}

        # §5: RPC request / result, ids chosen by the client.
        for ident, arg in enumerate([b"abc", {"k": [1, 2]}, "third call after rekeys"]):
            await client.send_message(cbor2.dumps([0, ident, "echo", arg]))
            assert cbor2.loads(await client.read_message()) == [1, ident, arg]
        assert client.sent == 3
        assert client.received == 4  # crossed two rekeys inbound, one outbound

        # §4: close chunk, then the server ends the connection cleanly.
        await client.close("bye")
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
    assert failures == []
