"""Serve an :class:`~hermetic.nsm.emulator.EmulatedNSM` over a Unix socket.

The launcher runs this outside the enclave, so the NSM's PKI keys never enter the enclave
process; inside, :class:`SocketBackend` stands in for ``/dev/nsm`` (the client finds it
through ``HERMETIC_NSM_SOCKET``). Framing is the simplest that works: each message is a
4-byte big-endian length followed by the message, one request then one response at a time
per connection. A declared request length over the NSM's own limit (0x1000) is answered
with ``InputTooLarge`` and the connection is closed, so a client can never make the
server buffer more than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from hermetic.errors import HermeticError, NSMError, NSMUnavailableError
from hermetic.nsm.emulator import EmulatedNSM
from hermetic.nsm.messages import (
    REQUEST_MAX_SIZE,
    RESPONSE_MAX_SIZE,
    ErrorCode,
    ErrorResponse,
    encode_response,
)

#: Environment variable naming the emulator socket inside an emulated enclave.
SOCKET_ENV = "HERMETIC_NSM_SOCKET"
log = logging.getLogger("hermetic.nsm")
FRAME_HEADER = struct.Struct(">I")


def frame(message: bytes) -> bytes:
    """Length-prefix one message."""
    return FRAME_HEADER.pack(len(message)) + message


Admit = Callable[[socket.socket], Awaitable[None]]
"""Checks who connected; raises :class:`~hermetic.errors.HermeticError` to refuse."""


async def start_server(
    nsm: EmulatedNSM, path: Path | str, *, mode: int = 0o600, admit: Admit | None = None
) -> asyncio.Server:
    """Listen on ``path`` (replacing a stale socket file) and answer with ``nsm``.

    The launcher passes ``admit`` so that only its own enclave's processes are answered:
    an NSM that served another enclave would let it claim that enclave's PCRs.
    """
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if admit is not None:
                try:
                    await admit(writer.get_extra_info("socket"))
                except HermeticError as exc:
                    log.warning("NSM %s: refused a connection: %s", path, exc)
                    writer.close()
                    return
            await _serve_connection(nsm, reader, writer)
        except asyncio.CancelledError:
            # The server is shutting down. End the connection task normally: Python 3.11's
            # stream callback calls task.exception() on a cancelled task and logs a
            # spurious traceback.
            writer.close()

    server = await asyncio.start_unix_server(on_connection, path=str(path))
    os.chmod(path, mode)
    return server


async def _serve_connection(
    nsm: EmulatedNSM, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            try:
                header = await reader.readexactly(FRAME_HEADER.size)
            except asyncio.IncompleteReadError:
                return  # the client closed the connection between requests
            (length,) = FRAME_HEADER.unpack(header)
            if length > REQUEST_MAX_SIZE:
                writer.write(frame(encode_response(ErrorResponse(ErrorCode.INPUT_TOO_LARGE))))
                await writer.drain()
                return
            request = await reader.readexactly(length)
            writer.write(frame(nsm.handle(request)))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve_forever(nsm: EmulatedNSM, path: Path | str) -> None:
    """Serve until cancelled."""
    server = await start_server(nsm, path)
    async with server:
        await server.serve_forever()


class SocketBackend:
    """:class:`~hermetic.nsm.client.Backend` talking to the emulator over a Unix socket.

    Blocking and synchronous like the ioctl it replaces; connects lazily and keeps the
    connection for later requests. Safe to share between threads, as the device is: the
    Nitro driver serialises ioctls on ``/dev/nsm``, and here one request and its response
    hold the connection together (an enclave's handshake and its anchor thread's clock
    read both attest; interleaved on one stream they would get each other's documents).
    """

    def __init__(self, path: Path | str, *, timeout: float = 30.0) -> None:
        self._path = str(path)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def transact(self, request: bytes) -> bytes:
        with self._lock:
            return self._transact(request)

    def _transact(self, request: bytes) -> bytes:
        sock = self._connect()
        try:
            sock.sendall(frame(request))
            (length,) = FRAME_HEADER.unpack(self._read(sock, FRAME_HEADER.size))
            if length > RESPONSE_MAX_SIZE:
                raise NSMError(
                    f"emulator response: expected at most {RESPONSE_MAX_SIZE} bytes, "
                    f"got a frame of {length}",
                    "InternalError",
                )
            return self._read(sock, length)
        except (OSError, NSMError) as exc:
            self.close()
            if isinstance(exc, NSMError):
                raise
            raise NSMError(
                f"NSM emulator socket {self._path}: {exc.strerror or type(exc).__name__}",
                "InternalError",
            ) from None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout)
            try:
                sock.connect(self._path)
            except OSError as exc:
                sock.close()
                raise NSMUnavailableError(
                    f"cannot connect to the NSM emulator at {self._path}: "
                    f"{exc.strerror or type(exc).__name__}",
                    "InternalError",
                ) from None
            self._sock = sock
        return self._sock

    @staticmethod
    def _read(sock: socket.socket, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = sock.recv(size - len(chunks))
            if not chunk:
                raise NSMError(
                    f"NSM emulator closed the connection after {len(chunks)} of {size} bytes",
                    "InternalError",
                )
            chunks += chunk
        return bytes(chunks)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> SocketBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
