"""The persistence service enclave: the root key from KMS at boot, tenant keys over RPC.

Once the enclave is ready (the parent may then start the proxy, and with it the egress),
the on_ready hook checks the access policy (the document in the config must be the one a
trusted publisher logged as a ``hermetic.persistence-policy/v1`` statement) and obtains the
root key (:mod:`hermetic.persistence.service`): it waits for the record store to answer
through the egress, reads the kept KMS ``CiphertextBlob``, and asks KMS with ``Recipient``
(``GenerateDataKey`` on first boot, ``Decrypt`` later). KMS releases the key only to an
image whose PCRs the key policy pins. Until the hook is done, calls wait for it (at most
``START_TIMEOUT``); if it failed, every call but ``status`` is refused with the reason.

Two ports. **5000** (Noise NX, anonymous clients): tenant admins, whose every change and
audit read carries their Ed25519 signature (:mod:`hermetic.persistence.admin`). **5001**
(Noise XX): enclave services, which attest themselves with their own evidence bundle,
verified against the trust file in the config; only there can ``get_key`` be admitted, by
the access policy (:mod:`hermetic.persistence.policy`) and the tenant's enabled features.
Every fetch, refusal and change goes to the tenant's audit trail.

The signed runtime config (its digest is in every attestation document, so a client sees
which policy and which peer trust are in force)::

    {"kms": {"endpoint": "host:port", "region": "us-east-1", "scheme": "http"},
     "persistence": {"store": "host:port", "store_id": "store-eu1", "key_id": "<KMS key>",
                     "access_policy": {...}, "access_policy_endorsement": {...},
                     "peers": {<trust file: nitro_root, log, publishers>}}}

    "persistence": {..., "anchor": {"log": "host:port", "log_key": "<vkey>",
                                    "witnesses": ["<vkey>"], "threshold": 1,
                                    "max_age": 300, "mode": "deferred"|"anchored",
                                    "interval": 30, "writes": 64}}

The record store and the log are plain HTTP through the egress: the parent sees only
sealed records and signed state statements. After the root key, the store is opened
anchored (:mod:`hermetic.persistence.anchor`): checked against the newest state statement
in the log under a checkpoint the witnesses cosigned recently by the enclave's trusted
clock (the NSM document's timestamp, not the host's clock). If the check fails (an older
database restored, records edited, the newest statements withheld) the service refuses to
serve and ``status`` says which state it expected. Every read and write then goes through
the anchored store; in ``deferred`` mode a timer anchors the newest state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from hermetic.attestation.codec import decode as decode_document
from hermetic.channel.session import VerifyEvidence
from hermetic.client import ClientTrust, ServicePolicy, VerifiedPeer, verify_evidence
from hermetic.enclave import App
from hermetic.enclave.app import BoundNSM, EnclaveContext
from hermetic.enclave.kmsaccess import EgressForwarder, bring_up_loopback
from hermetic.errors import (
    AccessPolicyError,
    HermeticError,
    PersistenceConfigError,
    RecordServiceError,
    ServiceError,
)
from hermetic.persistence.anchor import AnchoredStore
from hermetic.persistence.keys import RootKey
from hermetic.persistence.policy import AccessPolicy
from hermetic.persistence.service import (
    AnchorSchedule,
    AnchorSettings,
    Caller,
    GuardedPersistence,
    PersistenceService,
    PersistenceSettings,
)
from hermetic.store.client import RecordStoreClient
from hermetic.translog.client import LogClient
from hermetic.translog.note import NoteVerifier, parse_vkey
from hermetic.translog.release import (
    PERSISTENCE_POLICY_V1,
    Endorsement,
    PolicyStatement,
    verify_endorsement,
)
from hermetic.transport.tcp import HostPort, parse_hostport

START_TIMEOUT = 60.0
"""How long a call waits for the root key before it is refused as ``Unavailable``."""
EGRESS_WAIT = 600.0
"""How long boot waits for the record store to answer (the proxy may start later)."""

SERVICE_PORT = 5001
"""The Noise XX port: enclave services that attest themselves (``get_key``)."""

app = App()
T = TypeVar("T")


def _section(values: dict[str, Any]) -> dict[str, Any]:
    section = values.get("persistence")
    if not isinstance(section, dict):
        raise PersistenceConfigError(
            f"config persistence: expected an object, got {type(section).__name__}"
        )
    return section


def _peer_trust(values: dict[str, Any]) -> ClientTrust:
    """The trust file services are verified against (config ``persistence.peers``)."""
    try:
        return ClientTrust.from_json(_section(values).get("peers"))
    except HermeticError as exc:
        raise PersistenceConfigError(
            f"config persistence.peers: {type(exc).__name__}: {exc}"
        ) from None


def access_policy(values: dict[str, Any], store_id: str) -> AccessPolicy:
    """The policy in the config, if a trusted publisher logged exactly it for this store.

    The endorsement must verify against the peers' trust file (publisher signature, log
    inclusion, witnessed checkpoint), be a ``hermetic.persistence-policy/v1`` statement for
    subject ``persistence/<store id>`` and name the document's digest.
    """
    section = _section(values)
    policy = AccessPolicy.from_json(section.get("access_policy"))
    if policy.store_id != store_id:
        raise AccessPolicyError(
            f"access policy.store_id: expected {store_id!r} (config persistence.store_id),"
            f" got {policy.store_id!r}"
        )
    trust = _peer_trust(values)
    try:
        endorsement = Endorsement.from_json(section.get("access_policy_endorsement"))
        verified = verify_endorsement(endorsement, trust.translog)
    except HermeticError as exc:
        raise AccessPolicyError(f"access policy endorsement: {type(exc).__name__}: {exc}") from None
    statement = verified.statement
    subject = f"persistence/{store_id}"
    if not isinstance(statement, PolicyStatement) or statement.type != PERSISTENCE_POLICY_V1:
        raise AccessPolicyError(
            f"access policy endorsement: expected a {PERSISTENCE_POLICY_V1} statement, got"
            f" {statement.type}"
        )
    if statement.subject != subject or statement.digest != policy.digest.hex():
        raise AccessPolicyError(
            f"access policy endorsement: names {statement.subject!r} digest"
            f" {statement.digest}, expected {subject!r} digest {policy.digest.hex()}"
        )
    return policy


@app.xx_port(SERVICE_PORT)
def verify_services(context: EnclaveContext) -> VerifyEvidence:
    """Callers on the service port prove a logged release (no debug peers)."""
    if context.config is None:
        raise PersistenceConfigError("config: expected a signed runtime config, got none")
    trust = _peer_trust(context.config.values)
    policy = ServicePolicy()

    def verify(bundle: bytes, handshake_hash: bytes, remote_static: bytes) -> VerifiedPeer:
        return verify_evidence(bundle, handshake_hash, remote_static, trust, policy)

    return verify


def _caller() -> Caller:
    """Who is calling, as the channel proved it (NX port: nobody in particular)."""
    peer = app.peer
    if not isinstance(peer, VerifiedPeer) or peer.debug:
        return Caller(False)
    pcr0 = peer.pcrs.get(0)
    return Caller(True, peer.service, peer.version, pcr0.hex() if pcr0 else None)


def _endpoint(endpoint: object, field: str) -> HostPort:
    if not isinstance(endpoint, str):
        raise PersistenceConfigError(f"{field}: expected 'host:port', got {endpoint!r}")
    try:
        return parse_hostport(endpoint, field=field)
    except HermeticError as exc:
        raise PersistenceConfigError(str(exc)) from None


def _store_endpoint(values: dict[str, Any]) -> HostPort:
    return _endpoint(_section(values).get("store"), "config persistence.store")


def _vkey(text: str, field: str) -> NoteVerifier:
    try:
        return parse_vkey(text)
    except HermeticError as exc:
        raise PersistenceConfigError(f"{field}: {type(exc).__name__}: {exc}") from None


def trusted_clock(nsm: BoundNSM) -> Callable[[], float]:
    """Unix seconds from a fresh NSM attestation document (its timestamp is milliseconds):
    the enclave's clock, which the host cannot set, so a stale checkpoint cannot be made to
    look recent by turning the parent's clock back."""

    def clock() -> float:
        _, document = decode_document(nsm.attest())
        return document.timestamp / 1000

    return clock


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
async def obtain_root_key() -> GuardedPersistence:
    """Boot: the logged access policy, then the root key from KMS (module docstring)."""
    context = app.context
    if context.config is None:
        raise PersistenceConfigError("config: expected a signed runtime config, got none")
    settings = PersistenceSettings.from_config(context.config.values)
    policy = access_policy(context.config.values, settings.store_id)
    endpoint = _store_endpoint(context.config.values)
    anchoring = AnchorSettings.from_config(context.config.values)
    log_endpoint = _endpoint(anchoring.log, "config persistence.anchor.log")
    log_key = _vkey(anchoring.log_key, "config persistence.anchor.log_key")
    witnesses = [_vkey(w, "config persistence.anchor.witnesses") for w in anchoring.witnesses]
    kms = context.kms
    if kms is None:
        raise PersistenceConfigError("config kms: expected a KMS section, got none")
    bring_up_loopback()  # done already for KMS; kept so the store never depends on it
    forwarder = EgressForwarder(endpoint, connect_proxy=False)
    port = await asyncio.to_thread(forwarder.start)
    log_forwarder = EgressForwarder(log_endpoint, connect_proxy=False)
    log_port = await asyncio.to_thread(log_forwarder.start)
    store = RecordStoreClient(f"http://127.0.0.1:{port}")
    log = LogClient(f"http://127.0.0.1:{log_port}", log_key, witnesses, anchoring.threshold)
    clock = trusted_clock(context.nsm)
    await _wait_for_store(store)

    def open_anchored(root: RootKey) -> AnchorSchedule:
        anchored = AnchoredStore.open(
            store, root, settings.store_id, log, clock,
            max_age=anchoring.max_age, mode=anchoring.mode,
        )  # fmt: skip
        return AnchorSchedule(anchored, clock, interval=anchoring.interval, writes=anchoring.writes)

    service = await asyncio.to_thread(PersistenceService.boot, kms, store, settings, open_anchored)
    if service.anchor is not None:
        service.anchor.start()
    return GuardedPersistence(service, policy)


