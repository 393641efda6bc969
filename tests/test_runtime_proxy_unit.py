"""The proxy's parts in-process: config and endorsement delivery, refused and malformed
egress, and blind ingress (TCP byte for byte, WebSocket message <-> 2-byte-prefixed frame)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
import websockets

from helpers import act_as_enclave
from hermetic.channel.framing import MAX_FRAME_LEN, FrameDecoder, encode_frame
from hermetic.enclave import boot
from hermetic.proxy.server import ProxyOptions, ServiceProxy
from hermetic.transport import vsock
from hermetic.transport.frames import read_frame, write_frame
from hermetic.transport.tcp import HostPort


@pytest.fixture(autouse=True)
def _emulated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HERMETIC_VSOCK", "emulated")
    monkeypatch.setenv("HERMETIC_VSOCK_DIR", str(tmp_path / "v"))
    act_as_enclave(16)


async def test_proxy_delivers_config_and_logs_the_enclaves_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = ProxyOptions(
        cid=16,
        service_port=5000,
        config_bundle=b"bundle",
        endorsement=b'{"type": "hermetic.endorsement/v1"}',
        serve_config=True,
    )
    async with ServiceProxy(options):
        stream = await vsock.connect(vsock.PARENT_CID, boot.CONFIG_PORT, source_cid=16)
        assert await read_frame(stream.reader) == b"bundle"
        assert await read_frame(stream.reader) == b'{"type": "hermetic.endorsement/v1"}'
        refusal = boot.BootStatus(False, "RuntimeConfigError: signature does not verify", None)
        expected = "refused its runtime config: RuntimeConfigError: signature does not verify"
        with caplog.at_level(logging.ERROR, logger="hermetic.proxy"):
            await write_frame(stream.writer, boot.encode_status(refusal))
            deadline = asyncio.get_running_loop().time() + 30
            while expected not in caplog.text and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
        await stream.aclose()
    assert expected in caplog.text


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


async def _raw_echo(stream: vsock.VsockStream) -> None:
    """A stand-in service that echoes bytes: the proxy must relay them untouched."""
    while data := await stream.reader.read(65536):
        stream.writer.write(data)
        await stream.writer.drain()
    await stream.aclose()


async def test_tcp_client_of_an_absent_enclave_is_closed_cleanly_with_no_bytes() -> None:
    proxy = ServiceProxy(ProxyOptions(cid=99, service_port=5000, listen=HostPort("127.0.0.1", 0)))
    async with proxy:
        assert proxy.tcp_address is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.tcp_address.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # no plaintext from the parent
        writer.close()
        errors = proxy.metrics.registry.get_sample_value("hermetic_proxy_enclave_unavailable_total")
        assert errors == 1.0


async def test_tcp_ingress_relays_bytes_untouched_and_passes_half_close() -> None:
    listener = await vsock.listen(16, 5000, _raw_echo)
    proxy = ServiceProxy(ProxyOptions(cid=16, service_port=5000, listen=HostPort("127.0.0.1", 0)))
    async with proxy:
        assert proxy.tcp_address is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.tcp_address.port)
        # Not a frame of any kind: the relay must neither parse nor reframe it.
        payload = b"\x00\x00\xff\xff" + os.urandom(200_000) + b"\x00"
        writer.write(payload)
        writer.write_eof()
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
        assert await asyncio.wait_for(reader.read(), 5) == b""  # clean EOF, nothing appended
        writer.close()
    await listener.aclose()


async def test_tcp_client_of_an_enclave_that_dies_gets_eof_and_nothing_injected() -> None:
    async def half_then_die(stream: vsock.VsockStream) -> None:
        await stream.reader.readexactly(3)
        stream.writer.write(b"\x00\x10par")  # a torn 2-byte-prefixed message, then death
        await stream.writer.drain()
        await stream.aclose()

    listener = await vsock.listen(16, 5000, half_then_die)
    proxy = ServiceProxy(ProxyOptions(cid=16, service_port=5000, listen=HostPort("127.0.0.1", 0)))
    async with proxy:
        assert proxy.tcp_address is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.tcp_address.port)
        writer.write(b"abc")
        assert await asyncio.wait_for(reader.read(), 5) == b"\x00\x10par"
        writer.close()
    await listener.aclose()


async def test_websocket_message_maps_to_one_two_byte_prefixed_frame_and_back() -> None:
    seen: list[bytes] = []

    async def record_and_answer(stream: vsock.VsockStream) -> None:
        decoder = FrameDecoder()
        while data := await stream.reader.read(65536):
            for message in decoder.feed(data):
                seen.append(message)
                stream.writer.write(encode_frame(b"re:" + message[:10]))
                stream.writer.write(encode_frame(b"second"))
        await stream.aclose()

    listener = await vsock.listen(16, 5000, record_and_answer)
    proxy = ServiceProxy(
        ProxyOptions(cid=16, service_port=5000, ws_listen=HostPort("127.0.0.1", 0))
    )
    async with proxy:
        assert proxy.ws_address is not None
        async with websockets.connect(f"ws://{proxy.ws_address}") as ws:
            for message in (b"x", os.urandom(MAX_FRAME_LEN)):
                await ws.send(message)
                assert await asyncio.wait_for(ws.recv(), 5) == b"re:" + message[:10]
                assert await asyncio.wait_for(ws.recv(), 5) == b"second"
        assert [len(m) for m in seen] == [1, MAX_FRAME_LEN]
    await listener.aclose()


@pytest.mark.parametrize(
    ("message", "code"),
    [("text", 1003), (b"", 1003), (b"\x00" * (MAX_FRAME_LEN + 1), 1009)],
)
async def test_websocket_message_that_is_no_channel_message_closes_the_socket(
    message: str | bytes, code: int
) -> None:
    listener = await vsock.listen(16, 5000, _raw_echo)
    proxy = ServiceProxy(
        ProxyOptions(cid=16, service_port=5000, ws_listen=HostPort("127.0.0.1", 0))
    )
    async with proxy:
        assert proxy.ws_address is not None
        async with websockets.connect(f"ws://{proxy.ws_address}", max_size=None) as ws:
            await ws.send(message)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == code
    await listener.aclose()


async def test_websocket_client_of_an_absent_enclave_gets_close_1011_and_no_message() -> None:
    proxy = ServiceProxy(
        ProxyOptions(cid=99, service_port=5000, ws_listen=HostPort("127.0.0.1", 0))
    )
    async with proxy:
        assert proxy.ws_address is not None
        async with websockets.connect(f"ws://{proxy.ws_address}") as ws:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1011
