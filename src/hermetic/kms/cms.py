"""``CiphertextForRecipient``: the CMS envelope KMS wraps attested results in.

When a request carries ``Recipient`` (an attestation document with an RSA public key), AWS KMS
does not return the plaintext; it returns a BER-encoded CMS ``ContentInfo`` holding an
``EnvelopedData`` v2 with exactly one ``KeyTransRecipientInfo`` v2 (rid = 32-byte
subjectKeyIdentifier), the AES-256 content key wrapped with RSAES-OAEP (SHA-256, MGF1-SHA-256,
empty label) and the content encrypted with AES-256-CBC. The outer layers use indefinite
lengths and the encrypted content is either a constructed ``[0]`` of OCTET STRING chunks or a
primitive ``[0] IMPLICIT`` (both shapes occur in real KMS output; see
``vectors/nitro/aws-sdk-c-kms-cms-{1,2}.ber``).

This module parses that shape with ``asn1crypto`` (which reads BER and indefinite lengths;
``cryptography``'s pkcs7 support expects issuer-and-serial recipients and PKCS#1 v1.5, so it
does not fit) and enforces at least what the AWS Nitro Enclaves SDK for C requires, plus the
algorithm parameters and lengths that make decryption well defined. It also *builds* the same
shape for the local KMS server. The BER writer for the outer indefinite-length layers is hand
written: no maintained Python ASN.1 library emits indefinite lengths, and byte-faithfulness
to real KMS output is the point. Every inner element is DER from ``asn1crypto``.

Decryption uses ``cryptography`` and reports every failure (OAEP unwrap, key length, CBC
padding) as one :class:`~hermetic.errors.CMSDecryptionError` with one message, so a caller
relaying errors cannot become a padding oracle.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from asn1crypto import algos, cms, core
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hermetic.errors import CMSDecryptionError, CMSFormatError

__all__ = [
    "CiphertextForRecipient",
    "decrypt_for_recipient",
    "encrypt_for_recipient",
    "parse_ciphertext_for_recipient",
    "recipient_key_identifier",
]

_ENVELOPED_DATA_OID = "1.2.840.113549.1.7.3"
_DATA_OID = "1.2.840.113549.1.7.1"
_RSAES_OAEP_OID = "1.2.840.113549.1.1.7"
_MGF1_OID = "1.2.840.113549.1.1.8"
_SHA256_OID = "2.16.840.1.101.3.4.2.1"
_AES256_CBC_OID = "2.16.840.1.101.3.4.1.42"
_P_SPECIFIED_OID = "1.2.840.113549.1.1.9"

_AES_KEY_BYTES = 32
_BLOCK_BYTES = 16
_EOC = b"\x00\x00"
_MAX_INPUT = 1 << 20  # KMS results are small (at most a few KiB); refuse absurd inputs early

_DECRYPT_FAILED = "CiphertextForRecipient did not decrypt with the recipient private key"


@dataclass(frozen=True)
class CiphertextForRecipient:
    """The fields of a KMS ``CiphertextForRecipient`` envelope, as parsed or to be encoded."""

    recipient_key_id: bytes
    """rid: subjectKeyIdentifier (KMS: 32 bytes; hermetic: SHA-256 of the DER SPKI)."""
    encrypted_key: bytes
    """The AES-256 content key, wrapped with RSAES-OAEP-SHA256 to the recipient."""
    iv: bytes
    """The AES-256-CBC initialisation vector (16 bytes)."""
    encrypted_content: bytes
    """AES-256-CBC ciphertext of the result, PKCS#7 padded; chunks already concatenated."""
    content_constructed: bool
    """True for a constructed ``[0]`` of OCTET STRING chunks, False for primitive ``[0]``."""

    def encode(self) -> bytes:
        """BER bytes in the exact layout real KMS emits (indefinite outer lengths)."""
        # Built from DER pieces by hand: asn1crypto's object model costs ~3 ms per envelope
        # here (SET re-sorting, nested re-serialisation), ten times the RSA operation it
        # carries. The constant parts are asn1crypto DER computed once below; the tests
        # check the result is byte-identical to real KMS output and parses with asn1crypto.
        ktri = _tlv(
            0x30,
            _KTRI_VERSION
            + _tlv(0x80, self.recipient_key_id)
            + _OAEP_SHA256_DER
            + _tlv(0x04, self.encrypted_key),
        )
        content_algorithm = _tlv(0x30, _AES256_CBC_OID_DER + _tlv(0x04, self.iv))
        if self.content_constructed:
            content = b"\xa0\x80" + _tlv(0x04, self.encrypted_content) + _EOC
        else:
            content = _tlv(0x80, self.encrypted_content)
        encrypted_content_info = b"\x30\x80" + _DATA_OID_DER + content_algorithm + content + _EOC
        enveloped = (
            b"\x30\x80" + _ENVELOPED_VERSION + _tlv(0x31, ktri) + encrypted_content_info + _EOC
        )
        return b"\x30\x80" + _ENVELOPED_DATA_OID_DER + b"\xa0\x80" + enveloped + _EOC + _EOC


