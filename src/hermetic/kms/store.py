"""The local KMS server's key store: key material sealed under a root key.

The server is the stand-in for an HSM-backed service, so key material never sits in the
database in the clear: each version of each key is sealed with AES-256-GCM under a 32-byte
server root key kept in a separate file (created 0600 on first start), with the key id,
version and key spec bound as associated data, so a row copied onto another key, or another
version, does not unseal. Metadata (state, policy, aliases) is stored as is: AWS does not
treat key policies as secret either. The database is the shared storage layer's
(:mod:`hermetic.store`): a SQLite file by default, a ``postgresql://`` URL works too; writes
are committed before the server answers, so nothing acknowledged is lost on a crash.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hermetic.errors import (
    KMSSealedStoreError,
    SchemaError,
    StoreError,
    StoreIntegrityError,
    StoreLocationError,
)
from hermetic.paths import state_dir
from hermetic.store import DatabaseLocation, Migration, Schema, open_database, parse_location

__all__ = ["AliasRecord", "KeyRecord", "KeyStore", "default_db_path", "load_root_key"]

ROOT_KEY_BYTES = 32
_SEAL_LABEL = b"hermetic-kms-key-material/v1"

SCHEMA = Schema(
    "kms",
    (
        Migration(
            1,
            "keys, sealed key material, aliases",
            (
                """CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    created {double} NOT NULL,
    description TEXT NOT NULL,
    key_usage TEXT NOT NULL,
    key_spec TEXT NOT NULL,
    state TEXT NOT NULL,
    deletion_date {double},
    policy TEXT NOT NULL,
    current_version INTEGER NOT NULL
)""",
                """CREATE TABLE IF NOT EXISTS key_material (
    key_id TEXT NOT NULL REFERENCES keys(key_id),
    version INTEGER NOT NULL,
    sealed {blob} NOT NULL,
    PRIMARY KEY (key_id, version)
)""",
                """CREATE TABLE IF NOT EXISTS aliases (
    alias_name TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys(key_id),
    created {double} NOT NULL
)""",
            ),
        ),
    ),
)
"""The key store's tables; version 1 is what it created before migrations existed."""


@dataclass(frozen=True)
class KeyRecord:
    """A KMS key's metadata (never its material)."""

    key_id: str
    created: float
    description: str
    key_usage: str
    key_spec: str
    state: str
    deletion_date: float | None
    policy: str
    current_version: int


@dataclass(frozen=True)
class AliasRecord:
    alias_name: str
    key_id: str
    created: float


def default_db_path() -> Path:
    return state_dir() / "kms" / "kms.sqlite3"


