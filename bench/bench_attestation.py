"""Attestation verification throughput, cold and warm, against one P-384 verify.

Goal: with the chain cache warm, verifying a real document costs at most 1.5x one
``cryptography`` ECDSA P-384 verify measured in the same run (the rest - CBOR decode,
validity windows, policy - must be small next to the one signature check that cannot be
avoided). The peer and both paths are timed in ten alternating rounds
(``interleaved_p50``), so load on the shared machine hits them alike.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench.report import Goal, interleaved_p50, print_goals, print_table
from hermetic.attestation import AttestationVerifier, Policy, TrustRoot, decode, sig_structure

VECTOR = "libsignal-2"
VERIFY_AT = 1705431295
GOAL = 1.5
VECTORS = Path(__file__).resolve().parents[1] / "tests" / "vectors"


def main() -> list[Goal]:
    data = (VECTORS / "nitro" / f"{VECTOR}.cbor").read_bytes()
    now = datetime.fromtimestamp(VERIFY_AT, UTC)
    root = TrustRoot.aws()
    policy = Policy()

    # Peer: one bare P-384 ECDSA verify over a message of the same size, same run.
    key = ec.generate_private_key(ec.SECP384R1())
    cose, _ = decode(data)
    message = sig_structure(cose.protected, cose.payload)
    signature = key.sign(message, ec.ECDSA(hashes.SHA384()))
    public = key.public_key()

    def p384() -> None:
        public.verify(signature, message, ec.ECDSA(hashes.SHA384()))

    def cold() -> None:
        AttestationVerifier(root).verify(data, policy, now)

    warm_verifier = AttestationVerifier(root)
    warm_verifier.verify(data, policy, now)

    def warm() -> None:
        warm_verifier.verify(data, policy, now)

    samples = interleaved_p50(
        {
            "P-384 ECDSA verify (peer)": p384,
            "verify, cold (fresh verifier)": cold,
            "verify, warm (cached chain)": warm,
        }
    )
    peer = samples["P-384 ECDSA verify (peer)"]
    rows = [[name, seconds * 1e6, 1 / seconds, seconds / peer] for name, seconds in samples.items()]
    print(f"document: {VECTOR}.cbor ({len(data)} bytes), single thread, p50 per call")
    print_table(["operation", "us/call", "docs/s", "x P-384 verify"], rows)
    ratio = samples["verify, warm (cached chain)"] / peer
    goals = [Goal("warm verify / one P-384 verify", ratio, "<=", GOAL)]
    print_goals(goals)
    return goals
