"""No key material and no plaintext in any repr or error message, in any encoding.

Every failure the persistence core can raise is provoked against keys and records whose
bytes are known, and each message (and each repr of a key, a keyring or a state) is
searched for those bytes raw, as a bytes repr, in hex and in base64.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator

import pytest

from hermetic.errors import HermeticError
from hermetic.persistence.keyring import Keyring, KeyringState, parse_keyring_state
from hermetic.persistence.keys import DataKey, RootKey, TenantKey, unwrap_key, wrap_key
from hermetic.persistence.sealing import open_record, parse_header, seal_record

NAME = "insights/app-usage"
PLAINTEXT = b"PLAINTEXT-card=4111111111111111-" + os.urandom(16)


def _forms(secret: bytes) -> Iterator[str]:
    yield secret.decode("latin-1")
    yield repr(secret)[2:-1]
    yield secret.hex()
    yield secret.hex().upper()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        text = encode(secret).decode()
        yield text
        yield text.rstrip("=")


def _assert_clean(text: str, secrets: list[bytes]) -> None:
    for secret in secrets:
        for form in _forms(secret):
            assert form not in text, f"secret leaked in: {text[:200]!r}"
        # and no recognisable half of one: a truncated key is still a leak
        for form in _forms(secret[: len(secret) // 2]):
            assert form not in text, f"half a secret leaked in: {text[:200]!r}"


class _Scenario:
    """A tenant with a rotated, partly retired key, records under it, and every secret."""

    def __init__(self) -> None:
        self.root = RootKey(os.urandom(32))
        self.tenant = self.root.tenant_key("store-eu1", "tenant-7")
        ring = Keyring(self.tenant).create(NAME).create("b", os.urandom(32))
        self.old_record = ring.seal_record(NAME, "r", 1, PLAINTEXT)
        ring = ring.rotate(NAME)
        self.old_key = ring.key(NAME, 1)
        self.ring = ring.retire(NAME, 1)
        self.record = self.ring.seal_record(NAME, "r", 2, PLAINTEXT)
        self.state = self.ring.seal("tenant-7/keyring", 3)
        self.keys = [self.old_key, self.ring.key(NAME), self.ring.key("b")]

    @property
    def secrets(self) -> list[bytes]:
        return [
            self.root.material,
            self.tenant.wrapping_key,
            self.tenant.state_key,
            *(k.material for k in self.keys),
            PLAINTEXT,
        ]


@pytest.fixture
def scenario() -> _Scenario:
    return _Scenario()


def test_reprs_of_keys_keyrings_and_states_are_redacted(scenario: _Scenario) -> None:
    objects: list[object] = [
        scenario.root,
        scenario.tenant,
        *scenario.keys,
        scenario.ring,
        scenario.ring.state,
        *scenario.ring.state.keys,
        parse_header(scenario.record),
    ]
    for obj in objects:
        for text in (repr(obj), str(obj), f"{obj}", repr([obj]), repr({"k": obj})):
            _assert_clean(text, scenario.secrets)
    assert repr(scenario.root) == "RootKey(<redacted>)"
    assert "<redacted>" in repr(scenario.keys[0])
    assert "<redacted>" in repr(scenario.tenant)


def _failures(s: _Scenario) -> Iterator[Callable[[], object]]:
    """One call for every refusal the core has, each fed the scenario's secret bytes."""
    edited = bytearray(s.record)
    edited[-1] ^= 1
    key = s.keys[1]
    yield lambda: s.ring.open_record(NAME, "r", 2, bytes(edited))
    yield lambda: s.ring.open_record(NAME, "other", 2, s.record)
    yield lambda: s.ring.open_record(NAME, "r", 3, s.record)
    yield lambda: s.ring.open_record(NAME, "r", 1, s.record)
    yield lambda: s.ring.open_record(NAME, "r", 1, s.old_record)
    yield lambda: s.ring.open_record("b", "r", 2, s.record)
    yield lambda: s.ring.open_record("nope", "r", 2, s.record)
    yield lambda: s.ring.open_record(NAME, "r", 2, s.record[:30])
    yield lambda: s.ring.open_record(NAME, "r", 2, b"\x02" + s.record[1:])
    yield lambda: s.ring.key(NAME, 1)
    yield lambda: s.ring.key(NAME, 9)
    yield lambda: s.ring.retire(NAME, 2)
    yield lambda: s.ring.create(NAME)
    yield lambda: s.ring.create("c", key.material[:31])
    yield lambda: s.ring.rotate(NAME, key.material + b"\x00")
    yield lambda: open_record(s.old_key, "r", 2, s.record)
    yield lambda: seal_record(key, "r", 1, PLAINTEXT * 40_000)
    yield lambda: seal_record(key, PLAINTEXT.decode("latin-1"), 1, b"")
    yield lambda: RootKey(s.root.material[:16])
    yield lambda: RootKey(s.root.material + s.root.material)
    yield lambda: DataKey("s", "t", NAME, 1, key.material[:-1])
    yield lambda: TenantKey("s", "t", s.tenant.wrapping_key, s.tenant.state_key[:5])
    yield lambda: wrap_key(s.tenant, NAME, 1, key.material[:20])
    yield lambda: unwrap_key(s.root.tenant_key("store-eu1", "tenant-8"), NAME, 2, b"\x00" * 60)
    yield lambda: unwrap_key(s.tenant, NAME, 2, key.material)
    yield lambda: Keyring.open(s.tenant, "tenant-7/keyring", 3, s.record)
    yield lambda: Keyring.open(s.tenant, "tenant-7/keyring", 4, s.state)
    yield lambda: Keyring.open(s.tenant, "tenant-7/keyring", 2, s.state)
    yield lambda: Keyring.open(s.root.tenant_key("x", "y"), "tenant-7/keyring", 3, s.state)
    yield lambda: parse_keyring_state(s.ring.state.encode()[:-1])
    yield lambda: parse_keyring_state(s.ring.state.encode() + b"\x00")
    yield lambda: parse_keyring_state(key.material)
    yield lambda: parse_keyring_state(PLAINTEXT)
    yield lambda: KeyringState(tuple(reversed(s.ring.state.keys)))


def test_no_error_message_carries_key_material_or_plaintext(scenario: _Scenario) -> None:
    for call in _failures(scenario):
        with pytest.raises(HermeticError) as info:
            call()
        error = info.value
        for text in (str(error), repr(error), repr(error.args)):
            _assert_clean(text, scenario.secrets)
        assert error.__cause__ is None or isinstance(error.__cause__, HermeticError)
