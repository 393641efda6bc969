"""The client SDK end to end over real sockets: connect, verify, call - or refuse.

Each test runs an attested service in-process with the server glue
(:func:`hermetic.client.start_tcp_server` / :func:`serve_attested`), a real emulated NSM
and a real endorsement, and connects with :func:`hermetic.client.connect`. Every rejection
is the failing check's own error type, raised before any application byte is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import websockets

from helpers import act_as_enclave
from hermetic.channel.noise import XX
from hermetic.client import (
    ServicePolicy,
    ServiceURL,
    VerificationReport,
    connect,
    connect_sync,
    dispatch_handlers,
    serve_attested,
    serve_attested_websocket,
    start_tcp_server,
)
from hermetic.errors import (
    CertificateValidityError,
    CosignatureThresholdError,
    DebugModeError,
    InclusionProofError,
    NonceMismatchError,
    PeerUnavailableError,
    PublicKeyMismatchError,
    ReleaseNotAcceptedError,
    ReleasePCRMismatchError,
    ServiceNotAcceptedError,
    ServiceURLError,
    UnknownPublisherError,
    UntrustedRootError,
)
from hermetic.nsm import DevPKI
from test_client_stack import CONFIG_DIGEST, PCRS, SERVICE, STRICT, VERSION, Stack, build_stack
from test_client_stack import pcr as make_pcr

Provider = Callable[[bytes, bytes], bytes]


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return build_stack(tmp_path / "stack")


def handlers(calls: list[Any] | None = None) -> dict[str, Any]:
    async def echo(args: Any) -> Any:
        if calls is not None:
            calls.append(args)
        return args

    return {"echo": echo}


@contextlib.asynccontextmanager
async def tcp_service(provider: Provider, calls: list[Any] | None = None) -> AsyncIterator[str]:
    server = await start_tcp_server("127.0.0.1", 0, provider, handlers(calls))
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def test_connect_and_call_over_tcp_reports_the_verified_release(stack: Stack) -> None:
    async with tcp_service(stack.provider()) as url:
        session = await connect(url, trust=stack.fresh_trust(), policy=STRICT)
        async with session:
            assert await session.call("echo", {"hello": [1, 2]}) == {"hello": [1, 2]}
            verified = session.verified
            assert (verified.service, verified.release) == (SERVICE, VERSION)
            assert verified.log_index == stack.endorsement.index
            assert verified.config_digest == CONFIG_DIGEST
            assert verified.pcrs[0] == PCRS[0]
            assert verified.debug is False
            assert session.verified.to_json() == {
                "debug": False,
                "service": SERVICE,
                "release": VERSION,
                "pcrs": {str(i): PCRS[i].hex() for i in (0, 1, 2, 8)},
                "log_index": stack.endorsement.index,
                "config_digest": CONFIG_DIGEST.hex(),
            }
            assert all(check.ok for check in session.report.checks)


async def test_each_session_gets_a_fresh_document_bound_to_its_handshake(stack: Stack) -> None:
    seen: list[bytes] = []
    inner = stack.provider()

    def provider(handshake_hash: bytes, static: bytes) -> bytes:
        seen.append(handshake_hash)
        return inner(handshake_hash, static)

    trust = stack.fresh_trust()
    async with tcp_service(provider) as url:
        for _ in range(3):
            async with await connect(url, trust=trust, policy=STRICT) as session:
                assert await session.call("echo", "x") == "x"
                assert session.handshake_hash == seen[-1]
    assert len(set(seen)) == 3


@pytest.mark.parametrize("transport", ["unix", "ws", "vsock"])
async def test_connect_over_unix_websocket_and_emulated_vsock(
    stack: Stack, transport: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = stack.provider()
    if transport == "unix":
        path = tmp_path / "svc.sock"

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await serve_attested(reader, writer, provider, handlers())

        server = await asyncio.start_unix_server(on_client, str(path))
        async with server:
            await _roundtrip(f"unix://{path}", stack)
    elif transport == "ws":

        async def on_ws(websocket: Any) -> None:
            await serve_attested_websocket(websocket, provider, handlers())

        async with websockets.serve(on_ws, "127.0.0.1", 0) as ws_server:
            port = next(iter(ws_server.sockets)).getsockname()[1]
            await _roundtrip(f"ws://127.0.0.1:{port}/attested", stack)
    else:
        from hermetic.transport import vsock

        monkeypatch.setenv("HERMETIC_VSOCK", "emulated")
        monkeypatch.setenv("HERMETIC_VSOCK_DIR", str(tmp_path / "vs"))
        act_as_enclave(16)

        async def on_stream(stream: vsock.VsockStream) -> None:
            await serve_attested(stream.reader, stream.writer, provider, handlers())

        listener = await vsock.listen(16, 5000, on_stream)
        async with listener:
            await _roundtrip("vsock://16:5000", stack)


async def _roundtrip(url: str, stack: Stack) -> None:
    async with await connect(url, trust=stack.fresh_trust(), policy=STRICT) as session:
        assert await session.call("echo", b"\x00bytes") == b"\x00bytes"
        assert session.verified.service == SERVICE


def test_sync_convenience_connects_and_calls(stack: Stack) -> None:
    import threading

    result: dict[str, Any] = {}
    ready = threading.Event()  # set in the server's thread, waited on in this one

    async def serve_until_done(done: asyncio.Event) -> None:
        async with tcp_service(stack.provider()) as url:
            result["url"] = url
            ready.set()
            await done.wait()

    loop = asyncio.new_event_loop()
    done = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve_until_done(done),))
    thread.start()
    try:
        assert ready.wait(60), "the service did not start"
        with connect_sync(result["url"], trust=stack.fresh_trust(), policy=STRICT) as session:
            assert session.call("echo", [1, "two"]) == [1, "two"]
            assert session.verified.service == SERVICE
    finally:
        loop.call_soon_threadsafe(done.set)
        thread.join(60)
        loop.close()


# --- rejections over real sockets: each with its own error, before any call ------------------


async def _rejected(
    stack: Stack, provider: Provider, error: type[Exception], policy: ServicePolicy = STRICT
) -> VerificationReport:
    """Connect to a service serving ``provider``'s evidence; expect ``error``, no call."""
    calls: list[Any] = []
    report = VerificationReport()
    async with tcp_service(provider, calls) as url:
        with pytest.raises(error):
            await connect(url, trust=stack.fresh_trust(), policy=policy, report=report)
    assert calls == []  # nothing reached the service
    assert report.failure is not None
    return report


