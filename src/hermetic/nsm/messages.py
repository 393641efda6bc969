"""The NSM request and response messages, byte-compatible with the real Nitro Secure Module.

The real module speaks CBOR produced by Rust's ``serde_cbor`` 0.11 from externally tagged
enums (``aws-nitro-enclaves-nsm-api``): a unit variant is the bare variant name as a text
string (``"DescribeNSM"``), a struct variant is a one-entry map ``{"Variant": {field: value,
...}}`` with fields in declaration order, ``None`` is CBOR null and byte vectors are byte
strings. The emulator must decode exactly what the real client library sends and the client
must decode exactly what the real module answers, so both directions live here, as pure
functions over bytes (sans-IO): the device backend, the socket backend and the emulator all
share them.

Decoding is strict about shape (exact variant names, field names and CBOR types, u16 ranges,
and :func:`hermetic.cbor.strict_loads`: one item, no trailing bytes, no semantic tags, no
duplicate keys) because these bytes cross the enclave boundary. A request the emulator
cannot read is answered the way the real module answers it, with ``InvalidArgument``
(:class:`~hermetic.errors.NSMError`); a response the client cannot read raises
:class:`~hermetic.errors.NSMResponseFormatError` (a ``MalformedInputError``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from hermetic.cbor import strict_loads
from hermetic.errors import NSMError, NSMResponseFormatError

#: Largest request the driver forwards to the module (``NSM_REQUEST_MAX_SIZE``).
REQUEST_MAX_SIZE = 0x1000
#: Size of the response buffer the driver hands to the module (``NSM_RESPONSE_MAX_SIZE``).
RESPONSE_MAX_SIZE = 0x3000

_U16_MAX = 0xFFFF


class ErrorCode(enum.Enum):
    """The module's ``ErrorCode`` enum, in declaration order, serialised as its name."""

    SUCCESS = "Success"
    INVALID_ARGUMENT = "InvalidArgument"
    INVALID_INDEX = "InvalidIndex"
    INVALID_RESPONSE = "InvalidResponse"
    READ_ONLY_INDEX = "ReadOnlyIndex"
    INVALID_OPERATION = "InvalidOperation"
    BUFFER_TOO_SMALL = "BufferTooSmall"
    INPUT_TOO_LARGE = "InputTooLarge"
    INTERNAL_ERROR = "InternalError"


class Digest(enum.Enum):
    """The module's ``Digest`` enum (real modules only ever report SHA384)."""

    SHA256 = "SHA256"
    SHA384 = "SHA384"
    SHA512 = "SHA512"


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DescribePCRRequest:
    """Read one PCR and its lock state."""

    index: int


@dataclass(frozen=True)
class ExtendPCRRequest:
    """Extend a PCR: ``new = SHA384(old || data)``."""

    index: int
    data: bytes


@dataclass(frozen=True)
class LockPCRRequest:
    """Make one PCR read-only until the enclave terminates."""

    index: int


@dataclass(frozen=True)
class LockPCRsRequest:
    """Lock every PCR in ``[0, range)``."""

    range: int


@dataclass(frozen=True)
class DescribeNSMRequest:
    """Ask for the module's version, id, PCR count, locked PCRs and digest."""


@dataclass(frozen=True)
class AttestationRequest:
    """Ask for a signed attestation document carrying these optional fields."""

    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None


@dataclass(frozen=True)
class GetRandomRequest:
    """Ask for random bytes from the module's entropy source."""


Request = (
    DescribePCRRequest
    | ExtendPCRRequest
    | LockPCRRequest
    | LockPCRsRequest
    | DescribeNSMRequest
    | AttestationRequest
    | GetRandomRequest
)


# --- responses -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DescribePCRResponse:
    lock: bool
    data: bytes


@dataclass(frozen=True)
class ExtendPCRResponse:
    data: bytes


@dataclass(frozen=True)
class LockPCRResponse:
    pass


@dataclass(frozen=True)
class LockPCRsResponse:
    pass


@dataclass(frozen=True)
class DescribeNSMResponse:
    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]
    digest: Digest


@dataclass(frozen=True)
class AttestationResponse:
    document: bytes


@dataclass(frozen=True)
class GetRandomResponse:
    random: bytes


@dataclass(frozen=True)
class ErrorResponse:
    code: ErrorCode


Response = (
    DescribePCRResponse
    | ExtendPCRResponse
    | LockPCRResponse
    | LockPCRsResponse
    | DescribeNSMResponse
    | AttestationResponse
    | GetRandomResponse
    | ErrorResponse
)


# --- encoding ------------------------------------------------------------------------------


