"""Rollback detection: the record store's whole state, anchored in the witnessed log.

The parent's record store is untrusted: its host can restore the whole database from an
old copy, and every record in that copy is authentic (sealed by this service, at a
version the store agrees with), so sealing alone cannot see it. What the host cannot roll
back is the transparency log: witnesses cosign only checkpoints that extend the last one
they saw. So the service keeps a digest of its store state and writes it to the log:

* **the state**: a sequence number counting the service's writes, and an RFC 9162 Merkle
  root (the log's own hashing, :mod:`hermetic.translog.merkle`) over every record under
  ``<store id>/``, sorted by id, each leaf ``LP(domain, "state-leaf", id, version as 8
  bytes, SHA-256 of the stored bytes)``. :class:`StateTree` keeps the subtree hashes, so a
  write rehashes O(log n) nodes (O(n - i) when a record is created at position i);
* **the state statement** (``hermetic.persistence-state/v1``, see
  :class:`~hermetic.translog.release.StateStatement`): store id, sequence, root, record
  count, the previous statement's digest and root, signed with an Ed25519 key HKDF-derived
  from the root key (:func:`state_signing_key`), so only an enclave KMS released the root
  to can sign one. The newest statement is also kept in the store (``<store id>/anchor/state``)
  and appended to the log;
* **the check** (:meth:`AnchoredStore.open`, :meth:`AnchoredStore.check`): under a
  witnessed checkpoint whose cosignatures are recent by the trusted clock, find the newest
  statement of this store signed by this key, and compare: the state record must not be
  older, the records must hash to its root. Reads are then checked against the tree.

The key is bound by the log itself: the first genesis statement (sequence 0) for a store
id binds the id to its key, and the service refuses a store whose id the log binds to
another key (the host replaced the root-key record, so KMS decrypted, or generated, a
different root). The service derives its public key from the root, so it never trusts a
key it reads. Why not pin it elsewhere, and what remains, is in docs/persistence.md,
"Rollback detection".

This module imports the log's sans-IO formats only; the log is reached through the
:class:`StateLog` protocol (:class:`hermetic.translog.client.LogClient` fits it) and the
store through :class:`RecordStoreLike` (the record store, or its HTTP client).
"""

from __future__ import annotations

import hashlib
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hermetic.cbor import canonical_dumps, strict_loads
from hermetic.errors import (
    AnchorTimeoutError,
    HermeticError,
    PersistenceUsageError,
    RecordNotFoundError,
    StaleCheckpointError,
    StateConflictError,
    StateForkError,
    StateKeyMismatchError,
    StateRecordError,
    StoreRollbackError,
    StoreStateMismatchError,
    VersionConflictError,
)
from hermetic.persistence.keys import DOMAIN, RootKey, check_store_id, length_prefixed
from hermetic.store.records import Record, RecordInfo, check_id
from hermetic.translog.checkpoint import VerifiedCheckpoint
from hermetic.translog.merkle import EMPTY_ROOT, leaf_hash, node_hash, parent_row, root_hash
from hermetic.translog.release import SignedStatement, StateStatement, sign_statement

__all__ = [
    "DEFAULT_MAX_AGE",
    "STATE_RECORD",
    "AnchorMode",
    "AnchoredState",
    "AnchoredStore",
    "RecordStoreLike",
    "StateKey",
    "StateLog",
    "StateRecord",
    "StateTree",
    "leaf_entry",
    "state_signing_key",
]

STATE_RECORD = "anchor/state"
"""The state record's id under ``<store id>/``: the newest signed statement, outside the tree."""

DEFAULT_MAX_AGE = 300
"""Seconds a witness cosignature may be old, by the trusted clock, for the check to accept
its checkpoint (the bound on how long the log can withhold a statement, see the docs)."""

_STATE_FORMAT = 1
_HINT_MAX = (1 << 63) - 1

AnchorMode = Literal["deferred", "anchored"]
"""``deferred`` (default): a write is acknowledged once it is in the store, and
:meth:`AnchoredStore.anchor` logs the newest state later; ``anchored``: a write is
acknowledged only once its statement is in a checkpoint the witness quorum cosigned."""


# --- the key ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class StateKey:
    """The store's state-signing key: Ed25519, derived from the root key for one store id."""

    store_id: str
    private: ed25519.Ed25519PrivateKey

    def __repr__(self) -> str:
        return f"StateKey(store_id={self.store_id!r}, public={self.fingerprint}, <redacted>)"

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def fingerprint(self) -> str:
        """``sha256:<16 hex>`` of the raw public key, for messages and docs."""
        return _fingerprint(self.public_raw)

    def sign(self, statement: StateStatement) -> SignedStatement:
        return sign_statement(statement, self.private)


