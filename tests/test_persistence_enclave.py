"""The persistence service as a real (emulated) enclave: the root key from KMS at boot.

Real parts only: ``hermetic kms serve`` (dev attestation root), ``hermetic store serve``
(SQLite, and the suite's PostgreSQL), ``hermetic build`` of a copy of
``services/persistence`` with a generated operator key, a key policy from ``hermetic kms
policy`` pinned to the image's PCR0, ``hermetic run`` with forwarded credentials and
``hermetic proxy`` whose egress allows exactly the KMS and the store. The enclave reaches
both only through that egress; what KMS released, and to which PCR0, is read from its log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from apps.probe.harness import (
    OperatorImage,
    build_operator_image,
    hermetic,
    start_cli,
    stop_all,
)
from helpers import free_port, stop_process, wait_port
from hermetic.client import AttestedSession, ClientTrust, ServicePolicy, connect
from hermetic.errors import RPCError
from hermetic.launcher import emulated, records
from hermetic.launcher.devrelease import DevLog
from hermetic.nsm import DevPKI
from hermetic.store.client import RecordStoreClient
from test_store_support import StoreServerProcess

pytestmark = pytest.mark.timeout(300)
SERVICE = Path(__file__).resolve().parents[1] / "services" / "persistence"
REGION = "us-east-1"
ENCLAVE_ROLE = "arn:aws:iam::111122223333:role/enclave"
ADMIN = ("admin", "dummy-admin-secret")
STORE_ID = "store-eu1"


Image = OperatorImage


def _build(directory: Path, operator: ed25519.Ed25519PrivateKey, change: str = "") -> Image:
    return build_operator_image(SERVICE, directory, operator, "persistence_service.py", change)


@dataclass(frozen=True)
class Served:
    enclave_id: str
    url: str
    proxy: subprocess.Popen[str]


@dataclass
class Stack:
    """KMS, record store and persistence enclaves, each restartable on its own data."""

    directory: Path
    store_db: str
    image: Image
    kms_process: subprocess.Popen[bytes] | None = None
    kms_port: int = 0
    kms_logs: list[Path] = field(default_factory=list)
    store: StoreServerProcess | None = None
    key_id: str = ""
    served: list[Served] = field(default_factory=list)
    background: list[subprocess.Popen[str]] = field(default_factory=list)

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
            self.background, "proxy", "--enclave", enclave["EnclaveID"],
            "--listen", "127.0.0.1:0",
            "--egress-allow", f"127.0.0.1:{self.kms_port}",
            "--egress-allow", self.store.url.removeprefix("http://"),
        )  # fmt: skip
        served = Served(enclave["EnclaveID"], f"tcp://{addresses['tcp']}", proxy)
        self.served.append(served)
        return served

    def stop_enclave(self, served: Served) -> None:
        stop_process(served.proxy)
        record = records.load(served.enclave_id)
        if record.state in records.LIVE_STATES:
            emulated.terminate(served.enclave_id)


async def _session(image: Image, served: Served) -> AttestedSession:
    trust = image.directory / "trust.json"
    DevLog(image.directory / "dev-log").write_trust(trust)
    policy = ServicePolicy(services=frozenset({"persistence"}))
    return await connect(served.url, trust=ClientTrust.load(trust), policy=policy, timeout=60)


async def _started(session: AttestedSession) -> dict[str, Any]:
    """``status`` once the root key is obtained (or refused): waits on the service."""
    deadline = time.monotonic() + 120
    while True:
        status: dict[str, Any] = await session.call("status")
        if status["state"] != "starting" or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


def _call(image: Image, served: Served, *calls: tuple[str, Any]) -> list[Any]:
    """The results of ``calls`` in one attested session, after boot; an RPCError as is."""

    async def run() -> list[Any]:
        async with await _session(image, served) as session:
            results: list[Any] = [await _started(session)]
            for method, arg in calls:
                try:
                    results.append(await session.call(method, arg))
                except RPCError as exc:
                    results.append(exc)
            return results

    return asyncio.run(run())


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One state directory for the module (images, dev PKI and enclaves outlive a test)."""
    directory = tmp_path_factory.mktemp("persistence-enclave")
    saved = os.environ.get("HERMETIC_STATE_DIR")
    os.environ["HERMETIC_STATE_DIR"] = str(directory / "state")
    DevPKI().root(datetime.now(UTC))  # the root `kms serve` pins and the launcher's NSM uses
    yield directory
    stop_all()
    if saved is None:
        os.environ.pop("HERMETIC_STATE_DIR", None)
    else:
        os.environ["HERMETIC_STATE_DIR"] = saved


