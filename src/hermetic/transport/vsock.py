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

* every enclave has one endpoint directory, ``<root>/<cid>/``, and sees nothing else of
  the root (the sandbox bind-mounts only that directory): ``host/`` holds the parent-side
  listeners that serve this enclave (``host/<port>.sock``, read-only inside the sandbox),
  its NSM socket and its published identity; ``enclave/`` holds the enclave's own
  listeners (``enclave/<port>.sock``). So an enclave can reach only the parent, and only
  the parent's endpoints for it, exactly as on Nitro, where an enclave talks to nobody but
  its parent. Enclave-to-enclave traffic goes through the parent, as it must on Nitro.
* the connecting side sends its own CID first (4 bytes, big-endian), because a Unix
  socket has no notion of a CID; the listener strips it and reports it as the peer CID
  (the peer *port* is reported as 0). The header is never trusted alone: a parent-side
  listener serves one enclave, checks that the header names it and, through
  ``SO_PEERCRED``, that the connecting process runs in that enclave's sandbox (its uid and
  PID namespace, :mod:`hermetic.peercred`); the parent, when it connects to an enclave's
  port, checks the same of the process that listens there, so a socket or symlink an
  enclave plants in its directory cannot lead the parent anywhere else. Refusals are
  logged.
* this lets several enclaves boot at once, each with its own launcher listening on
  "parent port 9000", which real nitro-cli cannot do (aws-nitro-enclaves-cli#516).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from hermetic import jsontext
from hermetic.errors import PeerRefusedError, PeerUnavailableError, TransportError
from hermetic.paths import state_dir
from hermetic.peercred import ProcessIdentity, peer_credentials

log = logging.getLogger("hermetic.vsock")

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
HOST_DIR = "host"
"""Per-enclave subdirectory of the parent-side listeners (read-only inside the sandbox)."""
ENCLAVE_DIR = "enclave"
"""Per-enclave subdirectory of the enclave's own listeners."""
IDENTITY_FILE = "identity.json"
IDENTITY_WAIT = 30.0
"""How long a parent-side listener waits for a booting enclave's identity to appear."""


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


def endpoint_dir(root: Path, cid: int) -> Path:
    """The one directory enclave ``cid`` sees of the emulation root (see the module doc)."""
    return root / str(VsockAddress(cid, 0).cid)


def socket_path(
    root: Path, address: VsockAddress, peer_cid: int | None = None, *, bound: bool = True
) -> Path:
    """The Unix socket file that emulates a listener on ``address``.

    A parent-side address (CID 3) exists only per enclave: ``peer_cid`` names it. With
    ``bound`` (the path is handed to bind or connect) it must fit ``sun_path``; the
    parent reaches an enclave listener through a held descriptor, whose
    ``/proc/self/fd/N`` name is short however deep the state directory is.
    """
    if address.cid == PARENT_CID:
        if peer_cid is None:
            raise TransportError(
                f"{address}: an emulated parent listener serves one enclave: expected a"
                " peer CID, got none"
            )
        path = endpoint_dir(root, peer_cid) / HOST_DIR / f"{address.port}.sock"
    else:
        path = endpoint_dir(root, address.cid) / ENCLAVE_DIR / f"{address.port}.sock"
    if bound and len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise TransportError(
            f"emulated vsock path: expected at most {_UNIX_PATH_MAX} bytes, got "
            f"{len(os.fsencode(path))} ({path}); use a shorter HERMETIC_STATE_DIR"
        )
    return path


def identity_path(root: Path, cid: int) -> Path:
    return endpoint_dir(root, cid) / HOST_DIR / IDENTITY_FILE


def publish_identity(root: Path, cid: int, identity: ProcessIdentity) -> None:
    """Record who enclave ``cid`` is, for every parent-side endpoint to check against."""
    path = identity_path(root, cid)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    temporary = path.with_name(f".{IDENTITY_FILE}.{os.getpid()}")
    temporary.write_bytes(identity.dumps())
    temporary.chmod(0o644)
    os.replace(temporary, path)


def withdraw_identity(root: Path, cid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        identity_path(root, cid).unlink()


def load_identity(root: Path, cid: int) -> ProcessIdentity | None:
    """Enclave ``cid``'s published identity, or ``None`` while it has none."""
    try:
        raw = identity_path(root, cid).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise PeerRefusedError(f"enclave {cid}: identity unreadable ({exc.strerror})") from None
    value = jsontext.loads(raw, what=f"enclave {cid}: identity file", error=PeerRefusedError)
    return ProcessIdentity.from_json(value)


async def _wait_identity(root: Path, cid: int, timeout: float) -> ProcessIdentity:
    deadline = time.monotonic() + timeout
    while True:
        identity = load_identity(root, cid)
        if identity is not None:
            return identity
        if time.monotonic() > deadline:
            raise PeerRefusedError(f"enclave {cid}: no published identity to check peers against")
        await asyncio.sleep(0.02)


def check_enclave_peer(sock: socket.socket, root: Path, cid: int, what: str) -> None:
    """Raise :class:`PeerRefusedError` unless ``sock``'s peer is a process of enclave ``cid``."""
    identity = load_identity(root, cid)
    if identity is None:
        raise PeerRefusedError(f"{what}: enclave {cid} has no published identity")
    identity.check(peer_credentials(sock), what)


async def admit_enclave_peer(sock: socket.socket, root: Path, cid: int, what: str) -> None:
    """:func:`check_enclave_peer`, waiting (bounded) for a booting enclave's identity."""
    identity = await _wait_identity(root, cid, IDENTITY_WAIT)
    identity.check(peer_credentials(sock), what)


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
    if native_available():
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (address.cid, address.port)), timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise PeerUnavailableError(f"{address}: nobody listening ({exc.strerror})") from None
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise PeerUnavailableError(f"{address}: connect failed: {exc}") from None
        return sock
    root = root or emulation_root()
    me = local_cid() if source_cid is None else source_cid
    held_route = address.cid != PARENT_CID and me == PARENT_CID
    path = socket_path(root, address, me, bound=not held_route)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    held: int | None = None
    try:
        if held_route:
            # An enclave owns its listener directory and can swap what is there at any
            # moment: hold the socket inode itself (no symlink followed at any step) and
            # connect to that, then check that the enclave's own process listens on it.
            held = _open_endpoint(root, path)
            target = f"/proc/self/fd/{held}"
        else:
            target = str(path)
        await asyncio.wait_for(loop.sock_connect(sock, target), timeout)
        if held is not None:
            check_enclave_peer(sock, root, address.cid, f"{address} listener")
        await loop.sock_sendall(sock, _CID_HEADER.pack(me))
    except (FileNotFoundError, NotADirectoryError, ConnectionRefusedError) as exc:
        sock.close()
        raise PeerUnavailableError(f"{address}: nobody listening ({exc.strerror})") from None
    except PeerRefusedError as exc:
        sock.close()
        log.warning("refused to connect: %s", exc)
        raise
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise PeerUnavailableError(f"{address}: connect failed: {exc}") from None
    finally:
        if held is not None:
            os.close(held)
    return sock


def _open_endpoint(root: Path, path: Path) -> int:
    """An ``O_PATH`` descriptor of the socket at ``path`` below ``root``, opened one
    component at a time with ``O_NOFOLLOW``: a symlink anywhere below ``root`` is refused
    (:class:`PeerRefusedError`), and so is anything that is not a socket."""
    parts = path.relative_to(root).parts
    current = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            flags = os.O_PATH | os.O_NOFOLLOW | (0 if last else os.O_DIRECTORY)
            try:
                opened = os.open(part, flags, dir_fd=current)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PeerRefusedError(
                        f"endpoint {path}: {part} is not a plain directory"
                    ) from None
                raise
            os.close(current)
            current = opened
        if not stat.S_ISSOCK(os.fstat(current).st_mode):
            raise PeerRefusedError(f"endpoint {path.name} is not a socket")
    except BaseException:
        os.close(current)
        raise
    return current


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

    ``peer_cid`` restricts the listener to one peer; a parent-side (CID 3) listener must
    name it in emulation, and admits only a process of that enclave's sandbox (see the
    module doc). In emulation the listener file is removed on close; a stale file left by
    a dead process is replaced, a live one is an error (address in use).
    """
    address = VsockAddress(cid, port)
    if native_available():
        return await _listen_native(address, handler, peer_cid)
    root = root or emulation_root()
    path = socket_path(root, address, peer_cid)
    serves_enclave = cid == PARENT_CID and peer_cid is not None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755 if serves_enclave else 0o700)
    await _remove_stale(path, address)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await asyncio.wait_for(reader.readexactly(_CID_HEADER.size), _HEADER_TIMEOUT)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            writer.close()
            return
        (source,) = _CID_HEADER.unpack(header)
        if peer_cid is not None and source != peer_cid:
            log.warning(
                "%s: refused a peer claiming CID %d (serves CID %d)", address, source, peer_cid
            )
            writer.close()
            return
        if serves_enclave and peer_cid is not None:
            try:
                await admit_enclave_peer(
                    writer.get_extra_info("socket"), root, peer_cid, f"{address} for {peer_cid}"
                )
            except PeerRefusedError as exc:
                log.warning("refused a connection: %s", exc)
                writer.close()
                return
        await _run_handler(handler, VsockStream(reader, writer, VsockAddress(source, 0)))

    server = await asyncio.start_unix_server(accept, path=str(path), limit=STREAM_LIMIT)
    # The directory decides who can reach the socket (only this enclave's sandbox sees
    # it), and the sandbox user must be able to connect; SO_PEERCRED decides the rest.
    os.chmod(path, 0o666 if serves_enclave else 0o600)
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
