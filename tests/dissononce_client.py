"""An initiator written from docs/protocol.md alone, over the dissononce Noise library.

Why it exists: the interop tests need a client that shares no code with
``hermetic.channel``, so that a drift between the document and the implementation fails a
test instead of being hidden by both sides using the same code. The Noise state machine is
dissononce's; the prologue, framing, message sizes, chunk header and rekey rule are typed
in from the document (section numbers in the comments). Nothing from hermetic is imported.
"""

from __future__ import annotations

import asyncio

from dissononce.cipher.aesgcm import AESGCMCipher
from dissononce.dh.x25519.x25519 import X25519DH
from dissononce.hash.sha256 import SHA256Hash
from dissononce.processing.handshakepatterns.interactive.NX import NXHandshakePattern
from dissononce.processing.impl.cipherstate import CipherState
from dissononce.processing.impl.handshakestate import HandshakeState
from dissononce.processing.impl.symmetricstate import SymmetricState

PROLOGUE = b"hermetic/1"  # §1
DEFAULT_REKEY_INTERVAL = 2**20  # §1.1
MAX_CHUNK = 65518  # §4: 65535 - 16-byte tag - 1-byte header
MORE, CLOSE = 0x01, 0x02  # §4 chunk header bits


class PeerClosed(Exception):
    """The responder sent a CLOSE chunk (§4); ``reason`` is its UTF-8 text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DocClient:
    """The NX initiator per docs/protocol.md over a byte stream, with dissononce's Noise."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        rekey_interval: int = DEFAULT_REKEY_INTERVAL,
        prologue: bytes = PROLOGUE,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.prologue = prologue
        self.rekey_interval = rekey_interval
        self.sent = self.received = 0

    async def send_frame(self, message: bytes) -> None:  # §2: u16 big-endian length prefix
        self.writer.write(len(message).to_bytes(2, "big") + message)
        await self.writer.drain()

    async def read_frame(self) -> bytes:
        size = int.from_bytes(await self.reader.readexactly(2), "big")
        assert size > 0, "§2: a zero-length frame is an error"
        return await self.reader.readexactly(size)

    async def handshake(self) -> tuple[bytes, bytes]:
        """Run NX (``-> e``, ``<- e, ee, s, es``); return (handshake hash, responder static)."""
        hs = HandshakeState(SymmetricState(CipherState(AESGCMCipher()), SHA256Hash()), X25519DH())
        hs.initialize(NXHandshakePattern(), True, self.prologue)
        msg1 = bytearray()
        hs.write_message(b"", msg1)  # §1: handshake payloads are empty
        assert len(msg1) == 32
        await self.send_frame(bytes(msg1))
        msg2 = await self.read_frame()
        assert len(msg2) == 96, f"§1: NX message 2 is 96 bytes, got {len(msg2)}"
        payload = bytearray()
        self.tx, self.rx = hs.read_message(msg2, payload)  # initiator sends with c1
        assert payload == b""
        return bytes(hs.symmetricstate.get_handshake_hash()), bytes(hs.rs.data)

    def _rekey_if_due(self, cs: CipherState, count: int) -> None:
        # §1.1: every R messages k = ENCRYPT(k, 2^64-1, "", 32 zero bytes)[:32], nonce kept.
        # Done by hand with dissononce's ENCRYPT because its own rekey() deviates from the
        # spec twice: it keeps the 48-byte ciphertext+tag as the key and resets the nonce.
        if count % self.rekey_interval == 0:
            nonce = cs._nonce
            cs.initialize_key(cs.cipher.encrypt(cs._key, 2**64 - 1, b"", bytes(32))[:32])
            cs.set_nonce(nonce)

    async def send_plaintext(self, plaintext: bytes) -> None:
        """Encrypt one transport plaintext (chunk header included) and send it."""
        await self.send_frame(self.tx.encrypt_with_ad(b"", plaintext))
        self.sent += 1
        self._rekey_if_due(self.tx, self.sent)

    async def read_plaintext(self) -> bytes:
        plaintext = bytes(self.rx.decrypt_with_ad(b"", await self.read_frame()))
        self.received += 1
        self._rekey_if_due(self.rx, self.received)
        return plaintext

    async def send_message(self, data: bytes) -> None:
        """One application message, split into chunks of at most 65518 bytes (§4)."""
        chunks = [data[i : i + MAX_CHUNK] for i in range(0, len(data), MAX_CHUNK)] or [b""]
        for n, chunk in enumerate(chunks):
            header = MORE if n < len(chunks) - 1 else 0x00
            await self.send_plaintext(bytes([header]) + chunk)

    async def read_message(self) -> bytes:
        """One application message, reassembled from its chunks (§4)."""
        parts: list[bytes] = []
        while True:
            plaintext = await self.read_plaintext()
            assert plaintext, "§4: an empty plaintext is an error"
            header = plaintext[0]
            if header == CLOSE:
                raise PeerClosed(plaintext[1:].decode("utf-8"))
            assert header in (0x00, MORE), f"§4: invalid chunk header {header:#04x}"
            parts.append(plaintext[1:])
            if header == 0x00:
                return b"".join(parts)

    async def close(self, reason: str = "bye") -> None:
        """Send a CLOSE chunk (§4) and wait for the responder to end the connection."""
        await self.send_plaintext(bytes([CLOSE]) + reason.encode("utf-8"))
        remaining = await self.reader.read()
        self.writer.close()
        assert remaining == b"", "nothing may follow our CLOSE"
