"""The ``hermetic`` command line.

One entry point, one framework (click). Subcommands live in their own modules under
``hermetic.cli`` and are loaded lazily, so ``hermetic --help`` stays fast and a command's
dependencies are imported only when it runs. Every :class:`~hermetic.errors.HermeticError`
becomes one line on stderr and the error's exit code (1 rejected, 2 bad usage or
unreadable input); nothing else a user can trigger should show a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import click

from hermetic import __version__
from hermetic.errors import EXIT_USAGE, HermeticError

# name -> (module, attribute, one-line help). A module that does not exist yet is simply
# not offered, so components can land one at a time.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "attestation": (
        "hermetic.cli.attestation",
        "attestation",
        "Inspect and verify attestation documents.",
    ),
    "nsm": ("hermetic.cli.nsm", "nsm", "Talk to the Nitro Secure Module (real or emulated)."),
    "build": ("hermetic.cli.image", "build", "Build a reproducible enclave image."),
    "image": ("hermetic.cli.image", "image", "Measure enclave images (hermetic images and EIF)."),
    "run": ("hermetic.cli.launcher", "run", "Run an enclave image."),
    "ps": ("hermetic.cli.launcher", "ps", "List running enclaves."),
    "stop": ("hermetic.cli.launcher", "stop", "Stop a running enclave."),
    "console": ("hermetic.cli.launcher", "console", "Attach to a debug enclave's console."),
    "up": ("hermetic.cli.launcher", "up", "Build, run and expose a service for development."),
    "connect": ("hermetic.cli.client", "connect", "Open an attested session to a service."),
    "log": ("hermetic.cli.log", "log", "Run and use the transparency log."),
    "release": ("hermetic.cli.release", "release", "Publish and verify signed releases."),
    "kms": ("hermetic.cli.kms", "kms", "Local KMS server and key-policy helper."),
    "store": ("hermetic.cli.store", "store", "The parent's record store (opaque sealed records)."),
    "proxy": ("hermetic.cli.launcher", "proxy", "Run the parent-side service proxy."),
    "demo": ("hermetic.cli.demo", "demo", "Walk through the trust core end to end."),
    "config": ("hermetic.cli.config", "config", "Sign and inspect runtime config bundles."),
    "gateway": ("hermetic.cli.gateway", "gateway", "Run the enclave gateway and hand it backends."),
    "receipts": ("hermetic.cli.gateway", "receipts", "Verify the gateway's receipts offline."),
    "reporting": (
        "hermetic.cli.reporting",
        "reporting",
        "Generate synthetic tenants and serve batch ingestion.",
    ),
    "wan": ("hermetic.cli.wan", "wan", "Emulate a WAN link (bandwidth, round-trip time)."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = {name for name, (mod, _, _) in COMMANDS.items() if _module_exists(mod)}
        return sorted(lazy | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        entry = COMMANDS.get(cmd_name)
        if entry is None or not _module_exists(entry[0]):
            return None
        module = importlib.import_module(entry[0])
        command = getattr(module, entry[1])
        if not isinstance(command, click.Command):
            raise TypeError(f"{entry[0]}.{entry[1]} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help comes from the table so --help does not import every command.
        rows = [
            (name, COMMANDS[name][2] if name in COMMANDS else "")
            for name in self.list_commands(ctx)
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hermetic")
def cli() -> None:
    """hermetic: confidential services on AWS Nitro Enclaves, verifiable end to end."""


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; turn hermetic errors into one line on stderr and an exit code."""
    try:
        cli.main(args=argv, prog_name="hermetic", standalone_mode=False)
    except HermeticError as exc:
        click.echo(f"hermetic: error: {_describe(exc)}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("hermetic: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except OSError as exc:
        # Unreadable input files and the like: the user's input, not a bug.
        click.echo(
            f"hermetic: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True
        )
        sys.exit(EXIT_USAGE)
    sys.exit(0)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def echo_json(value: Any) -> None:
    """Print one JSON document on stdout (stable key order, for scripts)."""
    import json

    click.echo(json.dumps(value, indent=2, sort_keys=False))
