"""The shared strict CBOR decoder: one item, opaque tags, bounded depth, unique keys."""

from __future__ import annotations

import contextlib
import datetime
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.cbor import MAX_DEPTH, SEMANTIC_TAGS, canonical_dumps, strict_loads
from hermetic.errors import EvidenceFormatError, NSMError


def _loads(data: Any, **kwargs: Any) -> Any:
    return strict_loads(data, what="thing", error=EvidenceFormatError, **kwargs)


def test_decodes_one_item() -> None:
    assert _loads(cbor2.dumps({"a": [1, b"x", None]})) == {"a": [1, b"x", None]}


def test_rejects_trailing_bytes_with_their_count() -> None:
    with pytest.raises(EvidenceFormatError, match=r"^thing: 2 trailing byte\(s\) after"):
        _loads(cbor2.dumps(1) + b"\x01\x02")


def test_rejects_truncated_input_as_invalid_cbor() -> None:
    with pytest.raises(EvidenceFormatError, match=r"^thing: not valid CBOR \(truncated\)$"):
        _loads(cbor2.dumps(b"abcdef")[:-1])


def test_rejects_empty_input() -> None:
    with pytest.raises(EvidenceFormatError, match=r"^thing: not valid CBOR"):
        _loads(b"")


def test_rejects_duplicate_map_keys() -> None:
    with pytest.raises(EvidenceFormatError, match=r"^thing: not valid CBOR \(duplicate map key\)$"):
        _loads(b"\xa2\x61a\x01\x61a\x02")


MARKER = "s3cret-marker-7f3a"


@pytest.mark.parametrize(
    "key",
    [MARKER, MARKER.encode(), 7_345_991_201],
    ids=["text", "bytes", "int"],
)
def test_duplicate_key_error_never_echoes_the_key_or_value(key: object) -> None:
    # {key: MARKER, key: MARKER} written by hand: cbor2 cannot encode a duplicate key.
    entry = cbor2.dumps(key) + cbor2.dumps(MARKER)
    with pytest.raises(EvidenceFormatError) as info:
        _loads(b"\xa2" + entry + entry)
    message = str(info.value)
    assert message == "thing: not valid CBOR (duplicate map key)"
    assert MARKER not in message
    assert str(key) not in message


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\xff", "unexpected break code"),
        (b"\x1c", "malformed unsigned integer"),
        (b"\x62\xff\xfe", "text string is not valid UTF-8"),
        (b"\x5f\x01\xff", "malformed byte string"),
        (b"\xf8\x01", "malformed special value"),
    ],
)
def test_other_decoder_errors_are_named_by_kind(data: bytes, kind: str) -> None:
    with pytest.raises(EvidenceFormatError) as info:
        _loads(data)
    assert str(info.value) == f"thing: not valid CBOR ({kind})"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="XYZQ#@", min_size=8, max_size=16), st.integers(1, 3))
def test_decoder_messages_never_contain_decoded_text(marker: str, pairs: int) -> None:
    # Duplicate key after `pairs` good entries, or truncation right after the marker: the
    # message is built from fixed words only (none use this alphabet), so the decoded
    # marker can never show up in it.
    good = b"".join(cbor2.dumps(f"{marker}{n}") + cbor2.dumps(marker) for n in range(pairs))
    entry = cbor2.dumps(marker) + cbor2.dumps(marker)
    for data in (
        bytes([0xA0 + pairs + 2]) + good + entry + entry,
        b"\x83" + cbor2.dumps(marker) * 2,
    ):
        with pytest.raises(EvidenceFormatError) as info:
            _loads(data)
        assert marker not in str(info.value)


def test_rejects_nesting_deeper_than_the_bound() -> None:
    deep = b"\x81" * (MAX_DEPTH + 1) + b"\x00"
    with pytest.raises(
        EvidenceFormatError, match=rf"not valid CBOR \(nesting depth above {MAX_DEPTH}"
    ):
        _loads(deep)
    assert _loads(deep, max_depth=MAX_DEPTH + 2) is not None


@pytest.mark.parametrize("tag", SEMANTIC_TAGS)
def test_semantic_tags_decode_as_opaque_tags(tag: int) -> None:
    value = _loads(cbor2.dumps(cbor2.CBORTag(tag, b"\x01")))
    assert isinstance(value, cbor2.CBORTag)
    assert value.tag == tag


def test_bignum_is_not_coerced_to_an_integer() -> None:
    value = _loads(cbor2.dumps(2**70))
    assert isinstance(value, cbor2.CBORTag)
    assert value.tag == 2


def test_rejects_non_bytes_input_with_the_callers_error() -> None:
    with pytest.raises(EvidenceFormatError, match=r"^thing: expected bytes, got str"):
        _loads("text")


def test_error_factory_can_carry_extra_fields() -> None:
    with pytest.raises(NSMError) as info:
        strict_loads(b"\xff", what="req", error=lambda m: NSMError(m, "InvalidArgument"))
    assert info.value.code == "InvalidArgument"


def test_canonical_dumps_sorts_keys_and_uses_shortest_forms() -> None:
    assert canonical_dumps({"bb": 1, "a": 2}, what="x", error=EvidenceFormatError) == (
        bytes.fromhex("a2616102626262") + b"\x01"
    )


def test_canonical_dumps_raises_the_callers_error_for_unencodable_values() -> None:
    with pytest.raises(EvidenceFormatError, match=r"^x: cannot encode"):
        canonical_dumps({"a": object()}, what="x", error=EvidenceFormatError)


def test_a_datetime_comes_back_as_an_opaque_tag_not_a_datetime() -> None:
    raw = canonical_dumps(
        datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC), what="x", error=EvidenceFormatError
    )
    assert isinstance(_loads(raw), cbor2.CBORTag)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_the_callers_error(data: bytes) -> None:
    with contextlib.suppress(EvidenceFormatError):
        _loads(data)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.binary(max_size=8),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=3), children, max_size=3)
        ),
        max_leaves=10,
    )
)
def test_canonical_values_round_trip(value: Any) -> None:
    raw = canonical_dumps(value, what="x", error=EvidenceFormatError)
    try:
        decoded = _loads(raw)
    except EvidenceFormatError:
        return  # deeper than the bound
    assert canonical_dumps(decoded, what="x", error=EvidenceFormatError) == raw


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.data())
def test_single_byte_mutations_never_escape_untyped(seed: bytes, data: st.DataObject) -> None:
    raw = bytearray(canonical_dumps({"k": seed, "n": [1, 2]}, what="x", error=EvidenceFormatError))
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(EvidenceFormatError):
        _loads(bytes(raw))
