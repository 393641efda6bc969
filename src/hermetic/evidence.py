"""The evidence bundle: what an attested service sends as its first transport message.

Why a bundle of its own: the channel (``hermetic.channel``) treats evidence as opaque bytes,
the attestation document and the log's endorsement are separate formats owned by separate
packages, and a client must be able to check all of it *offline*, before it sends a byte of
application data. This module is the one place that puts them side by side, byte-exactly
(see ``docs/evidence.md``), so that an independent client (a browser, another language)
decodes the same bytes the same way.

It is sans-IO: :class:`EvidenceBundle` encodes and decodes bytes, :func:`user_data` and
:func:`parse_user_data` define the document's ``user_data`` layout, and
:func:`make_evidence_provider` returns the ``make_evidence(handshake_hash, static_public)``
callback the server side of a session needs; the only I/O it does is through the NSM
client it is given (one fresh attestation per handshake).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2

from hermetic.cbor import canonical_dumps, strict_loads
from hermetic.errors import EvidenceFormatError, HermeticError, MalformedInputError
from hermetic.nsm.client import Attester
from hermetic.translog.release import Endorsement, SignedStatement

VERSION = 1
MAX_BUNDLE_SIZE = 256 * 1024
MAX_ATTESTATION_SIZE = 16 * 1024
MAX_ENTRY_SIZE = 65535  # a tlog-tiles entry bundle holds entries of at most u16 bytes
MAX_CHECKPOINT_SIZE = 16 * 1024
MAX_ORIGIN_SIZE = 256
MAX_PROOF_HASHES = 64
HASH_SIZE = 32
CONFIG_DIGEST_SIZE = 32

#: Prefix of the attestation document's ``user_data`` in channel evidence (20 ASCII bytes),
#: followed by the 32-byte SHA-256 of the runtime config, or by nothing without a config.
USER_DATA_PREFIX = b"hermetic.evidence/v1"

_TOP_KEYS = frozenset({"v", "attestation", "config_digest", "endorsement"})
_ENDORSEMENT_KEYS = frozenset({"entry", "origin", "index", "inclusion_proof", "checkpoint"})


def user_data(config_digest: bytes | None) -> bytes:
    """The ``user_data`` an evidence document carries: prefix || config digest (if any).

    A fixed prefix and a fixed-size digest rather than a CBOR map: a browser compares bytes
    without a second decoder, and documents an app requests through its bound NSM (whose
    ``user_data`` is the bare digest) can never pass for channel evidence.
    """
    if config_digest is None:
        return USER_DATA_PREFIX
    if type(config_digest) is not bytes or len(config_digest) != CONFIG_DIGEST_SIZE:
        raise EvidenceFormatError(
            f"config_digest: expected {CONFIG_DIGEST_SIZE} bytes or None,"
            f" got {_describe(config_digest)}"
        )
    return USER_DATA_PREFIX + config_digest


def parse_user_data(value: bytes | None) -> bytes | None:
    """The config digest in an evidence document's ``user_data`` (None: no config)."""
    if value is None or not value.startswith(USER_DATA_PREFIX):
        got = "none" if value is None else f"{len(value)} bytes starting {value[:20]!r}"
        raise EvidenceFormatError(
            f"document user_data: expected the prefix {USER_DATA_PREFIX!r}, got {got}"
        )
    rest = value[len(USER_DATA_PREFIX) :]
    if not rest:
        return None
    if len(rest) != CONFIG_DIGEST_SIZE:
        raise EvidenceFormatError(
            f"document user_data: expected {CONFIG_DIGEST_SIZE} digest bytes after the prefix,"
            f" got {len(rest)}"
        )
    return rest


