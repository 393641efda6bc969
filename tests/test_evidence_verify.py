"""verify_evidence, sans-IO: every check accepts the real thing and rejects its own failure.

A "session" here is a random handshake hash and a real X25519 static key; the bundle comes
from the real evidence provider over an emulated NSM, the endorsement from a real log
(see test_client_stack.py). The socket-level versions of the acceptance cases are in
test_client_connect.py.
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hermetic.channel.noise import StaticKeypair
from hermetic.client import ServicePolicy, VerificationReport, verify_evidence
from hermetic.client.trust import ReleaseCache
from hermetic.errors import (
    CertificateValidityError,
    ConfigDigestMismatchError,
    CosignatureThresholdError,
    DebugModeError,
    DocumentAgeError,
    EndorsementMissingError,
    HermeticError,
    InclusionProofError,
    NonceMismatchError,
    PublicKeyMismatchError,
    ReleaseFormatError,
    ReleaseNotAcceptedError,
    ReleasePCRMismatchError,
    ServiceNotAcceptedError,
    UnknownLogError,
    UnknownPublisherError,
    UntrustedRootError,
)
from hermetic.evidence import EvidenceBundle, user_data
from hermetic.nsm import DevPKI
from hermetic.translog.checkpoint import add_cosignatures, cosign
from hermetic.translog.note import split_note
from hermetic.translog.release import SignedStatement
from test_client_stack import CONFIG_DIGEST, PCRS, SERVICE, STRICT, VERSION, Stack, build_stack
from test_client_stack import pcr as make_pcr

ALL_CHECKS = [
    "decode", "root", "document", "nonce", "public_key", "config", "publisher", "release",
    "inclusion", "checkpoint", "policy",
]  # fmt: skip


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return build_stack(tmp_path / "stack")


def session() -> tuple[bytes, bytes]:
    return os.urandom(32), StaticKeypair.generate().public


def test_accepts_real_evidence_and_reports_what_it_verified(stack: Stack) -> None:
    hh, static = session()
    bundle = stack.provider()(hh, static)
    report = VerificationReport()
    peer = verify_evidence(bundle, hh, static, stack.fresh_trust(), STRICT, report=report)
    assert (peer.service, peer.version, peer.publisher) == (SERVICE, VERSION, "acme")
    assert peer.log_index == stack.endorsement.index
    assert peer.tree_size == 9
    assert peer.config_digest == CONFIG_DIGEST
    assert peer.debug is False
    assert all(peer.pcrs[i] == PCRS[i] for i in (0, 1, 2, 8))
    assert peer.module_id.startswith("i-")
    assert [c.name for c in report.checks] == ALL_CHECKS
    assert all(c.ok for c in report.checks)
    assert peer.to_json()["pcrs"]["0"] == PCRS[0].hex()


def test_verified_peer_cannot_be_built_outside_the_verifier(stack: Stack) -> None:
    hh, static = session()
    peer = verify_evidence(stack.provider()(hh, static), hh, static, stack.trust, STRICT)
    with pytest.raises(TypeError):
        replace(peer, service="other")


def test_warm_trust_caches_the_chain_and_the_endorsement(stack: Stack) -> None:
    trust = stack.fresh_trust()
    provider = stack.provider()
    for _ in range(3):
        hh, static = session()
        peer = verify_evidence(provider(hh, static), hh, static, trust, STRICT)
        assert peer.service == SERVICE
    assert trust.attestation.cached_chains == 1
    assert len(trust.releases) == 1


def test_warm_trust_reuses_the_parsed_entry_but_checks_every_session(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    trust = stack.fresh_trust()
    provider = stack.provider()
    hh, static = session()
    verify_evidence(provider(hh, static), hh, static, trust, STRICT)
    parsed: list[bytes] = []
    original = SignedStatement.from_entry

    def counting(entry: bytes) -> SignedStatement:
        parsed.append(entry)
        return original(entry)

    monkeypatch.setattr(SignedStatement, "from_entry", counting)
    for _ in range(3):
        hh, static = session()
        assert verify_evidence(provider(hh, static), hh, static, trust, STRICT).service == SERVICE
    assert parsed == []  # the same entry bytes: parsed once, when first verified
    # ... while the per-session bindings are still checked against the warm caches
    other_hh, other_static = session()
    with pytest.raises(NonceMismatchError):
        verify_evidence(provider(other_hh, static), hh, static, trust, STRICT)
    with pytest.raises(PublicKeyMismatchError):
        verify_evidence(provider(hh, other_static), hh, static, trust, STRICT)


def test_release_cache_parses_unknown_entries_like_from_entry(stack: Stack) -> None:
    entry = stack.endorsement.signed.entry()
    cache = ReleaseCache()
    assert cache.parse_entry(entry) == SignedStatement.from_entry(entry)
    with pytest.raises(ReleaseFormatError):
        cache.parse_entry(entry + b" ")  # not canonical: rejected exactly as from_entry does
    with pytest.raises(ReleaseFormatError):
        SignedStatement.from_entry(entry + b" ")


def test_rejects_document_signed_by_unpinned_root(stack: Stack, tmp_path: Path) -> None:
    hh, static = session()
    other = DevPKI(tmp_path / "other-state" / "dev-pki")
    bundle = stack.provider(pki=other)(hh, static)
    report = VerificationReport()
    with pytest.raises(UntrustedRootError):
        verify_evidence(bundle, hh, static, stack.trust, STRICT, report=report)
    assert report.failure is not None
    assert report.failure.name == "root"


def test_rejects_replayed_bundle_from_another_session(stack: Stack) -> None:
    hh1, static = session()
    bundle = stack.provider()(hh1, static)
    hh2 = os.urandom(32)
    with pytest.raises(NonceMismatchError):
        verify_evidence(bundle, hh2, static, stack.trust, STRICT)


def test_rejects_document_for_another_static_key(stack: Stack) -> None:
    hh, static = session()
    bundle = stack.provider()(hh, StaticKeypair.generate().public)
    with pytest.raises(PublicKeyMismatchError):
        verify_evidence(bundle, hh, static, stack.trust, STRICT)


def test_rejects_config_digest_not_in_user_data(stack: Stack) -> None:
    hh, static = session()
    nsm = stack.nsm()
    document = nsm.attest(user_data=user_data(bytes(32)), nonce=hh, public_key=static)
    bundle = EvidenceBundle(document, CONFIG_DIGEST, stack.endorsement).encode()
    with pytest.raises(ConfigDigestMismatchError):
        verify_evidence(bundle, hh, static, stack.trust, STRICT)


def test_rejects_app_document_whose_user_data_lacks_the_evidence_prefix(stack: Stack) -> None:
    hh, static = session()
    document = stack.nsm().attest(user_data=CONFIG_DIGEST, nonce=hh, public_key=static)
    bundle = EvidenceBundle(document, CONFIG_DIGEST, stack.endorsement).encode()
    with pytest.raises(ConfigDigestMismatchError, match="prefix"):
        verify_evidence(bundle, hh, static, stack.trust, STRICT)


def test_accepts_enclave_without_runtime_config(stack: Stack) -> None:
    hh, static = session()
    bundle = stack.provider(config_digest=None)(hh, static)
    peer = verify_evidence(bundle, hh, static, stack.trust, STRICT)
    assert peer.config_digest is None


def test_rejects_debug_enclave_under_non_debug_policy(stack: Stack) -> None:
    hh, static = session()
    bundle = stack.provider(debug=True)(hh, static)
    report = VerificationReport()
    with pytest.raises(DebugModeError):
        verify_evidence(bundle, hh, static, stack.trust, STRICT, report=report)
    assert report.failure is not None
    assert report.failure.name == "debug"


def test_accepts_debug_enclave_only_when_allowed_and_marks_it(stack: Stack) -> None:
    hh, static = session()
    bundle = stack.provider(debug=True)(hh, static)
    peer = verify_evidence(bundle, hh, static, stack.trust, ServicePolicy(allow_debug=True))
    assert peer.debug is True
    assert peer.pcrs[0] == bytes(48)
    assert peer.to_json()["debug"] is True


def test_debug_peer_claims_no_release_from_the_endorsement_it_sends(stack: Stack) -> None:
    # The debug enclave sends the genuine, logged and witnessed endorsement of SERVICE
    # VERSION: it must not thereby become that release.
    hh, static = session()
    bundle = stack.provider(debug=True)(hh, static)
    assert EvidenceBundle.decode(bundle).endorsement == stack.endorsement
    report = VerificationReport()
    peer = verify_evidence(
        bundle, hh, static, stack.fresh_trust(), ServicePolicy(allow_debug=True), report=report
    )
    released = (peer.service, peer.version, peer.publisher, peer.log_index, peer.tree_size)
    assert (peer.debug, released, peer.cosigners) == (True, (None,) * 5, ())
    shown = peer.to_json()
    assert (shown["debug"], shown["service"], shown["release"], shown["log_index"]) == (
        True, None, None, None,
    )  # fmt: skip
    assert "release" not in [c.name for c in report.checks]  # no PCR comparison was skipped


@pytest.mark.parametrize(
    ("policy", "error"),
    [
        (STRICT.with_debug(True), ServiceNotAcceptedError),
        (ServicePolicy(versions=frozenset({VERSION}), allow_debug=True), ReleaseNotAcceptedError),
        (
            ServicePolicy(pcr0s=frozenset({PCRS[0].hex()}), allow_debug=True),
            ReleaseNotAcceptedError,
        ),
    ],
    ids=["service", "version", "pcr0"],
)
def test_policy_naming_a_release_is_not_satisfied_by_a_debug_peers_endorsement(
    stack: Stack, policy: ServicePolicy, error: type[Exception]
) -> None:
    hh, static = session()
    bundle = stack.provider(debug=True)(hh, static)
    report = VerificationReport()
    with pytest.raises(error, match="debug peer"):
        verify_evidence(bundle, hh, static, stack.fresh_trust(), policy, report=report)
    assert report.failure is not None
    assert report.failure.name == "policy"


def test_debug_enclave_without_endorsement_has_no_service(stack: Stack) -> None:
    hh, static = session()
    bundle = stack.provider(debug=True, endorsement=None)(hh, static)
    peer = verify_evidence(bundle, hh, static, stack.trust, ServicePolicy(allow_debug=True))
    assert (peer.debug, peer.service, peer.log_index) == (True, None, None)
    with pytest.raises(ServiceNotAcceptedError):
        verify_evidence(bundle, hh, static, stack.trust, STRICT.with_debug(True))


def test_rejects_production_enclave_without_endorsement(stack: Stack) -> None:
    hh, static = session()
    bundle = stack.provider(endorsement=None)(hh, static)
    with pytest.raises(EndorsementMissingError):
        verify_evidence(bundle, hh, static, stack.trust, ServicePolicy(allow_debug=True))


def test_rejects_pcrs_that_differ_from_the_logged_release(stack: Stack) -> None:
    for index in (0, 1, 2, 8):
        hh, static = session()
        pcrs = dict(PCRS)
        pcrs[index] = make_pcr(f"tampered {index}")
        bundle = stack.provider(pcrs=pcrs)(hh, static)
        with pytest.raises(ReleasePCRMismatchError, match=f"PCR{index}"):
            verify_evidence(bundle, hh, static, stack.trust, STRICT)


def test_rejects_pcr0_not_in_the_policys_accepted_releases(stack: Stack) -> None:
    hh, static = session()
    bundle = stack.provider()(hh, static)
    policy = replace(STRICT, pcr0s=frozenset({make_pcr("another release").hex()}))
    with pytest.raises(ReleaseNotAcceptedError, match="PCR0"):
        verify_evidence(bundle, hh, static, stack.trust, policy)
    accepted = replace(STRICT, pcr0s=frozenset({PCRS[0].hex()}))
    assert verify_evidence(bundle, hh, static, stack.trust, accepted).service == SERVICE


def test_rejects_service_and_version_not_in_policy(stack: Stack) -> None:
    hh, static = session()
    bundle = stack.provider()(hh, static)
    with pytest.raises(ServiceNotAcceptedError):
        verify_evidence(bundle, hh, static, stack.trust, ServicePolicy(services=frozenset({"x"})))
    with pytest.raises(ReleaseNotAcceptedError, match="version"):
        verify_evidence(bundle, hh, static, stack.trust, replace(STRICT, versions=frozenset({"9"})))
    policy = replace(STRICT, config_digests=frozenset({"00" * 32}))
    with pytest.raises(ConfigDigestMismatchError):
        verify_evidence(bundle, hh, static, stack.trust, policy)


def test_rejects_release_signed_by_unknown_publisher(stack: Stack) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    rogue = stack.log_release(stack.statement, ed25519.Ed25519PrivateKey.generate())
    hh, static = session()
    bundle = stack.provider(endorsement=rogue)(hh, static)
    report = VerificationReport()
    with pytest.raises(UnknownPublisherError):
        verify_evidence(bundle, hh, static, stack.trust, STRICT, report=report)
    assert report.failure is not None
    assert report.failure.name == "publisher"


def test_rejects_inclusion_proof_that_does_not_lead_to_the_checkpoint(stack: Stack) -> None:
    proof = list(stack.endorsement.inclusion_proof)
    proof[1] = bytes(b ^ 1 for b in proof[1])
    broken = replace(stack.endorsement, inclusion_proof=tuple(proof))
    hh, static = session()
    with pytest.raises(InclusionProofError):
        verify_evidence(stack.provider(endorsement=broken)(hh, static), hh, static,
                        stack.fresh_trust(), STRICT)  # fmt: skip
    wrong_index = replace(stack.endorsement, index=stack.endorsement.index - 1)
    with pytest.raises(InclusionProofError):
        verify_evidence(stack.provider(endorsement=wrong_index)(hh, static), hh, static,
                        stack.fresh_trust(), STRICT)  # fmt: skip


def test_rejects_checkpoint_without_enough_witness_cosignatures(stack: Stack) -> None:
    one_witness = stack.log_release(stack.statement, stack.publisher_key, cosigners=1)
    hh, static = session()
    report = VerificationReport()
    with pytest.raises(CosignatureThresholdError):
        verify_evidence(stack.provider(endorsement=one_witness)(hh, static), hh, static,
                        stack.fresh_trust(), STRICT, report=report)  # fmt: skip
    assert report.failure is not None
    assert report.failure.name == "checkpoint"


def test_rejects_checkpoint_not_signed_by_the_pinned_log(stack: Stack) -> None:
    from hermetic.translog.note import Ed25519NoteSigner

    text, _ = split_note(stack.endorsement.checkpoint)
    impostor = Ed25519NoteSigner(stack.log_signer.name, os.urandom(32))
    from hermetic.translog.note import sign_note

    note = sign_note(text, [impostor])
    note = add_cosignatures(note, [cosign(note, w, 1) for w in stack.witnesses])
    forged = replace(stack.endorsement, checkpoint=note)
    hh, static = session()
    with pytest.raises(UnknownLogError):
        verify_evidence(stack.provider(endorsement=forged)(hh, static), hh, static,
                        stack.fresh_trust(), STRICT)  # fmt: skip


def test_rejects_expired_document(stack: Stack) -> None:
    hh, static = session()
    four_hours_ago = datetime.now(UTC) - timedelta(hours=4)
    bundle = stack.provider(clock=lambda: four_hours_ago)(hh, static)
    report = VerificationReport()
    with pytest.raises(CertificateValidityError):
        verify_evidence(bundle, hh, static, stack.trust, STRICT, report=report)
    assert [c.name for c in report.checks] == ["decode", "root", "document"]


def test_rejects_document_older_than_the_policy_allows(stack: Stack) -> None:
    hh, static = session()
    ten_minutes_ago = datetime.now(UTC) - timedelta(minutes=10)
    bundle = stack.provider(clock=lambda: ten_minutes_ago)(hh, static)
    with pytest.raises(DocumentAgeError):
        verify_evidence(bundle, hh, static, stack.trust, STRICT)
    lenient = replace(STRICT, max_age=timedelta(minutes=15))
    assert verify_evidence(bundle, hh, static, stack.trust, lenient).service == SERVICE


def test_release_without_pcr8_requires_a_zero_pcr8(stack: Stack) -> None:
    unsigned = replace(stack.statement, pcr8=None)
    endorsement = stack.log_release(unsigned, stack.publisher_key)
    hh, static = session()
    zero8 = {**PCRS, 8: bytes(48)}
    bundle = stack.provider(endorsement=endorsement, pcrs=zero8)(hh, static)
    assert verify_evidence(bundle, hh, static, stack.trust, STRICT).service == SERVICE
    bundle = stack.provider(endorsement=endorsement)(hh, static)
    with pytest.raises(ReleasePCRMismatchError, match="PCR8"):
        verify_evidence(bundle, hh, static, stack.trust, STRICT)


def test_every_single_byte_mutation_of_a_bundle_is_rejected(stack: Stack) -> None:
    """Flip one byte at ~300 positions spread over the whole bundle: never accepted."""
    hh, static = session()
    bundle = stack.provider()(hh, static)
    trust = stack.fresh_trust()
    verify_evidence(bundle, hh, static, trust, STRICT)  # the original is fine (and warms caches)
    step = max(1, len(bundle) // 300)
    positions = sorted({*range(0, len(bundle), step), len(bundle) - 1})
    for position in positions:
        mutated = bytearray(bundle)
        mutated[position] ^= 0x5A
        with pytest.raises(HermeticError):
            verify_evidence(bytes(mutated), hh, static, trust, STRICT)
