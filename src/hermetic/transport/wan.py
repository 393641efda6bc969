"""WAN emulation: a TCP relay that shapes each direction to a bandwidth and a one-way delay.

The benchmark of issue 12 compares the client-side baseline, which downloads every batch
over the admin's link, with the enclave; the link is emulated here rather than with ``tc``
(which needs root and a network namespace): ``hermetic wan relay --listen H:P --to H:P
--bandwidth 50mbit --rtt 40ms``, or :class:`WanRelay` from code.

The model, per direction and per connection: bytes leave a **token bucket** that fills at
the bandwidth up to ``burst`` bytes (starting full) and then travel for ``rtt / 2``. A chunk
of ``s <= burst`` bytes read at time ``a`` departs at the first time ``d >= a`` when the
bucket holds ``s`` tokens, and is delivered at ``d + rtt / 2``. The relay reads at most
``burst`` bytes at a time and waits for a chunk's departure before reading the next, so
the queue of a slow link is the sender's own socket buffer, as on a real bottleneck, and
the relay holds at most a bandwidth-delay product per direction. Deliveries keep order.

What this implies, and what the tests check: ``n`` bytes sent at once arrive no sooner
than ``(n - burst) / bandwidth + rtt / 2`` after they were sent, and a request and its
answer take at least a round-trip time. :func:`release_schedule` is the same arithmetic as
the relay runs, as a pure function.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from hermetic.errors import WanUsageError

__all__ = [
    "DEFAULT_BURST",
    "LinkShape",
    "TokenBucket",
    "WanRelay",
    "parse_bandwidth",
    "parse_duration",
    "release_schedule",
    "running_relay",
]

DEFAULT_BURST = 16384
"""Bucket depth, bytes: about ten full-size packets, the burst a real link's queue passes
at line rate; also the largest chunk the relay reads at once."""

_BANDWIDTH = re.compile(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)", re.IGNORECASE)
_BANDWIDTH_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|s)?", re.IGNORECASE)
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_bandwidth(text: str) -> float:
    """``50mbit``, ``800kbit``, ``1gbit``, ``9600bit`` (decimal prefixes, bits per second,
    as ``tc`` spells them) as bytes per second."""
    found = _BANDWIDTH.fullmatch(text.strip())
    if found is None:
        raise WanUsageError(
            f"bandwidth: expected a number and one of bit, kbit, mbit, gbit, got {text[:40]!r}"
        )
    value = float(found[1]) * _BANDWIDTH_UNITS[found[2].lower()] / 8
    if not value > 0:
        raise WanUsageError("bandwidth: expected more than 0")
    return value


def parse_duration(text: str) -> float:
    """``40ms``, ``0.04s``, ``250us``, ``0`` as seconds (a bare number is seconds)."""
    found = _DURATION.fullmatch(text.strip())
    if found is None:
        raise WanUsageError(f"duration: expected a number and us, ms or s, got {text[:40]!r}")
    return float(found[1]) * _DURATION_UNITS[(found[2] or "s").lower()]


@dataclass(frozen=True)
class LinkShape:
    """One direction of the link: ``bandwidth`` bytes/s, ``delay`` seconds one way, bucket
    of ``burst`` bytes."""

    bandwidth: float
    delay: float
    burst: int = DEFAULT_BURST

    def __post_init__(self) -> None:
        if not self.bandwidth > 0 or self.bandwidth == float("inf"):
            raise WanUsageError("bandwidth: expected a finite rate above 0")
        if not 0 <= self.delay <= 60:
            raise WanUsageError("delay: expected 0 to 60 s")
        if type(self.burst) is not int or not 1 <= self.burst <= 1 << 24:
            raise WanUsageError("burst: expected 1 to 16 MiB")

    @classmethod
    def from_rtt(cls, bandwidth: float, rtt: float, burst: int = DEFAULT_BURST) -> LinkShape:
        """Each direction of a link of round-trip time ``rtt``: half of it one way."""
        return cls(bandwidth, rtt / 2, burst)


class TokenBucket:
    """The departure times of one direction's chunks (see the module docstring)."""

    def __init__(self, shape: LinkShape, start: float) -> None:
        self.shape = shape
        self._tokens = float(shape.burst)
        self._at = start

    def departure(self, size: int, arrival: float) -> float:
        """When a chunk of ``size`` (1..burst) bytes read at ``arrival`` leaves the bucket.
        Arrivals must not go backwards; departures never do."""
        shape = self.shape
        if not 1 <= size <= shape.burst:
            raise WanUsageError(f"chunk: expected 1 to {shape.burst} bytes, got {size}")
        now = max(arrival, self._at)
        tokens = min(float(shape.burst), self._tokens + (now - self._at) * shape.bandwidth)
        if tokens >= size:
            self._tokens, self._at = tokens - size, now
        else:
            self._tokens, self._at = 0.0, now + (size - tokens) / shape.bandwidth
        return self._at

    def delivery(self, size: int, arrival: float) -> float:
        """When that chunk reaches the far end: its departure plus the one-way delay."""
        return self.departure(size, arrival) + self.shape.delay