def encode_request(request: Request) -> bytes:
    """Serialise a request exactly as ``serde_cbor`` does for the real client library."""
    value: object
    match request:
        case DescribePCRRequest(index=index):
            value = {"DescribePCR": {"index": _u16_out(index, "index")}}
        case ExtendPCRRequest(index=index, data=data):
            value = {"ExtendPCR": {"index": _u16_out(index, "index"), "data": bytes(data)}}
        case LockPCRRequest(index=index):
            value = {"LockPCR": {"index": _u16_out(index, "index")}}
        case LockPCRsRequest(range=range_):
            value = {"LockPCRs": {"range": _u16_out(range_, "range")}}
        case DescribeNSMRequest():
            value = "DescribeNSM"
        case AttestationRequest(user_data=user_data, nonce=nonce, public_key=public_key):
            value = {
                "Attestation": {
                    "user_data": _opt_bytes(user_data),
                    "nonce": _opt_bytes(nonce),
                    "public_key": _opt_bytes(public_key),
                }
            }
        case GetRandomRequest():
            value = "GetRandom"
    return cbor2.dumps(value)


def encode_response(response: Response) -> bytes:
    """Serialise a response exactly as the real module does."""
    value: object
    match response:
        case DescribePCRResponse(lock=lock, data=data):
            value = {"DescribePCR": {"lock": bool(lock), "data": bytes(data)}}
        case ExtendPCRResponse(data=data):
            value = {"ExtendPCR": {"data": bytes(data)}}
        case LockPCRResponse():
            value = "LockPCR"
        case LockPCRsResponse():
            value = "LockPCRs"
        case DescribeNSMResponse():
            value = {
                "DescribeNSM": {
                    "version_major": response.version_major,
                    "version_minor": response.version_minor,
                    "version_patch": response.version_patch,
                    "module_id": response.module_id,
                    "max_pcrs": response.max_pcrs,
                    "locked_pcrs": list(response.locked_pcrs),
                    "digest": response.digest.value,
                }
            }
        case AttestationResponse(document=document):
            value = {"Attestation": {"document": bytes(document)}}
        case GetRandomResponse(random=random):
            value = {"GetRandom": {"random": bytes(random)}}
        case ErrorResponse(code=code):
            value = {"Error": code.value}
    return cbor2.dumps(value)