async def _service() -> GuardedPersistence:
    service = await app.started(START_TIMEOUT)
    if not isinstance(service, GuardedPersistence):
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
    """``starting``, ``failed`` (with the reason) or the booted service's status, with the
    digest of the access policy in force."""
    state = app.start_state
    if state == "starting":
        return {"state": "starting"}
    try:
        guarded = await _service()
    except ServiceError as exc:
        return {"state": "failed", "reason": str(exc)}
    return {**guarded.service.status(), "access_policy": guarded.policy.digest.hex()}


# Admin methods (port 5000 or 5001 alike): each carries the admin's counter and signature
# over the request (hermetic.persistence.admin); the guarded layer checks and audits them.


@app.method("create_tenant")
async def create_tenant(arg: object) -> dict[str, str]:
    tenant, admin_key, counter, signature = _fields(
        arg, ("tenant", "admin_key", "counter", "signature")
    )
    service = await _service()
    await _run(
        service.create_tenant, _text(tenant, "tenant"), _bytes(admin_key, "admin_key"),
        counter, signature,
    )  # fmt: skip
    return {"tenant": tenant}


@app.method("put_key")
async def put_key(arg: object) -> dict[str, Any]:
    tenant, name, material, counter, signature = _fields(
        arg, ("tenant", "name", "material", "counter", "signature")
    )
    service = await _service()
    version = await _run(
        service.put_key, _text(tenant, "tenant"), _text(name, "name"),
        _bytes(material, "material"), counter, signature,
    )  # fmt: skip
    return {"tenant": tenant, "name": name, "version": version}


