"""Event ingestion: the parent-side endpoint member devices upload sealed batches through.

``PUT /v1/ingest/{tenant}/{batch id as 32 lowercase hex digits}``, body = one sealed batch
(:mod:`hermetic.reporting.format`). The endpoint runs on the untrusted parent and never
holds a key, so it checks only what a batch shows in clear: its header (magic, schema
version, tenant, batch id) must be well formed, name the tenant and batch id of the URL,
and the batch must fit the size limit. It then stores the bytes in the parent's record
store under ``batches/{tenant}/{batch id hex}`` (:func:`record_id`), create-only:

* ``201`` ``{tenant, batch_id, record_id, size, sha256, created: true}``: stored;
* ``200`` the same with ``created: false``: that batch id already holds these very bytes
  (a device retrying an upload whose answer it lost);
* ``409`` ``BatchConflictError``: that batch id already holds other bytes. A first upload
  wins and is never replaced, whatever the second one holds;
* ``400`` the header does not parse (``BatchFormatError``, ``BatchSchemaError``), names
  another tenant or batch id than the URL (``BatchTenantError``, ``BatchIdError``), or the
  URL's tenant or id is malformed (``ReportingUsageError``);
* ``413`` ``BatchTooLargeError``: over the limit (declared or streamed);
* ``503`` the record store failed or is unreachable.

Every refusal is ``{"error": <type>, "message": <what was wrong>}``, the record store's
shape. Nothing here authenticates devices: a forged or foreign batch stored here fails
AES-GCM in the reporting enclave and is rejected and counted there; what the endpoint can
refuse early, it refuses. A separate process in front of ``hermetic store serve`` rather
than a route of it: the store is the base layer and must not import the reporting format
(``tests/test_layering.py``), and the record store keeps its one generic API.

:class:`IngestService` writes through anything with the record store's ``put``/``get``
(a :class:`~hermetic.store.records.RecordStore` on a database, or a
:class:`~hermetic.store.client.RecordStoreClient` to a running store server).
:func:`upload_batches` is the device side.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hermetic import jsontext
from hermetic.errors import (
    BatchConflictError,
    BatchError,
    BatchFormatError,
    BatchIdError,
    BatchSchemaError,
    BatchTenantError,
    BatchTooLargeError,
    HermeticError,
    IngestServiceError,
    RecordNotFoundError,
    RecordTooLargeError,
    ReportingUsageError,
    UsageError,
    VersionConflictError,
)
from hermetic.reporting.aggregate import SealedBatch
from hermetic.reporting.format import BATCH_ID_SIZE, SealedHeader, check_tenant, read_header
from hermetic.store.records import MAX_RECORD_SIZE, Record
from hermetic.store.web import error_response, read_body, serve_app

__all__ = [
    "BATCH_PREFIX",
    "MAX_UPLOAD_SIZE",
    "IngestClient",
    "IngestService",
    "UploadResult",
    "UploadSummary",
    "check_upload",
    "ingest",
    "parse_record_id",
    "record_id",
    "upload_batches",
]

BATCH_PREFIX = "batches/"
"""Every uploaded batch is stored under ``batches/{tenant}/{batch id hex}``."""
MAX_UPLOAD_SIZE = MAX_RECORD_SIZE
"""Largest batch accepted: the record store's record limit (1 MiB). A batch of the
generator's 500 events is a few kB; a device batches more often rather than bigger."""

_HEX_ID = re.compile(r"[0-9a-f]{32}")
_ERROR_TYPES: dict[str, type[HermeticError]] = {
    cls.__name__: cls
    for cls in (
        BatchFormatError,
        BatchSchemaError,
        BatchTenantError,
        BatchIdError,
        BatchTooLargeError,
        BatchConflictError,
        ReportingUsageError,
    )
}


class Records(Protocol):
    """What ingestion needs of the record store (``RecordStore`` or ``RecordStoreClient``)."""

    def put(self, record_id: str, data: bytes, expected_version: int | None) -> int: ...

    def get(self, record_id: str) -> Record: ...


# --- the checks (sans-IO) --------------------------------------------------------------


def record_id(tenant: str, batch_id: bytes) -> str:
    """The record id batch ``batch_id`` of ``tenant`` is stored under."""
    if len(batch_id) != BATCH_ID_SIZE:
        raise ReportingUsageError(f"batch id: expected {BATCH_ID_SIZE} bytes")
    return f"{BATCH_PREFIX}{check_tenant(tenant)}/{batch_id.hex()}"


