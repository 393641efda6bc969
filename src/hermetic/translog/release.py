"""Release statements, their log envelopes, endorsements and the relying party's trust file.

A *release* is a publisher's signed statement that it shipped a measured enclave image
(``hermetic.release/v1``: service, version, PCR0/1/2/8, config policy, source revision,
build time). The same log also carries gateway admission policies
(``hermetic.gateway-policy/v1``), KMS key-policy digests (``hermetic.kms-key-policy/v1``)
and the persistence service's access policies (``hermetic.persistence-policy/v1``, subject
``persistence/<store id>``, digest of the canonical policy document of
``hermetic.persistence.policy``), so one monitor sees every change a relying party cares
about.

Every byte that is signed or hashed is **canonical JSON** (sorted keys, no whitespace,
UTF-8, no floats), so a statement has exactly one encoding and a verifier can recompute it
from the parsed object. The log entry is the canonical JSON *envelope*
``{type, statement, signature, publisher}``; an *endorsement* (RFC 9334 vocabulary) is
that envelope plus the log origin, the entry's index, its inclusion proof and the
(witnessed) checkpoint the proof leads to: everything a client needs to check, offline,
that the release was published and logged.

Publishers sign with Ed25519 or ECDSA P-384 (SHA-384); ECDSA over the statement bytes is
exactly what a Rekor ``hashedrekord`` with a SHA-384 digest verifies, so the same signature
can also be posted to Sigstore's public log. A publisher may attach its X.509 certificate;
the trust file then pins either the key, the certificate, or a CA that issues publisher
certificates.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from hermetic import jsontext
from hermetic.errors import (
    CheckpointError,
    CosignatureThresholdError,
    DuplicateTrustedKeyError,
    HermeticError,
    NoteFormatError,
    RekorSubmissionError,
    ReleaseFormatError,
    ReleaseMismatchError,
    StatementSignatureError,
    TrustBundleError,
    UnknownKeyError,
    UnknownLogError,
    UnknownPublisherError,
)
from hermetic.translog.merkle import leaf_hash, verify_inclusion

RELEASE_V1 = "hermetic.release/v1"
GATEWAY_POLICY_V1 = "hermetic.gateway-policy/v1"
KMS_KEY_POLICY_V1 = "hermetic.kms-key-policy/v1"
PERSISTENCE_POLICY_V1 = "hermetic.persistence-policy/v1"
POLICY_TYPES = (GATEWAY_POLICY_V1, KMS_KEY_POLICY_V1, PERSISTENCE_POLICY_V1)
ENVELOPE_V1 = "hermetic.signed-statement/v1"
ENDORSEMENT_V1 = "hermetic.endorsement/v1"
PERSISTENCE_STATE_V1 = "hermetic.persistence-state/v1"

PCR_BYTES = 48  # SHA-384 PCRs, as Nitro reports them
_HEX = re.compile(r"^(?:[0-9a-f]{2})+$")
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_STORE_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


# --- canonical JSON -----------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8; only objects, arrays, strings, ints, bools, null."""
    _check_canonical_value(value, "$")
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _check_canonical_value(value: Any, where: str) -> None:
    if isinstance(value, str):
        if not jsontext.is_unicode_text(value):
            raise ReleaseFormatError(f"{where}: string holds a lone UTF-16 surrogate")
        return
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > 2**53:
            raise ReleaseFormatError(f"{where}: integer {value} is outside the JSON-safe range")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_canonical_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not jsontext.is_unicode_text(key):
                raise ReleaseFormatError(f"{where}: an object key is not Unicode text")
            _check_canonical_value(item, f"{where}.{key}")
        return
    raise ReleaseFormatError(f"{where}: {type(value).__name__} is not allowed in canonical JSON")


def load_json_file(path: str | Path, what: str, error: type[HermeticError]) -> Any:
    """Read and strictly parse (:func:`hermetic.jsontext.load_file`) a JSON file as ``error``.

    Trust files, client policies and the like are all loaded this way, so "cannot read"
    and "not valid JSON" read the same whichever file it was.
    """
    return jsontext.load_file(path, what=what, error=error)


