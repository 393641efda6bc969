"""Attested Decrypt on the real enclave path against a plain Decrypt, with the crypto inside.

Goal: inside a real (emulated) enclave, ``Decrypt`` with ``Recipient`` through
``app.context.kms`` has a p50 within 2x of a plain ``Decrypt`` made by the same enclave
over the same route, measured in the same run. The route is the one production uses:
enclave botocore -> loopback egress forwarder -> vsock -> ``hermetic proxy
--egress-allow`` -> local KMS (``hermetic kms serve``, its own process) -> back. The
timing is done inside the enclave (``bench/apps/kmsbench``: ``time.perf_counter`` around
each KMS call); only the figures come back over the attested session, so the Noise
channel and the client's RPC hops are not in them. The attested key's policy is pinned to
the image's PCR0 (``release_key_policy``); the plain key lets the enclave principal
Decrypt without conditions. Throughput uses ``CALLERS`` threads inside the enclave
sharing the one botocore client.

The attested path adds one NSM attestation (P-384 sign, by the launcher-served NSM; the
client reuses its per-boot document for up to 60 s), the server's document verification
(P-384 verify, chain cached), an RSA-OAEP encrypt on the server and an RSA-OAEP decrypt in
the client; those costs are measured alone too.

Context rows, not part of the goal: the same comparison from an in-process client talking
HTTP straight to the local KMS (no enclave, no proxy), with a row forcing a fresh NSM
document every call; and ``examples/vault`` ``unseal``/``seal`` RPCs over an attested
session (client -> proxy -> vsock -> enclave -> egress -> KMS -> back, plus AES-GCM),
which add the Noise channel and two proxy hops each way.

Every process (KMS server, enclaves, proxies) runs under a temporary
``HERMETIC_STATE_DIR`` and is stopped before ``main`` returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from bench.report import Goal, p50, print_goals, print_table, temporary_state_dir, time_per_call

GOAL = 2.0
CALLERS = 8
ROUNDS = 8
CALLS_PER_ROUND = 50
THROUGHPUT_CALLS = 240
ACCOUNT = "111122223333"
ENCLAVE_ROLE = f"arn:aws:iam::{ACCOUNT}:role/enclave"
REPO = Path(__file__).resolve().parents[1]
KMSBENCH = Path(__file__).resolve().parent / "apps" / "kmsbench"
VAULT = REPO / "examples" / "vault"
PCRS = {i: hashlib.sha384(f"bench-pcr{i}".encode()).digest() for i in (0, 1, 2)}


def main() -> list[Goal]:
    with temporary_state_dir() as tmp:
        return _run(tmp)


def _run(tmp: Path) -> list[Goal]:
    import boto3

    from hermetic.attestation import AttestationVerifier, Policy, TrustRoot
    from hermetic.kms.client import EnclaveKMSClient, KMSCredentials
    from hermetic.nsm import DevPKI, EmulatedNSM, NSMClient

    DevPKI().root(datetime.now(UTC))
    nsm = NSMClient(EmulatedNSM(PCRS))
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "hermetic", "kms", "serve", "--port", str(port),
         "--attestation-root", "dev"],
        env={**os.environ, "HERMETIC_STATE_DIR": str(tmp)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    kmsbench = _EnclaveUnderProxy(tmp / "kmsbench", KMSBENCH, port)
    vault = _EnclaveUnderProxy(tmp / "vault", VAULT, port)
    try:
        _wait_for(port, server)
        endpoint = f"http://127.0.0.1:{port}"

        def boto(who: str) -> Any:
            return boto3.session.Session(
                aws_access_key_id=who, aws_secret_access_key="x", region_name="us-east-1"
            ).client("kms", endpoint_url=endpoint)

        admin = boto("admin")

        # The goal's enclave: one key pinned to its PCR0, one the enclave may use plainly.
        keys: dict[str, str] = {}

        def kmsbench_config(pcr0: str) -> dict[str, Any]:
            attested = _release_policy(pcr0)
            attested["Statement"].append(_allow(ENCLAVE_ROLE, ["kms:Encrypt"], "EnclaveEncrypt"))
            plain = {
                "Statement": [
                    _allow(
                        ENCLAVE_ROLE,
                        ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey"],
                        "Enclave",
                    ),
                    _allow(f"arn:aws:iam::{ACCOUNT}:root", ["kms:*"], "KeyAdministration"),
                ]
            }
            keys["attested_key"] = _create_key(admin, attested)
            keys["plain_key"] = _create_key(admin, plain)
            return {"kmsbench": dict(keys)}

        kmsbench.start(kmsbench_config, "kmsbench")
        _check_pinned(boto("enclave"), keys["attested_key"])

        def in_enclave(attested: bool, n: int, concurrency: int, op: str) -> dict[str, Any]:
            args = {"n": n, "attested": attested, "concurrency": concurrency, "op": op}
            result: dict[str, Any] = kmsbench.session.call("run", args)
            assert len(result["durations"]) == n, result.keys()
            return result

        for attested in (True, False):  # warm up: connections, first NSM document
            in_enclave(attested, 10, 1, "decrypt")
            in_enclave(attested, 10, 1, "generate_data_key")

        # In-process context: the same comparison with no enclave and no proxy.
        key = admin.create_key(Policy=json.dumps(_in_process_policy()))["KeyMetadata"]["KeyId"]
        blob = admin.encrypt(KeyId=key, Plaintext=os.urandom(32))["CiphertextBlob"]
        plain = boto("plain")
        enclave = EnclaveKMSClient(
            nsm, KMSCredentials("enclave", "x"), region="us-east-1", endpoint_url=endpoint
        )
        fresh = EnclaveKMSClient(
            nsm, KMSCredentials("enclave", "x"), region="us-east-1", endpoint_url=endpoint,
            document_ttl=0,
        )  # fmt: skip
        assert enclave.decrypt(blob) == plain.decrypt(CiphertextBlob=blob)["Plaintext"]
        assert fresh.decrypt(blob) == enclave.decrypt(blob)

        def plain_decrypt() -> None:
            plain.decrypt(CiphertextBlob=blob)

        def attested_decrypt() -> None:
            enclave.decrypt(blob)

        paths: dict[str, Callable[[], object]] = {
            "plain": plain_decrypt,
            "attested": attested_decrypt,
            "fresh": lambda: fresh.decrypt(blob),
        }
        try:
            vault.start(
                lambda pcr0: {"vault": {"key_id": _create_key(admin, _release_policy(pcr0))}},
                "vault",
            )
            session = vault.session
            sealed = session.call("seal", "bench")
            assert session.call("unseal", sealed) == "bench"
            paths["vault unseal"] = lambda: session.call("unseal", sealed)
            paths["vault seal"] = lambda: session.call("seal", "bench")
        except Exception as exc:  # context only: reported rather than failing the bench
            print(f"vault rows skipped: {type(exc).__name__}: {exc}")
            vault.stop()

        # Alternate every path in short rounds: the machine is shared, and load that comes
        # and goes should hit every path alike.
        inside: dict[tuple[str, bool], list[float]] = {
            (op, attested): []
            for op in ("decrypt", "generate_data_key")
            for attested in (True, False)
        }
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for round_ in range(ROUNDS):
            for op, attested in inside:
                if op == "decrypt" or round_ % 2 == 0:
                    calls = CALLS_PER_ROUND if op == "decrypt" else CALLS_PER_ROUND // 2
                    inside[op, attested] += in_enclave(attested, calls, 1, op)["durations"]
            for name, fn in paths.items():
                samples[name] += time_per_call(fn, min_seconds=0.2, min_calls=20)
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(2):
            for attested in (True, False):
                run = in_enclave(attested, THROUGHPUT_CALLS, CALLERS, "decrypt")
                rates[attested].append(THROUGHPUT_CALLS / run["wall"])
        plain_rate = _throughput(plain_decrypt, CALLERS, 1.5)
        attested_rate = _throughput(attested_decrypt, CALLERS, 1.5)

        root = TrustRoot.dev()
        verifier = AttestationVerifier(root)
        recipient = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        spki = recipient.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        document = nsm.attest(public_key=spki)
        verifier.verify(document, Policy(allow_debug=True))
        oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
        wrapped = recipient.public_key().encrypt(os.urandom(32), oaep)
        p384 = ec.generate_private_key(ec.SECP384R1())
        message = os.urandom(4096)
        signature = p384.sign(message, ec.ECDSA(hashes.SHA384()))
        parts: dict[str, Callable[[], object]] = {
            "  NSM attest (emulated, in-process, P-384 sign)": lambda: nsm.attest(public_key=spki),
            "  verify document (warm chain)": lambda: verifier.verify(
                document, Policy(allow_debug=True)
            ),
            "  RSA-2048 OAEP encrypt (server)": lambda: recipient.public_key().encrypt(
                os.urandom(32), oaep
            ),
            "  RSA-2048 OAEP decrypt (client)": lambda: recipient.decrypt(wrapped, oaep),
            "  P-384 ECDSA sign": lambda: p384.sign(message, ec.ECDSA(hashes.SHA384())),
            "  P-384 ECDSA verify": lambda: p384.public_key().verify(
                signature, message, ec.ECDSA(hashes.SHA384())
            ),
        }
        part_p50 = {name: p50(time_per_call(fn, min_seconds=0.4)) for name, fn in parts.items()}
    finally:
        vault.stop()
        kmsbench.stop()
        server.terminate()
        server.wait(timeout=10)

    goal_plain = p50(inside["decrypt", False])
    goal_attested = p50(inside["decrypt", True])
    gdk_plain = p50(inside["generate_data_key", False])
    gdk_attested = p50(inside["generate_data_key", True])
    best = {attested: max(r) for attested, r in rates.items()}
    plain_p50, attested_p50, fresh_p50 = (p50(samples[n]) for n in ("plain", "attested", "fresh"))
    n_goal = len(inside["decrypt", True])
    rows: list[list[object]] = [
        ["IN ENCLAVE plain Decrypt (egress -> proxy -> KMS)", goal_plain * 1e3, 1.0,
         best[False], n_goal],
        ["IN ENCLAVE Decrypt with Recipient  <- goal", goal_attested * 1e3,
         goal_attested / goal_plain, best[True], n_goal],
        ["in enclave plain GenerateDataKey", gdk_plain * 1e3, gdk_plain / goal_plain, "",
         len(inside["generate_data_key", False])],
        ["in enclave GenerateDataKey with Recipient", gdk_attested * 1e3,
         gdk_attested / goal_plain, "", len(inside["generate_data_key", True])],
        ["in-process plain Decrypt (boto3 -> HTTP -> KMS)", plain_p50 * 1e3,
         plain_p50 / goal_plain, plain_rate, len(samples["plain"])],
        ["in-process Decrypt with Recipient", attested_p50 * 1e3, attested_p50 / goal_plain,
         attested_rate, len(samples["attested"])],
        ["  same, fresh NSM document every call", fresh_p50 * 1e3, fresh_p50 / goal_plain, "",
         len(samples["fresh"])],
    ]  # fmt: skip
    labels = {
        "vault unseal": "vault unseal RPC (client->proxy->enclave->KMS Decrypt)",
        "vault seal": "vault seal RPC (... KMS GenerateDataKey)",
    }
    for name, label in labels.items():
        if name in samples:
            value = p50(samples[name])
            rows.append([label, value * 1e3, value / goal_plain, "", len(samples[name])])
        else:
            rows.append([label, "not measured (see above)", "", "", ""])
    rows += [[name, s * 1e3, s / goal_plain, "", ""] for name, s in part_p50.items()]
    print(
        "local KMS in its own process on 127.0.0.1; IN ENCLAVE rows timed inside the kmsbench "
        "enclave around each KMS call (forwarder, vsock, proxy egress allowlist, KMS); "
        f"calls/s: {CALLERS} concurrent callers (in enclave: best of 2 runs of "
        f"{THROUGHPUT_CALLS} calls); x column relative to the in-enclave plain Decrypt"
    )
    print_table(
        ["path / operation", "p50 ms", "x plain", f"calls/s ({CALLERS} callers)", "samples"], rows
    )
    print(
        f"throughput in the enclave: {best[True]:.0f} calls/s attested vs {best[False]:.0f}"
        f" plain ({best[True] / best[False]:.2f}x)"
    )
    goals = [
        Goal("in-enclave Decrypt with Recipient / plain Decrypt, p50",
             goal_attested / goal_plain, "<=", GOAL),
    ]  # fmt: skip
    print_goals(goals)
    return goals


def _allow(principal: str, actions: list[str], sid: str) -> dict[str, Any]:
    return {"Sid": sid, "Effect": "Allow", "Principal": {"AWS": principal}, "Action": actions,
            "Resource": "*"}  # fmt: skip


def _release_policy(pcr0: str) -> dict[str, Any]:
    from hermetic.kms.keypolicy import ReleaseReference, release_key_policy

    return release_key_policy(ReleaseReference({0: pcr0}), account=ACCOUNT, principal=ENCLAVE_ROLE)


def _check_pinned(enclave_principal: Any, key_id: str) -> None:
    """The attested row's key must refuse its own principal without attestation."""
    from botocore.exceptions import ClientError

    blob = enclave_principal.encrypt(KeyId=key_id, Plaintext=os.urandom(32))["CiphertextBlob"]
    try:
        enclave_principal.decrypt(CiphertextBlob=blob, KeyId=key_id)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "AccessDeniedException":
            return
        raise
    raise RuntimeError("attested key: plain Decrypt by the enclave principal was allowed")


