"""The app framework, alone and served through the attested channel as the runtime does.

The runtime serves an :class:`App` with ``dispatch_handlers(app.call, app.methods)`` behind
``serve_attested``; these tests drive exactly that over a Unix socket with a real emulated
NSM (debug mode, so no release is needed) and the real client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hermetic.channel.noise import StaticKeypair
from hermetic.client import (
    AttestedSession,
    ServicePolicy,
    connect,
    dispatch_handlers,
    serve_attested,
)
from hermetic.enclave import App
from hermetic.errors import LauncherError, RPCError, ServiceError, UsageError
from hermetic.evidence import make_evidence_provider
from hermetic.launcher.devrelease import DevLog
from hermetic.nsm import EmulatedNSM, NSMClient


def _echo_app() -> App:
    app = App()

    @app.method("echo")
    async def echo(arg: Any) -> Any:
        return arg

    @app.method("boom")
    async def boom(arg: Any) -> None:
        raise RuntimeError("secret-value-must-not-leak")

    @app.method("refuse")
    async def refuse(arg: Any) -> None:
        raise ServiceError(f"refuse: expected nothing, got {arg!r}", code="Refused")

    return app


@pytest.fixture
async def session(tmp_path: Path) -> AsyncIterator[AttestedSession]:
    """An attested session to the echo app, served the way the runtime serves it."""
    app = _echo_app()
    nsm = NSMClient(EmulatedNSM({}, debug=True))
    provider = make_evidence_provider(nsm, None, None)
    handlers = dispatch_handlers(app.call, app.methods)
    static = StaticKeypair.generate()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_attested(reader, writer, provider, handlers, static=static)

    path = tmp_path / "s.sock"
    server = await asyncio.start_unix_server(on_client, path=str(path))
    trust = DevLog(tmp_path / "dev-log").write_trust(tmp_path / "trust.json")
    opened = await connect(
        f"unix://{path}", trust=trust, policy=ServicePolicy(allow_debug=True), timeout=60
    )
    try:
        yield opened
    finally:
        await opened.close()
        server.close()
        await server.wait_closed()


async def test_registered_method_answers_through_the_attested_channel(
    session: AttestedSession,
) -> None:
    assert session.verified.debug
    assert await session.call("echo", {"a": b"\x00"}) == {"a": b"\x00"}
    assert await session.call("echo", [1, 2]) == [1, 2]


async def test_unknown_method_is_a_typed_rpc_error(session: AttestedSession) -> None:
    with pytest.raises(RPCError) as info:
        await session.call("nope", None)
    assert info.value.code == "unknown_method"


async def test_app_exception_becomes_internal_error_without_its_message(
    session: AttestedSession,
) -> None:
    with pytest.raises(RPCError) as info:
        await session.call("boom", None)
    assert info.value.code == "internal"
    assert "secret-value" not in str(info.value)
    assert await session.call("echo", "still served") == "still served"


async def test_service_error_is_rejected_with_its_message(session: AttestedSession) -> None:
    with pytest.raises(RPCError) as info:
        await session.call("refuse", 7)
    assert info.value.code == "rejected"
    assert "refuse: expected nothing, got 7" in info.value.remote_message


async def test_app_call_of_unknown_method_raises_service_error() -> None:
    with pytest.raises(ServiceError) as info:
        await _echo_app().call("nope", ())
    assert info.value.code == "UnknownMethod"


def test_method_registered_twice_is_refused() -> None:
    app = _echo_app()
    with pytest.raises(UsageError, match="registered twice"):
        app.method("echo")(lambda: None)  # type: ignore[arg-type, return-value]


def test_context_before_boot_is_an_error() -> None:
    with pytest.raises(LauncherError, match="expected a booted enclave runtime"):
        _ = _echo_app().context


# --- the on_ready hook: work that needs the egress, which comes up after ready ------------


async def test_on_ready_result_reaches_methods_once_started() -> None:
    app = App()
    release = asyncio.Event()

    @app.on_ready
    async def boot() -> str:
        await release.wait()
        return "root key"

    assert app.start_state == "starting"
    with pytest.raises(ServiceError, match="not started") as info:
        await app.started(0.01)
    app.start()
    with pytest.raises(ServiceError, match=r"still starting after 0\.01 s") as info:
        await app.started(0.01)
    assert info.value.code == "Unavailable"
    release.set()
    assert await app.started(10) == "root key"
    assert app.start_state == "ready"


async def test_on_ready_failure_refuses_every_caller_naming_the_error() -> None:
    app = App()

    @app.on_ready
    async def boot() -> None:
        raise ServiceError("root key: KMS Decrypt failed: AccessDeniedException", "Denied")

    app.start()
    for _ in range(2):
        with pytest.raises(ServiceError) as info:
            await app.started(10)
        assert info.value.code == "Unavailable"
        assert str(info.value) == (
            "service: did not start: ServiceError: root key: KMS Decrypt failed:"
            " AccessDeniedException"
        )
    assert app.start_state == "failed"


async def test_on_ready_bug_is_reported_by_type_only() -> None:
    app = App()

    @app.on_ready
    async def boot() -> None:
        raise ValueError("secret-material-0123")

    app.start()
    with pytest.raises(ServiceError) as info:
        await app.started(10)
    assert str(info.value) == "service: did not start: ValueError"


async def test_stop_cancels_a_running_on_ready_hook() -> None:
    app = App()
    cancelled = asyncio.Event()

    @app.on_ready
    async def boot() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    app.start()
    await asyncio.sleep(0)
    await app.stop()
    assert cancelled.is_set()
    assert app.start_state == "failed"


def test_on_ready_registered_twice_is_refused() -> None:
    app = App()
    app.on_ready(_never)
    with pytest.raises(UsageError, match="on_ready: registered twice"):
        app.on_ready(_never)
    assert App().start_state == "none"


async def _never() -> None:
    await asyncio.Event().wait()


# --- Noise XX ports: the caller attests itself, the app sees who it is -------------------


def _whoami_app() -> App:
    app = App()

    @app.method("whoami")
    async def whoami(_: Any) -> Any:
        peer = app.peer
        return None if peer is None else {"service": peer.service, "version": peer.version}  # type: ignore[attr-defined]

    @app.method("session")
    async def session(_: Any) -> Any:
        info = app.session
        return None if info is None else [info.port, info.handshake_hash]

    return app


async def _xx_server(tmp_path: Path, app: App) -> tuple[asyncio.Server, str, Any]:
    """``app`` served on a Unix socket the way the runtime serves an ``xx_port``."""
    from hermetic.client import ClientTrust, verify_evidence
    from hermetic.enclave.runtime import serve_session
    from hermetic.transport.vsock import VsockAddress, VsockStream

    trust = DevLog(tmp_path / "dev-log").write_trust(tmp_path / "trust.json")
    provider = make_evidence_provider(NSMClient(EmulatedNSM({}, debug=True)), None, None)
    handlers = dispatch_handlers(app.call, app.methods)
    static = StaticKeypair.generate()
    peers = ClientTrust.load(tmp_path / "trust.json")

    def verify(bundle: bytes, h: bytes, remote_static: bytes) -> Any:
        return verify_evidence(bundle, h, remote_static, peers, ServicePolicy())

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = VsockStream(reader, writer, VsockAddress(3, 0))
        await serve_session(app, 5001, stream, provider, handlers, static, verify)

    path = tmp_path / "xx.sock"
    server = await asyncio.start_unix_server(on_client, path=str(path))
    return server, f"unix://{path}", trust


def _caller_evidence(tmp_path: Path, logged: bool) -> Any:
    """A caller attesting chosen PCRs with an emulated NSM; ``logged``: with a release of
    them in the dev log, else with no endorsement at all."""
    import hashlib

    from hermetic.image.pcrs import Measurements

    pcrs = {n: hashlib.sha384(f"caller {n}".encode()).digest() for n in (0, 1, 2)}
    endorsement = None
    if logged:
        measured = Measurements("hermetic", pcrs[0], pcrs[1], pcrs[2], None, "caller", "2.0.0")
        endorsement = DevLog(tmp_path / "dev-log").publish(measured)
    return make_evidence_provider(NSMClient(EmulatedNSM(pcrs)), endorsement, None)


async def test_an_xx_port_shows_the_app_the_callers_verified_release(tmp_path: Path) -> None:
    from hermetic.channel.noise import XX

    app = _whoami_app()
    server, url, trust = await _xx_server(tmp_path, app)
    try:
        async with await connect(
            url, trust=trust, policy=ServicePolicy(allow_debug=True), protocol_name=XX,
            static=StaticKeypair.generate(), make_evidence=_caller_evidence(tmp_path, True),
            timeout=60,
        ) as session:  # fmt: skip
            assert await session.call("whoami") == {"service": "caller", "version": "2.0.0"}
            # Each call sees its own session: the port and this session's handshake hash.
            assert await session.call("session") == [5001, session.handshake_hash]
        assert app.peer is None  # the peer is the session's, not the app's
        assert app.session is None
    finally:
        server.close()
        await server.wait_closed()


async def test_an_xx_port_drops_a_caller_that_proves_no_logged_release(tmp_path: Path) -> None:
    from hermetic.channel.noise import XX
    from hermetic.errors import HermeticError

    app = _whoami_app()
    called: list[object] = []

    @app.method("record")
    async def record(arg: Any) -> None:
        called.append(arg)

    server, url, trust = await _xx_server(tmp_path, app)
    try:
        with pytest.raises(HermeticError):
            async with await connect(
                url, trust=trust, policy=ServicePolicy(allow_debug=True), protocol_name=XX,
                static=StaticKeypair.generate(), make_evidence=_caller_evidence(tmp_path, False),
                timeout=60,
            ) as session:  # fmt: skip
                await session.call("record", "should never run")
        assert called == []
    finally:
        server.close()
        await server.wait_closed()


async def test_an_nx_call_sees_no_peer(session: AttestedSession) -> None:
    app = _whoami_app()
    assert await app.call("whoami", (None,)) is None


def test_xx_port_outside_the_manifest_refuses_to_start() -> None:
    from typing import cast

    from hermetic.enclave.app import EnclaveContext
    from hermetic.enclave.manifest import load_manifest
    from hermetic.enclave.runtime import peer_verifiers
    from hermetic.errors import EnclaveBootError

    app = App()
    app.xx_port(6000)(lambda context: None)  # type: ignore[arg-type,return-value]
    manifest = load_manifest(Path(__file__).resolve().parents[1] / "examples" / "echo")
    with pytest.raises(EnclaveBootError, match=r"xx_port 6000: expected one of the manifest"):
        peer_verifiers(app, cast(EnclaveContext, None), manifest)
    with pytest.raises(UsageError, match="registered twice"):
        app.xx_port(6000)(lambda context: None)  # type: ignore[arg-type,return-value]


def test_methods_declare_idempotency_and_hermetic_names_are_reserved() -> None:
    app = App()

    @app.method("get", idempotent=True)
    async def get(_: Any) -> None:
        return None

    @app.method("put")
    async def put(_: Any) -> None:
        return None

    assert app.describe_methods() == {"methods": ["get", "put"], "idempotent": ["get"]}
    with pytest.raises(UsageError, match="reserved"):
        app.method("hermetic.methods")


def test_a_port_message_limit_is_kept_per_port_and_never_below_64_kib() -> None:
    app = App()
    assert app.message_limit(7000) is None
    app.limit_messages(7000, 1 << 20)
    assert (app.message_limit(7000), app.message_limit(7001)) == (1 << 20, None)
    for bad in (1024, True, "big"):
        with pytest.raises(UsageError, match="limit_messages"):
            app.limit_messages(7000, bad)  # type: ignore[arg-type]
