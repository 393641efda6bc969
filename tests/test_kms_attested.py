"""Key release bound to attestation: the enclave client, the local KMS and the dev NSM.

The attester here is an emulated NSM given chosen PCRs (``Launch``), which lets these tests
forge what a real enclave cannot (other roots, old or expired documents). The same key
release with a REAL enclave (an image built from ``examples/vault``, run by the launcher
with its NSM, reaching this KMS through the proxy's egress) is in
``tests/test_kms_enclave.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hermetic.attestation import TrustRoot
from hermetic.errors import KMSAccessDeniedError, KMSValidationError
from hermetic.kms.client import EnclaveKMSClient, KMSCredentials
from hermetic.kms.cms import decrypt_for_recipient, parse_ciphertext_for_recipient
from hermetic.kms.server import AttestationEvidenceVerifier, KMSService, ServerThread
from hermetic.kms.store import KeyStore
from hermetic.nsm import DevPKI, EmulatedNSM, NSMClient

IMAGE = {
    0: hashlib.sha384(b"image").digest(),
    1: hashlib.sha384(b"kernel").digest(),
    2: hashlib.sha384(b"app").digest(),
}
OTHER_IMAGE = {**IMAGE, 0: hashlib.sha384(b"other image").digest()}
ENCLAVE = KMSCredentials("enclave", "dummy-secret")
ADMIN = KMSCredentials("admin", "dummy-secret")
LOGGER = "hermetic.kms.server"


@dataclass(frozen=True)
class Launch:
    """An attester for given PCRs, in-process (real enclaves: tests/test_kms_enclave.py)."""

    pki: DevPKI

    def __call__(
        self,
        pcrs: dict[int, bytes],
        *,
        debug: bool = False,
        pki: DevPKI | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> NSMClient:
        kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
        nsm = EmulatedNSM(pcrs, debug=debug, pki=pki or self.pki, **kwargs)
        return NSMClient(nsm)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("attested")


@pytest.fixture(scope="module")
def launch(dirs: Path) -> Launch:
    pki = DevPKI(dirs / "pki")
    pki.root(datetime.now(UTC) - timedelta(days=1))  # so documents can be dated in the past
    return Launch(pki)


@pytest.fixture(scope="module")
def server(dirs: Path, launch: Launch) -> Iterator[ServerThread]:
    root_pem = launch.pki.root(datetime.now(UTC)).public_bytes(serialization.Encoding.PEM)
    verifier = AttestationEvidenceVerifier(
        TrustRoot.from_pem(root_pem, name="dev"), max_age=timedelta(minutes=5)
    )
    store = KeyStore.open(dirs / "kms.sqlite3")
    with ServerThread(KMSService(store, verifier)) as running:
        yield running
    store.close()


def _boto(endpoint: str, who: KMSCredentials) -> Any:
    return boto3.session.Session(
        aws_access_key_id=who.access_key_id,
        aws_secret_access_key=who.secret_access_key,
        region_name="us-east-1",
    ).client("kms", endpoint_url=endpoint)


def _pinned_policy(pcr0: bytes) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "admin",
                    "Effect": "Allow",
                    "Principal": {"AWS": "arn:aws:iam::111122223333:user/admin"},
                    "Action": [
                        "kms:Describe*",
                        "kms:Get*",
                        "kms:Put*",
                        "kms:Encrypt",
                        "kms:CreateAlias",
                    ],
                    "Resource": "*",
                },
                {
                    "Sid": "enclave",
                    "Effect": "Allow",
                    "Principal": {"AWS": "arn:aws:iam::111122223333:role/enclave"},
                    "Action": ["kms:Decrypt", "kms:GenerateDataKey*", "kms:DeriveSharedSecret"],
                    "Resource": "*",
                    "Condition": {
                        "StringEqualsIgnoreCase": {
                            "kms:RecipientAttestation:ImageSha384": pcr0.hex()
                        }
                    },
                },
            ],
        }
    )


@pytest.fixture(scope="module")
def pinned_key(server: ServerThread) -> str:
    admin = _boto(server.endpoint, ADMIN)
    return str(admin.create_key(Policy=_pinned_policy(IMAGE[0]))["KeyMetadata"]["KeyId"])


@pytest.fixture(scope="module")
def enclave_client(server: ServerThread, launch: Launch) -> EnclaveKMSClient:
    return EnclaveKMSClient(
        launch(IMAGE), ENCLAVE, region="us-east-1", endpoint_url=server.endpoint
    )


# --- the pinned image gets its keys --------------------------------------------------------


def test_pinned_image_gets_data_key_and_decrypts_it_again(
    enclave_client: EnclaveKMSClient, pinned_key: str
) -> None:
    data_key = enclave_client.generate_data_key(pinned_key, encryption_context={"svc": "a"})
    assert len(data_key.plaintext) == 32
    again = enclave_client.decrypt(data_key.ciphertext_blob, encryption_context={"svc": "a"})
    assert again == data_key.plaintext


def test_pinned_image_decrypts_what_the_admin_encrypted(
    server: ServerThread, enclave_client: EnclaveKMSClient, pinned_key: str
) -> None:
    secret = os.urandom(48)
    blob = _boto(server.endpoint, ADMIN).encrypt(KeyId=pinned_key, Plaintext=secret)
    assert enclave_client.decrypt(blob["CiphertextBlob"], key_id=pinned_key) == secret


def test_ciphertext_for_recipient_is_kms_shaped_and_bound_to_document_key(
    server: ServerThread, launch: Launch, pinned_key: str
) -> None:
    recipient = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = recipient.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    document = launch(IMAGE).attest(public_key=spki)
    response = _boto(server.endpoint, ENCLAVE).generate_data_key(
        KeyId=pinned_key,
        KeySpec="AES_256",
        Recipient={"AttestationDocument": document, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
    )
    assert "Plaintext" not in response
    assert response["CiphertextBlob"]
    envelope = parse_ciphertext_for_recipient(response["CiphertextForRecipient"])
    assert envelope.recipient_key_id == hashlib.sha256(spki).digest()
    assert len(envelope.encrypted_key) == 256
    assert len(envelope.encrypted_content) == 48  # 32-byte key + a full padding block, as KMS
    data_key = decrypt_for_recipient(envelope, recipient)
    assert len(data_key) == 32


def test_data_key_pair_random_and_shared_secret_go_to_the_recipient(
    server: ServerThread, launch: Launch, enclave_client: EnclaveKMSClient, pinned_key: str
) -> None:
    pair = enclave_client.generate_data_key_pair(pinned_key, "ECC_NIST_P256")
    private = serialization.load_der_private_key(pair.private_key_der, None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert (
        private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == pair.public_key_der
    )
    assert enclave_client.decrypt(pair.private_key_ciphertext_blob) == pair.private_key_der
    assert len(enclave_client.generate_random(100)) == 100

    admin = _boto(server.endpoint, ADMIN)
    ecc = admin.create_key(
        KeySpec="ECC_NIST_P384", KeyUsage="KEY_AGREEMENT", Policy=_pinned_policy(IMAGE[0])
    )["KeyMetadata"]["KeyId"]
    kms_public = serialization.load_der_public_key(admin.get_public_key(KeyId=ecc)["PublicKey"])
    assert isinstance(kms_public, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(ec.SECP384R1())
    peer_der = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    shared = enclave_client.derive_shared_secret(ecc, peer_der)
    assert shared == peer.exchange(ec.ECDH(), kms_public)


def test_per_call_recipient_keys_work(
    server: ServerThread, launch: Launch, pinned_key: str
) -> None:
    with EnclaveKMSClient(
        launch(IMAGE),
        ENCLAVE,
        region="us-east-1",
        endpoint_url=server.endpoint,
        recipient_key="per-call",
    ) as client:
        data_key = client.generate_data_key(pinned_key)
        assert client.decrypt(data_key.ciphertext_blob) == data_key.plaintext


# --- everything else is denied, and the denial says why -----------------------------------


def _denied_attester(kind: str, launch: Launch, dirs: Path) -> NSMClient:
    now = datetime.now(UTC)
    if kind == "other_pcr0":
        return launch(OTHER_IMAGE)
    if kind == "debug":
        return launch(IMAGE, debug=True)
    if kind == "other_root":
        return launch(IMAGE, pki=DevPKI(dirs / "other-pki"))
    if kind == "expired":
        return launch(
            IMAGE, pki=DevPKI(launch.pki.directory), clock=lambda: now - timedelta(hours=4)
        )
    if kind == "too_old":
        return launch(
            IMAGE, pki=DevPKI(launch.pki.directory), clock=lambda: now - timedelta(minutes=10)
        )
    raise AssertionError(kind)


DENIALS = {
    "other_pcr0": ["kms:RecipientAttestation:ImageSha384", IMAGE[0].hex(), OTHER_IMAGE[0].hex()],
    "debug": ["kms:RecipientAttestation:ImageSha384", IMAGE[0].hex(), "00" * 48],
    "other_root": ["attestation document rejected", "UntrustedRootError"],
    "expired": ["attestation document rejected", "CertificateValidityError"],
    "too_old": ["attestation document rejected", "DocumentAgeError"],
}


@pytest.mark.parametrize("kind", sorted(DENIALS))
@pytest.mark.parametrize("operation", ["decrypt", "generate_data_key"])
def test_denied_and_logged(
    server: ServerThread,
    launch: Launch,
    dirs: Path,
    pinned_key: str,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    operation: str,
) -> None:
    blob = _boto(server.endpoint, ADMIN).encrypt(KeyId=pinned_key, Plaintext=b"s")["CiphertextBlob"]
    client = EnclaveKMSClient(
        _denied_attester(kind, launch, dirs),
        ENCLAVE,
        region="us-east-1",
        endpoint_url=server.endpoint,
        max_attempts=1,
    )
    caplog.set_level(logging.WARNING, logger=LOGGER)
    call: Callable[[], object] = (
        (lambda: client.decrypt(blob))
        if operation == "decrypt"
        else (lambda: client.generate_data_key(pinned_key))
    )
    with pytest.raises(KMSAccessDeniedError) as caught:
        call()
    assert caught.value.code == "AccessDeniedException"
    action = "kms:Decrypt" if operation == "decrypt" else "kms:GenerateDataKey"
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"denied {action} key={pinned_key} caller=enclave: ")
    for needle in DENIALS[kind]:
        assert needle in lines[0]


@pytest.mark.parametrize("operation", ["decrypt", "generate_data_key"])
def test_call_without_recipient_is_denied_and_logged(
    server: ServerThread, pinned_key: str, caplog: pytest.LogCaptureFixture, operation: str
) -> None:
    blob = _boto(server.endpoint, ADMIN).encrypt(KeyId=pinned_key, Plaintext=b"s")["CiphertextBlob"]
    enclave = _boto(server.endpoint, ENCLAVE)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    call: Callable[[], object] = (
        (lambda: enclave.decrypt(CiphertextBlob=blob))
        if operation == "decrypt"
        else (lambda: enclave.generate_data_key(KeyId=pinned_key, KeySpec="AES_256"))
    )
    with pytest.raises(ClientError) as caught:
        call()
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "kms:RecipientAttestation:ImageSha384" in line
    assert "got <absent>" in line


def test_unattested_helpers_reach_only_keys_that_need_no_attestation(
    server: ServerThread, enclave_client: EnclaveKMSClient, pinned_key: str
) -> None:
    # A key the enclave principal may use without conditions (what the KMS bench's plain
    # path uses): the explicitly unattested calls get the plaintext back in the clear.
    policy = json.loads(_pinned_policy(IMAGE[0]))
    del policy["Statement"][1]["Condition"]
    policy["Statement"][1]["Action"].append("kms:Encrypt")
    admin = _boto(server.endpoint, ADMIN)
    plain_key = str(admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"])
    secret = os.urandom(32)
    blob = enclave_client.encrypt(plain_key, secret, encryption_context={"svc": "p"})
    assert (
        enclave_client.decrypt_without_recipient(
            blob, key_id=plain_key, encryption_context={"svc": "p"}
        )
        == secret
    )
    data_key = enclave_client.generate_data_key_without_recipient(plain_key)
    assert len(data_key.plaintext) == 32
    assert enclave_client.decrypt_without_recipient(data_key.ciphertext_blob) == (
        data_key.plaintext
    )
    # The pinned key still refuses them, with the client's typed error.
    pinned_blob = admin.encrypt(KeyId=pinned_key, Plaintext=secret)["CiphertextBlob"]
    with pytest.raises(KMSAccessDeniedError, match="AccessDeniedException"):
        enclave_client.decrypt_without_recipient(pinned_blob, key_id=pinned_key)
    with pytest.raises(KMSAccessDeniedError, match="AccessDeniedException"):
        enclave_client.generate_data_key_without_recipient(pinned_key)


def test_real_aws_document_is_denied_under_the_dev_root(
    server: ServerThread, vectors: Path, pinned_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    document = (vectors / "nitro" / "nitrite-blocky-1.cbor").read_bytes()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with pytest.raises(ClientError) as caught:
        _boto(server.endpoint, ENCLAVE).generate_data_key(
            KeyId=pinned_key,
            KeySpec="AES_256",
            Recipient={
                "AttestationDocument": document,
                "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            },
        )
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "attestation document rejected" in line


def test_garbage_document_is_a_validation_error(server: ServerThread, pinned_key: str) -> None:
    with pytest.raises(ClientError) as caught:
        _boto(server.endpoint, ENCLAVE).generate_data_key(
            KeyId=pinned_key,
            KeySpec="AES_256",
            Recipient={
                "AttestationDocument": b"\x84garbage",
                "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            },
        )
    assert caught.value.response["Error"]["Code"] == "ValidationException"


@pytest.mark.parametrize("public_key", ["none", "ec", "rsa1024"])
def test_document_without_usable_rsa_key_is_a_validation_error(
    server: ServerThread, launch: Launch, pinned_key: str, public_key: str
) -> None:
    spki: bytes | None = None
    if public_key == "ec":
        spki = (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    elif public_key == "rsa1024":
        spki = (
            rsa.generate_private_key(public_exponent=65537, key_size=1024)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    document = launch(IMAGE).attest(public_key=spki)
    with pytest.raises(ClientError) as caught:
        _boto(server.endpoint, ENCLAVE).generate_data_key(
            KeyId=pinned_key,
            KeySpec="AES_256",
            Recipient={
                "AttestationDocument": document,
                "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            },
        )
    assert caught.value.response["Error"]["Code"] == "ValidationException"


def test_client_maps_validation_errors_to_typed_errors(
    enclave_client: EnclaveKMSClient, pinned_key: str
) -> None:
    with pytest.raises(KMSValidationError):
        enclave_client.generate_data_key(pinned_key, key_spec="AES_512")


# --- document reuse -----------------------------------------------------------------------


class _CountingAttester:
    def __init__(self, inner: NSMClient) -> None:
        self.inner = inner
        self.calls = 0

    def attest(
        self,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        self.calls += 1
        return self.inner.attest(user_data=user_data, nonce=nonce, public_key=public_key)


@pytest.mark.parametrize(("ttl", "expected_documents"), [(60.0, 1), (0.0, 3)])
def test_client_reuses_its_document_only_within_the_ttl(
    server: ServerThread, launch: Launch, pinned_key: str, ttl: float, expected_documents: int
) -> None:
    attester = _CountingAttester(launch(IMAGE))
    client = EnclaveKMSClient(
        attester, ENCLAVE, region="us-east-1", endpoint_url=server.endpoint, document_ttl=ttl
    )
    for _ in range(3):
        client.generate_data_key(pinned_key)
    assert attester.calls == expected_documents


def test_per_call_keys_never_reuse_a_document(
    server: ServerThread, launch: Launch, pinned_key: str
) -> None:
    attester = _CountingAttester(launch(IMAGE))
    client = EnclaveKMSClient(
        attester,
        ENCLAVE,
        region="us-east-1",
        endpoint_url=server.endpoint,
        recipient_key="per-call",
    )
    client.generate_data_key(pinned_key)
    client.generate_data_key(pinned_key)
    assert attester.calls == 2


def test_remembered_document_is_rechecked_for_age_and_validity(launch: Launch) -> None:
    from hermetic.errors import CertificateValidityError, DocumentAgeError

    root_pem = launch.pki.root(datetime.now(UTC)).public_bytes(serialization.Encoding.PEM)
    times = [datetime.now(UTC)]
    verifier = AttestationEvidenceVerifier(
        TrustRoot.from_pem(root_pem), max_age=timedelta(minutes=5), clock=lambda: times[-1]
    )
    document = launch(IMAGE).attest(public_key=b"k")
    pcrs, _, _ = verifier(document)
    assert pcrs[0] == IMAGE[0]
    verifier(document)  # remembered: still fine now
    times.append(times[0] + timedelta(minutes=6))
    with pytest.raises(DocumentAgeError):
        verifier(document)
    verifier_long = AttestationEvidenceVerifier(
        TrustRoot.from_pem(root_pem), max_age=timedelta(days=1), clock=lambda: times[-1]
    )
    times.append(times[0])
    verifier_long(document)
    times.append(times[0] + timedelta(hours=4))
    with pytest.raises(CertificateValidityError):
        verifier_long(document)
