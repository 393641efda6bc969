"""A fenced, typed wrapper over the ``noiseprotocol`` library for the handful of suites we speak.

``noiseprotocol`` 0.3.1 implements the Noise state machines correctly (it passes every
published vector for the patterns we use) but its edges are loose: it mixes ``bytes`` and
``bytearray``, checks the 65535-byte limit on the *plaintext* instead of the message, does not
check handshake message sizes at all, and lets ``cryptography``'s ``ValueError`` /
``InvalidTag`` and its own untyped exceptions escape. This module is the only place that
touches the library; everything above it sees bytes in, bytes out, and
:class:`~hermetic.errors.ChannelError` subclasses.

Only ``Noise_{NX,XX}_25519_{AESGCM,ChaChaPoly}_{SHA256,BLAKE2s}`` are accepted: a small
allow-list keeps the interop surface (and the analysis of what each message proves) small.
"""

from __future__ import annotations

import hashlib
import hmac
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from noise.backends.default import DefaultNoiseBackend
from noise.backends.default.keypairs import KeyPair25519
from noise.connection import Keypair, NoiseConnection
from noise.functions.hash import Hash

from hermetic.errors import (
    DecryptError,
    HandshakeError,
    MessageTooLargeError,
    NonceExhaustedError,
    SessionStateError,
    UnsupportedProtocolError,
)

NX = "Noise_NX_25519_AESGCM_SHA256"
"""Default for anonymous clients: only the responder (the enclave) has a static key."""
XX = "Noise_XX_25519_AESGCM_SHA256"
"""Default for service-to-service sessions: both sides have static keys and evidence."""

ALLOWED_PROTOCOLS: frozenset[str] = frozenset(
    f"Noise_{pattern}_25519_{cipher}_{hash_name}"
    for pattern in ("NX", "XX")
    for cipher in ("AESGCM", "ChaChaPoly")
    for hash_name in ("SHA256", "BLAKE2s")
)

MAX_MESSAGE_LEN = 65535
"""Noise spec §3: every Noise message, handshake or transport, including tags."""
TAG_LEN = 16
MAX_PLAINTEXT_LEN = MAX_MESSAGE_LEN - TAG_LEN
"""65519: the largest transport plaintext whose ciphertext still fits a Noise message."""
DH_LEN = 32
MAX_NONCE = 2**64 - 1
"""Reserved by the spec (used by REKEY); a cipher state must never encrypt with it."""

# The message patterns of the two handshakes we speak (Noise spec §7.5). noiseprotocol has
# them too, but we need them to compute the exact size bounds it does not check.
_PATTERN_TOKENS: dict[str, tuple[tuple[str, ...], ...]] = {
    "NX": (("e",), ("e", "ee", "s", "es")),
    "XX": (("e",), ("e", "ee", "s", "es"), ("s", "se")),
}


class _HashlibHash(Hash):  # type: ignore[misc]
    """HASH() of the Noise spec through ``hashlib``, one C call per hash.

    The library's default goes through ``cryptography``'s incremental Hash and HMAC
    objects: the same functions, but about five object calls each, and a handshake makes
    ~30 of them per side (mix_hash, HKDF). ``fn`` is the name ``hmac.digest`` takes.
    """

    def __init__(self, name: str, hashlen: int, blocklen: int) -> None:
        self._name, self._hashlen, self._blocklen = name, hashlen, blocklen

    @property
    def fn(self) -> str:
        return self._name

    @property
    def hashlen(self) -> int:
        return self._hashlen

    @property
    def blocklen(self) -> int:
        return self._blocklen

    def hash(self, data: bytes) -> bytes:
        return hashlib.new(self._name, data).digest()


def _hmac_hash(key: bytes, data: bytes, algorithm: str) -> bytes:
    return hmac.digest(bytes(key), bytes(data), algorithm)


class _Backend(DefaultNoiseBackend):  # type: ignore[misc]
    """The library's backend with SHA256 and BLAKE2s (the hashes we allow) on hashlib."""

    def __init__(self) -> None:
        super().__init__()
        self.hashes = {
            "SHA256": lambda: _HashlibHash("sha256", 32, 64),
            "BLAKE2s": lambda: _HashlibHash("blake2s", 32, 64),
        }
        self.hmac = _hmac_hash


_BACKEND = _Backend()


