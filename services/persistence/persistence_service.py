"""The persistence service enclave: the root key from KMS at boot, tenant keys over RPC.

Once the enclave is ready (the parent may then start the proxy, and with it the egress),
the on_ready hook obtains the root key (:mod:`hermetic.persistence.service`): it waits for
the record store to answer through the egress, reads the kept KMS ``CiphertextBlob``, and
asks KMS with ``Recipient`` (``GenerateDataKey`` on first boot, ``Decrypt`` later). KMS
releases the key only to an image whose PCRs the key policy pins. Until the hook is done,
calls wait for it (at most ``START_TIMEOUT``); if it failed, every call but ``status`` is
refused with the reason. KMS is never called again in this boot.

The signed runtime config names KMS and the store::

    {"kms": {"endpoint": "host:port", "region": "us-east-1", "scheme": "http"},
     "persistence": {"store": "host:port", "store_id": "store-eu1", "key_id": "<KMS key>"}}

The record store is plain HTTP through the egress: the parent sees only sealed records.

Not yet (issue 10 items 6 and 7): **no access policy and no admin signature is checked.**
Any client that completes the attested handshake may call every method for every tenant;
the checks go where each method says ``access policy``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from hermetic.enclave import App
from hermetic.enclave.kmsaccess import EgressForwarder, bring_up_loopback
from hermetic.errors import HermeticError, PersistenceConfigError, RecordServiceError, ServiceError
from hermetic.persistence.service import PersistenceService, PersistenceSettings
from hermetic.store.client import RecordStoreClient
from hermetic.transport.tcp import HostPort, parse_hostport

START_TIMEOUT = 60.0
"""How long a call waits for the root key before it is refused as ``Unavailable``."""
EGRESS_WAIT = 600.0
"""How long boot waits for the record store to answer (the proxy may start later)."""

app = App()
T = TypeVar("T")


def _store_endpoint(values: dict[str, Any]) -> HostPort:
    section = values.get("persistence")
    endpoint = section.get("store") if isinstance(section, dict) else None
    if not isinstance(endpoint, str):
        raise PersistenceConfigError(
            f"config persistence.store: expected 'host:port', got {endpoint!r}"
        )
    try:
        return parse_hostport(endpoint, field="config persistence.store")
    except HermeticError as exc:
        raise PersistenceConfigError(str(exc)) from None


async def _wait_for_store(store: RecordStoreClient) -> None:
    """Until the store answers through the egress (the proxy starts after ready)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EGRESS_WAIT
    pause = 0.1
    while True:
        try:
            if await asyncio.to_thread(store.health):
                return
        except RecordServiceError:
            if loop.time() > deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)


@app.on_ready
async def obtain_root_key() -> PersistenceService:
    """Boot: the root key from KMS (see the module docstring)."""
    context = app.context
    if context.config is None:
        raise PersistenceConfigError("config: expected a signed runtime config, got none")
    settings = PersistenceSettings.from_config(context.config.values)
    endpoint = _store_endpoint(context.config.values)
    kms = context.kms
    if kms is None:
        raise PersistenceConfigError("config kms: expected a KMS section, got none")
    bring_up_loopback()  # done already for KMS; kept so the store never depends on it
    forwarder = EgressForwarder(endpoint, connect_proxy=False)
    port = await asyncio.to_thread(forwarder.start)
    store = RecordStoreClient(f"http://127.0.0.1:{port}")
    await _wait_for_store(store)
    return await asyncio.to_thread(PersistenceService.boot, kms, store, settings)


async def _service() -> PersistenceService:
    service = await app.started(START_TIMEOUT)
    if not isinstance(service, PersistenceService):
        raise ServiceError("service: started without a root key", "Unavailable")
    return service


async def _run(operation: Callable[..., T], *args: object) -> T:
    """Run a blocking operation in a worker thread; its typed error keeps its name, so the
    client sees e.g. ``KeyRetiredError: ...`` (hermetic errors never carry key material)."""
    try:
        return await asyncio.to_thread(operation, *args)
    except HermeticError as exc:
        raise ServiceError(f"{type(exc).__name__}: {exc}", type(exc).__name__) from None


