"""The record store core on SQLite and on a real PostgreSQL server the suite starts.

The PostgreSQL databases here use an ICU ``en-US`` collation on purpose: under it ``'a' <
'B'``, so a listing that relied on the database's default text order (instead of byte
order) would come out differently from SQLite's, and prefix ranges would miss records.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.errors import (
    RecordIdError,
    RecordNotFoundError,
    RecordTooLargeError,
    RecordVersionError,
    VersionConflictError,
)
from hermetic.store.records import (
    MAX_ID_LENGTH,
    MAX_LIST_LIMIT,
    MAX_RECORD_SIZE,
    MAX_VERSION,
    RecordStore,
    check_id,
    etag,
    expected_version_from_headers,
    version_from_etag,
)
from test_translog_service_support import PostgresServer

Opener = Callable[[], RecordStore]


def icu_database(server: PostgresServer) -> str:
    """A fresh database whose default collation is not byte order."""
    import psycopg

    name = f"r_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(
            f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu'
            " ICU_LOCALE 'en-US' LOCALE 'C'"
        )
    return server.dsn(name)


@pytest.fixture(params=["sqlite", "postgres"])
def open_records(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens (and re-opens) one empty record store; every store opened is closed after."""
    if request.param == "sqlite":
        location = str(tmp_path / "records.db")
    else:
        location = icu_database(request.getfixturevalue("postgres"))
    opened: list[RecordStore] = []

    def opener() -> RecordStore:
        store = RecordStore(location)
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


def test_put_creates_then_compare_and_sets(open_records: Opener) -> None:
    store = open_records()
    assert store.put("tenant/a", b"sealed-1", None) == 1
    assert store.put("tenant/a", b"sealed-2", 1) == 2
    record = store.get("tenant/a")
    assert (record.id, record.version, record.data) == ("tenant/a", 2, b"sealed-2")
    assert "sealed" not in repr(record)


def test_a_stale_writer_is_refused_and_told_the_current_version(open_records: Opener) -> None:
    store = open_records()
    store.put("k", b"one", None)
    store.put("k", b"two", 1)
    with pytest.raises(VersionConflictError, match="expected version 1, found version 2") as got:
        store.put("k", b"stale", 1)
    assert got.value.current == 2
    with pytest.raises(VersionConflictError, match="expected absent, found version 2") as got:
        store.put("k", b"again", None)
    assert got.value.current == 2
    with pytest.raises(VersionConflictError, match="found absent") as got:
        store.put("missing", b"x", 1)
    assert got.value.current is None
    assert store.get("k").data == b"two"
    with pytest.raises(RecordNotFoundError, match="'missing'"):
        store.get("missing")


def test_delete_needs_the_current_version_and_versions_keep_counting(open_records: Opener) -> None:
    store = open_records()
    store.put("k", b"v1", None)
    store.put("k", b"v2", 1)
    with pytest.raises(VersionConflictError):
        store.delete("k", 1)
    store.delete("k", 2)
    with pytest.raises(RecordNotFoundError):
        store.get("k")
    with pytest.raises(VersionConflictError) as got:
        store.delete("k", 2)
    assert got.value.current is None
    # A writer that read version 2 before the delete cannot touch the re-created record.
    assert store.put("k", b"reborn", None) == 4
    with pytest.raises(VersionConflictError):
        store.put("k", b"from before the delete", 2)
    assert store.get("k").data == b"reborn"
    with pytest.raises(RecordVersionError, match="needs the version"):
        store.delete("k", None)  # type: ignore[arg-type]