@dataclass(frozen=True)
class StaticKeypair:
    """An X25519 static key pair (the key the attestation document vouches for)."""

    private: bytes = field(repr=False)
    public: bytes
    #: The noise library's form of this pair, built once: handing the library raw private
    #: bytes makes it derive the public half (an X25519 scalar multiplication) on every
    #: handshake, and the pair never changes.
    noise_keypair: KeyPair25519 = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_keypair", KeyPair25519.from_private_bytes(self.private))

    @classmethod
    def generate(cls) -> StaticKeypair:
        return cls.from_private(
            x25519.X25519PrivateKey.generate().private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )

    @classmethod
    def from_private(cls, private: bytes) -> StaticKeypair:
        if len(private) != DH_LEN:
            raise HandshakeError(
                f"static private key: expected {DH_LEN} bytes, got {len(private)} bytes"
            )
        public = (
            x25519.X25519PrivateKey.from_private_bytes(bytes(private))
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        return cls(private=bytes(private), public=public)


@dataclass(frozen=True)
class ProtocolName:
    """A parsed, allow-listed Noise protocol name."""

    name: str
    pattern: str
    cipher: str
    hash_name: str

    @classmethod
    def parse(cls, name: str) -> ProtocolName:
        if name not in ALLOWED_PROTOCOLS:
            raise UnsupportedProtocolError(
                f"protocol name: expected one of {sorted(ALLOWED_PROTOCOLS)}, got {name!r}"
            )
        _, pattern, _, cipher, hash_name = name.split("_")
        return cls(name=name, pattern=pattern, cipher=cipher, hash_name=hash_name)


def _message_bounds(pattern: str) -> list[tuple[int, bool]]:
    """For each handshake message: (fixed overhead in bytes, whether its payload is encrypted)."""
    bounds: list[tuple[int, bool]] = []
    has_key = False
    for tokens in _PATTERN_TOKENS[pattern]:
        overhead = 0
        for tok in tokens:
            if tok == "e":
                overhead += DH_LEN
            elif tok == "s":
                overhead += DH_LEN + (TAG_LEN if has_key else 0)
            else:  # ee, es, se, ss all MixKey
                has_key = True
        bounds.append((overhead + (TAG_LEN if has_key else 0), has_key))
    return bounds


class NoiseHandshake:
    """One side of an NX or XX handshake, message by message.

    ``ephemeral_private`` exists only so the published test vectors can be replayed; a real
    session must let the library generate its ephemeral key.
    """

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        prologue: bytes,
        static: StaticKeypair | None = None,
        ephemeral_private: bytes | None = None,
    ) -> None:
        self.protocol = ProtocolName.parse(protocol_name)
        self.initiator = initiator
        needs_static = self.protocol.pattern == "XX" or not initiator
        if needs_static and static is None:
            role = "initiator" if initiator else "responder"
            raise SessionStateError(f"{protocol_name} {role}: a static key pair is required")
        self._static = static if needs_static else None
        self._bounds = _message_bounds(self.protocol.pattern)
        self._index = 0
        self._transport: NoiseTransport | None = None
        conn = NoiseConnection.from_name(self.protocol.name.encode("ascii"), backend=_BACKEND)
        if initiator:
            conn.set_as_initiator()
        else:
            conn.set_as_responder()
        conn.set_prologue(bytes(prologue))
        if self._static is not None:
            # What set_keypair_from_private_bytes(Keypair.STATIC, ...) stores, without
            # rebuilding it; the library only reads it.
            conn.noise_protocol.keypairs["s"] = self._static.noise_keypair
        if ephemeral_private is None:
            conn.start_handshake()
        else:
            with warnings.catch_warnings():
                # The library warns when an ephemeral is injected; only vector replays do
                # that (and only they pay for the process-wide warning filter change).
                warnings.simplefilter("ignore")
                conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, bytes(ephemeral_private))
                conn.start_handshake()
        self._conn = conn
        self._handshake_hash: bytes | None = None
        self._remote_static: bytes | None = None

    @property
    def complete(self) -> bool:
        return self._handshake_hash is not None

    @property
    def our_turn(self) -> bool:
        """True when the next handshake step is a write by this side."""
        return (self._index % 2 == 0) == self.initiator and not self.complete

    @property
    def handshake_hash(self) -> bytes:
        if self._handshake_hash is None:
            raise SessionStateError("handshake hash requested before the handshake completed")
        return self._handshake_hash

    @property
    def remote_static(self) -> bytes:
        """The peer's static public key (after the handshake; NX initiator side only learns it)."""
        if self._remote_static is None:
            raise SessionStateError("remote static key not known (handshake incomplete)")
        return self._remote_static

    @property
    def local_static_public(self) -> bytes:
        if self._static is None:
            raise SessionStateError("this side has no static key in this pattern")
        return self._static.public

    def max_payload(self) -> int:
        """The largest payload the next handshake message can carry within 65535 bytes."""
        overhead, _ = self._bounds[self._index]
        return MAX_MESSAGE_LEN - overhead

    def write_message(self, payload: bytes = b"") -> bytes:
        if self.complete or not self.our_turn:
            raise SessionStateError(f"handshake message {self._index + 1}: not ours to write")
        if len(payload) > self.max_payload():
            raise MessageTooLargeError(
                f"handshake message {self._index + 1} payload: at most {self.max_payload()} "
                f"bytes, got {len(payload)}"
            )
        state = self._conn.noise_protocol.handshake_state
        try:
            message = bytes(self._conn.write_message(bytes(payload)))
        except ValueError as exc:
            # Our ee/es/se step met the peer's ephemeral: all-zero shared secret.
            raise HandshakeError(
                f"handshake message {self._index + 1}: Diffie-Hellman rejected the peer's "
                "public key (low-order point)"
            ) from exc
        except Exception as exc:  # the library raises untyped errors; translate all of them
            raise HandshakeError(
                f"handshake message {self._index + 1}: write failed ({type(exc).__name__})"
            ) from exc
        self._advance(state)
        return message

    def read_message(self, message: bytes) -> bytes:
        if self.complete or self.our_turn:
            raise SessionStateError(f"handshake message {self._index + 1}: not ours to read")
        number = self._index + 1
        overhead, _ = self._bounds[self._index]
        if len(message) > MAX_MESSAGE_LEN:
            raise MessageTooLargeError(
                f"handshake message {number}: at most {MAX_MESSAGE_LEN} bytes, got {len(message)}"
            )
        if len(message) < overhead:
            raise HandshakeError(
                f"handshake message {number}: at least {overhead} bytes, got {len(message)}"
            )
        state = self._conn.noise_protocol.handshake_state
        try:
            payload = bytes(self._conn.read_message(bytes(message)))
        except InvalidTag as exc:
            raise HandshakeError(
                f"handshake message {number}: authentication failed (wrong prologue, "
                "protocol or keys, or altered message)"
            ) from exc
        except ValueError as exc:
            # cryptography refuses an all-zero X25519 shared secret (low-order point).
            raise HandshakeError(
                f"handshake message {number}: Diffie-Hellman rejected the peer's public key "
                "(low-order point)"
            ) from exc
        except Exception as exc:  # untyped library errors (Noise*Error, plain Exception)
            raise HandshakeError(
                f"handshake message {number}: rejected ({type(exc).__name__})"
            ) from exc
        self._advance(state)
        return payload

    def _advance(self, state: object) -> None:
        # ``state`` is the library's HandshakeState, captured before the call: the library
        # deletes its own reference at Split, and with it the peer's static key we need.
        self._index += 1
        if self._conn.handshake_finished:
            self._handshake_hash = bytes(self._conn.get_handshake_hash())
            remote = getattr(getattr(state, "rs", None), "public_bytes", None)
            self._remote_static = bytes(remote) if remote is not None else None

    def split(self, *, rekey_interval: int | None = None) -> NoiseTransport:
        """The transport cipher states; callable once, after the last handshake message."""
        if not self.complete:
            raise SessionStateError("split requested before the handshake completed")
        if self._transport is not None:
            raise SessionStateError("split already done")
        self._transport = NoiseTransport(self._conn, rekey_interval=rekey_interval)
        return self._transport


