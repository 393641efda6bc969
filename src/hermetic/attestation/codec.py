"""Byte-level codec for Nitro attestation documents (COSE_Sign1 around a CBOR map).

Why this module exists: the attestation document is the evidence every relying party
checks, so its parser is the first thing an attacker talks to. It has to accept exactly
what real Nitro hardware emits (untagged *or* tagged COSE_Sign1, definite *or* indefinite
payload map, CBOR ``null`` for absent optional fields, 1024-byte user_data / nonce /
public_key) and reject everything else with an :class:`AttestationFormatError` that names
the offending field, without hanging or exhausting memory on hostile input.

It also encodes, byte-faithfully to the real NSM (definite map ``a9``, fields in NSM
declaration order, nulls for absent fields, 8-byte timestamp, ascending PCR keys), so the
emulated NSM produces documents indistinguishable in shape from hardware ones.

cbor2 does the CBOR parsing, through :func:`hermetic.cbor.strict_loads` (one item, no
semantic tags, bounded depth, no duplicate keys); this module only adds the structure and
limits of the Nitro format on top, and assembles the few headers cbor2 would otherwise
encode minimally (the timestamp is always ``1b`` + 8 bytes on hardware).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import cbor2

from hermetic.cbor import strict_loads
from hermetic.errors import AttestationFormatError

#: The only protected header accepted and emitted: CBOR ``{1: -35}`` (alg = ES384).
PROTECTED_ES384: bytes = bytes.fromhex("a1013822")

#: Whole-document bound, checked before any parsing (SDK-C reserves 16 KiB for a document;
#: the largest real one is 7.5 KB). Bounds memory and time on hostile input.
MAX_DOCUMENT_SIZE = 16 * 1024
#: COSE payload bound (NSM CDDL: ``payload bstr .size (1..16384)``).
MAX_PAYLOAD_SIZE = 16 * 1024
#: ES384 raw signature: r || s, 48 bytes each.
SIGNATURE_SIZE = 96
#: Each of user_data, nonce and public_key: real NSMs accept 1024 bytes for all three.
MAX_OPTIONAL_FIELD_SIZE = 1024
#: certificate and every cabundle entry: 1..1024 bytes of DER.
MAX_CERTIFICATE_SIZE = 1024
MAX_CABUNDLE_ENTRIES = 16
PCR_VALUE_SIZES = frozenset({32, 48, 64})
MAX_PCR_INDEX = 31
MAX_PCR_COUNT = 32
MAX_MODULE_ID_LENGTH = 256
#: 9999-12-31T23:59:59.999Z; keeps every timestamp convertible to a ``datetime``.
MAX_TIMESTAMP_MS = 253_402_300_799_999
_COSE_SIGN1_TAG = 18

# NSM declaration order (serde_cbor writes struct fields in this order, unsorted).
FIELD_ORDER: tuple[str, ...] = (
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
)
_REQUIRED = frozenset(FIELD_ORDER[:6])


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, cbor2.CBORTag):
        return f"tag {value.tag}"
    return {
        bool: "bool",
        int: "uint/nint",
        bytes: "bstr",
        str: "tstr",
        list: "array",
        tuple: "array",
        dict: "map",
        cbor2.frozendict: "map",
        float: "float",
    }.get(type(value), type(value).__name__)


def _check_bytes(name: str, value: object, low: int, high: int) -> bytes:
    if type(value) is not bytes:
        raise AttestationFormatError(f"{name}: expected bstr, got {_type_name(value)}")
    if not low <= len(value) <= high:
        raise AttestationFormatError(
            f"{name}: expected {low}..{high} bytes, got {len(value)} bytes"
        )
    return value


def _check_optional(name: str, value: object) -> bytes | None:
    if value is None:
        return None
    return _check_bytes(name, value, 0, MAX_OPTIONAL_FIELD_SIZE)


@dataclass(frozen=True)
class AttestationDocument:
    """The signed payload: what the NSM attests about the enclave (the *evidence*).

    Constructing one validates every field against the limits real hardware uses, so an
    instance is always encodable and always something a real NSM could have produced.
    ``pcrs`` is stored as a read-only mapping with ascending keys; ``cabundle`` is in
    document order ``[root, ..., instance]``.
    """

    module_id: str
    digest: str
    timestamp: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None

    def __post_init__(self) -> None:
        if type(self.module_id) is not str:
            raise AttestationFormatError(
                f"module_id: expected tstr, got {_type_name(self.module_id)}"
            )
        if not 1 <= len(self.module_id) <= MAX_MODULE_ID_LENGTH:
            raise AttestationFormatError(
                f"module_id: expected 1..{MAX_MODULE_ID_LENGTH} characters, "
                f"got {len(self.module_id)}"
            )
        if self.digest != "SHA384" or type(self.digest) is not str:
            raise AttestationFormatError(f"digest: expected 'SHA384', got {self.digest!r:.40}")
        if type(self.timestamp) is not int:
            raise AttestationFormatError(
                f"timestamp: expected uint, got {_type_name(self.timestamp)}"
            )
        if not 1 <= self.timestamp <= MAX_TIMESTAMP_MS:
            raise AttestationFormatError(
                f"timestamp: expected 1..{MAX_TIMESTAMP_MS} ms, got {self.timestamp}"
            )
        object.__setattr__(self, "pcrs", MappingProxyType(_check_pcrs(self.pcrs)))
        _check_bytes("certificate", self.certificate, 1, MAX_CERTIFICATE_SIZE)
        object.__setattr__(self, "cabundle", _check_cabundle(self.cabundle))
        for name in ("public_key", "user_data", "nonce"):
            _check_optional(name, getattr(self, name))

    @property
    def debug(self) -> bool:
        """True for a debug-mode enclave: PCR0 is all zeros (a missing PCR0 counts too)."""
        pcr0 = self.pcrs.get(0)
        return pcr0 is None or not any(pcr0)


def _check_pcrs(value: object) -> dict[int, bytes]:
    if type(value) is not dict and not isinstance(value, Mapping):  # (an ABC check is slow)
        raise AttestationFormatError(f"pcrs: expected map, got {_type_name(value)}")
    if not 1 <= len(value) <= MAX_PCR_COUNT:
        raise AttestationFormatError(f"pcrs: expected 1..{MAX_PCR_COUNT} entries, got {len(value)}")
    checked: dict[int, bytes] = {}
    for index, pcr in value.items():
        if type(index) is not int or not 0 <= index <= MAX_PCR_INDEX:
            shown = index if type(index) is int else _type_name(index)
            raise AttestationFormatError(f"pcrs: expected index 0..{MAX_PCR_INDEX}, got {shown}")
        if type(pcr) is not bytes:
            raise AttestationFormatError(f"pcrs[{index}]: expected bstr, got {_type_name(pcr)}")
        if len(pcr) not in PCR_VALUE_SIZES:
            raise AttestationFormatError(
                f"pcrs[{index}]: expected 32, 48 or 64 bytes, got {len(pcr)} bytes"
            )
        checked[index] = pcr
    return dict(sorted(checked.items()))


def _check_cabundle(value: object) -> tuple[bytes, ...]:
    if not isinstance(value, list | tuple):
        raise AttestationFormatError(f"cabundle: expected array, got {_type_name(value)}")
    if not 1 <= len(value) <= MAX_CABUNDLE_ENTRIES:
        raise AttestationFormatError(
            f"cabundle: expected 1..{MAX_CABUNDLE_ENTRIES} entries, got {len(value)}"
        )
    return tuple(
        _check_bytes(f"cabundle[{n}]", cert, 1, MAX_CERTIFICATE_SIZE)
        for n, cert in enumerate(value)
    )


@dataclass(frozen=True)
class CoseSign1:
    """The outer COSE_Sign1 structure; ``tagged`` records whether tag 18 was present."""

    protected: bytes
    payload: bytes
    signature: bytes
    tagged: bool = field(default=False)


def decode_cose_sign1(data: bytes) -> CoseSign1:
    """Parse a COSE_Sign1 (tagged 18 or untagged) carrying an ES384-signed payload."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AttestationFormatError(f"document: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not 1 <= len(data) <= MAX_DOCUMENT_SIZE:
        raise AttestationFormatError(
            f"document: expected 1..{MAX_DOCUMENT_SIZE} bytes, got {len(data)} bytes"
        )
    item = strict_loads(data, what="document", error=AttestationFormatError)
    tagged = False
    if isinstance(item, cbor2.CBORTag):
        if item.tag != _COSE_SIGN1_TAG:
            raise AttestationFormatError(
                f"document: expected COSE_Sign1 tag 18 or no tag, got tag {item.tag}"
            )
        item, tagged = item.value, True
    # cbor2 decodes the content of a tag immutably: arrays as tuples, maps as frozendicts.
    if type(item) not in (list, tuple) or len(item) != 4:
        shown = f"array of {len(item)}" if type(item) in (list, tuple) else _type_name(item)
        raise AttestationFormatError(f"COSE_Sign1: expected array of 4, got {shown}")
    protected, unprotected, payload, signature = item
    if type(protected) is not bytes:
        raise AttestationFormatError(
            f"COSE_Sign1 protected header: expected bstr, got {_type_name(protected)}"
        )
    if protected != PROTECTED_ES384:
        raise AttestationFormatError(
            f"COSE_Sign1 protected header: expected {PROTECTED_ES384.hex()} (alg ES384), "
            f"got {protected[:16].hex()}"
        )
    if not isinstance(unprotected, dict | cbor2.frozendict):
        raise AttestationFormatError(
            f"COSE_Sign1 unprotected header: expected map, got {_type_name(unprotected)}"
        )
    _check_bytes("COSE_Sign1 payload", payload, 1, MAX_PAYLOAD_SIZE)
    _check_bytes("COSE_Sign1 signature", signature, SIGNATURE_SIZE, SIGNATURE_SIZE)
    return CoseSign1(protected=protected, payload=payload, signature=signature, tagged=tagged)


