"""A minimal client for the plain service wire (tests, benchmarks, ``hermetic up``).

It speaks to an enclave's service port directly over vsock, or through the parent's
proxy over TCP. The attested Noise client lives in the channel component.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

from hermetic.enclave import wire
from hermetic.errors import PeerUnavailableError, ServiceError
from hermetic.transport import vsock
from hermetic.transport.frames import read_frame, write_frame


class ServiceClient:
    """Sequential calls over one stream; ``async with`` closes it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)

    @classmethod
    async def tcp(cls, host: str, port: int, *, timeout: float = 10.0) -> ServiceClient:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as exc:
            raise PeerUnavailableError(f"tcp {host}:{port}: connect failed: {exc}") from None
        return cls(reader, writer)

    @classmethod
    async def vsock(cls, cid: int, port: int) -> ServiceClient:
        stream = await vsock.connect(cid, port)
        return cls(stream.reader, stream.writer)

    async def call(self, method: str, *args: Any) -> Any:
        """Call ``method``; return its result or raise :class:`ServiceError` with its code."""
        request = wire.ServiceRequest(next(self._ids), method, args)
        await write_frame(self._writer, wire.encode_request(request))
        frame = await read_frame(self._reader)
        if frame is None:
            raise PeerUnavailableError(f"service closed the connection during {method!r}")
        response = wire.decode_response(frame)
        if not response.ok:
            raise ServiceError(
                f"{method}: {response.error_message}", code=response.error_code or "Unknown"
            )
        if response.id != request.id:
            raise PeerUnavailableError(f"response id: expected {request.id}, got {response.id}")
        return response.result

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
