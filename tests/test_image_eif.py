"""EIF parsing and measurement against EIFs built byte by byte from the format notes.

The helper below writes EIFs directly from shared/reference/nitro.md §5 (header layout,
section headers, CRC, PcrSignature CBOR with byte arrays, COSE_Sign1 over PcrInfo) without
using hermetic's code, and the expected PCRs are computed here with hashlib, so the
reader is checked against the specification rather than against itself.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import random
import struct
import zlib
from dataclasses import dataclass

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermetic.errors import (
    EIFChecksumError,
    EIFMagicError,
    EIFSectionBoundsError,
    EIFSectionCountError,
    EIFSectionTypeError,
    EIFTruncatedError,
    EIFVersionError,
    HermeticError,
    ImageSignatureError,
    MalformedInputError,
)
from hermetic.image import measure_bytes, measure_file
from hermetic.image.eif import read_eif

KERNEL = b"\x7fELF fake kernel " * 300
CMDLINE = b"reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on"
BOOTSTRAP = b"bootstrap initrd: init, nsm.ko " * 200
CUSTOMER = b"customer initrd: rootfs/ cmd env " * 500
METADATA = {
    "ImageName": "echo",
    "ImageVersion": "0.1.0",
    "BuildMetadata": {
        "BuildTime": "2026-11-28T00:00:00Z",
        "BuildTool": "nitro-cli",
        "BuildToolVersion": "1.4.2",
        "OperatingSystem": "linux",
        "KernelVersion": "6.1",
    },
    "DockerInfo": {},
    "CustomMetadata": {},
}


def tpm_pcr(data: bytes) -> bytes:
    return hashlib.sha384(b"\x00" * 48 + hashlib.sha384(data).digest()).digest()


@dataclass(frozen=True)
class Signer:
    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes
    cert_der: bytes

    @property
    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (what --sign-key files hold)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def make_signer(curve: ec.EllipticCurve | None = None) -> Signer:
    key = ec.generate_private_key(curve or ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eif test signer")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA384())
    )
    return Signer(
        key,
        cert.public_bytes(serialization.Encoding.PEM),
        cert.public_bytes(serialization.Encoding.DER),
    )


def cose_sign1_over_pcr0(signer: Signer, pcr0: bytes) -> bytes:
    """ES384 COSE_Sign1 (untagged) over serde_cbor(PcrInfo{0, pcr0 as uint array})."""
    protected = cbor2.dumps({1: -35})
    payload = cbor2.dumps({"register_index": 0, "register_value": list(pcr0)})
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(signer.key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    return cbor2.dumps([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])


def signature_section(signer: Signer, pcr0: bytes) -> bytes:
    cose = cose_sign1_over_pcr0(signer, pcr0)
    return cbor2.dumps([{"signing_certificate": list(signer.cert_pem), "signature": list(cose)}])


def make_eif(
    *,
    kernel: bytes = KERNEL,
    cmdline: bytes = CMDLINE,
    ramdisks: tuple[bytes, ...] = (BOOTSTRAP, CUSTOMER),
    metadata: dict[str, object] | None = METADATA,
    signer: Signer | None = None,
    signed_pcr0: bytes | None = None,
    version: int = 4,
) -> bytes:
    """An EIF laid out as EifBuilder::write_to does, straight from the format notes."""
    sections: list[tuple[int, bytes]] = [(1, kernel), (2, cmdline)]
    if metadata is not None:
        sections.append((5, json.dumps(metadata).encode()))
    sections += [(3, ramdisk) for ramdisk in ramdisks]
    if signer is not None:
        pcr0 = signed_pcr0 or tpm_pcr(kernel + cmdline + b"".join(ramdisks))
        sections.append((4, signature_section(signer, pcr0)))
    offsets, sizes, position = [], [], 548
    for _, data in sections:
        offsets.append(position)
        sizes.append(len(data))
        position += 12 + len(data)
    pad = [0] * (32 - len(sections))
    header = (
        b".eif"
        + struct.pack(">HHQQHH", version, 0, 512 << 20, 2, 0, len(sections))
        + struct.pack(">32Q", *offsets, *pad)
        + struct.pack(">32Q", *sizes, *pad)
        + b"\x00" * 4
    )
    assert len(header) == 544
    body = b"".join(struct.pack(">HHQ", kind, 0, len(data)) + data for kind, data in sections)
    crc = zlib.crc32(header + body)
    return header + struct.pack(">I", crc) + body


def fix_crc(eif: bytes) -> bytes:
    """Recompute the CRC after a deliberate edit, so a test reaches the check it targets."""
    crc = zlib.crc32(eif[:544] + eif[548:])
    return eif[:544] + struct.pack(">I", crc) + eif[548:]


def set_u64(eif: bytes, offset: int, value: int) -> bytes:
    return eif[:offset] + struct.pack(">Q", value) + eif[offset + 8 :]


@pytest.fixture(scope="module")
def signer() -> Signer:
    return make_signer()


def test_unsigned_eif_pcrs_match_nitro_cli_formula() -> None:
    m = measure_bytes(make_eif())
    assert m.kind == "eif"
    assert m.pcr0 == tpm_pcr(KERNEL + CMDLINE + BOOTSTRAP + CUSTOMER)
    assert m.pcr1 == tpm_pcr(KERNEL + CMDLINE + BOOTSTRAP)
    assert m.pcr2 == tpm_pcr(CUSTOMER)
    assert m.pcr8 is None
    assert (m.service, m.version) == ("echo", "0.1.0")
    assert set(m.to_nitro_json()) == {"HashAlgorithm", "PCR0", "PCR1", "PCR2"}


def test_pcr2_covers_every_ramdisk_after_the_first() -> None:
    extra = b"third ramdisk"
    m = measure_bytes(make_eif(ramdisks=(BOOTSTRAP, CUSTOMER, extra)))
    assert m.pcr2 == tpm_pcr(CUSTOMER + extra)
    assert m.pcr0 == tpm_pcr(KERNEL + CMDLINE + BOOTSTRAP + CUSTOMER + extra)


def test_signed_eif_sets_pcr8_to_certificate_der_and_keeps_pcr0(signer: Signer) -> None:
    unsigned = measure_bytes(make_eif())
    signed = measure_bytes(make_eif(signer=signer))
    assert signed.pcr8 == tpm_pcr(signer.cert_der)
    assert (signed.pcr0, signed.pcr1, signed.pcr2) == (unsigned.pcr0, unsigned.pcr1, unsigned.pcr2)
    assert signed.to_nitro_json()["PCR8"] == tpm_pcr(signer.cert_der).hex()


def test_signature_over_another_pcr0_is_rejected(signer: Signer) -> None:
    with pytest.raises(ImageSignatureError, match="PCR0"):
        measure_bytes(make_eif(signer=signer, signed_pcr0=b"\x01" * 48))


def test_signature_by_a_key_other_than_the_certificates_is_rejected(signer: Signer) -> None:
    other = make_signer()
    pcr0 = tpm_pcr(KERNEL + CMDLINE + BOOTSTRAP + CUSTOMER)
    cose = cose_sign1_over_pcr0(other, pcr0)
    section = cbor2.dumps([{"signing_certificate": list(signer.cert_pem), "signature": list(cose)}])
    eif = make_eif()
    # Append the foreign signature as a fifth section by rebuilding with it in place.
    rebuilt = _with_extra_section(eif, 4, section)
    with pytest.raises(ImageSignatureError, match="does not verify"):
        measure_bytes(rebuilt)


def _with_extra_section(eif: bytes, kind: int, data: bytes) -> bytes:
    count = struct.unpack_from(">H", eif, 26)[0]
    out = bytearray(eif)
    struct.pack_into(">H", out, 26, count + 1)
    struct.pack_into(">Q", out, 28 + 8 * count, len(eif))
    struct.pack_into(">Q", out, 284 + 8 * count, len(data))
    out += struct.pack(">HHQ", kind, 0, len(data)) + data
    return fix_crc(bytes(out))


def test_version_3_eif_without_metadata_is_measured() -> None:
    m = measure_bytes(make_eif(metadata=None, version=3))
    assert m.pcr0 == tpm_pcr(KERNEL + CMDLINE + BOOTSTRAP + CUSTOMER)
    assert m.service is None


def test_measure_file_streams_an_eif_from_disk(tmp_path, signer: Signer) -> None:
    path = tmp_path / "enclave.eif"
    path.write_bytes(make_eif(signer=signer))
    m = measure_file(path)
    assert m.pcr8 == tpm_pcr(signer.cert_der)
    assert m.pcr1 == tpm_pcr(KERNEL + CMDLINE + BOOTSTRAP)


def test_sections_of_many_chunks_measure_per_formula(tmp_path) -> None:
    # Several MiB per section: the PCR0 hash, the helper thread's CRC and PCR2 hash and the
    # PCR1 copy all see many chunks, more than the helper may hold back at once.
    rng = random.Random(9)
    kernel, boot, app, more = (rng.randbytes(n) for n in (3 << 20, (5 << 20) + 7, 6 << 20, 999))
    path = tmp_path / "big.eif"
    path.write_bytes(make_eif(kernel=kernel, ramdisks=(boot, app, more)))
    m = measure_file(path)
    assert m.pcr0 == tpm_pcr(kernel + CMDLINE + boot + app + more)
    assert m.pcr1 == tpm_pcr(kernel + CMDLINE + boot)
    assert m.pcr2 == tpm_pcr(app + more)


def test_bad_crc_deep_inside_a_large_section_is_rejected() -> None:
    eif = bytearray(make_eif(ramdisks=(BOOTSTRAP, random.Random(3).randbytes(4 << 20))))
    eif[len(eif) // 2] ^= 0x01
    with pytest.raises(EIFChecksumError, match="CRC32"):
        measure_bytes(bytes(eif))


# --- rejection: each defect has its own typed error ----------------------------------------


def test_truncated_eif_is_rejected() -> None:
    eif = make_eif()
    for cut in (3, 100, 547, 560, len(eif) - 1):
        with pytest.raises(EIFTruncatedError):
            read_eif(io.BytesIO(eif[:cut]), cut)


def test_bad_crc_is_rejected() -> None:
    eif = bytearray(make_eif())
    eif[-10] ^= 0x01
    with pytest.raises(EIFChecksumError, match="CRC32"):
        measure_bytes(bytes(eif))


def test_bad_magic_is_rejected() -> None:
    with pytest.raises(EIFMagicError):
        read_eif(io.BytesIO(b"EIF." + make_eif()[4:]), len(make_eif()))


def test_unsupported_version_is_rejected() -> None:
    eif = bytearray(make_eif())
    struct.pack_into(">H", eif, 4, 99)
    with pytest.raises(EIFVersionError, match="99"):
        measure_bytes(fix_crc(bytes(eif)))


@pytest.mark.parametrize("count", [0, 2, 33, 0xFFFF])
def test_section_count_out_of_range_is_rejected(count: int) -> None:
    eif = bytearray(make_eif())
    struct.pack_into(">H", eif, 26, count)
    with pytest.raises(EIFSectionCountError, match="num_sections"):
        measure_bytes(fix_crc(bytes(eif)))


def test_section_count_disagreeing_with_tables_is_rejected() -> None:
    eif = bytearray(make_eif())
    struct.pack_into(">H", eif, 26, 4)  # five sections are in the tables and the file
    with pytest.raises(EIFSectionCountError, match="table entry 4"):
        measure_bytes(fix_crc(bytes(eif)))


def test_section_offset_out_of_bounds_is_rejected() -> None:
    eif = make_eif()
    with pytest.raises(EIFSectionBoundsError, match=r"section_offsets\[3\]"):
        measure_bytes(fix_crc(set_u64(eif, 28 + 8 * 3, len(eif) + 4096)))


def test_section_size_disagreeing_with_its_header_is_rejected() -> None:
    eif = make_eif()
    # Shrink the kernel's size in the table and the next offset with it: the layout is
    # consistent but the kernel's own section header still says the old size.
    kernel_size = struct.unpack_from(">Q", eif, 284)[0]
    edited = set_u64(eif, 284, kernel_size - 1)
    with pytest.raises(EIFSectionBoundsError):
        measure_bytes(fix_crc(edited))


def test_trailing_bytes_after_last_section_are_rejected() -> None:
    with pytest.raises(EIFSectionBoundsError, match="after the last section"):
        measure_bytes(make_eif() + b"\x00")


def test_unknown_section_type_is_rejected() -> None:
    eif = bytearray(make_eif())
    struct.pack_into(">H", eif, 548, 9)  # kernel section header's type
    with pytest.raises(EIFSectionTypeError, match="unknown type 9"):
        measure_bytes(fix_crc(bytes(eif)))


def test_eif_without_ramdisk_is_rejected() -> None:
    with pytest.raises(EIFSectionTypeError, match="ramdisk"):
        measure_bytes(make_eif(ramdisks=()))


def test_every_eif_error_is_malformed_input_exit_2() -> None:
    for error in (EIFTruncatedError, EIFChecksumError, EIFSectionCountError, EIFMagicError):
        assert issubclass(error, MalformedInputError)
        assert error("x").exit_code == 2


# --- property tests -------------------------------------------------------------------------

_VALID = make_eif(ramdisks=(b"boot" * 10, b"app" * 10), kernel=b"k" * 64)
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_hermetic_errors(data: bytes) -> None:
    for candidate in (data, b".eif" + data):
        with contextlib.suppress(HermeticError):
            read_eif(io.BytesIO(candidate), len(candidate))


@_FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    st.booleans(),
    st.integers(0, len(_VALID)),
)
def test_mutated_valid_eif_raises_only_hermetic_errors(
    edits: list[tuple[int, int]], recompute_crc: bool, cut: int
) -> None:
    data = bytearray(_VALID)
    for position, value in edits:
        data[position] = value
    mutated = fix_crc(bytes(data)) if recompute_crc else bytes(data)
    for candidate in (mutated, mutated[:cut]):
        try:
            m = read_eif(io.BytesIO(candidate), len(candidate)).measurements
        except HermeticError:
            continue
        # Accepted: then it must measure as the formula says over what is in the file.
        assert len(m.pcr0) == 48


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300), st.binary(min_size=1, max_size=300))
def test_any_section_contents_measure_per_formula(kernel: bytes, boot: bytes, app: bytes) -> None:
    m = measure_bytes(make_eif(kernel=kernel, ramdisks=(boot, app), metadata=None))
    assert m.pcr0 == tpm_pcr(kernel + CMDLINE + boot + app)
    assert m.pcr1 == tpm_pcr(kernel + CMDLINE + boot)
    assert m.pcr2 == tpm_pcr(app)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 0xFFFFFFFFFFFFFFFF), st.integers(0, 31))
def test_any_offset_table_edit_is_rejected(value: int, index: int) -> None:
    eif = make_eif()
    original = struct.unpack_from(">Q", eif, 28 + 8 * index)[0]
    if value == original:
        return
    with pytest.raises((EIFSectionBoundsError, EIFSectionCountError, EIFTruncatedError)):
        measure_bytes(fix_crc(set_u64(eif, 28 + 8 * index, value)))
