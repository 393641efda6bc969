"""``hermetic kms``: run the local KMS, and write least-privilege key policies for releases.

``serve`` is the development stand-in for AWS KMS (real AWS JSON 1.1 protocol, real
attestation checks); ``policy`` prints the key policy that releases a key to one measured
image only, with the digest to publish. See ``docs/kms.md``.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click

from hermetic.cli import echo_json
from hermetic.cli._options import EXISTING_FILE, FILE, parse_hex, parse_pcr_option, read_input
from hermetic.errors import UsageError

if TYPE_CHECKING:
    from hermetic.attestation import TrustRoot


@click.group("kms")
def kms() -> None:
    """Local KMS server and key-policy helper (attestation-bound key release)."""


def _listen(value: str, port: int | None) -> tuple[str, int]:
    from hermetic.transport.tcp import parse_hostport

    address = parse_hostport(value, field="--listen", allow_port_zero=True)
    if port is None:
        return address.host, address.port
    if not 0 <= port <= 65535:
        raise UsageError(f"--port: expected 0..65535, got {port}")
    return address.host, port


def _trust_root(choice: str) -> TrustRoot:
    from hermetic.attestation import TrustRoot

    if choice == "dev":
        from datetime import UTC, datetime

        from hermetic.nsm.pki import DevPKI

        return DevPKI().trust_root(datetime.now(UTC))  # created on first use
    if choice == "aws":
        return TrustRoot.aws()
    path = Path(choice)
    if not path.is_file():
        raise UsageError(f"--attestation-root: expected dev, aws or a PEM file, got {choice!r}")
    return TrustRoot.from_pem(read_input(path, "--attestation-root"), name=path.name)


@kms.command("serve")
@click.option(
    "--listen",
    default="127.0.0.1:4599",
    show_default=True,
    help="HOST:PORT to listen on.",
)
@click.option("--port", type=int, default=None, help="Port to listen on (overrides --listen's).")
@click.option(
    "--db",
    default=None,
    help="Key store: a SQLite file or a postgresql:// URL (default: <state dir>/kms/kms.sqlite3;"
    " the root key sits beside a SQLite file, else in <state dir>/kms).",
)
@click.option(
    "--root-key",
    type=FILE,
    default=None,
    help="Server root key file sealing key material (created 0600 if absent).",
)
@click.option(
    "--attestation-root",
    default="dev",
    show_default=True,
    help="Root that Recipient documents must chain to: dev, aws, or a PEM file.",
)
@click.option(
    "--max-document-age",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="Oldest Recipient attestation document accepted, in seconds.",
)
@click.option("--account", default="111122223333", show_default=True, help="Account id.")
@click.option("--region", default="us-east-1", show_default=True, help="Region in key ARNs.")
def serve(
    listen: str,
    port: int | None,
    db: str | None,
    root_key: Path | None,
    attestation_root: str,
    max_document_age: int,
    account: str,
    region: str,
) -> None:
    """Serve the AWS KMS JSON 1.1 API locally (boto3 / aws CLI with --endpoint-url).

    Any SigV4-signed request is accepted (the signature is not verified); its access key id
    is the caller principal that key policies match. Denials are logged on stderr with the
    failed check.
    """
    import uvicorn

    from hermetic.kms.server import AttestationEvidenceVerifier, KMSService, create_app
    from hermetic.kms.store import KeyStore

    host, listen_port = _listen(listen, port)
    root = _trust_root(attestation_root)
    verifier = AttestationEvidenceVerifier(root, max_age=timedelta(seconds=max_document_age))
    store = KeyStore.open(db, root_key)
    service = KMSService(store, verifier, account=account, region=region)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    click.echo(
        f"hermetic kms: serving on http://{host}:{listen_port} "
        f"(attestation root {verifier.root_name}, max document age {max_document_age}s)",
        err=True,
    )
    config = uvicorn.Config(
        create_app(service), host=host, port=listen_port, log_level="warning", access_log=False
    )
    try:
        uvicorn.Server(config).run()
    finally:
        store.close()


@kms.command("policy")
@click.option(
    "--release",
    "release_path",
    type=EXISTING_FILE,
    default=None,
    help="Release endorsement (or statement) JSON whose PCR0/1/2 the key is bound to.",
)
@click.option("--pcr0", default=None, help="PCR0 (ImageSha384) hex, instead of --release.")
@click.option(
    "--pcr",
    "extra_pcrs",
    multiple=True,
    metavar="N=HEX",
    help="Also require PCR N (e.g. 3=<parent role measurement>); repeatable.",
)
@click.option("--principal", default=None, help="Who may receive the key (default: account root).")
@click.option("--admin", default=None, help="Key administrator ARN (default: account root).")
@click.option("--account", default="111122223333", show_default=True, help="AWS account id.")
@click.option(
    "--immutable",
    is_flag=True,
    help="Leave kms:PutKeyPolicy out, so nobody can rewrite the policy later.",
)
@click.option(
    "--output",
    type=FILE,
    default=None,
    help="Write the policy here and print {output, sha256} instead of the policy.",
)
def policy(
    release_path: Path | None,
    pcr0: str | None,
    extra_pcrs: tuple[str, ...],
    principal: str | None,
    admin: str | None,
    account: str,
    immutable: bool,
    output: Path | None,
) -> None:
    """Print a least-privilege key policy releasing a key to one measured release.

    The policy allows kms:Decrypt and kms:GenerateDataKey only with an attested Recipient
    whose PCR0 (ImageSha384), PCR1 and PCR2 (and any --pcr) match; a separate
    administration statement cannot decrypt. The SHA-256 of the policy's canonical JSON
    goes to stderr (or into the --output summary) for logging.
    """
    from hermetic.image.pcrs import PCR_SIZE
    from hermetic.kms.keypolicy import (
        ReleaseReference,
        load_release_reference,
        policy_sha256,
        release_key_policy,
        rewrite_risks,
    )

    if (release_path is None) == (pcr0 is None):
        raise UsageError("give exactly one of --release ENDORSEMENT and --pcr0 HEX")
    if release_path is not None:
        reference = load_release_reference(release_path)
        pcrs = dict(reference.pcrs)
        service, version = reference.service, reference.version
    else:
        pcrs = {0: (parse_hex("--pcr0", pcr0) or b"").hex()}
        service = version = None
    for item in extra_pcrs:
        index, value = parse_pcr_option(item, size=PCR_SIZE)
        if index in pcrs and pcrs[index].lower() != value.hex():
            raise UsageError(f"--pcr {index}: conflicts with the release's PCR{index}")
        pcrs[index] = value.hex()
    reference = ReleaseReference(pcrs=pcrs, service=service, version=version)
    document = release_key_policy(
        reference,
        account=account,
        principal=principal,
        admin_principal=admin,
        immutable=immutable,
    )
    sha256 = policy_sha256(document)
    for risk in rewrite_risks(document):
        click.echo(
            f"warning: {risk}; pass --immutable to leave it out (then put the policy with "
            "BypassPolicyLockoutSafetyCheck)",
            err=True,
        )
    text = json.dumps(document, indent=2)
    if output is not None:
        output.write_text(text + "\n", encoding="utf-8")
        echo_json({"output": str(output), "sha256": sha256})
        return
    click.echo(text)
    click.echo(f"policy sha256 {sha256}", err=True)
