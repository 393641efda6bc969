"""A blind two-way relay between two connected sockets, one thread per direction.

The parent's relays that only move ciphertext (the gateway's egress to its backends, the
backend dialer) used asyncio copy loops: per chunk a poll, a ``recv`` into a new
``bytes``, a ``send`` and the loop's callbacks. :func:`splice_sockets` moves the bytes the
way the TCP ingress does (:mod:`hermetic.proxy.relay`): a thread per direction blocked in
``splice(2)`` (socket -> pipe -> socket, never copied into this process), falling back to
one reused buffer where the kernel cannot splice a socket. Half-closes pass on (a clean
end of one direction shuts the other socket's write side); an error in either direction
ends both. Neither side's bytes are read, framed or written by the relay itself.

:func:`detach_stream` hands over an asyncio stream's socket to such a relay once its
protocol header has been answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from typing import cast

from prometheus_client import Counter

from hermetic.proxy.relay import _pump

_WRITE_FLUSH_POLL = 0.001


class _Uncounted:
    def inc(self, amount: float = 1) -> None:
        pass


UNCOUNTED = cast(Counter, _Uncounted())
"""A counter for relays that keep no byte counts."""


async def splice_sockets(
    a: socket.socket,
    b: socket.socket,
    a_to_b: Counter = UNCOUNTED,
    b_to_a: Counter = UNCOUNTED,
) -> None:
    """Relay ``a`` and ``b`` both ways until both directions ended; both sockets are closed
    on return (also when the awaiting task is cancelled: the sockets are shut down, which
    wakes the threads, and closed only once both let go of them)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    lock = threading.Lock()
    running = [2]
    for sock in (a, b):
        sock.setblocking(True)

    def shut(how: int, *sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(how)

    def finished() -> None:
        with lock:
            running[0] -= 1
            last = running[0] == 0
        if last:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()
            with contextlib.suppress(RuntimeError):  # the loop already closed (shutdown)
                loop.call_soon_threadsafe(_resolve, done)

    def direction(source: socket.socket, target: socket.socket, counter: Counter) -> None:
        try:
            if _pump(source, target, counter):
                shut(socket.SHUT_WR, target)  # a clean end: pass it on, the other way goes on
            else:
                shut(socket.SHUT_RDWR, source, target)
        finally:
            finished()

    for source, target, counter in ((a, b, a_to_b), (b, a, b_to_a)):
        threading.Thread(
            target=direction, args=(source, target, counter), name="splice", daemon=True
        ).start()
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        shut(socket.SHUT_RDWR, a, b)
        raise


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def detach_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[socket.socket, bytes]:
    """Take an asyncio stream's socket over for :func:`splice_sockets`.

    Reading stops, what was written so far is flushed, and a duplicate of the socket is
    returned with the bytes the stream reader had already buffered (to be sent on first).
    The stream itself is left open and idle: close its writer after the relay ends.
    """
    transport = writer.transport
    transport.pause_reading()  # type: ignore[attr-defined]
    while transport.get_write_buffer_size():
        if transport.is_closing():
            break
        await asyncio.sleep(_WRITE_FLUSH_POLL)
    buffered = getattr(reader, "_buffer", b"")
    early = bytes(buffered)
    if isinstance(buffered, bytearray):
        buffered.clear()
    raw = writer.get_extra_info("socket")
    if raw is None:
        raise OSError("stream has no socket to relay")
    return socket.socket(fileno=os.dup(raw.fileno())), early
