"""The service proxy and `hermetic up`, driven through the real CLI and real clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric import ed25519

from apps.probe.harness import build_probe, run_json, stop_all, wait_state
from hermetic.enclave.client import ServiceClient
from hermetic.errors import ServiceError
from hermetic.image.build import BuildResult
from hermetic.launcher import records

pytestmark = pytest.mark.timeout(120)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    return build_probe(tmp_path_factory.mktemp("probe"), ed25519.Ed25519PrivateKey.generate())


@pytest.fixture
def background() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; all are stopped (then killed) on teardown."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    stop_all()


def _start(
    background: list[subprocess.Popen[str]], *args: str
) -> tuple[subprocess.Popen[str], Any]:
    process = subprocess.Popen(
        [sys.executable, "-m", "hermetic", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    background.append(process)
    assert process.stdout is not None
    text = ""
    while True:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(
                f"{args[0]} exited: {process.stderr.read() if process.stderr else ''}"
            )
        text += line
        try:
            return process, json.loads(text)
        except ValueError:
            continue


async def _ws_call(url: str, request: list[Any]) -> list[Any]:
    ws = await websockets.connect(url)
    try:
        # The proxy may already have answered and closed (dead enclave): the answer
        # still arrives before the close, so a failed send is not the test's verdict.
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(cbor2.dumps(request))
        reply = await asyncio.wait_for(ws.recv(), 10)
    finally:
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.close()
    assert isinstance(reply, bytes)
    result: list[Any] = cbor2.loads(reply)
    return result


async def _tcp_echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(1000)
        writer.write(b"pong:" + data)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def test_proxy_bridges_tcp_and_websocket_and_enforces_egress_allowlist(
    probe: BuildResult, background: list[subprocess.Popen[str]]
) -> None:
    started = run_json("run", str(probe.path))

    async def scenario() -> None:
        allowed = await _tcp_echo_server()
        other = await _tcp_echo_server()
        allowed_port = allowed.sockets[0].getsockname()[1]
        other_port = other.sockets[0].getsockname()[1]
        _, addresses = await asyncio.to_thread(
            _start,
            background,
            "proxy", "--enclave", started["EnclaveID"], "--listen", "127.0.0.1:0",
            "--ws-listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
            "--egress-allow", f"127.0.0.1:{allowed_port}",
        )  # fmt: skip
        host, port = addresses["tcp"].rsplit(":", 1)
        async with await ServiceClient.tcp(host, int(port)) as client:
            assert await client.call("echo", "over tcp") == "over tcp"
            assert await client.call("echo", b"\x00" * 70000) == b"\x00" * 70000
            ok = await client.call("egress", "127.0.0.1", allowed_port, b"ping")
            assert ok == {"reply": b"pong:ping"}
            refused = await client.call("egress", "127.0.0.1", other_port, b"ping")
            assert refused["error"] == "EgressRefusedError"
            assert "not on the egress allowlist" in refused["message"]
        assert await _ws_call(addresses["websocket"], [9, "echo", ["over ws"]]) == [
            9, True, "over ws",
        ]  # fmt: skip
        async with httpx.AsyncClient() as http:
            text = (await http.get(addresses["metrics"])).text
        refused_line = (
            "hermetic_proxy_egress_refused_total{destination="
            f'"127.0.0.1:{other_port}",reason="not allowlisted"}} 1.0'
        )
        assert refused_line in text
        assert (
            f'hermetic_proxy_egress_connections_total{{destination="127.0.0.1:{allowed_port}"}} 1.0'
            in text
        )
        assert 'hermetic_proxy_connections_total{transport="tcp"} 1.0' in text
        assert 'hermetic_proxy_connections_total{transport="websocket"} 1.0' in text
        assert 'hermetic_enclave_state{state="RUNNING"} 1.0' in text
        for server in (allowed, other):
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


def test_clients_of_a_dead_enclave_get_a_clean_error_and_a_rerun_serves_again(
    probe: BuildResult, background: list[subprocess.Popen[str]]
) -> None:
    started = run_json("run", str(probe.path))
    _, addresses = _start(
        background, "proxy", "--cid", str(started["EnclaveCID"]), "--port", "5000",
        "--listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0",
    )  # fmt: skip
    host, port = addresses["tcp"].rsplit(":", 1)

    async def scenario() -> None:
        async with await ServiceClient.tcp(host, int(port)) as client:
            assert await client.call("echo", 1) == 1
            record = records.load(started["EnclaveID"])
            assert record.pid is not None
            os.kill(record.pid, signal.SIGKILL)
            with pytest.raises(ServiceError) as info:
                await asyncio.wait_for(client.call("echo", 2), 10)
            assert info.value.code == "EnclaveUnavailable"
        assert wait_state(started["EnclaveID"], "TERMINATED").state == "TERMINATED"
        async with await ServiceClient.tcp(host, int(port)) as client:
            with pytest.raises(ServiceError) as info:
                await asyncio.wait_for(client.call("echo", 3), 10)
            assert info.value.code == "EnclaveUnavailable"
        reply = await _ws_call(addresses["websocket"], [4, "echo", [4]])
        assert reply[:2] == [None, False]
        assert reply[2]["code"] == "EnclaveUnavailable"
        # `hermetic run` starts it again on the same CID, and the same proxy serves it.
        again = await asyncio.to_thread(run_json, "run", str(probe.path))
        assert again["EnclaveCID"] == started["EnclaveCID"]
        async with await ServiceClient.tcp(host, int(port)) as client:
            assert await client.call("echo", 5) == 5

    asyncio.run(scenario())


def test_up_builds_runs_exposes_and_stops_the_echo_example(
    background: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    trust = tmp_path / "trust.json"
    process, addresses = _start(
        background, "up", str(EXAMPLES / "echo"), "--listen", "127.0.0.1:0",
        "--ws-listen", "127.0.0.1:0", "--trust-out", str(trust),
    )  # fmt: skip
    host, port = addresses["tcp"].rsplit(":", 1)

    async def scenario() -> None:
        async with await ServiceClient.tcp(host, int(port)) as client:
            assert await client.call("echo", {"hello": "up"}) == {"hello": "up"}
        assert await _ws_call(addresses["websocket"], [1, "echo", ["ws"]]) == [1, True, "ws"]

    asyncio.run(scenario())
    bundle = json.loads(trust.read_text())
    listed = {d["EnclaveID"]: d for d in run_json("ps", "--json")}
    assert listed[addresses["EnclaveID"]]["State"] == "RUNNING"
    assert bundle["measurements"] == listed[addresses["EnclaveID"]]["Measurements"]
    assert bundle["root_pem"].startswith("-----BEGIN CERTIFICATE-----")
    process.send_signal(signal.SIGINT)
    assert process.wait(20) == 0
    assert records.load(addresses["EnclaveID"]).state == "TERMINATED"


def test_run_foreground_serves_until_sigterm(
    probe: BuildResult, background: list[subprocess.Popen[str]]
) -> None:
    process, started = _start(background, "run", str(probe.path), "--foreground")
    assert started["State"] == "RUNNING"

    async def call() -> object:
        async with await ServiceClient.vsock(started["EnclaveCID"], 5000) as client:
            return await client.call("echo", "fg")

    assert asyncio.run(call()) == "fg"
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    assert records.load(started["EnclaveID"]).state == "TERMINATED"
