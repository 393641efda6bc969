"""A tenant's keyring: create, rotate, retire, and its own sealed, tamper-evident state."""

from __future__ import annotations

import os

import cbor2
import pytest

from hermetic.errors import (
    KeyNotFoundError,
    KeyRetiredError,
    KeyringFormatError,
    KeyringStateError,
    PersistenceUsageError,
    RecordAuthenticationError,
    RecordCounterError,
    RecordReplayError,
    SealedRecordError,
    SealedRecordFormatError,
    UnknownKeyVersionError,
)
from hermetic.persistence.keyring import (
    MAX_KEY_NAMES,
    MAX_KEY_VERSIONS,
    Keyring,
    KeyringState,
    NamedKey,
    parse_keyring_state,
)
from hermetic.persistence.keys import WRAPPED_KEY_SIZE, RootKey, TenantKey
from hermetic.persistence.sealing import MAX_PLAINTEXT_SIZE, parse_header

NAME = "insights/app-usage"
STATE_ID = "tenant-7/keyring"


@pytest.fixture
def root() -> RootKey:
    return RootKey(os.urandom(32))


@pytest.fixture
def tenant(root: RootKey) -> TenantKey:
    return root.tenant_key("store-eu1", "tenant-7")


@pytest.fixture
def keyring(tenant: TenantKey) -> Keyring:
    return Keyring(tenant).create(NAME)


def _wrapped(state: KeyringState, name: str, version: int) -> bytes:
    """The wrapped material of one version, read from the encoded state as docs describe."""
    decoded = cbor2.loads(state.encode())
    (entry,) = (k for k in decoded["keys"] if k["name"] == name)
    wrapped: bytes = entry["versions"][version - 1]
    return wrapped


# --- create, rotate, retire --------------------------------------------------------------


def test_round_trip_through_the_keyring(keyring: Keyring) -> None:
    sealed = keyring.seal_record(NAME, "tenant-7/r", 1, b"report")
    assert keyring.open_record(NAME, "tenant-7/r", 1, sealed) == b"report"
    assert parse_header(sealed).key_version == 1


def test_create_takes_given_material_or_fresh_random_bytes(tenant: TenantKey) -> None:
    material = os.urandom(32)
    keyring = Keyring(tenant).create("given", material).create("random")
    assert keyring.key("given").material == material
    assert keyring.key("random").material != material
    assert Keyring(tenant).create("random").key("random").material != (
        keyring.key("random").material
    )
    assert keyring.names == ("given", "random")


def test_rejects_creating_a_name_twice(keyring: Keyring) -> None:
    with pytest.raises(KeyringStateError, match=r"already has a key named 'insights/app-usage'"):
        keyring.create(NAME)


def test_rejects_given_material_of_the_wrong_size(tenant: TenantKey) -> None:
    with pytest.raises(PersistenceUsageError, match=r"^key material: expected 32 bytes, got 31$"):
        Keyring(tenant).create("k", b"\x03" * 31)


def test_rotate_seals_new_writes_under_the_next_version_and_old_records_still_open(
    keyring: Keyring,
) -> None:
    old = keyring.seal_record(NAME, "r/1", 1, b"under v1")
    rotated = keyring.rotate(NAME)
    assert (keyring.current_version(NAME), rotated.current_version(NAME)) == (1, 2)
    new = rotated.seal_record(NAME, "r/2", 1, b"under v2")
    assert parse_header(new).key_version == 2
    assert rotated.open_record(NAME, "r/1", 1, old) == b"under v1"
    assert rotated.open_record(NAME, "r/2", 1, new) == b"under v2"
    assert rotated.key(NAME, 1).material == keyring.key(NAME).material
    assert rotated.key(NAME).material != keyring.key(NAME).material
    with pytest.raises(UnknownKeyVersionError, match=r"has versions 1..1, not 2"):
        keyring.open_record(NAME, "r/2", 1, new)  # the keyring is immutable


def test_reseal_moves_a_record_to_the_current_version(keyring: Keyring) -> None:
    old = keyring.seal_record(NAME, "r", 4, b"payload")
    rotated = keyring.rotate(NAME).rotate(NAME)
    resealed = rotated.reseal_record(NAME, "r", 4, 5, old)
    header = parse_header(resealed)
    assert (header.key_version, header.counter) == (3, 5)
    assert rotated.open_record(NAME, "r", 5, resealed) == b"payload"


