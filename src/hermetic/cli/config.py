"""``hermetic config``: the operator's side of runtime config bundles.

An image bakes in the operator's *public* key (``operator_key`` in ``hermetic.toml``);
the enclave accepts at boot only a config signed by the private half, and puts the
config's SHA-256 into the ``user_data`` of its attestation documents so clients see
which config a session runs under (:mod:`hermetic.enclave.config`, ``docs/runtime.md``).
These commands make that key, sign a config with it and show what a bundle holds,
including the digest clients will see, before it is handed to ``hermetic run --config``.
"""

from __future__ import annotations

from pathlib import Path

import click

from hermetic.cli import echo_json
from hermetic.cli._options import FILE, read_input, write_secret


@click.group("config")
def config() -> None:
    """Sign and inspect runtime config bundles (the operator key's side).

    \b
    Typical use:
      hermetic config key --out operator.key --public-out app/operator.pub.pem
      hermetic config sign staging.json --key operator.key -o staging.bundle
      hermetic config inspect staging.bundle --operator-key app/operator.pub.pem
      hermetic run IMAGE --config staging.bundle
    """


@config.command("key")
@click.option(
    "--out",
    type=FILE,
    required=True,
    help="Where to write the Ed25519 private key (PKCS#8 PEM, mode 0600).",
)
@click.option(
    "--public-out",
    type=FILE,
    default=None,
    help="Also write the public key PEM here (the file the manifest's operator_key names).",
)
@click.option("--force", is_flag=True, help="Replace an existing key file.")
def key(out: Path, public_out: Path | None, force: bool) -> None:
    """Make an operator key; print its public PEM (the manifest's operator_key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    write_secret(
        out,
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        force=force,
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public_out is not None:
        public_out.write_bytes(public)
    click.echo(public.decode(), nl=False)


@config.command("sign")
@click.argument("config_file", type=FILE)
@click.option(
    "--key",
    "key_file",
    type=FILE,
    required=True,
    help="Operator private key (PEM: Ed25519, or ECDSA P-256/P-384).",
)
@click.option(
    "-o",
    "--out",
    type=FILE,
    required=True,
    help="Where to write the signed bundle.",
)
def sign(config_file: Path, key_file: Path, out: Path) -> None:
    """Sign a JSON config into a bundle for `hermetic run --config`.

    The config bytes are signed as they are in the file (no reformatting), so the digest
    printed here is the SHA-256 of the file, and the one attestation user_data carries.
    """
    from hermetic.enclave.config import config_digest, load_operator_key, sign_config

    config_bytes = read_input(config_file, "config")
    private = load_operator_key(read_input(key_file, "operator key"))
    bundle = sign_config(config_bytes, private)
    out.write_bytes(bundle)
    echo_json(
        {
            "bundle": str(out),
            "size": len(bundle),
            "config_digest": config_digest(config_bytes).hex(),
        }
    )


@config.command("inspect")
@click.argument("bundle_file", type=FILE)
@click.option(
    "--operator-key",
    "operator_key",
    type=FILE,
    default=None,
    help="Operator public key (PEM, as in the manifest): verify the signature with it.",
)
def inspect(bundle_file: Path, operator_key: Path | None) -> None:
    """Show a bundle's config digest; with --operator-key, verify it.

    The digest is what attestation user_data will carry.

    Without --operator-key the signature is not checked ("signature_verified": null);
    with it, a bundle that does not verify is an error (exit 1), as it is at boot.
    """
    from hermetic.enclave.config import config_digest, parse_bundle, parse_values, verify_bundle
    from hermetic.errors import RuntimeConfigFormatError
    from hermetic.evidence import user_data

    bundle = read_input(bundle_file, "config bundle")
    config_bytes, signature = parse_bundle(bundle)
    verified: bool | None = None
    if operator_key is not None:
        runtime_config = verify_bundle(bundle, read_input(operator_key, "operator key"))
        values = runtime_config.values
        verified = True
    else:
        try:
            values = parse_values(config_bytes)
        except RuntimeConfigFormatError:
            values = None  # shown as null; verify_bundle (with --operator-key) says why
    digest = config_digest(config_bytes)
    echo_json(
        {
            "config_digest": digest.hex(),
            "evidence_user_data": user_data(digest).hex(),
            "signature_size": len(signature),
            "signature_verified": verified,
            "values": values,
        }
    )
