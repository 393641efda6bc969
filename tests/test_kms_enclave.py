"""KMS key release to a real (emulated) enclave, through the proxy's egress.

Everything here is a real process driven through the CLI: ``hermetic kms serve`` (dev
attestation root), ``hermetic build``/``image measure``/``kms policy``, ``hermetic run``
of ``examples/vault`` with a signed config and forwarded credentials, and ``hermetic
proxy`` with ``--egress-allow`` for the KMS. The attestation documents KMS checks come
from the launcher-served NSM of that enclave, so their PCRs are the image's measured
ones; KMS decides on them, and its log says so.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric import ed25519

from apps.probe import harness
from apps.probe.harness import (
    OperatorImage,
    build_operator_image,
    hermetic,
    start_cli,
    stop_all,
)
from helpers import free_port, state_files, wait_port
from hermetic.client import AttestedSession, ClientTrust, ServicePolicy, connect
from hermetic.errors import RPCError
from hermetic.launcher import records
from hermetic.launcher.devrelease import DevLog
from hermetic.paths import state_dir

pytestmark = pytest.mark.timeout(180)
VAULT = Path(__file__).resolve().parents[1] / "examples" / "vault"
REGION = "us-east-1"
ENCLAVE_ROLE = "arn:aws:iam::111122223333:role/enclave"
ADMIN_ENV = {"AWS_ACCESS_KEY_ID": "admin", "AWS_SECRET_ACCESS_KEY": "dummy-admin-secret"}


@dataclass(frozen=True)
class KMSServer:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text()

    def boto(self, access_key_id: str, secret: str) -> Any:
        return boto3.session.Session(
            aws_access_key_id=access_key_id, aws_secret_access_key=secret, region_name=REGION
        ).client("kms", endpoint_url=self.endpoint)


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_SESSION_TOKEN": self.session_token,
        }


VaultImage = OperatorImage


def _build_vault(
    directory: Path, operator: ed25519.Ed25519PrivateKey, change: str = ""
) -> VaultImage:
    """``hermetic build`` a copy of examples/vault; PCR0 from ``hermetic image measure``."""
    return build_operator_image(VAULT, directory, operator, "vault_service.py", change)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kms-enclave")


@pytest.fixture(scope="module")
def module_state(work: Path) -> Iterator[Path]:
    """One state directory for the module (the per-test one would lose the KMS and images)."""
    with harness.module_state(work / "state") as state:
        yield state


@pytest.fixture(autouse=True)
def _use_module_state(module_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMETIC_STATE_DIR", str(module_state))


@pytest.fixture(scope="module")
def kms(work: Path, module_state: Path) -> Iterator[KMSServer]:
    port = free_port()
    log = work / "kms.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "hermetic", "kms", "serve", "--port", str(port),
             "--db", str(work / "kms" / "kms.sqlite3")],
            stdout=out, stderr=out, env=os.environ.copy(),
        )  # fmt: skip
    try:
        wait_port(port, process)
        yield KMSServer(process, port, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def credentials() -> Credentials:
    # The access key id is the policy principal (role/enclave); the secret and token are
    # recognisable so that tests can look for them anywhere they must not be.
    return Credentials(
        "enclave", "SECRET-" + secrets.token_hex(12), "TOKEN-" + secrets.token_hex(12)
    )


@pytest.fixture(scope="module")
def vault(work: Path, module_state: Path) -> VaultImage:
    directory = work / "good"
    directory.mkdir()
    return _build_vault(directory, ed25519.Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def key_id(kms: KMSServer, vault: VaultImage) -> str:
    done = hermetic("kms", "policy", "--pcr0", vault.pcr0, "--principal", ENCLAVE_ROLE)
    assert done.returncode == 0, done.stderr
    admin = kms.boto(ADMIN_ENV["AWS_ACCESS_KEY_ID"], ADMIN_ENV["AWS_SECRET_ACCESS_KEY"])
    return str(admin.create_key(Policy=done.stdout)["KeyMetadata"]["KeyId"])


def _config(kms: KMSServer, key_id: str) -> dict[str, Any]:
    return {
        "kms": {"endpoint": f"127.0.0.1:{kms.port}", "region": REGION, "scheme": "http"},
        "vault": {"key_id": key_id},
    }


@dataclass(frozen=True)
class Served:
    enclave: dict[str, Any]
    url: str
    proxy: subprocess.Popen[str]


def _run_and_proxy(
    background: list[subprocess.Popen[str]],
    image: VaultImage,
    bundle: Path,
    credentials: Credentials,
    kms: KMSServer,
    *extra: str,
) -> Served:
    done = hermetic(
        "run", str(image.path), "--config", str(bundle), "--aws-credentials-env", *extra,
        env=credentials.env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    enclave = json.loads(done.stdout)
    proxy, addresses = start_cli(
        background, "proxy", "--enclave", enclave["EnclaveID"], "--listen", "127.0.0.1:0",
        "--egress-allow", f"127.0.0.1:{kms.port}",
    )  # fmt: skip
    return Served(enclave, f"tcp://{addresses['tcp']}", proxy)


def _serve_genuine(
    background: list[subprocess.Popen[str]],
    vault: VaultImage,
    credentials: Credentials,
    kms: KMSServer,
    key_id: str,
) -> Served:
    """The measured vault image, endorsed and configured for ``key_id``, behind a proxy."""
    return _run_and_proxy(
        background, vault, vault.bundle(_config(kms, key_id)), credentials, kms,
        "--endorsement", str(vault.endorsement),
    )  # fmt: skip


def _seal(vault: VaultImage, url: str, plaintext: str) -> dict[str, str]:
    """``seal`` ``plaintext`` in the enclave at ``url``: the sealed box it returns."""

    async def call() -> dict[str, str]:
        async with await _session(vault, url) as session:
            result: dict[str, str] = await session.call("seal", plaintext)
            return result

    return asyncio.run(call())


async def _session(image: VaultImage, url: str, *, debug: bool = False) -> AttestedSession:
    trust_path = image.directory / "trust.json"
    DevLog(image.directory / "dev-log").write_trust(trust_path)
    # A debug peer carries no release, so no service name: accept it as debug only.
    policy = (
        ServicePolicy(allow_debug=True) if debug else ServicePolicy(services=frozenset({"vault"}))
    )
    return await connect(url, trust=ClientTrust.load(trust_path), policy=policy, timeout=60)


def _lines(kms: KMSServer, pattern: str) -> list[str]:
    return [line for line in kms.text().splitlines() if re.search(pattern, line)]


def test_vault_enclave_seals_and_unseals_with_keys_released_to_its_measured_pcr0(
    kms: KMSServer,
    vault: VaultImage,
    key_id: str,
    credentials: Credentials,
    background: list[subprocess.Popen[str]],
) -> None:
    served = _serve_genuine(background, vault, credentials, kms, key_id)

    async def scenario() -> tuple[dict[str, str], Any, Any]:
        async with await _session(vault, served.url) as session:
            assert session.verified.pcrs[0].hex() == vault.pcr0
            sealed = await session.call("seal", "attack at dawn")
            again = await session.call("unseal", sealed)
            raw = await session.call("unseal", await session.call("seal", b"\x00\xff" * 40))
            await _bad_inputs_are_rejected(session, sealed)
        return sealed, again, raw

    sealed, plaintext, raw = asyncio.run(scenario())
    # The enclave has its own network namespace: the only way to the KMS is the egress.
    assert records.load(served.enclave["EnclaveID"]).sandbox["net_namespace"] == "own"
    assert plaintext == "attack at dawn"
    assert raw == b"\x00\xff" * 40
    assert "attack at dawn" not in json.dumps(sealed)
    generate = _lines(kms, rf"allowed kms:GenerateDataKey key={key_id} caller=enclave for attested")
    decrypt = _lines(kms, rf"allowed kms:Decrypt key={key_id} caller=enclave for attested")
    assert len(generate) == 2
    # Two unseals, then the tampered ciphertext (key released, AES-GCM fails in the enclave) and
    # the tampered wrapped key (allowed by the policy, then InvalidCiphertextException).
    assert len(decrypt) == 4
    assert all(line.endswith(f"ImageSha384={vault.pcr0}") for line in generate + decrypt)


async def _bad_inputs_are_rejected(session: AttestedSession, sealed: dict[str, str]) -> None:
    """Tampered or malformed input to the vault is an RPC error naming what is wrong."""
    data = bytearray(base64.b64decode(sealed["ciphertext"]))
    data[-1] ^= 1
    tampered = {**sealed, "ciphertext": base64.b64encode(bytes(data)).decode()}
    blob = bytearray(base64.b64decode(sealed["wrapped_key"]))
    blob[-1] ^= 1
    wrong_key = {**sealed, "wrapped_key": base64.b64encode(bytes(blob)).decode()}
    cases: list[tuple[str, object, str]] = [
        ("unseal", tampered, "does not authenticate"),
        ("unseal", wrong_key, "InvalidCiphertextException"),
        ("unseal", {**sealed, "ciphertext": "%%%"}, "ciphertext: expected base64"),
        ("unseal", {"wrapped_key": sealed["wrapped_key"]}, "ciphertext: expected base64"),
        ("unseal", "not a map", "expected {ciphertext, wrapped_key}"),
        ("seal", 42, "plaintext: expected text or bytes"),
    ]
    for method, arg, expected in cases:
        with pytest.raises(RPCError) as caught:
            await session.call(method, arg)
        assert caught.value.code == "rejected"
        assert expected in caught.value.remote_message


def test_up_forwards_credentials_and_serves_the_vault_through_its_egress(
    kms: KMSServer,
    vault: VaultImage,
    key_id: str,
    credentials: Credentials,
    background: list[subprocess.Popen[str]],
) -> None:
    trust = vault.directory / "up-trust.json"
    process, addresses = start_cli(
        background, "up", str(vault.path), "--listen", "127.0.0.1:0",
        "--config", str(vault.bundle(_config(kms, key_id), "up.bundle")),
        "--egress-allow", f"127.0.0.1:{kms.port}", "--aws-credentials-env",
        "--trust-out", str(trust),
        env=credentials.env(),
    )  # fmt: skip

    async def scenario() -> Any:
        policy = ServicePolicy(services=frozenset({"vault"}))
        url = f"tcp://{addresses['tcp']}"
        async with await connect(url, trust=ClientTrust.load(trust), policy=policy) as session:
            return await session.call("unseal", await session.call("seal", "via up"))

    assert asyncio.run(scenario()) == "via up"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0
    assert credentials.secret_access_key not in err
    assert credentials.session_token not in err


def test_enclaves_of_other_code_and_debug_enclaves_are_denied_the_key(
    kms: KMSServer,
    vault: VaultImage,
    key_id: str,
    credentials: Credentials,
    background: list[subprocess.Popen[str]],
    work: Path,
) -> None:
    # A wrapped key sealed by the genuine enclave, to try to unseal elsewhere.
    genuine = _serve_genuine(background, vault, credentials, kms, key_id)
    sealed = _seal(vault, genuine.url, "for the genuine image only")

    directory = work / "modified"
    directory.mkdir()
    modified = _build_vault(directory, vault.operator, change="# one line changed\n")
    assert modified.pcr0 != vault.pcr0
    other = _run_and_proxy(
        background, modified, modified.bundle(_config(kms, key_id)), credentials, kms,
        "--endorsement", str(modified.endorsement),
    )  # fmt: skip
    debug = _run_and_proxy(
        background, vault, vault.bundle(_config(kms, key_id), "debug.bundle"), credentials,
        kms, "--debug",
    )  # fmt: skip

    async def attempts(image: VaultImage, url: str, is_debug: bool) -> list[RPCError]:
        errors = []
        async with await _session(image, url, debug=is_debug) as session:
            for method, arg in (("seal", "x"), ("unseal", sealed)):
                with pytest.raises(RPCError) as caught:
                    await session.call(method, arg)
                errors.append(caught.value)
        return errors

    for image, served, is_debug, pcr0 in (
        (modified, other, False, modified.pcr0),
        (vault, debug, True, "0" * 96),
    ):
        for error in asyncio.run(attempts(image, served.url, is_debug)):
            assert "AccessDeniedException" in error.remote_message
        for action in ("GenerateDataKey", "Decrypt"):
            denied = _lines(
                kms,
                rf"denied kms:{action} key={key_id} caller=enclave: statement "
                r"'EnclaveKeyRelease' condition failed: StringEqualsIgnoreCase "
                rf"kms:RecipientAttestation:ImageSha384: expected \['{vault.pcr0}'\], "
                rf"got '{pcr0}'",
            )
            assert len(denied) == 1, kms.text()[-3000:]


def test_the_operator_on_the_parent_cannot_decrypt_a_wrapped_key_without_attestation(
    kms: KMSServer,
    vault: VaultImage,
    key_id: str,
    credentials: Credentials,
    background: list[subprocess.Popen[str]],
) -> None:
    served = _serve_genuine(background, vault, credentials, kms, key_id)
    sealed = _seal(vault, served.url, "operator must not read this")
    wrapped = base64.b64decode(sealed["wrapped_key"])
    # The operator holds the very credentials it forwarded, and the admin's: neither
    # decrypts without an attestation document.
    for who, secret in (
        ("enclave", credentials.secret_access_key),
        (ADMIN_ENV["AWS_ACCESS_KEY_ID"], ADMIN_ENV["AWS_SECRET_ACCESS_KEY"]),
    ):
        with pytest.raises(ClientError) as caught:
            kms.boto(who, secret).decrypt(
                CiphertextBlob=wrapped, EncryptionContext={"service": "hermetic-vault"}
            )
        assert caught.value.response["Error"]["Code"] == "AccessDeniedException"
    absent = _lines(
        kms,
        rf"denied kms:Decrypt key={key_id} caller=enclave: statement 'EnclaveKeyRelease' "
        r"condition failed: StringEqualsIgnoreCase kms:RecipientAttestation:ImageSha384: "
        rf"expected \['{vault.pcr0}'\], got <absent>",
    )
    assert len(absent) == 1, kms.text()[-3000:]
    assert _lines(kms, rf"denied kms:Decrypt key={key_id} caller=admin: ")


def test_forwarded_credentials_never_reach_records_state_files_or_logs(
    kms: KMSServer,
    vault: VaultImage,
    key_id: str,
    credentials: Credentials,
    background: list[subprocess.Popen[str]],
) -> None:
    served = _serve_genuine(background, vault, credentials, kms, key_id)

    async def use() -> Any:
        async with await _session(vault, served.url) as session:
            return await session.call("unseal", await session.call("seal", "c"))

    assert asyncio.run(use()) == "c"  # the enclave really received and used them
    record = records.load(served.enclave["EnclaveID"])
    assert record.supervisor_pid is not None
    cmdline = Path(f"/proc/{record.supervisor_pid}/cmdline").read_bytes()
    served.proxy.send_signal(signal.SIGTERM)
    _, proxy_err = served.proxy.communicate(timeout=60)
    stop_all()
    secrets_ = (credentials.secret_access_key.encode(), credentials.session_token.encode())
    checked = 0
    for path, data in state_files(state_dir()):
        checked += 1
        assert not any(s in data for s in secrets_), path
    assert checked >= 3  # records, supervisor logs, dev PKI at least
    assert any(p.name.endswith(".log") for p in (state_dir() / "enclaves").iterdir())
    for text in (proxy_err.encode(), cmdline, kms.text().encode()):
        assert not any(s in text for s in secrets_)


def test_an_enclave_configured_for_kms_refuses_to_boot_without_forwarded_credentials(
    kms: KMSServer, vault: VaultImage, key_id: str, background: list[subprocess.Popen[str]]
) -> None:
    bundle = vault.bundle(_config(kms, key_id), "nocreds.bundle")
    done = hermetic("run", str(vault.path), "--config", str(bundle))
    assert done.returncode == 1, done.stderr
    assert "enclave refused to start" in done.stderr
    assert "forwarded no AWS credentials" in done.stderr
    assert "Traceback" not in done.stderr


def test_aws_credentials_env_without_the_variables_is_a_usage_error_naming_them(
    vault: VaultImage,
) -> None:
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("AWS_")}
    before = len(records.all_records())
    done = hermetic("run", str(vault.path), "--aws-credentials-env", env=unset, timeout=60)
    assert done.returncode == 2  # UsageError
    assert "AWS_ACCESS_KEY_ID is not set" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(records.all_records()) == before  # checked before anything started