@pytest.fixture(autouse=True)
def _use_module_state(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMETIC_STATE_DIR", str(work / "state"))


@pytest.fixture(scope="module")
def image(work: Path) -> Image:
    directory = work / "genuine"
    directory.mkdir()
    return _build(directory, ed25519.Ed25519PrivateKey.generate())


def _new_stack(work: Path, image: Image, name: str, store_db: str | None = None) -> Stack:
    directory = work / name
    directory.mkdir()
    stack = Stack(directory, store_db or str(directory / "records.db"), image)
    stack.start_kms()
    stack.start_store()
    return stack


@pytest.fixture(scope="module")
def stack(work: Path, image: Image) -> Iterator[Stack]:
    """One KMS, one SQLite record store and one booted persistence enclave for the module."""
    stack = _new_stack(work, image, "shared")
    try:
        status = _call(image, stack.boot())[0]
        assert status["state"] == "ready", status
        yield stack
    finally:
        stack.stop_all()


def _restart_keeps_keys(stack: Stack) -> None:
    """Put a key; stop the enclave, the store and KMS; start all three again: the key is
    there, and each boot called KMS once (GenerateDataKey, then Decrypt)."""
    image = stack.image
    material = secrets.token_bytes(32)
    first = stack.boot()
    status, created, put = _call(
        image, first,
        ("create_tenant", {"tenant": "acme"}),
        ("put_key", {"tenant": "acme", "name": "insights/app-usage", "material": material}),
    )  # fmt: skip
    assert status == {
        "state": "ready", "store_id": STORE_ID, "root_key": "generated", "kms_calls": 1
    }  # fmt: skip
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
    second = stack.boot()
    calls = [("get_key", {"tenant": "acme", "name": "insights/app-usage"})] * 20
    status, *keys = _call(image, second, *calls, ("status", None))
    assert status["root_key"] == "decrypted"
    assert status["kms_calls"] == 1
    assert all(key["material"] == material and key["version"] == 1 for key in keys[:-1])
    # One Decrypt at boot, nothing for twenty key fetches.
    assert [m.group(1) for m in map(re.compile(allowed).search, stack.kms_lines(allowed))] == [
        "Decrypt"
    ]
    assert stack.kms_lines(rf"kms:GenerateDataKey key={stack.key_id}") == []
    with stack.store_client() as client:
        assert [r.id for r in client.scan(f"{STORE_ID}/")] == [
            f"{STORE_ID}/root-key",
            f"{STORE_ID}/tenants/acme/keyring",
        ]


def test_keys_survive_restarting_enclave_store_and_kms_with_one_kms_call_per_boot(
    work: Path, image: Image
) -> None:
    stack = _new_stack(work, image, "restart-sqlite")
    try:
        _restart_keeps_keys(stack)
    finally:
        stack.stop_all()


def test_keys_survive_restarting_enclave_store_and_kms_on_postgresql(
    work: Path, image: Image, request: pytest.FixtureRequest
) -> None:
    postgres = request.getfixturevalue("postgres")
    stack = _new_stack(work, image, "restart-postgres", store_db=postgres.new_database())
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
    status, *refused = _call(
        modified, served,
        ("get_key", {"tenant": "acme", "name": "insights/app-usage"}),
        ("create_tenant", {"tenant": "mallory"}),
    )  # fmt: skip
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
    stack: Stack,
) -> None:
    name = "insights/rotation"
    first_material = secrets.token_bytes(32)
    t = {"tenant": "rotating", "name": name}
    results = _call(
        stack.image, stack.served[0],
        ("create_tenant", {"tenant": "rotating"}),
        ("put_key", {**t, "material": first_material}),
        ("put_record", {**t, "id": "report/1", "data": b"sealed under one"}),
        ("rotate", t),
        ("put_record", {**t, "id": "report/2", "data": b"sealed under two"}),
        ("get_record", {**t, "id": "report/1"}),
        ("get_key", {**t, "version": 1}),
        ("get_key", t),
        ("retire", {**t, "version": 2}),
        ("retire", {**t, "version": 1}),
        ("get_record", {**t, "id": "report/1"}),
        ("get_key", {**t, "version": 1}),
        ("get_record", {**t, "id": "report/2"}),
        ("describe", {"tenant": "rotating"}),
    )  # fmt: skip
    _, _, put, first, rotated, second, old, key1, current = results[:9]
    retire_current, retired, unreadable, gone, still, described = results[9:]
    assert put["version"] == 1
    assert first["key_version"] == 1
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


