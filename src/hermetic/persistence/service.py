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

**Who may do what.** The operations above are the unguarded core. The guarded layer
(:class:`GuardedPersistence`, what the enclave app serves) wraps them: each change is an
:class:`~hermetic.persistence.admin.AdminRequest` signed by the tenant admin's Ed25519 key
(registered by ``create_tenant``, kept with the last accepted counter and the enabled
features in the sealed ``<store id>/tenants/<tenant>/admin`` record), and ``get_key`` is
allowed only to a :class:`Caller` that came over an attested XX session and whose release
the :class:`~hermetic.persistence.policy.AccessPolicy` admits for a feature the tenant
enabled. Every fetch, refusal and change is appended to the tenant's hash-chained audit
trail (:mod:`hermetic.persistence.audit`) before the call returns; a fetch whose audit
entry cannot be written is refused, so no key leaves unrecorded.

**Rollback.** The enclave boots with :meth:`PersistenceService.boot` given an ``anchor``
opener: the root-key record is read with the plain store (the state key derives from the
root), then the store is opened as an :class:`~hermetic.persistence.anchor.AnchoredStore`,
checked against the newest state statement in the witnessed log, and every later read and
write (keyrings, admin records, audit trails, records) goes through it, wrapped in an
:class:`AnchorSchedule` that anchors the newest state on a timer and after N writes in
``deferred`` mode. So the expected counters are the anchored state's versions, not the
untrusted store's word: a host restoring an older admin record, keyring or audit trail is
refused (:class:`~hermetic.errors.AnchorError`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from hermetic.cbor import canonical_dumps, strict_loads
from hermetic.errors import (
    AccessDeniedError,
    AdminReplayError,
    AdminSignatureError,
    AuditTrailError,
    HermeticError,
    KeyNotFoundError,
    KeyringFormatError,
    PersistenceConfigError,
    PersistenceConflictError,
    PersistenceUsageError,
    RecordNotFoundError,
    RootKeyError,
    TenantExistsError,
    TenantNotFoundError,
    VersionConflictError,
)
from hermetic.persistence.admin import AdminRequest, check_admin_key, check_feature
from hermetic.persistence.anchor import AnchoredStore, AnchorMode
from hermetic.persistence.audit import AuditEntry, AuditHead, genesis_hash, verify_audit_trail
from hermetic.persistence.keyring import Keyring, KeyringState
from hermetic.persistence.keys import (
    KEY_SIZE,
    DataKey,
    RootKey,
    TenantKey,
    check_store_id,
    check_tenant,
)
from hermetic.persistence.policy import AccessPolicy
from hermetic.persistence.sealing import open_tenant_record, seal_tenant_record
from hermetic.store.records import Record

__all__ = [
    "CAS_ATTEMPTS",
    "AnchorSchedule",
    "AnchorSettings",
    "AuditTrail",
    "Caller",
    "GuardedPersistence",
    "KeyRelease",
    "PersistenceService",
    "PersistenceSettings",
    "RecordStore",
    "TenantAdmin",
    "obtain_root_key",
]

log = logging.getLogger("hermetic.persistence")

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
class AnchorSettings:
    """The ``persistence.anchor`` section: which log the store state is anchored in (its
    address, its key and the witnesses whose cosignatures make a checkpoint count) and how.

    ``mode`` ``deferred`` (default) acknowledges a write once it is stored and anchors the
    newest state every ``interval`` seconds and after ``writes`` writes; ``anchored``
    acknowledges a write only once a witnessed checkpoint includes its state. ``max_age``
    bounds how old, by the enclave's trusted clock, the newest cosignature may be (the
    window of docs/persistence.md, "Rollback detection"). The vkeys and the address are
    checked by the enclave edge, which parses them.
    """

    log: str
    log_key: str
    witnesses: tuple[str, ...]
    threshold: int = 1
    max_age: int = 300
    mode: AnchorMode = "deferred"
    interval: float = 30.0
    writes: int = 64

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> AnchorSettings:
        persistence = values.get("persistence")
        section = persistence.get("anchor") if isinstance(persistence, dict) else None
        where = "config persistence.anchor"
        if not isinstance(section, dict):
            raise PersistenceConfigError(
                f"{where}: expected an object naming the log the store state is anchored in"
                f" (log, log_key, witnesses), got {type(section).__name__}"
            )
        known = {"log", "log_key", "witnesses", "threshold", "max_age", "mode", "interval",
                 "writes"}  # fmt: skip
        unknown = sorted(str(k) for k in set(section) - known)
        if unknown:
            raise PersistenceConfigError(f"{where}: unknown fields {unknown}")
        log_address = section.get("log")
        if not isinstance(log_address, str) or not log_address:
            raise PersistenceConfigError(f"{where}.log: expected 'host:port', got {log_address!r}")
        log_key = section.get("log_key")
        if not isinstance(log_key, str) or not log_key:
            raise PersistenceConfigError(
                f"{where}.log_key: expected the log's verifier key, got {log_key!r}"
            )
        witnesses = section.get("witnesses")
        if (
            not isinstance(witnesses, list)
            or not witnesses
            or not all(isinstance(w, str) and w for w in witnesses)
        ):
            raise PersistenceConfigError(
                f"{where}.witnesses: expected a non-empty list of witness verifier keys,"
                f" got {witnesses!r}"
            )
        threshold = section.get("threshold", 1)
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int)
            or not 1 <= threshold <= len(witnesses)
        ):
            raise PersistenceConfigError(
                f"{where}.threshold: expected 1..{len(witnesses)} (the witnesses listed),"
                f" got {threshold!r}"
            )
        max_age = section.get("max_age", 300)
        if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 1:
            raise PersistenceConfigError(f"{where}.max_age: expected seconds >= 1, got {max_age!r}")
        mode = section.get("mode", "deferred")
        if mode not in ("deferred", "anchored"):
            raise PersistenceConfigError(
                f"{where}.mode: expected 'deferred' or 'anchored', got {mode!r}"
            )
        interval = section.get("interval", 30.0)
        if (
            isinstance(interval, bool)
            or not isinstance(interval, int | float)
            or not 0 < interval <= 86400
        ):
            raise PersistenceConfigError(
                f"{where}.interval: expected seconds in (0, 86400], got {interval!r}"
            )
        writes = section.get("writes", 64)
        if isinstance(writes, bool) or not isinstance(writes, int) or writes < 1:
            raise PersistenceConfigError(
                f"{where}.writes: expected an integer >= 1, got {writes!r}"
            )
        return cls(
            log_address, log_key, tuple(witnesses), threshold, max_age, mode, float(interval),
            writes,
        )  # fmt: skip


