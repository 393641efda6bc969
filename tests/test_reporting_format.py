"""Sealed event batches: round trip, the strict decoder, and every tamper a host can try.

The host (record store, parent, operator) holds every sealed batch and can flip bytes,
move a batch to another id, hand over another tenant's batch, or relabel the schema
version; each must end in a typed :class:`~hermetic.errors.BatchError`, and no name may be
readable in the sealed bytes.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermetic.errors import (
    BatchAuthenticationError,
    BatchError,
    BatchFormatError,
    BatchIdError,
    BatchSchemaError,
    BatchTenantError,
    HermeticError,
    ReportingUsageError,
)
from hermetic.reporting import format as fmt
from hermetic.reporting.format import (
    BatchOpener,
    Event,
    associated_data,
    encode_columns,
    encode_events,
    open_batch,
    seal_batch,
    seal_plaintext,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
TENANT = "acme"
BATCH = bytes.fromhex("00112233445566778899aabbccddeeff")
T0 = 1_767_571_200  # 2026-01-05, a Monday

EVENTS = [
    Event("alice@acme.example", "macbook-1", "Slack", True, T0 + 3600),
    Event("alice@acme.example", "macbook-1", "Canva", False, T0 + 7200),
    Event("zoë.müller@acme.example", "iphone-2", "Slack", True, T0 + 90_000),
    Event("alice@acme.example", "macbook-1", "Slack", False, T0 + 100),
]

_name_chars = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x7f\x80\x9f")
names = st.text(_name_chars, min_size=1, max_size=20).filter(lambda s: fmt.name_problem(s) is None)
events = st.builds(
    Event,
    user=names,
    device=names,
    app=names,
    managed=st.booleans(),
    time=st.integers(0, (1 << 37) - 1),
)


def _batch(evs: list[Event]) -> list[Event]:
    """A list that fits one batch: every time within 2**32 seconds of the first."""
    base = evs[0].time
    return [e._replace(time=min(max(e.time, base), base + 0xFFFFFFFF)) for e in evs]


@given(st.lists(events, min_size=1, max_size=40).map(_batch), st.binary(min_size=16, max_size=16))
@settings(max_examples=200, deadline=None)
def test_round_trip(evs: list[Event], batch_id: bytes) -> None:
    sealed = seal_batch(KEY, TENANT, batch_id, evs)
    opened = open_batch(KEY, sealed, tenant=TENANT, batch_id=batch_id)
    assert list(opened.events()) == evs
    assert (opened.tenant, opened.batch_id, len(opened)) == (TENANT, batch_id, len(evs))
    assert opened.users == tuple(dict.fromkeys(e.user for e in evs))
    assert opened.apps == tuple(dict.fromkeys(e.app for e in evs))


def test_names_are_not_visible_in_the_sealed_bytes() -> None:
    sealed = seal_batch(KEY, TENANT, BATCH, EVENTS)
    for event in EVENTS:
        for name in (event.user, event.device, event.app):
            assert name.encode() not in sealed
            assert name.encode("utf-16-le") not in sealed
    # the plaintext does hold them: the check above can fail
    assert b"Canva" in encode_events(EVENTS)


def test_the_encoding_is_columnar_not_json_per_event() -> None:
    plaintext = encode_events(EVENTS * 100)
    assert b"{" not in plaintext
    # 400 events: 11 bytes each plus one dictionary entry per distinct name
    names = {n for e in EVENTS for n in (e.user, e.device, e.app)}
    assert len(plaintext) == 12 + 6 + sum(2 + len(n.encode()) for n in names) + 400 * 11


@given(st.binary(max_size=400))
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_any_bytes_raise_only_batch_errors(data: bytes) -> None:
    with pytest.raises(BatchError):
        open_batch(KEY, data, tenant=TENANT)


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_any_header_followed_by_garbage_raises_only_batch_errors(tail: bytes) -> None:
    header = struct.pack(">4sHB", fmt.MAGIC, fmt.SCHEMA_VERSION, len(TENANT)) + TENANT.encode()
    with pytest.raises(BatchError):
        open_batch(KEY, header + tail, tenant=TENANT)


@given(st.binary(max_size=600))
@settings(max_examples=500)
def test_any_authentic_plaintext_decodes_or_raises_batch_format_error(plaintext: bytes) -> None:
    """Bytes sealed by a key holder (a buggy or hostile device) are still checked."""
    sealed = seal_plaintext(KEY, TENANT, BATCH, plaintext)
    try:
        batch = open_batch(KEY, sealed, tenant=TENANT)
    except BatchFormatError:
        return
    assert len(list(batch.events())) == len(batch)


@given(st.lists(events, min_size=1, max_size=10).map(_batch), st.data())
@settings(max_examples=200, deadline=None)
def test_every_truncation_of_a_plaintext_is_a_format_error(
    evs: list[Event], data: st.DataObject
) -> None:
    plaintext = encode_events(evs)
    cut = data.draw(st.integers(0, len(plaintext) - 1))
    with pytest.raises(BatchFormatError):
        open_batch(KEY, seal_plaintext(KEY, TENANT, BATCH, plaintext[:cut]), tenant=TENANT)
    with pytest.raises(BatchFormatError):
        open_batch(KEY, seal_plaintext(KEY, TENANT, BATCH, plaintext + b"\0"), tenant=TENANT)


def test_every_truncation_of_a_sealed_batch_is_rejected() -> None:
    sealed = seal_batch(KEY, TENANT, BATCH, EVENTS)
    for cut in range(len(sealed)):
        with pytest.raises(BatchError):
            open_batch(KEY, sealed[:cut], tenant=TENANT)


def test_every_flipped_bit_is_rejected() -> None:
    sealed = seal_batch(KEY, TENANT, BATCH, EVENTS)
    assert len(open_batch(KEY, sealed, tenant=TENANT, batch_id=BATCH)) == len(EVENTS)
    for i in range(len(sealed)):
        for bit in (0x01, 0x80):
            tampered = bytearray(sealed)
            tampered[i] ^= bit
            with pytest.raises(BatchError):
                open_batch(KEY, bytes(tampered), tenant=TENANT, batch_id=BATCH)


def test_a_flipped_ciphertext_byte_is_an_authentication_error() -> None:
    sealed = bytearray(seal_batch(KEY, TENANT, BATCH, EVENTS))
    sealed[-20] ^= 1
    with pytest.raises(BatchAuthenticationError):
        open_batch(KEY, bytes(sealed), tenant=TENANT)


def _header_offset() -> int:
    return 4 + 2 + 1 + len(TENANT)


def test_a_batch_replayed_under_another_batch_id_is_rejected() -> None:
    sealed = seal_batch(KEY, TENANT, BATCH, EVENTS)
    other = bytes(16)
    # stored under another id, header untouched: the id it carries is not the record's
    with pytest.raises(BatchIdError):
        open_batch(KEY, sealed, tenant=TENANT, batch_id=other)
    # header rewritten to the new id as well: the associated data no longer matches
    at = _header_offset()
    relabelled = sealed[:at] + other + sealed[at + 16 :]
    with pytest.raises(BatchAuthenticationError):
        open_batch(KEY, relabelled, tenant=TENANT, batch_id=other)
    with pytest.raises(BatchAuthenticationError):
        open_batch(KEY, relabelled, tenant=TENANT)


def test_a_foreign_tenant_batch_is_rejected() -> None:
    foreign = seal_batch(OTHER_KEY, "globex", BATCH, EVENTS)
    with pytest.raises(BatchTenantError):
        open_batch(KEY, foreign, tenant=TENANT)
    # relabelled as ours (same tenant-id length): the associated data binds the tenant
    relabelled = foreign.replace(b"globex", b"acmeco", 1)
    with pytest.raises(BatchAuthenticationError):
        open_batch(KEY, relabelled, tenant="acmeco")
    # even under the foreign tenant's own key: the tenant id is authenticated
    with pytest.raises(BatchAuthenticationError):
        open_batch(OTHER_KEY, relabelled, tenant="acmeco")
    # and another tenant's key never opens our batch
    ours = seal_batch(KEY, TENANT, BATCH, EVENTS)
    with pytest.raises(BatchAuthenticationError):
        open_batch(OTHER_KEY, ours, tenant=TENANT)


def test_the_schema_version_is_bound() -> None:
    plaintext = encode_events(EVENTS)
    sealed_v2 = seal_plaintext(KEY, TENANT, BATCH, plaintext, version=2)
    with pytest.raises(BatchSchemaError):
        open_batch(KEY, sealed_v2, tenant=TENANT)
    # a version-2 batch relabelled as version 1: its associated data named version 2
    relabelled = sealed_v2[:4] + (1).to_bytes(2, "big") + sealed_v2[6:]
    with pytest.raises(BatchAuthenticationError):
        open_batch(KEY, relabelled, tenant=TENANT)
    # a version-1 batch relabelled as an unknown version
    sealed = seal_plaintext(KEY, TENANT, BATCH, plaintext)
    with pytest.raises(BatchSchemaError):
        open_batch(KEY, sealed[:4] + (7).to_bytes(2, "big") + sealed[6:], tenant=TENANT)


def test_associated_data_is_domain_separated_and_length_prefixed() -> None:
    aad = associated_data(TENANT, BATCH)
    assert aad.startswith(len(fmt.DOMAIN).to_bytes(4, "big") + fmt.DOMAIN)
    assert associated_data("ab", b"c" * 16) != associated_data("abc", b"c" * 15)
    assert associated_data(TENANT, BATCH, 1) != associated_data(TENANT, BATCH, 2)


def _sealed_columns() -> bytes:
    columns: dict[str, object] = {
        "time": np.array([T0, T0 + 1]),
        "user": np.array([0, 0]),
        "device": np.array([0, 0]),
        "app": np.array([0, 1]),
        "managed": np.array([True, False]),
    }
    plaintext = encode_columns(["alice@acme.example"], ["mac-1"], ["Slack", "Canva"], **columns)  # type: ignore[arg-type]
    return plaintext


def _replace_names(plaintext: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new)
    assert old in plaintext
    return plaintext.replace(old, new, 1)


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        (b"Canva", b"Slack", "listed twice"),
        (b"Canva", b"Can\x00a", "control character"),
        (b"Canva", b"Can\xffa", "not valid UTF-8"),
        (b"Canva", b"\xed\xa0\x80va", "not valid UTF-8"),  # an encoded lone surrogate
        (b"Canva", b"Cafe\xcc", "not valid UTF-8"),  # a cut multi-byte character
    ],
)
def test_bad_names_inside_an_authentic_batch_are_format_errors(
    old: bytes, new: bytes, why: str
) -> None:
    plaintext = _replace_names(_sealed_columns(), old, new)
    with pytest.raises(BatchFormatError, match=why):
        open_batch(KEY, seal_plaintext(KEY, TENANT, BATCH, plaintext), tenant=TENANT)


def test_a_name_not_in_nfc_is_a_format_error() -> None:
    plaintext = _sealed_columns()
    # "Canva" (5 bytes) -> "Cafe" + U+0301 would be 6 bytes: rewrite the length too
    decomposed = "Cafe\u0301".encode()
    at = plaintext.index(b"Canva")
    lengths_at = 12 + 6 + 2 * 3  # the fourth name's length (member, device, Slack, Canva)
    assert struct.unpack_from("<H", plaintext, lengths_at)[0] == 5
    patched = (
        plaintext[:lengths_at]
        + struct.pack("<H", len(decomposed))
        + plaintext[lengths_at + 2 : at]
        + decomposed
        + plaintext[at + 5 :]
    )
    with pytest.raises(BatchFormatError, match="NFC"):
        open_batch(KEY, seal_plaintext(KEY, TENANT, BATCH, patched), tenant=TENANT)
    # the same text in NFC opens
    composed = "Café".encode()
    patched = (
        plaintext[:lengths_at]
        + struct.pack("<H", len(composed))
        + plaintext[lengths_at + 2 : at]
        + composed
        + plaintext[at + 5 :]
    )
    assert (
        open_batch(KEY, seal_plaintext(KEY, TENANT, BATCH, patched), tenant=TENANT).apps[1]
        == "Café"
    )


def _column_offset(plaintext: bytes, n: int) -> int:
    return len(plaintext) - n * fmt.EVENT_BYTES


@pytest.mark.parametrize(
    ("column", "width", "value", "why"),
    [
        ("user", 2, 1, "past its dictionary"),
        ("device", 2, 5, "past its dictionary"),
        ("app", 2, 2, "past its dictionary"),
        ("flags", 1, 2, "unknown flag"),
        ("app", 2, 0, "no event uses"),  # both events on app 0: "Canva" is listed, unused
    ],
)
def test_bad_columns_inside_an_authentic_batch_are_format_errors(
    column: str, width: int, value: int, why: str
) -> None:
    plaintext = bytearray(_sealed_columns())
    n = 2
    start = _column_offset(bytes(plaintext), n)
    offset = {"user": 4 * n, "device": 6 * n, "app": 8 * n, "flags": 10 * n}[column]
    at = start + offset + width * (n - 1)
    plaintext[at : at + width] = value.to_bytes(width, "little")
    with pytest.raises(BatchFormatError, match=why):
        open_batch(KEY, seal_plaintext(KEY, TENANT, BATCH, bytes(plaintext)), tenant=TENANT)


def test_header_counts_out_of_range_are_format_errors() -> None:
    plaintext = _sealed_columns()
    for patched in (
        struct.pack("<IQ", 0, T0) + plaintext[12:],
        struct.pack("<IQ", 3, T0) + plaintext[12:],
        struct.pack("<IQ", fmt.MAX_EVENTS + 1, T0) + plaintext[12:],
        struct.pack("<IQ", 2, fmt.MAX_BASE_TIME) + plaintext[12:],
        plaintext[:12] + struct.pack("<HHH", 1, 0, 2) + plaintext[18:],
    ):
        with pytest.raises(BatchFormatError):
            open_batch(KEY, seal_plaintext(KEY, TENANT, BATCH, patched), tenant=TENANT)


@given(st.text(min_size=1, max_size=8))
@settings(max_examples=200)
def test_the_encoder_refuses_names_the_decoder_would_refuse(name: str) -> None:
    """Lone surrogates, controls, non-NFC: refused with a usage error before sealing."""
    event = Event(name, "mac-1", "Slack", True, T0)
    if fmt.name_problem(name) is None:
        assert open_batch(KEY, seal_batch(KEY, TENANT, BATCH, [event]), tenant=TENANT).users == (
            name,
        )
    else:
        with pytest.raises(ReportingUsageError):
            seal_batch(KEY, TENANT, BATCH, [event])


@pytest.mark.parametrize(
    "name", ["\ud800", "a\udfffb", "tab\there", "", "x" * 1025, "Cafe\u0301", "del\x7f"]
)
def test_the_encoder_refuses_bad_names(name: str) -> None:
    with pytest.raises(ReportingUsageError):
        seal_batch(KEY, TENANT, BATCH, [Event("alice", "mac", name, False, T0)])


def test_the_encoder_refuses_bad_values() -> None:
    good = EVENTS[0]
    for args in (
        (b"short", TENANT, BATCH, [good]),
        (KEY, "Acme", BATCH, [good]),
        (KEY, TENANT, b"short", [good]),
        (KEY, TENANT, BATCH, []),
        (KEY, TENANT, BATCH, [good._replace(time=-1)]),
        (KEY, TENANT, BATCH, [good._replace(time=1 << 40)]),
        (KEY, TENANT, BATCH, [good._replace(time=1.5)]),
        (KEY, TENANT, BATCH, [good, good._replace(time=good.time + (1 << 32))]),
        (KEY, TENANT, BATCH, [good._replace(managed=1)]),
    ):
        with pytest.raises(ReportingUsageError):
            seal_batch(*args)  # type: ignore[arg-type]


def test_errors_never_carry_a_name() -> None:
    secret = "secret-app-name"
    plaintext = _replace_names(_sealed_columns(), b"Slack", b"Canva")  # duplicate
    messages = []
    for sealed in (
        seal_plaintext(KEY, TENANT, BATCH, plaintext),
        seal_batch(KEY, TENANT, BATCH, [Event("alice", "mac", secret, False, T0)])[:-1],
    ):
        with pytest.raises(HermeticError) as caught:
            open_batch(KEY, sealed, tenant=TENANT)
        messages.append(str(caught.value))
    with pytest.raises(ReportingUsageError) as caught:
        seal_batch(KEY, TENANT, BATCH, [Event("alice", "mac", secret + "\x00", False, T0)])
    messages.append(str(caught.value))
    assert all(secret not in m and "Canva" not in m for m in messages)


def test_the_opener_fast_path_and_the_generic_path_agree() -> None:
    opener = BatchOpener(KEY, TENANT)
    sealed = seal_batch(KEY, TENANT, BATCH, EVENTS)
    assert opener.decrypt(sealed) == opener.decrypt(bytearray(sealed))  # type: ignore[arg-type]
    assert opener.decrypt(sealed) == opener.decrypt(memoryview(sealed))  # type: ignore[arg-type]


def test_nonces_are_fresh_per_seal() -> None:
    a = seal_batch(KEY, TENANT, BATCH, EVENTS)
    b = seal_batch(KEY, TENANT, BATCH, EVENTS)
    at = _header_offset() + 16
    assert a[at : at + 12] != b[at : at + 12]
