"""Rollback detection through the log (issue 10 item 5, acceptance 3), on real parts.

The log is a real ``hermetic log serve`` with a real ``hermetic log witness`` cosigning it
(every 0.2 s), the record store a real ``hermetic store serve`` on SQLite (PostgreSQL for
the attacks when the suite's server can start), and the anchor is driven directly, as the
persistence service will drive it. Every attack is what a host can do: edit the database
under the running store server, restore an older copy of it, or serve an older copy of
the log.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from helpers import hermetic, stop_process
from hermetic.cbor import canonical_dumps, strict_loads
from hermetic.errors import (
    AnchorError,
    AnchorTimeoutError,
    PersistenceUsageError,
    RecordNotFoundError,
    StaleCheckpointError,
    StateKeyMismatchError,
    StateRecordError,
    StoreRollbackError,
    StoreStateMismatchError,
    VersionConflictError,
)
from hermetic.persistence.anchor import (
    AnchoredStore,
    AnchorMode,
    RecordStoreLike,
    StateTree,
    leaf_entry,
    state_signing_key,
)
from hermetic.persistence.keys import RootKey
from hermetic.persistence.service import AnchorSchedule
from hermetic.store.client import RecordStoreClient
from hermetic.store.records import Record, RecordInfo
from hermetic.translog.client import LogClient
from hermetic.translog.daemons import Monitor
from hermetic.translog.merkle import EMPTY_ROOT, MemoryTree
from hermetic.translog.note import parse_vkey
from hermetic.translog.release import StateStatement, sign_statement
from test_store_support import StoreServerProcess
from test_translog_service_support import LogKeys, LogServerProcess, make_log_key

MAX_AGE = 120


# --- the real log, witness and store -------------------------------------------------------


@dataclass
class Stack:
    keys: LogKeys
    witness_vkey: str
    log: LogServerProcess
    log_db: Path
    directory: Path

    def client(self, url: str | None = None) -> LogClient:
        return LogClient(
            url or self.log.url,
            parse_vkey(self.keys.vkey),
            [parse_vkey(self.witness_vkey)],
            threshold=1,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("anchor-log")
    keys = make_log_key(directory, "anchor.test/log")
    witness_key = directory / "witness.skey"
    witness_vkey = hermetic(
        "log", "witness-key", "--out", witness_key, "--name", "w1.anchor.test", check=True
    ).stdout.strip()
    log_db = directory / "log.db"
    log = LogServerProcess(str(log_db), keys, "--witness", witness_vkey).start()
    witness = subprocess.Popen(
        [sys.executable, "-m", "hermetic", "log", "witness", "--log", log.url,
         "--log-key", keys.vkey, "--key", str(witness_key),
         "--state", str(directory / "witness.json"), "--interval", "0.2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ready = Stack(keys, witness_vkey, log, log_db, directory)
        with ready.client() as client:  # a first witnessed checkpoint, before any boot
            client.add(b"log started")
            _wait_for(lambda: client.witnessed_checkpoint(1))
        yield ready
    finally:
        stop_process(witness)
        log.stop()


class SQLiteHost:
    """The host's hand on the record store's SQLite file, under the running server."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def row(self, record_id: str) -> tuple[Any, ...]:
        with self._db() as db:
            return tuple(
                db.execute(
                    "SELECT version, data, size, sha256 FROM records WHERE id = ?", (record_id,)
                ).fetchone()
            )

    def set_row(self, record_id: str, row: tuple[Any, ...]) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE records SET version = ?, data = ?, size = ?, sha256 = ? WHERE id = ?",
                (*row, record_id),
            )

    def snapshot(self) -> Path:
        copy = self.path.with_name(f"snapshot-{time.monotonic_ns()}.db")
        with self._db() as live, sqlite3.connect(copy) as target:
            live.backup(target)
        return copy

    def restore(self, snapshot: Path) -> None:
        with sqlite3.connect(snapshot) as old, self._db() as live:
            old.backup(live)