class AnchorSchedule:
    """The anchored store as the service uses it: reads and writes go to the
    :class:`~hermetic.persistence.anchor.AnchoredStore`; in ``deferred`` mode a background
    thread calls ``anchor()`` every ``interval`` seconds when writes are pending, and at
    once after ``writes`` writes, so the window in which a rollback of the newest writes
    goes unseen is bounded by the interval (plus the witness round and ``max_age``).

    ``clock`` is the enclave's trusted clock (NSM document timestamp); ``last_anchored`` is
    its reading when the newest state was last seen witnessed.
    """

    def __init__(
        self,
        anchored: AnchoredStore,
        clock: Callable[[], float],
        *,
        interval: float = 30.0,
        writes: int = 64,
    ) -> None:
        self.anchored = anchored
        self._clock = clock
        self.interval = interval
        self.writes = writes
        self._lock = threading.Lock()
        self._due = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        state = anchored.state()
        logged = state.logged_sequence == state.sequence
        self._pending = 0 if logged else 1
        self._last_anchored: float | None = clock() if logged else None
        self._last_error: str | None = None

    def __repr__(self) -> str:
        return f"AnchorSchedule({self.anchored!r})"

    @property
    def mode(self) -> AnchorMode:
        return self.anchored.mode

    def get(self, record_id: str) -> Record:
        return self.anchored.get(record_id)

    def put(self, record_id: str, data: bytes, expected_version: int | None) -> int:
        version = self.anchored.put(record_id, data, expected_version)
        with self._lock:
            if self.anchored.mode == "anchored":
                self._pending = 0
                self._last_anchored = self._clock()
            else:
                self._pending += 1
                if self._pending >= self.writes:
                    self._due.set()
        return version

    def anchor(self) -> None:
        """Anchor the newest state now and wait for the witness (what the timer runs)."""
        with self._lock:
            pending = self._pending
        self.anchored.anchor()
        now = self._clock()
        with self._lock:
            self._pending = max(0, self._pending - pending)
            self._last_anchored = now
            self._last_error = None

    def start(self) -> None:
        """Start the timer thread (``deferred`` mode; a daemon: the enclave's life is its)."""
        if self.anchored.mode != "deferred" or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="anchor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._due.set()
        if self._thread is not None:
            self._thread.join(timeout=self.anchored.witness_timeout + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._due.wait(self.interval)
            self._due.clear()
            if self._stop.is_set():
                return
            with self._lock:
                pending = self._pending
            if not pending:
                continue
            try:
                self.anchor()
            except HermeticError as exc:
                # Kept for status; the next round tries again (a failed check also makes
                # every read and write re-check, and refuse, until the store matches).
                with self._lock:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                log.warning("anchor: %s", self._last_error)

    def status(self) -> dict[str, Any]:
        """The anchored state (sequence, root, log index, key, mode, last anchored time), or
        the check's error when the store no longer matches its state."""
        state = self.anchored.state()
        with self._lock:
            pending, last, error = self._pending, self._last_anchored, self._last_error
        return {
            "mode": self.anchored.mode,
            "sequence": state.sequence,
            "root": state.root.hex(),
            "records": state.records,
            "logged_sequence": state.logged_sequence,
            "log_index": state.log_index,
            "key": state.key,
            "last_anchored": None if last is None else int(last),
            "pending_writes": pending,
            "last_error": error,
        }


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
    anchor: AnchorSchedule | None = None
    """The anchored store ``store`` is (the enclave always has one; in-process tests of the
    operations may run without)."""

    def __repr__(self) -> str:
        return f"PersistenceService(store_id={self.settings.store_id!r}, <redacted>)"

    @classmethod
    def boot(
        cls,
        kms: KeyRelease,
        store: RecordStore,
        settings: PersistenceSettings,
        anchor: Callable[[RootKey], AnchorSchedule] | None = None,
    ) -> PersistenceService:
        """The root key (read with the plain ``store``: the state key derives from it), then,
        given ``anchor``, the store opened anchored and checked against the log; every later
        read and write goes through it. A failed check raises its
        :class:`~hermetic.errors.AnchorError` and nothing is served."""
        root, origin = obtain_root_key(kms, store, settings)
        if anchor is None:
            return cls(root, store, settings, origin)
        schedule = anchor(root)
        return cls(root, schedule, settings, origin, schedule)

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

    def delete(self, tenant: str, name: str) -> None:
        """Remove ``name`` and every version of it: its records no longer open."""

        def drop(ring: Keyring) -> Keyring:
            if name not in ring.names:
                raise KeyNotFoundError(f"tenant {tenant!r}: no key named {name!r}")
            kept = tuple(k for k in ring.state.keys if k.name != name)
            return Keyring(ring.tenant_key, KeyringState(kept))

        self._change(tenant, drop)

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
        ready: dict[str, Any] = {
            "state": "ready",
            "store_id": self.settings.store_id,
            "root_key": self.origin.source,
            "kms_calls": self.origin.kms_calls,
        }
        if self.anchor is None:
            return ready
        try:
            return {**ready, "anchor": self.anchor.status()}
        except HermeticError as exc:  # the store stopped matching its anchored state
            return {"state": "failed", "reason": f"{type(exc).__name__}: {exc}"}


# --- the guarded layer: admin signatures, the access policy, the audit trail ---------------


_SEALED_KINDS = {"admin": "tenant-admin", "audit-head": "audit-head"}
"""The tenant's own sealed records: leaf of the record id -> the kind it is sealed as."""


@dataclass(frozen=True)
class Caller:
    """Who called, as the channel proved it: ``xx`` is True only for an attested XX session,
    whose peer evidence named this release (``service``, ``version``, ``pcr0`` hex)."""

    xx: bool
    service: str | None = None
    version: str | None = None
    pcr0: str | None = None

    def describe(self) -> str:
        if not self.xx or self.service is None:
            return "client without attested release (NX session)"
        return f"service {self.service} {self.version} pcr0 {(self.pcr0 or '')[:16]}"


@dataclass(frozen=True)
class TenantAdmin:
    """The sealed ``admin`` record: the admin's key, the last accepted counter, the features
    the admin enabled. Canonical CBOR ``{"admin_key", "counter", "features"}``."""

    admin_key: bytes
    counter: int
    features: frozenset[str] = field(default_factory=frozenset)

    def encode(self) -> bytes:
        value = {
            "admin_key": self.admin_key,
            "counter": self.counter,
            "features": sorted(self.features),
        }
        return canonical_dumps(value, what="tenant admin state", error=PersistenceUsageError)

    @classmethod
    def decode(cls, data: bytes) -> TenantAdmin:
        value = strict_loads(data, what="tenant admin state", error=KeyringFormatError)
        if (
            not isinstance(value, dict)
            or set(value) != {"admin_key", "counter", "features"}
            or isinstance(value["counter"], bool)
            or not isinstance(value["counter"], int)
            or value["counter"] < 0
            or not isinstance(value["features"], list)
            or not all(isinstance(f, str) for f in value["features"])
        ):
            raise KeyringFormatError("tenant admin state: not the documented form")
        return cls(
            check_admin_key(value["admin_key"]), value["counter"], frozenset(value["features"])
        )


@dataclass(frozen=True)
class AuditTrail:
    """What ``audit`` returns: the entries' exact bytes (the admin re-hashes them) and the
    head the service keeps; :func:`~hermetic.persistence.audit.verify_audit_trail` checks."""

    entries: tuple[bytes, ...]
    head: AuditHead


@dataclass(frozen=True, eq=False, repr=False)
class GuardedPersistence:
    """The booted service behind the access policy, admin signatures and the audit trail.

    This is what the enclave app serves; see the module docstring. Every method is
    blocking, like :class:`PersistenceService`'s.
    """

    service: PersistenceService
    policy: AccessPolicy

    def __repr__(self) -> str:
        return f"GuardedPersistence({self.service!r})"

    @property
    def store(self) -> RecordStore:
        return self.service.store

    @property
    def store_id(self) -> str:
        return self.service.settings.store_id

    def _tenant_record(self, tenant: str, leaf: str) -> str:
        return f"{self.store_id}/tenants/{check_tenant(tenant)}/{leaf}"

    def _tenant_key(self, tenant: str) -> TenantKey:
        return self.service.root.tenant_key(self.store_id, tenant)

    # --- the admin record ----------------------------------------------------------------

    def _get_sealed(self, tenant: str, leaf: str) -> tuple[bytes, int] | None:
        """The opened plaintext and store version of one of the tenant's own sealed records
        (``admin``, ``audit-head``; the leaf names the record and is its sealing kind), or
        None if it does not exist."""
        record_id = self._tenant_record(tenant, leaf)
        try:
            record = self.store.get(record_id)
        except RecordNotFoundError:
            return None
        data = open_tenant_record(
            self._tenant_key(tenant), _SEALED_KINDS[leaf], record_id, record.version, record.data
        )
        return data, record.version

    def _put_sealed(self, tenant: str, leaf: str, data: bytes, expected: int | None) -> None:
        """Seal ``data`` as the tenant's ``leaf`` record, compare-and-set on ``expected``."""
        record_id = self._tenant_record(tenant, leaf)
        counter = 1 if expected is None else expected + 1
        sealed = seal_tenant_record(
            self._tenant_key(tenant), _SEALED_KINDS[leaf], record_id, counter, data
        )
        self.store.put(record_id, sealed, expected)

    def _load_admin(self, tenant: str) -> tuple[TenantAdmin, int]:
        found = self._get_sealed(tenant, "admin")
        if found is None:
            raise TenantNotFoundError(
                f"tenant {tenant!r}: no admin record in the store (create_tenant first)"
            )
        data, version = found
        return TenantAdmin.decode(data), version

    def _put_admin(self, tenant: str, admin: TenantAdmin, expected: int | None) -> None:
        self._put_sealed(tenant, "admin", admin.encode(), expected)

    def _authorize(self, request: AdminRequest, signature: object) -> TenantAdmin:
        """Check the signature and the counter, and consume the counter (compare-and-set)
        before anything is done, so a request works at most once. Refusals are audited."""
        tenant = request.tenant
        for _ in range(CAS_ATTEMPTS):
            admin, version = self._load_admin(tenant)
            try:
                request.verify(admin.admin_key, signature)
                if request.counter <= admin.counter:
                    raise AdminReplayError(
                        f"admin request {request.operation} of tenant {tenant!r}: counter"
                        f" {request.counter} is not above the last accepted {admin.counter}"
                        " (a replayed or reordered request)"
                    )
            except AdminSignatureError as exc:
                self._audit_refusal(tenant, request.operation, "admin request", request.name, exc)
                raise
            features = admin.features
            if request.operation == "enable":
                features = features | {check_feature(request.feature)}
            elif request.operation == "disable":
                features = features - {request.feature}
            updated = TenantAdmin(admin.admin_key, request.counter, features)
            try:
                self._put_admin(tenant, updated, version)
            except VersionConflictError:
                continue
            return updated
        raise PersistenceConflictError(
            f"tenant {tenant!r}: admin record changed under each of {CAS_ATTEMPTS}"
            " compare-and-set attempts; nothing was done"
        )

    def _admin_request(
        self, operation: str, tenant: str, counter: object, **fields: Any
    ) -> AdminRequest:
        if isinstance(counter, bool) or not isinstance(counter, int):
            raise PersistenceUsageError(
                f"counter: expected an integer, got {type(counter).__name__}"
            )
        return AdminRequest(operation, self.store_id, tenant, counter, **fields)

    # --- admin operations ----------------------------------------------------------------

    def create_tenant(
        self, tenant: str, admin_key: bytes, counter: object, signature: object
    ) -> None:
        """Register the tenant and its admin's key; the request is signed by that key.

        The keyring is written first and the admin record second (the commit point): a
        crash in between leaves a keyring without an admin, which the next
        ``create_tenant`` of that name completes; two creators racing end with one admin
        (the other is :class:`TenantExistsError`).
        """
        request = self._admin_request(
            "create_tenant", tenant, counter, admin_key=check_admin_key(admin_key)
        )
        request.verify(admin_key, signature)
        try:
            self._load_admin(tenant)
        except TenantNotFoundError:
            pass
        else:
            raise TenantExistsError(f"tenant {tenant!r}: already has an admin")
        # TenantExistsError: an earlier create_tenant stopped before its admin record, or a race
        with contextlib.suppress(TenantExistsError):
            self.service.create_tenant(tenant)
        try:
            self._put_admin(tenant, TenantAdmin(admin_key, request.counter), None)
        except VersionConflictError:
            raise TenantExistsError(f"tenant {tenant!r}: already has an admin") from None
        self._audit(tenant, "change", "create_tenant", f"admin counter {request.counter}")

    def put_key(
        self, tenant: str, name: str, material: bytes, counter: object, signature: object
    ) -> int:
        if not isinstance(material, bytes) or len(material) != KEY_SIZE:
            raise PersistenceUsageError(f"material: expected {KEY_SIZE} bytes")
        request = self._admin_request(
            "put_key",
            tenant,
            counter,
            name=name,
            material_digest=AdminRequest.material_digest_of(material),
        )
        self._authorize(request, signature)
        version = self.service.put_key(tenant, name, material)
        self._audit_change(request, version)
        return version

    def rotate(self, tenant: str, name: str, counter: object, signature: object) -> int:
        request = self._admin_request("rotate", tenant, counter, name=name)
        self._authorize(request, signature)
        version = self.service.rotate(tenant, name)
        self._audit_change(request, version)
        return version

    def retire(
        self, tenant: str, name: str, version: int, counter: object, signature: object
    ) -> None:
        request = self._admin_request("retire", tenant, counter, name=name, version=version)
        self._authorize(request, signature)
        self.service.retire(tenant, name, version)
        self._audit_change(request, version)

    def delete(self, tenant: str, name: str, counter: object, signature: object) -> None:
        request = self._admin_request("delete", tenant, counter, name=name)
        self._authorize(request, signature)
        self.service.delete(tenant, name)
        self._audit_change(request, 0)

    def set_feature(
        self, tenant: str, feature: str, enabled: bool, counter: object, signature: object
    ) -> frozenset[str]:
        """``enable``/``disable`` a feature of the access policy for this tenant."""
        operation = "enable" if enabled else "disable"
        if enabled and feature not in self.policy.features:
            raise PersistenceUsageError(
                f"feature: expected one the access policy defines"
                f" ({', '.join(sorted(self.policy.features)) or 'none'}), got {feature!r}"
            )
        request = self._admin_request(operation, tenant, counter, feature=feature)
        admin = self._authorize(request, signature)
        self._audit(tenant, "change", operation, f"admin counter {request.counter}", detail=feature)
        return admin.features

    def audit(self, tenant: str, counter: object, signature: object) -> AuditTrail:
        """The whole trail, checked here against the sealed head before it is returned
        (the admin checks it again with the same function)."""
        request = self._admin_request("audit", tenant, counter)
        self._authorize(request, signature)
        self._audit(tenant, "read", "audit", f"admin counter {request.counter}")
        head, _ = self._load_head(tenant)
        entries = []
        tenant_key = self._tenant_key(tenant)
        for seq in range(1, head.seq + 1):
            record_id = self._entry_record(tenant, seq)
            try:
                record = self.store.get(record_id)
            except RecordNotFoundError:
                raise AuditTrailError(
                    f"audit trail of tenant {tenant!r}: entry {seq} of {head.seq} is missing"
                    " from the store"
                ) from None
            entries.append(open_tenant_record(tenant_key, "audit-entry", record_id, 1, record.data))
        verify_audit_trail(entries, self.store_id, tenant, head=head)
        return AuditTrail(tuple(entries), head)

    # --- key fetches -----------------------------------------------------------------------

    def _admit(self, caller: Caller, operation: str, tenant: str, name: str) -> str:
        """The feature whose rule admits ``caller`` for ``name`` of ``tenant``, else
        :class:`AccessDeniedError` (audited in the tenant's trail)."""
        actor = caller.describe()
        try:
            admin, _ = self._load_admin(tenant)
        except TenantNotFoundError:
            raise AccessDeniedError(
                f"{operation} of {name!r} from tenant {tenant!r} by {actor}: no such tenant"
            ) from None
        rule = None
        if caller.xx and caller.service is not None and caller.version is not None:
            rule = self.policy.admitting_rule(caller.service, caller.version, name, admin.features)
        if rule is not None:
            return rule.feature
        if not caller.xx:
            why = "keys are released only over an attested XX session"
        else:
            enabled = ", ".join(sorted(admin.features)) or "none"
            why = (
                f"the access policy admits this release for no key class of {name!r} among"
                f" the features tenant {tenant!r} enabled ({enabled})"
            )
        denied = AccessDeniedError(
            f"{operation} of {name!r} from tenant {tenant!r} by {actor}: {why}"
        )
        self._audit_refusal(tenant, operation, actor, name, denied)
        raise denied

    def get_key(
        self, caller: Caller, tenant: str, name: str, version: int | None = None
    ) -> DataKey:
        """The key, if ``caller`` is admitted (module docstring); audited either way. The
        audit entry is written before the key is returned: no entry, no key."""
        feature = self._admit(caller, "get_key", tenant, name)
        key = self.service.get_key(tenant, name, version)
        self._audit(
            tenant,
            "get",
            "get_key",
            caller.describe(),
            name=name,
            key_version=key.version,
            detail=f"feature {feature}",
        )
        return key

    def put_record(
        self, caller: Caller, tenant: str, name: str, record_id: str, data: bytes
    ) -> int:
        """A record sealed under ``name`` for an admitted caller (it could fetch the key)."""
        feature = self._admit(caller, "put_record", tenant, name)
        version = self.service.put_record(tenant, name, record_id, data)
        detail = f"feature {feature}; record {record_id}"
        actor = caller.describe()
        self._audit(tenant, "change", "put_record", actor, name=name, key_version=version,
                    detail=detail)  # fmt: skip
        return version

    def get_record(self, caller: Caller, tenant: str, name: str, record_id: str) -> bytes:
        feature = self._admit(caller, "get_record", tenant, name)
        data = self.service.get_record(tenant, name, record_id)
        detail = f"feature {feature}; record {record_id}"
        self._audit(tenant, "get", "get_record", caller.describe(), name=name, detail=detail)
        return data

    def describe(self, tenant: str) -> dict[str, Any]:
        """Key names and versions (no material), the admin's last counter and features."""
        admin, _ = self._load_admin(tenant)
        return {
            **self.service.describe(tenant),
            "admin_counter": admin.counter,
            "features": sorted(admin.features),
        }

    # --- the audit trail -------------------------------------------------------------------

    def _entry_record(self, tenant: str, seq: int) -> str:
        return self._tenant_record(tenant, f"audit/{seq:020d}")

    def _load_head(self, tenant: str) -> tuple[AuditHead, int | None]:
        found = self._get_sealed(tenant, "audit-head")
        if found is None:
            return AuditHead(0, genesis_hash(self.store_id, tenant)), None
        data, version = found
        return AuditHead.decode(data), version

    def _put_head(self, tenant: str, head: AuditHead, expected: int | None) -> None:
        self._put_sealed(tenant, "audit-head", head.encode(), expected)

    def _audit_change(self, request: AdminRequest, key_version: int) -> None:
        self._audit(
            request.tenant,
            "change",
            request.operation,
            f"admin counter {request.counter}",
            name=request.name,
            key_version=key_version,
        )

    def _audit_refusal(
        self, tenant: str, operation: str, actor: str, name: str, exc: HermeticError
    ) -> None:
        detail = f"{type(exc).__name__}: {exc}"[:1024]
        with contextlib.suppress(TenantNotFoundError):  # no such tenant: no trail to write
            self._audit(tenant, "refused", operation, actor, name=name, detail=detail)

    def _audit(
        self,
        tenant: str,
        event: str,
        operation: str,
        actor: str,
        *,
        name: str = "",
        key_version: int = 0,
        detail: str = "",
    ) -> AuditHead:
        """Append one entry: write entry n+1 (must not exist), then move the head to it.

        The entry record is the commit point. A writer that finds entry n+1 already there
        (another writer's, whose head update has not landed, or never will after a crash)
        moves the head to it if it chains from the head, and starts again.
        """
        tenant_key = self._tenant_key(tenant)
        for _ in range(CAS_ATTEMPTS * 4):
            head, head_version = self._load_head(tenant)
            seq = head.seq + 1
            record_id = self._entry_record(tenant, seq)
            entry = AuditEntry(
                seq,
                head.hash,
                int(time.time()),
                event,
                operation,
                actor[:1024],
                name,
                key_version,
                detail[:1024],
            )
            data = entry.encode()
            try:
                self.store.put(
                    record_id,
                    seal_tenant_record(tenant_key, "audit-entry", record_id, 1, data),
                    None,
                )
            except VersionConflictError:
                existing = self.store.get(record_id)
                other = open_tenant_record(tenant_key, "audit-entry", record_id, 1, existing.data)
                if AuditEntry.decode(other).prev != head.hash:
                    raise AuditTrailError(
                        f"audit trail of tenant {tenant!r}: entry {seq} does not chain from"
                        f" the head (entry {head.seq})"
                    ) from None
                helped = AuditHead(seq, AuditEntry.hash_of(other))
                with contextlib.suppress(VersionConflictError):
                    self._put_head(tenant, helped, head_version)
                continue
            new_head = AuditHead(seq, AuditEntry.hash_of(data))
            # A conflict means another writer moved the head onto our entry already.
            with contextlib.suppress(VersionConflictError):
                self._put_head(tenant, new_head, head_version)
            return new_head
        raise PersistenceConflictError(
            f"tenant {tenant!r}: audit trail changed under every append attempt; the call is"
            " refused"
        )
