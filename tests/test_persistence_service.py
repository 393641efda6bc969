"""The persistence service's operations in-process: a real local KMS, a real record store.

The enclave is replaced by what it brings: an emulated NSM attesting chosen PCRs (the same
attester ``tests/test_kms_attested.py`` uses) behind the real ``EnclaveKMSClient``, and the
record store's core on SQLite. This is where races are forced and counted; the same
service in a real sandboxed enclave, behind the proxy, is ``tests/test_persistence_enclave.py``.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives import serialization

from apps.probe.harness import hermetic
from hermetic.attestation import TrustRoot
from hermetic.errors import (
    PersistenceConfigError,
    RecordAuthenticationError,
    RecordNotFoundError,
    RootKeyError,
    TenantExistsError,
    TenantNotFoundError,
)
from hermetic.kms.client import EnclaveKMSClient, KMSCredentials
from hermetic.kms.server import AttestationEvidenceVerifier, KMSService, ServerThread
from hermetic.kms.store import KeyStore
from hermetic.nsm import DevPKI, EmulatedNSM, NSMClient
from hermetic.persistence.service import PersistenceService, PersistenceSettings
from hermetic.store.records import Record, RecordStore

IMAGE = {n: hashlib.sha384(f"persistence {n}".encode()).digest() for n in (0, 1, 2)}
OTHER = {**IMAGE, 0: hashlib.sha384(b"one line changed").digest()}
ENCLAVE = KMSCredentials("enclave", "dummy-secret")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    pki = DevPKI(tmp_path_factory.mktemp("pki"))
    pki.root(datetime.now(UTC))
    return pki


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory, pki: DevPKI) -> Iterator[ServerThread]:
    root_pem = pki.root(datetime.now(UTC)).public_bytes(serialization.Encoding.PEM)
    verifier = AttestationEvidenceVerifier(TrustRoot.from_pem(root_pem, name="dev"))
    store = KeyStore.open(tmp_path_factory.mktemp("kms") / "kms.sqlite3")
    with ServerThread(KMSService(store, verifier)) as running:
        yield running
    store.close()


@pytest.fixture(scope="module")
def key_id(kms: ServerThread) -> str:
    """A key whose policy ``hermetic kms policy`` pinned to IMAGE's PCR0."""
    done = hermetic(
        "kms", "policy", "--pcr0", IMAGE[0].hex(),
        "--principal", "arn:aws:iam::111122223333:role/enclave",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    admin = boto3.session.Session(
        aws_access_key_id="admin", aws_secret_access_key="x", region_name="us-east-1"
    ).client("kms", endpoint_url=kms.endpoint)
    return str(admin.create_key(Policy=done.stdout)["KeyMetadata"]["KeyId"])


def _client(kms: ServerThread, pki: DevPKI, pcrs: dict[int, bytes]) -> EnclaveKMSClient:
    nsm = NSMClient(EmulatedNSM(pcrs, pki=pki))
    return EnclaveKMSClient(nsm, ENCLAVE, region="us-east-1", endpoint_url=kms.endpoint)


class CountingKMS:
    """The real client; counts the calls that reach it (what "KMS only at boot" means)."""

    def __init__(self, client: EnclaveKMSClient) -> None:
        self.client = client
        self.calls: list[str] = []

    def generate_data_key(self, key_id: str, **kwargs: Any) -> Any:
        self.calls.append("GenerateDataKey")
        return self.client.generate_data_key(key_id, **kwargs)

    def decrypt(self, blob: bytes, **kwargs: Any) -> bytes:
        self.calls.append("Decrypt")
        return self.client.decrypt(blob, **kwargs)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RecordStore]:
    opened = RecordStore(tmp_path / "records.db")
    yield opened
    opened.close()


def test_first_boot_generates_later_boots_decrypt_and_operations_never_call_kms(
    kms: ServerThread, pki: DevPKI, key_id: str, store: RecordStore
) -> None:
    settings = PersistenceSettings("store-1", key_id)
    counting = CountingKMS(_client(kms, pki, IMAGE))
    first = PersistenceService.boot(counting, store, settings)
    assert (first.origin.source, counting.calls) == ("generated", ["GenerateDataKey"])
    material = secrets.token_bytes(32)
    first.create_tenant("acme")
    first.put_key("acme", "insights/a", material)
    for _ in range(50):
        assert first.get_key("acme", "insights/a").material == material
    first.rotate("acme", "insights/a")
    first.put_record("acme", "insights/a", "r", b"data")
    assert counting.calls == ["GenerateDataKey"]
    # Only the blob is kept, and it is not the key.
    blob = store.get("store-1/root-key").data
    assert first.root.material not in blob

    second = PersistenceService.boot(counting, store, settings)
    assert second.origin.source == "decrypted"
    assert counting.calls == ["GenerateDataKey", "Decrypt"]
    assert second.get_key("acme", "insights/a", 1).material == material
    assert second.get_record("acme", "insights/a", "r") == b"data"


