"""Runtime config bundles: operator-signed, verified against the key in the image."""

from __future__ import annotations

import hashlib

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given
from hypothesis import strategies as st

from hermetic.enclave.config import sign_config, verify_bundle
from hermetic.errors import RuntimeConfigError, RuntimeConfigFormatError

CONFIG = b'{"environment": "staging", "max_batch": 64}'


def _pem(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def operator() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def test_signed_bundle_verifies_and_digest_is_sha256_of_config(
    operator: ed25519.Ed25519PrivateKey,
) -> None:
    config = verify_bundle(sign_config(CONFIG, operator), _pem(operator))
    assert config.values == {"environment": "staging", "max_batch": 64}
    assert config.digest == hashlib.sha256(CONFIG).digest()


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_ecdsa_operator_keys_work_too(curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve)
    assert verify_bundle(sign_config(CONFIG, key), _pem(key)).data == CONFIG


def test_bundle_signed_by_another_key_is_rejected(operator: ed25519.Ed25519PrivateKey) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(RuntimeConfigError, match="does not verify with the image's operator key"):
        verify_bundle(sign_config(CONFIG, other), _pem(operator))


def test_unsigned_bundle_is_rejected(operator: ed25519.Ed25519PrivateKey) -> None:
    bundle = cbor2.dumps({"config": CONFIG, "signature": b""})
    with pytest.raises(RuntimeConfigError, match="expected an operator signature, got none"):
        verify_bundle(bundle, _pem(operator))


def test_tampered_config_is_rejected(operator: ed25519.Ed25519PrivateKey) -> None:
    good = cbor2.loads(sign_config(CONFIG, operator))
    tampered = cbor2.dumps({"config": CONFIG.replace(b"64", b"65"), "signature": good["signature"]})
    with pytest.raises(RuntimeConfigError, match="tampered"):
        verify_bundle(tampered, _pem(operator))


def test_every_single_byte_mutation_of_a_bundle_is_rejected(
    operator: ed25519.Ed25519PrivateKey,
) -> None:
    bundle = sign_config(CONFIG, operator)
    pem = _pem(operator)
    for i in range(len(bundle)):
        mutated = bytearray(bundle)
        mutated[i] ^= 0x01
        with pytest.raises(RuntimeConfigError):
            verify_bundle(bytes(mutated), pem)


@given(st.binary(max_size=200))
def test_junk_bundles_raise_only_config_errors(junk: bytes) -> None:
    pem = _pem(ed25519.Ed25519PrivateKey.from_private_bytes(b"\x01" * 32))
    with pytest.raises(RuntimeConfigError):
        verify_bundle(junk, pem)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (b"[1, 2]", r"config: expected a JSON object, got list"),
        (b"\xff", r"config: not valid UTF-8 \(byte 0\)"),
        (b"not json", r"config: not valid JSON \(Expecting value at line 1 column 1\)"),
        (b'{"a": 1, "a": 2}', r"config: duplicate object key"),
        (b'{"a": "\\ud800"}', r"config: lone UTF-16 surrogate"),
        (b'{"a": NaN}', r"config: NaN is not allowed"),
        (b"[" * 65536 + b"]" * 65536, r"config: nesting depth above"),
    ],
)
def test_config_must_be_a_strict_json_object(
    operator: ed25519.Ed25519PrivateKey, config: bytes, message: str
) -> None:
    with pytest.raises(RuntimeConfigFormatError, match=f"^{message}"):
        sign_config(config, operator)