def parse_json(data: bytes | str, what: str) -> Any:
    """Strict JSON (:func:`hermetic.jsontext.loads`: UTF-8, no duplicate keys, no lone
    surrogates, bounded depth) without floats, NaN or Infinity, as ReleaseFormatError."""
    return jsontext.loads(data, what=what, error=ReleaseFormatError)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ReleaseFormatError(f"{what} must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ReleaseFormatError(f"{what} is not valid base64") from None
    if _b64(raw) != text:
        raise ReleaseFormatError(f"{what} is not canonical base64")
    return raw


# --- statements -----------------------------------------------------------------------------


def _object(
    value: Any, what: str, fields: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ReleaseFormatError(f"{what} must be a JSON object, got {type(value).__name__}")
    missing = [f for f in fields if f not in value]
    if missing:
        raise ReleaseFormatError(f"{what} lacks field(s) {', '.join(missing)}")
    extra = sorted(set(value) - set(fields) - set(optional))
    if extra:
        raise ReleaseFormatError(f"{what} has unexpected field(s) {', '.join(extra)}")
    return value


def _text(value: Any, what: str, *, max_len: int = 256) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ReleaseFormatError(f"{what} must be a non-empty string of at most {max_len} chars")
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ReleaseFormatError(f"{what} contains a control character")
    return value


def _hex(value: Any, what: str, *, sizes: Sequence[int]) -> str:
    if not isinstance(value, str) or not _HEX.match(value) or len(value) // 2 not in sizes:
        expected = " or ".join(str(s) for s in sizes)
        got = f"{len(value)} chars" if isinstance(value, str) else type(value).__name__
        raise ReleaseFormatError(f"{what} must be {expected} bytes of lowercase hex, got {got}")
    return value


def _optional(value: Any, check: Any, *args: Any, **kwargs: Any) -> Any:
    return None if value is None else check(value, *args, **kwargs)


def _timestamp(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _TIME.match(value):
        raise ReleaseFormatError(
            f"{what} must be RFC 3339 UTC 'YYYY-MM-DDTHH:MM:SSZ', got {value!r}"
        )
    try:
        datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise ReleaseFormatError(f"{what} is not a real date and time: {value!r}") from None
    return value


def utc_timestamp(moment: datetime | None = None) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` for ``moment`` (default: now)."""
    moment = moment or datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ReleaseStatement:
    """``hermetic.release/v1``: a publisher shipped this measured image.

    PCRs and digests are lowercase hex; ``pcr8`` (signing-certificate hash) is ``None`` for
    unsigned images.
    """

    service: str
    version: str
    pcr0: str
    pcr1: str
    pcr2: str
    pcr8: str | None
    config_policy_digest: str | None
    source_revision: str | None
    build_time: str
    type: str = RELEASE_V1

    def __post_init__(self) -> None:
        _text(self.service, "statement.service")
        _text(self.version, "statement.version")
        for name in ("pcr0", "pcr1", "pcr2"):
            _hex(getattr(self, name), f"statement.{name}", sizes=(PCR_BYTES,))
        _optional(self.pcr8, _hex, "statement.pcr8", sizes=(PCR_BYTES,))
        _optional(
            self.config_policy_digest, _hex, "statement.config_policy_digest", sizes=(32, 48, 64)
        )
        _optional(self.source_revision, _text, "statement.source_revision")
        _timestamp(self.build_time, "statement.build_time")
        if self.type != RELEASE_V1:
            raise ReleaseFormatError(f"statement.type must be {RELEASE_V1!r}, got {self.type!r}")

    @property
    def subject(self) -> str:
        return self.service

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "service": self.service,
            "version": self.version,
            "pcr0": self.pcr0,
            "pcr1": self.pcr1,
            "pcr2": self.pcr2,
            "pcr8": self.pcr8,
            "config_policy_digest": self.config_policy_digest,
            "source_revision": self.source_revision,
            "build_time": self.build_time,
        }

    @classmethod
    def from_json(cls, value: Any) -> ReleaseStatement:
        fields = ("type", "service", "version", "pcr0", "pcr1", "pcr2", "pcr8",
                  "config_policy_digest", "source_revision", "build_time")  # fmt: skip
        obj = _object(value, "release statement", fields)
        return cls(**{k: obj[k] for k in fields})


@dataclass(frozen=True)
class PolicyStatement:
    """``hermetic.gateway-policy/v1``, ``hermetic.kms-key-policy/v1`` or
    ``hermetic.persistence-policy/v1``.

    ``subject`` names what the policy governs (a gateway, a KMS key ARN), ``digest`` is the
    SHA-256 (or SHA-384) of the policy document, ``version`` the publisher's label for it.
    """

    type: str
    subject: str
    digest: str
    version: str
    issued_at: str

    def __post_init__(self) -> None:
        if self.type not in POLICY_TYPES:
            raise ReleaseFormatError(f"unknown policy statement type {self.type!r}")
        _text(self.subject, "statement.subject", max_len=2048)
        _hex(self.digest, "statement.digest", sizes=(32, 48))
        _text(self.version, "statement.version")
        _timestamp(self.issued_at, "statement.issued_at")

    @property
    def service(self) -> str:
        return self.subject

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "subject": self.subject,
            "digest": self.digest,
            "version": self.version,
            "issued_at": self.issued_at,
        }

    @classmethod
    def from_json(cls, value: Any) -> PolicyStatement:
        fields = ("type", "subject", "digest", "version", "issued_at")
        obj = _object(value, "policy statement", fields)
        return cls(**{k: obj[k] for k in fields})


MAX_STATE_SEQUENCE = 2**53
"""State sequence numbers and record counts stay within canonical JSON's integer range."""


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ReleaseFormatError(f"{what} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= MAX_STATE_SEQUENCE:
        raise ReleaseFormatError(f"{what} must be in 0..{MAX_STATE_SEQUENCE}, got {value}")
    return value


@dataclass(frozen=True)
class StateStatement:
    """``hermetic.persistence-state/v1``: the persistence service's record store was in
    this state (issue 10 item 5; docs/persistence.md, "Rollback detection").

    ``root`` is the RFC 9162 Merkle root over the store's records (id, version, SHA-256
    of the bytes) and ``records`` their number; ``sequence`` counts the service's writes
    (0 is the first state, the genesis); ``previous`` is the SHA-256 of the log entry of
    the statement of ``sequence - 1`` and ``prior_root`` that statement's root, both
    ``None`` exactly for the genesis. The envelope's key is the service's state key,
    derived from its root key; the first genesis in the log for a store id binds the store
    id to that key.
    """

    store_id: str
    sequence: int
    root: str
    records: int
    previous: str | None
    prior_root: str | None
    type: str = PERSISTENCE_STATE_V1

    def __post_init__(self) -> None:
        if not isinstance(self.store_id, str) or _STORE_ID.fullmatch(self.store_id) is None:
            shown = repr(self.store_id)[:80]
            raise ReleaseFormatError(
                "statement.store_id must be 1 to 64 characters of a-z 0-9 . _ -, starting"
                f" with a letter or digit, got {shown}"
            )
        _count(self.sequence, "statement.sequence")
        _hex(self.root, "statement.root", sizes=(32,))
        _count(self.records, "statement.records")
        _optional(self.previous, _hex, "statement.previous", sizes=(32,))
        _optional(self.prior_root, _hex, "statement.prior_root", sizes=(32,))
        genesis = self.sequence == 0
        if genesis != (self.previous is None) or genesis != (self.prior_root is None):
            raise ReleaseFormatError(
                "statement.previous and statement.prior_root must be null exactly for"
                f" sequence 0, got sequence {self.sequence} with previous"
                f" {'null' if self.previous is None else 'set'} and prior_root"
                f" {'null' if self.prior_root is None else 'set'}"
            )
        if self.type != PERSISTENCE_STATE_V1:
            raise ReleaseFormatError(
                f"statement.type must be {PERSISTENCE_STATE_V1!r}, got {self.type!r}"
            )

    @property
    def subject(self) -> str:
        return self.store_id

    @property
    def version(self) -> str:
        """The sequence number, where other statements have a version label."""
        return str(self.sequence)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "store_id": self.store_id,
            "sequence": self.sequence,
            "root": self.root,
            "records": self.records,
            "previous": self.previous,
            "prior_root": self.prior_root,
        }

    @classmethod
    def from_json(cls, value: Any) -> StateStatement:
        fields = ("type", "store_id", "sequence", "root", "records", "previous", "prior_root")
        obj = _object(value, "state statement", fields)
        return cls(**{k: obj[k] for k in fields})


Statement = ReleaseStatement | PolicyStatement | StateStatement


def parse_statement(value: Any) -> Statement:
    """A statement object of any known ``type``."""
    if not isinstance(value, dict):
        raise ReleaseFormatError(f"statement must be a JSON object, got {type(value).__name__}")
    kind = value.get("type")
    if kind == RELEASE_V1:
        return ReleaseStatement.from_json(value)
    if kind in POLICY_TYPES:
        return PolicyStatement.from_json(value)
    if kind == PERSISTENCE_STATE_V1:
        return StateStatement.from_json(value)
    raise ReleaseFormatError(f"statement.type {kind!r} is not a known statement type")


def statement_bytes(statement: Statement) -> bytes:
    """The exact bytes a publisher signs."""
    return canonical_json(statement.to_json())


# --- publisher keys and signatures ------------------------------------------------------------

PublisherPrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublisherPublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def _check_publisher_key(key: object, what: str) -> None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name == "secp384r1":
            return
        raise ReleaseFormatError(f"{what} is ECDSA on {key.curve.name}, expected P-384")
    raise ReleaseFormatError(f"{what} is {type(key).__name__}, expected Ed25519 or ECDSA P-384")


def load_publisher_key(pem: bytes) -> PublisherPrivateKey:
    """An unencrypted PKCS#8 (or SEC1) PEM private key: Ed25519 or ECDSA P-384."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ReleaseFormatError(
            f"publisher key is not an unencrypted PEM private key: {exc}"
        ) from None
    _check_publisher_key(key, "publisher key")
    assert isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
    return key


def generate_publisher_key(kind: str = "ed25519") -> bytes:
    """A fresh publisher key as PKCS#8 PEM (``ed25519`` or ``p384``)."""
    key: PublisherPrivateKey
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif kind == "p384":
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        raise ReleaseFormatError(f"publisher key kind must be ed25519 or p384, got {kind!r}")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(key: PublisherPublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def _spki(key: PublisherPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_public_pem(
    pem: str, what: str, error: type[Exception] = ReleaseFormatError
) -> PublisherPublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise error(f"{what} is not a PEM public key: {exc}") from None
    try:
        _check_publisher_key(key, what)
    except ReleaseFormatError as exc:
        raise error(str(exc)) from None
    assert isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey)
    return key


def _load_cert_pem(
    pem: str, what: str, error: type[Exception] = ReleaseFormatError
) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise error(f"{what} is not a PEM X.509 certificate: {exc}") from None


def _sign(key: PublisherPrivateKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA384()))


def _verify(key: PublisherPublicKey, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            key.verify(signature, message, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class SignedStatement:
    """A statement, its publisher's signature and the publisher's key or certificate.

    Exactly one of ``public_key_pem`` and ``certificate_pem`` is set. Its canonical JSON
    (:meth:`entry`) is what the log stores.
    """

    statement: Statement
    signature: bytes
    public_key_pem: str | None = None
    certificate_pem: str | None = None

    def __post_init__(self) -> None:
        if (self.public_key_pem is None) == (self.certificate_pem is None):
            raise ReleaseFormatError(
                "publisher must carry exactly one of public_key_pem, certificate_pem"
            )

    def publisher_key(self) -> PublisherPublicKey:
        if self.certificate_pem is not None:
            cert = _load_cert_pem(self.certificate_pem, "publisher.certificate_pem")
            try:
                key = cert.public_key()
            except (ValueError, UnsupportedAlgorithm) as exc:
                raise ReleaseFormatError(f"publisher certificate key is unusable: {exc}") from None
            _check_publisher_key(key, "publisher certificate key")
            assert isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey)
            return key
        assert self.public_key_pem is not None
        return _load_public_pem(self.public_key_pem, "publisher.public_key_pem")

    def certificate(self) -> x509.Certificate | None:
        if self.certificate_pem is None:
            return None
        return _load_cert_pem(self.certificate_pem, "publisher.certificate_pem")

    def to_json(self) -> dict[str, Any]:
        publisher = (
            {"certificate_pem": self.certificate_pem}
            if self.certificate_pem is not None
            else {"public_key_pem": self.public_key_pem}
        )
        return {
            "type": ENVELOPE_V1,
            "statement": self.statement.to_json(),
            "signature": _b64(self.signature),
            "publisher": publisher,
        }

    def entry(self) -> bytes:
        """The log entry: the envelope's canonical JSON.

        Computed once per object (it is immutable): an enclave encodes, and a client
        checks, the same endorsement on every handshake.
        """
        cached: bytes | None = self.__dict__.get("_entry")
        if cached is None:
            cached = canonical_json(self.to_json())
            object.__setattr__(self, "_entry", cached)
        return cached

    @classmethod
    def from_json(cls, value: Any) -> SignedStatement:
        obj = _object(value, "envelope", ("type", "statement", "signature", "publisher"))
        if obj["type"] != ENVELOPE_V1:
            raise ReleaseFormatError(f"envelope.type must be {ENVELOPE_V1!r}, got {obj['type']!r}")
        publisher = obj["publisher"]
        if not isinstance(publisher, dict) or len(publisher) != 1:
            raise ReleaseFormatError("envelope.publisher must hold exactly one key or certificate")
        ((kind, pem),) = publisher.items()
        if kind not in ("public_key_pem", "certificate_pem") or not isinstance(pem, str):
            raise ReleaseFormatError(f"envelope.publisher.{kind} is not a PEM string field")
        signed = cls(
            statement=parse_statement(obj["statement"]),
            signature=_unb64(obj["signature"], "envelope.signature"),
            public_key_pem=pem if kind == "public_key_pem" else None,
            certificate_pem=pem if kind == "certificate_pem" else None,
        )
        signed.publisher_key()  # a malformed key is malformed input, reported now
        return signed

    @classmethod
    def from_entry(cls, entry: bytes) -> SignedStatement:
        """Parse a log entry; it must be exactly the canonical encoding."""
        signed = cls.from_json(parse_json(entry, "log entry"))
        if signed.entry() != bytes(entry):
            raise ReleaseFormatError("log entry is not canonical JSON")
        return signed

    def verify_signature(self) -> None:
        """Check the signature with the carried key (not whether that key is trusted)."""
        if not _verify(self.publisher_key(), self.signature, statement_bytes(self.statement)):
            raise StatementSignatureError(
                f"publisher signature does not verify over the {self.statement.type} statement"
                f" for {self.statement.subject!r} version {self.statement.version!r}"
            )


def sign_statement(
    statement: Statement, key: PublisherPrivateKey, certificate_pem: str | None = None
) -> SignedStatement:
    """Sign ``statement``; with ``certificate_pem`` its key must be ``key``'s public half."""
    _check_publisher_key(key, "publisher key")
    public = key.public_key()
    assert isinstance(public, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey)
    if certificate_pem is not None:
        cert = _load_cert_pem(certificate_pem, "publisher certificate")
        try:
            cert_key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm):
            raise ReleaseFormatError("publisher certificate has an unusable key") from None
        if not isinstance(cert_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) or _spki(
            cert_key
        ) != _spki(public):
            raise ReleaseFormatError("publisher certificate is not for the publisher key")
        return SignedStatement(
            statement, _sign(key, statement_bytes(statement)), None, certificate_pem
        )
    return SignedStatement(statement, _sign(key, statement_bytes(statement)), _public_pem(public))


# --- trust bundle ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LogTrust:
    """The log a relying party accepts: its key, its witnesses and the cosignature quorum."""

    vkey: str
    witnesses: tuple[str, ...] = ()
    threshold: int = 0
    origin: str | None = None


@dataclass(frozen=True)
class TrustedPublisher:
    """A publisher pinned by key (``public_key_pem``), by certificate, or by issuing CA."""

    name: str
    public_key_pem: str | None = None
    certificate_pem: str | None = None
    ca_certificate_pem: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for attr in ("public_key_pem", "certificate_pem", "ca_certificate_pem"):
            if getattr(self, attr) is not None:
                out[attr] = getattr(self, attr)
        return out


@dataclass(frozen=True)
class TrustBundle:
    """What a relying party pins, loaded from a JSON trust file.

    Known sections are ``log`` and ``publishers``; every other top-level key (for example
    the Nitro root added by the channel) is preserved in ``extra`` and written back
    unchanged, so tools that know only part of the file do not destroy the rest.
    """

    log: LogTrust
    publishers: tuple[TrustedPublisher, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: Any) -> TrustBundle:
        if not isinstance(value, dict):
            raise TrustBundleError("trust file must be a JSON object")
        log = value.get("log")
        if not isinstance(log, dict) or not isinstance(log.get("vkey"), str):
            raise TrustBundleError("trust file: log.vkey (the log's verifier key) is required")
        witnesses = log.get("witnesses", [])
        if not isinstance(witnesses, list) or not all(isinstance(w, str) for w in witnesses):
            raise TrustBundleError("trust file: log.witnesses must be a list of verifier keys")
        threshold = log.get("threshold", 0)
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise TrustBundleError(
                f"trust file: log.threshold must be an integer >= 0, got {threshold!r}"
            )
        if threshold > len(witnesses):
            raise TrustBundleError(
                f"trust file: log.threshold {threshold} exceeds the"
                f" {len(witnesses)} witness(es) listed"
            )
        origin = log.get("origin")
        if origin is not None and not isinstance(origin, str):
            raise TrustBundleError("trust file: log.origin must be a string")
        verifiers = []
        for text in [log["vkey"], *witnesses]:
            try:
                verifiers.append(_note_verifier(text))
            except NoteFormatError as exc:
                raise TrustBundleError(f"trust file: bad verifier key {text!r}: {exc}") from None
        labels = [f"log.vkey ({verifiers[0].name})"]
        labels += [f"log.witnesses[{n}] ({w.name})" for n, w in enumerate(verifiers[1:])]
        try:
            _check_distinct_keys(verifiers[0], verifiers[1:], labels)
        except DuplicateTrustedKeyError as exc:
            raise DuplicateTrustedKeyError(f"trust file: {exc}") from None
        publishers_raw = value.get("publishers", [])
        if not isinstance(publishers_raw, list):
            raise TrustBundleError("trust file: publishers must be a list")
        publishers = []
        for n, item in enumerate(publishers_raw):
            publishers.append(_trusted_publisher(item, n))
        extra = {k: v for k, v in value.items() if k not in ("log", "publishers")}
        return cls(
            LogTrust(log["vkey"], tuple(witnesses), threshold, origin), tuple(publishers), extra
        )

    @classmethod
    def load(cls, path: str | Path) -> TrustBundle:
        return cls.from_json(load_json_file(path, "trust file", TrustBundleError))

    def to_json(self) -> dict[str, Any]:
        log: dict[str, Any] = {
            "vkey": self.log.vkey,
            "witnesses": list(self.log.witnesses),
            "threshold": self.log.threshold,
        }
        if self.log.origin is not None:
            log["origin"] = self.log.origin
        return {
            **dict(self.extra),
            "log": log,
            "publishers": [p.to_json() for p in self.publishers],
        }


def _trusted_publisher(item: Any, n: int) -> TrustedPublisher:
    where = f"trust file: publishers[{n}]"
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        raise TrustBundleError(f"{where} must be an object with a non-empty name")
    kinds = [k for k in ("public_key_pem", "certificate_pem", "ca_certificate_pem") if k in item]
    if len(kinds) != 1 or not isinstance(item[kinds[0]], str):
        raise TrustBundleError(
            f"{where} needs exactly one of public_key_pem, certificate_pem, ca_certificate_pem"
        )
    kind = kinds[0]
    if kind == "public_key_pem":
        _load_public_pem(item[kind], f"{where}.public_key_pem", TrustBundleError)
    else:
        _load_cert_pem(item[kind], f"{where}.{kind}", TrustBundleError)
    return TrustedPublisher(item["name"], **{kind: item[kind]})


def _note_verifier(vkey: str) -> Any:
    from hermetic.translog.note import NoteVerifier

    return NoteVerifier.from_vkey(vkey)


def _check_distinct_keys(log_key: Any, witnesses: Sequence[Any], labels: Sequence[str]) -> None:
    from hermetic.translog.checkpoint import check_distinct_keys

    check_distinct_keys(log_key, witnesses, labels)


def match_publisher(
    signed: SignedStatement, publishers: Sequence[TrustedPublisher], now: datetime | None = None
) -> TrustedPublisher:
    """The trusted publisher whose key, certificate or CA vouches for ``signed``."""
    spki = _spki(signed.publisher_key())
    cert = signed.certificate()
    for publisher in publishers:
        if publisher.public_key_pem is not None:
            if _spki(_load_public_pem(publisher.public_key_pem, "trusted key")) == spki:
                return publisher
        elif publisher.certificate_pem is not None:
            pinned = _load_cert_pem(publisher.certificate_pem, "trusted certificate")
            try:
                pinned_key = pinned.public_key()
            except (ValueError, UnsupportedAlgorithm):
                continue
            if isinstance(pinned_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) and (
                _spki(pinned_key) == spki
            ):
                return publisher
        elif publisher.ca_certificate_pem is not None and cert is not None:
            ca = _load_cert_pem(publisher.ca_certificate_pem, "trusted CA certificate")
            if _issued_by(cert, ca, now or datetime.now(UTC)):
                return publisher
    subject = cert.subject.rfc4514_string() if cert is not None else "a bare public key"
    raise UnknownPublisherError(
        f"statement for {signed.statement.subject!r} is signed by {subject} "
        f"(key sha256:{_sha256_hex(spki)[:16]}), which no trusted publisher holds"
    )


def _issued_by(cert: x509.Certificate, ca: x509.Certificate, now: datetime) -> bool:
    """Whether ``cert`` is directly issued by the pinned CA and valid at ``now``.

    One level only (publisher certificate issued by the pinned CA); longer chains are not
    supported.
    """
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- endorsements ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Endorsement:
    """A logged, signed statement with everything needed to verify it offline."""

    signed: SignedStatement
    origin: str
    index: int
    inclusion_proof: tuple[bytes, ...]
    checkpoint: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **dict(self.extra),
            "type": ENDORSEMENT_V1,
            "entry": self.signed.to_json(),
            "log": {
                "origin": self.origin,
                "index": self.index,
                "inclusion_proof": [_b64(h) for h in self.inclusion_proof],
                "checkpoint": self.checkpoint,
            },
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=2, sort_keys=True).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, value: Any) -> Endorsement:
        if not isinstance(value, dict):
            raise ReleaseFormatError("endorsement must be a JSON object")
        if value.get("type") != ENDORSEMENT_V1:
            raise ReleaseFormatError(
                f"endorsement.type must be {ENDORSEMENT_V1!r}, got {value.get('type')!r}"
            )
        if "entry" not in value or "log" not in value:
            raise ReleaseFormatError("endorsement lacks field(s) entry and/or log")
        log = _object(
            value["log"], "endorsement.log", ("origin", "index", "inclusion_proof", "checkpoint")
        )
        index = log["index"]
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ReleaseFormatError(
                f"endorsement.log.index must be an integer >= 0, got {index!r}"
            )
        proof = log["inclusion_proof"]
        if not isinstance(proof, list) or len(proof) > 64:
            raise ReleaseFormatError(
                "endorsement.log.inclusion_proof must be a list of at most 64 hashes"
            )
        hashes_ = tuple(
            _unb64(h, f"endorsement.log.inclusion_proof[{i}]") for i, h in enumerate(proof)
        )
        for i, h in enumerate(hashes_):
            if len(h) != 32:
                raise ReleaseFormatError(
                    f"endorsement.log.inclusion_proof[{i}] must be 32 bytes, got {len(h)}"
                )
        origin = _text(log["origin"], "endorsement.log.origin")
        checkpoint = log["checkpoint"]
        if not isinstance(checkpoint, str):
            raise ReleaseFormatError("endorsement.log.checkpoint must be the signed note text")
        extra = {k: v for k, v in value.items() if k not in ("type", "entry", "log")}
        return cls(
            SignedStatement.from_json(value["entry"]), origin, index, hashes_, checkpoint, extra
        )

    @classmethod
    def loads(cls, data: bytes | str) -> Endorsement:
        return cls.from_json(parse_json(data, "endorsement"))

    @classmethod
    def load(cls, path: str | Path) -> Endorsement:
        return cls.loads(Path(path).read_bytes())


_VERIFIED = object()


@dataclass(frozen=True)
class VerifiedRelease:
    """The result of :func:`verify_endorsement`; it cannot be built any other way."""

    statement: Statement
    publisher: str
    origin: str
    index: int
    tree_size: int
    root_hash: bytes
    cosigners: tuple[str, ...]
    _token: object = field(repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self._token is not _VERIFIED:
            raise TypeError("VerifiedRelease is only returned by verify_endorsement()")


def verify_endorsement(
    endorsement: Endorsement,
    trust: TrustBundle,
    *,
    expected_pcr0: str | None = None,
    now: datetime | None = None,
) -> VerifiedRelease:
    """Check an endorsement offline against a trust bundle.

    In order: the publisher is trusted (:class:`UnknownPublisherError`); its signature over
    the canonical statement verifies (:class:`StatementSignatureError`); the checkpoint is
    signed by the trusted log key for the expected origin (:class:`UnknownLogError`) with
    at least the witness threshold of valid cosignatures
    (:class:`CosignatureThresholdError`); the exact entry is included at its index in that
    checkpoint's tree (:class:`InclusionProofError`); and, if asked, PCR0 matches
    (:class:`ReleaseMismatchError`).
    """
    from hermetic.translog.checkpoint import open_checkpoint

    signed = endorsement.signed
    publisher = match_publisher(signed, trust.publishers, now)
    signed.verify_signature()

    log_verifier = _note_verifier(trust.log.vkey)
    witnesses = [_note_verifier(w) for w in trust.log.witnesses]
    expected_origin = trust.log.origin or log_verifier.name
    if endorsement.origin != expected_origin:
        raise UnknownLogError(
            f"endorsement is from log {endorsement.origin!r},"
            f" the trusted log is {expected_origin!r}"
        )
    try:
        opened = open_checkpoint(
            endorsement.checkpoint,
            log_verifier,
            witnesses,
            trust.log.threshold,
            origin=expected_origin,
        )
    except UnknownKeyError as exc:
        raise UnknownLogError(
            f"checkpoint is not signed by the trusted log key {trust.log.vkey.split('+')[0]}"
            f" ({exc})"
        ) from None
    except CosignatureThresholdError:
        raise
    except CheckpointError as exc:
        raise UnknownLogError(f"checkpoint is not from the trusted log: {exc}") from None
    checkpoint = opened.checkpoint
    if endorsement.index >= checkpoint.size:
        raise CheckpointError(
            f"entry index {endorsement.index} is not below checkpoint size {checkpoint.size}"
        )
    verify_inclusion(
        leaf_hash(signed.entry()),
        endorsement.index,
        checkpoint.size,
        list(endorsement.inclusion_proof),
        checkpoint.root_hash,
    )
    statement = signed.statement
    if expected_pcr0 is not None:
        if not isinstance(statement, ReleaseStatement):
            raise ReleaseMismatchError(
                f"expected a release statement with PCR0, got {statement.type}"
            )
        if statement.pcr0 != expected_pcr0.lower():
            raise ReleaseMismatchError(
                f"release PCR0 is {statement.pcr0}, expected {expected_pcr0.lower()}"
            )
    return VerifiedRelease(
        statement=statement,
        publisher=publisher.name,
        origin=checkpoint.origin,
        index=endorsement.index,
        tree_size=checkpoint.size,
        root_hash=checkpoint.root_hash,
        cosigners=tuple(c.witness for c in opened.cosignatures),
        _token=_VERIFIED,
    )


# --- Sigstore Rekor (optional second log) ---------------------------------------------------


def rekor_hashedrekord(signed: SignedStatement) -> dict[str, Any]:
    """The Rekor v1 ``hashedrekord`` v0.0.1 proposed entry for a signed statement.

    Rekor verifies the signature over the artifact *digest*; for an ECDSA P-384 publisher
    that is exactly our signature over SHA-384 of the statement bytes. Rekor accepts
    Ed25519 only as Ed25519ph, which our pure-Ed25519 statements are not, so Ed25519
    publishers cannot use this path.
    """
    key = signed.publisher_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ReleaseFormatError(
            "Rekor hashedrekord needs an ECDSA P-384 publisher key (Rekor takes Ed25519 only"
            " as Ed25519ph)"
        )
    digest = hashlib.sha384(statement_bytes(signed.statement)).hexdigest()
    pem = signed.certificate_pem if signed.certificate_pem is not None else signed.public_key_pem
    assert pem is not None
    return {
        "apiVersion": "0.0.1",
        "kind": "hashedrekord",
        "spec": {
            "data": {"hash": {"algorithm": "sha384", "value": digest}},
            "signature": {
                "content": _b64(signed.signature),
                "publicKey": {"content": _b64(pem.encode("ascii"))},
            },
        },
    }


@dataclass(frozen=True)
class RekorReceipt:
    """What a Rekor v1 instance answered for our entry (not verified against Rekor's key)."""

    url: str
    uuid: str
    log_index: int
    integrated_time: int
    log_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "uuid": self.uuid,
            "log_index": self.log_index,
            "integrated_time": self.integrated_time,
            "log_id": self.log_id,
        }


def submit_to_rekor(url: str, signed: SignedStatement, *, timeout: float = 30.0) -> RekorReceipt:
    """POST the hashedrekord to ``<url>/api/v1/log/entries`` and check the echoed body."""
    import httpx

    proposed = rekor_hashedrekord(signed)
    endpoint = f"{url.rstrip('/')}/api/v1/log/entries"
    try:
        response = httpx.post(endpoint, json=proposed, timeout=timeout)
    except httpx.HTTPError as exc:
        raise RekorSubmissionError(f"POST {endpoint} failed: {exc}") from None
    if response.status_code != 201:
        raise RekorSubmissionError(
            f"POST {endpoint} answered {response.status_code}: {response.text[:300]}"
        )
    what = f"{endpoint} LogEntry"
    try:
        reply = jsontext.loads(response.content, what=what, error=RekorSubmissionError)
        ((uuid, entry),) = reply.items()
        body = jsontext.loads(
            base64.b64decode(entry["body"], validate=True), what=what, error=RekorSubmissionError
        )
        receipt = RekorReceipt(
            url,
            str(uuid),
            int(entry["logIndex"]),
            int(entry["integratedTime"]),
            str(entry["logID"]),
        )
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error):
        raise RekorSubmissionError(f"{endpoint} returned a malformed LogEntry") from None
    if body != proposed:
        raise RekorSubmissionError(f"{endpoint} logged a body different from the one submitted")
    return receipt
