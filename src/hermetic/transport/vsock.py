"""vsock, the only channel between a Nitro enclave and its parent, real or emulated.

On Nitro hardware (``/dev/nsm`` inside an enclave, ``/dev/nitro_enclaves`` on the parent)
this uses ``AF_VSOCK``. Everywhere else it emulates vsock with Unix sockets in a runtime
directory, one socket file per listening address: ``<root>/<cid>/<port>.sock``. Unix
sockets are filesystem objects, so an emulated enclave in its own network namespace (no
interfaces at all) still reaches the parent exactly the way a real one does: through
vsock and nothing else.

``/dev/vsock`` alone is *not* taken as a sign of Nitro: ordinary VMs (this CI machine
included) have it, with a host on the other end that is not a Nitro parent.
``HERMETIC_VSOCK=native|emulated`` overrides the detection.

Emulation details a reader must know:

* the connecting side sends its own CID first (4 bytes, big-endian), because a Unix
  socket has no notion of a CID; the listener strips it and reports it as the peer CID
  (the peer *port* is reported as 0). The emulated sandbox trusts this header, as the
  whole emulator trusts the local machine.
* a parent-side listener may be bound for one peer CID only (``peer_cid=``), file
  ``<port>.<peer>.sock``; a connecting enclave tries that file before the shared one.
  This lets several enclaves boot at once, each with its own launcher listening on
  "parent port 9000", which real nitro-cli cannot do (aws-nitro-enclaves-cli#516).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from hermetic.errors import PeerUnavailableError, TransportError
from hermetic.paths import state_dir

PARENT_CID = 3
"""The parent instance, as seen from an enclave (``VMADDR_CID_PARENT``)."""
FIRST_ENCLAVE_CID = 16
"""The lowest CID the launcher hands to an enclave (nitro-cli uses the same floor)."""
VMADDR_CID_ANY = 0xFFFFFFFF
_MAX_U32 = 0xFFFFFFFF
_CID_HEADER = struct.Struct(">I")
_UNIX_PATH_MAX = 107
_IOCTL_VM_SOCKETS_GET_LOCAL_CID = 0x7B9
_HEADER_TIMEOUT = 5.0
STREAM_LIMIT = 1024 * 1024
"""Reader buffer limit for vsock streams (asyncio's 64 KiB default halves bulk throughput)."""


@dataclass(frozen=True)
class VsockAddress:
    """A vsock address: context ID (which VM) and port."""

    cid: int
    port: int

    def __post_init__(self) -> None:
        for name, value in (("cid", self.cid), ("port", self.port)):
            if not 0 <= value <= _MAX_U32:
                raise TransportError(f"vsock {name}: expected 0..{_MAX_U32}, got {value}")

    def __str__(self) -> str:
        return f"vsock:{self.cid}:{self.port}"


@dataclass(frozen=True)
class VsockStream:
    """One accepted or connected vsock stream."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: VsockAddress

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


Handler = Callable[[VsockStream], Awaitable[None]]


def native_available() -> bool:
    """Whether to use real ``AF_VSOCK`` (on Nitro) rather than the emulation."""
    forced = os.environ.get("HERMETIC_VSOCK", "").strip().lower()
    if forced in ("native", "emulated"):
        return forced == "native"
    if forced:
        raise TransportError(f"HERMETIC_VSOCK: expected 'native' or 'emulated', got {forced!r}")
    return Path("/dev/nsm").exists() or Path("/dev/nitro_enclaves").exists()


def emulation_root() -> Path:
    """Directory holding the emulated vsock sockets (``$HERMETIC_VSOCK_DIR`` or state dir)."""
    explicit = os.environ.get("HERMETIC_VSOCK_DIR")
    return Path(explicit) if explicit else state_dir() / "vsock"


def local_cid() -> int:
    """This side's CID: ``$HERMETIC_VSOCK_CID``, else the kernel's (native), else the parent."""
    explicit = os.environ.get("HERMETIC_VSOCK_CID")
    if explicit:
        try:
            return VsockAddress(int(explicit), 0).cid
        except ValueError:
            raise TransportError(
                f"HERMETIC_VSOCK_CID: expected an integer, got {explicit!r}"
            ) from None
    if native_available():
        with open("/dev/vsock", "rb") as device:
            buf = bytearray(4)
            fcntl.ioctl(device, _IOCTL_VM_SOCKETS_GET_LOCAL_CID, buf)
            return int(struct.unpack("=I", buf)[0])
    return PARENT_CID


def socket_path(root: Path, address: VsockAddress, peer_cid: int | None = None) -> Path:
    """The Unix socket file that emulates a listener on ``address``."""
    name = f"{address.port}.sock" if peer_cid is None else f"{address.port}.{peer_cid}.sock"
    path = root / str(address.cid) / name
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise TransportError(
            f"emulated vsock path: expected at most {_UNIX_PATH_MAX} bytes, got "
            f"{len(os.fsencode(path))} ({path}); use a shorter HERMETIC_STATE_DIR"
        )
    return path


async def connect(
    cid: int,
    port: int,
    *,
    root: Path | None = None,
    source_cid: int | None = None,
    timeout: float = 10.0,
) -> VsockStream:
    """Connect to ``(cid, port)``; raise :class:`PeerUnavailableError` if nobody listens."""
    sock = await connect_socket(cid, port, root=root, source_cid=source_cid, timeout=timeout)
    reader, writer = await asyncio.open_connection(sock=sock, limit=STREAM_LIMIT)
    return VsockStream(reader, writer, VsockAddress(cid, port))


async def connect_socket(
    cid: int,
    port: int,
    *,
    root: Path | None = None,
    source_cid: int | None = None,
    timeout: float = 10.0,
) -> socket.socket:
    """A connected non-blocking socket to ``(cid, port)``, for protocol-level relays.

    In emulation the CID header has already been sent, so the socket carries only the
    peer's bytes from here on, exactly like a native ``AF_VSOCK`` socket.
    """
    address = VsockAddress(cid, port)
    loop = asyncio.get_running_loop()
    candidates: list[tuple[int, tuple[int, int] | str]]
    if native_available():
        candidates = [(socket.AF_VSOCK, (address.cid, address.port))]
        header = b""
    else:
        root = root or emulation_root()
        me = local_cid() if source_cid is None else source_cid
        candidates = [
            (socket.AF_UNIX, str(socket_path(root, address, me))),
            (socket.AF_UNIX, str(socket_path(root, address))),
        ]
        header = _CID_HEADER.pack(me)
    last: OSError | None = None
    for family, target in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, target), timeout)
            if header:
                await loop.sock_sendall(sock, header)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            last = exc
            continue
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise PeerUnavailableError(f"{address}: connect failed: {exc}") from None
        return sock
    reason = last.strerror if last is not None and last.strerror else "no listener"
    raise PeerUnavailableError(f"{address}: nobody listening ({reason})")


class VsockListener:
    """A listening vsock address; close it (or use ``async with``) to stop accepting."""

    def __init__(self, server: asyncio.Server, address: VsockAddress, path: Path | None) -> None:
        self._server = server
        self.address = address
        self.path = path

    async def aclose(self) -> None:
        self._server.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        await self._server.wait_closed()

    async def __aenter__(self) -> VsockListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def listen(
    cid: int,
    port: int,
    handler: Handler,
    *,
    root: Path | None = None,
    peer_cid: int | None = None,
) -> VsockListener:
    """Accept streams on ``(cid, port)`` and run ``handler`` for each (then close it).

    ``peer_cid`` restricts the listener to one peer. In emulation the listener file is
    created with mode 0600 and removed on close; a stale file left by a dead process is
    replaced, a live one is an error (address in use).
    """
    address = VsockAddress(cid, port)
    if native_available():
        return await _listen_native(address, handler, peer_cid)
    root = root or emulation_root()
    path = socket_path(root, address, peer_cid)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    await _remove_stale(path, address)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await asyncio.wait_for(reader.readexactly(_CID_HEADER.size), _HEADER_TIMEOUT)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            writer.close()
            return
        (source,) = _CID_HEADER.unpack(header)
        if peer_cid is not None and source != peer_cid:
            writer.close()
            return
        await _run_handler(handler, VsockStream(reader, writer, VsockAddress(source, 0)))

    server = await asyncio.start_unix_server(accept, path=str(path), limit=STREAM_LIMIT)
    os.chmod(path, 0o600)
    return VsockListener(server, address, path)


async def _listen_native(
    address: VsockAddress, handler: Handler, peer_cid: int | None
) -> VsockListener:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((VMADDR_CID_ANY, address.port))
    except OSError as exc:
        sock.close()
        raise TransportError(f"{address}: bind failed: {exc}") from None

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_cid_seen, peer_port = writer.get_extra_info("peername")
        if peer_cid is not None and peer_cid_seen != peer_cid:
            writer.close()
            return
        peer = VsockAddress(peer_cid_seen, peer_port)
        await _run_handler(handler, VsockStream(reader, writer, peer))

    server = await asyncio.start_server(accept, sock=sock, limit=STREAM_LIMIT)
    return VsockListener(server, address, None)


async def _run_handler(handler: Handler, stream: VsockStream) -> None:
    try:
        await handler(stream)
    finally:
        await stream.aclose()


async def _remove_stale(path: Path, address: VsockAddress) -> None:
    if not path.exists():
        return
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise TransportError(f"{address}: cannot probe {path}: {exc}") from None
        return
    writer.close()
    raise TransportError(f"{address}: address in use ({path} has a live listener)")
