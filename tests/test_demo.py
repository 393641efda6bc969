"""`make demo` runs `hermetic demo`: it must keep working end to end, and clean up after itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)


def _processes_mentioning(text: str) -> list[str]:
    """Processes whose command line or working directory mentions ``text``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if text in cmdline or cwd.startswith(text):
            found.append(f"{pid}: {cmdline}")
    return found


def test_demo_walks_the_trust_core_and_stops_everything_it_started(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "hermetic", "demo", "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    # The steps a newcomer is promised: a logged, witnessed release verified offline ...
    assert '"verified": true' in out
    # ... a session that verified every check before the call ...
    for check in ("nitro root", "nonce binding", "key binding", "log inclusion", "checkpoint"):
        assert f"✓ {check}" in out
    assert '"hello from the demo"' in out
    # ... a policy rejection and two KMS denials without attestation ...
    assert out.count("-> rejected, as it must be") == 3
    assert "got <absent>" in out
    # ... and a data key released only to the measured enclave.
    assert "unsealed inside the enclave: 'the quarterly numbers'" in out
    assert out.rstrip().endswith("none was skipped.")

    ps = subprocess.run(
        [sys.executable, "-m", "hermetic", "ps", "--json"],
        env={**os.environ, "HERMETIC_STATE_DIR": str(work / "state")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert all(e["State"] != "RUNNING" for e in json.loads(ps.stdout))
    assert _processes_mentioning(str(work)) == []