def recipient_key_identifier(public_key: rsa.RSAPublicKey) -> bytes:
    """The 32-byte rid hermetic's server writes: SHA-256 of the recipient's DER SPKI."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def encrypt_for_recipient(
    plaintext: bytes, public_key: rsa.RSAPublicKey, *, constructed: bool = True
) -> bytes:
    """Envelope ``plaintext`` to ``public_key`` as KMS does (fresh AES key and IV each call)."""
    key = os.urandom(_AES_KEY_BYTES)
    iv = os.urandom(_BLOCK_BYTES)
    padder = sym_padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    content = encryptor.update(padded) + encryptor.finalize()
    wrapped = public_key.encrypt(key, _oaep())
    return CiphertextForRecipient(
        recipient_key_id=recipient_key_identifier(public_key),
        encrypted_key=wrapped,
        iv=iv,
        encrypted_content=content,
        content_constructed=constructed,
    ).encode()


def decrypt_for_recipient(
    data: bytes | CiphertextForRecipient, private_key: rsa.RSAPrivateKey
) -> bytes:
    """Parse (if needed) and decrypt a ``CiphertextForRecipient`` with the recipient key.

    Raises :class:`CMSFormatError` for bytes that are not the KMS shape and one
    :class:`CMSDecryptionError` for any cryptographic failure.
    """
    envelope = (
        data if isinstance(data, CiphertextForRecipient) else parse_ciphertext_for_recipient(data)
    )
    try:
        key = private_key.decrypt(envelope.encrypted_key, _oaep())
    except ValueError:
        raise CMSDecryptionError(_DECRYPT_FAILED) from None
    if len(key) != _AES_KEY_BYTES:
        raise CMSDecryptionError(_DECRYPT_FAILED)
    decryptor = Cipher(algorithms.AES(key), modes.CBC(envelope.iv)).decryptor()
    padded = decryptor.update(envelope.encrypted_content) + decryptor.finalize()
    # cryptography's PKCS#7 unpadder checks the padding in constant time (Rust core).
    unpadder = sym_padding.PKCS7(128).unpadder()
    try:
        plaintext: bytes = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise CMSDecryptionError(_DECRYPT_FAILED) from None
    return plaintext


def parse_ciphertext_for_recipient(data: bytes) -> CiphertextForRecipient:
    """Parse KMS's BER ``CiphertextForRecipient``; raise :class:`CMSFormatError` otherwise."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CMSFormatError(f"CiphertextForRecipient: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise CMSFormatError("CiphertextForRecipient: empty input")
    if len(data) > _MAX_INPUT:
        raise CMSFormatError(
            f"CiphertextForRecipient: {len(data)} bytes, expected at most {_MAX_INPUT}"
        )
    content_info = _read("ContentInfo", lambda: cms.ContentInfo.load(data, strict=True))
    content_type = _read("ContentInfo.contentType", lambda: content_info["content_type"].dotted)
    _expect("ContentInfo.contentType", _ENVELOPED_DATA_OID, content_type)
    enveloped = _read("EnvelopedData", lambda: content_info["content"])
    if not isinstance(enveloped, cms.EnvelopedData):
        raise CMSFormatError("EnvelopedData: content is missing")
    version = _read("EnvelopedData.version", lambda: enveloped["version"].native)
    _expect("EnvelopedData.version", "v2", version)
    infos = _read("EnvelopedData.recipientInfos", lambda: list(enveloped["recipient_infos"]))
    if len(infos) != 1:
        raise CMSFormatError(
            f"EnvelopedData.recipientInfos: expected 1 recipient, got {len(infos)}"
        )
    info = infos[0]
    kind = _read("RecipientInfo", lambda: info.name)
    _expect("RecipientInfo choice", "ktri", kind)
    ktri = _read("KeyTransRecipientInfo", lambda: info.chosen)
    _expect(
        "KeyTransRecipientInfo.version", "v2", _read("KTRI.version", lambda: ktri["version"].native)
    )
    rid = _read("KeyTransRecipientInfo.rid", lambda: ktri["rid"])
    _expect("KeyTransRecipientInfo.rid", "subject_key_identifier", _read("rid", lambda: rid.name))
    rid_value = _read("KeyTransRecipientInfo.rid", lambda: bytes(rid.chosen.native))
    if not rid_value:
        raise CMSFormatError("KeyTransRecipientInfo.rid: empty subjectKeyIdentifier")
    key_algorithm = _read("keyEncryptionAlgorithm", lambda: ktri["key_encryption_algorithm"])
    # Fast path: KMS writes one exact DER encoding; comparing bytes costs nothing, walking
    # asn1crypto's objects costs a third of the parse. The walk only runs to name the field
    # of an encoding that differs.
    if _read("keyEncryptionAlgorithm", lambda: key_algorithm.dump()) != _OAEP_SHA256_DER:
        _check_oaep(key_algorithm)
        raise CMSFormatError(
            "keyEncryptionAlgorithm: expected the DER RSAES-OAEP-SHA256 parameters KMS "
            "writes, got a different encoding"
        )
    encrypted_key = _read(
        "KeyTransRecipientInfo.encryptedKey", lambda: ktri["encrypted_key"].native
    )
    if not isinstance(encrypted_key, bytes) or len(encrypted_key) < 128:
        raise CMSFormatError(
            "KeyTransRecipientInfo.encryptedKey: expected an RSA-OAEP block of at least "
            f"128 bytes, got {len(encrypted_key) if isinstance(encrypted_key, bytes) else 0}"
        )
    eci = _read("EncryptedContentInfo", lambda: enveloped["encrypted_content_info"])
    eci_type = _read("EncryptedContentInfo.contentType", lambda: eci["content_type"].dotted)
    _expect("EncryptedContentInfo.contentType", _DATA_OID, eci_type)
    algorithm = _read("contentEncryptionAlgorithm", lambda: eci["content_encryption_algorithm"])
    cipher_oid = _read("contentEncryptionAlgorithm", lambda: algorithm["algorithm"].dotted)
    _expect("contentEncryptionAlgorithm", _AES256_CBC_OID, cipher_oid)
    iv = _read("contentEncryptionAlgorithm.parameters", lambda: algorithm["parameters"].native)
    if not isinstance(iv, bytes) or len(iv) != _BLOCK_BYTES:
        actual = len(iv) if isinstance(iv, bytes) else type(iv).__name__
        raise CMSFormatError(f"aes256-CBC IV: expected 16 bytes, got {actual}")
    content_field: Any = _read(
        "EncryptedContentInfo.encryptedContent", lambda: eci["encrypted_content"]
    )
    content = _read("EncryptedContentInfo.encryptedContent", lambda: content_field.native)
    if content is None:
        raise CMSFormatError("EncryptedContentInfo.encryptedContent: missing")
    if not content or len(content) % _BLOCK_BYTES:
        raise CMSFormatError(
            "EncryptedContentInfo.encryptedContent: expected a non-empty multiple of 16 "
            f"bytes, got {len(content)}"
        )
    return CiphertextForRecipient(
        recipient_key_id=rid_value,
        encrypted_key=encrypted_key,
        iv=iv,
        encrypted_content=bytes(content),
        content_constructed=_read("encryptedContent", lambda: content_field.method) == 1,
    )