def test_reseal_refuses_a_replayed_record(keyring: Keyring) -> None:
    old = keyring.seal_record(NAME, "r", 1, b"old")
    with pytest.raises(RecordReplayError):
        keyring.rotate(NAME).reseal_record(NAME, "r", 2, 3, old)


def test_retired_version_no_longer_opens_its_records_and_its_material_is_gone(
    keyring: Keyring,
) -> None:
    under_v1 = keyring.seal_record(NAME, "r/1", 1, b"under v1")
    rotated = keyring.rotate(NAME)
    under_v2 = rotated.seal_record(NAME, "r/2", 1, b"under v2")
    wrapped_v1 = _wrapped(rotated.state, NAME, 1)
    material_v1 = rotated.key(NAME, 1).material

    retired = Keyring.open(
        keyring.tenant_key, STATE_ID, 2, rotated.retire(NAME, 1).seal(STATE_ID, 2)
    )
    with pytest.raises(KeyRetiredError, match=r"version 1 of tenant 'tenant-7' was retired"):
        retired.open_record(NAME, "r/1", 1, under_v1)
    with pytest.raises(KeyRetiredError):
        retired.key(NAME, 1)
    assert retired.open_record(NAME, "r/2", 1, under_v2) == b"under v2"

    encoded = retired.state.encode()
    assert wrapped_v1 not in encoded
    assert material_v1 not in encoded
    assert cbor2.loads(encoded)["keys"][0]["versions"][0] is None
    assert retired.state.get(NAME) is not None
    assert retired.state.keys[0].retired == (1,)


def test_replaying_the_keyring_from_before_a_retire_is_refused(keyring: Keyring) -> None:
    before = keyring.rotate(NAME)
    sealed_before = before.seal(STATE_ID, 1)
    before.retire(NAME, 1).seal(STATE_ID, 2)
    with pytest.raises(RecordReplayError, match=r"counter 1 is older than the expected 2"):
        Keyring.open(keyring.tenant_key, STATE_ID, 2, sealed_before)


def test_rejects_retiring_the_current_version(keyring: Keyring) -> None:
    with pytest.raises(KeyringStateError, match=r"version 1 is the current version"):
        keyring.retire(NAME, 1)


def test_rejects_retiring_twice_or_an_unknown_version(keyring: Keyring) -> None:
    retired = keyring.rotate(NAME).retire(NAME, 1)
    with pytest.raises(KeyRetiredError):
        retired.retire(NAME, 1)
    with pytest.raises(UnknownKeyVersionError, match=r"has versions 1..2, not 3"):
        retired.retire(NAME, 3)
    with pytest.raises(PersistenceUsageError, match=r"^key version: expected 1.."):
        retired.retire(NAME, 0)


def test_unknown_names_are_refused(keyring: Keyring) -> None:
    sealed = keyring.seal_record(NAME, "r", 1, b"x")
    for call in (
        lambda: keyring.key("insights/other"),
        lambda: keyring.rotate("insights/other"),
        lambda: keyring.retire("insights/other", 1),
        lambda: keyring.open_record("insights/other", "r", 1, sealed),
        lambda: keyring.seal_record("insights/other", "r", 1, b""),
    ):
        with pytest.raises(KeyNotFoundError, match=r"has no key named 'insights/other'"):
            call()


def test_record_claiming_a_retired_or_another_version_is_refused(keyring: Keyring) -> None:
    ring = keyring.rotate(NAME).rotate(NAME).retire(NAME, 1)
    sealed = ring.seal_record(NAME, "r", 1, b"under v3")
    for claimed, error in (
        (1, KeyRetiredError),
        (2, RecordAuthenticationError),
        (4, UnknownKeyVersionError),
        (0, UnknownKeyVersionError),
    ):
        edited = sealed[:1] + claimed.to_bytes(4, "big") + sealed[5:]
        with pytest.raises(error):
            ring.open_record(NAME, "r", 1, edited)


def test_records_of_one_name_or_tenant_do_not_open_under_another(root: RootKey) -> None:
    first = Keyring(root.tenant_key("s", "t1")).create("a").create("b")
    second = Keyring(root.tenant_key("s", "t2")).create("a")
    sealed = first.seal_record("a", "r", 1, b"x")
    with pytest.raises(RecordAuthenticationError):
        first.open_record("b", "r", 1, sealed)
    with pytest.raises(RecordAuthenticationError):
        second.open_record("a", "r", 1, sealed)


