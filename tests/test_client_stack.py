"""A real local trust stack for the client/evidence tests, and the tests that it is real.

Nothing here is mocked: a persisted dev Nitro PKI and emulated NSM, an Ed25519 publisher
key that signs a release statement, a SQLite-backed transparency log (hermetic's own store)
that integrates the release among other entries, two witnesses that cosign its checkpoint,
and a client trust file written by :func:`hermetic.client.write_trust_bundle`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hermetic.attestation import TrustRoot
from hermetic.client import ClientTrust, ServicePolicy, write_trust_bundle
from hermetic.evidence import make_evidence_provider
from hermetic.nsm import DevPKI, EmulatedNSM, NSMClient
from hermetic.translog.checkpoint import (
    Checkpoint,
    CosignatureSigner,
    add_cosignatures,
    cosign,
    sign_checkpoint,
)
from hermetic.translog.merkle import inclusion_proof
from hermetic.translog.note import Ed25519NoteSigner
from hermetic.translog.release import (
    Endorsement,
    ReleaseStatement,
    SignedStatement,
    TrustBundle,
    sign_statement,
    verify_endorsement,
)
from hermetic.translog.store import SQLiteLogStore

ORIGIN = "log.hermetic.test/releases"
SERVICE = "echo"
VERSION = "1.2.0"
CONFIG_DIGEST = hashlib.sha256(b'{"mode":"test"}').digest()


def pcr(label: str) -> bytes:
    return hashlib.sha384(label.encode()).digest()


PCRS = {0: pcr("image"), 1: pcr("kernel"), 2: pcr("app"), 8: pcr("signer")}


@dataclass
class Stack:
    """Everything a test needs to run an attested service and a verifying client."""

    directory: Path
    pki: DevPKI
    trust: ClientTrust
    trust_path: Path
    endorsement: Endorsement
    publisher_key: ed25519.Ed25519PrivateKey
    log_signer: Ed25519NoteSigner
    witnesses: tuple[CosignatureSigner, ...]
    store: SQLiteLogStore
    statement: ReleaseStatement
    extra: dict[str, object] = field(default_factory=dict)

    def nsm(
        self,
        *,
        pcrs: dict[int, bytes] | None = None,
        debug: bool = False,
        pki: DevPKI | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> NSMClient:
        options: dict[str, object] = {}
        if clock is not None:
            options["clock"] = clock
        emulated = EmulatedNSM(
            dict(PCRS if pcrs is None else pcrs),
            debug=debug,
            pki=pki if pki is not None else self.pki,
            **options,  # type: ignore[arg-type]
        )
        return NSMClient(emulated)

    def provider(
        self,
        *,
        endorsement: Endorsement | str | None = "default",
        config_digest: bytes | None = CONFIG_DIGEST,
        **nsm_options: object,
    ) -> Callable[[bytes, bytes], bytes]:
        chosen = self.endorsement if endorsement == "default" else endorsement
        assert not isinstance(chosen, str)
        return make_evidence_provider(self.nsm(**nsm_options), chosen, config_digest)  # type: ignore[arg-type]

    def fresh_trust(self) -> ClientTrust:
        """The same pins, with cold caches (each test verifies from scratch)."""
        return ClientTrust.load(self.trust_path)

    def log_release(
        self, statement: ReleaseStatement, key: ed25519.Ed25519PrivateKey, *, cosigners: int = 2
    ) -> Endorsement:
        """Sign, log and endorse another statement in the same log."""
        signed = sign_statement(statement, key)
        return _endorse(self.store, self.log_signer, self.witnesses[:cosigners], signed)


def _sign(signer: Ed25519NoteSigner) -> Callable[[int, bytes], str]:
    def sign(size: int, root: bytes) -> str:
        return sign_checkpoint(Checkpoint(ORIGIN, size, root), signer)

    return sign


def _endorse(
    store: SQLiteLogStore,
    log_signer: Ed25519NoteSigner,
    witnesses: tuple[CosignatureSigner, ...],
    signed: SignedStatement,
) -> Endorsement:
    entry = signed.entry()
    batch = store.integrate([entry], _sign(log_signer))
    # Later releases of other services: the proof must work for an entry that is not last.
    filler = [f"other entry {os.urandom(8).hex()}".encode() for _ in range(3)]
    batch_after = store.integrate(filler, _sign(log_signer))
    index = batch.indices[0]
    size = batch_after.checkpoint.size
    note = batch_after.checkpoint.note
    now = int(time.time())
    note = add_cosignatures(note, [cosign(note, w, now) for w in witnesses])
    proof = inclusion_proof(index, size, store.read_hash)
    return Endorsement(signed, ORIGIN, index, tuple(proof), note)


def build_stack(directory: Path, *, threshold: int = 2) -> Stack:
    """A complete stack under ``directory`` using this test's HERMETIC_STATE_DIR dev PKI."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = DevPKI()
    pki.root(datetime.now(UTC) - timedelta(days=1))  # so documents can be backdated
    publisher_key = ed25519.Ed25519PrivateKey.generate()
    log_signer = Ed25519NoteSigner(ORIGIN, os.urandom(32))
    witnesses = (CosignatureSigner.generate("witness-a"), CosignatureSigner.generate("witness-b"))
    store = SQLiteLogStore(directory / "log.db")
    earlier = [f"earlier release {n}".encode() for n in range(5)]
    store.integrate(earlier, _sign(log_signer))
    statement = ReleaseStatement(
        service=SERVICE,
        version=VERSION,
        pcr0=PCRS[0].hex(),
        pcr1=PCRS[1].hex(),
        pcr2=PCRS[2].hex(),
        pcr8=PCRS[8].hex(),
        config_policy_digest=None,
        source_revision="0123abcd",
        build_time="2026-11-28T12:00:00Z",
    )
    signed = sign_statement(statement, publisher_key)
    endorsement = _endorse(store, log_signer, witnesses, signed)
    public_pem = (
        publisher_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )
    trust_path = directory / "trust.json"
    trust = write_trust_bundle(
        trust_path,
        log_vkey=log_signer.vkey,
        witness_vkeys=[w.vkey for w in witnesses],
        threshold=threshold,
        publishers={"acme": public_pem},
    )
    return Stack(
        directory=directory,
        pki=pki,
        trust=trust,
        trust_path=trust_path,
        endorsement=endorsement,
        publisher_key=publisher_key,
        log_signer=log_signer,
        witnesses=witnesses,
        store=store,
        statement=statement,
    )


STRICT = ServicePolicy(services=frozenset({SERVICE}))


# --- the stack is real ------------------------------------------------------------------------


def test_stack_endorsement_verifies_with_the_log_colleagues_verifier(tmp_path: Path) -> None:
    stack = build_stack(tmp_path / "stack")
    release = verify_endorsement(stack.endorsement, stack.trust.translog)
    assert release.publisher == "acme"
    assert release.index == 5  # after five earlier entries
    assert release.tree_size == 9  # and three later ones
    assert sorted(release.cosigners) == ["witness-a", "witness-b"]


def test_trust_file_pins_the_dev_root_by_fingerprint(tmp_path: Path) -> None:
    stack = build_stack(tmp_path / "stack")
    assert stack.trust.root.fingerprint == TrustRoot.dev().fingerprint
    assert isinstance(TrustBundle.load(stack.trust_path), TrustBundle)  # log tools read it too
    reloaded = ClientTrust.load(stack.trust_path)
    assert reloaded.root.fingerprint == stack.trust.root.fingerprint
    assert reloaded.translog == stack.trust.translog
