"""Enclave images: reproducible hermetic images, their PCRs, and real Nitro EIF files.

The public surface is small: :func:`build_image` makes an image from an app directory,
:func:`measure_file` gives the PCRs of a hermetic image or an EIF, :func:`open_image`
and :func:`extract` give the launcher read access to the layers. See docs/images.md.
"""

from __future__ import annotations

from hermetic.image.build import BuildResult, SigningMaterial, build_eif, build_image
from hermetic.image.eif import EifInfo, read_eif_file
from hermetic.image.imagefile import Image, extract, open_image
from hermetic.image.measure import measure_bytes, measure_file
from hermetic.image.pcrs import HASH_ALGORITHM, Measurements, pcr_of

__all__ = [
    "HASH_ALGORITHM",
    "BuildResult",
    "EifInfo",
    "Image",
    "Measurements",
    "SigningMaterial",
    "build_eif",
    "build_image",
    "extract",
    "measure_bytes",
    "measure_file",
    "open_image",
    "pcr_of",
    "read_eif_file",
]
