"""A client for the record store's HTTP API (:mod:`hermetic.store.service`).

Enclave services reach the parent's record store through the proxy's egress; they build
this client with an ``httpx`` transport that tunnels there (``transport=``), and get the
same typed errors the core raises: :class:`~hermetic.errors.VersionConflictError` with the
current version, :class:`~hermetic.errors.RecordNotFoundError`, and so on. Ids, data and
versions are checked here first with the core's own checks, so a bad value never leaves
the caller; an answer that is not in the documented form is a
:class:`~hermetic.errors.RecordResponseFormatError`, and an unreachable or failing server
a :class:`~hermetic.errors.RecordServiceError`.

The client trusts the store with nothing but availability: what it reads back is sealed,
and the persistence service verifies it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

from hermetic import jsontext
from hermetic.errors import (
    HermeticError,
    RecordIdError,
    RecordNotFoundError,
    RecordResponseFormatError,
    RecordServiceError,
    RecordTooLargeError,
    RecordVersionError,
    VersionConflictError,
)
from hermetic.store.records import (
    MAX_LIST_LIMIT,
    MAX_RECORD_SIZE,
    Record,
    RecordInfo,
    RecordPage,
    check_data,
    check_expected_version,
    check_id,
    check_prefix,
    etag,
    version_from_etag,
)

__all__ = ["RecordStoreClient"]

_ANSWER_SLACK = 1 << 20
"""Room above the record size for a listing page's JSON (1000 ids of up to 256 chars)."""

_ERRORS: dict[str, type[HermeticError]] = {
    cls.__name__: cls
    for cls in (RecordIdError, RecordNotFoundError, RecordTooLargeError, RecordVersionError)
}