class PostgresHost:
    """The same hand on a PostgreSQL record store."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as db:
            cur = db.execute(sql, args)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []

    def row(self, record_id: str) -> tuple[Any, ...]:
        (row,) = self._run(
            "SELECT version, data, size, sha256 FROM records WHERE id = %s", (record_id,)
        )
        return tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)

    def set_row(self, record_id: str, row: tuple[Any, ...]) -> None:
        self._run(
            "UPDATE records SET version = %s, data = %s, size = %s, sha256 = %s WHERE id = %s",
            (*row, record_id),
        )

    def snapshot(self) -> list[tuple[Any, ...]]:
        return self._run("SELECT id, version, data, size, sha256 FROM records")

    def restore(self, snapshot: list[tuple[Any, ...]]) -> None:
        import psycopg

        with psycopg.connect(self.dsn) as db, db.transaction():
            db.execute("DELETE FROM records")
            for row in snapshot:
                db.execute(
                    "INSERT INTO records (id, version, data, size, sha256)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    row,
                )


@dataclass
class Deployment:
    """One persistence deployment: a store id, its root key, its record store."""

    stack: Stack
    store_id: str
    root: RootKey
    server: StoreServerProcess
    host: SQLiteHost | PostgresHost
    clients: list[Any]

    def store(self) -> RecordStoreClient:
        client = RecordStoreClient(self.server.url, transport=None)
        self.clients.append(client)
        return client

    def log(self, url: str | None = None) -> LogClient:
        client = self.stack.client(url)
        self.clients.append(client)
        return client

    def open(
        self,
        *,
        root: RootKey | None = None,
        log: LogClient | None = None,
        store: RecordStoreLike | None = None,
        clock: Callable[[], float] = time.time,
        max_age: int = MAX_AGE,
        mode: AnchorMode = "deferred",
    ) -> AnchoredStore:
        return AnchoredStore.open(
            store or self.store(),
            root or self.root,
            self.store_id,
            log or self.log(),
            clock,
            max_age=max_age,
            mode=mode,
        )

    def rid(self, name: str) -> str:
        return f"{self.store_id}/{name}"


@dataclass(frozen=True)
class StoreServer:
    server: StoreServerProcess
    host: SQLiteHost | PostgresHost


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreServer]:
    """One record store server for the module; each test has its own store id in it (a
    host restoring the whole database also rolls back earlier tests' store ids, which
    nobody reads again)."""
    path = tmp_path_factory.mktemp("anchor-store") / "records.db"
    with StoreServerProcess(str(path)) as server:
        yield StoreServer(server, SQLiteHost(path))


@pytest.fixture(scope="module")
def postgres_store(postgres: Any) -> Iterator[StoreServer]:
    dsn = postgres.new_database()
    with StoreServerProcess(dsn) as server:
        yield StoreServer(server, PostgresHost(dsn))


def _deployment(stack: Stack, store: StoreServer) -> Iterator[Deployment]:
    clients: list[Any] = []
    store_id = f"store-{os.urandom(6).hex()}"
    try:
        yield Deployment(
            stack, store_id, RootKey(os.urandom(32)), store.server, store.host, clients
        )
    finally:
        for client in clients:
            client.close()


@pytest.fixture
def deployment(stack: Stack, sqlite_store: StoreServer) -> Iterator[Deployment]:
    yield from _deployment(stack, sqlite_store)


@pytest.fixture(params=["sqlite", "postgres"])
def any_deployment(request: pytest.FixtureRequest, stack: Stack) -> Iterator[Deployment]:
    store = request.getfixturevalue(f"{request.param}_store")
    yield from _deployment(stack, store)


def _filled(d: Deployment, mode: AnchorMode = "anchored") -> AnchoredStore:
    """A store after a first boot and four writes (a, b, c created, a updated), all four
    anchored by one statement, reopened in ``mode``."""
    writer = d.open()
    for name in ("a", "b", "c"):
        writer.put(d.rid(name), f"sealed {name} v1".encode(), None)
    writer.put(d.rid("a"), b"sealed a v2", 1)
    writer.anchor()
    return d.open(mode=mode)


def _expect_refused(d: Deployment, error: type[Exception], *expected: str) -> str:
    with pytest.raises(error) as caught:
        d.open()
    message = str(caught.value)
    for part in expected:
        assert part in message, message
    return message


# --- the state tree and the key -------------------------------------------------------------


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_state_tree_root_is_the_rfc9162_root_of_the_sorted_records_after_any_writes() -> None:
    rng = random.Random(7)
    tree = StateTree()
    model: dict[str, tuple[int, bytes]] = {}
    assert tree.root() == EMPTY_ROOT
    for step in range(400):
        record_id = f"s/{rng.randrange(60):03d}"
        if model and rng.random() < 0.2:
            victim = rng.choice(sorted(model))
            tree.remove(victim)
            del model[victim]
        else:
            leaf = (rng.randrange(1, 9), _sha(str(step).encode()))
            tree.set(record_id, *leaf)
            model[record_id] = leaf
        reference = MemoryTree()
        for rid in sorted(model):
            reference.append(leaf_entry(rid, *model[rid]))
        assert tree.root() == reference.root(), step
        assert tree.size == len(model)
    assert StateTree((rid, *leaf) for rid, leaf in model.items()).root() == tree.root()


def test_state_tree_leaf_binds_id_version_and_digest() -> None:
    base = StateTree([("s/a", 1, _sha(b"x")), ("s/b", 1, _sha(b"y"))]).root()
    for changed in (
        [("s/a", 2, _sha(b"x")), ("s/b", 1, _sha(b"y"))],
        [("s/a", 1, _sha(b"y")), ("s/b", 1, _sha(b"x"))],
        [("s/a", 1, _sha(b"x")), ("s/c", 1, _sha(b"y"))],
        [("s/a", 1, _sha(b"x"))],
    ):
        assert StateTree(changed).root() != base


def test_state_key_is_derived_per_root_and_store_and_never_printed() -> None:
    root = RootKey(os.urandom(32))
    key = state_signing_key(root, "store-a")
    assert key.public_raw == state_signing_key(root, "store-a").public_raw
    assert key.public_raw != state_signing_key(root, "store-b").public_raw
    assert key.public_raw != state_signing_key(RootKey(os.urandom(32)), "store-a").public_raw
    assert root.material.hex() not in repr(key)
    assert "redacted" in repr(key)
    with pytest.raises(PersistenceUsageError, match="store id"):
        state_signing_key(root, "Store A")


# --- the log keeps a quiet checkpoint's cosignature fresh ---------------------------------


def test_log_serves_the_newest_cosignature_of_a_checkpoint_that_did_not_grow(
    stack: Stack,
) -> None:
    with stack.client() as log:
        log.add(f"quiet {os.urandom(4).hex()}".encode())
        first = _wait_for(lambda: _witnessed_after(log, 0))
        newer = _wait_for(lambda: _witnessed_after(log, first.cosignatures[0].timestamp))
        assert newer.size >= first.size


def _witnessed_after(log: LogClient, after: int) -> Any:
    checkpoint = log.witnessed_checkpoint(1)
    if checkpoint is None or checkpoint.cosignatures[0].timestamp <= after:
        return None
    return checkpoint


def _wait_for(probe: Callable[[], Any], deadline: float = 90) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached before the deadline")


# --- boots and writes -------------------------------------------------------------------------


def test_first_boot_logs_a_witnessed_genesis_and_a_restart_accepts_the_same_state(
    deployment: Deployment,
) -> None:
    d = deployment
    with d.store() as raw:
        raw.put(d.rid("root-key"), b"kms ciphertext blob", None)
    anchored = d.open()
    genesis = anchored.state()
    assert (genesis.sequence, genesis.records, genesis.logged_sequence) == (0, 1, 0)
    witnessed = d.log().witnessed_checkpoint(1)
    assert witnessed is not None
    assert genesis.log_index is not None
    assert witnessed.size > genesis.log_index
    anchored.put(d.rid("t/keyring"), b"sealed keyring", None)
    anchored.anchor()
    restarted = d.open()
    assert restarted.state() == anchored.state()
    assert restarted.state().sequence == 1
    assert restarted.get(d.rid("t/keyring")).data == b"sealed keyring"
    assert restarted.records() == [d.rid("root-key"), d.rid("t/keyring")]


def test_anchored_write_is_acknowledged_only_inside_a_witnessed_checkpoint(
    deployment: Deployment,
) -> None:
    d = deployment
    anchored = d.open(mode="anchored")
    version = anchored.put(d.rid("k"), b"sealed", None)
    state = anchored.state()
    assert (version, state.sequence, state.logged_sequence) == (1, 1, 1)
    witnessed = d.log().witnessed_checkpoint(1)
    assert witnessed is not None
    assert state.log_index is not None
    assert witnessed.size > state.log_index


def test_put_refuses_an_expected_version_the_verified_state_does_not_hold(
    deployment: Deployment,
) -> None:
    d = deployment
    anchored = d.open()
    anchored.put(d.rid("k"), b"v1", None)
    with pytest.raises(VersionConflictError) as caught:
        anchored.put(d.rid("k"), b"v2", None)
    assert caught.value.current == 1
    with pytest.raises(PersistenceUsageError, match="anchor/state"):
        anchored.put(d.rid("anchor/state"), b"x", None)
    with pytest.raises(PersistenceUsageError, match="expected an id under"):
        anchored.put("elsewhere/k", b"x", None)


def test_a_write_that_never_reached_the_store_is_recovered_at_the_next_boot(
    deployment: Deployment,
) -> None:
    """A crash after the new statement was kept but before the record was written: the
    next boot finds the records one write short of an unlogged statement and goes on."""
    d = deployment
    anchored = d.open()
    anchored.put(d.rid("a"), b"a1", None)
    anchored.anchor()

    class CrashBeforeRecordWrite:
        def __init__(self, inner: RecordStoreClient) -> None:
            self.inner = inner

        def get(self, record_id: str) -> Record:
            return self.inner.get(record_id)

        def scan(self, prefix: str = "") -> Iterator[RecordInfo]:
            return self.inner.scan(prefix)

        def put(self, record_id: str, data: bytes, expected_version: int | None) -> int:
            if not record_id.endswith("/anchor/state"):
                raise ConnectionError("enclave stopped")
            return self.inner.put(record_id, data, expected_version)

    crashing = d.open(store=CrashBeforeRecordWrite(d.store()))
    with pytest.raises(ConnectionError):
        crashing.put(d.rid("b"), b"b1", None)
    restarted = d.open()
    assert restarted.records() == [d.rid("a")]
    assert restarted.state().sequence == 3  # a, the unwritten b, and the state without b
    with pytest.raises(RecordNotFoundError):
        restarted.get(d.rid("b"))


# --- acceptance 3: every host-side attack is detected, and nothing is returned ---------------


def test_detects_a_flipped_byte_at_boot_and_on_a_read(any_deployment: Deployment) -> None:
    d = any_deployment
    anchored = _filled(d)
    version, data, size, sha = d.host.row(d.rid("b"))
    flipped = bytes([data[0] ^ 0x01]) + data[1:]
    d.host.set_row(d.rid("b"), (version, flipped, size, sha))  # the listing still agrees
    with pytest.raises(StoreStateMismatchError, match="the store returned version 1") as read:
        anchored.get(d.rid("b"))
    assert "sealed b" not in str(read.value)
    state = anchored.state()
    _expect_refused(d, StoreStateMismatchError, f"sequence {state.sequence}", state.root.hex())


def test_detects_two_records_swapped(any_deployment: Deployment) -> None:
    d = any_deployment
    anchored = _filled(d)
    b, c = d.host.row(d.rid("b")), d.host.row(d.rid("c"))
    d.host.set_row(d.rid("b"), c)
    d.host.set_row(d.rid("c"), b)
    with pytest.raises(StoreStateMismatchError):
        anchored.get(d.rid("c"))
    state = anchored.state()
    _expect_refused(d, StoreStateMismatchError, f"sequence {state.sequence}", state.root.hex())


def test_detects_an_older_version_of_one_record_replayed(any_deployment: Deployment) -> None:
    d = any_deployment
    anchored = d.open(mode="anchored")
    anchored.put(d.rid("a"), b"sealed a v1", None)
    old = d.host.row(d.rid("a"))
    anchored.put(d.rid("a"), b"sealed a v2", 1)
    d.host.set_row(d.rid("a"), old)
    with pytest.raises(StoreStateMismatchError, match="an older version replayed") as read:
        anchored.get(d.rid("a"))
    assert "expects version 2" in str(read.value)
    state = anchored.state()
    _expect_refused(d, StoreStateMismatchError, f"sequence {state.sequence}", state.root.hex())


def test_detects_an_older_version_replayed_through_the_store_api(deployment: Deployment) -> None:
    d = deployment
    anchored = d.open(mode="anchored")
    anchored.put(d.rid("a"), b"sealed a v1", None)
    anchored.put(d.rid("a"), b"sealed a v2", 1)
    with d.store() as raw:
        raw.put(d.rid("a"), b"sealed a v1", 2)  # the host re-puts the old bytes: version 3
    with pytest.raises(StoreStateMismatchError, match="expects version 2"):
        anchored.get(d.rid("a"))
    _expect_refused(d, StoreStateMismatchError, f"sequence {anchored.state().sequence}")


def test_detects_the_database_restored_from_a_snapshot_taken_before_a_write(
    any_deployment: Deployment,
) -> None:
    d = any_deployment
    anchored = _filled(d)
    snapshot = d.host.snapshot()
    anchored.put(d.rid("c"), b"sealed c v2", 1)
    newest = anchored.state()
    d.host.restore(snapshot)
    message = _expect_refused(
        d, StoreRollbackError, f"sequence {newest.sequence} ", f"log index {newest.log_index}"
    )
    assert f"is at state sequence {newest.sequence - 1} " in message


def test_detects_the_state_record_deleted(deployment: Deployment) -> None:
    d = deployment
    _filled(d)
    with d.store() as raw:
        state = raw.get(d.rid("anchor/state"))
        raw.delete(d.rid("anchor/state"), state.version)
    _expect_refused(d, StoreRollbackError, "has no state record", "sequence 4 ")


def test_detects_newest_statements_withheld_by_a_log_serving_an_older_copy(
    deployment: Deployment, stack: Stack
) -> None:
    """The host keeps a copy of the log from before the newest write and shows it, with a
    copy of the database from the same moment: consistent with each other, both old. Only
    the witness cosignature's age by the trusted clock shows it."""
    d = deployment
    max_age = 2
    anchored = _filled(d)
    snapshot = d.host.snapshot()
    old_log = stack.directory / f"withheld-{d.store_id}.db"
    with sqlite3.connect(stack.log_db, timeout=30) as live, sqlite3.connect(old_log) as copy:
        live.backup(copy)
    anchored.put(d.rid("c"), b"sealed c v2", 1)
    d.host.restore(snapshot)
    stale = LogServerProcess(str(old_log), stack.keys).start()
    try:
        with d.log(stale.url) as withheld:
            cosigned = withheld.witnessed_checkpoint(1)
            assert cosigned is not None
            then = cosigned.cosignatures[0].timestamp
            # Within max_age of its cosignature the old log is indistinguishable (the
            # documented window)...
            assert d.open(log=withheld, clock=lambda: then, max_age=max_age).state().sequence == 4
            # ...once the honest witness has cosigned later than that, it is refused,
            honest = d.log()
            _wait_for(lambda: _witnessed_after(honest, then + max_age))
            with pytest.raises(StaleCheckpointError) as caught:
                d.open(log=withheld, max_age=max_age)
            message = str(caught.value)
            assert f"size {cosigned.size}" in message
            assert "withholding" in message
            assert "state record is at sequence 4 " in message
        # ...and the honest log shows the rollback.
        _expect_refused(d, StoreRollbackError, "sequence 5 ")
    finally:
        stale.stop()


