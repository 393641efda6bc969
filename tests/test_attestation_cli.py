"""``hermetic attestation`` as a user runs it: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from helpers import hermetic
from test_attestation_verify import VECTORS, Vector, _window_end

IDS = [v.name for v in VECTORS]


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return hermetic("attestation", *args, timeout=60)


def _assert_rejected(result: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]


def _file(vectors: Path, vector: Vector) -> Path:
    return vectors / "nitro" / f"{vector.name}.cbor"


def _reference_args(vector: Vector) -> list[str]:
    pcrs = {0: vector.pcr0, 1: vector.pcr1, 2: vector.pcr2, 8: vector.pcr8}
    return [arg for i, v in pcrs.items() for arg in ("--pcr", f"{i}={v}")]


def _debug_args(vector: Vector) -> list[str]:
    return ["--allow-debug"] if vector.debug else []


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_cli_verifies_vector_at_its_time(vectors: Path, vector: Vector) -> None:
    result = _run(
        "verify",
        _file(vectors, vector),
        "--at",
        str(vector.verify_at),
        *_reference_args(vector),
        *_debug_args(vector),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["verified"] is True
    assert out["debug"] is vector.debug
    assert out["root_sha256"].startswith("641a0321")
    assert [out["pcrs"][k] for k in ("0", "1", "2", "8")] == [
        vector.pcr0,
        vector.pcr1,
        vector.pcr2,
        vector.pcr8,
    ]


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_cli_rejects_vector_after_its_window(vectors: Path, vector: Vector) -> None:
    path = _file(vectors, vector)
    end = _window_end(path.read_bytes())
    args = ["verify", path, *_debug_args(vector)]
    assert _run(*args, "--at", end.isoformat()).returncode == 0
    late = (end + timedelta(seconds=1)).isoformat()
    _assert_rejected(_run(*args, "--at", late), 1, "CertificateValidityError")


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_cli_rejects_vector_at_current_time(vectors: Path, vector: Vector) -> None:
    result = _run("verify", _file(vectors, vector), *_debug_args(vector))
    _assert_rejected(result, 1, "CertificateValidityError")


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_cli_rejects_wrong_pcr(vectors: Path, vector: Vector) -> None:
    wrong = "ff" + vector.pcr1[2:]
    result = _run(
        "verify",
        _file(vectors, vector),
        "--at",
        str(vector.verify_at),
        "--pcr",
        f"1={wrong}",
        *_debug_args(vector),
    )
    _assert_rejected(result, 1, f"PCR1: expected {wrong}, got {vector.pcr1}")


@pytest.mark.parametrize("vector", [v for v in VECTORS if v.debug], ids=lambda v: v.name)
def test_cli_rejects_debug_vector_without_allow_debug(vectors: Path, vector: Vector) -> None:
    result = _run("verify", _file(vectors, vector), "--at", str(vector.verify_at))
    _assert_rejected(result, 1, "DebugModeError")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--pcr", "0=zz"], "--pcr 0: expected hex"),
        (["--pcr", "40=00"], "--pcr: index must be 0..31"),
        (["--pcr", "nonsense"], "--pcr: expected N=HEX"),
        (["--at", "yesterday"], "--at: expected ISO 8601 or unix seconds"),
        (["--nonce", "0"], "--nonce: expected hex"),
        (["--root", "/does/not/exist.pem"], "--root: expected aws, dev or a readable PEM"),
        (["--root", "dev"], "hermetic nsm attest"),
        (["--max-age", "-1"], "--max-age: must not be negative"),
        (["--bogus"], "No such option"),
    ],
)
def test_cli_bad_option_exits_2(vectors: Path, args: list[str], needle: str) -> None:
    result = _run("verify", _file(vectors, VECTORS[0]), *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in result.stderr


def test_cli_unreadable_input_exits_2(vectors: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.cbor"
    garbage.write_bytes(b"\x84\x44\xa1\x01\x38\x22\xa0")
    _assert_rejected(_run("verify", garbage), 2, "AttestationFormatError")
    _assert_rejected(_run("inspect", garbage), 2, "AttestationFormatError")
    _assert_rejected(_run("verify", tmp_path / "missing.cbor"), 2, "No such file")


def test_cli_tampered_signature_exits_1(vectors: Path, tmp_path: Path) -> None:
    vector = VECTORS[0]
    data = bytearray(_file(vectors, vector).read_bytes())
    data[-10] ^= 0x40
    tampered = tmp_path / "tampered.cbor"
    tampered.write_bytes(bytes(data))
    result = _run("verify", tampered, "--at", str(vector.verify_at))
    _assert_rejected(result, 1, "SignatureInvalidError")


def test_cli_max_age(vectors: Path) -> None:
    vector = next(v for v in VECTORS if v.name == "libsignal-2")
    path = _file(vectors, vector)
    later = str(vector.verify_at + 120)
    assert _run("verify", path, "--at", later, "--max-age", "121").returncode == 0
    _assert_rejected(_run("verify", path, "--at", later, "--max-age", "60"), 1, "DocumentAgeError")


def test_cli_binds_user_data_and_nonce(vectors: Path) -> None:
    vector = next(v for v in VECTORS if v.name == "nitrite-blocky-1")
    path, at = _file(vectors, vector), str(vector.verify_at)
    ones = "01" * 1024
    ok = _run("verify", path, "--at", at, "--nonce", ones, "--user-data", ones)
    assert ok.returncode == 0, ok.stderr
    assert "verified: i-0a22e5c5f24d22174-enc0191cceb4289903f" in ok.stdout
    bad = _run("verify", path, "--at", at, "--public-key", "02" * 1024)
    _assert_rejected(bad, 1, "PublicKeyMismatchError")


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_cli_inspect_json_matches_readme(vectors: Path, vector: Vector) -> None:
    result = _run("inspect", _file(vectors, vector), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) >= {
        "module_id",
        "timestamp",
        "digest",
        "pcrs",
        "public_key",
        "user_data",
        "nonce",
        "certificates",
    }
    assert [out["pcrs"][k] for k in ("0", "1", "2", "8")] == [
        vector.pcr0,
        vector.pcr1,
        vector.pcr2,
        vector.pcr8,
    ]
    assert out["timestamp"] // 1000 == vector.verify_at
    assert out["digest"] == "SHA384"
    assert len(out["certificates"]) == 5
    assert out["certificates"][-1]["subject"] == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    assert {"subject", "not_before", "not_after"} <= set(out["certificates"][0])


def test_cli_inspect_text_shows_sizes_and_chain(vectors: Path) -> None:
    result = _run("inspect", vectors / "nitro" / "evervault-1.cbor")
    assert result.returncode == 0, result.stderr
    assert "module_id   i-020b6af9246d90e92-enc0183d09086c24190" in result.stdout
    assert "nonce       256 bytes" in result.stdout
    assert "public_key  absent" in result.stdout
    assert "root         CN=aws.nitro-enclaves" in result.stdout


def test_cli_help_is_available() -> None:
    for sub in ([], ["inspect"], ["verify"]):
        result = _run(*sub, "--help")
        assert result.returncode == 0
        assert "Usage:" in result.stdout
