"""The emulated NSM speaks the real messages with the real module's PCR and error semantics."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.attestation.codec import decode
from hermetic.errors import NSMError
from hermetic.nsm.client import NSMClient
from hermetic.nsm.emulator import EMPTY_IMAGE_PCR, EmulatedNSM
from hermetic.nsm.messages import (
    DescribePCRRequest,
    ErrorCode,
    ErrorResponse,
    decode_response,
    encode_request,
)
from hermetic.nsm.pki import MODULE_ID_PATTERN, DevPKI

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
ZERO = bytes(48)


@pytest.fixture
def nsm() -> EmulatedNSM:
    return EmulatedNSM(now=NOW, clock=lambda: NOW)


@pytest.fixture
def client(nsm: EmulatedNSM) -> NSMClient:
    return NSMClient(nsm)


def _code(call: object, *args: object) -> str:
    with pytest.raises(NSMError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.code


def test_pcrs_0_to_15_are_locked_at_boot_and_16_to_31_are_not(client: NSMClient) -> None:
    states = [client.describe_pcr(i) for i in range(32)]
    assert [s.locked for s in states] == [True] * 16 + [False] * 16
    assert all(len(s.value) == 48 for s in states)


def test_default_pcrs_are_the_empty_image_and_the_instance_id(client: NSMClient) -> None:
    empty_image = hashlib.sha384(ZERO + hashlib.sha384(b"").digest()).digest()
    assert empty_image == EMPTY_IMAGE_PCR
    for index in (0, 1, 2):
        assert client.describe_pcr(index).value == empty_image
    instance_id = DevPKI().instance_id()
    assert client.describe_pcr(4).value == hashlib.sha384(ZERO + instance_id.encode()).digest()
    for index in (3, *range(5, 32)):
        assert client.describe_pcr(index).value == ZERO


def test_launcher_pcrs_replace_the_defaults() -> None:
    pcr0 = hashlib.sha384(b"image").digest()
    client = NSMClient(EmulatedNSM({0: pcr0, 8: b"\x08" * 48}, now=NOW))
    assert client.describe_pcr(0).value == pcr0
    assert client.describe_pcr(1).value == ZERO
    assert client.describe_pcr(8).value == b"\x08" * 48


def test_debug_mode_zeroes_pcr_0_1_2_8_but_keeps_pcr4() -> None:
    client = NSMClient(
        EmulatedNSM({0: b"\x01" * 48, 3: b"\x03" * 48, 8: b"\x08" * 48}, debug=True, now=NOW)
    )
    for index in (0, 1, 2, 8):
        assert client.describe_pcr(index).value == ZERO
    assert client.describe_pcr(3).value == b"\x03" * 48
    assert client.describe_pcr(4).value != ZERO


def test_extend_on_16_is_sha384_of_old_concatenated_with_data(client: NSMClient) -> None:
    old = client.describe_pcr(16).value
    new = client.extend_pcr(16, b"abc")
    assert new == hashlib.sha384(old + b"abc").digest()
    assert client.describe_pcr(16).value == new
    assert client.extend_pcr(16, b"") == hashlib.sha384(new).digest()


def test_extend_on_boot_locked_pcr_is_read_only_index(client: NSMClient) -> None:
    before = client.describe_pcr(0).value
    assert _code(client.extend_pcr, 0, b"x") == "ReadOnlyIndex"
    assert client.describe_pcr(0).value == before


def test_lock_then_extend_is_read_only_index(client: NSMClient) -> None:
    client.extend_pcr(20, b"config")
    client.lock_pcr(20)
    assert client.describe_pcr(20).locked
    assert _code(client.extend_pcr, 20, b"x") == "ReadOnlyIndex"


def test_lock_pcr_on_locked_index_is_read_only_index(client: NSMClient) -> None:
    assert _code(client.lock_pcr, 3) == "ReadOnlyIndex"
    client.lock_pcr(16)
    assert _code(client.lock_pcr, 16) == "ReadOnlyIndex"


def test_lock_pcrs_locks_a_prefix_and_accepts_already_locked(client: NSMClient) -> None:
    client.lock_pcrs(18)
    assert [client.describe_pcr(i).locked for i in (16, 17, 18)] == [True, True, False]
    client.lock_pcrs(32)
    assert all(client.describe_pcr(i).locked for i in range(32))
    client.lock_pcrs(0)


def test_lock_pcrs_beyond_32_is_refused(client: NSMClient) -> None:
    assert _code(client.lock_pcrs, 33) == "InvalidIndex"
    assert not client.describe_pcr(16).locked


@pytest.mark.parametrize("operation", ["describe", "extend", "lock"])
def test_index_32_is_invalid_index(client: NSMClient, operation: str) -> None:
    call = {
        "describe": lambda: client.describe_pcr(32),
        "extend": lambda: client.extend_pcr(32, b"x"),
        "lock": lambda: client.lock_pcr(32),
    }[operation]
    assert _code(call) == "InvalidIndex"


def test_describe_nsm_reports_module_pcrs_and_digest(client: NSMClient, nsm: EmulatedNSM) -> None:
    description = client.describe_nsm()
    assert description.max_pcrs == 32
    assert description.digest == "SHA384"
    assert description.locked_pcrs == tuple(range(16))
    assert description.module_id == nsm.module_id
    assert MODULE_ID_PATTERN.fullmatch(description.module_id)
    assert description.module_id.startswith(DevPKI().instance_id() + "-enc")
    client.lock_pcr(17)
    assert client.describe_nsm().locked_pcrs == (*range(16), 17)


def test_module_id_enclave_part_starts_with_boot_time_in_ms(nsm: EmulatedNSM) -> None:
    enc = nsm.module_id.split("-enc")[1]
    assert int(enc[:12], 16) == int(NOW.timestamp() * 1000)


def test_get_random_returns_256_fresh_bytes(client: NSMClient) -> None:
    first, second = client.get_random(), client.get_random()
    assert len(first) == len(second) == 256
    assert first != second


def test_document_lists_locked_pcrs_including_ones_locked_later(client: NSMClient) -> None:
    extended = client.extend_pcr(16, b"app")
    client.lock_pcr(16)
    _, doc = decode(client.attest())
    assert sorted(doc.pcrs) == list(range(17))
    assert doc.pcrs[16] == extended
    assert doc.pcrs[0] == EMPTY_IMAGE_PCR
    assert not doc.debug


def test_document_carries_requested_fields_and_now(client: NSMClient) -> None:
    _, doc = decode(client.attest(user_data=b"u", nonce=b"", public_key=b"k" * 1024))
    assert (doc.user_data, doc.nonce, doc.public_key) == (b"u", b"", b"k" * 1024)
    assert doc.timestamp == int(NOW.timestamp() * 1000)
    _, plain = decode(client.attest())
    assert (plain.user_data, plain.nonce, plain.public_key) == (None, None, None)


@pytest.mark.parametrize("field", ["user_data", "nonce", "public_key"])
def test_attestation_field_over_1024_bytes_is_input_too_large(
    client: NSMClient, field: str
) -> None:
    assert _code(lambda: client.attest(**{field: b"x" * 1025})) == "InputTooLarge"


def test_request_over_0x1000_bytes_is_input_too_large(nsm: EmulatedNSM) -> None:
    raw = cbor2.dumps({"ExtendPCR": {"index": 16, "data": b"x" * 0x1000}})
    assert decode_response(nsm.handle(raw)) == ErrorResponse(ErrorCode.INPUT_TOO_LARGE)
    with pytest.raises(NSMError) as info:
        NSMClient(nsm).extend_pcr(16, b"x" * 0x1000)
    assert info.value.code == "InputTooLarge"


def test_malformed_request_is_answered_with_invalid_argument(nsm: EmulatedNSM) -> None:
    response = decode_response(nsm.handle(b"\xa1\x61"))
    assert isinstance(response, ErrorResponse)
    assert response.code.value == "InvalidArgument"


def test_index_beyond_u16_is_invalid_argument_not_invalid_index(nsm: EmulatedNSM) -> None:
    raw = cbor2.dumps({"DescribePCR": {"index": 65536}})
    response = decode_response(nsm.handle(raw))
    assert isinstance(response, ErrorResponse)
    assert response.code.value == "InvalidArgument"
    ok = decode_response(nsm.handle(encode_request(DescribePCRRequest(31))))
    assert not isinstance(ok, ErrorResponse)


def test_bad_launcher_pcrs_are_refused() -> None:
    with pytest.raises(NSMError):
        EmulatedNSM({0: b"short"}, now=NOW)
    with pytest.raises(NSMError):
        EmulatedNSM({32: ZERO}, now=NOW)
    with pytest.raises(NSMError):
        EmulatedNSM(module_id="i-nothex-enc00", now=NOW)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_into_handle_always_get_a_response(raw: bytes) -> None:
    nsm = EmulatedNSM(module_id="i-0123456789abcdef0-enc0123456789abcdef", now=NOW)
    response = decode_response(nsm.handle(raw, now=NOW))
    assert response is not None


structured = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.binary(max_size=40)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "DescribePCR",
            "ExtendPCR",
            "LockPCR",
            "LockPCRs",
            "Attestation",
            "index",
            "data",
            "range",
            "nonce",
        ]
    ),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=12)
            | st.sampled_from(
                [
                    "DescribePCR",
                    "ExtendPCR",
                    "LockPCRs",
                    "Attestation",
                    "index",
                    "data",
                    "range",
                    "user_data",
                    "nonce",
                    "public_key",
                ]
            ),
            children,
            max_size=3,
        )
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(structured)
def test_well_formed_cbor_of_any_shape_into_handle_gets_a_response(value: object) -> None:
    nsm = EmulatedNSM(module_id="i-0123456789abcdef0-enc0123456789abcdef", now=NOW)
    response = decode_response(nsm.handle(cbor2.dumps(value), now=NOW))
    assert response is not None
