"""The parent's record store: opaque records under compare-and-set versions.

The parent, its database and its operator are untrusted (``ARCHITECTURE.md``): the
persistence service seals every record inside the enclave before it gets here, and it
detects a swapped, replayed or rolled-back record itself. So this store is deliberately
plain: it never looks into a record's bytes, and it promises only what a database can be
held to, on SQLite and PostgreSQL alike:

* :meth:`RecordStore.put` is **compare-and-set**: it writes only if the record is at
  ``expected_version`` (``None``: it must not exist), and the record is then at the next
  version. Of two writers with the same expectation exactly one wins; the other gets
  :class:`~hermetic.errors.VersionConflictError` carrying the version stored now;
* every mutation is **one transaction** (a single conditional statement: the database's
  row lock, not this process, decides who wins, so it holds across server processes);
* versions of an id only grow, **across deletes too**: a delete leaves a tombstone with
  the next version, and re-creating the id continues after it, so a writer holding a
  version read before a delete can never overwrite the re-created record (no ABA);
* ids are printable ASCII (``0x21``-``0x7e``), 1 to :data:`MAX_ID_LENGTH` characters,
  without ``.`` or ``..`` path segments (they travel in URL paths, where HTTP clients would
  collapse those); data is any bytes up to :data:`MAX_RECORD_SIZE`.

The checks on ids, versions and the HTTP precondition headers are plain functions here,
shared by the HTTP service, its client and the CLI, so all three refuse the same inputs
with the same messages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hermetic.errors import (
    RecordIdError,
    RecordNotFoundError,
    RecordTooLargeError,
    RecordVersionError,
    VersionConflictError,
)
from hermetic.store.database import Connection, Cursor, DatabaseLocation, connect, parse_location
from hermetic.store.migrations import Migration, Schema, open_database

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_LIST_LIMIT",
    "MAX_RECORD_SIZE",
    "MAX_VERSION",
    "SCHEMA",
    "Record",
    "RecordInfo",
    "RecordPage",
    "RecordStore",
    "check_data",
    "check_expected_version",
    "check_id",
    "check_prefix",
    "etag",
    "expected_version_from_headers",
    "version_from_etag",
]

MAX_ID_LENGTH = 256
"""Longest record id (and list prefix), in characters."""

MAX_RECORD_SIZE = 1 << 20
"""Largest record, in bytes: sealed key material and state are small; 1 MiB is plenty."""

MAX_VERSION = (1 << 63) - 1
"""Versions are signed 64-bit integers in both databases."""

MAX_LIST_LIMIT = 1000
"""Most records one list page returns."""

SCHEMA = Schema(
    "records",
    (
        Migration(
            1,
            "opaque records with compare-and-set versions; NULL data is a tombstone",
            (
                "CREATE TABLE records ("
                " id {ascii_text} PRIMARY KEY,"
                " version BIGINT NOT NULL CHECK (version >= 1),"
                " data {blob},"
                " size BIGINT NOT NULL,"
                " sha256 {blob})",
            ),
        ),
    ),
)
"""The record store's tables."""

_ABOVE_ASCII = "\x7f"  # sorts after every id character: the exclusive end of a prefix range
_LIST = "SELECT id, version, size, sha256 FROM records WHERE data IS NOT NULL AND id {op} ?"
_LIST_FROM = _LIST.format(op=">=") + " AND id < ? ORDER BY id LIMIT ?"
_LIST_AFTER = _LIST.format(op=">") + " AND id < ? ORDER BY id LIMIT ?"


@dataclass(frozen=True)
class Record:
    """One stored record: its id, its version, and the opaque (sealed) bytes."""

    id: str
    version: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class RecordInfo:
    """What a listing shows of a record: never its bytes, only their size and digest."""

    id: str
    version: int
    size: int
    sha256: bytes

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "version": self.version, "size": self.size,
                "sha256": self.sha256.hex()}  # fmt: skip


@dataclass(frozen=True)
class RecordPage:
    """One page of a listing, in id order; pass ``next_after`` as ``after`` for the next."""

    records: tuple[RecordInfo, ...]
    next_after: str | None


# --- checks shared by the core, the HTTP service, the client and the CLI -------------------


def _shown(value: str) -> str:
    return repr(value if len(value) <= 64 else value[:64] + "...")


