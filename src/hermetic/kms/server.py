"""A local KMS that speaks the real AWS protocol and enforces attestation-bound key policies.

Why our own: the existing emulators either ignore ``Recipient`` (moto) or accept any
document without checking its signature, chain or PCRs and answer in a CMS shape the AWS
SDK for C rejects (LocalStack). Key release bound to attestation is only worth testing
locally if the local service *refuses* what AWS would refuse.

Layers, top-down:

* :class:`KMSService` is the protocol-free core: ``handle(operation, request, caller)``
  takes the decoded JSON body of one AWS KMS operation and returns the JSON response, or
  raises a :class:`~hermetic.errors.KMSServiceError` carrying the AWS error code;
* :func:`create_app` wraps it in the AWS JSON 1.1 wire protocol (``POST /``,
  ``X-Amz-Target: TrentService.<Op>``, ``application/x-amz-json-1.1``, errors as
  ``{"__type": ..., "message": ...}``) with starlette, so unmodified boto3 and the AWS CLI
  work with ``--endpoint-url``;
* :class:`ServerThread` runs that app under uvicorn on a thread (tests, benchmarks, demos);
  ``hermetic kms serve`` runs it in the foreground.

Authentication: any SigV4-signed request is accepted; the access key id from the
``Authorization`` header's credential scope is the caller principal (see
:mod:`hermetic.kms.policy` for how principals match). The signature is NOT verified: this is
a development stand-in, not an IAM. Authorization is real: every key operation is checked
against the key policy, and ``Recipient`` documents are verified against the configured root
(dev by default) and a maximum age *before* the policy's ``kms:RecipientAttestation:*``
conditions are evaluated with their PCRs. A document that cannot be decoded is a
``ValidationException``; one that decodes but fails verification (signature, chain, root,
age) is an ``AccessDeniedException``, as is a failed policy condition. AWS does not document
its exact code for an invalid document; this split keeps "your request is malformed" apart
from "you are not allowed". Every denial is logged as one line naming the failed check
(condition key, expected and actual values); plaintext and key material are never logged.

Ciphertext blobs are this server's own format (AWS's is opaque too)::

    b"hkms" | 0x01 | key id (36 ASCII) | key version (uint32 BE) | nonce (12) | AES-256-GCM

with the header and the canonical JSON of the encryption context as associated data, so a
flipped byte or a different context fails with ``InvalidCiphertextException``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hermetic import jsontext
from hermetic.errors import (
    HermeticError,
    KeyPolicyFormatError,
    KMSAccessDeniedError,
    KMSInvalidCiphertextError,
    KMSNotFoundError,
    KMSServiceError,
    KMSValidationError,
    MalformedInputError,
)
from hermetic.kms.cms import encrypt_for_recipient
from hermetic.kms.policy import Caller, KeyPolicy, canonical_json, default_key_policy
from hermetic.kms.store import KeyRecord, KeyStore
from hermetic.store.web import read_body

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from hermetic.attestation import TrustRoot, VerifiedDocument

__all__ = [
    "AttestationEvidenceVerifier",
    "EvidenceVerifier",
    "KMSService",
    "RecipientEvidence",
    "ServerThread",
    "caller_from_authorization",
    "create_app",
]

log = logging.getLogger("hermetic.kms.server")

DEFAULT_ACCOUNT = "111122223333"
DEFAULT_REGION = "us-east-1"
DEFAULT_MAX_DOCUMENT_AGE = timedelta(minutes=5)
RECIPIENT_ALGORITHM = "RSAES_OAEP_SHA_256"
MIN_RECIPIENT_RSA_BITS = 2048
MAX_ATTESTATION_DOCUMENT = 262144  # botocore model: AttestationDocumentType max length
MAX_REQUEST_SIZE = 1 << 20
"""Largest request body the local KMS reads: room for the largest attestation document
(base64 in JSON) and a key policy, far below what would let one caller exhaust memory."""

_BLOB_MAGIC = b"hkms\x01"
_KEY_ID_LEN = 36
_HEADER = struct.Struct(">5s36sI")
_NONCE = 12
_MAX_PLAINTEXT = 4096
_MAX_CIPHERTEXT = 6144
_ALIAS_RE = re.compile(r"alias/[a-zA-Z0-9/_-]{1,250}")
_SYMMETRIC = "SYMMETRIC_DEFAULT"
_ECC_CURVES: Mapping[str, Callable[[], ec.EllipticCurve]] = {
    "ECC_NIST_P256": ec.SECP256R1,
    "ECC_NIST_P384": ec.SECP384R1,
    "ECC_NIST_P521": ec.SECP521R1,
    "ECC_SECG_P256K1": ec.SECP256K1,
}
_RSA_PAIRS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
_DATA_KEY_SPECS = {"AES_256": 32, "AES_128": 16}


# --- attestation evidence ------------------------------------------------------------------


@dataclass(frozen=True)
class RecipientEvidence:
    """What the server takes from a verified ``Recipient`` attestation document."""

    pcrs: Mapping[int, bytes]
    public_key: rsa.RSAPublicKey
    module_id: str


class EvidenceVerifier(Protocol):
    """Verifies an attestation document; raises AttestationError subclasses on failure."""

    def __call__(self, document: bytes) -> tuple[Mapping[int, bytes], bytes | None, str]:
        """Return (pcrs, public_key bytes or None, module id) of a verified document."""
        ...


class AttestationEvidenceVerifier:
    """:class:`EvidenceVerifier` backed by :mod:`hermetic.attestation` and one pinned root.

    Debug-mode documents are *not* rejected here (AWS does not either): their PCR0 is zero,
    so any policy that pins an image's PCR0 denies them, and the log says so.

    An enclave client reuses one document for a while (same recipient key), so verified
    documents are remembered by the SHA-256 of their exact bytes; a repeat skips only the
    time-independent work (chain and COSE signature) and re-checks every certificate's
    validity and the document's age at the current time.
    """

    def __init__(
        self,
        root: TrustRoot,
        max_age: timedelta = DEFAULT_MAX_DOCUMENT_AGE,
        *,
        cache_size: int = 1024,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        from hermetic.attestation import AttestationVerifier, Policy

        self._clock = clock or (lambda: datetime.now(UTC))
        self._verifier = AttestationVerifier(root)
        self._policy = Policy(allow_debug=True, max_age=max_age)
        self._cache_size = cache_size
        self._verified: OrderedDict[bytes, VerifiedDocument] = OrderedDict()
        self._lock = threading.Lock()
        self.root_name = root.name

    def __call__(self, document: bytes) -> tuple[Mapping[int, bytes], bytes | None, str]:
        from hermetic.attestation.chain import check_validity
        from hermetic.attestation.verifier import check_policy

        digest = hashlib.sha256(document).digest()
        with self._lock:
            verified = self._verified.get(digest)
            if verified is not None:
                self._verified.move_to_end(digest)
        now = self._clock()
        if verified is not None:
            check_validity(verified.certificates, now)
            check_policy(verified.document, self._policy, now)
        else:
            verified = self._verifier.verify(document, self._policy, now)
            with self._lock:
                self._verified[digest] = verified
                while len(self._verified) > self._cache_size:
                    self._verified.popitem(last=False)
        return verified.pcrs, verified.public_key, verified.module_id


# --- the protocol-free core ----------------------------------------------------------------

Handler = Callable[[Mapping[str, Any], Caller], dict[str, Any]]


class KMSService:
    """The KMS operations over a :class:`KeyStore`; one call per request, no HTTP."""

    def __init__(
        self,
        store: KeyStore,
        verifier: EvidenceVerifier,
        *,
        account: str = DEFAULT_ACCOUNT,
        region: str = DEFAULT_REGION,
    ) -> None:
        self.store = store
        self.account = account
        self.region = region
        self._verify_document = verifier
        self._policies: dict[str, KeyPolicy] = {}
        self._lock = threading.Lock()
        self._handlers: dict[str, Handler] = {
            "CreateKey": self._create_key,
            "DescribeKey": self._describe_key,
            "ListKeys": self._list_keys,
            "GetKeyPolicy": self._get_key_policy,
            "PutKeyPolicy": self._put_key_policy,
            "GetPublicKey": self._get_public_key,
            "EnableKey": self._enable_key,
            "DisableKey": self._disable_key,
            "ScheduleKeyDeletion": self._schedule_key_deletion,
            "CancelKeyDeletion": self._cancel_key_deletion,
            "CreateAlias": self._create_alias,
            "DeleteAlias": self._delete_alias,
            "ListAliases": self._list_aliases,
            "Encrypt": self._encrypt,
            "Decrypt": self._decrypt,
            "ReEncrypt": self._re_encrypt,
            "GenerateDataKey": self._generate_data_key,
            "GenerateDataKeyWithoutPlaintext": self._generate_data_key_without_plaintext,
            "GenerateDataKeyPair": self._generate_data_key_pair,
            "GenerateRandom": self._generate_random,
            "DeriveSharedSecret": self._derive_shared_secret,
        }

    @property
    def operations(self) -> tuple[str, ...]:
        return tuple(self._handlers)

    def handle(self, operation: str, request: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        """Run one operation; raise :class:`KMSServiceError` with the AWS error code."""
        handler = self._handlers.get(operation)
        if handler is None:
            raise KMSServiceError(
                f"operation {operation!r} is not supported by the local KMS",
                code="UnknownOperationException",
            )
        if not isinstance(request, Mapping):
            raise KMSServiceError("request body: expected a JSON object", "SerializationException")
        return handler(request, caller)

    # --- key management -----------------------------------------------------------------

    def _create_key(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        spec = _opt_str(req, "KeySpec") or _opt_str(req, "CustomerMasterKeySpec") or _SYMMETRIC
        usage = _opt_str(req, "KeyUsage")
        if spec == _SYMMETRIC:
            usage = usage or "ENCRYPT_DECRYPT"
            if usage != "ENCRYPT_DECRYPT":
                raise KMSValidationError(
                    f"KeyUsage: {usage!r} is not valid for KeySpec {spec}, expected ENCRYPT_DECRYPT"
                )
            material = os.urandom(32)
        elif spec in _ECC_CURVES:
            usage = usage or "KEY_AGREEMENT"
            if usage != "KEY_AGREEMENT":
                raise KMSValidationError(
                    f"KeyUsage: the local KMS supports {spec} only for KEY_AGREEMENT, got {usage!r}"
                )
            private = ec.generate_private_key(_ECC_CURVES[spec]())
            material = private.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        else:
            raise KMSValidationError(
                f"KeySpec: expected one of {[_SYMMETRIC, *_ECC_CURVES]}, got {spec!r}"
            )
        policy_text = _opt_str(req, "Policy")
        if policy_text is None:
            policy_text = default_key_policy(self.account)
        else:
            self._parse_policy(policy_text)
            if not req.get("BypassPolicyLockoutSafetyCheck"):
                self._lockout_check(policy_text, caller)
        record = self.store.create_key(
            key_usage=usage,
            key_spec=spec,
            description=_opt_str(req, "Description") or "",
            policy=policy_text,
            material=material,
        )
        return {"KeyMetadata": self._metadata(record)}

    def _describe_key(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        record = self._authorize(req, "KeyId", "kms:DescribeKey", caller, any_state=True)
        return {"KeyMetadata": self._metadata(record)}

    def _list_keys(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        keys = [{"KeyId": r.key_id, "KeyArn": self._arn(r.key_id)} for r in self.store.list_keys()]
        return _page(keys, req, "Keys")

    def _get_key_policy(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        _policy_name(req)
        record = self._authorize(req, "KeyId", "kms:GetKeyPolicy", caller, any_state=True)
        return {"Policy": record.policy, "PolicyName": "default"}

    def _put_key_policy(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        _policy_name(req)
        text = _req_str(req, "Policy")
        self._parse_policy(text)
        record = self._authorize(req, "KeyId", "kms:PutKeyPolicy", caller, any_state=True)
        if record.state == "PendingDeletion":
            raise _invalid_state(record)
        if not req.get("BypassPolicyLockoutSafetyCheck"):
            self._lockout_check(text, caller)
        self.store.set_policy(record.key_id, text)
        return {}

    def _get_public_key(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        record = self._authorize(req, "KeyId", "kms:GetPublicKey", caller)
        if record.key_spec not in _ECC_CURVES:
            raise _invalid_usage(record, "GetPublicKey")
        private = self._ec_private_key(record)
        return {
            "KeyId": self._arn(record.key_id),
            "PublicKey": _b64(
                private.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ),
            "KeySpec": record.key_spec,
            "KeyUsage": record.key_usage,
            "KeyAgreementAlgorithms": ["ECDH"],
        }

    def _enable_key(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        record = self._authorize(req, "KeyId", "kms:EnableKey", caller, any_state=True)
        if record.state == "PendingDeletion":
            raise _invalid_state(record)
        self.store.set_state(record.key_id, "Enabled")
        return {}

    def _disable_key(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        record = self._authorize(req, "KeyId", "kms:DisableKey", caller, any_state=True)
        if record.state == "PendingDeletion":
            raise _invalid_state(record)
        self.store.set_state(record.key_id, "Disabled")
        return {}

    def _schedule_key_deletion(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        record = self._authorize(req, "KeyId", "kms:ScheduleKeyDeletion", caller, any_state=True)
        if record.state == "PendingDeletion":
            raise _invalid_state(record)
        days = req.get("PendingWindowInDays", 30)
        if not isinstance(days, int) or isinstance(days, bool) or not 7 <= days <= 30:
            raise KMSValidationError(f"PendingWindowInDays: expected 7..30, got {days!r}")
        deletion = time.time() + days * 86400
        self.store.set_state(record.key_id, "PendingDeletion", deletion)
        return {
            "KeyId": self._arn(record.key_id),
            "DeletionDate": deletion,
            "KeyState": "PendingDeletion",
            "PendingWindowInDays": days,
        }

    def _cancel_key_deletion(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        record = self._authorize(req, "KeyId", "kms:CancelKeyDeletion", caller, any_state=True)
        if record.state != "PendingDeletion":
            raise _invalid_state(record)
        self.store.set_state(record.key_id, "Disabled")
        return {"KeyId": self._arn(record.key_id)}

    def _create_alias(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        name = _alias_name(req)
        record = self._authorize(req, "TargetKeyId", "kms:CreateAlias", caller, any_state=True)
        if record.state == "PendingDeletion":
            raise _invalid_state(record)
        if not self.store.create_alias(name, record.key_id):
            raise KMSServiceError(f"AliasName: {name} already exists", "AlreadyExistsException")
        return {}

    def _delete_alias(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        name = _alias_name(req)
        alias = self.store.get_alias(name)
        if alias is None:
            raise KMSNotFoundError(f"AliasName: {name} does not exist")
        self._authorize({"KeyId": alias.key_id}, "KeyId", "kms:DeleteAlias", caller, any_state=True)
        self.store.delete_alias(name)
        return {}

    def _list_aliases(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        key_id = None
        if "KeyId" in req:
            key_id = self._resolve(_req_str(req, "KeyId")).key_id
        aliases = [
            {
                "AliasName": a.alias_name,
                "AliasArn": f"arn:aws:kms:{self.region}:{self.account}:{a.alias_name}",
                "TargetKeyId": a.key_id,
                "CreationDate": a.created,
                "LastUpdatedDate": a.created,
            }
            for a in self.store.list_aliases(key_id)
        ]
        return _page(aliases, req, "Aliases")

    # --- cryptographic operations -------------------------------------------------------

    def _encrypt(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        plaintext = _req_blob(req, "Plaintext")
        if not 1 <= len(plaintext) <= _MAX_PLAINTEXT:
            raise KMSValidationError(
                f"Plaintext: expected 1..{_MAX_PLAINTEXT} bytes, got {len(plaintext)}"
            )
        _symmetric_algorithm(req, "EncryptionAlgorithm")
        context = _encryption_context(req, "EncryptionContext")
        record = self._authorize(req, "KeyId", "kms:Encrypt", caller, context=context)
        self._require_symmetric(record, "Encrypt")
        return {
            "CiphertextBlob": _b64(self._seal_blob(record, plaintext, context)),
            "KeyId": self._arn(record.key_id),
            "EncryptionAlgorithm": _SYMMETRIC,
        }

    def _decrypt(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        blob = _req_blob(req, "CiphertextBlob")
        _symmetric_algorithm(req, "EncryptionAlgorithm")
        context = _encryption_context(req, "EncryptionContext")
        record, version = self._blob_key(blob, req.get("KeyId"))
        evidence = self._recipient(req, "kms:Decrypt", record.key_id, caller)
        record = self._authorize_record(
            record, "kms:Decrypt", caller, context=context, evidence=evidence
        )
        plaintext = self._open_blob(record, version, blob, context)
        response: dict[str, Any] = {
            "KeyId": self._arn(record.key_id),
            "EncryptionAlgorithm": _SYMMETRIC,
        }
        return self._deliver(response, "Plaintext", plaintext, evidence)

    def _re_encrypt(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        blob = _req_blob(req, "CiphertextBlob")
        _symmetric_algorithm(req, "SourceEncryptionAlgorithm")
        _symmetric_algorithm(req, "DestinationEncryptionAlgorithm")
        source_context = _encryption_context(req, "SourceEncryptionContext")
        destination_context = _encryption_context(req, "DestinationEncryptionContext")
        source, version = self._blob_key(blob, req.get("SourceKeyId"))
        source = self._authorize_record(source, "kms:ReEncryptFrom", caller, context=source_context)
        destination = self._authorize(
            req, "DestinationKeyId", "kms:ReEncryptTo", caller, context=destination_context
        )
        self._require_symmetric(destination, "ReEncrypt")
        plaintext = self._open_blob(source, version, blob, source_context)
        return {
            "CiphertextBlob": _b64(self._seal_blob(destination, plaintext, destination_context)),
            "SourceKeyId": self._arn(source.key_id),
            "KeyId": self._arn(destination.key_id),
            "SourceEncryptionAlgorithm": _SYMMETRIC,
            "DestinationEncryptionAlgorithm": _SYMMETRIC,
        }

    def _generate_data_key(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        return self._data_key(req, caller, "kms:GenerateDataKey", with_plaintext=True)

    def _generate_data_key_without_plaintext(
        self, req: Mapping[str, Any], caller: Caller
    ) -> dict[str, Any]:
        if "Recipient" in req:
            raise KMSValidationError("Recipient: not a GenerateDataKeyWithoutPlaintext parameter")
        return self._data_key(
            req, caller, "kms:GenerateDataKeyWithoutPlaintext", with_plaintext=False
        )

    def _data_key(
        self, req: Mapping[str, Any], caller: Caller, action: str, *, with_plaintext: bool
    ) -> dict[str, Any]:
        size = _data_key_size(req)
        context = _encryption_context(req, "EncryptionContext")
        record = self._resolve(_req_str(req, "KeyId"))
        evidence = self._recipient(req, action, record.key_id, caller)
        record = self._authorize_record(record, action, caller, context=context, evidence=evidence)
        self._require_symmetric(record, action.removeprefix("kms:"))
        data_key = os.urandom(size)
        response: dict[str, Any] = {
            "CiphertextBlob": _b64(self._seal_blob(record, data_key, context)),
            "KeyId": self._arn(record.key_id),
        }
        if not with_plaintext:
            return response
        return self._deliver(response, "Plaintext", data_key, evidence)

    def _generate_data_key_pair(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        spec = _req_str(req, "KeyPairSpec")
        context = _encryption_context(req, "EncryptionContext")
        if spec not in _RSA_PAIRS and spec not in _ECC_CURVES:
            raise KMSValidationError(
                f"KeyPairSpec: expected one of {[*_RSA_PAIRS, *_ECC_CURVES]}, got {spec!r}"
            )
        record = self._resolve(_req_str(req, "KeyId"))
        evidence = self._recipient(req, "kms:GenerateDataKeyPair", record.key_id, caller)
        record = self._authorize_record(
            record, "kms:GenerateDataKeyPair", caller, context=context, evidence=evidence
        )
        self._require_symmetric(record, "GenerateDataKeyPair")
        private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if spec in _RSA_PAIRS:
            private = rsa.generate_private_key(65537, _RSA_PAIRS[spec])
        else:
            private = ec.generate_private_key(_ECC_CURVES[spec]())
        private_der = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public_der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        response: dict[str, Any] = {
            "PrivateKeyCiphertextBlob": _b64(self._seal_blob(record, private_der, context)),
            "PublicKey": _b64(public_der),
            "KeyId": self._arn(record.key_id),
            "KeyPairSpec": spec,
        }
        return self._deliver(response, "PrivateKeyPlaintext", private_der, evidence)

    def _generate_random(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        size = req.get("NumberOfBytes")
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 1024:
            raise KMSValidationError(f"NumberOfBytes: expected 1..1024, got {size!r}")
        if "CustomKeyStoreId" in req:
            raise KMSServiceError(
                "CustomKeyStoreId: the local KMS has no custom key stores",
                "CustomKeyStoreNotFoundException",
            )
        # GenerateRandom has no key, hence no key policy (on AWS only IAM policies apply);
        # a Recipient document is still verified before anything is released to it.
        evidence = self._recipient(req, "kms:GenerateRandom", "-", caller)
        return self._deliver({}, "Plaintext", os.urandom(size), evidence)

    def _derive_shared_secret(self, req: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        algorithm = _req_str(req, "KeyAgreementAlgorithm")
        if algorithm != "ECDH":
            raise KMSValidationError(f"KeyAgreementAlgorithm: expected 'ECDH', got {algorithm!r}")
        peer_der = _req_blob(req, "PublicKey")
        record = self._resolve(_req_str(req, "KeyId"))
        evidence = self._recipient(req, "kms:DeriveSharedSecret", record.key_id, caller)
        record = self._authorize_record(record, "kms:DeriveSharedSecret", caller, evidence=evidence)
        if record.key_usage != "KEY_AGREEMENT":
            raise _invalid_usage(record, "DeriveSharedSecret")
        private = self._ec_private_key(record)
        try:
            peer = serialization.load_der_public_key(peer_der)
        except (ValueError, TypeError):
            raise KMSValidationError("PublicKey: not a DER SubjectPublicKeyInfo") from None
        if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != private.curve.name:
            raise KMSValidationError(
                f"PublicKey: expected an EC key on {private.curve.name}, got "
                f"{getattr(getattr(peer, 'curve', None), 'name', type(peer).__name__)}"
            )
        secret = private.exchange(ec.ECDH(), peer)
        response: dict[str, Any] = {
            "KeyId": self._arn(record.key_id),
            "KeyAgreementAlgorithm": "ECDH",
            "KeyOrigin": "AWS_KMS",
        }
        return self._deliver(response, "SharedSecret", secret, evidence)

    # --- recipient, authorization, blobs ------------------------------------------------

    def _recipient(
        self, req: Mapping[str, Any], action: str, key_id: str, caller: Caller
    ) -> RecipientEvidence | None:
        """Verify ``Recipient`` (if present) before any policy is evaluated with it."""
        raw = req.get("Recipient")
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise KMSValidationError("Recipient: expected a RecipientInfo object")
        algorithm = raw.get("KeyEncryptionAlgorithm", RECIPIENT_ALGORITHM)
        if algorithm != RECIPIENT_ALGORITHM:
            raise KMSValidationError(
                f"Recipient.KeyEncryptionAlgorithm: expected {RECIPIENT_ALGORITHM}, got "
                f"{algorithm!r}"
            )
        document = _req_blob(raw, "AttestationDocument", "Recipient.AttestationDocument")
        if not 1 <= len(document) <= MAX_ATTESTATION_DOCUMENT:
            raise KMSValidationError(
                f"Recipient.AttestationDocument: expected 1..{MAX_ATTESTATION_DOCUMENT} "
                f"bytes, got {len(document)}"
            )
        try:
            pcrs, public_key_der, module_id = self._verify_document(document)
        except MalformedInputError as exc:
            self._log_denial(action, key_id, caller, f"attestation document malformed: {exc}")
            raise KMSValidationError(f"Recipient.AttestationDocument: {exc}") from None
        except HermeticError as exc:
            reason = f"attestation document rejected: {type(exc).__name__}: {exc}"
            self._log_denial(action, key_id, caller, reason)
            raise KMSAccessDeniedError(
                f"Recipient.AttestationDocument did not verify: {type(exc).__name__}: {exc}"
            ) from None
        if public_key_der is None:
            raise KMSValidationError(
                "Recipient.AttestationDocument: public_key is absent, expected an RSA "
                "DER SubjectPublicKeyInfo"
            )
        try:
            public_key = serialization.load_der_public_key(public_key_der)
        except (ValueError, TypeError):
            public_key = None
        if not isinstance(public_key, rsa.RSAPublicKey) or (
            public_key.key_size < MIN_RECIPIENT_RSA_BITS
        ):
            actual = (
                f"RSA-{public_key.key_size}"
                if isinstance(public_key, rsa.RSAPublicKey)
                else "not an RSA DER SubjectPublicKeyInfo"
            )
            raise KMSValidationError(
                f"Recipient.AttestationDocument.public_key: expected RSA-2048 or larger, "
                f"got {actual}"
            )
        return RecipientEvidence(pcrs=pcrs, public_key=public_key, module_id=module_id)

    def _deliver(
        self,
        response: dict[str, Any],
        field: str,
        secret: bytes,
        evidence: RecipientEvidence | None,
    ) -> dict[str, Any]:
        if evidence is None:
            response[field] = _b64(secret)
        else:
            response["CiphertextForRecipient"] = _b64(
                encrypt_for_recipient(secret, evidence.public_key)
            )
        return response

    def _authorize(
        self,
        req: Mapping[str, Any],
        field: str,
        action: str,
        caller: Caller,
        *,
        context: Mapping[str, str] | None = None,
        any_state: bool = False,
    ) -> KeyRecord:
        record = self._resolve(_req_str(req, field))
        return self._authorize_record(record, action, caller, context=context, any_state=any_state)

    def _authorize_record(
        self,
        record: KeyRecord,
        action: str,
        caller: Caller,
        *,
        context: Mapping[str, str] | None = None,
        evidence: RecipientEvidence | None = None,
        any_state: bool = False,
    ) -> KeyRecord:
        values: dict[str, str] = {"kms:CallerAccount": caller.account}
        for key, value in (context or {}).items():
            values[f"kms:EncryptionContext:{key}"] = value
        if evidence is not None:
            for index, pcr in evidence.pcrs.items():
                values[f"kms:RecipientAttestation:PCR{index}"] = pcr.hex()
            if 0 in evidence.pcrs:
                values["kms:RecipientAttestation:ImageSha384"] = evidence.pcrs[0].hex()
        decision = self._policy(record).evaluate(caller, action, self._arn(record.key_id), values)
        if not decision.allowed:
            self._log_denial(action, record.key_id, caller, decision.reason)
            raise KMSAccessDeniedError(
                f"User: {caller.access_key_id} is not authorized to perform: {action} on "
                f"resource: {self._arn(record.key_id)} ({decision.reason})"
            )
        if not any_state:
            if record.state == "Disabled":
                raise KMSServiceError(
                    f"{self._arn(record.key_id)} is disabled.", "DisabledException"
                )
            if record.state != "Enabled":
                raise _invalid_state(record)
        if evidence is not None:
            log.info(
                "allowed %s key=%s caller=%s for attested recipient ImageSha384=%s",
                action,
                record.key_id,
                caller.access_key_id,
                evidence.pcrs[0].hex() if 0 in evidence.pcrs else "none",
            )
        return record

    def _log_denial(self, action: str, key_id: str, caller: Caller, reason: str) -> None:
        log.warning("denied %s key=%s caller=%s: %s", action, key_id, caller.access_key_id, reason)

    def _policy(self, record: KeyRecord) -> KeyPolicy:
        with self._lock:
            cached = self._policies.get(record.policy)
            if cached is None:
                cached = KeyPolicy.parse(record.policy)
                if len(self._policies) >= 64:  # bounded: policies change rarely
                    self._policies.clear()
                self._policies[record.policy] = cached
            return cached

    def _parse_policy(self, text: str) -> KeyPolicy:
        try:
            return KeyPolicy.parse(text)
        except KeyPolicyFormatError as exc:
            raise KMSServiceError(str(exc), "MalformedPolicyDocumentException") from None

    def _lockout_check(self, text: str, caller: Caller) -> None:
        # AWS refuses a policy that would stop the caller from ever changing it again.
        decision = self._parse_policy(text).evaluate(
            caller, "kms:PutKeyPolicy", f"arn:aws:kms:{self.region}:{self.account}:key/*", {}
        )
        if not decision.allowed:
            raise KMSServiceError(
                "The new key policy will not allow you to update the key policy in the future.",
                "MalformedPolicyDocumentException",
            )

    def _resolve(self, key_id: str) -> KeyRecord:
        key_prefix = f"arn:aws:kms:{self.region}:{self.account}:"
        name = key_id.removeprefix(key_prefix)
        if name.startswith("alias/"):
            alias = self.store.get_alias(name)
            if alias is None:
                raise KMSNotFoundError(f"Alias {key_prefix}{name} is not found.")
            name = alias.key_id
        name = name.removeprefix("key/")
        record = self.store.get_key(name)
        if record is None:
            raise KMSNotFoundError(f"Key '{key_prefix}key/{name}' does not exist")
        return record

    def _blob_key(self, blob: bytes, requested: object) -> tuple[KeyRecord, int]:
        if len(blob) < _HEADER.size + _NONCE + 16 or len(blob) > _MAX_CIPHERTEXT:
            raise KMSInvalidCiphertextError("CiphertextBlob: not a ciphertext of this KMS")
        magic, raw_id, version = _HEADER.unpack_from(blob)
        if magic != _BLOB_MAGIC:
            raise KMSInvalidCiphertextError("CiphertextBlob: not a ciphertext of this KMS")
        try:
            key_id = raw_id.decode("ascii")
        except UnicodeDecodeError:
            raise KMSInvalidCiphertextError("CiphertextBlob: corrupted key id") from None
        record = self.store.get_key(key_id)
        if record is None:
            raise KMSInvalidCiphertextError("CiphertextBlob: encrypted under an unknown key")
        if requested is not None:
            if not isinstance(requested, str):
                raise KMSValidationError("KeyId: expected a string")
            if self._resolve(requested).key_id != record.key_id:
                raise KMSServiceError(
                    "The key ID in the request does not identify the key that encrypted "
                    "the ciphertext",
                    "IncorrectKeyException",
                )
        return record, version

    def _seal_blob(self, record: KeyRecord, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        version = record.current_version
        header = _HEADER.pack(_BLOB_MAGIC, record.key_id.encode("ascii"), version)
        key = self.store.material(record, version)
        nonce = os.urandom(_NONCE)
        sealed = AESGCM(key).encrypt(nonce, plaintext, header + b"\x00" + canonical_json(context))
        return header + nonce + sealed

    def _open_blob(
        self, record: KeyRecord, version: int, blob: bytes, context: Mapping[str, str]
    ) -> bytes:
        header = blob[: _HEADER.size]
        nonce = blob[_HEADER.size : _HEADER.size + _NONCE]
        if not 1 <= version <= record.current_version:
            raise KMSInvalidCiphertextError("CiphertextBlob: unknown key version")
        key = self.store.material(record, version)
        try:
            return AESGCM(key).decrypt(
                nonce, blob[_HEADER.size + _NONCE :], header + b"\x00" + canonical_json(context)
            )
        except InvalidTag:
            raise KMSInvalidCiphertextError(
                "CiphertextBlob does not decrypt: it was altered, or the encryption context "
                "differs from the one it was encrypted with"
            ) from None

    def _require_symmetric(self, record: KeyRecord, operation: str) -> None:
        if record.key_usage != "ENCRYPT_DECRYPT" or record.key_spec != _SYMMETRIC:
            raise _invalid_usage(record, operation)

    def _ec_private_key(self, record: KeyRecord) -> ec.EllipticCurvePrivateKey:
        private = serialization.load_der_private_key(
            self.store.material(record, record.current_version), password=None
        )
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        return private

    def _arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:key/{key_id}"

    def _metadata(self, record: KeyRecord) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "AWSAccountId": self.account,
            "KeyId": record.key_id,
            "Arn": self._arn(record.key_id),
            "CreationDate": record.created,
            "Enabled": record.state == "Enabled",
            "Description": record.description,
            "KeyUsage": record.key_usage,
            "KeyState": record.state,
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": record.key_spec,
            "KeySpec": record.key_spec,
            "MultiRegion": False,
        }
        if record.key_spec == _SYMMETRIC:
            metadata["EncryptionAlgorithms"] = [_SYMMETRIC]
        else:
            metadata["KeyAgreementAlgorithms"] = ["ECDH"]
        if record.deletion_date is not None:
            metadata["DeletionDate"] = record.deletion_date
            metadata["PendingDeletionWindowInDays"] = 30
        return metadata


# --- request field helpers -----------------------------------------------------------------


def _req_str(req: Mapping[str, Any], field: str) -> str:
    value = req.get(field)
    if not isinstance(value, str) or not value:
        raise KMSValidationError(f"{field}: expected a non-empty string, got {value!r}")
    return value


def _opt_str(req: Mapping[str, Any], field: str) -> str | None:
    value = req.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise KMSValidationError(f"{field}: expected a string, got {type(value).__name__}")
    return value


def _req_blob(req: Mapping[str, Any], field: str, name: str | None = None) -> bytes:
    value = req.get(field)
    label = name or field
    if not isinstance(value, str) or not value:
        raise KMSValidationError(f"{label}: expected base64 data")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KMSValidationError(f"{label}: not valid base64") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encryption_context(req: Mapping[str, Any], field: str) -> dict[str, str]:
    value = req.get(field)
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise KMSValidationError(f"{field}: expected a map of strings to strings")
    return dict(value)


def _symmetric_algorithm(req: Mapping[str, Any], field: str) -> None:
    value = req.get(field, _SYMMETRIC)
    if value != _SYMMETRIC:
        raise KMSValidationError(
            f"{field}: the local KMS supports {_SYMMETRIC} only, got {value!r}"
        )


def _data_key_size(req: Mapping[str, Any]) -> int:
    spec = req.get("KeySpec")
    count = req.get("NumberOfBytes")
    if (spec is None) == (count is None):
        raise KMSValidationError("exactly one of KeySpec and NumberOfBytes is required")
    if spec is not None:
        if not isinstance(spec, str) or spec not in _DATA_KEY_SPECS:
            raise KMSValidationError(f"KeySpec: expected AES_256 or AES_128, got {spec!r}")
        return _DATA_KEY_SPECS[spec]
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1024:
        raise KMSValidationError(f"NumberOfBytes: expected 1..1024, got {count!r}")
    return count


def _policy_name(req: Mapping[str, Any]) -> None:
    name = req.get("PolicyName", "default")
    if name != "default":
        raise KMSValidationError(f"PolicyName: expected 'default', got {name!r}")


def _alias_name(req: Mapping[str, Any]) -> str:
    name = _req_str(req, "AliasName")
    if not _ALIAS_RE.fullmatch(name) or name.startswith("alias/aws/"):
        raise KMSValidationError(
            f"AliasName: expected alias/<letters, digits, /_->, not alias/aws/..., got {name!r}"
        )
    return name


def _page(items: list[dict[str, Any]], req: Mapping[str, Any], field: str) -> dict[str, Any]:
    limit = req.get("Limit", 100)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
        raise KMSValidationError(f"Limit: expected 1..1000, got {limit!r}")
    marker = req.get("Marker", "0")
    if not isinstance(marker, str) or not marker.isdigit():
        raise KMSValidationError("Marker: not a marker this server issued")
    start = int(marker)
    page = items[start : start + limit]
    result: dict[str, Any] = {field: page, "Truncated": start + limit < len(items)}
    if result["Truncated"]:
        result["NextMarker"] = str(start + limit)
    return result


def _invalid_state(record: KeyRecord) -> KMSServiceError:
    return KMSServiceError(f"key {record.key_id} is {record.state}", "KMSInvalidStateException")


def _invalid_usage(record: KeyRecord, operation: str) -> KMSServiceError:
    return KMSServiceError(
        f"{operation}: key {record.key_id} has KeyUsage {record.key_usage} and KeySpec "
        f"{record.key_spec}",
        "InvalidKeyUsageException",
    )


# --- the AWS JSON 1.1 wire protocol --------------------------------------------------------

_AUTH_RE = re.compile(r"AWS4-HMAC-SHA256\s+Credential=([^/,\s]+)/")
_CONTENT_TYPE = "application/x-amz-json-1.1"


def caller_from_authorization(header: str | None, account: str) -> Caller:
    """The caller principal from a SigV4 ``Authorization`` header (signature NOT verified)."""
    match = _AUTH_RE.match(header or "")
    if match is None:
        raise KMSServiceError(
            "Authorization: expected an AWS4-HMAC-SHA256 (SigV4) signed request",
            "MissingAuthenticationTokenException",
        )
    return Caller(access_key_id=match.group(1), account=account)


def _serialization_error(message: str) -> KMSServiceError:
    """What AWS answers for a body it cannot parse (strict JSON: no duplicate keys...)."""
    return KMSServiceError(message, "SerializationException")


def create_app(service: KMSService) -> Starlette:
    """The starlette app serving ``service`` over AWS JSON 1.1 at ``POST /``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    def reply(status: int, body: Mapping[str, Any]) -> Response:
        return Response(
            json.dumps(body),
            status_code=status,
            media_type=_CONTENT_TYPE,
            headers={"x-amzn-RequestId": str(uuid.uuid4())},
        )

    async def endpoint(request: Request) -> Response:
        target = request.headers.get("x-amz-target", "")
        prefix, _, operation = target.partition(".")
        try:
            if prefix != "TrentService" or not operation:
                raise KMSServiceError(
                    f"X-Amz-Target: expected TrentService.<Operation>, got {target!r}",
                    "UnknownOperationException",
                )
            caller = caller_from_authorization(
                request.headers.get("authorization"), service.account
            )
            raw = await read_body(request, MAX_REQUEST_SIZE)
            if raw is None:  # bounded: never hold more than this of one caller's body
                raise KMSServiceError(
                    f"request body: expected at most {MAX_REQUEST_SIZE} bytes",
                    "ValidationException",
                    413,
                )
            body = jsontext.loads(
                raw or b"{}",
                what="request body",
                error=_serialization_error,
                allow_floats=True,
            )
            result = service.handle(operation, body, caller)
        except KMSServiceError as exc:
            return reply(exc.status, {"__type": exc.code, "message": str(exc)})
        except HermeticError as exc:
            log.error("%s failed: %s: %s", operation, type(exc).__name__, exc)
            return reply(500, {"__type": "KMSInternalException", "message": str(exc)})
        except Exception:  # a bug: keep the wire AWS-shaped, the traceback in our log only
            log.exception("%s failed unexpectedly", operation)
            return reply(500, {"__type": "KMSInternalException", "message": "internal error"})
        return reply(200, result)

    return Starlette(routes=[Route("/", endpoint, methods=["POST"])])


class ServerThread:
    """Run the local KMS under uvicorn on a background thread; ``with`` starts and stops it."""

    def __init__(self, service: KMSService, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.service = service
        config = uvicorn.Config(
            create_app(service), host=host, port=port, log_level="warning", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="kms-server", daemon=True)
        self.host = host
        self.port = port

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise KMSServiceError("local KMS server did not start", "KMSInternalException")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