def _check_oaep(algorithm: Any) -> None:
    oid = _read("keyEncryptionAlgorithm", lambda: algorithm["algorithm"].dotted)
    _expect("keyEncryptionAlgorithm", _RSAES_OAEP_OID, oid)
    params = _read("RSAES-OAEP-params", lambda: algorithm["parameters"])
    if not isinstance(params, algos.RSAESOAEPParams):
        raise CMSFormatError("RSAES-OAEP-params: missing")
    hash_oid = _read(
        "RSAES-OAEP-params.hashFunc", lambda: params["hash_algorithm"]["algorithm"].dotted
    )
    _expect("RSAES-OAEP-params.hashFunc", _SHA256_OID, hash_oid)
    hash_params = _read("hashFunc parameters", lambda: params["hash_algorithm"]["parameters"])
    _expect_null("RSAES-OAEP-params.hashFunc parameters", hash_params)
    mgf = _read("RSAES-OAEP-params.maskGenFunc", lambda: params["mask_gen_algorithm"])
    _expect(
        "RSAES-OAEP-params.maskGenFunc",
        _MGF1_OID,
        _read("maskGenFunc", lambda: mgf["algorithm"].dotted),
    )
    mgf_hash = _read("MGF1 hash", lambda: mgf["parameters"]["algorithm"].dotted)
    _expect("RSAES-OAEP-params.maskGenFunc hash", _SHA256_OID, mgf_hash)
    mgf_params = _read("MGF1 hash parameters", lambda: mgf["parameters"]["parameters"])
    _expect_null("RSAES-OAEP-params.maskGenFunc hash parameters", mgf_params)
    source = _read("RSAES-OAEP-params.pSourceFunc", lambda: params["p_source_algorithm"])
    _expect(
        "RSAES-OAEP-params.pSourceFunc",
        _P_SPECIFIED_OID,
        _read("pSourceFunc", lambda: source["algorithm"].dotted),
    )
    label = _read("pSourceFunc label", lambda: source["parameters"].native)
    if label not in (b"", None):
        raise CMSFormatError(
            f"RSAES-OAEP-params.pSourceFunc: expected an empty label, got {len(label)} bytes"
        )