async def test_rejects_document_from_an_unpinned_root(stack: Stack, tmp_path: Path) -> None:
    other = DevPKI(tmp_path / "second-state" / "dev-pki")  # a second dev PKI, another root
    await _rejected(stack, stack.provider(pki=other), UntrustedRootError)


async def test_rejects_pcr0_not_in_the_accepted_releases(stack: Stack) -> None:
    unlogged = {**PCRS, 0: make_pcr("an image nobody released")}
    await _rejected(stack, stack.provider(pcrs=unlogged), ReleasePCRMismatchError)
    policy = replace(STRICT, pcr0s=frozenset({make_pcr("the only accepted release").hex()}))
    await _rejected(stack, stack.provider(), ReleaseNotAcceptedError, policy)


async def test_rejects_debug_enclave_under_a_non_debug_policy(stack: Stack) -> None:
    await _rejected(stack, stack.provider(debug=True), DebugModeError)


async def test_accepts_debug_enclave_with_allow_debug_and_marks_the_peer(stack: Stack) -> None:
    async with tcp_service(stack.provider(debug=True)) as url:
        policy = ServicePolicy(allow_debug=True)
        async with await connect(url, trust=stack.fresh_trust(), policy=policy) as session:
            assert session.verified.debug is True
            # It sent the logged endorsement, yet claims no release from it.
            assert (session.verified.service, session.verified.release) == (None, None)
            assert await session.call("echo", 1) == 1
        # A policy that names the service is not met by a debug peer's endorsement.
        await _rejected(stack, stack.provider(debug=True), ServiceNotAcceptedError,
                        STRICT.with_debug(True))  # fmt: skip


