"""The record store's HTTP API end to end: a real ``hermetic store serve`` subprocess (on
SQLite and on the suite's PostgreSQL), the httpx client, and hostile input.

Hostile input is anything a caller on the parent can send: ids, headers and queries drawn
by hypothesis, oversized bodies. The property: a 2xx, or a 4xx whose body is the API's JSON
error; never a 5xx, and no traceback in the server's log. The client is also pointed at a
server that lies, since the store is untrusted in both directions.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermetic.errors import (
    RecordIdError,
    RecordNotFoundError,
    RecordResponseFormatError,
    RecordServiceError,
    RecordTooLargeError,
    VersionConflictError,
)
from hermetic.store.client import RecordStoreClient
from hermetic.store.records import MAX_RECORD_SIZE
from test_store_support import StoreServerProcess
from test_translog_service_support import PostgresServer


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "records.db")
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreServerProcess]:
    """One server for the hostile-input tests (hypothesis sends many requests)."""
    with StoreServerProcess(str(tmp_path_factory.mktemp("hostile") / "records.db")) as server:
        yield server
    assert "Traceback" not in server.stderr(), server.stderr()


def assert_json_refusal(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body["error"], str)
    assert isinstance(body["message"], str)
    assert "Traceback" not in response.text


def test_client_round_trip_through_a_real_server(db: str) -> None:
    with StoreServerProcess(db) as server, RecordStoreClient(server.url) as client:
        assert client.health()
        assert client.put("tenant-1/root", b"\x00sealed\xff", None) == 1
        assert client.put("tenant-1/root", b"sealed v2", 1) == 2
        record = client.get("tenant-1/root")
        assert (record.version, record.data) == (2, b"sealed v2")
        with pytest.raises(VersionConflictError, match="expected version 1") as got:
            client.put("tenant-1/root", b"stale", 1)
        assert got.value.current == 2
        client.put("tenant-1/a?b#c%d+e", b"", None)  # needs percent-encoding, and empty data
        assert client.get("tenant-1/a?b#c%d+e").data == b""
        client.put("tenant-2/x", b"other tenant", None)
        page = client.list("tenant-1/")
        assert [(r.id, r.version, r.size) for r in page.records] == [
            ("tenant-1/a?b#c%d+e", 1, 0),
            ("tenant-1/root", 2, 9),
        ]
        assert page.records[1].sha256 == hashlib.sha256(b"sealed v2").digest()
        client.delete("tenant-1/root", 2)
        with pytest.raises(RecordNotFoundError):
            client.get("tenant-1/root")
        with pytest.raises(VersionConflictError) as got:
            client.delete("tenant-1/root", 2)
        assert got.value.current is None
        assert client.put("tenant-1/root", b"again", None) == 4
        assert [r.id for r in client.scan()] == [
            "tenant-1/a?b#c%d+e",
            "tenant-1/root",
            "tenant-2/x",
        ]
    assert server.stop() == 0


def test_restart_keeps_everything(db: str) -> None:
    with StoreServerProcess(db) as first, RecordStoreClient(first.url) as client:
        for n in range(20):
            client.put(f"kept/{n:02d}", f"sealed {n}".encode(), None)
        client.put("kept/07", b"sealed 7 v2", 1)
        client.delete("kept/13", 1)
    with StoreServerProcess(db) as second, RecordStoreClient(second.url) as client:
        listed = {r.id: r.version for r in client.scan("kept/")}
        assert len(listed) == 19
        assert "kept/13" not in listed
        assert listed["kept/07"] == 2
        assert client.get("kept/07").data == b"sealed 7 v2"
        assert client.get("kept/19").data == b"sealed 19"
        assert client.put("kept/13", b"back", None) == 3


def test_concurrent_writers_over_http_exactly_one_wins(db: str) -> None:
    with StoreServerProcess(db) as server:
        clients = [RecordStoreClient(server.url) for _ in range(2)]
        clients[0].put("race", b"0", None)
        for expected in range(1, 16):
            barrier = threading.Barrier(2)
            results: list[object] = []

            def write(
                client: RecordStoreClient,
                expected: int = expected,
                barrier: threading.Barrier = barrier,
                results: list[object] = results,
            ) -> None:
                barrier.wait()
                try:
                    results.append(client.put("race", b"w", expected))
                except VersionConflictError as exc:
                    results.append(exc)

            threads = [threading.Thread(target=write, args=(c,)) for c in clients]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert results.count(expected + 1) == 1, results
            conflicts = [r for r in results if isinstance(r, VersionConflictError)]
            assert [c.current for c in conflicts] == [expected + 1]
        for client in clients:
            client.close()


# --- strict input checks -------------------------------------------------------------------


def test_writes_without_a_precondition_are_refused(shared_server: StoreServerProcess) -> None:
    url = shared_server.url
    response = httpx.put(f"{url}/records/no-precondition", content=b"x")
    assert response.status_code == 428
    assert_json_refusal(response)
    assert "If-None-Match: *" in response.json()["message"]
    response = httpx.delete(f"{url}/records/no-precondition")
    assert response.status_code == 428
    assert httpx.get(f"{url}/records/no-precondition").status_code == 404


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"If-Match": "3"}, "quoted"),
        ({"If-Match": 'W/"3"'}, "weak"),
        ({"If-Match": "*"}, "any version"),
        ({"If-Match": '"-1"'}, "quoted"),
        ({"If-None-Match": '"3"'}, "expected \\*"),
        ({"If-Match": '"1"', "If-None-Match": "*"}, "both"),
    ],
)
def test_rejects_bad_version_headers_with_400(
    shared_server: StoreServerProcess, headers: dict[str, str], named: str
) -> None:
    response = httpx.put(f"{shared_server.url}/records/h", content=b"x", headers=headers)
    assert response.status_code == 400
    assert_json_refusal(response)
    assert response.json()["error"] == "RecordVersionError"
    assert named.replace("\\", "") in response.json()["message"]


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("/records/", "got none"),
        ("/records/has%20space", "' ' at position 3"),
        ("/records/caf%C3%A9", "position 3"),
        ("/records/%00", "position 0"),
        ("/records/%2E%2E", "path segments"),
        ("/records/a%2F..%2Fb", "path segments"),
        ("/records/" + "x" * 257, "at most 256"),
    ],
)
def test_rejects_bad_ids_with_400(shared_server: StoreServerProcess, path: str, named: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = httpx.request(
            method, shared_server.url + path, content=b"x", headers={"If-None-Match": "*"}
        )
        assert response.status_code == 400, (method, response.text)
        assert_json_refusal(response)
        assert response.json()["error"] == "RecordIdError"
        assert named in response.json()["message"]


def test_rejects_oversized_bodies_with_413(shared_server: StoreServerProcess) -> None:
    url = f"{shared_server.url}/records/big"
    declared = httpx.put(
        url, content=b"\x00" * (MAX_RECORD_SIZE + 1), headers={"If-None-Match": "*"}
    )
    assert declared.status_code == 413
    assert_json_refusal(declared)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count itself
        for _ in range(MAX_RECORD_SIZE // 65536 + 2):
            yield b"\x00" * 65536

    streamed = httpx.put(url, content=chunks(), headers={"If-None-Match": "*"})
    assert streamed.status_code == 413
    assert_json_refusal(streamed)
    assert httpx.get(url).status_code == 404
    exact = httpx.put(url, content=b"\x00" * MAX_RECORD_SIZE, headers={"If-None-Match": "*"})
    assert exact.status_code == 201


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("prefix=a&prefix=b", "more than once"),
        ("secret=1", "'secret'"),
        ("prefix=%FF", "printable ASCII"),
        ("after=%0A", "printable ASCII"),
    ],
)
def test_rejects_bad_list_queries_with_400(
    shared_server: StoreServerProcess, query: str, named: str
) -> None:
    response = httpx.get(f"{shared_server.url}/records?{query}")
    assert response.status_code == 400
    assert_json_refusal(response)
    assert named in response.json()["message"]


def test_unknown_routes_and_methods_answer_json(shared_server: StoreServerProcess) -> None:
    missing = httpx.get(f"{shared_server.url}/admin")
    assert missing.status_code == 404
    assert_json_refusal(missing)
    wrong = httpx.post(f"{shared_server.url}/records/x", content=b"x")
    assert wrong.status_code == 405
    assert_json_refusal(wrong)
    assert set(wrong.headers["allow"].replace(" ", "").split(",")) >= {"GET", "PUT", "DELETE"}


# What HTTP lets a header carry: visible ASCII, spaces inside, and obs-text (0x80-0xff).
_HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=40,
).map(lambda text: text.strip(" ").encode("latin-1"))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    record_id=st.text(max_size=300),
    method=st.sampled_from(["GET", "PUT", "DELETE", "HEAD"]),
    if_match=st.none() | _HEADER_TEXT,
    if_none_match=st.none() | _HEADER_TEXT,
    body=st.binary(max_size=64),
)
def test_any_id_and_headers_give_success_or_a_json_4xx(
    shared_server: StoreServerProcess,
    record_id: str,
    method: str,
    if_match: bytes | None,
    if_none_match: bytes | None,
    body: bytes,
) -> None:
    headers: dict[str, bytes] = {}
    if if_match is not None:
        headers["If-Match"] = if_match
    if if_none_match is not None:
        headers["If-None-Match"] = if_none_match
    path = "/records/" + quote(record_id.encode("utf-8", "surrogatepass"), safe="")
    response = httpx.request(
        method, shared_server.url + path, headers=headers, content=body, timeout=60
    )
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and method != "HEAD":
        assert_json_refusal(response)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    params=st.lists(
        st.tuples(st.sampled_from(["prefix", "after", "limit", "x"]), st.text(max_size=30)),
        max_size=4,
    )
)
def test_any_list_query_gives_a_listing_or_a_json_4xx(
    shared_server: StoreServerProcess, params: list[tuple[str, str]]
) -> None:
    encoded = [(k, v.encode("utf-8", "surrogatepass")) for k, v in params]
    response = httpx.get(f"{shared_server.url}/records", params=encoded, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_json_refusal(response)
    else:
        assert set(response.json()) == {"records", "next"}


# --- the client against a server that lies ------------------------------------------------


def _lying(handler: httpx.MockTransport) -> RecordStoreClient:
    return RecordStoreClient("http://store.invalid", transport=handler)


def test_client_refuses_answers_not_in_the_documented_form() -> None:
    def no_etag(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"data")

    with pytest.raises(RecordResponseFormatError, match="no ETag"):
        _lying(httpx.MockTransport(no_etag)).get("k")

    def huge(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"\x00" * (3 * MAX_RECORD_SIZE), headers={"ETag": '"1"'})

    with pytest.raises(RecordResponseFormatError, match="more than"):
        _lying(httpx.MockTransport(huge)).get("k")

    def outside(request: httpx.Request) -> httpx.Response:
        item = {"id": "other/x", "version": 1, "size": 1, "sha256": "00" * 32}
        return httpx.Response(200, json={"records": [item], "next": None})

    with pytest.raises(RecordResponseFormatError, match="outside prefix"):
        _lying(httpx.MockTransport(outside)).list("mine/")

    def wrong_digest(request: httpx.Request) -> httpx.Response:
        body = {"id": "k", "version": 1, "size": 1, "sha256": "00" * 32}
        return httpx.Response(201, json=body, headers={"ETag": '"1"'})

    with pytest.raises(RecordResponseFormatError, match="sha256"):
        _lying(httpx.MockTransport(wrong_digest)).put("k", b"x", None)

    def crash(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, content=b"<html>oops</html>")

    with pytest.raises(RecordServiceError, match="HTTP 500"):
        _lying(httpx.MockTransport(crash)).get("k")


def test_client_checks_input_before_sending_and_reports_unreachable_servers() -> None:
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    client = _lying(httpx.MockTransport(record))
    with pytest.raises(RecordIdError):
        client.put("a/../b", b"x", None)
    with pytest.raises(RecordTooLargeError):
        client.put("k", b"\x00" * (MAX_RECORD_SIZE + 1), None)
    assert sent == []
    with (
        RecordStoreClient("http://127.0.0.1:9", timeout=5) as nowhere,
        pytest.raises(RecordServiceError, match=r"127\.0\.0\.1:9"),
    ):
        nowhere.get("k")


def test_bound_socket_hands_out_connections_with_nagle_off() -> None:
    """uvicorn writes an answer's headers and body separately: with Nagle on, the body waits
    for the client's delayed ACK on every kept-alive request (``service.bind``)."""
    import socket

    from hermetic.store import service

    with (
        service.bind("127.0.0.1", 0) as server,
        socket.create_connection(server.getsockname()[:2]) as client,
    ):
        accepted, _ = server.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            client.sendall(b"x")
            assert accepted.recv(1) == b"x"