def _u16_out(value: int, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U16_MAX:
        raise NSMError(
            f"{field}: expected an integer in 0..65535, got {value!r}", "InvalidArgument"
        )
    return value


def _opt_bytes(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)


# --- decoding ------------------------------------------------------------------------------


class _ShapeError(Exception):
    """Internal: the CBOR value does not have the expected shape (message names the field)."""


_MALFORMED_REQUEST = "malformed NSM request"
_MALFORMED_RESPONSE = "malformed NSM response"


def decode_request(data: bytes) -> Request:
    """Parse a request as the module does; unreadable input -> NSMError(InvalidArgument)."""
    value = strict_loads(data, what=_MALFORMED_REQUEST, error=_invalid_argument)
    try:
        return _request_from_value(value)
    except _ShapeError as exc:
        raise _invalid_argument(f"{_MALFORMED_REQUEST}: {exc}") from None


def decode_response(data: bytes) -> Response:
    """Parse a module response; unreadable input -> NSMResponseFormatError."""
    value = strict_loads(data, what=_MALFORMED_RESPONSE, error=_invalid_response)
    try:
        return _response_from_value(value)
    except _ShapeError as exc:
        raise _invalid_response(f"{_MALFORMED_RESPONSE}: {exc}") from None


def _invalid_argument(message: str) -> NSMError:
    return NSMError(message, ErrorCode.INVALID_ARGUMENT.value)


def _invalid_response(message: str) -> NSMResponseFormatError:
    return NSMResponseFormatError(message, ErrorCode.INVALID_RESPONSE.value)


def _variant(value: object, units: frozenset[str]) -> tuple[str, object]:
    """Split an externally tagged enum value into (variant name, content)."""
    if isinstance(value, str):
        if value not in units:
            raise _ShapeError(f"unknown unit variant {value[:40]!r}")
        return value, None
    if isinstance(value, dict) and len(value) == 1:
        ((name, content),) = value.items()
        if isinstance(name, str):
            return name, content
    raise _ShapeError(f"expected a variant name or a one-entry map, got {_kind(value)}")


def _fields(
    content: object, variant: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    if not isinstance(content, dict):
        raise _ShapeError(f"{variant}: expected a map of fields, got {_kind(content)}")
    allowed = set(required) | set(optional)
    for key in content:
        if key not in allowed:
            raise _ShapeError(f"{variant}: unexpected field {str(key)[:40]!r}")
    for key in required:
        if key not in content:
            raise _ShapeError(f"{variant}: missing field {key!r}")
    return dict(content)


def _u16(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ShapeError(f"{where}: expected an unsigned integer, got {_kind(value)}")
    if not 0 <= value <= _U16_MAX:
        raise _ShapeError(f"{where}: expected 0..65535, got {value}")
    return value


def _bytes(value: object, where: str) -> bytes:
    if not isinstance(value, bytes):
        raise _ShapeError(f"{where}: expected a byte string, got {_kind(value)}")
    return value


def _maybe_bytes(value: object, where: str) -> bytes | None:
    return None if value is None else _bytes(value, where)


def _kind(value: object) -> str:
    return type(value).__name__


_REQUEST_UNITS = frozenset({"DescribeNSM", "GetRandom"})
_RESPONSE_UNITS = frozenset({"LockPCR", "LockPCRs"})


def _request_from_value(value: object) -> Request:
    name, content = _variant(value, _REQUEST_UNITS)
    if name == "DescribeNSM" and content is None and value == name:
        return DescribeNSMRequest()
    if name == "GetRandom" and content is None and value == name:
        return GetRandomRequest()
    if name == "DescribePCR":
        f = _fields(content, name, ("index",))
        return DescribePCRRequest(_u16(f["index"], "DescribePCR.index"))
    if name == "ExtendPCR":
        f = _fields(content, name, ("index", "data"))
        return ExtendPCRRequest(
            _u16(f["index"], "ExtendPCR.index"), _bytes(f["data"], "ExtendPCR.data")
        )
    if name == "LockPCR":
        f = _fields(content, name, ("index",))
        return LockPCRRequest(_u16(f["index"], "LockPCR.index"))
    if name == "LockPCRs":
        f = _fields(content, name, ("range",))
        return LockPCRsRequest(_u16(f["range"], "LockPCRs.range"))
    if name == "Attestation":
        # serde fills a missing Option field with None, so the three fields are optional.
        f = _fields(content, name, (), ("user_data", "nonce", "public_key"))
        return AttestationRequest(
            user_data=_maybe_bytes(f.get("user_data"), "Attestation.user_data"),
            nonce=_maybe_bytes(f.get("nonce"), "Attestation.nonce"),
            public_key=_maybe_bytes(f.get("public_key"), "Attestation.public_key"),
        )
    raise _ShapeError(f"unknown request variant {name[:40]!r}")


def _response_from_value(value: object) -> Response:
    name, content = _variant(value, _RESPONSE_UNITS)
    if name == "LockPCR" and value == name:
        return LockPCRResponse()
    if name == "LockPCRs" and value == name:
        return LockPCRsResponse()
    if name == "DescribePCR":
        f = _fields(content, name, ("lock", "data"))
        if not isinstance(f["lock"], bool):
            raise _ShapeError(f"DescribePCR.lock: expected a bool, got {_kind(f['lock'])}")
        return DescribePCRResponse(f["lock"], _bytes(f["data"], "DescribePCR.data"))
    if name == "ExtendPCR":
        f = _fields(content, name, ("data",))
        return ExtendPCRResponse(_bytes(f["data"], "ExtendPCR.data"))
    if name == "DescribeNSM":
        keys = (
            "version_major",
            "version_minor",
            "version_patch",
            "module_id",
            "max_pcrs",
            "locked_pcrs",
            "digest",
        )
        f = _fields(content, name, keys)
        module_id = f["module_id"]
        if not isinstance(module_id, str):
            raise _ShapeError(f"DescribeNSM.module_id: expected text, got {_kind(module_id)}")
        locked = f["locked_pcrs"]
        if not isinstance(locked, list):
            raise _ShapeError(f"DescribeNSM.locked_pcrs: expected an array, got {_kind(locked)}")
        digest = f["digest"]
        if digest not in {d.value for d in Digest}:
            raise _ShapeError(
                f"DescribeNSM.digest: expected SHA256/SHA384/SHA512, got {str(digest)[:20]!r}"
            )
        return DescribeNSMResponse(
            version_major=_u16(f["version_major"], "DescribeNSM.version_major"),
            version_minor=_u16(f["version_minor"], "DescribeNSM.version_minor"),
            version_patch=_u16(f["version_patch"], "DescribeNSM.version_patch"),
            module_id=module_id,
            max_pcrs=_u16(f["max_pcrs"], "DescribeNSM.max_pcrs"),
            locked_pcrs=tuple(_u16(i, "DescribeNSM.locked_pcrs[]") for i in locked),
            digest=Digest(digest),
        )
    if name == "Attestation":
        f = _fields(content, name, ("document",))
        return AttestationResponse(_bytes(f["document"], "Attestation.document"))
    if name == "GetRandom":
        f = _fields(content, name, ("random",))
        return GetRandomResponse(_bytes(f["random"], "GetRandom.random"))
    if name == "Error":
        codes: Mapping[str, ErrorCode] = {c.value: c for c in ErrorCode}
        if not isinstance(content, str) or content not in codes:
            raise _ShapeError(f"Error: expected an ErrorCode name, got {str(content)[:40]!r}")
        return ErrorResponse(codes[content])
    raise _ShapeError(f"unknown response variant {name[:40]!r}")
