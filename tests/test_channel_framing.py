"""Stream framing: 2-byte big-endian length prefix, any chunking, strict limits."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.channel.framing import MAX_FRAME_LEN, FrameDecoder, encode_frame
from hermetic.errors import FrameError, MalformedInputError


def test_frame_is_length_big_endian_then_message() -> None:
    assert encode_frame(b"abc") == b"\x00\x03abc"
    assert encode_frame(bytes(0x1234))[:2] == b"\x12\x34"


@pytest.mark.parametrize("size", [0, MAX_FRAME_LEN + 1])
def test_encoder_refuses_empty_and_oversize_messages(size: int) -> None:
    with pytest.raises(FrameError, match=f"got {size}"):
        encode_frame(bytes(size))


def test_decoder_reassembles_byte_by_byte() -> None:
    stream = encode_frame(b"hello") + encode_frame(bytes(MAX_FRAME_LEN))
    decoder = FrameDecoder()
    frames = [f for i in range(len(stream)) for f in decoder.feed(stream[i : i + 1])]
    assert frames == [b"hello", bytes(MAX_FRAME_LEN)]
    assert decoder.buffered == 0
    decoder.eof()


def test_zero_length_prefix_is_a_malformed_input_error_and_sticks() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as info:
        decoder.feed(encode_frame(b"ok") + b"\x00\x00")
    assert isinstance(info.value, MalformedInputError)
    with pytest.raises(FrameError, match="already failed"):
        decoder.feed(encode_frame(b"more"))


def test_stream_ending_inside_a_frame_is_reported() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x05abc") == []
    with pytest.raises(FrameError, match="5 bytes of an incomplete frame"):
        decoder.eof()


def _reference(stream: bytes) -> tuple[list[bytes], bool]:
    """Frames by the spec's rule, and whether a zero length appears at a frame boundary."""
    frames, offset = [], 0
    while len(stream) - offset >= 2:
        size = int.from_bytes(stream[offset : offset + 2], "big")
        if size == 0:
            return frames, True
        if len(stream) - offset - 2 < size:
            break
        frames.append(stream[offset + 2 : offset + 2 + size])
        offset += 2 + size
    return frames, False


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_arbitrary_chunks_match_the_reference_parse_or_raise_frame_error(
    stream: bytes, cuts: list[int]
) -> None:
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    frames: list[bytes] = []
    expected, zero = _reference(stream)
    try:
        for start, end in itertools.pairwise(points):
            frames += decoder.feed(stream[start:end])
    except FrameError:
        assert zero
        assert frames == expected[: len(frames)]
        return
    assert not zero
    assert frames == expected


@settings(max_examples=100, deadline=None)
@given(messages=st.lists(st.binary(min_size=1, max_size=300), max_size=10), data=st.data())
def test_encode_then_decode_in_random_chunks_is_identity(
    messages: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    decoder = FrameDecoder()
    out: list[bytes] = []
    offset = 0
    while offset < len(stream):
        step = data.draw(st.integers(1, 64))
        out += decoder.feed(stream[offset : offset + step])
        offset += step
    assert out == messages
