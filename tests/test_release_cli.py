"""``hermetic release publish`` + ``verify`` end to end, every step a real subprocess:
a log server, a witness daemon following it, the publisher and the verifier.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hermetic.image import build_image, measure_file
from test_translog_service_support import LogKeys, LogServerProcess, hermetic, make_log_key

ECHO_APP = Path(__file__).resolve().parents[1] / "examples" / "echo"


@dataclass
class Setup:
    tmp: Path
    keys: LogKeys
    url: str
    trust: Path
    publisher_key: Path
    witness_vkey: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("release-cli")
    keys = make_log_key(tmp, "releases.example/log")
    wkey = tmp / "witness.skey"
    wvkey = hermetic("log", "witness-key", "--out", str(wkey), "--name", "w1.example",
                     check=True).stdout.strip()  # fmt: skip
    pub = hermetic("release", "key", "--out", str(tmp / "publisher.pem"), check=True).stdout
    (tmp / "publisher.pub.pem").write_text(pub)
    trust = tmp / "trust.json"
    hermetic("release", "trust", "--log-key", keys.vkey, "--witness", wvkey, "--threshold", "1",
             "--publisher", f"acme={tmp / 'publisher.pub.pem'}", "--out", str(trust),
             check=True)  # fmt: skip
    with LogServerProcess(str(tmp / "log.db"), keys, "--witness", wvkey) as server:
        witness = subprocess.Popen(
            [sys.executable, "-m", "hermetic", "log", "witness", "--log", server.url,
             "--log-key", keys.vkey, "--key", str(wkey), "--state", str(tmp / "w.json"),
             "--interval", "0.2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            yield Setup(tmp, keys, server.url, trust, tmp / "publisher.pem", wvkey)
        finally:
            witness.terminate()
            witness.wait(10)


def publish(s: Setup, out: str, *args: str, key: Path | None = None) -> dict[str, object]:
    result = hermetic("release", "publish", *args, "--key", str(key or s.publisher_key),
                      "--log", s.url, "--out", str(s.tmp / out), timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def verify(
    s: Setup, endorsement: Path, *args: str, trust: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return hermetic("release", "verify", str(endorsement), "--trust", str(trust or s.trust), *args)


PCRS = ("--pcr0", "a0" * 48, "--pcr1", "b1" * 48, "--pcr2", "c2" * 48)


def test_publish_measures_the_image_and_verify_accepts_it(setup: Setup) -> None:
    image = setup.tmp / "echo.img"
    build_image(ECHO_APP, image)
    measured = measure_file(image)
    info = publish(setup, "echo.json", str(image), "--trust", str(setup.trust),
                   "--source-revision", "abc123")  # fmt: skip
    assert info["service"] == measured.service == "echo"
    assert info["pcr0"] == measured.pcr0.hex()
    assert info["cosignatures"] == 1
    result = verify(setup, setup.tmp / "echo.json", "--pcr0", measured.pcr0.hex())
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["verified"] is True
    assert body["publisher"] == "acme"
    assert body["cosigners"] == ["w1.example"]
    assert body["statement"]["source_revision"] == "abc123"
    assert body["statement"]["version"] == measured.version
    wrong = verify(setup, setup.tmp / "echo.json", "--pcr0", "ff" * 48)
    assert wrong.returncode == 1
    assert "ReleaseMismatchError" in wrong.stderr


def _rejected(result: subprocess.CompletedProcess[str], error: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"hermetic: error: {error}:" in result.stderr
    assert "Traceback" not in result.stderr


def test_verify_rejects_each_forgery_with_its_own_error(setup: Setup) -> None:
    publish(setup, "r1.json", *PCRS, "--service", "reporting", "--version", "1.0.0",
            "--trust", str(setup.trust))  # fmt: skip
    publish(setup, "r2.json", *PCRS, "--service", "reporting", "--version", "1.0.1",
            "--trust", str(setup.trust))  # fmt: skip
    assert verify(setup, setup.tmp / "r1.json").returncode == 0
    original = json.loads((setup.tmp / "r1.json").read_text())

    flipped = json.loads(json.dumps(original))
    flipped["entry"]["statement"]["pcr0"] = "a1" + "a0" * 47
    (setup.tmp / "flipped.json").write_text(json.dumps(flipped))
    _rejected(verify(setup, setup.tmp / "flipped.json"), "StatementSignatureError")

    other_key = setup.tmp / "other.pem"
    hermetic("release", "key", "--out", str(other_key), "--type", "p384", check=True)
    publish(setup, "stranger.json", *PCRS, "--service", "reporting", "--version", "6.6.6",
            "--trust", str(setup.trust), key=other_key)  # fmt: skip
    _rejected(verify(setup, setup.tmp / "stranger.json"), "UnknownPublisherError")

    swapped = json.loads(json.dumps(original))
    swapped["log"] = json.loads((setup.tmp / "r2.json").read_text())["log"]
    (setup.tmp / "swapped.json").write_text(json.dumps(swapped))
    _rejected(verify(setup, setup.tmp / "swapped.json"), "InclusionProofError")

    (setup.tmp / "impostor").mkdir()
    impostor = make_log_key(setup.tmp / "impostor", "releases.example/log")
    other_trust = json.loads(setup.trust.read_text())
    other_trust["log"]["vkey"] = impostor.vkey
    (setup.tmp / "other-trust.json").write_text(json.dumps(other_trust))
    _rejected(
        verify(setup, setup.tmp / "r1.json", trust=setup.tmp / "other-trust.json"),
        "UnknownLogError",
    )


def test_unwitnessed_endorsement_fails_a_trust_file_that_needs_a_cosignature(setup: Setup) -> None:
    info = publish(setup, "fresh.json", *PCRS, "--service", "reporting", "--version", "2.0.0",
                   "--log-key", setup.keys.vkey)  # fmt: skip
    assert info["cosignatures"] == 0
    _rejected(verify(setup, setup.tmp / "fresh.json"), "CosignatureThresholdError")


def test_malformed_endorsement_is_a_usage_error(setup: Setup) -> None:
    (setup.tmp / "junk.json").write_text('{"type": "hermetic.endorsement/v1"')
    result = verify(setup, setup.tmp / "junk.json")
    assert result.returncode == 2
    assert "ReleaseFormatError" in result.stderr


def test_monitor_cli_reports_the_published_releases(setup: Setup) -> None:
    publish(setup, "mon.json", *PCRS, "--service", "watched-svc", "--version", "3.0.0",
            "--log-key", setup.keys.vkey)  # fmt: skip
    result = hermetic("log", "monitor", "--log", setup.url, "--log-key", setup.keys.vkey,
                      "--watch", "watched-svc", "--once")  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["statement"]["service"], e["statement"]["version"]) for e in events] == [
        ("watched-svc", "3.0.0")
    ]
    assert events[0]["signature_valid"] is True
