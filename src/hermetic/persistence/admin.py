"""Tenant admin requests: what an admin signs, and the one check of that signature.

Every change to a tenant (``create_tenant``, ``put_key``, ``rotate``, ``retire``,
``delete``, ``enable``/``disable`` of a feature) and the reading of its audit trail is an
:class:`AdminRequest` signed with the tenant admin's **Ed25519** key, registered when the
tenant is created. Ed25519 rather than P-256: signing is deterministic (no per-signature
nonce whose reuse or bias leaks the key, the failure ECDSA deployments keep having), the
public key is 32 raw bytes with one encoding, verification has no malleable ``(r, s)``
pairs to canonicalise, every modern browser's WebCrypto has it, and the project already
signs operator config, release statements and log notes with it. (P-256 would be the
choice where admin keys live in hardware that only does NIST curves, e.g. passkeys; the
request encoding below does not depend on the curve.)

The signed bytes are a sequence of length-prefixed fields (the package's one encoding,
:func:`~hermetic.persistence.keys.length_prefixed`), so two different requests never
sign alike::

    LP("hermetic/persistence/admin/v1") || LP(operation) || LP(store id) || LP(tenant)
      || LP(counter, 8 bytes big-endian) || LP(name) || LP(version, 4 bytes big-endian)
      || LP(SHA-256 of the material, or empty) || LP(feature) || LP(admin public key, or empty)

Unused fields are empty (version 0). The store id binds a request to one deployment, the
tenant and operation to one action, the material digest to the exact key bytes (the
material itself travels only inside the attested channel), and the **counter** makes each
request usable once: the service accepts a request only if its counter is above the last
one it accepted for the tenant and stores the new value before acting (compare-and-set),
so a replayed or reordered request is :class:`~hermetic.errors.AdminReplayError`.
``create_tenant`` is signed by the key it registers (counter 1 or above), so nobody can
register a key they do not hold.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hermetic.errors import AdminSignatureError, PersistenceUsageError
from hermetic.persistence.keys import check_key_name, check_store_id, check_tenant, length_prefixed

__all__ = [
    "ADMIN_DOMAIN",
    "ADMIN_KEY_SIZE",
    "ADMIN_OPERATIONS",
    "MAX_COUNTER",
    "AdminRequest",
    "admin_public_key",
    "check_admin_key",
    "check_feature",
]

ADMIN_DOMAIN = b"hermetic/persistence/admin/v1"
ADMIN_KEY_SIZE = 32
SIGNATURE_SIZE = 64
MAX_COUNTER = 2**63 - 1
ADMIN_OPERATIONS = (
    "create_tenant",
    "put_key",
    "rotate",
    "retire",
    "delete",
    "enable",
    "disable",
    "audit",
)
"""What an admin signs for. ``delete`` removes a whole named key (every version)."""

_NEEDS_NAME = ("put_key", "rotate", "retire", "delete")


def check_admin_key(value: object, *, field: str = "admin_key") -> bytes:
    """A raw Ed25519 public key (32 bytes) that is a valid curve point."""
    if not isinstance(value, bytes) or len(value) != ADMIN_KEY_SIZE:
        size = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise PersistenceUsageError(
            f"{field}: expected a raw Ed25519 public key ({ADMIN_KEY_SIZE} bytes), got {size}"
        )
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(value)
    except ValueError:
        raise PersistenceUsageError(f"{field}: not a valid Ed25519 public key") from None
    return value


def check_feature(value: object, *, field: str = "feature") -> str:
    """A feature name: one segment under the tenant naming rules."""
    return check_tenant(value, field=field)


def admin_public_key(private: ed25519.Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key ``create_tenant`` registers."""
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@dataclass(frozen=True)
class AdminRequest:
    """One admin action, as signed. ``material_digest`` is SHA-256 of the key material for
    ``put_key`` (empty otherwise); see the module docstring for the encoding."""

    operation: str
    store_id: str
    tenant: str
    counter: int
    name: str = ""
    version: int = 0
    material_digest: bytes = b""
    feature: str = ""
    admin_key: bytes = b""

    def __post_init__(self) -> None:
        if self.operation not in ADMIN_OPERATIONS:
            raise PersistenceUsageError(
                f"admin operation: expected one of {', '.join(ADMIN_OPERATIONS)},"
                f" got {self.operation!r}"
            )
        check_store_id(self.store_id)
        check_tenant(self.tenant)
        if isinstance(self.counter, bool) or not isinstance(self.counter, int):
            raise PersistenceUsageError(
                f"counter: expected an integer, got {type(self.counter).__name__}"
            )
        if not 1 <= self.counter <= MAX_COUNTER:
            raise PersistenceUsageError(f"counter: expected 1 to {MAX_COUNTER}, got {self.counter}")
        if self.operation in _NEEDS_NAME:
            check_key_name(self.name, field="name")
        elif self.name:
            raise PersistenceUsageError(f"name: {self.operation} takes none, got {self.name!r}")
        if not 0 <= self.version < 2**32:
            raise PersistenceUsageError(f"version: expected 0 to 2^32 - 1, got {self.version}")
        if (self.operation == "retire") != (self.version > 0):
            raise PersistenceUsageError(
                f"version: retire needs a version >= 1, other operations none;"
                f" got {self.operation} with version {self.version}"
            )
        if (self.operation == "put_key") != (len(self.material_digest) == 32):
            raise PersistenceUsageError(
                "material digest: put_key needs the SHA-256 of the material (32 bytes), other"
                f" operations none; got {self.operation} with {len(self.material_digest)} bytes"
            )
        if self.operation in ("enable", "disable"):
            check_feature(self.feature)
        elif self.feature:
            raise PersistenceUsageError(
                f"feature: {self.operation} takes none, got {self.feature!r}"
            )
        if self.operation == "create_tenant":
            check_admin_key(self.admin_key)
        elif self.admin_key:
            raise PersistenceUsageError(f"admin_key: {self.operation} takes none")

    @staticmethod
    def material_digest_of(material: bytes) -> bytes:
        return hashlib.sha256(material).digest()

    def signed_bytes(self) -> bytes:
        """The exact bytes the admin signs (module docstring)."""
        return length_prefixed(
            ADMIN_DOMAIN,
            self.operation.encode(),
            self.store_id.encode(),
            self.tenant.encode(),
            self.counter.to_bytes(8, "big"),
            self.name.encode(),
            self.version.to_bytes(4, "big"),
            self.material_digest,
            self.feature.encode(),
            self.admin_key,
        )

    def sign(self, private: ed25519.Ed25519PrivateKey) -> bytes:
        """The admin client's half: the 64-byte Ed25519 signature."""
        return private.sign(self.signed_bytes())

    def verify(self, admin_key: bytes, signature: object) -> None:
        """Raise :class:`AdminSignatureError` unless ``signature`` is ``admin_key``'s over
        this request. The message names the request, never the key material."""
        what = f"{self.operation} of tenant {self.tenant!r} (counter {self.counter})"
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            size = f"{len(signature)} bytes" if isinstance(signature, bytes) else "none"
            raise AdminSignatureError(
                f"admin signature on {what}: expected {SIGNATURE_SIZE} bytes, got {size}"
            )
        public = ed25519.Ed25519PublicKey.from_public_bytes(check_admin_key(admin_key))
        try:
            public.verify(signature, self.signed_bytes())
        except InvalidSignature:
            raise AdminSignatureError(
                f"admin signature on {what}: does not verify under the tenant admin's key"
                " (forged, made for another request, store or counter, or by another key)"
            ) from None
