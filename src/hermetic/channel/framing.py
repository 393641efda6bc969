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
        """Append ``data``; return every frame it completes, in order.

        Written for throughput: frames are cut from ``data`` in place and each payload byte
        is copied once; only a frame that straddles two chunks passes through the buffer.
        """
        if self._failed is not None:
            raise FrameError(f"decoder already failed: {self._failed}")
        view = memoryview(data)
        end = len(view)
        frames: list[bytes] = []
        pos = 0
        if self._buffer:
            pos = self._complete_pending(view, frames)
            if not frames:
                return frames
        while end - pos >= LENGTH_PREFIX_LEN:
            size = (view[pos] << 8) | view[pos + 1]
            if size == 0:
                self._fail(pos)
            if end - pos - LENGTH_PREFIX_LEN < size:
                break
            start = pos + LENGTH_PREFIX_LEN
            frames.append(bytes(view[start : start + size]))
            pos = start + size
        self._buffer += view[pos:]
        return frames

    def _complete_pending(self, view: memoryview, frames: list[bytes]) -> int:
        """Top up the buffered partial frame from ``view``; return how many bytes it used."""
        buffer = self._buffer
        pos = 0
        if len(buffer) < LENGTH_PREFIX_LEN:
            pos = min(LENGTH_PREFIX_LEN - len(buffer), len(view))
            buffer += view[:pos]
            if len(buffer) < LENGTH_PREFIX_LEN:
                return pos
        size = (buffer[0] << 8) | buffer[1]
        if size == 0:
            self._fail(-len(buffer) + pos)
        need = LENGTH_PREFIX_LEN + size - len(buffer)
        take = min(need, len(view) - pos)
        buffer += view[pos : pos + take]
        pos += take
        if take == need:
            frames.append(bytes(memoryview(buffer)[LENGTH_PREFIX_LEN:]))
            self._buffer = bytearray()
        return pos

    def _fail(self, offset: int) -> None:
        self._failed = FrameError(
            f"frame length at chunk offset {offset}: expected 1..{MAX_FRAME_LEN}, got 0"
        )
        raise self._failed

    def eof(self) -> None:
        """The stream ended: raise if it ended inside a frame."""
        if self._buffer:
            raise FrameError(
                f"stream ended inside a frame: {len(self._buffer)} bytes of an incomplete frame"
            )
