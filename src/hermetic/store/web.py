"""What the storage layer's HTTP servers share: the refusal shape and a bounded body read.

The record store, the log and the ingestion endpoint each take bodies from untrusted
callers and refuse in one JSON shape; these two helpers are that once, so a fix (a limit,
a header) reaches all three.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response

__all__ = ["error_response", "read_body"]


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
