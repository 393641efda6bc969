"""Nitro attestation documents: decode, encode and verify the evidence an enclave presents.

The public surface is small on purpose: the codec (:mod:`hermetic.attestation.codec`),
and the verifier with its trust roots and policy. Everything a relying party needs is
re-exported here.
"""

from __future__ import annotations

from hermetic.attestation.chain import CertificateInfo
from hermetic.attestation.codec import (
    PROTECTED_ES384,
    AttestationDocument,
    CoseSign1,
    decode,
    decode_cose_sign1,
    decode_payload,
    encode_cose_sign1,
    encode_payload,
    sig_structure,
)
from hermetic.attestation.roots import TrustRoot
from hermetic.attestation.verifier import (
    AttestationVerifier,
    Policy,
    VerifiedDocument,
    verify,
)

__all__ = [
    "PROTECTED_ES384",
    "AttestationDocument",
    "AttestationVerifier",
    "CertificateInfo",
    "CoseSign1",
    "Policy",
    "TrustRoot",
    "VerifiedDocument",
    "decode",
    "decode_cose_sign1",
    "decode_payload",
    "encode_cose_sign1",
    "encode_payload",
    "sig_structure",
    "verify",
]
