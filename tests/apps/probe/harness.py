"""Helpers the runtime tests share: build the probe app, run the CLI, clean up enclaves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hermetic.image import build_image
from hermetic.image.build import BuildResult
from hermetic.launcher import emulated, records

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


def hermetic(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess (same state dir, through the environment)."""
    return subprocess.run(
        [sys.executable, "-m", "hermetic", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        check=False,
    )


def run_json(*args: str) -> Any:
    done = hermetic(*args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_state(enclave_id: str, state: str, timeout: float = 20) -> records.EnclaveRecord:
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
