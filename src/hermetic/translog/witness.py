"""The witness: cosign a log's checkpoint only if it extends what the witness saw before.

A witness is what turns "the log signed it" into "everyone sees the same log": it keeps the
last checkpoint it cosigned per log and refuses, loudly and with a typed error, any
checkpoint that is not an append-only extension of it (C2SP tlog-witness). This module is
the sans-IO decision (state in, state and cosignature out); persisting the state atomically
and serving ``add-checkpoint`` over HTTP belong to the daemon.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, replace

from hermetic.errors import (
    ConsistencyProofError,
    ForkDetectedError,
    NoteFormatError,
    SplitViewError,
    WitnessConflictError,
)
from hermetic.translog.checkpoint import (
    CosignatureSigner,
    VerifiedCheckpoint,
    cosign,
    open_checkpoint,
)
from hermetic.translog.merkle import EMPTY_ROOT, HASH_SIZE, verify_consistency
from hermetic.translog.note import NoteVerifier, b64decode_strict

MAX_PROOF_LINES = 63


@dataclass(frozen=True)
class WitnessState:
    """What a witness remembers about one log: its key and the last cosigned tree head."""

    origin: str
    log_verifier: NoteVerifier
    last_size: int = 0
    last_root: bytes = EMPTY_ROOT

    def update(
        self,
        new_checkpoint_message: str | bytes,
        consistency_proof: Sequence[bytes],
        *,
        signer: CosignatureSigner,
        timestamp: int,
        old_size: int | None = None,
    ) -> tuple[WitnessState, str]:
        """Check a new checkpoint against this state; return the new state and a cosignature line.

        ``old_size`` is the size the requester believes the witness is at (tlog-witness
        ``old`` line); a mismatch raises :class:`WitnessConflictError`. Raises
        :class:`SplitViewError` for a different root at the same size and
        :class:`ForkDetectedError` for a smaller size or a consistency proof that does
        not verify. Signature and origin failures raise the checkpoint errors.
        """
        if old_size is not None and old_size != self.last_size:
            raise WitnessConflictError(
                f"request is based on size {old_size}, witness is at {self.last_size}",
                self.last_size,
            )
        verified = open_checkpoint(new_checkpoint_message, self.log_verifier, origin=self.origin)
        new_state = self.check(verified, consistency_proof)
        return new_state, cosign(verified.text, signer, timestamp)

    def check(
        self, verified: VerifiedCheckpoint, consistency_proof: Sequence[bytes]
    ) -> WitnessState:
        """The append-only check alone, for a checkpoint already verified."""
        size, root = verified.size, verified.root_hash
        if size < self.last_size:
            raise ForkDetectedError(
                f"log {self.origin!r} rolled back: checkpoint size {size} < last size "
                f"{self.last_size}"
            )
        if size == self.last_size:
            if root != self.last_root:
                raise SplitViewError(
                    f"log {self.origin!r} shows two roots for size {size}: "
                    f"{self.last_root.hex()} and {root.hex()}"
                )
            if consistency_proof:
                raise ForkDetectedError(
                    f"consistency proof between equal sizes {size} must be empty"
                )
            return self
        try:
            verify_consistency(self.last_size, size, self.last_root, root, consistency_proof)
        except ConsistencyProofError as exc:
            raise ForkDetectedError(
                f"log {self.origin!r} checkpoint of size {size} is not consistent with size "
                f"{self.last_size}: {exc}"
            ) from exc
        return replace(self, last_size=size, last_root=root)


@dataclass(frozen=True)
class AddCheckpointRequest:
    """A parsed tlog-witness ``add-checkpoint`` body."""

    old_size: int
    proof: tuple[bytes, ...]
    checkpoint: str


def parse_add_checkpoint(body: str | bytes) -> AddCheckpointRequest:
    """Parse ``old <size>\\n`` + up to 63 base64 proof lines + ``\\n`` + signed checkpoint."""
    if isinstance(body, bytes | bytearray):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise NoteFormatError("add-checkpoint body is not UTF-8") from None
    head, sep, checkpoint = body.partition("\n\n")
    if not sep:
        raise NoteFormatError("add-checkpoint body has no blank line before the checkpoint")
    lines = head.split("\n")
    first = lines[0]
    size_text = first[4:] if first.startswith("old ") else ""
    if not (size_text.isascii() and size_text.isdigit()) or (
        len(size_text) > 1 and size_text[0] == "0"
    ):
        raise NoteFormatError(f"add-checkpoint first line must be 'old <size>', got {first!r}")
    proof_lines = lines[1:]
    if len(proof_lines) > MAX_PROOF_LINES:
        raise NoteFormatError(f"add-checkpoint has {len(proof_lines)} proof lines, max 63")
    proof = []
    for i, line in enumerate(proof_lines):
        item = b64decode_strict(line, f"proof line {i}")
        if len(item) != HASH_SIZE:
            raise NoteFormatError(f"proof line {i} is {len(item)} bytes, expected {HASH_SIZE}")
        proof.append(item)
    return AddCheckpointRequest(int(size_text), tuple(proof), checkpoint)


def format_add_checkpoint(old_size: int, proof: Sequence[bytes], checkpoint: str) -> str:
    """The tlog-witness ``add-checkpoint`` body (what a log sends to a witness)."""
    lines = [f"old {old_size}"] + [base64.b64encode(p).decode() for p in proof]
    return "\n".join(lines) + "\n\n" + checkpoint
