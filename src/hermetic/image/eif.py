"""Reading and measuring real Nitro Enclave Image Files (EIF), as nitro-cli does.

The format is aws-nitro-enclaves-image-format's (reference: shared/reference/nitro.md §5):
a 548-byte big-endian header (magic ``.eif``, version, flags, default memory and CPUs,
num_sections, a 32-entry table of section offsets and one of sizes, a CRC32), then the
sections, each behind a 12-byte header (type, flags, size). PCRs hash section DATA only:

    PCR0 = SHA384(0^48 || SHA384(kernel || cmdline || ramdisk[0] || ramdisk[1] || ...))
    PCR1 = SHA384(0^48 || SHA384(kernel || cmdline || ramdisk[0]))
    PCR2 = SHA384(0^48 || SHA384(ramdisk[1] || ...))
    PCR8 = SHA384(0^48 || SHA384(DER(signing certificate)))        (signed images only)

The reader is stricter than nitro-cli's: the header tables must describe exactly the
sections found (contiguous from byte 548 to the end of the file, sizes agreeing with each
section header, unused entries zero), and the section types must be arranged as the EIF
writer arranges them. A verifier should not compute a reference value from a file that
another tool would read differently.

Kernels and ramdisks can be hundreds of megabytes, so sections are streamed through the
hashers and the CRC in chunks; only the header, cmdline, metadata and signature (all
small and bounded) are held in memory. The core works on any binary stream of known size.

Every kernel and ramdisk byte must be hashed twice (PCR0 and PCR1 or PCR2) and CRC'd
once, so measuring costs well over one SHA-384 pass. Two things keep it near one: PCR1's
input is a prefix of PCR0's (kernel, cmdline, first ramdisk), so PCR1 is a copy of the
PCR0 hasher taken after the first ramdisk rather than a second hash of the same bytes;
and the CRC and the PCR2 hash run on a helper thread while the caller reads and feeds
PCR0 (``hashlib`` and ``zlib`` release the GIL on large buffers, so the two proceed on two
cores; the helper runs at most a few chunks behind, so memory stays bounded).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol

from hermetic import jsontext
from hermetic.errors import (
    EIFChecksumError,
    EIFFormatError,
    EIFMagicError,
    EIFSectionBoundsError,
    EIFSectionCountError,
    EIFSectionTypeError,
    EIFTruncatedError,
    EIFVersionError,
    ImageFileError,
)
from hermetic.image.pcrs import Measurements, PcrHasher
from hermetic.image.signing import PcrSignature, decode_signature_section, verify_pcr0_signature

EIF_MAGIC = b".eif"
HEADER_SIZE = 548
CRC_OFFSET = 544
SECTION_HEADER_SIZE = 12
MAX_NUM_SECTIONS = 32
SUPPORTED_VERSIONS = frozenset({2, 3, 4})  # v2 added the CRC, v3 signatures, v4 metadata
FLAG_ARCH_ARM64 = 0x1
MAX_SMALL_SECTION = 1 << 20  # cmdline, metadata and signature are read into memory
CHUNK = 1 << 20
HELPER_BACKLOG = 4  # chunks the helper thread may lag behind the reader

_HEADER = struct.Struct(">4sHHQQHH256s256s4sI")
_SECTION_HEADER = struct.Struct(">HHQ")


class SectionType(IntEnum):
    """EIF section types (``EifSectionType``)."""

    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5


@dataclass(frozen=True)
class EifHeader:
    version: int
    flags: int
    default_mem: int
    default_cpus: int
    num_sections: int
    section_offsets: tuple[int, ...]
    section_sizes: tuple[int, ...]
    crc32: int

    @property
    def arm64(self) -> bool:
        return bool(self.flags & FLAG_ARCH_ARM64)


@dataclass(frozen=True)
class EifSection:
    type: SectionType
    flags: int
    offset: int  # of the 12-byte section header
    size: int  # of the data


@dataclass(frozen=True)
class EifInfo:
    """What ``nitro-cli describe-eif`` reports: header, sections, PCRs, metadata, signers."""

    header: EifHeader
    sections: tuple[EifSection, ...]
    cmdline: str
    metadata: dict[str, Any] | None
    signatures: tuple[PcrSignature, ...]
    measurements: Measurements


def parse_header(data: bytes, file_size: int) -> EifHeader:
    """Parse and validate the 548-byte header against the file size (pure)."""
    if len(data) < len(EIF_MAGIC):
        raise EIFTruncatedError(f"EIF: {len(data)} bytes, shorter than the magic")
    if data[:4] != EIF_MAGIC:
        raise EIFMagicError(f"EIF: magic must be {EIF_MAGIC!r}, got {data[:4]!r}")
    if len(data) < HEADER_SIZE:
        raise EIFTruncatedError(f"EIF: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    (_, version, flags, mem, cpus, _, count, raw_offsets, raw_sizes, _, crc) = _HEADER.unpack_from(
        data
    )
    if version not in SUPPORTED_VERSIONS:
        raise EIFVersionError(
            f"EIF: version must be one of {sorted(SUPPORTED_VERSIONS)}, got {version}"
        )
    offsets = struct.unpack(">32Q", raw_offsets)
    sizes = struct.unpack(">32Q", raw_sizes)
    if not 3 <= count <= MAX_NUM_SECTIONS:
        raise EIFSectionCountError(
            f"EIF: num_sections must be in 3..{MAX_NUM_SECTIONS} "
            f"(kernel, cmdline, ramdisk at least), got {count}"
        )
    for i in range(count, MAX_NUM_SECTIONS):
        if offsets[i] or sizes[i]:
            raise EIFSectionCountError(
                f"EIF: num_sections is {count} but table entry {i} is in use "
                f"(offset {offsets[i]}, size {sizes[i]})"
            )
    expected = HEADER_SIZE
    for i in range(count):
        if offsets[i] != expected:
            raise EIFSectionBoundsError(
                f"EIF: section_offsets[{i}] is {offsets[i]}, expected {expected} "
                "(sections follow each other from the end of the header)"
            )
        if offsets[i] + SECTION_HEADER_SIZE > file_size:
            raise EIFTruncatedError(
                f"EIF: section {i} header at {offsets[i]} is past the end of the "
                f"{file_size}-byte file"
            )
        expected = offsets[i] + SECTION_HEADER_SIZE + sizes[i]
    if expected > file_size:
        raise EIFTruncatedError(
            f"EIF: the sections end at byte {expected}, the file has {file_size} bytes"
        )
    if expected < file_size:
        raise EIFSectionBoundsError(
            f"EIF: {file_size - expected} bytes after the last section (ends at {expected})"
        )
    return EifHeader(
        version=version,
        flags=flags,
        default_mem=mem,
        default_cpus=cpus,
        num_sections=count,
        section_offsets=offsets,
        section_sizes=sizes,
        crc32=crc,
    )


def parse_section_header(data: bytes, index: int, header: EifHeader) -> EifSection:
    """Parse a 12-byte section header and check it against the header's tables (pure)."""
    raw_type, flags, size = _SECTION_HEADER.unpack(data)
    try:
        kind = SectionType(raw_type)
    except ValueError:
        raise EIFSectionTypeError(f"EIF: section {index} has unknown type {raw_type}") from None
    if size != header.section_sizes[index]:
        raise EIFSectionBoundsError(
            f"EIF: section {index} header says {size} bytes, section_sizes[{index}] says "
            f"{header.section_sizes[index]}"
        )
    if kind is SectionType.SIGNATURE and header.version < 3:
        raise EIFSectionTypeError(f"EIF: signature section in a version {header.version} EIF")
    if kind is SectionType.METADATA and header.version < 4:
        raise EIFSectionTypeError(f"EIF: metadata section in a version {header.version} EIF")
    return EifSection(kind, flags, header.section_offsets[index], size)


