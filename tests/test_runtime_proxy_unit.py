"""The proxy's parts in-process: config bootstrap logging, refused and malformed egress."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from hermetic.enclave import boot, wire
from hermetic.proxy.server import ProxyOptions, ServiceProxy, enclave_unavailable_frame
from hermetic.transport import vsock
from hermetic.transport.frames import read_frame, write_frame


@pytest.fixture(autouse=True)
def _emulated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HERMETIC_VSOCK", "emulated")
    monkeypatch.setenv("HERMETIC_VSOCK_DIR", str(tmp_path / "v"))


async def test_proxy_delivers_config_and_logs_the_enclaves_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = ProxyOptions(cid=16, service_port=5000, config_bundle=b"bundle", serve_config=True)
    async with ServiceProxy(options):
        stream = await vsock.connect(vsock.PARENT_CID, boot.CONFIG_PORT, source_cid=16)
        assert await read_frame(stream.reader) == b"bundle"
        refusal = boot.BootStatus(False, "RuntimeConfigError: signature does not verify", None)
        with caplog.at_level(logging.ERROR, logger="hermetic.proxy"):
            await write_frame(stream.writer, boot.encode_status(refusal))
            await asyncio.sleep(0.1)
        await stream.aclose()
    assert (
        "refused its runtime config: RuntimeConfigError: signature does not verify" in caplog.text
    )


async def test_other_enclaves_cannot_use_this_proxys_egress() -> None:
    async with ServiceProxy(ProxyOptions(cid=16, service_port=5000)):
        with pytest.raises(Exception, match="nobody listening"):
            await vsock.connect(vsock.PARENT_CID, boot.EGRESS_PORT, source_cid=17)


async def test_malformed_egress_request_is_refused_and_counted() -> None:
    proxy = ServiceProxy(ProxyOptions(cid=16, service_port=5000))
    async with proxy:
        stream = await vsock.connect(vsock.PARENT_CID, boot.EGRESS_PORT, source_cid=16)
        stream.writer.write(b"GET / HTTP/1.1\n")
        assert (await stream.reader.readline()).startswith(b"ERR egress request")
        await stream.aclose()
        value = proxy.metrics.registry.get_sample_value(
            "hermetic_proxy_egress_refused_total", {"destination": "?", "reason": "malformed"}
        )
        assert value == 1.0


async def test_tcp_client_of_an_absent_enclave_gets_an_error_frame_not_a_hang() -> None:
    from hermetic.transport.tcp import HostPort

    proxy = ServiceProxy(ProxyOptions(cid=99, service_port=5000, listen=HostPort("127.0.0.1", 0)))
    async with proxy:
        assert proxy.tcp_address is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.tcp_address.port)
        frame = await asyncio.wait_for(read_frame(reader), 5)
        assert frame is not None
        response = wire.decode_response(frame)
        assert (response.id, response.ok, response.error_code) == (
            None,
            False,
            "EnclaveUnavailable",
        )
        assert await reader.read() == b""
        writer.close()
    assert enclave_unavailable_frame("x")[4:] == wire.encode_response(
        wire.error_response(None, "EnclaveUnavailable", "x")
    )


async def test_client_that_half_closes_still_gets_its_answer() -> None:
    from hermetic.enclave import App
    from hermetic.enclave.service import serve_stream
    from hermetic.transport.tcp import HostPort

    app = App()

    @app.method("echo")
    async def echo(arg: object) -> object:
        await asyncio.sleep(0.05)
        return arg

    listener = await vsock.listen(16, 5000, lambda s: serve_stream(app, s.reader, s.writer))
    proxy = ServiceProxy(ProxyOptions(cid=16, service_port=5000, listen=HostPort("127.0.0.1", 0)))
    async with proxy:
        assert proxy.tcp_address is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.tcp_address.port)
        await write_frame(writer, wire.encode_request(wire.ServiceRequest(1, "echo", ("x",))))
        writer.write_eof()
        frame = await asyncio.wait_for(read_frame(reader), 5)
        assert frame is not None
        assert wire.decode_response(frame) == wire.ServiceResponse(1, True, "x")
        assert await read_frame(reader) is None  # clean EOF, no error frame
        writer.close()
    await listener.aclose()
