"""An independent client, written from docs/protocol.md with dissononce only, talks to our server.

Nothing from hermetic.channel is used on the client side: the Noise state machine is
dissononce's, and the prologue, framing, chunk header, evidence position and RPC shapes are
typed in from the document. If the document or the server drift apart, this fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import cbor2
from dissononce.cipher.aesgcm import AESGCMCipher
from dissononce.dh.x25519.x25519 import X25519DH
from dissononce.hash.sha256 import SHA256Hash
from dissononce.processing.handshakepatterns.interactive.NX import NXHandshakePattern
from dissononce.processing.impl.cipherstate import CipherState
from dissononce.processing.impl.handshakestate import HandshakeState
from dissononce.processing.impl.symmetricstate import SymmetricState

from hermetic.channel import aio
from hermetic.channel.noise import StaticKeypair
from hermetic.errors import HermeticError

SERVER_KEY = StaticKeypair.generate()
REKEY_INTERVAL = 2  # small, so the three calls below cross several rekeys each way


def make_evidence(handshake_hash: bytes, static_public: bytes) -> bytes:
    return cbor2.dumps({"nonce": handshake_hash, "public_key": static_public})


async def echo(args: Any) -> Any:
    return args


class DocClient:
    """The initiator per docs/protocol.md, over dissononce."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.sent = self.received = 0

    async def send_frame(self, message: bytes) -> None:  # §2: u16 big-endian length prefix
        self.writer.write(len(message).to_bytes(2, "big") + message)
        await self.writer.drain()

    async def read_frame(self) -> bytes:
        size = int.from_bytes(await self.reader.readexactly(2), "big")
        return await self.reader.readexactly(size)

    async def handshake(self) -> tuple[bytes, bytes]:
        hs = HandshakeState(SymmetricState(CipherState(AESGCMCipher()), SHA256Hash()), X25519DH())
        hs.initialize(NXHandshakePattern(), True, b"hermetic/1")  # §1 prologue
        msg1 = bytearray()
        hs.write_message(b"", msg1)
        assert len(msg1) == 32
        await self.send_frame(bytes(msg1))
        msg2 = await self.read_frame()
        assert len(msg2) == 96
        payload = bytearray()
        self.tx, self.rx = hs.read_message(msg2, payload)  # initiator sends with c1
        assert payload == b""
        return bytes(hs.symmetricstate.get_handshake_hash()), bytes(hs.rs.data)

    def _rekey_if_due(self, cs: CipherState, count: int) -> None:
        # §1.1: every R messages k = ENCRYPT(k, 2^64-1, "", 32 zero bytes)[:32], nonce kept.
        # Done by hand with dissononce's ENCRYPT because its own rekey() deviates from the
        # spec twice: it keeps the 48-byte ciphertext+tag as the key and resets the nonce.
        if count % REKEY_INTERVAL == 0:
            nonce = cs._nonce
            cs.initialize_key(cs.cipher.encrypt(cs._key, 2**64 - 1, b"", bytes(32))[:32])
            cs.set_nonce(nonce)

    async def send_message(self, data: bytes) -> None:  # §4: single chunk, header 0x00
        await self.send_frame(self.tx.encrypt_with_ad(b"", b"\x00" + data))
        self.sent += 1
        self._rekey_if_due(self.tx, self.sent)

    async def read_message(self) -> bytes:
        plaintext = self.rx.decrypt_with_ad(b"", await self.read_frame())
        self.received += 1
        self._rekey_if_due(self.rx, self.received)
        assert plaintext[0] == 0x00, "single-chunk messages only in this test"
        return bytes(plaintext[1:])


async def test_independent_dissononce_client_handshakes_verifies_evidence_and_calls() -> None:
    failures: list[BaseException] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await aio.serve_connection(
                reader,
                writer,
                make_evidence,
                {"echo": echo},
                static=SERVER_KEY,
                rekey_interval=REKEY_INTERVAL,
            )
        except HermeticError as exc:
            failures.append(exc)

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = DocClient(*await asyncio.open_connection("127.0.0.1", port))
        handshake_hash, server_static = await client.handshake()
        assert server_static == SERVER_KEY.public

        # §3: the first transport message is the evidence, bound to h and the static key.
        bundle = cbor2.loads(await client.read_message())
        assert bundle == {"nonce": handshake_hash, "public_key": server_static}

        # §5: RPC request / result, ids chosen by the client.
        for ident, arg in enumerate([b"abc", {"k": [1, 2]}, "third call after rekeys"]):
            await client.send_message(cbor2.dumps([0, ident, "echo", arg]))
            assert cbor2.loads(await client.read_message()) == [1, ident, arg]
        assert client.sent == 3
        assert client.received == 4  # crossed two rekeys inbound, one outbound

        # §4: close chunk, then the server ends the connection cleanly.
        await client.send_frame(client.tx.encrypt_with_ad(b"", b"\x02bye"))
        assert await client.reader.read() == b""
        client.writer.close()
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
    assert failures == []
