"""The durable log store, on SQLite and on a real PostgreSQL server started here.

The store treats a checkpoint note as opaque text produced by the caller's signer, so these
tests sign with a deterministic text function of (size, root): what matters here is which
tree the store commits to, and that it can never commit to two.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermetic.errors import (
    CheckpointConflictError,
    EntryRejectedError,
    LogStoreError,
    TranslogError,
)
from hermetic.translog.merkle import (
    MemoryTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from hermetic.translog.store import (
    MAX_ENTRY_SIZE,
    LogStore,
    PostgresLogStore,
    SQLiteLogStore,
    open_store,
)
from test_translog_service_support import PostgresServer, postgres_server


def text_signer(size: int, root: bytes) -> str:
    return f"test.example/log\n{size}\n{root.hex()}\n\n— test.example/log AAAA\n"


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """A callable that opens (or re-opens) the same empty log database."""
    if request.param == "sqlite":
        location = str(tmp_path / "log.db")
    else:
        server: PostgresServer = request.getfixturevalue("pg")
        location = server.new_database()
    opened: list[LogStore] = []

    def factory() -> LogStore:
        store = open_store(location)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


def entries(n: int, start: int = 0) -> list[bytes]:
    return [f"entry {i}\n".encode() for i in range(start, start + n)]


def test_open_store_picks_backend_from_location(tmp_path: Path) -> None:
    with open_store(tmp_path / "x.db") as store:
        assert isinstance(store, SQLiteLogStore)
    with pytest.raises(LogStoreError):
        PostgresLogStore("postgresql://nobody@/nothing?host=/nonexistent&connect_timeout=1")


def test_batches_build_the_same_tree_as_an_in_memory_tree(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory()
    tree = MemoryTree()
    rng = random.Random(7)
    data = entries(700)
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 2, 3, 17, 64, 255, 256, 257])
        batch = data[pos : pos + n]
        result = store.integrate(batch, text_signer)
        for e in batch:
            tree.append(e)
        pos += len(batch)
        assert result.indices == tuple(range(pos - len(batch), pos))
        assert result.checkpoint.size == pos
        assert result.checkpoint.note == text_signer(pos, tree.root())
    assert store.tree_size() == 700
    for size in (1, 2, 255, 256, 257, 699, 700):
        assert root_hash(size, store.read_hash) == tree.root(size)


def test_stored_hashes_answer_inclusion_and_consistency_proofs(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory()
    data = entries(300)
    for n in range(0, 300, 37):
        store.integrate(data[n : n + 37], text_signer)
    size = store.tree_size()
    root = root_hash(size, store.read_hash)
    for index in range(size):
        proof = inclusion_proof(index, size, store.read_hash)
        verify_inclusion(leaf_hash(data[index]), index, size, proof, root)
    for old in store.checkpoint_sizes():
        proof = consistency_proof(old, size, store.read_hash)
        verify_consistency(old, size, root_hash(old, store.read_hash), root, proof)


def test_read_hashes_and_entries_return_tile_and_bundle_contents(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory()
    data = entries(300)
    store.integrate(data, text_signer)
    assert store.read_hashes(0, 256, 44) == [leaf_hash(e) for e in data[256:]]
    assert store.read_hashes(8, 0, 1) == [root_hash(256, store.read_hash)]
    assert store.read_entries(250, 50) == data[250:]
    with pytest.raises(LogStoreError, match="expected 45"):
        store.read_hashes(0, 256, 45)
    with pytest.raises(LogStoreError, match="expected 2"):
        store.read_entries(299, 2)
    with pytest.raises(LogStoreError, match="level 3, index 99"):
        store.read_hash(3, 99)


def test_identical_entries_get_their_existing_index(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory()
    store.integrate(entries(10), text_signer)
    result = store.integrate([b"new", b"entry 3\n", b"new", b"other"], text_signer)
    assert result.indices == (10, 3, 10, 11)
    assert result.duplicates == (False, True, True, False)
    assert result.checkpoint.size == 12
    assert store.find_entry(b"entry 3\n") == 3
    assert store.find_entry(b"absent") is None
    again = store.integrate([b"other"], text_signer)
    assert again.indices == (11,)
    assert again.checkpoint.size == 12  # nothing new: the published checkpoint is reused


def test_empty_batch_publishes_the_empty_tree_checkpoint_once(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory()
    assert store.latest_checkpoint() is None
    first = store.integrate([], text_signer)
    assert first.checkpoint.size == 0
    assert store.integrate([], lambda s, r: "must not be used").checkpoint == first.checkpoint


def test_a_published_size_is_never_signed_again(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory()
    store.integrate(entries(5), text_signer)
    with pytest.raises(CheckpointConflictError, match="size 5"), store._writing() as cur:
        store._insert_checkpoint(cur, 5, "another tree\n")
    assert store.checkpoint_at(5).note == text_signer(5, root_hash(5, store.read_hash))


def test_database_itself_refuses_a_second_checkpoint_for_a_size(tmp_path: Path) -> None:
    with SQLiteLogStore(tmp_path / "log.db") as store:
        store.integrate(entries(3), text_signer)
    conn = sqlite3.connect(tmp_path / "log.db")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO checkpoints (size, note) VALUES (3, 'forked')")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO entries (idx, data) VALUES (1, x'00')")
    conn.close()


def test_failing_signer_rolls_back_the_whole_batch(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory()
    store.integrate(entries(4), text_signer)

    def broken(size: int, root: bytes) -> str:
        raise TranslogError("signer unavailable")

    with pytest.raises(TranslogError, match="signer unavailable"):
        store.integrate(entries(6, start=4), broken)
    assert store.tree_size() == 4
    assert store.find_entry(b"entry 5\n") is None
    result = store.integrate(entries(6, start=4), text_signer)
    assert result.indices == tuple(range(4, 10))


def test_entries_and_checkpoints_survive_reopening(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory()
    store.integrate(entries(20), text_signer)
    note = store.latest_checkpoint().note
    store.close()
    reopened = store_factory()
    assert reopened.tree_size() == 20
    assert reopened.latest_checkpoint().note == note
    assert reopened.read_entries(0, 20) == entries(20)
    assert reopened.integrate([b"more"], text_signer).indices == (20,)


def test_rejects_entries_a_tile_bundle_cannot_carry(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory()
    with pytest.raises(EntryRejectedError, match="empty"):
        store.integrate([b""], text_signer)
    with pytest.raises(EntryRejectedError, match=str(MAX_ENTRY_SIZE + 1)):
        store.integrate([b"x" * (MAX_ENTRY_SIZE + 1)], text_signer)
    assert store.integrate([b"x" * MAX_ENTRY_SIZE], text_signer).indices == (0,)


def test_store_refuses_to_serve_another_log_identity(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory()
    store.bind_identity("a.example/log", "a.example/log+01020304+AAAA")
    store.bind_identity("a.example/log", "a.example/log+01020304+AAAA")
    with pytest.raises(LogStoreError, match="vkey"):
        store.bind_identity("a.example/log", "a.example/log+05060708+BBBB")
    with pytest.raises(LogStoreError, match="origin"):
        store.bind_identity("b.example/log", "a.example/log+01020304+AAAA")


def test_cosignatures_are_kept_once_per_witness_and_size(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory()
    store.integrate(entries(2), text_signer)
    assert store.add_cosignature(2, "w1", "— w1 AAAA\n")
    assert not store.add_cosignature(2, "w1", "— w1 BBBB\n")
    assert store.add_cosignature(2, "w0", "— w0 CCCC\n")
    cp = store.checkpoint_at(2)
    assert cp.cosignatures == ("— w0 CCCC\n", "— w1 AAAA\n")
    assert cp.text_with_cosignatures.endswith("— w0 CCCC\n— w1 AAAA\n")
    with pytest.raises(LogStoreError, match="size 7"):
        store.add_cosignature(7, "w1", "— w1 AAAA\n")
    with pytest.raises(TranslogError, match="one line"):
        store.add_cosignature(2, "w2", "— w2 A\n— w2 B\n")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=12),
    repeats=st.lists(st.integers(min_value=0, max_value=200), max_size=5),
)
def test_any_batching_and_duplicates_give_the_canonical_tree(
    tmp_path_factory: pytest.TempPathFactory, cuts: list[int], repeats: list[int]
) -> None:
    path = tmp_path_factory.mktemp("prop") / "log.db"
    total = sum(cuts)
    data = entries(total)
    tree = MemoryTree()
    with SQLiteLogStore(path) as store:
        pos = 0
        for n in cuts:
            batch = data[pos : pos + n] + [data[r % (pos + n)] for r in repeats]
            result = store.integrate(batch, text_signer)
            for e in data[pos : pos + n]:
                tree.append(e)
            pos += n
            assert result.indices[:n] == tuple(range(pos - n, pos))
            assert all(result.duplicates[n:])
        assert store.tree_size() == total
        assert root_hash(total, store.read_hash) == tree.root()


def test_two_writers_on_one_postgres_log_never_fork_it(pg: PostgresServer) -> None:
    """Two stores (as two server processes would) integrate concurrently into one database."""
    import threading

    dsn = pg.new_database()
    first, second = PostgresLogStore(dsn), PostgresLogStore(dsn)
    try:

        def write(store: LogStore, tag: str) -> None:
            for n in range(20):
                store.integrate([f"{tag} {n} {i}".encode() for i in range(5)], text_signer)

        threads = [
            threading.Thread(target=write, args=(s, t)) for s, t in ((first, "a"), (second, "b"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert first.tree_size() == 200
        sizes = first.checkpoint_sizes()
        assert sizes == sorted(set(sizes))
        for size in sizes:
            assert first.checkpoint_at(size).note == text_signer(
                size, root_hash(size, first.read_hash)
            )
    finally:
        first.close()
        second.close()


def test_log_serve_runs_on_postgresql(pg: PostgresServer, tmp_path: Path) -> None:
    from test_translog_service_support import LogServerProcess, hermetic, make_log_key

    keys = make_log_key(tmp_path)
    (tmp_path / "e").write_bytes(b"stored in postgres")
    with LogServerProcess(pg.new_database(), keys) as server:
        first = hermetic("log", "append", "--log", server.url, "--log-key", keys.vkey,
                         str(tmp_path / "e"))  # fmt: skip
        again = hermetic("log", "append", "--log", server.url, "--log-key", keys.vkey,
                         str(tmp_path / "e"))  # fmt: skip
    assert (first.returncode, first.stdout.strip()) == (0, "0"), first.stderr
    assert again.stdout.strip() == "0"
