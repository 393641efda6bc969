"""Helpers the runtime tests share: build and release the probe app, run the CLI, call it
through the attested channel, clean up enclaves."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from helpers import hermetic
from hermetic.client import AttestedSession, ClientTrust, ServicePolicy, connect
from hermetic.image import build_image
from hermetic.image.build import BuildResult
from hermetic.launcher import emulated, records
from hermetic.launcher.devrelease import DevLog
from hermetic.nsm import DevPKI
from hermetic.paths import state_dir

HERE = Path(__file__).parent
MARKER = "PROBE-CONSOLE-MARKER-7f3a"


def build_probe(
    workdir: Path, operator: ed25519.Ed25519PrivateKey, egress: tuple[str, ...] = ()
) -> BuildResult:
    app = workdir / "probe"
    app.mkdir(parents=True)
    shutil.copy(HERE / "probe_service.py", app / "probe_service.py")
    pem = operator.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (app / "operator.pub.pem").write_bytes(pem)
    egress_toml = ", ".join(f'"{e}"' for e in egress)
    (app / "hermetic.toml").write_text(
        'name = "probe"\nversion = "1.0.0"\nentry = "probe_service:app"\n'
        "cpus = 1\nmemory_mib = 1024\nports = [5000, 5001]\n"
        f'egress = [{egress_toml}]\noperator_key = "operator.pub.pem"\n'
    )
    return build_image(app, workdir / "probe.img")


@dataclass(frozen=True)
class OperatorImage:
    """An app built from a temporary copy whose ``operator.pub.pem`` is a generated key,
    with its PCR0 (from ``hermetic image measure``) and a dev-log endorsement."""

    path: Path
    pcr0: str
    directory: Path
    operator: ed25519.Ed25519PrivateKey
    endorsement: Path

    def bundle(self, config: dict[str, Any], name: str | None = None) -> Path:
        """``config`` signed by the operator key, as a runtime config bundle file (a fresh
        name unless ``name`` is given, so a running enclave's bundle is never rewritten)."""
        from hermetic.enclave.config import sign_config

        path = self.directory / (name or f"config-{secrets.token_hex(4)}.bundle")
        path.write_bytes(sign_config(json.dumps(config).encode(), self.operator))
        return path


def build_operator_image(
    source: Path,
    directory: Path,
    operator: ed25519.Ed25519PrivateKey,
    module: str,
    change: str = "",
) -> OperatorImage:
    """``hermetic build`` a copy of the app in ``source`` trusting ``operator``; ``change``
    is appended to its ``module`` file (one modified line makes another release)."""
    from hermetic.image import open_image

    app = directory / source.name
    shutil.copytree(source, app)
    (app / "operator.pub.pem").write_bytes(
        operator.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    if change:
        target = app / module
        target.write_text(target.read_text() + change)
    image = directory / f"{source.name}.img"
    built = hermetic("build", str(app), "-o", str(image))
    assert built.returncode == 0, built.stderr
    pcr0 = str(run_json("image", "measure", str(image), "--json")["PCR0"])
    endorsement = directory / f"{source.name}.endorsement.json"
    dev_log = DevLog(directory / "dev-log")
    endorsement.write_bytes(dev_log.publish(open_image(image).measurements).dumps())
    return OperatorImage(image, pcr0, directory, operator, endorsement)


def run_json(*args: str) -> Any:
    done = hermetic(*args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def start_cli(
    background: list[subprocess.Popen[str]],
    *args: str,
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[str], Any]:
    """Start ``python -m hermetic ARGS`` in the background (added to ``background``, the
    conftest fixture that stops it) and return it with the JSON it prints first (the
    addresses of ``proxy``/``up``, the enclave of ``run``); fails if it exits before."""
    process = subprocess.Popen(
        [sys.executable, "-m", "hermetic", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ if env is None else env),
    )
    background.append(process)
    assert process.stdout is not None
    text = ""
    while True:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(
                f"{args[0]} exited before printing its JSON: "
                f"{process.stderr.read() if process.stderr else ''}"
            )
        text += line
        try:
            return process, json.loads(text)
        except ValueError:
            continue


def wait_state(enclave_id: str, state: str, timeout: float = 60) -> records.EnclaveRecord:
    deadline = time.monotonic() + timeout
    while True:
        record = records.load(enclave_id)
        if record.state == state or time.monotonic() > deadline:
            return record
        time.sleep(0.05)


def stop_all() -> None:
    """Terminate every enclave this test's state dir knows (fixtures call it on teardown)."""
    for record in records.all_records():
        if record.state in records.LIVE_STATES:
            emulated.terminate(record.id)


@contextlib.contextmanager
def module_state(state: Path) -> Iterator[Path]:
    """``state`` as the state directory of a whole test module (its KMS, log, images and
    enclaves outlive one test's own directory), with the dev PKI root that `kms serve`
    pins and the launcher's NSM uses; its enclaves stopped and the previous directory
    back afterwards."""
    saved = os.environ.get("HERMETIC_STATE_DIR")
    os.environ["HERMETIC_STATE_DIR"] = str(state)
    try:
        DevPKI().root(datetime.now(UTC))
        yield state
    finally:
        stop_all()
        if saved is None:
            os.environ.pop("HERMETIC_STATE_DIR", None)
        else:
            os.environ["HERMETIC_STATE_DIR"] = saved


def refused(image: Path, bundle: Path, expected: str) -> None:
    """``hermetic run IMAGE --config BUNDLE`` fails with ``expected``; the enclave is FAILED."""
    done = hermetic("run", str(image), "--config", str(bundle))
    assert done.returncode == 1, done.stderr
    assert "enclave refused to start" in done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    listed = run_json("ps", "--json")
    assert [d["State"] for d in listed] == ["FAILED"]
    assert expected in listed[0]["Reason"]


def vsock_url(started: dict[str, Any], port: int = 5000) -> str:
    """The vsock URL of ``port`` on an enclave ``hermetic run`` reported as started."""
    return f"vsock://{started['EnclaveCID']}:{port}"


@dataclass(frozen=True)
class Release:
    """An image published to a dev log under ``directory``, with its endorsement file."""

    image: BuildResult
    directory: Path
    endorsement: Path

    def run(self, *args: str) -> Any:
        """``hermetic run`` this image with its endorsement (and ``args``); the JSON it prints."""
        return run_json("run", str(self.image.path), "--endorsement", str(self.endorsement), *args)

    def trust_file(self) -> Path:
        """A client trust file for this test: this test's dev root, the release's dev log."""
        path = state_dir() / "client-trust.json"
        DevLog(self.directory / "dev-log").write_trust(path)
        return path

    def trust(self) -> ClientTrust:
        return ClientTrust.load(self.trust_file())

    async def connect(
        self, url: str, *, debug: bool = False, service: str = "probe"
    ) -> AttestedSession:
        """A verified session to ``url`` (tcp://, ws://, vsock://) of this release."""
        # A debug peer carries no release, so no service name: accept it as debug only.
        policy = (
            ServicePolicy(allow_debug=True)
            if debug
            else ServicePolicy(services=frozenset({service}))
        )
        session = await connect(url, trust=self.trust(), policy=policy, timeout=60)
        if not debug:
            assert session.verified.pcrs[0] == self.image.measurements.pcr0
            assert session.verified.log_index is not None
        return session

    async def call(self, url: str, method: str, arg: object = None, *, debug: bool = False) -> Any:
        """Open a verified session to ``url`` and call ``method`` with ``arg``."""
        async with await self.connect(url, debug=debug) as session:
            return await session.call(method, arg)


def release(image: BuildResult, directory: Path) -> Release:
    """Publish ``image`` to a fresh dev log in ``directory`` (log, witness, publisher keys)."""
    endorsement = directory / "probe.endorsement.json"
    endorsement.write_bytes(DevLog(directory / "dev-log").publish(image.measurements).dumps())
    return Release(image, directory, endorsement)
