"""An independent client, written from docs/protocol.md and docs/evidence.md, uses a running
service exactly as a user starts it (``hermetic up examples/echo``).

Why: the in-process interop test (test_channel_interop.py) proves the channel matches the
protocol document; this one proves the whole path a third-party client meets does: the
enclave runtime, the blind proxy, the real evidence bundle and the dev log's endorsement.
The client side uses only dissononce (tests/dissononce_client.py), cbor2, ``cryptography``
and hashlib: every format check below (deterministic CBOR, COSE_Sign1 layout, the
session bindings, user_data, the publisher's signature, the RFC 9162 inclusion proof, the
C2SP checkpoint signature and cosignature) is written here from the documents. The one
exception is the attestation document's certificate chain and ES384 signature, checked
with ``hermetic.attestation`` against the dev root pinned in the trust file: that is the
attestation verifier, not the channel.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from dissononce.exceptions.decrypt import DecryptFailedException

from apps.probe.harness import stop_all
from dissononce_client import DocClient
from hermetic.attestation import Policy, TrustRoot, verify
from hermetic.image.pcrs import Measurements
from hermetic.launcher.devrelease import DevLog

pytestmark = pytest.mark.timeout(120)
ECHO = Path(__file__).resolve().parents[1] / "examples" / "echo"
USER_DATA_PREFIX = b"hermetic.evidence/v1"  # docs/evidence.md §2.1
EARLIER_RELEASES = 5  # logged before the echo release, so its inclusion proof is not empty


@pytest.fixture
def running_echo(tmp_path: Path) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``hermetic up examples/echo --trust-out``: (its printed addresses, the trust file)."""
    dev_log = DevLog()  # the same state dir `up` uses, through HERMETIC_STATE_DIR
    for n in range(EARLIER_RELEASES):
        pcrs = [hashlib.sha384(f"other {n} pcr{i}".encode()).digest() for i in range(3)]
        dev_log.publish(Measurements("hermetic", *pcrs, service="other", version=f"0.{n}"))
    trust = tmp_path / "trust.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hermetic",
            "up",
            str(ECHO),
            "--listen",
            "127.0.0.1:0",
            "--trust-out",
            str(trust),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        text = ""
        while True:  # one JSON document, printed once the service is reachable
            line = process.stdout.readline()
            if not line:
                raise AssertionError(f"hermetic up exited: {process.stderr.read()}")
            text += line
            try:
                started = json.loads(text)
                break
            except ValueError:
                continue
        yield started, json.loads(trust.read_text())
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stop_all()


# --- independent checks, written from the documents ------------------------------------------


def cose_payload(attestation: bytes) -> dict[str, Any]:
    """The NSM document's payload map: COSE_Sign1 = [protected, unprotected, payload, sig]."""
    cose = cbor2.loads(attestation)
    if isinstance(cose, cbor2.CBORTag):  # tag 18 is allowed, NSM output is untagged
        assert cose.tag == 18
        cose = cose.value
    assert isinstance(cose, list)
    assert len(cose) == 4
    payload = cbor2.loads(cose[2])
    assert isinstance(payload, dict)
    return payload


def rfc9162_root_from_inclusion(leaf: bytes, index: int, size: int, path: list[bytes]) -> bytes:
    """RFC 9162 §2.1.3.2: the root a leaf hash and its audit path (leaf side first) imply."""
    assert index < size
    fn, sn, r = index, size - 1, leaf
    for p in path:
        assert sn != 0, "proof longer than the tree is deep"
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0, "proof shorter than the tree is deep"
    return r


def note_signatures(note: str) -> tuple[bytes, dict[str, bytes]]:
    """C2SP signed-note: (signed text, {key name: 4-byte key ID || signature})."""
    text, _, signatures = note.rpartition("\n\n")
    lines = {}
    for line in signatures.splitlines():
        assert line.startswith("\u2014 ")
        name, blob = line[2:].rsplit(" ", 1)
        lines[name] = base64.b64decode(blob, validate=True)
    return (text + "\n").encode("utf-8"), lines


def vkey_public(vkey: str, signature_type: int) -> tuple[str, bytes, ed25519.Ed25519PublicKey]:
    """A C2SP vkey ``name+keyid+base64(type || pubkey)``: (name, key ID, public key)."""
    name, key_id, blob = vkey.split("+", 2)
    raw = base64.b64decode(blob)
    assert raw[0] == signature_type
    expected_id = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    assert expected_id.hex() == key_id
    return name, expected_id, ed25519.Ed25519PublicKey.from_public_bytes(raw[1:])


def check_endorsement(
    endorsement: dict[str, Any], trust: dict[str, Any], doc_pcrs: dict[int, bytes]
) -> dict[str, Any]:
    """Publisher signature, PCRs, inclusion and checkpoint signatures; returns the statement."""
    envelope = json.loads(endorsement["entry"])
    canonical = json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical.encode("utf-8") == endorsement["entry"], "entry is canonical JSON"
    assert envelope["type"] == "hermetic.signed-statement/v1"
    statement = envelope["statement"]
    assert statement["type"] == "hermetic.release/v1"
    pinned = {p["public_key_pem"] for p in trust["publishers"]}
    assert envelope["publisher"]["public_key_pem"] in pinned
    publisher = serialization.load_pem_public_key(envelope["publisher"]["public_key_pem"].encode())
    assert isinstance(publisher, ed25519.Ed25519PublicKey)
    signed = json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    publisher.verify(base64.b64decode(envelope["signature"]), signed.encode("utf-8"))
    for i in (0, 1, 2):
        assert bytes.fromhex(statement[f"pcr{i}"]) == doc_pcrs[i]
    assert statement["pcr8"] is None
    assert doc_pcrs[8] == bytes(48)

    signed_text, signatures = note_signatures(endorsement["checkpoint"])
    origin, size, root_b64 = signed_text.decode().splitlines()[:3]
    assert origin == endorsement["origin"]
    leaf = hashlib.sha256(b"\x00" + endorsement["entry"]).digest()
    implied = rfc9162_root_from_inclusion(
        leaf, endorsement["index"], int(size), endorsement["inclusion_proof"]
    )
    assert implied == base64.b64decode(root_b64)

    log_name, log_id, log_key = vkey_public(trust["log"]["vkey"], 0x01)
    assert log_name == origin
    assert signatures[log_name][:4] == log_id
    log_key.verify(signatures[log_name][4:], signed_text)
    (witness_vkey,) = trust["log"]["witnesses"]
    witness_name, witness_id, witness_key = vkey_public(witness_vkey, 0x04)
    cosignature = signatures[witness_name]
    assert cosignature[:4] == witness_id
    timestamp = int.from_bytes(cosignature[4:12], "big")
    message = f"cosignature/v1\ntime {timestamp}\n".encode() + signed_text
    witness_key.verify(cosignature[12:], message)
    return statement


# --- the test ---------------------------------------------------------------------------------


async def _session(host: str, port: int, trust: dict[str, Any], pcr0: str) -> bytes:
    """One verified session with two echo calls; returns its handshake hash."""
    client = DocClient(*await asyncio.open_connection(host, port))
    handshake_hash, server_static = await client.handshake()
    assert len(handshake_hash) == 32
    assert len(server_static) == 32

    # protocol.md §3.1: the first transport message is the evidence bundle.
    bundle_bytes = await client.read_message()
    bundle = cbor2.loads(bundle_bytes)
    assert cbor2.dumps(bundle, canonical=True) == bundle_bytes, "deterministic CBOR"
    assert bundle_bytes[:1] == b"\xa4"
    assert bundle_bytes[1:4] == b"\x61v\x01"
    assert set(bundle) == {"v", "attestation", "endorsement", "config_digest"}
    assert bundle["v"] == 1

    # The two binding rules, with independent decoding of the document.
    payload = cose_payload(bundle["attestation"])
    assert payload["nonce"] == handshake_hash
    assert payload["public_key"] == server_static
    digest = bundle["config_digest"]
    assert payload["user_data"] == USER_DATA_PREFIX + (digest if digest is not None else b"")
    assert payload["pcrs"][0].hex() == pcr0

    # Chain to the dev root pinned in the trust file, ES384 signature, the same bindings.
    root_pin = trust["nitro_root"]
    root = TrustRoot.from_pem(
        root_pin["pem"].encode(), name=root_pin["name"], expected_sha256=root_pin["sha256"]
    )
    verified = verify(
        bundle["attestation"],
        root=root,
        policy=Policy(nonce=handshake_hash, public_key=server_static, max_age=timedelta(minutes=5)),
    )
    assert verified.pcrs[0].hex() == pcr0

    statement = check_endorsement(bundle["endorsement"], trust, payload["pcrs"])
    assert (statement["service"], statement["version"]) == ("echo", "0.1.0")

    # protocol.md §5: one echo call, then one whose request and reply span several chunks.
    await client.send_message(bytes.fromhex("84 00 01 64 6563686f 43 616263"))
    assert cbor2.loads(await client.read_message()) == [1, 1, b"abc"]
    large = os.urandom(150_000)
    await client.send_message(cbor2.dumps([0, 2, "echo", large]))
    assert client.sent == 1 + 3  # 150 kB is three chunks of at most 65518 bytes
    assert cbor2.loads(await client.read_message()) == [1, 2, large]
    await client.close("done")
    return handshake_hash