def test_a_replaced_root_key_cannot_take_over_the_store(deployment: Deployment) -> None:
    """The host deleted the root-key record, so the next boot got a new root from KMS: its
    key signed neither the state record nor the store id's genesis in the log."""
    d = deployment
    _filled(d)
    other = RootKey(os.urandom(32))
    with pytest.raises(StateKeyMismatchError, match="state record"):
        d.open(root=other)
    with d.store() as raw:
        raw.delete(d.rid("anchor/state"), raw.get(d.rid("anchor/state")).version)
    with pytest.raises(StateKeyMismatchError, match="first genesis statement"):
        d.open(root=other)


def test_statements_of_other_keys_for_the_store_id_are_ignored(deployment: Deployment) -> None:
    d = deployment
    anchored = _filled(d)
    forged = StateStatement(d.store_id, 99, "00" * 32, 0, "11" * 32, "22" * 32)
    d.log().add(sign_statement(forged, ed25519.Ed25519PrivateKey.generate()).entry())
    assert d.open().state() == anchored.state()


def test_a_store_id_squatted_in_the_log_before_the_first_boot_is_refused(
    deployment: Deployment,
) -> None:
    """Anyone may append a genesis for an id nobody has anchored yet; the service then
    refuses that id (a denial of service, never a takeover: the squatter's key signs
    nothing the service accepts)."""
    d = deployment
    squat = StateStatement(d.store_id, 0, EMPTY_ROOT.hex(), 0, None, None)
    d.log().add(sign_statement(squat, ed25519.Ed25519PrivateKey.generate()).entry())
    with pytest.raises(StateKeyMismatchError, match="bound in the log to another key"):
        d.open()