def check_position(kind: SectionType, index: int, count: int, before: list[SectionType]) -> None:
    """Section ``index`` must fit nitro-cli's arrangement: kernel, cmdline, then metadata
    and ramdisks, then at most one signature, last. Checked before its data is read."""
    if index == 0 and kind is not SectionType.KERNEL:
        raise EIFSectionTypeError(f"EIF: section 0 must be the kernel, got {kind.name.lower()}")
    if index == 1 and kind is not SectionType.CMDLINE:
        raise EIFSectionTypeError(f"EIF: section 1 must be the cmdline, got {kind.name.lower()}")
    if index >= 2 and kind in (SectionType.KERNEL, SectionType.CMDLINE):
        raise EIFSectionTypeError(f"EIF: section {index} is a second {kind.name.lower()}")
    if kind is SectionType.METADATA and SectionType.METADATA in before:
        raise EIFSectionTypeError(f"EIF: section {index} is a second metadata section")
    if kind is SectionType.SIGNATURE and index != count - 1:
        raise EIFSectionTypeError(f"EIF: the signature section ({index}) must be the last one")
    if index == count - 1 and SectionType.RAMDISK not in [*before, kind]:
        raise EIFSectionTypeError("EIF: no ramdisk section")


def read_eif(stream: BinaryIO, file_size: int) -> EifInfo:
    """Validate an EIF read from ``stream`` (positioned at 0) and compute its PCRs."""
    head = _read_exact(stream, min(HEADER_SIZE, file_size), "header")
    header = parse_header(head, file_size)
    crc = _Crc32(zlib.crc32(head[:CRC_OFFSET]))
    image, app = PcrHasher(), PcrHasher()
    boot: PcrHasher | None = None  # PCR0's hasher as it stood after the first ramdisk
    sections: list[EifSection] = []
    small: dict[SectionType, bytes] = {}
    with _Helper() as helper:
        for index in range(header.num_sections):
            raw = _read_exact(stream, SECTION_HEADER_SIZE, f"section {index} header")
            section = parse_section_header(raw, index, header)
            check_position(section.type, index, header.num_sections, [s.type for s in sections])
            sections.append(section)
            helper.feed((crc,), raw)
            first_ramdisk = section.type is SectionType.RAMDISK and boot is None
            in_pcr0 = section.type in (SectionType.KERNEL, SectionType.CMDLINE, SectionType.RAMDISK)
            # Measured by the helper: the CRC always, PCR2 from the second ramdisk on.
            behind: tuple[_Sink, ...] = (crc,)
            if section.type is SectionType.RAMDISK and not first_ramdisk:
                behind = (crc, app)
            keep = section.type in (
                SectionType.CMDLINE, SectionType.METADATA, SectionType.SIGNATURE
            )  # fmt: skip
            if keep and section.size > MAX_SMALL_SECTION:
                raise EIFSectionBoundsError(
                    f"EIF: {section.type.name.lower()} section is {section.size} bytes, "
                    f"at most {MAX_SMALL_SECTION}"
                )
            kept = bytearray()
            remaining = section.size
            while remaining:
                chunk = _read_exact(stream, min(CHUNK, remaining), f"section {index} data")
                remaining -= len(chunk)
                helper.feed(behind, chunk)
                if in_pcr0:
                    image.update(chunk)
                if keep:
                    kept += chunk
            if first_ramdisk:
                boot = image.copy()
            if keep:
                small[section.type] = bytes(kept)
    assert boot is not None  # check_position demands a ramdisk
    if crc.value != header.crc32:
        raise EIFChecksumError(f"EIF: CRC32 is {crc.value:08x}, the header says {header.crc32:08x}")

    metadata = _metadata(small.get(SectionType.METADATA))
    signatures: tuple[PcrSignature, ...] = ()
    if SectionType.SIGNATURE in small:
        signatures = decode_signature_section(small[SectionType.SIGNATURE])
    pcr0 = image.pcr()
    for signature in signatures:
        verify_pcr0_signature(signature, pcr0)
    name = metadata.get("ImageName") if metadata else None
    version = metadata.get("ImageVersion") if metadata else None
    measurements = Measurements(
        kind="eif",
        pcr0=pcr0,
        pcr1=boot.pcr(),
        pcr2=app.pcr(),
        pcr8=signatures[0].pcr8() if signatures else None,
        service=name if isinstance(name, str) else None,
        version=version if isinstance(version, str) else None,
    )
    return EifInfo(
        header=header,
        sections=tuple(sections),
        cmdline=small[SectionType.CMDLINE].decode("utf-8", "replace"),
        metadata=metadata,
        signatures=signatures,
        measurements=measurements,
    )


