"""``hermetic demo``, step 6: a tenant's key kept by the persistence service, used with no
client connected (``services/persistence`` and ``examples/keyreader``, issue 10).

Real parts, as ``tests/test_persistence_enclave.py`` runs them: ``hermetic store serve``
(SQLite), the local KMS of step 5 with a key whose policy pins the persistence image's
PCR0, the demo's witnessed log for the store-state anchor, and both enclaves started with
``hermetic up`` (which publishes each image's release to the dev log under the demo's
state directory and serves it behind a proxy). The tenant admin is this process: it signs
its requests with its own Ed25519 key (:class:`~hermetic.persistence.adminclient.
TenantAdminClient`) over an attested session, the way an admin's own client would.

What is shown, and checked, before the step passes: each image's PCR0 as measured and as
logged; the single KMS call (with ``Recipient``) the persistence enclave made at boot for
its root key; the audit-trail entry of the keyreader's fetch, in a trail whose hash chain
the admin verifies; the keyreader's report MAC made with exactly the admin's key; and that
the record store holds no byte of that key (every tenant record sealed).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from hermetic.cli.demo import (
    ADMIN_CREDENTIALS,
    ADMIN_USER,
    ENCLAVE_CREDENTIALS,
    ENCLAVE_ROLE,
    Demo,
    DemoStepError,
    find_example,
    free_port,
    heading,
)
from hermetic.errors import HermeticError

STORE_ID = "demo-store"
TENANT = "acme"
KEY_NAME = "insights/app-usage"
FEATURE = "insights"
REPORT = b"keyreader report"
"""What ``examples/keyreader`` MACs with the key it fetched (its README)."""
WAIT = 120.0
"""How long a step waits for an enclave to reach the state it shows."""

ACCESS_POLICY = {
    "type": "hermetic.persistence-access/v1",
    "store_id": STORE_ID,
    "rules": [{"feature": FEATURE, "services": ["keyreader"], "keys": ["insights/*"]}],
}

T = TypeVar("T")


def in_process(title: str, what: str, call: Callable[[], T]) -> T:
    """Run one step in this process (no command of its own), shown with ``>>>``; a
    hermetic error becomes the step's :class:`DemoStepError`."""
    click.secho(f"\n>>> {what}", fg="cyan")
    try:
        return call()
    except DemoStepError:
        raise
    except HermeticError as exc:
        raise DemoStepError(f"{title}: {type(exc).__name__}: {exc}") from exc


def check(ok: bool, title: str, shown: str, why: str) -> None:
    """Print ``shown`` as a passed check, or fail the step with ``why``."""
    if not ok:
        raise DemoStepError(f"{title}: {why}")
    click.echo(f"  ✓ {shown}")


