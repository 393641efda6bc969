"""Verify attestation documents against a pinned root and a relying party's policy.

Why a verifier object rather than only a function: clients, the gateway and KMS verify many
documents whose certificate chains repeat (an NSM reuses its leaf for hours), so an
:class:`AttestationVerifier` keeps a bounded LRU of chains it has already verified, keyed
by the exact certificate bytes. A warm verification is then one CBOR decode, one validity
check against the cached windows and one ECDSA P-384 verify. Nothing is global: the cache
lives and dies with the verifier instance.

Order of checks (the AWS procedure, then policy):

1. decode (AttestationFormatError);
2. chain: root pinned by fingerprint (UntrustedRootError), every signature, basic
   constraints and key usage (CertificateChainError) - cached;
3. every certificate valid at ``now`` (CertificateValidityError) - never cached;
4. COSE ES384 signature with the leaf key over the Sig_structure (SignatureInvalidError);
5. policy: debug mode (DebugModeError), reference PCRs (PCRMismatchError), nonce,
   public_key, user_data (...MismatchError), age and clock skew (DocumentAgeError).

The result, :class:`VerifiedDocument`, can only be produced here.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hermetic.attestation.chain import (
    CertificateInfo,
    VerifiedChain,
    VerifiedIssuers,
    check_validity,
    verify_issuers,
    verify_leaf,
)
from hermetic.attestation.codec import (
    MAX_PCR_INDEX,
    AttestationDocument,
    CoseSign1,
    decode,
    sig_structure,
)
from hermetic.attestation.roots import TrustRoot
from hermetic.errors import (
    DebugModeError,
    DocumentAgeError,
    NonceMismatchError,
    PCRMismatchError,
    PolicyError,
    PublicKeyMismatchError,
    SignatureInvalidError,
    UsageError,
    UserDataMismatchError,
)

DEFAULT_CACHE_SIZE = 256
_HALF = 48  # bytes of r (and of s) in a raw ES384 signature
_T = TypeVar("_T")


@dataclass(frozen=True)
class Policy:
    """What the relying party accepts. ``None`` (or an empty ``pcrs``) means "not checked".

    ``pcrs`` holds reference values for any subset of PCR indexes. ``max_clock_skew``
    bounds how far in the future (relative to ``now``) a document may be dated.
    """

    pcrs: Mapping[int, bytes] = field(default_factory=lambda: MappingProxyType({}))
    allow_debug: bool = False
    nonce: bytes | None = None
    public_key: bytes | None = None
    user_data: bytes | None = None
    max_age: timedelta | None = None
    max_clock_skew: timedelta = timedelta(minutes=5)

    def __post_init__(self) -> None:
        checked: dict[int, bytes] = {}
        for index, value in dict(self.pcrs).items():
            if type(index) is not int or not 0 <= index <= MAX_PCR_INDEX:
                raise UsageError(f"policy pcrs: index must be 0..{MAX_PCR_INDEX}, got {index!r}")
            if not isinstance(value, bytes):
                raise UsageError(
                    f"policy pcrs[{index}]: expected bytes, got {type(value).__name__}"
                )
            checked[index] = value
        object.__setattr__(self, "pcrs", MappingProxyType(dict(sorted(checked.items()))))
        for name in ("nonce", "public_key", "user_data"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bytes):
                raise UsageError(f"policy {name}: expected bytes or None")
        if self.max_age is not None and self.max_age < timedelta(0):
            raise UsageError(f"policy max_age: must not be negative, got {self.max_age}")
        if self.max_clock_skew < timedelta(0):
            raise UsageError(
                f"policy max_clock_skew: must not be negative, got {self.max_clock_skew}"
            )


DEFAULT_POLICY = Policy()

# Only this module holds the object that makes a VerifiedDocument constructible.
_ISSUED_BY_VERIFIER = object()


@dataclass(frozen=True)
class VerifiedDocument:
    """An attestation document that passed every check of an :class:`AttestationVerifier`.

    It cannot be built (or ``dataclasses.replace``-d) outside the verifier: the construction
    token is consumed on creation.
    """

    document: AttestationDocument
    certificates: tuple[CertificateInfo, ...]
    verified_at: datetime
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _ISSUED_BY_VERIFIER:
            raise TypeError("VerifiedDocument is only created by AttestationVerifier.verify")
        object.__setattr__(self, "_token", None)

    @property
    def module_id(self) -> str:
        return self.document.module_id

    @property
    def timestamp(self) -> datetime:
        """When the NSM produced the document (UTC, millisecond precision)."""
        return datetime.fromtimestamp(self.document.timestamp / 1000, tz=UTC)

    @property
    def pcrs(self) -> Mapping[int, bytes]:
        return self.document.pcrs

    @property
    def public_key(self) -> bytes | None:
        return self.document.public_key

    @property
    def user_data(self) -> bytes | None:
        return self.document.user_data

    @property
    def nonce(self) -> bytes | None:
        return self.document.nonce

    @property
    def debug(self) -> bool:
        return self.document.debug

    @property
    def chain_subjects(self) -> tuple[str, ...]:
        """Subjects of the verified chain, leaf first, pinned root last."""
        return tuple(info.subject for info in self.certificates)


class AttestationVerifier:
    """Verifies documents against one pinned root; caches verified chains (bounded LRU)."""

    def __init__(self, root: TrustRoot, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if cache_size < 0:
            raise UsageError(f"cache_size: must not be negative, got {cache_size}")
        self.root = root
        self._cache_size = cache_size
        self._chains: OrderedDict[tuple[bytes, ...], VerifiedChain] = OrderedDict()
        self._issuers: OrderedDict[tuple[bytes, ...], VerifiedIssuers] = OrderedDict()
        self._lock = threading.Lock()

    def verify(
        self, data: bytes, policy: Policy = DEFAULT_POLICY, now: datetime | None = None
    ) -> VerifiedDocument:
        """Verify ``data`` at ``now`` (default: the current time) or raise a HermeticError."""
        when = _resolve_now(now)
        cose, doc = decode(data)
        chain = self._verified_chain(doc)
        check_validity(chain.certificates, when)
        _check_signature(chain.leaf_key, cose)
        check_policy(doc, policy, when)
        return VerifiedDocument(
            document=doc,
            certificates=chain.certificates,
            verified_at=when,
            _token=_ISSUED_BY_VERIFIER,
        )

    @property
    def cached_chains(self) -> int:
        """How many verified chains the cache holds (for tests and metrics)."""
        return len(self._chains)

    def _verified_chain(self, doc: AttestationDocument) -> VerifiedChain:
        # Two levels, both keyed by exact certificate bytes: the CA part (shared by every
        # enclave of one parent instance) and the full chain with its parsed leaf key.
        key = (doc.certificate, *doc.cabundle)
        chain = self._lookup(self._chains, key)
        if chain is None:
            issuers = self._lookup(self._issuers, doc.cabundle)
            if issuers is None:
                issuers = verify_issuers(doc.cabundle, self.root)
                self._store(self._issuers, doc.cabundle, issuers)
            chain = verify_leaf(doc.certificate, issuers)
            self._store(self._chains, key, chain)
        return chain

    def _lookup(
        self, cache: OrderedDict[tuple[bytes, ...], _T], key: tuple[bytes, ...]
    ) -> _T | None:
        with self._lock:
            found = cache.get(key)
            if found is not None:
                cache.move_to_end(key)
            return found

    def _store(
        self, cache: OrderedDict[tuple[bytes, ...], _T], key: tuple[bytes, ...], value: _T
    ) -> None:
        if not self._cache_size:
            return
        with self._lock:
            cache[key] = value
            while len(cache) > self._cache_size:
                cache.popitem(last=False)


def verify(
    data: bytes,
    *,
    root: TrustRoot,
    policy: Policy = DEFAULT_POLICY,
    now: datetime | None = None,
) -> VerifiedDocument:
    """One-shot verification (no cache kept between calls)."""
    return AttestationVerifier(root, cache_size=0).verify(data, policy, now)


def check_policy(doc: AttestationDocument, policy: Policy, now: datetime) -> None:
    """Apply the relying party's policy to a document whose signatures already verified."""
    if doc.debug and not policy.allow_debug:
        raise DebugModeError(
            "document comes from a debug-mode enclave (PCR0 is all zeros); "
            "the policy does not allow debug enclaves"
        )
    for index, expected in policy.pcrs.items():
        actual = doc.pcrs.get(index)
        if actual is None:
            raise PCRMismatchError(f"PCR{index}: expected {expected.hex()}, document has none")
        if not hmac.compare_digest(actual, expected):
            raise PCRMismatchError(f"PCR{index}: expected {expected.hex()}, got {actual.hex()}")
    _check_binding("nonce", doc.nonce, policy.nonce, NonceMismatchError)
    _check_binding("public_key", doc.public_key, policy.public_key, PublicKeyMismatchError)
    _check_binding("user_data", doc.user_data, policy.user_data, UserDataMismatchError)
    produced = datetime.fromtimestamp(doc.timestamp / 1000, tz=UTC)
    if produced - now > policy.max_clock_skew:
        raise DocumentAgeError(
            f"timestamp: document dated {produced.isoformat()}, more than "
            f"{policy.max_clock_skew} after the verification time {now.isoformat()}"
        )
    if policy.max_age is not None and now - produced > policy.max_age:
        raise DocumentAgeError(
            f"timestamp: document is {now - produced} old at {now.isoformat()}, "
            f"policy allows at most {policy.max_age}"
        )


