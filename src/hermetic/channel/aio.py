"""asyncio adapters: drive the sans-IO session over a byte stream or a WebSocket.

Kept thin on purpose: all protocol decisions live in :mod:`hermetic.channel.session`,
:mod:`~hermetic.channel.framing` and :mod:`~hermetic.channel.rpc`. A :class:`MessagePipe`
moves whole Noise messages (2-byte length prefix on streams, one binary frame per message on
WebSocket); a :class:`Channel` pumps a session over a pipe; :class:`ClientChannel` and
:func:`serve_connection` add the RPC layer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from hermetic.channel import rpc
from hermetic.channel.framing import LENGTH_PREFIX_LEN, MAX_FRAME_LEN, frame_prefix
from hermetic.channel.noise import NX, StaticKeypair
from hermetic.channel.session import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_REKEY_INTERVAL,
    ApplicationData,
    ClientSession,
    Closed,
    MakeEvidence,
    ServerSession,
    State,
    VerifyEvidence,
    _Session,
)
from hermetic.errors import (
    FrameError,
    HermeticError,
    RPCError,
    SessionClosedError,
    TransportError,
)

Handler = Callable[[Any], Awaitable[Any]]
"""An RPC method: takes the request's ``args``, returns a CBOR-encodable result."""

DEFAULT_HANDSHAKE_TIMEOUT = 30.0
RECV_SIZE = 64 * 1024
"""Most bytes a stream pipe's transport reads per call where it keeps its stream reader."""
_FRAME_SPACE = MAX_FRAME_LEN + LENGTH_PREFIX_LEN
RECEIVE_BUFFER = 16 * 1024
"""A taken-over stream's first receive buffer (:class:`_FrameReceiver`); it grows on use."""
RECEIVE_BUFFER_MAX = 512 * 1024
COALESCE_BYTES = 64 * 1024
"""A stream pipe writes its queued messages at once from this many bytes (else once the
event loop's current pass ends, with those sent after them in the same pass)."""
"""What that buffer may grow to while the consumer falls behind, before reading pauses."""


class MessagePipe(Protocol):
    """Carries whole Noise messages in order."""

    async def send(self, messages: Sequence[bytes]) -> None: ...

    async def receive(self) -> bytes | None:
        """The next message, or None when the peer ended the connection cleanly."""

    async def aclose(self) -> None: ...


