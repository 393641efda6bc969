"""C2SP signed notes, checkpoints and cosignatures against the published vectors."""

from __future__ import annotations

import base64
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.errors import (
    CheckpointError,
    CheckpointFormatError,
    CosignatureThresholdError,
    HermeticError,
    MalformedInputError,
    NoteFormatError,
    NoteSignatureError,
    UnknownKeyError,
)
from hermetic.translog.checkpoint import (
    Checkpoint,
    CosignatureSigner,
    add_cosignatures,
    cosign,
    cosignature_message,
    open_checkpoint,
    sign_checkpoint,
)
from hermetic.translog.merkle import EMPTY_ROOT, leaf_hash
from hermetic.translog.note import (
    Ed25519NoteSigner,
    NoteVerifier,
    generate_key,
    open_note,
    sign_note,
)


def _notes(vectors: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (vectors / "merkle" / "signed-note" / "signed-note-vectors.json").read_text()
    )
    return data


def _note_cases(vectors: Path) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = _notes(vectors)["signed_notes"]
    return cases


def test_every_signed_note_vector_gives_x_mod_result(vectors: Path) -> None:
    cases = _note_cases(vectors)
    assert len(cases) == 11
    for case in cases:
        expect = case["expect"]
        if "message" not in case or "verifier_keys" not in case:
            continue
        verifiers = [NoteVerifier.from_vkey(k) for k in case["verifier_keys"]]
        if not expect["ok"]:
            with pytest.raises(HermeticError, match=re.escape(expect["error"])):
                open_note(case["message"], verifiers)
            continue
        note = open_note(case["message"], verifiers)
        if "text" in expect:
            assert note.text == expect["text"]
        assert note.verified_names == expect["verified"], case["id"]
        assert note.unverified_count == expect["unverified"], case["id"]


def test_every_bad_verifier_key_vector_is_rejected_with_x_mod_reason(vectors: Path) -> None:
    bad = [c for c in _note_cases(vectors) if "message" not in c]
    assert len(bad) == 2
    for case in bad:
        with pytest.raises(NoteFormatError, match=case["expect"]["error"]):
            NoteVerifier.from_vkey(case["verifier_keys"][0])


def test_signing_with_vector_private_keys_is_byte_exact(vectors: Path) -> None:
    signers = [c for c in _note_cases(vectors) if "signer_key" in c]
    assert len(signers) == 2
    for case in signers:
        signer = Ed25519NoteSigner.from_skey(case["signer_key"])
        assert sign_note(case["text"], [signer]) == case["message"]
        assert signer.skey() == case["signer_key"]
        if "verifier_keys" in case:
            assert signer.vkey == case["verifier_keys"][0]
        assert "PRIVATE" not in repr(signer)


def test_generated_keys_sign_and_verify_and_reject_other_text() -> None:
    skey, vkey = generate_key("example.org/test")
    signer = Ed25519NoteSigner.from_skey(skey)
    message = sign_note("hello\n", [signer])
    note = open_note(message.encode(), [NoteVerifier.from_vkey(vkey)])
    assert note.text == "hello\n"
    assert note.verified_names == ["example.org/test"]
    with pytest.raises(NoteSignatureError):
        open_note(message.replace("hello", "hellp"), [NoteVerifier.from_vkey(vkey)])


def test_note_text_may_contain_empty_lines_and_splits_at_last_blank_line() -> None:
    signer = Ed25519NoteSigner("a", bytes(32))
    message = sign_note("one\n\ntwo\n", [signer])
    assert open_note(message, [signer.verifier]).text == "one\n\ntwo\n"


@pytest.mark.parametrize(
    "message",
    [
        "",
        "no signatures\n",
        "text\n\n",
        "text\n\n\u2014 a AAAA\n",  # too short: key ID and no signature
        "text\n\n- a AAAAAAAAAAAA\n",  # ASCII dash
        "text\n\n\u2014 a AAAAAAAAAAAA",  # no final newline
        "text\n\n\u2014 a+b AAAAAAAAAAAA\n",  # '+' in name
        "text\n\n\u2014  AAAAAAAAAAAA\n",  # empty name
        "text\n\n\u2014 a AAAAAAAAAAAA extra\n",
        "text\n\n\u2014 a AAAAAAAAAAB=\n",  # non-canonical base64
        "te\x01xt\n\n\u2014 a AAAAAAAAAAAA\n",  # control character
        "text\r\n\n\u2014 a AAAAAAAAAAAA\n",
        "text\n\n" + "\u2014 a AAAAAAAAAAAA\n" * 101,
    ],
)
def test_malformed_notes_are_rejected_as_malformed(message: str) -> None:
    with pytest.raises(NoteFormatError) as info:
        open_note(message, [Ed25519NoteSigner("a", bytes(32)).verifier])
    assert isinstance(info.value, MalformedInputError)


