"""The log's HTTP API, in process (starlette's test client drives the real ASGI app).

The tile and bundle bytes are compared with the tlog-tiles log that golang.org/x/mod
generated for the same 300 entries (tests/vectors/merkle/tiles-300-x-mod): that is what
"an independent tlog client can read it" means byte for byte.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from hermetic.errors import CosignatureRejectedError, CosignatureThresholdError, LogStoreError
from hermetic.translog.checkpoint import CosignatureSigner, cosign, open_checkpoint
from hermetic.translog.client import LogClient
from hermetic.translog.merkle import leaf_hash, root_hash, verify_consistency, verify_inclusion
from hermetic.translog.note import Ed25519NoteSigner, generate_key
from hermetic.translog.service import LogService, Sequencer
from hermetic.translog.store import SQLiteLogStore

ORIGIN = "example.test/log"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def signer() -> Ed25519NoteSigner:
    return Ed25519NoteSigner.from_skey(generate_key(ORIGIN)[0])


@pytest.fixture
def witness() -> CosignatureSigner:
    return CosignatureSigner.generate("w1.example")


@pytest.fixture
def service(
    tmp_path: Path, signer: Ed25519NoteSigner, witness: CosignatureSigner
) -> Iterator[LogService]:
    store = SQLiteLogStore(tmp_path / "log.db")
    yield LogService(store, signer, witnesses=[witness.verifier], max_delay=0.005)
    store.close()


@pytest.fixture
def http(service: LogService) -> Iterator[TestClient]:
    with TestClient(service.app()) as client:
        yield client


def test_empty_log_serves_a_signed_size_zero_checkpoint(
    http: TestClient, signer: Ed25519NoteSigner
) -> None:
    response = http.get("/checkpoint")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert "no-cache" in response.headers["cache-control"]
    opened = open_checkpoint(response.text, signer.verifier)
    assert (opened.origin, opened.size) == (ORIGIN, 0)


def test_tiles_and_bundles_are_byte_identical_to_x_mod(
    service: LogService, http: TestClient, vectors: Path
) -> None:
    data = vectors / "merkle" / "tiles-300-x-mod"
    service.integrate([f"entry {i}\n".encode() for i in range(300)])
    for path in ("tile/0/000", "tile/0/001.p/44", "tile/1/000.p/1",
                 "tile/entries/000", "tile/entries/001.p/44"):  # fmt: skip
        response = http.get(f"/{path}")
        assert response.status_code == 200, path
        assert response.content == (data / path).read_bytes(), path
        assert response.headers["content-type"] == "application/octet-stream"
        assert "immutable" in response.headers["cache-control"]
    expected_root = (data / "checkpoint").read_text().split("\n")[2]
    assert open_checkpoint(http.get("/checkpoint").text, service.verifier).root_hash == (
        base64.b64decode(expected_root)
    )


def test_tile_requests_outside_the_tree_or_non_canonical_are_404(
    service: LogService, http: TestClient
) -> None:
    service.integrate([f"e{i}".encode() for i in range(300)])
    assert http.get("/tile/0/001.p/44").status_code == 200
    assert http.get("/tile/0/001.p/10").status_code == 200  # an older tree's partial tile
    for path in ("tile/0/001", "tile/0/001.p/45", "tile/1/000", "tile/2/000.p/1",
                 "tile/0/1", "tile/0/x000/001", "tile/00/000", "tile/0/000.p/256",
                 "tile/entries/002.p/1", "tile/0/000.p/0"):  # fmt: skip
        assert http.get(f"/{path}").status_code == 404, path


def test_add_returns_a_proof_that_verifies_in_the_returned_checkpoint(
    http: TestClient, signer: Ed25519NoteSigner
) -> None:
    for n in range(5):
        body = http.post("/add", content=f"release {n}".encode()).json()
        assert body["index"] == n
        assert body["duplicate"] is False
        cp = open_checkpoint(body["checkpoint"], signer.verifier)
        assert cp.size == body["size"] == n + 1
        proof = [base64.b64decode(h) for h in body["inclusion_proof"]]
        verify_inclusion(leaf_hash(f"release {n}".encode()), n, cp.size, proof, cp.root_hash)
    again = http.post("/add", content=b"release 2").json()
    assert (again["index"], again["duplicate"], again["size"]) == (2, True, 5)


def test_add_rejects_empty_and_oversized_entries(http: TestClient) -> None:
    assert http.post("/add", content=b"").status_code == 400
    response = http.post("/add", content=b"x" * 65536)
    assert response.status_code == 413
    assert response.json()["error"] == "EntryRejectedError"
    assert http.get("/checkpoint").text.split("\n")[1] == "0"


def test_proof_endpoints_serve_verifiable_proofs_and_reject_bad_queries(
    service: LogService, http: TestClient
) -> None:
    entries = [f"e{i}".encode() for i in range(77)]
    service.integrate(entries[:30])
    service.integrate(entries[30:])
    roots = {n: root_hash(n, service.store.read_hash) for n in (30, 77)}
    body = http.get("/proof/inclusion", params={"index": 12, "size": 30}).json()
    proof = [base64.b64decode(h) for h in body["inclusion_proof"]]
    verify_inclusion(leaf_hash(entries[12]), 12, 30, proof, roots[30])
    body = http.get("/proof/consistency", params={"old": 30, "new": 77}).json()
    proof = [base64.b64decode(h) for h in body["consistency_proof"]]
    verify_consistency(30, 77, roots[30], roots[77], proof)
    assert http.get("/proof/consistency", params={"old": 30}).json()["new"] == 77
    for query in ({"index": 77, "size": 77}, {"index": 1, "size": 78}, {"index": "-1"},
                  {"index": "01"}, {"size": 5}, {"index": "1e3"}):  # fmt: skip
        response = http.get("/proof/inclusion", params=query)
        assert response.status_code == 400, query
        assert "message" in response.json()
    assert http.get("/proof/consistency", params={"old": 78}).status_code == 400
    assert http.get("/proof/consistency", params={"old": 50, "new": 40}).status_code == 400


def test_log_serves_verified_witness_cosignatures_with_its_checkpoint(
    service: LogService, http: TestClient, witness: CosignatureSigner
) -> None:
    service.integrate([b"a", b"b"])
    note = http.get("/checkpoint").text
    line = cosign(note, witness, 1_700_000_000)
    assert http.post("/cosignature", content=note + line).json() == {"stored": ["w1.example"]}
    served = http.get("/checkpoint").text
    assert served == note + line
    opened = open_checkpoint(served, service.verifier, [witness.verifier], 1)
    assert [c.witness for c in opened.cosignatures] == ["w1.example"]
    assert http.get("/checkpoint/witnessed", params={"min": 1}).text == served
    assert http.get("/checkpoint/witnessed", params={"min": 2}).status_code == 404


def test_log_refuses_cosignatures_it_cannot_trust(
    service: LogService, http: TestClient, witness: CosignatureSigner
) -> None:
    service.integrate([b"a"])
    note = http.get("/checkpoint").text
    stranger = CosignatureSigner.generate("w9.example")
    response = http.post("/cosignature", content=note + cosign(note, stranger, 1))
    assert response.status_code == 403
    assert "w9.example" in response.json()["message"]
    # A cosignature over a checkpoint this log never published (a forged tree head).
    forged = note.replace(note.split("\n")[2], b64(b"\x00" * 32))
    response = http.post("/cosignature", content=forged + cosign(forged, witness, 1))
    assert response.status_code == 403
    # A line that claims the witness's key but does not verify.
    good = cosign(note, witness, 5)
    bad = good[:-6] + ("A" if good[-6] != "A" else "B") + good[-5:]
    assert http.post("/cosignature", content=note + bad).status_code in (400, 403)
    assert http.post("/cosignature", content=b"\xff\xfe").status_code == 400
    assert http.get("/checkpoint").text == note
    with pytest.raises(CosignatureRejectedError):
        service.add_cosignature(note + cosign(note, stranger, 1))


def test_an_oversized_cosignature_is_refused_declared_or_streamed(
    service: LogService, http: TestClient, witness: CosignatureSigner
) -> None:
    """Past MAX_COSIGNED_SIZE the log refuses with 413 before holding the body, whether the
    length is declared or the body is streamed in chunks; nothing is stored."""
    from hermetic.translog.service import MAX_COSIGNED_SIZE

    service.integrate([b"a"])
    note = http.get("/checkpoint").text
    padded = (note + cosign(note, witness, 1)).encode() + b"\n" * MAX_COSIGNED_SIZE

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(padded), 4096):
            yield padded[i : i + 4096]

    for content in (padded, chunks()):
        response = http.post("/cosignature", content=content)
        assert response.status_code == 413
        assert response.json()["error"] == "CosignatureRejectedError"
    assert http.get("/checkpoint").text == note


def test_client_checkpoint_enforces_the_witness_threshold(
    service: LogService, http: TestClient, witness: CosignatureSigner
) -> None:
    second = CosignatureSigner.generate("w2.example")
    service.integrate([b"a"])
    client = LogClient("http://testserver", service.verifier, [witness.verifier, second.verifier],
                       2, client=http)  # fmt: skip
    note = http.get("/checkpoint").text
    http.post("/cosignature", content=note + cosign(note, witness, 10))
    with pytest.raises(CosignatureThresholdError, match="1 valid witness cosignatures"):
        client.checkpoint()
    assert client.checkpoint(threshold=1).size == 1


def test_concurrent_adds_are_grouped_into_batches(service: LogService) -> None:
    entries = [f"c{i}".encode() for i in range(200)]
    results: dict[bytes, int] = {}
    with TestClient(service.app()) as http:

        def post(chunk: list[bytes]) -> None:
            for e in chunk:
                results[e] = http.post("/add", content=e).json()["index"]

        threads = [threading.Thread(target=post, args=(entries[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = service.sequencer.batches
    assert sorted(results.values()) == list(range(200))
    assert batches < 200
    for e, index in results.items():
        assert service.store.read_entries(index, 1) == [e]


def test_tile_reader_over_http_recomputes_the_checkpoint_root(
    service: LogService, http: TestClient
) -> None:
    service.integrate([f"t{i}".encode() for i in range(70_000 // 100)])
    client = LogClient("http://testserver", service.verifier, client=http)
    cp = client.checkpoint()
    assert root_hash(cp.size, client.tile_reader(cp)) == cp.root_hash
    assert client.entries(600, 700, cp) == [f"t{i}".encode() for i in range(600, 700)]


async def test_sequencer_failure_reaches_every_waiting_add() -> None:
    def broken(entries: list[bytes]) -> object:
        raise LogStoreError("disk on fire")

    sequencer = Sequencer(broken, max_delay=0.01)  # type: ignore[arg-type]
    sequencer.start()
    import asyncio

    results = await asyncio.gather(
        *(sequencer.add(f"x{i}".encode()) for i in range(5)), return_exceptions=True
    )
    await sequencer.stop()
    assert all(isinstance(r, LogStoreError) for r in results)


def test_service_refuses_origin_other_than_key_name(
    tmp_path: Path, signer: Ed25519NoteSigner
) -> None:
    from hermetic.errors import UsageError

    with SQLiteLogStore(tmp_path / "x.db") as store, pytest.raises(UsageError, match="origin"):
        LogService(store, signer, origin="other.example/log")


def test_store_of_one_log_cannot_be_served_under_another_key(tmp_path: Path) -> None:
    first = Ed25519NoteSigner.from_skey(generate_key(ORIGIN)[0])
    second = Ed25519NoteSigner.from_skey(generate_key(ORIGIN)[0])
    with SQLiteLogStore(tmp_path / "x.db") as store:
        LogService(store, first).integrate([b"a"])
        with pytest.raises(LogStoreError, match="vkey"):
            LogService(store, second)


def test_error_bodies_are_json_with_type_and_message(http: TestClient) -> None:
    body = http.get("/proof/inclusion").json()
    assert set(body) == {"error", "message"}
    assert body["error"] == "UsageError"
    assert "index" in body["message"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.text(alphabet="0123456789x./pentris", max_size=24),
    body=st.binary(max_size=300),
    query=st.text(max_size=8),
)
def test_arbitrary_requests_get_client_errors_never_server_errors(
    service: LogService, path: str, body: bytes, query: str
) -> None:
    with TestClient(service.app(), raise_server_exceptions=True) as http:
        assert http.get(f"/tile/{path}").status_code in (200, 404)
        assert http.post("/cosignature", content=body).status_code in (400, 403)
        assert http.get("/proof/inclusion", params={"index": query}).status_code in (200, 400)
        assert http.get("/proof/consistency", params={"old": query}).status_code in (200, 400)
        assert http.get("/checkpoint/witnessed", params={"min": query}).status_code in (
            200,
            400,
            404,
        )


def test_mutated_cosignatures_are_never_stored(
    service: LogService, http: TestClient, witness: CosignatureSigner
) -> None:
    service.integrate([b"a", b"b", b"c"])
    note = http.get("/checkpoint").text
    good = note + cosign(note, witness, 77)
    for position in range(0, len(good.encode()), 2):
        mutated = bytearray(good.encode())
        mutated[position] ^= 0x01
        response = http.post("/cosignature", content=bytes(mutated))
        if response.status_code == 200:
            # Only harmless mutations can pass, and the stored line must still verify.
            served = http.get("/checkpoint").text
            open_checkpoint(served, service.verifier, [witness.verifier], 1)
        else:
            assert response.status_code in (400, 403)
    assert service.store.checkpoint_at(3).cosignatures in ((), (cosign(note, witness, 77),))