def test_list_by_prefix_in_byte_order_with_sizes_versions_and_digests(
    open_records: Opener,
) -> None:
    store = open_records()
    for name in ("a/b", "a/B", "a/a", "a/A", "a", "ab", "a/", "b/x", "a/~", "a/!"):
        store.put(name, name.encode() * 3, None)
    store.put("a/a", b"longer now", 1)
    store.put("a/gone", b"x", None)
    store.delete("a/gone", 1)
    page = store.list("a/")
    assert [r.id for r in page.records] == ["a/", "a/!", "a/A", "a/B", "a/a", "a/b", "a/~"]
    assert page.next_after is None
    info = {r.id: r for r in page.records}
    assert (info["a/a"].version, info["a/a"].size) == (2, 10)
    assert info["a/a"].sha256 == hashlib.sha256(b"longer now").digest()
    assert info["a/B"].to_json() == {
        "id": "a/B",
        "version": 1,
        "size": 9,
        "sha256": hashlib.sha256(b"a/Ba/Ba/B").hexdigest(),
    }
    assert [r.id for r in store.list().records] == [
        "a", "a/", "a/!", "a/A", "a/B", "a/a", "a/b", "a/~", "ab", "b/x",
    ]  # fmt: skip
    assert store.list("zzz").records == ()


def test_listing_pages_through_everything_once(open_records: Opener) -> None:
    store = open_records()
    names = [f"p/{i:04d}" for i in range(25)] + ["q/0"]
    for name in names:
        store.put(name, b"x", None)
    seen: list[str] = []
    after = None
    while True:
        page = store.list("p/", after=after, limit=7)
        seen += [r.id for r in page.records]
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == names[:25]
    assert [r.id for r in store.scan("p/")] == names[:25]
    assert [r.id for r in store.list("p/", after="p/0023").records] == ["p/0024"]
    assert [r.id for r in store.list("p/", after="a").records][:1] == ["p/0000"]
    with pytest.raises(RecordIdError, match="limit"):
        store.list(limit=0)
    with pytest.raises(RecordIdError, match="limit"):
        store.list(limit=MAX_LIST_LIMIT + 1)


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("", "got none"),
        ("x" * (MAX_ID_LENGTH + 1), f"at most {MAX_ID_LENGTH}"),
        ("has space", "' ' at position 3"),
        ("tab\there", "position 3"),
        ("caf\u00e9", "position 3"),
        ("nul\x00", "position 3"),
        ("del\x7f", "position 3"),
        (".", "path segments"),
        ("a/../b", "path segments"),
        ("a/.", "path segments"),
    ],
)
def test_rejects_bad_ids_and_writes_nothing(open_records: Opener, bad: str, named: str) -> None:
    store = open_records()
    with pytest.raises(RecordIdError, match=named):
        store.put(bad, b"x", None)
    with pytest.raises(RecordIdError):
        store.get(bad)
    assert store.list().records == ()


def test_accepts_every_printable_ascii_character_in_ids(open_records: Opener) -> None:
    store = open_records()
    every = "".join(chr(c) for c in range(0x21, 0x7F))
    assert store.put(every, b"x", None) == 1
    assert store.put("x" * MAX_ID_LENGTH, b"", None) == 1
    assert store.get(every).data == b"x"
    assert store.get("x" * MAX_ID_LENGTH).data == b""


def test_rejects_oversized_data_and_bad_versions(open_records: Opener) -> None:
    store = open_records()
    assert store.put("big", b"\x00" * MAX_RECORD_SIZE, None) == 1
    with pytest.raises(RecordTooLargeError, match=f"at most {MAX_RECORD_SIZE} bytes, got"):
        store.put("bigger", b"\x00" * (MAX_RECORD_SIZE + 1), None)
    with pytest.raises(RecordTooLargeError, match="expected bytes"):
        store.put("text", "not bytes", None)  # type: ignore[arg-type]
    for bad in (0, -1, MAX_VERSION + 1, True, "1", 1.0):
        with pytest.raises(RecordVersionError):
            store.put("big", b"x", bad)  # type: ignore[arg-type]
    assert store.get("big").version == 1
    with pytest.raises(VersionConflictError):
        store.put("big", b"x", MAX_VERSION)


def test_everything_survives_reopening(open_records: Opener) -> None:
    store = open_records()
    store.put("keep/1", b"one", None)
    store.put("keep/2", b"two", None)
    store.put("keep/2", b"two again", 1)
    store.put("keep/3", b"three", None)
    store.delete("keep/3", 1)
    store.close()
    again = open_records()
    assert [(r.id, r.version) for r in again.list().records] == [("keep/1", 1), ("keep/2", 2)]
    assert again.get("keep/2").data == b"two again"
    assert again.put("keep/3", b"back", None) == 3


