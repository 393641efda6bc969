"""Offline verification of real Sigstore/Rekor transparency-log entries (bundle v0.3 JSON).

Publishing to public Rekor is optional for hermetic, but a relying party must be able to
check a Rekor entry it is handed without calling Rekor: that the entry's body is what the
leaf hash covers, that the leaf is included under the root of a checkpoint signed by a log
key from the Sigstore trusted root, and (Rekor v1) that the signed entry timestamp (SET)
verifies. Both generations are handled:

* Rekor v1: ECDSA P-256 log key; checkpoint origin ``<host> - <tree ID>`` signed by key
  name ``<host>`` with key hint ``SHA-256(DER SPKI)[:4]``; the inclusion proof uses the
  shard-local ``inclusionProof.logIndex``; SET over the RFC 8785 JSON of
  ``{body, integratedTime, logID (hex), logIndex (global)}``.
* Rekor v2 (rekor-tiles): Ed25519 log key; C2SP checkpoint whose origin is the host and
  ``logId.keyId = SHA-256(origin || 0x0A || 0x01 || public key)``; no SET.

sigstore-python can do this only through private APIs and is not in the lock, hence this
small, strict module built on :mod:`.merkle`, :mod:`.note` and :mod:`.checkpoint`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from hermetic import jsontext
from hermetic.errors import RekorEntryError, RekorFormatError
from hermetic.translog.checkpoint import open_checkpoint
from hermetic.translog.merkle import HASH_SIZE, leaf_hash, verify_inclusion
from hermetic.translog.note import (
    ALG_ED25519,
    EcdsaNoteVerifier,
    Ed25519NoteVerifier,
    NoteVerifier,
    b64decode_strict,
    key_id,
)


@dataclass(frozen=True)
class RekorEntry:
    """A verified Rekor entry: where it sits in which log, and what it says."""

    log_index: int
    """The index the inclusion proof was checked at (shard-local for Rekor v1)."""
    tree_size: int
    root: bytes
    origin: str
    global_log_index: int
    integrated_time: int | None
    kind: str
    version: str
    body: bytes


# --- small typed accessors over protobuf-JSON -----------------------------------------------


def _field(obj: Any, name: str, kind: type, where: str) -> Any:
    if not isinstance(obj, Mapping) or name not in obj:
        raise RekorFormatError(f"{where}.{name} is missing")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RekorFormatError(f"{where}.{name} must be {kind.__name__}")
    return value


def _int(obj: Any, name: str, where: str) -> int:
    """protobuf-JSON int64: a decimal string (or a JSON number)."""
    if not isinstance(obj, Mapping) or name not in obj:
        raise RekorFormatError(f"{where}.{name} is missing")
    value = obj[name]
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif (
        isinstance(value, str)
        and value.isascii()
        and value.isdigit()
        and (value == "0" or not value.startswith("0"))
    ):
        number = int(value)
    else:
        raise RekorFormatError(f"{where}.{name} must be a non-negative decimal integer")
    if not 0 <= number < 1 << 63:
        raise RekorFormatError(f"{where}.{name} is out of range")
    return number


def _b64(obj: Any, name: str, where: str) -> bytes:
    return b64decode_strict(_field(obj, name, str, where), f"{where}.{name}", RekorFormatError)


def _load_json(value: str | bytes | Mapping[str, Any], what: str) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    data = jsontext.loads(value, what=what, error=RekorFormatError)
    if not isinstance(data, Mapping):
        raise RekorFormatError(f"{what} must be a JSON object")
    return data


# --- RFC 8785 -----------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) serialization for the JSON subset Rekor uses (no floats).

    Written here because no RFC 8785 library is in the lock: keys sorted by UTF-16 code
    units, no whitespace, ES6 string escaping (which ``json.dumps`` with
    ``ensure_ascii=False`` matches for strings).
    """
    return _jcs(value).encode("utf-8")


