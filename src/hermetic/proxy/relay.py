"""The TCP ingress relay: one client connection to the enclave's service port, byte for byte.

Every request crosses the proxy twice, so each hop's cost is paid twice per round trip.
The bytes are moved by two threads per connection (one per direction) doing blocking
``recv`` and ``sendall`` on the two sockets: a thread blocked in ``recv`` is woken by the
kernel and forwards at once, where an event loop pays a poll, its own bookkeeping and a
callback per chunk (measured with bench_proxy: the asyncio relay put the proxied round
trip at ~1.7x a direct Unix socket, the threaded one at ~1.3x). Flow control is the
sockets' own: a blocked ``sendall`` stops that direction's reads. The event loop only
accepts, connects the enclave side and waits for the end. The price is two mostly idle
threads per open connection, which suits a proxy in front of one enclave (sessions in
the hundreds); tens of thousands of idle connections would want the event loop back.

The relay is blind: what crosses it is the attested channel's Noise ciphertext (2-byte
length-prefixed messages), which the parent can neither read nor forge. So it follows no
frame boundaries and never writes a byte of its own: when the enclave is unreachable or
goes away, the client's connection is simply closed, and the client's channel reports a
closed session (an untrusted parent has nothing to say that the client should believe).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import threading
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

from hermetic.errors import PeerUnavailableError
from hermetic.proxy.metrics import ProxyMetrics

CHUNK = 256 * 1024
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0)
ENCLAVE_BUFFER = 1024 * 1024


class IngressRelay:
    """Relay one accepted client socket to the enclave's service port.

    :meth:`run` connects the enclave side and returns when both directions ended;
    :meth:`close` ends them early (proxy shutdown). Sockets are closed by the relay only
    after both of its threads let go of them, so a file descriptor is never reused under a
    thread still blocked on it.
    """

    def __init__(self, client: socket.socket, metrics: ProxyMetrics) -> None:
        self.metrics = metrics
        self.client = client
        self.enclave: socket.socket | None = None
        self.client_finished = False
        self._client_gone = False
        self._to_enclave = metrics.bytes.labels("to_enclave")
        self._from_enclave = metrics.bytes.labels("from_enclave")
        self._lock = threading.Lock()
        self._running = 0
        self._closing = False
        self._done: asyncio.Future[None] | None = None

    async def run(self, connect: Callable[[], Awaitable[socket.socket]]) -> None:
        """Connect the enclave side, relay until both directions end, then close both."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        try:
            enclave = await connect()
        except PeerUnavailableError:
            self.metrics.enclave_errors.inc()
            _close(self.client)  # no bytes of our own: just the end of the connection
            return
        with self._lock:
            if self._closing:
                _close(enclave)
                _close(self.client)
                return
            self.enclave = enclave
            self._running = 2
        for sock in (self.client, enclave):
            sock.setblocking(True)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            # The enclave side's default buffers (~200 KiB) wake the relay for every
            # ~200 KiB in bulk transfers; bench_proxy throughput rose by a quarter with
            # 1 MiB. The kernel caps it at net.core.[wr]mem_max, and a refusal is harmless.
            with contextlib.suppress(OSError):
                enclave.setsockopt(socket.SOL_SOCKET, option, ENCLAVE_BUFFER)

        def finished() -> None:
            with contextlib.suppress(RuntimeError):  # the loop already closed (shutdown)
                loop.call_soon_threadsafe(_resolve, self._done)

        upstream = threading.Thread(
            target=self._upstream, args=(enclave, finished), name="ingress-up", daemon=True
        )
        downstream = threading.Thread(
            target=self._downstream, args=(enclave, finished), name="ingress-down", daemon=True
        )
        upstream.start()
        downstream.start()
        await asyncio.shield(self._done)

    def close(self) -> None:
        """End both directions now (their threads wake from the shutdown and exit)."""
        with self._lock:
            self._closing = True
            sockets = [self.client] + ([self.enclave] if self.enclave is not None else [])
            running = self._running
        if not running:
            for sock in sockets:
                _close(sock)
            return
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # --- the two threads -----------------------------------------------------------------

    def _upstream(self, enclave: socket.socket, finished: Callable[[], None]) -> None:
        try:
            if _pump(self.client, enclave, self._to_enclave):
                # The client has sent everything and still gets its answers: pass the EOF on.
                self.client_finished = True
                with contextlib.suppress(OSError):
                    enclave.shutdown(socket.SHUT_WR)
            else:  # the client's connection broke (or the enclave refused bytes): end both
                self._client_gone = True
                for sock in (self.client, enclave):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
        finally:
            self._thread_done(enclave, finished)

    def _downstream(self, enclave: socket.socket, finished: Callable[[], None]) -> None:
        try:
            _pump(enclave, self.client, self._from_enclave)
            if not (self.client_finished or self._client_gone or self._closing):
                self.metrics.enclave_errors.inc()  # the enclave went away under a client
            # The enclave is done (or gone): what it sent was delivered, end the client's
            # connection; that also wakes the other thread if the client is still open.
            for sock in (self.client, enclave):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        finally:
            self._thread_done(enclave, finished)

    def _thread_done(self, enclave: socket.socket, finished: Callable[[], None]) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            _close(self.client)
            _close(enclave)
            finished()


