"""The log's durable, append-only store: entries, perfect-subtree hashes, checkpoints.

A transparency log has exactly one promise to keep: it never shows two different trees for
the same size, and it never forgets an entry it acknowledged. Both are enforced here, in
the database, not in the process that happens to be running:

* a batch of entries is sequenced and integrated in **one transaction**: indices are
  assigned after the current size, entries and every perfect-subtree hash they complete
  are written, the new root is computed from those hashes, the checkpoint for the new
  size is signed (by the caller's signer) and inserted, and only then is the transaction
  committed; the caller acknowledges after the commit. A crash before the commit leaves
  the previous tree untouched (the unsigned, unpublished batch is simply gone); a crash
  after it loses nothing;
* the checkpoint table's primary key is the tree size, entries' is the index and
  hashes' is ``(level, index)``: a second, different tree for a published size cannot be
  written, whatever the code above does (the insert fails and the batch rolls back);
* nothing is ever updated or deleted.

Stored hashes are exactly :func:`hermetic.translog.merkle.stored_hashes_for_leaf`'s
output, so the store is a :data:`~hermetic.translog.merkle.HashReader` and every root,
proof and C2SP tile is O(log n) or one range read away.

Identical entries are deduplicated (the existing index is returned) because it is cheap:
a partial unique index on level-0 hashes answers a whole batch with one query.

The database is the shared storage layer's (:mod:`hermetic.store`): SQLite by default
(WAL, ``synchronous=FULL`` so a commit survives power loss) or PostgreSQL for a
``postgresql://`` URL (several hosts, managed databases), one set of SQL for both, and the
tables as the ``translog`` schema's migrations. Writers hold the ``translog_writer`` lock,
so two servers on one PostgreSQL database never interleave batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hermetic.errors import (
    CheckpointConflictError,
    EntryRejectedError,
    LogStoreError,
    SchemaError,
    StoreError,
    StoreIntegrityError,
    StoreLocationError,
    TranslogError,
)
from hermetic.store import (
    Connection,
    Cursor,
    DatabaseLocation,
    Migration,
    Schema,
    connect,
    open_database,
    parse_location,
)
from hermetic.translog.merkle import leaf_hash, root_hash, stored_hashes_for_leaf

MAX_ENTRY_SIZE = 0xFFFF
"""tlog-tiles entry bundles prefix each entry with a big-endian u16 length."""

CheckpointSigner = Callable[[int, bytes], str]
"""``sign(size, root) -> signed checkpoint note`` (text + blank line + signature lines)."""


@dataclass(frozen=True)
class StoredCheckpoint:
    """A published checkpoint: the log-signed note and the cosignature lines added later."""

    size: int
    note: str
    cosignatures: tuple[str, ...] = ()

    @property
    def text_with_cosignatures(self) -> str:
        """The note as served: the log's signed note followed by every witness line."""
        return self.note + "".join(self.cosignatures)


@dataclass(frozen=True)
class IntegratedBatch:
    """What :meth:`LogStore.integrate` committed: one index per submitted entry.

    ``duplicates[i]`` is true when entry ``i`` was already in the log (or earlier in the
    same batch) and ``indices[i]`` is the index it already had.
    """

    indices: tuple[int, ...]
    duplicates: tuple[bool, ...]
    checkpoint: StoredCheckpoint


def check_entry(entry: bytes) -> None:
    """Reject entries the tlog-tiles bundle format cannot carry."""
    if not isinstance(entry, bytes | bytearray):
        raise EntryRejectedError(f"entry must be bytes, got {type(entry).__name__}")
    if not entry:
        raise EntryRejectedError("entry is empty")
    if len(entry) > MAX_ENTRY_SIZE:
        raise EntryRejectedError(f"entry is {len(entry)} bytes, at most {MAX_ENTRY_SIZE} allowed")


SCHEMA = Schema(
    "translog",
    (
        Migration(
            1,
            "entries, perfect-subtree hashes, checkpoints, cosignatures, log identity",
            (
                "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
                "CREATE TABLE IF NOT EXISTS entries (idx BIGINT PRIMARY KEY, data {blob} NOT NULL)",
                "CREATE TABLE IF NOT EXISTS hashes (level INTEGER NOT NULL, idx BIGINT NOT NULL,"
                " hash {blob} NOT NULL, PRIMARY KEY (level, idx)){without_rowid}",
                "CREATE UNIQUE INDEX IF NOT EXISTS leaf_dedup ON hashes (hash) WHERE level = 0",
                "CREATE TABLE IF NOT EXISTS checkpoints (size BIGINT PRIMARY KEY,"
                " note TEXT NOT NULL)",
                "CREATE TABLE IF NOT EXISTS cosignatures (size BIGINT NOT NULL,"
                " witness TEXT NOT NULL, line TEXT NOT NULL, PRIMARY KEY (size, witness))",
            ),
        ),
    ),
)
"""The log's tables; version 1 is what the store created before migrations existed."""

