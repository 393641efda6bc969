"""One storage layer for the log, the local KMS and the parent's record store.

SQLite by default (one file, nothing to start), PostgreSQL given a ``postgresql://`` URL;
connection set-up, transactions, dialect differences, typed errors and versioned schema
migrations live here once, so a fix lands in every store at the same time
(:mod:`hermetic.store.database`, :mod:`hermetic.store.migrations`).

The parent's record store is built on it: :mod:`hermetic.store.records` (the core:
opaque records under compare-and-set versions), :mod:`hermetic.store.service` (its HTTP
API, ``hermetic store serve``) and :mod:`hermetic.store.client`. This is a base-layer
package: it imports nothing of hermetic but :mod:`hermetic.errors` and
:mod:`hermetic.paths`. See ``docs/store.md``.
"""

from hermetic.store.database import (
    Connection,
    Cursor,
    DatabaseLocation,
    Dialect,
    connect,
    parse_location,
)
from hermetic.store.migrations import (
    MIGRATIONS_TABLE,
    Migration,
    MigrationResult,
    Schema,
    migrate,
    open_database,
)

__all__ = [
    "MIGRATIONS_TABLE",
    "Connection",
    "Cursor",
    "DatabaseLocation",
    "Dialect",
    "Migration",
    "MigrationResult",
    "Schema",
    "connect",
    "migrate",
    "open_database",
    "parse_location",
]
