"""Image signatures in nitro-cli's format: a certificate plus COSE_Sign1 over PCR0.

EIF signing (aws-nitro-enclaves-image-format ``eif_signer.rs``) stores a CBOR list of
``PcrSignature{signing_certificate, signature}``; ``signature`` is an untagged COSE_Sign1
whose payload is ``PcrInfo{register_index: 0, register_value: PCR0}``. The byte strings
are serialised by serde_cbor as arrays of unsigned integers, not CBOR byte strings, and we
reproduce that exactly so one codec serves EIFs and hermetic images. PCR8 is then
``SHA384(0^48 || SHA384(DER(certificate)))``.

COSE_Sign1 is built and checked here by hand because the only part needed (ECDSA over the
RFC 9052 Sig_structure with a one-entry protected header) is a few lines on top of
cryptography and cbor2, and no maintained Python COSE library is in the locked set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from hermetic.cbor import strict_loads
from hermetic.errors import ImageSignatureError, ImageSignatureFormatError, SigningKeyError
from hermetic.image.pcrs import pcr_of

# COSE algorithm ids (RFC 9053) for the curves nitro-cli accepts.
_ALGORITHMS: dict[int, tuple[type[ec.EllipticCurve], hashes.HashAlgorithm, int]] = {
    -7: (ec.SECP256R1, hashes.SHA256(), 32),
    -35: (ec.SECP384R1, hashes.SHA384(), 48),
    -36: (ec.SECP521R1, hashes.SHA512(), 66),
}
MAX_SIGNATURE_SECTION = 1 << 20
MAX_SIGNERS = 16


@dataclass(frozen=True)
class PcrSignature:
    """One signer: its PEM certificate and the untagged COSE_Sign1 over PCR0."""

    certificate_pem: bytes
    cose_sign1: bytes

    def certificate(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.certificate_pem)
        except Exception:  # native parser: any failure means "not a certificate"
            raise ImageSignatureFormatError(
                "signature section: signing_certificate is not a PEM X.509 certificate"
            ) from None

    def certificate_der(self) -> bytes:
        return self.certificate().public_bytes(serialization.Encoding.DER)

    def pcr8(self) -> bytes:
        """``SHA384(0^48 || SHA384(DER))``, as nitro-cli computes PCR8."""
        return pcr_of(self.certificate_der())


def _uint_array(data: bytes) -> list[int]:
    return list(data)


def _from_uint_array(value: object, field: str) -> bytes:
    if not isinstance(value, list):
        raise ImageSignatureFormatError(
            f"signature section: {field} must be an array of uints, got {type(value).__name__}"
        )
    if not all(type(b) is int and 0 <= b <= 255 for b in value):
        raise ImageSignatureFormatError(f"signature section: {field} holds a non-byte element")
    return bytes(value)


def pcr_info(pcr0: bytes) -> bytes:
    """serde_cbor's encoding of ``PcrInfo{register_index: 0, register_value: pcr0}``."""
    return cbor2.dumps({"register_index": 0, "register_value": _uint_array(pcr0)})


def encode_signature_section(signatures: Sequence[PcrSignature]) -> bytes:
    return cbor2.dumps(
        [
            {
                "signing_certificate": _uint_array(s.certificate_pem),
                "signature": _uint_array(s.cose_sign1),
            }
            for s in signatures
        ]
    )


def decode_signature_section(data: bytes) -> tuple[PcrSignature, ...]:
    """Parse a signature section strictly (list of PcrSignature maps, byte arrays)."""
    if len(data) > MAX_SIGNATURE_SECTION:
        raise ImageSignatureFormatError(
            f"signature section: {len(data)} bytes, at most {MAX_SIGNATURE_SECTION}"
        )
    value = _cbor_loads(data, "signature section")
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SIGNERS:
        raise ImageSignatureFormatError(
            f"signature section: expected a list of 1..{MAX_SIGNERS} PcrSignature maps"
        )
    out = []
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != {"signing_certificate", "signature"}:
            raise ImageSignatureFormatError(
                "signature section: each entry must be a map with exactly "
                "'signing_certificate' and 'signature'"
            )
        out.append(
            PcrSignature(
                certificate_pem=_from_uint_array(
                    entry["signing_certificate"], "signing_certificate"
                ),
                cose_sign1=_from_uint_array(entry["signature"], "signature"),
            )
        )
    return tuple(out)


