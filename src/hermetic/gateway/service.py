"""The gateway's request path: one client request in, one backend call out, one receipt.

A client's ``call`` carries ``{"service", "method", "args"}``. The gateway checks its shape
and size, picks an admitted instance of the service (:class:`~hermetic.gateway.backends.
BackendPool`), forwards the call on that instance's attested session, and answers
``{"result", "receipt"}``: the backend's result as it came, and a receipt
(:mod:`hermetic.gateway.receipt`) signed with the receipt key, over this client session's
handshake hash, the request's and the result's digests, the service and method, and the
backend's release, PCR0, module and session handshake hash as the gateway verified them.

Every refusal is an RPC error whose code the client SDK maps back to a typed error
(:data:`ERROR_CODES`); a backend's own error is passed on under the code ``backend_error``
with the backend's code in the message, so a backend cannot make its answer look like one
of the gateway's refusals (``unavailable`` could make a client try elsewhere).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hermetic.cbor import canonical_dumps
from hermetic.channel.session import MakeEvidence
from hermetic.errors import (
    BackendUnavailableError,
    GatewayOverloadedError,
    GatewayRequestError,
    HermeticError,
    RequestTooLargeError,
    RPCError,
    UnknownServiceError,
)
from hermetic.gateway.backends import Backends, BackendSession
from hermetic.gateway.metrics import GatewayMetrics
from hermetic.gateway.receipt import (
    GatewayKey,
    Receipt,
    encoded_request_digest,
    encoded_response_digest,
    receipt_key_nonce,
    sign_receipt,
)
from hermetic.gateway.settings import GatewaySettings

ERROR_CODES: dict[str, type[HermeticError]] = {
    "invalid_request": GatewayRequestError,
    "request_too_large": RequestTooLargeError,
    "unknown_service": UnknownServiceError,
    "unavailable": BackendUnavailableError,
    "overloaded": GatewayOverloadedError,
}
"""RPC error code -> the typed error it stands for (both sides use this table)."""
BACKEND_ERROR = "backend_error"
MAX_ATTEMPTS = 3
"""Instances an idempotent request is sent to at most when the one running it dies."""
_MAX_NAME = 128


class ReceiptSigner:
    """The gateway's receipt key (made in the enclave at boot, never leaves it) and its
    binding to the gateway's attestation (an evidence bundle for the key)."""

    def __init__(self, make_evidence: MakeEvidence, config: bytes) -> None:
        self._key = ed25519.Ed25519PrivateKey.generate()
        public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        evidence = make_evidence(receipt_key_nonce(public), public)
        self.binding = GatewayKey(public, evidence, config)

    def __repr__(self) -> str:
        return f"ReceiptSigner(public={self.binding.receipt_key[:8].hex()}...)"

    def sign(self, receipt: Receipt) -> bytes:
        return sign_receipt(receipt, self._key)


@dataclass(frozen=True)
class ClientRequest:
    """A checked client request, with its canonical encoding's digest."""

    service: str
    method: str
    args: Any
    digest: bytes


def _refuse(code: str, message: str) -> RPCError:
    return RPCError(code, message)


