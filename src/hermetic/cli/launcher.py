"""``hermetic run | ps | stop | console | proxy | up``: run enclaves and expose services.

The commands mirror nitro-cli (run-enclave, describe-enclaves, terminate-enclave,
console) so operators can move between a laptop and a Nitro instance without relearning
anything. On a Nitro parent they drive ``nitro-cli``; elsewhere the emulated launcher
plays the hypervisor (see docs/runtime.md).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from hermetic.cli import echo_json
from hermetic.launcher import nitro, records


@click.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--cpus", type=int, default=None, help="vCPUs (default: the manifest's cpus).")
@click.option(
    "--memory", "memory_mib", type=int, default=None, help="MiB (default: the manifest's)."
)
@click.option("--cid", type=int, default=None, help="Enclave CID (default: the lowest free >= 16).")
@click.option(
    "--debug",
    is_flag=True,
    help="Debug mode: PCR0/1/2/8 read as zero in attestation and the console is readable.",
)
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Runtime config bundle signed by the image's operator key.",
)
@click.option(
    "--foreground",
    is_flag=True,
    help="Stay attached until the enclave exits or Ctrl-C (default: return once it is ready).",
)
def run(
    image: Path,
    cpus: int | None,
    memory_mib: int | None,
    cid: int | None,
    debug: bool,
    config: Path | None,
    foreground: bool,
) -> None:
    """Start an enclave from IMAGE and print its description (like nitro-cli run-enclave).

    Returns once the enclave has signalled ready; exits 1 with the enclave's reason if it
    refused to start (for example a config bundle that is unsigned or tampered).
    """
    if nitro.available():
        if config is not None:
            click.echo(
                "hermetic: the config bundle is delivered by `hermetic proxy --config`", err=True
            )
        if foreground:
            raise click.UsageError("--foreground is only available in emulation")
        echo_json(
            nitro.run(image, cpus=cpus or 2, memory_mib=memory_mib or 512, cid=cid, debug=debug)
        )
        return
    from hermetic.launcher import emulated

    record = emulated.prepare(image, cpus=cpus, memory_mib=memory_mib, cid=cid, debug=debug)
    if not foreground:
        echo_json(emulated.run_detached(record, config).describe())
        return
    bundle = config.read_bytes() if config is not None else None

    async def attached() -> int:
        from hermetic.launcher.supervisor import supervise

        task = asyncio.ensure_future(supervise(record, bundle))
        while not task.done():
            current = records.load(record.id)
            if current.state != records.BOOTING:
                echo_json(current.describe())
                break
            await asyncio.sleep(0.05)
        return await task

    status = asyncio.run(attached())
    final = records.load(record.id)
    if final.state == records.FAILED:
        from hermetic.errors import EnclaveBootError

        raise EnclaveBootError(f"enclave {final.id} did not start: {final.reason}")
    sys.exit(status)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print nitro-cli describe-enclaves JSON.")
@click.option("--all", "show_all", is_flag=True, help="Also list terminated and failed enclaves.")
def ps(as_json: bool, show_all: bool) -> None:
    """List enclaves (like nitro-cli describe-enclaves).

    The JSON always lists every known enclave, with State RUNNING, BOOTING, TERMINATED or
    FAILED and, for the last two, a Reason.
    """
    if nitro.available():
        described = nitro.describe()
    else:
        from hermetic.launcher import emulated

        described = emulated.describe()
    if as_json:
        echo_json(described)
        return
    rows = [d for d in described if show_all or d["State"] in ("RUNNING", "BOOTING")]
    click.echo(f"{'ENCLAVE ID':<42} {'NAME':<16} {'CID':>5} {'STATE':<11} {'FLAGS':<10} REASON")
    for d in rows:
        click.echo(
            f"{d['EnclaveID']:<42} {d['EnclaveName']:<16} {d['EnclaveCID']:>5} "
            f"{d['State']:<11} {d['Flags']:<10} {d.get('Reason') or ''}"
        )


@click.command()
@click.argument("enclave")
def stop(enclave: str) -> None:
    """Terminate ENCLAVE (an enclave ID, or a CID) and wait until it is gone."""
    if nitro.available():
        echo_json(nitro.terminate(enclave))
        return
    from hermetic.launcher import emulated

    echo_json(emulated.terminate(enclave))


@click.command()
@click.argument("enclave")
@click.option(
    "--disconnect-timeout",
    type=float,
    default=None,
    help="Stop following after this many seconds (default: until the enclave terminates).",
)
@click.option("--no-follow", is_flag=True, help="Print what is there and return.")
def console(enclave: str, disconnect_timeout: float | None, no_follow: bool) -> None:
    """Show a debug enclave's console (its stdout and stderr).

    Only enclaves started with --debug have a console: a production enclave's output
    never leaves it.
    """
    if nitro.available():
        sys.exit(nitro.console(enclave, disconnect_timeout))
    from hermetic.launcher import emulated

    out = sys.stdout.buffer
    for chunk in emulated.console_lines(enclave, follow=not no_follow, timeout=disconnect_timeout):
        out.write(chunk)
        out.flush()