def _oaep_sha256_algorithm() -> cms.KeyEncryptionAlgorithm:
    # Parameters exactly as real KMS writes them: hashFunc and MGF1 hash with explicit NULL
    # parameters, pSourceFunc left at its DEFAULT (omitted).
    sha256 = algos.DigestAlgorithm({"algorithm": "sha256", "parameters": core.Null()})
    return cms.KeyEncryptionAlgorithm(
        {
            "algorithm": "rsaes_oaep",
            "parameters": algos.RSAESOAEPParams(
                {
                    "hash_algorithm": sha256,
                    "mask_gen_algorithm": algos.MaskGenAlgorithm(
                        {"algorithm": "mgf1", "parameters": sha256}
                    ),
                }
            ),
        }
    )


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(value)) + value


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _expect(field: str, expected: object, actual: object) -> None:
    if actual != expected:
        raise CMSFormatError(f"{field}: expected {expected!r}, got {actual!r}")


def _expect_null(field: str, value: Any) -> None:
    # KMS always writes an explicit NULL; RFC 4055 also allows absence, but nothing real
    # emits that here, and accepting exactly one encoding keeps the parser's surface small.
    if not isinstance(value, core.Null):
        raise CMSFormatError(f"{field}: expected NULL, got {type(value).__name__}")


def _read(field: str, getter: Any) -> Any:
    """Run an asn1crypto accessor (which parses lazily) and type any failure as ours."""
    try:
        return getter()
    except CMSFormatError:
        raise
    except Exception as exc:  # asn1crypto raises ValueError/TypeError/KeyError/... on bad BER
        raise CMSFormatError(f"{field}: not decodable BER ({type(exc).__name__})") from None


# Constant DER pieces of the envelope (immutable bytes, computed once with asn1crypto).
_OAEP_SHA256_DER: bytes = _oaep_sha256_algorithm().dump()
_AES256_CBC_OID_DER: bytes = core.ObjectIdentifier(_AES256_CBC_OID).dump()
_DATA_OID_DER: bytes = core.ObjectIdentifier(_DATA_OID).dump()
_ENVELOPED_DATA_OID_DER: bytes = core.ObjectIdentifier(_ENVELOPED_DATA_OID).dump()
_ENVELOPED_VERSION: bytes = core.Integer(2).dump()
_KTRI_VERSION: bytes = core.Integer(2).dump()
