"""Verify a peer's evidence bundle offline: attestation, session binding, release, log, policy.

This is the relying party's half of the channel's ``verify_evidence`` callback, and the one
function that answers the two questions of ARCHITECTURE.md: *is this the publisher's
service* (a trusted publisher signed a release whose PCRs are exactly the document's) and
*is it the code recorded in the public log* (the release is included in a checkpoint the
log signed and enough witnesses cosigned). Checks run in a fixed order and each failure is
its own typed error, so a caller (and ``hermetic connect``) can say which check failed:

1. ``root``: the document's chain ends at the pinned Nitro root (UntrustedRootError);
2. ``document``: certificates valid at ``now``, ES384 signature, age
   (CertificateValidityError, SignatureInvalidError, DocumentAgeError);
3. ``nonce``: document nonce == handshake hash, constant time (NonceMismatchError);
4. ``public_key``: document public_key == the peer's Noise static key
   (PublicKeyMismatchError);
5. ``config``: user_data carries the bundle's config digest (ConfigDigestMismatchError);
6. ``debug``: debug enclaves only under an allow-debug policy (DebugModeError); a debug
   peer's PCRs are zero, so no endorsement describes it: whatever endorsement it sends is
   not used, the peer carries no service, version or publisher, and a policy that names
   services, versions or PCR0s rejects it;
7. ``publisher``: the release statement is signed by a trusted publisher
   (UnknownPublisherError, StatementSignatureError);
8. ``release``: statement PCR0/1/2/8 == document PCRs (ReleasePCRMismatchError);
9. ``inclusion``: the exact entry is in the checkpoint's tree (InclusionProofError);
10. ``checkpoint``: signed by the pinned log key, witness threshold met
    (UnknownLogError, CosignatureThresholdError);
11. ``policy``: service, release and config accepted (ServiceNotAcceptedError,
    ReleaseNotAcceptedError, ConfigDigestMismatchError).

Everything is offline and sans-IO; the warm state (verified chains, verified endorsements)
lives in the :class:`~hermetic.client.trust.ClientTrust` passed in.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from hermetic.attestation import Policy, VerifiedDocument
from hermetic.client.trust import ClientTrust, ServicePolicy
from hermetic.errors import (
    CertificateChainError,
    CertificateValidityError,
    ConfigDigestMismatchError,
    DebugModeError,
    DocumentAgeError,
    EndorsementMissingError,
    EvidenceFormatError,
    HermeticError,
    NonceMismatchError,
    PublicKeyMismatchError,
    ReleaseNotAcceptedError,
    ReleasePCRMismatchError,
    ServiceNotAcceptedError,
    SignatureInvalidError,
    UsageError,
)
from hermetic.evidence import EvidenceBundle, parse_user_data
from hermetic.translog.checkpoint import Checkpoint
from hermetic.translog.merkle import leaf_hash, verify_inclusion
from hermetic.translog.note import split_note
from hermetic.translog.release import (
    Endorsement,
    ReleaseStatement,
    VerifiedRelease,
    match_publisher,
    verify_endorsement,
)

RELEASE_PCRS = (0, 1, 2, 8)


@dataclass(frozen=True)
class Check:
    """One verification step: its name, whether it passed, and the figure it checked."""

    name: str
    ok: bool
    detail: str


class VerificationReport:
    """Collects the checks of one verification, in order (for ``hermetic connect``).

    Created by the caller and passed in, so nothing is kept between verifications.
    """

    def __init__(self) -> None:
        self.checks: list[Check] = []
        self._current = "decode"

    def begin(self, name: str) -> None:
        self._current = name

    def passed(self, detail: str) -> None:
        self.checks.append(Check(self._current, True, detail))

    def failed(self, error: BaseException) -> None:
        self.checks.append(Check(self._current, False, f"{type(error).__name__}: {error}"))

    @property
    def failure(self) -> Check | None:
        return next((c for c in self.checks if not c.ok), None)


_ISSUED = object()


@dataclass(frozen=True)
class VerifiedPeer:
    """What the evidence proved about the peer; only :func:`verify_evidence` builds one.

    ``service``, ``version``, ``log_index``, ``publisher`` and ``tree_size`` are None
    exactly for a ``debug`` peer: its code is not proven, so it is no logged release, even
    if it sends an endorsement (which would otherwise let a debug build claim a release).
    """

    service: str | None
    version: str | None
    pcrs: Mapping[int, bytes]
    log_index: int | None
    config_digest: bytes | None
    module_id: str
    debug: bool
    publisher: str | None
    tree_size: int | None
    cosigners: tuple[str, ...]
    root_fingerprint: str
    document_time: datetime
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _ISSUED:
            raise TypeError("VerifiedPeer is only created by verify_evidence()")
        released = (self.service, self.version, self.log_index, self.publisher, self.tree_size)
        if self.debug and (any(v is not None for v in released) or self.cosigners):
            raise TypeError("a debug peer carries no release (service, version, publisher)")
        object.__setattr__(self, "_token", None)

    @property
    def release(self) -> str | None:
        """The release (version) the publisher logged for these PCRs."""
        return self.version

    def to_json(self) -> dict[str, Any]:
        """``{debug, service, release, pcrs, log_index, config_digest}`` (hex for bytes).

        ``debug`` is always present, so a reader of ``hermetic connect --json`` cannot miss
        that a peer's code is not proven.
        """
        return {
            "debug": self.debug,
            "service": self.service,
            "release": self.version,
            "pcrs": {str(i): self.pcrs[i].hex() for i in RELEASE_PCRS if i in self.pcrs},
            "log_index": self.log_index,
            "config_digest": self.config_digest.hex() if self.config_digest else None,
        }


def verify_evidence(
    bundle_bytes: bytes,
    handshake_hash: bytes,
    remote_static: bytes,
    trust: ClientTrust,
    policy: ServicePolicy,
    now: datetime | None = None,
    *,
    report: VerificationReport | None = None,
) -> VerifiedPeer:
    """Verify a peer's evidence bundle for this session, or raise the failing check's error."""
    steps = report if report is not None else VerificationReport()
    for name, value in (("handshake_hash", handshake_hash), ("remote_static", remote_static)):
        if not isinstance(value, bytes | bytearray) or not value:
            raise UsageError(f"{name}: expected non-empty bytes, got {type(value).__name__}")
    if not isinstance(trust, ClientTrust) or not isinstance(policy, ServicePolicy):
        raise UsageError("verify_evidence: trust must be a ClientTrust, policy a ServicePolicy")
    try:
        return _verify(bundle_bytes, handshake_hash, remote_static, trust, policy, now, steps)
    except HermeticError as exc:
        steps.failed(exc)
        raise


def _verify(
    bundle_bytes: bytes,
    handshake_hash: bytes,
    remote_static: bytes,
    trust: ClientTrust,
    policy: ServicePolicy,
    now: datetime | None,
    steps: VerificationReport,
) -> VerifiedPeer:
    when = _resolve_now(now)
    steps.begin("decode")
    bundle = EvidenceBundle.decode(bundle_bytes, parse_entry=trust.releases.parse_entry)
    steps.passed(f"evidence bundle, {len(bundle_bytes)} bytes")

    verified = _verify_document(bundle, trust, policy, when, steps)
    doc = verified.document

    steps.begin("nonce")
    if doc.nonce is None or not hmac.compare_digest(doc.nonce, bytes(handshake_hash)):
        raise NonceMismatchError(
            "nonce: the document is not bound to this session's handshake hash"
            f" (expected {len(handshake_hash)} bytes, got "
            f"{'none' if doc.nonce is None else f'{len(doc.nonce)} different bytes'});"
            " a replayed or relayed bundle"
        )
    steps.passed(f"nonce = this session's handshake hash ({bytes(handshake_hash)[:8].hex()}...)")

    steps.begin("public_key")
    if doc.public_key is None or not hmac.compare_digest(doc.public_key, bytes(remote_static)):
        got = "none" if doc.public_key is None else doc.public_key[:32].hex()
        raise PublicKeyMismatchError(
            f"public_key: expected the peer's Noise static key {bytes(remote_static).hex()},"
            f" document has {got}"
        )
    steps.passed(f"public_key = Noise static key {bytes(remote_static)[:8].hex()}...")

    steps.begin("config")
    try:
        in_document = parse_user_data(doc.user_data)
    except EvidenceFormatError as exc:
        raise ConfigDigestMismatchError(str(exc)) from None
    if in_document != bundle.config_digest:
        raise ConfigDigestMismatchError(
            f"config digest: bundle says {_hex_or_none(bundle.config_digest)}, document"
            f" user_data says {_hex_or_none(in_document)}"
        )
    steps.passed(f"config digest {_hex_or_none(in_document)} (in user_data)")

    if doc.debug:
        steps.begin("debug")
        if not policy.allow_debug:
            raise DebugModeError(
                "debug: the document comes from a debug-mode enclave (PCR0 all zero);"
                " the policy does not allow debug enclaves"
            )
        steps.passed("debug-mode enclave accepted by policy: its code is NOT proven")

    release: VerifiedRelease | None = None
    if doc.debug:
        steps.begin("publisher")
        steps.passed(
            "not used: a debug enclave's code is not proven, so no endorsement it sends"
            " can make it a logged release"
        )
    else:
        release = _verify_endorsement(bundle.endorsement, doc.pcrs, trust, when, steps)

    steps.begin("policy")
    statement = release.statement if release is not None else None
    assert statement is None or isinstance(statement, ReleaseStatement)
    service = statement.service if statement is not None else None
    version = statement.version if statement is not None else None
    shown = "a debug peer (no logged release)" if doc.debug else repr(service)
    if policy.services is not None and service not in policy.services:
        raise ServiceNotAcceptedError(
            f"service: {shown} is not accepted (policy accepts {sorted(policy.services)})"
        )
    if policy.versions is not None and version not in policy.versions:
        raise ReleaseNotAcceptedError(
            f"release: version {version!r} of {shown} is not accepted"
            f" (policy accepts {sorted(policy.versions)})"
        )
    if policy.pcr0s is not None:  # a debug peer's PCR0 is zero: never an accepted release
        pcr0 = doc.pcrs[0].hex()
        if pcr0 not in policy.pcr0s:
            raise ReleaseNotAcceptedError(
                f"release: PCR0 {pcr0} of {shown} {version!r} is not among the"
                f" {len(policy.pcr0s)} accepted PCR0 value(s)"
            )
    if policy.config_digests is not None:
        digest = _hex_or_none(bundle.config_digest)
        if digest not in policy.config_digests:
            raise ConfigDigestMismatchError(
                f"config digest: {digest} is not among the {len(policy.config_digests)}"
                " accepted by the policy"
            )
    steps.passed(
        f"service {service!r} release {version!r} accepted" + (" (debug peer)" if doc.debug else "")
    )
    return VerifiedPeer(
        service=service,
        version=version,
        pcrs=MappingProxyType(dict(doc.pcrs)),
        log_index=release.index if release is not None else None,
        config_digest=bundle.config_digest,
        module_id=doc.module_id,
        debug=doc.debug,
        publisher=release.publisher if release is not None else None,
        tree_size=release.tree_size if release is not None else None,
        cosigners=release.cosigners if release is not None else (),
        root_fingerprint=trust.root.fingerprint,
        document_time=verified.timestamp,
        _token=_ISSUED,
    )


def _verify_document(
    bundle: EvidenceBundle,
    trust: ClientTrust,
    policy: ServicePolicy,
    when: datetime,
    steps: VerificationReport,
) -> VerifiedDocument:
    # The attestation verifier checks chain, validity, signature and age in one call; the
    # chain part is cached per root. Debug, nonce and key are checked here, in our order.
    steps.begin("root")
    doc_policy = Policy(allow_debug=True, max_age=policy.max_age)
    pinned = f"chain ends at pinned {trust.root.name} root sha256:{trust.root.fingerprint}"
    try:
        verified = trust.attestation.verify(bundle.attestation, doc_policy, when)
    except CertificateValidityError:
        steps.passed(pinned)  # the chain verified; a certificate is expired or not yet valid
        steps.begin("document")
        raise
    except CertificateChainError:
        raise
    except (SignatureInvalidError, DocumentAgeError):
        steps.passed(pinned)
        steps.begin("document")
        raise
    except HermeticError:
        steps.begin("document")  # the document could not even be decoded
        raise
    steps.passed(pinned)
    steps.begin("document")
    age = (when - verified.timestamp).total_seconds()
    steps.passed(f"ES384 signature by module {verified.module_id}, {age:.1f} s old")
    return verified


def _verify_endorsement(
    endorsement: Endorsement | None,
    pcrs: Mapping[int, bytes],
    trust: ClientTrust,
    when: datetime,
    steps: VerificationReport,
) -> VerifiedRelease:
    if endorsement is None:
        steps.begin("publisher")
        raise EndorsementMissingError(
            "endorsement: the bundle carries none, so nothing shows a trusted publisher"
            " logged this enclave's release"
        )
    signed = endorsement.signed
    statement = signed.statement
    entry = signed.entry()
    key = (
        entry,
        endorsement.origin,
        endorsement.index,
        endorsement.inclusion_proof,
        endorsement.checkpoint,
    )
    cached = trust.releases.get(key)

    steps.begin("publisher")
    if cached is None:
        publisher = match_publisher(signed, trust.translog.publishers, when)
        signed.verify_signature()
        name = publisher.name
    else:
        name = cached.publisher
    if not isinstance(statement, ReleaseStatement):
        raise ReleaseNotAcceptedError(
            f"endorsement: expected a {ReleaseStatement.__name__} ({'hermetic.release/v1'}),"
            f" got {statement.type}"
        )
    steps.passed(f"{statement.service} {statement.version} signed by publisher {name!r}")

    steps.begin("release")
    _check_release_pcrs(statement, pcrs)
    steps.passed(f"PCR0 {statement.pcr0[:32]}... (and PCR1/2/8) = the logged release")

    steps.begin("inclusion")
    if cached is None:
        # Inclusion against the checkpoint the bundle names, before the checkpoint's own
        # signatures are checked (next step): both must pass, this order only decides
        # which error a doubly broken bundle gets.
        text, _ = split_note(endorsement.checkpoint)
        claimed = Checkpoint.parse(text)
        verify_inclusion(
            leaf_hash(entry),
            endorsement.index,
            claimed.size,
            list(endorsement.inclusion_proof),
            claimed.root_hash,
        )
    steps.passed(f"entry at log index {endorsement.index} is included in the checkpoint's tree")

    steps.begin("checkpoint")
    if cached is None:
        release = verify_endorsement(endorsement, trust.translog, now=when)
        if not any(p.ca_certificate_pem is not None for p in trust.translog.publishers):
            trust.releases.put(key, release, entry=entry, signed=signed)
    else:
        release = cached
    steps.passed(
        f"checkpoint size {release.tree_size} of {release.origin} signed by the pinned log key,"
        f" {len(release.cosigners)} witness cosignature(s)"
        f" (threshold {trust.translog.log.threshold})"
    )
    return release


def _check_release_pcrs(statement: ReleaseStatement, pcrs: Mapping[int, bytes]) -> None:
    expected = {0: statement.pcr0, 1: statement.pcr1, 2: statement.pcr2, 8: statement.pcr8}
    for index, want in expected.items():
        actual = pcrs.get(index)
        if want is None:
            # An unsigned image: the release records no PCR8, the document must have none.
            if actual is not None and any(actual):
                raise ReleasePCRMismatchError(
                    f"PCR8: the release records an unsigned image, document has {actual.hex()}"
                )
            continue
        if actual is None or not hmac.compare_digest(actual, bytes.fromhex(want)):
            raise ReleasePCRMismatchError(
                f"PCR{index}: release {statement.service} {statement.version} records {want},"
                f" document has {actual.hex() if actual is not None else 'none'}"
            )


def _hex_or_none(value: bytes | None) -> str | None:
    return value.hex() if value is not None else None


def _resolve_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise UsageError("now: expected a timezone-aware datetime")
    return now.astimezone(UTC)


__all__ = ["Check", "VerificationReport", "VerifiedPeer", "verify_evidence"]
