"""``hermetic release``: publish a signed, logged release of an image and verify one offline.

``publish`` measures the image, signs a ``hermetic.release/v1`` statement with the
publisher's key, logs the envelope, waits until it is integrated (and, with a trust file
that asks for witnesses, until a witnessed checkpoint covers it), verifies the proof it got
back and writes the *endorsement*: the file a client needs to check the release without
talking to the log. ``verify`` is that check.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from hermetic.cli import echo_json
from hermetic.cli._options import read_input, write_secret
from hermetic.errors import LogServiceError, UsageError

if TYPE_CHECKING:
    from hermetic.attestation import TrustRoot


def _hex_option(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    text = value.lower().removeprefix("0x")
    try:
        bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{name} must be hex, got {value!r}") from None
    return text


@click.group("release")
def release() -> None:
    """Publish and verify signed releases (statements logged in the transparency log)."""


@release.command("key")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the PKCS#8 PEM private key (mode 0600).",
)
@click.option(
    "--type",
    "kind",
    type=click.Choice(["ed25519", "p384"]),
    default="ed25519",
    show_default=True,
    help="Key type (p384 is needed for --rekor).",
)
@click.option("--force", is_flag=True, help="Replace an existing key file.")
def key(out: Path, kind: str, force: bool) -> None:  # fmt: skip
    """Make a publisher key; print its public key PEM (for trust files)."""
    from cryptography.hazmat.primitives import serialization

    from hermetic.translog.release import generate_publisher_key, load_publisher_key

    pem = generate_publisher_key(kind)
    write_secret(out, pem, force=force)
    public = load_publisher_key(pem).public_key()
    click.echo(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        nl=False,
    )


@release.command("trust")
@click.option("--log-key", required=True, help="The log's verifier key (or a file holding it).")
@click.option("--witness", "witnesses", multiple=True, help="A witness verifier key; repeatable.")
@click.option(
    "--threshold",
    default=0,
    show_default=True,
    help="Cosignatures a checkpoint needs from the listed witnesses.",
)
@click.option(
    "--publisher",
    "publishers",
    multiple=True,
    required=True,
    help="NAME=PEMFILE: a trusted publisher's public key or certificate; repeatable.",
)
@click.option(
    "--nitro-root",
    default=None,
    help="Also pin the Nitro root, so `hermetic connect` can use the file: aws (AWS Nitro "
    "Enclaves Root-G1), dev (this machine's emulator root) or a PEM file.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Trust file to write.")
def trust(log_key: str, witnesses: tuple[str, ...], threshold: int, publishers: tuple[str, ...],
          nitro_root: str | None, out: Path) -> None:  # fmt: skip
    """Write a trust file: the log key, witnesses and quorum, and trusted publishers.

    With --nitro-root it also pins the attestation root, which makes it a client trust
    file for `hermetic connect` (the log tools read the same file and ignore that part).
    """
    import json

    from hermetic.cli.log import _read_text
    from hermetic.translog.release import TrustBundle

    items = []
    for spec in publishers:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise UsageError(f"--publisher must be NAME=PEMFILE, got {spec!r}")
        pem = read_input(Path(path), "publisher PEM").decode("ascii", errors="replace")
        field = "certificate_pem" if "BEGIN CERTIFICATE" in pem else "public_key_pem"
        items.append({"name": name, field: pem})
    value = {
        "log": {
            "vkey": _read_text(log_key, "log key"),
            "witnesses": [_read_text(w, "witness key") for w in witnesses],
            "threshold": threshold,
        },
        "publishers": items,
    }
    bundle = TrustBundle.from_json(value)  # validate before writing
    if nitro_root is None:
        out.write_text(json.dumps(bundle.to_json(), indent=2) + "\n")
        return
    from hermetic.client.trust import ClientTrust

    client_trust = ClientTrust(_nitro_root(nitro_root), bundle)
    ClientTrust.loads(client_trust.dumps())  # validate the root pin as a client will
    out.write_bytes(client_trust.dumps())


def _nitro_root(choice: str) -> TrustRoot:
    """``aws``, ``dev`` (created if this machine has no emulator PKI yet) or a PEM file."""
    from hermetic.attestation import TrustRoot

    if choice == "aws":
        return TrustRoot.aws()
    if choice == "dev":
        from datetime import UTC, datetime

        from hermetic.nsm.pki import DevPKI

        return DevPKI().trust_root(datetime.now(UTC))
    path = Path(choice)
    if not path.is_file():
        raise UsageError(f"--nitro-root must be aws, dev or a PEM file, got {choice!r}")
    return TrustRoot.from_pem(read_input(path, "Nitro root PEM"), name="custom")


@release.command("publish")
@click.argument(
    "image", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--key",
    "key_file",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Publisher private key (PEM, Ed25519 or ECDSA P-384).",
)
@click.option(
    "--cert",
    "cert_file",
    type=click.Path(exists=True, path_type=Path),
    help="Publisher X.509 certificate (PEM) to include instead of the bare key.",
)
@click.option("--log", "url", required=True, help="Log URL.")
@click.option(
    "--trust",
    "trust_file",
    type=click.Path(exists=True, path_type=Path),
    help="Trust file: its log key verifies what the log returns, and its witness "
    "threshold is waited for.",
)
@click.option("--log-key", default=None, help="The log's verifier key, if no --trust is given.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the endorsement (JSON).",
)
@click.option("--service", default=None, help="Service name (default: from the image manifest).")
@click.option(
    "--version", "version", default=None, help="Service version (default: from the image manifest)."
)
@click.option("--source-revision", default=None, help="Source revision (e.g. git commit).")
@click.option("--config-policy-digest", default=None, help="Hex digest of the config policy.")
@click.option("--pcr0", default=None, help="PCR0 hex (instead of measuring IMAGE).")
@click.option("--pcr1", default=None, help="PCR1 hex (instead of measuring IMAGE).")
@click.option("--pcr2", default=None, help="PCR2 hex (instead of measuring IMAGE).")
@click.option("--pcr8", default=None, help="PCR8 hex (signed images).")
@click.option("--build-time", default=None, help="RFC 3339 UTC time (default: now).")
@click.option(
    "--rekor",
    default=None,
    help="Also post a hashedrekord to this Rekor v1 URL (needs a P-384 key).",
)
@click.option(
    "--wait",
    "wait_seconds",
    default=120.0,
    show_default=True,
    help="Seconds to wait for a witnessed checkpoint when the trust file needs one.",
)
def publish(image: Path | None, key_file: Path, cert_file: Path | None, url: str,
            trust_file: Path | None, log_key: str | None, out: Path, service: str | None,
            version: str | None, source_revision: str | None,
            config_policy_digest: str | None, pcr0: str | None, pcr1: str | None,
            pcr2: str | None, pcr8: str | None, build_time: str | None, rekor: str | None,
            wait_seconds: float) -> None:  # fmt: skip
    """Sign, log and endorse a release of IMAGE (or of explicitly given PCRs)."""
    from hermetic.cli.log import _read_text
    from hermetic.translog.client import LogClient
    from hermetic.translog.note import NoteVerifier
    from hermetic.translog.release import (
        Endorsement,
        ReleaseStatement,
        TrustBundle,
        load_publisher_key,
        sign_statement,
        submit_to_rekor,
        utc_timestamp,
    )

    pcrs = {"pcr0": _hex_option(pcr0, "--pcr0"), "pcr1": _hex_option(pcr1, "--pcr1"),
            "pcr2": _hex_option(pcr2, "--pcr2"), "pcr8": _hex_option(pcr8, "--pcr8")}  # fmt: skip
    if image is not None:
        if any(pcrs.values()):
            raise UsageError("give either IMAGE or --pcr0/--pcr1/--pcr2/--pcr8, not both")
        from hermetic.image import measure_file

        measured = measure_file(image)
        pcrs = {
            "pcr0": measured.pcr0.hex(),
            "pcr1": measured.pcr1.hex(),
            "pcr2": measured.pcr2.hex(),
            "pcr8": measured.pcr8.hex() if measured.pcr8 is not None else None,
        }
        service = service or measured.service
        version = version or measured.version
    elif not (pcrs["pcr0"] and pcrs["pcr1"] and pcrs["pcr2"]):
        raise UsageError("without IMAGE, --pcr0, --pcr1 and --pcr2 are required")
    if not service or not version:
        raise UsageError("--service and --version are required (the image does not name them)")

    if trust_file is not None:
        bundle = TrustBundle.load(trust_file)
        log_verifier = NoteVerifier.from_vkey(bundle.log.vkey)
        witnesses = [NoteVerifier.from_vkey(w) for w in bundle.log.witnesses]
        threshold = bundle.log.threshold
    elif log_key is not None:
        log_verifier, witnesses, threshold = (
            NoteVerifier.from_vkey(_read_text(log_key, "log key")),
            [],
            0,
        )
    else:
        raise UsageError("pass --trust TRUSTFILE or --log-key VKEY to verify what the log returns")

    statement = ReleaseStatement(
        service=service,
        version=version,
        pcr0=pcrs["pcr0"] or "",
        pcr1=pcrs["pcr1"] or "",
        pcr2=pcrs["pcr2"] or "",
        pcr8=pcrs["pcr8"],
        config_policy_digest=_hex_option(config_policy_digest, "--config-policy-digest"),
        source_revision=source_revision,
        build_time=build_time or utc_timestamp(),
    )
    private_key = load_publisher_key(read_input(key_file, "publisher key"))
    cert_pem = read_input(cert_file, "certificate").decode("ascii") if cert_file else None
    signed = sign_statement(statement, private_key, cert_pem)
    entry = signed.entry()

    with LogClient(url, log_verifier, witnesses, threshold) as client:
        added = client.add(entry)
        checkpoint, proof = added.checkpoint, list(added.inclusion_proof)
        if threshold > 0:
            deadline = time.monotonic() + wait_seconds
            while True:
                witnessed = client.witnessed_checkpoint(threshold)
                if witnessed is not None and witnessed.size > added.index:
                    checkpoint = witnessed
                    proof = client.inclusion_proof(added.index, witnessed, entry)
                    break
                if time.monotonic() > deadline:
                    raise LogServiceError(
                        f"no checkpoint with {threshold} witness cosignature(s) covered entry "
                        f"{added.index} within {wait_seconds:.0f} s"
                    )
                time.sleep(0.5)

    extra = {}
    if rekor is not None:
        extra["rekor"] = submit_to_rekor(rekor, signed).to_json()
    endorsement = Endorsement(
        signed, checkpoint.origin, added.index, tuple(proof), checkpoint.message, extra
    )
    out.write_bytes(endorsement.dumps())
    echo_json({"index": added.index, "tree_size": checkpoint.size, "service": service,
               "version": version, "pcr0": statement.pcr0,
               "cosignatures": len(checkpoint.cosignatures), "endorsement": str(out),
               **({"rekor_uuid": extra["rekor"]["uuid"]} if "rekor" in extra else {})})  # fmt: skip


@release.command("verify")
@click.argument("endorsement_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--trust",
    "trust_file",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Trust file: log key, witnesses and threshold, trusted publishers.",
)
@click.option("--pcr0", default=None, help="Also require this PCR0 (hex).")
def verify(endorsement_file: Path, trust_file: Path, pcr0: str | None) -> None:
    """Check an endorsement offline: publisher signature, log inclusion, witnessed checkpoint."""
    from hermetic.translog.release import Endorsement, TrustBundle, verify_endorsement

    endorsement = Endorsement.load(endorsement_file)
    verified = verify_endorsement(
        endorsement, TrustBundle.load(trust_file), expected_pcr0=_hex_option(pcr0, "--pcr0")
    )
    echo_json({
        "verified": True,
        "publisher": verified.publisher,
        "statement": verified.statement.to_json(),
        "log": verified.origin,
        "index": verified.index,
        "tree_size": verified.tree_size,
        "cosigners": list(verified.cosigners),
    })  # fmt: skip
