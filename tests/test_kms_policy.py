"""Key policies: the evaluation rules, the parser's rejections, and the release helper."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.attestation import TrustRoot
from hermetic.cli.kms import kms as kms_cli
from hermetic.errors import (
    KeyPolicyFormatError,
    KMSAccessDeniedError,
    ReleaseEndorsementFormatError,
    UsageError,
)
from hermetic.kms.client import EnclaveKMSClient, KMSCredentials
from hermetic.kms.keypolicy import (
    ReleaseReference,
    load_release_reference,
    policy_sha256,
    release_key_policy,
    rewrite_risks,
)
from hermetic.kms.policy import Caller, KeyPolicy, canonical_json
from hermetic.kms.server import AttestationEvidenceVerifier, KMSService, ServerThread
from hermetic.kms.store import KeyStore
from hermetic.nsm import DevPKI, EmulatedNSM, NSMClient
from hermetic.translog.release import Endorsement, ReleaseStatement, sign_statement

ACCOUNT = "111122223333"
KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/k"
ALICE = Caller("alice", ACCOUNT)
PCR0 = "ab" * 48


def _policy(*statements: dict[str, Any]) -> KeyPolicy:
    return KeyPolicy.parse(json.dumps({"Version": "2012-10-17", "Statement": list(statements)}))


def _allow(**extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*", **extra}


# --- evaluation ---------------------------------------------------------------------------


def test_default_deny_when_no_statement_matches_the_action() -> None:
    decision = _policy(_allow(Action="kms:Encrypt")).evaluate(ALICE, "kms:Decrypt", KEY, {})
    assert not decision.allowed
    assert "no statement allows kms:Decrypt" in decision.reason


def test_explicit_deny_wins_over_allow() -> None:
    policy = _policy(_allow(), {**_allow(Action="kms:Decrypt"), "Effect": "Deny", "Sid": "no"})
    assert not policy.evaluate(ALICE, "kms:Decrypt", KEY, {}).allowed
    assert policy.evaluate(ALICE, "kms:Encrypt", KEY, {}).allowed


@pytest.mark.parametrize(
    ("pattern", "action", "allowed"),
    [
        ("kms:*", "kms:Decrypt", True),
        ("kms:Generate*", "kms:GenerateDataKey", True),
        ("kms:Generate*", "kms:GenerateDataKeyPair", True),
        ("kms:generate*", "kms:GenerateRandom", True),
        ("kms:Generate*", "kms:Decrypt", False),
        ("kms:GenerateDataKey", "kms:GenerateDataKeyPair", False),
        ("kms:Decr?pt", "kms:Decrypt", True),
        ("kms:[D]ecrypt", "kms:Decrypt", False),
    ],
)
def test_action_wildcards(pattern: str, action: str, allowed: bool) -> None:
    assert _policy(_allow(Action=pattern)).evaluate(ALICE, action, KEY, {}).allowed is allowed


@pytest.mark.parametrize(
    ("principal", "caller", "allowed"),
    [
        ("*", "anyone", True),
        ({"AWS": "*"}, "anyone", True),
        ({"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "anyone", True),
        ({"AWS": ACCOUNT}, "anyone", True),
        ({"AWS": f"arn:aws:iam::{ACCOUNT}:role/enclave"}, "enclave", True),
        ({"AWS": f"arn:aws:iam::{ACCOUNT}:role/enclave"}, "admin", False),
        ({"AWS": ["x", f"arn:aws:iam::{ACCOUNT}:user/admin"]}, "admin", True),
        ({"AWS": "arn:aws:iam::999999999999:root"}, "anyone", False),
        ({"AWS": "arn:aws:iam::999999999999:role/enclave"}, "enclave", False),
    ],
)
def test_principal_matching(principal: Any, caller: str, allowed: bool) -> None:
    policy = _policy(_allow(Principal=principal))
    assert policy.evaluate(Caller(caller, ACCOUNT), "kms:Decrypt", KEY, {}).allowed is allowed


def _pinned(operator: str = "StringEqualsIgnoreCase", value: Any = PCR0) -> KeyPolicy:
    return _policy(_allow(Condition={operator: {"kms:RecipientAttestation:ImageSha384": value}}))


def test_condition_on_absent_key_denies() -> None:
    decision = _pinned().evaluate(ALICE, "kms:Decrypt", KEY, {})
    assert not decision.allowed
    assert "kms:RecipientAttestation:ImageSha384" in decision.reason
    assert "got <absent>" in decision.reason


def test_if_exists_condition_passes_when_absent() -> None:
    assert _pinned("StringEqualsIfExists").evaluate(ALICE, "kms:Decrypt", KEY, {}).allowed


@pytest.mark.parametrize(
    ("operator", "value", "actual", "allowed"),
    [
        ("StringEquals", PCR0, PCR0, True),
        ("StringEquals", PCR0.upper(), PCR0, False),
        ("StringEqualsIgnoreCase", PCR0.upper(), PCR0, True),
        ("StringEqualsIgnoreCase", PCR0, "cd" * 48, False),
        ("StringEquals", ["00" * 48, PCR0], PCR0, True),
        ("StringLike", "ab*", PCR0, True),
        ("StringLike", "cd*", PCR0, False),
    ],
)
def test_condition_operators(operator: str, value: Any, actual: str, allowed: bool) -> None:
    context = {"kms:RecipientAttestation:ImageSha384": actual}
    decision = _pinned(operator, value).evaluate(ALICE, "kms:Decrypt", KEY, context)
    assert decision.allowed is allowed
    if not allowed:
        assert repr(actual) in decision.reason


def test_condition_key_names_are_case_insensitive() -> None:
    context = {"KMS:recipientattestation:imagesha384": PCR0}
    assert _pinned().evaluate(ALICE, "kms:Decrypt", KEY, context).allowed


def test_encryption_context_conditions() -> None:
    policy = _policy(_allow(Condition={"StringEquals": {"kms:EncryptionContext:tenant": "a"}}))
    assert policy.evaluate(ALICE, "kms:Decrypt", KEY, {"kms:EncryptionContext:tenant": "a"}).allowed
    assert not policy.evaluate(
        ALICE, "kms:Decrypt", KEY, {"kms:EncryptionContext:tenant": "b"}
    ).allowed
    assert not policy.evaluate(
        ALICE, "kms:Decrypt", KEY, {"kms:EncryptionContext:Tenant": "a"}
    ).allowed


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [
        "",
        "{",
        "[]",
        '{"Statement": []}',
        '{"Statement": "x"}',
        '{"Version": "2020-01-01", "Statement": [{}]}',
        '{"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}',
        '{"Statement": [{"Effect": "Allow", "Principal": "me", "Action": "kms:*",'
        ' "Resource": "*"}]}',
        '{"Statement": [{"Effect": "Allow", "Principal": "*", "Resource": "*"}]}',
        '{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": [], "Resource": "*"}]}',
        '{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*"}]}',
        '{"Statement": [{"Effect": "Allow", "Principal": "*", "NotAction": "kms:*",'
        ' "Resource": "*"}]}',
        '{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*",'
        ' "Condition": {"Bool": {"aws:SecureTransport": "true"}}}]}',
        '{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*",'
        ' "Condition": {"StringEquals": {"k": {"nested": 1}}}}]}',
        '{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*",'
        ' "Condition": {"StringEquals": {"k": []}}}]}',
        '{"Statement": [1]}',
        '{"Statement": [], "Extra": 1}',
        json.dumps({"Statement": [_allow(Sid="x" * 40000)]}),
    ],
)
def test_parser_rejects_what_it_cannot_read_like_aws(document: str) -> None:
    with pytest.raises(KeyPolicyFormatError):
        KeyPolicy.parse(document)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
_keys = st.sampled_from(
    [
        "Version",
        "Statement",
        "Effect",
        "Principal",
        "Action",
        "Resource",
        "Condition",
        "AWS",
        "StringEquals",
        "Sid",
        "Id",
    ]
)
_policyish = st.recursive(
    st.sampled_from(["Allow", "Deny", "*", "kms:*", "2012-10-17", "x"]) | st.integers(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json, _policyish), st.sampled_from(["kms:Decrypt", "kms:PutKeyPolicy"]))
def test_arbitrary_json_parses_or_raises_format_error(tree: Any, action: str) -> None:
    try:
        policy = KeyPolicy.parse(json.dumps(tree))
    except KeyPolicyFormatError:
        return
    decision = policy.evaluate(ALICE, action, KEY, {"kms:RecipientAttestation:PCR0": PCR0})
    assert isinstance(decision.allowed, bool)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_format_error(text: str) -> None:
    with contextlib.suppress(KeyPolicyFormatError):
        KeyPolicy.parse(text)


# --- the release helper -------------------------------------------------------------------

RELEASE_PCRS = {i: hashlib.sha384(f"release-pcr{i}".encode()).digest() for i in (0, 1, 2)}


def _endorsement_file(tmp_path: Path) -> Path:
    """A real ``hermetic.translog`` endorsement for a release with RELEASE_PCRS."""
    statement = ReleaseStatement(
        service="reporting",
        version="1.2.0",
        pcr0=RELEASE_PCRS[0].hex(),
        pcr1=RELEASE_PCRS[1].hex(),
        pcr2=RELEASE_PCRS[2].hex(),
        pcr8=None,
        config_policy_digest=None,
        source_revision=None,
        build_time="2026-11-28T00:00:00Z",
    )
    signed = sign_statement(statement, ed25519.Ed25519PrivateKey.generate())
    endorsement = Endorsement(signed, "example.org/log", 0, (), "example.org/log\n1\nAAAA\n")
    path = tmp_path / "release.endorsement.json"
    path.write_bytes(endorsement.dumps())
    return path


@pytest.mark.parametrize("shape", ["endorsement", "signed", "statement", "wrapped"])
def test_release_reference_reads_every_shape(tmp_path: Path, shape: str) -> None:
    endorsement = json.loads(_endorsement_file(tmp_path).read_text())
    tree = {
        "endorsement": endorsement,
        "signed": endorsement["entry"],
        "statement": endorsement["entry"]["statement"],
        "wrapped": {"statement": endorsement["entry"]["statement"]},
    }[shape]
    reference = load_release_reference(json.dumps(tree))
    assert reference.pcrs == {i: v.hex() for i, v in RELEASE_PCRS.items()}
    assert reference.service == "reporting"


@pytest.mark.parametrize(
    "document",
    [
        "nope",
        "{}",
        '{"statement": {"pcr0": "ab"}}',
        json.dumps({"pcr0": "00" * 48, "pcr1": "00" * 48, "pcr2": "00" * 48}),
        json.dumps({"pcr0": 1, "pcr1": "a", "pcr2": "b"}),
    ],
)
def test_release_reference_rejects_unusable_documents(document: str) -> None:
    with pytest.raises(ReleaseEndorsementFormatError):
        load_release_reference(document)


def test_release_policy_is_least_privilege() -> None:
    reference = ReleaseReference({i: v.hex() for i, v in RELEASE_PCRS.items()})
    policy = release_key_policy(reference, account=ACCOUNT)
    release, admin = policy["Statement"]
    assert release["Action"] == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert set(release["Condition"]["StringEqualsIgnoreCase"]) == {
        "kms:RecipientAttestation:ImageSha384",
        "kms:RecipientAttestation:PCR1",
        "kms:RecipientAttestation:PCR2",
    }
    parsed = KeyPolicy.parse(json.dumps(policy))
    for action in (
        "kms:Decrypt",
        "kms:GenerateDataKey",
        "kms:ReEncryptFrom",
        "kms:CreateGrant",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:Encrypt",
    ):
        assert not parsed.evaluate(ALICE, action, KEY, {}).allowed, action
    assert "kms:*" not in json.dumps(policy)
    assert admin["Sid"] == "KeyAdministration"
    assert rewrite_risks(policy)  # the admin may PutKeyPolicy unconditionally...
    immutable = release_key_policy(reference, account=ACCOUNT, immutable=True)
    assert rewrite_risks(immutable) == []  # ...unless the policy is made immutable


def test_policy_digest_is_sha256_of_canonical_json() -> None:
    policy = release_key_policy(ReleaseReference({0: PCR0}), account=ACCOUNT)
    assert policy_sha256(policy) == hashlib.sha256(canonical_json(policy)).hexdigest()
    reordered = dict(reversed(list(policy.items())))
    assert policy_sha256(reordered) == policy_sha256(policy)


def test_cli_policy_from_pcr0_prints_policy_digest_and_warning() -> None:
    result = CliRunner().invoke(kms_cli, ["policy", "--pcr0", PCR0, "--pcr", "3=" + "cd" * 48])
    assert result.exit_code == 0, result.output
    policy = json.loads(result.stdout)
    conditions = policy["Statement"][0]["Condition"]["StringEqualsIgnoreCase"]
    assert conditions["kms:RecipientAttestation:ImageSha384"] == PCR0
    assert conditions["kms:RecipientAttestation:PCR3"] == "cd" * 48
    assert f"policy sha256 {policy_sha256(policy)}" in result.stderr
    assert "warning:" in result.stderr
    assert "kms:PutKeyPolicy" in result.stderr


def test_cli_policy_rejects_bad_input() -> None:
    runner = CliRunner()
    assert runner.invoke(kms_cli, ["policy"]).exit_code != 0
    assert runner.invoke(kms_cli, ["policy", "--pcr0", "xyz"]).exit_code != 0
    assert runner.invoke(kms_cli, ["policy", "--pcr0", PCR0, "--pcr", "three"]).exit_code != 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pcr0", "xyz"], "--pcr0: expected hex, got 'xyz'"),
        (["--pcr0", PCR0, "--pcr", "three"], "--pcr: expected N=HEX, got 'three'"),
        (["--pcr0", PCR0, "--pcr", "3=zz"], "--pcr 3: expected hex, got 'zz'"),
        (["--pcr0", PCR0, "--pcr", "3=abcd"], "--pcr 3: expected 48 bytes, got 2"),
        (["--pcr0", PCR0, "--pcr", "32=" + "cd" * 48], "--pcr: index must be 0..31, got 32"),
        (["--pcr0", PCR0, "--pcr", "0=" + "cd" * 48], "--pcr 0: conflicts with the release"),
    ],
)
def test_cli_policy_names_the_bad_option_like_the_other_commands(
    args: list[str], message: str
) -> None:
    result = CliRunner().invoke(kms_cli, ["policy", *args])
    assert isinstance(result.exception, UsageError), result.output
    assert str(result.exception).startswith(message)


def test_cli_policy_accepts_upper_case_hex_and_writes_it_lower_case() -> None:
    result = CliRunner().invoke(
        kms_cli, ["policy", "--pcr0", PCR0.upper(), "--pcr", "0=" + PCR0.upper()]
    )
    assert result.exit_code == 0, result.output
    conditions = json.loads(result.stdout)["Statement"][0]["Condition"]["StringEqualsIgnoreCase"]
    assert conditions["kms:RecipientAttestation:ImageSha384"] == PCR0.lower()


# --- acceptance: the helper's policy admits exactly its release ---------------------------


@pytest.fixture(scope="module")
def release_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerThread, DevPKI]]:
    base = tmp_path_factory.mktemp("release-kms")
    pki = DevPKI(base / "pki")
    root_pem = pki.root(datetime.now(UTC)).public_bytes(serialization.Encoding.PEM)
    verifier = AttestationEvidenceVerifier(
        TrustRoot.from_pem(root_pem), max_age=timedelta(minutes=5)
    )
    store = KeyStore.open(base / "kms.sqlite3")
    with ServerThread(KMSService(store, verifier)) as running:
        yield running, pki
    store.close()


@pytest.mark.parametrize("differs", [None, 0, 1, 2])
def test_helper_policy_admits_exactly_its_release(
    release_server: tuple[ServerThread, DevPKI], tmp_path: Path, differs: int | None
) -> None:
    server, pki = release_server
    out = tmp_path / "policy.json"
    result = CliRunner().invoke(
        kms_cli, ["policy", "--release", str(_endorsement_file(tmp_path)), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    admin = boto3.session.Session(
        aws_access_key_id="admin", aws_secret_access_key="x", region_name="us-east-1"
    ).client("kms", endpoint_url=server.endpoint)
    key = admin.create_key()["KeyMetadata"]["KeyId"]
    admin.put_key_policy(KeyId=key, PolicyName="default", Policy=out.read_text())
    assert json.loads(result.stdout)["sha256"] == policy_sha256(
        json.loads(admin.get_key_policy(KeyId=key)["Policy"])
    )
    with pytest.raises(ClientError):  # the admin statement cannot decrypt
        admin.generate_data_key(KeyId=key, KeySpec="AES_256")

    pcrs = dict(RELEASE_PCRS)
    if differs is not None:
        pcrs[differs] = hashlib.sha384(b"not the release").digest()
    client = EnclaveKMSClient(
        NSMClient(EmulatedNSM(pcrs, pki=pki)),
        KMSCredentials("enclave", "x"),
        region="us-east-1",
        endpoint_url=server.endpoint,
        max_attempts=1,
    )
    if differs is None:
        data_key = client.generate_data_key(key)
        assert client.decrypt(data_key.ciphertext_blob) == data_key.plaintext
    else:
        with pytest.raises(KMSAccessDeniedError, match=f"PCR{differs}|ImageSha384"):
            client.generate_data_key(key)


def test_immutable_policy_needs_the_bypass_and_then_cannot_change(
    release_server: tuple[ServerThread, DevPKI],
) -> None:
    server, _ = release_server
    admin = boto3.session.Session(
        aws_access_key_id="admin", aws_secret_access_key="x", region_name="us-east-1"
    ).client("kms", endpoint_url=server.endpoint)
    key = admin.create_key()["KeyMetadata"]["KeyId"]
    policy = json.dumps(
        release_key_policy(ReleaseReference({0: PCR0}), account=ACCOUNT, immutable=True)
    )
    with pytest.raises(ClientError) as caught:
        admin.put_key_policy(KeyId=key, PolicyName="default", Policy=policy)
    assert caught.value.response["Error"]["Code"] == "MalformedPolicyDocumentException"
    admin.put_key_policy(
        KeyId=key, PolicyName="default", Policy=policy, BypassPolicyLockoutSafetyCheck=True
    )
    with pytest.raises(ClientError) as caught:
        admin.put_key_policy(
            KeyId=key, PolicyName="default", Policy=policy, BypassPolicyLockoutSafetyCheck=True
        )
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"
