"""Noise NX and XX (spec revision 34) for the handful of suites we speak, on ``cryptography``.

Only ``Noise_{NX,XX}_25519_{AESGCM,ChaChaPoly}_{SHA256,BLAKE2s}`` are accepted: a small
allow-list keeps the interop surface (and the analysis of what each message proves) small.
Everything above this module sees bytes in, bytes out, and
:class:`~hermetic.errors.ChannelError` subclasses.

Why the state machines are written here and not taken from ``noiseprotocol`` (0.3.1),
which implements them correctly: its Python layers per token and per message (connection,
protocol and state objects, backend dispatch, key pair wrappers, a fresh cipher object per
key) cost as much as the six X25519 operations of an NX handshake, and the handshake
is on the path of every session (measured: ~500 us for both sides through the library,
~330 us here, 2 x ~50 us of it X25519 key generation and 4 x ~45 us X25519 itself). What
is here is spec §5 (CipherState, SymmetricState, HandshakeState) for exactly two patterns
without pre-messages or PSKs; the transport phase is the same CipherState. It passes
every published vector for the allowed suites (cacophony, snow, noise-c), the library
itself replays those vectors in the tests as a cross-check, a differential test drives
both with random keys and compares every byte, and an independent implementation
(``dissononce``) interoperates with it.

The library's loose edges were also the reason for the old wrapper, and stay closed:
handshake message sizes are checked against the pattern before any cryptography, the
65535-byte limit applies to whole messages, and ``cryptography``'s ``ValueError`` (an
all-zero X25519 result: a low-order point) and ``InvalidTag`` become typed errors.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

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


HASH_LEN = 32
"""HASHLEN of both allowed hashes (SHA-256, BLAKE2s)."""
_AEADS: dict[str, type[AESGCM | ChaCha20Poly1305]] = {
    "AESGCM": AESGCM,
    "ChaChaPoly": ChaCha20Poly1305,
}
_HASHES: dict[str, str] = {"SHA256": "sha256", "BLAKE2s": "blake2s"}  # hashlib / hmac names
_RAW = serialization.Encoding.Raw
_RAW_PUBLIC = serialization.PublicFormat.Raw


@dataclass(frozen=True)
class StaticKeypair:
    """An X25519 static key pair (the key the attestation document vouches for)."""

    private: bytes = field(repr=False)
    public: bytes
    #: The private key as ``cryptography``'s object, built once: parsing it per handshake
    #: is a needless step on every session, and the pair never changes.
    key: x25519.X25519PrivateKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = x25519.X25519PrivateKey.from_private_bytes(self.private)
        if key.public_key().public_bytes(_RAW, _RAW_PUBLIC) != self.public:
            raise HandshakeError("static key pair: the public key does not match the private key")
        object.__setattr__(self, "key", key)

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


class _SymmetricState:
    """Noise spec §5.2: the chaining key, the handshake hash and the handshake's cipher."""

    __slots__ = ("_aead", "_hash", "_order", "ck", "h", "k", "n")

    def __init__(self, protocol: ProtocolName) -> None:
        self._hash = _HASHES[protocol.hash_name]
        self._aead = _AEADS[protocol.cipher]
        self._order = _NONCE_BYTE_ORDER[self._aead]
        name = protocol.name.encode("ascii")
        h = name.ljust(HASH_LEN, b"\x00") if len(name) <= HASH_LEN else self._digest(name)
        self.ck = h
        self.h = h
        self.k: AESGCM | ChaCha20Poly1305 | None = None
        self.n = 0

    def _digest(self, data: bytes) -> bytes:
        return hashlib.new(self._hash, data).digest()

    def _hkdf(self, ikm: bytes) -> tuple[bytes, bytes]:
        # spec §4.3 HKDF with two outputs (HMAC-HASH, HASHLEN = 32 for both our hashes)
        temp = hmac.digest(self.ck, ikm, self._hash)
        first = hmac.digest(temp, b"\x01", self._hash)
        return first, hmac.digest(temp, first + b"\x02", self._hash)

    def mix_hash(self, data: bytes) -> None:
        self.h = self._digest(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, key = self._hkdf(ikm)
        self.k = self._aead(key)  # HASHLEN is 32: the whole output is the key
        self.n = 0

    def _nonce(self) -> bytes:
        return b"\x00\x00\x00\x00" + self.n.to_bytes(8, self._order)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self.k is None:
            ciphertext = plaintext
        else:
            ciphertext = self.k.encrypt(self._nonce(), plaintext, self.h)
            self.n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        if self.k is None:
            plaintext = ciphertext
        else:
            plaintext = self.k.decrypt(self._nonce(), ciphertext, self.h)  # InvalidTag
            self.n += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        return self._hkdf(b"")


def _dh(private: x25519.X25519PrivateKey, public: bytes) -> bytes:
    # ``exchange`` raises ValueError for an all-zero result (a low-order public key)
    return private.exchange(x25519.X25519PublicKey.from_public_bytes(public))


class NoiseHandshake:
    """One side of an NX or XX handshake, message by message (spec §5.3).

    ``ephemeral_private`` exists only so the published test vectors can be replayed; a real
    session lets this class generate its ephemeral key.
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
        if ephemeral_private is not None and len(ephemeral_private) != DH_LEN:
            raise HandshakeError(
                f"ephemeral private key: expected {DH_LEN} bytes, got {len(ephemeral_private)}"
            )
        self._static = static if needs_static else None
        self._tokens = _PATTERN_TOKENS[self.protocol.pattern]
        self._bounds = _message_bounds(self.protocol.pattern)
        self._index = 0
        self._transport: NoiseTransport | None = None
        self._symmetric = _SymmetricState(self.protocol)
        self._symmetric.mix_hash(bytes(prologue))
        self._ephemeral_private = ephemeral_private
        self._e: x25519.X25519PrivateKey | None = None
        self._re: bytes | None = None
        self._rs: bytes | None = None
        self._keys: tuple[bytes, bytes] | None = None
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
        symmetric = self._symmetric
        parts: list[bytes] = []
        try:
            for step in self._tokens[self._index]:
                if step == "e":
                    self._e = self._new_ephemeral()
                    public = self._e.public_key().public_bytes(_RAW, _RAW_PUBLIC)
                    parts.append(public)
                    symmetric.mix_hash(public)
                elif step == "s":
                    parts.append(symmetric.encrypt_and_hash(self.local_static_public))
                else:
                    symmetric.mix_key(self._dh(step))
            parts.append(symmetric.encrypt_and_hash(bytes(payload)))
        except ValueError as exc:
            # Our ee/es/se step met the peer's ephemeral: all-zero shared secret.
            raise HandshakeError(
                f"handshake message {self._index + 1}: Diffie-Hellman rejected the peer's "
                "public key (low-order point)"
            ) from exc
        self._advance()
        return b"".join(parts)

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
        data = bytes(message)
        symmetric = self._symmetric
        offset = 0
        try:
            for step in self._tokens[self._index]:
                if step == "e":
                    self._re = data[offset : offset + DH_LEN]
                    offset += DH_LEN
                    symmetric.mix_hash(self._re)
                elif step == "s":
                    size = DH_LEN + (TAG_LEN if symmetric.k is not None else 0)
                    self._rs = symmetric.decrypt_and_hash(data[offset : offset + size])
                    offset += size
                else:
                    symmetric.mix_key(self._dh(step))
            payload = symmetric.decrypt_and_hash(data[offset:])
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
        self._advance()
        return payload

    def _new_ephemeral(self) -> x25519.X25519PrivateKey:
        if self._ephemeral_private is None:
            return x25519.X25519PrivateKey.generate()
        return x25519.X25519PrivateKey.from_private_bytes(self._ephemeral_private)

    def _dh(self, token: str) -> bytes:
        # ee, es, se (spec §7.1): the first letter is the initiator's key, the second the
        # responder's; each side uses its own private half and the peer's public half.
        ours, theirs = (token[0], token[1]) if self.initiator else (token[1], token[0])
        private = self._e if ours == "e" else (self._static.key if self._static else None)
        public = self._re if theirs == "e" else self._rs
        if private is None or public is None:  # unreachable for NX/XX; never a silent skip
            raise HandshakeError(f"handshake token {token}: a key is missing")
        return _dh(private, public)

    def _advance(self) -> None:
        self._index += 1
        if self._index == len(self._tokens):
            self._handshake_hash = self._symmetric.h
            self._remote_static = self._rs
            self._keys = self._symmetric.split()
            self._e = None  # the ephemeral private key is not needed after Split

    def split(self, *, rekey_interval: int | None = None) -> NoiseTransport:
        """The transport cipher states; callable once, after the last handshake message."""
        if not self.complete or self._keys is None:
            raise SessionStateError("split requested before the handshake completed")
        if self._transport is not None:
            raise SessionStateError("split already done")
        first, second = self._keys  # initiator -> responder, responder -> initiator
        send, receive = (first, second) if self.initiator else (second, first)
        self._transport = NoiseTransport(
            _AEADS[self.protocol.cipher], send, receive, rekey_interval=rekey_interval
        )
        self._keys = None
        return self._transport


class NoiseTransport:
    """The two transport cipher states after Split, with size caps, rekey and nonce guards.

    Rekey rule (docs/protocol.md): after every ``rekey_interval`` messages in one direction,
    both ends apply the spec's REKEY to that direction's key; the nonce keeps counting.
    Because both ends count the same messages, they stay in lockstep without signalling.

    The keys are the two outputs of Split; the published vectors' transport messages and
    an independent implementation (tests) pin the result byte for byte.
    """

    def __init__(
        self,
        kind: type[AESGCM | ChaCha20Poly1305],
        send_key: bytes,
        receive_key: bytes,
        *,
        rekey_interval: int | None,
    ) -> None:
        if rekey_interval is not None and rekey_interval < 1:
            raise SessionStateError(f"rekey_interval: expected >= 1, got {rekey_interval}")
        self._send = _CipherState(kind, send_key, 0)
        self._receive = _CipherState(kind, receive_key, 0)
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

    def decrypt(self, message: bytes | bytearray | memoryview) -> bytes:
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

    def _nonce(self, n: int) -> bytes:
        return b"\x00\x00\x00\x00" + n.to_bytes(8, self._order)

    def encrypt(self, plaintext: bytes) -> bytes:
        ciphertext = self._aead.encrypt(self._nonce(self.n), plaintext, None)
        self.n += 1
        return ciphertext

    def decrypt(self, ciphertext: bytes | bytearray | memoryview) -> bytes:
        plaintext = self._aead.decrypt(self._nonce(self.n), ciphertext, None)
        self.n += 1  # only once authenticated: a failed decrypt raised above
        return plaintext

    def rekey(self) -> None:
        """REKEY(k): the first 32 bytes of ENCRYPT(k, 2^64-1, empty AD, 32 zero bytes)."""
        key = self._aead.encrypt(self._nonce(MAX_NONCE), bytes(32), b"")[:32]
        self._aead = self._kind(key)
