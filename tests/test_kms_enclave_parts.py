"""The pieces behind in-enclave KMS, in-process: the credentials boot frame, the ``kms``
config section, the CONNECT head parser, and the loopback forwarder over the proxy's
egress (plain relay for http, CONNECT proxy for https)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import act_as_enclave
from hermetic.enclave import boot
from hermetic.enclave.kmsaccess import EgressForwarder, KMSSettings, parse_connect_head
from hermetic.errors import EnclaveBootError, FrameFormatError, UsageError
from hermetic.kms.client import KMSCredentials
from hermetic.proxy.server import ProxyOptions, ServiceProxy
from hermetic.transport import vsock
from hermetic.transport.frames import read_frame
from hermetic.transport.tcp import HostPort

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
CREDENTIALS = KMSCredentials("AKIDEXAMPLE", SECRET, "session-token-value")
field_text = st.text(min_size=1, max_size=64)


# --- credentials frame -------------------------------------------------------------------


@given(field_text, field_text, st.none() | field_text)
def test_credentials_frame_round_trips(key_id: str, secret: str, token: str | None) -> None:
    credentials = KMSCredentials(key_id, secret, token)
    assert boot.decode_credentials(boot.encode_credentials(credentials)) == credentials


def test_an_empty_credentials_frame_means_none() -> None:
    assert boot.encode_credentials(None) == b""
    assert boot.decode_credentials(b"") is None


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"access_key_id": "a", "secret_access_key": "s"}, "expected a map"),
        ({"access_key_id": "a", "secret_access_key": "", "session_token": None}, "secret_access"),
        ({"access_key_id": 1, "secret_access_key": "s", "session_token": None}, "access_key_id"),
        ({"access_key_id": "a", "secret_access_key": "s", "session_token": b"t"}, "session_token"),
        ({"access_key_id": "a", "secret_access_key": "s" * 5000, "session_token": None}, "secret"),
        (["a", "s", None], "expected a map"),
    ],
)
def test_malformed_credentials_frames_name_the_field(value: object, field: str) -> None:
    with pytest.raises(FrameFormatError, match=field):
        boot.decode_credentials(cbor2.dumps(value))


@given(st.binary(max_size=200))
def test_any_bytes_as_credentials_frame_give_credentials_or_frame_format_error(
    data: bytes,
) -> None:
    try:
        result = boot.decode_credentials(data)
    except FrameFormatError:
        return
    assert result is None or isinstance(result, KMSCredentials)


def test_mutated_credentials_frames_never_leak_the_secret_in_errors() -> None:
    frame = boot.encode_credentials(CREDENTIALS)
    for index in range(len(frame)):
        for flip in (0x01, 0x80, 0xFF):
            mutated = bytearray(frame)
            mutated[index] ^= flip
            message = ""
            try:
                boot.decode_credentials(bytes(mutated))
            except FrameFormatError as exc:
                message = str(exc)
            assert SECRET[:-1] not in message


def test_credentials_repr_hides_the_secret_and_token() -> None:
    assert SECRET not in repr(CREDENTIALS)
    assert "session-token-value" not in repr(CREDENTIALS)


def test_credentials_come_from_the_standard_variables() -> None:
    env = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": SECRET}
    assert boot.credentials_from_environment(env) == KMSCredentials("AKID", SECRET, None)
    env["AWS_SESSION_TOKEN"] = "tok"
    assert boot.credentials_from_environment(env).session_token == "tok"


@pytest.mark.parametrize("missing", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_missing_credential_variable_is_named_without_values(missing: str) -> None:
    env = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": SECRET}
    del env[missing]
    with pytest.raises(UsageError, match=missing) as caught:
        boot.credentials_from_environment(env)
    assert SECRET not in str(caught.value)


# --- config section ----------------------------------------------------------------------


def test_kms_section_is_parsed_with_https_by_default() -> None:
    settings = KMSSettings.from_config(
        {"kms": {"endpoint": "kms.eu-west-1.amazonaws.com:443", "region": "eu-west-1"}}
    )
    assert settings == KMSSettings(
        HostPort("kms.eu-west-1.amazonaws.com", 443), "eu-west-1", "https"
    )
    assert KMSSettings.from_config({"other": 1}) is None


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("kms.local:4599", "expected an object"),
        ({"endpoint": "nohost", "region": "r"}, "kms.endpoint"),
        ({"endpoint": 4599, "region": "r"}, "kms.endpoint"),
        ({"endpoint": "h:1", "region": ""}, "kms.region"),
        ({"endpoint": "h:1", "region": "r", "scheme": "ftp"}, "kms.scheme"),
        ({"endpoint": "h:1", "region": "r", "key": "x"}, "unknown"),
    ],
)
def test_wrong_kms_sections_refuse_boot_naming_the_field(section: object, field: str) -> None:
    with pytest.raises(EnclaveBootError, match=field):
        KMSSettings.from_config({"kms": section})


# --- CONNECT head --------------------------------------------------------------------------


def test_connect_head_gives_its_destination() -> None:
    head = b"CONNECT kms.us-east-1.amazonaws.com:443 HTTP/1.1\r\nHost: x\r\n\r\n"
    assert parse_connect_head(head) == HostPort("kms.us-east-1.amazonaws.com", 443)


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"CONNECT host:443 HTTP/2\r\n\r\n",
        b"CONNECT host HTTP/1.1\r\n\r\n",
        b"CONNECT host:443 HTTP/1.1\r\n",
        b"CONNECT h\xff:443 HTTP/1.1\r\n\r\n",
        b"CONNECT host:443 HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n",
    ],
)
def test_other_requests_are_not_connect_heads(head: bytes) -> None:
    with pytest.raises(FrameFormatError):
        parse_connect_head(head)


@given(st.binary(max_size=300))
def test_any_bytes_as_connect_head_give_a_destination_or_frame_format_error(data: bytes) -> None:
    try:
        result = parse_connect_head(data + b"\r\n\r\n")
    except FrameFormatError:
        return
    assert isinstance(result, HostPort)


# --- forwarder over the proxy's egress ----------------------------------------------------


@pytest.fixture
def enclave_side(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HERMETIC_VSOCK", "emulated")
    monkeypatch.setenv("HERMETIC_VSOCK_DIR", str(tmp_path / "v"))
    act_as_enclave(16)
    monkeypatch.setenv("HERMETIC_VSOCK_CID", "16")


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1000):
            writer.write(b"echo:" + data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def _exchange(port: int, request: bytes, reply_size: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        data = b""
        while len(data) < reply_size:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


@pytest.mark.usefixtures("enclave_side")
async def test_forwarder_relays_plain_tcp_and_acts_as_connect_proxy_for_its_target_only() -> None:
    server = await _echo_server()
    target = HostPort("127.0.0.1", server.sockets[0].getsockname()[1])
    options = ProxyOptions(cid=16, service_port=5000, egress_allow=frozenset({target}))
    proxy = ServiceProxy(options)
    plain = EgressForwarder(target, connect_proxy=False)
    tunnel = EgressForwarder(target, connect_proxy=True)
    async with proxy:
        try:
            plain_port, tunnel_port = plain.start(), tunnel.start()
            assert await asyncio.to_thread(_exchange, plain_port, b"ping", 9) == b"echo:ping"
            head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
            established = b"HTTP/1.1 200 Connection established\r\n\r\n"
            expected = len(established) + len(b"echo:tls")
            reply = await asyncio.to_thread(_exchange, tunnel_port, head + b"tls", expected)
            assert reply.startswith(established)
            assert reply[len(established) :] == b"echo:tls"
            other = b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n"
            refused = await asyncio.to_thread(_exchange, tunnel_port, other, 200)
            assert refused.startswith(b"HTTP/1.1 403 ")
        finally:
            plain.close()
            tunnel.close()
        allowed = proxy.metrics.registry.get_sample_value(
            "hermetic_proxy_egress_connections_total", {"destination": str(target)}
        )
        assert allowed == 2.0  # one per forwarded connection, none for the refused CONNECT
    server.close()
    await server.wait_closed()


@pytest.mark.usefixtures("enclave_side")
async def test_forwarder_closes_clients_when_the_proxy_refuses_the_destination() -> None:
    target = HostPort("127.0.0.1", 9)
    proxy = ServiceProxy(ProxyOptions(cid=16, service_port=5000))
    forwarder = EgressForwarder(target, connect_proxy=True)
    async with proxy:
        try:
            port = forwarder.start()
            head = f"CONNECT {target} HTTP/1.1\r\n\r\n".encode()
            reply = await asyncio.to_thread(_exchange, port, head, 200)
            assert reply.startswith(b"HTTP/1.1 502 ")
        finally:
            forwarder.close()


async def test_proxy_forwards_credentials_as_the_third_boot_frame(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HERMETIC_VSOCK", "emulated")
    monkeypatch.setenv("HERMETIC_VSOCK_DIR", str(tmp_path / "v"))
    act_as_enclave(16)
    options = ProxyOptions(cid=16, service_port=5000, serve_config=True, credentials=CREDENTIALS)
    assert SECRET not in repr(options)
    async with ServiceProxy(options):
        stream = await vsock.connect(vsock.PARENT_CID, boot.CONFIG_PORT, source_cid=16)
        assert await read_frame(stream.reader) == b""
        assert await read_frame(stream.reader) == b""
        frame = await read_frame(stream.reader)
        assert frame is not None
        assert boot.decode_credentials(frame) == CREDENTIALS
        await stream.aclose()
