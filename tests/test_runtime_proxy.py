"""The service proxy and `hermetic up`, driven through the real CLI and real clients.

Every client here speaks the attested channel (``hermetic.client.connect`` or
``hermetic connect``) and verifies the enclave's evidence and its release in a dev log
before calling it: the enclave has no plaintext service port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from apps.probe.harness import (
    Release,
    hermetic,
    release,
    run_json,
    start_cli,
    wait_state,
)
from hermetic.errors import SessionClosedError, TransportError
from hermetic.image import build_image
from hermetic.launcher import records

pytestmark = pytest.mark.timeout(120)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _connect_cli(url: str, trust: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return hermetic("connect", url, "--trust", str(trust), *args)


async def _tcp_echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(1000)
        writer.write(b"pong:" + data)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def test_proxy_bridges_tcp_and_websocket_and_enforces_egress_allowlist(
    probe: Release, background: list[subprocess.Popen[str]]
) -> None:
    started = probe.run()

    async def scenario() -> None:
        allowed = await _tcp_echo_server()
        other = await _tcp_echo_server()
        allowed_port = allowed.sockets[0].getsockname()[1]
        other_port = other.sockets[0].getsockname()[1]
        _, addresses = await asyncio.to_thread(
            start_cli,
            background,
            "proxy", "--enclave", started["EnclaveID"], "--listen", "127.0.0.1:0",
            "--ws-listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
            "--egress-allow", f"127.0.0.1:{allowed_port}",
        )  # fmt: skip
        async with await probe.connect(f"tcp://{addresses['tcp']}") as session:
            assert await session.call("echo", "over tcp") == "over tcp"
            assert await session.call("echo", b"\x00" * 70000) == b"\x00" * 70000
            ok = await session.call("egress", ["127.0.0.1", allowed_port, b"ping"])
            assert ok == {"reply": b"pong:ping"}
            refused = await session.call("egress", ["127.0.0.1", other_port, b"ping"])
            assert refused["error"] == "EgressRefusedError"
            assert "not on the egress allowlist" in refused["message"]
        async with await probe.connect(addresses["websocket"]) as session:
            assert await session.call("echo", "over ws") == "over ws"
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


def test_hermetic_connect_verifies_and_calls_the_echo_example_through_the_proxy(
    background: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    echo = release(build_image(EXAMPLES / "echo", tmp_path / "echo.img"), tmp_path)
    started = run_json("run", str(echo.image.path), "--endorsement", str(echo.endorsement))
    _, addresses = start_cli(
        background, "proxy", "--enclave", started["EnclaveID"], "--listen", "127.0.0.1:0",
        "--ws-listen", "127.0.0.1:0",
    )  # fmt: skip
    trust = echo.trust_file()
    pcr0 = echo.image.measurements.pcr0.hex()
    for url in (f"tcp://{addresses['tcp']}", addresses["websocket"]):
        done = _connect_cli(url, trust, "--call", "echo", "--json-args", '"hi"', "--json")
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["result"] == "hi"
        assert out["verified"]["service"] == "echo"
        assert out["verified"]["pcrs"]["0"] == pcr0
        assert isinstance(out["verified"]["log_index"], int)
        steps = _connect_cli(url, trust, "--call", "echo", "--json-args", '"hi"')
        assert steps.returncode == 0, steps.stderr
        assert "✓ release PCRs" in steps.stdout
        assert "✓ checkpoint" in steps.stdout
        assert steps.stdout.rstrip().endswith('"hi"')


def test_clients_of_a_dead_enclave_get_a_clean_error_and_a_rerun_serves_again(
    probe: Release, background: list[subprocess.Popen[str]]
) -> None:
    started = probe.run()
    _, addresses = start_cli(
        background, "proxy", "--cid", str(started["EnclaveCID"]), "--port", "5000",
        "--listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0",
    )  # fmt: skip
    tcp = f"tcp://{addresses['tcp']}"

    async def scenario() -> None:
        async with await probe.connect(tcp) as session:
            assert await session.call("echo", 1) == 1
            record = records.load(started["EnclaveID"])
            assert record.app_pid is not None
            os.kill(record.app_pid, signal.SIGKILL)  # the app itself dies at once
            with pytest.raises(SessionClosedError):
                await asyncio.wait_for(session.call("echo", 2), 60)
        assert wait_state(started["EnclaveID"], "TERMINATED").state == "TERMINATED"
        for url in (tcp, addresses["websocket"]):
            with pytest.raises((SessionClosedError, TransportError)):
                await asyncio.wait_for(probe.connect(url), 60)
        # `hermetic run` starts it again on the same CID (reusing the endorsement it ran
        # with), and the same proxy serves it.
        again = await asyncio.to_thread(run_json, "run", str(probe.image.path))
        assert again["EnclaveCID"] == started["EnclaveCID"]
        async with await probe.connect(tcp) as session:
            assert await session.call("echo", 5) == 5

    asyncio.run(scenario())


def test_up_publishes_to_the_dev_log_and_hermetic_connect_verifies_the_echo_example(
    background: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    trust = tmp_path / "trust.json"
    process, addresses = start_cli(
        background, "up", str(EXAMPLES / "echo"), "--listen", "127.0.0.1:0",
        "--ws-listen", "127.0.0.1:0", "--trust-out", str(trust),
    )  # fmt: skip
    built = build_image(EXAMPLES / "echo", tmp_path / "echo.img").measurements.pcr0.hex()
    assert addresses["release"]["pcr0"] == built
    for url in (f"tcp://{addresses['tcp']}", addresses["websocket"]):
        done = _connect_cli(url, trust, "--call", "echo", "--json-args", '"hi"', "--json")
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["result"] == "hi"
        assert out["verified"]["service"] == "echo"
        assert out["verified"]["pcrs"]["0"] == built
        assert isinstance(out["verified"]["log_index"], int)
        assert out["verified"]["log_index"] == addresses["release"]["log_index"]
    steps = _connect_cli(
        f"tcp://{addresses['tcp']}", trust, "--call", "echo", "--json-args", '"hi"'
    )
    assert steps.returncode == 0, steps.stderr
    for label in ("nitro root", "attestation", "nonce binding", "publisher", "release PCRs",
                  "log inclusion", "checkpoint", "policy"):  # fmt: skip
        assert f"✓ {label}" in steps.stdout, steps.stdout
    assert steps.stdout.rstrip().endswith('"hi"')
    listed = {d["EnclaveID"]: d for d in run_json("ps", "--json")}
    assert listed[addresses["EnclaveID"]]["State"] == "RUNNING"
    assert listed[addresses["EnclaveID"]]["Measurements"]["PCR0"] == built
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    assert records.load(addresses["EnclaveID"]).state == "TERMINATED"


def test_up_debug_serves_without_endorsement_and_clients_must_allow_debug(
    background: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    trust = tmp_path / "trust.json"
    process, addresses = start_cli(
        background, "up", str(EXAMPLES / "echo"), "--listen", "127.0.0.1:0", "--debug",
        "--trust-out", str(trust),
    )  # fmt: skip
    assert addresses["release"] is None
    url = f"tcp://{addresses['tcp']}"
    strict = _connect_cli(url, trust, "--call", "echo", "--json-args", '"hi"')
    assert strict.returncode == 1
    assert "✗ debug mode" in strict.stdout
    assert "Traceback" not in strict.stderr
    lenient = _connect_cli(url, trust, "--allow-debug", "--call", "echo", "--json-args", "1")
    assert lenient.returncode == 0, lenient.stderr
    assert "code is NOT proven" in lenient.stdout
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    assert process.stderr is not None
    assert "serving WITHOUT an endorsement" in process.stderr.read()


def test_run_foreground_serves_until_sigterm(
    probe: Release, background: list[subprocess.Popen[str]]
) -> None:
    process, started = start_cli(
        background, "run", str(probe.image.path), "--endorsement", str(probe.endorsement),
        "--foreground",
    )  # fmt: skip
    assert started["State"] == "RUNNING"
    url = f"vsock://{started['EnclaveCID']}:5000"
    assert asyncio.run(probe.call(url, "echo", "fg")) == "fg"
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    assert records.load(started["EnclaveID"]).state == "TERMINATED"
