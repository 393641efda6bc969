"""``hermetic gateway up | add | remove | backends | metrics`` and ``hermetic receipts verify``.

``gateway up`` is ``hermetic up`` for the gateway image (``services/gateway``): it builds,
releases to the dev log (or serves ``--endorsement``), runs the enclave in the foreground,
starts the **backend dialer** on the address the config names (``gateway.dialer``: the
parent's relay to backends' vsock ports, :mod:`hermetic.gateway.dialer`) and a proxy whose
egress allows exactly that dialer, exposes the client port 7000 on ``--listen``, and hands
the gateway the ``--backend`` hints. The other commands talk to a running gateway's parent
port 7001 over vsock: hints in, state and metrics out. See docs/gateway.md.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import click

from hermetic.cli import echo_json
from hermetic.cli._options import EXISTING_FILE, FILE, read_input
from hermetic.errors import UsageError

CLIENT_PORT = 7000
PARENT_PORT = 7001


def _hint(text: str) -> tuple[str, str]:
    service, sep, address = text.partition("=")
    if not sep or not service or not address:
        raise UsageError(f"--backend: expected SERVICE=vsock://CID:PORT, got {text!r}")
    return service, address


async def _parent_call(url: str, trust_file: Path, calls: list[tuple[str, Any]]) -> list[Any]:
    """Calls on the gateway's parent port; the gateway is verified like any service."""
    from hermetic.client import ClientTrust, ServicePolicy, connect
    from hermetic.errors import RPCError

    trust = ClientTrust.load(trust_file)
    policy = ServicePolicy(services=frozenset({"gateway"}))
    async with await connect(url, trust=trust, policy=policy, timeout=60) as session:
        results = []
        for method, arg in calls:
            try:
                results.append(await session.call(method, arg))
            except RPCError as exc:
                results.append({"error": exc.code, "message": exc.remote_message})
        return results


@click.group("gateway")
def gateway() -> None:
    """The enclave gateway: run it, hand it backends, read its state."""


