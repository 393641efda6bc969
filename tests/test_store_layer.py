"""The shared storage layer: locations, connections, transactions and schema migrations,
on SQLite and on a real PostgreSQL server the suite starts itself.

The log and the local KMS run on this layer too; the last tests check that they adopt the
databases their earlier versions created and refuse ones written by newer code.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from hermetic.errors import (
    LogStoreError,
    SchemaMismatchError,
    SchemaTooNewError,
    StoreClosedError,
    StoreIntegrityError,
    StoreLocationError,
    StoreQueryError,
    StoreUnavailableError,
)
from hermetic.kms.store import KeyStore
from hermetic.store import (
    Connection,
    DatabaseLocation,
    Migration,
    Schema,
    connect,
    migrate,
    open_database,
    parse_location,
)
from hermetic.translog.store import SQLiteLogStore, open_store
from test_translog_service_support import PostgresServer

V1 = Migration(
    1,
    "notes",
    ("CREATE TABLE notes (name {ascii_text} PRIMARY KEY, body {blob} NOT NULL)",),
)
V2 = Migration(
    2,
    "note sizes",
    (
        "ALTER TABLE notes ADD COLUMN size BIGINT",
        "CREATE INDEX notes_size ON notes (size)",
    ),
)
ONE = Schema("notes", (V1,))
TWO = Schema("notes", (V1, V2))


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each back end."""
    if request.param == "sqlite":
        return str(tmp_path / "layer.db")
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


def recorded(conn: Connection, schema: str = "notes") -> list[tuple[int, str]]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT version, description FROM schema_migrations WHERE schema_name = ?"
            " ORDER BY version",
            (schema,),
        )
        return [(int(v), str(d)) for v, d in cur.fetchall()]


# --- locations ----------------------------------------------------------------------------


def test_location_is_sqlite_for_paths_and_sqlite_urls(tmp_path: Path) -> None:
    assert parse_location(tmp_path / "a.db") == DatabaseLocation("sqlite", str(tmp_path / "a.db"))
    assert parse_location("relative/b.db") == DatabaseLocation("sqlite", "relative/b.db")
    assert parse_location("sqlite:///var/lib/x.db") == DatabaseLocation("sqlite", "/var/lib/x.db")
    assert parse_location("postgresql://u@h/db").backend == "postgresql"
    assert parse_location("postgres://u@h/db").backend == "postgresql"


@pytest.mark.parametrize(
    ("location", "named"),
    [
        ("", "''"),
        ("mysql://root@localhost/db", "'mysql'"),
        ("sqlite://host/x.db", "sqlite:///absolute/path"),
        ("sqlite:///", "sqlite:///absolute/path"),
        ("sqlite:///x.db?mode=ro", "no host, query"),
    ],
)
def test_rejects_locations_that_are_not_a_path_or_known_url(location: str, named: str) -> None:
    with pytest.raises(StoreLocationError, match=named.replace("?", r"\?")):
        parse_location(location)


def test_location_never_prints_a_postgresql_password() -> None:
    for url in (
        "postgresql://alice:s3cret-pw@db.example:5432/app",
        "postgresql://alice@db.example/app?password=s3cret-pw&sslmode=require",
    ):
        shown = str(parse_location(url))
        assert "s3cret-pw" not in shown
        assert "alice" in shown
        assert "db.example" in shown


def test_connection_failure_message_names_the_database_without_its_password() -> None:
    url = "postgresql://alice:s3cret-pw@/nothing?host=/nonexistent&connect_timeout=1"
    with pytest.raises(StoreUnavailableError) as caught:
        connect(url)
    assert "s3cret-pw" not in str(caught.value)
    assert "nothing" in str(caught.value)


def test_sqlite_connection_is_durable_wal(tmp_path: Path) -> None:
    with connect(tmp_path / "d.db") as conn, conn.cursor() as cur:
        assert cur.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert cur.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        assert cur.execute("PRAGMA busy_timeout").fetchone() == (30000,)


def test_opening_something_that_is_not_a_database_is_a_typed_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(StoreUnavailableError, match=r"junk\.db"):
        connect(junk)
    with pytest.raises(StoreUnavailableError):
        connect(tmp_path)  # a directory


