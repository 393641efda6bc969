"""``hermetic attestation``: look inside and verify Nitro attestation documents.

``inspect`` only decodes (useful on an expired or foreign document); ``verify`` runs the
whole verifier with a pinned root and a policy built from the options, and exits 0
(verified), 1 (rejected, reason on stderr) or 2 (unreadable input or bad option).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from hermetic.attestation import AttestationVerifier, Policy, TrustRoot, decode
from hermetic.attestation.chain import CertificateInfo, describe_document_chain
from hermetic.attestation.codec import AttestationDocument
from hermetic.cli import echo_json
from hermetic.cli._options import parse_hex, parse_pcr_option
from hermetic.errors import TrustRootError, UsageError


@click.group("attestation")
def attestation() -> None:
    """Inspect and verify Nitro attestation documents (COSE_Sign1, ES384)."""


@attestation.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def inspect_command(file: Path, as_json: bool) -> None:
    """Decode FILE and show module, time, PCRs, certificate chain and field sizes.

    Nothing is verified: use `hermetic attestation verify` for that.
    """
    _, doc = decode(file.read_bytes())
    certificates = describe_document_chain(doc)
    if as_json:
        echo_json(_document_json(doc, certificates))
        return
    _echo_document(doc, certificates)


@attestation.command("verify")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--root",
    default="aws",
    show_default=True,
    metavar="aws|dev|PEMFILE",
    help="Pinned root: AWS Nitro Enclaves Root-G1, the local emulator's dev root, or a PEM file.",
)
@click.option(
    "--at",
    "at",
    metavar="ISO8601|UNIX",
    help="Verify as of this time (default: now). Naive ISO times are UTC.",
)
@click.option(
    "--pcr",
    "pcrs",
    multiple=True,
    metavar="N=HEX",
    help="Expected PCR value (repeatable), e.g. --pcr 0=f4d4...",
)
@click.option("--allow-debug", is_flag=True, help="Accept debug-mode enclaves (PCR0 all zero).")
@click.option("--nonce", metavar="HEX", help="Expected nonce.")
@click.option("--public-key", metavar="HEX", help="Expected public_key.")
@click.option("--user-data", metavar="HEX", help="Expected user_data.")
@click.option(
    "--max-age",
    type=float,
    metavar="SECONDS",
    help="Reject documents older than this at the verification time.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def verify_command(
    file: Path,
    root: str,
    at: str | None,
    pcrs: tuple[str, ...],
    allow_debug: bool,
    nonce: str | None,
    public_key: str | None,
    user_data: str | None,
    max_age: float | None,
    as_json: bool,
) -> None:
    """Verify FILE: pinned root, certificate chain, ES384 signature, then the policy.

    Exit status 0 verified, 1 rejected (the reason on stderr), 2 unreadable input or bad
    option.

    \b
    Example:
      hermetic attestation verify doc.cbor --at 2024-01-16T18:54:56Z \\
          --pcr 0=67fdc916...cdd7 --max-age 300
    """
    if max_age is not None and max_age < 0:
        raise UsageError(f"--max-age: must not be negative, got {max_age}")
    policy = Policy(
        pcrs=dict(parse_pcr_option(spec) for spec in pcrs),
        allow_debug=allow_debug,
        nonce=parse_hex("--nonce", nonce),
        public_key=parse_hex("--public-key", public_key),
        user_data=parse_hex("--user-data", user_data),
        max_age=None if max_age is None else timedelta(seconds=max_age),
    )
    now = _parse_time(at) if at is not None else None
    trust_root = _load_root(root)
    data = file.read_bytes()
    result = AttestationVerifier(trust_root, cache_size=0).verify(data, policy, now)
    if as_json:
        value = _document_json(result.document, result.certificates)
        value.update(
            verified=True,
            root=trust_root.name,
            root_sha256=trust_root.fingerprint,
            verified_at=result.verified_at.isoformat(),
            debug=result.debug,
        )
        echo_json(value)
        return
    click.echo(
        f"verified: {result.module_id} at {result.timestamp.isoformat()} "
        f"(root {trust_root.name} {trust_root.fingerprint[:16]}..., "
        f"checked as of {result.verified_at.isoformat()})"
    )
    for index in sorted(policy.pcrs):
        click.echo(f"  PCR{index} matches {policy.pcrs[index].hex()}")
    if result.debug:
        click.echo("  debug-mode enclave (allowed by --allow-debug)")


def _load_root(spec: str) -> TrustRoot:
    if spec == "aws":
        return TrustRoot.aws()
    if spec == "dev":
        return TrustRoot.dev()
    path = Path(spec)
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise TrustRootError(
            f"--root: expected aws, dev or a readable PEM file; {spec}: {exc.strerror}"
        ) from None
    return TrustRoot.from_pem(pem, name=str(path))


def _parse_time(text: str) -> datetime:
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        pass
    except (OverflowError, OSError):
        raise UsageError(f"--at: unix time out of range: {text[:40]!r}") from None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--at: expected ISO 8601 or unix seconds, got {text[:40]!r}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _hex_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _document_json(
    doc: AttestationDocument, certificates: tuple[CertificateInfo, ...]
) -> dict[str, Any]:
    return {
        "module_id": doc.module_id,
        "timestamp": doc.timestamp,
        "digest": doc.digest,
        "pcrs": {str(index): value.hex() for index, value in doc.pcrs.items()},
        "public_key": _hex_or_none(doc.public_key),
        "user_data": _hex_or_none(doc.user_data),
        "nonce": _hex_or_none(doc.nonce),
        "certificates": [
            {
                "role": info.role,
                "subject": info.subject,
                "not_before": info.not_before.isoformat(),
                "not_after": info.not_after.isoformat(),
            }
            for info in certificates
        ],
    }


def _echo_document(doc: AttestationDocument, certificates: tuple[CertificateInfo, ...]) -> None:
    produced = datetime.fromtimestamp(doc.timestamp / 1000, UTC)
    click.echo(f"module_id   {doc.module_id}")
    click.echo(f"timestamp   {produced.isoformat()} ({doc.timestamp} ms)")
    click.echo(f"digest      {doc.digest}")
    click.echo(f"debug       {'yes (PCR0 all zero)' if doc.debug else 'no'}")
    for name in ("public_key", "user_data", "nonce"):
        value = getattr(doc, name)
        click.echo(f"{name:<11} {'absent' if value is None else f'{len(value)} bytes'}")
    click.echo(f"certificate {len(doc.certificate)} bytes; cabundle {len(doc.cabundle)} entries")
    click.echo("pcrs")
    for index, value in doc.pcrs.items():
        click.echo(f"  {index:>2}  {value.hex()}")
    click.echo("chain (leaf first; not verified)")
    for info in certificates:
        click.echo(f"  {info.role:<12} {info.subject}")
        click.echo(f"  {'':<12} {info.not_before.isoformat()} .. {info.not_after.isoformat()}")
