"""RPC messages: exact CBOR shapes, strict decoding, id bookkeeping on both ends."""

from __future__ import annotations

import contextlib
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.channel import rpc
from hermetic.errors import MalformedInputError, RPCFormatError, SessionStateError


def test_messages_have_the_documented_cbor_shapes() -> None:
    assert cbor2.loads(rpc.encode(rpc.Request(7, "echo", [1, "a"]))) == [0, 7, "echo", [1, "a"]]
    assert cbor2.loads(rpc.encode(rpc.Result(7, {"k": b"v"}))) == [1, 7, {"k": b"v"}]
    assert cbor2.loads(rpc.encode(rpc.Error(7, "not_found", "no"))) == [2, 7, "not_found", "no"]
    assert cbor2.loads(rpc.encode(rpc.Cancel(7))) == [3, 7]
    assert rpc.encode(rpc.Cancel(7)) == bytes.fromhex("820307")


@pytest.mark.parametrize(
    "message",
    [
        rpc.Request(0, "m", None),
        rpc.Result(2**64 - 1, [b"x"]),
        rpc.Error(1, "c", "m"),
        rpc.Cancel(3),
    ],
)
def test_decode_inverts_encode(message: rpc.RPCMessage) -> None:
    assert rpc.decode(rpc.encode(message)) == message


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"a": 1}, "expected a CBOR array"),
        ([], "expected a CBOR array"),
        ([4, 1], "expected 0, 1, 2 or 3"),
        ([True, 1, "m", None], "expected 0, 1, 2 or 3"),
        ([0, 1, "m"], "expected 4 elements, got 3"),
        ([3, 1, 2], "expected 2 elements"),
        ([1, -1, None], "unsigned 64-bit"),
        ([1, 2**64, None], "unsigned 64-bit"),
        ([1, "1", None], "unsigned 64-bit"),
        ([0, 1, b"m", None], "rpc method"),
        ([2, 1, 5, "m"], "text code"),
    ],
)
def test_decode_rejects_every_other_shape(value: Any, match: str) -> None:
    with pytest.raises(RPCFormatError, match=match) as info:
        rpc.decode(cbor2.dumps(value))
    assert isinstance(info.value, MalformedInputError)


def test_decode_rejects_bytes_that_are_not_cbor() -> None:
    with pytest.raises(RPCFormatError, match="not valid CBOR"):
        rpc.decode(b"\xff\xff")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_arbitrary_bytes_decode_or_raise_rpc_format_error(data: bytes) -> None:
    with contextlib.suppress(RPCFormatError):
        rpc.decode(data)


def test_every_byte_mutation_of_a_request_decodes_to_something_else_or_raises() -> None:
    message = rpc.Request(300, "echo", {"payload": b"abc", "n": [1, 2.5, None]})
    original = rpc.encode(message)
    rejected = 0
    for index in range(len(original)):
        for delta in (1, 0x80, 0xFF):
            mutated = bytearray(original)
            mutated[index] = (mutated[index] + delta) % 256
            try:
                decoded = rpc.decode(bytes(mutated))
            except RPCFormatError:
                rejected += 1
                continue
            assert decoded != message, f"byte {index} +{delta} decoded to the original"
    assert rejected > 0


def test_client_matches_replies_and_drops_late_replies_to_cancelled_calls() -> None:
    client = rpc.RPCClientState()
    first, _ = client.request("a", None)
    second, _ = client.request("b", None)
    assert (first, second) == (0, 1)
    assert client.receive(rpc.encode(rpc.Result(second, 2))) == rpc.Result(second, 2)
    assert rpc.decode(client.cancel(first)) == rpc.Cancel(first)
    assert client.receive(rpc.encode(rpc.Error(first, "cancelled", ""))) is None
    assert client.pending == 0


def test_client_rejects_a_reply_to_an_id_never_requested() -> None:
    client = rpc.RPCClientState()
    with pytest.raises(RPCFormatError, match="never requested"):
        client.receive(rpc.encode(rpc.Result(0, None)))


