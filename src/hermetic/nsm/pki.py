"""The emulated Nitro PKI: a local dev root and a chain shaped exactly like AWS's.

A verifier written against real documents must accept emulated ones unchanged (apart from the
pinned root), so the dev chain copies what real documents carry, level by level (see
``reference/nitro.md`` 1.3): root (30 years) -> regional (~20 days) -> zonal (~6 days) ->
instance (24 h) -> leaf (3 h), all P-384 / ecdsa-with-SHA384, with the same extensions in
the same order, the same criticality, BasicConstraints, KeyUsage bits, RDN order and the
same leaf serial layout. Only the names say ``hermetic dev`` and ``dev.nitro-enclaves``, and
the CRL distribution points use the reserved ``.invalid`` domain, so an emulated document
can never be mistaken for a real one: it only verifies against the dev root.

Everything lives under ``state_dir() / "dev-pki"`` so that the dev root survives restarts
(relying parties pin it by fingerprint) and every process on the machine shares one root.
Expired or soon-expiring intermediates are re-issued on demand, like AWS rotates them; the
leaf of an enclave is reused for every document until it expires, like real hardware. No
function reads the clock: callers pass ``now``, so tests can move time.

Writing certificates by hand is avoided: ``cryptography``'s builder does the DER.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hermetic.attestation.roots import TrustRoot
from hermetic.errors import DevPKIStateError, NSMError
from hermetic.paths import state_dir

#: Where the PKI lives inside the state directory; ``root.pem`` in it is the dev trust root.
PKI_DIRNAME = "dev-pki"
ROOT_FILENAME = "root.pem"

#: The partition and region names of the emulated PKI (real: ``aws`` and e.g. ``us-east-1``).
PARTITION = "dev"
REGION = "emulated-1"

ROOT_LIFETIME_YEARS = 30
REGIONAL_LIFETIME = timedelta(days=20, hours=1)
ZONAL_LIFETIME = timedelta(days=5, hours=19)
INSTANCE_LIFETIME = timedelta(hours=24)
#: The leaf is valid from 3 s before its issue time to 3 h after it (3 h 0 min 3 s in all).
LEAF_BACKDATE = timedelta(seconds=3)
LEAF_LIFETIME = timedelta(hours=3)

MODULE_ID_PATTERN = re.compile(r"i-[0-9a-f]{17}-enc[0-9a-f]{16}")
INSTANCE_ID_PATTERN = re.compile(r"i-[0-9a-f]{17}")

_O = "hermetic dev"
_OU = "emulated NSM"
_CRL_BASE = "http://crl.dev-nitro-enclaves.invalid/crl"


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate and the private key it certifies.

    ``der`` and the validity window are read out of the certificate once, here: every
    attestation document embeds the DER and every document checks the window, and a
    certificate never changes (re-issuing one makes a new ``CertifiedKey``).
    """

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    der: bytes = field(init=False, repr=False, compare=False)
    not_before: datetime = field(init=False, repr=False, compare=False)
    not_after: datetime = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cert = self.certificate
        object.__setattr__(self, "der", cert.public_bytes(serialization.Encoding.DER))
        object.__setattr__(self, "not_before", cert.not_valid_before_utc)
        object.__setattr__(self, "not_after", cert.not_valid_after_utc)


@dataclass(frozen=True)
class SigningCredentials:
    """What an attestation document needs: the leaf (with its key) and the CA bundle.

    ``cabundle`` is in document order: root, regional, zonal, instance.
    """

    leaf: CertifiedKey
    cabundle: tuple[x509.Certificate, ...]
    #: ``cabundle`` as DER, in the same order (computed once per set of credentials).
    cabundle_der: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        der = tuple(c.public_bytes(serialization.Encoding.DER) for c in self.cabundle)
        object.__setattr__(self, "cabundle_der", der)


@dataclass(frozen=True)
class _Level:
    name: str
    lifetime: timedelta
    #: Lifetime of the certificates this CA issues: the CA is rotated once it would expire
    #: before a freshly issued child, so a child is always covered by its parent.
    child_lifetime: timedelta


