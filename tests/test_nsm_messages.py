"""NSM request/response messages: byte-exact against reference/nitro.md 4.2, strict parsing."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.errors import HermeticError, MalformedInputError, NSMError, NSMResponseFormatError
from hermetic.nsm.client import NSMClient
from hermetic.nsm.messages import (
    AttestationRequest,
    AttestationResponse,
    DescribeNSMRequest,
    DescribeNSMResponse,
    DescribePCRRequest,
    DescribePCRResponse,
    Digest,
    ErrorCode,
    ErrorResponse,
    ExtendPCRRequest,
    ExtendPCRResponse,
    GetRandomRequest,
    GetRandomResponse,
    LockPCRRequest,
    LockPCRResponse,
    LockPCRsRequest,
    LockPCRsResponse,
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

# The hex column of the table in reference/nitro.md 4.2 (requests), copied verbatim.
REQUEST_VECTORS: list[tuple[Request, str]] = [
    (DescribePCRRequest(0), "a16b4465736372696265504352a165696e64657800"),
    (
        ExtendPCRRequest(16, b"abc"),
        "a169457874656e64504352a265696e64657810646461746143616263",
    ),
    (LockPCRRequest(16), "a1674c6f636b504352a165696e64657810"),
    (LockPCRsRequest(32), "a1684c6f636b50435273a16572616e67651820"),
    (DescribeNSMRequest(), "6b44657363726962654e534d"),
    (
        AttestationRequest(),
        "a16b4174746573746174696f6ea369757365725f64617461f6656e6f6e6365f66a7075626c69635f6b6579f6",
    ),
    (GetRandomRequest(), "6947657452616e646f6d"),
]

# Response bytes given in the reference: the LockPCR unit variant and an Error.
RESPONSE_VECTORS: list[tuple[Response, str]] = [
    (LockPCRResponse(), "674c6f636b504352"),
    (ErrorResponse(ErrorCode.INVALID_INDEX), "a1654572726f726c496e76616c6964496e646578"),
]

# Responses the reference gives as CBOR shapes: build the shape with cbor2 independently.
RESPONSE_SHAPES: list[tuple[Response, object]] = [
    (
        DescribePCRResponse(lock=True, data=bytes(range(48))),
        {"DescribePCR": {"lock": True, "data": bytes(range(48))}},
    ),
    (ExtendPCRResponse(data=b"\x01" * 48), {"ExtendPCR": {"data": b"\x01" * 48}}),
    (LockPCRsResponse(), "LockPCRs"),
    (
        DescribeNSMResponse(
            1, 0, 0, "i-0123456789abcdef0-enc0123456789abcdef", 32, (0, 1, 16), Digest.SHA384
        ),
        {
            "DescribeNSM": {
                "version_major": 1,
                "version_minor": 0,
                "version_patch": 0,
                "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
                "max_pcrs": 32,
                "locked_pcrs": [0, 1, 16],
                "digest": "SHA384",
            }
        },
    ),
    (AttestationResponse(document=b"\x84doc"), {"Attestation": {"document": b"\x84doc"}}),
    (GetRandomResponse(random=b"\x07" * 256), {"GetRandom": {"random": b"\x07" * 256}}),
]


@pytest.mark.parametrize(("request_", "hex_"), REQUEST_VECTORS)
def test_request_encoding_matches_reference_table(request_: Request, hex_: str) -> None:
    assert encode_request(request_).hex() == hex_


@pytest.mark.parametrize(("request_", "hex_"), REQUEST_VECTORS)
def test_request_decodes_from_reference_bytes(request_: Request, hex_: str) -> None:
    assert decode_request(bytes.fromhex(hex_)) == request_


@pytest.mark.parametrize(("response", "hex_"), RESPONSE_VECTORS)
def test_response_encoding_matches_reference_bytes(response: Response, hex_: str) -> None:
    assert encode_response(response).hex() == hex_
    assert decode_response(bytes.fromhex(hex_)) == response


@pytest.mark.parametrize(("response", "shape"), RESPONSE_SHAPES)
def test_response_encoding_matches_reference_shape(response: Response, shape: object) -> None:
    assert encode_response(response) == cbor2.dumps(shape)
    assert decode_response(cbor2.dumps(shape)) == response


def test_attestation_request_fields_are_byte_strings_in_declaration_order() -> None:
    raw = encode_request(AttestationRequest(user_data=b"u", nonce=b"n", public_key=b"k"))
    assert raw == cbor2.dumps(
        {"Attestation": {"user_data": b"u", "nonce": b"n", "public_key": b"k"}}
    )
    assert decode_request(raw) == AttestationRequest(b"u", b"n", b"k")


def test_attestation_request_missing_optional_fields_mean_none_like_serde() -> None:
    raw = cbor2.dumps({"Attestation": {"nonce": b"n"}})
    assert decode_request(raw) == AttestationRequest(nonce=b"n")


def test_every_error_code_round_trips() -> None:
    for code in ErrorCode:
        raw = encode_response(ErrorResponse(code))
        assert raw == cbor2.dumps({"Error": code.value})
        assert decode_response(raw) == ErrorResponse(code)


MALFORMED_REQUESTS = [
    b"",
    b"\xff",
    bytes.fromhex("6b44657363726962654e534d") + b"\x00",  # trailing byte
    cbor2.dumps("DescribePCR"),  # struct variant sent as a unit
    cbor2.dumps({"DescribeNSM": None}),  # unit variant sent as a map
    cbor2.dumps({"DescribePCR": {"index": 65536}}),  # not a u16
    cbor2.dumps({"DescribePCR": {"index": -1}}),
    cbor2.dumps({"DescribePCR": {"index": True}}),  # bool is not an integer here
    cbor2.dumps({"DescribePCR": {}}),
    cbor2.dumps({"DescribePCR": {"index": 1, "extra": 2}}),
    cbor2.dumps({"ExtendPCR": {"index": 16, "data": "text"}}),
    cbor2.dumps({"Attestation": {"nonce": 5}}),
    cbor2.dumps({"Reboot": {}}),
    cbor2.dumps({"DescribePCR": {"index": 0}, "GetRandom": None}),
    cbor2.dumps([1, 2, 3]),
    cbor2.dumps("Nope"),
]


@pytest.mark.parametrize("raw", MALFORMED_REQUESTS)
def test_malformed_request_is_invalid_argument(raw: bytes) -> None:
    with pytest.raises(NSMError) as info:
        decode_request(raw)
    assert info.value.code == "InvalidArgument"


MALFORMED_RESPONSES = [
    b"",
    b"\xa1",
    cbor2.dumps({"Error": "NoSuchCode"}),
    cbor2.dumps({"DescribePCR": {"lock": 1, "data": b""}}),
    cbor2.dumps({"DescribeNSM": {"module_id": "x"}}),
    cbor2.dumps({"Attestation": {"document": "text"}}),
    cbor2.dumps("Attestation"),
    cbor2.dumps({"GetRandom": {"random": b"x"}}) + b"\x00",
]


@pytest.mark.parametrize("raw", MALFORMED_RESPONSES)
def test_malformed_response_is_malformed_input(raw: bytes) -> None:
    with pytest.raises(NSMResponseFormatError) as info:
        decode_response(raw)
    assert isinstance(info.value, MalformedInputError)
    assert info.value.code == "InvalidResponse"
    assert info.value.exit_code == 2


def test_encoder_rejects_index_outside_u16() -> None:
    with pytest.raises(NSMError) as info:
        encode_request(DescribePCRRequest(70000))
    assert info.value.code == "InvalidArgument"


def _all_vectors() -> list[bytes]:
    return [bytes.fromhex(h) for _, h in REQUEST_VECTORS]


def test_single_byte_mutations_of_requests_parse_or_fail_typed() -> None:
    # Mutation test: every byte of every reference request, replaced by a handful of values.
    codes: set[str] = set()
    for raw in _all_vectors():
        for position in range(len(raw)):
            for value in (0x00, 0x17, 0x18, 0x40, 0x60, 0xA0, 0xF6, 0xFF, raw[position] ^ 1):
                mutated = raw[:position] + bytes([value]) + raw[position + 1 :]
                try:
                    parsed = decode_request(mutated)
                except NSMError as exc:
                    codes.add(exc.code)
                else:
                    # Whatever parsed must re-encode to a request that parses the same.
                    assert decode_request(encode_request(parsed)) == parsed
    assert codes == {"InvalidArgument"}


def test_truncations_of_requests_fail_typed() -> None:
    for raw in _all_vectors():
        for end in range(len(raw)):
            with pytest.raises(NSMError):
                decode_request(raw[:end])


u16 = st.integers(min_value=0, max_value=0xFFFF)
small = st.binary(max_size=64)
requests = st.one_of(
    st.builds(DescribePCRRequest, u16),
    st.builds(ExtendPCRRequest, u16, small),
    st.builds(LockPCRRequest, u16),
    st.builds(LockPCRsRequest, u16),
    st.just(DescribeNSMRequest()),
    st.builds(AttestationRequest, st.none() | small, st.none() | small, st.none() | small),
    st.just(GetRandomRequest()),
)
responses = st.one_of(
    st.builds(DescribePCRResponse, st.booleans(), small),
    st.builds(ExtendPCRResponse, small),
    st.just(LockPCRResponse()),
    st.just(LockPCRsResponse()),
    st.builds(
        DescribeNSMResponse,
        u16,
        u16,
        u16,
        st.text(max_size=40),
        u16,
        st.lists(u16, max_size=32).map(tuple),
        st.sampled_from(Digest),
    ),
    st.builds(AttestationResponse, small),
    st.builds(GetRandomResponse, small),
    st.builds(ErrorResponse, st.sampled_from(ErrorCode)),
)


@given(requests)
def test_requests_round_trip(request_: Request) -> None:
    assert decode_request(encode_request(request_)) == request_


@given(responses)
def test_responses_round_trip(response: Response) -> None:
    assert decode_response(encode_response(response)) == response


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_into_response_decoder_raise_only_hermetic_errors(raw: bytes) -> None:
    with contextlib.suppress(HermeticError):
        decode_response(raw)


class _Replies:
    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    def transact(self, request: bytes) -> bytes:
        return self.reply


@settings(max_examples=200)
@given(st.one_of(st.binary(max_size=120), responses.map(encode_response)))
def test_client_given_any_reply_raises_only_hermetic_errors(reply: bytes) -> None:
    client = NSMClient(_Replies(reply))
    calls = [
        client.attest,
        client.get_random,
        client.describe_nsm,
        lambda: client.describe_pcr(1),
        lambda: client.extend_pcr(16, b"x"),
        lambda: client.lock_pcr(16),
        lambda: client.lock_pcrs(16),
    ]
    for call in calls:
        with contextlib.suppress(HermeticError):
            call()


def test_single_byte_mutations_of_responses_parse_or_fail_typed() -> None:
    samples = [encode_response(r) for r, _ in RESPONSE_SHAPES] + [
        bytes.fromhex(h) for _, h in RESPONSE_VECTORS
    ]
    codes: set[str] = set()
    accepted = 0
    for raw in samples:
        for position in range(min(len(raw), 120)):
            for value in (0x00, 0x18, 0x40, 0x60, 0xA1, 0xF5, 0xF6, 0xFF, raw[position] ^ 1):
                mutated = raw[:position] + bytes([value]) + raw[position + 1 :]
                try:
                    parsed = decode_response(mutated)
                except NSMResponseFormatError as exc:
                    codes.add(exc.code)
                else:
                    accepted += 1
                    assert decode_response(encode_response(parsed)) == parsed
    assert codes == {"InvalidResponse"}
    assert accepted > 0  # some mutations (inside byte strings) are still valid responses
