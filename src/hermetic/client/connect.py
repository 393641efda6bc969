"""The client SDK: open a session to a service URL and get it back only once it is verified.

``connect`` is the assembly the architecture promises: it opens a transport (TCP, a Unix
socket, a WebSocket or vsock), runs the Noise handshake, verifies the service's evidence
bundle offline with :func:`~hermetic.client.verify.verify_evidence` against the caller's
trust bundle and policy, and only then hands back a session that can call methods. What was
verified stays on the session (``session.verified``), so a caller can log or show it.

URLs: ``tcp://host:port``, ``unix:///path/to.sock``, ``ws://host:port/path`` (``wss://``
too) and ``vsock://cid:port`` (native AF_VSOCK on Nitro, the emulator's Unix sockets
elsewhere, chosen by :mod:`hermetic.transport.vsock`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from hermetic.channel import aio
from hermetic.channel.noise import NX, StaticKeypair
from hermetic.channel.session import MakeEvidence
from hermetic.client.trust import ClientTrust, ServicePolicy
from hermetic.client.verify import VerificationReport, VerifiedPeer, verify_evidence
from hermetic.errors import (
    EvidenceRejectedError,
    HermeticError,
    PeerUnavailableError,
    ServiceURLError,
)

DEFAULT_TIMEOUT = 30.0
SCHEMES = ("tcp", "unix", "ws", "wss", "vsock")


@dataclass(frozen=True)
class ServiceURL:
    """A parsed service URL."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""
    text: str = ""

    @classmethod
    def parse(cls, url: str) -> ServiceURL:
        if not isinstance(url, str):
            raise ServiceURLError(f"service URL: expected a string, got {type(url).__name__}")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ServiceURLError(f"service URL {url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ServiceURLError(
                f"service URL {url!r}: scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}"
            )
        if scheme == "unix":
            path = unquote(parts.path)
            if parts.netloc or not path:
                raise ServiceURLError(
                    f"service URL {url!r}: expected unix:///absolute/path (empty host)"
                )
            return cls(scheme, path=path, text=url)
        host = parts.hostname or ""
        if not host or port is None:
            raise ServiceURLError(f"service URL {url!r}: expected {scheme}://host:port")
        if scheme == "vsock":
            if not host.isdigit():
                raise ServiceURLError(f"service URL {url!r}: vsock CID must be a number")
            return cls(scheme, host=host, port=port, text=url)
        if scheme == "tcp" and parts.path not in ("", "/"):
            raise ServiceURLError(f"service URL {url!r}: tcp URLs have no path")
        return cls(scheme, host=host, port=port, path=parts.path or "/", text=url)


class AttestedSession:
    """An open session whose peer's evidence verified; call methods with :meth:`call`."""

    def __init__(
        self, channel: aio.ClientChannel, verified: VerifiedPeer, report: VerificationReport
    ) -> None:
        self._channel = channel
        self.verified = verified
        self.report = report

    @property
    def handshake_hash(self) -> bytes:
        return self._channel.handshake_hash

    @property
    def protocol_name(self) -> str:
        return self._channel.session.protocol_name

    async def call(self, method: str, args: Any = None) -> Any:
        """Call ``method`` with ``args``; raises RPCError with the service's code on failure."""
        return await self._channel.call(method, args)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AttestedSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_pipe(url: ServiceURL, timeout: float | None = DEFAULT_TIMEOUT) -> aio.MessagePipe:
    """Connect the transport a URL names; failures are PeerUnavailableError."""
    try:
        async with asyncio.timeout(timeout):
            if url.scheme == "tcp":
                reader, writer = await asyncio.open_connection(url.host, url.port)
                return aio.StreamPipe(reader, writer)
            if url.scheme == "unix":
                reader, writer = await asyncio.open_unix_connection(url.path)
                return aio.StreamPipe(reader, writer)
            if url.scheme == "vsock":
                from hermetic.transport import vsock

                stream = await vsock.connect(int(url.host), url.port)
                return aio.StreamPipe(stream.reader, stream.writer)
            from websockets.asyncio.client import connect as ws_connect
            from websockets.exceptions import InvalidHandshake, InvalidURI

            try:
                websocket = await ws_connect(url.text, max_size=2**17)
            except (InvalidHandshake, InvalidURI) as exc:
                raise PeerUnavailableError(f"{url.text}: websocket refused: {exc}") from None
            return aio.WebSocketPipe(websocket)
    except TimeoutError:
        raise PeerUnavailableError(f"{url.text}: no connection within {timeout} s") from None
    except OSError as exc:
        raise PeerUnavailableError(
            f"{url.text}: connect failed: {exc.strerror or type(exc).__name__}"
        ) from None


async def connect(
    url: str,
    *,
    trust: ClientTrust,
    policy: ServicePolicy | None = None,
    now: datetime | None = None,
    report: VerificationReport | None = None,
    protocol_name: str = NX,
    static: StaticKeypair | None = None,
    make_evidence: MakeEvidence | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> AttestedSession:
    """Open a session to ``url`` and verify the service before returning it.

    Raises the error of the check that failed (UntrustedRootError, NonceMismatchError,
    UnknownPublisherError, ...), PeerUnavailableError when nobody answers, or another
    HermeticError from the channel. For XX (``protocol_name``), pass ``static`` and
    ``make_evidence`` so this side can attest itself too.
    """
    target = ServiceURL.parse(url)
    accepted = policy if policy is not None else ServicePolicy()
    steps = report if report is not None else VerificationReport()

    def verify(bundle: bytes, handshake_hash: bytes, remote_static: bytes) -> VerifiedPeer:
        return verify_evidence(
            bundle, handshake_hash, remote_static, trust, accepted, now, report=steps
        )

    pipe = await open_pipe(target, timeout)
    try:
        channel = await aio.connect(
            pipe,
            verify,
            protocol_name=protocol_name,
            static=static,
            make_evidence=make_evidence,
            handshake_timeout=timeout,
        )
    except EvidenceRejectedError as exc:
        # The channel wraps the verifier's error; hand back the precise check's error.
        cause = exc.__cause__
        if isinstance(cause, HermeticError):
            raise cause from None
        raise
    except BaseException:
        with contextlib.suppress(HermeticError):
            await pipe.aclose()
        raise
    peer = channel.peer_info
    assert isinstance(peer, VerifiedPeer)
    return AttestedSession(channel, peer, steps)


class SyncSession:
    """A blocking wrapper around :class:`AttestedSession` (its own event loop)."""

    def __init__(self, runner: asyncio.Runner, session: AttestedSession) -> None:
        self._runner = runner
        self._session = session
        self.verified = session.verified
        self.report = session.report

    def call(self, method: str, args: Any = None) -> Any:
        return self._runner.run(self._session.call(method, args))

    def close(self) -> None:
        try:
            self._runner.run(self._session.close())
        finally:
            self._runner.close()

    def __enter__(self) -> SyncSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_sync(url: str, *, trust: ClientTrust, **options: Any) -> SyncSession:
    """:func:`connect` for code without an event loop; close the session when done."""
    runner = asyncio.Runner()
    try:
        session = runner.run(connect(url, trust=trust, **options))
    except BaseException:
        runner.close()
        raise
    return SyncSession(runner, session)