def test_rotation_stops_at_the_last_version(tenant: TenantKey) -> None:
    versions = (None,) * (MAX_KEY_VERSIONS - 1) + (b"\x00" * WRAPPED_KEY_SIZE,)
    full = Keyring(tenant, KeyringState((NamedKey("k", versions),)))
    with pytest.raises(KeyringStateError, match=r"already at the last version 65535"):
        full.rotate("k")


def test_a_full_keyring_refuses_another_name(tenant: TenantKey) -> None:
    wrapped = (b"\x00" * WRAPPED_KEY_SIZE,)
    names = sorted(f"k{i:04d}" for i in range(MAX_KEY_NAMES))
    full = Keyring(tenant, KeyringState(tuple(NamedKey(n, wrapped) for n in names)))
    with pytest.raises(KeyringStateError, match=r"the keyring is full"):
        full.create("zzz")


def test_a_state_too_large_for_one_record_is_refused_when_sealing(tenant: TenantKey) -> None:
    wrapped = (b"\x00" * WRAPPED_KEY_SIZE,)
    count = MAX_PLAINTEXT_SIZE // WRAPPED_KEY_SIZE  # more than fit, with names and framing
    names = sorted(f"k{i:05d}" for i in range(min(count, MAX_KEY_NAMES)))
    versions = (None,) * 1100 + wrapped
    big = Keyring(tenant, KeyringState(tuple(NamedKey(n, versions) for n in names)))
    with pytest.raises(KeyringStateError, match=r"over the .* a record holds"):
        big.seal(STATE_ID, 1)


# --- the keyring's own record ------------------------------------------------------------


def test_keyring_state_survives_seal_and_open(keyring: Keyring) -> None:
    ring = keyring.rotate(NAME).create("b", os.urandom(32)).rotate(NAME).retire(NAME, 2)
    reopened = Keyring.open(ring.tenant_key, STATE_ID, 9, ring.seal(STATE_ID, 9))
    assert reopened.state.encode() == ring.state.encode()
    assert reopened.names == ("b", NAME)
    for name, version in ((NAME, 1), (NAME, 3), ("b", 1)):
        assert reopened.key(name, version).material == ring.key(name, version).material


def test_keyring_state_reopens_after_a_restart_from_the_same_root(root: RootKey) -> None:
    ring = Keyring(root.tenant_key("s", "t")).create(NAME)
    sealed = ring.seal(STATE_ID, 1)
    record = ring.seal_record(NAME, "r", 1, b"kept")
    restarted = RootKey(bytes(root.material)).tenant_key("s", "t")
    assert Keyring.open(restarted, STATE_ID, 1, sealed).open_record(NAME, "r", 1, record) == b"kept"


@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_every_flipped_byte_of_the_keyring_record_is_refused(keyring: Keyring, mask: int) -> None:
    sealed = keyring.seal(STATE_ID, 3)
    for index in range(len(sealed)):
        edited = bytearray(sealed)
        edited[index] ^= mask
        if index == 0 or (index == 5 and mask == 0x80):
            expected: type[Exception] = SealedRecordFormatError
        elif index <= 4:
            expected = UnknownKeyVersionError
        else:
            expected = RecordAuthenticationError
        with pytest.raises(expected):
            Keyring.open(keyring.tenant_key, STATE_ID, 3, bytes(edited))


def test_keyring_of_another_tenant_or_store_does_not_open(root: RootKey, keyring: Keyring) -> None:
    sealed = keyring.seal(STATE_ID, 1)
    for other in (
        root.tenant_key("store-eu1", "tenant-8"),
        root.tenant_key("store-us1", "tenant-7"),
    ):
        with pytest.raises(RecordAuthenticationError, match=r"keyring state of tenant"):
            Keyring.open(other, STATE_ID, 1, sealed)
    with pytest.raises(RecordAuthenticationError):
        Keyring.open(keyring.tenant_key, "tenant-7/keyring-2", 1, sealed)


def test_keyring_newer_than_expected_is_refused(keyring: Keyring) -> None:
    with pytest.raises(RecordCounterError):
        Keyring.open(keyring.tenant_key, STATE_ID, 1, keyring.seal(STATE_ID, 2))


