"""One entry point to measure any image file, whichever format it is in.

The transparency log, the launcher and the CLI all need "the PCRs of this file" without
caring whether it is a hermetic image (emulator) or an EIF (real Nitro), so the format is
recognised from the magic bytes, never from the file name.
"""

from __future__ import annotations

import io
from pathlib import Path

from hermetic.errors import ImageFileError, ImageFormatError
from hermetic.image.eif import EIF_MAGIC, read_eif, read_eif_file
from hermetic.image.imagefile import MAGIC, open_image, parse_image
from hermetic.image.pcrs import Measurements


def measure_file(path: str | Path) -> Measurements:
    """PCR0/1/2 (and PCR8 when signed) of a hermetic image or an EIF file."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot read image: {exc.strerror}") from None
    if head.startswith(EIF_MAGIC):
        return read_eif_file(path).measurements
    if head == MAGIC:
        return open_image(path).measurements
    raise ImageFormatError(
        f"{path}: not a hermetic image (magic {MAGIC!r}) or an EIF (magic {EIF_MAGIC!r}), "
        f"starts with {head[:8]!r}"
    )


def measure_bytes(data: bytes) -> Measurements:
    """:func:`measure_file` for bytes already in memory."""
    if data.startswith(EIF_MAGIC):
        return read_eif(io.BytesIO(data), len(data)).measurements
    if data.startswith(MAGIC):
        return parse_image(data).measurements
    raise ImageFormatError(
        f"not a hermetic image (magic {MAGIC!r}) or an EIF (magic {EIF_MAGIC!r}), "
        f"starts with {data[:8]!r}"
    )
