"""The persistence service (issue 10 acceptance 7): get_key against the channel's own cost,
KMS calls in steady state, sealed writes against unsealed writes to the same store.

The stack is the real one the tests start (``tests/test_persistence_enclave.py``): a
``hermetic store serve`` process (SQLite), the local KMS, ``services/persistence`` built
into an image with a generated operator key and run as a sandboxed (emulated) enclave by
``hermetic run --aws-credentials-env``, its XX port 5001 relayed by ``hermetic proxy`` whose
egress allows exactly the KMS, the store and the log the store state is anchored in
(``hermetic log serve`` with a ``hermetic log witness``; deferred mode), and the access
policy logged in a dev log and carried in the signed runtime config. The key's policy is
pinned to the image's PCR0 (``release_key_policy``). The caller is this process, attesting a
logged ``reporting`` release with an emulated NSM of the dev PKI over Noise XX, as a
reporting enclave would; a tenant admin signs ``create_tenant``/``put_key``/``enable`` over
the NX port 5000 (vsock from the parent).

**get_key against a constant.** The peer is ``bench/apps/constkey``: an enclave with the
same manifest shape, the same XX caller verification and the same worker-thread hop,
behind its own ``hermetic proxy``, whose ``get_key`` returns a constant. The two are
timed in alternating rounds over one warm session each, so load on this shared machine
hits both. Throughput: ``IN_FLIGHT`` calls in flight on the one session (the channel
multiplexes RPCs), also alternated.

What get_key costs beyond the channel is the work the issue asks of it: the admin record
read (features enabled), the keyring read, an AES-GCM unwrap, and the audit append that must
be in the store before the key is returned (entry, then head; each write first moves the
anchored state record, with a signed state statement): three reads and four compare-and-set
writes, each with a SQLite commit. Against the constant call alone that is a ratio of 50-80x
here, which says only that seven store round trips cost more than one empty RPC. So the goal
compares get_key with what an experienced user expects it to cost: the constant call plus
that same store work, done from the host to the same store in the same rounds
(``_HostStoreWork``). Inside the enclave each of the seven round trips also crosses the
loopback forwarder, the vsock relay and the proxy's egress, three relays the host's round
trip does not; up to as much again as the store work itself is expected for those, plus a
little for the in-memory work (policy check, unwrap, two state-statement signatures, the
anchored Merkle tree). Hence ``GET_KEY_GOAL`` = 2.5x of (constant + store work): a scan of
the trail or a doubling of the store work on the fetch path pushes it over (a KMS call there
is the next goal's to catch; one extra round trip is not caught: this goal is about the kind
of work, not every millisecond). Measured before the goal was set: 1.40x, 1.73x, 1.75x; in
nine runs on this shared 2-core machine 1.40-2.02x (a margin of 19-44%).

Throughput is printed, not a goal: with ``IN_FLIGHT`` calls in flight on one tenant's key
it is lower than one caller's sequential rate, because every fetch appends to the same
audit trail and concurrent appends contend on its head (compare-and-set, retried).

**KMS calls.** The local KMS runs in this process, not as ``hermetic kms serve``, because
that server logs only attested and refused requests and has no metrics: here
(``KMSService``, the code ``hermetic kms serve`` runs, under uvicorn on a thread) with
``handle`` counting every operation that reaches it, whoever calls; counts are taken after
boot and after every key fetch of the run, and the difference is scaled to 10,000 fetches (a
run makes about 400: 10,000 fetches at get_key's rate would not fit the module's minute).
Goal: zero (the root key is obtained once at boot, tenant keys are derived, named keys
unwrapped in memory).

**Sealed writes.** ``PersistenceService.put_record`` (keyring read, record version read,
AES-256-GCM seal, compare-and-set write) in this process on a ``RecordStoreClient`` to the
same ``hermetic store serve``, against unsealed writes of the same sizes by the same kind of
client with the same compare-and-set (version read, then write at that version), one of each
in turn (writes per second is 1 / p50 of each write's time). The service code is run
in-process rather than through the enclave's ``put_record`` RPC because that RPC also audits
(two more store writes) and crosses the channel: the figure the issue asks for is the cost
of sealing on the write path, not of the audit trail. Goal: the worst size's ratio at least
0.5x (the issue's). The sealed path makes three store round trips to the unsealed path's two
(it reads the keyring first), so about 0.67x is what round trips alone allow; sealing itself
is a few microseconds (measured 0.58-0.65x in nine runs). The store here is the plain
client, not the anchored store the enclave wraps it in: anchoring adds a signed state-record
write to every write (rollback detection, item 5, not sealing), which would put the
enclave's path at four round trips to two."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from bench.report import Goal, p50, print_goals, print_table, temporary_state_dir

GET_KEY_GOAL = 2.5
WRITE_GOAL = 0.5
ROUNDS = 6
CALLS_PER_ROUND = 40
IN_FLIGHT = 8
THROUGHPUT_CALLS = 24
WRITE_SIZES = (256, 4096, 65536)
WRITES = 150
ACCOUNT = "111122223333"
ENCLAVE_ROLE = f"arn:aws:iam::{ACCOUNT}:role/enclave"
STORE_ID = "store-bench"
TENANT = "acme"
KEY_NAME = "insights/app-usage"
REPO = Path(__file__).resolve().parents[1]
PERSISTENCE = REPO / "services" / "persistence"
CONSTKEY = Path(__file__).resolve().parent / "apps" / "constkey"
REPORTING = {n: hashlib.sha384(f"bench reporting {n}".encode()).digest() for n in (0, 1, 2)}
ACCESS_POLICY = {
    "type": "hermetic.persistence-access/v1",
    "store_id": STORE_ID,
    "rules": [{"feature": "insights", "services": ["reporting"], "keys": ["insights/*"]}],
}


def main() -> list[Goal]:
    with temporary_state_dir() as tmp:
        return _run(tmp)


def _run(tmp: Path) -> list[Goal]:
    from hermetic.nsm import DevPKI

    DevPKI().root(datetime.now(UTC))  # the root the KMS pins and the launcher's NSM uses
    kms = _start_kms(tmp)
    store = _StoreServer(tmp / "records.db")
    anchor_log = _AnchorLog(tmp / "anchor-log")
    enclaves: list[_Enclave] = []
    runner = asyncio.Runner()
    try:
        store.start()
        anchor_log.start()
        log = _DevLog(tmp)
        persistence = _Enclave(tmp / "persistence", PERSISTENCE, log)
        constkey = _Enclave(tmp / "constkey", CONSTKEY, log)
        key_id = _create_key(kms.endpoint, persistence.pcr0)
        policy = log.policy_endorsement()
        trust = log.trust()
        enclaves += [persistence, constkey]
        persistence.start(
            {
                "kms": {"endpoint": f"127.0.0.1:{kms.port}", "region": "us-east-1",
                        "scheme": "http"},
                "persistence": {"store": store.hostport, "store_id": STORE_ID, "key_id": key_id,
                                "access_policy": ACCESS_POLICY,
                                "access_policy_endorsement": policy, "peers": trust,
                                "anchor": anchor_log.config()},
            },
            egress=(f"127.0.0.1:{kms.port}", store.hostport, anchor_log.hostport),
            aws=True,
        )  # fmt: skip
        constkey.start({"constkey": {"peers": trust}}, egress=(), aws=False)
        material = runner.run(_provision(persistence, log))
        fetch = runner.run(_service_session(persistence, log, "persistence"))
        const = runner.run(_service_session(constkey, log, "constkey"))
        arg = {"tenant": TENANT, "name": KEY_NAME}
        first = runner.run(fetch.call("get_key", arg))
        assert first["material"] == material, "get_key returned other material"
        assert runner.run(const.call("get_key", arg))["version"] == 1
        calls_after_boot = kms.service.total()
        fetches = 1

        latency: dict[str, list[float]] = {"get_key": [], "constant": [], "store": []}
        rates: dict[str, list[float]] = {"get_key": [], "constant": []}
        sessions = {"get_key": fetch, "constant": const}
        host_store = _HostStoreWork(store.url)
        try:
            for _ in range(ROUNDS):
                for name, session in sessions.items():
                    latency[name] += runner.run(_sequential(session, arg, CALLS_PER_ROUND))
                    rates[name].append(runner.run(_in_flight(session, arg, THROUGHPUT_CALLS)))
                latency["store"] += [host_store.once() for _ in range(CALLS_PER_ROUND)]
        finally:
            host_store.close()
        fetches += ROUNDS * (CALLS_PER_ROUND + THROUGHPUT_CALLS)
        steady_kms = kms.service.total() - calls_after_boot
        boot_ops = dict(kms.service.operations())
        runner.run(fetch.close())
        runner.run(const.close())

        writes = _writes(store.url)
    finally:
        runner.close()
        for enclave in enclaves:
            enclave.stop()
        store.stop()
        anchor_log.stop()
        kms.stop()

    get_p50, const_p50 = p50(latency["get_key"]), p50(latency["constant"])
    store_p50 = p50(latency["store"])
    expected = const_p50 + store_p50
    get_rate, const_rate = p50(rates["get_key"]), p50(rates["constant"])
    per_10k = steady_kms * 10_000 / fetches
    rows: list[list[object]] = [
        ["get_key (persistence enclave, XX)", get_p50 * 1e3, get_p50 / const_p50, get_rate,
         len(latency["get_key"])],
        ["get_key returning a constant (constkey enclave, XX)", const_p50 * 1e3, 1.0,
         const_rate, len(latency["constant"])],
        ["get_key's store work from the host (3 reads, 4 CAS writes)", store_p50 * 1e3,
         store_p50 / const_p50, "", len(latency["store"])],
    ]  # fmt: skip
    print(
        "one warm attested XX session per service, through hermetic proxy; p50 over "
        f"{ROUNDS} alternating rounds of {CALLS_PER_ROUND} sequential calls; calls/s with "
        f"{IN_FLIGHT} calls in flight on the session (median of {ROUNDS} runs of "
        f"{THROUGHPUT_CALLS})"
    )
    print_table(["call", "p50 ms", "x constant", f"calls/s ({IN_FLIGHT} in flight)",
                 "samples"], rows)  # fmt: skip
    print(
        f"\nget_key / constant: p50 {get_p50 / const_p50:.1f}x, throughput 1/"
        f"{const_rate / get_rate:.0f}; get_key / (constant + its store work from the host):"
        f" p50 {get_p50 / expected:.2f}x; one caller's sequential calls/s: get_key"
        f" {1 / get_p50:.0f}, constant {1 / const_p50:.0f}"
    )
    print(
        f"KMS operations at the local KMS: {boot_ops} in all; {steady_kms} during {fetches:,}"
        f" key fetches after boot ({per_10k:.1f} per 10,000)"
    )
    print()
    print_table(
        ["record size", "sealed put_record/s", "unsealed CAS put/s", "x unsealed", "writes"],
        [[f"{size:,} B", s, u, s / u, n] for size, (s, u, n) in writes.items()],
    )
    worst = min(s / u for s, u, _ in writes.values())
    goals = [
        Goal("get_key p50 / (constant get_key p50 + its store work p50)",
             get_p50 / expected, "<=", GET_KEY_GOAL),
        Goal("KMS calls per 10,000 key fetches (steady state)", per_10k, "<=", 0.0,
             unit="calls"),
        Goal("sealed / unsealed writes per second (worst size)", worst, ">=", WRITE_GOAL),
    ]  # fmt: skip
    print_goals(goals)
    return goals


# --- timing ----------------------------------------------------------------------------


async def _sequential(session: Any, arg: Mapping[str, Any], n: int) -> list[float]:
    """Each call's duration (s), one after the other on ``session``."""
    durations = []
    for _ in range(n):
        start = time.perf_counter()
        await session.call("get_key", arg)
        durations.append(time.perf_counter() - start)
    return durations


