"""The emulator served over a real Unix socket, used through SocketBackend and NSMClient."""

from __future__ import annotations

import asyncio
import socket
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hermetic.attestation.codec import decode
from hermetic.errors import NSMError, NSMUnavailableError
from hermetic.nsm.client import NSMClient
from hermetic.nsm.emulator import EmulatedNSM
from hermetic.nsm.messages import ErrorCode, ErrorResponse, decode_response
from hermetic.nsm.server import SocketBackend, start_server

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


async def test_socket_round_trip_attests_extends_and_refuses(tmp_path: Path) -> None:
    nsm = EmulatedNSM(now=NOW, clock=lambda: NOW)
    path = tmp_path / "nsm.sock"
    server = await start_server(nsm, path)
    async with server:

        def enclave_side() -> tuple[bytes, bytes, str, str]:
            with NSMClient(SocketBackend(path, timeout=60)) as client:
                new = client.extend_pcr(16, b"app")
                client.lock_pcr(16)
                with pytest.raises(NSMError) as info:
                    client.extend_pcr(16, b"again")
                document = client.attest(nonce=b"n" * 32)
                return new, document, info.value.code, client.describe_nsm().module_id

        new, document, code, module_id = await asyncio.to_thread(enclave_side)

        def oversized_frame() -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.settimeout(10)
                raw.connect(str(path))
                raw.sendall(struct.pack(">I", 0x1001))
                header = raw.recv(4)
                return raw.recv(struct.unpack(">I", header)[0])

        refused = await asyncio.to_thread(oversized_frame)
    assert code == "ReadOnlyIndex"
    _, doc = decode(document)
    assert doc.pcrs[16] == new == nsm.pcr(16)
    assert doc.nonce == b"n" * 32
    assert doc.module_id == module_id == nsm.module_id
    assert decode_response(refused) == ErrorResponse(ErrorCode.INPUT_TOO_LARGE)
    assert (path.stat().st_mode & 0o777) == 0o600


def test_socket_backend_without_server_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(NSMUnavailableError):
        SocketBackend(tmp_path / "nobody.sock").transact(b"\x69GetRandom")


async def test_one_socket_client_shared_by_threads_gives_each_call_its_own_document(
    tmp_path: Path,
) -> None:
    """An enclave's handshake and its anchor thread attest through one client at once (the
    device serialises ioctls); no call may get a document made for another."""
    nsm = EmulatedNSM(now=NOW, clock=lambda: NOW)
    path = tmp_path / "nsm.sock"
    server = await start_server(nsm, path)
    async with server:
        client = NSMClient(SocketBackend(path, timeout=60))

        def calls(worker: int) -> list[tuple[bytes | None, bytes | None]]:
            got = []
            for n in range(40):
                nonce = None if n % 2 else struct.pack(">II", worker, n) * 4
                _, doc = decode(client.attest(nonce=nonce, user_data=bytes([worker, n % 256])))
                got.append((nonce, doc.nonce))
                assert doc.user_data == bytes([worker, n % 256])
            return got

        try:
            results = await asyncio.gather(*(asyncio.to_thread(calls, w) for w in range(6)))
        finally:
            client.close()
    pairs = [pair for worker in results for pair in worker]
    assert len(pairs) == 240
    assert all(sent == received for sent, received in pairs)
