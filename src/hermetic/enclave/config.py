"""Runtime config bundles: configuration an operator signs and the enclave verifies at boot.

One image can then serve several environments (peers.md P8) without each environment
needing its own measured build, and without trusting the parent: the parent only carries
the bundle, the enclave checks it against the operator key baked into its (measured)
manifest, and puts ``SHA-256(config)`` into the ``user_data`` of every attestation
document, so clients see which configuration their session runs under.

Bundle encoding (CBOR map, canonical)::

    {"config": bstr (UTF-8 JSON object), "signature": bstr}

The signature covers ``b"hermetic runtime config v1\\x00" || config`` (domain separated,
so it cannot be replayed as some other signed hermetic object). Ed25519 is the documented
operator key type; an ECDSA P-256/P-384 operator key (the manifest allows them) signs
with SHA-256/SHA-384 respectively.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from hermetic import jsontext
from hermetic.cbor import canonical_dumps, strict_loads
from hermetic.enclave.app import RuntimeConfig
from hermetic.errors import RuntimeConfigError, RuntimeConfigFormatError

SIGNING_CONTEXT = b"hermetic runtime config v1\x00"
MAX_BUNDLE_SIZE = 1024 * 1024

_EC_CURVES = frozenset({"secp256r1", "secp384r1"})

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def config_digest(config: bytes) -> bytes:
    """SHA-256 of the config bytes: what goes into attestation ``user_data``."""
    return hashlib.sha256(config).digest()


def sign_config(config: bytes, key: PrivateKey) -> bytes:
    """Make a bundle from config bytes (a UTF-8 JSON object) and the operator's key."""
    parse_values(config)
    message = SIGNING_CONTEXT + config
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(message)
    else:
        signature = key.sign(message, ec.ECDSA(_ec_hash(key.curve)))
    return canonical_dumps(
        {"config": config, "signature": signature},
        what="config bundle",
        error=RuntimeConfigFormatError,
    )


def parse_bundle(bundle: bytes) -> tuple[bytes, bytes]:
    """Split a bundle into ``(config, signature)`` without verifying anything."""
    if len(bundle) > MAX_BUNDLE_SIZE:
        raise RuntimeConfigFormatError(
            f"config bundle size: expected at most {MAX_BUNDLE_SIZE} bytes, got {len(bundle)}"
        )
    value = strict_loads(bundle, what="config bundle", error=RuntimeConfigFormatError)
    if not isinstance(value, dict) or set(value) != {"config", "signature"}:
        keys = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
        raise RuntimeConfigFormatError(
            f"config bundle: expected a map with 'config' and 'signature', got {keys}"
        )
    config, signature = value["config"], value["signature"]
    if not isinstance(config, bytes) or not isinstance(signature, bytes):
        raise RuntimeConfigFormatError("config bundle: 'config' and 'signature' must be bytes")
    return config, signature


def verify_bundle(bundle: bytes, operator_key_pem: bytes) -> RuntimeConfig:
    """Verify a bundle against the operator key (PEM); return the config or raise."""
    config, signature = parse_bundle(bundle)
    if not signature:
        raise RuntimeConfigError(
            "config bundle signature: expected an operator signature, got none"
        )
    key = _load_key(operator_key_pem)
    message = SIGNING_CONTEXT + config
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            key.verify(signature, message, ec.ECDSA(_ec_hash(key.curve)))
    except InvalidSignature:
        raise RuntimeConfigError(
            "config bundle signature: does not verify with the image's operator key "
            "(tampered config or wrong key)"
        ) from None
    return RuntimeConfig(config, parse_values(config), config_digest(config))


def load_operator_key(pem: bytes) -> PrivateKey:
    """The operator's private key from unencrypted PEM: Ed25519, or ECDSA P-256/P-384."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise RuntimeConfigFormatError(
            "operator key: expected an unencrypted PEM private key"
        ) from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_CURVES:
        return key
    shown = key.curve.name if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
    raise RuntimeConfigFormatError(
        f"operator key: expected Ed25519 or ECDSA P-256/P-384, got {shown}"
    )


def parse_values(config: bytes) -> dict[str, Any]:
    """The config's values: strict JSON (:mod:`hermetic.jsontext`, numbers may be
    fractional) that must be an object; the app reads exactly what the operator signed."""
    values = jsontext.loads(
        config, what="config", error=RuntimeConfigFormatError, allow_floats=True
    )
    if not isinstance(values, dict):
        raise RuntimeConfigFormatError(
            f"config: expected a JSON object, got {type(values).__name__}"
        )
    return values


def _load_key(pem: bytes) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise RuntimeConfigError("operator key: not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise RuntimeConfigError(
            f"operator key: expected Ed25519 or ECDSA, got {type(key).__name__}"
        )
    return key


def _ec_hash(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    return hashes.SHA384() if curve.key_size >= 384 else hashes.SHA256()
