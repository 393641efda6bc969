"""Hostile requests: any JSON body to any operation only ever yields an AWS-shaped error."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermetic.errors import KMSServiceError
from hermetic.kms.policy import Caller
from hermetic.kms.server import KMSService, ServerThread, create_app
from hermetic.kms.store import KeyStore

CALLER = Caller("fuzzer", "111122223333")
FIELDS = ["KeyId", "Plaintext", "CiphertextBlob", "EncryptionContext", "Recipient", "KeySpec",
          "NumberOfBytes", "KeyPairSpec", "Policy", "PolicyName", "AliasName", "TargetKeyId",
          "DestinationKeyId", "PublicKey", "KeyAgreementAlgorithm", "PendingWindowInDays",
          "Limit", "Marker", "KeyUsage", "SourceEncryptionContext", "AttestationDocument",
          "KeyEncryptionAlgorithm", "EncryptionAlgorithm"]  # fmt: skip


def _reject_all(document: bytes) -> Any:
    from hermetic.attestation import AttestationVerifier, TrustRoot

    return AttestationVerifier(TrustRoot.aws()).verify(document)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KMSService, str]]:
    store = KeyStore.open(tmp_path_factory.mktemp("fuzz") / "kms.sqlite3")

    def verify(document: bytes) -> Any:
        verified = _reject_all(document)
        return verified.pcrs, verified.public_key, verified.module_id

    kms = KMSService(store, verify)
    key = kms.handle("CreateKey", {}, CALLER)["KeyMetadata"]["KeyId"]
    yield kms, key
    store.close()


_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5000), st.text(max_size=12),
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.sampled_from(["SYMMETRIC_DEFAULT", "AES_256", "ECC_NIST_P256", "alias/x", "ECDH",
                     "RSAES_OAEP_SHA_256", "default", "ENCRYPT_DECRYPT", "KEY_AGREEMENT"]),
)  # fmt: skip
_value = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(
        [
            "CreateKey",
            "DescribeKey",
            "ListKeys",
            "GetKeyPolicy",
            "PutKeyPolicy",
            "Encrypt",
            "Decrypt",
            "ReEncrypt",
            "GenerateDataKey",
            "GenerateDataKeyWithoutPlaintext",
            "GenerateDataKeyPair",
            "GenerateRandom",
            "DeriveSharedSecret",
            "ScheduleKeyDeletion",
            "CreateAlias",
            "ListAliases",
            "DeleteAlias",
            "GetPublicKey",
            "EnableKey",
            "DisableKey",
            "CancelKeyDeletion",
            "Nope",
        ]
    ),
    st.dictionaries(st.sampled_from(FIELDS), _value, max_size=6),
    st.booleans(),
)
def test_any_request_returns_or_raises_a_service_error(
    service: tuple[KMSService, str], operation: str, body: dict[str, Any], use_key: bool
) -> None:
    kms, key = service
    if use_key and "KeyId" in body:
        body["KeyId"] = key
    if body.get("KeyPairSpec") in ("RSA_3072", "RSA_4096"):
        body["KeyPairSpec"] = "RSA_2048"
    try:
        result = kms.handle(operation, body, CALLER)
    except KMSServiceError as exc:
        code = exc.code
    else:
        json.dumps(result)
        code = "none"
    assert code == "none" or code.endswith("Exception")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = KeyStore.open(tmp_path_factory.mktemp("fuzz-http") / "kms.sqlite3")
    with ServerThread(KMSService(store, lambda d: _reject_all(d))) as running:
        yield running.endpoint
    store.close()


@settings(max_examples=100, deadline=None)
@given(
    st.binary(max_size=200),
    st.sampled_from(["TrentService.Decrypt", "TrentService.CreateKey", "Bogus.X", "", "Trent"]),
    st.sampled_from(["", "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/kms/aws4_request",
                     "Basic abc"]),
)  # fmt: skip
def test_any_http_body_gets_an_aws_error_shape(
    endpoint: str, body: bytes, target: str, authorization: str
) -> None:
    response = httpx.post(
        endpoint + "/",
        headers={"X-Amz-Target": target, "Authorization": authorization,
                 "Content-Type": "application/x-amz-json-1.1"},
        content=body,
    )  # fmt: skip
    assert response.status_code in (200, 400)
    if response.status_code == 400:
        assert response.json()["__type"].endswith("Exception")


def test_create_app_builds_a_starlette_app(tmp_path: Path) -> None:
    store = KeyStore.open(tmp_path / "kms.sqlite3")
    assert create_app(KMSService(store, _reject_all)).routes
    store.close()
