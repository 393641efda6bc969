"""The sealed record and keyring state parsers under arbitrary input: only typed errors."""

from __future__ import annotations

import os
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermetic.errors import (
    HermeticError,
    KeyringFormatError,
    RecordAuthenticationError,
    SealedRecordFormatError,
)
from hermetic.persistence.keyring import Keyring, KeyringState, parse_keyring_state
from hermetic.persistence.keys import WRAPPED_KEY_SIZE, RootKey
from hermetic.persistence.sealing import OVERHEAD, SealedHeader, parse_header

NAME = "insights/app-usage"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def keyring() -> Keyring:
    tenant = RootKey(os.urandom(32)).tenant_key("s", "t")
    return Keyring(tenant).create(NAME).rotate(NAME).retire(NAME, 1).create("b")


@FUZZ
@given(st.binary(max_size=200))
def test_header_parser_returns_a_header_or_a_format_error(data: bytes) -> None:
    try:
        header = parse_header(data)
    except SealedRecordFormatError:
        return
    assert isinstance(header, SealedHeader)
    assert len(data) >= OVERHEAD
    assert data[0] == 0x01
    assert 1 <= header.counter < 1 << 63


@FUZZ
@given(data=st.binary(max_size=200), counter=st.integers(1, 5))
def test_opening_arbitrary_bytes_raises_only_typed_errors(
    keyring: Keyring, data: bytes, counter: int
) -> None:
    with pytest.raises(HermeticError):
        keyring.open_record(NAME, "r", counter, data)
    with pytest.raises(HermeticError):
        Keyring.open(keyring.tenant_key, "t/keyring", counter, data)


@FUZZ
@given(counter=st.integers(1, (1 << 63) - 1), nonce=st.binary(min_size=12, max_size=12),
       body=st.binary(min_size=16, max_size=100))  # fmt: skip
def test_arbitrary_bytes_under_a_live_version_fail_authentication(
    keyring: Keyring, counter: int, nonce: bytes, body: bytes
) -> None:
    data = b"\x01" + (2).to_bytes(4, "big") + counter.to_bytes(8, "big") + nonce + body
    with pytest.raises(RecordAuthenticationError):
        keyring.open_record(NAME, "r", counter, data)


def _check_state_parser(data: bytes) -> None:
    try:
        state = parse_keyring_state(data)
    except KeyringFormatError:
        return
    assert isinstance(state, KeyringState)
    assert state.encode() == data  # accepted only in its one encoding


@FUZZ
@given(st.binary(max_size=300))
def test_state_parser_on_arbitrary_bytes(data: bytes) -> None:
    _check_state_parser(data)


_WRAPPED = st.one_of(
    st.none(),
    st.binary(min_size=WRAPPED_KEY_SIZE, max_size=WRAPPED_KEY_SIZE),
    st.binary(min_size=WRAPPED_KEY_SIZE - 1, max_size=WRAPPED_KEY_SIZE + 1),
    st.integers(),
    st.text(max_size=3),
)
_NAMES = st.one_of(
    st.sampled_from(["a", "b", NAME, "insights/x", "B", "", "a//b", "..", "a" * 129]),
    st.text(max_size=8),
    st.integers(),
    st.binary(max_size=4),
)
_ENTRY = st.one_of(
    st.fixed_dictionaries({"name": _NAMES, "versions": st.lists(_WRAPPED, max_size=4)}),
    st.dictionaries(
        st.sampled_from(["name", "versions", "extra", ""]),
        st.one_of(_NAMES, st.lists(_WRAPPED, max_size=3), st.none()),
        max_size=3,
    ),
    st.lists(_NAMES, max_size=2),
)
_STATE = st.one_of(
    st.fixed_dictionaries(
        {
            "format": st.sampled_from([1, 0, 2, True, 1.0, "1", None]),
            "keys": st.one_of(st.lists(_ENTRY, max_size=4), _NAMES),
        }
    ),
    st.dictionaries(st.sampled_from(["format", "keys", "x"]), _NAMES, max_size=3),
    _NAMES,
)


@FUZZ
@given(value=_STATE, canonical=st.booleans())
def test_state_parser_on_structures_near_the_documented_form(value: Any, canonical: bool) -> None:
    _check_state_parser(cbor2.dumps(value, canonical=canonical))


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1,
                      max_size=4), cut=st.integers(0, 10_000))  # fmt: skip
def test_state_parser_on_mutated_valid_states(
    keyring: Keyring, edits: list[tuple[int, int]], cut: int
) -> None:
    encoded = bytearray(keyring.state.encode())
    for position, mask in edits:
        encoded[position % len(encoded)] ^= mask
    _check_state_parser(bytes(encoded))
    _check_state_parser(bytes(encoded[: cut % len(encoded)]))


_VALID_NAME = st.from_regex(
    r"[a-z0-9][a-z0-9._-]{0,10}(/[a-z0-9][a-z0-9._-]{0,10}){0,2}", fullmatch=True
)
_LIVE = st.binary(min_size=WRAPPED_KEY_SIZE, max_size=WRAPPED_KEY_SIZE)
_VERSIONS = st.tuples(st.lists(st.one_of(st.none(), _LIVE), max_size=4), _LIVE).map(
    lambda parts: [*parts[0], parts[1]]
)


@FUZZ
@given(st.dictionaries(_VALID_NAME, _VERSIONS, max_size=4))
def test_state_parser_accepts_every_valid_state_in_its_one_encoding(
    keys: dict[str, list[bytes | None]],
) -> None:
    value = {"format": 1, "keys": [{"name": n, "versions": keys[n]} for n in sorted(keys)]}
    encoded = cbor2.dumps(value, canonical=True)
    state = parse_keyring_state(encoded)
    assert state.encode() == encoded
    assert {k.name: list(k.versions) for k in state.keys} == keys
    if keys:
        with pytest.raises(KeyringFormatError, match=r"canonical"):
            parse_keyring_state(cbor2.dumps(value))
