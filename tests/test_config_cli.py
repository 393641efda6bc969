"""``hermetic config``: the operator makes a key, signs a config, inspects the bundle, and an
image built with that key boots with it (and only with it)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from pathlib import Path

import cbor2
import pytest

from apps.probe.harness import Release, hermetic, refused, release, vsock_url
from hermetic.evidence import USER_DATA_PREFIX
from hermetic.image import build_image

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftover_enclaves")]
ECHO_APP = Path(__file__).resolve().parents[1] / "examples" / "echo"
CONFIG = b'{"environment": "staging", "batch": 64}\n'


def _ok(*args: str) -> str:
    done = hermetic(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def operator_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An operator key made by `hermetic config key`: (private key file, public PEM file)."""
    directory = tmp_path_factory.mktemp("operator")
    private, public = directory / "operator.key", directory / "operator.pub.pem"
    printed = _ok("config", "key", "--out", str(private), "--public-out", str(public))
    assert printed.encode() == public.read_bytes()
    return private, public


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory, operator_files: tuple[Path, Path]) -> Release:
    """A copy of examples/echo whose manifest's operator key is ours, built and published."""
    directory = tmp_path_factory.mktemp("echo")
    app = directory / "echo"
    shutil.copytree(ECHO_APP, app)
    shutil.copy(operator_files[1], app / "operator.pub.pem")
    return release(build_image(app, directory / "echo.img"), directory)


def _sign(tmp_path: Path, key: Path, config: bytes = CONFIG) -> tuple[Path, dict[str, object]]:
    source = tmp_path / "config.json"
    source.write_bytes(config)
    bundle = tmp_path / "config.bundle"
    return bundle, json.loads(
        _ok("config", "sign", str(source), "--key", str(key), "-o", str(bundle))
    )


def test_key_is_written_owner_only_and_never_silently_replaced(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "operator.key"
    public = _ok("config", "key", "--out", str(key))
    assert public.startswith("-----BEGIN PUBLIC KEY-----")
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert os.stat(key).st_mode & 0o777 == 0o600
    again = hermetic("config", "key", "--out", str(key))
    assert again.returncode == 2
    assert "exists; pass --force" in again.stderr
    assert _ok("config", "key", "--out", str(key), "--force") != public


def test_sign_prints_the_sha256_of_the_config_file(
    tmp_path: Path, operator_files: tuple[Path, Path]
) -> None:
    bundle, printed = _sign(tmp_path, operator_files[0])
    assert printed["config_digest"] == hashlib.sha256(CONFIG).hexdigest()
    assert printed["size"] == len(bundle.read_bytes())


def test_inspect_verifies_with_the_operator_key_and_shows_the_attested_digest(
    tmp_path: Path, operator_files: tuple[Path, Path]
) -> None:
    bundle, _ = _sign(tmp_path, operator_files[0])
    shown = json.loads(
        _ok("config", "inspect", str(bundle), "--operator-key", str(operator_files[1]))
    )
    digest = hashlib.sha256(CONFIG).digest()
    assert shown["config_digest"] == digest.hex()
    assert shown["evidence_user_data"] == (USER_DATA_PREFIX + digest).hex()
    assert shown["signature_verified"] is True
    assert shown["values"] == {"environment": "staging", "batch": 64}
    unchecked = json.loads(_ok("config", "inspect", str(bundle)))
    assert unchecked["signature_verified"] is None
    assert unchecked["config_digest"] == digest.hex()


def test_inspect_refuses_a_bundle_signed_by_another_operator(
    tmp_path: Path, operator_files: tuple[Path, Path]
) -> None:
    other = tmp_path / "other.key"
    _ok("config", "key", "--out", str(other))
    bundle, _ = _sign(tmp_path, other)
    done = hermetic("config", "inspect", str(bundle), "--operator-key", str(operator_files[1]))
    assert done.returncode == 1
    assert "does not verify with the image's operator key" in done.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["sign", "{config}", "--key", "{public}", "-o", "{out}"], 2, "operator key: expected"),
        (["sign", "{public}", "--key", "{private}", "-o", "{out}"], 2, "config: not valid JSON"),
        (["sign", "{missing}", "--key", "{private}", "-o", "{out}"], 2, "config: cannot read"),
        (["inspect", "{config}"], 2, "config bundle: not valid CBOR"),
        (["inspect", "{missing}"], 2, "config bundle: cannot read"),
    ],
)
def test_bad_inputs_fail_with_one_line_and_exit_2(
    tmp_path: Path,
    operator_files: tuple[Path, Path],
    args: list[str],
    code: int,
    message: str,
) -> None:
    (tmp_path / "config.json").write_bytes(CONFIG)
    names = {
        "config": tmp_path / "config.json",
        "private": operator_files[0],
        "public": operator_files[1],
        "out": tmp_path / "out.bundle",
        "missing": tmp_path / "missing",
    }
    done = hermetic("config", *(a.format(**names) for a in args))
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_echo_built_with_the_operator_key_boots_with_the_signed_config(
    tmp_path: Path, operator_files: tuple[Path, Path], echo: Release
) -> None:
    bundle, printed = _sign(tmp_path, operator_files[0])
    started = echo.run("--config", str(bundle))
    assert started["State"] == "RUNNING"

    async def scenario() -> tuple[object, bytes | None]:
        async with await echo.connect(vsock_url(started), service="echo") as session:
            return await session.call("echo", "hi"), session.verified.config_digest

    answer, attested = asyncio.run(scenario())
    assert answer == "hi"
    assert attested is not None
    assert attested.hex() == printed["config_digest"]


def test_echo_refuses_a_tampered_bundle(
    tmp_path: Path, operator_files: tuple[Path, Path], echo: Release
) -> None:
    bundle, _ = _sign(tmp_path, operator_files[0])
    signed = cbor2.loads(bundle.read_bytes())
    tampered = tmp_path / "tampered.bundle"
    tampered.write_bytes(
        cbor2.dumps(
            {"config": signed["config"].replace(b"64", b"65"), "signature": signed["signature"]},
            canonical=True,
        )
    )
    refused(echo.image.path, tampered, "does not verify with the image's operator key")