_WRITER_LOCK = "translog_writer"
_DEDUP_CHUNK = 500


class LogStore:
    """Append-only storage for one log; safe to share between threads.

    Reads go through their own connection so that tile and proof requests are not blocked
    by a batch being integrated (both back ends give readers a committed snapshot).
    ``location`` is a path, ``sqlite:///path`` or a ``postgresql://`` URL; a database whose
    schema does not fit this code raises :class:`~hermetic.errors.SchemaError` as is, any
    other failure to open it :class:`~hermetic.errors.LogStoreError`.
    """

    def __init__(self, location: str | Path | DatabaseLocation) -> None:
        self.location = parse_location(location)
        self._writer: Connection | None = None
        self._reader: Connection | None = None
        try:
            self._writer = open_database(self.location, SCHEMA)
            self._reader = connect(self.location)
        except (SchemaError, StoreLocationError):
            self.close()
            raise
        except StoreError as exc:
            self.close()
            raise LogStoreError(f"cannot open log database {self.location}: {exc}") from None

    # -- reads --------------------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[Cursor]:
        if self._reader is None:
            raise LogStoreError("store is closed")
        try:
            with self._reader.cursor() as cur:
                yield cur
        except StoreError as exc:
            raise LogStoreError(f"database read failed: {exc}") from None

    def tree_size(self) -> int:
        """Size of the latest published checkpoint (0 for an empty log)."""
        with self._reading() as cur:
            cur.execute("SELECT MAX(size) FROM checkpoints")
            row = cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def read_hash(self, level: int, index: int) -> bytes:
        """The :data:`~hermetic.translog.merkle.HashReader` over the stored hashes."""
        with self._reading() as cur:
            cur.execute("SELECT hash FROM hashes WHERE level = ? AND idx = ?", (level, index))
            row = cur.fetchone()
        if row is None:
            raise LogStoreError(f"no stored hash at level {level}, index {index}")
        return bytes(row[0])

    def read_hashes(self, level: int, start: int, count: int) -> list[bytes]:
        """``count`` consecutive stored hashes of one level (a tile's contents)."""
        with self._reading() as cur:
            cur.execute(
                (
                    "SELECT idx, hash FROM hashes WHERE level = ? AND idx >= ? AND idx < ?"
                    " ORDER BY idx"
                ),
                (level, start, start + count),
            )
            rows = cur.fetchall()
        if len(rows) != count:
            raise LogStoreError(
                f"level {level} holds {len(rows)} hashes in [{start}, {start + count}),"
                f" expected {count}"
            )
        return [bytes(h) for _, h in rows]

    def read_entries(self, start: int, count: int) -> list[bytes]:
        """``count`` consecutive entries starting at index ``start``."""
        with self._reading() as cur:
            cur.execute(
                "SELECT idx, data FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, start + count),
            )
            rows = cur.fetchall()
        if len(rows) != count:
            raise LogStoreError(
                f"log holds {len(rows)} entries in [{start}, {start + count}), expected {count}"
            )
        return [bytes(d) for _, d in rows]

    def find_entry(self, entry: bytes) -> int | None:
        """The index of ``entry`` if it is in the log."""
        with self._reading() as cur:
            cur.execute(
                "SELECT idx FROM hashes WHERE level = 0 AND hash = ?",
                (leaf_hash(entry),),
            )
            row = cur.fetchone()
        return None if row is None else int(row[0])

    def checkpoint_at(self, size: int) -> StoredCheckpoint | None:
        """The checkpoint published for ``size``, with its cosignatures, if any."""
        with self._reading() as cur:
            cur.execute("SELECT note FROM checkpoints WHERE size = ?", (size,))
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute("SELECT line FROM cosignatures WHERE size = ? ORDER BY witness", (size,))
            lines = tuple(str(r[0]) for r in cur.fetchall())
        return StoredCheckpoint(size, str(row[0]), lines)

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """The checkpoint of the largest published size."""
        size = self.tree_size()
        if size == 0:
            return self.checkpoint_at(0)
        return self.checkpoint_at(size)

    def latest_cosigned_size(self, minimum: int) -> int | None:
        """The largest size whose checkpoint carries at least ``minimum`` cosignatures."""
        if minimum <= 0:
            return self.tree_size()
        with self._reading() as cur:
            cur.execute(
                (
                    "SELECT size FROM cosignatures GROUP BY size HAVING COUNT(*) >= ?"
                    " ORDER BY size DESC LIMIT 1"
                ),
                (minimum,),
            )
            row = cur.fetchone()
        return None if row is None else int(row[0])

    def checkpoint_sizes(self) -> list[int]:
        """Every size a checkpoint was published for, ascending."""
        with self._reading() as cur:
            cur.execute("SELECT size FROM checkpoints ORDER BY size")
            return [int(r[0]) for r in cur.fetchall()]

    def meta(self, name: str) -> str | None:
        with self._reading() as cur:
            cur.execute("SELECT value FROM meta WHERE name = ?", (name,))
            row = cur.fetchone()
        return None if row is None else str(row[0])

    # -- writes -------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[Cursor]:
        """One write transaction holding the log's single-writer lock (in every process)."""
        if self._writer is None:
            raise LogStoreError("store is closed")
        try:
            with self._writer.transaction(write=True, exclusive=_WRITER_LOCK) as cur:
                yield cur
        except StoreIntegrityError as exc:
            raise LogStoreError(f"store refused a write: {exc}") from None
        except StoreError as exc:
            raise LogStoreError(f"database write failed: {exc}") from None

    def bind_identity(self, origin: str, vkey: str) -> None:
        """Record which log (origin and verifier key) this store belongs to, or check it.

        A store signed under one key must never be re-served under another: that would
        publish a second tree head for sizes already published.
        """
        with self._writing() as cur:
            for name, value in (("origin", origin), ("vkey", vkey)):
                cur.execute("SELECT value FROM meta WHERE name = ?", (name,))
                row = cur.fetchone()
                if row is None:
                    cur.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (name, value))
                elif str(row[0]) != value:
                    raise LogStoreError(
                        f"store belongs to a log with {name} {row[0]!r}, not {value!r}"
                    )

    def integrate(self, entries: Sequence[bytes], sign: CheckpointSigner) -> IntegratedBatch:
        """Sequence ``entries`` after the current tree and publish the new checkpoint.

        Everything happens in one transaction (see the module docstring); when this
        returns, the entries and the checkpoint covering them are durable.
        """
        for entry in entries:
            check_entry(entry)
        leaves = [leaf_hash(bytes(e)) for e in entries]
        with self._writing() as cur:
            cur.execute("SELECT MAX(size) FROM checkpoints")
            row = cur.fetchone()
            size = int(row[0]) if row and row[0] is not None else 0
            cur.execute("SELECT MAX(idx) FROM entries")
            top = cur.fetchone()
            stored = int(top[0]) + 1 if top and top[0] is not None else 0
            if stored != size:
                raise LogStoreError(
                    f"store holds entries up to index {stored - 1} but its latest checkpoint"
                    f" has size {size}"
                )
            existing = self._existing_leaves(cur, leaves)
            pending: dict[tuple[int, int], bytes] = {}

            def read(level: int, index: int) -> bytes:
                got = pending.get((level, index))
                if got is not None:
                    return got
                cur.execute("SELECT hash FROM hashes WHERE level = ? AND idx = ?", (level, index))
                r = cur.fetchone()
                if r is None:
                    raise LogStoreError(f"no stored hash at level {level}, index {index}")
                return bytes(r[0])

            indices: list[int] = []
            duplicates: list[bool] = []
            new_entries: list[tuple[int, bytes]] = []
            new_size = size
            for entry, leaf in zip(entries, leaves, strict=True):
                known = existing.get(leaf)
                if known is not None:
                    indices.append(known)
                    duplicates.append(True)
                    continue
                index = new_size
                new_size += 1
                existing[leaf] = index
                indices.append(index)
                duplicates.append(False)
                new_entries.append((index, bytes(entry)))
                for level, i, h in stored_hashes_for_leaf(index, bytes(entry), read):
                    pending[(level, i)] = h
            if new_size == size:
                cur.execute("SELECT note FROM checkpoints WHERE size = ?", (size,))
                note_row = cur.fetchone()
                if note_row is None:
                    note = sign(size, root_hash(size, read))
                    self._insert_checkpoint(cur, size, note)
                else:
                    note = str(note_row[0])
                checkpoint = StoredCheckpoint(size, note)
            else:
                cur.executemany("INSERT INTO entries (idx, data) VALUES (?, ?)", new_entries)
                cur.executemany(
                    "INSERT INTO hashes (level, idx, hash) VALUES (?, ?, ?)",
                    [(lv, i, h) for (lv, i), h in pending.items()],
                )
                note = sign(new_size, root_hash(new_size, read))
                self._insert_checkpoint(cur, new_size, note)
                checkpoint = StoredCheckpoint(new_size, note)
        return IntegratedBatch(tuple(indices), tuple(duplicates), checkpoint)

    def _existing_leaves(self, cur: Cursor, leaves: Sequence[bytes]) -> dict[bytes, int]:
        found: dict[bytes, int] = {}
        unique = list(dict.fromkeys(leaves))
        for n in range(0, len(unique), _DEDUP_CHUNK):
            chunk = unique[n : n + _DEDUP_CHUNK]
            marks = ", ".join("?" * len(chunk))
            cur.execute(
                f"SELECT hash, idx FROM hashes WHERE level = 0 AND hash IN ({marks})",  # noqa: S608 - only placeholders are interpolated
                chunk,
            )
            for h, idx in cur.fetchall():
                found[bytes(h)] = int(idx)
        return found

    def _insert_checkpoint(self, cur: Cursor, size: int, note: str) -> None:
        cur.execute("SELECT note FROM checkpoints WHERE size = ?", (size,))
        row = cur.fetchone()
        if row is not None:
            raise CheckpointConflictError(
                f"a checkpoint for size {size} is already published; it is never rewritten"
            )
        cur.execute("INSERT INTO checkpoints (size, note) VALUES (?, ?)", (size, note))

    def add_cosignature(self, size: int, witness: str, line: str) -> bool:
        """Store a witness's cosignature line for the checkpoint of ``size``.

        The caller has verified it. One line per (size, witness) is kept, the first;
        returns whether this one was stored.
        """
        if not line.endswith("\n") or "\n" in line[:-1]:
            raise TranslogError("a cosignature must be exactly one line ending in a newline")
        with self._writing() as cur:
            cur.execute("SELECT 1 FROM checkpoints WHERE size = ?", (size,))
            if cur.fetchone() is None:
                raise LogStoreError(f"no checkpoint was published for size {size}")
            cur.execute(
                "SELECT 1 FROM cosignatures WHERE size = ? AND witness = ?",
                (size, witness),
            )
            if cur.fetchone() is not None:
                return False
            cur.execute(
                "INSERT INTO cosignatures (size, witness, line) VALUES (?, ?, ?)",
                (size, witness, line),
            )
        return True

    def replace_cosignature(self, size: int, witness: str, line: str) -> None:
        """Replace the stored cosignature of ``witness`` for ``size`` with ``line``.

        The service calls it only with a verified line whose timestamp is newer than the
        stored one: a witness that re-cosigns a log that did not grow vouches that the log
        still had this size at that later time, and a relying party that checks freshness
        against its own clock (the persistence service's rollback check) needs that time.
        """
        if not line.endswith("\n") or "\n" in line[:-1]:
            raise TranslogError("a cosignature must be exactly one line ending in a newline")
        with self._writing() as cur:
            cur.execute(
                "UPDATE cosignatures SET line = ? WHERE size = ? AND witness = ?",
                (line, size, witness),
            )

    def close(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                conn.close()
        self._writer = self._reader = None

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SQLiteLogStore(LogStore):
    """The default store: one SQLite file (WAL, ``synchronous=FULL``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(DatabaseLocation.sqlite(self.path))


class PostgresLogStore(LogStore):
    """The same store on PostgreSQL (psycopg 3); ``dsn`` is a ``postgresql://`` URL."""

    def __init__(self, dsn: str) -> None:
        location = parse_location(dsn)
        if location.backend != "postgresql":
            raise StoreLocationError(f"expected a postgresql:// URL, got {location}")
        super().__init__(location)


def open_store(location: str | Path) -> LogStore:
    """A PostgreSQL store for ``postgresql://`` / ``postgres://`` URLs, else SQLite."""
    parsed = parse_location(location)
    if parsed.backend == "postgresql":
        return PostgresLogStore(parsed.target)
    return SQLiteLogStore(parsed.path)