async def test_rejects_bundle_replayed_from_another_session(stack: Stack) -> None:
    """Capture session 1's bundle, serve it in session 2: the nonce binds it to session 1."""
    inner = stack.provider()
    captured: list[bytes] = []

    def replaying(handshake_hash: bytes, static: bytes) -> bytes:
        if not captured:
            captured.append(inner(handshake_hash, static))
        return captured[0]

    trust = stack.fresh_trust()
    async with tcp_service(replaying) as url:
        async with await connect(url, trust=trust, policy=STRICT) as first:
            assert await first.call("echo", "ok") == "ok"
        with pytest.raises(NonceMismatchError):
            await connect(url, trust=trust, policy=STRICT)


async def test_rejects_document_whose_public_key_is_not_the_noise_static_key(
    stack: Stack,
) -> None:
    inner = stack.provider()

    def other_key(handshake_hash: bytes, static: bytes) -> bytes:
        return inner(handshake_hash, os.urandom(32))

    await _rejected(stack, other_key, PublicKeyMismatchError)


async def test_rejects_release_signed_by_an_unknown_publisher(stack: Stack) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    rogue = stack.log_release(stack.statement, ed25519.Ed25519PrivateKey.generate())
    await _rejected(stack, stack.provider(endorsement=rogue), UnknownPublisherError)


async def test_rejects_inclusion_proof_that_does_not_verify(stack: Stack) -> None:
    proof = list(stack.endorsement.inclusion_proof)
    proof[0] = bytes(32)
    broken = replace(stack.endorsement, inclusion_proof=tuple(proof))
    await _rejected(stack, stack.provider(endorsement=broken), InclusionProofError)


async def test_rejects_checkpoint_without_enough_witness_cosignatures(stack: Stack) -> None:
    one = stack.log_release(stack.statement, stack.publisher_key, cosigners=1)
    await _rejected(stack, stack.provider(endorsement=one), CosignatureThresholdError)


async def test_rejects_expired_document(stack: Stack) -> None:
    past = datetime.now(UTC) - timedelta(hours=4)  # the leaf certificate lives 3 h
    report = await _rejected(stack, stack.provider(clock=lambda: past), CertificateValidityError)
    assert report.failure is not None
    assert report.failure.name == "document"


# --- XX: both sides attested ------------------------------------------------------------------


async def test_xx_session_attests_both_sides(stack: Stack) -> None:
    from hermetic.channel.noise import StaticKeypair
    from hermetic.client import verify_evidence

    server_peers: list[Any] = []
    trust = stack.fresh_trust()

    def verify_client(bundle: bytes, handshake_hash: bytes, static: bytes) -> Any:
        peer = verify_evidence(bundle, handshake_hash, static, trust, STRICT)
        server_peers.append(peer)
        return peer

    provider = stack.provider()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_attested(reader, writer, provider, handlers(), protocol_name=XX,
                             verify_peer=verify_client)  # fmt: skip

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        session = await connect(
            f"tcp://127.0.0.1:{port}",
            trust=trust,
            policy=STRICT,
            protocol_name=XX,
            static=StaticKeypair.generate(),
            make_evidence=stack.provider(),
        )
        async with session:
            assert await session.call("echo", "both") == "both"
    assert server_peers[0].service == SERVICE


# --- URLs and transport failures --------------------------------------------------------------


def test_service_urls_parse_strictly() -> None:
    assert ServiceURL.parse("tcp://127.0.0.1:7000").port == 7000
    assert ServiceURL.parse("unix:///run/svc.sock").path == "/run/svc.sock"
    assert ServiceURL.parse("vsock://16:5000").host == "16"
    assert ServiceURL.parse("ws://example.test:80/x").path == "/x"
    for bad in ("http://x:1", "tcp://host", "tcp://h:1/path", "unix://host/p", "vsock://a:1",
                "tcp://h:99999", "nothing"):  # fmt: skip
        with pytest.raises(ServiceURLError):
            ServiceURL.parse(bad)


async def test_refused_connection_is_peer_unavailable(stack: Stack) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(PeerUnavailableError):
        await connect(f"tcp://127.0.0.1:{port}", trust=stack.trust)


def test_dispatch_handlers_pass_rpc_args_as_the_single_argument() -> None:
    seen: list[tuple[str, tuple[Any, ...]]] = []

    async def call(method: str, args: tuple[Any, ...]) -> Any:
        seen.append((method, args))
        return args[0]

    mapping = dispatch_handlers(call, ["echo"])
    assert asyncio.run(mapping["echo"]("hi")) == "hi"
    assert seen == [("echo", ("hi",))]