def release_schedule(
    shape: LinkShape, sizes: Sequence[int], arrivals: Iterable[float] | None = None
) -> list[float]:
    """The delivery time of each chunk of ``sizes`` read at ``arrivals`` (all at 0 when not
    given) by a link of ``shape`` whose bucket is full at time 0."""
    times = [0.0] * len(sizes) if arrivals is None else list(arrivals)
    if len(times) != len(sizes):
        raise WanUsageError("release_schedule: expected one arrival per chunk")
    bucket = TokenBucket(shape, 0.0)
    return [bucket.delivery(size, at) for size, at in zip(sizes, times, strict=True)]


_EOF = object()


class WanRelay:
    """Accepts TCP connections on ``listen`` and relays each to ``target``, shaped by
    ``upstream`` (client to target) and ``downstream`` (target to client)."""

    def __init__(
        self,
        target: tuple[str, int],
        upstream: LinkShape,
        downstream: LinkShape | None = None,
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        self.target = target
        self.upstream = upstream
        self.downstream = downstream if downstream is not None else upstream
        self.listen = listen
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[object]] = set()
        self.connections = 0
        """Connections accepted so far."""

    @property
    def address(self) -> tuple[str, int]:
        """Where the relay listens (the port the OS picked when ``listen`` had port 0)."""
        if self._server is None:
            raise WanUsageError("relay: not started")
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._handlers:
            await asyncio.wait(set(self._handlers))
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> WanRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The relay runs in a task of its own, which close() cancels; this handler then
        # ends normally (asyncio 3.11 logs a traceback for a cancelled handler task).
        relaying = asyncio.create_task(self._relay(reader, writer))
        self._tasks.add(relaying)
        self.connections += 1
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            await asyncio.wait({relaying})
        finally:
            self._tasks.discard(relaying)
            if handler is not None:
                self._handlers.discard(handler)

    async def _relay(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            with contextlib.suppress(OSError):
                await client_writer.wait_closed()
            return
        for w in (client_writer, target_writer):
            _nodelay(w)
        try:
            async with asyncio.TaskGroup() as directions:
                directions.create_task(_direction(client_reader, target_writer, self.upstream))
                directions.create_task(_direction(target_reader, client_writer, self.downstream))
        except* (OSError, asyncio.IncompleteReadError):
            pass  # a reset on either side ends the connection on both
        finally:
            for w in (client_writer, target_writer):
                w.close()
            for w in (client_writer, target_writer):
                with contextlib.suppress(OSError):
                    await w.wait_closed()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    import socket

    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _direction(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shape: LinkShape
) -> None:
    """Shape one direction until its EOF, then half-close the far side (after the delay)."""
    loop = asyncio.get_running_loop()
    bucket = TokenBucket(shape, loop.time())
    # The delay line: chunks travelling, at most a bandwidth-delay product plus slack.
    depth = max(8, int(shape.bandwidth * shape.delay / shape.burst) + 8)
    line: asyncio.Queue[tuple[float, object]] = asyncio.Queue(depth)

    async def deliver() -> None:
        while True:
            due, data = await line.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is _EOF:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            assert isinstance(data, bytes)
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(shape.burst)
            if not data:
                await _enqueue(line, (loop.time() + shape.delay, _EOF), delivering)
                break
            departs = bucket.departure(len(data), loop.time())
            await _enqueue(line, (departs + shape.delay, data), delivering)
            wait = departs - loop.time()
            if wait > 0:  # hold the next read until this chunk has left the bucket
                await asyncio.sleep(wait)
        await delivering
    finally:
        if not delivering.done():
            delivering.cancel()
            with contextlib.suppress(BaseException):
                await delivering


async def _enqueue(
    line: asyncio.Queue[tuple[float, object]],
    item: tuple[float, object],
    delivering: asyncio.Task[None],
) -> None:
    """Put ``item`` on the delay line, unless its deliverer failed (the far side reset):
    then raise the deliverer's error instead of waiting on a full line forever."""
    if not delivering.done():
        putting = asyncio.ensure_future(line.put(item))
        await asyncio.wait({putting, delivering}, return_when=asyncio.FIRST_COMPLETED)
        if putting.done():
            return
        putting.cancel()
    delivering.result()  # raises the far side's error
    raise ConnectionResetError("relay: the far side stopped reading")


@contextlib.contextmanager
def running_relay(
    target: tuple[str, int],
    upstream: LinkShape,
    downstream: LinkShape | None = None,
    *,
    listen: tuple[str, int] = ("127.0.0.1", 0),
) -> Iterator[WanRelay]:
    """A :class:`WanRelay` running on its own event loop in a background thread, for
    synchronous callers (the benchmarks): ``with running_relay(...) as relay:
    relay.address``."""
    relay = WanRelay(target, upstream, downstream, listen=listen)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(relay.start())
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(relay.close())
        loop.close()

    thread = threading.Thread(target=run, name="wan-relay", daemon=True)
    thread.start()
    started.wait()
    if failure:
        thread.join()
        loop.close()
        raise WanUsageError(f"relay: cannot listen on {listen[0]}:{listen[1]}: {failure[0]}")
    try:
        yield relay
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