def _jcs(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        if abs(value) > 2**53 - 1:
            raise RekorFormatError("integer outside the I-JSON range in canonical JSON")
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(_jcs(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: str(kv[0]).encode("utf-16-be"))
        return "{" + ",".join(_jcs(str(k)) + ":" + _jcs(v) for k, v in items) + "}"
    raise RekorFormatError(f"{type(value).__name__} cannot appear in canonical JSON")


# --- trusted root ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TransparencyLogKey:
    """One ``tlogs[]`` entry of a Sigstore trusted root."""

    host: str
    log_id: bytes
    spki_der: bytes
    key_details: str


def trusted_logs(trusted_root: str | bytes | Mapping[str, Any]) -> list[TransparencyLogKey]:
    """The transparency-log keys of a Sigstore trusted root (``trusted_root.json``)."""
    root = _load_json(trusted_root, "trusted root")
    tlogs = root.get("tlogs")
    if not isinstance(tlogs, list):
        raise RekorFormatError("trusted root has no tlogs list")
    out = []
    for i, tlog in enumerate(tlogs):
        where = f"tlogs[{i}]"
        host = urlsplit(_field(tlog, "baseUrl", str, where)).hostname
        if not host:
            raise RekorFormatError(f"{where}.baseUrl has no host")
        public_key = _field(tlog, "publicKey", Mapping, where)
        spki = _b64(public_key, "rawBytes", f"{where}.publicKey")
        details = _field(public_key, "keyDetails", str, f"{where}.publicKey")
        log_id = _b64(_field(tlog, "logId", Mapping, where), "keyId", f"{where}.logId")
        out.append(TransparencyLogKey(host, log_id, spki, details))
    return out


def _log_verifier(log: TransparencyLogKey) -> tuple[NoteVerifier, bool]:
    """The checkpoint verifier for a log key, and whether it is a v2 (C2SP) log."""
    try:
        key = serialization.load_der_public_key(log.spki_der)
    except (ValueError, TypeError):
        raise RekorFormatError(f"log key for {log.host} is not a DER public key") from None
    if log.key_details == "PKIX_ED25519" and isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes_raw()
        if log.log_id != hashlib.sha256(log.host.encode() + b"\n\x01" + raw).digest():
            raise RekorEntryError(f"log ID of {log.host} is not its C2SP key ID")
        return Ed25519NoteVerifier(log.host, raw, key_id(log.host, ALG_ED25519, raw)), True
    if log.key_details.startswith("PKIX_ECDSA_") and isinstance(key, ec.EllipticCurvePublicKey):
        if log.log_id != hashlib.sha256(log.spki_der).digest():
            raise RekorEntryError(f"log ID of {log.host} is not SHA-256 of its key")
        return EcdsaNoteVerifier(log.host, log.spki_der), False
    raise RekorEntryError(f"unsupported log key type {log.key_details} for {log.host}")


# --- verification ---------------------------------------------------------------------------


def verify_rekor_entry(
    bundle_json: str | bytes | Mapping[str, Any],
    trusted_root_json: str | bytes | Mapping[str, Any],
    *,
    entry: int = 0,
) -> RekorEntry:
    """Verify ``verificationMaterial.tlogEntries[entry]`` of a Sigstore bundle offline.

    Checks: the log is in the trusted root; the leaf hash is the hash of the
    canonicalized body (which must be RFC 8785 canonical, of the declared kind and
    version, and about this bundle's digest and signature); the checkpoint is signed by
    the log key with the log's origin and matches the proof's root and size; the
    inclusion proof verifies; the SET verifies when present (Rekor v1). Raises
    :class:`RekorFormatError` for unreadable input and :class:`RekorEntryError` (or a
    more precise translog error) for a failed check.
    """
    try:
        return _verify(bundle_json, trusted_root_json, entry)
    except RecursionError:
        raise RekorFormatError("bundle JSON is nested too deeply") from None


def _verify(
    bundle_json: str | bytes | Mapping[str, Any],
    trusted_root_json: str | bytes | Mapping[str, Any],
    entry_number: int,
) -> RekorEntry:
    bundle = _load_json(bundle_json, "bundle")
    material = _field(bundle, "verificationMaterial", Mapping, "bundle")
    entries = _field(material, "tlogEntries", list, "verificationMaterial")
    if not 0 <= entry_number < len(entries):
        raise RekorFormatError(f"bundle has {len(entries)} tlog entries, not {entry_number + 1}")
    tle = entries[entry_number]
    where = f"tlogEntries[{entry_number}]"

    log_id = _b64(_field(tle, "logId", Mapping, where), "keyId", f"{where}.logId")
    logs = [log for log in trusted_logs(trusted_root_json) if log.log_id == log_id]
    if not logs:
        raise RekorEntryError(f"{where}.logId {log_id.hex()} is not a log in the trusted root")
    log = logs[0]
    verifier, is_v2 = _log_verifier(log)

    kind_version = _field(tle, "kindVersion", Mapping, where)
    kind = _field(kind_version, "kind", str, f"{where}.kindVersion")
    version = _field(kind_version, "version", str, f"{where}.kindVersion")
    body = _b64(tle, "canonicalizedBody", where)
    _check_body(body, kind, version, bundle.get("messageSignature"))

    proof = _field(tle, "inclusionProof", Mapping, where)
    pwhere = f"{where}.inclusionProof"
    index = _int(proof, "logIndex", pwhere)
    tree_size = _int(proof, "treeSize", pwhere)
    root = _b64(proof, "rootHash", pwhere)
    hashes_b64 = _field(proof, "hashes", list, pwhere)
    path = [
        b64decode_strict(h, f"{pwhere}.hashes[{i}]", RekorFormatError)
        if isinstance(h, str)
        else _bad(f"{pwhere}.hashes[{i}] must be a string")
        for i, h in enumerate(hashes_b64)
    ]
    envelope = _field(_field(proof, "checkpoint", Mapping, pwhere), "envelope", str, pwhere)

    checked = open_checkpoint(envelope, verifier, origin=_origin_of(envelope, log.host, is_v2))
    if checked.root_hash != root or len(root) != HASH_SIZE:
        raise RekorEntryError(
            f"{pwhere}.rootHash {root.hex()} is not the checkpoint root {checked.root_hash.hex()}"
        )
    if checked.size != tree_size:
        raise RekorEntryError(
            f"{pwhere}.treeSize {tree_size} is not the checkpoint size {checked.size}"
        )
    verify_inclusion(leaf_hash(body), index, checked.size, path, checked.root_hash)

    global_index = _int(tle, "logIndex", where)
    integrated_time: int | None = None
    promise = tle.get("inclusionPromise")
    if promise is not None:
        integrated_time = _int(tle, "integratedTime", where)
        set_sig = _b64(promise, "signedEntryTimestamp", f"{where}.inclusionPromise")
        _verify_set(log, body, integrated_time, global_index, set_sig)
    elif global_index != index:
        # Without a SET nothing signs the global index; for a single-tree (v2) log it is
        # the proof's index, so anything else is a tampered or mislabeled entry.
        raise RekorEntryError(
            f"{where}.logIndex {global_index} differs from {pwhere}.logIndex {index} "
            "and no SET covers it"
        )
    return RekorEntry(
        log_index=index,
        tree_size=checked.size,
        root=checked.root_hash,
        origin=checked.origin,
        global_log_index=global_index,
        integrated_time=integrated_time,
        kind=kind,
        version=version,
        body=body,
    )


def _bad(message: str) -> bytes:
    raise RekorFormatError(message)


def _origin_of(envelope: str, host: str, is_v2: bool) -> str:
    """The origin the checkpoint must carry: the host (v2) or ``<host> - <tree ID>`` (v1)."""
    if is_v2:
        return host
    first = envelope.split("\n", 1)[0]
    prefix = f"{host} - "
    tree_id = first[len(prefix) :]
    if first.startswith(prefix) and tree_id.isascii() and tree_id.isdigit():
        return first
    raise RekorEntryError(f"checkpoint origin {first!r} is not '{host} - <tree ID>'")


_V1_ALGORITHMS = {"sha256": "SHA2_256", "sha384": "SHA2_384", "sha512": "SHA2_512"}


def _check_body(body: bytes, kind: str, version: str, message_signature: Any) -> None:
    parsed = jsontext.loads(body, what="canonicalizedBody", error=RekorFormatError)
    if canonical_json(parsed) != body:
        raise RekorEntryError("canonicalizedBody is not RFC 8785 canonical JSON")
    if not isinstance(parsed, Mapping):
        raise RekorFormatError("canonicalizedBody must be a JSON object")
    if parsed.get("kind") != kind or parsed.get("apiVersion") != version:
        raise RekorEntryError(
            f"body is {parsed.get('kind')!r} {parsed.get('apiVersion')!r}, "
            f"kindVersion says {kind!r} {version!r}"
        )
    if kind != "hashedrekord" or message_signature is None:
        return
    message_digest = _field(message_signature, "messageDigest", Mapping, "messageSignature")
    digest = _b64(message_digest, "digest", "messageSignature.messageDigest")
    algorithm = _field(message_digest, "algorithm", str, "messageSignature.messageDigest")
    signature = _b64(message_signature, "signature", "messageSignature")
    try:
        spec = parsed["spec"]
        if version == "0.0.1":
            body_digest = bytes.fromhex(spec["data"]["hash"]["value"])
            body_alg = _V1_ALGORITHMS.get(spec["data"]["hash"]["algorithm"], "?")
            body_sig = base64.b64decode(spec["signature"]["content"], validate=True)
        elif version == "0.0.2":
            inner = spec["hashedRekordV002"]
            body_digest = base64.b64decode(inner["data"]["digest"], validate=True)
            body_alg = inner["data"]["algorithm"]
            body_sig = base64.b64decode(inner["signature"]["content"], validate=True)
        else:
            raise RekorEntryError(f"unsupported hashedrekord version {version!r}")
    except (KeyError, TypeError, ValueError):
        raise RekorFormatError(f"hashedrekord {version} body lacks digest or signature") from None
    if body_alg != algorithm:
        raise RekorEntryError(
            f"logged digest algorithm {body_alg!r} is not the bundle's {algorithm!r}"
        )
    if body_digest != digest:
        raise RekorEntryError("logged digest is not the bundle's messageDigest")
    if body_sig != signature:
        raise RekorEntryError("logged signature is not the bundle's messageSignature")


def _verify_set(
    log: TransparencyLogKey, body: bytes, integrated_time: int, log_index: int, sig: bytes
) -> None:
    payload = canonical_json(
        {
            "body": base64.b64encode(body).decode(),
            "integratedTime": integrated_time,
            "logID": log.log_id.hex(),
            "logIndex": log_index,
        }
    )
    key = serialization.load_der_public_key(log.spki_der)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, payload)
        else:  # pragma: no cover - _log_verifier admits only these two
            raise RekorEntryError(f"cannot verify a SET with a {log.key_details} key")
    except (InvalidSignature, ValueError):
        raise RekorEntryError(
            f"signed entry timestamp does not verify for log index {log_index}"
        ) from None


__all__ = [
    "RekorEntry",
    "TransparencyLogKey",
    "canonical_json",
    "trusted_logs",
    "verify_rekor_entry",
]
