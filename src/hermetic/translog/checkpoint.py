"""C2SP tlog-checkpoint and tlog-cosignature: the signed tree heads clients pin.

A checkpoint is a signed note whose text is ``<origin>\\n<size>\\n<base64 root>\\n`` plus
optional extension lines. Clients accept it only when the log's key signed it, the origin
is the one they expect, and enough independent witnesses cosigned it (Ed25519
``cosignature/v1``: the witness signs ``cosignature/v1\\ntime <t>\\n`` + the checkpoint text,
and the signature bytes are ``u64 big-endian t || Ed25519 signature``). Witness
cosignatures are what make a split view (two logs for two audiences) detectable.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from hermetic.errors import (
    CheckpointError,
    CheckpointFormatError,
    CosignatureThresholdError,
    DuplicateTrustedKeyError,
    NoteFormatError,
    UnknownKeyError,
)
from hermetic.translog.merkle import HASH_SIZE
from hermetic.translog.note import (
    ALG_COSIGNATURE_V1,
    NoteSignature,
    NoteSigner,
    NoteVerifier,
    _ed25519_verify,
    b64decode_strict,
    check_ed25519_public_key,
    check_text,
    ed25519_private_key,
    format_key_text,
    key_id,
    open_note,
    parse_ed25519_skey,
    sign_note,
    split_note,
)

COSIGNATURE_V1_HEADER = "cosignature/v1\ntime {}\n"
MAX_UINT64 = (1 << 64) - 1


@dataclass(frozen=True)
class Checkpoint:
    """The body of a checkpoint note: the log's claim about its tree."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or any(ord(c) < 0x20 for c in self.origin):
            raise CheckpointFormatError(
                f"checkpoint origin must be one non-empty line, got {self.origin!r}"
            )
        if not 0 <= self.size <= MAX_UINT64:
            raise CheckpointFormatError(f"checkpoint size must be a uint64, got {self.size}")
        if len(self.root_hash) != HASH_SIZE:
            raise CheckpointFormatError(
                f"checkpoint root hash must be {HASH_SIZE} bytes, got {len(self.root_hash)}"
            )
        for ext in self.extensions:
            if not ext or any(ord(c) < 0x20 for c in ext):
                raise CheckpointFormatError(
                    f"checkpoint extension lines must be non-empty single lines, got {ext!r}"
                )

    def to_text(self) -> str:
        root = base64.b64encode(self.root_hash).decode()
        return "".join(
            f"{line}\n" for line in (self.origin, str(self.size), root, *self.extensions)
        )

    @classmethod
    def parse(cls, text: str | bytes) -> Checkpoint:
        """Parse a checkpoint note text (the part before the signatures), strictly."""
        if isinstance(text, bytes | bytearray):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointFormatError("checkpoint is not valid UTF-8") from None
        if not isinstance(text, str):
            raise CheckpointFormatError(f"checkpoint must be text, got {type(text).__name__}")
        try:
            check_text(text)
        except NoteFormatError as exc:
            raise CheckpointFormatError(f"checkpoint text: {exc}") from None
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointFormatError(
                f"checkpoint needs origin, size and root lines, got {len(lines)} lines"
            )
        origin, size_text, root_text, *extensions = lines
        if not (size_text.isascii() and size_text.isdigit()) or (
            len(size_text) > 1 and size_text[0] == "0"
        ):
            raise CheckpointFormatError(
                f"checkpoint size must be decimal without leading zeros, got {size_text!r}"
            )
        if len(size_text) > 20:
            raise CheckpointFormatError("checkpoint size does not fit in a uint64")
        root = b64decode_strict(root_text, "checkpoint root hash", CheckpointFormatError)
        return cls(origin, int(size_text), root, tuple(extensions))


# --- cosignatures --------------------------------------------------------------------------


def cosignature_message(checkpoint_text: str, timestamp: int) -> bytes:
    """The bytes a witness signs: ``cosignature/v1\\ntime <t>\\n`` || checkpoint text."""
    return COSIGNATURE_V1_HEADER.format(timestamp).encode() + checkpoint_text.encode("utf-8")