@app.method("rotate")
async def rotate(arg: object) -> dict[str, Any]:
    tenant, name, counter, signature = _fields(arg, ("tenant", "name", "counter", "signature"))
    service = await _service()
    version = await _run(
        service.rotate, _text(tenant, "tenant"), _text(name, "name"), counter, signature
    )
    return {"tenant": tenant, "name": name, "version": version}


@app.method("retire")
async def retire(arg: object) -> dict[str, Any]:
    tenant, name, version, counter, signature = _fields(
        arg, ("tenant", "name", "version", "counter", "signature")
    )
    service = await _service()
    number = _version(version, "version")
    await _run(
        service.retire, _text(tenant, "tenant"), _text(name, "name"), number, counter, signature
    )
    return {"tenant": tenant, "name": name, "retired": number}


@app.method("delete")
async def delete(arg: object) -> dict[str, Any]:
    tenant, name, counter, signature = _fields(arg, ("tenant", "name", "counter", "signature"))
    service = await _service()
    await _run(service.delete, _text(tenant, "tenant"), _text(name, "name"), counter, signature)
    return {"tenant": tenant, "name": name, "deleted": True}


async def _feature(arg: object, enabled: bool) -> dict[str, Any]:
    tenant, feature, counter, signature = _fields(
        arg, ("tenant", "feature", "counter", "signature")
    )
    service = await _service()
    features = await _run(
        service.set_feature, _text(tenant, "tenant"), _text(feature, "feature"), enabled,
        counter, signature,
    )  # fmt: skip
    return {"tenant": tenant, "features": sorted(features)}


