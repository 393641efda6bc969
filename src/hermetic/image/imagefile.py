"""The hermetic image file: two measured layers, unmeasured metadata, optional signature.

Layout (big-endian, like EIF)::

    header   8  magic b"HRMTIMG\\n"
             2  format version (2)
             2  flags (0)
             4  number of sections (3, or 4 when signed)
    section  2  type (1 runtime layer, 2 app layer, 3 metadata JSON, 4 signature)
             2  flags (0)
             8  size of the data that follows
             .  data
    ...      (sections in that order)
    trailer  4  CRC-32 (zlib) of every byte before it

Why not reuse a tar or the EIF container: the PCR inputs must be exact byte ranges that
anyone can cut out of the file with ``head``/``tail`` and hash with ``sha384sum``; an outer
tar would bury them behind headers and padding, and an EIF would be mistaken for a
bootable Nitro image. This keeps EIF's ideas (sections, a CRC, the PcrSignature section,
metadata outside the measurement) in a format that is trivially reproducible.

PCR1 measures the runtime layer, PCR2 the app layer, PCR8 the signing certificate. PCR0
measures both layer sections as they lie in the file, each with its section header, i.e.
the one byte range from offset 16 to the end of the app layer. The headers carry the
layers' types and lengths, so the input says where one layer ends and the next begins:
with the layers merely concatenated (format version 1), bytes moved from the head of one
layer to the tail of the other left PCR0 unchanged, and a key policy pinning only PCR0
(``ImageSha384``) would have accepted the altered image. Together with the layer reader
refusing any byte a tar reader would skip, two different images cannot share a PCR0.

The image's name and version are taken from the manifest inside the measured app layer;
the metadata section must agree with it or the image is rejected.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermetic import jsontext
from hermetic.enclave.manifest import MANIFEST_NAME, Manifest, parse_manifest
from hermetic.errors import (
    ImageChecksumError,
    ImageFileError,
    ImageFormatError,
    ImageTruncatedError,
    ImageVersionError,
    LayerFormatError,
    ManifestError,
)
from hermetic.image.archive import LayerEntry, extract_entries, read_layer
from hermetic.image.pcrs import Measurements, PcrHasher, pcr_of
from hermetic.image.signing import (
    PcrSignature,
    decode_signature_section,
    verify_pcr0_signature,
)

MAGIC = b"HRMTIMG\n"
FORMAT_VERSION = 2
# Version 1's PCR0 hashed the layers without their boundaries; its images are refused.
BOUNDARYLESS_PCR0_VERSION = 1
HEADER = struct.Struct(">8sHHI")
SECTION_HEADER = struct.Struct(">HHQ")
TRAILER = struct.Struct(">I")

SECTION_RUNTIME = 1
SECTION_APP = 2
SECTION_METADATA = 3
SECTION_SIGNATURE = 4
_SECTION_NAMES = {
    SECTION_RUNTIME: "runtime layer",
    SECTION_APP: "app layer",
    SECTION_METADATA: "metadata",
    SECTION_SIGNATURE: "signature",
}
MAX_METADATA = 1 << 20
BOOT_DESCRIPTOR = "hermetic-boot.json"
# Offset of the runtime layer's first byte: header + one section header.
RUNTIME_LAYER_OFFSET = HEADER.size + SECTION_HEADER.size


@dataclass(frozen=True)
class BootDescriptor:
    """What the runtime layer expects of the enclave: Python version and boot module."""

    format: int
    python: str
    boot_module: str

    def to_bytes(self) -> bytes:
        body = {"format": self.format, "python": self.python, "boot": self.boot_module}
        return (json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n").encode()


@dataclass(frozen=True)
class ImageSections:
    """The raw sections of an image file, before the layers are interpreted."""

    runtime_layer: bytes
    app_layer: bytes
    metadata: bytes
    signature: bytes | None


@dataclass(frozen=True)
class Image:
    """An opened, validated hermetic image. Layers are kept as bytes (they are measured)."""

    runtime_layer: bytes
    app_layer: bytes
    metadata_json: bytes
    signatures: tuple[PcrSignature, ...]
    manifest: Manifest
    boot: BootDescriptor
    measurements: Measurements

    @property
    def metadata(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.metadata_json)
        return value

    def runtime_entries(self) -> list[LayerEntry]:
        return read_layer(self.runtime_layer, "runtime layer")

    def app_entries(self) -> list[LayerEntry]:
        return read_layer(self.app_layer, "app layer")


def encode_image(sections: ImageSections) -> bytes:
    """Assemble an image file from its sections (the inverse of :func:`decode_image`)."""
    parts = [(SECTION_RUNTIME, sections.runtime_layer), (SECTION_APP, sections.app_layer)]
    parts.append((SECTION_METADATA, sections.metadata))
    if sections.signature is not None:
        parts.append((SECTION_SIGNATURE, sections.signature))
    out = bytearray(HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(parts)))
    for kind, data in parts:
        out += _section_header(kind, data)
        out += data
    out += TRAILER.pack(zlib.crc32(out))
    return bytes(out)


def decode_image(data: bytes) -> ImageSections:
    """Split an image file into sections, checking magic, version, layout and CRC."""
    if len(data) < len(MAGIC):
        raise ImageTruncatedError(f"image: {len(data)} bytes, shorter than the magic")
    if data[: len(MAGIC)] != MAGIC:
        raise ImageFormatError(f"image: magic must be {MAGIC!r}, got {data[: len(MAGIC)]!r}")
    if len(data) < HEADER.size + TRAILER.size:
        raise ImageTruncatedError(f"image: {len(data)} bytes, shorter than header and trailer")
    _, version, flags, count = HEADER.unpack_from(data)
    if version == BOUNDARYLESS_PCR0_VERSION:
        raise ImageVersionError(
            f"image: format version {version} is no longer accepted (its PCR0 did not commit "
            f"to the layer boundaries, so two different images could share it); rebuild the "
            f"image with `hermetic build` to get a version {FORMAT_VERSION} image"
        )
    if version != FORMAT_VERSION:
        raise ImageVersionError(f"image: format version must be {FORMAT_VERSION}, got {version}")
    if flags != 0:
        raise ImageFormatError(f"image: header flags must be 0, got {flags:#x}")
    if count not in (3, 4):
        raise ImageFormatError(f"image: section count must be 3 or 4, got {count}")
    body_end = len(data) - TRAILER.size
    offset = HEADER.size
    found: dict[int, bytes] = {}
    for index in range(count):
        expected = index + 1
        if offset + SECTION_HEADER.size > body_end:
            raise ImageTruncatedError(f"image: ends inside the header of section {index}")
        kind, sflags, size = SECTION_HEADER.unpack_from(data, offset)
        if kind != expected:
            raise ImageFormatError(
                f"image: section {index} must be the {_SECTION_NAMES[expected]} "
                f"(type {expected}), got type {kind}"
            )
        if sflags != 0:
            raise ImageFormatError(f"image: section {index} flags must be 0, got {sflags:#x}")
        start = offset + SECTION_HEADER.size
        if size > body_end - start:
            raise ImageTruncatedError(
                f"image: the {_SECTION_NAMES[kind]} declares {size} bytes, "
                f"only {body_end - start} remain"
            )
        found[kind] = data[start : start + size]
        offset = start + size
    if offset != body_end:
        raise ImageFormatError(f"image: {body_end - offset} unexpected bytes after the sections")
    (crc,) = TRAILER.unpack_from(data, body_end)
    actual = zlib.crc32(data[:body_end])
    if crc != actual:
        raise ImageChecksumError(f"image: CRC32 is {actual:08x}, trailer says {crc:08x}")
    return ImageSections(
        runtime_layer=found[SECTION_RUNTIME],
        app_layer=found[SECTION_APP],
        metadata=found[SECTION_METADATA],
        signature=found.get(SECTION_SIGNATURE),
    )


def measure_sections(
    sections: ImageSections, signatures: tuple[PcrSignature, ...]
) -> tuple[bytes, bytes, bytes, bytes | None]:
    """PCR0, PCR1, PCR2 and PCR8 (first signer, as nitro-cli) of an image's sections.

    PCR0 hashes each layer behind its section header (type and length), exactly the bytes
    :func:`encode_image` writes right after the file header, so the layer boundaries are
    part of what is measured.
    """
    whole = PcrHasher()
    for kind, layer in (
        (SECTION_RUNTIME, sections.runtime_layer),
        (SECTION_APP, sections.app_layer),
    ):
        whole.update(_section_header(kind, layer))
        whole.update(layer)
    pcr8 = signatures[0].pcr8() if signatures else None
    return whole.pcr(), pcr_of(sections.runtime_layer), pcr_of(sections.app_layer), pcr8


def _section_header(kind: int, data: bytes) -> bytes:
    """A section's type, zero flags and length: written to the file and measured in PCR0."""
    return SECTION_HEADER.pack(kind, 0, len(data))


