"""Shared CLI option parsing: the same mistake gets the same message from every command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hermetic.cli._options import (
    MAX_PCR_INDEX,
    parse_hex,
    parse_pcr_option,
    read_input,
    write_secret,
)
from hermetic.errors import MalformedInputError, SigningKeyError, UsageError


def test_parse_hex_keeps_none_and_names_the_option() -> None:
    assert parse_hex("--nonce", None) is None
    assert parse_hex("--nonce", "00ff") == b"\x00\xff"
    with pytest.raises(UsageError, match=r"^--nonce: expected hex, got 'xyz'$"):
        parse_hex("--nonce", "xyz")


def test_pcr_option_parses_index_and_value() -> None:
    assert parse_pcr_option("3=abcd") == (3, b"\xab\xcd")
    assert parse_pcr_option(f"{MAX_PCR_INDEX}=00") == (MAX_PCR_INDEX, b"\x00")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nonsense", "--pcr: expected N=HEX"),
        ("x=00", "--pcr: expected N=HEX"),
        (f"{MAX_PCR_INDEX + 1}=00", f"--pcr: index must be 0..{MAX_PCR_INDEX}"),
        ("0=zz", "--pcr 0: expected hex"),
        ("0=00", "--pcr 0: expected 48 bytes, got 1"),
    ],
)
def test_pcr_option_rejects_each_mistake_with_its_own_message(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_pcr_option(spec, size=48)


def test_read_input_raises_the_callers_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(MalformedInputError, match=rf"^signing key: cannot read {missing}: "):
        read_input(missing, "signing key")
    with pytest.raises(SigningKeyError):
        read_input(missing, "signing key", error=SigningKeyError)


def test_write_secret_is_owner_only_even_over_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "key.pem"
    write_secret(path, b"one", force=False)
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(UsageError, match="exists; pass --force"):
        write_secret(path, b"two", force=False)
    assert path.read_bytes() == b"one"
    path.chmod(0o644)
    write_secret(path, b"two", force=True)
    assert path.read_bytes() == b"two"
    assert os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("name", ["run", "proxy", "up"])
def test_run_proxy_and_up_take_the_same_boot_inputs(name: str, tmp_path: Path) -> None:
    import click

    from hermetic.cli import launcher

    command: click.Command = getattr(launcher, name)
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    assert options["config"].opts == ["--config"]
    assert options["endorsement"].opts == ["--endorsement"]
    assert options["forward_credentials"].opts == ["--aws-credentials-env"]
    assert options["forward_credentials"].is_flag
    for dest in ("config", "endorsement", "forward_credentials"):
        assert options[dest].help, f"{name} {dest} has no help"
    # the file options must name an existing file, not a directory
    context = command.make_context(name, ["--help"], resilient_parsing=True)
    with pytest.raises(click.BadParameter):
        options["config"].type.convert(str(tmp_path / "absent"), options["config"], context)
    with pytest.raises(click.BadParameter):
        options["endorsement"].type.convert(str(tmp_path), options["endorsement"], context)
