"""One witness key never counts as two witnesses (finding 6 of issue 9).

A cosignature/v1 signature covers the checkpoint and a timestamp, not the witness's name.
So if a trust file pinned one public key under two witness names, one signature, copied
onto a second line under the other name, would meet a threshold of 2; and a log key also
pinned as a witness would let the log witness itself. Trust files, the checkpoint verifier
and the log server all refuse such a key set, naming both entries.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from hermetic.attestation import TrustRoot
from hermetic.client.trust import ClientTrust, write_trust_bundle
from hermetic.errors import DuplicateTrustedKeyError, TrustBundleError
from hermetic.translog.checkpoint import (
    Checkpoint,
    CosignatureSigner,
    add_cosignatures,
    cosign,
    open_checkpoint,
    sign_checkpoint,
)
from hermetic.translog.note import Ed25519NoteSigner, parse_signature_line
from hermetic.translog.release import TrustBundle, generate_publisher_key, load_publisher_key
from hermetic.translog.service import LogService
from hermetic.translog.store import SQLiteLogStore
from test_translog_service_support import hermetic

ORIGIN = "keys.example/log"


def _log_and_witness_sharing_a_seed() -> tuple[Ed25519NoteSigner, CosignatureSigner]:
    seed = os.urandom(32)
    return Ed25519NoteSigner(ORIGIN, seed), CosignatureSigner("self.example", seed)


def _publisher_pem() -> str:
    key = load_publisher_key(generate_publisher_key()).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _trust(log_vkey: str, witnesses: list[str], threshold: int = 1) -> dict[str, object]:
    return {
        "log": {"vkey": log_vkey, "witnesses": witnesses, "threshold": threshold},
        "publishers": [{"name": "acme", "public_key_pem": _publisher_pem()}],
    }


def test_trust_file_refuses_one_key_under_two_witness_names() -> None:
    log = Ed25519NoteSigner(ORIGIN, os.urandom(32))
    seed = os.urandom(32)
    w1, w2 = CosignatureSigner("w1.example", seed), CosignatureSigner("w2.example", seed)
    other = CosignatureSigner.generate("w0.example")
    with pytest.raises(DuplicateTrustedKeyError) as caught:
        TrustBundle.from_json(_trust(log.vkey, [other.vkey, w1.vkey, w2.vkey], 2))
    assert str(caught.value).startswith(
        "trust file: log.witnesses[2] (w2.example) has the same public key as"
        " log.witnesses[1] (w1.example)"
    )


def test_trust_file_refuses_the_same_witness_listed_twice() -> None:
    log = Ed25519NoteSigner(ORIGIN, os.urandom(32))
    witness = CosignatureSigner.generate("w1.example")
    with pytest.raises(DuplicateTrustedKeyError, match=r"log\.witnesses\[1\] \(w1\.example\)"):
        TrustBundle.from_json(_trust(log.vkey, [witness.vkey, witness.vkey], 2))


def test_trust_file_refuses_the_log_key_as_a_witness() -> None:
    log, self_witness = _log_and_witness_sharing_a_seed()
    with pytest.raises(DuplicateTrustedKeyError) as caught:
        TrustBundle.from_json(_trust(log.vkey, [self_witness.vkey]))
    assert str(caught.value).startswith(
        f"trust file: log.witnesses[0] (self.example) has the same public key as"
        f" log.vkey ({ORIGIN})"
    )
    assert issubclass(DuplicateTrustedKeyError, TrustBundleError)  # a usage error: exit 2


def test_distinct_witness_keys_are_accepted() -> None:
    log = Ed25519NoteSigner(ORIGIN, os.urandom(32))
    w1, w2 = CosignatureSigner.generate("w1.example"), CosignatureSigner.generate("w2.example")
    bundle = TrustBundle.from_json(_trust(log.vkey, [w1.vkey, w2.vkey], 2))
    assert bundle.log.threshold == 2


def test_client_trust_file_and_cli_refuse_a_duplicated_key(tmp_path: Path) -> None:
    log = Ed25519NoteSigner(ORIGIN, os.urandom(32))
    seed = os.urandom(32)
    w1, w2 = CosignatureSigner("w1.example", seed), CosignatureSigner("w2.example", seed)
    with pytest.raises(DuplicateTrustedKeyError, match=r"w2\.example.*w1\.example"):
        write_trust_bundle(tmp_path / "trust.json", log_vkey=log.vkey,
                           witness_vkeys=[w1.vkey, w2.vkey], threshold=2,
                           root=TrustRoot.aws())  # fmt: skip
    assert not (tmp_path / "trust.json").exists()
    value = _trust(log.vkey, [w1.vkey, w2.vkey], 2)
    value["nitro_root"] = {"name": "aws"}
    path = tmp_path / "forged-trust.json"
    path.write_text(json.dumps(value))
    with pytest.raises(DuplicateTrustedKeyError):
        ClientTrust.load(path)
    done = hermetic("connect", "tcp://127.0.0.1:9", "--trust", str(path))  # refused before
    assert done.returncode == 2, done.stderr
    assert "DuplicateTrustedKeyError: trust file: log.witnesses[1] (w2.example)" in done.stderr
    assert "Traceback" not in done.stderr
    (tmp_path / "acme.pem").write_text(_publisher_pem())
    publisher = f"acme={tmp_path / 'acme.pem'}"
    refused = hermetic("release", "trust", "--log-key", log.vkey, "--witness", w1.vkey,
                       "--witness", w2.vkey, "--threshold", "2", "--publisher", publisher,
                       "--out", str(tmp_path / "t.json"))  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "DuplicateTrustedKeyError" in refused.stderr
    assert not (tmp_path / "t.json").exists()


def test_one_cosignature_copied_under_a_second_name_does_not_meet_a_threshold_of_two() -> None:
    """The attack itself: one witness signature, two lines, two names."""
    log = Ed25519NoteSigner(ORIGIN, os.urandom(32))
    seed = os.urandom(32)
    w1, w2 = CosignatureSigner("w1.example", seed), CosignatureSigner("w2.example", seed)
    note = sign_checkpoint(Checkpoint(ORIGIN, 3, bytes(range(32))), log)
    line = cosign(note, w1, 1_700_000_000)
    signature = parse_signature_line(line).signature  # time || Ed25519 signature, no name
    copy = f"\u2014 w2.example {base64.b64encode(w2.key_id + signature).decode()}\n"
    forged = add_cosignatures(note, [line, copy])
    assert forged.count("\u2014 ") == 3  # the log's line and two witness lines
    with pytest.raises(DuplicateTrustedKeyError, match=r"witness w2\.example.*witness w1\.example"):
        open_checkpoint(forged, log.verifier, [w1.verifier, w2.verifier], 2)
    # With two genuinely different witnesses the same threshold is met.
    w3 = CosignatureSigner.generate("w3.example")
    genuine = add_cosignatures(note, [line, cosign(note, w3, 1_700_000_001)])
    opened = open_checkpoint(genuine, log.verifier, [w1.verifier, w3.verifier], 2)
    assert [c.witness for c in opened.cosignatures] == ["w1.example", "w3.example"]


def test_the_log_cannot_witness_its_own_checkpoint() -> None:
    log, self_witness = _log_and_witness_sharing_a_seed()
    note = sign_checkpoint(Checkpoint(ORIGIN, 1, bytes(32)), log)
    cosigned = add_cosignatures(note, [cosign(note, self_witness, 1_700_000_000)])
    with pytest.raises(DuplicateTrustedKeyError, match=r"witness self\.example.*log key"):
        open_checkpoint(cosigned, log.verifier, [self_witness.verifier], 1)


def test_log_server_refuses_a_witness_list_with_one_key_twice(tmp_path: Path) -> None:
    log, self_witness = _log_and_witness_sharing_a_seed()
    seed = os.urandom(32)
    twins = [CosignatureSigner("w1.example", seed), CosignatureSigner("w2.example", seed)]
    with SQLiteLogStore(tmp_path / "log.db") as store:
        for witnesses in ([w.verifier for w in twins], [self_witness.verifier]):
            with pytest.raises(DuplicateTrustedKeyError):
                LogService(store, log, witnesses=witnesses)