def test_invalid_utf8_note_is_malformed() -> None:
    with pytest.raises(NoteFormatError):
        open_note(b"\xff\n\n\xe2\x80\x94 a AAAAAAAAAAAA\n", [])


def test_sixteen_signatures_are_accepted() -> None:
    signers = [Ed25519NoteSigner(f"k{i}", bytes([i]) * 32) for i in range(16)]
    message = sign_note("text\n", signers)
    note = open_note(message, [s.verifier for s in signers])
    assert len(note.verified_names) == 16


def test_two_signatures_by_the_same_known_key_are_rejected() -> None:
    signer = Ed25519NoteSigner("a", bytes(32))
    message = sign_note("text\n", [signer, signer])
    with pytest.raises(NoteFormatError):
        open_note(message, [signer.verifier])


def test_signing_rejects_bad_text() -> None:
    signer = Ed25519NoteSigner("a", bytes(32))
    for text in ("", "no newline", "ctl\x00\n"):
        with pytest.raises(NoteFormatError):
            sign_note(text, [signer])


def _flip_each_byte(message: bytes) -> list[bytes]:
    return [
        message[:i] + bytes([message[i] ^ 0x01]) + message[i + 1 :] for i in range(len(message))
    ]


def test_flipping_any_byte_of_a_signed_note_is_rejected(vectors: Path) -> None:
    case = next(c for c in _note_cases(vectors) if c["id"] == "c2sp-example")
    verifiers = [NoteVerifier.from_vkey(k) for k in case["verifier_keys"]]
    open_note(case["message"], verifiers)
    for mutated in _flip_each_byte(case["message"].encode()):
        with pytest.raises(HermeticError):
            open_note(mutated, verifiers)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary()))
def test_note_parser_only_raises_hermetic_errors(message: str | bytes) -> None:
    signer = Ed25519NoteSigner("a", bytes(32))
    with contextlib.suppress(HermeticError):
        open_note(message, [signer.verifier])


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1).map(lambda t: t + "\n"))
def test_sign_then_open_round_trips_any_valid_text(text: str) -> None:
    signer = Ed25519NoteSigner("a", bytes(32))
    try:
        message = sign_note(text, [signer])
    except NoteFormatError:
        assert any(ord(c) < 0x20 and c != "\n" for c in text)
        return
    assert open_note(message, [signer.verifier]).text == text


# --- checkpoints ----------------------------------------------------------------------------


def test_checkpoint_vectors_parse_and_round_trip(vectors: Path) -> None:
    notes = _notes(vectors)
    for case in notes["format_examples_unverifiable"][:2]:
        text = case["message"].split("\n\n")[0] + "\n"
        cp = Checkpoint.parse(text)
        assert cp.origin == "example.com/behind-the-sofa"
        assert cp.size == 20852163
        assert cp.to_text() == text
    tree = notes["sumdb_tree_notes"][0]
    cp = Checkpoint.parse(tree["text"])
    assert (cp.origin, cp.size) == ("go.sum database tree", tree["n"])
    assert cp.root_hash == leaf_hash(b"hello world")


def test_cosignature_message_matches_c2sp_example(vectors: Path) -> None:
    case = _notes(vectors)["format_examples_unverifiable"][1]
    text = case["message"].split("\n\n")[0] + "\n"
    expected = case["cosigned_message_for_ed25519_cosignature_v1_example"].encode()
    assert cosignature_message(text, 1679315147) == expected
    # The example line's first 8 signature bytes after the key ID are that timestamp.
    line = case["message"].splitlines()[-1]
    raw = base64.b64decode(line.split(" ")[2])
    assert int.from_bytes(raw[4:12], "big") == 1679315147


def test_tiles_log_checkpoint_verifies_with_its_vkey(vectors: Path) -> None:
    base = vectors / "merkle" / "tiles-300-x-mod"
    vkey = json.loads((base / "proofs.json").read_text())["checkpoint_vkey"]
    verified = open_checkpoint((base / "checkpoint").read_bytes(), NoteVerifier.from_vkey(vkey))
    assert verified.origin == "example.com/noise-enclave-test-log"
    assert verified.size == 300