# --- the deferred mode's window, pinned --------------------------------------------------------


def test_deferred_write_can_be_rolled_back_until_anchored_and_not_after(
    deployment: Deployment,
) -> None:
    d = deployment
    anchored = _filled(d, mode="deferred")
    anchored.anchor()
    before = d.host.snapshot()
    anchored.put(d.rid("c"), b"sealed c v2", 1)
    unanchored = anchored.state()
    assert unanchored.logged_sequence == unanchored.sequence - 1
    after = d.host.snapshot()
    # Inside the window: the newest write is not in the log, its rollback goes unseen.
    d.host.restore(before)
    assert d.open().state().sequence == unanchored.sequence - 1
    # Once anchored (here by the boot that saw it), the same rollback is detected.
    d.host.restore(after)
    assert d.open().anchor().sequence == unanchored.sequence
    d.host.restore(before)
    _expect_refused(d, StoreRollbackError, f"sequence {unanchored.sequence} ")


def test_every_refusal_is_an_anchor_error_without_key_material(deployment: Deployment) -> None:
    d = deployment
    anchored = _filled(d)
    d.host.set_row(d.rid("a"), d.host.row(d.rid("b")))
    with pytest.raises(AnchorError) as caught:
        d.open()
    message = str(caught.value)
    key = state_signing_key(d.root, d.store_id)
    for secret in (d.root.material, key.public_raw):
        assert secret.hex() not in message
    assert anchored.key_fingerprint in repr(key)