_REGIONAL = _Level("regional", REGIONAL_LIFETIME, ZONAL_LIFETIME)
_ZONAL = _Level("zonal", ZONAL_LIFETIME, INSTANCE_LIFETIME)
_INSTANCE = _Level("instance", INSTANCE_LIFETIME, LEAF_LIFETIME + LEAF_BACKDATE)


def pki_dir() -> Path:
    """``state_dir() / "dev-pki"``: where the emulated PKI is persisted."""
    return state_dir() / PKI_DIRNAME


def root_path() -> Path:
    """The dev root certificate (PEM) that ``TrustRoot.dev()`` pins."""
    return pki_dir() / ROOT_FILENAME


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex (how roots are pinned)."""
    return sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


class DevPKI:
    """The emulated Nitro PKI persisted in one directory.

    Cheap to construct; the root is created on first use. Safe to share between processes
    (an advisory lock serialises issuance); one instance is not meant for several threads.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self._dir = directory if directory is not None else pki_dir()
        self._chain: tuple[CertifiedKey, ...] | None = None
        self._leaves: dict[str, CertifiedKey] = {}
        # The credentials last handed out per module, with the chain they were built on:
        # reused while neither the chain nor the leaf was re-issued, so their DER is not
        # re-serialised for every document.
        self._issued: dict[str, tuple[tuple[CertifiedKey, ...], SigningCredentials]] = {}

    @property
    def directory(self) -> Path:
        return self._dir

    # --- public API -------------------------------------------------------------------

    def root(self, now: datetime) -> x509.Certificate:
        """The dev root certificate (created and persisted if it does not exist yet)."""
        return self.ca_chain(now)[0].certificate

    def trust_root(self, now: datetime) -> TrustRoot:
        """The dev root pinned as a :class:`TrustRoot`, creating the PKI on first use.

        Every service that trusts the dev root (the local KMS, dev releases, client trust
        files) takes it from here, so a fresh state directory is set up the way
        ``hermetic nsm attest`` sets it up instead of failing with a step to run first.
        """
        pem = self.root(now).public_bytes(serialization.Encoding.PEM)
        return TrustRoot.from_pem(pem, name="dev")

    def instance_id(self) -> str:
        """The emulated parent instance id (``i-`` + 17 hex), stable for this directory."""
        with self._locked():
            return self._instance_id_locked()

    def ca_chain(self, now: datetime) -> tuple[CertifiedKey, ...]:
        """Root, regional, zonal and instance CAs, each valid at ``now`` (re-issued if not)."""
        now = _utc(now)
        chain = self._chain
        if chain is not None and self._chain_fresh(chain, now):
            return chain
        with self._locked():
            chain = self._load_or_issue_chain(now)
        self._chain = chain
        self._leaves = {m: leaf for m, leaf in self._leaves.items() if _issued_by(leaf, chain[-1])}
        return chain

    def credentials(self, module_id: str, now: datetime) -> SigningCredentials:
        """The enclave's leaf (reused until it expires) and the CA bundle above it."""
        now = _utc(now)
        if not MODULE_ID_PATTERN.fullmatch(module_id):
            raise NSMError(
                f"module_id: expected i-<17 hex>-enc<16 hex>, got {module_id[:60]!r}",
                "InvalidArgument",
            )
        chain = self.ca_chain(now)
        instance = chain[-1]
        leaf = self._leaves.get(module_id)
        if leaf is None or not _valid_at(leaf, now):
            with self._locked():
                leaf = self._load_or_issue_leaf(module_id, instance, now)
            self._leaves[module_id] = leaf
        issued = self._issued.get(module_id)
        if issued is not None and issued[0] is chain and issued[1].leaf is leaf:
            return issued[1]
        credentials = SigningCredentials(leaf=leaf, cabundle=tuple(c.certificate for c in chain))
        self._issued[module_id] = (chain, credentials)
        return credentials

    # --- chain maintenance --------------------------------------------------------------

    def _chain_fresh(self, chain: tuple[CertifiedKey, ...], now: datetime) -> bool:
        levels = (_REGIONAL, _ZONAL, _INSTANCE)
        if not _valid_at(chain[0], now):
            return False
        return all(
            _valid_at(c, now, level.child_lifetime)
            for c, level in zip(chain[1:], levels, strict=True)
        )

    def _load_or_issue_chain(self, now: datetime) -> tuple[CertifiedKey, ...]:
        root = self._load("root")
        if root is None and self._path("root").exists():
            # Never replace a root someone may have pinned just because its key went missing.
            raise DevPKIStateError(
                f"{self._path('root')} exists but its key root.key.pem does not; "
                f"delete {self._dir} to create a new dev root"
            )
        if root is None:
            root = _issue_root(now)
            self._save("root", root)
        if not _valid_at(root, now):
            raise DevPKIStateError(
                f"dev root {self._path('root')} is not valid at {now.isoformat()} "
                f"(valid {_window(root.certificate)}); delete {self._dir} to create a new one"
            )
        instance_id = self._instance_id_locked()
        chain = [root]
        for level in (_REGIONAL, _ZONAL, _INSTANCE):
            parent = chain[-1]
            current = self._load(level.name)
            if (
                current is None
                or not _valid_at(current, now, level.child_lifetime)
                or not _issued_by(current, parent)
            ):
                current = _issue_ca(level, parent, instance_id, now)
                self._save(level.name, current)
            chain.append(current)
        return tuple(chain)

    def _load_or_issue_leaf(
        self, module_id: str, instance: CertifiedKey, now: datetime
    ) -> CertifiedKey:
        name = f"leaves/{module_id}"
        leaf = self._load(name)
        if leaf is None or not _valid_at(leaf, now) or not _issued_by(leaf, instance):
            leaf = _issue_leaf(module_id, instance, now)
            self._save(name, leaf)
            self._prune_leaves(now)
        return leaf

    def _prune_leaves(self, now: datetime) -> None:
        """Delete leaves that expired (every emulated enclave boot leaves one behind)."""
        for pem in (self._dir / "leaves").glob("*.pem"):
            if pem.name.endswith(".key.pem"):
                continue
            try:
                cert = x509.load_pem_x509_certificate(pem.read_bytes())
            except (OSError, ValueError):
                continue
            if cert.not_valid_after_utc < now - timedelta(days=1):
                with contextlib.suppress(OSError):
                    pem.unlink()
                    pem.with_name(pem.name[: -len(".pem")] + ".key.pem").unlink()

    def _instance_id_locked(self) -> str:
        path = self._dir / "instance-id"
        if path.exists():
            value = path.read_text().strip()
            if not INSTANCE_ID_PATTERN.fullmatch(value):
                raise DevPKIStateError(f"{path}: expected i-<17 hex>, got {value[:40]!r}")
            return value
        value = "i-" + secrets.token_hex(9)[:17]
        _write_atomic(path, value.encode() + b"\n", 0o644)
        return value

    # --- files ---------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self._dir / f"{name}.pem"

    def _load(self, name: str) -> CertifiedKey | None:
        cert_path = self._path(name)
        key_path = self._dir / f"{name}.key.pem"
        if not cert_path.exists() or not key_path.exists():
            return None
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise DevPKIStateError(
                f"{cert_path} or its key is not a readable PEM ({type(exc).__name__})"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != (
            cert.public_key()
        ):
            raise DevPKIStateError(f"{key_path}: key does not match certificate {cert_path}")
        return CertifiedKey(cert, key)

    def _save(self, name: str, item: CertifiedKey) -> None:
        key_pem = item.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Key first: a reader that sees the new certificate must find its key.
        _write_atomic(self._dir / f"{name}.key.pem", key_pem, 0o600)
        _write_atomic(
            self._path(name), item.certificate.public_bytes(serialization.Encoding.PEM), 0o644
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self._dir / "leaves").mkdir(exist_ok=True, mode=0o700)
        fd = os.open(self._dir / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# --- issuing -------------------------------------------------------------------------------


def _issue_root(now: datetime) -> CertifiedKey:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _O),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _OU),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{PARTITION}.nitro-enclaves"),
        ]
    )
    start = _second(now)
    builder = (
        _builder(name, name, key.public_key(), start, _add_years(start, ROOT_LIFETIME_YEARS))
        .serial_number(_random_serial(16))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_ca_key_usage(crl_sign=True), critical=True)
    )
    return CertifiedKey(builder.sign(key, hashes.SHA384()), key)


