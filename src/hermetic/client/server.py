"""The service side of the attested session, for the enclave runtime and for tests.

The runtime accepts a stream per client (vsock from the proxy, or TCP/Unix in development)
and hands it to :func:`serve_attested` with the enclave's evidence provider (one fresh NSM
document per handshake, see :func:`hermetic.evidence.make_evidence_provider`) and its RPC
handlers. That is the whole integration: the Noise handshake, the evidence message, the
evidence gate and the RPC loop are :mod:`hermetic.channel`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from hermetic.channel import aio
from hermetic.channel.noise import NX, StaticKeypair
from hermetic.channel.session import MakeEvidence, VerifyEvidence
from hermetic.errors import HermeticError

log = logging.getLogger("hermetic.client.server")

Dispatch = Callable[[str, tuple[Any, ...]], Awaitable[Any]]
"""``call(method, positional_args)``, e.g. ``hermetic.enclave.App.call``."""


async def serve_attested(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    evidence_provider: MakeEvidence,
    handlers: Mapping[str, aio.Handler],
    *,
    static: StaticKeypair | None = None,
    protocol_name: str = NX,
    verify_peer: VerifyEvidence | None = None,
    handshake_timeout: float | None = aio.DEFAULT_HANDSHAKE_TIMEOUT,
    raise_errors: bool = False,
) -> None:
    """Serve one client connection: handshake, our evidence, then RPC until it leaves.

    ``static`` is the service's Noise key (keep one per enclave boot; a fresh one per
    connection when omitted, which is as secure since each document vouches for its key).
    A session error is logged (never with secrets) and swallowed unless ``raise_errors``,
    so this can be a per-connection callback as it is.
    """
    key = static if static is not None else StaticKeypair.generate()
    try:
        await aio.serve_connection(
            reader,
            writer,
            evidence_provider,
            handlers,
            static=key,
            protocol_name=protocol_name,
            verify_evidence=verify_peer,
            handshake_timeout=handshake_timeout,
        )
    except HermeticError as exc:
        log.info("attested session ended: %s: %s", type(exc).__name__, exc)
        if raise_errors:
            raise
    finally:
        writer.close()


async def serve_attested_websocket(
    websocket: Any,
    evidence_provider: MakeEvidence,
    handlers: Mapping[str, aio.Handler],
    *,
    static: StaticKeypair | None = None,
    protocol_name: str = NX,
    raise_errors: bool = False,
) -> None:
    """:func:`serve_attested` for a ``websockets`` server connection (browser clients)."""
    key = static if static is not None else StaticKeypair.generate()
    try:
        await aio.serve_websocket(
            websocket, evidence_provider, handlers, static=key, protocol_name=protocol_name
        )
    except HermeticError as exc:
        log.info("attested websocket session ended: %s: %s", type(exc).__name__, exc)
        if raise_errors:
            raise


def dispatch_handlers(call: Dispatch, methods: Iterable[str]) -> dict[str, aio.Handler]:
    """RPC handlers for an app-style dispatcher: the RPC ``args`` become its one argument.

    ``dispatch_handlers(app.call, app.methods)`` serves a :class:`hermetic.enclave.App`
    (``hermetic connect ... --call echo --json-args '"hi"'`` calls ``echo("hi")``).
    """

    def handler(name: str) -> aio.Handler:
        async def run(args: Any) -> Any:
            return await call(name, (args,))

        return run

    return {name: handler(name) for name in methods}


async def start_tcp_server(
    host: str,
    port: int,
    evidence_provider: MakeEvidence,
    handlers: Mapping[str, aio.Handler],
    *,
    static: StaticKeypair | None = None,
) -> asyncio.Server:
    """An asyncio TCP server answering every connection with :func:`serve_attested`."""
    key = static if static is not None else StaticKeypair.generate()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_attested(reader, writer, evidence_provider, handlers, static=key)

    return await asyncio.start_server(on_client, host, port)