def _cbor_loads(data: bytes, what: str) -> Any:
    return strict_loads(data, what=what, error=ImageSignatureFormatError)


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload])


def load_signing_pair(key_pem: bytes, cert_pem: bytes) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """Check that the key is ECDSA on a nitro-cli curve and matches the certificate."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except Exception:
        raise SigningKeyError("signing key: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not any(
        isinstance(key.curve, curve) for curve, _, _ in _ALGORITHMS.values()
    ):
        raise SigningKeyError(
            f"signing key: must be ECDSA P-256/P-384/P-521 like nitro-cli, got {type(key).__name__}"
        )
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except Exception:
        raise SigningKeyError("signing certificate: not a PEM X.509 certificate") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) != key.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise SigningKeyError("signing certificate: its public key does not match the signing key")
    return key, cert.public_bytes(serialization.Encoding.PEM)


def sign_pcr0(pcr0: bytes, key_pem: bytes, cert_pem: bytes) -> PcrSignature:
    """Sign PCR0 like ``nitro-cli build-enclave --signing-certificate --private-key``."""
    key, cert = load_signing_pair(key_pem, cert_pem)
    alg = next(a for a, (curve, _, _) in _ALGORITHMS.items() if isinstance(key.curve, curve))
    _, hash_alg, size = _ALGORITHMS[alg]
    protected = cbor2.dumps({1: alg})
    payload = pcr_info(pcr0)
    der = key.sign(_sig_structure(protected, payload), ec.ECDSA(hash_alg))
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    cose = cbor2.dumps([protected, {}, payload, raw])
    return PcrSignature(certificate_pem=cert, cose_sign1=cose)


def verify_pcr0_signature(signature: PcrSignature, pcr0: bytes) -> None:
    """Check the COSE_Sign1 is over ``PcrInfo(0, pcr0)`` and verifies with the certificate."""
    cert = signature.certificate()
    value = _cbor_loads(signature.cose_sign1, "COSE_Sign1")
    if isinstance(value, cbor2.CBORTag) and value.tag == 18:
        value = value.value
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not isinstance(value[0], bytes)
        or not isinstance(value[1], dict)
        or not isinstance(value[2], bytes)
        or not isinstance(value[3], bytes)
    ):
        raise ImageSignatureFormatError(
            "COSE_Sign1: expected [protected bstr, unprotected map, payload bstr, signature bstr]"
        )
    protected, _, payload, raw = value
    header = _cbor_loads(protected, "COSE_Sign1 protected header")
    alg = header.get(1) if isinstance(header, dict) else None
    if alg not in _ALGORITHMS:
        raise ImageSignatureFormatError(
            f"COSE_Sign1: protected alg must be ES256/ES384/ES512, got {alg!r}"
        )
    curve, hash_alg, size = _ALGORITHMS[alg]
    info = _cbor_loads(payload, "PcrInfo")
    if not isinstance(info, dict) or set(info) != {"register_index", "register_value"}:
        raise ImageSignatureFormatError("PcrInfo: expected register_index and register_value")
    if type(info["register_index"]) is not int or info["register_index"] != 0:
        raise ImageSignatureError(
            f"PcrInfo: register_index must be 0 (PCR0), got {info['register_index']!r}"
        )
    signed_pcr0 = _from_uint_array(info["register_value"], "PcrInfo.register_value")
    if signed_pcr0 != pcr0:
        raise ImageSignatureError(
            f"PcrInfo: signed PCR0 {signed_pcr0.hex()} differs from the image's {pcr0.hex()}"
        )
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, curve
    ):
        raise ImageSignatureError(
            f"signing certificate: key does not match COSE alg {alg} ({curve.name})"
        )
    if len(raw) != 2 * size:
        raise ImageSignatureFormatError(
            f"COSE_Sign1: signature must be {2 * size} bytes for alg {alg}, got {len(raw)}"
        )
    der = encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))
    try:
        public_key.verify(der, _sig_structure(protected, payload), ec.ECDSA(hash_alg))
    except InvalidSignature:
        raise ImageSignatureError(
            "COSE_Sign1: the signature over PCR0 does not verify with the signing certificate"
        ) from None


def certificate_fingerprint(signature: PcrSignature) -> str:
    """SHA-256 of the certificate DER, for display."""
    return hashlib.sha256(signature.certificate_der()).hexdigest()
