"""Option parsing and file handling the CLI commands share.

Several commands take the same kinds of values (hex strings, ``--pcr N=HEX``, key files
they must read or create 0600); parsing them in one place gives every command the same
error messages and exit codes (:class:`~hermetic.errors.UsageError` for a bad option,
:class:`~hermetic.errors.MalformedInputError` for an unreadable file).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from hermetic.errors import HermeticError, MalformedInputError, UsageError

#: Highest PCR index a Nitro enclave has (the NSM reports 32 PCRs).
MAX_PCR_INDEX = 31

#: Click types for a file argument/option (a directory is a usage error), and for one that
#: must already exist; click types hold configuration only, so commands share them.
FILE = click.Path(dir_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)

Command = TypeVar("Command", bound=Callable[..., object])


def boot_input_options(
    *, config_help: str, endorsement_help: str, credentials_help: str
) -> Callable[[Command], Command]:
    """``--config``, ``--endorsement`` and ``--aws-credentials-env`` (as ``config``,
    ``endorsement``, ``forward_credentials``): what an enclave is handed at boot.

    ``run``, ``proxy`` and ``up`` all take them with the same names and types; only the
    help differs (who delivers them depends on the command and on emulation vs Nitro).
    """

    def apply(command: Command) -> Command:
        command = click.option(
            "--aws-credentials-env", "forward_credentials", is_flag=True, help=credentials_help
        )(command)
        command = click.option(
            "--endorsement", type=EXISTING_FILE, default=None, help=endorsement_help
        )(command)
        return click.option("--config", type=EXISTING_FILE, default=None, help=config_help)(command)

    return apply


def parse_hex(option: str, value: str | None) -> bytes | None:
    """``value`` as bytes (None stays None); anything but hex is a UsageError naming ``option``."""
    if value is None:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise UsageError(f"{option}: expected hex, got {value[:40]!r}") from None


def parse_pcr_option(
    spec: str, *, option: str = "--pcr", size: int | None = None
) -> tuple[int, bytes]:
    """Parse ``N=HEX`` into ``(N, value)``; ``size`` pins the value's length if given."""
    index_text, sep, hex_value = spec.partition("=")
    if not sep or not index_text.strip().isdigit():
        raise UsageError(f"{option}: expected N=HEX, got {spec[:40]!r}")
    index = int(index_text)
    if not 0 <= index <= MAX_PCR_INDEX:
        raise UsageError(f"{option}: index must be 0..{MAX_PCR_INDEX}, got {index}")
    value = parse_hex(f"{option} {index}", hex_value)
    assert value is not None
    if size is not None and len(value) != size:
        raise UsageError(f"{option} {index}: expected {size} bytes, got {len(value)}")
    return index, value


def read_input(path: Path, what: str, *, error: type[HermeticError] = MalformedInputError) -> bytes:
    """The bytes of ``path``; an OS error becomes ``error`` naming ``what`` and the path."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise error(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def write_secret(path: Path, data: bytes, *, force: bool) -> None:
    """Write a private key (or other secret) readable by its owner only (mode 0600).

    Refuses to replace an existing file unless ``force``: a key overwritten by mistake
    cannot be recovered, and whatever it signed stops verifying.
    """
    if path.exists() and not force:
        raise UsageError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT
