"""``hermetic run | ps | stop | console | proxy | up``: run enclaves and expose services.

The commands mirror nitro-cli (run-enclave, describe-enclaves, terminate-enclave,
console) so operators can move between a laptop and a Nitro instance without relearning
anything. On a Nitro parent they drive ``nitro-cli``; elsewhere the emulated launcher
plays the hypervisor (see docs/runtime.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hermetic.cli import echo_json
from hermetic.cli._options import EXISTING_FILE, FILE, boot_input_options, read_input
from hermetic.errors import UsageError
from hermetic.launcher import nitro, records
from hermetic.proxy.server import ProxyOptions, ServiceProxy, enclave_state_of, parse_forward
from hermetic.transport.tcp import HostPort, parse_hostport

if TYPE_CHECKING:
    from hermetic.image.pcrs import Measurements
    from hermetic.kms.client import KMSCredentials
    from hermetic.launcher.devrelease import DevLog
    from hermetic.launcher.records import EnclaveRecord

no_sandbox_option = click.option(
    "--no-sandbox",
    is_flag=True,
    help="Run the enclave as a plain host process, for platforms without bubblewrap or user "
    "namespaces. Its code can then reach this host: never for untrusted code. Warns on every "
    "start and shows in `ps --json`.",
)
_NO_SANDBOX_WARNING = (
    "hermetic: WARNING: --no-sandbox: the enclave runs as a plain host process with this "
    "user's rights; nothing isolates its code from this machine"
)

_CREDENTIALS_HELP = (
    "Forward AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN from this "
    "environment to the enclave at boot, for its KMS calls (kept in memory only: never "
    "logged, never written to a record or file)."
)


@click.command()
@click.argument("image", type=EXISTING_FILE)
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
@boot_input_options(
    config_help="Runtime config bundle signed by the image's operator key.",
    endorsement_help="Release endorsement (from `hermetic release publish`) the enclave sends "
    "its clients (default: the one an earlier enclave of the same image ran with, if any).",
    credentials_help=_CREDENTIALS_HELP,
)
@click.option(
    "--foreground",
    is_flag=True,
    help="Stay attached until the enclave exits or Ctrl-C (default: return once it is ready).",
)
@no_sandbox_option
def run(
    image: Path,
    cpus: int | None,
    memory_mib: int | None,
    cid: int | None,
    debug: bool,
    config: Path | None,
    endorsement: Path | None,
    foreground: bool,
    forward_credentials: bool,
    no_sandbox: bool,
) -> None:
    """Start an enclave from IMAGE and print its description (like nitro-cli run-enclave).

    The enclave serves only the attested channel: each client gets an evidence bundle with
    a fresh attestation document and the release endorsement, so clients (`hermetic
    connect`) verify that a trusted publisher logged exactly this image. Without an
    endorsement clients reject it, unless it is a --debug enclave and they allow debug.

    Returns once the enclave has signalled ready; exits 1 with the enclave's reason if it
    refused to start (for example a config bundle that is unsigned or tampered).
    """
    if nitro.available():
        if config is not None or endorsement is not None or forward_credentials:
            click.echo(
                "hermetic: the config bundle, endorsement and credentials are delivered by "
                "`hermetic proxy --config/--endorsement/--aws-credentials-env`",
                err=True,
            )
        if foreground:
            raise click.UsageError("--foreground is only available in emulation")
        echo_json(
            nitro.run(image, cpus=cpus or 2, memory_mib=memory_mib or 512, cid=cid, debug=debug)
        )
        return
    from hermetic.enclave import boot
    from hermetic.launcher import emulated

    # Checked before anything starts, so a missing variable is a usage error, not a
    # failed boot.
    credentials = boot.credentials_from_environment(os.environ) if forward_credentials else None
    record = emulated.prepare(
        image,
        cpus=cpus,
        memory_mib=memory_mib,
        cid=cid,
        debug=debug,
        endorsement=_read_file(endorsement, "--endorsement"),
        sandboxed=not no_sandbox,
    )
    if no_sandbox:
        click.echo(_NO_SANDBOX_WARNING, err=True)
    if endorsement is None and record.endorsement is not None:
        click.echo("hermetic: reusing the endorsement of an earlier run of this image", err=True)
    elif record.endorsement is None and not debug:
        click.echo(
            "hermetic: no endorsement (pass --endorsement FILE): clients will reject this "
            "enclave, as nothing shows a trusted publisher logged its release",
            err=True,
        )
    if not foreground:
        started = emulated.run_detached(record, config, forward_credentials=forward_credentials)
        echo_json(started.describe())
        return
    bundle = config.read_bytes() if config is not None else None

    async def attached() -> int:
        from hermetic.launcher.supervisor import supervise

        task = asyncio.ensure_future(supervise(record, bundle, credentials))
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


def _read_file(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    return read_input(path, option)


def _hostport(value: str | None, field: str) -> HostPort | None:
    if value is None:
        return None
    return parse_hostport(value, field=field, allow_port_zero=True)


async def _until_signal(*also: asyncio.Future[Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter, *also}, return_when="FIRST_COMPLETED")
    finally:
        waiter.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _addresses(proxy: ServiceProxy) -> dict[str, Any]:
    addresses: dict[str, Any] = {
        "tcp": str(proxy.tcp_address) if proxy.tcp_address else None,
        "websocket": f"ws://{proxy.ws_address}" if proxy.ws_address else None,
        "metrics": f"http://{proxy.metrics_address}/metrics" if proxy.metrics_address else None,
    }
    if proxy.forward_addresses:
        addresses["forwards"] = {str(p): str(a) for p, a in proxy.forward_addresses.items()}
    return addresses


_LISTEN_HELP = "Client TCP ingress, HOST:PORT (port 0 picks a free port)."
_forward_option = click.option(
    "--forward",
    "forwards",
    multiple=True,
    help="Also relay TCP clients of HOST:PORT to the enclave's vsock PORT, as "
    "PORT=HOST:PORT (repeatable; port 0 picks a free port).",
)


@click.command()
@click.option("--enclave", "enclave_id", default=None, help="Enclave ID (or CID) to serve.")
@click.option("--cid", type=int, default=None, help="Enclave CID, when it has no local record.")
@click.option(
    "--port",
    "service_port",
    type=int,
    default=None,
    help="Service vsock port (default: the enclave's first port).",
)
@click.option("--listen", default=None, help=_LISTEN_HELP)
@_forward_option
@click.option(
    "--ws-listen",
    default=None,
    help="WebSocket ingress HOST:PORT (one binary message = one channel message).",
)
@click.option(
    "--egress-allow",
    multiple=True,
    help="Allowed egress HOST:PORT (repeatable; default: the manifest's egress list).",
)
@click.option("--metrics", default=None, help="Serve Prometheus /metrics on HOST:PORT.")
@boot_input_options(
    config_help="Deliver this runtime config bundle at boot (real Nitro; emulation: "
    "`run --config`).",
    endorsement_help="Deliver this release endorsement at boot (real Nitro; emulation: "
    "`run --endorsement`).",
    credentials_help=_CREDENTIALS_HELP + " Real Nitro; emulation: `run --aws-credentials-env`.",
)
def proxy(
    enclave_id: str | None,
    cid: int | None,
    service_port: int | None,
    listen: str | None,
    forwards: tuple[str, ...],
    ws_listen: str | None,
    egress_allow: tuple[str, ...],
    metrics: str | None,
    config: Path | None,
    endorsement: Path | None,
    forward_credentials: bool,
) -> None:
    """Run the parent-side service proxy for one enclave until Ctrl-C.

    Bridges TCP and WebSocket clients to the enclave's service port, blindly: they speak
    the attested channel (Noise ciphertext) with the enclave itself. Each `--forward
    PORT=HOST:PORT` relays one more of the enclave's ports (one proxy serves an enclave's
    egress, so it relays all of its ports). Also relays the
    enclave's egress (vsock port 8000, `CONNECT host:port`) to allowlisted destinations
    only, and exports telemetry. Prints the bound addresses as JSON once listening.
    """
    if (enclave_id is None) == (cid is None):
        raise click.UsageError("give exactly one of --enclave and --cid")
    state_of: Any = lambda: "UNKNOWN"  # noqa: E731
    allow = list(egress_allow)
    if enclave_id is not None:
        record = records.find(enclave_id)
        cid = record.cid
        service_port = service_port or (record.ports[0] if record.ports else None)
        state_of = enclave_state_of(record.id)
        if not allow:
            allow = list(record.egress)
    if service_port is None:
        raise click.UsageError("--port: the enclave's service port is unknown, give it")
    assert cid is not None
    from hermetic.enclave import boot

    credentials = boot.credentials_from_environment(os.environ) if forward_credentials else None
    options = ProxyOptions(
        cid=cid,
        service_port=service_port,
        listen=_hostport(listen, "--listen"),
        forwards=tuple(parse_forward(f) for f in forwards),
        ws_listen=_hostport(ws_listen, "--ws-listen"),
        egress_allow=frozenset(parse_hostport(a, field="--egress-allow") for a in allow),
        metrics=_hostport(metrics, "--metrics"),
        config_bundle=config.read_bytes() if config else None,
        endorsement=_read_file(endorsement, "--endorsement"),
        serve_config=config is not None or endorsement is not None or forward_credentials,
        credentials=credentials,
        enclave_state=state_of,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s proxy %(levelname)s %(message)s")

    async def serve() -> None:
        async with ServiceProxy(options) as running:
            echo_json({"EnclaveCID": options.cid, **_addresses(running)})
            sys.stdout.flush()
            await _until_signal()

    asyncio.run(serve())


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help=_LISTEN_HELP)
@_forward_option
@click.option("--ws-listen", default=None, help="Also accept WebSocket clients on HOST:PORT.")
@click.option("--metrics", default=None, help="Serve Prometheus /metrics on HOST:PORT.")
@click.option(
    "--egress-allow",
    multiple=True,
    help="Extra allowed egress HOST:PORT (the manifest's list is always allowed).",
)
@click.option(
    "--debug",
    is_flag=True,
    help="Debug enclave: readable console, PCRs zero, so no release can match (no endorsement).",
)
@boot_input_options(
    config_help="Runtime config bundle signed by the operator key.",
    endorsement_help="Serve this release endorsement instead of publishing the image to the "
    "dev log.",
    credentials_help=_CREDENTIALS_HELP,
)
@click.option(
    "--trust-out",
    type=FILE,
    default=None,
    help="Write the client trust file (dev Nitro root, dev log key, dev witness, dev "
    "publisher) for `hermetic connect --trust`.",
)
@no_sandbox_option
def up(
    source: Path,
    listen: str,
    forwards: tuple[str, ...],
    ws_listen: str | None,
    metrics: str | None,
    egress_allow: tuple[str, ...],
    debug: bool,
    config: Path | None,
    endorsement: Path | None,
    trust_out: Path | None,
    forward_credentials: bool,
    no_sandbox: bool,
) -> None:
    """Build (if SOURCE is an app directory), release, run and expose a service until Ctrl-C.

    Like `docker run -p`: the enclave runs in the foreground, a proxy listens on --listen
    and forwards to the service's first port (--forward exposes more of its ports), and
    Ctrl-C or SIGTERM stops both.

    So that clients can verify it with no other command, the image's measured PCRs are
    published as a release to a local dev transparency log (under the state directory,
    created on first use, with a dev witness and a dev publisher key), the checkpoint is
    cosigned, and the resulting endorsement is handed to the enclave; --trust-out writes
    the trust file that pins all of it. Then, in another shell:

    \b
        hermetic connect tcp://127.0.0.1:8080 --trust trust.json \\
            --call echo --json-args '"hi"'

    Prints one JSON document with the enclave ID, the addresses and the release once the
    service is reachable.
    """
    from hermetic.enclave import boot
    from hermetic.image import open_image
    from hermetic.launcher import emulated
    from hermetic.launcher.devrelease import DevLog

    credentials = boot.credentials_from_environment(os.environ) if forward_credentials else None
    forward_to = tuple(parse_forward(f) for f in forwards)  # refused before anything starts

    if endorsement is not None and trust_out is not None:
        raise UsageError(
            "--trust-out pins the dev log, which did not log --endorsement; write the trust "
            "file for your log with `hermetic release trust`"
        )
    image = built_image(source)
    measurements = open_image(image).measurements
    served = _read_file(endorsement, "--endorsement")
    release: dict[str, Any] | None = None
    dev_log = DevLog() if endorsement is None else None
    if dev_log is not None and debug:
        click.echo(
            "hermetic: debug enclave: its PCR0/1/2/8 read as zero in attestation, so no "
            "logged release can match it; serving WITHOUT an endorsement. Clients must pass "
            "--allow-debug, and nothing proves which code it runs.",
            err=True,
        )
    elif dev_log is not None:
        served, release = publish_to_dev_log(dev_log, measurements)
    record = emulated.prepare(
        image,
        debug=debug,
        endorsement=served,
        reuse_endorsement=False,
        sandboxed=not no_sandbox,
    )
    if no_sandbox:
        click.echo(_NO_SANDBOX_WARNING, err=True)
    if trust_out is not None and dev_log is not None:
        dev_log.write_trust(trust_out)
    bundle = config.read_bytes() if config else None
    allow = {*record.egress, *egress_allow}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s up %(levelname)s %(message)s")

    options = ProxyOptions(
        cid=record.cid,
        service_port=record.ports[0],
        listen=_hostport(listen, "--listen"),
        forwards=forward_to,
        ws_listen=_hostport(ws_listen, "--ws-listen"),
        egress_allow=frozenset(parse_hostport(a, field="--egress-allow") for a in allow),
        metrics=_hostport(metrics, "--metrics"),
    )

    async def ready(running: ServiceProxy) -> dict[str, Any]:
        trust = str(trust_out) if trust_out is not None else None
        return {**_addresses(running), "release": release, "trust": trust}

    sys.exit(asyncio.run(serve_in_foreground(record, bundle, credentials, options, ready)))


def built_image(source: Path) -> Path:
    """SOURCE itself if it is an image file, else the image built from the app directory
    into the state directory's ``builds/`` (what ``up`` and ``gateway up`` run)."""
    if not source.is_dir():
        return source
    from hermetic.image import build_image
    from hermetic.paths import state_dir

    builds = state_dir() / "builds"
    builds.mkdir(parents=True, exist_ok=True)
    return build_image(source, builds / f"{source.resolve().name}.img").path


def publish_to_dev_log(dev_log: DevLog, measurements: Measurements) -> tuple[bytes, dict[str, Any]]:
    """Publish ``measurements`` to the dev log: the endorsement to serve, and the release
    as ``up`` prints it."""
    published = dev_log.publish(measurements)
    release = {
        "service": measurements.service,
        "version": measurements.version,
        "pcr0": measurements.pcr0.hex(),
        "log": published.origin,
        "log_index": published.index,
    }
    return published.dumps(), release


async def serve_in_foreground(
    record: EnclaveRecord,
    bundle: bytes | None,
    credentials: KMSCredentials | None,
    options: ProxyOptions,
    ready: Callable[[ServiceProxy], Awaitable[dict[str, Any]]],
) -> int:
    """Run ``record``'s enclave in this process behind a proxy (``options``, whose enclave
    state is the supervisor's) until Ctrl-C or SIGTERM, printing the enclave's ID and CID
    with what ``ready`` returns once the proxy listens; the exit status."""
    from hermetic.launcher import emulated

    supervisor, task = await emulated.start_in_process(record, bundle, credentials)
    options = replace(options, enclave_state=lambda: supervisor.record.state)
    try:
        async with ServiceProxy(options) as running:
            shown = await ready(running)
            echo_json({"EnclaveID": record.id, "EnclaveCID": record.cid, **shown})
            sys.stdout.flush()
            await _until_signal(task)
    finally:
        supervisor.stopping.set()
        status = await task
    return 0 if supervisor.record.reason == "stopped by the operator" else max(status, 1)
