"""Receipts: the gateway's signed statement of which backend release answered a request.

Sans-IO: encode, sign and check receipts, and the saved receipts file; no sockets.

A **receipt** is canonical CBOR (RFC 8949 §4.2.1), a map with exactly these keys::

    {"v": 1,
     "session": h'<32: the client's session handshake hash with the gateway>',
     "time": <the gateway enclave's clock, unix milliseconds>,
     "service": "alpha", "method": "echo",
     "request": h'<32: request_digest(service, method, args)>',
     "response": h'<32: response_digest(result)>',
     "policy": h'<32: digest of the admission policy in force>',
     "backend_version": "1.0.0" / null, "backend_pcr0": h'<48>', "backend_debug": false,
     "backend_module": "<NSM module id of the backend>",
     "backend_session": h'<32: handshake hash of the gateway's XX session to the backend>'}

The signed form is ``{"receipt": bstr, "signature": bstr .size 64}`` (canonical CBOR), the
signature Ed25519 over ``"hermetic.gateway-receipt/v1" 0x00 || receipt bytes``. Every
``backend_*`` field comes from the gateway's own verification of the backend's evidence
(never from anything the backend says), and the digests from the values the gateway
forwarded and received.

The **receipt key** is an Ed25519 key the gateway generates at boot inside the enclave. Its
binding to the gateway's attestation is an evidence bundle (docs/evidence.md) made by the
runtime's own provider with ``public_key`` = the receipt key and ``nonce`` =
:func:`receipt_key_nonce` (SHA-256 of a domain string and the key): the same document a
session would carry, so the ordinary verifier checks it (root, signature, PCRs = a logged
gateway release, config digest), and a nonce no Noise handshake can produce, so it can never
pass as a session's evidence (nor a session's as it).

A client receives the key over its attested session, so it believes the key without a
second attestation; an offline verifier (``hermetic receipts verify``) checks the key
evidence, the config, the logged admission policy and every receipt
(:func:`verify_receipt_file`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from hermetic import jsontext
from hermetic.attestation.codec import decode as decode_document
from hermetic.cbor import canonical_dumps, strict_loads
from hermetic.client.trust import ClientTrust, ServicePolicy
from hermetic.client.verify import VerifiedPeer, verify_evidence
from hermetic.errors import (
    HermeticError,
    ReceiptError,
    ReceiptFormatError,
    ReceiptKeyError,
    ReceiptMismatchError,
    ReceiptNotAdmittedError,
    ReceiptSessionError,
    ReceiptSignatureError,
)
from hermetic.evidence import EvidenceBundle
from hermetic.gateway.admission import AdmissionPolicy

__all__ = [
    "RECEIPTS_FILE_V1",
    "Exchange",
    "GatewayKey",
    "Receipt",
    "ReceiptsFile",
    "VerifiedReceipts",
    "check_receipt",
    "receipt_key_nonce",
    "request_digest",
    "response_digest",
    "sign_receipt",
    "verify_receipt_file",
]

RECEIPTS_FILE_V1 = "hermetic.gateway-receipts/v1"
_SIGNED_DOMAIN = b"hermetic.gateway-receipt/v1\x00"
_KEY_DOMAIN = b"hermetic.gateway-receipt-key/v1\x00"
_REQUEST_DOMAIN = b"hermetic.gateway-request/v1\x00"
_RESPONSE_DOMAIN = b"hermetic.gateway-response/v1\x00"
MAX_RECEIPT = 4096
_GATEWAY_FIELDS = frozenset({"receipt_key", "key_evidence", "config"})
_FIELDS = frozenset(
    {"v", "session", "time", "service", "method", "request", "response", "policy",
     "backend_version", "backend_pcr0", "backend_debug", "backend_module", "backend_session"}
)  # fmt: skip


def receipt_key_nonce(public_key: bytes) -> bytes:
    """The nonce of the receipt key's evidence document."""
    return hashlib.sha256(_KEY_DOMAIN + bytes(public_key)).digest()


def _digest(domain: bytes, value: Any, what: str) -> bytes:
    encoded = canonical_dumps(value, what=what, error=ReceiptFormatError)
    return hashlib.sha256(domain + encoded).digest()


