"""Runtime config at boot: a signed bundle is accepted and attested, a bad one stops boot."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from apps.probe.harness import build_probe, hermetic, run_json, stop_all
from hermetic.attestation.codec import decode
from hermetic.enclave.client import ServiceClient
from hermetic.enclave.config import sign_config
from hermetic.image.build import BuildResult

pytestmark = pytest.mark.timeout(120)
CONFIG = b'{"environment": "staging", "batch": 64}'


@pytest.fixture(scope="module")
def operator() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def probe(
    tmp_path_factory: pytest.TempPathFactory, operator: ed25519.Ed25519PrivateKey
) -> BuildResult:
    return build_probe(tmp_path_factory.mktemp("probe"), operator)


@pytest.fixture(autouse=True)
def _no_leftover_enclaves() -> Iterator[None]:
    yield
    stop_all()


async def _call(cid: int, method: str, *args: object) -> object:
    async with await ServiceClient.vsock(cid, 5000) as client:
        return await client.call(method, *args)


def test_signed_config_is_accepted_and_its_digest_is_in_user_data(
    probe: BuildResult, operator: ed25519.Ed25519PrivateKey, tmp_path: Path
) -> None:
    bundle = tmp_path / "config.bundle"
    bundle.write_bytes(sign_config(CONFIG, operator))
    started = run_json("run", str(probe.path), "--config", str(bundle))
    assert started["State"] == "RUNNING"
    seen = asyncio.run(_call(started["EnclaveCID"], "config"))
    assert seen == {
        "values": {"environment": "staging", "batch": 64},
        "digest": hashlib.sha256(CONFIG).digest(),
    }
    document = asyncio.run(_call(started["EnclaveCID"], "attest", b"n"))
    assert isinstance(document, bytes)
    assert decode(document)[1].user_data == hashlib.sha256(CONFIG).digest()


def test_without_config_user_data_is_null(probe: BuildResult) -> None:
    started = run_json("run", str(probe.path))
    document = asyncio.run(_call(started["EnclaveCID"], "attest", b"n"))
    assert isinstance(document, bytes)
    assert decode(document)[1].user_data is None


def _refused(probe: BuildResult, bundle: Path, expected: str) -> None:
    done = hermetic("run", str(probe.path), "--config", str(bundle))
    assert done.returncode == 1
    assert "enclave refused to start" in done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    listed = run_json("ps", "--json")
    assert [d["State"] for d in listed] == ["FAILED"]
    assert expected in listed[0]["Reason"]


def test_unsigned_bundle_makes_the_enclave_refuse_to_start(
    probe: BuildResult, tmp_path: Path
) -> None:
    bundle = tmp_path / "unsigned.bundle"
    bundle.write_bytes(cbor2.dumps({"config": CONFIG, "signature": b""}))
    _refused(probe, bundle, "expected an operator signature, got none")


def test_tampered_bundle_makes_the_enclave_refuse_to_start(
    probe: BuildResult, operator: ed25519.Ed25519PrivateKey, tmp_path: Path
) -> None:
    good = cbor2.loads(sign_config(CONFIG, operator))
    bundle = tmp_path / "tampered.bundle"
    bundle.write_bytes(
        cbor2.dumps({"config": CONFIG.replace(b"64", b"65"), "signature": good["signature"]})
    )
    _refused(probe, bundle, "does not verify with the image's operator key")


def test_bundle_from_another_operator_is_refused(probe: BuildResult, tmp_path: Path) -> None:
    bundle = tmp_path / "other.bundle"
    bundle.write_bytes(sign_config(CONFIG, ed25519.Ed25519PrivateKey.generate()))
    _refused(probe, bundle, "does not verify with the image's operator key")
