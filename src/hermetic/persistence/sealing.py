"""Sealed records: AES-256-GCM with associated data that binds a record to its identity.

Everything the persistence service writes to the parent's (untrusted) record store is
sealed here. The layout, byte by byte (docs/persistence.md has the same table)::

    offset  size  field
         0     1  format, 0x01
         1     4  key version, big-endian (the named key's version; 0 for keyring state)
         5     8  counter, big-endian, 1..2**63-1 (the record's version in the store)
        13    12  nonce, random
        25     n  AES-256-GCM ciphertext of the plaintext
      25+n    16  GCM tag

The associated data is, in :func:`~hermetic.persistence.keys.length_prefixed` fields:
``"hermetic/persistence/v1"``, the kind (``"record"`` or ``"keyring-state"``), the first 13
header bytes, the store id, the tenant, the key name (empty for keyring state) and the
record id. So the bytes open only under the exact (store, tenant, name, version, record id,
counter) they were sealed for: another record's bytes under this id (a swap), a record of
another tenant or store, or any flipped byte fails the tag.

The counter is what makes a replay visible: a writer seals with the version the store will
give the record (``expected_version + 1``), and a reader passes the version it expects
(from the state it trusts; issue 10 item 5 anchors that state in the transparency log). An
authentic record with a lower counter is an older version served again. The header is
authenticated before its counter is compared, so :class:`RecordReplayError` is only ever
said of a genuine older record, never of a flipped counter byte.

Checks run in this order, and the first that fails raises (nothing is returned):
header form (:class:`SealedRecordFormatError`), key version known and not retired (the
keyring's errors), tag (:class:`RecordAuthenticationError`), counter
(:class:`RecordReplayError` below the expected one, :class:`RecordCounterError` above).

Random 96-bit nonces keep a key safe for 2**32 seals (NIST SP 800-38D §8.3); rotate a
named key well before that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hermetic.errors import (
    PersistenceUsageError,
    RecordAuthenticationError,
    RecordCounterError,
    RecordIdError,
    RecordReplayError,
    SealedRecordFormatError,
    UnknownKeyVersionError,
)
from hermetic.persistence.keys import DOMAIN, DataKey, TenantKey, length_prefixed
from hermetic.store.records import MAX_RECORD_SIZE, MAX_VERSION, check_id

__all__ = [
    "FORMAT_V1",
    "HEADER_SIZE",
    "MAX_COUNTER",
    "MAX_PLAINTEXT_SIZE",
    "NONCE_SIZE",
    "OVERHEAD",
    "TAG_SIZE",
    "SealedHeader",
    "check_counter",
    "check_record_id",
    "open_keyring_state",
    "open_record",
    "parse_header",
    "seal_keyring_state",
    "seal_record",
]

FORMAT_V1 = 0x01
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = 1 + 4 + 8 + NONCE_SIZE
OVERHEAD = HEADER_SIZE + TAG_SIZE
"""Bytes a sealed record adds to its plaintext (41)."""

MAX_COUNTER = MAX_VERSION
"""Counters are store versions: signed 64-bit in both databases."""

MAX_PLAINTEXT_SIZE = MAX_RECORD_SIZE - OVERHEAD
"""The largest plaintext whose sealed record the store still accepts."""

_AUTHENTICATED_HEADER = 13  # format, key version, counter: the nonce is bound by GCM itself
_KIND_RECORD = b"record"
_KIND_KEYRING = b"keyring-state"
TENANT_RECORD_KINDS = ("tenant-admin", "audit-entry", "audit-head")
"""The other records sealed under a tenant's state key (key version 0), each its own kind
so that one can never be opened as another (``hermetic.persistence.service``)."""


@dataclass(frozen=True)
class SealedHeader:
    """The parsed header of a sealed record: which key version to open it with, and its
    counter. Nothing here is trusted before the record authenticates."""

    key_version: int
    counter: int
    nonce: bytes


def check_counter(value: object, *, field: str = "counter") -> int:
    """A record counter: an integer 1..:data:`MAX_COUNTER`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise PersistenceUsageError(f"{field}: expected an integer, got {type(value).__name__}")
    if not 1 <= value <= MAX_COUNTER:
        raise PersistenceUsageError(f"{field}: expected 1..{MAX_COUNTER}, got {value}")
    return value


