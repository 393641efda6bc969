"""Length-prefixed frames: the unit every service message and bridge relies on."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hermetic.errors import FrameFormatError
from hermetic.transport.frames import (
    FrameBoundaryTracker,
    FrameDecoder,
    encode_frame,
    read_frame,
)


def test_frame_is_four_byte_big_endian_length_then_payload() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(min_value=1, max_value=17))
def test_decoder_recovers_frames_whatever_the_chunking(payloads: list[bytes], chunk: int) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    decoder = FrameDecoder()
    tracker = FrameBoundaryTracker()
    got: list[bytes] = []
    for i in range(0, len(stream), chunk):
        got += decoder.feed(stream[i : i + chunk])
        tracker.feed(stream[i : i + chunk])
    assert got == payloads
    assert decoder.at_boundary
    assert tracker.at_boundary


@given(st.binary(min_size=1, max_size=200), st.data())
def test_tracker_knows_when_a_frame_is_cut_mid_way(payload: bytes, data: st.DataObject) -> None:
    stream = encode_frame(payload)
    cut = data.draw(st.integers(min_value=1, max_value=len(stream) - 1))
    tracker = FrameBoundaryTracker()
    tracker.feed(stream[:cut])
    assert not tracker.at_boundary
    tracker.feed(stream[cut:])
    assert tracker.at_boundary


def test_decoder_rejects_lengths_over_the_limit_before_buffering() -> None:
    decoder = FrameDecoder(max_size=10)
    with pytest.raises(FrameFormatError, match="expected at most 10, got 11"):
        decoder.feed(struct.pack(">I", 11))


@given(st.binary(max_size=64))
def test_decoder_never_raises_anything_but_frame_errors(junk: bytes) -> None:
    decoder = FrameDecoder(max_size=32)
    with contextlib.suppress(FrameFormatError):
        decoder.feed(junk)


async def _read(data: bytes) -> bytes | None:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_frame(reader)


async def test_read_frame_returns_none_on_clean_eof_between_frames() -> None:
    assert await _read(b"") is None
    assert await _read(encode_frame(b"x")) == b"x"


@pytest.mark.parametrize("cut", [1, 3, 5, 7])
async def test_read_frame_rejects_every_truncation(cut: int) -> None:
    frame = encode_frame(b"abcd")
    with pytest.raises(FrameFormatError):
        await _read(frame[:cut])
