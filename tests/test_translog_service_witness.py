"""The witness and monitor daemons against real logs, including a forked one.

The fork is what a malicious log operator would do: two stores signed with the same log
key and origin, showing different trees to different audiences.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from hermetic.errors import ForkDetectedError, SplitViewError, UsageError
from hermetic.translog.checkpoint import CosignatureSigner, open_checkpoint
from hermetic.translog.client import LogClient
from hermetic.translog.daemons import Monitor, WitnessDaemon
from hermetic.translog.note import Ed25519NoteSigner, generate_key
from hermetic.translog.release import (
    GATEWAY_POLICY_V1,
    PolicyStatement,
    ReleaseStatement,
    generate_publisher_key,
    load_publisher_key,
    sign_statement,
)
from hermetic.translog.service import LogService
from hermetic.translog.store import SQLiteLogStore
from test_translog_service_support import LogServerProcess, hermetic, make_log_key

ORIGIN = "fork.example/log"


@pytest.fixture
def log_signer() -> Ed25519NoteSigner:
    return Ed25519NoteSigner.from_skey(generate_key(ORIGIN)[0])


@pytest.fixture
def witness_signer() -> CosignatureSigner:
    return CosignatureSigner.generate("w1.example")


@contextmanager
def running_log(
    path: Path, signer: Ed25519NoteSigner, witness: CosignatureSigner, entries: list[bytes]
) -> Iterator[tuple[LogService, LogClient]]:
    with SQLiteLogStore(path) as store:
        service = LogService(store, signer, witnesses=[witness.verifier])
        if entries:
            service.integrate(entries)
        with TestClient(service.app()) as http:
            yield service, LogClient("http://testserver", signer.verifier, client=http)


def honest(n: int) -> list[bytes]:
    return [f"honest {i}".encode() for i in range(n)]


def test_witness_cosigns_each_consistent_checkpoint_and_the_log_serves_it(
    tmp_path: Path, log_signer: Ed25519NoteSigner, witness_signer: CosignatureSigner
) -> None:
    state = tmp_path / "witness.json"
    with running_log(tmp_path / "a.db", log_signer, witness_signer, honest(5)) as (svc, client):
        daemon = WitnessDaemon(client, witness_signer, state)
        first = daemon.step(now=1000)
        assert (first.size, first.grew, first.stored_by_log) == (5, True, True)
        svc.integrate(honest(9)[5:])
        second = daemon.step(now=1001)
        assert (second.size, second.grew) == (9, True)
        served = client.fetch("checkpoint").decode()
        opened = open_checkpoint(served, log_signer.verifier, [witness_signer.verifier], 1)
        assert opened.size == 9
        assert json.loads(state.read_text())["size"] == 9
        assert daemon.step(now=1002).grew is False
    # A restarted witness resumes from its state file.
    with running_log(tmp_path / "a.db", log_signer, witness_signer, []) as (_, client):
        assert WitnessDaemon(client, witness_signer, state).state.last_size == 9


@pytest.mark.parametrize(
    ("fork_entries", "error", "what"),
    [
        ([b"evil 0", *honest(8)[1:]], SplitViewError, "same size, different root"),
        (
            [*honest(4), b"evil", *honest(12)[5:]],
            ForkDetectedError,
            "bigger tree, not an extension",
        ),
        ([*honest(3)[:2], b"evil"], ForkDetectedError, "smaller tree, not a prefix"),
        (honest(3), ForkDetectedError, "smaller tree: a rollback"),
    ],
)
def test_witness_refuses_a_forked_log(
    tmp_path: Path,
    log_signer: Ed25519NoteSigner,
    witness_signer: CosignatureSigner,
    fork_entries: list[bytes],
    error: type[Exception],
    what: str,
) -> None:
    state = tmp_path / "witness.json"
    with running_log(tmp_path / "a.db", log_signer, witness_signer, honest(8)) as (_, client):
        honest_root = WitnessDaemon(client, witness_signer, state).step().root
    before = state.read_bytes()
    with running_log(tmp_path / "b.db", log_signer, witness_signer, fork_entries) as (svc, client):
        fork_root = open_checkpoint(svc.store.latest_checkpoint().note, log_signer.verifier)
        with pytest.raises(error) as caught:
            WitnessDaemon(client, witness_signer, state).step()
        # Nothing was cosigned or remembered for the fork.
        assert svc.store.latest_checkpoint().cosignatures == ()
    message = str(caught.value)
    assert honest_root.hex() in message, what
    assert fork_root.root_hash.hex() in message, what
    assert state.read_bytes() == before


def test_witness_state_of_another_log_is_refused(
    tmp_path: Path, log_signer: Ed25519NoteSigner, witness_signer: CosignatureSigner
) -> None:
    state = tmp_path / "witness.json"
    state.write_text(json.dumps({"origin": "other.example/log", "size": 1, "root": "AA=="}))
    with (
        running_log(tmp_path / "a.db", log_signer, witness_signer, honest(2)) as (_, client),
        pytest.raises(UsageError, match=r"other\.example/log"),
    ):
        WitnessDaemon(client, witness_signer, state)


def _statement_entries() -> tuple[list[bytes], bytes]:
    key = load_publisher_key(generate_publisher_key())
    release_a = ReleaseStatement("svc-a", "1.0.0", "aa" * 48, "bb" * 48, "cc" * 48, None, None,
                                 "abc123", "2026-11-28T12:00:00Z")  # fmt: skip
    release_b = ReleaseStatement("svc-b", "2.0.0", "dd" * 48, "bb" * 48, "cc" * 48, None, None,
                                 None, "2026-11-28T12:00:00Z")  # fmt: skip
    policy = PolicyStatement(GATEWAY_POLICY_V1, "svc-a", "ee" * 32, "7", "2026-11-28T12:00:00Z")
    entries = [sign_statement(s, key).entry() for s in (release_a, release_b, policy)]
    return entries, b"not a statement"


def test_monitor_reports_only_statements_for_watched_services(
    tmp_path: Path, log_signer: Ed25519NoteSigner, witness_signer: CosignatureSigner
) -> None:
    entries, junk = _statement_entries()
    state = tmp_path / "monitor.json"
    with running_log(tmp_path / "a.db", log_signer, witness_signer, [junk, *entries[:2]]) as (
        svc,
        client,
    ):
        monitor = Monitor(client, ["svc-a"], state)
        junk_event, *events = monitor.step()
        # The junk entry is not a statement: a finding for every watcher, not a silent skip.
        assert (junk_event.kind, junk_event.index) == ("malformed", 0)
        assert [(e.index, e.detail["statement"]["service"]) for e in events] == [(1, "svc-a")]
        assert events[0].detail["signature_valid"] is True
        svc.integrate(entries[2:])
        later = Monitor(client, ["svc-a"], state).step()  # resumes from the state file
        assert [(e.index, e.detail["statement"]["type"]) for e in later] == [(3, GATEWAY_POLICY_V1)]
        everything = Monitor(client, ["*"], None).step()
        assert [(e.kind, e.index) for e in everything] == [
            ("malformed", 0), ("statement", 1), ("statement", 2), ("statement", 3),
        ]  # fmt: skip


def test_monitor_detects_an_inconsistent_checkpoint(
    tmp_path: Path, log_signer: Ed25519NoteSigner, witness_signer: CosignatureSigner
) -> None:
    state = tmp_path / "monitor.json"
    with running_log(tmp_path / "a.db", log_signer, witness_signer, honest(6)) as (_, client):
        Monitor(client, ["*"], state).step()
    with (
        running_log(tmp_path / "b.db", log_signer, witness_signer, [b"x", *honest(9)[1:]]) as (
            _,
            client,
        ),
        pytest.raises(ForkDetectedError, match="not consistent"),
    ):
        Monitor(client, ["*"], state).step()


@pytest.mark.slow
def test_witness_cli_cosigns_then_exits_nonzero_on_a_fork(tmp_path: Path) -> None:
    keys = make_log_key(tmp_path, ORIGIN)
    wkey = tmp_path / "w.skey"
    wvkey = hermetic("log", "witness-key", "--out", str(wkey), "--name", "w1.example").stdout
    state = tmp_path / "w.json"
    signer = Ed25519NoteSigner.from_skey(keys.skey_file.read_text().strip())
    roots = []
    for name, entries in (("a.db", honest(4)), ("b.db", [b"evil", *honest(4)[1:]])):
        with SQLiteLogStore(tmp_path / name) as store:
            note = LogService(store, signer).integrate(entries).checkpoint.note
            roots.append(open_checkpoint(note, signer.verifier).root_hash.hex())
    args = ["--log-key", keys.vkey, "--key", str(wkey), "--state", str(state), "--once"]
    with LogServerProcess(str(tmp_path / "a.db"), keys, "--witness", wvkey.strip()) as server:
        ok = hermetic("log", "witness", "--log", server.url, *args)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["stored_by_log"] is True
    with LogServerProcess(str(tmp_path / "b.db"), keys) as server:
        refused = hermetic("log", "witness", "--log", server.url, *args)
    assert refused.returncode == 1
    assert "SplitViewError" in refused.stderr
    assert roots[0] in refused.stderr
    assert roots[1] in refused.stderr
    assert "Traceback" not in refused.stderr
