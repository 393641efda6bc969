"""``hermetic store serve`` and ``hermetic store inspect`` as an operator runs them.

``inspect`` is the operator's window into an untrusted store: it must show what is there
(ids, versions, sizes, digests) and never a record's bytes, in any encoding.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest

from helpers import hermetic
from hermetic.store.client import RecordStoreClient
from hermetic.store.records import RecordStore
from test_store_support import StoreServerProcess
from test_translog_service_support import PostgresServer


def encodings_of(data: bytes) -> list[str]:
    """Every way the bytes could show up in text output."""
    return [
        data.decode("latin-1"),
        data.hex(),
        data.hex().upper(),
        base64.b64encode(data).decode(),
        base64.urlsafe_b64encode(data).decode(),
        base64.b64encode(data).decode().rstrip("="),
        base64.b32encode(data).decode(),
    ]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_inspect_lists_records_but_never_their_bytes(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        db = str(tmp_path / "records.db")
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        db = server.new_database()
    secrets = {
        "tenant-1/root": b"PLAINTEXT-CANARY-" + os.urandom(24),
        "tenant-1/insights/key": b"second canary " + os.urandom(40),
        "tenant-2/root": os.urandom(64),
    }
    with RecordStore(db) as store:
        for record_id, data in secrets.items():
            store.put(record_id, data, None)
        store.put("tenant-1/root", secrets["tenant-1/root"], 1)
    table = hermetic("store", "inspect", "--db", db)
    as_json = hermetic("store", "inspect", "--db", db, "--json")
    prefixed = hermetic("store", "inspect", "--db", db, "--prefix", "tenant-1/", "--json")
    for run in (table, as_json, prefixed):
        assert run.returncode == 0, run.stderr
        output = run.stdout + run.stderr
        for data in secrets.values():
            for shown in encodings_of(data):
                assert shown not in output
    listed = json.loads(as_json.stdout)
    assert listed["count"] == 3
    assert listed["bytes"] == sum(len(d) for d in secrets.values())
    assert {r["id"]: (r["version"], r["size"], r["sha256"]) for r in listed["records"]} == {
        i: (2 if i == "tenant-1/root" else 1, len(d), hashlib.sha256(d).hexdigest())
        for i, d in secrets.items()
    }
    assert [r["id"] for r in json.loads(prefixed.stdout)["records"]] == [
        "tenant-1/insights/key",
        "tenant-1/root",
    ]
    for record_id, data in secrets.items():
        line = next(x for x in table.stdout.splitlines() if x.endswith(f"  {record_id}"))
        assert hashlib.sha256(data).hexdigest()[:16] in line
        assert f" {len(data)} " in line
    assert "3 record(s)" in table.stdout


def test_serve_defaults_to_the_state_dir_and_restart_keeps_everything() -> None:
    state = Path(os.environ["HERMETIC_STATE_DIR"])
    with StoreServerProcess(None) as first:
        assert first.announced["db"] == str(state / "store" / "records.db")
        assert first.url.startswith("http://127.0.0.1:")
        with RecordStoreClient(first.url) as client:
            client.put("a", b"one", None)
            client.put("b", b"two", None)
            client.put("b", b"two v2", 1)
    assert first.stop() == 0  # SIGTERM: requests finished, database closed, clean exit
    assert (state / "store").stat().st_mode & 0o777 == 0o700
    with StoreServerProcess(None) as second, RecordStoreClient(second.url) as client:
        assert [(r.id, r.version) for r in client.scan()] == [("a", 1), ("b", 2)]
        assert client.get("b").data == b"two v2"
    listed = hermetic("store", "inspect", "--json")
    assert [r["id"] for r in json.loads(listed.stdout)["records"]] == ["a", "b"]


def test_inspect_of_a_store_that_does_not_exist_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    result = hermetic("store", "inspect", "--db", str(missing))
    assert result.returncode == 1
    assert result.stderr.startswith("hermetic: error: StoreUnavailableError: no record store at")
    assert "Traceback" not in result.stderr
    assert not missing.exists()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["serve", "--listen", "127.0.0.1"], "--listen: expected HOST:PORT"),
        (["serve", "--db", "mysql://root@db/x"], "'mysql' URL"),
        (["inspect", "--db", "sqlite://host/x"], "sqlite:///absolute/path"),
        (["inspect", "--prefix", "with space"], "--prefix: expected printable ASCII"),
    ],
)
def test_bad_options_are_one_line_usage_errors(tmp_path: Path, args: list[str], named: str) -> None:
    if args[0] == "inspect" and "--db" not in args:
        RecordStore(tmp_path / "r.db").close()
        args = [*args, "--db", str(tmp_path / "r.db")]
    result = hermetic("store", *args)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_store_appears_in_the_command_list() -> None:
    result = hermetic("--help")
    assert "store" in result.stdout
    assert "record store" in result.stdout