def test_two_writers_with_the_same_expected_version_exactly_one_wins(
    open_records: Opener,
) -> None:
    """Two stores (as two server processes would be) race on one record, round after round."""
    first, second = open_records(), open_records()
    first.put("race", b"start", None)
    rounds = 30
    for n in range(rounds):
        expected = n + 1
        barrier = threading.Barrier(2)
        outcomes: dict[str, object] = {}

        def write(
            store: RecordStore,
            name: str,
            expected: int = expected,
            barrier: threading.Barrier = barrier,
            outcomes: dict[str, object] = outcomes,
        ) -> None:
            barrier.wait()
            try:
                outcomes[name] = store.put("race", name.encode(), expected)
            except VersionConflictError as exc:
                outcomes[name] = exc

        threads = [
            threading.Thread(target=write, args=(s, name))
            for s, name in ((first, "first"), (second, "second"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [name for name, got in outcomes.items() if got == expected + 1]
        lost = [got for got in outcomes.values() if isinstance(got, VersionConflictError)]
        assert len(won) == 1, outcomes
        assert len(lost) == 1, outcomes
        assert lost[0].current == expected + 1
        assert first.get("race").data == won[0].encode()
    assert second.get("race").version == rounds + 1


def test_no_update_is_lost_under_contention(open_records: Opener) -> None:
    """Eight threads over two stores increment one counter by read-then-CAS with retry:
    every increment lands exactly once."""
    stores = [open_records(), open_records()]
    stores[0].put("counter", b"0", None)
    per_thread = 15

    def bump(store: RecordStore) -> None:
        done = 0
        while done < per_thread:
            record = store.get("counter")
            try:
                store.put("counter", str(int(record.data) + 1).encode(), record.version)
            except VersionConflictError:
                continue
            done += 1

    threads = [threading.Thread(target=bump, args=(stores[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = stores[1].get("counter")
    assert final.data == str(8 * per_thread).encode()
    assert final.version == 8 * per_thread + 1


# --- the shared checks --------------------------------------------------------------------


def test_etags_round_trip_and_conditional_headers_parse() -> None:
    assert version_from_etag(etag(7)) == 7
    assert expected_version_from_headers(['"12"'], []) == 12
    assert expected_version_from_headers([], ["*"]) is None
    for if_match, if_none_match, named in (
        ([], [], "needs If-Match"),
        (['"1"'], ["*"], "got both"),
        (['"1"', '"2"'], [], "several"),
        (["*"], [], "any version"),
        (['W/"1"'], [], "weak"),
        (["1"], [], "quoted"),
        (['"01"'], [], "quoted"),
        (['"0"'], [], "1.."),
        ([f'"{MAX_VERSION + 1}"'], [], "version 1.."),
        (['"1", "2"'], [], "quoted"),
        ([], ['"1"'], "expected \\*"),
    ):
        with pytest.raises(RecordVersionError, match=named):
            expected_version_from_headers(if_match, if_none_match)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30))
def test_any_header_text_parses_to_a_version_or_a_typed_error(
    if_match: str, if_none_match: str
) -> None:
    try:
        got = expected_version_from_headers([if_match], [])
    except RecordVersionError:
        pass
    else:
        assert got is not None
        assert 1 <= got <= MAX_VERSION
        assert etag(got) == if_match.strip()
    try:
        none = expected_version_from_headers([], [if_none_match])
    except RecordVersionError:
        assert if_none_match.strip() != "*"
    else:
        assert none is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=MAX_ID_LENGTH + 4))
def test_any_text_is_an_id_by_the_rules_or_a_typed_error(text: str) -> None:
    try:
        got = check_id(text)
    except RecordIdError:
        return
    assert got == text
    assert 1 <= len(text) <= MAX_ID_LENGTH
    assert all(0x21 <= ord(c) <= 0x7E for c in text)
    assert "." not in text.split("/")
    assert ".." not in text.split("/")