@gateway.command("up")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--config", type=EXISTING_FILE, required=True, help="Runtime config bundle (signed).")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="Client ingress.")
@click.option(
    "--endorsement",
    type=EXISTING_FILE,
    default=None,
    help="Serve this release endorsement instead of publishing to the dev log.",
)
@click.option(
    "--trust",
    "trust_file",
    type=EXISTING_FILE,
    default=None,
    help="Trust file to verify the gateway with when handing it --backend hints "
    "(default: the dev log's, written to --trust-out).",
)
@click.option("--trust-out", type=FILE, default=None, help="Write the dev log's trust file.")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    help="A backend hint SERVICE=vsock://CID:PORT (or tcp://HOST:PORT), repeatable.",
)
@click.option("--no-sandbox", is_flag=True, help="As for `hermetic up` (never for real use).")
def up(
    source: Path,
    config: Path,
    listen: str,
    endorsement: Path | None,
    trust_file: Path | None,
    trust_out: Path | None,
    backends: tuple[str, ...],
    no_sandbox: bool,
) -> None:
    """Build, release, run and expose the gateway until Ctrl-C (module docstring).

    Prints one JSON document (EnclaveID, EnclaveCID, tcp, parent, dialer, release, trust,
    backends) once the client port is reachable and the hints were attested.
    """
    from hermetic.cli.launcher import (
        _addresses,
        _hostport,
        built_image,
        publish_to_dev_log,
        serve_in_foreground,
    )
    from hermetic.enclave.config import parse_bundle, parse_values
    from hermetic.gateway.dialer import BackendDialer
    from hermetic.image import open_image
    from hermetic.launcher import emulated
    from hermetic.launcher.devrelease import DevLog
    from hermetic.proxy.server import ProxyOptions, ServiceProxy
    from hermetic.transport.tcp import parse_hostport

    hints = [_hint(b) for b in backends]
    bundle = read_input(config, "--config")
    values = parse_values(parse_bundle(bundle)[0])
    section = values.get("gateway")
    dialer_text = section.get("dialer") if isinstance(section, dict) else None
    if not isinstance(dialer_text, str):
        raise UsageError("--config: its gateway section names no dialer (gateway.dialer)")
    dialer_address = parse_hostport(dialer_text, field="config gateway.dialer")
    image = built_image(source)
    measurements = open_image(image).measurements
    release: dict[str, Any] | None = None
    if endorsement is not None:
        served = read_input(endorsement, "--endorsement")
    else:
        dev_log = DevLog()
        served, release = publish_to_dev_log(dev_log, measurements)
        if trust_out is not None:
            dev_log.write_trust(trust_out)
        if trust_file is None and trust_out is not None:
            trust_file = trust_out
    if hints and trust_file is None:
        raise UsageError("--backend: give --trust (or --trust-out) to verify the gateway with")
    record = emulated.prepare(
        image, endorsement=served, reuse_endorsement=False, sandboxed=not no_sandbox
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")

    async def main() -> int:
        async with BackendDialer(dialer_address) as dialer:
            options = ProxyOptions(
                cid=record.cid,
                service_port=CLIENT_PORT,
                listen=_hostport(listen, "--listen"),
                egress_allow=frozenset({dialer_address}),
                # The dialer runs here: its address is served in-process, one relay hop.
                egress_local={dialer_address: dialer.serve},
            )

            async def ready(running: ServiceProxy) -> dict[str, Any]:
                parent = f"vsock://{record.cid}:{PARENT_PORT}"
                added: list[Any] = []
                if hints:
                    assert trust_file is not None
                    calls = [("add_backend", {"service": s, "address": a}) for s, a in hints]
                    added = await _parent_call(parent, trust_file, calls)
                return {
                    **_addresses(running),
                    "parent": parent,
                    "dialer": str(dialer.address),
                    "release": release,
                    "trust": str(trust_out) if trust_out is not None else None,
                    "backends": added,
                }

            return await serve_in_foreground(record, bundle, None, options, ready)

    sys.exit(asyncio.run(main()))


_PARENT = click.option(
    "--gateway",
    "parent_url",
    required=True,
    help="The gateway's parent port, vsock://CID:7001 (from `gateway up`'s parent).",
)
_TRUST = click.option(
    "--trust",
    "trust_file",
    type=EXISTING_FILE,
    required=True,
    help="Trust file to verify the gateway with.",
)


def _run_parent(parent_url: str, trust_file: Path, method: str, arg: Any) -> Any:
    (result,) = asyncio.run(_parent_call(parent_url, trust_file, [(method, arg)]))
    return result


@gateway.command("add")
@click.argument("service")
@click.argument("address")
@_PARENT
@_TRUST
def add(service: str, address: str, parent_url: str, trust_file: Path) -> None:
    """Hand the gateway a backend hint: SERVICE at ADDRESS (vsock://CID:PORT or
    tcp://HOST:PORT). It is attested before it gets traffic; prints its state."""
    hint = {"service": service, "address": address}
    result = _run_parent(parent_url, trust_file, "add_backend", hint)
    echo_json(result)
    if not isinstance(result, dict) or result.get("state") != "admitted":
        sys.exit(1)


@gateway.command("remove")
@click.argument("service")
@click.argument("address")
@_PARENT
@_TRUST
def remove(service: str, address: str, parent_url: str, trust_file: Path) -> None:
    """Forget a backend instance; no further request goes to it."""
    hint = {"service": service, "address": address}
    echo_json(_run_parent(parent_url, trust_file, "remove_backend", hint))


@gateway.command("backends")
@_PARENT
@_TRUST
def list_backends(parent_url: str, trust_file: Path) -> None:
    """Every backend instance the gateway knows, with its state and why."""
    echo_json(_run_parent(parent_url, trust_file, "backends", None))


@gateway.command("metrics")
@_PARENT
@_TRUST
def metrics(parent_url: str, trust_file: Path) -> None:
    """The gateway's Prometheus metrics (routing, refusals, admissions)."""
    click.echo(_run_parent(parent_url, trust_file, "metrics", None), nl=False)


@click.group("receipts")
def receipts() -> None:
    """Check the gateway's receipts offline."""


@receipts.command("verify")
@click.argument("receipts_file", type=EXISTING_FILE)
@click.option("--trust", "trust_file", type=EXISTING_FILE, required=True, help="Trust file.")
@click.option(
    "--gateway-service",
    default="gateway",
    show_default=True,
    help="The service name the gateway's release must carry.",
)
def verify(receipts_file: Path, trust_file: Path, gateway_service: str) -> None:
    """Check a saved receipts file (`hermetic connect --receipts-out`) offline: the
    receipt key's binding to a logged gateway release, the logged admission policy in its
    config, and every receipt's signature, session, digests and admitted backend release.
    Exit 0 when all verify, 1 when one does not (naming it), 2 for an unreadable file."""
    from hermetic.client import ClientTrust, ServicePolicy
    from hermetic.gateway.receipt import ReceiptsFile, verify_receipt_file

    saved = ReceiptsFile.loads(read_input(receipts_file, "receipts file"))
    trust = ClientTrust.load(trust_file)
    verified = verify_receipt_file(
        saved, trust, ServicePolicy(services=frozenset({gateway_service}))
    )
    gateway_peer = verified.gateway
    echo_json(
        {
            "verified": True,
            "gateway": gateway_peer.to_json(),
            "admission_policy": verified.policy.digest.hex(),
            "session": saved.session.hex(),
            "receipts": [r.to_json() for r in verified.receipts],
        }
    )