def persistence_step(
    demo: Demo, *, log_url: str, log_vkey: str, witness_vkey: str, kms_port: int
) -> None:
    from hermetic.client import ClientTrust
    from hermetic.persistence.adminclient import TenantAdminClient

    work = demo.work
    heading(6, "Keep a tenant's key in the persistence service (services/persistence)")
    store_port = free_port()
    store_url = f"http://127.0.0.1:{store_port}"
    demo.start(
        "record store",
        ["store", "serve", "--db", "records.db", "--listen", f"127.0.0.1:{store_port}"],
        store_port,
    )
    # Both apps trust the operator key of step 5: its public half goes into each image.
    for name, source in (
        ("persistence", find_example("persistence", "services")),
        ("keyreader", find_example("keyreader")),
    ):
        shutil.copytree(source, work / name, dirs_exist_ok=True)
        shutil.copyfile(work / "vault" / "operator.pub.pem", work / name / "operator.pub.pem")
    pcr0 = _build(demo, "persistence")
    demo.run(
        "key policy",
        [
            "kms", "policy", "--pcr0", pcr0, "--principal", ENCLAVE_ROLE, "--admin", ADMIN_USER,
            "--immutable", "--output", "persistence-key-policy.json",
        ],
        show=0,
    )  # fmt: skip
    created = demo.run(
        "create key",
        [
            "kms", "create-key", "--policy", "file://persistence-key-policy.json",
            "--bypass-policy-lockout-safety-check", "--endpoint-url", f"http://127.0.0.1:{kms_port}",
        ],
        tool="aws",
        env=ADMIN_CREDENTIALS,
        show=0,
    )  # fmt: skip
    key_id = str(json.loads(created)["KeyMetadata"]["KeyId"])
    click.echo(f"  root-key KMS key {key_id}, released only to PCR0 {pcr0[:32]}...")

    trust_file = work / "dev-trust.json"
    endorsement = in_process(
        "access policy",
        "DevLog().publish_statement(access_policy_statement(access-policy.json))  # logged "
        "policy: only release 'keyreader' may fetch keys insights/*",
        lambda: _log_access_policy(work, trust_file),
    )
    log_address = log_url.removeprefix("http://")
    kms_address = f"127.0.0.1:{kms_port}"
    store_address = f"127.0.0.1:{store_port}"
    config = {
        "kms": {"endpoint": kms_address, "region": "us-east-1", "scheme": "http"},
        "persistence": {
            "store": store_address,
            "store_id": STORE_ID,
            "key_id": key_id,
            "access_policy": ACCESS_POLICY,
            "access_policy_endorsement": endorsement,
            "peers": json.loads(trust_file.read_text()),
            # The store state is anchored in the demo's witnessed log (rollback detection).
            "anchor": {"log": log_address, "log_key": log_vkey, "witnesses": [witness_vkey],
                       "interval": 1},
        },
    }  # fmt: skip
    _sign(demo, "persistence", config)
    persistence = demo.start_service(
        "persistence",
        [
            "up", "persistence.img", "--config", "persistence.config", "--aws-credentials-env",
            "--listen", "127.0.0.1:0", "--forward", "5001=127.0.0.1:0",
            "--egress-allow", kms_address, "--egress-allow", store_address,
            "--egress-allow", log_address,
        ],
        env=ENCLAVE_CREDENTIALS,
    )  # fmt: skip
    _show_release("persistence", persistence, pcr0)
    admin_url = f"tcp://{persistence['tcp']}"
    service_address = str(persistence["forwards"]["5001"])
    click.echo(f"  admins (Noise NX): {admin_url}; services (Noise XX): tcp://{service_address}")
    trust = ClientTrust.load(trust_file)

    status = in_process(
        "root key",
        "status (as the admin, over an attested session) until the root key is obtained",
        lambda: asyncio.run(_booted(admin_url, trust, "persistence")),
    )
    click.echo(f"  {json.dumps({k: v for k, v in status.items() if k != 'anchor'})}")
    check(
        status.get("state") == "ready",
        "root key",
        "persistence enclave ready",
        f"the persistence enclave did not start: {status.get('reason', status)}",
    )
    released = [
        line.split(" INFO ", 1)[-1]
        for line in demo.log_path("local KMS").read_text().splitlines()
        if f"key={key_id}" in line
    ]
    for line in released:
        click.echo(f"  KMS log: {line}")
    check(
        status.get("kms_calls") == 1
        and status.get("root_key") == "generated"
        and len(released) == 1
        and "allowed kms:GenerateDataKey" in released[0]
        and released[0].endswith(f"ImageSha384={pcr0}"),
        "root key",
        f"one KMS call at boot (GenerateDataKey with Recipient), released to PCR0 "
        f"{pcr0[:16]}... only",
        f"expected one GenerateDataKey for the attested PCR0, got status {status} and KMS "
        f"log {released}",
    )

    heading(7, "A service fetches the key at boot, with no client connected (examples/keyreader)")
    admin = TenantAdminClient(STORE_ID, TENANT)
    material = secrets.token_bytes(32)
    calls = [admin.create(), admin.put(KEY_NAME, material), admin.enable(FEATURE)]
    replies = in_process(
        "tenant admin",
        f"the admin of tenant {TENANT!r} signs create_tenant, put_key {KEY_NAME!r}, enable "
        f"{FEATURE!r} (Ed25519, counters 1-3) and sends them to {admin_url}",
        lambda: asyncio.run(_admin_calls(admin_url, trust, calls)),
    )
    for (method, _), reply in zip(calls, replies, strict=True):
        click.echo(f"  {method}: {json.dumps(reply)}")
    click.echo(f"  the tenant's key (a demo key, shown so you can look for it): {material.hex()}")

    reader_pcr0 = _build(demo, "keyreader")
    reader_config = {
        "keyreader": {
            "persistence": service_address,
            "tenant": TENANT,
            "name": KEY_NAME,
            "trust": json.loads(trust_file.read_text()),
        }
    }
    _sign(demo, "keyreader", reader_config)
    audit_prefix = f"{STORE_ID}/tenants/{TENANT}/audit/"
    before = _record_ids(store_url, audit_prefix)
    reader = demo.start_service(
        "keyreader",
        ["up", "keyreader.img", "--config", "keyreader.config", "--listen", "127.0.0.1:0",
         "--egress-allow", service_address],
    )  # fmt: skip
    reader_process = demo.started[-1]
    _show_release("keyreader", reader, reader_pcr0)
    new = in_process(
        "keyreader",
        "watch the record store's ids (the parent's view: no bytes) until the persistence "
        "service records the keyreader's fetch; nobody connects to the keyreader meanwhile",
        lambda: _new_audit_record(demo, reader_process, store_url, audit_prefix, before),
    )
    click.echo(f"  new sealed audit record {new}")

    trail = in_process(
        "audit trail",
        "audit (signed by the admin) and verify the trail's hash chain up to its head",
        lambda: asyncio.run(_audit(admin_url, trust, admin)),
    )
    click.echo(f"  {'seq':>3}  {'event':<7} {'operation':<13} {'key':<22} {'v':>2}  actor")
    for entry in trail:
        click.echo(
            f"  {entry.seq:>3}  {entry.event:<7} {entry.operation:<13} {entry.name:<22} "
            f"{entry.key_version:>2}  {entry.actor}{'  ' + entry.detail if entry.detail else ''}"
        )
    fetches = [e for e in trail if e.operation == "get_key"]
    check(
        len(fetches) == 1
        and fetches[0].event == "get"
        and fetches[0].actor == f"service keyreader 0.1.0 pcr0 {reader_pcr0[:16]}"
        and (fetches[0].name, fetches[0].key_version) == (KEY_NAME, 1),
        "audit trail",
        f"the trail (hash chain verified, {len(trail)} entries) shows release keyreader "
        f"0.1.0, PCR0 {reader_pcr0[:16]}..., fetching {KEY_NAME} v1",
        "expected one get_key by release keyreader, got "
        + ("; ".join(f"{e.event} by {e.actor} {e.detail}".rstrip() for e in fetches) or "none"),
    )

    shown = demo.run(
        "keyreader status",
        ["connect", f"tcp://{reader['tcp']}", "--trust", "dev-trust.json", "--service",
         "keyreader", "--call", "status", "--json"],
        show=0,
    )  # fmt: skip
    result = json.loads(shown)["result"]
    click.echo(f"  {json.dumps(result)}")
    expected = hmac.digest(material, REPORT, hashlib.sha256).hex()
    check(
        result.get("state") == "ready" and result.get("report_mac") == expected,
        "keyreader",
        "keyreader fetched the key with no client connected: its report MAC is "
        "HMAC-SHA256(the admin's key, 'keyreader report')",
        f"expected a ready keyreader with report MAC {expected}, got {result}",
    )

    heading(8, "The parent's record store holds sealed records, and no byte of the key")
    demo.run("inspect", ["store", "inspect", "--db", "records.db"], show=40)
    summary = in_process(
        "store",
        "read every record's bytes as the parent can, and look for the key in them and in "
        "the database files",
        lambda: _store_holds_no_key(store_url, work, material),
    )
    for line in summary:
        click.echo(f"  ✓ {line}")


