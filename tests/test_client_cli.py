"""``hermetic connect`` as a user runs it: a subprocess against a service this test serves."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import helpers
from hermetic.client import start_tcp_server
from test_client_stack import CONFIG_DIGEST, PCRS, SERVICE, VERSION, Stack, build_stack

Provider = Callable[[bytes, bytes], bytes]


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return build_stack(tmp_path / "stack")


class ThreadedService:
    """An attested echo service on its own event loop thread (the CLI runs in a subprocess)."""

    def __init__(self, provider: Provider) -> None:
        self._loop = asyncio.new_event_loop()
        self._provider = provider
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def echo(args: Any) -> Any:
            return args

        async def start() -> asyncio.Server:
            return await start_tcp_server("127.0.0.1", 0, provider, {"echo": echo})

        self.server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(60)
        self.url = f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Provider], str]]:
    services: list[ThreadedService] = []

    def start(provider: Provider) -> str:
        services.append(ThreadedService(provider))
        return services[-1].url

    yield start
    for service in services:
        service.close()


def hermetic(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # A different state dir than the server's: the trust file must be self-contained.
    env = {"HERMETIC_STATE_DIR": str(cwd / "client-state")}
    return helpers.hermetic(*args, env=env, cwd=cwd, timeout=60)


def test_connect_prints_each_check_then_the_result(
    stack: Stack, serve: Callable[[Provider], str], tmp_path: Path
) -> None:
    url = serve(stack.provider())
    done = hermetic("connect", url, "--trust", str(stack.trust_path), "--service", SERVICE,
                    "--call", "echo", "--json-args", '"hi"', cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    labels = ["nitro root", "attestation", "nonce binding", "key binding", "publisher",
              "release PCRs", "log inclusion", "checkpoint", "policy"]  # fmt: skip
    for label in labels:
        assert any(line.startswith(f"✓ {label}") for line in lines), (label, done.stdout)
    text = done.stdout
    assert stack.trust.root.fingerprint in text
    assert "module i-" in text
    assert PCRS[0].hex()[:32] in text
    assert f"log index {stack.endorsement.index}" in text
    assert "checkpoint size 9" in text
    assert "2 witness cosignature(s)" in text
    assert lines[-1] == '"hi"'


def test_connect_json_prints_one_object(
    stack: Stack, serve: Callable[[Provider], str], tmp_path: Path
) -> None:
    url = serve(stack.provider())
    done = hermetic("connect", url, "--trust", str(stack.trust_path), "--json",
                    "--call", "echo", "--json-args", '{"n": [1, 2]}', cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)
    assert value == {
        "verified": {
            "debug": False,
            "service": SERVICE,
            "release": VERSION,
            "pcrs": {str(i): PCRS[i].hex() for i in (0, 1, 2, 8)},
            "log_index": stack.endorsement.index,
            "config_digest": CONFIG_DIGEST.hex(),
        },
        "result": {"n": [1, 2]},
    }


def test_connect_names_the_failed_check_and_exits_1(
    stack: Stack, serve: Callable[[Provider], str], tmp_path: Path
) -> None:
    url = serve(stack.provider(debug=True))
    done = hermetic("connect", url, "--trust", str(stack.trust_path), "--call", "echo",
                    cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "✓ nitro root" in done.stdout
    assert "✗ debug mode" in done.stdout
    assert "DebugModeError" in done.stderr
    assert "Traceback" not in done.stderr
    allowed = hermetic("connect", url, "--trust", str(stack.trust_path), "--allow-debug",
                       cwd=tmp_path)  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert "✓ debug mode" in allowed.stdout


def test_connect_json_says_a_debug_peer_is_debug_and_no_release(
    stack: Stack, serve: Callable[[Provider], str], tmp_path: Path
) -> None:
    url = serve(stack.provider(debug=True))  # it sends the logged endorsement too
    done = hermetic("connect", url, "--trust", str(stack.trust_path), "--allow-debug", "--json",
                    cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    verified = json.loads(done.stdout)["verified"]
    assert verified["debug"] is True
    assert (verified["service"], verified["release"], verified["log_index"]) == (None, None, None)
    named = hermetic("connect", url, "--trust", str(stack.trust_path), "--allow-debug", "--json",
                     "--service", SERVICE, cwd=tmp_path)  # fmt: skip
    assert named.returncode == 1, named.stderr
    assert "ServiceNotAcceptedError" in named.stderr
    assert "debug peer" in named.stderr


def test_connect_policy_file_and_service_option_reject_other_services(
    stack: Stack, serve: Callable[[Provider], str], tmp_path: Path
) -> None:
    url = serve(stack.provider())
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"services": ["billing"], "max_age_seconds": 60}))
    done = hermetic("connect", url, "--trust", str(stack.trust_path), "--policy", str(policy),
                    cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1
    assert "✗ policy" in done.stdout
    assert "ServiceNotAcceptedError" in done.stderr
    other = hermetic("connect", url, "--trust", str(stack.trust_path), "--service", "billing",
                     cwd=tmp_path)  # fmt: skip
    assert other.returncode == 1
    assert "ServiceNotAcceptedError" in other.stderr


def test_connect_usage_errors_exit_2(stack: Stack, tmp_path: Path) -> None:
    bad_trust = tmp_path / "trust.json"
    bad_trust.write_text('{"log": {"vkey": "x"}}')
    done = hermetic("connect", "tcp://127.0.0.1:1", "--trust", str(bad_trust), cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    url_error = hermetic("connect", "http://x:1", "--trust", str(stack.trust_path), cwd=tmp_path)
    assert url_error.returncode == 2
    assert "ServiceURLError" in url_error.stderr
    help_text = hermetic("connect", "--help", cwd=tmp_path)
    assert help_text.returncode == 0
    assert "--allow-debug" in help_text.stdout
