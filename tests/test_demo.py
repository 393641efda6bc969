"""`make demo` runs `hermetic demo`: it must keep working end to end, and clean up after itself."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hermetic.persistence.sealing import parse_header
from hermetic.store.records import RecordStore

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
    _check_persistence_part(work, out)
    assert out.rstrip().endswith("none was skipped.")

    ps = subprocess.run(
        [sys.executable, "-m", "hermetic", "ps", "--json"],
        env={**os.environ, "HERMETIC_STATE_DIR": str(work / "state")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    enclaves = json.loads(ps.stdout)
    assert {e["EnclaveName"] for e in enclaves} == {"echo", "vault", "persistence", "keyreader"}
    assert all(e["State"] != "RUNNING" for e in enclaves)
    assert _processes_mentioning(str(work)) == []


def _pcr0(image: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "hermetic", "image", "measure", str(image), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return str(json.loads(done.stdout)["PCR0"])


def _check_persistence_part(work: Path, out: str) -> None:
    """Steps 6-8, checked against what the demo left in its workdir, not only its words:
    the images it built, the local KMS's log and the record store's database."""
    persistence, keyreader = _pcr0(work / "persistence.img"), _pcr0(work / "keyreader.img")
    # Each release logged with the PCR0 of the image that ran.
    assert f"✓ logged PCR0 {persistence} = the measured one" in out
    assert f"✓ logged PCR0 {keyreader} = the measured one" in out
    # The root key: one KMS call at boot, released to the attested persistence image only.
    released = [
        line
        for line in (work / "local-KMS.log").read_text().splitlines()
        if f"ImageSha384={persistence}" in line
    ]
    assert len(released) == 1
    assert "allowed kms:GenerateDataKey" in released[0]
    assert '"root_key": "generated", "kms_calls": 1' in out
    # The keyreader fetched the key at boot, before anyone connected to it, and the
    # tenant's verified audit trail names that release.
    assert "keyreader fetched the key with no client connected" in out
    fetched = re.findall(r"^ +\d+ +get +get_key +insights/app-usage +1 +(.+?)  feature", out, re.M)
    assert fetched == [f"service keyreader 0.1.0 pcr0 {keyreader[:16]}"]
    assert "hash chain verified" in out
    # The key the admin put is the one the keyreader used (its MAC) ...
    shown = re.search(r"the tenant's key \(a demo key, shown so you can look for it\): (\w+)", out)
    assert shown is not None
    material = bytes.fromhex(shown.group(1))
    mac = re.search(r'"report_mac": "(\w+)"', out)
    assert mac is not None
    assert mac.group(1) == hmac.digest(material, b"keyreader report", hashlib.sha256).hex()
    # ... and none of the store's records or database files holds it; tenant records are
    # sealed records, and there are audit records of the fetch.
    with RecordStore(work / "records.db") as store:
        records = [store.get(info.id) for info in store.scan("demo-store/")]
    assert records
    assert all(material not in r.data and material.hex().encode() not in r.data for r in records)
    tenant = [r for r in records if r.id.startswith("demo-store/tenants/acme/")]
    for record in tenant:
        parse_header(record.data)
    assert len([r for r in tenant if "/audit/" in r.id]) >= 4
    for path in work.glob("records.db*"):
        assert material not in path.read_bytes()
    assert "the parent holds no plaintext" in out
