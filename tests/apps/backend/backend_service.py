"""A backend for the gateway tests: one XX port that accepts only the gateway its config names.

Config (operator-signed)::

    {"backend": {"trust": {<trust file>}, "gateway_pcr0": ["<hex>", ...]}}

The same code is built under several manifest names (services ``alpha`` and ``beta``, and
a modified ``alpha`` the admission policy does not admit). Methods: ``echo`` (the argument
and who answered), ``big`` (a result of N bytes, to overflow the gateway's limit) and
``forged`` (a result shaped like the gateway's own answer, with a made-up receipt) and
``hold`` (never answers, to keep requests in flight), ``stall`` (idempotent) and
``stall_once`` (not), which never answer on one chosen instance, and ``whoami``
(idempotent: the argument, this instance's CID and PCR0, so a caller can check that the
receipt names the instance that answered).
"""

from __future__ import annotations

import asyncio
from typing import Any

from hermetic.channel.session import VerifyEvidence
from hermetic.client import ClientTrust, ServicePolicy, VerifiedPeer, verify_evidence
from hermetic.enclave import App
from hermetic.enclave.app import EnclaveContext
from hermetic.errors import ConfigError

app = App()
_PCR0: list[str] = []


@app.xx_port(5001)
def verify_gateway(context: EnclaveContext) -> VerifyEvidence:
    """Only a gateway release whose PCR0 the config lists may call."""
    if context.config is None:
        raise ConfigError("config: expected a signed runtime config")
    section = context.config.values["backend"]
    trust = ClientTrust.from_json(section["trust"])
    policy = ServicePolicy(
        services=frozenset({"gateway"}), pcr0s=frozenset(section["gateway_pcr0"])
    )

    def verify(bundle: bytes, handshake_hash: bytes, remote_static: bytes) -> VerifiedPeer:
        return verify_evidence(bundle, handshake_hash, remote_static, trust, policy)

    return verify


@app.method("echo")
async def echo(arg: object) -> dict[str, Any]:
    return {"arg": arg, "cid": app.context.cid}


@app.method("whoami", idempotent=True)
async def whoami(arg: object) -> dict[str, Any]:
    """Who answered, in the instance's own words (its CID and its NSM's PCR0, read once)."""
    context = app.context
    if not _PCR0:
        _PCR0.append(context.nsm.describe_pcr(0).value.hex())
    return {"arg": arg, "cid": context.cid, "pcr0": _PCR0[0]}


@app.method("big")
async def big(size: int) -> bytes:
    return b"\x00" * int(size)


@app.method("hold")
async def hold(_: object = None) -> None:
    """Never answers: a request in flight until its caller cancels it."""
    await asyncio.Event().wait()


@app.method("stall", idempotent=True)
async def stall(cid: int) -> int:
    """Never answers on the instance at CID ``cid``; answers with its CID elsewhere.
    Declared idempotent, so the gateway may send it again to another instance."""
    if app.context.cid == cid:
        await asyncio.Event().wait()
    return app.context.cid


@app.method("stall_once")
async def stall_once(cid: int) -> int:
    """The same, not declared idempotent: never sent twice."""
    return await stall(cid)


@app.method("forged")
async def forged(_: object = None) -> dict[str, Any]:
    return {"result": "not from me", "receipt": b"\x00" * 64}