class NoiseTransport:
    """The two transport cipher states after Split, with size caps, rekey and nonce guards.

    Rekey rule (docs/protocol.md): after every ``rekey_interval`` messages in one direction,
    both ends apply the spec's REKEY to that direction's key; the nonce keeps counting.
    Because both ends count the same messages, they stay in lockstep without signalling.

    The library runs the handshake; the transport phase is spec §5.1's CipherState over
    ``cryptography``'s AEAD directly (:class:`_CipherState`), because every application
    byte goes through it and the library's four Python layers per message (checks, AD
    handling, nonce formatting, dispatch) cost as much as encrypting a small message. The
    keys and nonces are the library's own at Split; the published vectors' transport
    messages and an independent implementation (tests) pin the result byte for byte.
    """

    def __init__(self, conn: NoiseConnection, *, rekey_interval: int | None) -> None:
        if rekey_interval is not None and rekey_interval < 1:
            raise SessionStateError(f"rekey_interval: expected >= 1, got {rekey_interval}")
        protocol = conn.noise_protocol
        self._send = _CipherState.after_split(protocol.cipher_state_encrypt)
        self._receive = _CipherState.after_split(protocol.cipher_state_decrypt)
        self._rekey_interval = rekey_interval
        self._sent = 0
        self._received = 0

    @property
    def messages_sent(self) -> int:
        return self._sent

    @property
    def messages_received(self) -> int:
        return self._received

    def encrypt(self, plaintext: bytes) -> bytes:
        if len(plaintext) > MAX_PLAINTEXT_LEN:
            raise MessageTooLargeError(
                f"transport plaintext: at most {MAX_PLAINTEXT_LEN} bytes, got {len(plaintext)}"
            )
        if self._sent >= MAX_NONCE - 1:
            raise NonceExhaustedError(f"send nonce: {self._sent} of {MAX_NONCE - 1} used")
        message = self._send.encrypt(plaintext)
        self._sent += 1
        if self._rekey_interval is not None and self._sent % self._rekey_interval == 0:
            self._send.rekey()
        return message

    def decrypt(self, message: bytes) -> bytes:
        if len(message) > MAX_MESSAGE_LEN:
            raise MessageTooLargeError(
                f"transport message: at most {MAX_MESSAGE_LEN} bytes, got {len(message)}"
            )
        if len(message) < TAG_LEN:
            raise DecryptError(
                f"transport message {self._received}: at least {TAG_LEN} bytes, "
                f"got {len(message)} (truncated)"
            )
        if self._received >= MAX_NONCE - 1:
            raise NonceExhaustedError(f"receive nonce: {self._received} of {MAX_NONCE - 1} used")
        try:
            plaintext = self._receive.decrypt(message)
        except InvalidTag as exc:
            raise DecryptError(
                f"transport message {self._received}: authentication failed "
                "(truncated, reordered, replayed or altered)"
            ) from exc
        self._received += 1
        if self._rekey_interval is not None and self._received % self._rekey_interval == 0:
            self._receive.rekey()
        return plaintext