async def _in_flight(session: Any, arg: Mapping[str, Any], n: int) -> float:
    """Calls per second for ``n`` calls with ``IN_FLIGHT`` of them in flight at once."""
    remaining = [n]

    async def caller() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            await session.call("get_key", arg)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
    return n / (time.perf_counter() - start)


def _writes(url: str) -> dict[int, tuple[float, float, int]]:
    """Sealed (``PersistenceService.put_record``) and unsealed compare-and-set writes per
    second, by size: ``{size: (sealed/s, unsealed/s, writes of each)}``."""
    from hermetic.errors import RecordNotFoundError
    from hermetic.persistence.keys import RootKey
    from hermetic.persistence.service import PersistenceService, PersistenceSettings, RootKeyOrigin
    from hermetic.store.client import RecordStoreClient

    sealed_client, plain_client = RecordStoreClient(url), RecordStoreClient(url)
    try:
        settings = PersistenceSettings("store-writes", "not-used")
        service = PersistenceService(
            RootKey(os.urandom(32)), sealed_client, settings, RootKeyOrigin("generated", 1)
        )
        service.create_tenant(TENANT)
        service.put_key(TENANT, KEY_NAME, os.urandom(32))
        ids = [f"record-{i}" for i in range(8)]

        def sealed(data: bytes, n: int) -> None:
            service.put_record(TENANT, KEY_NAME, ids[n % len(ids)], data)

        def unsealed(data: bytes, n: int) -> None:
            record_id = f"plain/{len(data)}/{ids[n % len(ids)]}"
            try:
                expected: int | None = plain_client.get(record_id).version
            except RecordNotFoundError:
                expected = None
            plain_client.put(record_id, data, expected)

        paths: dict[str, Callable[[bytes, int], None]] = {"sealed": sealed, "unsealed": unsealed}
        durations: dict[tuple[int, str], list[float]] = {}
        for size in WRITE_SIZES:
            data = os.urandom(size)
            for fn in paths.values():  # the records exist before timing (all updates)
                for n in range(len(ids)):
                    fn(data, n)
            for n in range(WRITES):  # one of each in turn: a burst of load hits both
                for name, fn in paths.items():
                    start = time.perf_counter()
                    fn(data, n)
                    durations.setdefault((size, name), []).append(time.perf_counter() - start)
        return {
            size: (1 / p50(durations[size, "sealed"]), 1 / p50(durations[size, "unsealed"]),
                   WRITES)
            for size in WRITE_SIZES
        }  # fmt: skip
    finally:
        sealed_client.close()
        plain_client.close()


