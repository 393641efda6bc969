"""The enclave's KMS client: every key release goes to an attested recipient key.

Inside the enclave, secrets come from KMS only through ``Recipient``: the client makes an
RSA-2048 key pair, asks the NSM for an attestation document carrying the public half (DER
SPKI) as ``public_key``, and sends that document with the request. KMS verifies the
document, evaluates the key policy's ``kms:RecipientAttestation:*`` conditions against its
PCRs, and answers with ``CiphertextForRecipient`` (CMS, see :mod:`hermetic.kms.cms`)
instead of plaintext, so the parent instance that relays the traffic never sees a key.

The wire protocol and SigV4 signing are botocore's (a real ``boto3`` client, nothing
re-implemented); credentials are handed in by the caller (the parent forwards them at
boot), and the endpoint is configurable so the runtime can route it through the proxy's
egress, with TLS ending inside the enclave when talking to real AWS. The client insists on
``CiphertextForRecipient``: a response that carries plaintext instead is refused, because
only a KMS that ignored the attestation would send it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hermetic.errors import (
    KMSAccessDeniedError,
    KMSError,
    KMSInvalidCiphertextError,
    KMSNotFoundError,
    KMSServiceError,
    KMSUnavailableError,
    KMSValidationError,
    UsageError,
)
from hermetic.kms.cms import decrypt_for_recipient
from hermetic.nsm.client import Attester

__all__ = [
    "Attester",
    "DataKey",
    "DataKeyPair",
    "EnclaveKMSClient",
    "KMSCredentials",
]

RECIPIENT_ALGORITHM = "RSAES_OAEP_SHA_256"
_ERROR_TYPES: Mapping[str, type[KMSServiceError]] = {
    "AccessDeniedException": KMSAccessDeniedError,
    "InvalidCiphertextException": KMSInvalidCiphertextError,
    "NotFoundException": KMSNotFoundError,
    "ValidationException": KMSValidationError,
}


@dataclass(frozen=True)
class KMSCredentials:
    """AWS credentials the parent forwards to the enclave (never logged)."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:
        return f"KMSCredentials(access_key_id={self.access_key_id!r}, secret_access_key=***)"


@dataclass(frozen=True)
class DataKey:
    plaintext: bytes
    ciphertext_blob: bytes
    key_id: str

    def __repr__(self) -> str:
        return f"DataKey(key_id={self.key_id!r}, plaintext=<{len(self.plaintext)} bytes>)"


@dataclass(frozen=True)
class DataKeyPair:
    private_key_der: bytes
    """PKCS#8 DER private key (as KMS returns it)."""
    public_key_der: bytes
    private_key_ciphertext_blob: bytes
    key_id: str
    key_pair_spec: str

    def __repr__(self) -> str:
        return f"DataKeyPair(key_id={self.key_id!r}, key_pair_spec={self.key_pair_spec!r})"


