"""The key hierarchy: one root key, a derived key pair per tenant, random versioned named keys.

::

    root key (32 bytes; from KMS at boot, issue 10 item 2)
      └─ HKDF-SHA256 ─► tenant key pair, per (store id, tenant)
                          ├─ wrapping key ─► wraps each version of each named key
                          └─ state key ────► seals the tenant's keyring state record
                                               └─ named key "insights/app-usage"
                                                    v1 (retired: material gone), v2, v3 (current)
                                                    each version: 32 random bytes, stored only
                                                    wrapped (AES-256-GCM) under the wrapping key

Why the two levels are built differently:

* **Tenant keys are derived** (HKDF-SHA256 from the root, with a length-prefixed info
  string naming the purpose, the store id and the tenant). They never seal data, they only
  wrap and seal the tenant's keyring, so they need no storage of their own and every boot
  re-derives the same ones from the same root. A tenant key cannot be erased without the
  root, but erasing a tenant is erasing its keyring record, which holds all it protects.
* **Named-key versions are random and wrapped**, not derived. Retiring a version must make
  its records unreadable. A derived version key could be re-derived by anyone holding the
  root (a later bug, an old build, a leaked root), so "retired" would only be a flag the
  keyring promises to honour. A random key whose wrapped copy is deleted from the keyring is
  gone: after :meth:`~hermetic.persistence.keyring.Keyring.retire` the keyring state no
  longer contains any encryption of it. ``rotate`` is then just "generate version n+1";
  records sealed under older live versions keep opening and are re-sealed under the current
  version when they are next written (lazily), never in a bulk pass.

What retirement does not erase: a copy of an *older* keyring record (a host's backup of
the untrusted store) still holds the wrapped version, and the root still unwraps it. The
genuine service never loads such a copy, because the store's state is anchored in the
transparency log (issue 10 item 5) and an older keyring state is a detected rollback. So
retirement is cryptographic erasure against everyone who does not hold both a backup taken
before the retirement and the root key.

Keys are frozen dataclasses whose repr names their identity and never their material;
they compare by identity (``eq=False``), so no ``==`` runs a non-constant-time comparison
over key bytes. Python cannot wipe memory: material lives until it is garbage collected.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hermetic.errors import KeyringFormatError, PersistenceUsageError

__all__ = [
    "DOMAIN",
    "KEY_SIZE",
    "MAX_KEY_NAME_LENGTH",
    "MAX_KEY_NAME_SEGMENTS",
    "MAX_KEY_VERSION",
    "MAX_SEGMENT_LENGTH",
    "WRAPPED_KEY_SIZE",
    "DataKey",
    "RootKey",
    "TenantKey",
    "check_key_name",
    "check_key_version",
    "check_store_id",
    "check_tenant",
    "length_prefixed",
    "unwrap_key",
    "wrap_key",
]

DOMAIN = b"hermetic/persistence/v1"
"""The first field of every HKDF info string and every associated data this package builds."""

KEY_SIZE = 32
"""Every key here is an AES-256 key (and the root is 32 bytes, as KMS's AES_256 data key)."""

_NONCE_SIZE = 12
_TAG_SIZE = 16

WRAPPED_KEY_SIZE = _NONCE_SIZE + KEY_SIZE + _TAG_SIZE
"""A wrapped named-key version: 12-byte nonce, 32-byte ciphertext, 16-byte GCM tag."""

MAX_KEY_VERSION = (1 << 32) - 1
"""Key versions are unsigned 32-bit in the sealed record header."""

MAX_SEGMENT_LENGTH = 64
MAX_KEY_NAME_SEGMENTS = 8
MAX_KEY_NAME_LENGTH = 128

_SEGMENT = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SEGMENT_RULE = (
    f"1 to {MAX_SEGMENT_LENGTH} characters of a-z 0-9 . _ -, starting with a letter or digit"
)


# --- names -------------------------------------------------------------------------------


def _shown(value: str) -> str:
    return repr(value if len(value) <= 64 else value[:64] + "...")


def _check_segment(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise PersistenceUsageError(f"{field}: expected a string, got {type(value).__name__}")
    if _SEGMENT.fullmatch(value) is None:
        raise PersistenceUsageError(f"{field}: expected {_SEGMENT_RULE}, got {_shown(value)}")
    return value


def check_store_id(value: object, *, field: str = "store id") -> str:
    """A store id: one name segment (``persistence-eu1``). It separates deployments that
    share a root key: nothing sealed for one store opens in another."""
    return _check_segment(value, field)


def check_tenant(value: object, *, field: str = "tenant") -> str:
    """A tenant id: one name segment (``tenant-7``)."""
    return _check_segment(value, field)


def check_key_name(value: object, *, field: str = "key name") -> str:
    """A named key: 1 to 8 segments joined by ``/`` (``insights/app-usage``), at most 128
    characters. Lower case only, so two names never differ by case alone (access policies
    match names by pattern, issue 10 item 6), and no segment is ``.`` or ``..``."""
    if not isinstance(value, str):
        raise PersistenceUsageError(f"{field}: expected a string, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_KEY_NAME_LENGTH:
        raise PersistenceUsageError(
            f"{field}: expected 1 to {MAX_KEY_NAME_LENGTH} characters, got {len(value)}"
        )
    segments = value.split("/")
    if len(segments) > MAX_KEY_NAME_SEGMENTS:
        raise PersistenceUsageError(
            f"{field}: expected at most {MAX_KEY_NAME_SEGMENTS} '/'-separated segments,"
            f" got {len(segments)}"
        )
    for segment in segments:
        if _SEGMENT.fullmatch(segment) is None:
            raise PersistenceUsageError(
                f"{field}: expected '/'-separated segments of {_SEGMENT_RULE}, got {_shown(value)}"
            )
    return value


def check_key_version(value: object, *, field: str = "key version") -> int:
    """A named key's version: 1..:data:`MAX_KEY_VERSION`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise PersistenceUsageError(f"{field}: expected an integer, got {type(value).__name__}")
    if not 1 <= value <= MAX_KEY_VERSION:
        raise PersistenceUsageError(f"{field}: expected 1..{MAX_KEY_VERSION}, got {value}")
    return value


def _check_material(value: object, what: str) -> bytes:
    """Exactly :data:`KEY_SIZE` bytes; the message gives the size, never the bytes."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise PersistenceUsageError(f"{what}: expected bytes, got {type(value).__name__}")
    material = bytes(value)
    if len(material) != KEY_SIZE:
        raise PersistenceUsageError(f"{what}: expected {KEY_SIZE} bytes, got {len(material)}")
    return material


def length_prefixed(*fields: bytes) -> bytes:
    """Each field as a 4-byte big-endian length and its bytes, concatenated.

    The one encoding of HKDF info strings and associated data in this package: no two
    different field lists encode alike, whatever bytes the fields hold.
    """
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def _derive(root: bytes, purpose: bytes, store_id: str, tenant: str) -> bytes:
    info = length_prefixed(DOMAIN, purpose, store_id.encode(), tenant.encode())
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(root)


# --- the keys ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class RootKey:
    """The service's single root key. Only tenant keys are derived from it."""

    material: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "material", _check_material(self.material, "root key"))

    def __repr__(self) -> str:
        return "RootKey(<redacted>)"

    def tenant_key(self, store_id: str, tenant: str) -> TenantKey:
        """The tenant's key pair in this store: the same for the same root, every boot."""
        check_store_id(store_id)
        check_tenant(tenant)
        return TenantKey(
            store_id=store_id,
            tenant=tenant,
            wrapping_key=_derive(self.material, b"tenant-wrapping-key", store_id, tenant),
            state_key=_derive(self.material, b"tenant-state-key", store_id, tenant),
        )


@dataclass(frozen=True, eq=False, repr=False)
class TenantKey:
    """A tenant's two derived keys: one wraps named-key versions, one seals the keyring.

    Two keys, not one key under two labels, so a wrapped key and a sealed keyring state can
    never be confused however their associated data were built.
    """

    store_id: str
    tenant: str
    wrapping_key: bytes
    state_key: bytes

    def __post_init__(self) -> None:
        check_store_id(self.store_id)
        check_tenant(self.tenant)
        object.__setattr__(
            self, "wrapping_key", _check_material(self.wrapping_key, "tenant wrapping key")
        )
        object.__setattr__(self, "state_key", _check_material(self.state_key, "tenant state key"))

    def __repr__(self) -> str:
        return f"TenantKey(store_id={self.store_id!r}, tenant={self.tenant!r}, <redacted>)"


@dataclass(frozen=True, eq=False, repr=False)
class DataKey:
    """One version of one named key: the AES-256-GCM key its records are sealed with (and,
    later, the material an admitted service fetches with ``get_key``)."""

    store_id: str
    tenant: str
    name: str
    version: int
    material: bytes

    def __post_init__(self) -> None:
        check_store_id(self.store_id)
        check_tenant(self.tenant)
        check_key_name(self.name)
        check_key_version(self.version)
        object.__setattr__(self, "material", _check_material(self.material, "key material"))

    def __repr__(self) -> str:
        return (
            f"DataKey(store_id={self.store_id!r}, tenant={self.tenant!r}, name={self.name!r},"
            f" version={self.version}, <redacted>)"
        )


# --- wrapping ----------------------------------------------------------------------------


def _wrap_aad(tenant_key: TenantKey, name: str, version: int) -> bytes:
    return length_prefixed(
        DOMAIN,
        b"wrapped-key",
        tenant_key.store_id.encode(),
        tenant_key.tenant.encode(),
        name.encode(),
        version.to_bytes(4, "big"),
    )


def wrap_key(tenant_key: TenantKey, name: str, version: int, material: bytes) -> bytes:
    """``material`` (32 bytes) encrypted under the tenant's wrapping key, bound to the name
    and version: nonce (12) ‖ AES-256-GCM ciphertext and tag (48)."""
    check_key_name(name)
    check_key_version(version)
    material = _check_material(material, "key material")
    nonce = os.urandom(_NONCE_SIZE)
    sealed = AESGCM(tenant_key.wrapping_key).encrypt(
        nonce, material, _wrap_aad(tenant_key, name, version)
    )
    return nonce + sealed


def unwrap_key(tenant_key: TenantKey, name: str, version: int, wrapped: bytes) -> DataKey:
    """The :class:`DataKey` that :func:`wrap_key` wrapped for this tenant, name and version."""
    check_key_name(name)
    check_key_version(version)
    if not isinstance(wrapped, bytes) or len(wrapped) != WRAPPED_KEY_SIZE:
        size = len(wrapped) if isinstance(wrapped, bytes) else type(wrapped).__name__
        raise KeyringFormatError(
            f"wrapped key {name!r} version {version}: expected {WRAPPED_KEY_SIZE} bytes, got {size}"
        )
    try:
        material = AESGCM(tenant_key.wrapping_key).decrypt(
            wrapped[:_NONCE_SIZE], wrapped[_NONCE_SIZE:], _wrap_aad(tenant_key, name, version)
        )
    except InvalidTag:
        raise KeyringFormatError(
            f"wrapped key {name!r} version {version}: does not unwrap under the wrapping key of"
            f" tenant {tenant_key.tenant!r} in store {tenant_key.store_id!r}"
        ) from None
    return DataKey(tenant_key.store_id, tenant_key.tenant, name, version, material)
