"""The client side of the gateway: one attestation, then any number of backend services.

``connect_gateway`` opens an ordinary attested session to the gateway
(:func:`hermetic.client.connect`: the gateway's evidence, its logged release, its config
digest) and then asks it to ``describe`` itself, checking, with no further attestation:

* the runtime config it shows hashes to the digest the verified evidence carries, so it
  is the config the gateway runs under;
* the admission policy in that config is the logged one: its endorsement verifies against
  the *client's* trust file and names the policy's digest;
* the receipt key arrived on this attested session, so it is the gateway enclave's.

Every :meth:`GatewaySession.call` then names a service; the answer comes with a receipt the
client checks (:func:`~hermetic.gateway.receipt.check_receipt`: this session, this request
and result, the logged policy, a backend release it admits for that service) and keeps, so
:meth:`GatewaySession.receipts_file` can save them for ``hermetic receipts verify``.

The receipt's **signature** is checked when the receipts leave the session
(:meth:`GatewaySession.receipts_file`, :meth:`GatewaySession.verify_signatures`), not on
each call (``connect_gateway(..., check_signatures=True)`` checks each at once). On the
session that delivered it, the signature adds nothing: the receipt and the receipt key
both arrived on this attested channel, whose messages only the verified gateway enclave
can have written (Noise AEAD), so a receipt that reached ``call`` is the gateway's. The
signature is what lets a party *without* this session believe it (offline, later), so it
is checked before a receipt is handed to one. Ed25519 verification costs more than the
rest of a gateway call on the client (~180 us here, ``python -m bench.gateway_cpu``).

``attestations`` counts the attestation documents this client verified: one,
however many backends answer.

A session keeps every exchange (receipt, request and result digests: about 400 bytes each)
so that it can save them. A long-lived client that makes calls without end and never saves
its receipts passes ``keep_receipts=False``: each call then checks its receipt's signature
at once (there is no later), nothing is kept, and :meth:`GatewaySession.receipts_file` is
refused, so the session's memory does not grow with the number of calls.
"""

from __future__ import annotations

import hashlib
import hmac
import weakref
from dataclasses import dataclass
from typing import Any

from hermetic.client.connect import DEFAULT_TIMEOUT, AttestedSession, connect
from hermetic.client.trust import ClientTrust, ServicePolicy
from hermetic.client.verify import VerificationReport, VerifiedPeer
from hermetic.errors import (
    ConfigDigestMismatchError,
    GatewayRequestError,
    GatewayUsageError,
    ReceiptKeyError,
    RPCError,
)
from hermetic.gateway.admission import AdmissionPolicy
from hermetic.gateway.receipt import (
    Exchange,
    GatewayKey,
    Receipt,
    ReceiptsFile,
    check_receipt,
    open_signed,
    request_digest,
    response_digest,
)
from hermetic.gateway.service import ERROR_CODES
from hermetic.gateway.settings import admission_from_config

GATEWAY_SERVICE = "gateway"
"""The service name the gateway image is released under (``services/gateway``)."""


@dataclass(frozen=True)
class GatewayReply:
    """A backend's result and the receipt that names which backend release produced it."""

    result: Any
    receipt: Receipt
    signed: bytes


