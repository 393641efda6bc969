"""A tenant's keyring: its named keys, their versions, and the sealed record that keeps them.

The keyring is the only place a named key's material exists outside enclave memory, and
only wrapped (:func:`~hermetic.persistence.keys.wrap_key`). Its state is itself a sealed
record in the store (:func:`~hermetic.persistence.sealing.seal_keyring_state`), so the
host can neither read it nor swap, edit or replay it undetected.

:class:`Keyring` is an immutable value: ``create``, ``rotate`` and ``retire`` return a new
keyring and leave the old one as it was. That fits the store's compare-and-set: the
service seals the new state, writes it at the version it read, and adopts the new keyring
only if the write won; on a conflict it re-reads and retries from the stored state.

Versions of a named key are numbered 1, 2, 3, ...; the newest is the **current** one and
every new record is sealed under it. ``rotate`` adds the next version (fresh random
material). Older versions stay readable until ``retire`` removes their wrapped material
from the state; the current version cannot be retired (rotate first), so a key always has
one version to seal with. A retired version keeps its number in the state (as null), so a
record sealed under it fails with :class:`~hermetic.errors.KeyRetiredError`, not as an
unknown version, and its number is never reused.

The state's plaintext is canonical CBOR (RFC 8949 §4.2.1), and the parser accepts nothing
else, so one state has exactly one encoding::

    {"keys": [{"name": "insights/app-usage", "versions": [null, h'<60 bytes>', h'<60 bytes>']},
              ...],                           # sorted by name, names unique
     "format": 1}

``versions[i]`` is version ``i + 1``: its wrapped material, or null once retired; the last
entry (the current version) is never null.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

from hermetic.cbor import canonical_dumps, strict_loads
from hermetic.errors import (
    HermeticError,
    KeyNotFoundError,
    KeyRetiredError,
    KeyringFormatError,
    KeyringStateError,
    PersistenceUsageError,
    UnknownKeyVersionError,
)
from hermetic.persistence.keys import (
    KEY_SIZE,
    WRAPPED_KEY_SIZE,
    DataKey,
    TenantKey,
    check_key_name,
    check_key_version,
    unwrap_key,
    wrap_key,
)
from hermetic.persistence.sealing import (
    MAX_PLAINTEXT_SIZE,
    open_keyring_state,
    open_record,
    parse_header,
    seal_keyring_state,
    seal_record,
)

__all__ = [
    "MAX_KEY_NAMES",
    "MAX_KEY_VERSIONS",
    "STATE_FORMAT",
    "Keyring",
    "KeyringState",
    "NamedKey",
    "parse_keyring_state",
]

STATE_FORMAT = 1
"""The ``format`` field of a keyring state."""

MAX_KEY_NAMES = 1024
"""Most named keys one tenant's keyring holds."""

MAX_KEY_VERSIONS = 65535
"""Most versions (live and retired) one named key can reach."""

_ErrorType = type[HermeticError]


def _check_versions(name: str, versions: object, error: _ErrorType) -> tuple[bytes | None, ...]:
    if not isinstance(versions, list | tuple):
        raise error(f"key {name!r} versions: expected an array, got {type(versions).__name__}")
    if not 1 <= len(versions) <= MAX_KEY_VERSIONS:
        raise error(
            f"key {name!r} versions: expected 1 to {MAX_KEY_VERSIONS} entries, got {len(versions)}"
        )
    for number, wrapped in enumerate(versions, start=1):
        if wrapped is None:
            continue
        if not isinstance(wrapped, bytes) or len(wrapped) != WRAPPED_KEY_SIZE:
            found = (
                f"{len(wrapped)} bytes" if isinstance(wrapped, bytes) else type(wrapped).__name__
            )
            raise error(
                f"key {name!r} version {number}: expected {WRAPPED_KEY_SIZE} bytes of wrapped"
                f" material or null, got {found}"
            )
    if versions[-1] is None:
        raise error(
            f"key {name!r} version {len(versions)}: the current version cannot be retired"
            " (expected wrapped material, got null)"
        )
    return tuple(versions)


