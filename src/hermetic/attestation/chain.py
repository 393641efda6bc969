"""The certificate chain of an attestation document, checked the way AWS describes it.

Why by hand rather than with ``cryptography``'s PKIX verifier: the Nitro profile is short
and specific (AWS "verify-root" steps: signatures up to the pinned root, basic constraints
and key usage per position, no CRLs), real leaf certificates lack extensions the WebPKI
profile demands, and - most important for cost - the library binds the validity time into
path validation, so a verified chain could not be cached and re-checked at a new "now".
Here the time-independent part (:func:`verify_chain`) runs once per chain and is cached by
the verifier; :func:`check_validity` runs on every verification from the stored windows.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtensionOID

from hermetic.attestation.codec import AttestationDocument
from hermetic.attestation.roots import TrustRoot
from hermetic.errors import (
    AttestationFormatError,
    CertificateChainError,
    CertificateValidityError,
    UntrustedRootError,
)

# Extensions this profile understands; any other extension marked critical is rejected,
# as RFC 5280 requires of a validator that does not process it.
_UNDERSTOOD_CRITICAL = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})
_E = TypeVar("_E", bound=x509.ExtensionType)
# What cryptography raises, eagerly or lazily, on certificate bytes it cannot make sense of
# (several of these are not ValueError subclasses; the mutation tests found them).
_X509_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)


@dataclass(frozen=True)
class CertificateInfo:
    """What a relying party may want to see about one certificate of the chain."""

    role: str  # "leaf", "intermediate" or "root"
    subject: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class VerifiedChain:
    """A chain whose signatures and constraints verified up to a pinned root.

    Independent of time: validity windows are kept so they can be checked at any ``now``.
    ``certificates`` runs leaf first, root last.
    """

    leaf_key: ec.EllipticCurvePublicKey
    certificates: tuple[CertificateInfo, ...]


def parse_certificate(der: bytes, where: str) -> x509.Certificate:
    """Parse one DER certificate; unparseable bytes are a format error naming ``where``."""
    # cryptography only *warns* about some RFC 5280 violations (e.g. a non-positive
    # serial number); such a certificate is malformed here, and a warning printed on
    # stderr would break the CLI's one-line error contract.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CryptographyDeprecationWarning)
        try:
            certificate = x509.load_der_x509_certificate(der)
        except _X509_ERRORS as exc:
            raise AttestationFormatError(f"{where}: not a DER X.509 certificate ({exc})") from None
    for warning in caught:
        if issubclass(warning.category, CryptographyDeprecationWarning):
            raise AttestationFormatError(
                f"{where}: not a valid X.509 certificate ({warning.message})"
            )
    return certificate


def describe(certificate: x509.Certificate, role: str, where: str) -> CertificateInfo:
    try:
        return CertificateInfo(
            role=role,
            subject=certificate.subject.rfc4514_string(),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
        )
    except _X509_ERRORS as exc:
        raise AttestationFormatError(f"{where}: unreadable subject or validity ({exc})") from None


def describe_document_chain(doc: AttestationDocument) -> tuple[CertificateInfo, ...]:
    """The document's own chain, leaf first, *without* verifying anything (for display)."""
    infos = [describe(parse_certificate(doc.certificate, "certificate"), "leaf", "certificate")]
    for n in range(len(doc.cabundle) - 1, -1, -1):
        where = f"cabundle[{n}]"
        role = "root" if n == 0 else "intermediate"
        infos.append(describe(parse_certificate(doc.cabundle[n], where), role, where))
    return tuple(infos)


@dataclass(frozen=True)
class VerifiedIssuers:
    """The pinned root and the document's intermediates, verified down to the last CA.

    Shared by every leaf the same parent instance issues, so it is cached on its own.
    ``certificates`` runs top-down (root first).
    """

    issuer: x509.Certificate
    issuer_where: str
    certificates: tuple[CertificateInfo, ...]


