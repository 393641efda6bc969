"""Where a database is, how to connect to it, and how to run a transaction in it.

The log, the local KMS and the parent's record store each keep state in SQLite (default:
one file, no server to start) or PostgreSQL (several hosts, managed databases). What they
need from a database is the same, so it is written once, here:

* **where** (:func:`parse_location`): a plain path or ``sqlite:///abs/path`` is SQLite, a
  ``postgresql://`` (or ``postgres://``) URL is PostgreSQL; any other ``scheme://`` is a
  typed error rather than a file of that name;
* **a durable connection** (:func:`connect`): SQLite in WAL mode with ``synchronous=FULL``
  (a commit survives power loss) and a 30 s busy timeout, usable from any thread;
  PostgreSQL through psycopg 3 in autocommit mode, so every transaction is explicit;
* **explicit transactions** (:meth:`Connection.transaction`): a SQLite writer takes the
  database's write lock at ``BEGIN IMMEDIATE``, so writers queue instead of failing on a
  lock upgrade; a PostgreSQL writer can serialise with every other holder of a named
  ``exclusive`` lock (a transaction-scoped advisory lock); whatever is raised inside rolls
  the whole transaction back;
* **the dialect differences** (:class:`Dialect`): placeholders (callers write ``?``), blob,
  float and byte-ordered text types in DDL;
* **typed errors**: driver exceptions never escape; they become
  :class:`~hermetic.errors.StoreIntegrityError` (a constraint refused a write),
  :class:`~hermetic.errors.StoreUnavailableError` (cannot open, connection lost; a lost
  PostgreSQL connection is re-opened on next use) or
  :class:`~hermetic.errors.StoreQueryError`.

A PostgreSQL URL may carry a password: a location prints without it (``str()``), and no
message here includes the URL's password.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from hermetic.errors import (
    StoreClosedError,
    StoreError,
    StoreIntegrityError,
    StoreLocationError,
    StoreQueryError,
    StoreUnavailableError,
)

__all__ = [
    "Connection",
    "Cursor",
    "DatabaseLocation",
    "Dialect",
    "connect",
    "parse_location",
]

Backend = Literal["sqlite", "postgresql"]

SQLITE_BUSY_TIMEOUT_SECONDS = 30
"""How long a SQLite writer waits for another writer's transaction before giving up."""

PG_CONNECT_TIMEOUT_SECONDS = 10
"""libpq's connect timeout unless the URL sets one (its own default is to wait forever)."""

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class DatabaseLocation:
    """Which database: a SQLite file (``target`` is its path) or a PostgreSQL URL."""

    backend: Backend
    target: str

    @classmethod
    def sqlite(cls, path: str | Path) -> DatabaseLocation:
        return cls("sqlite", str(path))

    @property
    def path(self) -> Path:
        """The SQLite file (a usage error for PostgreSQL)."""
        if self.backend != "sqlite":
            raise StoreLocationError(f"{self} is a PostgreSQL database, not a SQLite file")
        return Path(self.target)

    def __str__(self) -> str:
        if self.backend == "sqlite":
            return self.target
        return _without_password(self.target)


def parse_location(location: str | Path | DatabaseLocation) -> DatabaseLocation:
    """A path or ``sqlite:///abs/path`` is SQLite, ``postgresql://`` / ``postgres://`` is
    PostgreSQL; anything else that looks like a URL is refused."""
    if isinstance(location, DatabaseLocation):
        return location
    if isinstance(location, Path):
        return DatabaseLocation.sqlite(location)
    if not isinstance(location, str):
        raise StoreLocationError(
            f"database location: expected a path or URL, got {type(location).__name__}"
        )
    if not location:
        raise StoreLocationError("database location: expected a path or URL, got ''")
    if location.startswith(("postgresql://", "postgres://")):
        return DatabaseLocation("postgresql", location)
    if location.startswith("sqlite://"):
        path = location[len("sqlite://") :]
        if not path.startswith("/") or len(path) < 2 or "?" in path or "#" in path:
            raise StoreLocationError(
                "database location: a SQLite URL is sqlite:///absolute/path (no host, query"
                f" or fragment), got {location!r}; give a relative path as a plain path"
            )
        return DatabaseLocation.sqlite(path)
    scheme = _SCHEME.match(location)
    if scheme:
        raise StoreLocationError(
            f"database location: expected a path, sqlite:///path or postgresql://..., got a"
            f" {scheme.group(0)[:-3]!r} URL"
        )
    return DatabaseLocation.sqlite(location)


def _without_password(url: str) -> str:
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            if ":" in userinfo:
                netloc = f"{userinfo.partition(':')[0]}:***@{host}"
        query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return f"{url.partition(':')[0]}://(unparsable URL)"


