"""Event ingestion end to end: a real ``hermetic reporting ingest`` subprocess in front of
a real record store (SQLite, the suite's PostgreSQL, or a running ``hermetic store
serve``), uploads from :func:`~hermetic.reporting.ingest.upload_batches`, and what a
device on the parent's network could send instead.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.errors import BatchConflictError, BatchTenantError, IngestServiceError
from hermetic.reporting import baseline_report, generate_tenant, seal_batch
from hermetic.reporting.aggregate import SealedBatch
from hermetic.reporting.format import Event
from hermetic.reporting.generator import SyntheticTenant
from hermetic.reporting.ingest import (
    IngestClient,
    check_upload,
    parse_record_id,
    record_id,
    upload_batches,
)
from hermetic.store.client import RecordStoreClient
from hermetic.store.records import MAX_RECORD_SIZE, RecordStore
from test_store_support import StoreServerProcess
from test_translog_service_support import PostgresServer

KEY = bytes(range(32))


class IngestServerProcess(StoreServerProcess):
    """``hermetic reporting ingest --listen 127.0.0.1:0 (--db D | --store URL)``; reads the
    URL it prints once listening (the store server's start-up and stop, another command)."""

    command = ("reporting", "ingest")
    what = "ingest"

    def __init__(self, *args: str) -> None:
        super().__init__(None, *args)


@pytest.fixture(scope="module")
def tenant() -> SyntheticTenant:
    return generate_tenant(KEY, 7, tenant="acme", events=3000, weeks=2)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "records.db")
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[IngestServerProcess]:
    with IngestServerProcess("--db", str(tmp_path / "ingest.db")) as running:
        yield running
    assert running.stop() == 0
    assert "Traceback" not in running.stderr(), running.stderr()


def stored(db: str, tenant: str) -> dict[str, bytes]:
    with RecordStore(db) as store:
        return {info.id: store.get(info.id).data for info in store.scan(f"batches/{tenant}/")}