def test_other_pcrs_are_denied_and_nothing_is_written_on_a_first_boot(
    kms: ServerThread, pki: DevPKI, key_id: str, store: RecordStore
) -> None:
    settings = PersistenceSettings("store-1", key_id)
    with pytest.raises(RootKeyError) as denied:
        PersistenceService.boot(_client(kms, pki, OTHER), store, settings)
    assert str(denied.value).startswith(
        f"root key: KMS GenerateDataKey of key {key_id!r} failed: KMSAccessDeniedError:"
    )
    with pytest.raises(RecordNotFoundError):
        store.get("store-1/root-key")
    PersistenceService.boot(_client(kms, pki, IMAGE), store, settings)
    with pytest.raises(RootKeyError, match="KMS Decrypt of the blob kept in 'store-1/root-key'"):
        PersistenceService.boot(_client(kms, pki, OTHER), store, settings)


class RacingStore(RecordStore):
    """The real store, where another instance boots between this one's read of the
    root-key record and its write (the interleaving two first boots can have)."""

    def __init__(self, path: Path, rival: Any) -> None:
        super().__init__(path)
        self.rival = rival

    def get(self, record_id: str) -> Record:
        rival, self.rival = self.rival, None
        try:
            return super().get(record_id)
        finally:
            if rival is not None:
                rival()


def test_two_first_boots_racing_end_with_the_same_root(
    kms: ServerThread, pki: DevPKI, key_id: str, tmp_path: Path
) -> None:
    settings = PersistenceSettings("store-1", key_id)
    winner: list[PersistenceService] = []
    store = RacingStore(
        tmp_path / "records.db",
        lambda: winner.append(PersistenceService.boot(_client(kms, pki, IMAGE), plain, settings)),
    )
    plain = RecordStore(tmp_path / "records.db")
    try:
        counting = CountingKMS(_client(kms, pki, IMAGE))
        loser = PersistenceService.boot(counting, store, settings)
        assert winner[0].origin.source == "generated"
        assert loser.origin.source == "decrypted"
        assert counting.calls == ["GenerateDataKey", "Decrypt"]
        winner[0].create_tenant("acme")
        winner[0].put_key("acme", "k", b"\x07" * 32)
        assert loser.get_key("acme", "k").material == b"\x07" * 32
    finally:
        plain.close()
        store.close()


def test_concurrent_rotations_lose_no_update(
    kms: ServerThread, pki: DevPKI, key_id: str, tmp_path: Path
) -> None:
    settings = PersistenceSettings("store-1", key_id)
    stores = [RecordStore(tmp_path / "records.db") for _ in range(2)]
    try:
        first = PersistenceService.boot(_client(kms, pki, IMAGE), stores[0], settings)
        second = PersistenceService.boot(_client(kms, pki, IMAGE), stores[1], settings)
        first.create_tenant("acme")
        first.put_key("acme", "k", secrets.token_bytes(32))
        barrier = threading.Barrier(2)
        versions: list[int] = []

        def rotate(service: PersistenceService) -> None:
            barrier.wait()
            for _ in range(5):
                versions.append(service.rotate("acme", "k"))

        threads = [threading.Thread(target=rotate, args=(s,)) for s in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(versions) == list(range(2, 12))
        assert first.describe("acme")["keys"]["k"]["current"] == 11
    finally:
        for opened in stores:
            opened.close()


def test_rejects_tenant_mistakes_and_keyrings_moved_between_tenants(
    kms: ServerThread, pki: DevPKI, key_id: str, store: RecordStore
) -> None:
    service = PersistenceService.boot(
        _client(kms, pki, IMAGE), store, PersistenceSettings("store-1", key_id)
    )
    service.create_tenant("a")
    service.create_tenant("b")
    with pytest.raises(TenantExistsError, match="tenant 'a': already has a keyring"):
        service.create_tenant("a")
    with pytest.raises(TenantNotFoundError, match="tenant 'c': no keyring in the store"):
        service.get_key("c", "k")
    moved = store.get("store-1/tenants/a/keyring")
    store.put("store-1/tenants/b/keyring", moved.data, 1)
    with pytest.raises(RecordAuthenticationError):
        service.describe("b")


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (None, "config persistence: expected an object, got NoneType"),
        ({"store_id": "s"}, "config persistence.key_id: expected a KMS key id, got None"),
        ({"store_id": "S!", "key_id": "k"}, "config persistence.store_id"),
        ({"key_id": "k"}, "config persistence.store_id"),
    ],
)
def test_rejects_a_malformed_persistence_config_naming_the_field(
    section: object, expected: str
) -> None:
    with pytest.raises(PersistenceConfigError) as caught:
        PersistenceSettings.from_config({"persistence": section})
    assert expected in str(caught.value)
    assert caught.value.exit_code == 2
