"""A small request/response layer carried in application messages of a verified session.

Four CBOR arrays (docs/protocol.md): ``[0, id, method, args]`` request, ``[1, id, result]``
success, ``[2, id, code, message]`` error, ``[3, id]`` cancel. Ids let many calls share one
session concurrently; codes are short strings so a client can branch on them without parsing
prose. This module is sans-IO: it encodes, decodes strictly, and tracks which ids are
pending; the asyncio adapter does the waiting.

Decoding goes through :func:`hermetic.cbor.strict_loads` because the peer is untrusted:
exactly one CBOR item per message (trailing bytes are an error), no duplicate map keys,
semantic tags passed through as opaque :class:`cbor2.CBORTag` values (never turned into
dates, bignums or shared references that can build cycles), and nesting bounded by
:data:`MAX_DEPTH` so a hostile message cannot exhaust the stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cbor2

from hermetic.cbor import strict_loads
from hermetic.errors import RPCError, RPCFormatError, SessionStateError

REQUEST = 0
RESULT = 1
ERROR = 2
CANCEL = 3

MAX_ID = 2**64 - 1

#: Nesting bound for a whole message, its own array included, so arguments and results may
#: nest 31 levels: deep enough for application data, shallow enough for the stack.
MAX_DEPTH = 32

# Error codes a peer may send; applications may add their own short lowercase codes.
UNKNOWN_METHOD = "unknown_method"
INVALID_ARGS = "invalid_args"
REJECTED = "rejected"
INTERNAL = "internal"
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Request:
    id: int
    method: str
    args: Any


@dataclass(frozen=True)
class Result:
    id: int
    value: Any


@dataclass(frozen=True)
class Error:
    id: int
    code: str
    message: str

    def exception(self) -> RPCError:
        return RPCError(self.code, self.message)


@dataclass(frozen=True)
class Cancel:
    id: int


RPCMessage = Request | Result | Error | Cancel


def encode(message: RPCMessage) -> bytes:
    if isinstance(message, Request):
        fields: list[Any] = [REQUEST, message.id, message.method, message.args]
    elif isinstance(message, Result):
        fields = [RESULT, message.id, message.value]
    elif isinstance(message, Error):
        fields = [ERROR, message.id, message.code, message.message]
    else:
        fields = [CANCEL, message.id]
    try:
        return bytes(cbor2.dumps(fields))
    except Exception as exc:  # cbor2 raises several types for unencodable values
        raise RPCFormatError(
            f"rpc message {type(message).__name__}: value not CBOR-encodable ({type(exc).__name__})"
        ) from exc


_ARITY = {REQUEST: 4, RESULT: 3, ERROR: 4, CANCEL: 2}


def decode(data: bytes) -> RPCMessage:
    """Parse one RPC message; anything but the four exact shapes is an RPCFormatError."""
    fields = strict_loads(data, what="rpc message", error=RPCFormatError, max_depth=MAX_DEPTH)
    if not isinstance(fields, list) or not fields:
        raise RPCFormatError(f"rpc message: expected a CBOR array, got {type(fields).__name__}")
    kind = fields[0]
    if type(kind) is not int or kind not in _ARITY:
        raise RPCFormatError(f"rpc message type: expected 0, 1, 2 or 3, got {kind!r:.40}")
    if len(fields) != _ARITY[kind]:
        raise RPCFormatError(
            f"rpc message type {kind}: expected {_ARITY[kind]} elements, got {len(fields)}"
        )
    ident = fields[1]
    if type(ident) is not int or not 0 <= ident <= MAX_ID:
        raise RPCFormatError(f"rpc id: expected an unsigned 64-bit integer, got {ident!r:.40}")
    if kind == REQUEST:
        if not isinstance(fields[2], str):
            raise RPCFormatError(
                f"rpc method: expected a text string, got {type(fields[2]).__name__}"
            )
        return Request(ident, fields[2], fields[3])
    if kind == RESULT:
        return Result(ident, fields[2])
    if kind == ERROR:
        if not isinstance(fields[2], str) or not isinstance(fields[3], str):
            raise RPCFormatError("rpc error: expected text code and text message")
        return Error(ident, fields[2], fields[3])
    return Cancel(ident)


class RPCClientState:
    """Allocates request ids and matches replies; a reply to a never-issued id is an error.

    A reply to an id that was issued but is no longer pending (cancelled, or answered twice)
    is dropped: it can legitimately race a cancel, and keeping no per-cancel state means a
    long session does not accumulate memory.
    """

    def __init__(self) -> None:
        self._next_id = 0
        self._pending: set[int] = set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def request(self, method: str, args: Any) -> tuple[int, bytes]:
        ident = self._next_id
        if ident > MAX_ID:
            raise SessionStateError("rpc ids exhausted on this session")
        data = encode(Request(ident, method, args))
        self._next_id += 1
        self._pending.add(ident)
        return ident, data

    def cancel(self, ident: int) -> bytes:
        if ident not in self._pending:
            raise SessionStateError(f"rpc cancel: id {ident} is not pending")
        self._pending.discard(ident)
        return encode(Cancel(ident))

    def receive(self, data: bytes) -> Result | Error | None:
        """A reply for a pending call, or None for a late reply to a cancelled call."""
        message = decode(data)
        if not isinstance(message, Result | Error):
            raise RPCFormatError(
                f"rpc message to client: expected result or error, got {type(message).__name__}"
            )
        if message.id >= self._next_id:
            raise RPCFormatError(f"rpc reply: id {message.id} was never requested")
        if message.id not in self._pending:
            return None
        self._pending.discard(message.id)
        return message


class RPCServerState:
    """Tracks in-flight request ids so duplicates are refused and cancels find their call."""

    def __init__(self) -> None:
        self._in_flight: set[int] = set()

    def receive(self, data: bytes) -> Request | Cancel | None:
        """A new request, a cancel for an in-flight one, or None for a stale cancel."""
        message = decode(data)
        if isinstance(message, Request):
            if message.id in self._in_flight:
                raise RPCFormatError(f"rpc request: id {message.id} is already in flight")
            self._in_flight.add(message.id)
            return message
        if isinstance(message, Cancel):
            return message if message.id in self._in_flight else None
        raise RPCFormatError(
            f"rpc message to server: expected request or cancel, got {type(message).__name__}"
        )

    def result(self, ident: int, value: Any) -> bytes:
        self._check_in_flight(ident)
        data = encode(Result(ident, value))
        self._in_flight.discard(ident)
        return data

    def error(self, ident: int, code: str, message: str) -> bytes:
        self._check_in_flight(ident)
        data = encode(Error(ident, code, message))
        self._in_flight.discard(ident)
        return data

    def forget(self, ident: int) -> None:
        """A cancelled call ends without a reply."""
        self._in_flight.discard(ident)

    def _check_in_flight(self, ident: int) -> None:
        if ident not in self._in_flight:
            raise SessionStateError(f"rpc reply: id {ident} is not in flight")
