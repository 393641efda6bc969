"""Mutation testing on real documents: no single flipped bit may still verify.

For each vector: every one of the 768 bits of the ES384 signature, plus 2,000 seeded
random single-bit flips anywhere else in the document. Each mutant must be rejected with
a HermeticError subclass (anything else escaping is a bug in our parsing). One verifier
per vector, so mutants that leave the chain intact hit the chain cache.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hermetic.attestation import AttestationVerifier, Policy, TrustRoot, decode
from hermetic.errors import HermeticError, SignatureInvalidError
from test_attestation_verify import VECTORS, Vector

RANDOM_FLIPS = 2000
SIGNATURE_BITS = 96 * 8


def _reject_all(
    verifier: AttestationVerifier, data: bytes, positions: list[int], now: datetime
) -> Counter[str]:
    policy = Policy(allow_debug=True)
    outcomes: Counter[str] = Counter()
    mutant = bytearray(data)
    for bit in positions:
        mutant[bit // 8] ^= 0x80 >> (bit % 8)
        try:
            verifier.verify(bytes(mutant), policy, now)
        except HermeticError as exc:
            outcomes[type(exc).__name__] += 1
        else:
            pytest.fail(f"mutant with bit {bit} flipped still verifies")
        finally:
            mutant[bit // 8] ^= 0x80 >> (bit % 8)
    return outcomes


@pytest.mark.parametrize("vector", VECTORS, ids=[v.name for v in VECTORS])
def test_no_single_bit_flip_verifies(vectors: Path, vector: Vector) -> None:
    data = (vectors / "nitro" / f"{vector.name}.cbor").read_bytes()
    now = datetime.fromtimestamp(vector.verify_at, UTC)
    verifier = AttestationVerifier(TrustRoot.aws())
    verifier.verify(data, Policy(allow_debug=True), now)  # the original verifies

    cose, _ = decode(data)
    assert data.endswith(cose.signature)
    signature_start = (len(data) - 96) * 8
    signature_bits = list(range(signature_start, len(data) * 8))
    assert len(signature_bits) == SIGNATURE_BITS
    outcomes = _reject_all(verifier, data, signature_bits, now)
    assert outcomes == Counter({SignatureInvalidError.__name__: SIGNATURE_BITS})

    rng = random.Random(f"attestation-mutation-{vector.name}")
    elsewhere = [rng.randrange(signature_start) for _ in range(RANDOM_FLIPS)]
    outcomes = _reject_all(verifier, data, elsewhere, now)
    assert sum(outcomes.values()) == RANDOM_FLIPS
    # The flips land in every part of the document, so several checks must have fired.
    assert len(outcomes) >= 3, outcomes
