"""Serving an :class:`App` over a byte stream with the plain service wire.

This is the only place that joins the wire (``hermetic.enclave.wire``) to app dispatch.
Requests on one connection are answered in order; a malformed frame gets an error
response with ``id = null`` and the connection is closed, because after a framing error
the stream cannot be trusted to be in sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from hermetic.enclave import wire
from hermetic.enclave.app import App
from hermetic.errors import FrameFormatError, PeerUnavailableError, ServiceError
from hermetic.transport.frames import read_frame, write_frame

log = logging.getLogger(__name__)


async def handle_frame(app: App, frame: bytes) -> bytes:
    """One request frame in, one response frame out (never raises for bad input)."""
    try:
        request = wire.decode_request(frame)
    except FrameFormatError as exc:
        return wire.encode_response(wire.error_response(None, "MalformedRequest", str(exc)))
    try:
        result = await app.call(request.method, request.args)
        response = wire.ServiceResponse(request.id, True, result)
    except ServiceError as exc:
        response = wire.error_response(request.id, exc.code, str(exc))
    except TypeError as exc:
        response = wire.error_response(request.id, "InvalidArguments", str(exc))
    except Exception as exc:  # an app bug must not kill the connection
        log.warning("method %r raised %s", request.method, type(exc).__name__)
        response = wire.error_response(
            request.id, "InternalError", f"method {request.method!r} raised {type(exc).__name__}"
        )
    try:
        return wire.encode_response(response)
    except FrameFormatError as exc:
        return wire.encode_response(wire.error_response(request.id, "InternalError", str(exc)))


async def serve_stream(
    app: App, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer requests until the client closes the stream or breaks framing."""
    try:
        while True:
            try:
                frame = await read_frame(reader)
            except FrameFormatError as exc:
                error = wire.error_response(None, "MalformedFrame", str(exc))
                await write_frame(writer, wire.encode_response(error))
                return
            if frame is None:
                return
            await write_frame(writer, await handle_frame(app, frame))
    except PeerUnavailableError:
        return
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
