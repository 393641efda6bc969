"""Length-prefixed frames: the unit of the boot exchange between an enclave and its parent."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.errors import FrameFormatError
from hermetic.transport.frames import encode_frame, read_frame


def test_frame_is_four_byte_big_endian_length_then_payload() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


async def _read(data: bytes) -> bytes | None:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_frame(reader)


@settings(deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(min_value=1, max_value=17))
def test_frames_read_back_whatever_the_chunking(payloads: list[bytes], chunk: int) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)

    async def read_all() -> list[bytes]:
        reader = asyncio.StreamReader()
        for i in range(0, len(stream), chunk):
            reader.feed_data(stream[i : i + chunk])
        reader.feed_eof()
        got: list[bytes] = []
        while (frame := await read_frame(reader)) is not None:
            got.append(frame)
        return got

    assert asyncio.run(read_all()) == payloads


def test_encode_rejects_payloads_over_the_limit() -> None:
    with pytest.raises(FrameFormatError, match="expected at most 10, got 11"):
        encode_frame(bytes(11), max_size=10)


async def test_read_frame_rejects_lengths_over_the_limit_before_reading_the_body() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(struct.pack(">I", 11))
    with pytest.raises(FrameFormatError, match="expected at most 10, got 11"):
        await read_frame(reader, max_size=10)


@settings(deadline=None)
@given(st.binary(max_size=64))
def test_read_frame_never_raises_anything_but_frame_errors(junk: bytes) -> None:
    async def read_all() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(junk)
        reader.feed_eof()
        while await read_frame(reader, max_size=32) is not None:
            pass

    with contextlib.suppress(FrameFormatError):
        asyncio.run(read_all())


async def test_read_frame_returns_none_on_clean_eof_between_frames() -> None:
    assert await _read(b"") is None
    assert await _read(encode_frame(b"x")) == b"x"


@pytest.mark.parametrize("cut", [1, 3, 5, 7])
async def test_read_frame_rejects_every_truncation(cut: int) -> None:
    frame = encode_frame(b"abcd")
    with pytest.raises(FrameFormatError):
        await _read(frame[:cut])