def _create_key(admin: Any, policy: dict[str, Any]) -> str:
    return str(admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"])


def _in_process_policy() -> dict[str, Any]:
    account = f"arn:aws:iam::{ACCOUNT}"
    return {
        "Statement": [
            {"Sid": "admin", "Effect": "Allow", "Principal": {"AWS": f"{account}:user/admin"},
             "Action": "kms:*", "Resource": "*"},
            {"Sid": "plain", "Effect": "Allow", "Principal": {"AWS": f"{account}:user/plain"},
             "Action": "kms:Decrypt", "Resource": "*"},
            {"Sid": "enclave", "Effect": "Allow", "Principal": {"AWS": ENCLAVE_ROLE},
             "Action": "kms:Decrypt", "Resource": "*",
             "Condition": {"StringEqualsIgnoreCase": {
                 "kms:RecipientAttestation:ImageSha384": PCRS[0].hex()}}},
        ]
    }  # fmt: skip


def _throughput(fn: Callable[[], None], callers: int, seconds: float) -> float:
    done = [0] * callers
    deadline = time.perf_counter() + seconds

    def worker(n: int) -> None:
        while time.perf_counter() < deadline:
            fn()
            done[n] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - start)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("hermetic kms serve exited during startup")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("hermetic kms serve did not start")