class StreamPipe:
    """Noise messages over an asyncio stream (TCP, Unix socket, emulated vsock).

    Where the stream is a plain socket transport (every stream this project opens), the
    pipe takes over its receiving side with a :class:`_FrameReceiver`: the socket is read
    straight into one buffer that is reused, and each frame is copied out of it once.
    asyncio's stream reader copied every frame twice (into its buffer, then out of it,
    moving the rest of the buffer down each time), and read 256 KiB at a time into a fresh
    ``bytes``, above glibc's mmap threshold, so each read mapped a new buffer and faulted
    its pages in (measured with 64 KiB messages: ~350 page faults per MiB received, half
    the receiver's CPU). Writes, flow control and closing stay with the stream writer.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = _FrameReceiver.take_over(reader, writer.transport)
        if self._frames is None:
            transport = writer.transport
            if isinstance(getattr(transport, "max_size", None), int):
                transport.max_size = RECV_SIZE  # type: ignore[attr-defined]
        self._queued: list[bytes] = []
        self._queued_size = 0
        self._flush_soon: asyncio.Handle | None = None

    async def send(self, messages: Sequence[bytes]) -> None:
        """Write the messages, or queue them until the event loop's current pass ends when
        other callbacks are still to run in it (:meth:`_flush`); at once from
        :data:`COALESCE_BYTES` queued."""
        queued = self._queued
        for message in messages:
            queued.append(frame_prefix(message))
            queued.append(message)
            self._queued_size += len(message)
        try:
            if self._flush_soon is None:
                loop = asyncio.get_running_loop()
                ready = getattr(loop, "_ready", None)  # asyncio's loop: a deque of callbacks
                if isinstance(ready, collections.deque) and not ready:
                    self._write_queued()  # nothing else runs before the loop polls again
                else:
                    self._flush_soon = loop.call_soon(self._flush)
            elif self._queued_size >= COALESCE_BYTES:
                self._write_queued()
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise TransportError(f"stream write failed ({type(exc).__name__})") from exc

    def _flush(self) -> None:
        """Write what was queued in one ``writelines``: with many calls in flight, the
        replies (or requests) made in one pass of the event loop leave in one ``send``
        system call instead of one each, and wake the peer once. A message is queued only
        while other callbacks are ready to run (the loop's ready queue, where the loop has
        one, is not empty: they may send too), so a lone one is not delayed, and a queued
        one at most until those ran."""
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        self._write_queued()

    def _write_queued(self) -> None:
        if self._queued:
            parts, self._queued, self._queued_size = self._queued, [], 0
            with contextlib.suppress(RuntimeError):  # the transport closed: drain reports it
                self._writer.writelines(parts)

    async def receive(self) -> bytes | None:
        if self._frames is not None:
            frame = await self._frames.receive()
            return None if frame is None else bytes(frame)
        return await self._read_frame()

    async def receive_borrowed(self) -> bytes | memoryview | None:
        """:meth:`receive`, but the message may be a view of the receive buffer.

        The view is valid only until the caller next yields to the event loop (the buffer
        is reused then). :class:`Channel` uses this: it decrypts each message at once,
        which saves copying every frame out of the buffer first.
        """
        if self._frames is not None:
            return await self._frames.receive()
        return await self._read_frame()

    async def _read_frame(self) -> bytes | None:
        # readexactly() copies each frame once out of the StreamReader's buffer, where
        # read() + FrameDecoder would copy it twice; the framing rules are the same.
        try:
            try:
                prefix = await self._reader.readexactly(LENGTH_PREFIX_LEN)
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    return None  # clean end of stream between frames
                raise FrameError("stream ended inside a frame's length prefix") from exc
            size = (prefix[0] << 8) | prefix[1]
            if size == 0:
                raise FrameError(f"frame length: expected 1..{MAX_FRAME_LEN}, got 0")
            try:
                return await self._reader.readexactly(size)
            except asyncio.IncompleteReadError as exc:
                raise FrameError(
                    f"stream ended inside a frame ({len(exc.partial)} of {size} bytes)"
                ) from exc
        except (ConnectionError, OSError) as exc:
            raise TransportError(f"stream read failed ({type(exc).__name__})") from exc

    async def aclose(self) -> None:
        self._flush()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            # Shielded: every wait_closed() of one writer awaits the same future, and a
            # task cancelled while it waits (a ClientChannel's reader, which closes the
            # pipe when the peer goes away, is cancelled by close()) would cancel that
            # future for every other waiter, so close() itself raised CancelledError.
            await asyncio.shield(self._writer.wait_closed())


class _FrameReceiver(asyncio.BufferedProtocol):
    """The receiving side of a socket transport: length-prefixed frames read in place.

    Installed with ``transport.set_protocol``; every event other than received bytes
    (flow control of writes, end of stream, connection loss) is passed on to the stream's
    own protocol, so the :class:`asyncio.StreamWriter` keeps working unchanged.

    The buffer starts small (an idle session holds :data:`RECEIVE_BUFFER`) and doubles,
    up to :data:`RECEIVE_BUFFER_MAX`, when a read filled all of its room or more than half
    of it waits; only at the maximum is reading paused, until a quarter of it is left.
    Pausing and resuming cost two ``epoll_ctl`` calls: with a buffer of two frames they
    came every frame or two in bulk transfers and cost more than the copies saved
    (bench_channel).
    """

    def __init__(
        self, inner: asyncio.BaseProtocol, transport: asyncio.Transport, size: int
    ) -> None:
        self._inner = inner
        self._transport = transport
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._eof = False
        self._lost: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._offered = 0
        self._filled = False

    @classmethod
    def take_over(
        cls, reader: asyncio.StreamReader, transport: asyncio.BaseTransport
    ) -> _FrameReceiver | None:
        """Install a receiver on ``transport``, or None where this is not a plain socket.

        What the stream reader had already buffered moves over first. Only the standard
        selector socket transport is taken over (its ``set_protocol`` switches to
        ``get_buffer``/``recv_into`` reads); TLS and other transports keep the reader.
        """
        inner = transport.get_protocol()
        buffered = getattr(reader, "_buffer", None)
        if (
            type(reader) is not asyncio.StreamReader
            or not isinstance(inner, asyncio.StreamReaderProtocol)
            or not isinstance(buffered, bytearray)
            or not isinstance(transport, asyncio.Transport)
            or type(transport).__name__ != "_SelectorSocketTransport"
            or reader.exception() is not None
            or len(buffered) > RECEIVE_BUFFER_MAX // 2
        ):
            return None
        receiver = cls(inner, transport, max(RECEIVE_BUFFER, 2 * len(buffered)))
        if buffered:
            receiver._buffer[: len(buffered)] = buffered
            receiver._end = len(buffered)
            buffered.clear()
        receiver._eof = bool(getattr(reader, "_eof", False))
        transport.set_protocol(receiver)
        receiver._apply_back_pressure()
        return receiver

    async def receive(self) -> memoryview | None:
        """The next frame as a view of the buffer (valid until the caller yields)."""
        while True:
            available = self._end - self._start
            if available >= LENGTH_PREFIX_LEN:
                start = self._start
                size = (self._buffer[start] << 8) | self._buffer[start + 1]
                if size == 0:
                    raise FrameError(f"frame length: expected 1..{MAX_FRAME_LEN}, got 0")
                if available >= LENGTH_PREFIX_LEN + size:
                    begin = start + LENGTH_PREFIX_LEN
                    self._start = begin + size
                    if self._paused:
                        self._apply_back_pressure()
                    return self._view[begin : begin + size]
            if self._lost is not None:
                raise TransportError(f"stream read failed ({type(self._lost).__name__})")
            if self._eof:
                if not available:
                    return None  # clean end of stream between frames
                if available < LENGTH_PREFIX_LEN:
                    raise FrameError("stream ended inside a frame's length prefix")
                raise FrameError(
                    f"stream ended inside a frame ({available - LENGTH_PREFIX_LEN} of"
                    f" {(self._buffer[self._start] << 8) | self._buffer[self._start + 1]}"
                    " bytes)"
                )
            if self._paused:  # no whole frame buffered: the rest of it must come in
                self._paused = False
                with contextlib.suppress(RuntimeError):
                    self._transport.resume_reading()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    # --- protocol callbacks (the transport calls these) ------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        unread = self._end - self._start
        size = len(self._buffer)
        grow = size < RECEIVE_BUFFER_MAX and (self._filled or unread > size // 2)
        if grow or (unread and size - self._end < size // 4):
            # Move the unread bytes to the front, into a buffer twice as big when the last
            # read filled all the room it had (more is waiting: bigger reads cost fewer
            # calls and loop passes) or they fill more than half of this one. Frames
            # handed out earlier are dead by now: their bytes were copied out.
            if grow:
                buffer = bytearray(min(2 * size, RECEIVE_BUFFER_MAX))
                buffer[:unread] = self._view[self._start : self._end]
                self._buffer, self._view = buffer, memoryview(buffer)
            else:  # memoryview assignment copies with memmove: the ranges may overlap
                self._view[:unread] = self._view[self._start : self._end]
            self._start, self._end = 0, unread
        elif not unread:
            self._start = self._end = 0
        self._offered = len(self._buffer) - self._end
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self._filled = nbytes == self._offered
        self._apply_back_pressure()
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return self._inner.eof_received()  # type: ignore[attr-defined, no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._lost = exc
        self._eof = True
        self._wake()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _apply_back_pressure(self) -> None:
        waiting = self._end - self._start
        if not self._paused:
            if (
                len(self._buffer) == RECEIVE_BUFFER_MAX
                and waiting > RECEIVE_BUFFER_MAX - _FRAME_SPACE
            ):
                self._paused = True
                with contextlib.suppress(RuntimeError):  # the transport is closing
                    self._transport.pause_reading()
        elif waiting <= RECEIVE_BUFFER_MAX // 4:
            self._paused = False
            with contextlib.suppress(RuntimeError):
                self._transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class WebSocketPipe:
    """Noise messages over a ``websockets`` connection: one binary frame per message."""

    def __init__(self, websocket: Any) -> None:
        self._ws = websocket

    async def send(self, messages: Sequence[bytes]) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for message in messages:
                await self._ws.send(message)
        except ConnectionClosed as exc:
            raise TransportError(f"websocket send failed: {exc}") from exc

    async def receive(self) -> bytes | None:
        from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

        try:
            message = await self._ws.recv()
        except ConnectionClosedOK:
            return None
        except ConnectionClosed as exc:
            raise TransportError(f"websocket closed abnormally: {exc}") from exc
        if isinstance(message, str):
            raise FrameError("websocket message: expected a binary frame, got a text frame")
        return bytes(message)

    async def aclose(self) -> None:
        await self._ws.close()


class Channel:
    """A session pumped over a pipe: send and receive whole application messages."""

    def __init__(self, session: _Session, pipe: MessagePipe) -> None:
        self.session = session
        self.pipe = pipe
        self._send_lock = asyncio.Lock()
        # A stream pipe may lend a view of its buffer: the session decrypts it before this
        # channel awaits anything again, and keeps only the plaintext.
        self._next: Callable[[], Awaitable[bytes | memoryview | None]] = getattr(
            pipe, "receive_borrowed", pipe.receive
        )

    @property
    def peer_info(self) -> object:
        return self.session.peer_info

    @property
    def handshake_hash(self) -> bytes:
        return self.session.handshake_hash

    async def establish(self, timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT) -> None:
        """Run the handshake and the evidence exchange until the session is open."""
        try:
            async with asyncio.timeout(timeout):
                await self._flush()
                while self.session.state is not State.OPEN:
                    message = await self._next()
                    if message is None:
                        raise SessionClosedError(
                            f"connection ended during {self.session.state.value}"
                        )
                    for event in self.session.receive(message):
                        if isinstance(event, Closed):
                            raise SessionClosedError(f"closed by peer: {event.reason!r}")
                    await self._flush()
        except TimeoutError as exc:
            await self._abort()
            raise SessionClosedError(
                f"session not open after {timeout} s (state {self.session.state.value})"
            ) from exc
        except HermeticError:
            await self._abort()
            raise

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            self.session.send_application(data)
            await self.pipe.send(self.session.data_to_send())

    async def receive(self) -> bytes | None:
        """The next application message, or None once the peer closed the session."""
        while True:
            message = await self._next()
            if message is None:
                if self.session.state is State.CLOSED:
                    return None
                error = SessionClosedError(
                    "connection ended without a close message (possible truncation)"
                )
                self.session.connection_lost(error)
                raise error
            for event in self.session.receive(message):
                if isinstance(event, ApplicationData):
                    return event.data
                if isinstance(event, Closed):
                    return None

    async def close(self, reason: str = "") -> None:
        async with self._send_lock:
            self.session.close(reason)
            with contextlib.suppress(HermeticError):
                await self.pipe.send(self.session.data_to_send())
        await self.pipe.aclose()

    async def _flush(self) -> None:
        async with self._send_lock:
            await self.pipe.send(self.session.data_to_send())

    async def _abort(self) -> None:
        self.session.close("aborted")
        self.session.data_to_send()
        await self.pipe.aclose()


class ClientChannel(Channel):
    """An open, verified client session with concurrent RPC calls."""

    def __init__(self, session: ClientSession, pipe: MessagePipe) -> None:
        super().__init__(session, pipe)
        self._rpc = rpc.RPCClientState()
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._failure: HermeticError | None = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    @property
    def failure(self) -> HermeticError | None:
        """Why the session ended (the peer closed it, the transport failed), or None while
        it is open: a caller keeping sessions for reuse can skip a dead one before a call."""
        return self._failure

    async def call(self, method: str, args: Any = None) -> Any:
        """Call ``method`` on the service; raises RPCError with the remote code on failure."""
        if self._failure is not None:
            raise SessionClosedError(f"channel failed: {self._failure}")
        ident, data = self._rpc.request(method, args)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        try:
            await self.send(data)
            return await future
        except asyncio.CancelledError:
            if self._waiting.pop(ident, None) is not None and self._failure is None:
                task = asyncio.get_running_loop().create_task(self._send_cancel(ident))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            raise
        finally:
            self._waiting.pop(ident, None)

    async def close(self, reason: str = "") -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._fail_all(SessionClosedError("channel closed locally"))
        await super().close(reason)

    async def _send_cancel(self, ident: int) -> None:
        with contextlib.suppress(HermeticError):
            await self.send(self._rpc.cancel(ident))

    async def _read_replies(self) -> None:
        try:
            while True:
                message = await self.receive()
                if message is None:
                    raise SessionClosedError(f"closed by peer: {self.session.close_reason!r}")
                reply = self._rpc.receive(message)
                if reply is None:
                    continue
                future = self._waiting.pop(reply.id, None)
                if future is None or future.done():
                    continue
                if isinstance(reply, rpc.Result):
                    future.set_result(reply.value)
                else:
                    future.set_exception(reply.exception())
        except HermeticError as exc:
            self._fail_all(exc)
            with contextlib.suppress(HermeticError):
                await self.pipe.aclose()

    def _fail_all(self, error: HermeticError) -> None:
        self._failure = self._failure or error
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(
                    SessionClosedError(f"channel failed: {error}")
                    if not isinstance(error, SessionClosedError)
                    else error
                )


async def connect(
    pipe: MessagePipe,
    verify_evidence: VerifyEvidence,
    *,
    protocol_name: str = NX,
    static: StaticKeypair | None = None,
    make_evidence: MakeEvidence | None = None,
    rekey_interval: int | None = DEFAULT_REKEY_INTERVAL,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
) -> ClientChannel:
    """Open a verified client session over any pipe and start reading RPC replies."""
    session = ClientSession(
        verify_evidence,
        protocol_name=protocol_name,
        static=static,
        make_evidence=make_evidence,
        rekey_interval=rekey_interval,
        max_message_size=max_message_size,
    )
    channel = ClientChannel(session, pipe)
    await channel.establish(handshake_timeout)
    channel.start()
    return channel


async def open_client(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    verify_evidence: VerifyEvidence,
    **options: Any,
) -> ClientChannel:
    """:func:`connect` over an asyncio stream (TCP, Unix socket, emulated vsock)."""
    return await connect(StreamPipe(reader, writer), verify_evidence, **options)


async def open_client_websocket(
    websocket: Any, verify_evidence: VerifyEvidence, **options: Any
) -> ClientChannel:
    """:func:`connect` over a ``websockets`` connection."""
    return await connect(WebSocketPipe(websocket), verify_evidence, **options)


async def accept(
    pipe: MessagePipe,
    static: StaticKeypair,
    make_evidence: MakeEvidence,
    *,
    protocol_name: str = NX,
    verify_evidence: VerifyEvidence | None = None,
    rekey_interval: int | None = DEFAULT_REKEY_INTERVAL,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
) -> Channel:
    """Answer a handshake on ``pipe``, send our evidence (and verify the peer's in XX)."""
    session = ServerSession(
        static,
        make_evidence,
        protocol_name=protocol_name,
        verify_evidence=verify_evidence,
        rekey_interval=rekey_interval,
        max_message_size=max_message_size,
    )
    channel = Channel(session, pipe)
    await channel.establish(handshake_timeout)
    return channel


async def serve_rpc(channel: Channel, handlers: Mapping[str, Handler]) -> None:
    """Answer RPC requests on an open channel until the peer closes it.

    Each request runs in its own task, so calls are concurrent; a cancel cancels the task
    and no reply is sent. Handler errors become error replies: RPCError keeps its code, any
    other HermeticError is ``rejected`` with its message, anything else is ``internal``
    without detail (it may hold secrets).
    """
    state = rpc.RPCServerState()
    tasks: dict[int, asyncio.Task[None]] = {}

    async def run(request: rpc.Request) -> None:
        handler = handlers.get(request.method)
        try:
            if handler is None:
                reply = state.error(
                    request.id, rpc.UNKNOWN_METHOD, f"method {request.method!r:.80} not found"
                )
            else:
                try:
                    value = await handler(request.args)
                    reply = state.result(request.id, value)
                except RPCError as exc:
                    reply = state.error(request.id, exc.code, exc.remote_message)
                except HermeticError as exc:
                    reply = state.error(request.id, rpc.REJECTED, str(exc))
                except asyncio.CancelledError:
                    state.forget(request.id)
                    raise
                except Exception:
                    reply = state.error(request.id, rpc.INTERNAL, "internal error")
            await channel.send(reply)
        finally:
            tasks.pop(request.id, None)

    try:
        while True:
            message = await channel.receive()
            if message is None:
                return
            incoming = state.receive(message)
            if isinstance(incoming, rpc.Request):
                tasks[incoming.id] = asyncio.get_running_loop().create_task(run(incoming))
            elif isinstance(incoming, rpc.Cancel):
                task = tasks.pop(incoming.id, None)
                if task is not None:
                    task.cancel()
    finally:
        for task in list(tasks.values()):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks.values(), return_exceptions=True)


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    make_evidence: MakeEvidence,
    handlers: Mapping[str, Handler],
    *,
    static: StaticKeypair,
    **options: Any,
) -> None:
    """Serve one stream connection: handshake, evidence, then RPC until the client leaves.

    Raises the ChannelError that ended the session, if any (after closing the stream).
    """
    await _serve(StreamPipe(reader, writer), make_evidence, handlers, static=static, **options)


async def serve_websocket(
    websocket: Any,
    make_evidence: MakeEvidence,
    handlers: Mapping[str, Handler],
    *,
    static: StaticKeypair,
    **options: Any,
) -> None:
    """:func:`serve_connection` over a ``websockets`` server connection."""
    await _serve(WebSocketPipe(websocket), make_evidence, handlers, static=static, **options)


async def _serve(
    pipe: MessagePipe,
    make_evidence: MakeEvidence,
    handlers: Mapping[str, Handler],
    *,
    static: StaticKeypair,
    **options: Any,
) -> None:
    channel = await accept(pipe, static, make_evidence, **options)
    try:
        await serve_rpc(channel, handlers)
    except HermeticError:
        with contextlib.suppress(HermeticError):
            await pipe.aclose()
        raise
    await channel.close()