class _HostStoreWork:
    """The store work one get_key must do, from the host to the same store: three reads
    (admin record, keyring, audit head) and four compare-and-set writes (the audit entry and
    the head, each after the anchored state record), of records the size of those, under
    ids outside the service's store id so the enclave's anchored state is not touched."""

    def __init__(self, url: str) -> None:
        from hermetic.store.client import RecordStoreClient

        self.client = RecordStoreClient(url)
        self.versions: dict[str, int] = {}
        for name in ("admin", "keyring", "head", "state", "entry"):
            self.versions[name] = self.client.put(f"host-work/{name}", os.urandom(256), None)

    def once(self) -> float:
        start = time.perf_counter()
        for name in ("admin", "keyring", "head"):
            self.client.get(f"host-work/{name}")
        for name in ("state", "entry", "state", "head"):
            record = f"host-work/{name}"
            self.versions[name] = self.client.put(record, os.urandom(256), self.versions[name])
        return time.perf_counter() - start

    def close(self) -> None:
        self.client.close()


# --- the stack ---------------------------------------------------------------------------


def _counting_kms_class() -> type[Any]:
    from hermetic.kms.server import KMSService

    class CountingKMS(KMSService):
        """The local KMS, counting every operation that reaches it (whoever calls)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._counted: Counter[str] = Counter()
            self._count_lock = threading.Lock()

        def handle(self, operation: str, request: Mapping[str, Any], caller: Any) -> Any:
            with self._count_lock:
                self._counted[operation] += 1
            return super().handle(operation, request, caller)

        def total(self) -> int:
            with self._count_lock:
                return sum(self._counted.values())

        def operations(self) -> Counter[str]:
            with self._count_lock:
                return Counter(self._counted)

    return CountingKMS


def _start_kms(tmp: Path) -> Any:
    from hermetic.kms.server import AttestationEvidenceVerifier, ServerThread
    from hermetic.kms.store import KeyStore
    from hermetic.nsm import DevPKI

    verifier = AttestationEvidenceVerifier(
        DevPKI().trust_root(datetime.now(UTC)), max_age=timedelta(seconds=300)
    )
    store = KeyStore.open(str(tmp / "kms" / "kms.sqlite3"))
    service = _counting_kms_class()(store, verifier, account=ACCOUNT, region="us-east-1")
    return ServerThread(service).start()


def _create_key(endpoint: str, pcr0: str) -> str:
    import boto3

    from hermetic.kms.keypolicy import ReleaseReference, release_key_policy

    policy = release_key_policy(ReleaseReference({0: pcr0}), account=ACCOUNT,
                                principal=ENCLAVE_ROLE)  # fmt: skip
    admin = boto3.session.Session(
        aws_access_key_id="admin", aws_secret_access_key="x", region_name="us-east-1"
    ).client("kms", endpoint_url=endpoint)
    return str(admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"])


@dataclass
class _StoreServer:
    """``hermetic store serve --listen 127.0.0.1:0`` on a SQLite file."""

    db: Path
    process: subprocess.Popen[str] | None = None
    url: str = ""

    @property
    def hostport(self) -> str:
        return self.url.removeprefix("http://")

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hermetic", "store", "serve", "--db", str(self.db),
             "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.url = str(_read_json(self.process, "store serve")["url"])

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


class _AnchorLog:
    """The log the store state is anchored in: ``hermetic log serve`` with one ``hermetic log
    witness`` cosigning every 0.2 s, and a first witnessed checkpoint before the boot."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.hostport = f"127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen[str]] = []
        self.vkey = ""
        self.witness_vkey = ""

    def start(self) -> None:
        from hermetic.translog.client import LogClient
        from hermetic.translog.note import parse_vkey

        self.directory.mkdir(parents=True)
        origin = "bench.test/anchor-log"
        key, witness_key = self.directory / "log.skey", self.directory / "witness.skey"
        self.vkey = _cli("log", "key", "--out", str(key), "--name", origin)
        self.witness_vkey = _cli(
            "log", "witness-key", "--out", str(witness_key), "--name", "w1.bench.test"
        )
        url = f"http://{self.hostport}"
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "hermetic", "log", "serve", "--db",
             str(self.directory / "log.db"), "--listen", self.hostport, "--key", str(key),
             "--origin", origin, "--witness", self.witness_vkey],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        ))  # fmt: skip
        _wait_for_port(self.port, self.processes[0], "hermetic log serve")
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "hermetic", "log", "witness", "--log", url,
             "--log-key", self.vkey, "--key", str(witness_key),
             "--state", str(self.directory / "witness.json"), "--interval", "0.2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        ))  # fmt: skip
        with LogClient(url, parse_vkey(self.vkey), [parse_vkey(self.witness_vkey)], 1) as log:
            log.add(b"bench log started")
            deadline = time.monotonic() + 90
            while log.witnessed_checkpoint(1) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("no witnessed checkpoint after 90 s")
                time.sleep(0.1)

    def config(self) -> dict[str, Any]:
        """The ``persistence.anchor`` section (deferred mode, the default)."""
        return {"log": self.hostport, "log_key": self.vkey, "witnesses": [self.witness_vkey],
                "threshold": 1, "max_age": 300, "mode": "deferred"}  # fmt: skip

    def stop(self) -> None:
        for process in reversed(self.processes):
            _stop(process)
        self.processes.clear()