# --- migrations ---------------------------------------------------------------------------


def test_migrations_apply_in_order_and_are_recorded(location: str) -> None:
    with connect(location) as conn:
        result = migrate(conn, TWO)
        assert (result.before, result.after, result.applied) == (0, 2, (1, 2))
        assert recorded(conn) == [(1, "notes"), (2, "note sizes")]
        with conn.transaction() as cur:
            cur.execute("INSERT INTO notes (name, body, size) VALUES (?, ?, ?)", ("a", b"x", 1))


def test_reopening_a_migrated_database_applies_nothing(location: str) -> None:
    with open_database(location, TWO) as conn, conn.transaction() as cur:
        cur.execute("INSERT INTO notes (name, body, size) VALUES (?, ?, ?)", ("a", b"kept", 4))
    with connect(location) as conn:
        assert migrate(conn, TWO).applied == ()
        assert migrate(conn, TWO).applied == ()
        assert recorded(conn) == [(1, "notes"), (2, "note sizes")]
        with conn.cursor() as cur:
            assert cur.execute("SELECT body FROM notes").fetchall() == [(b"kept",)]


def test_a_newer_release_applies_only_its_new_migrations(location: str) -> None:
    with open_database(location, ONE) as conn, conn.transaction() as cur:
        cur.execute("INSERT INTO notes (name, body) VALUES (?, ?)", ("old", b"v1 row"))
    with connect(location) as conn:
        result = migrate(conn, TWO)
        assert (result.before, result.applied) == (1, (2,))
        with conn.cursor() as cur:
            assert cur.execute("SELECT name, body, size FROM notes").fetchall() == [
                ("old", b"v1 row", None)
            ]


def test_refuses_a_database_migrated_by_newer_code_and_changes_nothing(location: str) -> None:
    with open_database(location, TWO):
        pass
    with pytest.raises(SchemaTooNewError, match=r"'notes' is at version 2.*up to 1"):
        open_database(location, ONE)
    with connect(location) as conn:
        assert [v for v, _ in recorded(conn)] == [1, 2]


def test_refuses_a_database_whose_applied_migration_differs_from_the_code(location: str) -> None:
    with open_database(location, ONE):
        pass
    edited = Schema(
        "notes", (Migration(1, "notes", ("CREATE TABLE notes (name TEXT PRIMARY KEY)",)),)
    )
    with pytest.raises(SchemaMismatchError, match="migration 1"):
        open_database(location, edited)


def test_a_failing_migration_leaves_the_previous_version_intact(location: str) -> None:
    with open_database(location, ONE):
        pass
    broken = Schema(
        "notes",
        (V1, Migration(2, "half", ("CREATE TABLE extra (x INTEGER)", "CREATE TABLE notes (y)"))),
    )
    with pytest.raises(StoreQueryError):
        open_database(location, broken)
    with connect(location) as conn:
        assert [v for v, _ in recorded(conn)] == [1]
        with conn.transaction() as cur:
            cur.execute("CREATE TABLE extra (x INTEGER)")  # the failed migration left none


def test_schemas_of_different_names_share_one_database(location: str) -> None:
    other = Schema("other", (Migration(1, "other", ("CREATE TABLE other (x INTEGER)",)),))
    with open_database(location, ONE) as conn:
        assert migrate(conn, other).applied == (1,)
        assert recorded(conn, "other") == [(1, "other")]
        assert recorded(conn) == [(1, "notes")]


def test_concurrent_openers_migrate_once(location: str) -> None:
    """Servers starting together on one database: every one opens it, migrations run once."""
    errors: list[BaseException] = []
    opened: list[Connection] = []
    start = threading.Barrier(8)

    def open_it() -> None:
        try:
            start.wait()
            opened.append(open_database(location, TWO))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [v for v, _ in recorded(opened[0])] == [1, 2]
    for conn in opened:
        conn.close()


def test_schema_definitions_must_be_numbered_from_one() -> None:
    with pytest.raises(ValueError, match=r"numbered 1\.\.n"):
        Schema("bad", (V2,))
    with pytest.raises(ValueError, match="identifier"):
        Schema("Bad Name", (V1,))


