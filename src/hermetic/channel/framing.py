"""Stream framing for Noise messages: a 2-byte big-endian length before every message.

Noise leaves framing to the application (spec §3) and suggests exactly this prefix. It is a
separate layer because the other carrier we use, WebSocket, already delimits messages (one
binary frame = one Noise message, no prefix), so the session itself only ever sees whole
Noise messages. Sans-IO: the decoder eats arbitrary chunks and returns complete frames.
"""

from __future__ import annotations

from hermetic.errors import FrameError

LENGTH_PREFIX_LEN = 2
MAX_FRAME_LEN = 65535


def encode_frame(message: bytes) -> bytes:
    """``len(message)`` as u16 big-endian, then the message (1..65535 bytes)."""
    return frame_prefix(message) + message


def frame_prefix(message: bytes) -> bytes:
    """Only the prefix, so a writer can send prefix and message without concatenating."""
    size = len(message)
    if size == 0 or size > MAX_FRAME_LEN:
        raise FrameError(f"frame length: expected 1..{MAX_FRAME_LEN} bytes, got {size}")
    return size.to_bytes(LENGTH_PREFIX_LEN, "big")


class FrameDecoder:
    """Turns a byte stream into Noise messages; a zero length prefix is a protocol error."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return every frame it completes, in order."""
        if self._failed is not None:
            raise FrameError(f"decoder already failed: {self._failed}")
        self._buffer += data
        frames: list[bytes] = []
        buffer = self._buffer
        offset = 0
        end = len(buffer)
        while end - offset >= LENGTH_PREFIX_LEN:
            size = (buffer[offset] << 8) | buffer[offset + 1]
            if size == 0:
                self._failed = FrameError(
                    f"frame length at stream offset +{offset}: expected 1..{MAX_FRAME_LEN}, got 0"
                )
                raise self._failed
            if end - offset - LENGTH_PREFIX_LEN < size:
                break
            start = offset + LENGTH_PREFIX_LEN
            frames.append(bytes(buffer[start : start + size]))
            offset = start + size
        if offset:
            del buffer[:offset]
        return frames

    def eof(self) -> None:
        """The stream ended: raise if it ended inside a frame."""
        if self._buffer:
            raise FrameError(
                f"stream ended inside a frame: {len(self._buffer)} bytes of an incomplete frame"
            )
