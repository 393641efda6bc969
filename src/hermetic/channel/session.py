"""The attested session as sans-IO state machines: Noise messages in, events and Noise messages out.

Why a state machine and not a coroutine: the rule that matters for security, *no
application byte is released or sent before the peer's evidence verified*, is then a
property of explicit states (HANDSHAKE -> AWAIT_EVIDENCE -> OPEN -> CLOSED) that tests can
drive byte by byte, and the same object serves TCP, Unix sockets, vsock and WebSocket.

Evidence is opaque here. The side that owns a static key produces its evidence bundle with
``make_evidence(handshake_hash, local_static_public)`` and sends it as its first transport
message; the relying side calls ``verify_evidence(bundle, handshake_hash, remote_static)``,
which returns whatever describes the verified peer or raises a HermeticError. The assembly
code binds the two: the attestation document's ``nonce`` is the final handshake hash (this
session, not a replay) and its ``public_key`` is the static key that just authenticated the
handshake (this key holder, not a relay). See docs/protocol.md.

Every Noise transport plaintext starts with a one-byte chunk header (bit 0: more chunks
follow, bit 1: close), so application messages up to ``max_message_size`` ride in as many
65519-byte Noise messages as they need.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from hermetic.channel.noise import (
    MAX_PLAINTEXT_LEN,
    NX,
    NoiseHandshake,
    NoiseTransport,
    StaticKeypair,
)
from hermetic.errors import (
    ChannelError,
    EvidenceRejectedError,
    FrameError,
    HandshakeError,
    HermeticError,
    MessageTooLargeError,
    SessionClosedError,
    SessionStateError,
)

PROLOGUE = b"hermetic/1"
CHUNK_MORE = 0x01
CHUNK_CLOSE = 0x02
CHUNK_HEADER_LEN = 1
MAX_CHUNK_DATA = MAX_PLAINTEXT_LEN - CHUNK_HEADER_LEN
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
DEFAULT_REKEY_INTERVAL = 1 << 20
"""Transport messages per direction between REKEYs; both ends must use the same value."""

VerifyEvidence = Callable[[bytes, bytes, bytes], object]
"""``verify_evidence(bundle, handshake_hash, remote_static) -> peer_info``; raises to reject."""
MakeEvidence = Callable[[bytes, bytes], bytes]
"""``make_evidence(handshake_hash, local_static_public) -> bundle``."""


class State(enum.Enum):
    HANDSHAKE = "handshake"
    AWAIT_EVIDENCE = "await-evidence"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class HandshakeComplete:
    handshake_hash: bytes
    remote_static: bytes | None


@dataclass(frozen=True)
class PeerVerified:
    peer_info: object


@dataclass(frozen=True)
class ApplicationData:
    data: bytes


@dataclass(frozen=True)
class Closed:
    """The peer closed the session with a close chunk; ``reason`` is its (untrusted) text."""

    reason: str


Event = HandshakeComplete | PeerVerified | ApplicationData | Closed


class _Session:
    def __init__(
        self,
        *,
        initiator: bool,
        protocol_name: str,
        static: StaticKeypair | None,
        make_evidence: MakeEvidence | None,
        verify_evidence: VerifyEvidence | None,
        rekey_interval: int | None,
        max_message_size: int,
        prologue: bytes,
    ) -> None:
        if max_message_size < 0:
            raise SessionStateError(f"max_message_size: expected >= 0, got {max_message_size}")
        self._handshake = NoiseHandshake(
            protocol_name, initiator=initiator, prologue=prologue, static=static
        )
        pattern = self._handshake.protocol.pattern
        self.initiator = initiator
        self._sends_evidence = pattern == "XX" or not initiator
        self._expects_evidence = pattern == "XX" or initiator
        if self._sends_evidence and make_evidence is None:
            raise SessionStateError(f"{protocol_name}: this side needs a make_evidence callback")
        if self._expects_evidence and verify_evidence is None:
            raise SessionStateError(f"{protocol_name}: this side needs a verify_evidence callback")
        self._make_evidence = make_evidence
        self._verify_evidence = verify_evidence
        self._rekey_interval = rekey_interval
        self.max_message_size = max_message_size
        self._transport: NoiseTransport | None = None
        self._outbox: list[bytes] = []
        self._parts: list[bytes] = []
        self._parts_size = 0
        self.state = State.HANDSHAKE
        self.peer_info: object = None
        self.error: HermeticError | None = None
        self.close_reason: str | None = None

    # -- public API ---------------------------------------------------------------------

    @property
    def handshake_hash(self) -> bytes:
        return self._handshake.handshake_hash

    @property
    def remote_static(self) -> bytes:
        return self._handshake.remote_static

    @property
    def protocol_name(self) -> str:
        return self._handshake.protocol.name

    def data_to_send(self) -> list[bytes]:
        """Drain the Noise messages queued for the peer (allowed in every state)."""
        out, self._outbox = self._outbox, []
        return out

    def receive(self, message: bytes | bytearray | memoryview) -> list[Event]:
        """Process one whole Noise message from the peer.

        A transport message is decrypted straight from ``message``, which is not kept
        (a stream pipe may lend a view of its receive buffer).

        Raises a ChannelError (and the session becomes CLOSED) on anything unexpected; once
        closed, raises SessionClosedError.
        """
        self._check_not_closed()
        try:
            if self.state is State.HANDSHAKE:
                return self._receive_handshake(bytes(message))
            return self._receive_transport(message)
        except HermeticError as exc:
            self._fail(exc)
            raise
        except Exception as exc:  # a bug must still close the session, never leak untyped
            error = ChannelError(f"internal error while receiving ({type(exc).__name__})")
            self._fail(error)
            raise error from exc

    def send_application(self, data: bytes) -> None:
        """Queue one application message (any size up to ``max_message_size``)."""
        self._check_not_closed()
        if self.state is not State.OPEN:
            raise SessionStateError(
                f"application data: session is {self.state.value}, expected open "
                "(evidence not yet verified)"
            )
        if len(data) > self.max_message_size:
            raise MessageTooLargeError(
                f"application message: at most {self.max_message_size} bytes, got {len(data)}"
            )
        self._queue_message(data)

    def close(self, reason: str = "") -> None:
        """Close the session, telling the peer (with a close chunk) once the keys exist."""
        if self.state is State.CLOSED:
            return
        if self._transport is not None:
            encoded = reason.encode("utf-8")[:MAX_CHUNK_DATA]
            self._outbox.append(self._transport.encrypt(bytes([CHUNK_CLOSE]) + encoded))
        self.state = State.CLOSED
        self.close_reason = reason

    def connection_lost(self, error: HermeticError) -> None:
        """The carrier failed or ended early: the session is closed with ``error``."""
        if self.state is not State.CLOSED:
            self._fail(error)

    # -- handshake ------------------------------------------------------------------------

    def _receive_handshake(self, message: bytes) -> list[Event]:
        payload = self._handshake.read_message(message)
        if payload:
            raise HandshakeError(
                f"handshake payload: expected empty (evidence follows the handshake), "
                f"got {len(payload)} bytes"
            )
        if not self._handshake.complete:
            self._outbox.append(self._handshake.write_message(b""))
        if not self._handshake.complete:
            return []
        return self._on_handshake_complete()

    def _on_handshake_complete(self) -> list[Event]:
        self._transport = self._handshake.split(rekey_interval=self._rekey_interval)
        remote = self._handshake.remote_static if self._expects_evidence else None
        events: list[Event] = [HandshakeComplete(self._handshake.handshake_hash, remote)]
        if self._sends_evidence:
            assert self._make_evidence is not None
            try:
                bundle = self._make_evidence(
                    self._handshake.handshake_hash, self._handshake.local_static_public
                )
            except HermeticError:
                raise
            except Exception as exc:
                raise ChannelError(f"make_evidence failed ({type(exc).__name__})") from exc
            if len(bundle) > self.max_message_size:
                raise MessageTooLargeError(
                    f"evidence bundle: at most {self.max_message_size} bytes, got {len(bundle)}"
                )
            self._queue_message(bytes(bundle))
        self.state = State.AWAIT_EVIDENCE if self._expects_evidence else State.OPEN
        return events

    # -- transport ----------------------------------------------------------------------

    def _receive_transport(self, message: bytes | bytearray | memoryview) -> list[Event]:
        assert self._transport is not None
        plaintext = self._transport.decrypt(message)
        if not plaintext:
            raise FrameError("chunk header: expected 1 byte, transport plaintext is empty")
        flags = plaintext[0]
        if flags & ~(CHUNK_MORE | CHUNK_CLOSE) or flags == CHUNK_MORE | CHUNK_CLOSE:
            raise FrameError(f"chunk header: expected 0x00, 0x01 or 0x02, got {flags:#04x}")
        if flags & CHUNK_CLOSE:
            reason = plaintext[1:].decode("utf-8", errors="replace")
            self.state = State.CLOSED
            self.close_reason = reason
            self.error = SessionClosedError(f"closed by peer: {reason!r}")
            return [Closed(reason)]
        size = self._parts_size + len(plaintext) - CHUNK_HEADER_LEN
        if size > self.max_message_size:
            raise MessageTooLargeError(
                f"application message: at most {self.max_message_size} bytes, got at least {size}"
            )
        if flags & CHUNK_MORE:
            self._parts.append(plaintext)
            self._parts_size = size
            return []
        if self._parts:
            # One copy for the whole message: join views that skip each chunk header.
            self._parts.append(plaintext)
            data = b"".join(memoryview(p)[CHUNK_HEADER_LEN:] for p in self._parts)
        else:
            data = plaintext[CHUNK_HEADER_LEN:]
        self._parts = []
        self._parts_size = 0
        if self.state is State.AWAIT_EVIDENCE:
            return self._on_evidence(data)
        return [ApplicationData(data)]

    def _on_evidence(self, bundle: bytes) -> list[Event]:
        assert self._verify_evidence is not None
        try:
            peer_info = self._verify_evidence(
                bundle, self._handshake.handshake_hash, self._handshake.remote_static
            )
        except Exception as exc:  # fail closed on anything the verifier raises
            raise EvidenceRejectedError(
                f"evidence bundle rejected: {type(exc).__name__}: {exc}"
            ) from exc
        self.peer_info = peer_info
        self.state = State.OPEN
        return [PeerVerified(peer_info)]

    def _queue_message(self, data: bytes) -> None:
        assert self._transport is not None
        size = len(data)
        if size <= MAX_CHUNK_DATA:
            self._outbox.append(self._transport.encrypt(b"\x00" + data))
            return
        view = memoryview(data)
        for offset in range(0, size, MAX_CHUNK_DATA):
            end = offset + MAX_CHUNK_DATA
            header = b"\x01" if end < size else b"\x00"
            self._outbox.append(self._transport.encrypt(header + view[offset:end]))

    # -- failure ------------------------------------------------------------------------

    def _check_not_closed(self) -> None:
        if self.state is State.CLOSED:
            why = f": {self.error}" if self.error is not None else ""
            raise SessionClosedError(f"session is closed{why}")

    def _fail(self, error: HermeticError) -> None:
        self.state = State.CLOSED
        self.error = error
        self._outbox = []
        self._parts = []


class ClientSession(_Session):
    """The initiator. Its first handshake message is queued on construction."""

    def __init__(
        self,
        verify_evidence: VerifyEvidence,
        *,
        protocol_name: str = NX,
        static: StaticKeypair | None = None,
        make_evidence: MakeEvidence | None = None,
        rekey_interval: int | None = DEFAULT_REKEY_INTERVAL,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        prologue: bytes = PROLOGUE,
    ) -> None:
        super().__init__(
            initiator=True,
            protocol_name=protocol_name,
            static=static,
            make_evidence=make_evidence,
            verify_evidence=verify_evidence,
            rekey_interval=rekey_interval,
            max_message_size=max_message_size,
            prologue=prologue,
        )
        self._outbox.append(self._handshake.write_message(b""))


class ServerSession(_Session):
    """The responder (the enclave): answers the handshake, then sends its evidence."""

    def __init__(
        self,
        static: StaticKeypair,
        make_evidence: MakeEvidence,
        *,
        protocol_name: str = NX,
        verify_evidence: VerifyEvidence | None = None,
        rekey_interval: int | None = DEFAULT_REKEY_INTERVAL,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        prologue: bytes = PROLOGUE,
    ) -> None:
        super().__init__(
            initiator=False,
            protocol_name=protocol_name,
            static=static,
            make_evidence=make_evidence,
            verify_evidence=verify_evidence,
            rekey_interval=rekey_interval,
            max_message_size=max_message_size,
            prologue=prologue,
        )
