"""The persistence service as a real (emulated) enclave: the root key from KMS at boot.

Real parts only: ``hermetic kms serve`` (dev attestation root), ``hermetic store serve``
(SQLite, and the suite's PostgreSQL), ``hermetic build`` of a copy of
``services/persistence`` with a generated operator key, a key policy from ``hermetic kms
policy`` pinned to the image's PCR0, ``hermetic run`` with forwarded credentials and
``hermetic proxy`` whose egress allows exactly the KMS and the store. The enclave reaches
both only through that egress; what KMS released, and to which PCR0, is read from its log.

The acceptance tests (1, 3, 5, 6) run on both record store back ends (acceptance 4): once
on the module's SQLite stack and once on a second stack whose store is a PostgreSQL
database (``backend_stack``); the host's attacks edit the very rows either server serves
(``StoreHost``).

Callers are real too: tenant admins sign every change (Ed25519, ``Admin`` below) on the NX
port 5000 (reached over vsock from the parent); services call ``get_key`` on the XX port
5001 through the proxy, either the ``examples/keyreader`` enclave (which fetches at boot,
with no client connected) or this process attesting a ``reporting`` release with an
emulated NSM of the module's dev PKI. The access policy is logged in the dev log and
carried, with its endorsement and the peers' trust file, in the signed runtime config.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from apps.probe.harness import (
    OperatorImage,
    build_operator_image,
    hermetic,
    module_state,
    start_cli,
)
from helpers import free_port, stop_process, wait_port
from hermetic.channel.noise import XX, StaticKeypair
from hermetic.client import AttestedSession, ClientTrust, ServicePolicy, connect
from hermetic.errors import RPCError
from hermetic.evidence import make_evidence_provider
from hermetic.image.pcrs import Measurements
from hermetic.launcher import emulated, records
from hermetic.launcher.devrelease import DevLog
from hermetic.nsm import DevPKI, EmulatedNSM, NSMClient
from hermetic.persistence.admin import admin_public_key
from hermetic.persistence.adminclient import (
    TenantAdminClient,
    access_policy_statement,
    read_audit_trail,
)
from hermetic.persistence.audit import AuditEntry
from hermetic.persistence.policy import ACCESS_POLICY_V1, AccessPolicy
from hermetic.store.client import RecordStoreClient
from hermetic.translog.client import LogClient
from hermetic.translog.note import parse_vkey
from hermetic.translog.release import PolicyStatement
from test_persistence_anchor import PostgresHost, SQLiteHost, _wait_for, _witnessed_after
from test_store_support import StoreServerProcess
from test_translog_service_support import LogKeys, LogServerProcess, make_log_key

pytestmark = pytest.mark.timeout(300)
SERVICE = Path(__file__).resolve().parents[1] / "services" / "persistence"
KEYREADER = Path(__file__).resolve().parents[1] / "examples" / "keyreader"
REGION = "us-east-1"
ENCLAVE_ROLE = "arn:aws:iam::111122223333:role/enclave"
ADMIN = ("admin", "dummy-admin-secret")
STORE_ID = "store-eu1"


ACCESS_POLICY = {
    "type": ACCESS_POLICY_V1,
    "store_id": STORE_ID,
    "rules": [
        {"feature": "insights", "services": ["keyreader", "reporting"], "keys": ["insights/*"]}
    ],
}
REPORTING = {n: hashlib.sha384(f"reporting {n}".encode()).digest() for n in (0, 1, 2)}
"""The PCRs of the ``reporting`` release this process attests (emulated NSM)."""

Image = OperatorImage


def _build(directory: Path, operator: ed25519.Ed25519PrivateKey, change: str = "") -> Image:
    return build_operator_image(SERVICE, directory, operator, "persistence_service.py", change)


@dataclass(frozen=True)
class Served:
    """A persistence enclave: ``url`` its XX port 5001 through the proxy, ``admin_url``
    its NX port 5000 over vsock from the parent."""

    enclave_id: str
    url: str
    admin_url: str
    proxy: subprocess.Popen[str]
    metrics: str


def Admin(tenant: str) -> TenantAdminClient:
    """A tenant admin client of the suite's store: a fresh Ed25519 key, counter 0."""
    return TenantAdminClient(STORE_ID, tenant)


@dataclass(frozen=True)
class Policy:
    """The logged access policy, its endorsement and the peers' trust file, for configs."""

    document: dict[str, Any]
    endorsement: dict[str, Any]
    trust: dict[str, Any]
    caller: bytes  # the reporting release's endorsement (JSON bytes)


