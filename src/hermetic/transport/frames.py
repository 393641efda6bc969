"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes.

The boot-time exchange between an enclave and its parent (the config bundle and the
endorsement in, the boot status out; see :mod:`hermetic.enclave.boot`) travels as frames,
so each side knows where one message ends on a vsock stream. Service traffic does not: it
is the Noise channel's own 2-byte framing (:mod:`hermetic.channel.framing`), which the
proxy relays blindly. :func:`encode_frame` is the pure encoder; the two coroutines are the
asyncio edge.
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