def _check_binding(
    name: str, actual: bytes | None, expected: bytes | None, error: type[PolicyError]
) -> None:
    # Values may be secrets (a session hash, user data), so messages carry only lengths
    # and short SHA-256 prefixes, and the comparison is constant-time.
    if expected is None:
        return
    if actual is None:
        raise error(f"{name}: expected {_summary(expected)}, document has none")
    if not hmac.compare_digest(actual, expected):
        raise error(f"{name}: expected {_summary(expected)}, got {_summary(actual)}")


def _summary(value: bytes) -> str:
    return f"{len(value)} bytes (sha256 {hashlib.sha256(value).hexdigest()[:16]}...)"


def _check_signature(leaf_key: ec.EllipticCurvePublicKey, cose: CoseSign1) -> None:
    r = int.from_bytes(cose.signature[:_HALF], "big")
    s = int.from_bytes(cose.signature[_HALF:], "big")
    try:
        leaf_key.verify(
            encode_dss_signature(r, s),
            sig_structure(cose.protected, cose.payload),
            ec.ECDSA(hashes.SHA384()),
        )
    except InvalidSignature:
        raise SignatureInvalidError(
            "COSE_Sign1 signature: ES384 signature does not verify with the leaf certificate's key"
        ) from None


def _resolve_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if not isinstance(now, datetime):
        raise UsageError(f"now: expected a datetime, got {type(now).__name__}")
    if now.tzinfo is None or now.utcoffset() is None:
        raise UsageError("now: expected a timezone-aware datetime (e.g. tzinfo=UTC)")
    return now.astimezone(UTC)