def load_root_key(path: Path) -> bytes:
    """Read the server root key, creating it (mode 0600, exclusive create) if absent."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(ROOT_KEY_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise KMSSealedStoreError(f"root key {path}: cannot read ({exc.strerror})") from None
    if len(key) != ROOT_KEY_BYTES:
        raise KMSSealedStoreError(
            f"root key {path}: expected {ROOT_KEY_BYTES} bytes, got {len(key)}"
        )
    return key


class KeyStore:
    """Keys, sealed material and aliases in one database. Thread-safe.

    ``location`` is a SQLite path (its directory is created 0700), ``sqlite:///path`` or a
    ``postgresql://`` URL.
    """

    def __init__(self, location: str | Path | DatabaseLocation, root_key: bytes) -> None:
        if len(root_key) != ROOT_KEY_BYTES:
            raise KMSSealedStoreError(f"root key: expected {ROOT_KEY_BYTES} bytes")
        where = parse_location(location)
        if where.backend == "sqlite":
            where.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._aead = AESGCM(root_key)
        try:
            self._db = open_database(where, SCHEMA)
        except (SchemaError, StoreLocationError):
            raise
        except StoreError as exc:
            raise KMSSealedStoreError(f"key store {where}: {exc}") from None
        self._material: dict[tuple[str, int], bytes] = {}

    @classmethod
    def open(
        cls, location: str | Path | None = None, root_key_path: Path | None = None
    ) -> KeyStore:
        """Open (creating if needed) the store; the root key defaults to beside a SQLite
        file (``root.key``), or to ``<state dir>/kms/root.key`` for PostgreSQL."""
        where = parse_location(location if location is not None else default_db_path())
        if root_key_path is not None:
            root = root_key_path
        elif where.backend == "sqlite":
            root = where.path.parent / "root.key"
        else:
            root = state_dir() / "kms" / "root.key"
        return cls(where, load_root_key(root))

    def close(self) -> None:
        self._db.close()
        self._material.clear()

    # --- keys ---------------------------------------------------------------------------

    def create_key(
        self, *, key_usage: str, key_spec: str, description: str, policy: str, material: bytes
    ) -> KeyRecord:
        key_id = str(uuid.uuid4())
        record = KeyRecord(
            key_id=key_id,
            created=time.time(),
            description=description,
            key_usage=key_usage,
            key_spec=key_spec,
            state="Enabled",
            deletion_date=None,
            policy=policy,
            current_version=1,
        )
        sealed = self._seal(key_id, 1, key_spec, material)
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.key_id,
                    record.created,
                    record.description,
                    record.key_usage,
                    record.key_spec,
                    record.state,
                    record.deletion_date,
                    record.policy,
                    record.current_version,
                ),
            )
            cur.execute("INSERT INTO key_material VALUES (?, ?, ?)", (key_id, 1, sealed))
        return record

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self._db.cursor() as cur:
            row = cur.execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        return KeyRecord(*row) if row else None

    def list_keys(self) -> list[KeyRecord]:
        with self._db.cursor() as cur:
            rows = cur.execute("SELECT * FROM keys ORDER BY created, key_id").fetchall()
        return [KeyRecord(*row) for row in rows]

    def material(self, record: KeyRecord, version: int) -> bytes:
        """The unsealed material of one key version (cached in memory after first use)."""
        cached = self._material.get((record.key_id, version))
        if cached is not None:
            return cached
        with self._db.cursor() as cur:
            row = cur.execute(
                "SELECT sealed FROM key_material WHERE key_id = ? AND version = ?",
                (record.key_id, version),
            ).fetchone()
        if row is None:
            raise KMSSealedStoreError(f"key {record.key_id}: no material for version {version}")
        material = self._unseal(record.key_id, version, record.key_spec, bytes(row[0]))
        self._material[(record.key_id, version)] = material
        return material

    def set_policy(self, key_id: str, policy: str) -> None:
        self._update("UPDATE keys SET policy = ? WHERE key_id = ?", (policy, key_id))

    def set_state(self, key_id: str, state: str, deletion_date: float | None = None) -> None:
        self._update(
            "UPDATE keys SET state = ?, deletion_date = ? WHERE key_id = ?",
            (state, deletion_date, key_id),
        )

    # --- aliases ------------------------------------------------------------------------

    def create_alias(self, alias_name: str, key_id: str) -> bool:
        """False if the alias already exists."""
        try:
            self._update("INSERT INTO aliases VALUES (?, ?, ?)", (alias_name, key_id, time.time()))
        except StoreIntegrityError:
            return False
        return True

    def delete_alias(self, alias_name: str) -> bool:
        with self._db.transaction() as cur:
            cur.execute("DELETE FROM aliases WHERE alias_name = ?", (alias_name,))
            deleted = cur.rowcount
        return deleted > 0

    def get_alias(self, alias_name: str) -> AliasRecord | None:
        with self._db.cursor() as cur:
            row = cur.execute(
                "SELECT * FROM aliases WHERE alias_name = ?", (alias_name,)
            ).fetchone()
        return AliasRecord(*row) if row else None

    def list_aliases(self, key_id: str | None = None) -> list[AliasRecord]:
        with self._db.cursor() as cur:
            if key_id is None:
                rows = cur.execute("SELECT * FROM aliases ORDER BY alias_name").fetchall()
            else:
                rows = cur.execute(
                    "SELECT * FROM aliases WHERE key_id = ? ORDER BY alias_name", (key_id,)
                ).fetchall()
        return [AliasRecord(*row) for row in rows]

    # --- sealing ------------------------------------------------------------------------

    def _seal(self, key_id: str, version: int, key_spec: str, material: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, material, _aad(key_id, version, key_spec))

    def _unseal(self, key_id: str, version: int, key_spec: str, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], _aad(key_id, version, key_spec))
        except (InvalidTag, ValueError):
            raise KMSSealedStoreError(
                f"key {key_id} version {version}: sealed material does not open under the "
                "server root key (wrong root key or tampered row)"
            ) from None

    def _update(self, sql: str, params: tuple[object, ...]) -> None:
        with self._db.transaction() as cur:
            cur.execute(sql, params)


def _aad(key_id: str, version: int, key_spec: str) -> bytes:
    return b"|".join((_SEAL_LABEL, key_id.encode(), str(version).encode(), key_spec.encode()))
