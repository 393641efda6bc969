"""The asyncio adapters over real sockets: TCP, Unix sockets and WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import websockets

from hermetic.channel import aio
from hermetic.channel.noise import XX, StaticKeypair
from hermetic.errors import (
    EvidenceRejectedError,
    FrameError,
    HermeticError,
    PolicyError,
    RPCError,
    SessionClosedError,
)

SERVER_KEY = StaticKeypair.generate()


def make_evidence(handshake_hash: bytes, static_public: bytes) -> bytes:
    return b"evidence:" + handshake_hash + static_public


def verify_evidence(bundle: bytes, handshake_hash: bytes, remote_static: bytes) -> object:
    if bundle != make_evidence(handshake_hash, remote_static):
        raise PolicyError("evidence: not bound to this handshake and key")
    return "verified-peer"


def reject(bundle: bytes, handshake_hash: bytes, remote_static: bytes) -> object:
    raise PolicyError("evidence: PCR0 not in the allow-list")


class Service:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.errors: list[BaseException] = []

    async def echo(self, args: Any) -> Any:
        return args

    async def digest(self, args: Any) -> Any:
        return hashlib.sha256(args).digest()

    async def sleep(self, args: Any) -> Any:
        await asyncio.sleep(args)
        return args

    async def block(self, args: Any) -> Any:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def fail(self, args: Any) -> Any:
        if args == "rpc":
            raise RPCError("not_found", "no such record")
        if args == "hermetic":
            raise PolicyError("caller not allowed")
        raise RuntimeError("secret detail")

    def handlers(self) -> dict[str, Callable[[Any], Awaitable[Any]]]:
        return {
            "echo": self.echo,
            "digest": self.digest,
            "sleep": self.sleep,
            "block": self.block,
            "fail": self.fail,
        }

    async def on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, **options: Any
    ) -> None:
        try:
            await aio.serve_connection(
                reader, writer, make_evidence, self.handlers(), static=SERVER_KEY, **options
            )
        except HermeticError as exc:
            self.errors.append(exc)


@contextlib.asynccontextmanager
async def tcp_service(**options: Any) -> AsyncIterator[tuple[Service, int]]:
    service = Service()
    server = await asyncio.start_server(
        lambda r, w: service.on_connection(r, w, **options), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        yield service, port
    finally:
        server.close()
        await server.wait_closed()


async def test_tcp_client_calls_service_after_verifying_evidence() -> None:
    async with tcp_service() as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        channel = await aio.open_client(reader, writer, verify_evidence)
        assert channel.peer_info == "verified-peer"
        assert await channel.call("echo", {"a": [1, b"2"]}) == {"a": [1, b"2"]}
        payload = bytes(range(256)) * 4000
        assert await channel.call("digest", payload) == hashlib.sha256(payload).digest()
        await channel.close()


async def test_concurrent_calls_complete_out_of_order_on_one_session() -> None:
    async with tcp_service() as (_, port):
        channel = await aio.open_client(
            *await asyncio.open_connection("127.0.0.1", port), verify_evidence
        )
        delays = [0.2, 0.0, 0.1, 0.05, 0.15]
        finished: list[float] = []

        async def one(delay: float) -> None:
            finished.append(await channel.call("sleep", delay))

        await asyncio.gather(*(one(d) for d in delays))
        assert finished == sorted(delays)
        await channel.close()


async def test_remote_errors_arrive_as_typed_codes_without_secret_detail() -> None:
    async with tcp_service() as (_, port):
        channel = await aio.open_client(
            *await asyncio.open_connection("127.0.0.1", port), verify_evidence
        )
        with pytest.raises(RPCError) as info:
            await channel.call("fail", "rpc")
        assert (info.value.code, info.value.remote_message) == ("not_found", "no such record")
        with pytest.raises(RPCError) as info:
            await channel.call("fail", "hermetic")
        assert info.value.code == "rejected"
        with pytest.raises(RPCError) as info:
            await channel.call("fail", "other")
        assert info.value.code == "internal"
        assert "secret" not in str(info.value)
        with pytest.raises(RPCError) as info:
            await channel.call("nope")
        assert info.value.code == "unknown_method"
        assert await channel.call("echo", 1) == 1  # the session survives call errors
        await channel.close()


async def test_cancelling_a_call_cancels_the_handler_on_the_server() -> None:
    async with tcp_service() as (service, port):
        channel = await aio.open_client(
            *await asyncio.open_connection("127.0.0.1", port), verify_evidence
        )
        call = asyncio.create_task(channel.call("block"))
        await asyncio.wait_for(service.started.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(service.cancelled.wait(), 5)
        assert await channel.call("echo", "still open") == "still open"
        await channel.close()


async def test_rejected_evidence_fails_open_client_and_the_server_sees_the_close() -> None:
    async with tcp_service() as (service, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(EvidenceRejectedError, match="PCR0"):
            await aio.open_client(reader, writer, reject)
        deadline = asyncio.get_running_loop().time() + 30
        while not service.errors and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert service.errors
        assert all(isinstance(e, SessionClosedError) for e in service.errors)


async def test_xx_over_unix_socket_verifies_both_sides(tmp_path: Path) -> None:
    service = Service()
    client_key = StaticKeypair.generate()
    seen: list[bytes] = []

    def server_verifier(bundle: bytes, handshake_hash: bytes, remote_static: bytes) -> object:
        seen.append(remote_static)
        return verify_evidence(bundle, handshake_hash, remote_static)

    path = str(tmp_path / "vsock-16-5000.sock")
    server = await asyncio.start_unix_server(
        lambda r, w: service.on_connection(r, w, protocol_name=XX, verify_evidence=server_verifier),
        path,
    )
    try:
        channel = await aio.open_client(
            *await asyncio.open_unix_connection(path),
            verify_evidence,
            protocol_name=XX,
            static=client_key,
            make_evidence=make_evidence,
        )
        assert await channel.call("echo", "xx") == "xx"
        assert seen == [client_key.public]
        await channel.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_handshake_times_out_when_the_server_says_nothing() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(SessionClosedError, match=r"not open after 0\.2 s"):
            await aio.open_client(
                *await asyncio.open_connection("127.0.0.1", port),
                verify_evidence,
                handshake_timeout=0.2,
            )
    finally:
        server.close()
        await server.wait_closed()


async def test_websocket_carries_one_noise_message_per_binary_frame() -> None:
    service = Service()
    frames: list[int] = []

    async def handler(ws: Any) -> None:
        original_recv = ws.recv

        async def counting_recv(*args: Any, **kwargs: Any) -> Any:
            message = await original_recv(*args, **kwargs)
            frames.append(len(message))
            return message

        ws.recv = counting_recv
        with contextlib.suppress(HermeticError):
            await aio.serve_websocket(ws, make_evidence, service.handlers(), static=SERVER_KEY)

    async with websockets.serve(handler, "127.0.0.1", 0, max_size=2**17) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=2**17) as ws:
            channel = await aio.open_client_websocket(ws, verify_evidence)
            payload = bytes(200_000)
            assert await channel.call("digest", payload) == hashlib.sha256(payload).digest()
            await channel.close()
    assert frames[0] == 32  # msg1: the client's ephemeral key, no length prefix
    assert max(frames) <= 65535
    assert len(frames) >= 1 + 4  # the 200 kB request needed several Noise messages


async def test_stream_ending_inside_a_frame_is_a_frame_error() -> None:
    async def half_frame(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(2 + 32)
        writer.write(b"\x00\x60" + bytes(40))  # promises 96 bytes, sends 40
        writer.close()

    server = await asyncio.start_server(half_frame, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(FrameError, match="40 of 96 bytes"):
            await aio.open_client(
                *await asyncio.open_connection("127.0.0.1", port), verify_evidence
            )
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def _tcp_connection() -> AsyncIterator[
    tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamWriter]
]:
    """An accepted TCP connection's reader and writer, and the raw writer of its other end."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, raw = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = await accepted
    try:
        yield reader, writer, raw
    finally:
        raw.close()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def _pipe_pair() -> AsyncIterator[tuple[aio.StreamPipe, asyncio.StreamWriter]]:
    """A StreamPipe reading a TCP connection, and the raw writer of its other end."""
    async with _tcp_connection() as (reader, writer, raw):
        yield aio.StreamPipe(reader, writer), raw


