"""The shared strict JSON loader, and the text rule it shares with the CBOR decoder."""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.cbor import strict_loads
from hermetic.errors import EvidenceFormatError, HermeticError, ReleaseFormatError
from hermetic.jsontext import MAX_DEPTH, is_unicode_text, loads

MARKER = "s3cret-marker-7f3a"


def _loads(data: Any, **kwargs: Any) -> Any:
    return loads(data, what="thing", error=ReleaseFormatError, **kwargs)


def test_accepts_plain_json_from_bytes_and_text() -> None:
    text = '{"a": [1, "two", null, true, {"b": "\\u00e9\\ud83d\\ude00"}]}'
    expected = {"a": [1, "two", None, True, {"b": "é😀"}]}
    assert _loads(text) == expected
    assert _loads(text.encode()) == expected
    assert _loads(bytearray(text.encode())) == expected


@pytest.mark.parametrize(
    "document",
    [
        '{"k": 1, "k": 2}',
        '{"a": {"k": 1, "k": 1}}',
        '[{"x": [{"k": {}, "k": {}}]}]',
        '{"Statement": [{"Condition": {"StringEquals": {"pcr0": "aa"}}, "Condition": {}}]}',
    ],
    ids=["top", "nested", "deep-in-array", "policy-condition"],
)
def test_rejects_duplicate_keys_at_any_depth(document: str) -> None:
    with pytest.raises(ReleaseFormatError, match=r"^thing: duplicate object key$"):
        _loads(document)


@pytest.mark.parametrize(
    ("document", "where"),
    [
        ('"\\ud800"', "string"),
        ('["ok", "x\\udfffy"]', "string"),
        ('{"a": {"b": "\\udc00"}}', "string"),
        ('{"\\ud800": 1}', "object key"),
        ('"\\ude00\\ud83d"', "string"),  # a pair in the wrong order is two lone halves
    ],
)
def test_rejects_lone_surrogates_in_strings_and_keys(document: str, where: str) -> None:
    with pytest.raises(ReleaseFormatError, match=f"^thing: lone UTF-16 surrogate in an? {where}"):
        _loads(document)


def test_rejects_raw_surrogates_in_text_input() -> None:
    with pytest.raises(ReleaseFormatError, match="lone UTF-16 surrogate"):
        _loads('{"a": "\ud800"}')


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b'{"a": "\xff"}', 7),
        (b'"\xed\xa0\x80"', 1),  # an encoded surrogate is not UTF-8
        (b'"\xc0\xaf"', 1),  # overlong
        (b'"ok\xe2\x82', 3),  # truncated sequence
        (b"\xef\xbb\xbf{}", None),  # a BOM: decodes, then is not JSON
    ],
)
def test_rejects_invalid_utf8_naming_the_byte(data: bytes, offset: int | None) -> None:
    with pytest.raises(ReleaseFormatError) as caught:
        _loads(data)
    if offset is not None:
        assert str(caught.value) == f"thing: not valid UTF-8 (byte {offset})"
    else:
        assert str(caught.value).startswith("thing: not valid JSON")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_rejects_nan_and_infinity_even_when_floats_are_allowed(constant: str) -> None:
    with pytest.raises(ReleaseFormatError, match=f"{constant} is not allowed"):
        _loads(f'{{"a": {constant}}}', allow_floats=True)


def test_floats_only_when_allowed_and_finite() -> None:
    with pytest.raises(ReleaseFormatError, match="non-integer number"):
        _loads("[1.5]")
    with pytest.raises(ReleaseFormatError, match="non-integer number"):
        _loads("[1e3]")
    assert _loads("[1.5, 1e3]", allow_floats=True) == [1.5, 1000.0]
    with pytest.raises(ReleaseFormatError, match="overflows to infinity"):
        _loads("[1e400]", allow_floats=True)


def test_rejects_integers_with_too_many_digits() -> None:
    with pytest.raises(ReleaseFormatError, match="integer with too many digits"):
        _loads("1" * 5000)