class RecordStoreClient:
    """Talks to one ``hermetic store serve`` at ``base_url`` (``http://host:port``)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        max_record_size: int = MAX_RECORD_SIZE,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_record_size = max_record_size
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request; read at most a record's size (plus room for a listing's JSON)
        of the answer, since the server is not trusted to bound it."""
        cap = self.max_record_size + _ANSWER_SLACK
        try:
            request = self._http.build_request(method, path, **kwargs)
            streamed = self._http.send(request, stream=True)
            try:
                body = bytearray()
                for chunk in streamed.iter_bytes():
                    body += chunk
                    if len(body) > cap:
                        raise RecordResponseFormatError(f"{method} answer: more than {cap} bytes")
            finally:
                streamed.close()
        except httpx.HTTPError as exc:
            raise RecordServiceError(
                f"record store {self.base_url}: {type(exc).__name__}: {exc}"
            ) from None
        response = httpx.Response(
            streamed.status_code, headers=streamed.headers, content=bytes(body), request=request
        )
        if response.status_code >= 400:
            raise self._error(response)
        return response

    def _error(self, response: httpx.Response) -> HermeticError:
        try:
            body = jsontext.loads(response.content, what="error", error=RecordResponseFormatError)
            kind, message = body["error"], body["message"]
            if not isinstance(kind, str) or not isinstance(message, str):
                raise TypeError
        except (RecordResponseFormatError, KeyError, TypeError):
            return RecordServiceError(
                f"record store {self.base_url}: HTTP {response.status_code} without a JSON error"
            )
        if response.status_code == 412 and kind == VersionConflictError.__name__:
            current = body.get("current_version")
            if current is not None and (not isinstance(current, int) or current < 1):
                return RecordResponseFormatError(
                    f"current_version: expected a version or null, got {current!r}"
                )
            return VersionConflictError(message, current)
        cls = _ERRORS.get(kind)
        if cls is not None and response.status_code in (400, 404, 413, 428):
            return cls(message)
        return RecordServiceError(
            f"record store {self.base_url}: HTTP {response.status_code} {kind}: {message}"
        )

    @staticmethod
    def _path(record_id: str) -> str:
        return "/records/" + quote(check_id(record_id), safe="")

    def put(self, record_id: str, data: bytes, expected_version: int | None) -> int:
        """Compare-and-set (see :meth:`RecordStore.put
        <hermetic.store.records.RecordStore.put>`); the new version."""
        path = self._path(record_id)
        data = check_data(data, limit=self.max_record_size)
        expected = check_expected_version(expected_version)
        condition = {"If-None-Match": "*"} if expected is None else {"If-Match": etag(expected)}
        response = self._request(
            "PUT",
            path,
            content=data,
            headers={**condition, "Content-Type": "application/octet-stream"},
        )
        version = _version(response)
        body = _json(response)
        if body.get("version") != version or body.get("sha256") != hashlib.sha256(data).hexdigest():
            raise RecordResponseFormatError(
                "PUT answer: version or sha256 does not match what was sent"
            )
        return version

    def get(self, record_id: str) -> Record:
        """The record's bytes and version."""
        response = self._request("GET", self._path(record_id))
        if len(response.content) > self.max_record_size:
            raise RecordResponseFormatError(
                f"GET answer: {len(response.content)} bytes, at most {self.max_record_size}"
            )
        return Record(check_id(record_id), _version(response), response.content)

    def delete(self, record_id: str, expected_version: int) -> None:
        """Delete the record if it is at ``expected_version``."""
        expected = check_expected_version(expected_version)
        if expected is None:
            raise RecordVersionError("expected_version: a delete needs the version it removes")
        self._request("DELETE", self._path(record_id), headers={"If-Match": etag(expected)})

    def list(
        self, prefix: str = "", *, after: str | None = None, limit: int = MAX_LIST_LIMIT
    ) -> RecordPage:
        """One page of ids under ``prefix`` with their versions, sizes and digests."""
        params: dict[str, str | int] = {"prefix": check_prefix(prefix), "limit": limit}
        if after is not None:
            params["after"] = check_prefix(after, field="after")
        body = _json(self._request("GET", "/records", params=params))
        try:
            records = tuple(
                RecordInfo(
                    check_id(item["id"]),
                    _positive(item["version"]),
                    _non_negative(item["size"]),
                    bytes.fromhex(item["sha256"]),
                )
                for item in body["records"]
            )
            next_after = body["next"]
            if next_after is not None:
                next_after = check_id(next_after, field="next")
        except (KeyError, TypeError, ValueError, HermeticError) as exc:
            raise RecordResponseFormatError(f"list answer: {type(exc).__name__}: {exc}") from None
        if any(not r.id.startswith(prefix) for r in records):
            raise RecordResponseFormatError(f"list answer: a record outside prefix {prefix!r}")
        return RecordPage(records, next_after)

    def scan(self, prefix: str = "") -> Iterator[RecordInfo]:
        """Every record under ``prefix``, page by page."""
        after: str | None = None
        while True:
            page = self.list(prefix, after=after)
            yield from page.records
            if page.next_after is None:
                return
            if after is not None and page.next_after <= after:
                raise RecordResponseFormatError("list answer: next does not advance")
            after = page.next_after

    def health(self) -> bool:
        """Whether the server answers ``/health``."""
        return _json(self._request("GET", "/health")).get("status") == "ok"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RecordStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _version(response: httpx.Response) -> int:
    value = response.headers.get("etag")
    if value is None:
        raise RecordResponseFormatError(f"{response.request.method} answer: no ETag")
    try:
        return version_from_etag(value)
    except RecordVersionError as exc:
        raise RecordResponseFormatError(str(exc)) from None


def _json(response: httpx.Response) -> dict[str, Any]:
    body = jsontext.loads(
        response.content,
        what=f"{response.request.method} answer",
        error=RecordResponseFormatError,
    )
    if not isinstance(body, dict):
        raise RecordResponseFormatError(f"{response.request.method} answer: not a JSON object")
    return body


def _positive(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a version >= 1, got {value!r}")
    return value


def _non_negative(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a size >= 0, got {value!r}")
    return value