def test_a_writer_whose_state_another_instance_moved_checks_again_before_reading_or_writing(
    deployment: Deployment,
) -> None:
    """A restart next to a running instance: the stale one re-runs the whole check when
    the state record moved, then reads and writes on the other's state; a record the other
    changed is a version conflict, not a lost update."""
    d = deployment
    first = d.open()
    first.put(d.rid("a"), b"a1", None)
    second = d.open()
    second.put(d.rid("b"), b"b1", None)
    second.put(d.rid("a"), b"a2", 1)
    assert first.get(d.rid("a")).data == b"a2"  # re-checked on the moved state
    third = d.open()
    third.put(d.rid("d"), b"d1", None)
    first.put(d.rid("c"), b"c1", None)  # the state conflict made it check again
    with pytest.raises(VersionConflictError):
        second.put(d.rid("a"), b"a3", 1)  # second's view was stale, and a moved on
    assert d.open().records() == [d.rid("a"), d.rid("b"), d.rid("c"), d.rid("d")]


def test_a_host_edit_is_refused_even_when_the_state_record_moved(deployment: Deployment) -> None:
    """The re-check a moved state record triggers is the full check: a record the host
    edited at the same time is still refused, and nothing is returned."""
    d = deployment
    first = d.open()
    first.put(d.rid("a"), b"a1", None)
    second = d.open()
    second.put(d.rid("b"), b"b1", None)
    d.host.set_row(d.rid("a"), d.host.row(d.rid("b")))
    with pytest.raises(StoreStateMismatchError, match="do not match its state"):
        first.get(d.rid("a"))
    with pytest.raises(StoreStateMismatchError):
        first.get(d.rid("b"))