def request_digest(service: str, method: str, args: Any) -> bytes:
    """SHA-256 over the canonical CBOR of ``[service, method, args]`` (domain-separated);
    the client and the gateway compute it from the same decoded values."""
    return _digest(_REQUEST_DOMAIN, [service, method, args], "request")


def response_digest(result: Any) -> bytes:
    """SHA-256 over the canonical CBOR of the backend's result (domain-separated)."""
    return _digest(_RESPONSE_DOMAIN, result, "response")


def encoded_request_digest(encoded: bytes) -> bytes:
    """:func:`request_digest` of a request already encoded as canonical CBOR (the gateway
    encodes each request once, to check its size, and hashes those bytes)."""
    return hashlib.sha256(_REQUEST_DOMAIN + encoded).digest()


def encoded_response_digest(encoded: bytes) -> bytes:
    """:func:`response_digest` of a result already encoded as canonical CBOR."""
    return hashlib.sha256(_RESPONSE_DOMAIN + encoded).digest()


def _bytes(value: Any, field: str, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise ReceiptFormatError(f"receipt {field}: expected {size} bytes")
    return value


def _text(value: Any, field: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 256:
        raise ReceiptFormatError(f"receipt {field}: expected text of 1 to 256 characters")
    return value


@dataclass(frozen=True)
class Receipt:
    """The fields of one receipt (module docstring)."""

    session: bytes
    time_ms: int
    service: str
    method: str
    request: bytes
    response: bytes
    policy: bytes
    backend_version: str | None
    backend_pcr0: bytes
    backend_debug: bool
    backend_module: str
    backend_session: bytes

    def encode(self) -> bytes:
        """Canonical CBOR: the map's keys are put in canonical order (shorter first, then
        bytewise) and every value has one encoding (no floats), so the plain encoder's
        output is the canonical one, without its sorting (half the time)."""
        fields = {
            "v": 1,
            "time": self.time_ms,
            "method": self.method,
            "policy": self.policy,
            "request": self.request,
            "service": self.service,
            "session": self.session,
            "response": self.response,
            "backend_pcr0": self.backend_pcr0,
            "backend_debug": self.backend_debug,
            "backend_module": self.backend_module,
            "backend_session": self.backend_session,
            "backend_version": self.backend_version,
        }
        try:
            return bytes(cbor2.dumps(fields))
        except (cbor2.CBORError, ValueError, TypeError, OverflowError) as exc:
            raise ReceiptFormatError(f"receipt: cannot encode ({type(exc).__name__})") from None

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        value = strict_loads(data, what="receipt", error=ReceiptFormatError)
        if not isinstance(value, dict) or set(value) != _FIELDS or value["v"] != 1:
            raise ReceiptFormatError(f"receipt: expected a map with exactly {sorted(_FIELDS)}")
        time_ms = value["time"]
        if type(time_ms) is not int or not 0 <= time_ms < 2**63:
            raise ReceiptFormatError("receipt time: expected unix milliseconds")
        if type(value["backend_debug"]) is not bool:
            raise ReceiptFormatError("receipt backend_debug: expected true or false")
        receipt = cls(
            session=_bytes(value["session"], "session", 32),
            time_ms=time_ms,
            service=str(_text(value["service"], "service")),
            method=str(_text(value["method"], "method")),
            request=_bytes(value["request"], "request", 32),
            response=_bytes(value["response"], "response", 32),
            policy=_bytes(value["policy"], "policy", 32),
            backend_version=_text(value["backend_version"], "backend_version", optional=True),
            backend_pcr0=_bytes(value["backend_pcr0"], "backend_pcr0", 48),
            backend_debug=value["backend_debug"],
            backend_module=str(_text(value["backend_module"], "backend_module")),
            backend_session=_bytes(value["backend_session"], "backend_session", 32),
        )
        if receipt.encode() != bytes(data):
            raise ReceiptFormatError("receipt: not in canonical CBOR form")
        return receipt

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.time_ms / 1000, UTC)

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON (hex for bytes), for ``hermetic connect --json``."""
        return {
            "session": self.session.hex(),
            "time": self.time.isoformat().replace("+00:00", "Z"),
            "service": self.service,
            "method": self.method,
            "request": self.request.hex(),
            "response": self.response.hex(),
            "policy": self.policy.hex(),
            "backend": {
                "release": self.backend_version,
                "pcr0": self.backend_pcr0.hex(),
                "debug": self.backend_debug,
                "module_id": self.backend_module,
                "session": self.backend_session.hex(),
            },
        }


def sign_receipt(receipt: Receipt, key: ed25519.Ed25519PrivateKey) -> bytes:
    """The signed receipt bytes the gateway returns with each response."""
    body = receipt.encode()
    return signed_bytes(body, key.sign(_SIGNED_DOMAIN + body))


_SIGNED_HEAD = b"\xa2" + cbor2.dumps("receipt")
"""A map of two, then the key ``receipt`` (canonical order: it sorts before ``signature``)."""
_SIGNATURE_KEY = cbor2.dumps("signature") + b"\x58\x40"
"""The key ``signature``, then the head of a byte string of 64."""


def signed_bytes(body: bytes, signature: bytes) -> bytes:
    """The canonical CBOR of ``{"receipt": body, "signature": signature}`` put together
    from its parts (the bytes :func:`canonical_dumps` makes, without encoding the map)."""
    if len(signature) != 64:
        raise ReceiptFormatError("signed receipt: expected a 64-byte signature")
    return b"".join((_SIGNED_HEAD, cbor2.dumps(bytes(body)), _SIGNATURE_KEY, signature))


def open_signed(data: bytes, public_key: bytes, *, check_signature: bool = True) -> Receipt:
    """Check a signed receipt's signature under ``public_key`` (raw Ed25519) and decode it.

    ``check_signature=False`` checks the signed receipt's form and decodes it, but leaves the
    signature unchecked (the client SDK's receipts on the session that delivered them,
    :class:`~hermetic.gateway.client.GatewaySession`, whose signatures it checks later)."""
    if not isinstance(data, bytes) or len(data) > MAX_RECEIPT:
        raise ReceiptFormatError(f"signed receipt: expected at most {MAX_RECEIPT} bytes")
    value = strict_loads(data, what="signed receipt", error=ReceiptFormatError)
    if not isinstance(value, dict) or set(value) != {"receipt", "signature"}:
        raise ReceiptFormatError("signed receipt: expected a map of receipt and signature")
    body, signature = value["receipt"], value["signature"]
    if not isinstance(body, bytes) or not isinstance(signature, bytes) or len(signature) != 64:
        raise ReceiptFormatError("signed receipt: receipt bytes and a 64-byte signature")
    if signed_bytes(body, signature) != data:
        raise ReceiptFormatError("signed receipt: not in canonical CBOR form")
    if check_signature:
        verify_signature(body, signature, public_key)
    return Receipt.decode(body)


def verify_signature(body: bytes, signature: bytes, public_key: bytes) -> None:
    """ReceiptSignatureError unless ``signature`` is the receipt key's over ``body``."""
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(
            signature, _SIGNED_DOMAIN + body
        )
    except (InvalidSignature, ValueError):
        raise ReceiptSignatureError(
            "receipt signature: does not verify under the gateway's receipt key"
            f" {bytes(public_key)[:8].hex()}...: the receipt was altered or not signed by it"
        ) from None


def check_receipt(
    data: bytes,
    *,
    public_key: bytes,
    session: bytes,
    request: bytes,
    response: bytes,
    policy: AdmissionPolicy,
    service: str | None = None,
    check_signature: bool = True,
) -> Receipt:
    """Every check a receipt must pass for one exchange, in this order: signature under the
    gateway's receipt key, this session, this request and response, the admission policy in
    force (its digest) and a backend release it admits for the receipt's service (and, when
    given, the service the caller asked for). ``check_signature=False``: all but the
    signature (:func:`open_signed`)."""
    receipt = open_signed(data, public_key, check_signature=check_signature)
    if not hmac.compare_digest(receipt.session, session):
        raise ReceiptSessionError(
            f"receipt session: names session {receipt.session[:8].hex()}..., expected"
            f" {bytes(session)[:8].hex()}...: a receipt from another session"
        )
    if not hmac.compare_digest(receipt.request, request):
        raise ReceiptMismatchError("receipt request: covers another request than this one")
    if not hmac.compare_digest(receipt.response, response):
        raise ReceiptMismatchError("receipt response: covers another response than this one")
    if service is not None and receipt.service != service:
        raise ReceiptMismatchError(
            f"receipt service: names {receipt.service!r}, the request was for {service!r}"
        )
    if not hmac.compare_digest(receipt.policy, policy.digest):
        raise ReceiptNotAdmittedError(
            f"receipt policy: names admission policy {receipt.policy.hex()[:16]}..., the"
            f" gateway's logged policy is {policy.digest.hex()[:16]}..."
        )
    pcr0 = receipt.backend_pcr0.hex()
    if not policy.admits(receipt.service, receipt.backend_version, pcr0, receipt.backend_debug):
        raise ReceiptNotAdmittedError(
            f"receipt backend: release {receipt.backend_version!r} pcr0 {pcr0[:16]}..."
            f"{' (debug)' if receipt.backend_debug else ''} of service {receipt.service!r}"
            " is not admitted by the logged admission policy"
        )
    return receipt


# --- the saved receipts file ------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayKey:
    """What binds a gateway's receipt key to its attestation: the key, its evidence bundle
    and the gateway's runtime config (whose digest that evidence carries)."""

    receipt_key: bytes
    key_evidence: bytes
    config: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "receipt_key": self.receipt_key.hex(),
            "key_evidence": base64.b64encode(self.key_evidence).decode("ascii"),
            "config": base64.b64encode(self.config).decode("ascii"),
        }