def _build(demo: Demo, name: str) -> str:
    """``hermetic build NAME``: its PCR0 as measured."""
    demo.run("build", ["build", name, "-o", f"{name}.img"], show=0)
    measured = json.loads(
        demo.run("measure", ["image", "measure", f"{name}.img", "--json"], show=0)
    )
    pcr0 = str(measured["PCR0"])
    click.echo(f"  {name} PCR0 {pcr0}")
    return pcr0


def _sign(demo: Demo, name: str, config: dict[str, Any]) -> None:
    """The operator signs ``NAME.config`` (the key from step 5, measured into the image)."""
    (demo.work / f"{name}-config.json").write_text(json.dumps(config, indent=2))
    demo.run(
        "sign config",
        ["config", "sign", f"{name}-config.json", "--key", "operator.key", "-o", f"{name}.config"],
        show=0,
    )


def _show_release(name: str, started: dict[str, Any], pcr0: str) -> None:
    release = started.get("release") or {}
    click.echo(
        f"  enclave {started.get('EnclaveID')} on CID {started.get('EnclaveCID')}, release "
        f"{release.get('service')} {release.get('version')} logged in {release.get('log')} "
        f"at index {release.get('log_index')}"
    )
    check(
        release.get("service") == name and release.get("pcr0") == pcr0,
        name,
        f"logged PCR0 {release.get('pcr0')} = the measured one",
        f"expected release {name} with PCR0 {pcr0} in the dev log, got {release}",
    )