@pytest.mark.parametrize(
    "document",
    [
        "[" * 65536,
        "[" * 32768 + "]" * 32768,
        '{"a":' * 20000 + "1" + "}" * 20000,
        "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
    ],
    ids=["64KiB-unclosed", "64KiB-balanced", "objects", "just-over"],
)
def test_rejects_deep_nesting_without_a_recursion_error(document: str) -> None:
    with pytest.raises(ReleaseFormatError, match=f"^thing: nesting depth above {MAX_DEPTH}$"):
        _loads(document)


def test_nesting_up_to_the_bound_is_accepted() -> None:
    assert _loads("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    with pytest.raises(ReleaseFormatError, match="nesting depth above 2"):
        _loads('{"a": {"b": []}}', max_depth=2)


def test_rejects_trailing_data_and_non_text_input() -> None:
    with pytest.raises(ReleaseFormatError, match=r"not valid JSON \(Extra data at line 1"):
        _loads('{"a": 1} {"a": 2}')
    with pytest.raises(ReleaseFormatError, match="expected JSON text, got int"):
        _loads(7)


@pytest.mark.parametrize(
    "document",
    [
        f'{{"{MARKER}": 1, "{MARKER}": 2}}',
        f'{{"{MARKER}": "\\ud800"}}',
        f'{{"a": "{MARKER}\\ud800"}}',
        f'{{"a": "{MARKER}", "a": "{MARKER}"}}',
        f'{{"a": "{MARKER}" x}}',
        f'["{MARKER}\\x"]',
    ],
)
def test_errors_never_echo_a_key_or_value(document: str) -> None:
    with pytest.raises(ReleaseFormatError) as caught:
        _loads(document)
    assert MARKER not in str(caught.value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_the_callers_error(data: bytes) -> None:
    try:
        value = _loads(data)
    except ReleaseFormatError:
        return
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # what parsed is re-encodable


#: Any code point, lone surrogates included (hypothesis leaves them out unless asked).
ANY_CHARACTER = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


def any_text(max_size: int) -> st.SearchStrategy[str]:
    """Strings of :data:`ANY_CHARACTER` (``st.text`` would drop the surrogates again)."""
    return st.lists(ANY_CHARACTER, max_size=max_size).map("".join)


@settings(max_examples=300, deadline=None)
@given(any_text(12))
def test_json_and_cbor_apply_the_same_text_rule(text: str) -> None:
    """A string is accepted by the JSON loader (as an escape) and by the CBOR decoder (as
    its UTF-8 bytes) exactly when it is Unicode text."""
    valid = is_unicode_text(text)
    assert valid == all(not 0xD800 <= ord(c) <= 0xDFFF for c in text)
    as_json = json.dumps(text)  # ASCII escapes, lone surrogates included
    as_cbor = cbor2.dumps(text.encode("utf-8", "surrogatepass"))
    as_cbor = bytes([0x60 | (as_cbor[0] & 0x1F)]) + as_cbor[1:]  # byte string -> text string
    outcomes = []
    for parse in (
        lambda: _loads(as_json),
        lambda: strict_loads(as_cbor, what="thing", error=EvidenceFormatError),
    ):
        try:
            outcomes.append(parse() == text)
        except HermeticError:
            outcomes.append(False)
    assert outcomes == [valid, valid]


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | any_text(4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text(3), inner, max_size=3),
    max_leaves=40,
)


def _depth(value: Any) -> int:
    if isinstance(value, dict | list):
        children = value.values() if isinstance(value, dict) else value
        return 1 + max((_depth(c) for c in children), default=0)
    return 0


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [*value, *(t for v in value.values() for t in _texts(v))]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


@settings(max_examples=300, deadline=None)
@given(_VALUES, st.integers(1, 6), st.booleans())
def test_refuses_exactly_the_documents_with_a_surrogate_or_too_deep(
    value: Any, max_depth: int, ascii_only: bool
) -> None:
    """Whatever shortcut the loader takes, it refuses a document exactly when one of its
    strings is not Unicode text or it nests deeper than the bound."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    lax = json.loads(text)  # escaped surrogate pairs become one character here
    bad = _depth(lax) > max_depth or not all(map(is_unicode_text, _texts(lax)))
    try:
        parsed = _loads(text, max_depth=max_depth)
    except ReleaseFormatError:
        assert bad
    else:
        assert not bad
        assert parsed == lax