class GatewaySession:
    """A verified session to the gateway; build it with :func:`connect_gateway`."""

    def __init__(
        self,
        session: AttestedSession,
        admission: AdmissionPolicy,
        key: GatewayKey,
        *,
        check_signatures: bool = False,
        keep_receipts: bool = True,
    ) -> None:
        self._session = session
        self.keep_receipts = keep_receipts
        """Keep each exchange for :meth:`receipts_file` (else: check and forget)."""
        self.admission = admission
        self.key = key
        self.check_signatures = check_signatures or not keep_receipts
        """Check each receipt's signature in :meth:`call` (else: when they leave)."""
        self.exchanges: list[Exchange] = []
        self._signed: weakref.WeakSet[Exchange] = weakref.WeakSet()
        """Exchanges whose signature was checked (forgotten with the exchange); any other
        in :attr:`exchanges` is checked by :meth:`verify_signatures`."""

    @property
    def verified(self) -> VerifiedPeer:
        return self._session.verified

    @property
    def report(self) -> VerificationReport:
        return self._session.report

    @property
    def handshake_hash(self) -> bytes:
        return self._session.handshake_hash

    @property
    def attestations(self) -> int:
        """Attestation documents this client verified for this session (one per verified
        evidence bundle in its report)."""
        return sum(1 for check in self.report.checks if check.name == "document" and check.ok)

    async def call(self, service: str, method: str, args: Any = None) -> GatewayReply:
        """Call ``method`` of ``service`` through the gateway; the receipt is checked before
        the result is returned (its signature too with ``check_signatures``, else when the
        receipts leave the session: module docstring). The gateway's refusals raise their
        typed errors (UnknownServiceError, BackendUnavailableError, RequestTooLargeError,
        GatewayRequestError, GatewayOverloadedError); a backend's own error is RPCError
        ``backend_error``."""
        try:
            answer = await self._session.call(
                "call", {"service": service, "method": method, "args": args}
            )
        except RPCError as exc:
            error = ERROR_CODES.get(exc.code)
            if error is not None:
                raise error(f"gateway: {exc.remote_message}") from None
            raise
        if not isinstance(answer, dict) or set(answer) != {"result", "receipt"}:
            raise GatewayRequestError("gateway answer: expected a map of result and receipt")
        result, signed = answer["result"], answer["receipt"]
        request = request_digest(service, method, args)
        response = response_digest(result)
        receipt = check_receipt(
            signed, public_key=self.key.receipt_key, session=self.handshake_hash,
            request=request, response=response, policy=self.admission, service=service,
            check_signature=self.check_signatures,
        )  # fmt: skip
        if self.keep_receipts:
            exchange = Exchange(signed, request, response)
            self.exchanges.append(exchange)
            if self.check_signatures:
                self._signed.add(exchange)
        return GatewayReply(result, receipt, signed)

    def verify_signatures(self) -> int:
        """Check the signature of every receipt in :attr:`exchanges` not checked yet
        (ReceiptSignatureError on the first that fails); how many were checked."""
        checked = 0
        for exchange in self.exchanges:
            if exchange not in self._signed:
                open_signed(exchange.receipt, self.key.receipt_key)
                self._signed.add(exchange)
                checked += 1
        return checked

    def receipts_file(self) -> ReceiptsFile:
        """Every receipt of this session so far, with what binds them (for offline checks);
        every signature is checked first (:meth:`verify_signatures`). A session opened with
        ``keep_receipts=False`` kept none: :class:`~hermetic.errors.GatewayUsageError`."""
        if not self.keep_receipts:
            raise GatewayUsageError(
                "receipts file: this session was opened with keep_receipts=False and kept no"
                " receipt (each was checked, signature included, when its call returned)"
            )
        self.verify_signatures()
        return ReceiptsFile(self.handshake_hash, self.key, tuple(self.exchanges))

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> GatewaySession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect_gateway(
    url: str,
    *,
    trust: ClientTrust,
    policy: ServicePolicy | None = None,
    report: VerificationReport | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    check_signatures: bool = False,
    keep_receipts: bool = True,
) -> GatewaySession:
    """Attest the gateway at ``url`` (default policy: service ``gateway``) and check its
    config, logged admission policy and receipt key (module docstring); with
    ``check_signatures``, each call checks its receipt's signature at once; with
    ``keep_receipts=False``, too, and the session keeps no receipt."""
    default = ServicePolicy(services=frozenset({GATEWAY_SERVICE}))
    accepted = policy if policy is not None else default
    session = await connect(url, trust=trust, policy=accepted, report=report, timeout=timeout)
    try:
        described = await session.call("describe")
        if not isinstance(described, dict):
            raise GatewayRequestError("gateway describe: expected a map")
        fields = [described.get(k) for k in ("config", "receipt_key", "key_evidence")]
        config, key, evidence = (v if isinstance(v, bytes) else b"" for v in fields)
        if not (config and evidence):
            raise GatewayRequestError("gateway describe: expected config, receipt_key, evidence")
        if len(key) != 32:
            raise ReceiptKeyError(f"gateway receipt key: expected 32 bytes, got {len(key)}")
        digest = hashlib.sha256(config).digest()
        expected = session.verified.config_digest
        if expected is None or not hmac.compare_digest(digest, expected):
            raise ConfigDigestMismatchError(
                f"gateway config: its digest {digest.hex()} is not the verified session's"
                f" config digest {expected.hex() if expected else None}"
            )
        admission = admission_from_config(config, trust)
    except BaseException:
        await session.close()
        raise
    binding = GatewayKey(key, evidence, config)
    return GatewaySession(
        session, admission, binding, check_signatures=check_signatures, keep_receipts=keep_receipts
    )