def parse_image(data: bytes) -> Image:
    """Decode and fully validate an image: sections, layers, manifest, boot, signature."""
    sections = decode_image(data)
    runtime = read_layer(sections.runtime_layer, "runtime layer")
    app = read_layer(sections.app_layer, "app layer")
    boot = _boot_descriptor(runtime)
    manifest = _manifest_from_layer(app)
    metadata = _metadata(sections.metadata)
    for key, expected in (("ImageName", manifest.name), ("ImageVersion", manifest.version)):
        if metadata.get(key) != expected:
            raise ImageFormatError(
                f"image metadata: {key} is {metadata.get(key)!r} but the measured manifest "
                f"says {expected!r}"
            )
    signatures = decode_signature_section(sections.signature) if sections.signature else ()
    pcr0, pcr1, pcr2, pcr8 = measure_sections(sections, signatures)
    for signature in signatures:
        verify_pcr0_signature(signature, pcr0)
    return Image(
        runtime_layer=sections.runtime_layer,
        app_layer=sections.app_layer,
        metadata_json=sections.metadata,
        signatures=signatures,
        manifest=manifest,
        boot=boot,
        measurements=Measurements(
            kind="hermetic",
            pcr0=pcr0,
            pcr1=pcr1,
            pcr2=pcr2,
            pcr8=pcr8,
            service=manifest.name,
            version=manifest.version,
        ),
    )