def _fingerprint(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def state_signing_key(root: RootKey, store_id: str) -> StateKey:
    """The store's state key: ``HKDF-SHA256(root, info = LP(domain) || LP("state-signing-key")
    || LP(store id))`` as an Ed25519 seed. Three info fields, where tenant keys have four,
    so it can equal no tenant key; the same root gives the same key every boot."""
    check_store_id(store_id)
    info = length_prefixed(DOMAIN, b"state-signing-key", store_id.encode())
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(root.material)
    return StateKey(store_id, ed25519.Ed25519PrivateKey.from_private_bytes(seed))


# --- the state tree ----------------------------------------------------------------------


def leaf_entry(record_id: str, version: int, digest: bytes) -> bytes:
    """The bytes a record contributes as a leaf (hashed as ``SHA-256(0x00 || entry)``)."""
    return length_prefixed(
        DOMAIN, b"state-leaf", record_id.encode(), version.to_bytes(8, "big"), digest
    )


class StateTree:
    """The Merkle tree over a store's records, sorted by id, with every perfect-subtree
    hash kept (``levels[l][j]`` covers leaves ``j * 2**l`` to ``(j + 1) * 2**l - 1``), so
    :func:`~hermetic.translog.merkle.root_hash` reads O(log n) of them and a write
    rehashes only what changed."""

    def __init__(self, leaves: Iterable[tuple[str, int, bytes]] = ()) -> None:
        items = sorted(leaves)
        self._ids = [i for i, _, _ in items]
        if len(set(self._ids)) != len(self._ids):
            raise PersistenceUsageError("state tree: record ids must be unique")
        self._leaves = {i: (v, d) for i, v, d in items}
        self._levels: list[list[bytes]] = [[leaf_hash(leaf_entry(*item)) for item in items]]
        self._rehash_from(0)

    @property
    def size(self) -> int:
        return len(self._ids)

    def ids(self) -> list[str]:
        return list(self._ids)

    def leaf(self, record_id: str) -> tuple[int, bytes] | None:
        """``(version, sha256)`` of a record in this state, or ``None``."""
        return self._leaves.get(record_id)

    def root(self) -> bytes:
        return root_hash(self.size, self._read) if self.size else EMPTY_ROOT

    def _read(self, level: int, index: int) -> bytes:
        return self._levels[level][index]

    def set(self, record_id: str, version: int, digest: bytes) -> None:
        """Insert or update one record's leaf."""
        position = bisect_left(self._ids, record_id)
        hashed = leaf_hash(leaf_entry(record_id, version, digest))
        if record_id in self._leaves:
            self._leaves[record_id] = (version, digest)
            self._levels[0][position] = hashed
            self._rehash_path(position)
            return
        self._ids.insert(position, record_id)
        self._leaves[record_id] = (version, digest)
        self._levels[0].insert(position, hashed)
        self._rehash_from(position)

    def remove(self, record_id: str) -> None:
        position = bisect_left(self._ids, record_id)
        if record_id not in self._leaves:
            return
        del self._ids[position], self._leaves[record_id], self._levels[0][position]
        self._rehash_from(position)

    def restore(self, record_id: str, leaf: tuple[int, bytes] | None) -> None:
        """Put back a leaf :meth:`leaf` returned (``None``: the record was absent)."""
        if leaf is None:
            self.remove(record_id)
        else:
            self.set(record_id, *leaf)

    def _rehash_path(self, position: int) -> None:
        for level in range(1, len(self._levels)):
            j = position >> level
            if j >= len(self._levels[level]):
                return
            below = self._levels[level - 1]
            self._levels[level][j] = node_hash(below[2 * j], below[2 * j + 1])

    def _rehash_from(self, position: int) -> None:
        """Every hash above a leaf at or after ``position`` (after an insert or a removal)."""
        level = 1
        while len(self._levels[level - 1]) >= 2:
            start = position >> level
            below = self._levels[level - 1]
            kept = self._levels[level][:start] if level < len(self._levels) else []
            row = kept + parent_row(below[2 * start :])
            if level < len(self._levels):
                self._levels[level] = row
            else:
                self._levels.append(row)
            level += 1
        del self._levels[level:]


# --- the state record --------------------------------------------------------------------


def _hint_message(entry: bytes, hint: int | None) -> bytes:
    """What the hint signature covers: the statement's entry digest and the hint."""
    where = b"" if hint is None else hint.to_bytes(8, "big")
    return length_prefixed(DOMAIN, b"state-hint", hashlib.sha256(entry).digest(), where)


@dataclass(frozen=True)
class StateRecord:
    """What ``<store id>/anchor/state`` holds: the newest signed statement, and ``hint``,
    the log index of a statement of this store that was in the log before this statement
    was signed, where the check starts reading the log.

    The hint is signed with the state key together with the statement's digest: a host
    could otherwise point it past the newest statement, at a copy of an old one that a
    malicious log appended again, and have an old state taken for the newest. A replayed
    state record brings its own hint, which lies before every statement newer than it.
    """

    statement: SignedStatement
    hint: int | None
    hint_signature: bytes

    @classmethod
    def sign(cls, statement: SignedStatement, hint: int | None, key: StateKey) -> StateRecord:
        return cls(statement, hint, key.private.sign(_hint_message(statement.entry(), hint)))

    def hint_verifies(self, key: StateKey) -> bool:
        try:
            key.private.public_key().verify(
                self.hint_signature, _hint_message(self.statement.entry(), self.hint)
            )
        except InvalidSignature:
            return False
        return True

    def encode(self) -> bytes:
        value = {
            "format": _STATE_FORMAT,
            "statement": self.statement.entry(),
            "hint": self.hint,
            "hint_signature": self.hint_signature,
        }
        return canonical_dumps(value, what="state record", error=StateRecordError)

    @classmethod
    def decode(cls, data: bytes, record_id: str) -> StateRecord:
        what = f"state record {record_id!r}"
        value = strict_loads(data, what=what, error=StateRecordError)
        fields = {"format", "statement", "hint", "hint_signature"}
        if not isinstance(value, dict) or set(value) != fields:
            raise StateRecordError(
                f"{what}: expected a map of format, statement, hint and hint_signature"
            )
        if value["format"] != _STATE_FORMAT:
            raise StateRecordError(f"{what}: format must be {_STATE_FORMAT}")
        hint = value["hint"]
        if hint is not None and (
            not isinstance(hint, int) or isinstance(hint, bool) or not 0 <= hint <= _HINT_MAX
        ):
            raise StateRecordError(f"{what}: hint must be null or a log index")
        signature = value["hint_signature"]
        if not isinstance(signature, bytes) or len(signature) != 64:
            raise StateRecordError(f"{what}: hint_signature must be 64 bytes")
        if not isinstance(value["statement"], bytes):
            raise StateRecordError(f"{what}: statement must be bytes")
        try:
            signed = SignedStatement.from_entry(value["statement"])
        except HermeticError as exc:
            raise StateRecordError(f"{what}: statement: {exc}") from None
        if not isinstance(signed.statement, StateStatement):
            raise StateRecordError(
                f"{what}: expected a {StateStatement.type} statement, got {signed.statement.type}"
            )
        return cls(signed, hint, signature)


# --- what the check found -----------------------------------------------------------------


@dataclass(frozen=True)
class AnchoredState:
    """The state the check accepted (or a write made): what a status call reports."""

    store_id: str
    sequence: int
    root: bytes
    records: int
    logged_sequence: int | None
    """Sequence of the newest statement known to be in the log (``None``: none yet)."""
    log_index: int | None
    key: str
    """Fingerprint of the state key."""

    def describe(self) -> str:
        logged = (
            "not yet in the log"
            if self.log_index is None
            else f"newest logged: sequence {self.logged_sequence} at index {self.log_index}"
        )
        return (
            f"store {self.store_id!r} state sequence {self.sequence} ({self.records} records,"
            f" root {self.root.hex()}; {logged})"
        )


@dataclass(frozen=True)
class _Logged:
    signed: SignedStatement
    index: int

    @property
    def statement(self) -> StateStatement:
        assert isinstance(self.signed.statement, StateStatement)
        return self.signed.statement


def _state(signed: SignedStatement) -> StateStatement:
    statement = signed.statement
    assert isinstance(statement, StateStatement)
    return statement


def _digest(signed: SignedStatement) -> str:
    return hashlib.sha256(signed.entry()).hexdigest()


def _said(signed: SignedStatement, index: int | None = None) -> str:
    s = _state(signed)
    where = "" if index is None else f", log index {index}"
    return f"sequence {s.sequence} ({s.records} records, root {s.root}{where})"


# --- the parts it talks to ---------------------------------------------------------------


class RecordStoreLike(Protocol):
    """The record store operations the anchor uses (``RecordStore``, ``RecordStoreClient``)."""

    def get(self, record_id: str) -> Record: ...

    def put(self, record_id: str, data: bytes, expected_version: int | None) -> int: ...

    def scan(self, prefix: str = "") -> Iterator[RecordInfo]: ...


class _Added(Protocol):
    @property
    def index(self) -> int: ...


class StateLog(Protocol):
    """The log operations the anchor uses; :class:`hermetic.translog.client.LogClient`
    verifies everything it returns (log signature, witness quorum, proofs)."""

    @property
    def threshold(self) -> int: ...

    def witnessed_checkpoint(self, minimum: int) -> VerifiedCheckpoint | None: ...

    def entries(self, start: int, end: int, checkpoint: VerifiedCheckpoint) -> list[bytes]: ...

    def add(self, entry: bytes) -> _Added: ...

    def inclusion_proof(
        self, index: int, checkpoint: VerifiedCheckpoint, entry: bytes
    ) -> Sequence[bytes]: ...


# --- the anchored store -------------------------------------------------------------------


class AnchoredStore:
    """The record store as the service may use it once its state matched the log.

    Build it with :meth:`open`, which runs the check. Then :meth:`get` returns a record
    only if its version and digest are the ones the verified state holds, and :meth:`put`
    signs the new state and keeps the state record current. Writers take turns: the state
    record is written with compare-and-set, and an instance that finds it moved by another
    one checks the whole store again before it reads or writes on (a second conflict in a
    row is :class:`~hermetic.errors.StateConflictError`).
    """

    def __init__(
        self,
        store: RecordStoreLike,
        root: RootKey,
        store_id: str,
        log: StateLog,
        clock: Callable[[], float],
        *,
        max_age: int = DEFAULT_MAX_AGE,
        mode: AnchorMode = "deferred",
        witness_timeout: float = 60.0,
    ) -> None:
        check_store_id(store_id)
        if mode not in ("deferred", "anchored"):
            raise PersistenceUsageError(f"anchor mode: expected deferred or anchored, got {mode!r}")
        if not isinstance(max_age, int) or isinstance(max_age, bool) or max_age < 0:
            raise PersistenceUsageError(f"max_age: expected seconds >= 0, got {max_age!r}")
        if log.threshold < 1:
            raise PersistenceUsageError(
                "anchor: the log client must require at least one witness cosignature"
                f" (threshold {log.threshold}): without a witness the log could withhold"
                " statements forever"
            )
        self._store = store
        self._key = state_signing_key(root, store_id)
        self.store_id = store_id
        self._log = log
        self._clock = clock
        self.max_age = max_age
        self.mode: AnchorMode = mode
        self.witness_timeout = witness_timeout
        self._prefix = f"{store_id}/"
        self._state_id = self._prefix + STATE_RECORD
        self._lock = threading.RLock()
        self._tree = StateTree()
        self._current: SignedStatement | None = None
        self._state_version: int | None = None
        self._logged: _Logged | None = None
        self._unsure = True  # no verified state yet (or a write's outcome is unknown)

    def __repr__(self) -> str:
        return f"AnchoredStore(store_id={self.store_id!r}, mode={self.mode!r}, <redacted>)"

    @classmethod
    def open(
        cls,
        store: RecordStoreLike,
        root: RootKey,
        store_id: str,
        log: StateLog,
        clock: Callable[[], float],
        *,
        max_age: int = DEFAULT_MAX_AGE,
        mode: AnchorMode = "deferred",
        witness_timeout: float = 60.0,
    ) -> AnchoredStore:
        """Check the store against the log (see :meth:`check`) and return it ready to serve.

        A store and a log that know nothing of this store id yet are the first boot: the
        current records become the genesis state, which is logged and witnessed before
        this returns (it binds the store id to this key).
        """
        anchored = cls(
            store, root, store_id, log, clock,
            max_age=max_age, mode=mode, witness_timeout=witness_timeout,
        )  # fmt: skip
        anchored.check()
        return anchored

    # -- the check ---------------------------------------------------------------------

    @property
    def key_fingerprint(self) -> str:
        return self._key.fingerprint

    def state(self) -> AnchoredState:
        with self._lock:
            if self._current is None:
                raise StoreStateMismatchError(f"store {self.store_id!r}: not checked yet")
            s = _state(self._current)
            logged = self._logged
            return AnchoredState(
                self.store_id,
                s.sequence,
                bytes.fromhex(s.root),
                s.records,
                None if logged is None else logged.statement.sequence,
                None if logged is None else logged.index,
                self._key.fingerprint,
            )

    def check(self) -> AnchoredState:
        """Compare the store with the newest state of this store in the log; raise if
        they disagree, and leave nothing servable then.

        1. read the state record (its statement must be this store's, signed by this key);
        2. take the log's largest witnessed checkpoint; at least ``threshold`` of its
           cosignatures must be at most ``max_age`` seconds old by the trusted clock
           (:class:`StaleCheckpointError`);
        3. read the log from the record's hint (or from 0) up to that checkpoint, every
           entry proven included; the first genesis for the store id must be this key's
           (:class:`StateKeyMismatchError`), and of this key's statements the one with the
           highest sequence is the newest (two different ones with one sequence:
           :class:`StateForkError`);
        4. the state record must not be older than it (:class:`StoreRollbackError`), and
           the records, each read and hashed, must give the record's root
           (:class:`StoreStateMismatchError`). A record that is one write short of its
           statement (the write never reached the store) is accepted only while that
           statement is not yet in the log;
        5. a state the log does not have yet is appended now.
        """
        with self._lock:
            self._unsure = True
            self._current = None
            record, state_version = self._read_state_record()
            checkpoint = self._fresh_checkpoint(record)
            logged = self._newest_logged(checkpoint, None if record is None else record.hint)
            tree = self._read_contents()
            contents = tree.root()
            signed = None if record is None else record.statement
            self._state_version = state_version
            self._logged = logged
            self._tree = tree
            if signed is None:
                if logged is not None:
                    raise StoreRollbackError(
                        f"store {self.store_id!r} has no state record ({self._state_id!r}),"
                        " but the log's newest state for it is"
                        f" {_said(logged.signed, logged.index)}:"
                        " the database was restored from a copy older than the first state,"
                        " or the record was deleted"
                    )
                return self._genesis(tree)
            current = _state(signed)
            if logged is None:
                if current.sequence != 0:
                    raise StoreRollbackError(
                        f"the log (checkpoint size {checkpoint.size}) holds no state"
                        f" statement for store {self.store_id!r}, but its state record is at"
                        f" {_said(signed)}: this is not the log the store was anchored in,"
                        " or the log dropped entries"
                    )
            else:
                newest = logged.statement
                if current.sequence < newest.sequence:
                    raise StoreRollbackError(
                        f"store {self.store_id!r} is at state {_said(signed)}, but the log's"
                        f" newest state for it is {_said(logged.signed, logged.index)}: the"
                        " database was restored from an older copy"
                    )
                if current.sequence == newest.sequence and signed.entry() != logged.signed.entry():
                    raise StateForkError(
                        f"store {self.store_id!r}: its state record and log index"
                        f" {logged.index} hold two different statements for sequence"
                        f" {current.sequence}, both signed by this service's key"
                        f" {self._key.fingerprint}: two writers, or a forked history"
                    )
            unlogged = logged is None or current.sequence > logged.statement.sequence
            self._current = signed
            if contents.hex() != current.root:
                if unlogged and current.prior_root == contents.hex():
                    # The last write's statement was kept, its record never written.
                    self._write_state(self._next(contents, tree.size, prior=current.root))
                else:
                    self._current = None
                    expected = (
                        f" (log index {logged.index})"
                        if logged is not None and not unlogged
                        else " (not yet in the log)"
                    )
                    raise StoreStateMismatchError(
                        f"store {self.store_id!r} records do not match its state: expected"
                        f" {_said(signed)}{expected}, found {tree.size} records with root"
                        f" {contents.hex()}: a record was edited, swapped, replayed at"
                        " an older version, deleted or added"
                    )
            if logged is None:
                return self._bind()  # a genesis kept, not yet logged: log it, as a first boot
            if (
                self._logged is None
                or self._logged.signed.entry() != self._require_current().entry()
            ):
                self._anchor(wait=self.mode == "anchored")
            self._unsure = False
            return self.state()

    def _read_state_record(self) -> tuple[StateRecord | None, int | None]:
        try:
            raw = self._store.get(self._state_id)
        except RecordNotFoundError:
            return None, None
        record = StateRecord.decode(raw.data, self._state_id)
        statement = _state(record.statement)
        if statement.store_id != self.store_id:
            raise StateRecordError(
                f"state record {self._state_id!r} holds a statement for store"
                f" {statement.store_id!r}, expected {self.store_id!r}"
            )
        if not self._ours(record.statement):
            raise StateKeyMismatchError(
                f"state record {self._state_id!r} is not signed by this service's state key"
                f" {self._key.fingerprint} ({self._signer(record.statement)}): the root-key"
                " record was replaced, or the record was forged"
            )
        if not record.hint_verifies(self._key):
            raise StateRecordError(
                f"state record {self._state_id!r}: the hint signature does not verify under"
                f" this service's state key {self._key.fingerprint}: the hint was edited"
            )
        return record, raw.version

    def _ours(self, signed: SignedStatement) -> bool:
        key = signed.publisher_key()
        if not isinstance(key, ed25519.Ed25519PublicKey):
            return False
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if raw != self._key.public_raw:
            return False
        try:
            signed.verify_signature()
        except HermeticError:
            return False
        return True

    @staticmethod
    def _signer(signed: SignedStatement) -> str:
        key = signed.publisher_key()
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if isinstance(key, ed25519.Ed25519PublicKey):
            return "key " + _fingerprint(
                key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            )
        return "key spki " + _fingerprint(der)

    def _fresh_checkpoint(self, record: StateRecord | None) -> VerifiedCheckpoint:
        threshold = self._log.threshold
        claimed = (
            "" if record is None else f"; the store's state record is at {_said(record.statement)}"
        )
        checkpoint = self._log.witnessed_checkpoint(threshold)
        now = int(self._clock())
        if checkpoint is None:
            raise StaleCheckpointError(
                f"the log has no checkpoint with {threshold} witness cosignature(s){claimed}"
            )
        recent = [c for c in checkpoint.cosignatures if c.timestamp >= now - self.max_age]
        if len(recent) < threshold:
            newest = max((c.timestamp for c in checkpoint.cosignatures), default=0)
            raise StaleCheckpointError(
                f"log {checkpoint.origin!r}: its newest witnessed checkpoint (size"
                f" {checkpoint.size}) was last cosigned at {newest}, {now - newest} s before"
                f" the trusted clock's {now}; expected {threshold} cosignature(s) at most"
                f" {self.max_age} s old: the log may be withholding newer entries{claimed}"
            )
        return checkpoint

    def _parse(self, entry: bytes) -> SignedStatement | None:
        """A state statement for this store id (any key), or ``None`` for anything else."""
        if b"hermetic.persistence-state/v1" not in entry:
            return None
        try:
            signed = SignedStatement.from_entry(entry)
        except HermeticError:
            return None
        statement = signed.statement
        if not isinstance(statement, StateStatement) or statement.store_id != self.store_id:
            return None
        return signed

    def _newest_logged(self, checkpoint: VerifiedCheckpoint, hint: int | None) -> _Logged | None:
        start = 0
        if hint is not None and hint < checkpoint.size:
            (entry,) = self._log.entries(hint, hint + 1, checkpoint)
            found = self._parse(entry)
            if found is not None and self._ours(found):
                start = hint  # this key already signed for this store id: it is bound
        bound = start > 0
        newest: _Logged | None = None
        seen: dict[int, tuple[bytes, int]] = {}
        entries = self._log.entries(start, checkpoint.size, checkpoint)
        for offset, entry in enumerate(entries):
            signed = self._parse(entry)
            if signed is None:
                continue
            index = start + offset
            statement = _state(signed)
            if not self._ours(signed):
                try:
                    signed.verify_signature()
                except HermeticError:
                    continue  # forged: proves nothing, binds nothing
                if not bound and statement.sequence == 0:
                    raise StateKeyMismatchError(
                        f"store id {self.store_id!r} is bound in the log to another key: its"
                        f" first genesis statement (log index {index}) is signed by"
                        f" {self._signer(signed)}, this service's root key derives"
                        f" {self._key.fingerprint}: the root-key record was replaced, or the"
                        " store id belongs to another deployment"
                    )
                continue
            bound = True
            earlier = seen.get(statement.sequence)
            if earlier is not None and earlier[0] != signed.entry():
                raise StateForkError(
                    f"store {self.store_id!r}: log indices {earlier[1]} and {index} hold two"
                    f" different statements for sequence {statement.sequence}, both signed"
                    f" by this service's key {self._key.fingerprint}: two writers, or a"
                    " forked history"
                )
            seen[statement.sequence] = (signed.entry(), index)
            if newest is None or statement.sequence > newest.statement.sequence:
                newest = _Logged(signed, index)
        return newest

    def _read_contents(self) -> StateTree:
        """Every record under the store's prefix, read and hashed here (a listing's digest
        is the host's word; the bytes are what a reader gets)."""
        leaves = []
        for info in self._store.scan(self._prefix):
            if info.id == self._state_id:
                continue
            record = self._store.get(info.id)
            leaves.append((record.id, record.version, hashlib.sha256(record.data).digest()))
        return StateTree(leaves)

    def _genesis(self, tree: StateTree) -> AnchoredState:
        genesis = StateStatement(self.store_id, 0, tree.root().hex(), tree.size, None, None)
        self._write_state(self._key.sign(genesis))
        return self._bind()

    def _bind(self) -> AnchoredState:
        """Log the genesis, wait for the witness, and check that it binds the store id."""
        checkpoint = self._anchor(wait=True)
        assert checkpoint is not None
        # Someone may have logged a genesis for this id between the read and the append.
        logged = self._newest_logged(checkpoint, None)
        if logged is None or logged.signed.entry() != self._require_current().entry():
            raise StateForkError(
                f"store {self.store_id!r}: the state this service just logged is not the"
                " store's newest state in the log"
            )
        self._unsure = False
        return self.state()

    # -- statements, the state record and the log ----------------------------------------

    def _require_current(self) -> SignedStatement:
        if self._current is None:
            raise StoreStateMismatchError(f"store {self.store_id!r}: no verified state")
        return self._current

    def _next(self, root: bytes, records: int, prior: str) -> SignedStatement:
        current = self._require_current()
        statement = StateStatement(
            self.store_id,
            _state(current).sequence + 1,
            root.hex(),
            records,
            _digest(current),
            prior,
        )
        return self._key.sign(statement)

    def _write_state(self, signed: SignedStatement) -> None:
        hint = None if self._logged is None else self._logged.index
        data = StateRecord.sign(signed, hint, self._key).encode()
        try:
            self._state_version = self._store.put(self._state_id, data, self._state_version)
        except VersionConflictError as exc:
            self._unsure = True
            raise StateConflictError(
                f"state record {self._state_id!r} is at version {exc.current}, this writer"
                f" expected {self._state_version}: another instance writes store"
                f" {self.store_id!r}; nothing was acknowledged"
            ) from None
        self._current = signed

    def anchor(self) -> AnchoredState:
        """Append the newest state to the log if it is not there yet, and wait until a
        checkpoint the witness quorum cosigned includes it (``deferred`` mode's service
        calls this on a timer; one entry covers any number of writes)."""
        with self._lock:
            self._require_ready()
            logged = self._append()
        # Waiting for the witness does not hold the lock: reads and writes go on meanwhile.
        self._await_witness(logged.signed, logged.index)
        with self._lock:
            return self.state()

    def _append(self) -> _Logged:
        """The current statement in the log: appended unless it is the one logged last."""
        signed = self._require_current()
        entry = signed.entry()
        if self._logged is None or self._logged.signed.entry() != entry:
            self._logged = _Logged(signed, self._log.add(entry).index)
        return self._logged

    def _anchor(self, *, wait: bool) -> VerifiedCheckpoint | None:
        logged = self._append()
        if not wait:
            return None
        return self._await_witness(logged.signed, logged.index)

    def _await_witness(self, signed: SignedStatement, index: int) -> VerifiedCheckpoint:
        """Until a checkpoint the witness quorum cosigned includes ``signed`` at ``index``
        (inclusion proven), or :class:`AnchorTimeoutError`."""
        entry = signed.entry()
        deadline = time.monotonic() + self.witness_timeout
        pause = 0.05
        while True:
            checkpoint = self._log.witnessed_checkpoint(self._log.threshold)
            if checkpoint is not None and checkpoint.size > index:
                self._log.inclusion_proof(index, checkpoint, entry)
                return checkpoint
            if time.monotonic() >= deadline:
                raise AnchorTimeoutError(
                    f"store {self.store_id!r}: state {_said(signed, index)} is not in a"
                    f" checkpoint cosigned by {self._log.threshold} witness(es) after"
                    f" {self.witness_timeout:g} s; the write is stored but not acknowledged"
                    " as anchored"
                )
            time.sleep(pause)
            pause = min(pause * 1.5, 0.5)

    # -- reads and writes ----------------------------------------------------------------

    def _require_ready(self) -> None:
        if self._unsure:
            self.check()

    def _check_id(self, record_id: str) -> str:
        check_id(record_id)
        if not record_id.startswith(self._prefix) or record_id == self._state_id:
            raise PersistenceUsageError(
                f"record id: expected an id under {self._prefix!r} other than"
                f" {self._state_id!r}, got {record_id!r}"
            )
        return record_id

    def get(self, record_id: str) -> Record:
        """The record, if the store returns exactly the version and bytes of the verified
        state; otherwise :class:`StoreStateMismatchError` and nothing.

        A mismatch while the state record has moved since this instance last read it is
        another instance of the service writing the store (a restart next to a running
        one): the whole check runs again (log, signature, every record) and the read is
        retried once against the state it accepts. A host that edits records does not get
        past that check.
        """
        with self._lock:
            try:
                return self._get(record_id)
            except StoreStateMismatchError:
                if not self._moved():
                    raise
            self.check()
            return self._get(record_id)

    def _moved(self) -> bool:
        """Whether the state record is at another version than this instance wrote or read."""
        try:
            version = self._store.get(self._state_id).version
        except RecordNotFoundError:
            return False
        return version != self._state_version

    def _get(self, record_id: str) -> Record:
        with self._lock:
            self._require_ready()
            self._check_id(record_id)
            leaf = self._tree.leaf(record_id)
            said = _said(self._require_current())
            try:
                record = self._store.get(record_id)
            except RecordNotFoundError:
                if leaf is None:
                    raise
                raise StoreStateMismatchError(
                    f"record {record_id!r} is missing from the store: state {said} has it at"
                    f" version {leaf[0]}"
                ) from None
            digest = hashlib.sha256(record.data).digest()
            if leaf is None:
                raise StoreStateMismatchError(
                    f"record {record_id!r} (version {record.version}) is not in the store's"
                    f" state {said}: the host added it"
                )
            if (record.version, digest) != leaf:
                older = " (an older version replayed)" if record.version < leaf[0] else ""
                raise StoreStateMismatchError(
                    f"record {record_id!r}: state {said} expects version {leaf[0]} sha256"
                    f" {leaf[1].hex()[:16]}, the store returned version {record.version}"
                    f" sha256 {digest.hex()[:16]}{older}"
                )
            return record

    def put(self, record_id: str, data: bytes, expected_version: int | None) -> int:
        """Write with compare-and-set at ``expected_version`` (the verified state's version
        of the record; ``None``: it must not exist), sign the new state, and in
        ``anchored`` mode return only once a witnessed checkpoint includes it.

        Order: the new statement goes to the state record first, then the record; a
        crash between them leaves a statement one write ahead of the records, which the
        check accepts while that statement is not in the log (its ``prior_root``).

        If another instance moved the state record (:class:`StateConflictError`, nothing
        written), the check runs again and the write is tried once more against the state
        it accepts (so a record the other instance changed is a
        :class:`VersionConflictError`, as from the store); a second conflict is raised.
        """
        data = bytes(data)
        with self._lock:
            for attempt in (1, 2):
                self._require_ready()
                self._check_id(record_id)
                old = self._tree.leaf(record_id)
                old_version = None if old is None else old[0]
                if expected_version != old_version:
                    raise VersionConflictError(
                        f"record {record_id!r} is at version {old_version} in the verified"
                        f" state, the writer expected {expected_version}",
                        old_version,
                    )
                predicted = 1 if expected_version is None else expected_version + 1
                digest = hashlib.sha256(data).digest()
                prior = self._tree.root()
                self._tree.set(record_id, predicted, digest)
                try:
                    self._write_state(self._next(self._tree.root(), self._tree.size, prior.hex()))
                except StateConflictError:
                    self._tree.restore(record_id, old)
                    if attempt == 2:
                        raise
                    continue  # _unsure is set: the loop's _require_ready checks again
                except BaseException:
                    self._tree.restore(record_id, old)
                    raise
                break
            try:
                version = self._store.put(record_id, data, expected_version)
            except VersionConflictError:
                # Not written: state back to what the records are.
                intended = self._tree.root()
                self._tree.restore(record_id, old)
                self._write_state(self._next(self._tree.root(), self._tree.size, intended.hex()))
                raise
            except BaseException:
                self._unsure = True  # written or not: the next call checks the store again
                raise
            if version != predicted:
                # A create over a tombstone the store kept: record the version it gave.
                intended = self._tree.root()
                self._tree.set(record_id, version, digest)
                self._write_state(self._next(self._tree.root(), self._tree.size, intended.hex()))
            if self.mode == "anchored":
                self._anchor(wait=True)
            return version

    def records(self) -> list[str]:
        """The ids of the verified state's records."""
        with self._lock:
            self._require_ready()
            return self._tree.ids()
