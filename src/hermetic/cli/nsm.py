"""``hermetic nsm``: use the Nitro Secure Module from the shell.

``attest`` produces a real-format attestation document from the emulated NSM (signed by the
local dev PKI, so it verifies with ``hermetic attestation verify --root dev`` and not with
the AWS root); ``describe`` asks whichever NSM is reachable (``/dev/nsm``, the emulator
socket, or a fresh emulator); ``dev-root`` shows the dev root to pin; ``serve`` runs the
emulator on a Unix socket the way the launcher does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from hermetic.cli import echo_json
from hermetic.cli._options import parse_hex, parse_pcr_option
from hermetic.errors import UsageError
from hermetic.nsm.client import NSMClient
from hermetic.nsm.device import DEVICE_PATH
from hermetic.nsm.emulator import PCR_SIZE, EmulatedNSM
from hermetic.nsm.pki import DevPKI, fingerprint, root_path
from hermetic.nsm.server import SOCKET_ENV, serve_forever

_PCR_HELP = (
    "Initial PCR value N=HEX (48 bytes, repeatable). Without any --pcr, PCR0-2 hold the "
    "measurement of an empty image; PCR4 is always the emulated instance id."
)


@click.group("nsm")
def nsm() -> None:
    """Talk to the Nitro Secure Module: /dev/nsm on Nitro, the emulator elsewhere."""


@nsm.command("attest")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the attestation document (raw COSE_Sign1 bytes) here.",
)
@click.option("--user-data", metavar="HEX", help="user_data field (up to 1024 bytes).")
@click.option("--nonce", metavar="HEX", help="nonce field (up to 1024 bytes).")
@click.option(
    "--public-key",
    metavar="HEX|@PEMFILE",
    help="public_key field: hex bytes, or @file.pem for a PEM public key (stored as DER SPKI).",
)
@click.option("--pcr", "pcrs", multiple=True, metavar="N=HEX", help=_PCR_HELP)
@click.option("--debug", is_flag=True, help="Debug-mode enclave: PCR0, 1, 2 and 8 are zero.")
def attest_command(
    out: Path,
    user_data: str | None,
    nonce: str | None,
    public_key: str | None,
    pcrs: tuple[str, ...],
    debug: bool,
) -> None:
    """Produce an attestation document from the emulated NSM.

    \b
    Example:
      hermetic nsm attest --out doc.cbor --nonce 00112233
      hermetic attestation verify doc.cbor --root dev
    """
    initial = dict(_parse_pcr(spec) for spec in pcrs) if pcrs else None
    fields = {
        "user_data": parse_hex("--user-data", user_data),
        "nonce": parse_hex("--nonce", nonce),
        "public_key": _parse_public_key(public_key),
    }
    now = datetime.now(UTC)
    module = EmulatedNSM(initial, debug=debug, now=now)
    document = NSMClient(module).attest(**fields)
    out.write_bytes(document)
    click.echo(
        f"wrote {out} ({len(document)} bytes): module {module.module_id}, "
        f"{'debug' if debug else 'non-debug'}, signed under dev root "
        f"{fingerprint(DevPKI().root(now))[:16]}..."
    )


@nsm.command("describe")
def describe_command() -> None:
    """Print the NSM's DescribeNSM answer as JSON.

    Uses /dev/nsm when it exists, else the emulator at $HERMETIC_NSM_SOCKET, else a fresh
    emulated NSM (whose module id is new on every run).
    """
    if os.path.exists(DEVICE_PATH) or os.environ.get(SOCKET_ENV):
        client = NSMClient.open()
        source = "device" if os.path.exists(DEVICE_PATH) else "socket"
    else:
        client = NSMClient(EmulatedNSM(now=datetime.now(UTC)))
        source = "emulator"
    with client:
        description = client.describe_nsm()
    echo_json(
        {
            "source": source,
            "version": ".".join(str(v) for v in description.version),
            "module_id": description.module_id,
            "max_pcrs": description.max_pcrs,
            "locked_pcrs": list(description.locked_pcrs),
            "digest": description.digest,
        }
    )


@nsm.command("dev-root")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the PEM here instead of printing it.",
)
def dev_root_command(out: Path | None) -> None:
    """Print (or write) the emulated NSM's dev root certificate and its SHA-256.

    The root is created on first use under the state directory and kept across runs;
    verifiers accept it only with `--root dev` (or this PEM file). Printed PEM goes to
    stdout and the fingerprint to stderr, so `hermetic nsm dev-root > root.pem` works.
    """
    root = DevPKI().root(datetime.now(UTC))
    pem = root.public_bytes(serialization.Encoding.PEM)
    line = f"SHA-256 fingerprint: {fingerprint(root)}  ({root_path()})"
    if out is None:
        click.echo(pem.decode("ascii"), nl=False)
        click.echo(line, err=True)
        return
    out.write_bytes(pem)
    click.echo(f"wrote {out}")
    click.echo(line)


@nsm.command("serve")
@click.option(
    "--socket",
    "socket_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket to listen on (point the enclave's HERMETIC_NSM_SOCKET here).",
)
@click.option("--pcr", "pcrs", multiple=True, metavar="N=HEX", help=_PCR_HELP)
@click.option("--debug", is_flag=True, help="Debug-mode enclave: PCR0, 1, 2 and 8 are zero.")
def serve_command(socket_path: Path, pcrs: tuple[str, ...], debug: bool) -> None:
    """Serve one emulated NSM on a Unix socket until interrupted (what the launcher does)."""
    initial = dict(_parse_pcr(spec) for spec in pcrs) if pcrs else None
    module = EmulatedNSM(initial, debug=debug, now=datetime.now(UTC))
    click.echo(f"NSM {module.module_id} listening on {socket_path}", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(module, socket_path))


def _parse_public_key(value: str | None) -> bytes | None:
    if value is None or not value.startswith("@"):
        return parse_hex("--public-key", value)
    path = Path(value[1:])
    pem = path.read_bytes()
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise UsageError(f"--public-key: {path} is not a PEM public key") from None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _parse_pcr(spec: str) -> tuple[int, bytes]:
    index, value = parse_pcr_option(spec)
    if len(value) != PCR_SIZE:
        raise UsageError(
            f"--pcr {index}: expected {PCR_SIZE} bytes, got {len(value)} "
            f"(a SHA-384 digest such as {hashlib.sha384(b'').hexdigest()[:16]}...)"
        )
    return index, value