def check_record_id(value: object) -> str:
    """A record id under the record store's own rules (:func:`hermetic.store.records.check_id`),
    refused as this package's usage error."""
    try:
        return check_id(value, field="record id")
    except RecordIdError as exc:
        raise PersistenceUsageError(str(exc)) from None


def parse_header(data: object) -> SealedHeader:
    """The header of a sealed record, or :class:`SealedRecordFormatError`."""
    return _parse(data)[0]


def _parse(data: object) -> tuple[SealedHeader, bytes]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SealedRecordFormatError(f"sealed record: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not OVERHEAD <= len(data) <= MAX_RECORD_SIZE:
        raise SealedRecordFormatError(
            f"sealed record: expected {OVERHEAD} to {MAX_RECORD_SIZE} bytes, got {len(data)}"
        )
    if data[0] != FORMAT_V1:
        raise SealedRecordFormatError(
            f"sealed record: expected format byte 0x{FORMAT_V1:02x}, got 0x{data[0]:02x}"
        )
    counter = int.from_bytes(data[5:13], "big")
    if not 1 <= counter <= MAX_COUNTER:
        raise SealedRecordFormatError(
            f"sealed record: expected a counter 1..{MAX_COUNTER}, got {counter}"
        )
    header = SealedHeader(
        key_version=int.from_bytes(data[1:5], "big"),
        counter=counter,
        nonce=data[13:HEADER_SIZE],
    )
    return header, data


@dataclass(frozen=True, eq=False, repr=False)
class _Sealer:
    """What one seal binds: the kind, the identity fields and the AES key."""

    kind: bytes
    store_id: str
    tenant: str
    name: str
    key_version: int
    material: bytes

    def describe(self) -> str:
        if self.kind == _KIND_KEYRING:
            return f"the keyring state of tenant {self.tenant!r} in store {self.store_id!r}"
        if self.kind != _KIND_RECORD:
            return (
                f"the {self.kind.decode()} state of tenant {self.tenant!r} in store"
                f" {self.store_id!r}"
            )
        return (
            f"key {self.name!r} version {self.key_version} of tenant {self.tenant!r}"
            f" in store {self.store_id!r}"
        )

    def aad(self, header: bytes, record_id: str) -> bytes:
        return length_prefixed(
            DOMAIN,
            self.kind,
            header[:_AUTHENTICATED_HEADER],
            self.store_id.encode(),
            self.tenant.encode(),
            self.name.encode(),
            record_id.encode(),
        )


def _check_plaintext(value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise PersistenceUsageError(f"plaintext: expected bytes, got {type(value).__name__}")
    plaintext = bytes(value)
    if len(plaintext) > MAX_PLAINTEXT_SIZE:
        raise PersistenceUsageError(
            f"plaintext: expected at most {MAX_PLAINTEXT_SIZE} bytes (a sealed record must fit"
            f" the record store), got {len(plaintext)}"
        )
    return plaintext


def _seal(sealer: _Sealer, record_id: str, counter: int, plaintext: bytes) -> bytes:
    record_id = check_record_id(record_id)
    counter = check_counter(counter)
    plaintext = _check_plaintext(plaintext)
    nonce = os.urandom(NONCE_SIZE)
    header = (
        bytes([FORMAT_V1])
        + sealer.key_version.to_bytes(4, "big")
        + counter.to_bytes(8, "big")
        + nonce
    )
    sealed = AESGCM(sealer.material).encrypt(nonce, plaintext, sealer.aad(header, record_id))
    return header + sealed


def _open(sealer: _Sealer, record_id: str, expected_counter: int, data: object) -> bytes:
    record_id = check_record_id(record_id)
    expected_counter = check_counter(expected_counter, field="expected counter")
    header, sealed = _parse(data)
    where = f"sealed record {record_id!r}"
    if header.key_version != sealer.key_version:
        raise UnknownKeyVersionError(
            f"{where}: sealed under key version {header.key_version}, opened with"
            f" {sealer.describe()}"
        )
    try:
        plaintext = AESGCM(sealer.material).decrypt(
            header.nonce, sealed[HEADER_SIZE:], sealer.aad(sealed, record_id)
        )
    except InvalidTag:
        raise RecordAuthenticationError(
            f"{where}: does not authenticate as counter {header.counter} of"
            f" {sealer.describe()} (edited, another record's bytes under this id, or sealed"
            " for another store, tenant or key)"
        ) from None
    if header.counter < expected_counter:
        raise RecordReplayError(
            f"{where}: counter {header.counter} is older than the expected {expected_counter}"
            " (an earlier version of this record was served again)"
        )
    if header.counter > expected_counter:
        raise RecordCounterError(
            f"{where}: counter {header.counter} is newer than the expected {expected_counter}"
            " (the state the reader expects is older than the store's record)"
        )
    return plaintext


def _record_sealer(key: DataKey) -> _Sealer:
    if not isinstance(key, DataKey):
        raise PersistenceUsageError(f"key: expected a DataKey, got {type(key).__name__}")
    return _Sealer(_KIND_RECORD, key.store_id, key.tenant, key.name, key.version, key.material)


def _keyring_sealer(tenant_key: TenantKey, kind: bytes = _KIND_KEYRING) -> _Sealer:
    if not isinstance(tenant_key, TenantKey):
        raise PersistenceUsageError(
            f"tenant key: expected a TenantKey, got {type(tenant_key).__name__}"
        )
    return _Sealer(kind, tenant_key.store_id, tenant_key.tenant, "", 0, tenant_key.state_key)


def _tenant_sealer(tenant_key: TenantKey, kind: str) -> _Sealer:
    if kind not in TENANT_RECORD_KINDS:
        raise PersistenceUsageError(
            f"tenant record kind: expected one of {', '.join(TENANT_RECORD_KINDS)}, got {kind!r}"
        )
    return _keyring_sealer(tenant_key, kind.encode())


def seal_record(key: DataKey, record_id: str, counter: int, plaintext: bytes) -> bytes:
    """``plaintext`` sealed under ``key`` for the record ``record_id`` at version ``counter``
    (the version the store gives the write: 1 for a create, ``expected_version + 1`` else)."""
    return _seal(_record_sealer(key), record_id, counter, plaintext)


def open_record(key: DataKey, record_id: str, expected_counter: int, data: bytes) -> bytes:
    """The plaintext of a record :func:`seal_record` sealed under ``key`` for ``record_id``
    at ``expected_counter``; any other bytes raise (see the module docstring)."""
    return _open(_record_sealer(key), record_id, expected_counter, data)


def seal_keyring_state(tenant_key: TenantKey, record_id: str, counter: int, state: bytes) -> bytes:
    """A keyring's encoded state sealed under the tenant's state key (key version 0)."""
    return _seal(_keyring_sealer(tenant_key), record_id, counter, state)


def open_keyring_state(
    tenant_key: TenantKey, record_id: str, expected_counter: int, data: bytes
) -> bytes:
    """The encoded state :func:`seal_keyring_state` sealed; same checks as :func:`open_record`."""
    return _open(_keyring_sealer(tenant_key), record_id, expected_counter, data)


def seal_tenant_record(
    tenant_key: TenantKey, kind: str, record_id: str, counter: int, plaintext: bytes
) -> bytes:
    """``plaintext`` sealed under the tenant's state key as a record of ``kind`` (one of
    :data:`TENANT_RECORD_KINDS`): the admin state, an audit entry, the audit head."""
    return _seal(_tenant_sealer(tenant_key, kind), record_id, counter, plaintext)


def open_tenant_record(
    tenant_key: TenantKey, kind: str, record_id: str, expected_counter: int, data: bytes
) -> bytes:
    """The plaintext :func:`seal_tenant_record` sealed; same checks as :func:`open_record`."""
    return _open(_tenant_sealer(tenant_key, kind), record_id, expected_counter, data)