@dataclass(frozen=True)
class CosignatureVerifier(NoteVerifier):
    """A witness's Ed25519 cosignature/v1 key (signature type 0x04)."""

    name: str
    public_key: bytes
    key_id: bytes = field(default=b"")

    def __post_init__(self) -> None:
        check_ed25519_public_key(self.name, self.public_key, "witness")
        if not self.key_id:
            object.__setattr__(
                self, "key_id", key_id(self.name, ALG_COSIGNATURE_V1, self.public_key)
            )

    def verify(self, text: bytes, signature: bytes) -> bool:
        if len(signature) != 8 + 64:
            return False
        (timestamp,) = struct.unpack(">Q", signature[:8])
        message = COSIGNATURE_V1_HEADER.format(timestamp).encode() + text
        return _ed25519_verify(self.public_key, signature[8:], message)

    @property
    def key_material(self) -> bytes:
        return self.public_key

    @property
    def vkey(self) -> str:
        return format_key_text("", self.name, self.key_hash, ALG_COSIGNATURE_V1, self.public_key)


class CosignatureSigner:
    """A witness's Ed25519 cosigning key (type 0x04); the seed stays out of repr."""

    def __init__(self, name: str, seed: bytes) -> None:
        self._key = ed25519_private_key(name, seed, "witness")
        self.name = name
        self.public_key = self._key.public_key().public_bytes_raw()
        self.key_id = key_id(name, ALG_COSIGNATURE_V1, self.public_key)

    @classmethod
    def generate(cls, name: str) -> CosignatureSigner:
        return cls(name, ed25519.Ed25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_skey(cls, skey: str) -> CosignatureSigner:
        """Parse ``PRIVATE+KEY+<name>+<8 hex>+<base64(0x04 || seed)>``."""
        name, seed, key_hash = parse_ed25519_skey(skey, ALG_COSIGNATURE_V1, "witness")
        signer = cls(name, seed)
        if signer.key_id.hex() != key_hash:
            raise NoteFormatError("witness name or hash mismatch: key ID does not match the key")
        return signer

    def skey(self) -> str:
        """The private key text (a secret: store it, never log it)."""
        seed = self._key.private_bytes_raw()
        return format_key_text(
            "PRIVATE+KEY+", self.name, self.key_id.hex(), ALG_COSIGNATURE_V1, seed
        )

    @property
    def verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self.name, self.public_key)

    @property
    def vkey(self) -> str:
        return self.verifier.vkey

    def cosign_bytes(self, checkpoint_text: str, timestamp: int) -> bytes:
        if not 0 <= timestamp <= MAX_UINT64:
            raise CheckpointError(f"cosignature timestamp must be a uint64, got {timestamp}")
        signature = self._key.sign(cosignature_message(checkpoint_text, timestamp))
        return struct.pack(">Q", timestamp) + signature

    def __repr__(self) -> str:
        return f"CosignatureSigner(name={self.name!r}, key_id={self.key_id.hex()})"


def _checkpoint_text(checkpoint: str | Checkpoint) -> str:
    """Accept a Checkpoint, its note text, or a whole signed checkpoint note."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint.to_text()
    if isinstance(checkpoint, str) and "\n\n" in checkpoint:
        text, _ = split_note(checkpoint)
    else:
        text = checkpoint
    Checkpoint.parse(text)
    return text


def cosign(checkpoint: str | Checkpoint, witness_signer: CosignatureSigner, timestamp: int) -> str:
    """A witness's cosignature line ``— <witness> <base64(t || sig)>\\n`` for a checkpoint.

    Only the cosigning: checking the log signature and consistency is the witness's job
    (:mod:`hermetic.translog.witness`).
    """
    text = _checkpoint_text(checkpoint)
    raw = witness_signer.cosign_bytes(text, timestamp)
    return NoteSignature(witness_signer.name, witness_signer.key_id, raw).line()


def add_cosignatures(message: str, lines: Iterable[str]) -> str:
    """Append cosignature lines to a signed checkpoint note."""
    if not message.endswith("\n"):
        raise NoteFormatError("malformed note: does not end in a newline")
    return message + "".join(lines)


def sign_checkpoint(checkpoint: Checkpoint, signers: NoteSigner | Sequence[NoteSigner]) -> str:
    """The signed checkpoint note."""
    group = [signers] if isinstance(signers, NoteSigner) else list(signers)
    return sign_note(checkpoint.to_text(), group)


# --- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cosignature:
    """A verified witness cosignature."""

    witness: str
    key_id: bytes
    timestamp: int


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose log signature (and cosignatures) verified: build via open_checkpoint."""

    checkpoint: Checkpoint
    text: str
    message: str
    cosignatures: tuple[Cosignature, ...]

    @property
    def origin(self) -> str:
        return self.checkpoint.origin

    @property
    def size(self) -> int:
        return self.checkpoint.size

    @property
    def root_hash(self) -> bytes:
        return self.checkpoint.root_hash


