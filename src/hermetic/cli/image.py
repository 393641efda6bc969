"""``hermetic build`` and ``hermetic image``: build reproducible images, print their PCRs.

Output mirrors nitro-cli so existing scripts and KMS policies keep working: ``build``
prints ``{"Measurements": {...}}`` like ``nitro-cli build-enclave``, and
``image measure --json`` prints the inner object (``HashAlgorithm``, ``PCR0``, ``PCR1``,
``PCR2``, and ``PCR8`` only when signed, lowercase hex).
"""

from __future__ import annotations

from pathlib import Path

import click

from hermetic.cli import echo_json
from hermetic.cli._options import read_input
from hermetic.errors import SigningKeyError, UsageError


@click.command(
    "build",
    help="Build the app in APPDIR into a reproducible image and print its PCRs.\n\n"
    "The image depends only on file names, contents, executable bits and "
    "SOURCE_DATE_EPOCH (0 if unset): the same source gives the same PCR0 anywhere. "
    "With --eif, generate a Dockerfile and build a Nitro EIF with nitro-cli instead.",
)
@click.argument("appdir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the image (or the EIF with --eif).",
)
@click.option(
    "--sign-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="ECDSA P-384 private key (PEM) to sign PCR0 with, like nitro-cli.",
)
@click.option(
    "--sign-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Certificate (PEM) of --sign-key; its DER is measured into PCR8.",
)
@click.option("--eif", is_flag=True, help="Build a Nitro EIF with nitro-cli (needs nitro-cli).")
@click.option(
    "--base-image",
    default="python:3.11-slim",
    show_default=True,
    help="With --eif: the Docker base image (pin it by digest for reproducible PCRs).",
)
def build(
    appdir: Path,
    output: Path,
    sign_key: Path | None,
    sign_cert: Path | None,
    eif: bool,
    base_image: str,
) -> None:
    from hermetic.image.build import SigningMaterial, build_eif, build_image

    if (sign_key is None) != (sign_cert is None):
        raise UsageError("--sign-key and --sign-cert must be given together")
    if eif:
        paths = (sign_key, sign_cert) if sign_key and sign_cert else None
        measurements = build_eif(appdir, output, signing_paths=paths, base_image=base_image)
    else:
        signing = None
        if sign_key is not None and sign_cert is not None:
            signing = SigningMaterial(
                read_input(sign_key, "signing key", error=SigningKeyError),
                read_input(sign_cert, "signing certificate", error=SigningKeyError),
            )
        measurements = build_image(appdir, output, signing=signing).measurements
    echo_json({"Measurements": measurements.to_nitro_json()})


@click.group("image", help="Measure and inspect enclave images (hermetic images and EIFs).")
def image() -> None:
    pass


@image.command(
    "measure",
    help="Print the PCRs of IMAGE, a hermetic image or a Nitro EIF (format from its magic).",
)
@click.argument("path", metavar="IMAGE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print nitro-cli's JSON keys instead.")
def measure(path: Path, as_json: bool) -> None:
    from hermetic.image import measure_file

    measurements = measure_file(path)
    if as_json:
        echo_json(measurements.to_nitro_json())
        return
    label = f" {measurements.service} {measurements.version}" if measurements.service else ""
    click.echo(f"{measurements.kind} image{label}")
    for index, value in measurements.pcrs().items():
        click.echo(f"PCR{index}  {value.hex()}")


@image.command(
    "inspect",
    help="Print an image's manifest, metadata, signer and layer contents as JSON.",
)
@click.argument("path", metavar="IMAGE", type=click.Path(dir_okay=False, path_type=Path))
def inspect(path: Path) -> None:
    from hermetic.image import measure_file, open_image, read_eif_file
    from hermetic.image.eif import EIF_MAGIC

    measurements = measure_file(path)
    if measurements.kind == "eif":
        info = read_eif_file(path)
        echo_json(
            {
                "Kind": "eif",
                "Version": info.header.version,
                "Arm64": info.header.arm64,
                "Cmdline": info.cmdline,
                "Sections": [[s.type.name.lower(), s.size] for s in info.sections],
                "Metadata": info.metadata,
                "Signers": [s.certificate().subject.rfc4514_string() for s in info.signatures],
                "Measurements": measurements.to_nitro_json(),
                "Magic": EIF_MAGIC.decode(),
            }
        )
        return
    opened = open_image(path)
    echo_json(
        {
            "Kind": "hermetic",
            "Manifest": opened.manifest.summary(),
            "Boot": {"python": opened.boot.python, "module": opened.boot.boot_module},
            "Metadata": opened.metadata,
            "Signers": [s.certificate().subject.rfc4514_string() for s in opened.signatures],
            "AppFiles": [e.path for e in opened.app_entries() if not e.is_dir],
            "RuntimeFiles": sum(1 for e in opened.runtime_entries() if not e.is_dir),
            "Measurements": measurements.to_nitro_json(),
        }
    )


@image.command(
    "extract",
    help="Validate IMAGE and write its layers to DEST/runtime and DEST/app (DEST must be empty).",
)
@click.argument("path", metavar="IMAGE", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--read-only", is_flag=True, help="Make the extracted files and folders read-only.")
def extract_command(path: Path, dest: Path, read_only: bool) -> None:
    from hermetic.image import extract, open_image

    opened = open_image(path)
    extract(opened, dest, read_only=read_only)
    click.echo(f"extracted {opened.manifest.name} {opened.manifest.version} to {dest}")