class Gateway:
    """The request path of the module docstring; one per gateway boot."""

    def __init__(
        self,
        settings: GatewaySettings,
        backends: Backends,
        signer: ReceiptSigner,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.backends = backends
        self.signer = signer
        self.metrics = metrics
        self._clock = clock
        self._in_flight: dict[bytes, int] = {}
        self._total = 0
        self._answered: dict[str, Any] = {}
        """Each service's ``requests_total{outcome="ok"}`` child (looked up once)."""
        self.keeper: asyncio.Future[Any] | None = None
        """The task that re-attests backend sessions (started by the enclave app)."""

    def parse(self, request: object) -> ClientRequest:
        """The request's shape and size, or the RPC error the client gets."""
        if not isinstance(request, dict) or set(request) != {"service", "method", "args"}:
            self.metrics.refused_requests.labels("invalid").inc()
            raise _refuse("invalid_request", "expected a map of exactly service, method and args")
        service, method, args = request["service"], request["method"], request["args"]
        for field, value in (("service", service), ("method", method)):
            if not isinstance(value, str) or not 1 <= len(value) <= _MAX_NAME:
                self.metrics.refused_requests.labels("invalid").inc()
                raise _refuse("invalid_request", f"{field}: expected text of 1 to {_MAX_NAME}")
        if service not in self.backends.pools:
            self.metrics.refused_requests.labels("unknown_service").inc()
            raise _refuse(
                "unknown_service", f"service {service!r}: not in the gateway's admission policy"
            )
        try:
            encoded = canonical_dumps(
                [service, method, args], what="request", error=GatewayRequestError
            )
        except GatewayRequestError as exc:
            self.metrics.refused_requests.labels("invalid").inc()
            raise _refuse("invalid_request", str(exc)) from None
        if len(encoded) > self.settings.max_request:
            self.metrics.refused_requests.labels("too_large").inc()
            raise _refuse(
                "request_too_large",
                f"request of {len(encoded)} bytes: the limit is {self.settings.max_request}",
            )
        return ClientRequest(service, method, args, encoded_request_digest(encoded))

    async def forward(self, session_hash: bytes, request: object) -> dict[str, Any]:
        """Route one client request; ``session_hash`` is the client session's handshake
        hash (the receipt's ``session``)."""
        checked = self.parse(request)
        settings = self.settings
        mine = self._in_flight.get(session_hash, 0)
        if mine >= settings.max_per_client or self._total >= settings.max_concurrency:
            self.metrics.refused_requests.labels("overloaded").inc()
            which = (
                f"this session has {mine} requests in flight (limit {settings.max_per_client})"
                if mine >= settings.max_per_client
                else f"{self._total} requests in flight (limit {settings.max_concurrency})"
            )
            raise _refuse("overloaded", f"gateway: {which}; nothing was queued, try later")
        self._in_flight[session_hash] = mine + 1
        self._total += 1
        self.metrics.in_flight.set(self._total)
        try:
            return await self._route(session_hash, checked)
        finally:
            self._total -= 1
            left = self._in_flight[session_hash] - 1
            if left:
                self._in_flight[session_hash] = left
            else:
                del self._in_flight[session_hash]
            self.metrics.in_flight.set(self._total)

    async def _route(self, session_hash: bytes, checked: ClientRequest) -> dict[str, Any]:
        pool = self.backends.pools[checked.service]
        tried: frozenset[BackendSession] = frozenset()
        while True:
            try:
                backend = pool.pick(exclude=tried)
            except BackendUnavailableError as exc:
                self.metrics.requests.labels(checked.service, "unavailable").inc()
                raise _refuse("unavailable", str(exc)) from None
            try:
                result = await backend.call(checked.method, checked.args)
                break
            except RPCError as exc:
                self.metrics.requests.labels(checked.service, "backend_error").inc()
                raise _refuse(
                    BACKEND_ERROR, f"{exc.code:.40}: {exc.remote_message:.2000}"
                ) from None
            except HermeticError as exc:
                tried |= {backend}
                if checked.method in backend.idempotent and len(tried) < MAX_ATTEMPTS:
                    # Declared idempotent by the backend's (admitted) release: sending it
                    # again to another instance cannot make it take effect twice.
                    self.metrics.retries.labels(checked.service).inc()
                    continue
                self.metrics.requests.labels(checked.service, "unavailable").inc()
                why = (
                    f"not retried: {checked.method!r} is not declared idempotent, so it may"
                    " have run"
                    if checked.method not in backend.idempotent
                    else f"given up after {len(tried)} instances"
                )
                raise _refuse(
                    "unavailable",
                    f"service {checked.service!r}: the backend went away mid-request"
                    f" ({type(exc).__name__}); {why}",
                ) from None
        try:
            encoded = canonical_dumps(result, what="response", error=GatewayRequestError)
        except GatewayRequestError:
            encoded = b""
        if not encoded or len(encoded) > self.settings.max_response:
            self.metrics.requests.labels(checked.service, "backend_error").inc()
            raise _refuse(
                BACKEND_ERROR,
                f"response_too_large: the backend's result is {len(encoded) or 'not'}"
                f" canonical CBOR bytes; the gateway's limit is {self.settings.max_response}",
            )
        peer = backend.peer
        receipt = Receipt(
            session=bytes(session_hash),
            time_ms=int(self._clock() * 1000),
            service=checked.service,
            method=checked.method,
            request=checked.digest,
            response=encoded_response_digest(encoded),
            policy=self.settings.admission.digest,
            backend_version=peer.version,
            backend_pcr0=bytes(peer.pcrs[0]),
            backend_debug=peer.debug,
            backend_module=peer.module_id,
            backend_session=bytes(backend.handshake_hash),
        )
        answered = self._answered.get(checked.service)
        if answered is None:
            answered = self._answered[checked.service] = self.metrics.requests.labels(
                checked.service, "ok"
            )
        answered.inc()
        return {"result": result, "receipt": self.signer.sign(receipt)}

    def describe(self) -> dict[str, Any]:
        """What a client needs to check receipts and the policy: the runtime config (its
        digest is in the session's evidence), the receipt key and its evidence."""
        binding = self.signer.binding
        return {
            "config": binding.config,
            "receipt_key": binding.receipt_key,
            "key_evidence": binding.key_evidence,
            "admission_digest": self.settings.admission.digest,
        }