@app.method("enable")
async def enable(arg: object) -> dict[str, Any]:
    """Admit the access policy's rules of this feature for the tenant's keys."""
    return await _feature(arg, True)


@app.method("disable")
async def disable(arg: object) -> dict[str, Any]:
    return await _feature(arg, False)


@app.method("audit")
async def audit(arg: object) -> dict[str, Any]:
    """The tenant's audit trail: entry bytes and the head; verify with
    :func:`hermetic.persistence.audit.verify_audit_trail`."""
    tenant, counter, signature = _fields(arg, ("tenant", "counter", "signature"))
    service = await _service()
    trail = await _run(service.audit, _text(tenant, "tenant"), counter, signature)
    return {
        "tenant": tenant,
        "entries": list(trail.entries),
        "head": {"seq": trail.head.seq, "hash": trail.head.hash},
    }


@app.method("describe")
async def describe(arg: object) -> dict[str, Any]:
    """Names and versions of the tenant's keys (no material), its admin's last counter and
    enabled features: what an admin client needs to sign its next request."""
    (tenant,) = _fields(arg, ("tenant",))
    service = await _service()
    return await _run(service.describe, _text(tenant, "tenant"))


# Service methods: admitted only on the XX port, by the access policy (audited either way).


@app.method("get_key")
async def get_key(arg: object) -> dict[str, Any]:
    tenant, name, version = _fields(arg, ("tenant", "name"), ("version",))
    service = await _service()
    number = None if version is None else _version(version, "version")
    key = await _run(
        service.get_key, _caller(), _text(tenant, "tenant"), _text(name, "name"), number
    )
    return {"tenant": tenant, "name": name, "version": key.version, "material": key.material}


@app.method("put_record")
async def put_record(arg: object) -> dict[str, Any]:
    tenant, name, record_id, data = _fields(arg, ("tenant", "name", "id", "data"))
    service = await _service()
    version = await _run(
        service.put_record, _caller(), _text(tenant, "tenant"), _text(name, "name"),
        _text(record_id, "id"), _bytes(data, "data"),
    )  # fmt: skip
    return {"id": record_id, "key_version": version}


@app.method("get_record")
async def get_record(arg: object) -> bytes:
    tenant, name, record_id = _fields(arg, ("tenant", "name", "id"))
    service = await _service()
    return await _run(
        service.get_record, _caller(), _text(tenant, "tenant"), _text(name, "name"),
        _text(record_id, "id"),
    )  # fmt: skip