def parse_record_id(value: str) -> tuple[str, bytes]:
    """The tenant and batch id of a record id made by :func:`record_id`."""
    head, _, rest = value.partition(BATCH_PREFIX)
    tenant, _, hex_id = rest.partition("/")
    if head or _HEX_ID.fullmatch(hex_id) is None:
        raise ReportingUsageError("record id: expected batches/<tenant>/<32 hex digits>")
    return check_tenant(tenant), bytes.fromhex(hex_id)


def parse_batch_id(text: str) -> bytes:
    """A batch id as the URL spells it: 32 lowercase hex digits (one spelling per id)."""
    if _HEX_ID.fullmatch(text) is None:
        raise ReportingUsageError(
            f"batch id: expected {2 * BATCH_ID_SIZE} lowercase hex digits, got"
            f" {len(text)} characters"
        )
    return bytes.fromhex(text)


def check_upload(
    tenant: str, batch_hex: str, body: bytes, *, max_size: int = MAX_UPLOAD_SIZE
) -> SealedHeader:
    """The header of ``body``, uploaded as batch ``batch_hex`` of ``tenant``, once every
    check that needs no key has passed (see the module docstring for the errors)."""
    try:
        check_tenant(tenant)
    except ReportingUsageError:
        raise ReportingUsageError(
            "tenant in the URL: expected 1 to 64 characters of a-z 0-9 . _ -, starting with"
            " a letter or digit"
        ) from None
    batch_id = parse_batch_id(batch_hex)
    if len(body) > max_size:
        raise BatchTooLargeError(f"batch: {len(body)} bytes, the limit is {max_size}")
    header, _ = read_header(body)
    if header.tenant != tenant:
        raise BatchTenantError(
            f"batch header names tenant {header.tenant!r}, the URL tenant {tenant!r}"
        )
    if header.batch_id != batch_id:
        raise BatchIdError(
            f"batch header names batch id {header.batch_id.hex()}, the URL {batch_hex}"
        )
    return header


@dataclass(frozen=True)
class UploadResult:
    """What the endpoint answered for one batch."""

    tenant: str
    batch_id: bytes
    record_id: str
    size: int
    sha256: str
    created: bool
    """False: the batch was already stored with these bytes."""

    def to_json(self) -> dict[str, object]:
        return {
            "tenant": self.tenant,
            "batch_id": self.batch_id.hex(),
            "record_id": self.record_id,
            "size": self.size,
            "sha256": self.sha256,
            "created": self.created,
        }


def ingest(records: Records, header: SealedHeader, body: bytes) -> UploadResult:
    """Store ``body`` (checked by :func:`check_upload`) create-only under its record id;
    the same bytes again are accepted, other bytes are a :class:`BatchConflictError`."""
    rid = record_id(header.tenant, header.batch_id)
    digest = hashlib.sha256(body).hexdigest()
    for _ in range(3):  # a concurrent delete between the put and the get: try again
        try:
            records.put(rid, body, None)
        except VersionConflictError:
            try:
                stored = records.get(rid)
            except RecordNotFoundError:
                continue
            if stored.data != body:
                raise BatchConflictError(
                    f"batch {header.batch_id.hex()} of tenant {header.tenant!r} is already"
                    " stored with other bytes; a batch id is uploaded once"
                ) from None
            return UploadResult(header.tenant, header.batch_id, rid, len(body), digest, False)
        return UploadResult(header.tenant, header.batch_id, rid, len(body), digest, True)
    raise IngestServiceError(f"record {rid}: created and deleted under us three times")


# --- the HTTP endpoint -------------------------------------------------------------------


def _status_of(exc: HermeticError) -> int:
    if isinstance(exc, BatchTooLargeError | RecordTooLargeError):
        return 413
    if isinstance(exc, BatchConflictError):
        return 409
    if isinstance(exc, BatchError | UsageError):
        return 400
    return 503


class IngestService:
    """The ingestion endpoint over one record store (see the module docstring)."""

    def __init__(self, records: Records, *, max_size: int = MAX_UPLOAD_SIZE) -> None:
        self.records = records
        self.max_size = max_size

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/v1/ingest/{tenant}/{batch_id}", self._upload, methods=["PUT"]),
            ],
            exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        )

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _upload(self, request: Request) -> Response:
        limit = self.max_size
        data = await read_body(request, limit)
        if data is None:
            return error_response(
                413, "BatchTooLargeError", f"batch: more than {limit} bytes, the limit"
            )
        try:
            header = check_upload(
                request.path_params["tenant"], request.path_params["batch_id"], data,
                max_size=limit,
            )  # fmt: skip
            result = await asyncio.to_thread(ingest, self.records, header, data)
        except HermeticError as exc:
            return error_response(_status_of(exc), type(exc).__name__, str(exc))
        return JSONResponse(result.to_json(), status_code=201 if result.created else 200)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kinds = {404: "NotFound", 405: "MethodNotAllowed"}
    response = error_response(
        exc.status_code,
        kinds.get(exc.status_code, "HTTPError"),
        f"{request.method} {request.url.path[:100]}: {exc.detail}",
    )
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _internal_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HermeticError):
        return error_response(_status_of(exc), type(exc).__name__, str(exc))
    return error_response(500, "InternalError", "the ingestion endpoint failed; see its log")


