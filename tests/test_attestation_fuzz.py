"""Property tests: whatever bytes or CBOR reach the decoder, only HermeticErrors escape."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermetic.attestation import (
    AttestationVerifier,
    Policy,
    TrustRoot,
    decode,
    decode_cose_sign1,
    decode_payload,
    encode_payload,
)
from hermetic.attestation.codec import FIELD_ORDER
from hermetic.errors import AttestationFormatError, HermeticError

pytestmark = pytest.mark.timeout(120)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.binary(max_size=80),
    st.text(max_size=20),
    st.sampled_from(list(FIELD_ORDER)),
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = st.one_of(st.integers(-2, 40), st.text(max_size=10), st.sampled_from(FIELD_ORDER))
    return st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(keys, children, max_size=6),
        st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 18, 24, 28, 29, 258, 1000]), children),
    )


cbor_values = st.recursive(_scalars, _containers, max_leaves=25)

# Maps shaped like a real payload: every real key, values of the right or the wrong type.
_field_values = st.one_of(
    cbor_values,
    st.binary(min_size=0, max_size=1100),
    st.dictionaries(st.integers(-1, 33), st.binary(min_size=30, max_size=66), max_size=34),
    st.lists(st.binary(min_size=0, max_size=40), max_size=3),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.just("SHA384"),
)
payload_maps = st.fixed_dictionaries(
    {},
    optional={name: _field_values for name in FIELD_ORDER},
)

cose_arrays = st.tuples(
    st.one_of(st.just(bytes.fromhex("a1013822")), st.binary(max_size=6), cbor_values),
    st.one_of(st.just({}), cbor_values),
    st.one_of(st.binary(max_size=200), cbor_values),
    st.one_of(st.binary(min_size=96, max_size=96), st.binary(max_size=100), cbor_values),
).map(list)


def _dumps(value: Any) -> bytes:
    try:
        return cbor2.dumps(value)
    except (cbor2.CBOREncodeError, ValueError, TypeError, OverflowError):
        return b"\xf7"  # undefined: still something the decoder must reject cleanly


def _only_hermetic_errors(data: bytes) -> None:
    for function in (decode, decode_cose_sign1, decode_payload):
        with contextlib.suppress(HermeticError):
            function(data)


@given(st.binary(max_size=2048))
@settings(max_examples=400, deadline=None)
def test_arbitrary_bytes_raise_only_hermetic_errors(data: bytes) -> None:
    _only_hermetic_errors(data)


@given(cbor_values)
@settings(max_examples=400, deadline=None)
def test_arbitrary_cbor_raises_only_hermetic_errors(value: Any) -> None:
    _only_hermetic_errors(_dumps(value))


@given(payload_maps, st.booleans())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_payload_shaped_maps_decode_or_raise_format_errors(
    fields: dict[str, Any], indefinite: bool
) -> None:
    data = _dumps(fields)
    if indefinite and data[:1] != b"\xf7":
        data = b"\xbf" + _dumps_items(fields) + b"\xff"
    try:
        doc = decode_payload(data)
    except AttestationFormatError:
        return
    # Whatever decoded is a valid document and survives a round trip.
    assert decode_payload(encode_payload(doc)) == doc


def _dumps_items(fields: dict[str, Any]) -> bytes:
    return b"".join(_dumps(k) + _dumps(v) for k, v in fields.items())


@given(cose_arrays, st.booleans())
@settings(max_examples=400, deadline=None)
def test_cose_shaped_arrays_raise_only_hermetic_errors(item: list[Any], tagged: bool) -> None:
    _only_hermetic_errors(_dumps(cbor2.CBORTag(18, item) if tagged else item))


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_real_document_with_spliced_garbage_never_escapes(
    vectors: Path, data: st.DataObject
) -> None:
    doc = (vectors / "nitro" / "libsignal-2.cbor").read_bytes()
    start = data.draw(st.integers(0, len(doc)))
    end = data.draw(st.integers(start, min(len(doc), start + 64)))
    garbage = data.draw(st.binary(max_size=64))
    mutant = doc[:start] + garbage + doc[end:]
    verifier = AttestationVerifier(TrustRoot.aws())
    now = datetime.fromtimestamp(1705431295, UTC)
    try:
        verifier.verify(mutant, Policy(), now)
    except HermeticError:
        return
    assert mutant == doc  # only the unmodified document may verify