# --- transactions and typed errors --------------------------------------------------------


def test_a_transaction_that_raises_leaves_nothing_behind(location: str) -> None:
    with open_database(location, ONE) as conn:

        def half_done() -> None:
            with conn.transaction() as cur:
                cur.execute("INSERT INTO notes (name, body) VALUES (?, ?)", ("a", b"1"))
                raise RuntimeError("midway")

        with pytest.raises(RuntimeError, match="midway"):
            half_done()
        with conn.cursor() as cur:
            assert cur.execute("SELECT COUNT(*) FROM notes").fetchone() == (0,)


def test_driver_errors_come_out_typed(location: str) -> None:
    with open_database(location, ONE) as conn:
        with conn.transaction() as cur:
            cur.execute("INSERT INTO notes (name, body) VALUES (?, ?)", ("a", b"1"))
        with pytest.raises(StoreIntegrityError), conn.transaction() as cur:
            cur.execute("INSERT INTO notes (name, body) VALUES (?, ?)", ("a", b"2"))
        with pytest.raises(StoreQueryError), conn.cursor() as cur:
            cur.execute("SELECT nope FROM notes")
        with conn.cursor() as cur:  # still usable after both
            assert cur.execute("SELECT body FROM notes").fetchall() == [(b"1",)]


def test_a_read_transaction_sees_one_snapshot(location: str) -> None:
    with open_database(location, ONE) as reader, connect(location) as writer:
        with writer.transaction() as cur:
            cur.execute("INSERT INTO notes (name, body) VALUES (?, ?)", ("before", b"1"))
        with reader.transaction(write=False) as snapshot:
            first = snapshot.execute("SELECT COUNT(*) FROM notes").fetchone()
            with writer.transaction() as cur:
                cur.execute("INSERT INTO notes (name, body) VALUES (?, ?)", ("during", b"2"))
            assert snapshot.execute("SELECT COUNT(*) FROM notes").fetchone() == first == (1,)
        with reader.cursor() as cur:
            assert cur.execute("SELECT COUNT(*) FROM notes").fetchone() == (2,)


def test_percent_signs_in_sql_are_not_placeholders(location: str) -> None:
    with open_database(location, ONE) as conn, conn.transaction() as cur:
        cur.execute("INSERT INTO notes (name, body) VALUES (?, ?)", ("100%", b"x"))
        assert cur.execute("SELECT name FROM notes WHERE name LIKE '%0%'").fetchall() == [("100%",)]


def test_nested_use_of_one_connection_fails_instead_of_deadlocking(location: str) -> None:
    with (
        open_database(location, ONE) as conn,
        conn.transaction(),
        pytest.raises(StoreQueryError, match="already inside"),
        conn.cursor(),
    ):
        pass


def test_a_closed_connection_says_so(location: str) -> None:
    conn = open_database(location, ONE)
    conn.close()
    conn.close()
    with pytest.raises(StoreClosedError), conn.cursor():
        pass


def test_writers_on_two_connections_serialise(location: str) -> None:
    """Read-modify-write in a write transaction: no update is lost between connections."""
    with open_database(location, ONE) as setup, setup.transaction() as cur:
        cur.execute("INSERT INTO notes (name, body) VALUES (?, ?)", ("n", b"0"))
    connections = [connect(location), connect(location)]

    def bump(conn: Connection) -> None:
        for _ in range(25):
            with conn.transaction(exclusive="test_counter") as cur:
                (body,) = cur.execute("SELECT body FROM notes WHERE name = ?", ("n",)).fetchone()  # type: ignore[misc]
                value = int(bytes(body)) + 1
                cur.execute("UPDATE notes SET body = ? WHERE name = ?", (str(value).encode(), "n"))

    threads = [threading.Thread(target=bump, args=(c,)) for c in connections]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with connections[0].cursor() as cur:
        assert cur.execute("SELECT body FROM notes").fetchone() == (b"50",)
    for c in connections:
        c.close()


