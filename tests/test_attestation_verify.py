"""The verifier against the real Nitro documents, through the Python API.

The table below is data copied from vectors/nitro/README.md (verify-at time and reference
PCRs), so the tests compare against the published values, not against our own output.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hermetic.attestation import (
    AttestationVerifier,
    Policy,
    TrustRoot,
    VerifiedDocument,
    decode,
    verify,
)
from hermetic.errors import (
    CertificateValidityError,
    DebugModeError,
    DocumentAgeError,
    NonceMismatchError,
    PCRMismatchError,
    PublicKeyMismatchError,
    SignatureInvalidError,
    TrustRootError,
    UntrustedRootError,
    UsageError,
    UserDataMismatchError,
)

Z = "0" * 96


@dataclasses.dataclass(frozen=True)
class Vector:
    name: str
    verify_at: int
    pcr0: str
    pcr1: str
    pcr2: str
    pcr8: str
    debug: bool


VECTORS = [
    Vector(
        "evervault-1",
        1665651482,
        "f4d48b81a460c9916d1e685119074bf24660afd3e34fae9fca0a0d28d9d5599936332687e6f66fc890ac8cf150142d8b",
        "bcdf05fefccaa8e55bf2c8d6dee9e79bbff31e34bf28a99aa19e6b29c37ee80b214a414b7607236edf26fcb78654e63f",
        "d8f114da658de5481f8d9ec73907feb553560787522f705c92d7d96beed8e15e2aa611984e098c576832c292e8dc469a",
        "8790eb3cce6c83d07e84b126dc61ca923333d6f66615c4a79157de48c5ab2418bdc60746ea7b7afbff03a1c6210201cb",
        False,
    ),
    Vector("evervault-2", 1665582606, Z, Z, Z, Z, True),
    Vector("evervault-3", 1695049410, Z, Z, Z, Z, True),
    Vector("evervault-5", 1674054632, Z, Z, Z, Z, True),
    Vector("libsignal-1", 1684358511, Z, Z, Z, Z, True),
    Vector(
        "libsignal-2",
        1705431295,
        "67fdc91606ca9d5e73c35412f7d22397deb3f56ff2365803c66f0924f1dbeb29517fa4a62014b0bf49bd59541e4bcdd7",
        "52b919754e1643f4027eeee8ec39cc4a2cb931723de0c93ce5cc8d407467dc4302e86490c01c0d755acfe10dbf657546",
        "18e034916997b8e97edfc79e743f70ddcef21a45841a7a8727e2b6d094b1941bd6f988d806df1471025bcccfe35c4572",
        Z,
        False,
    ),
    Vector(
        "nitrite-blocky-1",
        1725719859,
        "e72a46ca80a260fb044a125442f0c7e331813bcbaf9724d9f3857758992766f2d65710a27aa94ae3949dd54e7c9fe86a",
        "0343b056cd8485ca7890ddd833476d78460aed2aa161548e4e26bedf321726696257d623e8805f3f605946b3d8b0c6aa",
        "d5dcbdea0aa39c802f9d55ced2ea6e4d74ecec5f08fe40c508882639c9090642669106a062a3e24ee2805a3024b9b75c",
        Z,
        False,
    ),
    Vector("fastcrypto-1", 1731627989, Z, Z, Z, Z, True),
]
IDS = [v.name for v in VECTORS]


def _data(vectors: Path, vector: Vector) -> bytes:
    return (vectors / "nitro" / f"{vector.name}.cbor").read_bytes()


def _at(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def _reference(vector: Vector) -> dict[int, bytes]:
    return {
        0: bytes.fromhex(vector.pcr0),
        1: bytes.fromhex(vector.pcr1),
        2: bytes.fromhex(vector.pcr2),
        8: bytes.fromhex(vector.pcr8),
    }


def _window_end(data: bytes) -> datetime:
    """Earliest notAfter over leaf and cabundle, computed from the certificates themselves."""
    _, doc = decode(data)
    certs = [x509.load_der_x509_certificate(der) for der in (doc.certificate, *doc.cabundle)]
    return min(cert.not_valid_after_utc for cert in certs)


@pytest.fixture(scope="module")
def aws() -> TrustRoot:
    return TrustRoot.aws()


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_verifies_at_its_time_with_reference_pcrs(
    vectors: Path, vector: Vector, aws: TrustRoot
) -> None:
    policy = Policy(pcrs=_reference(vector), allow_debug=vector.debug)
    result = verify(_data(vectors, vector), root=aws, policy=policy, now=_at(vector.verify_at))
    assert {i: result.pcrs[i].hex() for i in (0, 1, 2, 8)} == {
        0: vector.pcr0,
        1: vector.pcr1,
        2: vector.pcr2,
        8: vector.pcr8,
    }
    assert result.debug is vector.debug
    assert abs(result.timestamp - _at(vector.verify_at)) < timedelta(seconds=1)
    assert result.chain_subjects[-1] == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    assert result.module_id in result.chain_subjects[0]
    assert len(result.certificates) == 5


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_is_valid_until_window_end_and_rejected_one_second_later(
    vectors: Path, vector: Vector, aws: TrustRoot
) -> None:
    data = _data(vectors, vector)
    end = _window_end(data)
    assert end > _at(vector.verify_at)
    policy = Policy(allow_debug=True, max_clock_skew=timedelta(days=1))
    verify(data, root=aws, policy=policy, now=end)
    with pytest.raises(CertificateValidityError, match="not at"):
        verify(data, root=aws, policy=policy, now=end + timedelta(seconds=1))


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_is_rejected_at_the_current_time(
    vectors: Path, vector: Vector, aws: TrustRoot
) -> None:
    with pytest.raises(CertificateValidityError):
        verify(_data(vectors, vector), root=aws, policy=Policy(allow_debug=True))


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_is_rejected_with_a_wrong_reference_pcr(
    vectors: Path, vector: Vector, aws: TrustRoot
) -> None:
    wrong = bytearray.fromhex(vector.pcr2)
    wrong[-1] ^= 1
    policy = Policy(pcrs={2: bytes(wrong)}, allow_debug=True)
    with pytest.raises(PCRMismatchError) as info:
        verify(_data(vectors, vector), root=aws, policy=policy, now=_at(vector.verify_at))
    assert f"PCR2: expected {bytes(wrong).hex()}, got {vector.pcr2}" in str(info.value)


@pytest.mark.parametrize("vector", [v for v in VECTORS if v.debug], ids=lambda v: v.name)
def test_debug_vector_is_rejected_unless_debug_is_allowed(
    vectors: Path, vector: Vector, aws: TrustRoot
) -> None:
    with pytest.raises(DebugModeError):
        verify(_data(vectors, vector), root=aws, now=_at(vector.verify_at))


def test_missing_reference_pcr_is_a_mismatch(vectors: Path, aws: TrustRoot) -> None:
    vector = VECTORS[0]
    with pytest.raises(PCRMismatchError, match="PCR20: expected 00"):
        verify(
            _data(vectors, vector),
            root=aws,
            policy=Policy(pcrs={20: bytes(48)}),
            now=_at(vector.verify_at),
        )


def _vector(name: str) -> Vector:
    return next(v for v in VECTORS if v.name == name)


def test_nonce_public_key_and_user_data_are_bound(vectors: Path, aws: TrustRoot) -> None:
    vector = _vector("nitrite-blocky-1")
    data, now = _data(vectors, vector), _at(vector.verify_at)
    ones = b"\x01" * 1024
    ok = Policy(nonce=ones, public_key=ones, user_data=ones)
    assert verify(data, root=aws, policy=ok, now=now).nonce == ones
    cases: list[tuple[Policy, type[Exception]]] = [
        (Policy(nonce=ones[:-1] + b"\x02"), NonceMismatchError),
        (Policy(public_key=b"other key"), PublicKeyMismatchError),
        (Policy(user_data=b""), UserDataMismatchError),
    ]
    for policy, error in cases:
        with pytest.raises(error):
            verify(data, root=aws, policy=policy, now=now)


def test_expected_nonce_on_document_without_nonce_is_rejected(
    vectors: Path, aws: TrustRoot
) -> None:
    vector = _vector("libsignal-2")
    with pytest.raises(NonceMismatchError, match="document has none"):
        verify(
            _data(vectors, vector),
            root=aws,
            policy=Policy(nonce=b"n" * 32),
            now=_at(vector.verify_at),
        )


def test_mismatch_messages_do_not_reveal_the_values(vectors: Path, aws: TrustRoot) -> None:
    vector = _vector("nitrite-blocky-1")
    secret = b"do-not-print-me"
    with pytest.raises(UserDataMismatchError) as info:
        verify(
            _data(vectors, vector),
            root=aws,
            policy=Policy(user_data=secret),
            now=_at(vector.verify_at),
        )
    assert secret.hex() not in str(info.value)
    assert "do-not-print-me" not in str(info.value)
    assert "01" * 16 not in str(info.value)


def test_max_age_and_future_dating(vectors: Path, aws: TrustRoot) -> None:
    vector = _vector("libsignal-2")
    data = _data(vectors, vector)
    produced = verify(data, root=aws, now=_at(vector.verify_at)).timestamp
    policy = Policy(max_age=timedelta(minutes=10))
    verify(data, root=aws, policy=policy, now=produced + timedelta(minutes=10))
    with pytest.raises(DocumentAgeError, match="old"):
        verify(data, root=aws, policy=policy, now=produced + timedelta(minutes=10, seconds=1))
    # Dated more than max_clock_skew (5 min) after "now": rejected even though the
    # certificates are already valid then.
    verify(data, root=aws, now=produced - timedelta(minutes=5))
    with pytest.raises(DocumentAgeError, match="after the verification time"):
        verify(data, root=aws, now=produced - timedelta(minutes=5, seconds=1))


def test_warm_cache_still_checks_validity(vectors: Path, aws: TrustRoot) -> None:
    vector = _vector("libsignal-2")
    data, now = _data(vectors, vector), _at(vector.verify_at)
    verifier = AttestationVerifier(aws)
    verifier.verify(data, now=now)
    assert verifier.cached_chains == 1
    second = verifier.verify(data, now=now)
    assert second.module_id == "i-0797243b0383cd168-enc018cffeb5776ccea"
    assert verifier.cached_chains == 1
    expired = _window_end(data) + timedelta(seconds=1)
    with pytest.raises(CertificateValidityError):
        verifier.verify(data, now=expired)
    with pytest.raises(CertificateValidityError):
        verifier.verify(data, now=datetime(2019, 1, 1, tzinfo=UTC))
    verifier.verify(data, now=now)


def test_warm_cache_still_checks_the_signature(vectors: Path, aws: TrustRoot) -> None:
    vector = _vector("libsignal-2")
    data, now = bytearray(_data(vectors, vector)), _at(vector.verify_at)
    verifier = AttestationVerifier(aws)
    verifier.verify(bytes(data), now=now)
    data[-1] ^= 0x01
    with pytest.raises(SignatureInvalidError):
        verifier.verify(bytes(data), now=now)


def test_cache_is_bounded(vectors: Path, aws: TrustRoot) -> None:
    verifier = AttestationVerifier(aws, cache_size=2)
    for vector in VECTORS[:4]:
        verifier.verify(
            _data(vectors, vector), policy=Policy(allow_debug=True), now=_at(vector.verify_at)
        )
    assert verifier.cached_chains == 2


def _self_signed_root() -> tuple[TrustRoot, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "not.aws")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2019, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2049, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )
    return TrustRoot.from_pem(cert.public_bytes(serialization.Encoding.PEM)), key


def test_rejects_document_signed_under_an_unpinned_root(vectors: Path) -> None:
    other, _ = _self_signed_root()
    vector = VECTORS[0]
    with pytest.raises(UntrustedRootError, match="641a0321"):
        verify(_data(vectors, vector), root=other, now=_at(vector.verify_at))


def test_aws_root_is_pinned_by_fingerprint(aws: TrustRoot, vectors: Path) -> None:
    assert aws.fingerprint == "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
    shared = (vectors / "nitro" / "aws-nitro-enclaves-root-g1.pem").read_bytes()
    assert TrustRoot.from_pem(shared).der == aws.der
    with pytest.raises(TrustRootError, match="fingerprint expected 00"):
        TrustRoot.from_pem(shared, expected_sha256="00" * 32)


def test_dev_root_missing_tells_how_to_create_it() -> None:
    with pytest.raises(TrustRootError, match="hermetic nsm attest"):
        TrustRoot.dev()


def test_dev_root_is_read_from_the_state_dir() -> None:
    from hermetic.attestation.roots import dev_root_path

    root, _ = _self_signed_root()
    path = dev_root_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(root.certificate.public_bytes(serialization.Encoding.PEM))
    assert TrustRoot.dev().fingerprint == root.fingerprint


def test_bad_pem_is_a_trust_root_error() -> None:
    with pytest.raises(TrustRootError, match="not a PEM"):
        TrustRoot.from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_verified_document_cannot_be_built_or_replaced_outside_the_verifier(
    vectors: Path, aws: TrustRoot
) -> None:
    vector = VECTORS[0]
    result = verify(_data(vectors, vector), root=aws, now=_at(vector.verify_at))
    with pytest.raises(TypeError):
        VerifiedDocument(result.document, result.certificates, result.verified_at)
    with pytest.raises(TypeError):
        dataclasses.replace(result, document=result.document)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.document = result.document  # type: ignore[misc]


def test_naive_now_is_refused(vectors: Path, aws: TrustRoot) -> None:
    with pytest.raises(UsageError, match="timezone-aware"):
        verify(_data(vectors, VECTORS[0]), root=aws, now=datetime(2022, 10, 13, 9, 0))


def test_policy_rejects_bad_reference_values() -> None:
    with pytest.raises(UsageError, match=r"index must be 0\.\.31"):
        Policy(pcrs={32: bytes(48)})
    with pytest.raises(UsageError, match="expected bytes"):
        Policy(pcrs={0: "00" * 48})  # type: ignore[dict-item]
