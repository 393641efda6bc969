"""``hermetic connect``: open an attested session, show what was verified, optionally call.

Why print every check: a relying party should be able to see, not just trust, the chain of
evidence (pinned root, the module, the session binding, the publisher, the log) - and, when
something is wrong, which link broke. The same checks run in the SDK
(:func:`hermetic.client.connect`); this command only renders them.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import click

from hermetic import jsontext
from hermetic.cli import echo_json
from hermetic.errors import UsageError

_LABELS = {
    "decode": "evidence",
    "root": "nitro root",
    "document": "attestation",
    "nonce": "nonce binding",
    "public_key": "key binding",
    "config": "runtime config",
    "debug": "debug mode",
    "publisher": "publisher",
    "release": "release PCRs",
    "inclusion": "log inclusion",
    "checkpoint": "checkpoint",
    "policy": "policy",
}


@click.command("connect")
@click.argument("url")
@click.option(
    "--trust",
    "trust_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trust file (JSON): pinned Nitro root, log key, witnesses + threshold, publishers.",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Policy file (JSON): accepted services, versions, PCR0s, debug, max document age.",
)
@click.option("--service", default=None, help="Accept only this service name.")
@click.option(
    "--allow-debug",
    is_flag=True,
    help="Accept debug-mode enclaves (PCRs zero: their code is NOT proven).",
)
@click.option("--call", "method", default=None, help="Call this method once verified.")
@click.option(
    "--json-args",
    "json_args",
    default="null",
    show_default=True,
    help="The call's argument, as JSON.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print one JSON object {"verified": {...}, "result": ...} instead of the steps.',
)
@click.option(
    "--gateway",
    "via_service",
    default=None,
    metavar="SERVICE",
    help="URL is an enclave gateway: verify it (service 'gateway' unless --service), check "
    "its logged admission policy, and route --call to SERVICE through it; the result "
    "comes with a verified receipt (--json adds receipt and attestations).",
)
@click.option(
    "--receipts-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --gateway: save the session's receipts for `hermetic receipts verify`.",
)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to connect and verify.")
def connect(
    url: str,
    trust_file: Path,
    policy_file: Path | None,
    service: str | None,
    allow_debug: bool,
    method: str | None,
    json_args: str,
    as_json: bool,
    via_service: str | None,
    receipts_out: Path | None,
    timeout: float,
) -> None:
    """Connect to URL (tcp://host:port, unix:///path, ws://host:port/path, vsock://cid:port),
    verify the service's evidence step by step, and optionally call a method.

    Exit status 0 when every check passed (and the call succeeded), 1 when a check
    rejected the service (the failed check is printed), 2 for unreadable input.
    """
    from hermetic.client import ClientTrust, ServicePolicy, VerificationReport

    trust = ClientTrust.load(trust_file)
    policy = ServicePolicy.load(policy_file) if policy_file is not None else ServicePolicy()
    if via_service is not None:
        service = service or "gateway"
    elif receipts_out is not None:
        raise UsageError("--receipts-out: only with --gateway")
    policy = policy.with_service(service).with_debug(allow_debug)
    args = jsontext.loads(json_args, what="--json-args", error=UsageError, allow_floats=True)
    report = VerificationReport()
    extra: dict[str, Any] = {}
    try:
        if via_service is not None:
            verified, result, extra = asyncio.run(
                _gateway_session(
                    url, trust, policy, report, via_service, method, args, timeout, receipts_out
                )
            )
        else:
            verified, result = asyncio.run(
                _session(url, trust, policy, report, method, args, timeout)
            )
    except BaseException:
        if not as_json:
            _print_checks(report)
        else:
            failure = report.failure
            if failure is not None:
                click.echo(f"✗ {_LABELS.get(failure.name, failure.name)}", err=True)
        raise
    if as_json:
        echo_json({"verified": verified, "result": _jsonable(result), **extra})
        return
    _print_checks(report)
    if "receipt" in extra:
        backend = extra["receipt"]["backend"]
        click.echo(
            f"✓ {'receipt'.ljust(max(map(len, _LABELS.values())))}  {via_service} answered by"
            f" release {backend['release']!r} pcr0 {backend['pcr0'][:32]}... (signed by the"
            f" gateway, admitted by its logged policy); {extra['attestations']} attestation"
            " verification(s)"
        )
    if method is not None:
        click.echo(json.dumps(_jsonable(result), indent=2))


async def _session(
    url: str,
    trust: Any,
    policy: Any,
    report: Any,
    method: str | None,
    args: Any,
    timeout: float,
) -> tuple[dict[str, Any], Any]:
    from hermetic.client import connect as open_session

    session = await open_session(url, trust=trust, policy=policy, report=report, timeout=timeout)
    async with session:
        result = await session.call(method, args) if method is not None else None
        return session.verified.to_json(), result


async def _gateway_session(
    url: str,
    trust: Any,
    policy: Any,
    report: Any,
    service: str,
    method: str | None,
    args: Any,
    timeout: float,
    receipts_out: Path | None,
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    from hermetic.gateway.client import connect_gateway

    session = await connect_gateway(url, trust=trust, policy=policy, report=report, timeout=timeout)
    async with session:
        extra: dict[str, Any] = {"admission_policy": session.admission.digest.hex()}
        result = None
        if method is not None:
            reply = await session.call(service, method, args)
            session.verify_signatures()  # a receipt shown is a receipt checked in full
            result = reply.result
            extra["receipt"] = reply.receipt.to_json()
        extra["attestations"] = session.attestations
        if receipts_out is not None:
            receipts_out.write_bytes(session.receipts_file().dumps())
        return session.verified.to_json(), result, extra


def _print_checks(report: Any) -> None:
    width = max(len(label) for label in _LABELS.values())
    for check in report.checks:
        mark = "✓" if check.ok else "✗"
        label = _LABELS.get(check.name, check.name)
        click.echo(f"{mark} {label.ljust(width)}  {check.detail}")


def _jsonable(value: Any) -> Any:
    """CBOR results as JSON: bytes become base64 text, map keys text."""
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value