def decode_payload(payload: bytes) -> AttestationDocument:
    """Parse the attestation document map (definite or indefinite length)."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise AttestationFormatError(f"payload: expected bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if not 1 <= len(payload) <= MAX_PAYLOAD_SIZE:
        raise AttestationFormatError(
            f"payload: expected 1..{MAX_PAYLOAD_SIZE} bytes, got {len(payload)} bytes"
        )
    fields = strict_loads(payload, what="payload", error=AttestationFormatError)
    if type(fields) is not dict:
        raise AttestationFormatError(f"payload: expected map, got {_type_name(fields)}")
    unknown = [key for key in fields if key not in FIELD_ORDER]
    if unknown:
        key = unknown[0]
        shown = repr(key)[:40] if type(key) in (str, int) else _type_name(key)
        raise AttestationFormatError(f"payload: unexpected key {shown}")
    missing = [name for name in FIELD_ORDER if name in _REQUIRED and name not in fields]
    if missing:
        raise AttestationFormatError(f"payload: missing required field {missing[0]}")
    # NSM CDDL: null would be "no value"; only the three optional fields may be null.
    for name in _REQUIRED:
        if fields[name] is None:
            raise AttestationFormatError(f"{name}: expected a value, got null")
    if type(fields["cabundle"]) is not list:
        raise AttestationFormatError(
            f"cabundle: expected array, got {_type_name(fields['cabundle'])}"
        )
    if type(fields["pcrs"]) is not dict:
        raise AttestationFormatError(f"pcrs: expected map, got {_type_name(fields['pcrs'])}")
    values: dict[str, Any] = {name: fields.get(name) for name in FIELD_ORDER}
    return AttestationDocument(**values)


def decode(data: bytes) -> tuple[CoseSign1, AttestationDocument]:
    """Parse a whole attestation document: the COSE envelope and its payload."""
    cose = decode_cose_sign1(data)
    return cose, decode_payload(cose.payload)


def _head(major: int, length: int) -> bytes:
    """A minimal-length CBOR head (what serde_cbor emits for lengths and small uints)."""
    if length < 24:
        return bytes([major << 5 | length])
    if length < 0x100:
        return bytes([major << 5 | 24, length])
    if length < 0x10000:
        return bytes([major << 5 | 25]) + struct.pack(">H", length)
    if length < 0x1_0000_0000:
        return bytes([major << 5 | 26]) + struct.pack(">I", length)
    return bytes([major << 5 | 27]) + struct.pack(">Q", length)


def _bstr(value: bytes) -> bytes:
    return _head(2, len(value)) + value


def _tstr(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _head(3, len(raw)) + raw


def _optional(value: bytes | None) -> bytes:
    return b"\xf6" if value is None else _bstr(value)


@functools.lru_cache(maxsize=64)
def _encode_pcrs(pcrs: tuple[tuple[int, bytes], ...]) -> bytes:
    return _head(5, len(pcrs)) + b"".join(_head(0, index) + _bstr(pcr) for index, pcr in pcrs)


@functools.lru_cache(maxsize=64)
def _encode_cabundle(cabundle: tuple[bytes, ...]) -> bytes:
    return _head(4, len(cabundle)) + b"".join(_bstr(c) for c in cabundle)


def encode_payload(doc: AttestationDocument) -> bytes:
    """Encode ``doc`` exactly as a real NSM does (see the module docstring).

    The PCR map and the cabundle are the same in every document a module signs until a
    PCR is extended, so their encodings are memoised (pure functions of their values).
    """
    values: dict[str, bytes] = {
        "module_id": _tstr(doc.module_id),
        "digest": _tstr(doc.digest),
        # Hardware always writes the timestamp as a full 8-byte uint.
        "timestamp": b"\x1b" + struct.pack(">Q", doc.timestamp),
        "pcrs": _encode_pcrs(tuple(sorted((i, bytes(p)) for i, p in doc.pcrs.items()))),
        "certificate": _bstr(doc.certificate),
        "cabundle": _encode_cabundle(tuple(bytes(c) for c in doc.cabundle)),
        "public_key": _optional(doc.public_key),
        "user_data": _optional(doc.user_data),
        "nonce": _optional(doc.nonce),
    }
    return _head(5, len(FIELD_ORDER)) + b"".join(_tstr(k) + values[k] for k in FIELD_ORDER)


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 8152 Sig_structure ``["Signature1", protected, h'', payload]``: what ES384 signs."""
    return b"\x84" + _tstr("Signature1") + _bstr(protected) + b"\x40" + _bstr(payload)


def encode_cose_sign1(payload: bytes, signature: bytes) -> bytes:
    """An untagged COSE_Sign1 as the NSM emits it: ``84 44a1013822 a0 <payload> <sig>``."""
    if len(signature) != SIGNATURE_SIZE:
        raise AttestationFormatError(
            f"COSE_Sign1 signature: expected {SIGNATURE_SIZE} bytes, got {len(signature)} bytes"
        )
    return b"\x84" + _bstr(PROTECTED_ES384) + b"\xa0" + _bstr(payload) + _bstr(signature)