def _check_name(name: object, error: _ErrorType) -> str:
    try:
        return check_key_name(name)
    except PersistenceUsageError as exc:
        if error is PersistenceUsageError:
            raise
        raise error(str(exc)) from None


@dataclass(frozen=True, repr=False)
class NamedKey:
    """One named key in the state: the wrapped material of each version (``None`` once
    retired). Version ``i + 1`` is ``versions[i]``; the last is the current version."""

    name: str
    versions: tuple[bytes | None, ...]

    def __post_init__(self) -> None:
        _check_name(self.name, PersistenceUsageError)
        object.__setattr__(
            self, "versions", _check_versions(self.name, self.versions, KeyringStateError)
        )

    @property
    def current(self) -> int:
        return len(self.versions)

    @property
    def live(self) -> tuple[int, ...]:
        """The versions whose records still open."""
        return tuple(n for n, w in enumerate(self.versions, start=1) if w is not None)

    @property
    def retired(self) -> tuple[int, ...]:
        return tuple(n for n, w in enumerate(self.versions, start=1) if w is None)

    def __repr__(self) -> str:
        return f"NamedKey(name={self.name!r}, current={self.current}, retired={self.retired})"


@dataclass(frozen=True, repr=False)
class KeyringState:
    """What a keyring's sealed record holds: its named keys, sorted by name."""

    keys: tuple[NamedKey, ...] = ()

    def __post_init__(self) -> None:
        keys = tuple(self.keys)
        if len(keys) > MAX_KEY_NAMES:
            raise KeyringStateError(
                f"keyring: expected at most {MAX_KEY_NAMES} named keys, got {len(keys)}"
            )
        for before, after in itertools.pairwise(keys):
            if not before.name < after.name:
                raise KeyringStateError(
                    f"keyring: names must be unique and sorted, got {before.name!r} before"
                    f" {after.name!r}"
                )
        object.__setattr__(self, "keys", keys)

    def get(self, name: str) -> NamedKey | None:
        for named in self.keys:
            if named.name == name:
                return named
        return None

    def with_key(self, named: NamedKey) -> KeyringState:
        """This state with ``named`` added, or replacing the key of the same name."""
        others = [k for k in self.keys if k.name != named.name]
        return KeyringState(tuple(sorted([*others, named], key=lambda k: k.name)))

    def encode(self) -> bytes:
        """The canonical CBOR form in the module docstring (wrapped material only)."""
        value = {
            "format": STATE_FORMAT,
            "keys": [{"name": k.name, "versions": list(k.versions)} for k in self.keys],
        }
        return canonical_dumps(value, what="keyring state", error=KeyringStateError)

    def __repr__(self) -> str:
        return f"KeyringState(keys={self.keys!r})"


def _shown_keys(value: dict[Any, Any]) -> str:
    names = sorted(repr(k)[:40] if isinstance(k, str) else type(k).__name__ for k in value)
    return "{" + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") + "}"


