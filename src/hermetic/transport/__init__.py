"""Byte transports between clients, the parent instance and enclaves.

Everything above this package (the Noise channel, the boot exchange) sees a pair of
asyncio streams and never cares whether the bytes crossed a real ``AF_VSOCK`` socket, the
emulator's Unix sockets, TCP or a WebSocket. Only this package touches sockets.
"""

from __future__ import annotations

from hermetic.transport.frames import (
    MAX_FRAME_SIZE,
    encode_frame,
    read_frame,
    write_frame,
)
from hermetic.transport.vsock import (
    FIRST_ENCLAVE_CID,
    PARENT_CID,
    VsockAddress,
    VsockStream,
    connect,
    listen,
)

__all__ = [
    "FIRST_ENCLAVE_CID",
    "MAX_FRAME_SIZE",
    "PARENT_CID",
    "VsockAddress",
    "VsockStream",
    "connect",
    "encode_frame",
    "listen",
    "read_frame",
    "write_frame",
]