def _frames(count: int, seed: int) -> list[bytes]:
    sizes = [1, 2, 65535, 16 * 1024, 3, 65534, 40_000]
    return [
        hashlib.sha256(f"{seed}/{n}".encode()).digest()[:1] * sizes[n % len(sizes)]
        for n in range(count)
    ]


@pytest.mark.parametrize("piece", [1, 7, 1000, 70_000])
async def test_stream_pipe_reassembles_frames_split_at_any_byte(piece: int) -> None:
    frames = _frames(12 if piece > 1 else 4, piece)
    stream = b"".join(len(f).to_bytes(2, "big") + f for f in frames)
    async with _pipe_pair() as (pipe, raw):
        for offset in range(0, len(stream), piece):
            raw.write(stream[offset : offset + piece])
            await raw.drain()
            if piece < 100 and offset % (50 * piece) == 0:
                await asyncio.sleep(0)  # let partial frames reach the receiver
        raw.write_eof()
        received = []
        while (message := await pipe.receive()) is not None:
            received.append(message)
        assert received == frames


async def test_stream_pipe_pauses_reading_and_delivers_everything_later() -> None:
    """A sender far ahead of the consumer fills the socket, not this process's memory."""
    frames = _frames(60, 9)  # ~2 MiB, four times the receive buffer's maximum
    stream = b"".join(len(f).to_bytes(2, "big") + f for f in frames)
    async with _pipe_pair() as (pipe, raw):
        raw.write(stream)
        writer_done = asyncio.ensure_future(raw.drain())
        await asyncio.sleep(0.2)  # nothing is read meanwhile
        frames_receiver = pipe._frames
        assert frames_receiver is not None
        assert len(frames_receiver._buffer) <= aio.RECEIVE_BUFFER_MAX
        assert frames_receiver._paused
        received = [await pipe.receive() for _ in frames]
        await writer_done
        assert received == frames


