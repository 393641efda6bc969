"""The threaded TCP ingress relay: how each side's end reaches the other, and shutdown.

The byte-for-byte, half-close, absent- and dying-enclave cases are pinned in
test_runtime_proxy_unit.py; these pin what the threads add: no thread or socket outlives
its connection, a client that vanishes ends the enclave side without counting an enclave
error, and stopping the proxy ends open relays.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from helpers import act_as_enclave
from hermetic.errors import UsageError
from hermetic.proxy.server import Forward, ProxyOptions, ServiceProxy, parse_forward
from hermetic.transport import vsock
from hermetic.transport.tcp import HostPort


@pytest.fixture(autouse=True)
def _emulated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HERMETIC_VSOCK", "emulated")
    monkeypatch.setenv("HERMETIC_VSOCK_DIR", str(tmp_path / "v"))
    act_as_enclave(16)


def _relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ingress-")]


async def _until(condition: object, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _errors(proxy: ServiceProxy) -> float | None:
    return proxy.metrics.registry.get_sample_value("hermetic_proxy_enclave_unavailable_total")


async def test_a_vanished_client_ends_the_enclave_side_without_an_enclave_error() -> None:
    ended = asyncio.Event()

    async def silent(stream: vsock.VsockStream) -> None:
        assert await stream.reader.read() == b"hi"  # everything, then the relayed end
        ended.set()
        await stream.aclose()

    listener = await vsock.listen(16, 5000, silent)
    proxy = ServiceProxy(ProxyOptions(cid=16, service_port=5000, listen=HostPort("127.0.0.1", 0)))
    async with proxy:
        assert proxy.tcp_address is not None
        client = socket.create_connection(("127.0.0.1", proxy.tcp_address.port))
        client.sendall(b"hi")
        # RST instead of FIN: the client's connection breaks rather than half-closing
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()
        await asyncio.wait_for(ended.wait(), 5)
        await _until(lambda: not _relay_threads())
        assert _errors(proxy) == 0.0
    await listener.aclose()


async def test_stopping_the_proxy_ends_open_relays_and_their_threads() -> None:
    async def holds_open(stream: vsock.VsockStream) -> None:
        await stream.reader.read()

    listener = await vsock.listen(16, 5000, holds_open)
    proxy = ServiceProxy(ProxyOptions(cid=16, service_port=5000, listen=HostPort("127.0.0.1", 0)))
    await proxy.start()
    assert proxy.tcp_address is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.tcp_address.port)
    writer.write(b"x")
    await _until(lambda: len(_relay_threads()) == 2)
    await proxy.aclose()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the client sees the end
    await _until(lambda: not _relay_threads())
    writer.close()
    await listener.aclose()


async def test_accepted_client_sockets_have_nagle_off() -> None:
    seen: list[int] = []

    async def echo_once(stream: vsock.VsockStream) -> None:
        stream.writer.write(await stream.reader.readexactly(1))
        await stream.writer.drain()
        await stream.reader.read()
        await stream.aclose()

    listener = await vsock.listen(16, 5000, echo_once)
    proxy = ServiceProxy(ProxyOptions(cid=16, service_port=5000, listen=HostPort("127.0.0.1", 0)))
    async with proxy:
        assert proxy.tcp_address is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.tcp_address.port)
        writer.write(b"q")
        assert await reader.readexactly(1) == b"q"
        for relay in proxy._relays:
            seen.append(relay.client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()
    assert seen == [1]
    await listener.aclose()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    return client, accepted


@pytest.mark.parametrize("refused", ["nothing", "reading", "writing"])
def test_pump_moves_every_byte_in_order_and_counts_them(
    monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    """TCP in, Unix socket out, as the ingress relay runs; by splice(2) or, where the kernel
    refuses to splice one of the sockets (EINVAL), by copying, losing nothing."""
    from prometheus_client import CollectorRegistry, Counter

    from hermetic.proxy import relay

    calls: list[int] = []
    real_splice = os.splice

    def counted_splice(source: int, target: int, *args: Any, **kwargs: Any) -> int:
        calls.append(1)
        into_pipe = not stat.S_ISSOCK(os.fstat(target).st_mode)
        if refused == ("reading" if into_pipe else "writing"):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_splice(source, target, *args, **kwargs)

    monkeypatch.setattr(relay.os, "splice", counted_splice)
    counter = Counter("relayed", "bytes", registry=CollectorRegistry())
    source_client, source = _tcp_pair()
    target, target_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    data = os.urandom(3 * 1024 * 1024 + 17)
    result: list[bool] = []
    pump = threading.Thread(target=lambda: result.append(relay._pump(source, target, counter)))
    pump.start()
    received = bytearray()

    def drain() -> None:
        while chunk := target_peer.recv(1 << 20):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    source_client.sendall(data)
    source_client.shutdown(socket.SHUT_WR)
    pump.join(30)
    target.shutdown(socket.SHUT_WR)
    reader.join(30)
    for sock in (source_client, source, target, target_peer):
        sock.close()
    assert result == [True]
    assert bytes(received) == data
    assert counter._value.get() == len(data)
    # spliced: ~2 calls per chunk; refused: one attempt that way, then every byte copied
    assert len(calls) > 10 if refused == "nothing" else len(calls) == {"reading": 1}.get(refused, 2)


async def test_each_forward_relays_its_clients_to_its_own_enclave_port() -> None:
    """One proxy relays several of the enclave's ports (persistence: NX 5000, XX 5001)."""

    def answering(port: int) -> Any:
        async def answer(stream: vsock.VsockStream) -> None:
            request = await stream.reader.readexactly(1)
            stream.writer.write(request + str(port).encode())
            await stream.writer.drain()
            await stream.reader.read()
            await stream.aclose()

        return answer

    listeners = [await vsock.listen(16, port, answering(port)) for port in (5000, 5001, 5002)]
    options = ProxyOptions(
        cid=16,
        service_port=5001,
        listen=HostPort("127.0.0.1", 0),
        forwards=(Forward(5000, HostPort("127.0.0.1", 0)), Forward(5002, HostPort("127.0.0.1", 0))),
    )
    async with ServiceProxy(options) as proxy:
        assert proxy.tcp_address is not None
        assert sorted(proxy.forward_addresses) == [5000, 5002]
        targets = {5001: proxy.tcp_address, **proxy.forward_addresses}
        assert len({address.port for address in targets.values()}) == 3
        for port, address in targets.items():
            reader, writer = await asyncio.open_connection("127.0.0.1", address.port)
            writer.write(b"?")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"?" + str(port).encode()
            writer.close()
    for listener in listeners:
        await listener.aclose()