def test_a_lost_postgresql_connection_is_reopened_on_next_use(postgres: PostgresServer) -> None:
    dsn = postgres.new_database()
    with open_database(dsn, ONE) as conn, connect(dsn) as admin:
        with conn.cursor() as cur:
            (pid,) = cur.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(?)", (pid,))
        with pytest.raises(StoreUnavailableError), conn.cursor() as cur:
            cur.execute("SELECT 1")
        with conn.cursor() as cur:
            assert cur.execute("SELECT 1").fetchone() == (1,)


# --- the log and the KMS on the layer -----------------------------------------------------

_OLD_LOG_DDL = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE entries (idx BIGINT PRIMARY KEY, data BLOB NOT NULL)",
    "CREATE TABLE hashes (level INTEGER NOT NULL, idx BIGINT NOT NULL, hash BLOB NOT NULL,"
    " PRIMARY KEY (level, idx)) WITHOUT ROWID",
    "CREATE UNIQUE INDEX leaf_dedup ON hashes (hash) WHERE level = 0",
    "CREATE TABLE checkpoints (size BIGINT PRIMARY KEY, note TEXT NOT NULL)",
    "CREATE TABLE cosignatures (size BIGINT NOT NULL, witness TEXT NOT NULL,"
    " line TEXT NOT NULL, PRIMARY KEY (size, witness))",
)


def test_log_adopts_a_database_created_before_migrations(tmp_path: Path) -> None:
    from hermetic.translog.merkle import leaf_hash

    path = tmp_path / "old-log.db"
    raw = sqlite3.connect(path)
    for statement in _OLD_LOG_DDL:
        raw.execute(statement)
    raw.execute("INSERT INTO entries VALUES (0, ?)", (b"from before",))
    raw.execute("INSERT INTO hashes VALUES (0, 0, ?)", (leaf_hash(b"from before"),))
    raw.execute("INSERT INTO checkpoints VALUES (1, 'note')")
    raw.commit()
    raw.close()
    with SQLiteLogStore(path) as store:
        assert store.tree_size() == 1
        assert store.read_entries(0, 1) == [b"from before"]
    with connect(path) as conn:
        assert recorded(conn, "translog")[0][0] == 1


def test_log_refuses_a_database_from_newer_code(location: str) -> None:
    open_store(location).close()
    with connect(location) as conn, conn.transaction() as cur:
        cur.execute(
            "INSERT INTO schema_migrations VALUES (?, ?, ?, ?)", ("translog", 2, "future", "00")
        )
    with pytest.raises(SchemaTooNewError, match="'translog' is at version 2"):
        open_store(location)


def test_log_store_failures_stay_log_store_errors(tmp_path: Path) -> None:
    store = SQLiteLogStore(tmp_path / "log.db")
    store.close()
    with pytest.raises(LogStoreError, match="closed"):
        store.tree_size()


def _kms_roundtrip(open_store_: Callable[[], KeyStore]) -> None:
    store = open_store_()
    record = store.create_key(
        key_usage="ENCRYPT_DECRYPT",
        key_spec="SYMMETRIC_DEFAULT",
        description="on the shared layer",
        policy="{}",
        material=b"\x07" * 32,
    )
    assert store.create_alias("alias/one", record.key_id)
    assert not store.create_alias("alias/one", record.key_id)
    store.set_state(record.key_id, "Disabled", 1234.5)
    store.close()
    again = open_store_()
    kept = again.get_key(record.key_id)
    assert kept is not None
    assert (kept.state, kept.deletion_date, kept.created) == ("Disabled", 1234.5, record.created)
    assert again.material(kept, 1) == b"\x07" * 32
    assert [a.alias_name for a in again.list_aliases(record.key_id)] == ["alias/one"]
    assert again.delete_alias("alias/one")
    assert not again.delete_alias("alias/one")
    again.close()


def test_kms_key_store_runs_on_sqlite_and_postgresql(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    root = tmp_path / "root.key"
    _kms_roundtrip(lambda: KeyStore.open(tmp_path / "kms" / "kms.sqlite3", root))
    dsn = postgres.new_database()
    _kms_roundtrip(lambda: KeyStore.open(dsn, root))
