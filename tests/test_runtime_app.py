"""The app framework and the plain service wire, without any enclave around them."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hermetic.enclave import App, wire
from hermetic.enclave.client import ServiceClient
from hermetic.enclave.service import handle_frame, serve_stream
from hermetic.errors import FrameFormatError, LauncherError, ServiceError, UsageError


def _echo_app() -> App:
    app = App()

    @app.method("echo")
    async def echo(arg: Any) -> Any:
        return arg

    @app.method("boom")
    async def boom() -> None:
        raise RuntimeError("secret-value-must-not-leak")

    return app


async def _call(app: App, request: Any) -> list[Any]:
    result: list[Any] = cbor2.loads(await handle_frame(app, cbor2.dumps(request)))
    return result


async def test_registered_method_answers_with_its_id() -> None:
    assert await _call(_echo_app(), [7, "echo", [{"a": b"\x00"}]]) == [7, True, {"a": b"\x00"}]


async def test_unknown_method_is_a_typed_error_response() -> None:
    assert await _call(_echo_app(), [1, "nope", []]) == [
        1,
        False,
        {"code": "UnknownMethod", "message": "method: no method named 'nope'"},
    ]


async def test_app_exception_becomes_internal_error_without_its_message() -> None:
    response = await _call(_echo_app(), [2, "boom", []])
    assert response[:2] == [2, False]
    assert response[2]["code"] == "InternalError"
    assert "secret-value" not in response[2]["message"]


async def test_wrong_arity_is_invalid_arguments() -> None:
    response = await _call(_echo_app(), [3, "echo", []])
    assert response[2]["code"] == "InvalidArguments"


@pytest.mark.parametrize(
    "request_value",
    [[1, "echo"], [-1, "echo", []], [True, "echo", []], [1, "", []], [1, "echo", "x"], {"a": 1}],
)
async def test_malformed_requests_get_null_id_error(request_value: Any) -> None:
    response = await _call(_echo_app(), request_value)
    assert response[0] is None
    assert response[2]["code"] == "MalformedRequest"


@given(st.binary(max_size=64))
def test_request_decoder_only_ever_raises_frame_format_error(junk: bytes) -> None:
    with contextlib.suppress(FrameFormatError):
        wire.decode_request(junk)


@given(st.binary(max_size=64))
def test_response_decoder_only_ever_raises_frame_format_error(junk: bytes) -> None:
    with contextlib.suppress(FrameFormatError):
        wire.decode_response(junk)


@given(st.integers(min_value=0, max_value=2**63), st.text(min_size=1, max_size=20))
def test_request_roundtrips(request_id: int, method: str) -> None:
    request = wire.ServiceRequest(request_id, method, (1, b"x", None))
    assert wire.decode_request(wire.encode_request(request)) == request


def test_method_registered_twice_is_refused() -> None:
    app = _echo_app()
    with pytest.raises(UsageError, match="registered twice"):
        app.method("echo")(lambda: None)  # type: ignore[arg-type, return-value]


def test_context_before_boot_is_an_error() -> None:
    with pytest.raises(LauncherError, match="expected a booted enclave runtime"):
        _ = _echo_app().context


async def test_client_and_server_over_a_real_stream(tmp_path: Any) -> None:
    app = _echo_app()
    path = str(tmp_path / "s.sock")
    server = await asyncio.start_unix_server(lambda r, w: serve_stream(app, r, w), path=path)
    reader, writer = await asyncio.open_unix_connection(path)
    async with ServiceClient(reader, writer) as client:
        assert await client.call("echo", "hi") == "hi"
        assert await client.call("echo", [1, 2]) == [1, 2]
        with pytest.raises(ServiceError) as info:
            await client.call("nope")
        assert info.value.code == "UnknownMethod"
    server.close()
    await server.wait_closed()


async def test_server_answers_broken_framing_with_an_error_frame_then_closes(tmp_path: Any) -> None:
    app = _echo_app()
    path = str(tmp_path / "s.sock")
    server = await asyncio.start_unix_server(lambda r, w: serve_stream(app, r, w), path=path)
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"\x00\x00\x00\x09abc")
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    response = wire.decode_response(data[4:])
    assert response.id is None
    assert response.error_code == "MalformedFrame"
    writer.close()
    server.close()
    await server.wait_closed()