def test_an_anchored_write_the_witness_does_not_cosign_in_time_is_not_acknowledged(
    deployment: Deployment, stack: Stack, tmp_path: Path
) -> None:
    d = deployment
    keys = make_log_key(tmp_path, "unwitnessed.test/log")
    with LogServerProcess(str(tmp_path / "log.db"), keys, "--witness", stack.witness_vkey) as log:
        witness = subprocess.Popen(
            [sys.executable, "-m", "hermetic", "log", "witness", "--log", log.url,
             "--log-key", keys.vkey, "--key", str(stack.directory / "witness.skey"),
             "--state", str(tmp_path / "witness.json"), "--interval", "0.2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = LogClient(
            log.url, parse_vkey(keys.vkey), [parse_vkey(stack.witness_vkey)], threshold=1
        )
        d.clients.append(client)
        client.add(b"first entry")
        _wait_for(lambda: client.witnessed_checkpoint(1))
        try:
            anchored = AnchoredStore.open(
                d.store(), d.root, d.store_id, client, time.time,
                mode="anchored", witness_timeout=1.0,
            )  # fmt: skip
        finally:
            stop_process(witness)  # from here on nobody cosigns this log
        with pytest.raises(AnchorTimeoutError, match="not acknowledged as anchored"):
            anchored.put(d.rid("a"), b"a1", None)
        with d.store() as raw:
            assert raw.get(d.rid("a")).data == b"a1"  # stored, just not acknowledged


def test_rejects_a_state_record_whose_hint_the_host_edited(deployment: Deployment) -> None:
    """The hint says where the check starts reading the log; pointed past the newest
    statement it could hide it, so it is signed with the statement."""
    d = deployment
    _filled(d)
    with d.store() as raw:
        record = raw.get(d.rid("anchor/state"))
        value = strict_loads(record.data, what="state record", error=ValueError)
        value["hint"] = (value["hint"] or 0) + 1
        edited = canonical_dumps(value, what="state record", error=ValueError)
        raw.put(d.rid("anchor/state"), edited, record.version)
    _expect_refused(d, StateRecordError, "hint signature does not verify")


def test_the_log_monitor_reports_a_store_s_state_statements(deployment: Deployment) -> None:
    """State statements are log statements like releases: a monitor watching the store id
    sees each one, signed by the store's state key."""
    d = deployment
    anchored = _filled(d)
    events = [
        e.to_json() for e in Monitor(d.log(), [d.store_id], None).step() if e.kind == "statement"
    ]
    assert [e["statement"]["sequence"] for e in events] == [0, 4]
    assert all(e["signature_valid"] for e in events)
    assert events[-1]["statement"]["root"] == anchored.state().root.hex()
    assert {e["statement"]["type"] for e in events} == {"hermetic.persistence-state/v1"}


def test_refuses_a_log_client_that_requires_no_witness(deployment: Deployment) -> None:
    d = deployment
    unwitnessed = LogClient(d.stack.log.url, parse_vkey(d.stack.keys.vkey))
    d.clients.append(unwitnessed)
    with pytest.raises(PersistenceUsageError, match="at least one witness cosignature"):
        AnchoredStore.open(d.store(), d.root, d.store_id, unwitnessed, time.time)


# --- the service's schedule -------------------------------------------------------------------


def _settled(schedule: AnchorSchedule) -> dict[str, Any] | None:
    status = schedule.status()
    return status if status["pending_writes"] == 0 else None


def test_the_service_schedule_anchors_after_n_writes_and_on_its_timer(
    deployment: Deployment,
) -> None:
    """Deferred mode as the service runs it: the N-th write makes the thread anchor at once
    (the timer is an hour away), and with a short timer one write is anchored without any
    more; each time the statement is in a checkpoint the witness cosigned."""
    d = deployment
    by_count = AnchorSchedule(d.open(), time.time, interval=3600, writes=2)
    by_count.start()
    try:
        by_count.put(d.rid("a"), b"a1", None)
        assert by_count.status()["pending_writes"] == 1
        by_count.put(d.rid("b"), b"b1", None)
        counted = _wait_for(lambda: _settled(by_count))
    finally:
        by_count.stop()
    assert counted["logged_sequence"] == counted["sequence"] == 2
    assert counted["last_anchored"] is not None
    assert counted["last_error"] is None
    with d.log() as log:
        checkpoint = log.witnessed_checkpoint(1)
        assert checkpoint is not None
        assert checkpoint.size > counted["log_index"]

    by_timer = AnchorSchedule(d.open(), time.time, interval=0.2, writes=1000)
    by_timer.start()
    try:
        by_timer.put(d.rid("c"), b"c1", None)
        timed = _wait_for(lambda: _settled(by_timer))
    finally:
        by_timer.stop()
    assert timed["logged_sequence"] == timed["sequence"] == 3
    assert timed["mode"] == "deferred"