def read_eif_file(path: str | Path) -> EifInfo:
    """Open, validate and measure an EIF file (streaming)."""
    try:
        with open(path, "rb") as stream:
            size = _file_size(stream)
            return read_eif(stream, size)
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot read EIF: {exc.strerror}") from None


class _Sink(Protocol):
    def update(self, data: bytes) -> None: ...


class _Crc32:
    """A running CRC32 with the same ``update`` as a hasher."""

    def __init__(self, value: int) -> None:
        self.value = value

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)


class _Helper:
    """One helper thread that feeds chunks to sinks in the order they were handed over.

    At most :data:`HELPER_BACKLOG` chunks wait for it; leaving the ``with`` block waits
    for all of them (and re-raises what the helper raised), so the sinks are complete.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eif-measure")
        self._pending: deque[Future[None]] = deque()

    def feed(self, sinks: Sequence[_Sink], data: bytes) -> None:
        self._pending.append(self._pool.submit(_feed, sinks, data))
        while len(self._pending) > HELPER_BACKLOG:
            self._pending.popleft().result()

    def __enter__(self) -> _Helper:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


def _feed(sinks: Sequence[_Sink], data: bytes) -> None:
    for sink in sinks:
        sink.update(data)


def _file_size(stream: BinaryIO) -> int:
    return os.fstat(stream.fileno()).st_size


def _read_exact(stream: BinaryIO, size: int, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EIFTruncatedError(f"EIF: file ends inside {what}")
    return data


def _metadata(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    value = jsontext.loads(
        raw, what="EIF: metadata section", error=EIFFormatError, allow_floats=True
    )
    if not isinstance(value, dict):
        raise EIFFormatError("EIF: metadata section must be a JSON object")
    return value
