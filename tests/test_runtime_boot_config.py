"""Runtime config at boot: a signed bundle is accepted and attested, a bad one stops boot."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from apps.probe.harness import (
    Release,
    build_probe,
    hermetic,
    refused,
    release,
    run_json,
    vsock_url,
)
from hermetic.attestation.codec import decode
from hermetic.enclave.config import sign_config
from hermetic.enclave.runtime import parse_endorsement
from hermetic.errors import EnclaveBootError, EndorsementMissingError

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftover_enclaves")]
CONFIG = b'{"environment": "staging", "batch": 64}'


def test_signed_config_is_accepted_and_its_digest_is_in_user_data(
    probe: Release, operator: ed25519.Ed25519PrivateKey, tmp_path: Path
) -> None:
    bundle = tmp_path / "config.bundle"
    bundle.write_bytes(sign_config(CONFIG, operator))
    started = probe.run("--config", str(bundle))
    assert started["State"] == "RUNNING"

    async def scenario() -> tuple[object, object, bytes | None]:
        async with await probe.connect(vsock_url(started)) as session:
            seen = await session.call("config")
            document = await session.call("attest", b"n")
            return seen, document, session.verified.config_digest

    seen, document, attested_digest = asyncio.run(scenario())
    assert seen == {
        "values": {"environment": "staging", "batch": 64},
        "digest": hashlib.sha256(CONFIG).digest(),
    }
    # The app's own documents carry the bare digest; the channel's evidence carried it too.
    assert isinstance(document, bytes)
    assert decode(document)[1].user_data == hashlib.sha256(CONFIG).digest()
    assert attested_digest == hashlib.sha256(CONFIG).digest()


def test_without_config_user_data_is_null(probe: Release) -> None:
    started = probe.run()
    document = asyncio.run(probe.call(vsock_url(started), "attest", b"n"))
    assert isinstance(document, bytes)
    assert decode(document)[1].user_data is None


def test_unsigned_bundle_makes_the_enclave_refuse_to_start(probe: Release, tmp_path: Path) -> None:
    bundle = tmp_path / "unsigned.bundle"
    bundle.write_bytes(cbor2.dumps({"config": CONFIG, "signature": b""}))
    refused(probe.image.path, bundle, "expected an operator signature, got none")


def test_tampered_bundle_makes_the_enclave_refuse_to_start(
    probe: Release, operator: ed25519.Ed25519PrivateKey, tmp_path: Path
) -> None:
    good = cbor2.loads(sign_config(CONFIG, operator))
    bundle = tmp_path / "tampered.bundle"
    bundle.write_bytes(
        cbor2.dumps({"config": CONFIG.replace(b"64", b"65"), "signature": good["signature"]})
    )
    refused(probe.image.path, bundle, "does not verify with the image's operator key")


def test_bundle_from_another_operator_is_refused(probe: Release, tmp_path: Path) -> None:
    bundle = tmp_path / "other.bundle"
    bundle.write_bytes(sign_config(CONFIG, ed25519.Ed25519PrivateKey.generate()))
    refused(probe.image.path, bundle, "does not verify with the image's operator key")


def test_endorsement_for_another_image_or_unreadable_is_refused_before_boot(
    probe: Release, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    other_release = release(build_probe(other, ed25519.Ed25519PrivateKey.generate()), other)
    mismatch = hermetic(
        "run", str(probe.image.path), "--endorsement", str(other_release.endorsement)
    )
    assert mismatch.returncode == 1, mismatch.stderr
    assert f"the image's PCR0 is {probe.image.measurements.pcr0.hex()}" in mismatch.stderr
    junk = tmp_path / "junk.json"
    junk.write_text('{"type": "not an endorsement"}')
    unreadable = hermetic("run", str(probe.image.path), "--endorsement", str(junk))
    assert unreadable.returncode == 2, unreadable.stderr
    for done in (mismatch, unreadable):
        assert "Traceback" not in done.stderr
    assert run_json("ps", "--json") == []


@pytest.mark.parametrize(
    "frame", [b"{", b'{"type": "hermetic.endorsement/v1"}', b"\xff\xfe", b"[]", b"null"]
)
def test_enclave_refuses_an_endorsement_frame_it_could_never_send(frame: bytes) -> None:
    with pytest.raises(EnclaveBootError, match="endorsement: "):
        parse_endorsement(frame)


def test_enclave_accepts_a_published_endorsement_or_none(probe: Release) -> None:
    parsed = parse_endorsement(probe.endorsement.read_bytes())
    assert parsed is not None
    assert parsed.signed.statement.pcr0 == probe.image.measurements.pcr0.hex()  # type: ignore[union-attr]
    assert parse_endorsement(b"") is None


def test_production_enclave_without_endorsement_is_run_with_a_warning_and_rejected_by_clients(
    probe: Release,
) -> None:
    done = hermetic("run", str(probe.image.path))
    assert done.returncode == 0, done.stderr
    assert "no endorsement (pass --endorsement FILE): clients will reject" in done.stderr
    started = json.loads(done.stdout)
    with pytest.raises(EndorsementMissingError):
        asyncio.run(probe.call(vsock_url(started), "echo", 1))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_endorsement_frame_parser_only_ever_raises_enclave_boot_error(junk: bytes) -> None:
    with contextlib.suppress(EnclaveBootError):
        parse_endorsement(junk)


def test_every_single_byte_mutation_of_an_endorsement_is_refused_or_still_parses(
    probe: Release,
) -> None:
    """The enclave does not verify endorsements, but no corruption may crash its boot."""
    data = probe.endorsement.read_bytes()
    refused = 0
    for index in range(0, len(data), 3):
        mutated = bytearray(data)
        mutated[index] ^= 0x41
        try:
            parse_endorsement(bytes(mutated))
        except EnclaveBootError:
            refused += 1
    assert refused > len(data) // 6  # most corruptions break the JSON or its fields