class _DevLog:
    """One dev log for both images, the access policy statement and the caller's release."""

    def __init__(self, tmp: Path) -> None:
        from hermetic.launcher.devrelease import DevLog

        self.directory = tmp
        self.log = DevLog(tmp / "dev-log")
        self.operator = ed25519.Ed25519PrivateKey.generate()
        self.caller = self.log.publish(_reporting_measurements())

    def policy_endorsement(self) -> dict[str, Any]:
        from hermetic.persistence.policy import AccessPolicy
        from hermetic.translog.release import PERSISTENCE_POLICY_V1, PolicyStatement, utc_timestamp

        digest = AccessPolicy.from_json(ACCESS_POLICY).digest.hex()
        statement = PolicyStatement(
            PERSISTENCE_POLICY_V1, f"persistence/{STORE_ID}", digest, "1", utc_timestamp()
        )
        endorsement: dict[str, Any] = self.log.publish_statement(statement).to_json()
        return endorsement

    def trust(self) -> dict[str, Any]:
        path = self.directory / "trust.json"
        self.log.write_trust(path)
        trust: dict[str, Any] = json.loads(path.read_text())
        return trust

    def client_trust(self) -> Any:
        from hermetic.client import ClientTrust

        return ClientTrust.from_json(self.trust())


def _reporting_measurements() -> Any:
    from hermetic.image.pcrs import Measurements

    return Measurements(
        "hermetic", REPORTING[0], REPORTING[1], REPORTING[2], None, "reporting", "1.0.0"
    )


