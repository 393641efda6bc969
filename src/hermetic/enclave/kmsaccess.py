"""KMS from inside the enclave: a ready ``EnclaveKMSClient`` whose traffic leaves by egress.

The enclave has no network. botocore, which signs and sends the KMS requests, wants a
TCP endpoint, so the runtime gives it one inside the enclave: it brings up the loopback
interface of the enclave's own network namespace (down at boot, on Nitro as in the
emulator's sandbox) and runs a small forwarder on ``127.0.0.1:<ephemeral>`` that relays
every connection over a parent egress stream (``CONNECT host:port``, allowlisted by the
proxy) to the KMS endpoint named in the signed runtime config::

    {"kms": {"endpoint": "host:port", "region": "us-east-1", "scheme": "http"|"https"}}

* ``http`` (the local KMS server speaks plain HTTP): the client's ``endpoint_url`` is the
  forwarder itself, which relays bytes to the endpoint.
* ``https`` (real AWS, ``kms.<region>.amazonaws.com:443``): the forwarder is an HTTP
  ``CONNECT`` proxy for botocore (``Config(proxies=...)``), so TLS runs from botocore to
  KMS *through* the tunnel, with the real host name verified, and ends inside the enclave:
  the parent only relays ciphertext. The forwarder accepts only ``CONNECT`` to the
  configured endpoint.

Why a loopback forwarder and not a custom botocore connection class: botocore's HTTP layer
is urllib3's connection pool; replacing its socket creation means patching private
internals, while a local endpoint (or standard proxy) is a documented botocore setting.

The forwarder runs its own event loop on a thread, so an app may call the (blocking)
client from a worker thread (``asyncio.to_thread``) or even from its event loop without
deadlocking the relay. The credentials come from the parent at boot (``boot`` credentials
frame); they live only in the client's botocore session.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hermetic.enclave.egress import open_egress
from hermetic.errors import EnclaveBootError, FrameFormatError, HermeticError
from hermetic.kms.client import Attester, EnclaveKMSClient, KMSCredentials
from hermetic.transport.tcp import HostPort, parse_hostport

SCHEMES = ("http", "https")
MAX_CONNECT_HEAD = 8192
CHUNK = 64 * 1024
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in the union (40 bytes)


@dataclass(frozen=True)
class KMSSettings:
    """The ``kms`` section of a verified runtime config."""

    endpoint: HostPort
    region: str
    scheme: str

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> KMSSettings | None:
        """None when the config has no ``kms`` section; EnclaveBootError when it is wrong."""
        section = values.get("kms")
        if section is None:
            return None
        if not isinstance(section, dict):
            raise EnclaveBootError(f"config kms: expected an object, got {type(section).__name__}")
        unknown = sorted(set(section) - {"endpoint", "region", "scheme"})
        if unknown:
            raise EnclaveBootError(
                f"config kms: expected endpoint, region and scheme, got unknown {unknown}"
            )
        endpoint, region = section.get("endpoint"), section.get("region")
        scheme = section.get("scheme", "https")
        if not isinstance(endpoint, str):
            raise EnclaveBootError(f"config kms.endpoint: expected 'host:port', got {endpoint!r}")
        try:
            hostport = parse_hostport(endpoint, field="config kms.endpoint")
        except HermeticError as exc:
            raise EnclaveBootError(str(exc)) from None
        if not isinstance(region, str) or not region:
            raise EnclaveBootError(f"config kms.region: expected a region name, got {region!r}")
        if scheme not in SCHEMES:
            raise EnclaveBootError(f"config kms.scheme: expected http or https, got {scheme!r}")
        return cls(hostport, region, scheme)


def parse_connect_head(head: bytes) -> HostPort:
    """The destination of an HTTP ``CONNECT host:port HTTP/1.x`` request head (sans-IO).

    ``head`` is everything up to and including the blank line; FrameFormatError otherwise.
    """
    if len(head) > MAX_CONNECT_HEAD or not head.endswith(b"\r\n\r\n"):
        raise FrameFormatError(
            f"proxy request: expected an HTTP head of at most {MAX_CONNECT_HEAD} bytes"
        )
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise FrameFormatError("proxy request: expected 'CONNECT host:port HTTP/1.1'")
    try:
        return parse_hostport(parts[1].decode("ascii"), field="proxy request target")
    except (UnicodeDecodeError, HermeticError):
        raise FrameFormatError("proxy request: target is not an ASCII host:port") from None


def bring_up_loopback() -> None:
    """Set IFF_UP on ``lo`` in this network namespace if it is down (needs CAP_NET_ADMIN)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            answer = fcntl.ioctl(sock, _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0))
            flags = _IFREQ.unpack(answer)[1]
            if not flags & _IFF_UP:
                fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))
        except OSError as exc:
            raise EnclaveBootError(
                f"loopback: cannot bring up 'lo' for the KMS forwarder: {exc.strerror}"
            ) from None


class EgressForwarder:
    """``127.0.0.1:<port>`` relaying to ``target`` through the parent's egress, on a thread."""

    def __init__(self, target: HostPort, *, connect_proxy: bool) -> None:
        self.target = target
        self.connect_proxy = connect_proxy
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> int:
        """Bind and start serving; return the local port."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(10)
        return self.port

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            # End the relays still running, so none is left suspended in a stopped loop.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.connect_proxy:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                    destination = parse_connect_head(head)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    return
                except FrameFormatError:
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    return
                if destination != self.target:
                    writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    return
            try:
                up_reader, up_writer = await open_egress(self.target.host, self.target.port)
            except HermeticError:
                if self.connect_proxy:
                    writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            if self.connect_proxy:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
            writer.close()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()


@dataclass(frozen=True)
class EnclaveKMS:
    """The booted KMS access: the client the app uses and the forwarder behind it."""

    client: EnclaveKMSClient
    forwarder: EgressForwarder

    def close(self) -> None:
        self.client.close()
        self.forwarder.close()


def start_kms(settings: KMSSettings, credentials: KMSCredentials, attester: Attester) -> EnclaveKMS:
    """Bring up loopback, start the forwarder, build the client pointed through it."""
    bring_up_loopback()
    https = settings.scheme == "https"
    forwarder = EgressForwarder(settings.endpoint, connect_proxy=https)
    port = forwarder.start()
    local = f"http://127.0.0.1:{port}"
    endpoint = settings.endpoint
    if https:
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        client = EnclaveKMSClient(
            attester,
            credentials,
            region=settings.region,
            endpoint_url=f"https://{host}:{endpoint.port}",
            proxies={"https": local},
        )
    else:
        client = EnclaveKMSClient(attester, credentials, region=settings.region, endpoint_url=local)
    return EnclaveKMS(client, forwarder)