@dataclass(frozen=True)
class Exchange:
    """One request's receipt and the digests the client computed for it."""

    receipt: bytes
    request: bytes
    response: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "receipt": base64.b64encode(self.receipt).decode("ascii"),
            "request": self.request.hex(),
            "response": self.response.hex(),
        }


def _unhex(value: Any, field: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size or raw.hex() != value:
        raise ReceiptFormatError(f"receipts file {field}: expected {size} bytes as lowercase hex")
    return raw


def _unb64(value: Any, field: str) -> bytes:
    try:
        if isinstance(value, str):
            return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        pass
    raise ReceiptFormatError(f"receipts file {field}: expected base64")


@dataclass(frozen=True)
class ReceiptsFile:
    """A client's saved receipts of one gateway session (``hermetic connect --receipts-out``)::

    {"type": "hermetic.gateway-receipts/v1", "session": "<hex>",
     "gateway": {"receipt_key": "<hex>", "key_evidence": "<base64>", "config": "<base64>"},
     "exchanges": [{"receipt": "<base64>", "request": "<hex>", "response": "<hex>"}]}
    """

    session: bytes
    gateway: GatewayKey
    exchanges: tuple[Exchange, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "type": RECEIPTS_FILE_V1,
            "session": self.session.hex(),
            "gateway": self.gateway.to_json(),
            "exchanges": [e.to_json() for e in self.exchanges],
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=2).encode("utf-8") + b"\n"

    @classmethod
    def loads(cls, data: bytes | str) -> ReceiptsFile:
        value = jsontext.loads(data, what="receipts file", error=ReceiptFormatError)
        if not isinstance(value, dict) or set(value) != {"type", "session", "gateway", "exchanges"}:
            raise ReceiptFormatError(
                "receipts file: expected an object of type, session, gateway, exchanges"
            )
        if value["type"] != RECEIPTS_FILE_V1:
            raise ReceiptFormatError(f"receipts file type: expected {RECEIPTS_FILE_V1!r}")
        gateway = value["gateway"]
        if not isinstance(gateway, dict) or set(gateway) != _GATEWAY_FIELDS:
            raise ReceiptFormatError("receipts file gateway: receipt_key, key_evidence, config")
        exchanges = value["exchanges"]
        if not isinstance(exchanges, list):
            raise ReceiptFormatError("receipts file exchanges: expected a list")
        items = []
        for i, item in enumerate(exchanges):
            if not isinstance(item, dict) or set(item) != {"receipt", "request", "response"}:
                raise ReceiptFormatError(
                    f"receipts file exchanges[{i}]: expected receipt, request, response"
                )
            items.append(
                Exchange(
                    _unb64(item["receipt"], f"exchanges[{i}].receipt"),
                    _unhex(item["request"], f"exchanges[{i}].request", 32),
                    _unhex(item["response"], f"exchanges[{i}].response", 32),
                )
            )
        return cls(
            _unhex(value["session"], "session", 32),
            GatewayKey(
                _unhex(gateway["receipt_key"], "gateway.receipt_key", 32),
                _unb64(gateway["key_evidence"], "gateway.key_evidence"),
                _unb64(gateway["config"], "gateway.config"),
            ),
            tuple(items),
        )


@dataclass(frozen=True)
class VerifiedReceipts:
    """What :func:`verify_receipt_file` proved: the gateway, its logged policy, the receipts."""

    gateway: VerifiedPeer
    policy: AdmissionPolicy
    receipts: tuple[Receipt, ...]


def _hex(value: bytes | None) -> str | None:
    return value.hex() if value is not None else None


def verify_gateway_key(
    key: GatewayKey, trust: ClientTrust, gateway_policy: ServicePolicy
) -> tuple[VerifiedPeer, AdmissionPolicy]:
    """The receipt key's evidence (as of its document's time), the config it names, and the
    logged admission policy in that config."""
    from hermetic.gateway.settings import admission_from_config

    try:
        bundle = EvidenceBundle.decode(key.key_evidence)
        _, document = decode_document(bundle.attestation)
        when = datetime.fromtimestamp(document.timestamp / 1000, UTC)
        # Offline: the document is checked as of the moment it was made (a Nitro leaf
        # certificate lives hours, a receipt is kept for longer); its age is not the point.
        policy = ServicePolicy(
            services=gateway_policy.services,
            versions=gateway_policy.versions,
            pcr0s=gateway_policy.pcr0s,
            config_digests=gateway_policy.config_digests,
            allow_debug=gateway_policy.allow_debug,
            max_age=timedelta(0),
        )
        peer = verify_evidence(
            key.key_evidence, receipt_key_nonce(key.receipt_key), key.receipt_key, trust,
            policy, when,
        )  # fmt: skip
    except HermeticError as exc:
        raise ReceiptKeyError(f"receipt key evidence: {type(exc).__name__}: {exc}") from None
    digest = hashlib.sha256(key.config).digest()
    if peer.config_digest is None or not hmac.compare_digest(digest, peer.config_digest):
        raise ReceiptKeyError(
            f"receipt key evidence: names config {_hex(peer.config_digest)}, the config"
            f" given has digest {digest.hex()}"
        )
    admission = admission_from_config(key.config, trust)
    return peer, admission


def verify_receipt_file(
    saved: ReceiptsFile,
    trust: ClientTrust,
    gateway_policy: ServicePolicy | None = None,
) -> VerifiedReceipts:
    """Check a saved receipts file offline: the receipt key's binding to a logged gateway
    release (:func:`verify_gateway_key`), the logged admission policy in its config, and
    every receipt (:func:`check_receipt`) for this session and its recorded digests."""
    expected = gateway_policy if gateway_policy is not None else ServicePolicy()
    peer, admission = verify_gateway_key(saved.gateway, trust, expected)
    receipts = []
    for i, exchange in enumerate(saved.exchanges):
        try:
            receipts.append(
                check_receipt(
                    exchange.receipt,
                    public_key=saved.gateway.receipt_key,
                    session=saved.session,
                    request=exchange.request,
                    response=exchange.response,
                    policy=admission,
                )
            )
        except ReceiptError as exc:
            raise type(exc)(f"exchanges[{i}]: {exc}") from None
    return VerifiedReceipts(peer, admission, tuple(receipts))


def receipts_file(
    session: bytes, gateway: GatewayKey, exchanges: Sequence[Exchange]
) -> ReceiptsFile:
    return ReceiptsFile(bytes(session), gateway, tuple(exchanges))