_NONCE_BYTE_ORDER: dict[type[AESGCM | ChaCha20Poly1305], Literal["big", "little"]] = {
    AESGCM: "big",  # spec §12.4: 32 zero bits, then the 64-bit nonce big-endian
    ChaCha20Poly1305: "little",  # spec §12.3: 32 zero bits, then the nonce little-endian
}


class _CipherState:
    """Noise spec §5.1 CipherState with a key: ENCRYPT/DECRYPT with empty AD, n++, REKEY."""

    __slots__ = ("_aead", "_kind", "_order", "n")

    def __init__(self, kind: type[AESGCM | ChaCha20Poly1305], key: bytes, n: int) -> None:
        self._kind = kind
        self._aead = kind(key)
        self._order = _NONCE_BYTE_ORDER[kind]
        self.n = n

    @classmethod
    def after_split(cls, state: Any) -> _CipherState:
        """The same key and nonce as one of the library's CipherStates returned by Split."""
        kind = state.cipher.klass
        if kind not in _NONCE_BYTE_ORDER or not isinstance(state.k, bytes | bytearray):
            raise SessionStateError(f"split: unexpected cipher state ({type(state).__name__})")
        return cls(kind, bytes(state.k), int(state.n))

    def _nonce(self, n: int) -> bytes:
        return b"\x00\x00\x00\x00" + n.to_bytes(8, self._order)

    def encrypt(self, plaintext: bytes) -> bytes:
        ciphertext = self._aead.encrypt(self._nonce(self.n), plaintext, None)
        self.n += 1
        return ciphertext

    def decrypt(self, ciphertext: bytes) -> bytes:
        plaintext = self._aead.decrypt(self._nonce(self.n), ciphertext, None)
        self.n += 1  # only once authenticated: a failed decrypt raised above
        return plaintext

    def rekey(self) -> None:
        """REKEY(k): the first 32 bytes of ENCRYPT(k, 2^64-1, empty AD, 32 zero bytes)."""
        key = self._aead.encrypt(self._nonce(MAX_NONCE), bytes(32), b"")[:32]
        self._aead = self._kind(key)
