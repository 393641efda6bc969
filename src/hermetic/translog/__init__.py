"""The transparency log: RFC 9162 Merkle proofs and the C2SP formats built on them.

Every release a publisher ships is an entry in an append-only Merkle log; clients accept
it only with an inclusion proof under a checkpoint the log signed and independent
witnesses cosigned. These format modules are sans-IO (pure functions over bytes and
text): :mod:`.merkle` (hashing, proofs), :mod:`.note` (C2SP signed notes),
:mod:`.checkpoint` (checkpoints, witness cosignatures), :mod:`.tiles` (the tlog-tiles read
API), :mod:`.witness` (the witness's append-only check) and :mod:`.rekor` (offline checks
of real Sigstore/Rekor entries). The log service, store and daemons build on them.
"""

from hermetic.translog.checkpoint import (
    Checkpoint,
    CosignatureSigner,
    CosignatureVerifier,
    VerifiedCheckpoint,
    cosign,
    open_checkpoint,
    sign_checkpoint,
)
from hermetic.translog.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    HashReader,
    MemoryTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    stored_hashes_for_leaf,
    verify_consistency,
    verify_inclusion,
)
from hermetic.translog.note import (
    EcdsaNoteVerifier,
    Ed25519NoteSigner,
    Ed25519NoteVerifier,
    Note,
    NoteSigner,
    NoteVerifier,
    generate_key,
    open_note,
    sign_note,
)

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Checkpoint",
    "CosignatureSigner",
    "CosignatureVerifier",
    "EcdsaNoteVerifier",
    "Ed25519NoteSigner",
    "Ed25519NoteVerifier",
    "HashReader",
    "MemoryTree",
    "Note",
    "NoteSigner",
    "NoteVerifier",
    "VerifiedCheckpoint",
    "consistency_proof",
    "cosign",
    "generate_key",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "open_checkpoint",
    "open_note",
    "root_hash",
    "sign_checkpoint",
    "sign_note",
    "stored_hashes_for_leaf",
    "verify_consistency",
    "verify_inclusion",
]
