"""PCR values of an image, computed the way the Nitro hypervisor and nitro-cli do.

A Nitro PCR starts as 48 zero bytes and is extended once with the SHA-384 digest of what
it measures, so every image PCR is ``SHA384(0^48 || SHA384(input))``. Keeping that one
formula in one place is what lets a hermetic image, an EIF and an attestation document be
compared byte for byte, and lets anyone reproduce a PCR with ``sha384sum``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

PCR_SIZE = 48
ZERO_PCR = bytes(PCR_SIZE)
# nitro-cli prints the Debug form of its hash algorithm enum; clients compare the string.
HASH_ALGORITHM = "Sha384 { ... }"

ImageKind = Literal["hermetic", "eif"]


class PcrHasher:
    """Streaming SHA-384 whose final value is extended into a zero PCR (EifHasher's role)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha384()

    def update(self, data: bytes | memoryview) -> None:
        self._digest.update(data)

    def copy(self) -> PcrHasher:
        """A hasher that has seen what this one has, so a shared prefix is hashed once."""
        twin = PcrHasher()
        twin._digest = self._digest.copy()
        return twin

    def pcr(self) -> bytes:
        return extend(ZERO_PCR, self._digest.digest())


def extend(pcr: bytes, digest: bytes) -> bytes:
    """One PCR extend: ``SHA384(pcr || digest)``."""
    return hashlib.sha384(pcr + digest).digest()


def pcr_of(data: bytes) -> bytes:
    """``SHA384(0^48 || SHA384(data))``: what ``nitro-cli pcr --input FILE`` prints."""
    return extend(ZERO_PCR, hashlib.sha384(data).digest())


@dataclass(frozen=True)
class Measurements:
    """The image PCRs a relying party pins (a PCR bank, in the architecture's words).

    ``pcr8`` is None for an unsigned image. ``service`` and ``version`` name the image
    when known: for hermetic images they come from the measured manifest; for EIFs from
    the (unmeasured) metadata section, so they are labels, not evidence.
    """

    kind: ImageKind
    pcr0: bytes
    pcr1: bytes
    pcr2: bytes
    pcr8: bytes | None = None
    service: str | None = None
    version: str | None = None

    def pcrs(self) -> dict[int, bytes]:
        """The measured registers by index (8 only when signed)."""
        values = {0: self.pcr0, 1: self.pcr1, 2: self.pcr2}
        if self.pcr8 is not None:
            values[8] = self.pcr8
        return values

    def to_nitro_json(self) -> dict[str, str]:
        """The object nitro-cli prints under ``Measurements`` (keys and hex case alike)."""
        out = {"HashAlgorithm": HASH_ALGORITHM}
        for index, value in self.pcrs().items():
            out[f"PCR{index}"] = value.hex()
        return out
