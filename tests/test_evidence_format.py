"""EvidenceBundle encoding: byte-exact per docs/evidence.md, strict, and fuzzed.

The spec's example bundle is rebuilt by hand from the field list with cbor2 (not with
EvidenceBundle.encode) to pin the wire layout independently of the implementation.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermetic.channel.noise import StaticKeypair
from hermetic.errors import EvidenceFormatError, HermeticError
from hermetic.evidence import (
    USER_DATA_PREFIX,
    EvidenceBundle,
    parse_user_data,
    user_data,
)
from hermetic.translog.release import Endorsement
from test_client_stack import CONFIG_DIGEST, Stack, build_stack

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    return build_stack(tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="module")
def valid(stack: Stack) -> bytes:
    return stack.provider()(os.urandom(32), StaticKeypair.generate().public)


def spec_encoding(attestation: bytes, digest: bytes | None, e: Endorsement | None) -> bytes:
    """docs/evidence.md §2, written out: a map of four text keys, deterministic order."""
    endorsement = None
    if e is not None:
        endorsement = {
            "entry": e.signed.entry(),
            "index": e.index,
            "origin": e.origin,
            "checkpoint": e.checkpoint,
            "inclusion_proof": list(e.inclusion_proof),
        }
    value = {"v": 1, "attestation": attestation, "endorsement": endorsement,
             "config_digest": digest}  # fmt: skip
    return cbor2.dumps(value, canonical=True)


def test_encoding_matches_the_documented_layout(stack: Stack) -> None:
    bundle = EvidenceBundle(b"\x84document", CONFIG_DIGEST, stack.endorsement)
    data = bundle.encode()
    assert data == spec_encoding(b"\x84document", CONFIG_DIGEST, stack.endorsement)
    # Key order on the wire (RFC 8949 §4.2.1: shorter encoded keys first, then bytewise).
    assert data[:1] == b"\xa4"
    assert data[1:3] == b"\x61v"
    assert data.index(b"kattestation") < data.index(b"kendorsement") < data.index(b"mconfig_digest")


def test_round_trips_with_and_without_optional_parts(stack: Stack) -> None:
    for bundle in (
        EvidenceBundle(b"doc", CONFIG_DIGEST, stack.endorsement),
        EvidenceBundle(b"doc", None, stack.endorsement),
        EvidenceBundle(b"doc", None, None),
    ):
        decoded = EvidenceBundle.decode(bundle.encode())
        assert decoded.attestation == bundle.attestation
        assert decoded.config_digest == bundle.config_digest
        if bundle.endorsement is None:
            assert decoded.endorsement is None
        else:
            assert decoded.endorsement is not None
            assert decoded.endorsement.signed.entry() == bundle.endorsement.signed.entry()
            assert decoded.endorsement.inclusion_proof == bundle.endorsement.inclusion_proof
            assert decoded.endorsement.checkpoint == bundle.endorsement.checkpoint


def test_real_bundle_round_trips_byte_for_byte(valid: bytes) -> None:
    assert EvidenceBundle.decode(valid).encode() == valid


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(v=2), "v: expected 1"),
        (lambda m: m.pop("config_digest"), "missing key"),
        (lambda m: m.update(extra=1), "unexpected key"),
        (lambda m: m.update(config_digest=b"\x00" * 31), "config_digest: expected 32"),
        (lambda m: m.update(attestation="text"), "attestation: expected bstr"),
        (lambda m: m.update(attestation=b""), "attestation: expected 1..16384"),
        (lambda m: m.update(endorsement=[]), "endorsement: expected a map"),
        (lambda m: m["endorsement"].update(index=-1), "endorsement.index"),
        (lambda m: m["endorsement"].update(index=True), "endorsement.index"),
        (lambda m: m["endorsement"].update(inclusion_proof=[b"x"]), "inclusion_proof\\[0\\]"),
        (lambda m: m["endorsement"].update(entry=b"{}"), "endorsement.entry"),
        (lambda m: m["endorsement"].update(origin=""), "endorsement.origin"),
        (lambda m: m["endorsement"].update(checkpoint=b"x"), "endorsement.checkpoint"),
    ],
)
def test_rejects_each_malformed_field_by_name(valid: bytes, change: object, message: str) -> None:
    value = cbor2.loads(valid)
    change(value)  # type: ignore[operator]
    with pytest.raises(EvidenceFormatError, match=message):
        EvidenceBundle.decode(cbor2.dumps(value, canonical=True))


def test_rejects_non_deterministic_encodings(valid: bytes) -> None:
    value = cbor2.loads(valid)
    with pytest.raises(EvidenceFormatError, match="deterministic"):
        EvidenceBundle.decode(cbor2.dumps(dict(reversed(list(value.items())))))  # unsorted
    indefinite = b"\xbf" + valid[1:] + b"\xff"  # same pairs in an indefinite-length map
    with pytest.raises(EvidenceFormatError):
        EvidenceBundle.decode(indefinite)
    with pytest.raises(EvidenceFormatError, match="trailing"):
        EvidenceBundle.decode(valid + b"\x00")
    with pytest.raises(EvidenceFormatError):
        EvidenceBundle.decode(valid[:-1])
    non_minimal = valid.replace(b"\x61v\x01", b"\x61v\x18\x01", 1)
    with pytest.raises(EvidenceFormatError, match="deterministic"):
        EvidenceBundle.decode(non_minimal)


def test_rejects_duplicate_keys_and_tags(valid: bytes) -> None:
    with pytest.raises(EvidenceFormatError):
        EvidenceBundle.decode(b"\xa2\x61v\x01\x61v\x01")
    tagged = b"\xd8\x18" + valid  # tag 24 around the map
    with pytest.raises(EvidenceFormatError):
        EvidenceBundle.decode(tagged)


def test_rejects_oversized_input_before_decoding() -> None:
    with pytest.raises(EvidenceFormatError, match="at most"):
        EvidenceBundle.decode(b"\x00" * (256 * 1024 + 1))


def test_user_data_layout_is_prefix_then_digest() -> None:
    assert USER_DATA_PREFIX == b"hermetic.evidence/v1"
    assert len(USER_DATA_PREFIX) == 20
    assert user_data(CONFIG_DIGEST) == b"hermetic.evidence/v1" + CONFIG_DIGEST
    assert user_data(None) == b"hermetic.evidence/v1"
    assert parse_user_data(user_data(CONFIG_DIGEST)) == CONFIG_DIGEST
    assert parse_user_data(user_data(None)) is None
    for bad in (None, CONFIG_DIGEST, USER_DATA_PREFIX + b"\x00" * 31, b"hermetic.evidence/v2"):
        with pytest.raises(EvidenceFormatError):
            parse_user_data(bad)
    with pytest.raises(EvidenceFormatError):
        user_data(b"short")


# --- fuzzing: only HermeticError ever escapes ----------------------------------------------


@FUZZ
@given(st.binary(max_size=4096))
def test_decode_arbitrary_bytes_raises_only_hermetic_errors(data: bytes) -> None:
    with contextlib.suppress(HermeticError):
        EvidenceBundle.decode(data)


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.binary(max_size=64)
    | st.text(max_size=32) | st.floats(allow_nan=True),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=16), inner,
                                                                 max_size=5),
    max_leaves=20,
)  # fmt: skip


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "v": cbor_values | st.just(1),
            "attestation": cbor_values | st.binary(min_size=1, max_size=64),
            "config_digest": cbor_values | st.binary(min_size=32, max_size=32),
            "endorsement": cbor_values
            | st.fixed_dictionaries(
                {},
                optional={
                    "entry": cbor_values | st.binary(max_size=64),
                    "origin": cbor_values,
                    "index": cbor_values | st.integers(0, 2**64),
                    "inclusion_proof": cbor_values
                    | st.lists(st.binary(min_size=32, max_size=32), max_size=3),
                    "checkpoint": cbor_values,
                },
            ),
        },
    ),
    st.booleans(),
)
def test_decode_bundle_shaped_maps_raises_only_hermetic_errors(
    value: dict[str, object], canonical: bool
) -> None:
    try:
        data = cbor2.dumps(value, canonical=canonical)
    except (ValueError, TypeError, cbor2.CBORError):
        return
    try:
        decoded = EvidenceBundle.decode(data)
    except HermeticError:
        return
    # Accepted only as the one encoding of a well-formed bundle (e.g. no endorsement, keys
    # drawn in canonical order): nothing else decodes.
    assert value["endorsement"] is None
    assert decoded.encode() == data


@FUZZ
@given(st.data())
def test_decode_spliced_real_bundles_raises_only_hermetic_errors(
    valid: bytes, data: st.DataObject
) -> None:
    start = data.draw(st.integers(0, len(valid)))
    end = data.draw(st.integers(start, min(len(valid), start + 64)))
    insert = data.draw(st.binary(max_size=16))
    try:
        decoded = EvidenceBundle.decode(valid[:start] + insert + valid[end:])
    except HermeticError:
        return
    assert decoded.encode() == valid[:start] + insert + valid[end:]


def test_encode_rejects_values_that_cannot_be_on_the_wire(stack: Stack, tmp_path: Path) -> None:
    with pytest.raises(EvidenceFormatError):
        EvidenceBundle(b"", None, None).encode()
    with pytest.raises(EvidenceFormatError):
        EvidenceBundle(b"doc", b"\x00" * 16, None).encode()
    from dataclasses import replace

    with pytest.raises(EvidenceFormatError):
        EvidenceBundle(b"doc", None, replace(stack.endorsement, origin="\ud800")).encode()
