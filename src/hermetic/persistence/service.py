"""The persistence service's operations: the root key from KMS, tenant keyrings in the store.

This is the service edge of the persistence core, still free of the enclave runtime: it
talks to KMS and to the parent's record store through the two small protocols below, so the
enclave app (``services/persistence``) hands it the attested KMS client and a record store
client that leaves through the proxy's egress, and nothing here knows about either.

**The root key.** The service keeps one record of its own, ``<store id>/root-key``, holding
only the KMS ``CiphertextBlob`` of its root key. :func:`obtain_root_key` reads it: absent
(first boot), it asks KMS ``GenerateDataKey`` (AES-256) and writes the blob with
compare-and-set "must not exist"; present, it asks KMS ``Decrypt`` of the blob. Both carry
the encryption context ``{"service": "hermetic-persistence", "store": <store id>}``, and
the KMS client the enclave gives it adds ``Recipient`` (the attestation document), so KMS
releases the key only to an image whose PCRs the key policy pins, encrypted to a key only
that enclave holds. The plaintext root then lives only in this process's memory
(:class:`~hermetic.persistence.keys.RootKey`); KMS is called once per boot (twice only if
another instance won the first-boot race, see :func:`obtain_root_key`) and never again:
tenant keys are derived from the root, named keys are unwrapped with them.

**Keyrings.** A tenant's keyring is the sealed record ``<store id>/tenants/<tenant>/keyring``
(:class:`~hermetic.persistence.keyring.Keyring`). Every change reads it, applies the change
to that state and writes it back with compare-and-set at the version read; a writer that
lost the race starts again from the new state, so two concurrent rotations make two
versions, never one lost update.

**Not yet** (issue 10): which caller may read or change which tenant's keys (the access
policy, item 6) and the tenant admin's signature on ``put_key`` (item 7) are not checked
here: every caller of the attested channel is trusted. The expected counters come from the
untrusted store's own versions until the store state is anchored in the log (item 5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from hermetic.errors import (
    HermeticError,
    PersistenceConfigError,
    PersistenceConflictError,
    RecordNotFoundError,
    RootKeyError,
    TenantExistsError,
    TenantNotFoundError,
    VersionConflictError,
)
from hermetic.persistence.keyring import Keyring
from hermetic.persistence.keys import KEY_SIZE, DataKey, RootKey, check_store_id, check_tenant
from hermetic.store.records import Record

__all__ = [
    "CAS_ATTEMPTS",
    "KeyRelease",
    "PersistenceService",
    "PersistenceSettings",
    "RecordStore",
    "obtain_root_key",
]

SERVICE_CONTEXT = "hermetic-persistence"
CAS_ATTEMPTS = 8
"""Compare-and-set attempts per change before :class:`PersistenceConflictError`."""


class GeneratedKey(Protocol):
    """What ``GenerateDataKey`` returns (:class:`hermetic.kms.client.DataKey`)."""

    @property
    def plaintext(self) -> bytes: ...

    @property
    def ciphertext_blob(self) -> bytes: ...


class KeyRelease(Protocol):
    """The two KMS operations the root key needs, attested by the caller's client
    (:class:`hermetic.kms.client.EnclaveKMSClient` adds ``Recipient``)."""

    def generate_data_key(
        self, key_id: str, *, encryption_context: Mapping[str, str] | None = None
    ) -> GeneratedKey: ...

    def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> bytes: ...


class RecordStore(Protocol):
    """The record store operations used (:class:`hermetic.store.client.RecordStoreClient`)."""

    def get(self, record_id: str) -> Record: ...

    def put(self, record_id: str, data: bytes, expected_version: int | None) -> int: ...


@dataclass(frozen=True)
class PersistenceSettings:
    """The ``persistence`` section of the signed runtime config (minus the store's address,
    which only the enclave edge uses): which store namespace, which KMS key."""

    store_id: str
    key_id: str

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> PersistenceSettings:
        section = values.get("persistence")
        if not isinstance(section, dict):
            raise PersistenceConfigError(
                f"config persistence: expected an object, got {type(section).__name__}"
            )
        key_id = section.get("key_id")
        if not isinstance(key_id, str) or not key_id:
            raise PersistenceConfigError(
                f"config persistence.key_id: expected a KMS key id, got {key_id!r}"
            )
        try:
            store_id = check_store_id(section.get("store_id"), field="config persistence.store_id")
        except HermeticError as exc:
            raise PersistenceConfigError(str(exc)) from None
        return cls(store_id, key_id)

    @property
    def root_record(self) -> str:
        return f"{self.store_id}/root-key"

    @property
    def encryption_context(self) -> dict[str, str]:
        return {"service": SERVICE_CONTEXT, "store": self.store_id}


@dataclass(frozen=True)
class RootKeyOrigin:
    """How this boot got its root: ``generated`` (first boot) or ``decrypted``, and how many
    KMS calls that took."""

    source: str
    kms_calls: int


def _root(material: bytes, operation: str) -> RootKey:
    if not isinstance(material, bytes) or len(material) != KEY_SIZE:
        size = len(material) if isinstance(material, bytes) else type(material).__name__
        raise RootKeyError(f"root key: KMS {operation} returned {size} bytes, expected {KEY_SIZE}")
    return RootKey(material)


def _kms_refused(operation: str, what: str, exc: HermeticError) -> RootKeyError:
    # KMS error messages name the key and the failed condition, never key material.
    return RootKeyError(f"root key: KMS {operation} of {what} failed: {type(exc).__name__}: {exc}")


def obtain_root_key(
    kms: KeyRelease, store: RecordStore, settings: PersistenceSettings
) -> tuple[RootKey, RootKeyOrigin]:
    """The root key: ``Decrypt`` of the kept blob, or on first boot ``GenerateDataKey`` and
    the blob kept (see the module docstring).

    Two instances booting on an empty store both generate; the compare-and-set lets one
    blob in, and the loser decrypts the winner's (its own key is dropped unused), so every
    instance ends with the same root. Store errors propagate as they are
    (:class:`~hermetic.errors.RecordStoreError`): the caller may retry those; KMS refusals
    are :class:`RootKeyError`.
    """
    calls = 0
    context = settings.encryption_context
    record_id = settings.root_record
    try:
        kept: bytes | None = store.get(record_id).data
    except RecordNotFoundError:
        kept = None
    if kept is None:
        calls += 1
        try:
            generated = kms.generate_data_key(settings.key_id, encryption_context=context)
        except HermeticError as exc:
            raise _kms_refused("GenerateDataKey", f"key {settings.key_id!r}", exc) from None
        try:
            store.put(record_id, generated.ciphertext_blob, None)
        except VersionConflictError:
            kept = store.get(record_id).data  # another instance's first boot won
        else:
            return _root(generated.plaintext, "GenerateDataKey"), RootKeyOrigin("generated", calls)
    calls += 1
    try:
        plaintext = kms.decrypt(kept, key_id=settings.key_id, encryption_context=context)
    except HermeticError as exc:
        raise _kms_refused("Decrypt", f"the blob kept in {record_id!r}", exc) from None
    return _root(plaintext, "Decrypt"), RootKeyOrigin("decrypted", calls)


@dataclass(frozen=True, eq=False, repr=False)
class PersistenceService:
    """The booted service: the root key (memory only), the store, and the operations.

    Every operation is blocking (record store round trips); the enclave app runs them in a
    worker thread. Access policy and admin signatures are not checked yet (module docstring).
    """

    root: RootKey
    store: RecordStore
    settings: PersistenceSettings
    origin: RootKeyOrigin

    def __repr__(self) -> str:
        return f"PersistenceService(store_id={self.settings.store_id!r}, <redacted>)"

    @classmethod
    def boot(
        cls, kms: KeyRelease, store: RecordStore, settings: PersistenceSettings
    ) -> PersistenceService:
        root, origin = obtain_root_key(kms, store, settings)
        return cls(root, store, settings, origin)

    # --- record ids ----------------------------------------------------------------------

    def keyring_record(self, tenant: str) -> str:
        return f"{self.settings.store_id}/tenants/{check_tenant(tenant)}/keyring"

    def data_record(self, tenant: str, record_id: str) -> str:
        return f"{self.settings.store_id}/tenants/{check_tenant(tenant)}/records/{record_id}"

    # --- keyrings ------------------------------------------------------------------------

    def _load(self, tenant: str) -> tuple[Keyring, int]:
        record_id = self.keyring_record(tenant)
        try:
            record = self.store.get(record_id)
        except RecordNotFoundError:
            raise TenantNotFoundError(
                f"tenant {tenant!r}: no keyring in the store (create_tenant first)"
            ) from None
        tenant_key = self.root.tenant_key(self.settings.store_id, tenant)
        return Keyring.open(tenant_key, record_id, record.version, record.data), record.version

    def _change(self, tenant: str, change: Callable[[Keyring], Keyring]) -> Keyring:
        """Apply ``change`` to the stored keyring with compare-and-set, retrying on a race."""
        record_id = self.keyring_record(tenant)
        for _ in range(CAS_ATTEMPTS):
            ring, version = self._load(tenant)
            changed = change(ring)
            try:
                self.store.put(record_id, changed.seal(record_id, version + 1), version)
            except VersionConflictError:
                continue
            return changed
        raise PersistenceConflictError(
            f"tenant {tenant!r}: keyring changed under each of {CAS_ATTEMPTS} compare-and-set"
            " attempts; nothing was written"
        )

    def create_tenant(self, tenant: str) -> None:
        """An empty keyring for ``tenant`` (version 1 of its keyring record)."""
        record_id = self.keyring_record(tenant)
        ring = Keyring(self.root.tenant_key(self.settings.store_id, tenant))
        try:
            self.store.put(record_id, ring.seal(record_id, 1), None)
        except VersionConflictError:
            raise TenantExistsError(f"tenant {tenant!r}: already has a keyring") from None

    def put_key(self, tenant: str, name: str, material: bytes) -> int:
        """Store ``material`` (32 bytes) as the next version of ``name`` (1 if new)."""

        def put(ring: Keyring) -> Keyring:
            if name in ring.names:
                return ring.rotate(name, material)
            return ring.create(name, material)

        return self._change(tenant, put).current_version(name)

    def rotate(self, tenant: str, name: str) -> int:
        """A fresh random version n+1 of ``name``; the new current version."""
        return self._change(tenant, lambda ring: ring.rotate(name)).current_version(name)

    def retire(self, tenant: str, name: str, version: int) -> None:
        """Erase ``version`` of ``name``: its records no longer open."""
        self._change(tenant, lambda ring: ring.retire(name, version))

    def get_key(self, tenant: str, name: str, version: int | None = None) -> DataKey:
        """Version ``version`` (default: current) of ``name``, unwrapped."""
        ring, _ = self._load(tenant)
        return ring.key(name, version)

    def describe(self, tenant: str) -> dict[str, Any]:
        """Names and versions of the tenant's keys (no material)."""
        ring, version = self._load(tenant)
        keys = {
            k.name: {"current": k.current, "live": list(k.live), "retired": list(k.retired)}
            for k in ring.state.keys
        }
        return {"tenant": tenant, "keyring_version": version, "keys": keys}

    # --- sealed records ------------------------------------------------------------------

    def put_record(self, tenant: str, name: str, record_id: str, data: bytes) -> int:
        """``data`` sealed under the current version of ``name`` as the tenant's record
        ``record_id`` (created, or replaced with compare-and-set); the key version used."""
        ring, _ = self._load(tenant)
        stored_id = self.data_record(tenant, record_id)
        for _ in range(CAS_ATTEMPTS):
            try:
                expected: int | None = self.store.get(stored_id).version
            except RecordNotFoundError:
                expected = None
            counter = 1 if expected is None else expected + 1
            sealed = ring.seal_record(name, stored_id, counter, data)
            try:
                self.store.put(stored_id, sealed, expected)
            except VersionConflictError:
                continue
            return ring.current_version(name)
        raise PersistenceConflictError(
            f"record {record_id!r} of tenant {tenant!r}: changed under each of"
            f" {CAS_ATTEMPTS} compare-and-set attempts; nothing was written"
        )

    def get_record(self, tenant: str, name: str, record_id: str) -> bytes:
        """The plaintext of the tenant's record ``record_id``, sealed under any live version
        of ``name``; a retired version is :class:`~hermetic.errors.KeyRetiredError`."""
        ring, _ = self._load(tenant)
        stored_id = self.data_record(tenant, record_id)
        record = self.store.get(stored_id)
        return ring.open_record(name, stored_id, record.version, record.data)

    def status(self) -> dict[str, Any]:
        """What a test or an operator may see: no key material."""
        return {
            "state": "ready",
            "store_id": self.settings.store_id,
            "root_key": self.origin.source,
            "kms_calls": self.origin.kms_calls,
        }