def serve(service: IngestService, sock: socket.socket) -> None:
    """Serve the endpoint on a bound socket with uvicorn until SIGINT or SIGTERM (SIGTERM
    ends the call with ``SystemExit(0)`` after the requests in flight, as the store does)."""
    serve_app(service.app(), sock)


# --- the device side ------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadSummary:
    created: int
    already_stored: int
    bytes: int


class IngestClient:
    """Uploads sealed batches to one ingestion endpoint at ``base_url`` (keep-alive)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def upload(self, sealed: bytes) -> UploadResult:
        """Upload one sealed batch under the tenant and batch id its header names."""
        header, _ = read_header(sealed)
        path = f"/v1/ingest/{header.tenant}/{header.batch_id.hex()}"
        try:
            response = self._http.put(
                path, content=bytes(sealed), headers={"Content-Type": "application/octet-stream"}
            )
        except httpx.HTTPError as exc:
            raise IngestServiceError(
                f"ingestion endpoint {self.base_url}: {type(exc).__name__}: {exc}"
            ) from None
        if response.status_code >= 400:
            raise self._error(response)
        body = jsontext.loads(response.content, what="upload answer", error=IngestServiceError)
        digest = hashlib.sha256(sealed).hexdigest()
        expected = record_id(header.tenant, header.batch_id)
        if (
            not isinstance(body, dict)
            or response.status_code not in (200, 201)
            or body.get("record_id") != expected
            or body.get("sha256") != digest
            or body.get("created") is not (response.status_code == 201)
        ):
            raise IngestServiceError(
                f"ingestion endpoint {self.base_url}: an answer that does not match the upload"
            )
        return UploadResult(
            header.tenant, header.batch_id, expected, len(sealed), digest, body["created"]
        )

    def _error(self, response: httpx.Response) -> HermeticError:
        try:
            body = jsontext.loads(response.content, what="error", error=IngestServiceError)
            kind, message = body["error"], body["message"]
            if not isinstance(kind, str) or not isinstance(message, str):
                raise TypeError
        except (IngestServiceError, KeyError, TypeError):
            return IngestServiceError(
                f"ingestion endpoint {self.base_url}: HTTP {response.status_code} without a"
                " JSON error"
            )
        cls = _ERROR_TYPES.get(kind)
        if cls is not None and response.status_code in (400, 409, 413):
            return cls(message)
        return IngestServiceError(
            f"ingestion endpoint {self.base_url}: HTTP {response.status_code} {kind}: {message}"
        )

    def health(self) -> bool:
        try:
            response = self._http.get("/health")
        except httpx.HTTPError as exc:
            raise IngestServiceError(f"ingestion endpoint {self.base_url}: {exc}") from None
        return response.status_code == 200 and response.content == b'{"status":"ok"}'

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> IngestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upload_batches(
    url: str,
    batches: Iterable[SealedBatch | bytes],
    *,
    concurrency: int = 4,
    progress: Callable[[int, int], None] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> UploadSummary:
    """Upload every batch (in order, ``concurrency`` requests in flight) to the endpoint at
    ``url``; ``progress(bytes_done, batches_done)`` after each. The first refusal raises
    its typed error; batches already uploaded stay stored (uploading again is harmless)."""
    if type(concurrency) is not int or not 1 <= concurrency <= 64:
        raise ReportingUsageError("concurrency: expected 1 to 64")
    items = [b.data if isinstance(b, SealedBatch) else b for b in batches]
    created = already = total = 0
    with IngestClient(url, transport=transport) as client:
        pool = ThreadPoolExecutor(max_workers=concurrency)
        try:
            for n, result in enumerate(pool.map(client.upload, items), 1):
                created += result.created
                already += not result.created
                total += result.size
                if progress is not None:
                    progress(total, n)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a refusal stops what is queued
    return UploadSummary(created, already, total)
