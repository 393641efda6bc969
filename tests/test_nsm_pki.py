"""Emulated documents and the dev PKI: verifiable with the dev root only, and shaped like
real Nitro documents field by field (compared with real vectors, not with constants)."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from hermetic.attestation.codec import decode, encode_cose_sign1, encode_payload
from hermetic.attestation.roots import TrustRoot
from hermetic.attestation.verifier import AttestationVerifier, Policy
from hermetic.errors import DevPKIStateError, NSMError, UntrustedRootError
from hermetic.nsm.client import NSMClient
from hermetic.nsm.emulator import EmulatedNSM
from hermetic.nsm.pki import DevPKI, fingerprint, pki_dir, root_path

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
DER = Encoding.DER
LEVELS = ("root", "regional", "zonal", "instance", "leaf")


def _emulated(now: datetime = NOW, **fields: bytes) -> bytes:
    return NSMClient(EmulatedNSM(now=now, clock=lambda: now)).attest(**fields)


def _certificates(document: bytes) -> list[x509.Certificate]:
    _, doc = decode(document)
    return [x509.load_der_x509_certificate(c) for c in (*doc.cabundle, doc.certificate)]


def _real(vectors: Path, name: str) -> bytes:
    return (vectors / "nitro" / name).read_bytes()


# --- acceptance: round trip through the verifier -------------------------------------------


def test_emulated_document_verifies_with_the_dev_root() -> None:
    document = _emulated(user_data=b"hello")
    verified = AttestationVerifier(TrustRoot.dev()).verify(document, Policy(), NOW)
    assert verified.user_data == b"hello"
    assert not verified.debug


def test_emulated_document_is_rejected_with_the_aws_root() -> None:
    with pytest.raises(UntrustedRootError):
        AttestationVerifier(TrustRoot.aws()).verify(_emulated(), Policy(), NOW)


def test_emulated_document_reencodes_byte_identically() -> None:
    document = _emulated(user_data=b"u", nonce=b"n" * 32)
    cose, doc = decode(document)
    assert encode_cose_sign1(encode_payload(doc), cose.signature) == document


def test_dev_root_file_is_where_trust_root_dev_reads_it() -> None:
    _emulated()
    assert root_path() == pki_dir() / "root.pem"
    pinned = TrustRoot.dev()
    assert pinned.fingerprint == fingerprint(DevPKI().root(NOW))


def test_trust_root_creates_the_pki_on_first_use_and_pins_the_root_documents_chain_to() -> None:
    assert not root_path().exists()  # a fresh state directory
    pinned = DevPKI().trust_root(NOW)
    assert root_path().is_file()
    assert pinned.name == "dev"
    assert pinned.der == TrustRoot.dev().der  # what verifiers told "dev" read back
    # The next use keeps that root: documents emulated afterwards chain to it.
    assert DevPKI().trust_root(NOW).der == pinned.der
    AttestationVerifier(pinned).verify(_emulated(), Policy(), NOW)


def test_private_keys_are_mode_0600() -> None:
    _emulated()
    keys = list(pki_dir().rglob("*.key.pem"))
    assert len(keys) == 5
    for key in keys:
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


# --- acceptance: structurally indistinguishable from real documents -----------------------


@pytest.mark.parametrize("real_name", ["nitrite-blocky-1.cbor", "libsignal-2.cbor"])
def test_cose_envelope_and_payload_layout_match_real_document(
    vectors: Path, real_name: str
) -> None:
    real, ours = _real(vectors, real_name), _emulated()
    assert ours[:8] == real[:8] == bytes.fromhex("8444a1013822a059")
    real_payload = cbor2.loads(cbor2.loads(real)[2])
    our_payload = cbor2.loads(cbor2.loads(ours)[2])
    assert list(our_payload) == list(real_payload)
    for key in ("module_id", "digest", "timestamp", "certificate", "cabundle"):
        assert type(our_payload[key]) is type(real_payload[key]), key
    assert our_payload["digest"] == real_payload["digest"]
    raw_payload = cbor2.loads(ours)[2]
    # The timestamp is written as an 8-byte uint (1b), as on hardware.
    marker = b"itimestamp"
    assert raw_payload[raw_payload.index(marker) + len(marker)] == 0x1B
    assert sorted(our_payload["pcrs"]) == sorted(real_payload["pcrs"]) == list(range(16))
    assert {len(v) for v in our_payload["pcrs"].values()} == {48}
    assert len(our_payload["cabundle"]) == len(real_payload["cabundle"]) == 4
    assert len(cbor2.loads(ours)[3]) == len(cbor2.loads(real)[3]) == 96


def test_module_id_has_the_real_format(vectors: Path) -> None:
    real = cbor2.loads(cbor2.loads(_real(vectors, "nitrite-blocky-1.cbor"))[2])["module_id"]
    ours = decode(_emulated())[1].module_id
    shape = lambda s: "".join("h" if c in "0123456789abcdef" else c for c in s)  # noqa: E731
    assert shape(ours) == shape(real)


def _profile(cert: x509.Certificate) -> dict[str, object]:
    key = cert.public_key()
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    bits = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment")
    bits += ("key_agreement", "key_cert_sign", "crl_sign")
    return {
        "extensions": [(e.oid.dotted_string, e.critical) for e in cert.extensions],
        "basic_constraints": (basic.ca, basic.path_length),
        "key_usage": {b for b in bits if getattr(usage, b)},
        "signature": cert.signature_algorithm_oid,
        "curve": key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else None,
        "version": cert.version,
        "rdn_order": [a.oid.dotted_string for a in cert.subject],
        "serial_bytes": (cert.serial_number.bit_length() + 7) // 8,
    }


@pytest.mark.parametrize("real_name", ["nitrite-blocky-1.cbor", "fastcrypto-1.cbor"])
def test_every_certificate_level_has_the_real_profile(vectors: Path, real_name: str) -> None:
    real = _certificates(_real(vectors, real_name))
    ours = _certificates(_emulated(public_key=b"k"))
    for level, real_cert, our_cert in zip(LEVELS, real, ours, strict=True):
        assert _profile(our_cert) == _profile(real_cert), level


def test_profiles_match_older_real_documents_except_instance_key_ids(vectors: Path) -> None:
    # Documents before mid-2024 (libsignal-2) carry no AKI/SKI on the instance certificate;
    # newer ones (blocky, fastcrypto) do, and the emulator follows the newer shape.
    real = _certificates(_real(vectors, "libsignal-2.cbor"))
    ours = _certificates(_emulated())
    for level, real_cert, our_cert in zip(LEVELS, real, ours, strict=True):
        mine, theirs = _profile(our_cert), _profile(real_cert)
        if level == "instance":
            key_ids = {"2.5.29.14", "2.5.29.35"}
            mine["extensions"] = [e for e in mine["extensions"] if e[0] not in key_ids]  # type: ignore[attr-defined]
        assert mine == theirs, level


@pytest.mark.parametrize("real_name", ["nitrite-blocky-1.cbor", "libsignal-2.cbor"])
def test_lifetimes_match_real_certificates(vectors: Path, real_name: str) -> None:
    real = _certificates(_real(vectors, real_name))
    ours = _certificates(_emulated())
    for level, real_cert, our_cert in zip(LEVELS, real, ours, strict=True):
        real_life = real_cert.not_valid_after_utc - real_cert.not_valid_before_utc
        our_life = our_cert.not_valid_after_utc - our_cert.not_valid_before_utc
        tolerance = {"root": timedelta(days=2), "zonal": timedelta(hours=12)}.get(
            level, timedelta(seconds=1)
        )
        assert abs(our_life - real_life) <= tolerance, (level, our_life, real_life)


def test_leaf_serial_is_enclave_id_zeros_and_issue_time(vectors: Path) -> None:
    for document in (_real(vectors, "nitrite-blocky-1.cbor"), _emulated()):
        _, doc = decode(document)
        leaf = _certificates(document)[-1]
        serial = leaf.serial_number.to_bytes(16, "big")
        assert serial[:8] == bytes.fromhex(doc.module_id.split("-enc")[1])
        assert serial[8:12] == bytes(4)
        issued = int.from_bytes(serial[12:], "big")
        assert issued == int(leaf.not_valid_before_utc.timestamp()) + 3


def test_subjects_say_dev_and_crl_points_are_not_routable() -> None:
    certs = _certificates(_emulated())
    assert certs[0].subject == certs[0].issuer
    assert "dev.nitro-enclaves" in certs[0].subject.rfc4514_string()
    for cert in certs:
        assert "hermetic dev" in cert.subject.rfc4514_string()
    for cert in certs[1:3]:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        url = points[0].full_name[0].value  # type: ignore[index]
        assert ".invalid/" in url


def test_maximum_size_document_like_blocky(vectors: Path) -> None:
    real = _real(vectors, "nitrite-blocky-1.cbor")
    _, real_doc = decode(real)
    ours = _emulated(user_data=b"\x01" * 1024, nonce=b"\x01" * 1024, public_key=b"\x01" * 1024)
    _, doc = decode(ours)
    assert (doc.user_data, doc.nonce, doc.public_key) == (
        real_doc.user_data,
        real_doc.nonce,
        real_doc.public_key,
    )
    assert ours[:8] == real[:8]  # payload still fits a 2-byte length header (59 LL LL)
    AttestationVerifier(TrustRoot.dev()).verify(ours, Policy(), NOW)


# --- persistence and rotation ------------------------------------------------------------


def test_second_load_from_same_state_dir_keeps_the_root() -> None:
    first = DevPKI().root(NOW)
    later = NOW + timedelta(days=40)  # every intermediate has rotated by then
    second_doc = _emulated(now=later)
    assert _certificates(second_doc)[0] == first
    assert DevPKI().root(later) == first
    AttestationVerifier(TrustRoot.dev()).verify(second_doc, Policy(), later)


def test_leaf_is_reused_for_nearby_documents_and_reissued_after_3_hours() -> None:
    nsm = EmulatedNSM(now=NOW)
    docs = {}
    for label, when in [
        ("t0", NOW),
        ("t0+1h", NOW + timedelta(hours=1)),
        ("t0+3h", NOW + timedelta(hours=3, seconds=1)),
    ]:
        docs[label] = NSMClient(_ClockedNSM(nsm, when)).attest()
    leaves = {k: _certificates(v)[-1] for k, v in docs.items()}
    assert leaves["t0"] == leaves["t0+1h"]
    assert leaves["t0+3h"] != leaves["t0"]
    assert leaves["t0+3h"].not_valid_before_utc == NOW + timedelta(hours=3, seconds=1 - 3)
    for label, when in [("t0", NOW), ("t0+3h", NOW + timedelta(hours=3, seconds=1))]:
        AttestationVerifier(TrustRoot.dev()).verify(docs[label], Policy(), when)


def test_leaf_survives_a_restart_of_the_same_module() -> None:
    module_id = EmulatedNSM(now=NOW).module_id
    first = _certificates(NSMClient(_ClockedNSM(EmulatedNSM(module_id=module_id), NOW)).attest())
    again = _certificates(
        NSMClient(
            _ClockedNSM(EmulatedNSM(module_id=module_id), NOW + timedelta(minutes=5))
        ).attest()
    )
    assert first[-1] == again[-1]
    assert first[:4] == again[:4]


def test_chain_rotates_intermediates_before_they_would_outlive_children() -> None:
    pki = DevPKI()
    chain = pki.ca_chain(NOW)
    later = NOW + timedelta(hours=22)  # instance (24 h) can no longer cover a 3 h leaf
    rotated = pki.ca_chain(later)
    assert [c.certificate for c in rotated[:3]] == [c.certificate for c in chain[:3]]
    assert rotated[3].certificate != chain[3].certificate
    assert all(
        c.certificate.not_valid_before_utc <= later < c.certificate.not_valid_after_utc
        for c in rotated
    )


def test_root_without_its_key_is_an_error_not_a_silent_new_root() -> None:
    DevPKI().root(NOW)
    (pki_dir() / "root.key.pem").unlink()
    with pytest.raises(DevPKIStateError):
        DevPKI().root(NOW)


def test_corrupt_pki_file_is_a_typed_error_and_the_emulator_answers_internal_error() -> None:
    DevPKI().root(NOW)
    (pki_dir() / "zonal.pem").write_text("not a certificate")
    with pytest.raises(DevPKIStateError):
        DevPKI().ca_chain(NOW)
    nsm = EmulatedNSM(now=NOW)
    with pytest.raises(NSMError) as info:
        NSMClient(_ClockedNSM(nsm, NOW)).attest()
    assert info.value.code == "InternalError"


class _ClockedNSM:
    """A backend that hands ``now`` to the emulator (the emulator takes no hidden clock)."""

    def __init__(self, nsm: EmulatedNSM, now: datetime) -> None:
        self._nsm, self._now = nsm, now

    def transact(self, request: bytes) -> bytes:
        return self._nsm.handle(request, now=self._now)


def test_documents_carry_the_current_chain_der_after_intermediates_rotate() -> None:
    # The emulator keeps each certificate's DER instead of re-serialising it per document;
    # a rotated instance CA (and the leaf it then issues) must still reach the documents.
    nsm = EmulatedNSM(now=NOW)
    pki = DevPKI()
    later = NOW + timedelta(hours=22)
    for when in (NOW, NOW + timedelta(minutes=1), later, later + timedelta(minutes=1)):
        document = NSMClient(_ClockedNSM(nsm, when)).attest()
        _, doc = decode(document)
        chain = pki.ca_chain(when)
        assert list(doc.cabundle) == [c.certificate.public_bytes(DER) for c in chain]
        leaf = x509.load_der_x509_certificate(doc.certificate)
        assert leaf.issuer == chain[-1].certificate.subject
        leaf.verify_directly_issued_by(chain[-1].certificate)
        AttestationVerifier(TrustRoot.dev()).verify(document, Policy(), when)


def test_certified_key_der_and_window_are_the_certificates_own() -> None:
    for item in DevPKI().ca_chain(NOW):
        assert item.der == item.certificate.public_bytes(DER)
        assert item.not_before == item.certificate.not_valid_before_utc
        assert item.not_after == item.certificate.not_valid_after_utc