def verify_issuers(cabundle: tuple[bytes, ...], root: TrustRoot) -> VerifiedIssuers:
    """Check ``cabundle[1..]`` top-down from the pinned ``root`` (time-independent).

    Raises UntrustedRootError if ``cabundle[0]`` is not the pinned root, and
    CertificateChainError for a broken signature, issuer name or constraint.
    """
    actual = hashlib.sha256(cabundle[0]).hexdigest()
    if actual != root.fingerprint:
        raise UntrustedRootError(
            f"cabundle[0]: root SHA-256 expected {root.fingerprint} ({root.name} root), "
            f"got {actual}"
        )
    # The pinned root's own object is used, not the document's copy of it.
    parent, parent_where = root.certificate, f"{root.name} root"
    # Every CA certificate must allow the CAs below it (the leaf is not counted).
    _check_extensions(parent, "root", parent_where, cas_below=len(cabundle) - 1)
    infos = [describe(parent, "root", parent_where)]
    for n in range(1, len(cabundle)):
        where = f"cabundle[{n}]"
        certificate = parse_certificate(cabundle[n], where)
        _check_issued_by(certificate, where, parent, parent_where)
        _check_extensions(certificate, "intermediate", where, cas_below=len(cabundle) - 1 - n)
        infos.append(describe(certificate, "intermediate", where))
        parent, parent_where = certificate, where
    return VerifiedIssuers(issuer=parent, issuer_where=parent_where, certificates=tuple(infos))


def verify_leaf(certificate: bytes, issuers: VerifiedIssuers) -> VerifiedChain:
    """Check the leaf against the last verified CA; return its P-384 key and the chain."""
    leaf = parse_certificate(certificate, "certificate")
    _check_issued_by(leaf, "certificate", issuers.issuer, issuers.issuer_where)
    _check_extensions(leaf, "leaf", "certificate", cas_below=0)
    try:
        leaf_key = leaf.public_key()
    except _X509_ERRORS as exc:
        raise AttestationFormatError(f"certificate: unreadable public key ({exc})") from None
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or not isinstance(
        leaf_key.curve, ec.SECP384R1
    ):
        raise CertificateChainError(
            f"certificate: expected a P-384 public key (ES384), got {_key_name(leaf_key)}"
        )
    infos = (describe(leaf, "leaf", "certificate"), *reversed(issuers.certificates))
    return VerifiedChain(leaf_key=leaf_key, certificates=infos)


def verify_chain(doc: AttestationDocument, root: TrustRoot) -> VerifiedChain:
    """Check ``[certificate, cabundle[N-1], ..., cabundle[1]]`` up to the pinned ``root``."""
    return verify_leaf(doc.certificate, verify_issuers(doc.cabundle, root))


def check_validity(certificates: tuple[CertificateInfo, ...], now: datetime) -> None:
    """Every certificate (root included) must be valid at ``now`` (bounds inclusive)."""
    for info in certificates:
        if not info.not_before <= now <= info.not_after:
            raise CertificateValidityError(
                f"{info.role} certificate {info.subject} is valid "
                f"{info.not_before.isoformat()} .. {info.not_after.isoformat()}, "
                f"not at {now.isoformat()}"
            )


def _check_issued_by(
    child: x509.Certificate, where: str, parent: x509.Certificate, parent_where: str
) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except InvalidSignature:
        raise CertificateChainError(
            f"{where}: signature does not verify with the key of {parent_where}"
        ) from None
    except _X509_ERRORS as exc:
        raise CertificateChainError(f"{where}: not issued by {parent_where} ({exc})") from None


def _check_extensions(certificate: x509.Certificate, role: str, where: str, cas_below: int) -> None:
    try:
        extensions = certificate.extensions
        for extension in extensions:
            if extension.critical and extension.oid not in _UNDERSTOOD_CRITICAL:
                raise CertificateChainError(
                    f"{where}: unsupported critical extension {extension.oid.dotted_string}"
                )
        constraints = _optional_extension(extensions, x509.BasicConstraints)
        usage = _optional_extension(extensions, x509.KeyUsage)
    except _X509_ERRORS as exc:
        raise AttestationFormatError(f"{where}: malformed extensions ({exc})") from None

    if role == "leaf":
        if constraints is not None and constraints.ca:
            raise CertificateChainError(f"{where}: leaf expected CA:FALSE, got CA:TRUE")
        if usage is None or not usage.digital_signature:
            raise CertificateChainError(f"{where}: leaf key usage must include digitalSignature")
        return
    if constraints is None or not constraints.ca:
        raise CertificateChainError(f"{where}: {role} expected basic constraints CA:TRUE")
    if constraints.path_length is not None and constraints.path_length < cas_below:
        raise CertificateChainError(
            f"{where}: {role} pathLenConstraint {constraints.path_length} but "
            f"{cas_below} CA certificate(s) follow it"
        )
    if usage is None or not usage.key_cert_sign:
        raise CertificateChainError(f"{where}: {role} key usage must include keyCertSign")


def _optional_extension(extensions: x509.Extensions, kind: type[_E]) -> _E | None:
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _key_name(key: object) -> str:
    curve = getattr(key, "curve", None)
    return f"{type(key).__name__} {curve.name}" if curve is not None else type(key).__name__
