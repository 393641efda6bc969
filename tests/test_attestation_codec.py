"""The attestation codec against the real Nitro documents in vectors/nitro."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cbor2
import pytest

from hermetic.attestation import (
    PROTECTED_ES384,
    AttestationDocument,
    decode,
    decode_cose_sign1,
    decode_payload,
    encode_cose_sign1,
    encode_payload,
    sig_structure,
)
from hermetic.errors import AttestationFormatError, MalformedInputError

VECTOR_NAMES = [
    "evervault-1",
    "evervault-2",
    "evervault-3",
    "evervault-5",
    "libsignal-1",
    "libsignal-2",
    "nitrite-blocky-1",
    "fastcrypto-1",
]


def _read(vectors: Path, name: str) -> bytes:
    return (vectors / "nitro" / f"{name}.cbor").read_bytes()


def test_every_vector_file_is_covered(vectors: Path) -> None:
    on_disk = sorted(p.stem for p in (vectors / "nitro").glob("*.cbor"))
    assert on_disk == sorted(VECTOR_NAMES)


def test_sig_structure_matches_libsignal_vector_byte_for_byte(vectors: Path) -> None:
    cose, _ = decode(_read(vectors, "libsignal-1"))
    expected = (vectors / "nitro" / "libsignal-1.sig_structure.bin").read_bytes()
    assert sig_structure(cose.protected, cose.payload) == expected


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_payload_reencodes_byte_for_byte(vectors: Path, name: str) -> None:
    data = _read(vectors, name)
    cose = decode_cose_sign1(data)
    assert cose.payload[0] == 0xA9  # all stored vectors use a definite map
    assert encode_payload(decode_payload(cose.payload)) == cose.payload


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_untagged_cose_sign1_reencodes_byte_for_byte(vectors: Path, name: str) -> None:
    data = _read(vectors, name)
    cose = decode_cose_sign1(data)
    assert not cose.tagged
    assert cose.protected == PROTECTED_ES384
    assert encode_cose_sign1(cose.payload, cose.signature) == data


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_tagged_document_decodes_to_the_same_document(vectors: Path, name: str) -> None:
    data = _read(vectors, name)
    cose, doc = decode(data)
    tagged_cose, tagged_doc = decode(b"\xd2" + data)
    assert tagged_cose.tagged
    assert tagged_doc == doc
    assert (tagged_cose.payload, tagged_cose.signature) == (cose.payload, cose.signature)


def _indefinite_payload(doc: AttestationDocument) -> bytes:
    """The same fields as the real document, in NSM order, inside a bf ... ff map."""
    definite = encode_payload(doc)
    assert definite[0] == 0xA9
    return b"\xbf" + definite[1:] + b"\xff"


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_indefinite_length_payload_decodes_to_the_same_document(vectors: Path, name: str) -> None:
    _, doc = decode(_read(vectors, name))
    assert decode_payload(_indefinite_payload(doc)) == doc


def test_fields_match_libsignal_vector(vectors: Path) -> None:
    _, doc = decode(_read(vectors, "libsignal-1"))
    assert doc.module_id == "i-09b153b9b6859a1de-enc01882b95cd0e8a90"
    assert doc.digest == "SHA384"
    assert doc.timestamp == 1684358511808
    assert list(doc.pcrs) == list(range(16))
    assert len(doc.cabundle) == 4
    assert len(doc.public_key or b"") == 32
    assert len(doc.user_data or b"") == 19
    assert doc.nonce is None
    assert doc.debug


def test_blocky_vector_carries_1024_bytes_in_each_optional_field(vectors: Path) -> None:
    _, doc = decode(_read(vectors, "nitrite-blocky-1"))
    assert doc.public_key == doc.user_data == doc.nonce == b"\x01" * 1024
    assert not doc.debug


def test_pcrs_are_read_only(vectors: Path) -> None:
    _, doc = decode(_read(vectors, "evervault-1"))
    with pytest.raises(TypeError):
        doc.pcrs[0] = b"\x00" * 48  # type: ignore[index]


def _payload_with(vectors: Path, **changes: object) -> bytes:
    """The evervault-1 payload re-encoded with cbor2 after replacing some fields."""
    cose = decode_cose_sign1(_read(vectors, "evervault-1"))
    fields = cbor2.loads(cose.payload)
    for key, value in changes.items():
        if value is _DROP:
            del fields[key]
        else:
            fields[key] = value
    return cbor2.dumps(fields)


_DROP = object()


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"user_data": b"u" * 1025}, "user_data: expected 0..1024 bytes, got 1025"),
        ({"nonce": b"n" * 1025}, "nonce"),
        ({"public_key": b"k" * 1025}, "public_key"),
        ({"user_data": "text"}, "user_data: expected bstr, got tstr"),
        ({"pcrs": {0: b"\x00" * 47}}, "pcrs[0]: expected 32, 48 or 64 bytes, got 47"),
        ({"pcrs": {32: b"\x00" * 48}}, "pcrs: expected index 0..31, got 32"),
        ({"pcrs": {-1: b"\x00" * 48}}, "pcrs: expected index 0..31, got -1"),
        ({"pcrs": {"0": b"\x00" * 48}}, "pcrs: expected index 0..31, got tstr"),
        ({"pcrs": {}}, "pcrs: expected 1..32 entries, got 0"),
        ({"pcrs": {i: b"\x00" * 48 for i in range(33)}}, "pcrs"),
        ({"pcrs": [b"\x00" * 48]}, "pcrs: expected map, got array"),
        ({"digest": "SHA256"}, "digest: expected 'SHA384'"),
        ({"timestamp": 0}, "timestamp: expected 1.."),
        ({"timestamp": -5}, "timestamp"),
        ({"timestamp": 1.5}, "timestamp: expected uint, got float"),
        ({"timestamp": True}, "timestamp: expected uint, got bool"),
        ({"module_id": ""}, "module_id: expected 1.."),
        ({"module_id": b"bytes"}, "module_id: expected tstr, got bstr"),
        ({"certificate": b""}, "certificate: expected 1..1024 bytes, got 0"),
        ({"certificate": b"c" * 1025}, "certificate: expected 1..1024 bytes, got 1025"),
        ({"cabundle": []}, "cabundle: expected 1..16 entries, got 0"),
        ({"cabundle": [b""]}, "cabundle[0]: expected 1..1024 bytes, got 0"),
        ({"cabundle": b"root"}, "cabundle: expected array, got bstr"),
        ({"cabundle": _DROP}, "missing required field cabundle"),
        ({"module_id": None}, "module_id: expected a value, got null"),
        ({"extra": 1}, "unexpected key 'extra'"),
    ],
)
def test_rejects_malformed_payload_field(
    vectors: Path, changes: dict[str, object], needle: str
) -> None:
    with pytest.raises(AttestationFormatError) as info:
        decode_payload(_payload_with(vectors, **changes))
    assert needle in str(info.value)
    assert isinstance(info.value, MalformedInputError)


def test_absent_optional_keys_mean_none(vectors: Path) -> None:
    doc = decode_payload(_payload_with(vectors, public_key=_DROP, user_data=_DROP, nonce=_DROP))
    assert (doc.public_key, doc.user_data, doc.nonce) == (None, None, None)


def test_empty_user_data_is_not_absent(vectors: Path) -> None:
    doc = decode_payload(_payload_with(vectors, user_data=b""))
    assert doc.user_data == b""
    assert b"\x69user_data\x40\x65nonce" + _bstr_head(256) in encode_payload(doc)


def _bstr_head(n: int) -> bytes:
    return b"\x59" + n.to_bytes(2, "big")


def test_rejects_duplicate_payload_keys(vectors: Path) -> None:
    payload = decode_cose_sign1(_read(vectors, "evervault-1")).payload
    doubled = b"\xaa" + payload[1:] + b"\x65nonce\xf6"
    with pytest.raises(AttestationFormatError, match=r"not valid CBOR \(duplicate map key\)$"):
        decode_payload(doubled)


def _cose(protected: object = PROTECTED_ES384, signature: object = b"s" * 96) -> list[object]:
    return [protected, {}, b"\xa0", signature]


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        (_cose(protected=bytes.fromhex("a10126")), "expected a1013822 (alg ES384), got a10126"),
        (_cose(protected=bytes.fromhex("a1013823")), "protected header"),
        (_cose(protected={1: -35}), "protected header: expected bstr, got map"),
        (_cose(signature=b"s" * 95), "signature: expected 96..96 bytes, got 95"),
        (_cose(signature=b"s" * 97), "signature"),
        (_cose()[:3], "expected array of 4, got array of 3"),
        ({"a": 1}, "expected array of 4, got map"),
        (cbor2.CBORTag(17, _cose()), "expected COSE_Sign1 tag 18 or no tag, got tag 17"),
        (cbor2.CBORTag(98, _cose()), "got tag 98"),
        ([PROTECTED_ES384, [], b"\xa0", b"s" * 96], "unprotected header: expected map"),
        ([PROTECTED_ES384, {}, b"", b"s" * 96], "payload: expected 1..16384 bytes, got 0"),
    ],
)
def test_rejects_malformed_cose_envelope(item: object, needle: str) -> None:
    with pytest.raises(AttestationFormatError) as info:
        decode_cose_sign1(cbor2.dumps(item))
    assert needle in str(info.value)


def test_rejects_trailing_bytes_after_document(vectors: Path) -> None:
    with pytest.raises(AttestationFormatError, match="1 trailing byte"):
        decode(_read(vectors, "evervault-1") + b"\x00")


def test_rejects_oversize_document_before_parsing() -> None:
    with pytest.raises(AttestationFormatError, match=r"expected 1\.\.16384 bytes, got 16385"):
        decode(b"\x84" + b"\x00" * 16384)


def test_rejects_deeply_nested_cbor_without_recursing() -> None:
    with pytest.raises(AttestationFormatError, match="not valid CBOR"):
        decode(b"\x81" * 10_000 + b"\x00")


def test_rejects_truncated_document(vectors: Path) -> None:
    data = _read(vectors, "evervault-1")
    with pytest.raises(AttestationFormatError, match="not valid CBOR"):
        decode(data[:-1])


def test_semantic_tags_are_not_interpreted(vectors: Path) -> None:
    # A bignum (tag 2) where hardware writes a plain uint is rejected, not coerced.
    with pytest.raises(AttestationFormatError, match="timestamp: expected uint, got tag 2"):
        decode_payload(_payload_with(vectors, timestamp=cbor2.CBORTag(2, b"\x01\x00")))


def test_shared_references_cannot_build_cycles() -> None:
    cyclic = b"\xd8\x1c\x84\xd8\x1d\x00\xa0\x41\x00\x58\x60" + b"\x00" * 96
    with pytest.raises(AttestationFormatError):
        decode(cyclic)


def test_constructor_validates_like_the_decoder(vectors: Path) -> None:
    _, doc = decode(_read(vectors, "evervault-1"))
    with pytest.raises(AttestationFormatError, match="pcrs\\[3\\]"):
        dataclasses.replace(doc, pcrs={3: b"\x01" * 47})
    rebuilt = dataclasses.replace(doc, pcrs=dict(reversed(list(doc.pcrs.items()))))
    assert list(rebuilt.pcrs) == sorted(doc.pcrs)
    assert encode_payload(rebuilt) == encode_payload(doc)


def test_encoder_writes_small_timestamp_as_eight_bytes(vectors: Path) -> None:
    _, doc = decode(_read(vectors, "evervault-1"))
    small = dataclasses.replace(doc, timestamp=5)
    encoded = encode_payload(small)
    assert b"\x69timestamp\x1b\x00\x00\x00\x00\x00\x00\x00\x05" in encoded
    assert decode_payload(encoded) == small


def test_debug_flag_follows_pcr0(vectors: Path) -> None:
    _, doc = decode(_read(vectors, "libsignal-2"))
    assert not doc.debug
    zero = dataclasses.replace(doc, pcrs={**doc.pcrs, 0: bytes(48)})
    assert zero.debug
    no_pcr0 = dataclasses.replace(doc, pcrs={k: v for k, v in doc.pcrs.items() if k})
    assert no_pcr0.debug