class _RecipientKey:
    def __init__(self, bits: int) -> None:
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        self.spki = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class EnclaveKMSClient:
    """KMS calls with ``Recipient``; results are decrypted inside the enclave.

    ``recipient_key="per-boot"`` (default) makes one RSA key for the client's lifetime
    and reuses its attestation document for ``document_ttl`` seconds (it only binds that
    key, whose private half never leaves this object, so a replayed copy releases nothing;
    keep the TTL below the KMS's maximum document age). ``"per-call"`` makes a fresh key
    and a fresh document for every request (costlier, no reuse at all).

    ``proxies`` is botocore's setting (``{"https": "http://127.0.0.1:port"}``): the
    enclave runtime routes TLS to real KMS through its egress forwarder this way.
    """

    def __init__(
        self,
        attester: Attester,
        credentials: KMSCredentials,
        *,
        region: str,
        endpoint_url: str | None = None,
        recipient_key: str = "per-boot",
        rsa_bits: int = 2048,
        timeout: float = 10.0,
        max_attempts: int = 3,
        document_ttl: float = 60.0,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        if recipient_key not in ("per-boot", "per-call"):
            raise UsageError(
                f"recipient_key: expected 'per-boot' or 'per-call', got {recipient_key!r}"
            )
        if rsa_bits < 2048:
            raise UsageError(f"rsa_bits: KMS needs RSA-2048 or larger, got {rsa_bits}")
        import boto3
        from botocore.config import Config

        self._attester = attester
        self._per_call = recipient_key == "per-call"
        self._bits = rsa_bits
        self._boot_key = None if self._per_call else _RecipientKey(rsa_bits)
        self._attest_lock = threading.Lock()
        self._document_ttl = document_ttl
        self._document: tuple[float, bytes] | None = None
        session = boto3.session.Session(
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
            aws_session_token=credentials.session_token,
            region_name=region,
        )
        self._kms = session.client(
            "kms",
            endpoint_url=endpoint_url,
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": max_attempts, "mode": "standard"},
                max_pool_connections=32,
                proxies=dict(proxies) if proxies else None,
            ),
        )

    # --- attested operations ------------------------------------------------------------

    def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """Decrypt a KMS ciphertext blob; the plaintext only ever exists in the enclave."""
        args: dict[str, Any] = {"CiphertextBlob": ciphertext_blob}
        if key_id is not None:
            args["KeyId"] = key_id
        if encryption_context:
            args["EncryptionContext"] = dict(encryption_context)
        key = self._recipient_key()
        response = self._call("decrypt", args, key)
        return self._unwrap(response, key, "Plaintext")

    def generate_data_key(
        self,
        key_id: str,
        *,
        encryption_context: Mapping[str, str] | None = None,
        key_spec: str | None = "AES_256",
        number_of_bytes: int | None = None,
    ) -> DataKey:
        """A fresh data key: plaintext for use here, ciphertext blob for storage outside."""
        args: dict[str, Any] = {"KeyId": key_id}
        if number_of_bytes is not None:
            args["NumberOfBytes"] = number_of_bytes
        elif key_spec is not None:
            args["KeySpec"] = key_spec
        if encryption_context:
            args["EncryptionContext"] = dict(encryption_context)
        key = self._recipient_key()
        response = self._call("generate_data_key", args, key)
        return DataKey(
            plaintext=self._unwrap(response, key, "Plaintext"),
            ciphertext_blob=_field(response, "CiphertextBlob"),
            key_id=str(response.get("KeyId", key_id)),
        )

    def generate_data_key_pair(
        self,
        key_id: str,
        key_pair_spec: str = "ECC_NIST_P256",
        *,
        encryption_context: Mapping[str, str] | None = None,
    ) -> DataKeyPair:
        args: dict[str, Any] = {"KeyId": key_id, "KeyPairSpec": key_pair_spec}
        if encryption_context:
            args["EncryptionContext"] = dict(encryption_context)
        key = self._recipient_key()
        response = self._call("generate_data_key_pair", args, key)
        return DataKeyPair(
            private_key_der=self._unwrap(response, key, "PrivateKeyPlaintext"),
            public_key_der=_field(response, "PublicKey"),
            private_key_ciphertext_blob=_field(response, "PrivateKeyCiphertextBlob"),
            key_id=str(response.get("KeyId", key_id)),
            key_pair_spec=str(response.get("KeyPairSpec", key_pair_spec)),
        )

    def generate_random(self, number_of_bytes: int) -> bytes:
        key = self._recipient_key()
        response = self._call("generate_random", {"NumberOfBytes": number_of_bytes}, key)
        return self._unwrap(response, key, "Plaintext")

    def derive_shared_secret(self, key_id: str, public_key_der: bytes) -> bytes:
        """ECDH between a KMS KEY_AGREEMENT key and ``public_key_der`` (DER SPKI)."""
        args = {"KeyId": key_id, "KeyAgreementAlgorithm": "ECDH", "PublicKey": public_key_der}
        key = self._recipient_key()
        response = self._call("derive_shared_secret", args, key)
        return self._unwrap(response, key, "SharedSecret")

    # --- unattested helpers -------------------------------------------------------------

    def encrypt(
        self,
        key_id: str,
        plaintext: bytes,
        *,
        encryption_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """Plain Encrypt (nothing is released, so no Recipient is needed)."""
        args: dict[str, Any] = {"KeyId": key_id, "Plaintext": plaintext}
        if encryption_context:
            args["EncryptionContext"] = dict(encryption_context)
        return _field(self._call("encrypt", args, None), "CiphertextBlob")

    def decrypt_without_recipient(
        self,
        ciphertext_blob: bytes,
        *,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """NOT ATTESTED: plain Decrypt, with no ``Recipient``; KMS returns the plaintext
        in the clear to whoever holds these credentials (no PCR condition can apply).

        Only for keys whose policy deliberately needs no attestation, and for measuring the
        attested path against the plain one (``bench/apps/kmsbench``) over the same
        connection pool, forwarder and egress. For key release use :meth:`decrypt`.
        """
        args: dict[str, Any] = {"CiphertextBlob": ciphertext_blob}
        if key_id is not None:
            args["KeyId"] = key_id
        if encryption_context:
            args["EncryptionContext"] = dict(encryption_context)
        return _field(self._call("decrypt", args, None), "Plaintext")

    def generate_data_key_without_recipient(
        self,
        key_id: str,
        *,
        encryption_context: Mapping[str, str] | None = None,
        key_spec: str = "AES_256",
    ) -> DataKey:
        """NOT ATTESTED: plain GenerateDataKey, with no ``Recipient``; the plaintext key
        comes back in the clear (same caveats as :meth:`decrypt_without_recipient`)."""
        args: dict[str, Any] = {"KeyId": key_id, "KeySpec": key_spec}
        if encryption_context:
            args["EncryptionContext"] = dict(encryption_context)
        response = self._call("generate_data_key", args, None)
        return DataKey(
            plaintext=_field(response, "Plaintext"),
            ciphertext_blob=_field(response, "CiphertextBlob"),
            key_id=str(response.get("KeyId", key_id)),
        )

    def close(self) -> None:
        self._kms.close()

    def __enter__(self) -> EnclaveKMSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------

    def _recipient_key(self) -> _RecipientKey:
        if self._boot_key is not None:
            return self._boot_key
        return _RecipientKey(self._bits)

    def _call(self, method: str, args: dict[str, Any], key: _RecipientKey | None) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        if key is not None:
            document = self._attestation_document(key)
            args["Recipient"] = {
                "AttestationDocument": document,
                "KeyEncryptionAlgorithm": RECIPIENT_ALGORITHM,
            }
        try:
            return getattr(self._kms, method)(**args)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "KMSInternalException"))
            message = str(error.get("Message", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            error_type = _ERROR_TYPES.get(code, KMSServiceError)
            raise error_type(f"{code}: {message}", code=code, status=status) from None
        except BotoCoreError as exc:
            raise KMSUnavailableError(f"KMS unreachable: {type(exc).__name__}: {exc}") from None

    def _attestation_document(self, key: _RecipientKey) -> bytes:
        with self._attest_lock:  # one NSM conversation at a time
            reusable = key is self._boot_key and self._document is not None
            if reusable and self._document is not None:
                made, document = self._document
                if time.monotonic() - made < self._document_ttl:
                    return document
            document = self._attester.attest(public_key=key.spki)
            if key is self._boot_key:
                self._document = (time.monotonic(), document)
            return document

    @staticmethod
    def _unwrap(response: Any, key: _RecipientKey, plaintext_field: str) -> bytes:
        if response.get(plaintext_field):
            raise KMSError(
                f"KMS returned {plaintext_field} in the clear despite Recipient: refusing a "
                "response from a service that ignored the attestation"
            )
        return decrypt_for_recipient(_field(response, "CiphertextForRecipient"), key.private_key)


def _field(response: Any, name: str) -> bytes:
    value = response.get(name)
    if not isinstance(value, bytes) or not value:
        raise KMSError(f"KMS response: {name} is missing")
    return value