@dataclass(frozen=True)
class Dialect:
    """The SQL differences between the back ends that hermetic's schemas run into.

    Callers write ``?`` placeholders (never inside string literals) and DDL templates with
    ``{blob}``, ``{double}``, ``{ascii_text}`` (text compared byte by byte, so ``ORDER BY``
    and prefix ranges agree on both back ends) and ``{without_rowid}``.
    """

    name: Backend
    placeholder: str
    blob: str
    double: str
    ascii_text: str
    without_rowid: str

    def sql(self, text: str) -> str:
        """``text`` with this dialect's placeholders (and ``%`` escaped for psycopg)."""
        if self.placeholder == "?":
            return text
        return text.replace("%", "%%").replace("?", self.placeholder)

    def ddl(self, template: str) -> str:
        """A DDL template rendered for this dialect."""
        return template.format(
            blob=self.blob,
            double=self.double,
            ascii_text=self.ascii_text,
            without_rowid=self.without_rowid,
        )


SQLITE = Dialect("sqlite", "?", "BLOB", "REAL", "TEXT", " WITHOUT ROWID")
POSTGRESQL = Dialect("postgresql", "%s", "BYTEA", "DOUBLE PRECISION", 'TEXT COLLATE "C"', "")


class _Driver(ABC):
    """How one back end opens, begins, ends and reports failures."""

    dialect: Dialect

    def __init__(self, location: DatabaseLocation) -> None:
        self.location = location

    @abstractmethod
    def open(self) -> Any: ...

    @abstractmethod
    def begin(self, raw: Any, *, write: bool, exclusive: str | None) -> None: ...

    @abstractmethod
    def in_transaction(self, raw: Any) -> bool: ...

    @abstractmethod
    def error_type(self, exc: BaseException) -> type[StoreError] | None:
        """The typed error for a driver exception, ``None`` if it is not the driver's."""

    def broken(self, raw: Any) -> bool:
        """Whether the connection can no longer be used and must be re-opened."""
        return False


def _enable_wal(raw: sqlite3.Connection) -> Any:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the lock.

    Switching a new database to WAL takes an exclusive lock, and SQLite answers "database
    is locked" at once, without its busy handler, when another opener is doing the same:
    servers starting together on one fresh file would fail. Retried up to the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_SECONDS
    delay = 0.001
    while True:
        try:
            return raw.execute("PRAGMA journal_mode=WAL").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class _SQLiteDriver(_Driver):
    dialect = SQLITE

    def open(self) -> sqlite3.Connection:
        path = self.location.path
        try:
            raw = sqlite3.connect(
                path,
                isolation_level=None,
                check_same_thread=False,
                timeout=SQLITE_BUSY_TIMEOUT_SECONDS,
            )
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"cannot open SQLite database {path}: {exc}") from None
        try:
            mode = _enable_wal(raw)
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreUnavailableError(f"{path}: SQLite refused WAL mode (got {mode})")
            raw.execute("PRAGMA synchronous=FULL")
            raw.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
        except sqlite3.Error as exc:
            raw.close()
            raise StoreUnavailableError(f"cannot open SQLite database {path}: {exc}") from None
        except BaseException:
            raw.close()
            raise
        return raw

    def begin(self, raw: Any, *, write: bool, exclusive: str | None) -> None:
        # A write transaction holds SQLite's single write lock from BEGIN: that already
        # serialises it with every other writer, named lock or not.
        raw.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def in_transaction(self, raw: Any) -> bool:
        return bool(raw.in_transaction)

    def error_type(self, exc: BaseException) -> type[StoreError] | None:
        if isinstance(exc, sqlite3.IntegrityError):
            return StoreIntegrityError
        if isinstance(exc, sqlite3.Error):
            return StoreQueryError
        return None


