"""C2SP signed notes: the envelope around every checkpoint and cosignature.

A signed note is UTF-8 text followed by a blank line and ``— <key name> <base64(key ID ||
signature)>`` lines. Verification is deliberately strict and x/mod-compatible: unknown keys
are ignored (counted), a failing signature by a known key rejects the whole note, and a
note without one verified signature is rejected. No maintained Python package implements
this format (sigstore-python has a private, partial parser), so it is written here, sans-IO.

Keys: Ed25519 (signature type 0x01, key ID ``SHA-256(name || 0x0A || 0x01 || pub)[:4]``),
and ECDSA verifiers as used by Rekor v1 checkpoints and transparency-dev witnesses (key ID
``SHA-256(DER SPKI)[:4]``). The x/mod private-key text ``PRIVATE+KEY+<name>+<id>+<b64>`` is
supported so keys interoperate with Go tooling.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from hermetic.errors import NoteFormatError, NoteSignatureError, UnknownKeyError

EM_DASH = "\u2014"
SIG_PREFIX = EM_DASH + " "
MAX_SIGNATURES = 100
"""Signature lines accepted per note (C2SP: at least 16; x/mod: 100)."""
MAX_NOTE_BYTES = 1 << 20

ALG_ED25519 = 0x01
ALG_ECDSA = 0x02
ALG_COSIGNATURE_V1 = 0x04


def is_valid_key_name(name: str) -> bool:
    """C2SP: non-empty, no Unicode spaces, no ``+`` (and, for text safety, no control chars)."""
    return (
        bool(name)
        and "+" not in name
        and not any(ch.isspace() or ord(ch) < 0x20 or ch == "\x7f" for ch in name)
    )


def key_id(name: str, alg: int, public_key: bytes) -> bytes:
    """The recommended C2SP key ID: ``SHA-256(name || 0x0A || alg || public key)[:4]``."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public_key).digest()[:4]