def check_distinct_keys(
    log_verifier: NoteVerifier | None,
    witness_verifiers: Sequence[NoteVerifier],
    labels: Sequence[str] | None = None,
) -> None:
    """Refuse a set of pinned keys in which one public key appears twice.

    A cosignature/v1 signature covers the checkpoint and a timestamp but not the witness's
    name, so a key pinned under two witness names would turn one signature into two
    cosignatures, and a log key pinned as a witness would let the log witness itself.
    ``labels`` names the log key (first) and each witness in the error, e.g. the trust
    file's ``log.vkey`` and ``log.witnesses[1]``; without them the key names are used.
    Raises :class:`DuplicateTrustedKeyError` naming both entries.
    """
    verifiers = ([] if log_verifier is None else [log_verifier]) + list(witness_verifiers)
    if labels is None:
        labels = [f"log key {log_verifier.name}"] if log_verifier is not None else []
        labels += [f"witness {w.name}" for w in witness_verifiers]
    seen: dict[bytes, str] = {}
    for label, verifier in zip(labels, verifiers, strict=True):
        earlier = seen.get(verifier.key_material)
        if earlier is not None:
            raise DuplicateTrustedKeyError(
                f"{label} has the same public key as {earlier}: one key must not count as"
                " two signers (a cosignature does not sign the witness name)"
            )
        seen[verifier.key_material] = label


def open_checkpoint(
    message: str | bytes,
    log_verifier: NoteVerifier,
    witness_verifiers: Iterable[NoteVerifier] = (),
    threshold: int = 0,
    *,
    origin: str | None = None,
) -> VerifiedCheckpoint:
    """Verify a signed checkpoint: log signature, origin, and ``threshold`` cosignatures.

    ``origin`` defaults to the log key's name (C2SP: they SHOULD match; Rekor v1 uses a
    longer origin, so pass it explicitly there). Raises :class:`UnknownKeyError` without a
    log signature, :class:`CheckpointError` on an origin mismatch,
    :class:`CosignatureThresholdError` when too few witnesses cosigned, and
    :class:`DuplicateTrustedKeyError` when one key is given twice (see
    :func:`check_distinct_keys`): every counted cosignature is by a distinct key.
    """
    witnesses = list(witness_verifiers)
    if threshold < 0 or threshold > len(witnesses):
        raise CosignatureThresholdError(
            f"threshold {threshold} cannot be met by {len(witnesses)} trusted witnesses"
        )
    check_distinct_keys(log_verifier, witnesses)
    note = open_note(message, [log_verifier, *witnesses])
    log_id = (log_verifier.name, bytes(log_verifier.key_id))
    if not any((s.name, s.key_id) == log_id for s in note.signatures):
        raise UnknownKeyError(
            f"checkpoint is not signed by the log key {log_verifier.name}+{log_verifier.key_hash}"
        )
    checkpoint = Checkpoint.parse(note.text)
    expected = log_verifier.name if origin is None else origin
    if checkpoint.origin != expected:
        raise CheckpointError(f"checkpoint origin is {checkpoint.origin!r}, expected {expected!r}")
    witness_ids = {(w.name, bytes(w.key_id)): w for w in witnesses}
    cosignatures = []
    for sig in note.signatures:
        witness = witness_ids.get((sig.name, sig.key_id))
        if witness is None:
            continue
        timestamp = (
            struct.unpack(">Q", sig.signature[:8])[0]
            if isinstance(witness, CosignatureVerifier)
            else 0
        )
        cosignatures.append(Cosignature(sig.name, sig.key_id, timestamp))
    if len(cosignatures) < threshold:
        raise CosignatureThresholdError(
            f"checkpoint has {len(cosignatures)} valid witness cosignatures, "
            f"policy requires {threshold}"
        )
    text = message.decode("utf-8") if isinstance(message, bytes | bytearray) else message
    return VerifiedCheckpoint(checkpoint, note.text, text, tuple(cosignatures))
