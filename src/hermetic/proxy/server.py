"""The service proxy: ingress bridges, egress relay, config bootstrap, telemetry.

What the ingress carries is the attested channel (``docs/protocol.md``): Noise messages,
each with a 2-byte big-endian length on streams, one binary message each on WebSocket.
The proxy sits on the untrusted parent, so it is blind to it:

* TCP ingress is a byte-for-byte bridge to the enclave's service port (no framing, no
  bytes of its own); a dead or absent enclave closes the client connection cleanly;
* WebSocket ingress maps one binary message to one 2-byte length-prefixed message on the
  vsock stream and back (a WebSocket message is already delimited); a dead or absent
  enclave closes the WebSocket with code 1011.

The client's channel turns either close into a typed error (the session ended before it
opened, or without a close message); nothing the parent could inject would be believed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from hermetic.channel.framing import MAX_FRAME_LEN, FrameDecoder, encode_frame
from hermetic.enclave import boot
from hermetic.errors import (
    FrameError,
    FrameFormatError,
    HermeticError,
    PeerUnavailableError,
    UsageError,
)
from hermetic.proxy.bootstrap import deliver_config
from hermetic.proxy.metrics import ProxyMetrics
from hermetic.proxy.relay import IngressRelay
from hermetic.transport import egress, vsock
from hermetic.transport.tcp import HostPort, parse_hostport

if TYPE_CHECKING:
    from hermetic.kms.client import KMSCredentials

log = logging.getLogger("hermetic.proxy")
CHUNK = 256 * 1024
EGRESS_HEADER_TIMEOUT = 10.0
WS_ENCLAVE_UNAVAILABLE = 1011
"""WebSocket close code when the enclave is unreachable or went away (internal error)."""
WS_NOT_A_NOISE_MESSAGE = 1003
"""WebSocket close code for a text or empty message (channel messages are binary)."""
WS_MESSAGE_TOO_BIG = 1009
EgressHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""Serves one egress stream in-process (``ProxyOptions.egress_local``)."""


@dataclass(frozen=True)
class Forward:
    """One more TCP ingress: clients of ``listen`` are relayed to the enclave's ``port``.

    An enclave may serve several ports (the persistence service: NX 5000 for admins, XX
    5001 for services), and its egress can be relayed by one proxy only, since the proxy
    listens on the enclave's vsock egress port: so one proxy relays them all.
    """

    port: int
    listen: HostPort


def parse_forward(text: str, *, field: str = "--forward") -> Forward:
    """``PORT=HOST:PORT``: the enclave's vsock port, then the TCP address to listen on."""
    port_text, sep, address = text.partition("=")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 0xFFFFFFFF:
        raise UsageError(
            f"{field}: expected PORT=HOST:PORT with PORT the enclave's vsock port, got {text!r}"
        )
    return Forward(int(port_text), parse_hostport(address, field=field, allow_port_zero=True))


@dataclass(frozen=True)
class ProxyOptions:
    """What one proxy serves. ``None`` listeners are not started.

    ``listen`` relays to ``service_port`` (TCP and WebSocket); ``forwards`` are further TCP
    listeners, each relayed to its own enclave port. No two listeners may relay to the same
    port (a second one would be a copy nobody asked for).
    """

    cid: int
    service_port: int
    listen: HostPort | None = None
    forwards: tuple[Forward, ...] = ()
    ws_listen: HostPort | None = None
    egress_allow: frozenset[HostPort] = frozenset()
    metrics: HostPort | None = None
    config_bundle: bytes | None = None
    endorsement: bytes | None = None
    serve_config: bool = False
    credentials: KMSCredentials | None = field(default=None, repr=False)
    """AWS credentials forwarded at boot (with ``serve_config``); memory only, never logged."""
    enclave_state: Callable[[], str] = field(default=lambda: "UNKNOWN")
    egress_local: Mapping[HostPort, EgressHandler] = field(default_factory=dict)
    """Allowlisted egress destinations served in this process: instead of a TCP connection
    to the address and a relay to it, the egress stream is handed (after the proxy's
    ``OK``) to the handler, which reads and relays it itself. ``hermetic gateway up`` serves
    its backend dialer's address so (one relay hop from the gateway to a backend, not two
    and a loopback TCP connection); what the handler gets is the enclave's bytes as they
    came, so it is as blind as the relay it replaces."""

    def __post_init__(self) -> None:
        ports = [f.port for f in self.forwards]
        if self.listen is not None:
            ports.append(self.service_port)
        repeated = sorted({p for p in ports if ports.count(p) > 1})
        if repeated:
            raise UsageError(
                f"--forward: expected each enclave port relayed by one listener, got port"
                f" {', '.join(map(str, repeated))} more than once"
            )