@dataclass(frozen=True)
class EvidenceBundle:
    """An attestation document, the config digest, and the endorsement of the release.

    ``endorsement`` is None only for enclaves that have no logged release (debug enclaves
    in development); a verifier accepts that only under a policy that allows debug peers.
    """

    attestation: bytes
    config_digest: bytes | None
    endorsement: Endorsement | None

    def encode(self) -> bytes:
        """The deterministic CBOR encoding (RFC 8949 §4.2.1) of docs/evidence.md."""
        if self.config_digest is not None:
            _check_bytes(
                "config_digest", self.config_digest, CONFIG_DIGEST_SIZE, CONFIG_DIGEST_SIZE
            )
        endorsement: dict[str, Any] | None = None
        if self.endorsement is not None:
            endorsement = _encode_endorsement(self.endorsement)
        return _encode_bundle(self.attestation, self.config_digest, endorsement)

    @classmethod
    def decode(
        cls,
        data: bytes,
        *,
        parse_entry: Callable[[bytes], SignedStatement] = SignedStatement.from_entry,
    ) -> EvidenceBundle:
        """Strictly decode a bundle; anything but the one valid encoding is an error.

        ``parse_entry`` parses the endorsement's log entry; a verifier passes one that
        returns the already parsed statement for entry bytes it verified before
        (:meth:`hermetic.client.trust.ReleaseCache.parse_entry`), which must behave exactly
        like :meth:`SignedStatement.from_entry` for the same bytes.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise EvidenceFormatError(f"evidence bundle: expected bytes, got {_describe(data)}")
        data = bytes(data)
        if len(data) > MAX_BUNDLE_SIZE:
            raise EvidenceFormatError(
                f"evidence bundle: at most {MAX_BUNDLE_SIZE} bytes, got {len(data)}"
            )
        value = strict_loads(data, what="evidence bundle", error=EvidenceFormatError)
        top = _map(value, "evidence bundle", _TOP_KEYS)
        version = top["v"]
        if type(version) is not int or version != VERSION:
            raise EvidenceFormatError(f"v: expected {VERSION}, got {_describe(version)}")
        attestation = _check_bytes("attestation", top["attestation"], 1, MAX_ATTESTATION_SIZE)
        digest = top["config_digest"]
        if digest is not None:
            digest = _check_bytes("config_digest", digest, CONFIG_DIGEST_SIZE, CONFIG_DIGEST_SIZE)
        raw_endorsement = top["endorsement"]
        endorsement = None
        if raw_endorsement is not None:
            endorsement = _decode_endorsement(raw_endorsement, parse_entry)
        # One bundle, one encoding: indefinite lengths, non-minimal integers, unsorted keys
        # and trailing bytes all fail here, so a bundle's bytes identify it exactly. The
        # decoded value is re-encoded as is (its types are checked above, and the entry is
        # checked canonical by from_entry), which equals encode() of the result.
        if canonical_dumps(value, what="evidence bundle", error=EvidenceFormatError) != data:
            raise EvidenceFormatError(
                "evidence bundle: not in deterministic CBOR encoding (RFC 8949 §4.2.1)"
            )
        return cls(attestation, digest, endorsement)


def _encode_bundle(
    attestation: bytes, config_digest: bytes | None, endorsement: dict[str, Any] | None
) -> bytes:
    _check_bytes("attestation", attestation, 1, MAX_ATTESTATION_SIZE)
    value = {
        "v": VERSION,
        "attestation": attestation,
        "config_digest": config_digest,
        "endorsement": endorsement,
    }
    data = canonical_dumps(value, what="evidence bundle", error=EvidenceFormatError)
    if len(data) > MAX_BUNDLE_SIZE:
        raise EvidenceFormatError(
            f"evidence bundle: at most {MAX_BUNDLE_SIZE} bytes, got {len(data)}"
        )
    return data


def _encode_endorsement(endorsement: Endorsement) -> dict[str, Any]:
    entry = endorsement.signed.entry()
    _check_bytes("endorsement.entry", entry, 1, MAX_ENTRY_SIZE)
    return {
        "entry": entry,
        "origin": endorsement.origin,
        "index": endorsement.index,
        "inclusion_proof": list(endorsement.inclusion_proof),
        "checkpoint": endorsement.checkpoint,
    }


def _decode_endorsement(value: Any, parse_entry: Callable[[bytes], SignedStatement]) -> Endorsement:
    fields = _map(value, "endorsement", _ENDORSEMENT_KEYS)
    entry = _check_bytes("endorsement.entry", fields["entry"], 1, MAX_ENTRY_SIZE)
    origin = _check_text("endorsement.origin", fields["origin"], MAX_ORIGIN_SIZE)
    index = fields["index"]
    if type(index) is not int or not 0 <= index < 2**63:
        raise EvidenceFormatError(
            f"endorsement.index: expected uint < 2^63, got {_describe(index)}"
        )
    proof = fields["inclusion_proof"]
    if type(proof) is not list or len(proof) > MAX_PROOF_HASHES:
        raise EvidenceFormatError(
            f"endorsement.inclusion_proof: expected an array of at most {MAX_PROOF_HASHES}"
            f" hashes, got {_describe(proof)}"
        )
    hashes = tuple(
        _check_bytes(f"endorsement.inclusion_proof[{i}]", h, HASH_SIZE, HASH_SIZE)
        for i, h in enumerate(proof)
    )
    checkpoint = _check_text("endorsement.checkpoint", fields["checkpoint"], MAX_CHECKPOINT_SIZE)
    try:
        signed = parse_entry(entry)
    except MalformedInputError as exc:
        raise EvidenceFormatError(f"endorsement.entry: {exc}") from None
    except HermeticError as exc:  # a well-formed entry cannot fail otherwise; stay typed
        raise EvidenceFormatError(f"endorsement.entry: {type(exc).__name__}: {exc}") from None
    return Endorsement(signed, origin, index, hashes, checkpoint)


def _map(value: Any, what: str, keys: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EvidenceFormatError(f"{what}: expected a map, got {_describe(value)}")
    found = set()
    for key in value:
        if type(key) is not str:
            raise EvidenceFormatError(f"{what}: expected text keys, got {_describe(key)}")
        found.add(key)
    missing = sorted(keys - found)
    if missing:
        raise EvidenceFormatError(f"{what}: missing key(s) {', '.join(missing)}")
    extra = sorted(found - keys)
    if extra:
        shown = ", ".join(repr(k[:40]) for k in extra[:5])
        raise EvidenceFormatError(f"{what}: unexpected key(s) {shown}")
    return value


def _check_bytes(what: str, value: Any, low: int, high: int) -> bytes:
    if type(value) is not bytes:
        raise EvidenceFormatError(f"{what}: expected bstr, got {_describe(value)}")
    if not low <= len(value) <= high:
        expected = f"{low}" if low == high else f"{low}..{high}"
        raise EvidenceFormatError(f"{what}: expected {expected} bytes, got {len(value)}")
    return value


def _check_text(what: str, value: Any, high: int) -> str:
    if type(value) is not str:
        raise EvidenceFormatError(f"{what}: expected tstr, got {_describe(value)}")
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if not 1 <= size <= high:
        raise EvidenceFormatError(f"{what}: expected 1..{high} bytes of text, got {size}")
    return value


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, cbor2.CBORTag):
        return f"tag {value.tag}"
    if isinstance(value, bytes):
        return f"bstr of {len(value)} bytes"
    if isinstance(value, str):
        return f"tstr of {len(value)} chars"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return f"int {value}" if abs(value) < 2**64 else "big int"
    if isinstance(value, list | tuple):
        return f"array of {len(value)}"
    if isinstance(value, dict):
        return f"map of {len(value)}"
    return type(value).__name__


# --- the server side ------------------------------------------------------------------------


def make_evidence_provider(
    nsm_client: Attester,
    endorsement: Endorsement | None,
    config_digest: bytes | None,
) -> Callable[[bytes, bytes], bytes]:
    """The session's ``make_evidence(handshake_hash, local_static_public) -> bundle``.

    Every call asks the NSM for a **fresh** document whose ``nonce`` is this session's
    handshake hash and whose ``public_key`` is our static Noise key, so a bundle is valid
    for exactly one session. The endorsement and config digest are fixed for the enclave's
    lifetime, so they are checked, and the user_data and the endorsement's encoding (its
    log entry is canonical JSON that would otherwise be rebuilt per handshake) made, once,
    here.
    """
    data = user_data(config_digest)
    EvidenceBundle(b"\x00", config_digest, endorsement).encode()  # reject bad input now
    encoded = _encode_endorsement(endorsement) if endorsement is not None else None

    def make_evidence(handshake_hash: bytes, local_static_public: bytes) -> bytes:
        document = nsm_client.attest(
            user_data=data, nonce=bytes(handshake_hash), public_key=bytes(local_static_public)
        )
        return _encode_bundle(document, config_digest, encoded)

    return make_evidence