def _issue_ca(level: _Level, parent: CertifiedKey, instance_id: str, now: datetime) -> CertifiedKey:
    key = ec.generate_private_key(ec.SECP384R1())
    start = _second(now)
    subject_key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        parent.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    )
    if level is _INSTANCE:
        # Real instance certificates: random 20-byte serial, this extension order, no CRL DP.
        builder = (
            _builder(
                _instance_name(f"{instance_id}.{REGION}.{PARTITION}.nitro-enclaves"),
                parent.certificate.subject,
                key.public_key(),
                start,
                start + level.lifetime,
            )
            .serial_number(_random_serial(20))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(subject_key_id, critical=False)
            .add_extension(authority_key_id, critical=False)
        )
        return CertifiedKey(builder.sign(parent.private_key, hashes.SHA384()), key)
    if level is _REGIONAL:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _O),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _OU),
                x509.NameAttribute(
                    NameOID.COMMON_NAME,
                    f"{secrets.token_hex(8)}.{REGION}.{PARTITION}.nitro-enclaves",
                ),
            ]
        )
        path_length = 2
    else:
        subject = x509.Name(
            [
                x509.NameAttribute(
                    NameOID.COMMON_NAME,
                    f"{secrets.token_hex(8)}.zonal.{REGION}.{PARTITION}.nitro-enclaves",
                ),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _OU),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _O),
                x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "WA"),
                x509.NameAttribute(NameOID.LOCALITY_NAME, "Seattle"),
            ]
        )
        path_length = 1
    crl = x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(f"{_CRL_BASE}/{uuid.uuid4()}.crl")],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )
    builder = (
        _builder(
            subject, parent.certificate.subject, key.public_key(), start, start + level.lifetime
        )
        .serial_number(_random_serial(16))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(authority_key_id, critical=False)
        .add_extension(subject_key_id, critical=False)
        .add_extension(_ca_key_usage(crl_sign=True), critical=True)
        .add_extension(crl, critical=False)
    )
    return CertifiedKey(builder.sign(parent.private_key, hashes.SHA384()), key)


