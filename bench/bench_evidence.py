"""Client-side evidence verification, cold and warm, against one P-384 verify.

Goal: with a warm ClientTrust (verified chain and endorsement cached), verifying a whole
evidence bundle (decode, attestation signature, session binding, release PCRs, policy) costs
at most 2x one ``cryptography`` ECDSA P-384 verify measured in the same run: the document
signature is the one check that cannot be cached, the rest must stay small next to it.
The bundle is real: emulated NSM document, Ed25519 publisher, a 1000-entry log with a
checkpoint cosigned by two witnesses. The peer and the three paths are timed in ten
alternating rounds (``interleaved_p50``), so load on the shared machine hits them alike.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from bench.report import Goal, interleaved_p50, print_goals, print_table, temporary_state_dir

GOAL = 2.0
ORIGIN = "bench.hermetic.test/log"


def main() -> list[Goal]:
    with temporary_state_dir() as tmp:
        return _run(tmp)


def _run(tmp: Path) -> list[Goal]:
    from hermetic.channel.noise import StaticKeypair
    from hermetic.client import ClientTrust, ServicePolicy, verify_evidence, write_trust_bundle
    from hermetic.evidence import make_evidence_provider
    from hermetic.nsm import EmulatedNSM, NSMClient
    from hermetic.translog import MemoryTree
    from hermetic.translog.checkpoint import (
        Checkpoint,
        CosignatureSigner,
        add_cosignatures,
        cosign,
        sign_checkpoint,
    )
    from hermetic.translog.note import Ed25519NoteSigner
    from hermetic.translog.release import Endorsement, ReleaseStatement, sign_statement

    pcrs = {i: hashlib.sha384(f"pcr{i}".encode()).digest() for i in (0, 1, 2, 8)}
    publisher = ed25519.Ed25519PrivateKey.generate()
    statement = ReleaseStatement("echo", "1.0.0", pcrs[0].hex(), pcrs[1].hex(), pcrs[2].hex(),
                                 pcrs[8].hex(), None, None, "2026-11-28T00:00:00Z")  # fmt: skip
    signed = sign_statement(statement, publisher)
    tree = MemoryTree()
    for n in range(500):
        tree.append(f"entry {n}".encode())
    index = tree.append(signed.entry())
    for n in range(499):
        tree.append(f"later {n}".encode())
    log_signer = Ed25519NoteSigner(ORIGIN, os.urandom(32))
    witnesses = [CosignatureSigner.generate("w1"), CosignatureSigner.generate("w2")]
    note = sign_checkpoint(Checkpoint(ORIGIN, tree.size, tree.root()), log_signer)
    note = add_cosignatures(note, [cosign(note, w, int(time.time())) for w in witnesses])
    endorsement = Endorsement(signed, ORIGIN, index, tuple(tree.inclusion_proof(index)), note)
    pem = publisher.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    nsm = NSMClient(EmulatedNSM(pcrs))
    provider = make_evidence_provider(nsm, endorsement, hashlib.sha256(b"config").digest())
    trust_path = tmp / "trust.json"
    write_trust_bundle(trust_path, log_vkey=log_signer.vkey,
                       witness_vkeys=[w.vkey for w in witnesses], threshold=2,
                       publishers={"acme": pem.decode()})  # fmt: skip
    policy = ServicePolicy(services=frozenset({"echo"}))
    handshake_hash, static = os.urandom(32), StaticKeypair.generate().public
    bundle = provider(handshake_hash, static)

    key = ec.generate_private_key(ec.SECP384R1())
    message = os.urandom(len(bundle) // 2)
    signature = key.sign(message, ec.ECDSA(hashes.SHA384()))
    public = key.public_key()

    def p384() -> None:
        public.verify(signature, message, ec.ECDSA(hashes.SHA384()))

    def cold() -> None:
        trust = ClientTrust.load(trust_path)
        verify_evidence(bundle, handshake_hash, static, trust, policy)

    warm_trust = ClientTrust.load(trust_path)
    verify_evidence(bundle, handshake_hash, static, warm_trust, policy)

    def warm() -> None:
        verify_evidence(bundle, handshake_hash, static, warm_trust, policy)

    def produce() -> None:
        provider(os.urandom(32), static)

    samples = interleaved_p50(
        {
            "P-384 ECDSA verify (peer)": p384,
            "verify_evidence, cold trust": cold,
            "verify_evidence, warm trust": warm,
            "make bundle (fresh NSM doc)": produce,
        }
    )
    peer = samples["P-384 ECDSA verify (peer)"]
    rows = [[name, s * 1e6, 1 / s, s / peer] for name, s in samples.items()]
    print(f"bundle: {len(bundle)} bytes, log size {tree.size}, 2 witnesses; p50 per call")
    print_table(["operation", "us/call", "per s", "x P-384 verify"], rows)
    ratio = samples["verify_evidence, warm trust"] / peer
    goals = [Goal("warm verify_evidence / one P-384 verify", ratio, "<=", GOAL)]
    print_goals(goals)
    return goals
