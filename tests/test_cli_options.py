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