def test_client_rejects_a_request_sent_to_it() -> None:
    client = rpc.RPCClientState()
    client.request("a", None)
    with pytest.raises(RPCFormatError, match="expected result or error"):
        client.receive(rpc.encode(rpc.Request(0, "x", None)))


def test_server_refuses_duplicate_in_flight_ids_and_ignores_stale_cancels() -> None:
    server = rpc.RPCServerState()
    request = rpc.encode(rpc.Request(5, "m", None))
    assert server.receive(request) == rpc.Request(5, "m", None)
    with pytest.raises(RPCFormatError, match="already in flight"):
        server.receive(request)
    assert server.receive(rpc.encode(rpc.Cancel(9))) is None
    assert server.receive(rpc.encode(rpc.Cancel(5))) == rpc.Cancel(5)
    server.forget(5)
    with pytest.raises(SessionStateError):
        server.result(5, None)


def test_unencodable_result_is_a_format_error_and_keeps_the_call_in_flight() -> None:
    server = rpc.RPCServerState()
    server.receive(rpc.encode(rpc.Request(1, "m", None)))
    with pytest.raises(RPCFormatError):
        server.result(1, object())
    assert rpc.decode(server.error(1, "internal", "x")) == rpc.Error(1, "internal", "x")


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def test_decode_rejects_trailing_bytes_after_the_message() -> None:
    data = rpc.encode(rpc.Request(1, "echo", b"abc"))
    with pytest.raises(RPCFormatError, match="1 trailing byte"):
        rpc.decode(data + b"\x00")
    with pytest.raises(RPCFormatError, match="trailing byte"):
        rpc.decode(data + rpc.encode(rpc.Cancel(1)))


def test_decode_rejects_duplicate_map_keys_in_args() -> None:
    # [0, 1, "m", {"k": 1, "k": 2}] written by hand: cbor2 cannot encode a duplicate key.
    data = bytes.fromhex("84 00 01 61 6d a2 61 6b 01 61 6b 02".replace(" ", ""))
    with pytest.raises(
        RPCFormatError, match=r"rpc message: not valid CBOR.*(?i:duplicate)"
    ) as info:
        rpc.decode(data)
    assert isinstance(info.value, MalformedInputError)
    # the same map with distinct keys is accepted, so the key check is what fired
    assert rpc.decode(data[:-3] + bytes.fromhex("616c02")).args == {"k": 1, "l": 2}


def test_decode_bounds_the_nesting_depth_of_args() -> None:
    # the message array is one level, so args may nest MAX_DEPTH - 1 levels
    deepest = rpc.Request(1, "m", _nested(rpc.MAX_DEPTH - 1))
    assert rpc.decode(rpc.encode(deepest)) == deepest
    with pytest.raises(RPCFormatError, match="depth"):
        rpc.decode(rpc.encode(rpc.Request(1, "m", _nested(rpc.MAX_DEPTH))))
    with pytest.raises(RPCFormatError, match="depth"):
        rpc.decode(b"\x81" * 100_000 + b"\x00")


@pytest.mark.parametrize(
    "tagged",
    [
        cbor2.CBORTag(1, 1_700_000_000),  # epoch date: not turned into a datetime
        cbor2.CBORTag(2, b"\x01\x00"),  # bignum: not turned into an int
        cbor2.CBORTag(28, [1]),  # shareable: no shared-reference machinery
        cbor2.CBORTag(258, [1, 2]),  # set: not turned into a frozenset
        cbor2.CBORTag(40000, "app"),  # a tag nobody registered
    ],
)
def test_tagged_args_pass_through_as_opaque_tags(tagged: cbor2.CBORTag) -> None:
    decoded = rpc.decode(rpc.encode(rpc.Request(1, "m", {"v": tagged})))
    assert isinstance(decoded, rpc.Request)
    value = decoded.args["v"]
    assert type(value) is cbor2.CBORTag
    assert (value.tag, value.value) == (tagged.tag, tagged.value)


def test_a_tagged_message_array_is_not_an_rpc_message() -> None:
    with pytest.raises(RPCFormatError, match="expected a CBOR array, got CBORTag"):
        rpc.decode(cbor2.dumps(cbor2.CBORTag(55799, [3, 1])))
