"""The gateway enclave: one attested session for the client, an attested one per backend.

Boot (``on_ready``): the signed runtime config's ``gateway`` section is checked
(:class:`hermetic.gateway.settings.GatewaySettings`: the admission policy must be the one a
trusted publisher logged as ``hermetic.gateway-policy/v1``, else the gateway serves
nothing), a receipt key is made and bound to this enclave's attestation, and the backend
registry starts empty. The parent then hands it backend hints on port 7001; each is
attested before it gets traffic (:mod:`hermetic.gateway.backends`).

Port **7000** (clients, Noise NX): ``describe`` (the config, the receipt key and its
evidence) and ``call`` (``{"service", "method", "args"}`` -> ``{"result", "receipt"}``).
Port **7001** (the parent, Noise NX): ``add_backend`` / ``remove_backend``
(``{"service", "address"}``, ``vsock://CID:PORT`` or ``tcp://HOST:PORT``), ``backends``
and ``metrics`` (Prometheus text). A method called on the other port is refused
(``invalid_request``), so a client cannot add or remove backends. The hints are untrusted
whoever sends them; the port split only keeps clients from disturbing the pool.

Config::

    {"gateway": {"admission": {...}, "admission_endorsement": {...},
                 "peers": {...trust file...}, "dialer": "127.0.0.1:7100",
                 "max_request": 1048576, "max_response": 1048576, "reattest": 240,
                 "max_concurrency": 64, "max_per_client": 32, "max_sessions": 1024,
                 "health_interval": 5, "health_timeout": 2}}
"""

from __future__ import annotations

import asyncio
from typing import Any

from hermetic.enclave import App
from hermetic.errors import GatewayConfigError, RPCError, ServiceError
from hermetic.gateway.backends import BackendHint, Backends
from hermetic.gateway.dialer import egress_dial
from hermetic.gateway.metrics import GatewayMetrics
from hermetic.gateway.service import Gateway, ReceiptSigner
from hermetic.gateway.settings import DEFAULT_SESSIONS, MAX_LIMIT, MESSAGE_SLACK, GatewaySettings

CLIENT_PORT = 7000
PARENT_PORT = 7001
START_TIMEOUT = 30.0

app = App()
# Until the config is read, the client port takes what the largest allowed limits need.
app.limit_messages(CLIENT_PORT, MAX_LIMIT + MESSAGE_SLACK)
app.limit_sessions(CLIENT_PORT, DEFAULT_SESSIONS)


@app.on_ready
async def boot() -> Gateway:
    context = app.context
    if context.config is None or context.evidence is None:
        raise GatewayConfigError("config: expected a signed runtime config, got none")
    settings = GatewaySettings.from_config(context.config.values)
    app.limit_messages(CLIENT_PORT, settings.message_limit)
    app.limit_sessions(CLIENT_PORT, settings.max_sessions)
    metrics = GatewayMetrics()
    backends = Backends(
        settings.admission,
        settings.peers,
        egress_dial(settings.dialer),
        make_evidence=context.evidence,
        metrics=metrics,
    )
    signer = ReceiptSigner(context.evidence, context.config.data)
    gateway = Gateway(settings, backends, signer, metrics)
    # Sessions are re-attested before the backend's document ages out, and instances are
    # health-checked (drained, re-admitted); the tasks run until the enclave stops.
    gateway.keeper = asyncio.ensure_future(
        asyncio.gather(
            backends.keep_attested(settings.reattest),
            backends.keep_healthy(settings.health_interval, settings.health_timeout),
        )
    )
    return gateway


_started: list[Gateway] = []
"""The booted gateway, once on_ready returned it (each call then skips the wait)."""


async def _gateway(port: int) -> tuple[Gateway, bytes]:
    session = app.session
    if session is None or session.port != port:
        raise RPCError("invalid_request", f"this method is served on port {port} only")
    if _started:
        return _started[0], session.handshake_hash
    try:
        gateway = await app.started(START_TIMEOUT)
    except ServiceError as exc:
        raise RPCError("unavailable", str(exc)) from None
    assert isinstance(gateway, Gateway)
    _started[:] = [gateway]
    return gateway, session.handshake_hash


def _hint_args(arg: object) -> tuple[Any, Any]:
    if not isinstance(arg, dict) or set(arg) != {"service", "address"}:
        raise RPCError("invalid_request", "expected a map of exactly service and address")
    return arg["service"], arg["address"]


@app.method("describe")
async def describe(_: object = None) -> dict[str, Any]:
    session = app.session
    gateway, _ = await _gateway(session.port if session is not None else CLIENT_PORT)
    return gateway.describe()


@app.method("call")
async def call(arg: object) -> dict[str, Any]:
    gateway, session_hash = await _gateway(CLIENT_PORT)
    return await gateway.forward(session_hash, arg)


@app.method("add_backend")
async def add_backend(arg: object) -> dict[str, Any]:
    gateway, _ = await _gateway(PARENT_PORT)
    hint = BackendHint.parse(*_hint_args(arg))
    instance = await gateway.backends.add(hint)
    return instance.to_json()


@app.method("remove_backend")
async def remove_backend(arg: object) -> dict[str, Any]:
    gateway, _ = await _gateway(PARENT_PORT)
    service, address = _hint_args(arg)
    return {"removed": await gateway.backends.remove(service, address)}


@app.method("backends")
async def backends(_: object = None) -> dict[str, Any]:
    gateway, _ = await _gateway(PARENT_PORT)
    return gateway.backends.describe()


@app.method("metrics")
async def metrics(_: object = None) -> str:
    gateway, _ = await _gateway(PARENT_PORT)
    gateway.backends.describe()  # brings the per-state gauge up to date
    return gateway.metrics.text()