def b64decode_strict(text: str, what: str, error: type[Exception] = NoteFormatError) -> bytes:
    """Standard padded base64, canonical only (re-encoding must give the same text)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise error(f"{what} is not valid base64") from None
    if base64.b64encode(raw).decode() != text:
        raise error(f"{what} is not canonical base64")
    return raw


# --- verifiers and signers ---------------------------------------------------------------


class NoteVerifier(ABC):
    """A public key that can check one kind of signature on a note."""

    name: str
    key_id: bytes

    @abstractmethod
    def verify(self, text: bytes, signature: bytes) -> bool:
        """Whether ``signature`` (without the 4-byte key ID) is valid over ``text``."""

    @property
    @abstractmethod
    def key_material(self) -> bytes:
        """The public key alone (raw Ed25519 bytes, or DER SPKI for ECDSA).

        Name and signature type are left out on purpose: two verifiers with the same key
        material are one signer, however they are named (see
        :func:`hermetic.translog.checkpoint.check_distinct_keys`).
        """

    @property
    def key_hash(self) -> str:
        return self.key_id.hex()

    @staticmethod
    def from_vkey(vkey: str) -> NoteVerifier:
        """Parse a C2SP verifier key ``<name>+<8 hex key ID>+<base64(type || key)>``.

        Accepts Ed25519 (type 0x01) and Ed25519 cosignature (type 0x04) keys.
        """
        return parse_vkey(vkey)


@dataclass(frozen=True)
class Ed25519NoteVerifier(NoteVerifier):
    """An Ed25519 note key (signature type 0x01)."""

    name: str
    public_key: bytes
    key_id: bytes = field(default=b"")

    def __post_init__(self) -> None:
        check_ed25519_public_key(self.name, self.public_key, "verifier")
        if not self.key_id:
            object.__setattr__(self, "key_id", key_id(self.name, ALG_ED25519, self.public_key))

    def verify(self, text: bytes, signature: bytes) -> bool:
        return _ed25519_verify(self.public_key, signature, text)

    @property
    def key_material(self) -> bytes:
        return self.public_key

    @property
    def vkey(self) -> str:
        """The C2SP verifier key text."""
        return format_key_text("", self.name, self.key_hash, ALG_ED25519, self.public_key)


@dataclass(frozen=True)
class EcdsaNoteVerifier(NoteVerifier):
    """An ECDSA note key (P-256/384/521, DER signature over the note text).

    Key ID = ``SHA-256(DER SPKI)[:4]``, the rule shared by Rekor v1 checkpoints and
    transparency-dev witnesses (signature type 0x02). The digest matches the curve
    (SHA-256 for P-256, as Rekor uses).
    """

    name: str
    spki_der: bytes
    key_id: bytes = field(default=b"")

    def __post_init__(self) -> None:
        _check_name(self.name, "verifier")
        _load_ec_key(self.spki_der)  # reject a bad key at construction, not at first use
        if not self.key_id:
            object.__setattr__(self, "key_id", hashlib.sha256(self.spki_der).digest()[:4])

    @property
    def key_material(self) -> bytes:
        return self.spki_der

    def verify(self, text: bytes, signature: bytes) -> bool:
        key = _load_ec_key(self.spki_der)
        digest: hashes.HashAlgorithm
        size = key.curve.key_size
        digest = (
            hashes.SHA256() if size <= 256 else hashes.SHA384() if size <= 384 else hashes.SHA512()
        )
        try:
            key.verify(signature, text, ec.ECDSA(digest))
        except (InvalidSignature, ValueError):
            return False
        return True


def _load_ec_key(spki_der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(spki_der)
    except (ValueError, TypeError):
        raise NoteFormatError("ECDSA verifier key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise NoteFormatError(f"verifier key is {type(key).__name__}, expected an ECDSA key")
    if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise NoteFormatError(f"ECDSA curve {key.curve.name} is not P-256, P-384 or P-521")
    return key


def _ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not is_valid_key_name(name):
        raise NoteFormatError(
            f"{what} key name must be non-empty without spaces or '+', got {name!r}"
        )


def parse_vkey(vkey: str) -> NoteVerifier:
    """Parse a verifier key text (see :meth:`NoteVerifier.from_vkey`)."""
    # Imported here: checkpoint builds on this module, not the other way round.
    from hermetic.translog.checkpoint import CosignatureVerifier

    parts = vkey.split("+", 2) if isinstance(vkey, str) else []
    if len(parts) != 3 or not is_valid_key_name(parts[0]) or not _is_hex8(parts[1]):
        raise NoteFormatError("malformed verifier id: expected <name>+<8 hex>+<base64 key>")
    name, hash_hex, b64 = parts
    try:
        raw = b64decode_strict(b64, "verifier key")
    except NoteFormatError as exc:
        raise NoteFormatError(f"malformed verifier id: {exc}") from None
    if not raw:
        raise NoteFormatError("malformed verifier id: empty key")
    alg, public_key = raw[0], raw[1:]
    if alg not in (ALG_ED25519, ALG_COSIGNATURE_V1):
        raise NoteFormatError(f"unknown verifier algorithm 0x{alg:02x}")
    if len(public_key) != 32:
        raise NoteFormatError(
            f"malformed verifier id: Ed25519 key must be 32 bytes, got {len(public_key)}"
        )
    if hash_hex != key_id(name, alg, public_key).hex():
        raise NoteFormatError(
            f"verifier name or hash mismatch: key ID {hash_hex} does not match the key"
        )
    if alg == ALG_COSIGNATURE_V1:
        return CosignatureVerifier(name, public_key)
    return Ed25519NoteVerifier(name, public_key)


def _is_hex8(text: str) -> bool:
    return len(text) == 8 and all(c in "0123456789abcdef" for c in text)


# Ed25519 key texts are the same for note signers (type 0x01) and witness cosigners (0x04):
# one parser and one formatter for both, differing only in the type byte.


def check_ed25519_public_key(name: str, public_key: bytes, role: str) -> None:
    """Validate a verifier's key name and raw 32-byte Ed25519 public key."""
    _check_name(name, role)
    if len(public_key) != 32:
        raise NoteFormatError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")


def ed25519_private_key(name: str, seed: bytes, role: str) -> ed25519.Ed25519PrivateKey:
    """The private key for a named signer, from its raw 32-byte seed."""
    _check_name(name, role)
    if len(seed) != 32:
        raise NoteFormatError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def format_key_text(prefix: str, name: str, key_hash: str, alg: int, key: bytes) -> str:
    """``<prefix><name>+<8 hex key ID>+<base64(alg || key)>`` (vkey: no prefix)."""
    encoded = base64.b64encode(bytes([alg]) + key).decode()
    return f"{prefix}{name}+{key_hash}+{encoded}"