class ServiceProxy:
    """Start with :meth:`start`, stop with :meth:`aclose` (or ``async with``)."""

    def __init__(self, options: ProxyOptions) -> None:
        self.options = options
        self.metrics = ProxyMetrics(options.enclave_state)
        self.tcp_address: HostPort | None = None
        self.ws_address: HostPort | None = None
        self.metrics_address: HostPort | None = None
        self.forward_addresses: dict[int, HostPort] = {}
        """The bound address of each ``forwards`` listener, by enclave port."""
        self._tcp: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._relays: set[IngressRelay] = set()
        self._ws: WsServer | None = None
        self._listeners: list[vsock.VsockListener] = []
        self._http: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._config_served = False

    async def start(self) -> ServiceProxy:
        o = self.options
        if o.listen is not None:
            self.tcp_address = self._listen_tcp(o.listen, o.service_port)
        for forward in o.forwards:
            self.forward_addresses[forward.port] = self._listen_tcp(forward.listen, forward.port)
        if o.ws_listen is not None:
            self._ws = await serve(
                self._on_ws, o.ws_listen.host, o.ws_listen.port, max_size=16 * 1024 * 1024
            )
            host, port = next(iter(self._ws.sockets)).getsockname()[:2]
            self.ws_address = HostPort(host, port)
        self._listeners.append(
            await vsock.listen(vsock.PARENT_CID, boot.EGRESS_PORT, self._on_egress, peer_cid=o.cid)
        )
        if o.serve_config:
            self._listeners.append(
                await vsock.listen(
                    vsock.PARENT_CID, boot.CONFIG_PORT, self._on_config, peer_cid=o.cid
                )
            )
        if o.metrics is not None:
            from prometheus_client import start_http_server

            # prometheus-client's own exporter (a WSGI server on a daemon thread).
            server, _ = start_http_server(
                o.metrics.port, o.metrics.host, registry=self.metrics.registry
            )
            self._http = server
            host, port = server.server_address[:2]
            self.metrics_address = HostPort(str(host), int(port))
        return self

    def _listen_tcp(self, address: HostPort, service_port: int) -> HostPort:
        """Bind ``address`` and relay its clients to the enclave's ``service_port``."""
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        listener = socket.create_server((address.host, address.port), family=family)
        self._tcp.append(listener)
        listener.setblocking(False)
        host, port = listener.getsockname()[:2]
        task = asyncio.get_running_loop().create_task(self._accept(listener, service_port))
        self._accepting.append(task)
        return HostPort(host, port)

    async def aclose(self) -> None:
        for accepting in self._accepting:
            accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accepting
        for tcp in self._tcp:
            tcp.close()
        for relay in list(self._relays):
            relay.close()
        if self._ws is not None:
            self._ws.close()
        for listener in self._listeners:
            await listener.aclose()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None:
            await self._ws.wait_closed()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    async def __aenter__(self) -> ServiceProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # --- ingress -------------------------------------------------------------------------

    async def _accept(self, listener: socket.socket, service_port: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. out of file descriptors: keep serving the others
                log.warning("tcp ingress accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            with contextlib.suppress(OSError):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._relay(IngressRelay(client, self.metrics), service_port))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _relay(self, relay: IngressRelay, service_port: int) -> None:
        self.metrics.connections.labels("tcp").inc()
        active = self.metrics.active.labels("tcp")
        active.inc()
        self._relays.add(relay)

        async def connect() -> socket.socket:
            return await vsock.connect_socket(self.options.cid, service_port, timeout=5)

        try:
            await relay.run(connect)
        finally:
            relay.close()  # the proxy is shutting down: do not leave sockets behind
            self._relays.discard(relay)
            active.dec()

    async def _on_ws(self, connection: ServerConnection) -> None:
        self._track()
        self.metrics.connections.labels("websocket").inc()
        active = self.metrics.active.labels("websocket")
        active.inc()
        try:
            await self._bridge_ws(connection)
        finally:
            active.dec()

    async def _bridge_ws(self, connection: ServerConnection) -> None:
        try:
            enclave = await vsock.connect(self.options.cid, self.options.service_port, timeout=5)
        except PeerUnavailableError:
            self.metrics.enclave_errors.inc()
            await connection.close(WS_ENCLAVE_UNAVAILABLE, "enclave unavailable")
            return
        bytes_in = self.metrics.bytes.labels("to_enclave")
        bytes_out = self.metrics.bytes.labels("from_enclave")
        refused: list[tuple[int, str]] = []

        async def upstream() -> None:
            try:
                with contextlib.suppress(ConnectionClosed, ConnectionError, OSError):
                    async for message in connection:
                        if isinstance(message, str):
                            refused.append((WS_NOT_A_NOISE_MESSAGE, "expected binary messages"))
                            return
                        if not 0 < len(message) <= MAX_FRAME_LEN:
                            code = WS_MESSAGE_TOO_BIG if message else WS_NOT_A_NOISE_MESSAGE
                            refused.append((code, f"message: expected 1..{MAX_FRAME_LEN} bytes"))
                            return
                        frame = encode_frame(message)
                        bytes_in.inc(len(frame))
                        enclave.writer.write(frame)
                        await enclave.writer.drain()
            finally:
                # The client is done sending (or gone): pass the EOF on, replies still flow.
                with contextlib.suppress(ConnectionError, OSError):
                    if enclave.writer.can_write_eof():
                        enclave.writer.write_eof()

        async def downstream() -> None:
            decoder = FrameDecoder()
            with contextlib.suppress(ConnectionError, OSError, FrameError):
                while data := await enclave.reader.read(CHUNK):
                    bytes_out.inc(len(data))
                    for message in decoder.feed(data):
                        await connection.send(message)

        up = asyncio.ensure_future(upstream())
        down = asyncio.ensure_future(downstream())
        try:
            await asyncio.wait({up, down}, return_when="FIRST_COMPLETED")
            if up.done() and not refused:
                await down  # the client half-closed or left: finish relaying the replies
            if refused:
                await connection.close(*refused[0])
            elif down.done() and not up.done():
                self.metrics.enclave_errors.inc()
                await connection.close(WS_ENCLAVE_UNAVAILABLE, "enclave unavailable")
            else:
                await connection.close()
        except ConnectionClosed:
            pass
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            await enclave.aclose()

    # --- egress and bootstrap ---------------------------------------------------------------

    async def _on_egress(self, stream: vsock.VsockStream) -> None:
        self._track()
        try:
            line = await asyncio.wait_for(stream.reader.readuntil(b"\n"), EGRESS_HEADER_TIMEOUT)
            destination = egress.decode_connect(line)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            self.metrics.egress_refused.labels("?", "malformed").inc()
            return
        except FrameFormatError as exc:
            self.metrics.egress_refused.labels("?", "malformed").inc()
            stream.writer.write(egress.encode_reply(str(exc)))
            return
        name = str(destination)
        local = self.options.egress_local.get(destination)
        if destination not in self.options.egress_allow:
            self.metrics.egress_refused.labels(name, "not allowlisted").inc()
            log.warning("egress to %s refused: not on the allowlist", name)
            stream.writer.write(egress.encode_reply(f"{name} is not on the egress allowlist"))
            with contextlib.suppress(ConnectionError, OSError):
                await stream.writer.drain()
            return
        if local is not None:
            self.metrics.egress_allowed.labels(name).inc()
            stream.writer.write(egress.encode_reply(None))
            await local(stream.reader, stream.writer)
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(destination.host, destination.port), 10
            )
        except (OSError, TimeoutError) as exc:
            self.metrics.egress_refused.labels(name, "unreachable").inc()
            stream.writer.write(egress.encode_reply(f"{name} unreachable: {exc}"))
            return
        self.metrics.egress_allowed.labels(name).inc()
        stream.writer.write(egress.encode_reply(None))
        try:
            await _pump_both(stream.reader, stream.writer, reader, writer, self.metrics)
        finally:
            writer.close()

    async def _on_config(self, stream: vsock.VsockStream) -> None:
        # Once, to the enclave's first connection: the frames carry forwarded credentials.
        if self._config_served:
            log.warning("CID %d asked for its boot frames again: refused", stream.peer.cid)
            return
        self._config_served = True
        await deliver_config(
            stream, self.options.config_bundle, self.options.endorsement, self.options.credentials
        )


async def _pump_both(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    metrics: ProxyMetrics,
) -> None:
    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
        counter = metrics.bytes.labels(direction)
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(CHUNK):
                counter.inc(len(data))
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()

    await asyncio.gather(
        pump(a_reader, b_writer, "egress_out"), pump(b_reader, a_writer, "egress_in")
    )


def enclave_state_of(enclave_id: str) -> Callable[[], str]:
    """A state reader for the metrics gauge, backed by the launcher's records."""

    def current() -> str:
        from hermetic.launcher import records

        try:
            return records.load(enclave_id).state
        except HermeticError:
            return "UNKNOWN"

    return current