def refusal(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == kind, body
    message = body["message"]
    assert isinstance(message, str)
    assert message
    return message


def test_upload_round_trip_into_the_store(db: str, tenant: SyntheticTenant) -> None:
    with IngestServerProcess("--db", db) as server:
        summary = upload_batches(server.url, tenant.batches)
    assert server.stop() == 0
    assert "Traceback" not in server.stderr()
    assert (summary.created, summary.already_stored) == (len(tenant.batches), 0)
    assert summary.bytes == sum(len(b.data) for b in tenant.batches)
    records = stored(db, "acme")
    assert records == {record_id("acme", b.batch_id): b.data for b in tenant.batches}
    # What the reporting service will read back is the tenant, batch for batch.
    fetched = [SealedBatch(parse_record_id(rid)[1], data) for rid, data in records.items()]
    assert baseline_report(KEY, "acme", fetched) == baseline_report(KEY, "acme", tenant.batches)


def test_upload_through_a_running_store_server(tmp_path: Path, tenant: SyntheticTenant) -> None:
    with (
        StoreServerProcess(str(tmp_path / "records.db")) as store,
        IngestServerProcess("--store", store.url) as server,
    ):
        batches = tenant.batches[:40]
        summary = upload_batches(server.url, batches, concurrency=8)
        assert summary.created == len(batches)
        with RecordStoreClient(store.url) as client:
            ids = [info.id for info in client.scan("batches/acme/")]
            assert ids == sorted(record_id("acme", b.batch_id) for b in batches)
            assert client.get(record_id("acme", batches[3].batch_id)).data == batches[3].data
        assert server.announced["store"] == store.url
    assert "Traceback" not in server.stderr()


def test_header_must_match_the_url_and_parse(
    server: IngestServerProcess, tenant: SyntheticTenant, tmp_path: Path
) -> None:
    batch = tenant.batches[0]
    hex_id = batch.batch_id.hex()
    other_id = bytes(16).hex()
    url = f"{server.url}/v1/ingest"
    schema_2 = batch.data[:4] + struct.pack(">H", 2) + batch.data[6:]
    cases = [
        (f"{url}/other/{hex_id}", batch.data, "BatchTenantError"),
        (f"{url}/acme/{other_id}", batch.data, "BatchIdError"),
        (f"{url}/acme/{hex_id}", b"not a batch at all, but long enough" * 3, "BatchFormatError"),
        (f"{url}/acme/{hex_id}", b"", "BatchFormatError"),
        (f"{url}/acme/{hex_id}", schema_2, "BatchSchemaError"),
        (f"{url}/acme/{hex_id.upper()}", batch.data, "ReportingUsageError"),
        (f"{url}/acme/{hex_id[:-2]}", batch.data, "ReportingUsageError"),
        (f"{url}/Acme/{hex_id}", batch.data, "ReportingUsageError"),
    ]
    for target, body, kind in cases:
        refusal(httpx.put(target, content=body), 400, kind)
    # A batch of one tenant replayed under another tenant's URL names the header's tenant.
    message = refusal(
        httpx.put(f"{url}/globex/{hex_id}", content=batch.data), 400, "BatchTenantError"
    )
    assert "acme" in message
    assert "globex" in message
    assert stored(str(tmp_path / "ingest.db"), "") == {}
    assert stored_ids(tmp_path) == []


def stored_ids(tmp_path: Path) -> list[str]:
    with RecordStore(str(tmp_path / "ingest.db")) as store:
        return [info.id for info in store.scan()]


def test_oversize_refused_declared_and_streamed(
    server: IngestServerProcess, tenant: SyntheticTenant, tmp_path: Path
) -> None:
    batch = tenant.batches[0]
    big = batch.data + os.urandom(MAX_RECORD_SIZE + 1 - len(batch.data))
    url = f"{server.url}/v1/ingest/acme/{batch.batch_id.hex()}"
    refusal(httpx.put(url, content=big), 413, "BatchTooLargeError")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    refusal(httpx.put(url, content=chunks()), 413, "BatchTooLargeError")
    assert stored_ids(tmp_path) == []
    # Exactly at the limit is not refused for its size (the store takes records of 1 MiB).
    at_limit = big[:MAX_RECORD_SIZE]
    response = httpx.put(url, content=at_limit)
    assert response.status_code == 201, response.text
    assert response.json()["size"] == MAX_RECORD_SIZE


def test_duplicate_identical_accepted_different_refused(
    server: IngestServerProcess, tenant: SyntheticTenant, tmp_path: Path
) -> None:
    events = [
        Event("ana@acme.example", "laptop-1", "Canva", False, 1_767_600_000 + i) for i in range(5)
    ]
    batch_id = os.urandom(16)
    first = seal_batch(KEY, "acme", batch_id, events)
    again = seal_batch(KEY, "acme", batch_id, events)  # same events, fresh nonce: other bytes
    assert first != again
    with IngestClient(server.url) as client:
        created = client.upload(first)
        assert created.created
        assert created.record_id == record_id("acme", batch_id)
        repeat = client.upload(first)
        assert not repeat.created
        assert repeat.sha256 == created.sha256
        with pytest.raises(BatchConflictError, match="already stored with other bytes"):
            client.upload(again)
    response = httpx.put(f"{server.url}/v1/ingest/acme/{batch_id.hex()}", content=again)
    refusal(response, 409, "BatchConflictError")
    assert stored(str(tmp_path / "ingest.db"), "acme") == {record_id("acme", batch_id): first}
    # A whole tenant uploaded twice: the second run stores nothing new and refuses nothing.
    upload_batches(server.url, tenant.batches[:30])
    summary = upload_batches(server.url, tenant.batches[:30])
    assert (summary.created, summary.already_stored) == (0, 30)


def test_nothing_stored_in_plaintext(tmp_path: Path, tenant: SyntheticTenant) -> None:
    db = tmp_path / "store" / "records.db"
    db.parent.mkdir()
    with IngestServerProcess("--db", str(db)) as server:
        upload_batches(server.url, tenant.batches)
    assert server.stop() == 0
    raw = b"".join(path.read_bytes() for path in sorted(db.parent.iterdir()) if path.is_file())
    assert record_id("acme", tenant.batches[0].batch_id).encode() in raw  # the search works
    names = [m.name for m in tenant.members]
    names += [device for m in tenant.members for device in m.devices]
    names += [app.name for app in tenant.apps]
    # Names of 5 bytes or more: a shorter one may occur by chance in the ciphertext.
    searched = [n.encode() for n in names if len(n.encode()) >= 5]
    assert len(searched) > 100
    assert [n for n in searched if n in raw] == []


def test_unknown_routes_and_methods_answer_json(server: IngestServerProcess) -> None:
    refusal(httpx.get(f"{server.url}/v1/ingest/acme/{bytes(16).hex()}"), 405, "MethodNotAllowed")
    refusal(httpx.put(f"{server.url}/records/x", content=b"x"), 404, "NotFound")


def test_client_errors_are_typed(tmp_path: Path, tenant: SyntheticTenant) -> None:
    with pytest.raises(IngestServiceError, match="ConnectError"):
        upload_batches("http://127.0.0.1:9", tenant.batches[:1])
    # A tenant's batch sealed for another tenant's URL cannot be sent by the client at all
    # (it takes the URL from the header); the check itself refuses the pairing.
    with pytest.raises(BatchTenantError):
        check_upload("globex", tenant.batches[0].batch_id.hex(), tenant.batches[0].data)


def test_store_down_is_503_and_typed(tmp_path: Path, tenant: SyntheticTenant) -> None:
    store = StoreServerProcess(str(tmp_path / "records.db")).start()
    with IngestServerProcess("--store", store.url) as server:
        upload_batches(server.url, tenant.batches[:1])
        store.stop()
        batch = tenant.batches[1]
        response = httpx.put(
            f"{server.url}/v1/ingest/acme/{batch.batch_id.hex()}", content=batch.data
        )
        refusal(response, 503, "RecordServiceError")
        with pytest.raises(IngestServiceError, match="HTTP 503 RecordServiceError"):
            upload_batches(server.url, [batch])
    assert "Traceback" not in server.stderr()


def _race(url: str, bodies: list[bytes]) -> list[tuple[int, bytes]]:
    """PUT each body to ``url`` from its own thread, all released at once."""
    barrier = threading.Barrier(len(bodies))
    statuses: list[tuple[int, bytes]] = []

    def send(body: bytes) -> None:
        with httpx.Client() as client:
            barrier.wait()
            statuses.append((client.put(url, content=body).status_code, body))

    threads = [threading.Thread(target=send, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_racing_uploads_of_one_batch_id_exactly_one_wins(
    server: IngestServerProcess, tmp_path: Path
) -> None:
    events = [Event("bo@acme.example", "phone-2", "Miro", True, 1_767_700_000)]
    for _ in range(5):
        batch_id = os.urandom(16)
        contenders = [seal_batch(KEY, "acme", batch_id, events) for _ in range(4)]
        statuses = _race(f"{server.url}/v1/ingest/acme/{batch_id.hex()}", contenders)
        assert sorted(code for code, _ in statuses) == [201, 409, 409, 409]
        winner = next(body for code, body in statuses if code == 201)
        assert stored(str(tmp_path / "ingest.db"), "acme")[record_id("acme", batch_id)] == winner


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestServerProcess]:
    db = tmp_path_factory.mktemp("hostile") / "records.db"
    with IngestServerProcess("--db", str(db)) as running:
        yield running
    assert "Traceback" not in running.stderr(), running.stderr()


@settings(max_examples=150, deadline=None)
@given(
    tenant_part=st.text(min_size=1, max_size=80),
    id_part=st.text(min_size=1, max_size=40),
    body=st.binary(max_size=300),
)
def test_hostile_uploads_never_fail_the_server(
    shared_server: IngestServerProcess, tenant_part: str, id_part: str, body: bytes
) -> None:
    path = f"/v1/ingest/{quote(tenant_part, safe='')}/{quote(id_part, safe='')}"
    response = httpx.put(shared_server.url + path, content=body)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error", "message"}