def _log_access_policy(work: Path, trust_file: Path) -> dict[str, Any]:
    """Log the access policy in the dev log (the one ``up`` publishes releases to) and
    write that log's trust file; the endorsement, for the config."""
    from hermetic.launcher.devrelease import DevLog
    from hermetic.persistence.adminclient import access_policy_statement
    from hermetic.persistence.policy import AccessPolicy

    (work / "access-policy.json").write_text(json.dumps(ACCESS_POLICY, indent=2))
    policy = AccessPolicy.from_json(ACCESS_POLICY)
    log = DevLog()
    endorsement = log.publish_statement(access_policy_statement(policy))
    log.write_trust(trust_file)
    click.echo(
        f"  access policy sha256:{policy.digest.hex()[:32]}... logged in {endorsement.origin} "
        f"at index {endorsement.index}; trust file {trust_file.name} pins that log"
    )
    return endorsement.to_json()


async def _session(url: str, trust: Any, service: str) -> Any:
    from hermetic.client import ServicePolicy, connect

    policy = ServicePolicy(services=frozenset({service}))
    return await connect(url, trust=trust, policy=policy, timeout=60)


async def _booted(url: str, trust: Any, service: str) -> dict[str, Any]:
    """``status`` once the service has finished starting (or failed)."""
    async with await _session(url, trust, service) as session:
        deadline = time.monotonic() + WAIT
        while True:
            status: dict[str, Any] = await session.call("status")
            if status.get("state") != "starting":
                return status
            if time.monotonic() > deadline:
                raise DemoStepError(f"{service}: still starting after {WAIT:.0f} s")
            await asyncio.sleep(0.2)


async def _admin_calls(url: str, trust: Any, calls: list[tuple[str, Any]]) -> list[Any]:
    async with await _session(url, trust, "persistence") as session:
        return [await session.call(method, argument) for method, argument in calls]


async def _audit(url: str, trust: Any, admin: Any) -> list[Any]:
    from hermetic.persistence.adminclient import read_audit_trail

    async with await _session(url, trust, "persistence") as session:
        reply = await session.call(*admin.audit())
    entries, _ = read_audit_trail(reply, STORE_ID, TENANT)
    return entries


def _record_ids(store_url: str, prefix: str) -> set[str]:
    from hermetic.store.client import RecordStoreClient

    with RecordStoreClient(store_url) as client:
        return {info.id for info in client.scan(prefix)}


def _new_audit_record(
    demo: Demo,
    keyreader: subprocess.Popen[bytes],
    store_url: str,
    prefix: str,
    before: set[str],
) -> str:
    """The first audit record that was not in the store before the keyreader started."""
    started = time.monotonic()
    while True:
        new = sorted(_record_ids(store_url, prefix) - before)
        if new:
            click.echo(f"  appeared {time.monotonic() - started:.1f} s after the keyreader started")
            return new[0]
        if keyreader.poll() is not None:
            raise DemoStepError(f"keyreader: exited {keyreader.returncode} before fetching")
        if time.monotonic() - started > WAIT:
            raise DemoStepError(
                f"keyreader: no fetch reached the persistence service within {WAIT:.0f} s "
                f"(see {demo.log_path('keyreader')})"
            )
        time.sleep(0.2)


def _store_holds_no_key(store_url: str, work: Path, material: bytes) -> list[str]:
    """What the parent can read of the store, checked: no record and no database file
    holds the key's bytes; every tenant record is sealed; the service's own two records
    are the KMS-wrapped root key and the signed (public) state digest."""
    from hermetic.persistence.anchor import STATE_RECORD
    from hermetic.persistence.sealing import parse_header
    from hermetic.store.client import RecordStoreClient

    with RecordStoreClient(store_url) as client:
        records = [client.get(info.id) for info in client.scan(f"{STORE_ID}/")]
    own = {f"{STORE_ID}/root-key", f"{STORE_ID}/{STATE_RECORD}"}
    tenant = [r for r in records if r.id not in own]
    for record in tenant:
        parse_header(record.data)  # SealedRecordFormatError: not a sealed record
    if {r.id for r in records} - {r.id for r in tenant} != own:
        raise DemoStepError(f"store: expected the records {sorted(own)}, got {records}")
    holding = [r.id for r in records if material in r.data or material.hex().encode() in r.data]
    files = sorted(work.glob("records.db*"))
    in_files = [f.name for f in files if material in f.read_bytes()]
    if holding or in_files:
        raise DemoStepError(f"store: the key's bytes are in {holding + in_files}")
    return [
        f"{len(tenant)} tenant records, each sealed (AES-256-GCM, format 1); the service's "
        "own: root-key (a KMS ciphertext blob) and anchor/state (a signed state digest)",
        f"the tenant's key is in none of the {len(records)} records, nor in "
        f"{', '.join(f.name for f in files)}: the parent holds no plaintext",
    ]