def test_rejects_bad_arguments_and_unknown_tenants_with_typed_errors(stack: Stack) -> None:
    cases: list[tuple[str, Any, str]] = [
        ("get_key", {"tenant": "nobody", "name": "a"}, "TenantNotFoundError: tenant 'nobody'"),
        ("create_tenant", "acme", "arguments: expected a map with tenant, got str"),
        ("put_key", {"tenant": "x", "name": "a"}, "got missing ['material']"),
        ("get_key", {"tenant": "x", "name": "a", "extra": 1}, "unknown ['extra']"),
        ("put_key", {"tenant": "x", "name": "a", "material": "text"}, "material: expected bytes"),
        ("get_key", {"tenant": "x", "name": "a", "version": "1"}, "version: expected an integer"),
        ("create_tenant", {"tenant": "Upper"}, "PersistenceUsageError: tenant"),
    ]
    calls = [(method, arg) for method, arg, _ in cases]
    _, *results = _call(
        stack.image,
        stack.served[0],
        ("create_tenant", {"tenant": "small"}),
        ("put_key", {"tenant": "small", "name": "a", "material": b"short"}),
        *calls,
    )
    _, short, *rest = results
    assert isinstance(short, RPCError)
    assert "PersistenceUsageError: key material: expected 32 bytes, got 5" in short.remote_message
    for (_, _, expected), error in zip(cases, rest, strict=True):
        assert isinstance(error, RPCError), error
        assert error.code == "rejected"
        assert expected in error.remote_message


def test_no_plaintext_key_bytes_reach_the_record_store_database(stack: Stack) -> None:
    material = secrets.token_bytes(32)
    data = b"record plaintext " + secrets.token_hex(16).encode()
    t = {"tenant": "secretive", "name": "cards/pan"}
    results = _call(
        stack.image, stack.served[0],
        ("create_tenant", {"tenant": "secretive"}),
        ("put_key", {**t, "material": material}),
        ("rotate", t),
        ("get_key", t),
        ("put_record", {**t, "id": "r", "data": data}),
    )  # fmt: skip
    rotated_material = results[4]["material"]
    assert isinstance(rotated_material, bytes)
    assert len(rotated_material) == 32
    secrets_: list[bytes] = []
    for value in (material, rotated_material, data):
        secrets_ += [value, value.hex().encode(), value.hex().upper().encode()]
        secrets_ += [base64.b64encode(value), base64.urlsafe_b64encode(value)]
        secrets_ += [value[:16], value[16:]]
    files = [p for p in Path(stack.store_db).parent.iterdir() if p.name.startswith("records.db")]
    assert files  # the database and its WAL
    for path in files:
        stored = path.read_bytes()
        for secret in secrets_:
            assert secret not in stored, (path.name, secrets_.index(secret))
    # The records are there, sealed.
    with stack.store_client() as client:
        ids = [r.id for r in client.scan(f"{STORE_ID}/tenants/secretive/")]
    assert ids == [
        f"{STORE_ID}/tenants/secretive/keyring",
        f"{STORE_ID}/tenants/secretive/records/r",
    ]


