"""The local development release: a dev transparency log, witness and publisher for `up`.

Why: a client of an attested service verifies that a trusted publisher logged the exact
PCRs it runs, in a log whose checkpoint enough witnesses cosigned. On a laptop nobody has
published anything yet, so ``hermetic up`` does it on first use, with the same parts as
production and no server to start: a SQLite log store integrated in-process through
:class:`hermetic.translog.service.LogService`, an Ed25519 log key, one witness key that
cosigns each new checkpoint, and an Ed25519 publisher key, all under
``state_dir()/dev-log/`` (private keys mode 0600). The client trust file it writes pins
these keys and the emulator's dev root, so ``hermetic connect`` verifies a dev service
exactly as it verifies a production one. None of it is trusted anywhere else: the keys
exist only on this machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from hermetic.attestation import TrustRoot
from hermetic.client.trust import ClientTrust, write_trust_bundle
from hermetic.errors import LogStoreError, UsageError
from hermetic.image.pcrs import Measurements
from hermetic.paths import state_dir
from hermetic.translog.checkpoint import CosignatureSigner, add_cosignatures, cosign
from hermetic.translog.note import Ed25519NoteSigner, generate_key
from hermetic.translog.release import (
    Endorsement,
    PublisherPrivateKey,
    ReleaseStatement,
    Statement,
    generate_publisher_key,
    load_publisher_key,
    sign_statement,
    utc_timestamp,
)
from hermetic.translog.service import LogService
from hermetic.translog.store import SQLiteLogStore

LOG_ORIGIN = "dev.hermetic.local/log"
WITNESS_NAME = "dev.hermetic.local/witness"
PUBLISHER_NAME = "dev-publisher"


def dev_log_dir() -> Path:
    return state_dir() / "dev-log"


def _read_or_create_secret(path: Path, make: Callable[[], str]) -> str:
    """The key text in ``path``, created (0600, exclusively) by ``make()`` on first use."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be writing it right now
            text = path.read_text().strip()
            if text:
                return text
            time.sleep(0.02)
        raise LogStoreError(f"dev log: key file {path} is empty") from None
    text = make()
    try:
        os.write(fd, text.encode("utf-8") + b"\n")
    finally:
        os.close(fd)
    return text


@dataclass(frozen=True)
class DevRelease:
    """A release of one image in the dev log, and the trust that verifies it."""

    endorsement: Endorsement
    trust: ClientTrust


class DevLog:
    """The dev log's keys and store; :meth:`publish` logs and endorses an image's release."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else dev_log_dir()
        self.signer = Ed25519NoteSigner.from_skey(
            _read_or_create_secret(self.directory / "log.skey", lambda: generate_key(LOG_ORIGIN)[0])
        )
        self.witness = CosignatureSigner.from_skey(
            _read_or_create_secret(
                self.directory / "witness.skey",
                lambda: CosignatureSigner.generate(WITNESS_NAME).skey(),
            )
        )
        publisher_pem = _read_or_create_secret(
            self.directory / "publisher.pem", lambda: generate_publisher_key().decode("ascii")
        )
        self.publisher: PublisherPrivateKey = load_publisher_key(publisher_pem.encode("ascii"))

    @property
    def publisher_public_pem(self) -> str:
        return (
            self.publisher.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    def publish(
        self, measurements: Measurements, *, source_revision: str | None = None
    ) -> Endorsement:
        """Sign a release statement for ``measurements``, log it, cosign, endorse it.

        The statement names the image's service, version and PCR0/1/2/8; it is integrated
        in one store transaction, the new checkpoint is cosigned by the dev witness (the
        log verifies and stores the cosignature, as it would a remote witness's), and the
        endorsement carries the inclusion proof against that cosigned checkpoint.
        """
        if not measurements.service or not measurements.version:
            raise UsageError("dev release: the image names no service and version to publish")
        statement = ReleaseStatement(
            service=measurements.service,
            version=measurements.version,
            pcr0=measurements.pcr0.hex(),
            pcr1=measurements.pcr1.hex(),
            pcr2=measurements.pcr2.hex(),
            pcr8=measurements.pcr8.hex() if measurements.pcr8 is not None else None,
            config_policy_digest=None,
            source_revision=source_revision,
            build_time=utc_timestamp(),
        )
        return self.publish_statement(statement)

    def publish_statement(self, statement: Statement) -> Endorsement:
        """Sign any statement (a release, or a policy such as the persistence service's
        access policy) with the dev publisher, log it, cosign, endorse it."""
        signed = sign_statement(statement, self.publisher)
        entry = signed.entry()
        store = SQLiteLogStore(self.directory / "log.db")
        try:
            log = LogService(store, self.signer, witnesses=[self.witness.verifier])
            batch = log.integrate([entry])
            index = batch.indices[0]
            checkpoint = batch.checkpoint
            line = cosign(checkpoint.note, self.witness, int(time.time()))
            log.add_cosignature(add_cosignatures(checkpoint.note, [line]))
            stored = store.checkpoint_at(checkpoint.size)
            assert stored is not None
            proof = log.inclusion(index, checkpoint.size)
            return Endorsement(
                signed, LOG_ORIGIN, index, tuple(proof), stored.text_with_cosignatures
            )
        finally:
            store.close()

    def write_trust(self, path: Path) -> ClientTrust:
        """A client trust file pinning the dev root, this log, its witness and publisher."""
        from hermetic.nsm.pki import DevPKI

        DevPKI().root(datetime.now(UTC))  # create the emulator's PKI if it is not there yet
        return write_trust_bundle(
            path,
            log_vkey=self.signer.vkey,
            witness_vkeys=[self.witness.vkey],
            threshold=1,
            publishers={PUBLISHER_NAME: self.publisher_public_pem},
            root=TrustRoot.dev(),
        )


__all__ = ["LOG_ORIGIN", "PUBLISHER_NAME", "WITNESS_NAME", "DevLog", "DevRelease", "dev_log_dir"]
