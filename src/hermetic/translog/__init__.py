"""The transparency log: RFC 9162 Merkle proofs and the C2SP formats built on them.

Format modules (sans-IO): :mod:`.merkle` (hashing, proofs), :mod:`.note` (signed notes),
:mod:`.checkpoint` (checkpoints and witness cosignatures), :mod:`.tiles` (tile paths and
contents), :mod:`.rekor` (offline verification of Sigstore/Rekor entries) and
:mod:`.witness` (the witness state machine). The log service builds on them.
"""