@dataclass
class Stack:
    """KMS, record store and persistence enclaves, each restartable on its own data."""

    directory: Path
    store_db: str
    image: Image
    policy: Policy
    kms_process: subprocess.Popen[bytes] | None = None
    kms_port: int = 0
    kms_logs: list[Path] = field(default_factory=list)
    store: StoreServerProcess | None = None
    key_id: str = ""
    served: list[Served] = field(default_factory=list)
    background: list[subprocess.Popen[str]] = field(default_factory=list)
    log_keys: LogKeys | None = None
    witness_vkey: str = ""
    log: LogServerProcess | None = None
    witness: subprocess.Popen[bytes] | None = None
    anchor: dict[str, Any] = field(default_factory=lambda: {"max_age": 120, "interval": 1})
    """The config's ``persistence.anchor`` options besides the log and its keys."""
    log_url: str | None = None
    """The log the next boot's config names (None: this stack's own, honest one)."""

    # --- the transparency log the store state is anchored in ---------------------------

    @property
    def log_db(self) -> Path:
        return self.directory / "log.db"

    def start_log(self) -> None:
        """``hermetic log serve`` with a witness cosigning every 0.2 s; returns once the log
        has a witnessed checkpoint (the anchor's check needs a recent one)."""
        first = self.log_keys is None
        if self.log_keys is None:
            self.log_keys = make_log_key(self.directory, "persistence.test/log")
            self.witness_vkey = hermetic(
                "log", "witness-key", "--out", str(self.directory / "witness.skey"),
                "--name", "w1.persistence.test", check=True,
            ).stdout.strip()  # fmt: skip
        keys = self.log_keys
        self.log = LogServerProcess(str(self.log_db), keys, "--witness", self.witness_vkey)
        self.log.start()
        self.witness = subprocess.Popen(
            [sys.executable, "-m", "hermetic", "log", "witness", "--log", self.log.url,
             "--log-key", keys.vkey, "--key", str(self.directory / "witness.skey"),
             "--state", str(self.directory / "witness.json"), "--interval", "0.2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        with self.log_client() as client:
            if first:
                client.add(b"log started")
            _wait_for(lambda: client.witnessed_checkpoint(1))

    def log_client(self, url: str | None = None) -> LogClient:
        assert self.log is not None
        assert self.log_keys is not None
        return LogClient(
            url or self.log.url,
            parse_vkey(self.log_keys.vkey),
            [parse_vkey(self.witness_vkey)],
            threshold=1,
        )

    def log_address(self) -> str:
        assert self.log is not None
        return (self.log_url or self.log.url).removeprefix("http://")

    # --- KMS and store ---------------------------------------------------------------

    def start_kms(self) -> None:
        self.kms_port = free_port()
        log = self.directory / f"kms-{len(self.kms_logs)}.log"
        self.kms_logs.append(log)
        with open(log, "wb") as out:
            self.kms_process = subprocess.Popen(
                [sys.executable, "-m", "hermetic", "kms", "serve", "--port", str(self.kms_port),
                 "--db", str(self.directory / "kms.sqlite3")],
                stdout=out, stderr=out, env=os.environ.copy(),
            )  # fmt: skip
        wait_port(self.kms_port, self.kms_process)
        if not self.key_id:
            done = hermetic("kms", "policy", "--pcr0", self.image.pcr0, "--principal", ENCLAVE_ROLE)
            assert done.returncode == 0, done.stderr
            admin = boto3.session.Session(
                aws_access_key_id=ADMIN[0], aws_secret_access_key=ADMIN[1], region_name=REGION
            ).client("kms", endpoint_url=f"http://127.0.0.1:{self.kms_port}")
            self.key_id = str(admin.create_key(Policy=done.stdout)["KeyMetadata"]["KeyId"])

    def kms_lines(self, pattern: str, log: int = -1) -> list[str]:
        text = self.kms_logs[log].read_text()
        return [line for line in text.splitlines() if re.search(pattern, line)]

    def start_store(self) -> None:
        self.store = StoreServerProcess(self.store_db).start()

    def store_client(self) -> RecordStoreClient:
        assert self.store is not None
        return RecordStoreClient(self.store.url)

    def stop_all(self) -> None:
        for served in self.served:
            self.stop_enclave(served)
        if self.store is not None:
            self.store.stop()
        if self.witness is not None:
            stop_process(self.witness)
        if self.log is not None:
            self.log.stop()
        if self.kms_process is not None:
            stop_process(self.kms_process)

    # --- enclaves ------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        assert self.store is not None
        return {
            "kms": {"endpoint": f"127.0.0.1:{self.kms_port}", "region": REGION, "scheme": "http"},
            "persistence": {
                "store": self.store.url.removeprefix("http://"),
                "store_id": STORE_ID,
                "key_id": self.key_id,
                "access_policy": self.policy.document,
                "access_policy_endorsement": self.policy.endorsement,
                "peers": self.policy.trust,
                "anchor": {
                    "log": self.log_address(),
                    "log_key": self.log_keys.vkey if self.log_keys else "",
                    "witnesses": [self.witness_vkey],
                    **self.anchor,
                },
            },
        }

    def boot(self, image: Image | None = None) -> Served:
        """``hermetic run`` the image with a fresh signed config, then its proxy."""
        image = self.image if image is None else image
        assert self.store is not None
        credentials = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "enclave",
            "AWS_SECRET_ACCESS_KEY": "SECRET-" + secrets.token_hex(8),
            "AWS_SESSION_TOKEN": "TOKEN-" + secrets.token_hex(8),
        }
        done = hermetic(
            "run", str(image.path), "--config", str(image.bundle(self.config())),
            "--aws-credentials-env", "--endorsement", str(image.endorsement),
            env=credentials,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        enclave = json.loads(done.stdout)
        proxy, addresses = start_cli(
            self.background, "proxy", "--enclave", enclave["EnclaveID"], "--port", "5001",
            "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
            "--egress-allow", f"127.0.0.1:{self.kms_port}",
            "--egress-allow", self.store.url.removeprefix("http://"),
            "--egress-allow", self.log_address(),
        )  # fmt: skip
        served = Served(
            enclave["EnclaveID"],
            f"tcp://{addresses['tcp']}",
            f"vsock://{enclave['EnclaveCID']}:5000",
            proxy,
            addresses["metrics"],
        )
        self.served.append(served)
        return served

    def stop_enclave(self, served: Served) -> None:
        stop_process(served.proxy)
        record = records.load(served.enclave_id)
        if record.state in records.LIVE_STATES:
            emulated.terminate(served.enclave_id)


async def _session(image: Image, served: Served) -> AttestedSession:
    """An admin's (anonymous, NX) session to the persistence enclave's port 5000."""
    trust = image.directory / "trust.json"
    DevLog(image.directory / "dev-log").write_trust(trust)
    policy = ServicePolicy(services=frozenset({"persistence"}))
    return await connect(served.admin_url, trust=ClientTrust.load(trust), policy=policy, timeout=60)


async def _service_session(stack: Stack, served: Served) -> AttestedSession:
    """A ``reporting`` service's XX session to port 5001 through the proxy: this process
    attests a release logged in the dev log, with an emulated NSM of the dev PKI."""
    from hermetic.translog.release import Endorsement

    trust = stack.image.directory / "trust.json"
    DevLog(stack.image.directory / "dev-log").write_trust(trust)
    nsm = NSMClient(EmulatedNSM(REPORTING, pki=DevPKI()))
    evidence = make_evidence_provider(nsm, Endorsement.loads(stack.policy.caller), None)
    return await connect(
        served.url, trust=ClientTrust.load(trust),
        policy=ServicePolicy(services=frozenset({"persistence"})), protocol_name=XX,
        static=StaticKeypair.generate(), make_evidence=evidence, timeout=60,
    )  # fmt: skip


async def _started(session: AttestedSession) -> dict[str, Any]:
    """``status`` once the root key is obtained (or refused): waits on the service."""
    deadline = time.monotonic() + 120
    while True:
        status: dict[str, Any] = await session.call("status")
        if status["state"] != "starting" or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


async def _calls(session: AttestedSession, calls: tuple[tuple[str, Any], ...]) -> list[Any]:
    results: list[Any] = []
    for method, arg in calls:
        try:
            results.append(await session.call(method, arg))
        except RPCError as exc:
            results.append(exc)
    return results


def _call(image: Image, served: Served, *calls: tuple[str, Any]) -> list[Any]:
    """The results of ``calls`` in one admin session, after boot; an RPCError as is."""

    async def run() -> list[Any]:
        async with await _session(image, served) as session:
            return [await _started(session), *await _calls(session, calls)]

    return asyncio.run(run())


def _service_call(stack: Stack, served: Served, *calls: tuple[str, Any]) -> list[Any]:
    """The results of ``calls`` from the attested ``reporting`` service (XX)."""

    async def run() -> list[Any]:
        async with await _service_session(stack, served) as session:
            return await _calls(session, calls)

    return asyncio.run(run())


def _trail(stack: Stack, served: Served, admin: TenantAdminClient) -> list[AuditEntry]:
    """The tenant's audit trail, read and verified as its admin does."""
    _, trail = _call(stack.image, served, admin.audit())
    return read_audit_trail(trail, STORE_ID, admin.tenant)[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One state directory for the module (images, dev PKI and enclaves outlive a test)."""
    directory = tmp_path_factory.mktemp("persistence-enclave")
    with module_state(directory / "state"):
        yield directory


@pytest.fixture(autouse=True)
def _use_module_state(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMETIC_STATE_DIR", str(work / "state"))


@pytest.fixture(scope="module")
def image(work: Path) -> Image:
    directory = work / "genuine"
    directory.mkdir()
    return _build(directory, ed25519.Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def policy(image: Image) -> Policy:
    """The access policy logged in the image's dev log, and a ``reporting`` release."""
    log = DevLog(image.directory / "dev-log")
    trust = image.directory / "peers-trust.json"
    log.write_trust(trust)
    endorsement = log.publish_statement(
        access_policy_statement(AccessPolicy.from_json(ACCESS_POLICY))
    )
    caller = log.publish(
        Measurements(
            "hermetic", REPORTING[0], REPORTING[1], REPORTING[2], None, "reporting", "1.0.0"
        )
    )
    return Policy(
        ACCESS_POLICY, endorsement.to_json(), json.loads(trust.read_text()), caller.dumps()
    )


def _new_stack(
    work: Path, image: Image, policy: Policy, name: str, store_db: str | None = None
) -> Stack:
    directory = work / name
    directory.mkdir()
    stack = Stack(directory, store_db or str(directory / "records.db"), image, policy)
    stack.start_kms()
    stack.start_store()
    stack.start_log()
    return stack


@contextlib.contextmanager
def _shared_stack(
    work: Path, image: Image, policy: Policy, name: str, store_db: str | None = None
) -> Iterator[Stack]:
    """A stack with one booted, ready persistence enclave (``served[0]``), shared by the
    tests that ask for it."""
    stack = _new_stack(work, image, policy, name, store_db)
    try:
        status = _call(image, stack.boot())[0]
        assert status["state"] == "ready", status
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def stack(work: Path, image: Image, policy: Policy) -> Iterator[Stack]:
    """One KMS, one SQLite record store and one booted persistence enclave for the module."""
    with _shared_stack(work, image, policy, "shared") as stack:
        yield stack


@pytest.fixture(scope="module")
def postgresql_stack(
    work: Path, image: Image, policy: Policy, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """The same on the suite's PostgreSQL server (a database of its own); skipped, as the
    ``postgres`` fixture is, when the server binaries are not installed."""
    postgres = request.getfixturevalue("postgres")
    database = postgres.new_database()
    with _shared_stack(work, image, policy, "shared-postgresql", database) as stack:
        yield stack


BACKENDS = ("sqlite", "postgresql")
"""The record store back ends the acceptance tests run on (acceptance 4)."""


def xdist_group_of(item: pytest.Item) -> str:
    """The PostgreSQL half (its own stack) runs on the other worker from the SQLite half
    (tests/conftest.py): together they were the suite's longest group."""
    callspec = getattr(item, "callspec", None)
    on_postgresql = callspec is not None and callspec.params.get("backend_stack") == "postgresql"
    return "postgresql" if on_postgresql or item.name.endswith("_on_postgresql") else "sqlite"


@pytest.fixture(params=BACKENDS)
def backend_stack(request: pytest.FixtureRequest) -> Stack:
    """The module's shared stack on each record store back end in turn: a test asking for
    it runs once on the SQLite stack (``stack``) and once on ``postgresql_stack``; each is
    started once for the module."""
    name = "stack" if request.param == "sqlite" else "postgresql_stack"
    chosen: Stack = request.getfixturevalue(name)
    return chosen


def _restart_keeps_keys(stack: Stack) -> None:
    """Put a key; stop the enclave, the store and KMS; start all three again: the key is
    there, and each boot called KMS once (GenerateDataKey, then Decrypt)."""
    image = stack.image
    material = secrets.token_bytes(32)
    acme = Admin("acme")
    first = stack.boot()
    status, created, put, _ = _call(
        image,
        first,
        acme.create(),
        acme.put("insights/app-usage", material),
        acme.enable("insights"),
    )
    anchor = status.pop("anchor")
    assert status == {
        "state": "ready", "store_id": STORE_ID, "root_key": "generated", "kms_calls": 1,
        "access_policy": AccessPolicy.from_json(ACCESS_POLICY).digest.hex(),
    }  # fmt: skip
    # A first boot: the genesis state (the root-key record) logged and witnessed.
    assert anchor["mode"] == "deferred"
    assert (anchor["sequence"], anchor["logged_sequence"], anchor["records"]) == (0, 0, 1)
    assert anchor["key"].startswith("sha256:")
    assert anchor["last_anchored"] is not None
    assert created == {"tenant": "acme"}
    assert put["version"] == 1
    allowed = rf"allowed kms:(\w+) key={stack.key_id} caller=enclave for attested"
    assert [m.group(1) for m in map(re.compile(allowed).search, stack.kms_lines(allowed))] == [
        "GenerateDataKey"
    ]
    assert all(line.endswith(f"ImageSha384={image.pcr0}") for line in stack.kms_lines(allowed))

    stack.stop_all()
    stack.served.clear()
    stack.start_kms()
    stack.start_store()
    stack.start_log()
    second = stack.boot()
    assert _call(image, second)[0]["root_key"] == "decrypted"
    calls = [("get_key", {"tenant": "acme", "name": "insights/app-usage"})] * 20
    keys = _service_call(stack, second, *calls)
    status = _call(image, second)[0]
    assert status["kms_calls"] == 1
    assert all(key["material"] == material and key["version"] == 1 for key in keys)
    # One Decrypt at boot, nothing for twenty key fetches.
    assert [m.group(1) for m in map(re.compile(allowed).search, stack.kms_lines(allowed))] == [
        "Decrypt"
    ]
    assert stack.kms_lines(rf"kms:GenerateDataKey key={stack.key_id}") == []
    with stack.store_client() as client:
        ids = [r.id for r in client.scan(f"{STORE_ID}/")]
    tenant = f"{STORE_ID}/tenants/acme"
    assert [i for i in ids if "/audit/" not in i] == [
        f"{STORE_ID}/anchor/state", f"{STORE_ID}/root-key", f"{tenant}/admin",
        f"{tenant}/audit-head", f"{tenant}/keyring",
    ]  # fmt: skip
    assert len([i for i in ids if "/audit/" in i]) == 3 + 20  # three changes, twenty gets


def test_keys_survive_restarting_enclave_store_and_kms_with_one_kms_call_per_boot(
    work: Path, image: Image, policy: Policy
) -> None:
    stack = _new_stack(work, image, policy, "restart-sqlite")
    try:
        _restart_keeps_keys(stack)
    finally:
        stack.stop_all()


def test_keys_survive_restarting_enclave_store_and_kms_on_postgresql(
    work: Path, image: Image, policy: Policy, request: pytest.FixtureRequest
) -> None:
    postgres = request.getfixturevalue("postgres")
    stack = _new_stack(work, image, policy, "restart-postgres", store_db=postgres.new_database())
    try:
        _restart_keeps_keys(stack)
    finally:
        stack.stop_all()


def test_an_enclave_built_from_one_modified_line_is_denied_the_root_key(
    stack: Stack, work: Path
) -> None:
    genuine = stack.image
    # The genuine enclave booted already: the root key's blob is in the store.
    with stack.store_client() as client:
        kept = client.get(f"{STORE_ID}/root-key")
    directory = work / "modified"
    directory.mkdir()
    modified = _build(directory, genuine.operator, change="# one line changed\n")
    assert modified.pcr0 != genuine.pcr0
    served = stack.boot(modified)
    status, *refused = _call(modified, served, Admin("mallory").create())
    assert status["state"] == "failed"
    assert "RootKeyError: root key: KMS Decrypt of the blob kept in" in status["reason"]
    assert "AccessDeniedException" in status["reason"]
    for error in refused:
        assert isinstance(error, RPCError)
        assert "did not start: RootKeyError" in error.remote_message
    denied = stack.kms_lines(
        rf"denied kms:Decrypt key={stack.key_id} caller=enclave: statement "
        r"'EnclaveKeyRelease' condition failed: StringEqualsIgnoreCase "
        rf"kms:RecipientAttestation:ImageSha384: expected \['{genuine.pcr0}'\], "
        rf"got '{modified.pcr0}'"
    )
    assert len(denied) == 1
    with stack.store_client() as client:
        assert client.get(f"{STORE_ID}/root-key") == kept
        assert [r.id for r in client.scan(f"{STORE_ID}/tenants/mallory")] == []
    stack.stop_enclave(served)


def test_rotate_writes_under_n_plus_1_and_retire_makes_records_unreadable(
    backend_stack: Stack,
) -> None:
    stack = backend_stack
    name = "insights/rotation"
    first_material = secrets.token_bytes(32)
    t = {"tenant": "rotating", "name": name}
    admin = Admin("rotating")
    served = stack.served[0]
    _call(
        stack.image,
        served,
        admin.create(),
        admin.put(name, first_material),
        admin.enable("insights"),
    )
    first, old_first = _service_call(
        stack, served,
        ("put_record", {**t, "id": "report/1", "data": b"sealed under one"}),
        ("get_record", {**t, "id": "report/1"}),
    )  # fmt: skip
    _, rotated = _call(stack.image, served, admin.rotate(name))
    second, old, key1, current = _service_call(
        stack, served,
        ("put_record", {**t, "id": "report/2", "data": b"sealed under two"}),
        ("get_record", {**t, "id": "report/1"}),
        ("get_key", {**t, "version": 1}),
        ("get_key", t),
    )  # fmt: skip
    _, retire_current, retired, described = _call(
        stack.image, served, admin.retire(name, 2), admin.retire(name, 1),
        ("describe", {"tenant": "rotating"}),
    )  # fmt: skip
    unreadable, gone, still = _service_call(
        stack, served,
        ("get_record", {**t, "id": "report/1"}),
        ("get_key", {**t, "version": 1}),
        ("get_record", {**t, "id": "report/2"}),
    )  # fmt: skip
    assert first["key_version"] == 1
    assert old_first == b"sealed under one"
    assert rotated["version"] == 2
    assert second["key_version"] == 2
    assert old == b"sealed under one"
    assert (key1["version"], key1["material"]) == (1, first_material)
    assert current["version"] == 2
    assert current["material"] != first_material
    assert isinstance(retire_current, RPCError)
    assert "KeyringStateError" in retire_current.remote_message
    assert "current version and cannot be retired" in retire_current.remote_message
    assert retired == {"tenant": "rotating", "name": name, "retired": 1}
    for error in (unreadable, gone):
        assert isinstance(error, RPCError)
        assert error.remote_message.startswith("KeyRetiredError: ")
        assert first_material.hex() not in error.remote_message
    assert still == b"sealed under two"
    assert described["keys"][name] == {"current": 2, "live": [2], "retired": [1]}
    assert described["features"] == ["insights"]


def test_rejects_bad_arguments_and_unknown_tenants_with_typed_errors(stack: Stack) -> None:
    small = Admin("small")
    signature = bytes(64)
    cases: list[tuple[str, Any, str]] = [
        ("create_tenant", "acme", "arguments: expected a map with tenant, admin_key"),
        ("put_key", {"tenant": "x", "name": "a"}, "got missing ['material', 'counter'"),
        ("describe", {"tenant": "x", "extra": 1}, "unknown ['extra']"),
        (
            "put_key",
            {"tenant": "x", "name": "a", "material": "text", "counter": 1, "signature": signature},
            "material: expected bytes",
        ),
        (
            "retire",
            {"tenant": "x", "name": "a", "version": "1", "counter": 1, "signature": signature},
            "version: expected an integer",
        ),
        (
            "create_tenant",
            {
                "tenant": "Upper",
                "admin_key": admin_public_key(small.key),
                "counter": 1,
                "signature": signature,
            },
            "PersistenceUsageError: tenant",
        ),
        ("describe", {"tenant": "nobody"}, "TenantNotFoundError: tenant 'nobody'"),
    ]
    calls = [(method, arg) for method, arg, _ in cases]
    _, _, short, *rest = _call(
        stack.image, stack.served[0], small.create(), small.put("a", b"short"), *calls
    )
    assert isinstance(short, RPCError)
    assert "PersistenceUsageError: material: expected 32 bytes" in short.remote_message
    for (_, _, expected), error in zip(cases, rest, strict=True):
        assert isinstance(error, RPCError), error
        assert error.code == "rejected"
        assert expected in error.remote_message


def _build_keyreader(image: Image, service: str = "keyreader") -> Image:
    """The example service built into the genuine image's directory (same dev log); under
    another service name it is a release the access policy does not admit."""
    import shutil

    source = image.directory / "sources" / service
    shutil.copytree(KEYREADER, source)
    manifest = source / "hermetic.toml"
    manifest.write_text(manifest.read_text().replace('name = "keyreader"', f'name = "{service}"'))
    return build_operator_image(source, image.directory, image.operator, "keyreader_service.py")


@pytest.fixture(scope="module")
def keyreaders(image: Image) -> tuple[Image, Image]:
    """The ``keyreader`` example and the same code released as ``intruder``, built once
    for the module (the stacks of both back ends run them)."""
    return _build_keyreader(image), _build_keyreader(image, "intruder")


def _run_keyreader(stack: Stack, reader: Image, tenant: str, name: str) -> dict[str, Any]:
    """Boot the keyreader with nobody connected to it; once it has settled, its status."""
    persistence = stack.served[0].url.removeprefix("tcp://")
    config = {"keyreader": {"persistence": persistence, "tenant": tenant, "name": name,
                            "trust": stack.policy.trust}}  # fmt: skip
    done = hermetic(
        "run", str(reader.path), "--config", str(reader.bundle(config)),
        "--endorsement", str(reader.endorsement),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    enclave = json.loads(done.stdout)
    proxy, _ = start_cli(
        stack.background, "proxy", "--enclave", enclave["EnclaveID"],
        "--listen", "127.0.0.1:0", "--egress-allow", persistence,
    )  # fmt: skip
    try:
        # The fetch happens at boot; we only look afterwards, over vsock, to read the result.
        async def settled() -> dict[str, Any]:
            trust = stack.image.directory / "trust.json"
            DevLog(stack.image.directory / "dev-log").write_trust(trust)
            url = f"vsock://{enclave['EnclaveCID']}:5000"
            async with await connect(url, trust=ClientTrust.load(trust), timeout=60) as session:
                return await _started(session)

        return asyncio.run(settled())
    finally:
        stop_process(proxy)
        emulated.terminate(enclave["EnclaveID"])


def test_the_example_service_fetches_a_tenant_key_with_no_client_and_refusals_are_audited(
    backend_stack: Stack, keyreaders: tuple[Image, Image]
) -> None:
    """Acceptance 1: the admin stores a key; keyreader fetches it at boot with no client;
    a release the policy does not admit, and an admitted release asking for a tenant that
    did not enable the feature, are refused with AccessDeniedError; the tenants' audit
    trails hold all three."""
    stack = backend_stack
    served = stack.served[0]
    material = secrets.token_bytes(32)
    acme, globex = Admin("acme-1"), Admin("globex-1")
    _call(
        stack.image, served,
        acme.create(), acme.put("insights/app-usage", material), acme.enable("insights"),
        globex.create(), globex.put("insights/app-usage", secrets.token_bytes(32)),
    )  # fmt: skip
    reader, intruder = keyreaders

    fetched = _run_keyreader(stack, reader, "acme-1", "insights/app-usage")
    assert fetched["state"] == "ready", fetched
    assert fetched["version"] == 1
    mac = hmac.digest(material, b"keyreader report", hashlib.sha256)
    assert fetched["report_mac"] == mac.hex()

    refused = _run_keyreader(stack, intruder, "acme-1", "insights/app-usage")
    assert refused["state"] == "failed"
    assert (
        "AccessDeniedError: get_key of 'insights/app-usage' from tenant 'acme-1' by"
        in (refused["reason"])
    )
    assert "service intruder 0.1.0" in refused["reason"]
    other = _run_keyreader(stack, reader, "globex-1", "insights/app-usage")
    assert other["state"] == "failed"
    assert "AccessDeniedError" in other["reason"]
    assert "tenant 'globex-1' enabled (none)" in other["reason"]

    acme_trail = _trail(stack, served, acme)
    events = [(e.event, e.operation, e.actor.split(" pcr0 ")[0]) for e in acme_trail]
    assert events[:3] == [
        ("change", "create_tenant", "admin counter 1"),
        ("change", "put_key", "admin counter 2"),
        ("change", "enable", "admin counter 3"),
    ]
    assert events[3:] == [
        ("get", "get_key", "service keyreader 0.1.0"),
        ("refused", "get_key", "service intruder 0.1.0"),
        ("read", "audit", "admin counter 4"),
    ]
    assert acme_trail[3].actor.endswith(reader.pcr0[:16])
    globex_events = [(e.event, e.actor.split(" pcr0 ")[0]) for e in _trail(stack, served, globex)]
    assert ("refused", "service keyreader 0.1.0") in globex_events


def test_rejects_forged_and_replayed_admin_signatures_over_the_channel(stack: Stack) -> None:
    served = stack.served[0]
    owner = Admin("signed")
    mallory = Admin("signed")  # same tenant, another key
    _call(stack.image, served, owner.create())
    mallory.counter = owner.counter
    replayed = owner.put("insights/a", secrets.token_bytes(32))
    results = _call(
        stack.image, served,
        mallory.put("insights/a", secrets.token_bytes(32)),  # forged
        replayed,
        replayed,  # the same signed request again
    )  # fmt: skip
    _, forged, accepted, again = results
    assert isinstance(forged, RPCError)
    assert forged.remote_message.startswith("AdminSignatureError: admin signature on put_key")
    assert accepted["version"] == 1
    assert isinstance(again, RPCError)
    assert again.remote_message.startswith("AdminReplayError: ")
    refusals = [
        e.detail.split(":")[0] for e in _trail(stack, served, owner) if e.event == "refused"
    ]
    assert refusals == ["AdminSignatureError", "AdminReplayError"]


def test_an_nx_client_is_refused_every_key_even_with_the_admin_key(stack: Stack) -> None:
    served = stack.served[0]
    admin = Admin("nx-only")
    _call(stack.image, served, admin.create(), admin.put("insights/a", secrets.token_bytes(32)),
          admin.enable("insights"))  # fmt: skip
    _, refused = _call(
        stack.image, served, ("get_key", {"tenant": "nx-only", "name": "insights/a"})
    )
    assert isinstance(refused, RPCError)
    assert refused.remote_message.startswith("AccessDeniedError: ")
    assert "only over an attested XX session" in refused.remote_message
    assert _trail(stack, served, admin)[-2].event == "refused"


def test_no_plaintext_key_bytes_in_the_store_the_proxy_logs_metrics_or_the_audit_trail(
    backend_stack: Stack,
) -> None:
    """Acceptance 6: every key's bytes, raw, hex and base64, whole and halved, are searched
    in what the host holds of the record store (``StoreHost.stored_bytes``: the SQLite
    file and its WAL; PostgreSQL's rows, the database's files and the server's WAL), the
    persistence proxy's logs, its /metrics and the tenant's audit trail."""
    stack = backend_stack
    import urllib.request

    served = stack.boot()
    material = secrets.token_bytes(32)
    data = b"record plaintext " + secrets.token_hex(16).encode()
    admin = Admin("secretive")
    t = {"tenant": "secretive", "name": "insights/pan"}
    _call(stack.image, served, admin.create(), admin.put(t["name"], material),
          admin.rotate(t["name"]), admin.enable("insights"))  # fmt: skip
    current, _ = _service_call(
        stack, served, ("get_key", t), ("put_record", {**t, "id": "r", "data": data})
    )
    rotated_material = current["material"]
    assert isinstance(rotated_material, bytes)
    assert len(rotated_material) == 32
    trail = _call(stack.image, served, admin.audit())[1]["entries"]
    with urllib.request.urlopen(served.metrics, timeout=30) as response:
        metrics = response.read()
    stop_process(served.proxy)
    assert served.proxy.stdout is not None
    assert served.proxy.stderr is not None
    logs = served.proxy.stdout.read().encode() + served.proxy.stderr.read().encode()
    secrets_: list[bytes] = []
    for value in (material, rotated_material, data):
        secrets_ += [value, value.hex().encode(), value.hex().upper().encode()]
        secrets_ += [base64.b64encode(value), base64.urlsafe_b64encode(value)]
        secrets_ += [value[:16], value[16:]]
    stored = _host(stack).stored_bytes()
    # The places searched hold the store's rows: the sealed record is there, as stored.
    with stack.store_client() as client:
        sealed = client.get(f"{STORE_ID}/tenants/secretive/records/r").data
    assert any(sealed in place for place in stored.values()), sorted(stored)
    places = {**stored, "proxy logs": logs, "metrics": metrics, "audit trail": b"".join(trail)}
    assert b"hermetic" in metrics  # the exporter answered with the proxy's metrics
    for place, held in places.items():
        for secret in secrets_:
            assert secret not in held, (place, secrets_.index(secret))
    # The records are there, sealed.
    with stack.store_client() as client:
        ids = [r.id for r in client.scan(f"{STORE_ID}/tenants/secretive/")]
    assert [i for i in ids if "/audit" not in i] == [
        f"{STORE_ID}/tenants/secretive/admin",
        f"{STORE_ID}/tenants/secretive/keyring",
        f"{STORE_ID}/tenants/secretive/records/r",
    ]
    stack.stop_enclave(served)


@dataclass(frozen=True)
class StoreHost:
    """The host's hand on a stack's record store database, under the running server, on
    either back end: it reads and writes the very rows ``hermetic store serve`` serves
    (the ``records`` table, by SQL on the SQLite file or over psycopg on PostgreSQL)."""

    db: SQLiteHost | PostgresHost

    @classmethod
    def of(cls, stack: Stack) -> StoreHost:
        if stack.store_db.startswith("postgresql://"):
            return cls(PostgresHost(stack.store_db))
        return cls(SQLiteHost(Path(stack.store_db)))

    def row(self, record_id: str) -> tuple[Any, ...]:
        """``(version, data, size, sha256)`` of the record as stored."""
        return self.db.row(record_id)

    def set_row(self, record_id: str, row: tuple[Any, ...]) -> None:
        self.db.set_row(record_id, row)

    def snapshot(self) -> Callable[[], None]:
        """A copy of the whole database as it is now; calling the result puts it back."""
        db = self.db
        if isinstance(db, SQLiteHost):
            return functools.partial(db.restore, db.snapshot())
        return functools.partial(db.restore, db.snapshot())  # (a snapshot type of its own)

    def stored_bytes(self) -> dict[str, bytes]:
        """Everything the host holds of the store, by place: on SQLite the database file
        and its WAL; on PostgreSQL every table's rows as read over SQL, and, after a
        CHECKPOINT, the database's own files and the server's WAL on disk."""
        db = self.db
        if isinstance(db, SQLiteHost):
            files = sorted(db.path.parent.glob(f"{db.path.name}*"))
            return {p.name: p.read_bytes() for p in files}
        import psycopg

        places: dict[str, bytes] = {}
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            tables = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            ).fetchall()
            for (table,) in tables:
                rows = conn.execute(f'SELECT * FROM "{table}"').fetchall()
                places[f"table {table}"] = b"".join(
                    bytes(v) if isinstance(v, bytes | memoryview) else str(v).encode()
                    for row in rows
                    for v in row
                )
            conn.execute("CHECKPOINT")
            data_directory = conn.execute("SHOW data_directory").fetchone()
            database = conn.execute(
                "SELECT oid FROM pg_database WHERE datname = current_database()"
            ).fetchone()
        assert data_directory is not None
        assert database is not None
        root = Path(data_directory[0])
        for directory in (root / "base" / str(database[0]), root / "pg_wal"):
            for path in sorted(directory.iterdir()):
                if path.is_file():
                    places[f"{directory.name}/{path.name}"] = path.read_bytes()
        return places


def _host(stack: Stack) -> StoreHost:
    """The host's hand on the stack's record store database, under the running server."""
    return StoreHost.of(stack)


def test_rejects_records_the_host_swapped_flipped_or_replayed_and_returns_nothing(
    backend_stack: Stack,
) -> None:
    """Acceptance 3 end to end, against the running enclave: another tenant's keyring
    swapped in, a byte flipped in the database file (the listing's digest left as it was),
    and an older version of the keyring written back; each is refused by the anchored state
    (StoreStateMismatchError) and no key is returned. Put back as they were, they serve."""
    stack = backend_stack
    material = secrets.token_bytes(32)
    served = stack.served[0]
    victim, attacker = Admin("victim"), Admin("attacker")
    _call(
        stack.image, served, victim.create(), victim.enable("insights"), attacker.create(),
        attacker.put("insights/a", material), victim.put("insights/a", material),
    )  # fmt: skip
    host = _host(stack)
    record = f"{STORE_ID}/tenants/victim/keyring"
    older = host.row(record)
    _call(stack.image, served, victim.rotate("insights/a"))
    kept = host.row(record)
    theirs = host.row(f"{STORE_ID}/tenants/attacker/keyring")
    flipped = bytearray(kept[1])
    flipped[len(flipped) // 2] ^= 1
    attacks = {
        "swapped": (kept[0], *theirs[1:]),
        "flipped": (kept[0], bytes(flipped), *kept[2:]),
        "replayed": older,
    }
    get = ("get_key", {"tenant": "victim", "name": "insights/a"})
    for attack, row in attacks.items():
        host.set_row(record, row)
        try:
            with stack.store_client() as client:  # the store serves the host's edit
                assert client.get(record).data == row[1], attack
            (refused,) = _service_call(stack, served, get)
        finally:
            host.set_row(record, kept)
        assert isinstance(refused, RPCError), attack
        assert refused.remote_message.startswith(
            f"StoreStateMismatchError: record {record!r}: state sequence "
        ), (attack, refused.remote_message)
        assert material.hex() not in refused.remote_message
    assert "(an older version replayed)" in refused.remote_message
    (fetched,) = _service_call(stack, served, get)
    assert fetched["version"] == 2


def test_refuses_to_serve_when_the_host_edited_the_kept_root_key_blob(stack: Stack) -> None:
    record_id = f"{STORE_ID}/root-key"
    host = _host(stack)
    kept = host.row(record_id)
    edited = bytearray(kept[1])
    edited[len(edited) // 2] ^= 1
    host.set_row(record_id, (kept[0], bytes(edited), *kept[2:]))
    try:
        served = stack.boot()
        status, refused = _call(stack.image, served, ("describe", {"tenant": "acme"}))
    finally:
        host.set_row(record_id, kept)  # as it was: the anchored state still matches
    assert status["state"] == "failed"
    assert "RootKeyError: root key: KMS Decrypt of the blob kept in" in status["reason"]
    assert "InvalidCiphertextException" in status["reason"]
    assert isinstance(refused, RPCError)
    assert "did not start: RootKeyError" in refused.remote_message
    stack.stop_enclave(served)


def test_refuses_to_start_on_an_access_policy_that_is_not_the_logged_one(stack: Stack) -> None:
    """The operator changes the policy document without logging it: the service refuses
    to serve, saying which digest the log names."""
    changed = {**ACCESS_POLICY, "rules": [{**ACCESS_POLICY["rules"][0], "services": ["any"]}]}
    genuine = stack.policy
    stack.policy = Policy(changed, genuine.endorsement, genuine.trust, genuine.caller)
    try:
        served = stack.boot()
    finally:
        stack.policy = genuine
    status, refused = _call(stack.image, served, ("describe", {"tenant": "acme"}))
    assert status["state"] == "failed"
    assert (
        "AccessPolicyError: access policy endorsement: names 'persistence/store-eu1'"
        in (status["reason"])
    )
    assert AccessPolicy.from_json(changed).digest.hex() in status["reason"]
    assert isinstance(refused, RPCError)
    stack.stop_enclave(served)


def test_up_runs_the_service_with_the_root_key_the_run_enclave_keeps(stack: Stack) -> None:
    material = secrets.token_bytes(32)
    admin = Admin("via-up")
    _call(stack.image, stack.served[0], admin.create(), admin.put("k", material))
    assert stack.store is not None
    trust = stack.directory / "up-trust.json"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "enclave", "AWS_SECRET_ACCESS_KEY": "x"}
    process, addresses = start_cli(
        stack.background, "up", str(stack.image.path), "--listen", "127.0.0.1:0",
        "--forward", "5001=127.0.0.1:0",
        "--config", str(stack.image.bundle(stack.config())), "--aws-credentials-env",
        "--egress-allow", f"127.0.0.1:{stack.kms_port}",
        "--egress-allow", stack.store.url.removeprefix("http://"),
        "--egress-allow", stack.log_address(),
        "--trust-out", str(trust),
        env=env,
    )  # fmt: skip

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        policy = ServicePolicy(services=frozenset({"persistence"}))
        url = f"tcp://{addresses['tcp']}"
        async with await connect(url, trust=ClientTrust.load(trust), policy=policy) as session:
            status = await _started(session)
            return status, await session.call("describe", {"tenant": "via-up"})

    status, described = asyncio.run(scenario())
    # --forward exposes the XX service port too: an attested caller reaches its policy.
    from hermetic.translog.release import Endorsement

    async def forwarded() -> list[Any]:
        nsm = NSMClient(EmulatedNSM(REPORTING, pki=DevPKI()))
        evidence = make_evidence_provider(nsm, Endorsement.loads(stack.policy.caller), None)
        async with await connect(
            f"tcp://{addresses['forwards']['5001']}", trust=ClientTrust.load(trust),
            policy=ServicePolicy(services=frozenset({"persistence"})), protocol_name=XX,
            static=StaticKeypair.generate(), make_evidence=evidence, timeout=60,
        ) as session:  # fmt: skip
            return await _calls(session, (("get_key", {"tenant": "via-up", "name": "k"}),))

    (refused,) = asyncio.run(forwarded())
    assert isinstance(refused, RPCError)
    assert "AccessDeniedError" in str(refused), refused
    assert status["state"] == "ready"
    assert status["root_key"] == "decrypted"
    # The up enclave opened the keyring the run enclave wrote (the same root key).
    assert described["keys"] == {"k": {"current": 1, "live": [1], "retired": []}}
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode == 0


def test_a_client_sees_in_the_handshake_which_logged_policy_is_in_force(stack: Stack) -> None:
    """The config digest in the evidence is the SHA-256 of a config holding the policy
    document, whose digest the logged statement names and ``status`` repeats."""
    from hermetic.translog.release import Endorsement

    served = stack.boot()
    config = stack.config()

    async def handshake() -> tuple[bytes | None, dict[str, Any]]:
        async with await _session(stack.image, served) as session:
            return session.verified.config_digest, await _started(session)

    attested, status = asyncio.run(handshake())
    assert attested == hashlib.sha256(json.dumps(config).encode()).digest()
    in_config = AccessPolicy.from_json(config["persistence"]["access_policy"]).digest.hex()
    logged = Endorsement.from_json(config["persistence"]["access_policy_endorsement"])
    assert isinstance(logged.signed.statement, PolicyStatement)
    assert logged.signed.statement.digest == in_config == status["access_policy"]
    stack.stop_enclave(served)


def _anchored(stack: Stack, served: Served) -> dict[str, Any]:
    """``status``'s anchor once the newest state is in the log and witnessed (the deferred
    timer ran), waited for over one admin session."""

    async def run() -> dict[str, Any]:
        async with await _session(stack.image, served) as session:
            deadline = time.monotonic() + 120
            while True:
                status: dict[str, Any] = await session.call("status")
                anchor: dict[str, Any] = status["anchor"]
                settled = anchor["logged_sequence"] == anchor["sequence"]
                if (settled and anchor["pending_writes"] == 0) or time.monotonic() > deadline:
                    return anchor
                await asyncio.sleep(0.2)

    return asyncio.run(run())


def test_refuses_a_restored_database_and_a_log_withholding_its_newest_state(
    backend_stack: Stack,
) -> None:
    """Acceptance 3's whole-store attacks from the host side, through real enclaves: the
    record store's database restored from a snapshot taken before a write (the log shows a
    newer state: StoreRollbackError naming both), and that snapshot shown with a copy of
    the log from the same moment (consistent, both old: only the witness cosignature's age
    by the enclave's NSM clock shows it, StaleCheckpointError). Neither boot serves; an
    honest restart then serves every version of the key. Last in the module: it replaces
    the shared enclave."""
    stack = backend_stack
    served = stack.served[0]
    host = _host(stack)
    admin = Admin("rollback")
    name = "insights/r"
    first_key, second_key = secrets.token_bytes(32), secrets.token_bytes(32)
    _call(stack.image, served, admin.create(), admin.put(name, first_key), admin.enable("insights"))
    before = _anchored(stack, served)
    restore_before = host.snapshot()
    old_log = stack.directory / "withheld-log.db"
    with sqlite3.connect(stack.log_db, timeout=30) as live, sqlite3.connect(old_log) as copy:
        live.backup(copy)
    _call(stack.image, served, admin.put(name, second_key))
    after = _anchored(stack, served)
    assert after["sequence"] > before["sequence"]
    stack.stop_enclave(served)
    restore_current = host.snapshot()
    assert stack.log_keys is not None
    stale = LogServerProcess(str(old_log), stack.log_keys).start()
    max_age = 5
    try:
        restore_before()
        restored = stack.boot()
        rolled_back = _call(stack.image, restored, ("describe", {"tenant": "rollback"}))
        stack.stop_enclave(restored)
        with stack.log_client(stale.url) as withheld, stack.log_client() as honest:
            cosigned = withheld.witnessed_checkpoint(1)
            assert cosigned is not None
            then = cosigned.cosignatures[0].timestamp
            _wait_for(lambda: _witnessed_after(honest, then + max_age))
        stack.log_url, stack.anchor = stale.url, {**stack.anchor, "max_age": max_age}
        hidden = stack.boot()
        withholding = _call(stack.image, hidden, ("describe", {"tenant": "rollback"}))
        stack.stop_enclave(hidden)
    finally:
        stack.log_url, stack.anchor = None, {**stack.anchor, "max_age": 120}
        restore_current()
        stale.stop()
    for status, refused in (rolled_back, withholding):
        assert status["state"] == "failed"
        assert isinstance(refused, RPCError)
        assert "did not start: " in refused.remote_message
    reason = rolled_back[0]["reason"]
    assert reason.startswith("service: did not start: StoreRollbackError: "), reason
    assert f"store 'store-eu1' is at state sequence {before['sequence']} " in reason
    assert f"newest state for it is sequence {after['sequence']} " in reason
    reason = withholding[0]["reason"]
    assert reason.startswith("service: did not start: StaleCheckpointError: "), reason
    assert f"size {cosigned.size}" in reason
    assert f"state record is at sequence {before['sequence']} " in reason

    # The honest restart, in anchored mode: a write is acknowledged only once its state is
    # in a checkpoint the witness cosigned.
    stack.anchor = {**stack.anchor, "mode": "anchored"}
    try:
        honest = stack.boot()
    finally:
        stack.anchor = {k: v for k, v in stack.anchor.items() if k != "mode"}
    stack.served.insert(0, honest)
    status = _call(stack.image, honest)[0]
    assert status["state"] == "ready", status
    assert status["anchor"]["sequence"] >= after["sequence"]
    keys = _service_call(
        stack, honest,
        ("get_key", {"tenant": "rollback", "name": name, "version": 1}),
        ("get_key", {"tenant": "rollback", "name": name}),
    )  # fmt: skip
    assert [(k["version"], k["material"]) for k in keys] == [(1, first_key), (2, second_key)]
    _, rotated, acknowledged = _call(stack.image, honest, admin.rotate(name), ("status", None))
    assert rotated["version"] == 3
    anchor = acknowledged["anchor"]
    assert anchor["mode"] == "anchored"
    assert anchor["logged_sequence"] == anchor["sequence"] > status["anchor"]["sequence"]
    with stack.log_client() as log:
        checkpoint = log.witnessed_checkpoint(1)
        assert checkpoint is not None
        assert checkpoint.size > anchor["log_index"]