def parse_ed25519_skey(skey: str, alg: int, role: str) -> tuple[str, bytes, str]:
    """Split ``PRIVATE+KEY+<name>+<8 hex>+<base64(alg || seed)>`` into (name, seed, hex ID).

    The caller rebuilds the key and checks that its key ID is the hex ID given here.
    """
    parts = skey.split("+", 4) if isinstance(skey, str) else []
    if (
        len(parts) != 5
        or parts[:2] != ["PRIVATE", "KEY"]
        or not is_valid_key_name(parts[2])
        or not _is_hex8(parts[3])
    ):
        raise NoteFormatError(f"malformed {role} key: expected PRIVATE+KEY+<name>+<hex>+<b64>")
    raw = b64decode_strict(parts[4], f"{role} key")
    if len(raw) != 33 or raw[0] != alg:
        raise NoteFormatError(f"malformed {role} key: expected 0x{alg:02x} and a 32-byte seed")
    return parts[2], raw[1:], parts[3]


class NoteSigner(ABC):
    """A private key that signs note texts."""

    name: str
    key_id: bytes

    @abstractmethod
    def sign(self, text: bytes) -> bytes:
        """The signature bytes (without the key ID) over ``text``."""

    @property
    def key_hash(self) -> str:
        return self.key_id.hex()


class Ed25519NoteSigner(NoteSigner):
    """An Ed25519 signed-note key (type 0x01). The seed never leaves this object's repr."""

    def __init__(self, name: str, seed: bytes) -> None:
        self._key = ed25519_private_key(name, seed, "signer")
        self.name = name
        self.public_key = self._key.public_key().public_bytes_raw()
        self.key_id = key_id(name, ALG_ED25519, self.public_key)

    @classmethod
    def from_skey(cls, skey: str) -> Ed25519NoteSigner:
        """Parse x/mod's ``PRIVATE+KEY+<name>+<8 hex>+<base64(0x01 || seed)>``."""
        name, seed, key_hash = parse_ed25519_skey(skey, ALG_ED25519, "signer")
        signer = cls(name, seed)
        if signer.key_hash != key_hash:
            raise NoteFormatError("signer name or hash mismatch: key ID does not match the key")
        return signer

    def sign(self, text: bytes) -> bytes:
        return self._key.sign(text)

    @property
    def verifier(self) -> Ed25519NoteVerifier:
        return Ed25519NoteVerifier(self.name, self.public_key)

    @property
    def vkey(self) -> str:
        return self.verifier.vkey

    def skey(self) -> str:
        """The x/mod private key text (a secret: store it, never log it)."""
        seed = self._key.private_bytes_raw()
        return format_key_text("PRIVATE+KEY+", self.name, self.key_hash, ALG_ED25519, seed)

    def __repr__(self) -> str:
        return f"Ed25519NoteSigner(name={self.name!r}, key_id={self.key_hash})"


def generate_key(name: str) -> tuple[str, str]:
    """A fresh Ed25519 note key: ``(skey text, vkey text)``."""
    seed = ed25519.Ed25519PrivateKey.generate().private_bytes_raw()
    signer = Ed25519NoteSigner(name, seed)
    return signer.skey(), signer.vkey


# --- notes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, 4-byte key ID and the signature proper."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        encoded = base64.b64encode(self.key_id + self.signature).decode()
        return f"{SIG_PREFIX}{self.name} {encoded}\n"


@dataclass(frozen=True)
class Note:
    """An opened note: its text and which signatures verified (only build via open_note)."""

    text: str
    signatures: tuple[NoteSignature, ...]
    unverified: tuple[NoteSignature, ...]

    @property
    def verified_names(self) -> list[str]:
        return [s.name for s in self.signatures]

    @property
    def unverified_count(self) -> int:
        return len(self.unverified)


def check_text(text: str) -> bytes:
    """Validate note text (UTF-8, ends in newline, no control chars but newline)."""
    if not isinstance(text, str) or not text:
        raise NoteFormatError("malformed note: text is empty")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise NoteFormatError("malformed note: text is not valid UTF-8") from None
    if not text.endswith("\n"):
        raise NoteFormatError("malformed note: text does not end in a newline")
    _check_no_controls(text)
    return raw


def _check_no_controls(text: str) -> None:
    for pos, ch in enumerate(text):
        if ord(ch) < 0x20 and ch != "\n":
            raise NoteFormatError(
                f"malformed note: control character 0x{ord(ch):02x} at offset {pos}"
            )