class _Enclave:
    """An app copied with the dev log's operator key, built, endorsed, run and proxied."""

    def __init__(self, directory: Path, source: Path, log: _DevLog) -> None:
        from hermetic.image import build_image

        self.directory = directory
        self.log = log
        directory.mkdir(parents=True)
        app = directory / source.name
        shutil.copytree(source, app)
        (app / "operator.pub.pem").write_bytes(
            log.operator.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        built = build_image(app, directory / f"{source.name}.img")
        self.image = built.path
        self.pcr0 = built.measurements.pcr0.hex()
        self.endorsement = directory / "endorsement.json"
        self.endorsement.write_bytes(log.log.publish(built.measurements).dumps())
        self.enclave_id: str | None = None
        self.cid = 0
        self.proxy: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, config: dict[str, Any], *, egress: tuple[str, ...], aws: bool) -> None:
        from hermetic.enclave.config import sign_config

        bundle = self.directory / "config.bundle"
        bundle.write_bytes(sign_config(json.dumps(config).encode(), self.log.operator))
        env = dict(os.environ)
        extra: list[str] = []
        if aws:
            env.update({"AWS_ACCESS_KEY_ID": "enclave", "AWS_SECRET_ACCESS_KEY": "x"})
            extra = ["--aws-credentials-env"]
        done = subprocess.run(
            [sys.executable, "-m", "hermetic", "run", str(self.image), "--config", str(bundle),
             "--endorsement", str(self.endorsement), *extra],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"hermetic run failed: {done.stderr.strip()}")
        record = json.loads(done.stdout)
        self.enclave_id, self.cid = str(record["EnclaveID"]), int(record["EnclaveCID"])
        allow = [arg for address in egress for arg in ("--egress-allow", address)]
        self.proxy = subprocess.Popen(
            [sys.executable, "-m", "hermetic", "proxy", "--enclave", self.enclave_id,
             "--port", "5001", "--listen", "127.0.0.1:0", *allow],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.url = f"tcp://{_read_json(self.proxy, 'hermetic proxy')['tcp']}"

    def stop(self) -> None:
        try:
            if self.proxy is not None:
                _stop(self.proxy)
        finally:
            self.proxy = None
            if self.enclave_id is not None:
                from hermetic.launcher import emulated

                emulated.terminate(self.enclave_id)
                self.enclave_id = None


async def _service_session(enclave: _Enclave, log: _DevLog, service: str) -> Any:
    """A ``reporting`` release's XX session to the enclave's port 5001 through its proxy."""
    from hermetic.channel.noise import XX, StaticKeypair
    from hermetic.client import ServicePolicy, connect
    from hermetic.evidence import make_evidence_provider
    from hermetic.nsm import DevPKI, EmulatedNSM, NSMClient

    nsm = NSMClient(EmulatedNSM(REPORTING, pki=DevPKI()))
    return await connect(
        enclave.url, trust=log.client_trust(),
        policy=ServicePolicy(services=frozenset({service})), protocol_name=XX,
        static=StaticKeypair.generate(), make_evidence=make_evidence_provider(
            nsm, log.caller, None), timeout=60,
    )  # fmt: skip


async def _provision(persistence: _Enclave, log: _DevLog) -> bytes:
    """As the tenant's admin over NX (port 5000, vsock): wait for boot, create the tenant,
    put its key and enable the feature the policy admits ``reporting`` for."""
    from hermetic.client import ServicePolicy, connect
    from hermetic.persistence.admin import AdminRequest, admin_public_key

    admin = ed25519.Ed25519PrivateKey.generate()
    material = os.urandom(32)
    session = await connect(
        f"vsock://{persistence.cid}:5000", trust=log.client_trust(),
        policy=ServicePolicy(services=frozenset({"persistence"})), timeout=60,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while (status := await session.call("status"))["state"] == "starting":
            if time.monotonic() > deadline:
                raise RuntimeError("persistence enclave still starting after 120 s")
            await asyncio.sleep(0.1)
        if status["state"] != "ready":
            raise RuntimeError(f"persistence enclave did not boot: {status}")

        def signed(counter: int, operation: str, **fields: Any) -> dict[str, Any]:
            request = AdminRequest(operation, STORE_ID, TENANT, counter, **fields)
            return {"tenant": TENANT, "counter": counter, "signature": request.sign(admin)}

        public = admin_public_key(admin)
        digest = AdminRequest.material_digest_of(material)
        create = {**signed(1, "create_tenant", admin_key=public), "admin_key": public}
        await session.call("create_tenant", create)
        put = signed(2, "put_key", name=KEY_NAME, material_digest=digest)
        await session.call("put_key", {**put, "name": KEY_NAME, "material": material})
        enable = signed(3, "enable", feature="insights")
        await session.call("enable", {**enable, "feature": "insights"})
    finally:
        await session.close()
    return material


def _read_json(process: subprocess.Popen[str], what: str) -> dict[str, Any]:
    """The JSON object a CLI prints first (its addresses), read line by line."""
    assert process.stdout is not None
    text = ""
    while True:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"{what} exited during startup")
        text += line
        try:
            value: dict[str, Any] = json.loads(text)
            return value
        except ValueError:
            continue


def _cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "hermetic", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"hermetic {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited during startup")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