def test_rejects_two_listeners_relaying_one_enclave_port() -> None:
    anywhere = HostPort("127.0.0.1", 0)
    with pytest.raises(UsageError, match="got port 5000 more than once"):
        ProxyOptions(
            cid=16, service_port=5000, listen=anywhere, forwards=(Forward(5000, anywhere),)
        )
    with pytest.raises(UsageError, match="got port 5001 more than once"):
        ProxyOptions(
            cid=16, service_port=5000, forwards=(Forward(5001, anywhere), Forward(5001, anywhere))
        )
    # Without --listen the primary port is not relayed, so a forward may name it.
    assert ProxyOptions(cid=16, service_port=5000, forwards=(Forward(5000, anywhere),))


@pytest.mark.parametrize(
    "spec", ["5000", "=127.0.0.1:1", "x=127.0.0.1:1", "0=127.0.0.1:1", "-1=127.0.0.1:1",
             "5000=127.0.0.1", "5000=127.0.0.1:70000"],
)  # fmt: skip
def test_rejects_malformed_forward_specs_naming_the_option(spec: str) -> None:
    with pytest.raises(UsageError, match="--forward"):
        parse_forward(spec)


def test_parses_a_forward_spec() -> None:
    assert parse_forward("5000=127.0.0.1:0") == Forward(5000, HostPort("127.0.0.1", 0))
    assert parse_forward("5001=[::1]:8443").listen == HostPort("::1", 8443)


async def test_proxy_command_relays_each_forward_and_prints_its_address(
    tmp_path: Path,
) -> None:
    """``hermetic proxy --forward PORT=HOST:PORT`` (repeatable) next to ``--port/--listen``."""
    import json
    import subprocess
    import sys

    def answering(port: int) -> Any:
        async def answer(stream: vsock.VsockStream) -> None:
            stream.writer.write(str(port).encode())
            await stream.writer.drain()
            await stream.reader.read()
            await stream.aclose()

        return answer

    listeners = [await vsock.listen(16, port, answering(port)) for port in (5000, 5001)]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hermetic", "proxy", "--cid", "16", "--port", "5001",
        "--listen", "127.0.0.1:0", "--forward", "5000=127.0.0.1:0",
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ),
    )  # fmt: skip
    try:
        assert process.stdout is not None
        text = ""
        while True:
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line, "hermetic proxy exited before printing its addresses"
            text += line.decode()
            try:
                addresses = json.loads(text)
                break
            except ValueError:
                continue
        assert set(addresses["forwards"]) == {"5000"}
        targets = {5001: addresses["tcp"], 5000: addresses["forwards"]["5000"]}
        for port, address in targets.items():
            host, _, number = address.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(number))
            assert await asyncio.wait_for(reader.readexactly(4), 10) == str(port).encode()
            writer.close()
    finally:
        process.terminate()
        await process.wait()
        for listener in listeners:
            await listener.aclose()


def test_proxy_command_refuses_a_malformed_forward() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "hermetic", "proxy", "--cid", "16", "--port", "5001",
         "--forward", "5000"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--forward: expected PORT=HOST:PORT" in done.stderr
    assert "Traceback" not in done.stderr