@pytest.mark.parametrize(
    "text",
    [
        "origin\n300\n",
        "origin\n0300\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
        "origin\n-1\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
        "origin\n+1\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
        "origin\n18446744073709551616\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
        "origin\n1\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQ=\n",
        "origin\n1\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n\next\n",
        "\n1\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
        "origin\n1\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
        "origin\n\u0661\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
    ],
)
def test_malformed_checkpoints_are_rejected(text: str) -> None:
    with pytest.raises(CheckpointFormatError):
        Checkpoint.parse(text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary()))
def test_checkpoint_parser_only_raises_hermetic_errors(text: str | bytes) -> None:
    try:
        cp = Checkpoint.parse(text)
    except HermeticError:
        return
    assert Checkpoint.parse(cp.to_text()) == cp


def _log_and_witnesses(n: int) -> tuple[Ed25519NoteSigner, list[CosignatureSigner]]:
    log = Ed25519NoteSigner("example.com/log", bytes([7]) * 32)
    witnesses = [CosignatureSigner(f"witness{i}.example", bytes([i + 1]) * 32) for i in range(n)]
    return log, witnesses


def test_witness_cosignatures_count_towards_threshold() -> None:
    log, witnesses = _log_and_witnesses(3)
    cp = Checkpoint("example.com/log", 5, EMPTY_ROOT, ("ext line",))
    signed = sign_checkpoint(cp, log)
    lines = [cosign(signed, w, 1700000000 + i) for i, w in enumerate(witnesses[:2])]
    message = add_cosignatures(signed, lines)
    verifiers = [w.verifier for w in witnesses]
    verified = open_checkpoint(message, log.verifier, verifiers, threshold=2)
    assert verified.checkpoint == cp
    assert [c.timestamp for c in verified.cosignatures] == [1700000000, 1700000001]
    assert [c.witness for c in verified.cosignatures] == ["witness0.example", "witness1.example"]
    with pytest.raises(CosignatureThresholdError):
        open_checkpoint(message, log.verifier, verifiers, threshold=3)
    # A vkey round trip gives the same cosignature verifier.
    assert NoteVerifier.from_vkey(witnesses[0].vkey) == witnesses[0].verifier
    assert CosignatureSigner.from_skey(witnesses[0].skey()).vkey == witnesses[0].vkey


def test_cosignature_over_other_checkpoint_or_time_is_rejected() -> None:
    log, (witness,) = _log_and_witnesses(1)
    signed = sign_checkpoint(Checkpoint("example.com/log", 5, EMPTY_ROOT), log)
    other = Checkpoint("example.com/log", 6, EMPTY_ROOT)
    line = cosign(other, witness, 1)
    with pytest.raises(NoteSignatureError):
        open_checkpoint(signed + line, log.verifier, [witness.verifier], threshold=1)
    # Re-dating a valid cosignature breaks it too.
    good = cosign(signed, witness, 1)
    raw = bytearray(base64.b64decode(good.split(" ")[2]))
    raw[11] ^= 1
    redated = f"\u2014 {witness.name} {base64.b64encode(bytes(raw)).decode()}\n"
    with pytest.raises(NoteSignatureError):
        open_checkpoint(signed + redated, log.verifier, [witness.verifier], threshold=1)


def test_checkpoint_requires_log_signature_and_origin() -> None:
    log, _ = _log_and_witnesses(0)
    cp = Checkpoint("example.com/other", 5, EMPTY_ROOT)
    with pytest.raises(CheckpointError):
        open_checkpoint(sign_checkpoint(cp, log), log.verifier)
    open_checkpoint(sign_checkpoint(cp, log), log.verifier, origin="example.com/other")
    # Signed by the witness only (as a plain note): no log signature.
    other = Ed25519NoteSigner("example.com/log", bytes([9]) * 32)
    with pytest.raises(UnknownKeyError):
        open_checkpoint(sign_checkpoint(cp, other), log.verifier)


def test_flipping_any_byte_of_a_cosigned_checkpoint_is_rejected() -> None:
    log, witnesses = _log_and_witnesses(2)
    signed = sign_checkpoint(Checkpoint("example.com/log", 300, EMPTY_ROOT), log)
    message = add_cosignatures(signed, [cosign(signed, w, 42) for w in witnesses])
    verifiers = [w.verifier for w in witnesses]
    open_checkpoint(message, log.verifier, verifiers, threshold=2)
    for mutated in _flip_each_byte(message.encode()):
        with pytest.raises(HermeticError):
            open_checkpoint(mutated, log.verifier, verifiers, threshold=2)
