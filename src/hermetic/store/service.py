"""The record store's HTTP API (``hermetic store serve``): a thin edge over the core.

The API, all JSON except record bodies (``application/octet-stream``):

* ``PUT /records/{id}``, body = the record's bytes, with exactly one of
  ``If-None-Match: *`` (create: the record must not exist) or ``If-Match: "<version>"``
  (update: it must be at that version). ``201`` (created) or ``200`` with
  ``{id, version, size, sha256}`` and the new version as ``ETag``; ``412`` with
  ``current_version`` when the compare-and-set fails; ``428`` when neither header is sent;
* ``GET /records/{id}``: the bytes, the version in ``ETag``; ``404`` if absent (``HEAD``
  works too);
* ``DELETE /records/{id}`` with ``If-Match: "<version>"``: ``204``, or ``412``;
* ``GET /records?prefix=P&after=ID&limit=N``: ``{records: [{id, version, size, sha256}],
  next}`` in byte order of ids; ``next`` (when not null) is the ``after`` of the next page;
* ``GET /health``: ``{"status": "ok"}``.

Ids travel percent-encoded in the path. Every refusal is ``{"error": <type>, "message":
<what was wrong>}`` with a 4xx status (bad id, version header or query: 400; body over
the limit: 413; unknown route: 404; wrong method: 405); a database failure is 503. No input
produces a 500 or a traceback.

Nothing here authenticates callers: the store holds only records sealed inside the
enclave, so what an intruder on the parent can do with it (delete, replay, roll back) is
what the persistence service detects anyway (``docs/store.md``).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hermetic.errors import (
    HermeticError,
    RecordIdError,
    RecordNotFoundError,
    RecordTooLargeError,
    RecordVersionError,
    StoreError,
    UsageError,
    VersionConflictError,
)
from hermetic.store.records import (
    MAX_LIST_LIMIT,
    RecordStore,
    check_id,
    etag,
    expected_version_from_headers,
)
from hermetic.store.web import error_response, read_body, serve_app

RECORD_TYPE = "application/octet-stream"
_LIST_PARAMS = frozenset({"prefix", "after", "limit"})


def _status_of(exc: HermeticError) -> int:
    if isinstance(exc, VersionConflictError):
        return 412
    if isinstance(exc, RecordNotFoundError):
        return 404
    if isinstance(exc, RecordTooLargeError):
        return 413
    if isinstance(exc, UsageError):
        return 400
    return 503


def _refusal(exc: HermeticError) -> Response:
    if isinstance(exc, VersionConflictError):
        return error_response(412, type(exc).__name__, str(exc), current_version=exc.current)
    return error_response(_status_of(exc), type(exc).__name__, str(exc))


class RecordService:
    """The HTTP face of one :class:`~hermetic.store.records.RecordStore`."""

    def __init__(self, store: RecordStore) -> None:
        self.store = store

    def app(self) -> Starlette:
        routes = [
            Route("/health", self._health, methods=["GET"]),
            Route("/records", self._list, methods=["GET"]),
            Route("/records/{record_id:path}", self._record, methods=["GET", "PUT", "DELETE"]),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        )

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _record(self, request: Request) -> Response:
        # One route for the three methods, so a 405 lists all of them in Allow.
        if request.method == "PUT":
            return await self._put(request)
        if request.method == "DELETE":
            return await self._delete(request)
        return await self._get(request)

    async def _get(self, request: Request) -> Response:
        try:
            record_id = check_id(request.path_params["record_id"])
            record = await asyncio.to_thread(self.store.get, record_id)
        except HermeticError as exc:
            return _refusal(exc)
        return Response(
            record.data,
            media_type=RECORD_TYPE,
            headers={"ETag": etag(record.version), "Cache-Control": "no-store"},
        )

    async def _put(self, request: Request) -> Response:
        try:
            record_id = check_id(request.path_params["record_id"])
            expected = expected_version_from_headers(
                request.headers.getlist("if-match"), request.headers.getlist("if-none-match")
            )
        except RecordVersionError as exc:
            missing = not request.headers.getlist("if-match") and not request.headers.getlist(
                "if-none-match"
            )
            return error_response(428 if missing else 400, type(exc).__name__, str(exc))
        except HermeticError as exc:
            return _refusal(exc)
        limit = self.store.max_record_size
        data = await read_body(request, limit)
        if data is None:
            return error_response(
                413, "RecordTooLargeError", f"data: expected at most {limit} bytes, got more"
            )
        try:
            version = await asyncio.to_thread(self.store.put, record_id, data, expected)
        except HermeticError as exc:
            return _refusal(exc)
        return JSONResponse(
            {"id": record_id, "version": version, "size": len(data),
             "sha256": hashlib.sha256(data).hexdigest()},
            status_code=201 if expected is None else 200,
            headers={"ETag": etag(version)},
        )  # fmt: skip

    async def _delete(self, request: Request) -> Response:
        try:
            record_id = check_id(request.path_params["record_id"])
            if request.headers.getlist("if-none-match"):
                raise RecordVersionError('a delete takes If-Match: "<version>", not If-None-Match')
            if not request.headers.getlist("if-match"):
                return error_response(
                    428, "RecordVersionError", 'a delete needs If-Match: "<version>"'
                )
            expected = expected_version_from_headers(request.headers.getlist("if-match"), [])
            assert expected is not None
            await asyncio.to_thread(self.store.delete, record_id, expected)
        except HermeticError as exc:
            return _refusal(exc)
        return Response(status_code=204)

    async def _list(self, request: Request) -> Response:
        try:
            prefix, after, limit = _list_query(request)
            page = await asyncio.to_thread(self.store.list, prefix, after=after, limit=limit)
        except HermeticError as exc:
            return _refusal(exc)
        return JSONResponse(
            {"records": [r.to_json() for r in page.records], "next": page.next_after}
        )


def _list_query(request: Request) -> tuple[str, str | None, int]:
    items = request.query_params.multi_items()
    names = [name for name, _ in items]
    unknown = sorted(set(names) - _LIST_PARAMS)
    if unknown:
        raise UsageError(f"query: expected only prefix, after and limit, got {unknown[0][:40]!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"query: {repeated[0]} given more than once")
    params = dict(items)
    raw_limit = params.get("limit", str(MAX_LIST_LIMIT))
    if not raw_limit.isascii() or not raw_limit.isdigit() or len(raw_limit) > 4:
        raise RecordIdError(f"limit: expected 1..{MAX_LIST_LIMIT}, got {raw_limit[:40]!r}")
    return params.get("prefix", ""), params.get("after"), int(raw_limit)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (unknown route, wrong method) in the API's JSON shape."""
    assert isinstance(exc, HTTPException)
    kinds = {404: "NotFound", 405: "MethodNotAllowed"}
    return error_response(
        exc.status_code,
        kinds.get(exc.status_code, "HTTPError"),
        f"{request.method} {request.url.path[:100]}: {exc.detail}",
        headers=exc.headers,  # 405 keeps its Allow header
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug must not show a traceback to the caller (the server's log has it)."""
    if isinstance(exc, StoreError):
        return _refusal(exc)
    return error_response(500, "InternalError", "the record store failed; see its log")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port), with TCP_NODELAY.

    ``socket.create_server`` makes a socket whose protocol number is 0, so asyncio does not
    recognise its connections as TCP and leaves Nagle's algorithm on: uvicorn writes an
    answer's headers and body separately, the body then waits for the client's delayed ACK,
    and every small answer on a kept-alive connection took about 40 ms instead of about 1
    (seen in bench/bench_persistence.py). Accepted connections inherit the option.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=512)
    except OSError as exc:
        raise UsageError(f"--listen: cannot bind {host}:{port}: {exc.strerror}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def address_of(sock: socket.socket) -> tuple[str, int]:
    name: Any = sock.getsockname()
    return str(name[0]), int(name[1])


def serve(service: RecordService, sock: socket.socket) -> None:
    """Serve the API on an already bound socket with uvicorn until SIGINT or SIGTERM.

    uvicorn finishes the requests in flight, then re-raises the signal it caught; SIGTERM
    then ends this call with ``SystemExit(0)`` instead of killing the process, so the
    caller's clean-up (closing the database) runs and the exit status says "stopped
    cleanly".
    """
    serve_app(service.app(), sock)