async def test_stream_pipe_keeps_bytes_the_stream_reader_already_held() -> None:
    async with _tcp_connection() as (reader, writer, raw):
        raw.write(b"\x00\x03abc\x00\x02d")  # one whole frame and the start of the next
        await raw.drain()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(reader._buffer) == 8:
                break
        pipe = aio.StreamPipe(reader, writer)
        assert pipe._frames is not None  # taken over, with the reader's bytes moved in
        raw.write(b"e")
        raw.write_eof()
        assert await pipe.receive() == b"abc"
        assert await pipe.receive() == b"de"
        assert await pipe.receive() is None


async def test_stream_pipe_refuses_a_zero_length_frame_and_a_truncated_prefix() -> None:
    for data, match in ((b"\x00\x00", "got 0"), (b"\x00", "length prefix")):
        async with _pipe_pair() as (pipe, raw):
            raw.write(data)
            raw.write_eof()
            with pytest.raises(FrameError, match=match):
                await pipe.receive()


class _StubTransport:
    """Only what _FrameReceiver calls on its transport: reading paused or resumed."""

    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


async def test_frame_receiver_moves_overlapping_unread_bytes_intact() -> None:
    """Unread bytes moved to the front may overlap where they came from; a read that
    filled all its room makes the next buffer twice as big."""
    receiver = aio._FrameReceiver(asyncio.Protocol(), _StubTransport(), 64)  # type: ignore[arg-type]
    frames = [bytes([n + 1]) * size for n, size in enumerate((16, 5, 40, 3, 50, 20))]
    stream = b"".join(len(f).to_bytes(2, "big") + f for f in frames)

    def feed(data: bytes) -> None:
        while data:
            room = receiver.get_buffer(-1)
            size = min(len(room), len(data))
            room[:size] = data[:size]
            receiver.buffer_updated(size)
            data = data[size:]

    received: list[bytes] = []

    async def take() -> None:
        frame = await receiver.receive()
        assert frame is not None
        received.append(bytes(frame))  # a view: valid until the buffer is next written

    feed(stream[:50])  # 50 of 64 used, room for less than a quarter
    await take()  # bytes 0..18 consumed, 18..50 unread
    feed(stream[50:51])  # moves 32 bytes from 18..50 to 0..32: the ranges overlap
    assert (receiver._start, receiver._end, len(receiver._buffer)) == (0, 33, 64)
    feed(stream[51:])
    while len(received) < len(frames):
        await take()
    assert received == frames
    assert len(receiver._buffer) > 64  # reads that filled their room made it grow


def _frame(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


def _read_available(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := sock.recv(1 << 20):
            data += chunk
    return data


async def test_stream_pipe_writes_the_messages_of_one_loop_pass_together_in_order() -> None:
    """Messages sent by many calls in one pass of the event loop leave together (one write,
    one wake-up of the peer), whole and in the order sent; a lone message, with nothing
    else to run, leaves at once; COALESCE_BYTES queued are written at once; closing the
    pipe right after a send still delivers it."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=ours)
    pipe = aio.StreamPipe(reader, writer)
    writes: list[int] = []
    transport = writer.transport
    write_lines = transport.writelines

    def counted(parts: Any) -> None:
        parts = list(parts)
        writes.append(len(parts) // 2)
        write_lines(parts)

    transport.writelines = counted  # type: ignore[method-assign]
    try:
        messages = [bytes([n]) * (n + 1) for n in range(16)]
        await asyncio.gather(*(pipe.send([m]) for m in messages))  # 16 tasks, one pass
        await asyncio.sleep(0)
        assert _read_available(theirs) == b"".join(_frame(m) for m in messages)
        assert writes == [16]

        await asyncio.sleep(0)
        await pipe.send([b"lone"])
        assert _read_available(theirs) == _frame(b"lone")  # before this task yields

        big = b"\x07" * 65535  # with "small": more than COALESCE_BYTES
        assert len(big) + len(b"small") >= aio.COALESCE_BYTES
        asyncio.get_running_loop().call_soon(lambda: None)  # something else is ready
        await pipe.send([b"small"])
        assert _read_available(theirs) == b""  # queued behind it
        await pipe.send([big])
        assert _read_available(theirs) == _frame(b"small") + _frame(big)

        await asyncio.sleep(0)
        asyncio.get_running_loop().call_soon(lambda: None)
        await pipe.send([b"last words"])
        await pipe.aclose()
        theirs.setblocking(True)
        received = b""
        while chunk := theirs.recv(65536):
            received += chunk
        assert received == _frame(b"last words")
    finally:
        theirs.close()
        writer.close()