def _issue_leaf(module_id: str, instance: CertifiedKey, now: datetime) -> CertifiedKey:
    key = ec.generate_private_key(ec.SECP384R1())
    issued = _second(now)
    # Real leaf serial: the 8 bytes after "enc" in module_id, 4 zero bytes, then the issue
    # time (notBefore + 3 s) as a big-endian uint32.
    enc = bytes.fromhex(module_id.split("-enc", 1)[1])
    serial = int.from_bytes(enc + bytes(4) + int(issued.timestamp()).to_bytes(4, "big"), "big")
    builder = (
        _builder(
            _instance_name(f"{module_id}.{REGION}.{PARTITION}"),
            instance.certificate.subject,
            key.public_key(),
            issued - LEAF_BACKDATE,
            issued + LEAF_LIFETIME,
        )
        .serial_number(serial)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=False,
        )
    )
    return CertifiedKey(builder.sign(instance.private_key, hashes.SHA384()), key)


def _instance_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Washington"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Seattle"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _O),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _OU),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _ca_key_usage(*, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _random_serial(length: int) -> int:
    # Positive and exactly ``length`` bytes long in DER (top bit clear, first byte non-zero).
    first = secrets.randbelow(0x7F) + 1
    return int.from_bytes(bytes([first]) + secrets.token_bytes(length - 1), "big")


# --- helpers -------------------------------------------------------------------------------


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise NSMError(
            "now: expected a timezone-aware datetime, got a naive one", "InvalidArgument"
        )
    return now.astimezone(UTC)


def _second(now: datetime) -> datetime:
    return now.replace(microsecond=0)


def _add_years(start: datetime, years: int) -> datetime:
    try:
        return start.replace(year=start.year + years)
    except ValueError:  # 29 February
        return start.replace(year=start.year + years, day=28)


def _valid_at(item: CertifiedKey, now: datetime, margin: timedelta = timedelta(0)) -> bool:
    return item.not_before <= now and now + margin < item.not_after


def _window(cert: x509.Certificate) -> str:
    return f"{cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()}"


def _issued_by(child: CertifiedKey, parent: CertifiedKey) -> bool:
    if child.certificate.issuer != parent.certificate.subject:
        return False
    try:
        child.certificate.verify_directly_issued_by(parent.certificate)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
