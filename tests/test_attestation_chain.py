"""The AWS chain profile, on a locally built PKI shaped like AWS's.

Real documents only show the happy path of the constraints; here each constraint is broken
on purpose in an otherwise valid chain (root -> regional -> zonal -> instance -> leaf, P-384)
and the document is signed with our own codec, so every check is shown to fire.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from hermetic.attestation import (
    AttestationDocument,
    AttestationVerifier,
    Policy,
    TrustRoot,
    encode_cose_sign1,
    encode_payload,
    sig_structure,
    verify,
)
from hermetic.attestation.roots import dev_root_path
from hermetic.errors import (
    AttestationFormatError,
    CertificateChainError,
    CertificateValidityError,
    SignatureInvalidError,
    UntrustedRootError,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
PCR0 = bytes(range(48))


@dataclasses.dataclass
class Spec:
    """How to build one certificate; tests change a field to break one constraint."""

    cn: str
    ca: bool = True
    path_length: int | None = None
    key_cert_sign: bool = True
    digital_signature: bool = True
    curve: ec.EllipticCurve = dataclasses.field(default_factory=ec.SECP384R1)
    not_before: datetime = NOW - timedelta(hours=1)
    not_after: datetime = NOW + timedelta(hours=2)
    extra_critical: bool = False
    signer_override: ec.EllipticCurvePrivateKey | None = None


def _chain_specs() -> list[Spec]:
    return [
        Spec("test.nitro-enclaves", not_after=NOW + timedelta(days=3650)),
        Spec("regional.test", path_length=2),
        Spec("zonal.test", path_length=1),
        Spec("instance.test", path_length=0, digital_signature=False),
        Spec("i-0123-enc0456.test", ca=False, key_cert_sign=False),
    ]


@dataclasses.dataclass
class Built:
    root_pem: bytes
    cabundle: list[bytes]
    leaf: bytes
    leaf_key: ec.EllipticCurvePrivateKey
    issuer_key: ec.EllipticCurvePrivateKey


def _build(specs: list[Spec]) -> Built:
    ders: list[bytes] = []
    issuer_key: ec.EllipticCurvePrivateKey | None = None
    issuer_name: x509.Name | None = None
    key: ec.EllipticCurvePrivateKey | None = None
    keys: list[ec.EllipticCurvePrivateKey] = []
    for serial, spec in enumerate(specs, start=1):
        key = ec.generate_private_key(spec.curve)
        keys.append(key)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.cn)])
        signer = spec.signer_override or issuer_key or key
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_name or name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(spec.not_before)
            .not_valid_after(spec.not_after)
            .add_extension(
                x509.BasicConstraints(
                    ca=spec.ca, path_length=spec.path_length if spec.ca else None
                ),
                critical=True,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=spec.digital_signature,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=spec.key_cert_sign,
                    crl_sign=spec.ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=spec.ca,
            )
        )
        if spec.extra_critical:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(
                    x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"
                ),
                critical=True,
            )
        cert = builder.sign(signer, hashes.SHA384())
        ders.append(cert.public_bytes(serialization.Encoding.DER))
        issuer_key, issuer_name = key, name
    assert key is not None
    assert len(keys) == len(specs)
    root = x509.load_der_x509_certificate(ders[0])
    return Built(
        root_pem=root.public_bytes(serialization.Encoding.PEM),
        cabundle=ders[:-1],
        leaf=ders[-1],
        leaf_key=key,
        issuer_key=keys[-2],
    )


def _sign(built: Built, **fields: object) -> bytes:
    values: dict[str, object] = {
        "module_id": "i-0123-enc0456",
        "digest": "SHA384",
        "timestamp": int(NOW.timestamp() * 1000),
        "pcrs": {i: (PCR0 if i == 0 else bytes(48)) for i in range(16)},
        "certificate": built.leaf,
        "cabundle": tuple(built.cabundle),
        "public_key": None,
        "user_data": None,
        "nonce": b"fresh nonce",
    }
    values.update(fields)
    doc = AttestationDocument(**values)  # type: ignore[arg-type]
    payload = encode_payload(doc)
    der = built.leaf_key.sign(
        sig_structure(bytes.fromhex("a1013822"), payload), ec.ECDSA(hashes.SHA384())
    )
    r, s = decode_dss_signature(der)
    return encode_cose_sign1(payload, r.to_bytes(48, "big") + s.to_bytes(48, "big"))


def _verify(built: Built, data: bytes, now: datetime = NOW) -> None:
    verify(data, root=TrustRoot.from_pem(built.root_pem), now=now)


@pytest.fixture(scope="module")
def good() -> Built:
    return _build(_chain_specs())


def test_locally_built_aws_shaped_chain_verifies(good: Built) -> None:
    data = _sign(good)
    result = verify(
        data,
        root=TrustRoot.from_pem(good.root_pem),
        policy=Policy(pcrs={0: PCR0}, nonce=b"fresh nonce"),
        now=NOW,
    )
    assert result.chain_subjects == (
        "CN=i-0123-enc0456.test",
        "CN=instance.test",
        "CN=zonal.test",
        "CN=regional.test",
        "CN=test.nitro-enclaves",
    )
    assert not result.debug


def test_same_document_is_untrusted_under_the_aws_root(good: Built) -> None:
    with pytest.raises(UntrustedRootError):
        verify(_sign(good), root=TrustRoot.aws(), now=NOW)


def _broken(index: int, **changes: object) -> Built:
    specs = _chain_specs()
    specs[index] = dataclasses.replace(specs[index], **changes)  # type: ignore[arg-type]
    return _build(specs)


@pytest.mark.parametrize(
    ("index", "changes", "needle"),
    [
        (4, {"ca": True, "key_cert_sign": True}, "leaf expected CA:FALSE"),
        (4, {"digital_signature": False}, "must include digitalSignature"),
        (4, {"curve": ec.SECP256R1()}, "expected a P-384 public key"),
        (2, {"ca": False}, "expected basic constraints CA:TRUE"),
        (2, {"key_cert_sign": False}, "must include keyCertSign"),
        (1, {"path_length": 1}, "pathLenConstraint 1 but 2 CA certificate(s) follow"),
        (3, {"extra_critical": True}, "unsupported critical extension 1.3.6.1.4.1.99999.1"),
        (0, {"key_cert_sign": False}, "root key usage must include keyCertSign"),
    ],
)
def test_broken_constraint_is_rejected(index: int, changes: dict[str, object], needle: str) -> None:
    built = _broken(index, **changes)
    with pytest.raises(CertificateChainError) as info:
        _verify(built, _sign(built))
    assert needle in str(info.value)


def test_certificate_signed_by_the_wrong_key_is_rejected() -> None:
    built = _broken(3, signer_override=ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(CertificateChainError, match=r"cabundle\[3\]: signature does not verify"):
        _verify(built, _sign(built))


def test_cabundle_out_of_order_is_rejected(good: Built) -> None:
    swapped = (good.cabundle[0], good.cabundle[2], good.cabundle[1], good.cabundle[3])
    with pytest.raises(CertificateChainError, match="not issued by"):
        _verify(good, _sign(good, cabundle=swapped))


def test_leaf_not_yet_valid_is_rejected() -> None:
    built = _broken(4, not_before=NOW + timedelta(minutes=1))
    with pytest.raises(CertificateValidityError, match="leaf certificate"):
        _verify(built, _sign(built))


def test_expired_intermediate_is_rejected_even_with_a_valid_leaf() -> None:
    built = _broken(2, not_after=NOW - timedelta(seconds=1))
    with pytest.raises(CertificateValidityError, match=r"CN=zonal\.test"):
        _verify(built, _sign(built))


def test_document_signed_by_another_key_is_rejected(good: Built) -> None:
    impostor = dataclasses.replace(good, leaf_key=ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(SignatureInvalidError):
        _verify(good, _sign(impostor))


def test_garbage_certificate_is_a_format_error(good: Built) -> None:
    with pytest.raises(AttestationFormatError, match=r"certificate: not a DER X\.509"):
        _verify(good, _sign(good, certificate=b"\x30\x03\x02\x01\x01"))


def _second_leaf(built: Built) -> Built:
    """Another leaf from the same instance CA (as an NSM issues for a new enclave)."""
    key = ec.generate_private_key(ec.SECP384R1())
    instance = x509.load_der_x509_certificate(built.cabundle[-1])
    leaf = x509.load_der_x509_certificate(built.leaf)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "second.test")]))
        .issuer_name(instance.subject)
        .public_key(key.public_key())
        .serial_number(99)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
        .add_extension(
            leaf.extensions.get_extension_for_class(x509.BasicConstraints).value, critical=True
        )
        .add_extension(leaf.extensions.get_extension_for_class(x509.KeyUsage).value, critical=False)
        .sign(built.issuer_key, hashes.SHA384())
    )
    return dataclasses.replace(
        built, leaf=cert.public_bytes(serialization.Encoding.DER), leaf_key=key
    )


def test_cached_issuers_serve_a_new_leaf_but_not_a_foreign_one(good: Built) -> None:
    verifier = AttestationVerifier(TrustRoot.from_pem(good.root_pem))
    verifier.verify(_sign(good), now=NOW)
    second = verifier.verify(_sign(_second_leaf(good)), now=NOW)
    assert second.chain_subjects[0] == "CN=second.test"
    assert verifier.cached_chains == 2
    # A leaf from another PKI, presented with the (cached) CA part of this one.
    foreign = _build(_chain_specs())
    mixed = _sign(dataclasses.replace(foreign, cabundle=good.cabundle))
    with pytest.raises(CertificateChainError, match="certificate: signature does not verify"):
        verifier.verify(mixed, now=NOW)
    assert verifier.cached_chains == 2


def test_cli_accepts_dev_root_and_pem_root(good: Built, tmp_path: Path) -> None:
    document = tmp_path / "doc.cbor"
    document.write_bytes(_sign(good))
    pem = tmp_path / "root.pem"
    pem.write_bytes(good.root_pem)
    dev = dev_root_path()
    dev.parent.mkdir(parents=True)
    dev.write_bytes(good.root_pem)
    at = NOW.isoformat()
    for root in (str(pem), "dev"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "hermetic",
                "attestation",
                "verify",
                str(document),
                "--root",
                root,
                "--at",
                at,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "verified: i-0123-enc0456" in result.stdout
    rejected = subprocess.run(
        [sys.executable, "-m", "hermetic", "attestation", "verify", str(document), "--at", at],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rejected.returncode == 1
    assert "UntrustedRootError" in rejected.stderr