def _fields(arg: object, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[Any]:
    """The named fields of a call's one argument (a map), required then optional."""
    if not isinstance(arg, dict):
        raise ServiceError(
            f"arguments: expected a map with {', '.join(required)}, got {type(arg).__name__}",
            "Invalid",
        )
    unknown = sorted(str(k) for k in set(arg) - set(required) - set(optional))
    missing = [k for k in required if k not in arg]
    if unknown or missing:
        raise ServiceError(
            f"arguments: expected {', '.join(required)}"
            + (f" (optional {', '.join(optional)})" if optional else "")
            + f", got missing {missing} and unknown {unknown}",
            "Invalid",
        )
    return [arg[k] for k in required] + [arg.get(k) for k in optional]


def _text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ServiceError(f"{field}: expected text, got {type(value).__name__}", "Invalid")
    return value


def _bytes(value: object, field: str) -> bytes:
    if not isinstance(value, bytes):
        raise ServiceError(f"{field}: expected bytes, got {type(value).__name__}", "Invalid")
    return value


def _version(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServiceError(f"{field}: expected an integer, got {type(value).__name__}", "Invalid")
    return value


@app.method("status")
async def status(_: object = None) -> dict[str, Any]:
    """``starting``, ``failed`` (with the reason) or the booted service's status."""
    state = app.start_state
    if state == "starting":
        return {"state": "starting"}
    try:
        return (await _service()).status()
    except ServiceError as exc:
        return {"state": "failed", "reason": str(exc)}


# Access policy (issue 10 items 6 and 7, not built yet): each method below will check the
# caller's attested release against the tenant's policy, and put_key the admin's signature.


@app.method("create_tenant")
async def create_tenant(arg: object) -> dict[str, str]:
    (tenant,) = _fields(arg, ("tenant",))
    service = await _service()
    await _run(service.create_tenant, _text(tenant, "tenant"))
    return {"tenant": tenant}


@app.method("put_key")
async def put_key(arg: object) -> dict[str, Any]:
    tenant, name, material = _fields(arg, ("tenant", "name", "material"))
    service = await _service()
    version = await _run(
        service.put_key, _text(tenant, "tenant"), _text(name, "name"), _bytes(material, "material")
    )
    return {"tenant": tenant, "name": name, "version": version}


@app.method("get_key")
async def get_key(arg: object) -> dict[str, Any]:
    tenant, name, version = _fields(arg, ("tenant", "name"), ("version",))
    service = await _service()
    number = None if version is None else _version(version, "version")
    key = await _run(service.get_key, _text(tenant, "tenant"), _text(name, "name"), number)
    return {"tenant": tenant, "name": name, "version": key.version, "material": key.material}


@app.method("rotate")
async def rotate(arg: object) -> dict[str, Any]:
    tenant, name = _fields(arg, ("tenant", "name"))
    service = await _service()
    version = await _run(service.rotate, _text(tenant, "tenant"), _text(name, "name"))
    return {"tenant": tenant, "name": name, "version": version}


@app.method("retire")
async def retire(arg: object) -> dict[str, Any]:
    tenant, name, version = _fields(arg, ("tenant", "name", "version"))
    service = await _service()
    number = _version(version, "version")
    await _run(service.retire, _text(tenant, "tenant"), _text(name, "name"), number)
    return {"tenant": tenant, "name": name, "retired": number}


@app.method("describe")
async def describe(arg: object) -> dict[str, Any]:
    (tenant,) = _fields(arg, ("tenant",))
    service = await _service()
    return await _run(service.describe, _text(tenant, "tenant"))


@app.method("put_record")
async def put_record(arg: object) -> dict[str, Any]:
    tenant, name, record_id, data = _fields(arg, ("tenant", "name", "id", "data"))
    service = await _service()
    version = await _run(
        service.put_record,
        _text(tenant, "tenant"),
        _text(name, "name"),
        _text(record_id, "id"),
        _bytes(data, "data"),
    )
    return {"id": record_id, "key_version": version}


@app.method("get_record")
async def get_record(arg: object) -> bytes:
    tenant, name, record_id = _fields(arg, ("tenant", "name", "id"))
    service = await _service()
    return await _run(
        service.get_record, _text(tenant, "tenant"), _text(name, "name"), _text(record_id, "id")
    )
