from __future__ import annotations

import subprocess

import click
import pytest

from helpers import hermetic
from hermetic import cli as cli_module
from hermetic.errors import HermeticError, MalformedInputError, VerificationError


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return hermetic(*args, timeout=120)


def test_help_lists_commands_and_exits_zero() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "Usage: hermetic" in result.stdout


def test_every_command_has_help() -> None:
    ctx = click.Context(cli_module.cli)
    names = cli_module.cli.list_commands(ctx)
    for name in names:
        result = run_cli(name, "--help")
        assert result.returncode == 0, (name, result.stderr)
        assert "Usage:" in result.stdout


def test_unknown_command_is_usage_error() -> None:
    result = run_cli("no-such-command")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("error", "code"),
    [(VerificationError("PCR0 differs"), 1), (MalformedInputError("not CBOR"), 2)],
)
def test_hermetic_errors_become_one_line_and_exit_code(
    error: HermeticError, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    @click.command()
    def boom() -> None:
        raise error

    cli_module.cli.add_command(boom, "boom-test")
    try:
        with pytest.raises(SystemExit) as exc:
            cli_module.main(["boom-test"])
    finally:
        cli_module.cli.commands.pop("boom-test", None)
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert type(error).__name__ in err
