"""The client's trust file and policy file: what they pin, and every way they can be wrong."""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.attestation.roots import AWS_ROOT_G1_SHA256
from hermetic.client import ClientTrust, ServicePolicy, write_trust_bundle
from hermetic.errors import ClientTrustError, HermeticError, TrustBundleError, UsageError
from hermetic.translog.note import generate_key
from test_client_stack import Stack, build_stack


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return build_stack(tmp_path / "stack")


def trust_json(stack: Stack) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(stack.trust_path.read_text())
    return value


def test_written_trust_file_has_root_log_and_publishers(stack: Stack) -> None:
    value = trust_json(stack)
    assert value["nitro_root"]["name"] == "dev"
    assert value["nitro_root"]["sha256"] == stack.trust.root.fingerprint
    assert value["nitro_root"]["pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert value["log"]["vkey"] == stack.log_signer.vkey
    assert value["log"]["threshold"] == 2
    assert [p["name"] for p in value["publishers"]] == ["acme"]
    assert ClientTrust.from_json(value).to_json() == value


def test_aws_root_is_pinned_by_its_published_fingerprint(stack: Stack) -> None:
    value = trust_json(stack)
    value["nitro_root"] = {"name": "aws"}
    assert ClientTrust.from_json(value).root.fingerprint == AWS_ROOT_G1_SHA256
    value["nitro_root"] = {"name": "aws", "sha256": "00" * 32}
    with pytest.raises(ClientTrustError, match="fingerprint"):
        ClientTrust.from_json(value)


def test_dev_root_without_pem_comes_from_the_state_dir_and_must_match_the_pin(
    stack: Stack,
) -> None:
    value = trust_json(stack)
    value["nitro_root"] = {"name": "dev", "sha256": stack.trust.root.fingerprint}
    assert ClientTrust.from_json(value).root.fingerprint == stack.trust.root.fingerprint
    value["nitro_root"]["sha256"] = "ab" * 32
    with pytest.raises(ClientTrustError, match="fingerprint"):
        ClientTrust.from_json(value)


@pytest.mark.parametrize(
    ("root", "message"),
    [
        (None, "nitro_root"),
        ("dev", "must be an object"),
        ({"name": "custom"}, "needs a pem"),
        ({"name": "x", "pem": "-----BEGIN CERTIFICATE-----"}, "pinned by its sha256"),
        ({"name": "x", "pem": "not a pem", "sha256": "00" * 32}, "not a PEM"),
        ({"name": "dev", "sha256": "XYZ"}, "64 lowercase hex"),
        ({"name": "dev", "colour": "red"}, "unexpected field"),
        ({"name": ""}, "non-empty"),
    ],
)
def test_rejects_bad_nitro_root_sections(stack: Stack, root: Any, message: str) -> None:
    value = trust_json(stack)
    if root is None:
        del value["nitro_root"]
    else:
        value["nitro_root"] = root
    with pytest.raises(ClientTrustError, match=message):
        ClientTrust.from_json(value)


def test_rejects_bad_log_sections_with_the_log_colleagues_errors(stack: Stack) -> None:
    value = trust_json(stack)
    value["log"]["threshold"] = 3  # only two witnesses
    with pytest.raises(TrustBundleError, match="threshold"):
        ClientTrust.from_json(value)


def test_unreadable_trust_files_are_usage_errors(tmp_path: Path) -> None:
    for content in (None, b"\xff", b"[1, 2]", b'{"a": 1, "a": 2}', b'{"x": 1.5}'):
        path = tmp_path / "trust.json"
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)
        with pytest.raises(UsageError):
            ClientTrust.load(path)


def test_write_trust_bundle_creates_the_dev_pki_when_missing(tmp_path: Path) -> None:
    _, vkey = generate_key("log.test")
    trust = write_trust_bundle(tmp_path / "out" / "trust.json", log_vkey=vkey)
    assert trust.root.name == "dev"
    assert ClientTrust.load(tmp_path / "out" / "trust.json").root == trust.root


def test_write_trust_bundle_refuses_an_invalid_bundle_and_leaves_no_file(tmp_path: Path) -> None:
    _, vkey = generate_key("log.test")
    target = tmp_path / "trust.json"
    with pytest.raises(HermeticError):
        write_trust_bundle(target, log_vkey=vkey, threshold=1)  # no witnesses
    with pytest.raises(HermeticError):
        write_trust_bundle(target, log_vkey="garbage")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


# --- policy ---------------------------------------------------------------------------------


def test_policy_file_round_trips(tmp_path: Path) -> None:
    value = {"services": ["echo"], "versions": ["1.0"], "pcr0": ["ab" * 48],
             "config_digests": ["cd" * 32], "allow_debug": True, "max_age_seconds": 60}  # fmt: skip
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(value))
    policy = ServicePolicy.load(path)
    assert policy.services == frozenset({"echo"})
    assert policy.max_age == timedelta(seconds=60)
    assert policy.allow_debug is True
    assert policy.to_json() == value


def test_empty_policy_accepts_any_logged_service_without_debug() -> None:
    policy = ServicePolicy.from_json({})
    assert policy.services is None
    assert policy.allow_debug is False
    assert policy.max_age == timedelta(minutes=5)


@pytest.mark.parametrize(
    "value",
    [
        [],
        {"services": "echo"},
        {"services": [1]},
        {"allow_debug": "yes"},
        {"max_age_seconds": -1},
        {"max_age_seconds": True},
        {"pcr0": ["not hex"]},
        {"surprise": 1},
    ],
)
def test_rejects_bad_policy_files(value: Any) -> None:
    with pytest.raises(ClientTrustError):
        ServicePolicy.from_json(value)


def test_service_option_narrows_a_policy_and_cannot_widen_it() -> None:
    assert ServicePolicy().with_service("echo").services == frozenset({"echo"})
    narrow = ServicePolicy(services=frozenset({"a", "b"}))
    assert narrow.with_service("a").services == frozenset({"a"})
    with pytest.raises(ClientTrustError):
        narrow.with_service("c")
    assert narrow.with_service(None) is narrow
    assert narrow.with_debug(True).allow_debug is True
    assert ServicePolicy(allow_debug=True).with_debug(False).allow_debug is True


# --- fuzzing: only HermeticError escapes the file loaders -------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=16,
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "nitro_root": json_values
            | st.fixed_dictionaries(
                {}, optional={"name": json_values, "sha256": json_values, "pem": json_values}
            ),
            "log": json_values,
            "publishers": json_values,
        },
    )
)
def test_trust_loader_raises_only_hermetic_errors(value: dict[str, Any]) -> None:
    with contextlib.suppress(HermeticError):
        ClientTrust.from_json(value)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "services",
                "versions",
                "pcr0",
                "config_digests",
                "allow_debug",
                "max_age_seconds",
                "x",
            ]
        ),
        json_values,
    )
)
def test_policy_loader_raises_only_hermetic_errors(value: dict[str, Any]) -> None:
    with contextlib.suppress(HermeticError):
        ServicePolicy.from_json(value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_trust_bytes_raise_only_hermetic_errors(data: bytes) -> None:
    with contextlib.suppress(HermeticError):
        ClientTrust.loads(data)
