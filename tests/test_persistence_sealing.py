"""Sealed records: the documented format, and every tampering refused with its own error."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hermetic.errors import (
    HermeticError,
    PersistenceUsageError,
    RecordAuthenticationError,
    RecordCounterError,
    RecordReplayError,
    SealedRecordError,
    SealedRecordFormatError,
    UnknownKeyVersionError,
)
from hermetic.persistence.keys import DataKey
from hermetic.persistence.sealing import (
    MAX_COUNTER,
    MAX_PLAINTEXT_SIZE,
    OVERHEAD,
    open_record,
    parse_header,
    seal_record,
)

NAME = "insights/app-usage"


@pytest.fixture
def key() -> DataKey:
    return DataKey("store-eu1", "tenant-7", NAME, 1, os.urandom(32))


def _like(key: DataKey, **changes: object) -> DataKey:
    fields: dict[str, object] = {
        "store_id": key.store_id,
        "tenant": key.tenant,
        "name": key.name,
        "version": key.version,
        "material": key.material,
    }
    fields.update(changes)
    return DataKey(**fields)  # type: ignore[arg-type]


def test_round_trip(key: DataKey) -> None:
    for plaintext in (b"", b"x", os.urandom(1000)):
        sealed = seal_record(key, "tenant-7/report/1", 5, plaintext)
        assert len(sealed) == len(plaintext) + OVERHEAD
        assert open_record(key, "tenant-7/report/1", 5, sealed) == plaintext


def test_two_seals_of_the_same_record_differ(key: DataKey) -> None:
    assert seal_record(key, "r", 1, b"same") != seal_record(key, "r", 1, b"same")


def test_sealed_record_follows_the_documented_layout(key: DataKey) -> None:
    """Opened by hand from docs/persistence.md: header fields and the associated data."""
    sealed = seal_record(key, "tenant-7/report/1", 0x0102030405, b"plaintext")
    assert sealed[0] == 0x01
    assert int.from_bytes(sealed[1:5], "big") == 1
    assert int.from_bytes(sealed[5:13], "big") == 0x0102030405
    nonce = sealed[13:25]

    def field(value: bytes) -> bytes:
        return len(value).to_bytes(4, "big") + value

    aad = b"".join(
        field(f)
        for f in (
            b"hermetic/persistence/v1",
            b"record",
            sealed[:13],
            b"store-eu1",
            b"tenant-7",
            NAME.encode(),
            b"tenant-7/report/1",
        )
    )
    assert AESGCM(key.material).decrypt(nonce, sealed[25:], aad) == b"plaintext"
    header = parse_header(sealed)
    assert (header.key_version, header.counter, header.nonce) == (1, 0x0102030405, nonce)


def _expected_after_flip(index: int, mask: int) -> type[HermeticError]:
    """The documented check order: format, key version, tag, counter."""
    if index == 0:
        return SealedRecordFormatError  # unknown format byte
    if 1 <= index <= 4:
        return UnknownKeyVersionError  # version 1 becomes 0 or another unknown version
    if index == 5 and mask == 0x80:
        return SealedRecordFormatError  # counter above 2**63 - 1
    return RecordAuthenticationError  # counter, nonce, ciphertext or tag: the tag fails


@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_every_flipped_byte_is_refused_with_its_error(key: DataKey, mask: int) -> None:
    sealed = seal_record(key, "r/1", 7, b"a small record")
    for index in range(len(sealed)):
        edited = bytearray(sealed)
        edited[index] ^= mask
        expected = _expected_after_flip(index, mask)
        with pytest.raises(expected) as info:
            open_record(key, "r/1", 7, bytes(edited))
        assert type(info.value) is expected, index


def test_truncated_or_extended_record_is_refused(key: DataKey) -> None:
    sealed = seal_record(key, "r/1", 1, b"record")
    for length in range(len(sealed)):
        error = SealedRecordFormatError if length < OVERHEAD else RecordAuthenticationError
        with pytest.raises(error):
            open_record(key, "r/1", 1, sealed[:length])
    with pytest.raises(RecordAuthenticationError):
        open_record(key, "r/1", 1, sealed + b"\x00")


def test_swapped_records_are_refused(key: DataKey) -> None:
    first = seal_record(key, "tenant-7/a", 3, b"first")
    second = seal_record(key, "tenant-7/b", 3, b"second")
    with pytest.raises(RecordAuthenticationError, match=r"another record's bytes under this id"):
        open_record(key, "tenant-7/a", 3, second)
    with pytest.raises(RecordAuthenticationError):
        open_record(key, "tenant-7/b", 3, first)


def test_replayed_older_version_is_refused(key: DataKey) -> None:
    old = seal_record(key, "r", 1, b"balance=100")
    seal_record(key, "r", 2, b"balance=0")
    with pytest.raises(RecordReplayError, match=r"counter 1 is older than the expected 2"):
        open_record(key, "r", 2, old)


def test_record_newer_than_expected_is_refused(key: DataKey) -> None:
    newer = seal_record(key, "r", 4, b"v4")
    with pytest.raises(RecordCounterError, match=r"counter 4 is newer than the expected 3"):
        open_record(key, "r", 3, newer)


def test_a_forged_counter_is_an_authentication_failure_not_a_replay(key: DataKey) -> None:
    sealed = bytearray(seal_record(key, "r", 2, b"v2"))
    sealed[5:13] = (1).to_bytes(8, "big")
    with pytest.raises(RecordAuthenticationError):
        open_record(key, "r", 2, bytes(sealed))


@pytest.mark.parametrize(
    "changes",
    [
        {"store_id": "store-us1"},
        {"tenant": "tenant-8"},
        {"name": "insights/other"},
        {"material": os.urandom(32)},
    ],
    ids=["store", "tenant", "name", "key"],
)
def test_record_opened_under_another_identity_is_refused(
    key: DataKey, changes: dict[str, object]
) -> None:
    sealed = seal_record(key, "r", 1, b"data")
    with pytest.raises(RecordAuthenticationError, match=r"does not authenticate"):
        open_record(_like(key, **changes), "r", 1, sealed)


def test_record_opened_with_another_key_version_is_refused(key: DataKey) -> None:
    sealed = seal_record(key, "r", 1, b"data")
    with pytest.raises(UnknownKeyVersionError, match=r"sealed under key version 1"):
        open_record(_like(key, version=2), "r", 1, sealed)


def test_record_opened_under_another_record_id_is_refused(key: DataKey) -> None:
    sealed = seal_record(key, "tenant-7/r", 1, b"data")
    for other in ("tenant-7/s", "tenant-7/r/", "tenant-8/r", "tenant-7/rr"):
        with pytest.raises(RecordAuthenticationError):
            open_record(key, other, 1, sealed)


@pytest.mark.parametrize("counter", [0, -1, MAX_COUNTER + 1, True, 1.0])
def test_rejects_counters_out_of_range(key: DataKey, counter: object) -> None:
    with pytest.raises(PersistenceUsageError, match=r"^counter: expected"):
        seal_record(key, "r", counter, b"")  # type: ignore[arg-type]
    sealed = seal_record(key, "r", 1, b"")
    with pytest.raises(PersistenceUsageError, match=r"^expected counter: expected"):
        open_record(key, "r", counter, sealed)  # type: ignore[arg-type]


@pytest.mark.parametrize("record_id", ["", "a/../b", "sp ace", "x" * 257])
def test_rejects_record_ids_the_store_would_refuse(key: DataKey, record_id: str) -> None:
    with pytest.raises(PersistenceUsageError, match=r"^record id: "):
        seal_record(key, record_id, 1, b"")


def test_rejects_plaintext_too_large_for_the_store(key: DataKey) -> None:
    seal_record(key, "r", 1, b"\x00" * MAX_PLAINTEXT_SIZE)
    with pytest.raises(PersistenceUsageError, match=r"^plaintext: expected at most"):
        seal_record(key, "r", 1, b"\x00" * (MAX_PLAINTEXT_SIZE + 1))


def test_rejects_records_that_are_not_bytes(key: DataKey) -> None:
    with pytest.raises(SealedRecordFormatError, match=r"expected bytes, got str"):
        open_record(key, "r", 1, "sealed")  # type: ignore[arg-type]


def test_every_record_refusal_is_caught_as_a_sealed_record_error() -> None:
    for error in (
        SealedRecordFormatError,
        RecordAuthenticationError,
        RecordReplayError,
        RecordCounterError,
    ):
        assert issubclass(error, SealedRecordError)
