"""The key hierarchy: names, the root key, derived tenant keys and wrapped named keys."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hermetic.errors import KeyringFormatError, PersistenceUsageError
from hermetic.persistence.keys import (
    KEY_SIZE,
    MAX_KEY_NAME_LENGTH,
    WRAPPED_KEY_SIZE,
    DataKey,
    RootKey,
    TenantKey,
    check_key_name,
    check_store_id,
    check_tenant,
    length_prefixed,
    unwrap_key,
    wrap_key,
)


@pytest.fixture
def root() -> RootKey:
    return RootKey(os.urandom(KEY_SIZE))


# --- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "insights/app-usage", "v1.2_x-y", "a/b/c/d/e/f/g/h", "0" * 64, "/".join(["x" * 63] * 2)],
)
def test_accepts_printable_bounded_key_names(name: str) -> None:
    assert check_key_name(name) == name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", "1 to 128 characters, got 0"),
        ("a" * (MAX_KEY_NAME_LENGTH + 1), "1 to 128 characters, got 129"),
        ("a/b/c/d/e/f/g/h/i", "at most 8 '/'-separated segments, got 9"),
        ("Insights/app", "segments of"),
        ("insights//app", "segments of"),
        ("/insights", "segments of"),
        ("insights/", "segments of"),
        ("insights/..", "segments of"),
        ("insights/.", "segments of"),
        ("-lead", "segments of"),
        ("sp ace", "segments of"),
        ("caf\u00e9", "segments of"),
        ("tab\t", "segments of"),
        ("a" * 65, "segments of"),
    ],
)
def test_rejects_key_names_outside_the_rules(name: str, expected: str) -> None:
    with pytest.raises(PersistenceUsageError, match=r"^key name: expected") as info:
        check_key_name(name)
    assert expected in str(info.value)


@pytest.mark.parametrize("check", [check_key_name, check_store_id, check_tenant])
def test_rejects_names_that_are_not_strings(check: object) -> None:
    with pytest.raises(PersistenceUsageError, match=r"expected a string, got bytes"):
        check(b"tenant")  # type: ignore[operator]


@pytest.mark.parametrize("value", ["a/b", "", "A", "x" * 65, "\u0131"])
def test_rejects_store_ids_and_tenants_that_are_not_one_segment(value: str) -> None:
    with pytest.raises(PersistenceUsageError, match=r"^store id: expected 1 to 64 characters"):
        check_store_id(value)
    with pytest.raises(PersistenceUsageError, match=r"^tenant: expected 1 to 64 characters"):
        check_tenant(value)


# --- root and tenant keys ----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_rejects_a_root_key_of_the_wrong_size(size: int) -> None:
    with pytest.raises(PersistenceUsageError, match=rf"^root key: expected 32 bytes, got {size}$"):
        RootKey(b"\x01" * size)


def test_rejects_a_root_key_that_is_not_bytes() -> None:
    with pytest.raises(PersistenceUsageError, match=r"^root key: expected bytes, got str$"):
        RootKey("k" * 32)  # type: ignore[arg-type]


def test_tenant_key_derivation_follows_the_documented_info_string(root: RootKey) -> None:
    def documented(purpose: bytes) -> bytes:
        info = b"".join(
            len(f).to_bytes(4, "big") + f
            for f in (b"hermetic/persistence/v1", purpose, b"store-eu1", b"tenant-7")
        )
        return HKDF(hashes.SHA256(), 32, None, info).derive(root.material)

    tenant = root.tenant_key("store-eu1", "tenant-7")
    assert tenant.wrapping_key == documented(b"tenant-wrapping-key")
    assert tenant.state_key == documented(b"tenant-state-key")
    assert tenant.wrapping_key != tenant.state_key


def test_tenant_keys_are_the_same_every_boot_from_the_same_root(root: RootKey) -> None:
    again = RootKey(bytes(root.material))
    first, second = root.tenant_key("s", "t"), again.tenant_key("s", "t")
    assert (first.wrapping_key, first.state_key) == (second.wrapping_key, second.state_key)


def test_tenant_keys_differ_per_store_tenant_and_root(root: RootKey) -> None:
    keys = [
        root.tenant_key("ab", "c"),
        root.tenant_key("a", "bc"),  # same concatenation: the length prefixes tell them apart
        root.tenant_key("ab", "d"),
        root.tenant_key("ax", "c"),
        RootKey(os.urandom(32)).tenant_key("ab", "c"),
    ]
    material = {k.wrapping_key for k in keys} | {k.state_key for k in keys}
    assert len(material) == 2 * len(keys)


def test_length_prefixed_fields_never_encode_alike() -> None:
    assert length_prefixed(b"ab", b"c") != length_prefixed(b"a", b"bc")
    assert length_prefixed(b"", b"a") != length_prefixed(b"a", b"")
    assert length_prefixed(b"a") != length_prefixed(b"a", b"")


def test_rejects_bad_store_or_tenant_when_deriving(root: RootKey) -> None:
    with pytest.raises(PersistenceUsageError, match=r"^store id: "):
        root.tenant_key("a/b", "t")
    with pytest.raises(PersistenceUsageError, match=r"^tenant: "):
        root.tenant_key("s", "T")


# --- wrapping ----------------------------------------------------------------------------


def test_wrapped_key_unwraps_only_under_its_tenant_name_and_version(root: RootKey) -> None:
    tenant = root.tenant_key("s", "t")
    material = os.urandom(32)
    wrapped = wrap_key(tenant, "insights/app-usage", 3, material)
    assert len(wrapped) == WRAPPED_KEY_SIZE
    assert material not in wrapped
    key = unwrap_key(tenant, "insights/app-usage", 3, wrapped)
    assert (key.store_id, key.tenant, key.name, key.version) == ("s", "t", "insights/app-usage", 3)
    assert key.material == material

    others = [
        (tenant, "insights/app-usage", 2),
        (tenant, "insights/other", 3),
        (root.tenant_key("s", "u"), "insights/app-usage", 3),
        (root.tenant_key("s2", "t"), "insights/app-usage", 3),
    ]
    for other, name, version in others:
        with pytest.raises(KeyringFormatError, match=r"does not unwrap"):
            unwrap_key(other, name, version, wrapped)


def test_a_wrapped_key_with_any_flipped_byte_does_not_unwrap(root: RootKey) -> None:
    tenant = root.tenant_key("s", "t")
    wrapped = wrap_key(tenant, "k", 1, os.urandom(32))
    for index in range(len(wrapped)):
        edited = bytearray(wrapped)
        edited[index] ^= 0x01
        with pytest.raises(KeyringFormatError, match=r"does not unwrap"):
            unwrap_key(tenant, "k", 1, bytes(edited))


@pytest.mark.parametrize("size", [0, 59, 61])
def test_rejects_wrapped_keys_of_the_wrong_size(root: RootKey, size: int) -> None:
    with pytest.raises(KeyringFormatError, match=rf"expected 60 bytes, got {size}$"):
        unwrap_key(root.tenant_key("s", "t"), "k", 1, b"\x00" * size)


def test_wrapping_refuses_material_of_the_wrong_size(root: RootKey) -> None:
    with pytest.raises(PersistenceUsageError, match=r"^key material: expected 32 bytes, got 16$"):
        wrap_key(root.tenant_key("s", "t"), "k", 1, b"\x02" * 16)


@pytest.mark.parametrize("version", [0, -1, 1 << 32, True, "1"])
def test_rejects_key_versions_out_of_range(root: RootKey, version: object) -> None:
    with pytest.raises(PersistenceUsageError, match=r"^key version: expected"):
        wrap_key(root.tenant_key("s", "t"), "k", version, os.urandom(32))  # type: ignore[arg-type]


def test_keys_compare_by_identity_not_by_material() -> None:
    material = os.urandom(32)
    assert RootKey(material) != RootKey(material)
    assert DataKey("s", "t", "k", 1, material) != DataKey("s", "t", "k", 1, material)
    tenant = TenantKey("s", "t", material, material)
    assert tenant == tenant