def open_image(path: str | Path) -> Image:
    """Read and validate a hermetic image file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot read image: {exc.strerror}") from None
    return parse_image(data)


def extract(image: Image, dest_dir: str | Path, *, read_only: bool = False) -> None:
    """Write the runtime layer to ``DEST/runtime`` and the app layer to ``DEST/app``."""
    dest = Path(dest_dir)
    extract_entries(image.runtime_entries(), dest / "runtime", read_only=read_only)
    extract_entries(image.app_entries(), dest / "app", read_only=read_only)


def _boot_descriptor(entries: list[LayerEntry]) -> BootDescriptor:
    raw = next((e.data for e in entries if e.path == BOOT_DESCRIPTOR), None)
    if raw is None:
        raise LayerFormatError(f"runtime layer: no {BOOT_DESCRIPTOR}")
    value = jsontext.loads(raw, what=f"runtime layer: {BOOT_DESCRIPTOR}", error=LayerFormatError)
    if (
        not isinstance(value, dict)
        or set(value) != {"format", "python", "boot"}
        or value["format"] != 1
        or not isinstance(value["python"], str)
        or not isinstance(value["boot"], str)
    ):
        raise LayerFormatError(
            f"runtime layer: {BOOT_DESCRIPTOR} must be {{format: 1, python: str, boot: str}}"
        )
    return BootDescriptor(format=1, python=value["python"], boot_module=value["boot"])


@dataclass(frozen=True)
class _LayerFiles:
    """The manifest parser's view of an app layer's files."""

    files: Mapping[str, bytes]

    def is_file(self, relative: str) -> bool:
        return relative in self.files

    def read(self, relative: str, limit: int) -> bytes:
        data = self.files.get(relative)
        if data is None:
            raise ManifestError(f"{relative!r} is not a file in the app layer")
        if len(data) > limit:
            raise ManifestError(f"{relative!r} is larger than {limit} bytes")
        return data


def _manifest_from_layer(entries: list[LayerEntry]) -> Manifest:
    files = {e.path: e.data for e in entries if e.data is not None}
    text = files.get(MANIFEST_NAME)
    if text is None:
        raise LayerFormatError(f"app layer: no {MANIFEST_NAME}")
    return parse_manifest(text, _LayerFiles(files), source=f"app layer {MANIFEST_NAME}")


def _metadata(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_METADATA:
        raise ImageFormatError(f"image metadata: {len(raw)} bytes, at most {MAX_METADATA}")
    value = jsontext.loads(raw, what="image metadata", error=ImageFormatError, allow_floats=True)
    if not isinstance(value, dict):
        raise ImageFormatError("image metadata: must be a JSON object")
    return value
