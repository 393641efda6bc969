"""Trust roots: the one certificate a verifier pins, identified by the SHA-256 of its DER.

Why pin by fingerprint: the document carries its own root in ``cabundle[0]``, so trusting
"whatever root the document brings" would trust anyone. A relying party instead fixes the
root it accepts (AWS Nitro Enclaves Root-G1 for real hardware, the emulator's dev root when
told to) and the verifier checks the chain ends there.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hermetic.errors import TrustRootError
from hermetic.paths import state_dir

#: SHA-256 of the DER of AWS Nitro Enclaves Root-G1 (not of the ZIP AWS distributes it in).
AWS_ROOT_G1_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
_AWS_ROOT_RESOURCE = "aws-nitro-enclaves-root-g1.pem"


@dataclass(frozen=True)
class TrustRoot:
    """A pinned root certificate. Build one with :meth:`aws`, :meth:`dev` or :meth:`from_pem`."""

    name: str
    der: bytes
    certificate: x509.Certificate = field(repr=False, compare=False)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Lowercase hex SHA-256 of the root's DER: the value that is pinned (computed once:
        every verification names it)."""
        return hashlib.sha256(self.der).hexdigest()

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    @classmethod
    def from_pem(
        cls, pem: bytes, *, name: str = "custom", expected_sha256: str | None = None
    ) -> TrustRoot:
        """Pin the (single) certificate in ``pem``; optionally insist on its fingerprint."""
        try:
            certificate = x509.load_pem_x509_certificate(pem)
        except (ValueError, TypeError) as exc:
            raise TrustRootError(f"{name} root: not a PEM X.509 certificate ({exc})") from None
        der = certificate.public_bytes(Encoding.DER)
        root = cls(name=name, der=der, certificate=certificate)
        if expected_sha256 is not None and root.fingerprint != expected_sha256.lower():
            raise TrustRootError(
                f"{name} root: SHA-256 fingerprint expected {expected_sha256.lower()}, "
                f"got {root.fingerprint}"
            )
        return root

    @classmethod
    def aws(cls) -> TrustRoot:
        """AWS Nitro Enclaves Root-G1 (commercial partitions), shipped inside the package."""
        pem = resources.files(__package__).joinpath(_AWS_ROOT_RESOURCE).read_bytes()
        return cls.from_pem(pem, name="aws", expected_sha256=AWS_ROOT_G1_SHA256)

    @classmethod
    def dev(cls) -> TrustRoot:
        """The local emulator's dev root, from ``<state dir>/dev-pki/root.pem``."""
        path = dev_root_path()
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            raise TrustRootError(
                f"dev root: {path} does not exist; create the emulator's dev PKI with "
                "`hermetic nsm attest`"
            ) from None
        except OSError as exc:
            raise TrustRootError(f"dev root: cannot read {path}: {exc.strerror}") from None
        return cls.from_pem(pem, name="dev")


def dev_root_path() -> Path:
    """Where the emulated NSM writes its dev root certificate."""
    return state_dir() / "dev-pki" / "root.pem"
