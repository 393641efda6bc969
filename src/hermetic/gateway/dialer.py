"""How the gateway reaches backend enclaves: through the parent, which it does not trust.

An enclave reaches nothing but its parent (vsock CID 3). Backend enclaves on the same host
listen on their own vsock ports, which only the parent can connect to, so the parent runs
a small relay, the **backend dialer** (:class:`BackendDialer`, started by ``hermetic
gateway up``): a TCP listener the gateway reaches through its proxy's egress (the dialer's
address is the one egress destination the gateway's proxy allows). The gateway sends the
egress header's line format (:mod:`hermetic.transport.egress`) with the backend's CID as
the host, ``CONNECT 17:5001\\n``; the dialer answers ``OK\\n`` and relays bytes to vsock
``(17, 5001)``, or ``ERR reason\\n``.

The dialer is as untrusted as the rest of the parent: it could connect the gateway to any
enclave, or to a process of its own. That is the "wrong CID" attack, and the gateway's
attestation of whatever answers (:mod:`hermetic.gateway.backends`) is what defeats it; the
dialer only ever relays Noise ciphertext. It accepts enclave CIDs only (16 and up), so it
is no way into the parent's own vsock endpoints.

``tcp://HOST:PORT`` hints (a backend behind its own proxy) go straight through the egress
and need the address on the gateway's egress allowlist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from hermetic.channel import aio
from hermetic.enclave.egress import open_egress
from hermetic.errors import (
    BackendUnavailableError,
    FrameFormatError,
    HermeticError,
    PeerUnavailableError,
)
from hermetic.gateway.backends import BackendHint, Dial
from hermetic.proxy.splice import detach_stream, splice_sockets
from hermetic.transport import egress, vsock
from hermetic.transport.tcp import HostPort

log = logging.getLogger("hermetic.gateway.dialer")
HEADER_TIMEOUT = 10.0


def egress_dial(dialer: HostPort | None, *, timeout: float = 10.0) -> Dial:
    """The gateway's :data:`~hermetic.gateway.backends.Dial` inside the enclave."""

    async def dial(hint: BackendHint) -> aio.MessagePipe:
        if hint.scheme == "tcp":
            reader, writer = await open_egress(hint.host, hint.port, timeout=timeout)
            return aio.StreamPipe(reader, writer)
        if dialer is None:
            raise BackendUnavailableError(
                f"{hint.address}: vsock hints need the parent's backend dialer, and the"
                " config names none (gateway.dialer)"
            )
        reader, writer = await open_egress(dialer.host, dialer.port, timeout=timeout)
        try:
            writer.write(egress.encode_connect(HostPort(hint.host, hint.port)))
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), timeout)
            error = egress.decode_reply(line)
        except (TimeoutError, ConnectionError, OSError, FrameFormatError) as exc:
            writer.close()
            raise PeerUnavailableError(
                f"{hint.address}: no answer from the backend dialer ({type(exc).__name__})"
            ) from None
        if error is not None:
            writer.close()
            raise PeerUnavailableError(f"{hint.address}: the backend dialer refused: {error}")
        return aio.StreamPipe(reader, writer)

    return dial


class BackendDialer:
    """The parent-side relay from the gateway's egress to backends' vsock ports."""

    def __init__(self, listen: HostPort) -> None:
        self.listen = listen
        self.address: HostPort | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.relayed = 0
        self.refused = 0

    async def start(self) -> BackendDialer:
        self._server = await asyncio.start_server(
            self._on_client, self.listen.host, self.listen.port
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = HostPort(host, port)
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> BackendDialer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.serve(reader, writer)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one gateway connection (header, then the relay) and close it. Also the
        proxy's in-process handler for the dialer's address (``ProxyOptions.egress_local``),
        which saves the TCP hop and a relay between the egress and this dialer."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), HEADER_TIMEOUT)
            target = egress.decode_connect(line)
            if not target.host.isdigit() or int(target.host) < vsock.FIRST_ENCLAVE_CID:
                raise FrameFormatError(
                    f"dialer: expected an enclave CID >= {vsock.FIRST_ENCLAVE_CID} as the host,"
                    f" got {target.host!r:.40}"
                )
        except (TimeoutError, ConnectionError, FrameFormatError) as exc:
            self.refused += 1
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(egress.encode_reply(str(exc) or type(exc).__name__))
                await writer.drain()
            return
        cid = int(target.host)
        try:
            backend = await vsock.connect_socket(cid, target.port, timeout=HEADER_TIMEOUT)
        except (HermeticError, OSError) as exc:
            self.refused += 1
            log.info("dialer: vsock %s:%s unreachable: %s", cid, target.port, exc)
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(egress.encode_reply(f"vsock {cid}:{target.port} unreachable"))
                await writer.drain()
            return
        self.relayed += 1
        try:
            writer.write(egress.encode_reply(None))
            gateway, early = await detach_stream(reader, writer)
        except (ConnectionError, OSError):
            backend.close()
            return
        try:
            if early:  # the gateway waits for OK, but bytes sent before it go on first
                await asyncio.get_running_loop().sock_sendall(backend, early)
        except (ConnectionError, OSError):
            gateway.close()
            backend.close()
            return
        await splice_sockets(gateway, backend)
