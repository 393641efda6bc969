"""The dev release behind `hermetic up`, and `hermetic release trust --nitro-root`.

The dev log is real: its endorsements verify with the log's own offline verifier and with
the client's evidence verifier, its keys persist across uses (so a client's trust file stays
valid between `up` runs), and only the published image verifies.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from helpers import hermetic
from hermetic.attestation import TrustRoot
from hermetic.channel.noise import StaticKeypair
from hermetic.client import ClientTrust, ServicePolicy, connect, serve_attested
from hermetic.errors import InclusionProofError, ReleaseMismatchError
from hermetic.evidence import make_evidence_provider
from hermetic.image.pcrs import Measurements
from hermetic.launcher.devrelease import LOG_ORIGIN, PUBLISHER_NAME, DevLog
from hermetic.nsm import EmulatedNSM, NSMClient
from hermetic.nsm.pki import DevPKI
from hermetic.translog.release import verify_endorsement


def _measurements(label: bytes) -> Measurements:
    pcrs = [bytes([n]) * 16 + os.urandom(32) for n in range(3)]
    return Measurements("hermetic", *pcrs, None, label.decode(), "1.0.0")  # type: ignore[arg-type]


def _hermetic(*args: str) -> subprocess.CompletedProcess[str]:
    return hermetic(*args, timeout=60)


def test_dev_release_verifies_offline_against_the_trust_it_writes(tmp_path: Path) -> None:
    log = DevLog(tmp_path / "dev-log")
    measured = _measurements(b"svc")
    endorsement = log.publish(measured)
    trust = log.write_trust(tmp_path / "trust.json")
    release = verify_endorsement(endorsement, trust.translog, expected_pcr0=measured.pcr0.hex())
    assert release.publisher == PUBLISHER_NAME
    assert release.origin == LOG_ORIGIN
    assert release.cosigners == ("dev.hermetic.local/witness",)
    assert trust.translog.log.threshold == 1
    assert trust.root.fingerprint == TrustRoot.dev().fingerprint
    for key in ("log.skey", "witness.skey", "publisher.pem"):
        assert stat.S_IMODE((tmp_path / "dev-log" / key).stat().st_mode) == 0o600


def test_dev_log_keeps_its_keys_and_appends_so_old_trust_files_stay_valid(tmp_path: Path) -> None:
    first = DevLog(tmp_path / "dev-log")
    trust = first.write_trust(tmp_path / "trust.json")
    earlier = first.publish(_measurements(b"a"))
    later = DevLog(tmp_path / "dev-log").publish(_measurements(b"b"))
    assert later.index == earlier.index + 1
    for endorsement in (earlier, later):
        verify_endorsement(endorsement, trust.translog)
    assert DevLog(tmp_path / "dev-log").signer.vkey == first.signer.vkey


def test_dev_release_with_a_wrong_proof_or_pcr0_is_rejected(tmp_path: Path) -> None:
    log = DevLog(tmp_path / "dev-log")
    log.publish(_measurements(b"before"))
    endorsement = log.publish(_measurements(b"svc"))
    trust = log.write_trust(tmp_path / "trust.json")
    with pytest.raises(ReleaseMismatchError):
        verify_endorsement(endorsement, trust.translog, expected_pcr0="00" * 48)
    proof = list(endorsement.inclusion_proof)
    proof[0] = bytes(32)
    with pytest.raises(InclusionProofError):
        verify_endorsement(replace(endorsement, inclusion_proof=tuple(proof)), trust.translog)


def _release_trust(tmp_path: Path, log: DevLog, *extra: str) -> subprocess.CompletedProcess[str]:
    pub = tmp_path / "publisher.pub.pem"
    pub.write_text(log.publisher_public_pem)
    return _hermetic(
        "release", "trust", "--log-key", log.signer.vkey, "--witness", log.witness.vkey,
        "--threshold", "1", "--publisher", f"{PUBLISHER_NAME}={pub}",
        "--out", str(tmp_path / "cli-trust.json"), *extra,
    )  # fmt: skip


def test_release_trust_with_nitro_root_dev_is_a_client_trust_file_that_connects(
    tmp_path: Path,
) -> None:
    log = DevLog(tmp_path / "dev-log")
    measured = _measurements(b"svc")
    endorsement = log.publish(measured)
    done = _release_trust(tmp_path, log, "--nitro-root", "dev")
    assert done.returncode == 0, done.stderr
    trust = ClientTrust.load(tmp_path / "cli-trust.json")
    assert trust.root.fingerprint == TrustRoot.dev().fingerprint
    assert trust.translog == log.write_trust(tmp_path / "sdk-trust.json").translog

    pcrs = {0: measured.pcr0, 1: measured.pcr1, 2: measured.pcr2}
    provider = make_evidence_provider(NSMClient(EmulatedNSM(pcrs)), endorsement, None)

    async def scenario() -> object:
        static = StaticKeypair.generate()
        path = tmp_path / "svc.sock"

        async def echo(arg: object) -> object:
            return arg

        server = await asyncio.start_unix_server(
            lambda r, w: serve_attested(r, w, provider, {"echo": echo}, static=static),
            path=str(path),
        )
        try:
            policy = ServicePolicy(services=frozenset({"svc"}))
            async with await connect(f"unix://{path}", trust=trust, policy=policy) as session:
                assert session.verified.pcrs[0] == measured.pcr0
                assert session.verified.log_index == endorsement.index
                return await session.call("echo", "hi")
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(scenario()) == "hi"


def test_release_trust_pins_aws_or_a_pem_root_and_refuses_anything_else(
    tmp_path: Path,
) -> None:
    log = DevLog(tmp_path / "dev-log")
    assert _release_trust(tmp_path, log, "--nitro-root", "aws").returncode == 0
    assert ClientTrust.load(tmp_path / "cli-trust.json").root.name == "aws"
    pem = tmp_path / "root.pem"
    DevPKI().root(datetime.now(UTC))
    pem.write_bytes(TrustRoot.dev().certificate.public_bytes(Encoding.PEM))
    assert _release_trust(tmp_path, log, "--nitro-root", str(pem)).returncode == 0
    pinned = json.loads((tmp_path / "cli-trust.json").read_text())["nitro_root"]
    assert pinned["sha256"] == TrustRoot.dev().fingerprint
    assert _release_trust(tmp_path, log).returncode == 0
    assert "nitro_root" not in json.loads((tmp_path / "cli-trust.json").read_text())
    bad = _release_trust(tmp_path, log, "--nitro-root", "azure")
    assert bad.returncode == 2
    assert "--nitro-root must be aws, dev or a PEM file" in bad.stderr
    assert "Traceback" not in bad.stderr