async def _sessions(host: str, port: int, trust: dict[str, Any], pcr0: str) -> None:
    first = await _session(host, port, trust, pcr0)
    second = await _session(host, port, trust, pcr0)
    assert first != second  # each document was made for its own session (nonce = h)

    # protocol.md §1: another prologue makes message 2's static key undecryptable.
    other = DocClient(*await asyncio.open_connection(host, port), prologue=b"hermetic/2")
    with pytest.raises(DecryptFailedException):
        await other.handshake()
    other.writer.close()


def test_dissononce_client_verifies_evidence_of_hermetic_up_echo_and_calls_it(
    running_echo: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    started, trust = running_echo
    assert started["release"]["log_index"] == EARLIER_RELEASES
    host, port = started["tcp"].rsplit(":", 1)
    asyncio.run(_sessions(host, int(port), trust, started["release"]["pcr0"]))


def test_independent_checks_reject_tampered_endorsement_parts() -> None:
    """The hand-written RFC 9162 and signed-note checks above can fail (so they prove something)."""
    leaves = [hashlib.sha256(b"\x00" + bytes([n])).digest() for n in range(3)]
    left = hashlib.sha256(b"\x01" + leaves[0] + leaves[1]).digest()
    root = hashlib.sha256(b"\x01" + left + leaves[2]).digest()
    assert rfc9162_root_from_inclusion(leaves[1], 1, 3, [leaves[0], leaves[2]]) == root
    assert rfc9162_root_from_inclusion(leaves[2], 2, 3, [left]) == root
    assert rfc9162_root_from_inclusion(leaves[1], 1, 3, [leaves[2], leaves[0]]) != root
    assert rfc9162_root_from_inclusion(leaves[0], 1, 3, [leaves[0], leaves[2]]) != root
    with pytest.raises(AssertionError):
        rfc9162_root_from_inclusion(leaves[2], 2, 3, [left, left])

    log = DevLog()
    endorsement = log.publish(Measurements("hermetic", bytes(48), bytes(48), bytes(48),
                                           service="echo", version="0.1.0"))  # fmt: skip
    trust_path = log.directory / "trust.json"
    log.write_trust(trust_path)
    trust = json.loads(trust_path.read_text())
    wire = {
        "entry": endorsement.signed.entry(),
        "index": endorsement.index,
        "origin": endorsement.origin,
        "checkpoint": endorsement.checkpoint,
        "inclusion_proof": list(endorsement.inclusion_proof),
    }
    pcrs = {0: bytes(48), 1: bytes(48), 2: bytes(48), 8: bytes(48)}
    assert check_endorsement(wire, trust, pcrs)["service"] == "echo"
    with pytest.raises(AssertionError):
        check_endorsement(wire, trust, {**pcrs, 1: b"\x01" * 48})
    forged = wire["checkpoint"].replace("\n1\n", "\n2\n", 1)
    with pytest.raises((AssertionError, InvalidSignature)):
        check_endorsement({**wire, "checkpoint": forged}, trust, pcrs)
    entry = json.loads(wire["entry"])
    entry["statement"]["version"] = "0.1.1"
    altered = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(InvalidSignature):
        check_endorsement({**wire, "entry": altered}, trust, pcrs)