def check_prefix(value: object, *, field: str = "prefix") -> str:
    """A list prefix: printable ASCII, at most :data:`MAX_ID_LENGTH` characters (may be empty)."""
    if not isinstance(value, str):
        raise RecordIdError(f"{field}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_ID_LENGTH:
        raise RecordIdError(
            f"{field}: expected at most {MAX_ID_LENGTH} characters, got {len(value)}"
        )
    for position, char in enumerate(value):
        if not "\x21" <= char <= "\x7e":
            raise RecordIdError(
                f"{field}: expected printable ASCII (0x21-0x7e), got {char!r} at position"
                f" {position}"
            )
    return value


def check_id(value: object, *, field: str = "id") -> str:
    """A record id (see the module docstring for the rules)."""
    text = check_prefix(value, field=field)
    if not text:
        raise RecordIdError(f"{field}: expected 1 to {MAX_ID_LENGTH} characters, got none")
    if any(segment in (".", "..") for segment in text.split("/")):
        raise RecordIdError(
            f"{field}: '.' and '..' path segments are not allowed (ids travel in URL paths),"
            f" got {_shown(text)}"
        )
    return text


def check_data(value: object, *, limit: int = MAX_RECORD_SIZE) -> bytes:
    """Record bytes: any bytes-like value up to ``limit`` bytes."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise RecordTooLargeError(f"data: expected bytes, got {type(value).__name__}")
    data = bytes(value)
    if len(data) > limit:
        raise RecordTooLargeError(f"data: expected at most {limit} bytes, got {len(data)}")
    return data


def check_expected_version(value: object, *, field: str = "expected_version") -> int | None:
    """``None`` (the record must not exist) or a version 1..:data:`MAX_VERSION`."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise RecordVersionError(
            f"{field}: expected an integer or None, got {type(value).__name__}"
        )
    if not 1 <= value <= MAX_VERSION:
        raise RecordVersionError(f"{field}: expected 1..{MAX_VERSION}, got {value}")
    return value


def etag(version: int) -> str:
    """The HTTP entity tag of a version: ``"<version>"`` (a strong tag)."""
    return f'"{version}"'


def version_from_etag(value: str, *, field: str = "ETag") -> int:
    """The version in a strong entity tag ``"<decimal>"``; anything else is refused."""
    if value.startswith("W/"):
        raise RecordVersionError(f"{field}: weak entity tags are not versions, got {value[:40]!r}")
    digits = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else None
    if (
        digits is None
        or not digits.isascii()
        or not digits.isdigit()
        or len(digits) > 19
        or (len(digits) > 1 and digits[0] == "0")
    ):
        raise RecordVersionError(
            f'{field}: expected one quoted version such as "3", got {value[:40]!r}'
        )
    version = int(digits)
    if not 1 <= version <= MAX_VERSION:
        raise RecordVersionError(f"{field}: expected a version 1..{MAX_VERSION}, got {version}")
    return version


def expected_version_from_headers(if_match: list[str], if_none_match: list[str]) -> int | None:
    """The expectation of a conditional write: ``If-Match: "<version>"`` (the record is at
    that version) or ``If-None-Match: *`` (it does not exist); exactly one is required."""
    if len(if_match) > 1 or len(if_none_match) > 1:
        raise RecordVersionError("If-Match / If-None-Match: expected one header, got several")
    if if_match and if_none_match:
        raise RecordVersionError("If-Match and If-None-Match: expected one of them, got both")
    if if_none_match:
        if if_none_match[0].strip() != "*":
            raise RecordVersionError(f"If-None-Match: expected *, got {if_none_match[0][:40]!r}")
        return None
    if not if_match:
        raise RecordVersionError(
            'a write needs If-Match: "<version>" (update) or If-None-Match: * (create)'
        )
    value = if_match[0].strip()
    if value == "*":
        raise RecordVersionError('If-Match: expected a version such as "3", got * (any version)')
    return version_from_etag(value, field="If-Match")


# --- the store ----------------------------------------------------------------------------


def _conflict(record_id: str, expected: int | None, current: int | None) -> VersionConflictError:
    want = "absent" if expected is None else f"version {expected}"
    found = "absent" if current is None else f"version {current}"
    return VersionConflictError(
        f"record {_shown(record_id)}: expected {want}, found {found}", current
    )


