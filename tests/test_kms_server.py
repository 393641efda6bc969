"""The local KMS over real HTTP: unmodified boto3 and the AWS CLI, blobs, policies, restart."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hermetic.errors import KMSSealedStoreError
from hermetic.kms.server import KMSService, ServerThread
from hermetic.kms.store import KeyStore


def _no_documents(document: bytes) -> Any:
    raise AssertionError("no attestation documents in these tests")


def _client(endpoint: str, access_key: str = "admin") -> Any:
    return boto3.session.Session(
        aws_access_key_id=access_key, aws_secret_access_key="dummy", region_name="us-east-1"
    ).client("kms", endpoint_url=endpoint)


@pytest.fixture(scope="module")
def db_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kms")


@pytest.fixture(scope="module")
def server(db_dir: Path) -> Iterator[ServerThread]:
    store = KeyStore.open(db_dir / "kms.sqlite3")
    with ServerThread(KMSService(store, _no_documents)) as running:
        yield running
    store.close()


@pytest.fixture(scope="module")
def kms(server: ServerThread) -> Any:
    return _client(server.endpoint)


@pytest.fixture(scope="module")
def key_id(kms: Any) -> str:
    return str(kms.create_key(Description="test key")["KeyMetadata"]["KeyId"])


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


# --- every operation through unmodified boto3 ---------------------------------------------


def test_boto3_key_management_operations(kms: Any) -> None:
    created = kms.create_key(Description="managed")["KeyMetadata"]
    key = created["KeyId"]
    assert created["KeyState"] == "Enabled"
    assert created["Arn"].endswith(f":key/{key}")
    assert kms.describe_key(KeyId=key)["KeyMetadata"]["Description"] == "managed"
    assert key in [k["KeyId"] for k in kms.list_keys()["Keys"]]
    default = json.loads(kms.get_key_policy(KeyId=key, PolicyName="default")["Policy"])
    assert default["Statement"][0]["Action"] == "kms:*"
    assert default["Statement"][0]["Principal"] == {"AWS": "arn:aws:iam::111122223333:root"}
    policy = json.dumps(
        {
            "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:*", "Resource": "*"}
            ]
        }
    )
    kms.put_key_policy(KeyId=key, PolicyName="default", Policy=policy)
    assert kms.get_key_policy(KeyId=key)["Policy"] == policy
    kms.create_alias(AliasName="alias/managed", TargetKeyId=key)
    aliases = kms.list_aliases(KeyId=key)["Aliases"]
    assert [a["AliasName"] for a in aliases] == ["alias/managed"]
    assert kms.describe_key(KeyId="alias/managed")["KeyMetadata"]["KeyId"] == key
    kms.delete_alias(AliasName="alias/managed")
    assert kms.list_aliases(KeyId=key)["Aliases"] == []
    deletion = kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    assert deletion["KeyState"] == "PendingDeletion"
    assert kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    with pytest.raises(ClientError) as caught:
        kms.encrypt(KeyId=key, Plaintext=b"x")
    assert _code(caught) == "KMSInvalidStateException"


def test_boto3_cryptographic_operations(kms: Any, key_id: str) -> None:
    kms.create_alias(AliasName="alias/crypto", TargetKeyId=key_id)
    blob = kms.encrypt(KeyId="alias/crypto", Plaintext=b"hello")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"hello"
    data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    assert len(data_key["Plaintext"]) == 32
    assert (
        kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    )
    without = kms.generate_data_key_without_plaintext(KeyId=key_id, NumberOfBytes=16)
    assert "Plaintext" not in without
    assert len(kms.decrypt(CiphertextBlob=without["CiphertextBlob"])["Plaintext"]) == 16
    pair = kms.generate_data_key_pair(KeyId=key_id, KeyPairSpec="ECC_NIST_P256")
    private = serialization.load_der_private_key(pair["PrivateKeyPlaintext"], None)
    assert (
        private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == pair["PublicKey"]
    )
    assert (
        kms.decrypt(CiphertextBlob=pair["PrivateKeyCiphertextBlob"])["Plaintext"]
        == pair["PrivateKeyPlaintext"]
    )
    assert len(kms.generate_random(NumberOfBytes=64)["Plaintext"]) == 64


def test_boto3_derive_shared_secret_matches_peer_ecdh(kms: Any) -> None:
    key = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="KEY_AGREEMENT")["KeyMetadata"]
    kms_public = serialization.load_der_public_key(
        kms.get_public_key(KeyId=key["KeyId"])["PublicKey"]
    )
    assert isinstance(kms_public, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_der = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    secret = kms.derive_shared_secret(
        KeyId=key["KeyId"], KeyAgreementAlgorithm="ECDH", PublicKey=peer_der
    )["SharedSecret"]
    assert secret == peer.exchange(ec.ECDH(), kms_public)


# --- ciphertext blobs ---------------------------------------------------------------------


@pytest.mark.parametrize("context", [None, {"purpose": "test", "tenant": "a"}])
def test_blob_round_trips_encrypt_decrypt_reencrypt(
    kms: Any, key_id: str, context: dict[str, str] | None
) -> None:
    extra = {"EncryptionContext": context} if context else {}
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"payload", **extra)["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob, KeyId=key_id, **extra)["Plaintext"] == b"payload"
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    moved = kms.re_encrypt(
        CiphertextBlob=blob,
        DestinationKeyId=other,
        **(
            {"SourceEncryptionContext": context, "DestinationEncryptionContext": {"v": "2"}}
            if context
            else {}
        ),
    )
    assert moved["KeyId"].endswith(other)
    again = {"EncryptionContext": {"v": "2"}} if context else {}
    assert kms.decrypt(CiphertextBlob=moved["CiphertextBlob"], **again)["Plaintext"] == b"payload"


@pytest.mark.parametrize(
    "context",
    [{}, {"purpose": "other"}, {"purpose": "test", "extra": "x"}, {"Purpose": "test"}],
)
def test_wrong_encryption_context_is_invalid_ciphertext(
    kms: Any, key_id: str, context: dict[str, str]
) -> None:
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"p", EncryptionContext={"purpose": "test"})[
        "CiphertextBlob"
    ]
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)
    assert _code(caught) == "InvalidCiphertextException"


def test_every_flipped_byte_is_invalid_ciphertext(kms: Any, key_id: str) -> None:
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"p")["CiphertextBlob"]
    codes = set()
    for at in range(len(blob)):
        flipped = bytearray(blob)
        flipped[at] ^= 0x01
        with pytest.raises(ClientError) as caught:
            kms.decrypt(CiphertextBlob=bytes(flipped))
        codes.add(_code(caught))
    assert codes == {"InvalidCiphertextException"}


def test_decrypt_with_other_key_id_is_incorrect_key(kms: Any, key_id: str) -> None:
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"p")["CiphertextBlob"]
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=blob, KeyId=other)
    assert _code(caught) == "IncorrectKeyException"


# --- AWS-shaped errors --------------------------------------------------------------------


def test_unknown_key_is_not_found(kms: Any) -> None:
    with pytest.raises(ClientError) as caught:
        kms.describe_key(KeyId="00000000-0000-0000-0000-000000000000")
    assert _code(caught) == "NotFoundException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_disabled_key_is_disabled_exception(kms: Any) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.disable_key(KeyId=key)
    with pytest.raises(ClientError) as caught:
        kms.generate_data_key(KeyId=key, KeySpec="AES_256")
    assert _code(caught) == "DisabledException"
    kms.enable_key(KeyId=key)
    assert kms.generate_data_key(KeyId=key, KeySpec="AES_256")["Plaintext"]


def test_bad_parameters_are_validation_exceptions(kms: Any, key_id: str) -> None:
    with pytest.raises(ClientError) as caught:
        kms.generate_data_key(KeyId=key_id)  # neither KeySpec nor NumberOfBytes
    assert _code(caught) == "ValidationException"


def test_put_key_policy_rejects_malformed_documents(kms: Any, key_id: str) -> None:
    bad = [
        "not json",
        "[]",
        json.dumps({"Statement": []}),
        json.dumps(
            {
                "Statement": [
                    {"Effect": "Maybe", "Principal": "*", "Action": "kms:*", "Resource": "*"}
                ]
            }
        ),
        json.dumps(
            {
                "Statement": [
                    {"Effect": "Allow", "Principal": "*", "NotAction": "kms:*", "Resource": "*"}
                ]
            }
        ),
        json.dumps(
            {
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": "*",
                        "Action": "kms:*",
                        "Resource": "*",
                        "Condition": {"NumericLessThan": {"a": 1}},
                    }
                ]
            }
        ),
    ]
    for document in bad:
        with pytest.raises(ClientError) as caught:
            kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=document)
        assert _code(caught) == "MalformedPolicyDocumentException", document


_ADMIN = (
    '{"Sid": "admin", "Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:*",'
    ' "Resource": "*"}'
)
_PCR0 = '"kms:RecipientAttestation:ImageSha384": "' + "a0" * 48 + '"'
#: Key policies whose text repeats a key; ``json.loads`` keeps the last, so each would be
#: read differently from what it shows (the first one allows Decrypt without attestation).
DUPLICATED_KEY_POLICIES = {
    "condition then empty condition": (
        '{"Statement": [' + _ADMIN + ', {"Sid": "release", "Effect": "Allow", "Principal": "*",'
        ' "Action": "kms:Decrypt", "Resource": "*",'
        ' "Condition": {"StringEqualsIgnoreCase": {' + _PCR0 + '}}, "Condition": {}}]}'
    ),
    "top-level Statement": '{"Statement": [' + _ADMIN + '], "Statement": [' + _ADMIN + "]}",
    "condition operator": (
        '{"Statement": [' + _ADMIN + ', {"Effect": "Allow", "Principal": "*", "Action":'
        ' "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {' + _PCR0 + "},"
        ' "StringEquals": {"kms:CallerAccount": "111122223333"}}}]}'
    ),
    "condition key": (
        '{"Statement": [' + _ADMIN + ', {"Effect": "Allow", "Principal": "*", "Action":'
        ' "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {'
        + _PCR0
        + ", "
        + _PCR0.replace("a0", "b1")
        + "}}}]}"
    ),
    "principal": (
        '{"Statement": [{"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:'
        'user/admin", "AWS": "*"}, "Action": "kms:*", "Resource": "*"}]}'
    ),
}


@pytest.mark.parametrize("document", DUPLICATED_KEY_POLICIES.values(), ids=DUPLICATED_KEY_POLICIES)
def test_key_policy_with_a_duplicate_key_at_any_depth_is_malformed(kms: Any, document: str) -> None:
    json.loads(document)  # valid JSON to a lax reader, which keeps the last of each key
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    before = kms.get_key_policy(KeyId=key, PolicyName="default")["Policy"]
    with pytest.raises(ClientError) as caught:
        kms.put_key_policy(KeyId=key, PolicyName="default", Policy=document)
    assert _code(caught) == "MalformedPolicyDocumentException"
    assert "duplicate object key" in caught.value.response["Error"]["Message"]
    assert kms.get_key_policy(KeyId=key, PolicyName="default")["Policy"] == before
    keys = {k["KeyId"] for k in kms.list_keys(Limit=1000)["Keys"]}
    with pytest.raises(ClientError) as caught:
        kms.create_key(Policy=document, Description="must not exist")
    assert _code(caught) == "MalformedPolicyDocumentException"
    assert {k["KeyId"] for k in kms.list_keys(Limit=1000)["Keys"]} == keys


def test_put_key_policy_refuses_to_lock_the_caller_out(kms: Any) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    only_decrypt = json.dumps(
        {
            "Statement": [
                {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*"}
            ]
        }
    )
    with pytest.raises(ClientError) as caught:
        kms.put_key_policy(KeyId=key, PolicyName="default", Policy=only_decrypt)
    assert _code(caught) == "MalformedPolicyDocumentException"


def test_policy_denies_other_principal_and_explicit_deny_wins(server: ServerThread) -> None:
    admin = _client(server.endpoint, "admin")
    reader = _client(server.endpoint, "reader")
    policy = {
        "Statement": [
            {
                "Sid": "admin",
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::111122223333:user/admin"},
                "Action": "kms:*",
                "Resource": "*",
            },
            {
                "Sid": "deny-random",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "kms:GenerateDataKey*",
                "Resource": "*",
            },
        ]
    }
    key = admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"]
    assert admin.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]
    with pytest.raises(ClientError) as caught:
        reader.encrypt(KeyId=key, Plaintext=b"x")
    assert _code(caught) == "AccessDeniedException"
    with pytest.raises(ClientError) as caught:
        admin.generate_data_key(KeyId=key, KeySpec="AES_256")
    assert _code(caught) == "AccessDeniedException"


def test_unsigned_request_is_rejected(server: ServerThread) -> None:
    import httpx

    response = httpx.post(
        server.endpoint + "/",
        headers={
            "X-Amz-Target": "TrentService.ListKeys",
            "Content-Type": "application/x-amz-json-1.1",
        },
        content=b"{}",
    )
    assert response.status_code == 400
    assert response.json()["__type"] == "MissingAuthenticationTokenException"


def test_an_oversized_request_body_is_refused_unread_declared_or_streamed(
    server: ServerThread,
) -> None:
    """A body past MAX_REQUEST_SIZE is refused with 413 ValidationException whether its
    Content-Length says so or it arrives chunked with no length; the server then still
    answers an ordinary request (it did not try to hold the rest)."""
    import httpx

    from hermetic.kms.server import MAX_REQUEST_SIZE

    headers = {
        "X-Amz-Target": "TrentService.ListKeys",
        "Content-Type": "application/x-amz-json-1.1",
        "Authorization": "AWS4-HMAC-SHA256 Credential=admin/20261202/us-east-1/kms/aws4_request,"
        " SignedHeaders=host, Signature=" + "0" * 64,
    }
    body = b'{"Limit": 1, "Marker": "' + b"a" * MAX_REQUEST_SIZE + b'"}'

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    for content in (body, chunks()):
        response = httpx.post(server.endpoint + "/", headers=headers, content=content)
        assert response.status_code == 413
        assert response.json()["__type"] == "ValidationException"
        assert str(MAX_REQUEST_SIZE) in response.json()["message"]
    ok = httpx.post(server.endpoint + "/", headers=headers, content=b"{}")
    assert ok.status_code == 200
    assert "Keys" in ok.json()


# --- persistence --------------------------------------------------------------------------


def test_keys_and_blobs_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "kms.sqlite3"
    store = KeyStore.open(db)
    with ServerThread(KMSService(store, _no_documents)) as first:
        kms = _client(first.endpoint)
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName="alias/kept", TargetKeyId=key)
        blob = kms.encrypt(KeyId="alias/kept", Plaintext=b"durable", EncryptionContext={"a": "b"})[
            "CiphertextBlob"
        ]
    store.close()
    assert (tmp_path / "root.key").stat().st_mode & 0o777 == 0o600
    assert b"durable" not in db.read_bytes()
    store = KeyStore.open(db)
    with ServerThread(KMSService(store, _no_documents)) as second:
        kms = _client(second.endpoint)
        out = kms.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})
        assert out["Plaintext"] == b"durable"
        assert kms.describe_key(KeyId="alias/kept")["KeyMetadata"]["KeyId"] == key
    store.close()


def test_key_material_does_not_unseal_under_another_root_key(tmp_path: Path) -> None:
    db = tmp_path / "kms.sqlite3"
    store = KeyStore.open(db)
    record = KMSService(store, _no_documents).handle(
        "CreateKey", {}, __import__("hermetic.kms.policy", fromlist=["Caller"]).Caller("a", "1")
    )["KeyMetadata"]
    store.close()
    (tmp_path / "other.key").write_bytes(os.urandom(32))
    other = KeyStore.open(db, tmp_path / "other.key")
    with pytest.raises(KMSSealedStoreError):
        other.material(other.get_key(record["KeyId"]), 1)  # type: ignore[arg-type]
    other.close()


# --- the AWS CLI --------------------------------------------------------------------------


def _aws(endpoint: str, *args: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "admin",
        "AWS_SECRET_ACCESS_KEY": "dummy",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    aws = str(Path(sys.executable).with_name("aws"))
    done = subprocess.run(
        [aws, "kms", *args, "--endpoint-url", endpoint, "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else {}


def test_aws_cli_drives_every_operation(server: ServerThread, tmp_path: Path) -> None:
    endpoint = server.endpoint

    def blob_file(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return f"fileb://{path}"

    key = _aws(endpoint, "create-key", "--description", "cli")["KeyMetadata"]["KeyId"]
    ecc = _aws(
        endpoint, "create-key", "--key-spec", "ECC_NIST_P256", "--key-usage", "KEY_AGREEMENT"
    )["KeyMetadata"]["KeyId"]
    assert _aws(endpoint, "describe-key", "--key-id", key)["KeyMetadata"]["Description"] == "cli"
    assert key in [k["KeyId"] for k in _aws(endpoint, "list-keys", "--limit", "1000")["Keys"]]
    policy = _aws(endpoint, "get-key-policy", "--key-id", key, "--policy-name", "default")
    assert "kms:*" in policy["Policy"]
    _aws(
        endpoint,
        "put-key-policy",
        "--key-id",
        key,
        "--policy-name",
        "default",
        "--policy",
        policy["Policy"].replace("key-default-1", "key-cli"),
    )
    _aws(endpoint, "create-alias", "--alias-name", "alias/cli", "--target-key-id", key)
    assert any(a["AliasName"] == "alias/cli" for a in _aws(endpoint, "list-aliases")["Aliases"])

    encrypted = _aws(
        endpoint,
        "encrypt",
        "--key-id",
        "alias/cli",
        "--plaintext",
        blob_file("plain", b"from the cli"),
        "--encryption-context",
        "app=cli",
    )
    blob = base64.b64decode(encrypted["CiphertextBlob"])
    decrypted = _aws(
        endpoint,
        "decrypt",
        "--ciphertext-blob",
        blob_file("blob", blob),
        "--encryption-context",
        "app=cli",
    )
    assert base64.b64decode(decrypted["Plaintext"]) == b"from the cli"
    moved = _aws(
        endpoint,
        "re-encrypt",
        "--ciphertext-blob",
        blob_file("blob", blob),
        "--source-encryption-context",
        "app=cli",
        "--destination-key-id",
        key,
    )
    again = _aws(
        endpoint,
        "decrypt",
        "--ciphertext-blob",
        blob_file("moved", base64.b64decode(moved["CiphertextBlob"])),
    )
    assert base64.b64decode(again["Plaintext"]) == b"from the cli"

    data_key = _aws(endpoint, "generate-data-key", "--key-id", key, "--key-spec", "AES_256")
    assert len(base64.b64decode(data_key["Plaintext"])) == 32
    sealed = _aws(
        endpoint, "generate-data-key-without-plaintext", "--key-id", key, "--number-of-bytes", "24"
    )
    assert "Plaintext" not in sealed
    pair = _aws(
        endpoint, "generate-data-key-pair", "--key-id", key, "--key-pair-spec", "ECC_NIST_P384"
    )
    assert serialization.load_der_private_key(base64.b64decode(pair["PrivateKeyPlaintext"]), None)
    assert (
        len(
            base64.b64decode(
                _aws(endpoint, "generate-random", "--number-of-bytes", "32")["Plaintext"]
            )
        )
        == 32
    )
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_der = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    shared = _aws(
        endpoint,
        "derive-shared-secret",
        "--key-id",
        ecc,
        "--key-agreement-algorithm",
        "ECDH",
        "--public-key",
        blob_file("peer", peer_der),
    )
    assert len(base64.b64decode(shared["SharedSecret"])) == 32

    _aws(endpoint, "delete-alias", "--alias-name", "alias/cli")
    deletion = _aws(
        endpoint, "schedule-key-deletion", "--key-id", key, "--pending-window-in-days", "7"
    )
    assert deletion["KeyState"] == "PendingDeletion"