def test_rejects_a_keyring_the_host_swapped_in_from_another_tenant(stack: Stack) -> None:
    material = secrets.token_bytes(32)
    served = stack.served[0]
    _call(
        stack.image, served,
        ("create_tenant", {"tenant": "victim"}),
        ("create_tenant", {"tenant": "attacker"}),
        ("put_key", {"tenant": "attacker", "name": "a", "material": material}),
    )  # fmt: skip
    with stack.store_client() as client:
        theirs = client.get(f"{STORE_ID}/tenants/attacker/keyring")
        victim = f"{STORE_ID}/tenants/victim/keyring"
        client.put(victim, theirs.data, client.get(victim).version)
    _, swapped = _call(stack.image, served, ("get_key", {"tenant": "victim", "name": "a"}))
    assert isinstance(swapped, RPCError)
    assert swapped.remote_message.startswith("RecordAuthenticationError: ")
    assert material.hex() not in swapped.remote_message


def test_refuses_to_serve_when_the_host_edited_the_kept_root_key_blob(stack: Stack) -> None:
    record_id = f"{STORE_ID}/root-key"
    with stack.store_client() as client:
        kept = client.get(record_id)
        edited = bytearray(kept.data)
        edited[len(edited) // 2] ^= 1
        version = client.put(record_id, bytes(edited), kept.version)
    try:
        served = stack.boot()
        status, refused = _call(
            stack.image, served, ("get_key", {"tenant": "acme", "name": "insights/app-usage"})
        )
    finally:
        with stack.store_client() as client:
            client.put(record_id, kept.data, version)
    assert status["state"] == "failed"
    assert "RootKeyError: root key: KMS Decrypt of the blob kept in" in status["reason"]
    assert "InvalidCiphertextException" in status["reason"]
    assert isinstance(refused, RPCError)
    assert "did not start: RootKeyError" in refused.remote_message
    stack.stop_enclave(served)


def test_up_runs_the_service_with_the_root_key_the_run_enclave_keeps(stack: Stack) -> None:
    material = secrets.token_bytes(32)
    _call(
        stack.image, stack.served[0],
        ("create_tenant", {"tenant": "via-up"}),
        ("put_key", {"tenant": "via-up", "name": "k", "material": material}),
    )  # fmt: skip
    assert stack.store is not None
    trust = stack.directory / "up-trust.json"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "enclave", "AWS_SECRET_ACCESS_KEY": "x"}
    process, addresses = start_cli(
        stack.background, "up", str(stack.image.path), "--listen", "127.0.0.1:0",
        "--config", str(stack.image.bundle(stack.config())), "--aws-credentials-env",
        "--egress-allow", f"127.0.0.1:{stack.kms_port}",
        "--egress-allow", stack.store.url.removeprefix("http://"),
        "--trust-out", str(trust),
        env=env,
    )  # fmt: skip

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        policy = ServicePolicy(services=frozenset({"persistence"}))
        url = f"tcp://{addresses['tcp']}"
        async with await connect(url, trust=ClientTrust.load(trust), policy=policy) as session:
            status = await _started(session)
            return status, await session.call("get_key", {"tenant": "via-up", "name": "k"})

    status, key = asyncio.run(scenario())
    assert status["state"] == "ready"
    assert status["root_key"] == "decrypted"
    assert key["material"] == material
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode == 0