def _pump(source: socket.socket, target: socket.socket, counter: Counter) -> bool:
    """Copy until ``source`` ends; True on a clean end of stream, False on an error.

    The bytes move in the kernel (:func:`_splice`) where both sockets allow it, else
    through one buffer per direction (:func:`_copy`).
    """
    try:
        pipe = os.pipe2(os.O_CLOEXEC)
    except OSError:
        return _copy(source, target, counter)
    try:
        with contextlib.suppress(OSError):  # a bigger pipe moves more per call; optional
            fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, CHUNK)
        moved = _splice(source, target, counter, pipe)
    finally:
        os.close(pipe[0])
        os.close(pipe[1])
    return _copy(source, target, counter) if moved is None else moved


def _splice(
    source: socket.socket, target: socket.socket, counter: Counter, pipe: tuple[int, int]
) -> bool | None:
    """Move bytes socket -> pipe -> socket with splice(2): never copied into this process.

    The relay is blind, so it has no reason to see the bytes at all: with ``recv`` and
    ``sendall`` each chunk was copied out of the kernel and back (measured: relaying 2 GiB
    from TCP to a Unix socket took 1.46 s of CPU with copies, 0.42-0.56 s spliced).
    Returns None when the kernel cannot splice one of these sockets (EINVAL on the first
    call in that direction, e.g. a socket family without splice support), after handing
    on whatever already sits in the pipe, so the caller copies the rest.
    """
    inc = counter.inc
    read_end, write_end = pipe
    src, dst = source.fileno(), target.fileno()
    read_before = written_before = False
    while True:
        try:
            size = os.splice(src, write_end, CHUNK, flags=_SPLICE_FLAGS)
        except OSError as exc:
            return None if exc.errno == errno.EINVAL and not read_before else False
        read_before = True
        if not size:
            return True
        inc(size)
        while size:
            try:
                sent = os.splice(read_end, dst, size, flags=_SPLICE_FLAGS)
            except OSError as exc:
                if exc.errno != errno.EINVAL or written_before:
                    return False
                return None if _hand_on(read_end, size, target) else False
            written_before = True
            size -= sent


def _hand_on(read_end: int, size: int, target: socket.socket) -> bool:
    """Send the ``size`` bytes left in the pipe to ``target`` the ordinary way."""
    try:
        while size:
            data = os.read(read_end, size)
            target.sendall(data)
            size -= len(data)
    except OSError:
        return False
    return True


def _copy(source: socket.socket, target: socket.socket, counter: Counter) -> bool:
    """Copy through one buffer per direction, allocated once.

    ``recv(CHUNK)`` would allocate a fresh 256 KiB object per chunk, which the allocator
    maps and unmaps every time (a small echo's round trip cost the proxy twice the CPU of
    this loop).
    """
    inc = counter.inc
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while True:
        try:
            size = source.recv_into(buffer)
        except OSError:
            return False
        if not size:
            return True
        inc(size)
        try:
            target.sendall(view[:size])
        except OSError:
            return False


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)
