"""The TCP ingress relay at the protocol level (callbacks, no coroutine per chunk).

Every request crosses the proxy twice, so each hop's cost is paid twice per round trip;
asyncio protocols forward bytes straight from ``data_received`` to the other transport,
with flow control in both directions (``pause_writing`` on one side pauses reading on the
other).

The relay is blind: what crosses it is the attested channel's Noise ciphertext (2-byte
length-prefixed messages), which the parent can neither read nor forge. So it follows no
frame boundaries and never writes a byte of its own: when the enclave is unreachable or
goes away, the client's connection is simply closed, and the client's channel reports a
closed session (an untrusted parent has nothing to say that the client should believe).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hermetic.errors import PeerUnavailableError
from hermetic.proxy.metrics import ProxyMetrics


class _Side(asyncio.Protocol):
    """One end of the relay: what it receives is forwarded to the other end's transport."""

    def __init__(self, relay: IngressRelay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.relay.forward(self.name, data)

    def eof_received(self) -> bool:
        return self.relay.half_closed(self.name)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.ended(self.name)

    def pause_writing(self) -> None:
        self.relay.pause(self.name)

    def resume_writing(self) -> None:
        self.relay.resume(self.name)


class IngressRelay:
    """Relay one client connection to the enclave's service port, byte for byte."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics
        self.client = _Side(self, "client")
        self.enclave = _Side(self, "enclave")
        self.client_finished = False
        self.done = asyncio.get_running_loop().create_future()
        self._to_enclave = metrics.bytes.labels("to_enclave")
        self._from_enclave = metrics.bytes.labels("from_enclave")

    def forward(self, source: str, data: bytes) -> None:
        if source == "client":
            self._to_enclave.inc(len(data))
            if self.enclave.transport is not None:
                self.enclave.transport.write(data)
        else:
            self._from_enclave.inc(len(data))
            if self.client.transport is not None:
                self.client.transport.write(data)

    def pause(self, side: str) -> None:
        other = self.enclave if side == "client" else self.client
        if other.transport is not None:
            other.transport.pause_reading()

    def resume(self, side: str) -> None:
        other = self.enclave if side == "client" else self.client
        if other.transport is not None and not other.transport.is_closing():
            other.transport.resume_reading()

    def half_closed(self, side: str) -> bool:
        """A client that has sent everything still gets its answers: pass the EOF on."""
        enclave = self.enclave.transport
        if side == "client" and enclave is not None and enclave.can_write_eof():
            self.client_finished = True
            enclave.write_eof()
            return True  # keep the client transport open for the replies
        self.ended(side)
        return False

    def ended(self, side: str) -> None:
        if self.done.done():
            return
        client, enclave = self.client.transport, self.enclave.transport
        if side == "enclave" and not self.client_finished:
            self.metrics.enclave_errors.inc()  # the enclave went away under a client
        for transport in (client, enclave):
            if transport is not None and not transport.is_closing():
                transport.close()  # close() flushes what is buffered, then sends FIN
        self.done.set_result(None)

    def close(self) -> None:
        for side in (self.client, self.enclave):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    async def attach_enclave(self, connect: Callable[[], Awaitable[object]]) -> None:
        """Connect the enclave side, or close the client's connection cleanly."""
        assert self.client.transport is not None
        self.client.transport.pause_reading()
        try:
            await connect()
        except PeerUnavailableError:
            self.metrics.enclave_errors.inc()
            self.client.transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        if self.client.transport.is_closing():
            self.ended("client")
        else:
            self.client.transport.resume_reading()
