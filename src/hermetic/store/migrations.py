"""Versioned schemas: each store's tables are a numbered list of migrations.

A database outlives the code that created it (a log runs for years; a record store is
restored from a backup onto a newer host), so each schema says how it grew, and the
database records how far it got:

* a :class:`Schema` is a name (``translog``, ``kms``, ``records``) and migrations numbered
  1, 2, 3, ...; a migration is DDL templates (see :class:`~hermetic.store.database.Dialect`)
  and is never edited once released: a change is a new migration;
* :func:`migrate` applies the missing ones in order, **in one transaction** (DDL is
  transactional in both SQLite and PostgreSQL), and records each in ``schema_migrations``
  with a digest of its text; a crash mid-way leaves the previous version intact;
* a database that records a version this code does not know was written by newer code:
  :class:`~hermetic.errors.SchemaTooNewError`, nothing touched; a recorded migration whose
  digest differs from the code's means the schema is not what the code thinks it is:
  :class:`~hermetic.errors.SchemaMismatchError`.

Migrations are serialised across processes (two servers starting on one PostgreSQL
database do not race on ``CREATE TABLE``).

Version 1 of each existing schema is exactly the ``CREATE TABLE IF NOT EXISTS`` statements
those stores ran before migrations existed, so their older databases are adopted as they
are.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from hermetic.errors import SchemaMismatchError, SchemaTooNewError
from hermetic.store.database import Connection, DatabaseLocation, connect

__all__ = ["MIGRATIONS_TABLE", "Migration", "MigrationResult", "Schema", "migrate", "open_database"]

MIGRATIONS_TABLE = "schema_migrations"

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

_MIGRATIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " schema_name {ascii_text} NOT NULL,"
    " version INTEGER NOT NULL,"
    " description TEXT NOT NULL,"
    " digest TEXT NOT NULL,"
    " PRIMARY KEY (schema_name, version))"
)


@dataclass(frozen=True)
class Migration:
    """One step of a schema: DDL templates run in order, in the migration's transaction."""

    version: int
    description: str
    statements: tuple[str, ...]

    @property
    def digest(self) -> str:
        """SHA-256 of the migration's templates (the same on every back end)."""
        text = json.dumps([self.version, self.description, list(self.statements)])
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Schema:
    """A named schema and every migration it ever had, oldest first."""

    name: str
    migrations: tuple[Migration, ...]

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"schema name must be a lower-case identifier, got {self.name!r}")
        versions = [m.version for m in self.migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise ValueError(f"schema {self.name}: migrations must be numbered 1..n: {versions}")

    @property
    def version(self) -> int:
        """The newest version this code knows."""
        return len(self.migrations)


@dataclass(frozen=True)
class MigrationResult:
    """What :func:`migrate` found and did."""

    schema: str
    before: int
    after: int

    @property
    def applied(self) -> tuple[int, ...]:
        return tuple(range(self.before + 1, self.after + 1))


def migrate(connection: Connection, schema: Schema) -> MigrationResult:
    """Bring ``schema`` in the database up to the code's version (see the module doc)."""
    dialect = connection.dialect
    with connection.transaction(write=True, exclusive=MIGRATIONS_TABLE) as cur:
        cur.execute(dialect.ddl(_MIGRATIONS_DDL))
        cur.execute(
            "SELECT version, digest FROM schema_migrations WHERE schema_name = ? ORDER BY version",
            (schema.name,),
        )
        recorded = [(int(v), str(d)) for v, d in cur.fetchall()]
        before = recorded[-1][0] if recorded else 0
        _check_recorded(connection.location, schema, recorded)
        for migration in schema.migrations[before:]:
            for statement in migration.statements:
                cur.execute(dialect.ddl(statement))
            cur.execute(
                "INSERT INTO schema_migrations (schema_name, version, description, digest)"
                " VALUES (?, ?, ?, ?)",
                (schema.name, migration.version, migration.description, migration.digest),
            )
    return MigrationResult(schema.name, before, schema.version)


def _check_recorded(
    location: DatabaseLocation, schema: Schema, recorded: list[tuple[int, str]]
) -> None:
    newest = recorded[-1][0] if recorded else 0
    if newest > schema.version:
        raise SchemaTooNewError(
            f"database {location}: schema {schema.name!r} is at version {newest}, but this"
            f" hermetic knows versions up to {schema.version}; open it with the newer hermetic"
            " that migrated it (nothing was changed)"
        )
    versions = [v for v, _ in recorded]
    if versions != list(range(1, newest + 1)):
        raise SchemaMismatchError(
            f"database {location}: schema {schema.name!r} records migrations {versions},"
            f" expected 1..{newest} without gaps"
        )
    for version, digest in recorded:
        migration = schema.migrations[version - 1]
        if digest != migration.digest:
            raise SchemaMismatchError(
                f"database {location}: schema {schema.name!r} migration {version}"
                f" ({migration.description}) was applied with digest {digest[:16]}, this"
                f" code's is {migration.digest[:16]}: the tables may not be what the code expects"
            )


def open_database(location: str | Path | DatabaseLocation, schema: Schema) -> Connection:
    """Connect and migrate ``schema``; the connection is closed again if migrating fails."""
    connection = connect(location)
    try:
        migrate(connection, schema)
    except BaseException:
        connection.close()
        raise
    return connection
