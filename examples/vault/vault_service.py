"""The vault service: seal data under a KMS data key that only this measured image can get.

``seal`` asks KMS for a fresh AES-256 data key with ``Recipient`` (the enclave's
attestation document), so KMS checks this image's PCRs against the key policy and answers
with the key encrypted to a key only this enclave holds. The data is encrypted here with
AES-256-GCM and only two things leave: the ciphertext and the KMS ``CiphertextBlob`` of
the data key ("wrapped key"). ``unseal`` sends the wrapped key back to KMS through
``Decrypt`` with ``Recipient``: an enclave built from any other code (another PCR0), a
debug enclave (PCR0 zero) or the operator on the parent (no attestation at all) is denied
by the key policy, so the sealed data can only be read inside this image.

The KMS key id comes from the operator-signed runtime config::

    {"kms": {"endpoint": "host:port", "region": "us-east-1", "scheme": "http"},
     "vault": {"key_id": "<key id, ARN or alias>"}}
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hermetic.enclave import App
from hermetic.errors import ServiceError

ENCRYPTION_CONTEXT = {"service": "hermetic-vault"}
"""KMS encryption context: binds every wrapped key to this service (and shows in KMS logs)."""
AAD = b"hermetic vault v1"
NONCE_SIZE = 12
_BYTES, _TEXT = b"\x00", b"\x01"  # what seal was given, so unseal returns the same type

app = App()


def _key_id() -> str:
    config = app.context.config
    section = config.values.get("vault") if config is not None else None
    key_id = section.get("key_id") if isinstance(section, dict) else None
    if not isinstance(key_id, str) or not key_id:
        raise ServiceError("config vault.key_id: expected a KMS key id, got none", "NotConfigured")
    return key_id


def _kms() -> Any:
    kms = app.context.kms
    if kms is None:
        raise ServiceError("config kms: expected a KMS section, got none", "NotConfigured")
    return kms


def _b64(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise ServiceError(f"{field}: expected base64 text, got {type(value).__name__}", "Invalid")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(f"{field}: expected base64 text", "Invalid") from None


@app.method("seal")
async def seal(plaintext: str | bytes) -> dict[str, str]:
    """Encrypt ``plaintext`` under a fresh KMS data key; return ciphertext and wrapped key."""
    if isinstance(plaintext, str):
        data = _TEXT + plaintext.encode("utf-8")
    elif isinstance(plaintext, bytes):
        data = _BYTES + plaintext
    else:
        raise ServiceError(
            f"plaintext: expected text or bytes, got {type(plaintext).__name__}", "Invalid"
        )
    kms = _kms()
    data_key = await asyncio.to_thread(
        kms.generate_data_key, _key_id(), encryption_context=ENCRYPTION_CONTEXT
    )
    nonce = os.urandom(NONCE_SIZE)
    sealed = nonce + AESGCM(data_key.plaintext).encrypt(nonce, data, AAD)
    return {
        "ciphertext": base64.b64encode(sealed).decode("ascii"),
        "wrapped_key": base64.b64encode(data_key.ciphertext_blob).decode("ascii"),
    }


@app.method("unseal")
async def unseal(sealed: dict[str, object]) -> str | bytes:
    """Unwrap the data key through KMS (attested) and decrypt; the inverse of ``seal``."""
    if not isinstance(sealed, dict):
        raise ServiceError(
            f"sealed: expected {{ciphertext, wrapped_key}}, got {type(sealed).__name__}",
            "Invalid",
        )
    ciphertext = _b64(sealed.get("ciphertext"), "ciphertext")
    wrapped_key = _b64(sealed.get("wrapped_key"), "wrapped_key")
    if len(ciphertext) < NONCE_SIZE + 16 + 1:
        raise ServiceError(
            f"ciphertext: expected at least 29 bytes, got {len(ciphertext)}", "Invalid"
        )
    kms = _kms()
    key = await asyncio.to_thread(
        kms.decrypt, wrapped_key, key_id=_key_id(), encryption_context=ENCRYPTION_CONTEXT
    )
    try:
        data = AESGCM(key).decrypt(ciphertext[:NONCE_SIZE], ciphertext[NONCE_SIZE:], AAD)
    except (InvalidTag, ValueError):
        raise ServiceError(
            "ciphertext: does not authenticate under the data key", "Invalid"
        ) from None
    kind, body = data[:1], data[1:]
    if kind == _TEXT:
        return body.decode("utf-8")
    return body