class _PostgresDriver(_Driver):
    dialect = POSTGRESQL

    def __init__(self, location: DatabaseLocation) -> None:
        super().__init__(location)
        import psycopg

        self._psycopg: Any = psycopg

    def open(self) -> Any:
        psycopg = self._psycopg
        try:
            params = psycopg.conninfo.conninfo_to_dict(self.location.target)
        except psycopg.Error:
            # The parser's message may quote the URL, password included.
            raise StoreLocationError(f"{self.location}: not a valid PostgreSQL URL") from None
        extra = {}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = PG_CONNECT_TIMEOUT_SECONDS
        try:
            return psycopg.connect(self.location.target, autocommit=True, **extra)
        except psycopg.Error as exc:
            raise StoreUnavailableError(
                f"cannot connect to PostgreSQL database {self.location}: {_first_line(exc)}"
            ) from None

    def begin(self, raw: Any, *, write: bool, exclusive: str | None) -> None:
        if write:
            raw.execute("BEGIN")
        else:
            # One snapshot for every statement of a read transaction, as SQLite gives.
            raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        if exclusive is not None:
            raw.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(exclusive),))

    def in_transaction(self, raw: Any) -> bool:
        status = raw.info.transaction_status
        return bool(status != self._psycopg.pq.TransactionStatus.IDLE)

    def error_type(self, exc: BaseException) -> type[StoreError] | None:
        psycopg = self._psycopg
        if isinstance(exc, psycopg.IntegrityError):
            return StoreIntegrityError
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return StoreUnavailableError
        if isinstance(exc, psycopg.Error):
            return StoreQueryError
        return None

    def broken(self, raw: Any) -> bool:
        return bool(raw.closed or raw.broken)


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a lock name."""
    digest = hashlib.sha256(b"hermetic-lock:" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Cursor:
    """A driver cursor that takes ``?`` placeholders and raises only typed errors."""

    def __init__(self, raw: Any, driver: _Driver) -> None:
        self._raw = raw
        self._driver = driver

    @contextmanager
    def _typed_errors(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            kind = self._driver.error_type(exc)
            if kind is None:
                raise
            raise kind(f"database {self._driver.location}: {_first_line(exc)}") from None

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        with self._typed_errors():
            self._raw.execute(self._driver.dialect.sql(sql), tuple(params))
        return self

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        with self._typed_errors():
            self._raw.executemany(self._driver.dialect.sql(sql), [tuple(r) for r in rows])

    def fetchone(self) -> tuple[Any, ...] | None:
        with self._typed_errors():
            row = self._raw.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        with self._typed_errors():
            return [tuple(r) for r in self._raw.fetchall()]

    @property
    def rowcount(self) -> int:
        return int(self._raw.rowcount)


class Connection:
    """One open connection; threads may share it, one statement or transaction at a time.

    Use :meth:`cursor` for single statements (each sees the latest committed state) and
    :meth:`transaction` for anything that must be atomic.
    """

    def __init__(self, driver: _Driver) -> None:
        self._driver = driver
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._closed = False
        self._raw: Any = driver.open()

    @property
    def location(self) -> DatabaseLocation:
        return self._driver.location

    @property
    def dialect(self) -> Dialect:
        return self._driver.dialect

    @contextmanager
    def _holding(self) -> Iterator[Any]:
        if self._owner == threading.get_ident():
            raise StoreQueryError(
                f"database {self.location}: this thread is already inside a statement or"
                " transaction on this connection (nested use would deadlock)"
            )
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"database {self.location}: the connection is closed")
            if self._raw is None or self._driver.broken(self._raw):
                self._reopen()
            self._owner = threading.get_ident()
            try:
                yield self._raw
            finally:
                self._owner = None

    def _reopen(self) -> None:
        """Replace a lost connection (PostgreSQL restarted, backend terminated); if that
        fails too, the error is raised now and the next use tries again."""
        if self._raw is not None:
            with contextlib.suppress(Exception):  # it is broken already: best effort
                self._raw.close()
            self._raw = None
        self._raw = self._driver.open()

    @contextmanager
    def cursor(self) -> Iterator[Cursor]:
        """A cursor for statements outside any explicit transaction (autocommit)."""
        with self._holding() as raw:
            cur = Cursor(raw.cursor(), self._driver)
            try:
                yield cur
            finally:
                cur._raw.close()

    @contextmanager
    def transaction(self, *, write: bool = True, exclusive: str | None = None) -> Iterator[Cursor]:
        """One transaction: committed when the block ends, rolled back if it raises.

        ``write=False`` gives one snapshot for every statement (PostgreSQL also refuses
        writes in it). ``exclusive`` names a lock that only
        one transaction holds at a time across every process using the database (any
        SQLite write transaction already holds the whole database's write lock).
        """
        if exclusive is not None and not _IDENTIFIER.match(exclusive):
            raise StoreQueryError(f"lock name must be a lower-case identifier, got {exclusive!r}")
        with self._holding() as raw:
            cur = Cursor(raw.cursor(), self._driver)
            try:
                with cur._typed_errors():
                    self._driver.begin(raw, write=write, exclusive=exclusive)
                yield cur
                with cur._typed_errors():
                    raw.execute("COMMIT")
            except BaseException:
                self._rollback(raw)
                raise
            finally:
                cur._raw.close()

    def _rollback(self, raw: Any) -> None:
        try:
            if self._driver.in_transaction(raw):
                raw.execute("ROLLBACK")
        except Exception:  # noqa: S110 - the original error is what the caller needs
            pass

    def close(self) -> None:
        """Close the connection (waiting for a statement in progress); idempotent."""
        with self._lock:
            self._closed = True
            if self._raw is not None:
                try:
                    self._raw.close()
                finally:
                    self._raw = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(location: str | Path | DatabaseLocation) -> Connection:
    """Open a connection to the database at ``location`` (see :func:`parse_location`)."""
    parsed = parse_location(location)
    driver: _Driver
    driver = _SQLiteDriver(parsed) if parsed.backend == "sqlite" else _PostgresDriver(parsed)
    return Connection(driver)
