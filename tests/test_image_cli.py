"""``hermetic build`` and ``hermetic image``: nitro-cli's JSON keys, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import helpers
from hermetic.image import measure_file
from test_image_eif import BOOTSTRAP, CMDLINE, CUSTOMER, KERNEL, make_eif, make_signer, tpm_pcr

ROOT = Path(__file__).resolve().parents[1]
ECHO = ROOT / "examples" / "echo"


def hermetic(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI without SOURCE_DATE_EPOCH (reproducibility must not depend on it)."""
    env: dict[str, str | None] = {"SOURCE_DATE_EPOCH": None}
    if path is not None:
        env["PATH"] = path
    return helpers.hermetic(*args, env=env, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("hermetic: error: ")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    out = tmp_path_factory.mktemp("cli") / "X.img"
    result = hermetic("build", str(ECHO), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


def test_build_prints_nitro_cli_build_output(built: tuple[Path, dict[str, object]]) -> None:
    path, output = built
    assert list(output) == ["Measurements"]
    measurements = output["Measurements"]
    assert isinstance(measurements, dict)
    assert list(measurements) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2"]
    assert measurements["PCR0"] == measure_file(path).pcr0.hex()


def test_measure_json_uses_nitro_cli_keys(built: tuple[Path, dict[str, object]]) -> None:
    path, _ = built
    result = hermetic("image", "measure", str(path), "--json")
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert list(value) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2"]
    assert value["HashAlgorithm"] == "Sha384 { ... }"
    m = measure_file(path)
    assert (value["PCR0"], value["PCR1"], value["PCR2"]) == (
        m.pcr0.hex(),
        m.pcr1.hex(),
        m.pcr2.hex(),
    )


def test_measure_signed_eif_prints_pcr8(tmp_path: Path) -> None:
    signer = make_signer()
    path = tmp_path / "F.eif"
    path.write_bytes(make_eif(signer=signer))
    text = hermetic("image", "measure", str(path))
    assert text.returncode == 0, text.stderr
    assert f"PCR0  {tpm_pcr(KERNEL + CMDLINE + BOOTSTRAP + CUSTOMER).hex()}" in text.stdout
    assert f"PCR8  {tpm_pcr(signer.cert_der).hex()}" in text.stdout
    value = json.loads(hermetic("image", "measure", str(path), "--json").stdout)
    assert list(value) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert value["PCR2"] == tpm_pcr(CUSTOMER).hex()


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage that is no image", b".eif" + b"\x00" * 600, b"HRMTIMG\n\x00\x01"],
)
def test_bad_files_exit_2_with_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.img"
    path.write_bytes(content)
    assert_one_line_error(hermetic("image", "measure", str(path)), 2)


def test_measure_refuses_a_version_1_image_and_says_to_rebuild(
    built: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    # Version 1 had this layout; its PCR0 did not commit to the layer boundaries.
    body = bytearray(built[0].read_bytes()[:-4])
    struct.pack_into(">H", body, 8, 1)
    old = tmp_path / "old.img"
    old.write_bytes(bytes(body) + struct.pack(">I", zlib.crc32(body)))
    for command in (["image", "measure", str(old)], ["image", "inspect", str(old)]):
        result = hermetic(*command)
        assert_one_line_error(result, 2)
        assert "ImageVersionError" in result.stderr
        assert "rebuild the image with `hermetic build`" in result.stderr


def test_eif_with_bad_crc_exits_2(tmp_path: Path) -> None:
    eif = bytearray(make_eif())
    eif[-1] ^= 1
    path = tmp_path / "bad.eif"
    path.write_bytes(bytes(eif))
    result = hermetic("image", "measure", str(path), "--json")
    assert_one_line_error(result, 2)
    assert "EIFChecksumError" in result.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    assert_one_line_error(hermetic("image", "measure", str(tmp_path / "nope.img")), 2)


def test_bad_manifest_exits_2(tmp_path: Path) -> None:
    (tmp_path / "hermetic.toml").write_text('name = "x"\n')
    result = hermetic("build", str(tmp_path), "-o", str(tmp_path / "x.img"))
    assert_one_line_error(result, 2)
    assert "missing required field" in result.stderr


def test_eif_build_without_nitro_cli_names_the_dockerfile(tmp_path: Path) -> None:
    out = tmp_path / "echo.eif"
    result = hermetic("build", str(ECHO), "--eif", "-o", str(out), path="/nonexistent")
    assert_one_line_error(result, 1)
    assert "nitro-cli is not installed" in result.stderr
    dockerfile = tmp_path / "echo.eif.docker" / "Dockerfile"
    assert str(dockerfile) in result.stderr
    assert dockerfile.read_text().startswith("# Generated by `hermetic build --eif`")
    assert (tmp_path / "echo.eif.docker" / "app" / "hermetic.toml").is_file()
    assert (tmp_path / "echo.eif.docker" / "runtime" / "hermetic" / "__init__.py").is_file()


def _fake_nitro_cli(bindir: Path, eif: Path, reported_pcr0: str) -> None:
    """A nitro-cli stand-in: copies a prepared EIF to --output-file, prints build output."""
    bindir.mkdir()
    script = bindir / "nitro-cli"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, shutil, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[0] == 'build-enclave' and '--docker-dir' in args, args\n"
        f"shutil.copyfile({str(eif)!r}, args[args.index('--output-file') + 1])\n"
        "print(json.dumps({'Measurements': {'HashAlgorithm': 'Sha384 { ... }', "
        f"'PCR0': {reported_pcr0!r}}}}}))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_eif_build_runs_nitro_cli_and_checks_its_pcrs(tmp_path: Path) -> None:
    prepared = tmp_path / "prepared.eif"
    prepared.write_bytes(make_eif())
    pcr0 = measure_file(prepared).pcr0.hex()
    _fake_nitro_cli(tmp_path / "bin", prepared, pcr0)
    out = tmp_path / "echo.eif"
    path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    result = hermetic("build", str(ECHO), "--eif", "-o", str(out), path=path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Measurements"]["PCR0"] == pcr0
    assert out.read_bytes() == prepared.read_bytes()


def test_eif_build_rejects_nitro_cli_output_that_disagrees_with_the_file(tmp_path: Path) -> None:
    prepared = tmp_path / "prepared.eif"
    prepared.write_bytes(make_eif())
    _fake_nitro_cli(tmp_path / "bin", prepared, "00" * 48)
    path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    result = hermetic("build", str(ECHO), "--eif", "-o", str(tmp_path / "e.eif"), path=path)
    assert_one_line_error(result, 1)
    assert "EIFBuildError" in result.stderr


def test_build_signed_and_inspect(tmp_path: Path) -> None:
    signer = make_signer()
    from cryptography.hazmat.primitives import serialization

    key = tmp_path / "key.pem"
    key.write_bytes(
        signer.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert = tmp_path / "cert.pem"
    cert.write_bytes(signer.cert_pem)
    out = tmp_path / "s.img"
    result = hermetic(
        "build", str(ECHO), "-o", str(out), "--sign-key", str(key), "--sign-cert", str(cert)
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Measurements"]["PCR8"] == tpm_pcr(signer.cert_der).hex()
    info = json.loads(hermetic("image", "inspect", str(out)).stdout)
    assert info["Manifest"]["name"] == "echo"
    assert info["Signers"] == ["CN=eif test signer"]
    assert "echo_service.py" in info["AppFiles"]
    only_key = hermetic("build", str(ECHO), "-o", str(out), "--sign-key", str(key))
    assert_one_line_error(only_key, 2)
