"""A gateway stack on real (emulated) enclaves, for the gateway's soak run and benchmark.

The parts the enclave tests use (``tests/test_gateway_enclave.py`` builds its stack with
them too): images built with ``hermetic build`` and released to a dev log, backends booted
with ``hermetic run``, the gateway with ``hermetic gateway up`` (dialer, proxy, client port
on TCP). :class:`Fleet` is the set of instances of one service that the soak run kills
and restarts, handing the gateway each new instance over its parent port (discovery).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

ROOT = Path(__file__).resolve().parents[1]
GATEWAY_SOURCE = ROOT / "services" / "gateway"
BACKEND_SOURCE = ROOT / "tests" / "apps" / "backend"
BACKEND_PORT = 5001
"""The backends' XX port (the gateway's); 5000, when built with it, is plain NX for
clients that attest the backend directly (the benchmark's direct path)."""


def cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, with this process's environment (its state dir)."""
    return subprocess.run(
        [sys.executable, "-m", "hermetic", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Built:
    path: Path
    pcr0: str
    endorsement: Path


def build(
    work: Path, log: Any, source: Path, name: str, operator: ed25519.Ed25519PrivateKey,
    *, manifest_name: str | None = None, change: str = "", ports: tuple[int, ...] = (5001,),
) -> Built:  # fmt: skip
    """``hermetic build`` a copy of ``source`` (with the operator's key, optionally under
    another manifest name or with a changed line) and publish its release to ``log``."""
    from hermetic.image import open_image

    app = work / "apps" / name
    shutil.copytree(source, app)
    (app / "operator.pub.pem").write_bytes(
        operator.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    if manifest_name is not None:
        (app / "hermetic.toml").write_text(
            f'name = "{manifest_name}"\nversion = "1.0.0"\nentry = "backend_service:app"\n'
            f"cpus = 1\nmemory_mib = 256\nports = {list(ports)}\n"
            'operator_key = "operator.pub.pem"\n'
        )
    if change:
        module = next(app.glob("*_service.py"))
        module.write_text(module.read_text() + change)
    image = work / f"{name}.img"
    done = cli("build", app, "-o", image)
    if done.returncode != 0:
        raise RuntimeError(f"hermetic build {name}: {done.stderr}")
    measurements = open_image(image).measurements
    endorsement = work / f"{name}.endorsement.json"
    endorsement.write_bytes(log.publish(measurements).dumps())
    return Built(image, measurements.pcr0.hex(), endorsement)


def bundle(work: Path, key: ed25519.Ed25519PrivateKey, name: str, values: dict[str, Any]) -> Path:
    """A runtime config bundle signed by the operator ``key``."""
    from hermetic.enclave.config import sign_config

    path = work / f"{name}.bundle"
    path.write_bytes(sign_config(json.dumps(values).encode(), key))
    return path


def boot_backends(specs: list[tuple[str, Built, Path, bool, int]]) -> list[dict[str, Any]]:
    """``hermetic run`` every backend at once, each ``(role, image, config, debug, cid)``;
    their ``hermetic run`` JSON (EnclaveID, EnclaveCID), in order."""
    processes = []
    for _, built, config, debug, cid in specs:
        args = [sys.executable, "-m", "hermetic", "run", str(built.path), "--config", str(config),
                "--endorsement", str(built.endorsement), "--cid", str(cid)]  # fmt: skip
        if debug:
            args.append("--debug")
        processes.append(
            subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    started = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        if process.returncode != 0:
            raise RuntimeError(f"hermetic run: {err}")
        started.append(json.loads(out))
    return started


@dataclass
class GatewayUp:
    """A running ``hermetic gateway up`` and the JSON it printed (tcp, parent, backends).

    Its stderr (the log) is read all along by a thread that keeps the last lines: a pipe
    nobody reads fills up, and then the gateway's proxy and dialer stop with it."""

    process: subprocess.Popen[str]
    up: dict[str, Any]
    log: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=200))

    @property
    def url(self) -> str:
        return f"tcp://{self.up['tcp']}"

    @property
    def parent(self) -> str:
        return str(self.up["parent"])

    def stop(self, grace: float = 15) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _drain(stream: Any, into: collections.deque[str]) -> None:
    for line in stream:
        into.append(line)


def gateway_up(gateway: Built, config: Path, trust: Path, hints: list[str]) -> GatewayUp:
    """Start ``hermetic gateway up`` with ``SERVICE=ADDRESS`` hints; returns once it has
    printed its JSON (the hints attested)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "hermetic", "gateway", "up", str(gateway.path),
         "--config", str(config), "--endorsement", str(gateway.endorsement),
         "--trust", str(trust), "--listen", "127.0.0.1:0",
         *(a for h in hints for a in ("--backend", h))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    up, log = printed_json(process, "gateway up")
    return GatewayUp(process, up, log)


def printed_json(
    process: subprocess.Popen[str], what: str
) -> tuple[dict[str, Any], collections.deque[str]]:
    """The JSON document a starting process prints on stdout (``gateway up``, ``proxy``),
    and the last lines of its output, which threads keep reading until it exits (a pipe
    nobody reads fills up, and the process stops with it)."""
    assert process.stdout is not None
    assert process.stderr is not None
    log: collections.deque[str] = collections.deque(maxlen=200)
    threading.Thread(target=_drain, args=(process.stderr, log), daemon=True).start()
    text = ""
    while True:
        line = process.stdout.readline()
        if not line:
            process.wait(15)
            raise RuntimeError(f"{what} exited: {''.join(log)}")
        text += line
        try:
            shown = json.loads(text)
        except ValueError:
            continue
        threading.Thread(target=_drain, args=(process.stdout, log), daemon=True).start()
        return shown, log


def app_pid(enclave_id: str) -> int | None:
    """The host pid of an enclave's app process (the sandboxed one), from its record."""
    from hermetic.launcher import records

    return records.find(enclave_id).app_pid


@dataclass
class Fleet:
    """The instances of one service that a run kills and restarts.

    ``start`` boots a new instance (``hermetic run``, a CID never used before in this
    fleet) and hands it to the gateway (``add_backend`` on the parent port: it is attested
    before it gets traffic); ``kill`` SIGKILLs an instance's app process (no goodbye: its
    sessions end mid-request), then tells the gateway to forget it and cleans up its
    record. ``modules`` maps every CID the fleet ever used to its enclave ID (the NSM
    module id a receipt names), so an answer can be checked against its receipt.
    """

    service: str
    image: Built
    config: Path
    parent: Any
    """An attested session to the gateway's parent port (hermetic.client.connect)."""
    next_cid: int
    live: dict[int, str] = field(default_factory=dict)
    """CID -> enclave ID of the instances running and admitted."""
    modules: dict[int, str] = field(default_factory=dict)
    started: int = 0
    killed: int = 0

    def address(self, cid: int) -> str:
        return f"vsock://{cid}:{BACKEND_PORT}"

    async def start(self) -> int:
        cid, self.next_cid = self.next_cid, self.next_cid + 1
        spec = [(self.service, self.image, self.config, False, cid)]
        (started,) = await asyncio.to_thread(boot_backends, spec)
        self.modules[cid] = started["EnclaveID"]
        added = await self.parent.call(
            "add_backend", {"service": self.service, "address": self.address(cid)}
        )
        if added.get("state") != "admitted":
            raise RuntimeError(f"instance at CID {cid} not admitted: {added}")
        self.live[cid] = started["EnclaveID"]
        self.started += 1
        return cid

    async def kill(self, cid: int) -> None:
        enclave = self.live.pop(cid)
        pid = await asyncio.to_thread(app_pid, enclave)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.killed += 1
        await self.parent.call(
            "remove_backend", {"service": self.service, "address": self.address(cid)}
        )
        await asyncio.to_thread(cli, "stop", enclave)

    async def stop_all(self) -> None:
        async def stop(cid: int, enclave: str) -> None:
            with contextlib.suppress(Exception):
                await self.parent.call(
                    "remove_backend", {"service": self.service, "address": self.address(cid)}
                )
            await asyncio.to_thread(cli, "stop", enclave)

        live, self.live = self.live, {}
        await asyncio.gather(*(stop(cid, enclave) for cid, enclave in live.items()))


@contextlib.contextmanager
def state_dir(path: Path) -> Iterator[Path]:
    """``path`` as HERMETIC_STATE_DIR (dev PKI root made), its enclaves stopped after."""
    from datetime import UTC, datetime

    from hermetic.launcher import emulated, records
    from hermetic.nsm import DevPKI

    saved = os.environ.get("HERMETIC_STATE_DIR")
    os.environ["HERMETIC_STATE_DIR"] = str(path)
    try:
        DevPKI().root(datetime.now(UTC))
        yield path
    finally:
        for record in records.all_records():
            if record.state in records.LIVE_STATES:
                emulated.terminate(record.id)
        if saved is None:
            os.environ.pop("HERMETIC_STATE_DIR", None)
        else:
            os.environ["HERMETIC_STATE_DIR"] = saved


@dataclass
class Stack:
    """A dev log, an operator, a gateway release admitting ``services`` (each a backend
    build) and the signed configs; :meth:`up` starts the gateway with hints."""

    work: Path
    log: Any
    operator: ed25519.Ed25519PrivateKey
    trust: Path
    gateway: Built
    images: dict[str, Built]
    gateway_config: Path
    backend_config: Path


def make_stack(
    work: Path, services: list[str], *, limits: dict[str, int] | None = None,
    backend_ports: tuple[int, ...] = (5001,),
) -> Stack:  # fmt: skip
    """Build and release the gateway and one backend image per service name, log an
    admission policy admitting exactly those releases, sign both configs."""
    from hermetic.gateway import AdmissionPolicy
    from hermetic.gateway.admission import ADMISSION_V1
    from hermetic.launcher.devrelease import DevLog
    from hermetic.translog.release import GATEWAY_POLICY_V1, PolicyStatement, utc_timestamp

    log = DevLog(work / "dev-log")
    trust = work / "trust.json"
    log.write_trust(trust)
    trust_json = json.loads(trust.read_text())
    operator = ed25519.Ed25519PrivateKey.generate()
    gateway = build(work, log, GATEWAY_SOURCE, "gateway", operator)
    images = {
        name: build(
            work, log, BACKEND_SOURCE, name, operator, manifest_name=name, ports=backend_ports
        )
        for name in services
    }
    admission = {
        "type": ADMISSION_V1,
        "gateway": "gw-bench",
        "services": {name: {"pcr0": [built.pcr0]} for name, built in images.items()},
    }
    digest = AdmissionPolicy.from_json(admission).digest.hex()
    endorsement = log.publish_statement(
        PolicyStatement(GATEWAY_POLICY_V1, "gateway/gw-bench", digest, "1", utc_timestamp())
    )
    gateway_config = bundle(work, operator, "gateway", {
        "gateway": {"admission": admission, "admission_endorsement": endorsement.to_json(),
                    "peers": trust_json, "dialer": f"127.0.0.1:{free_port()}", **(limits or {})},
    })  # fmt: skip
    backend_config = bundle(work, operator, "backend", {
        "backend": {"trust": trust_json, "gateway_pcr0": [gateway.pcr0]}})  # fmt: skip
    return Stack(work, log, operator, trust, gateway, images, gateway_config, backend_config)
