"""The sans-IO witness: cosigns append-only growth, refuses forks and split views loudly."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.errors import (
    ForkDetectedError,
    HermeticError,
    NoteFormatError,
    NoteSignatureError,
    SplitViewError,
    UnknownKeyError,
    WitnessConflictError,
)
from hermetic.translog.checkpoint import (
    Checkpoint,
    CosignatureSigner,
    add_cosignatures,
    open_checkpoint,
    sign_checkpoint,
)
from hermetic.translog.merkle import MemoryTree
from hermetic.translog.note import Ed25519NoteSigner
from hermetic.translog.witness import WitnessState, format_add_checkpoint, parse_add_checkpoint

ORIGIN = "example.com/log"


def _setup() -> tuple[MemoryTree, Ed25519NoteSigner, CosignatureSigner, WitnessState]:
    tree = MemoryTree()
    log = Ed25519NoteSigner(ORIGIN, bytes([3]) * 32)
    witness = CosignatureSigner("witness.example", bytes([4]) * 32)
    return tree, log, witness, WitnessState(ORIGIN, log.verifier)


def _signed(tree: MemoryTree, log: Ed25519NoteSigner, size: int) -> str:
    return sign_checkpoint(Checkpoint(ORIGIN, size, tree.root(size)), log)


def test_witness_follows_a_growing_log_and_its_cosignatures_verify() -> None:
    tree, log, witness, state = _setup()
    for step in range(1, 6):
        for i in range(step * 3):
            tree.append(b"%d-%d" % (step, i))
        message = _signed(tree, log, tree.size)
        proof = tree.consistency_proof(state.last_size, tree.size)
        state, line = state.update(
            message, proof, signer=witness, timestamp=1000 + step, old_size=state.last_size
        )
        assert (state.last_size, state.last_root) == (tree.size, tree.root())
        cosigned = add_cosignatures(message, [line])
        verified = open_checkpoint(cosigned, log.verifier, [witness.verifier], threshold=1)
        assert verified.cosignatures[0].timestamp == 1000 + step


def test_same_checkpoint_again_is_cosigned_without_state_change() -> None:
    tree, log, witness, state = _setup()
    tree.append(b"a")
    state, _ = state.update(_signed(tree, log, 1), [], signer=witness, timestamp=1)
    again, line = state.update(_signed(tree, log, 1), [], signer=witness, timestamp=2)
    assert again == state
    assert line.startswith("\u2014 witness.example ")


def test_same_size_with_different_root_is_a_split_view() -> None:
    tree, log, witness, state = _setup()
    tree.append(b"a")
    state, _ = state.update(_signed(tree, log, 1), [], signer=witness, timestamp=1)
    other = MemoryTree()
    other.append(b"b")
    with pytest.raises(SplitViewError, match="two roots for size 1"):
        state.update(_signed(other, log, 1), [], signer=witness, timestamp=2)


def test_smaller_size_is_a_fork() -> None:
    tree, log, witness, state = _setup()
    for i in range(4):
        tree.append(b"%d" % i)
    state, _ = state.update(_signed(tree, log, 4), [], signer=witness, timestamp=1)
    with pytest.raises(ForkDetectedError, match="rolled back"):
        state.update(_signed(tree, log, 3), [], signer=witness, timestamp=2)


def test_inconsistent_history_is_a_fork_even_with_a_valid_signature() -> None:
    tree, log, witness, state = _setup()
    for i in range(3):
        tree.append(b"%d" % i)
    state, _ = state.update(_signed(tree, log, 3), [], signer=witness, timestamp=1)
    forked = MemoryTree()
    for i in range(5):
        forked.append(b"x%d" % i)
    proof = forked.consistency_proof(3, 5)
    with pytest.raises(ForkDetectedError):
        state.update(_signed(forked, log, 5), proof, signer=witness, timestamp=2)
    # and a proof that is merely wrong is refused the same way
    for i in range(3, 5):
        tree.append(b"%d" % i)
    bad = [bytes(32)] * len(tree.consistency_proof(3, 5))
    with pytest.raises(ForkDetectedError):
        state.update(_signed(tree, log, 5), bad, signer=witness, timestamp=2)


def test_refuses_unsigned_wrong_origin_and_stale_requests() -> None:
    tree, log, witness, state = _setup()
    tree.append(b"a")
    stranger = Ed25519NoteSigner(ORIGIN, bytes([9]) * 32)
    with pytest.raises(UnknownKeyError):
        state.update(_signed(tree, stranger, 1), [], signer=witness, timestamp=1)
    tampered = _signed(tree, log, 1).replace("\n1\n", "\n2\n", 1)
    with pytest.raises(NoteSignatureError):
        state.update(tampered, [], signer=witness, timestamp=1)
    with pytest.raises(WitnessConflictError) as info:
        state.update(_signed(tree, log, 1), [], signer=witness, timestamp=1, old_size=7)
    assert info.value.current_size == 0


def test_add_checkpoint_body_parses_the_c2sp_example(vectors: Path) -> None:
    data = json.loads((vectors / "merkle" / "signed-note" / "signed-note-vectors.json").read_text())
    body = data["format_examples_unverifiable"][2]["body"]
    request = parse_add_checkpoint(body)
    assert request.old_size == 20852014
    assert len(request.proof) == 4
    assert request.checkpoint.startswith("example.com/behind-the-sofa\n20852163\n")
    assert format_add_checkpoint(request.old_size, request.proof, request.checkpoint) == body


@pytest.mark.parametrize(
    "body",
    ["", "old 1\n", "old01\n\ncp", "old 01\n\ncp", "old 1\nnotbase64\n\ncp", "old 1\nAAAA\n\ncp"],
)
def test_malformed_add_checkpoint_bodies_are_rejected(body: str) -> None:
    with pytest.raises(NoteFormatError):
        parse_add_checkpoint(body)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), st.binary()))
def test_add_checkpoint_parser_only_raises_hermetic_errors(body: str | bytes) -> None:
    with contextlib.suppress(HermeticError):
        parse_add_checkpoint(body)
