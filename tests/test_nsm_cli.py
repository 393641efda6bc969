"""``hermetic nsm``: documents from the emulator verify with --root dev and not with aws."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import helpers
from hermetic.attestation.codec import decode
from hermetic.nsm.pki import root_path


def hermetic(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with no NSM socket configured (commands fall back to the emulator)."""
    return helpers.hermetic(*args, env={"HERMETIC_NSM_SOCKET": ""}, timeout=120)


def test_attest_then_verify_with_dev_root_passes_and_aws_root_fails(tmp_path: Path) -> None:
    out = tmp_path / "doc.cbor"
    made = hermetic("nsm", "attest", "--out", str(out), "--nonce", "0011", "--user-data", "aa")
    assert made.returncode == 0, made.stderr
    dev = hermetic("attestation", "verify", str(out), "--root", "dev", "--nonce", "0011")
    assert dev.returncode == 0, dev.stderr
    aws = hermetic("attestation", "verify", str(out), "--root", "aws")
    assert aws.returncode == 1
    assert "UntrustedRootError" in aws.stderr
    assert "Traceback" not in aws.stderr


def test_attest_with_pcrs_debug_and_pem_public_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    pcr8 = hashlib.sha384(b"signer").hexdigest()
    pcr3 = hashlib.sha384(b"role").hexdigest()
    out = tmp_path / "doc.cbor"
    made = hermetic(
        "nsm", "attest", "--out", str(out), "--public-key", f"@{pem}",
        "--pcr", f"3={pcr3}", "--pcr", f"8={pcr8}", "--debug",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    _, doc = decode(out.read_bytes())
    assert doc.public_key == key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert doc.debug
    assert doc.pcrs[8] == bytes(48)  # debug zeroes PCR8 even when given
    assert doc.pcrs[3].hex() == pcr3
    rejected = hermetic("attestation", "verify", str(out), "--root", "dev")
    assert rejected.returncode == 1
    allowed = hermetic("attestation", "verify", str(out), "--root", "dev", "--allow-debug")
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--pcr", "0=zz"],
        ["--pcr", "0=00"],
        ["--pcr", "32=" + "00" * 48],
        ["--nonce", "xyz"],
    ],
)
def test_bad_options_exit_2_without_traceback(tmp_path: Path, args: list[str]) -> None:
    result = hermetic("nsm", "attest", "--out", str(tmp_path / "d"), *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_oversized_field_is_refused_by_the_module_with_exit_1(tmp_path: Path) -> None:
    result = hermetic("nsm", "attest", "--out", str(tmp_path / "d"), "--nonce", "00" * 1025)
    assert result.returncode == 1
    assert "InputTooLarge" in result.stderr


def test_dev_root_prints_the_persisted_root_and_its_fingerprint(tmp_path: Path) -> None:
    printed = hermetic("nsm", "dev-root")
    assert printed.returncode == 0, printed.stderr
    root = x509.load_pem_x509_certificate(printed.stdout.encode())
    der_sha256 = hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert der_sha256 in printed.stderr
    assert root_path().read_bytes() == printed.stdout.encode()
    out = tmp_path / "root.pem"
    written = hermetic("nsm", "dev-root", "--out", str(out))
    assert written.returncode == 0
    assert out.read_bytes() == printed.stdout.encode()
    assert der_sha256 in written.stdout


def test_describe_prints_the_emulator_description() -> None:
    result = hermetic("nsm", "describe")
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert value["max_pcrs"] == 32
    assert value["locked_pcrs"] == list(range(16))
    assert value["digest"] == "SHA384"
    assert value["module_id"].startswith("i-")


@pytest.mark.parametrize("command", ["attest", "describe", "dev-root", "serve"])
def test_every_nsm_command_has_help(command: str) -> None:
    result = hermetic("nsm", command, "--help")
    assert result.returncode == 0
    assert "Usage:" in result.stdout
