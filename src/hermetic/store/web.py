"""What the storage layer's HTTP servers share: the refusal shape and a bounded body read.

The record store, the log and the ingestion endpoint each take bodies from untrusted
callers and refuse in one JSON shape; these two helpers are that once, so a fix (a limit,
a header) reaches all three.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["error_response", "read_body", "serve_app"]


def error_response(
    status: int,
    kind: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> Response:
    """The one shape every refusal has: ``{"error": kind, "message": message, ...}``."""
    body: dict[str, object] = {"error": kind, "message": message, **extra}
    return Response(
        json.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request's body, or ``None`` once it is known to exceed ``limit`` bytes: from a
    ``Content-Length`` that says so (nothing is read) or while streaming (reading stops at
    the first chunk past the limit), so a caller never holds more than about ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def serve_app(app: Starlette, sock: socket.socket) -> None:
    """Serve ``app`` on a bound socket with uvicorn until SIGINT or SIGTERM. uvicorn
    finishes the requests in flight, then re-raises the signal it caught; SIGTERM then ends
    this call with ``SystemExit(0)`` instead of killing the process, so the caller's
    clean-up (closing a database) runs and the exit status says "stopped cleanly"."""
    import signal

    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")

    def stopped(signum: int, frame: object) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
