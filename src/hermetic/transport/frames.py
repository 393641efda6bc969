"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes.

Every service message (and the boot-time config exchange) travels as one frame, so a
bridge can forward bytes blindly yet still know where one message ends. The decoder is
sans-IO (feed bytes, get frames); the two coroutines at the bottom are the asyncio edge.
"""

from __future__ import annotations

import asyncio
import struct

from hermetic.errors import FrameFormatError, PeerUnavailableError

HEADER = struct.Struct(">I")
MAX_FRAME_SIZE = 16 * 1024 * 1024
"""Largest frame any hermetic endpoint accepts (16 MiB); larger lengths are rejected."""


def encode_frame(payload: bytes, *, max_size: int = MAX_FRAME_SIZE) -> bytes:
    """``payload`` with its 4-byte big-endian length in front."""
    if len(payload) > max_size:
        raise FrameFormatError(f"frame length: expected at most {max_size}, got {len(payload)}")
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Sans-IO frame splitter: :meth:`feed` bytes as they arrive, get complete frames back."""

    def __init__(self, *, max_size: int = MAX_FRAME_SIZE) -> None:
        self._buffer = bytearray()
        self._max_size = max_size

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return every frame now complete, in order."""
        self._buffer += data
        frames: list[bytes] = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self._max_size:
                raise FrameFormatError(
                    f"frame length: expected at most {self._max_size}, got {length}"
                )
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[HEADER.size : end]))
            del self._buffer[:end]
        return frames

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is buffered (the stream may end cleanly here)."""
        return not self._buffer


class FrameBoundaryTracker:
    """Follows frame boundaries in a byte stream without keeping the bytes.

    A blind bridge uses it to know whether it may append a frame of its own (an error
    frame when the far end dies) without corrupting a frame already half forwarded.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._remaining = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._remaining:
                step = min(self._remaining, len(view))
                self._remaining -= step
                view = view[step:]
                continue
            need = HEADER.size - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == HEADER.size:
                (self._remaining,) = HEADER.unpack(self._header)
                self._header.clear()

    @property
    def at_boundary(self) -> bool:
        return not self._header and not self._remaining


async def read_frame(
    reader: asyncio.StreamReader, *, max_size: int = MAX_FRAME_SIZE
) -> bytes | None:
    """The next frame, or None if the stream ended cleanly between frames."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameFormatError(
            f"frame header: expected {HEADER.size} bytes, got {len(exc.partial)} before EOF"
        ) from None
    except (ConnectionError, OSError) as exc:
        raise PeerUnavailableError(f"connection lost while reading a frame: {exc}") from None
    (length,) = HEADER.unpack(header)
    if length > max_size:
        raise FrameFormatError(f"frame length: expected at most {max_size}, got {length}")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise FrameFormatError(
            f"frame body: expected {length} bytes, got {len(exc.partial)} before EOF"
        ) from None
    except (ConnectionError, OSError) as exc:
        raise PeerUnavailableError(f"connection lost while reading a frame: {exc}") from None


async def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    """Send one frame and wait until the transport has taken it."""
    try:
        writer.write(encode_frame(payload))
        await writer.drain()
    except (ConnectionError, OSError) as exc:
        raise PeerUnavailableError(f"connection lost while writing a frame: {exc}") from None