def test_a_data_record_is_not_a_keyring_and_a_keyring_is_not_a_data_record(
    keyring: Keyring,
) -> None:
    data = keyring.seal_record(NAME, STATE_ID, 1, keyring.state.encode())
    with pytest.raises(UnknownKeyVersionError, match=r"sealed under key version 1"):
        Keyring.open(keyring.tenant_key, STATE_ID, 1, data)
    state = keyring.seal(STATE_ID, 1)
    with pytest.raises(UnknownKeyVersionError, match=r"not 0"):
        keyring.open_record(NAME, STATE_ID, 1, state)


# --- the state's encoding ----------------------------------------------------------------


def test_state_encodes_as_documented(keyring: Keyring) -> None:
    ring = keyring.rotate(NAME).retire(NAME, 1)
    decoded = cbor2.loads(ring.state.encode())
    assert decoded == {
        "format": 1,
        "keys": [{"name": NAME, "versions": [None, _wrapped(ring.state, NAME, 2)]}],
    }
    assert ring.state.encode() == cbor2.dumps(decoded, canonical=True)
    assert parse_keyring_state(ring.state.encode()).encode() == ring.state.encode()


def _state(value: object, canonical: bool = True) -> bytes:
    return cbor2.dumps(value, canonical=canonical)


WRAPPED = b"\x11" * WRAPPED_KEY_SIZE


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "expected a map, got list"),
        ({"format": 1}, "expected exactly the fields {'format', 'keys'}, got {'format'}"),
        ({"format": 1, "keys": [], "x": 0}, "got {'format', 'keys', 'x'}"),
        ({"format": 2, "keys": []}, "format: expected 1, got 2"),
        ({"format": True, "keys": []}, "format: expected 1, got bool"),
        ({"format": 1, "keys": {}}, "keys: expected an array, got dict"),
        ({"format": 1, "keys": [{"name": "k"}]}, "key 0: expected exactly the fields"),
        ({"format": 1, "keys": [{"name": "K", "versions": [WRAPPED]}]}, "key name: expected"),
        ({"format": 1, "keys": [{"name": "k", "versions": []}]}, "expected 1 to 65535 entries"),
        ({"format": 1, "keys": [{"name": "k", "versions": [None]}]}, "cannot be retired"),
        ({"format": 1, "keys": [{"name": "k", "versions": [b"x"]}]}, "got 1 bytes"),
        ({"format": 1, "keys": [{"name": "k", "versions": ["w"]}]}, "or null, got str"),
        (
            {"format": 1, "keys": [{"name": n, "versions": [WRAPPED]} for n in ("b", "a")]},
            "unique and sorted, got 'b' before 'a'",
        ),
        (
            {"format": 1, "keys": [{"name": n, "versions": [WRAPPED]} for n in ("a", "a")]},
            "unique and sorted",
        ),
    ],
)
def test_rejects_states_not_in_the_documented_form(value: object, message: str) -> None:
    with pytest.raises(KeyringFormatError) as info:
        parse_keyring_state(_state(value))
    assert message in str(info.value)


def test_rejects_a_state_in_a_non_canonical_encoding() -> None:
    value = {"format": 1, "keys": [{"name": "k", "versions": [WRAPPED]}]}
    parse_keyring_state(_state(value))
    non_canonical = _state(value, canonical=False)  # "format" before "keys"
    assert non_canonical != _state(value)
    with pytest.raises(KeyringFormatError, match=r"canonical CBOR encoding"):
        parse_keyring_state(non_canonical)


def test_rejects_states_that_are_not_cbor() -> None:
    with pytest.raises(KeyringFormatError, match=r"^keyring state: not valid CBOR"):
        parse_keyring_state(b"\xa2\x01")
    with pytest.raises(KeyringFormatError, match=r"trailing byte"):
        parse_keyring_state(_state({"format": 1, "keys": []}) + b"\x00")


def test_keyring_errors_and_record_errors_are_persistence_errors() -> None:
    assert not issubclass(KeyRetiredError, SealedRecordError)
    from hermetic.errors import PersistenceError

    for error in (KeyRetiredError, KeyNotFoundError, KeyringFormatError, SealedRecordError):
        assert issubclass(error, PersistenceError)