class RecordStore:
    """Records in one database (a path, ``sqlite:///path`` or ``postgresql://``). Thread-safe.

    Writes go through one connection, reads through another, so a listing is never held
    up by a write; every write is decided by the database, so several processes may share
    one PostgreSQL database (or one SQLite file).
    """

    def __init__(
        self, location: str | Path | DatabaseLocation, *, max_record_size: int = MAX_RECORD_SIZE
    ) -> None:
        self.location = parse_location(location)
        self.max_record_size = max_record_size
        self._writer: Connection = open_database(self.location, SCHEMA)
        try:
            self._reader: Connection = connect(self.location)
        except BaseException:
            self._writer.close()
            raise

    def put(self, record_id: str, data: bytes, expected_version: int | None) -> int:
        """Compare-and-set: store ``data`` if the record is at ``expected_version``
        (``None``: absent); return the new version."""
        record_id = check_id(record_id)
        data = check_data(data, limit=self.max_record_size)
        expected = check_expected_version(expected_version)
        digest = hashlib.sha256(data).digest()
        with self._writer.transaction() as cur:
            if expected is None:
                row = cur.execute(
                    "UPDATE records SET version = version + 1, data = ?, size = ?, sha256 = ?"
                    " WHERE id = ? AND data IS NULL RETURNING version",
                    (data, len(data), digest, record_id),
                ).fetchone()
                if row is None:
                    row = cur.execute(
                        "INSERT INTO records (id, version, data, size, sha256)"
                        " VALUES (?, 1, ?, ?, ?) ON CONFLICT (id) DO NOTHING RETURNING version",
                        (record_id, data, len(data), digest),
                    ).fetchone()
            else:
                row = cur.execute(
                    "UPDATE records SET version = version + 1, data = ?, size = ?, sha256 = ?"
                    " WHERE id = ? AND version = ? AND data IS NOT NULL RETURNING version",
                    (data, len(data), digest, record_id, expected),
                ).fetchone()
            if row is None:
                raise _conflict(record_id, expected, self._current(cur, record_id))
        return int(row[0])

    def delete(self, record_id: str, expected_version: int) -> None:
        """Delete the record if it is at ``expected_version`` (its version keeps counting)."""
        record_id = check_id(record_id)
        expected = check_expected_version(expected_version)
        if expected is None:
            raise RecordVersionError("expected_version: a delete needs the version it removes")
        with self._writer.transaction() as cur:
            row = cur.execute(
                "UPDATE records SET version = version + 1, data = NULL, size = 0, sha256 = NULL"
                " WHERE id = ? AND version = ? AND data IS NOT NULL RETURNING version",
                (record_id, expected),
            ).fetchone()
            if row is None:
                raise _conflict(record_id, expected, self._current(cur, record_id))

    @staticmethod
    def _current(cur: Cursor, record_id: str) -> int | None:
        row = cur.execute(
            "SELECT version FROM records WHERE id = ? AND data IS NOT NULL", (record_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def get(self, record_id: str) -> Record:
        """The record's bytes and version (:class:`~hermetic.errors.RecordNotFoundError`
        if it is not stored)."""
        record_id = check_id(record_id)
        with self._reader.cursor() as cur:
            row = cur.execute(
                "SELECT version, data FROM records WHERE id = ? AND data IS NOT NULL",
                (record_id,),
            ).fetchone()
        if row is None:
            raise RecordNotFoundError(f"record {_shown(record_id)}: not stored")
        return Record(record_id, int(row[0]), bytes(row[1]))

    def list(
        self, prefix: str = "", *, after: str | None = None, limit: int = MAX_LIST_LIMIT
    ) -> RecordPage:
        """Records whose id starts with ``prefix``, in id order, after ``after``; at most
        ``limit`` (1..:data:`MAX_LIST_LIMIT`) per page."""
        prefix = check_prefix(prefix)
        start = prefix if after is None else max(prefix, check_prefix(after, field="after"))
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= MAX_LIST_LIMIT
        ):
            raise RecordIdError(f"limit: expected 1..{MAX_LIST_LIMIT}, got {limit!r}")
        strictly_after = after is not None and start == after
        with self._reader.cursor() as cur:
            rows = cur.execute(
                _LIST_AFTER if strictly_after else _LIST_FROM,
                (start, prefix + _ABOVE_ASCII, limit + 1),
            ).fetchall()
        infos = tuple(RecordInfo(str(i), int(v), int(s), bytes(h)) for i, v, s, h in rows[:limit])
        more = len(rows) > limit
        return RecordPage(infos, infos[-1].id if more else None)

    def scan(self, prefix: str = "") -> Iterator[RecordInfo]:
        """Every record under ``prefix``, page by page (never the bytes)."""
        after: str | None = None
        while True:
            page = self.list(prefix, after=after)
            yield from page.records
            if page.next_after is None:
                return
            after = page.next_after

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