def _map(value: object, fields: tuple[str, ...], what: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise KeyringFormatError(f"{what}: expected a map, got {type(value).__name__}")
    if set(value) != set(fields):
        raise KeyringFormatError(
            f"{what}: expected exactly the fields {{{', '.join(map(repr, fields))}}},"
            f" got {_shown_keys(value)}"
        )
    return value


def parse_keyring_state(data: object) -> KeyringState:
    """The state in ``data`` (an opened keyring record), or :class:`KeyringFormatError`.

    Only the canonical encoding of a valid state is accepted; anything else, however close,
    is refused, never repaired.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise KeyringFormatError(f"keyring state: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_PLAINTEXT_SIZE:
        raise KeyringFormatError(
            f"keyring state: expected at most {MAX_PLAINTEXT_SIZE} bytes, got {len(data)}"
        )
    top = _map(
        strict_loads(data, what="keyring state", error=KeyringFormatError),
        ("format", "keys"),
        "keyring state",
    )
    version = top["format"]
    if type(version) is not int or version != STATE_FORMAT:
        found = repr(version) if type(version) is int else type(version).__name__
        raise KeyringFormatError(f"keyring state format: expected {STATE_FORMAT}, got {found[:40]}")
    entries = top["keys"]
    if not isinstance(entries, list):
        raise KeyringFormatError(
            f"keyring state keys: expected an array, got {type(entries).__name__}"
        )
    if len(entries) > MAX_KEY_NAMES:
        raise KeyringFormatError(
            f"keyring state keys: expected at most {MAX_KEY_NAMES} entries, got {len(entries)}"
        )
    keys: list[NamedKey] = []
    for position, entry in enumerate(entries):
        fields = _map(entry, ("name", "versions"), f"keyring state key {position}")
        name = _check_name(fields["name"], KeyringFormatError)
        versions = _check_versions(name, fields["versions"], KeyringFormatError)
        if keys and not keys[-1].name < name:
            raise KeyringFormatError(
                f"keyring state keys: names must be unique and sorted, got {keys[-1].name!r}"
                f" before {name!r}"
            )
        keys.append(NamedKey(name, versions))
    state = KeyringState(tuple(keys))
    if state.encode() != data:
        raise KeyringFormatError(
            "keyring state: expected the canonical CBOR encoding (RFC 8949 §4.2.1), got"
            " another encoding of it"
        )
    return state


def _new_material(material: bytes | None) -> bytes:
    if material is None:
        return os.urandom(KEY_SIZE)
    if not isinstance(material, bytes | bytearray | memoryview):
        raise PersistenceUsageError(f"key material: expected bytes, got {type(material).__name__}")
    if len(material) != KEY_SIZE:
        raise PersistenceUsageError(f"key material: expected {KEY_SIZE} bytes, got {len(material)}")
    return bytes(material)


@dataclass(frozen=True, eq=False, repr=False)
class Keyring:
    """A tenant's named keys, bound to the tenant key that wraps them. Immutable: every
    change returns a new keyring (see the module docstring)."""

    tenant_key: TenantKey
    state: KeyringState = KeyringState()

    def __post_init__(self) -> None:
        if not isinstance(self.tenant_key, TenantKey):
            raise PersistenceUsageError(
                f"tenant key: expected a TenantKey, got {type(self.tenant_key).__name__}"
            )
        if not isinstance(self.state, KeyringState):
            raise PersistenceUsageError(
                f"keyring state: expected a KeyringState, got {type(self.state).__name__}"
            )

    def __repr__(self) -> str:
        return (
            f"Keyring(store_id={self.store_id!r}, tenant={self.tenant!r}, keys={self.state.keys!r})"
        )

    @property
    def store_id(self) -> str:
        return self.tenant_key.store_id

    @property
    def tenant(self) -> str:
        return self.tenant_key.tenant

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.state.keys)

    # --- the keyring's own record ----------------------------------------------------

    @classmethod
    def open(
        cls, tenant_key: TenantKey, record_id: str, expected_counter: int, data: bytes
    ) -> Keyring:
        """The keyring sealed in ``data`` (the record ``record_id`` at ``expected_counter``)."""
        plaintext = open_keyring_state(tenant_key, record_id, expected_counter, data)
        return cls(tenant_key, parse_keyring_state(plaintext))

    def seal(self, record_id: str, counter: int) -> bytes:
        """This keyring's state sealed as the record ``record_id`` at version ``counter``."""
        encoded = self.state.encode()
        if len(encoded) > MAX_PLAINTEXT_SIZE:
            raise KeyringStateError(
                f"keyring of tenant {self.tenant!r}: its state is {len(encoded)} bytes, over"
                f" the {MAX_PLAINTEXT_SIZE} a record holds (retire old versions)"
            )
        return seal_keyring_state(self.tenant_key, record_id, counter, encoded)

    # --- changes ---------------------------------------------------------------------

    def _named(self, name: str) -> NamedKey:
        check_key_name(name)
        named = self.state.get(name)
        if named is None:
            raise KeyNotFoundError(f"tenant {self.tenant!r} has no key named {name!r}")
        return named

    def create(self, name: str, material: bytes | None = None) -> Keyring:
        """A keyring with a new named key at version 1: ``material`` (32 bytes, from an admin's
        ``put_key``) or, by default, 32 fresh random bytes."""
        check_key_name(name)
        if self.state.get(name) is not None:
            raise KeyringStateError(f"tenant {self.tenant!r} already has a key named {name!r}")
        if len(self.state.keys) >= MAX_KEY_NAMES:
            raise KeyringStateError(
                f"tenant {self.tenant!r}: expected at most {MAX_KEY_NAMES} named keys,"
                " the keyring is full"
            )
        wrapped = wrap_key(self.tenant_key, name, 1, _new_material(material))
        return Keyring(self.tenant_key, self.state.with_key(NamedKey(name, (wrapped,))))

    def rotate(self, name: str, material: bytes | None = None) -> Keyring:
        """A keyring where ``name`` has a new current version n+1. Records sealed under older
        live versions still open; they move to n+1 when next written (:meth:`reseal_record`)."""
        named = self._named(name)
        if named.current >= MAX_KEY_VERSIONS:
            raise KeyringStateError(
                f"key {name!r} of tenant {self.tenant!r}: already at the last version"
                f" {MAX_KEY_VERSIONS}"
            )
        version = named.current + 1
        wrapped = wrap_key(self.tenant_key, name, version, _new_material(material))
        rotated = NamedKey(name, (*named.versions, wrapped))
        return Keyring(self.tenant_key, self.state.with_key(rotated))

    def retire(self, name: str, version: int) -> Keyring:
        """A keyring without the material of ``version`` of ``name``: records sealed under it
        can no longer be opened (:class:`~hermetic.errors.KeyRetiredError`)."""
        named = self._named(name)
        self._wrapped(named, check_key_version(version))  # unknown or already retired: raise
        if version == named.current:
            raise KeyringStateError(
                f"key {name!r} of tenant {self.tenant!r}: version {version} is the current"
                " version and cannot be retired (rotate first)"
            )
        versions = list(named.versions)
        versions[version - 1] = None
        retired = NamedKey(name, tuple(versions))
        return Keyring(self.tenant_key, self.state.with_key(retired))

    # --- keys and records ------------------------------------------------------------

    def _wrapped(self, named: NamedKey, version: int) -> bytes:
        if not 1 <= version <= named.current:
            raise UnknownKeyVersionError(
                f"key {named.name!r} of tenant {self.tenant!r} has versions 1..{named.current},"
                f" not {version}"
            )
        wrapped = named.versions[version - 1]
        if wrapped is None:
            raise KeyRetiredError(
                f"key {named.name!r} version {version} of tenant {self.tenant!r} was retired:"
                " its material is gone"
            )
        return wrapped

    def current_version(self, name: str) -> int:
        return self._named(name).current

    def key(self, name: str, version: int | None = None) -> DataKey:
        """Version ``version`` (default: the current one) of ``name``, unwrapped."""
        named = self._named(name)
        number = named.current if version is None else check_key_version(version)
        return unwrap_key(self.tenant_key, name, number, self._wrapped(named, number))

    def seal_record(self, name: str, record_id: str, counter: int, plaintext: bytes) -> bytes:
        """``plaintext`` sealed under the current version of ``name`` (see
        :func:`~hermetic.persistence.sealing.seal_record`)."""
        return seal_record(self.key(name), record_id, counter, plaintext)

    def open_record(self, name: str, record_id: str, expected_counter: int, data: bytes) -> bytes:
        """The plaintext of a record sealed under any live version of ``name``."""
        named = self._named(name)
        header = parse_header(data)
        wrapped = self._wrapped(named, header.key_version)
        key = unwrap_key(self.tenant_key, name, header.key_version, wrapped)
        return open_record(key, record_id, expected_counter, data)

    def reseal_record(
        self, name: str, record_id: str, expected_counter: int, counter: int, data: bytes
    ) -> bytes:
        """The record opened at ``expected_counter`` and sealed again under the current
        version at ``counter``: the lazy re-wrap after a rotation."""
        plaintext = self.open_record(name, record_id, expected_counter, data)
        return self.seal_record(name, record_id, counter, plaintext)