class _EnclaveUnderProxy:
    """An app built into an image and run as an emulated enclave behind its own proxy.

    The app is copied with a fresh operator key (so the bench can sign its runtime config),
    endorsed in a dev log, run with ``--aws-credentials-env`` and a config whose ``kms``
    section points at the local KMS, and reached through ``hermetic proxy --egress-allow``
    over an attested session.
    """

    def __init__(self, tmp: Path, source: Path, kms_port: int) -> None:
        self.tmp = tmp
        self.source = source
        self.kms_port = kms_port
        self.proxy: subprocess.Popen[str] | None = None
        self.enclave_id: str | None = None
        self.session: Any = None

    def start(self, app_config: Callable[[str], dict[str, Any]], service: str) -> None:
        """``app_config(pcr0)`` gives the app's config sections (it may create KMS keys)."""
        from hermetic.client import ClientTrust, ServicePolicy, connect_sync
        from hermetic.enclave.config import sign_config
        from hermetic.image import build_image
        from hermetic.launcher.devrelease import DevLog

        self.tmp.mkdir(parents=True)
        app = self.tmp / "app"
        shutil.copytree(self.source, app)
        operator = ed25519.Ed25519PrivateKey.generate()
        (app / "operator.pub.pem").write_bytes(
            operator.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        built = build_image(app, self.tmp / "app.img")
        dev_log = DevLog(self.tmp / "dev-log")
        endorsement = self.tmp / "endorsement.json"
        endorsement.write_bytes(dev_log.publish(built.measurements).dumps())
        config = {
            "kms": {"endpoint": f"127.0.0.1:{self.kms_port}", "region": "us-east-1",
                    "scheme": "http"},
            **app_config(built.measurements.pcr0.hex()),
        }  # fmt: skip
        bundle = self.tmp / "config.bundle"
        bundle.write_bytes(sign_config(json.dumps(config).encode(), operator))
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "enclave", "AWS_SECRET_ACCESS_KEY": "x"}
        done = subprocess.run(
            [sys.executable, "-m", "hermetic", "run", str(built.path), "--config", str(bundle),
             "--endorsement", str(endorsement), "--aws-credentials-env"],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"hermetic run failed: {done.stderr.strip()}")
        self.enclave_id = json.loads(done.stdout)["EnclaveID"]
        self.proxy = subprocess.Popen(
            [sys.executable, "-m", "hermetic", "proxy", "--enclave", str(self.enclave_id),
             "--listen", "127.0.0.1:0", "--egress-allow", f"127.0.0.1:{self.kms_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.proxy.stdout is not None
        text = ""
        while True:
            line = self.proxy.stdout.readline()
            if not line:
                raise RuntimeError("hermetic proxy exited during startup")
            text += line
            try:
                addresses = json.loads(text)
                break
            except ValueError:
                continue
        trust = dev_log.write_trust(self.tmp / "trust.json")
        assert isinstance(trust, ClientTrust)
        self.session = connect_sync(
            f"tcp://{addresses['tcp']}",
            trust=trust,
            policy=ServicePolicy(services=frozenset({service})),
        )

    def stop(self) -> None:
        try:
            if self.session is not None:
                self.session.close()
        finally:
            self.session = None
            try:
                if self.proxy is not None:
                    self.proxy.terminate()
                    try:
                        self.proxy.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        self.proxy.kill()
                        self.proxy.wait(timeout=5)
            finally:
                self.proxy = None
                if self.enclave_id is not None:
                    from hermetic.launcher import emulated

                    emulated.terminate(self.enclave_id)
                    self.enclave_id = None
