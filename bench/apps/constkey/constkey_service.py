"""Benchmark-only enclave app: ``get_key`` over an attested XX session, answering a constant.

``bench/bench_persistence.py`` compares the persistence service's ``get_key`` with "the
same RPC to a service that returns a constant over an identical session". This is that
service: the same manifest shape (ports 5000 NX and 5001 XX, one CPU), the same caller
verification on 5001 (:func:`hermetic.client.verify_evidence` against the trust file in
the config, no debug peers), the same argument and reply shape (``{tenant, name,
version, material}``, 32 bytes of material), and the same worker-thread hop the
persistence app makes for each call. What it leaves out is exactly the work get_key does:
the policy check, the admin and keyring reads from the store, the unwrap and the audit
append.

Config (operator-signed)::

    {"constkey": {"peers": {<trust file: nitro_root, log, publishers>}}}
"""

from __future__ import annotations

import asyncio
from typing import Any

from hermetic.channel.session import VerifyEvidence
from hermetic.client import ClientTrust, ServicePolicy, VerifiedPeer, verify_evidence
from hermetic.enclave import App
from hermetic.enclave.app import EnclaveContext
from hermetic.errors import ConfigError, HermeticError, ServiceError

SERVICE_PORT = 5001
MATERIAL = bytes(range(32))
"""The constant key material returned (not a secret: this app holds none)."""

app = App()


@app.xx_port(SERVICE_PORT)
def verify_services(context: EnclaveContext) -> VerifyEvidence:
    """Callers on 5001 prove a logged release, as on the persistence service's port."""
    if context.config is None:
        raise ConfigError("config: expected a signed runtime config, got none")
    section = context.config.values.get("constkey")
    if not isinstance(section, dict):
        raise ConfigError(f"config constkey: expected an object, got {type(section).__name__}")
    try:
        trust = ClientTrust.from_json(section.get("peers"))
    except HermeticError as exc:
        raise ConfigError(f"config constkey.peers: {type(exc).__name__}: {exc}") from None
    policy = ServicePolicy()

    def verify(bundle: bytes, handshake_hash: bytes, remote_static: bytes) -> VerifiedPeer:
        return verify_evidence(bundle, handshake_hash, remote_static, trust, policy)

    return verify


def _constant(tenant: object, name: object) -> dict[str, Any]:
    return {"tenant": tenant, "name": name, "version": 1, "material": MATERIAL}


@app.method("get_key")
async def get_key(arg: object) -> dict[str, Any]:
    if not isinstance(arg, dict) or not isinstance(app.peer, VerifiedPeer):
        raise ServiceError("get_key: expected a map over an attested XX session", "Invalid")
    return await asyncio.to_thread(_constant, arg.get("tenant"), arg.get("name"))