def sign_note(text: str, signers: Iterable[NoteSigner]) -> str:
    """The signed note: ``text``, a blank line and one signature line per signer."""
    raw = check_text(text)
    lines = []
    for signer in signers:
        lines.append(NoteSignature(signer.name, signer.key_id, signer.sign(raw)).line())
    if not lines:
        raise NoteFormatError("a signed note needs at least one signer")
    return text + "\n" + "".join(lines)


def split_note(message: str | bytes) -> tuple[str, list[NoteSignature]]:
    """Parse a signed note's structure (no verification): ``(text, signature lines)``."""
    if isinstance(message, bytes | bytearray):
        if len(message) > MAX_NOTE_BYTES:
            raise NoteFormatError(f"malformed note: {len(message)} bytes > {MAX_NOTE_BYTES}")
        try:
            message = bytes(message).decode("utf-8")
        except UnicodeDecodeError:
            raise NoteFormatError("malformed note: not valid UTF-8") from None
    if not isinstance(message, str):
        raise NoteFormatError(f"malformed note: expected text, got {type(message).__name__}")
    if len(message) > MAX_NOTE_BYTES:
        raise NoteFormatError(f"malformed note: longer than {MAX_NOTE_BYTES} characters")
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        raise NoteFormatError("malformed note: not valid UTF-8") from None
    _check_no_controls(message)
    split = message.rfind("\n\n")
    if split < 0:
        raise NoteFormatError("malformed note: no blank line before the signatures")
    text, block = message[: split + 1], message[split + 2 :]
    if not block.endswith("\n"):
        raise NoteFormatError("malformed note: signature block does not end in a newline")
    sigs: list[NoteSignature] = []
    for number, line in enumerate(block[:-1].split("\n"), start=1):
        if number > MAX_SIGNATURES:
            raise NoteFormatError(f"malformed note: more than {MAX_SIGNATURES} signatures")
        sigs.append(parse_signature_line(line))
    return text, sigs


def parse_signature_line(line: str) -> NoteSignature:
    """Parse ``— <name> <base64>`` (with or without its final newline)."""
    body = line[:-1] if line.endswith("\n") else line
    if not body.startswith(SIG_PREFIX):
        raise NoteFormatError("malformed note: signature line does not start with '— '")
    fields = body[len(SIG_PREFIX) :].split(" ")
    if len(fields) != 2 or not is_valid_key_name(fields[0]):
        raise NoteFormatError("malformed note: signature line is not '— <name> <base64>'")
    raw = b64decode_strict(fields[1], f"signature by {fields[0]!r}")
    if len(raw) < 5:
        raise NoteFormatError(f"malformed note: signature by {fields[0]!r} is too short")
    return NoteSignature(fields[0], raw[:4], raw[4:])


def open_note(message: str | bytes, verifiers: Iterable[NoteVerifier]) -> Note:
    """Parse and verify a signed note against known keys (x/mod ``note.Open`` semantics).

    Raises :class:`NoteFormatError` if it is malformed, :class:`NoteSignatureError` if a
    known key's signature fails, :class:`UnknownKeyError` if no known key signed it.
    """
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for v in verifiers:
        ident = (v.name, bytes(v.key_id))
        if ident in known:
            raise NoteFormatError(f"ambiguous key {v.name}+{v.key_hash}: given twice")
        known[ident] = v
    text, sigs = split_note(message)
    raw_text = text.encode("utf-8")
    verified: list[NoteSignature] = []
    unverified: list[NoteSignature] = []
    seen_known: set[tuple[str, bytes]] = set()
    seen_unknown: set[NoteSignature] = set()
    for sig in sigs:
        ident = (sig.name, sig.key_id)
        verifier = known.get(ident)
        if verifier is None:
            if sig not in seen_unknown:  # identical repeated lines count once
                seen_unknown.add(sig)
                unverified.append(sig)
            continue
        if ident in seen_known:
            raise NoteFormatError(
                f"malformed note: two signatures by {sig.name}+{sig.key_id.hex()}"
            )
        seen_known.add(ident)
        if not verifier.verify(raw_text, sig.signature):
            raise NoteSignatureError(f"invalid signature for key {sig.name}+{sig.key_id.hex()}")
        verified.append(sig)
    if not verified:
        names = ", ".join(sorted({s.name for s in sigs}))
        raise UnknownKeyError(f"note has no verifiable signatures (signed by: {names})")
    return Note(text, tuple(verified), tuple(unverified))
