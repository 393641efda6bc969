"""keyreader: a service that works without its client, on a key the persistence service keeps.

At boot (``on_ready``, once the proxy and its egress are up) it connects to the persistence
service's XX port through the egress, attests itself with its own evidence bundle (the
runtime's provider: a fresh NSM document, this boot's release endorsement and config
digest), verifies the persistence service's evidence against the trust file in its config,
and calls ``get_key`` for one tenant key. No client is connected meanwhile: this is the work
the persistence service makes possible (issue 10 item 8). It then *uses* the key: it
computes ``HMAC-SHA256(key, "keyreader report")`` (the stand-in for a report sealed or
signed under a tenant key) and keeps only that.

The persistence service admits the call only if its access policy names this release
(service ``keyreader``) for the key's class and the tenant's admin enabled the feature; a
refusal (``AccessDeniedError``) is final and ``status`` reports it. While the persistence
service is unreachable or still starting, boot keeps trying (0.2 s doubling to 2 s, for at
most ``FETCH_WAIT`` seconds).

Config (operator-signed)::

    {"keyreader": {"persistence": "host:port", "tenant": "acme", "name": "insights/usage",
                   "trust": {<trust file: nitro_root, log, publishers>}}}
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from hermetic.channel.noise import XX, StaticKeypair
from hermetic.channel.session import MakeEvidence
from hermetic.client import ClientTrust, ServicePolicy, connect
from hermetic.enclave import App
from hermetic.enclave.kmsaccess import EgressForwarder, bring_up_loopback
from hermetic.errors import (
    ConfigError,
    HermeticError,
    PeerUnavailableError,
    RPCError,
    ServiceError,
    SessionClosedError,
    TransportError,
)
from hermetic.transport.tcp import parse_hostport

FETCH_WAIT = 300.0
REPORT = b"keyreader report"
_TRANSIENT = ("Unavailable", "PeerUnavailableError")

app = App()


@dataclass(frozen=True)
class Fetched:
    """What boot obtained: which key, and the MAC made with it (never the key itself)."""

    tenant: str
    name: str
    version: int
    report_mac: bytes


def _settings(values: dict[str, Any]) -> tuple[str, str, str, ClientTrust]:
    section = values.get("keyreader")
    if not isinstance(section, dict):
        raise ConfigError("config keyreader: expected an object with persistence, tenant, name")
    fields = []
    for field in ("persistence", "tenant", "name"):
        value = section.get(field)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config keyreader.{field}: expected text, got {value!r:.40}")
        fields.append(value)
    return fields[0], fields[1], fields[2], ClientTrust.from_json(section.get("trust"))


def _transient(exc: HermeticError) -> bool:
    """Worth another try: nobody answers yet (the proxy and its egress start after this
    enclave is ready, so the first attempts may meet a closed relay), or the persistence
    service is still booting. A refusal (AccessDeniedError) or a failed check is final."""
    if isinstance(exc, PeerUnavailableError | SessionClosedError | TransportError):
        return True
    return isinstance(exc, RPCError) and (
        exc.remote_message.startswith("service: still starting") or exc.code in _TRANSIENT
    )


@app.on_ready
async def fetch_at_boot() -> Fetched:
    context = app.context
    if context.config is None or context.evidence is None:
        raise ConfigError("config: expected a signed runtime config, got none")
    address, tenant, name, trust = _settings(context.config.values)
    endpoint = parse_hostport(address, field="config keyreader.persistence")
    bring_up_loopback()
    forwarder = EgressForwarder(endpoint, connect_proxy=False)
    port = await asyncio.to_thread(forwarder.start)
    try:
        key = await _fetch(port, tenant, name, trust, context.evidence)
    finally:
        await asyncio.to_thread(forwarder.close)
    mac = hmac.digest(key["material"], REPORT, hashlib.sha256)
    return Fetched(tenant, name, int(key["version"]), mac)


async def _fetch(
    port: int, tenant: str, name: str, trust: ClientTrust, evidence: MakeEvidence
) -> dict[str, Any]:
    """``get_key`` over XX, retried while the persistence service is not reachable yet."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FETCH_WAIT
    pause = 0.2
    while True:
        try:
            async with await connect(
                f"tcp://127.0.0.1:{port}",
                trust=trust,
                policy=ServicePolicy(services=frozenset({"persistence"})),
                protocol_name=XX,
                static=StaticKeypair.generate(),
                make_evidence=evidence,
                timeout=30,
            ) as session:
                key: dict[str, Any] = await session.call(
                    "get_key", {"tenant": tenant, "name": name}
                )
                return key
        except HermeticError as exc:
            if not _transient(exc) or loop.time() > deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)


@app.method("status")
async def status(_: object = None) -> dict[str, Any]:
    """``starting``, ``failed`` with the reason (e.g. the persistence service's
    ``AccessDeniedError``), or ``ready`` with the key's identity and the report's MAC."""
    if app.start_state == "starting":
        return {"state": "starting"}
    try:
        fetched = await app.started(1)
    except ServiceError as exc:
        return {"state": "failed", "reason": str(exc)}
    assert isinstance(fetched, Fetched)
    return {
        "state": "ready",
        "tenant": fetched.tenant,
        "name": fetched.name,
        "version": fetched.version,
        "report_mac": fetched.report_mac.hex(),
    }
