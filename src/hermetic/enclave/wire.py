"""The plain service wire: one CBOR message per length-prefixed frame.

Request ``[id, method, args]`` (``args`` an array of positional arguments), response
``[id, ok, result]`` where a failed call carries ``{"code": str, "message": str}``. An
error the far side sends without knowing the request (a malformed frame, a dead enclave
reported by the proxy) has ``id = null``.

This module only turns messages into bytes and back (sans-IO); dispatch lives in
:mod:`hermetic.enclave.service`, so the channel component can later put the same
messages inside a Noise session instead of a bare stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cbor2

from hermetic.errors import FrameFormatError

MAX_METHOD_LENGTH = 128


@dataclass(frozen=True)
class ServiceRequest:
    id: int
    method: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class ServiceResponse:
    id: int | None
    ok: bool
    result: Any

    @property
    def error_code(self) -> str:
        return str(self.result.get("code", "")) if isinstance(self.result, dict) else ""

    @property
    def error_message(self) -> str:
        return str(self.result.get("message", "")) if isinstance(self.result, dict) else ""


def encode_request(request: ServiceRequest) -> bytes:
    return cbor2.dumps([request.id, request.method, list(request.args)])


def encode_response(response: ServiceResponse) -> bytes:
    try:
        return cbor2.dumps([response.id, response.ok, response.result])
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise FrameFormatError(f"response result: not CBOR-encodable ({exc})") from None


def error_response(request_id: int | None, code: str, message: str) -> ServiceResponse:
    return ServiceResponse(request_id, False, {"code": code, "message": message})


def decode_request(frame: bytes) -> ServiceRequest:
    """Parse a request; raise :class:`FrameFormatError` naming what is wrong."""
    value = _load(frame, "request")
    if not isinstance(value, list) or len(value) != 3:
        raise FrameFormatError(f"request: expected a 3-element array, got {_shape(value)}")
    request_id, method, args = value
    if not isinstance(request_id, int) or isinstance(request_id, bool) or request_id < 0:
        raise FrameFormatError(
            f"request id: expected an unsigned integer, got {_shape(request_id)}"
        )
    if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD_LENGTH:
        raise FrameFormatError(
            f"request method: expected text of 1..{MAX_METHOD_LENGTH} characters, "
            f"got {_shape(method)}"
        )
    if not isinstance(args, list):
        raise FrameFormatError(f"request args: expected an array, got {_shape(args)}")
    return ServiceRequest(request_id, method, tuple(args))


def decode_response(frame: bytes) -> ServiceResponse:
    """Parse a response; raise :class:`FrameFormatError` naming what is wrong."""
    value = _load(frame, "response")
    if not isinstance(value, list) or len(value) != 3:
        raise FrameFormatError(f"response: expected a 3-element array, got {_shape(value)}")
    response_id, ok, result = value
    if response_id is not None and (
        not isinstance(response_id, int) or isinstance(response_id, bool) or response_id < 0
    ):
        raise FrameFormatError(
            f"response id: expected an unsigned integer or null, got {_shape(response_id)}"
        )
    if not isinstance(ok, bool):
        raise FrameFormatError(f"response ok: expected a boolean, got {_shape(ok)}")
    if not ok and not (
        isinstance(result, dict)
        and isinstance(result.get("code"), str)
        and isinstance(result.get("message"), str)
    ):
        raise FrameFormatError("response error: expected a map with text 'code' and 'message'")
    return ServiceResponse(response_id, ok, result)


def _load(frame: bytes, what: str) -> Any:
    try:
        return cbor2.loads(frame)
    except Exception as exc:  # cbor2 raises many types on hostile input
        raise FrameFormatError(f"{what}: not valid CBOR ({type(exc).__name__})") from None


def _shape(value: object) -> str:
    if isinstance(value, list):
        return f"an array of {len(value)}"
    return type(value).__name__
