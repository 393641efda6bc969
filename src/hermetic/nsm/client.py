"""The NSM client: what enclave code calls to attest, read and extend PCRs, get randomness.

The same client runs on real Nitro hardware (``/dev/nsm``) and in the local emulator (a
Unix socket served by the launcher): a backend only moves request bytes to the module and
response bytes back, and everything else — message encoding, error mapping, response
checks — is here, shared. :meth:`NSMClient.open` picks the backend at run time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from hermetic.errors import NSMError, NSMResponseFormatError, NSMUnavailableError
from hermetic.nsm.messages import (
    REQUEST_MAX_SIZE,
    AttestationRequest,
    AttestationResponse,
    DescribeNSMRequest,
    DescribeNSMResponse,
    DescribePCRRequest,
    DescribePCRResponse,
    ErrorResponse,
    ExtendPCRRequest,
    ExtendPCRResponse,
    GetRandomRequest,
    GetRandomResponse,
    LockPCRRequest,
    LockPCRResponse,
    LockPCRsRequest,
    LockPCRsResponse,
    Request,
    Response,
    decode_response,
    encode_request,
)


class Backend(Protocol):
    """Moves one request message to the module and returns its response message."""

    def transact(self, request: bytes) -> bytes: ...


class Attester(Protocol):
    """Anything that produces an attestation document the way the NSM does.

    :class:`NSMClient` fits; relying-party helpers (evidence providers, the enclave KMS
    client) take this narrow interface so tests and the emulator can stand in for it.
    """

    def attest(
        self,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes: ...


@dataclass(frozen=True)
class PCRState:
    """One PCR as the module reports it."""

    locked: bool
    value: bytes


@dataclass(frozen=True)
class NSMDescription:
    """The module's DescribeNSM answer."""

    version: tuple[int, int, int]
    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]
    digest: str


_R = TypeVar("_R", bound=Response)


class NSMClient:
    """Typed calls to a Nitro Secure Module through a :class:`Backend`.

    Every refusal by the module raises :class:`~hermetic.errors.NSMError` whose ``code`` is
    the module's ErrorCode name; an unreadable answer raises
    :class:`~hermetic.errors.NSMResponseFormatError`.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @classmethod
    def open(
        cls, *, device_path: str | None = None, environ: Mapping[str, str] | None = None
    ) -> NSMClient:
        """The real ``/dev/nsm`` if present, else the emulator at ``$HERMETIC_NSM_SOCKET``."""
        from hermetic.nsm.device import DEVICE_PATH, DeviceBackend
        from hermetic.nsm.server import SOCKET_ENV, SocketBackend

        device = device_path if device_path is not None else DEVICE_PATH
        env = os.environ if environ is None else environ
        if os.path.exists(device):
            return cls(DeviceBackend(device))
        socket_path = env.get(SOCKET_ENV)
        if socket_path:
            return cls(SocketBackend(socket_path))
        raise NSMUnavailableError(
            f"no NSM: {device} does not exist and {SOCKET_ENV} is not set", "InternalError"
        )

    def close(self) -> None:
        close = getattr(self._backend, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> NSMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls --------------------------------------------------------------------------

    def attest(
        self,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """A signed attestation document (COSE_Sign1 bytes) carrying the given fields."""
        request = AttestationRequest(user_data=user_data, nonce=nonce, public_key=public_key)
        response = self._call(request, AttestationResponse)
        if not response.document:
            raise NSMResponseFormatError(
                "Attestation.document: expected a document, got 0 bytes", "InvalidResponse"
            )
        return response.document

    def describe_pcr(self, index: int) -> PCRState:
        response = self._call(DescribePCRRequest(index), DescribePCRResponse)
        return PCRState(locked=response.lock, value=response.data)

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data``; returns the new value."""
        return self._call(ExtendPCRRequest(index, bytes(data)), ExtendPCRResponse).data

    def lock_pcr(self, index: int) -> None:
        self._call(LockPCRRequest(index), LockPCRResponse)

    def lock_pcrs(self, range_: int) -> None:
        """Lock PCRs ``0 .. range_-1``."""
        self._call(LockPCRsRequest(range_), LockPCRsResponse)

    def describe_nsm(self) -> NSMDescription:
        response = self._call(DescribeNSMRequest(), DescribeNSMResponse)
        return NSMDescription(
            version=(response.version_major, response.version_minor, response.version_patch),
            module_id=response.module_id,
            max_pcrs=response.max_pcrs,
            locked_pcrs=response.locked_pcrs,
            digest=response.digest.value,
        )

    def get_random(self) -> bytes:
        random = self._call(GetRandomRequest(), GetRandomResponse).random
        if not random:
            raise NSMResponseFormatError(
                "GetRandom.random: expected random bytes, got 0 bytes", "InvalidResponse"
            )
        return random

    def _call(self, request: Request, expected: type[_R]) -> _R:
        raw = encode_request(request)
        if len(raw) > REQUEST_MAX_SIZE:
            raise NSMError(
                f"{type(request).__name__}: encoded request is {len(raw)} bytes, "
                f"the NSM accepts at most {REQUEST_MAX_SIZE}",
                "InputTooLarge",
            )
        response = decode_response(self._backend.transact(raw))
        if isinstance(response, ErrorResponse):
            raise NSMError(
                f"NSM refused {type(request).__name__.removesuffix('Request')}: "
                f"{response.code.value}",
                response.code.value,
            )
        if not isinstance(response, expected):
            raise NSMResponseFormatError(
                f"response: expected {expected.__name__}, got {type(response).__name__}",
                "InvalidResponse",
            )
        return response
