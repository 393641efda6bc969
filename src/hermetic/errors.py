"""The typed errors every part of hermetic raises.

A relying party must be able to tell *which* check failed, so every failure is a precise
subclass of :class:`HermeticError` whose message names the field, what was expected and
what was found (never a secret). The CLI maps the two families to exit codes:

* :class:`MalformedInputError` and :class:`UsageError` (exit 2): the input could not be
  read or parsed, or the command was used wrongly;
* everything else (exit 1): the input was read and a check rejected it, or an operation
  failed.

Each component adds its own subclasses below its area class, in its section of this
module, so ``except HermeticError`` is always enough for a caller that only needs to know
"it did not verify".
"""

from __future__ import annotations

EXIT_REJECTED = 1
EXIT_USAGE = 2


class HermeticError(Exception):
    """Root of every error hermetic raises on purpose."""

    exit_code: int = EXIT_REJECTED


class UsageError(HermeticError):
    """The caller asked for something that makes no sense (bad option, bad value)."""

    exit_code = EXIT_USAGE


class MalformedInputError(HermeticError):
    """Input bytes or a file could not be read or parsed at all."""

    exit_code = EXIT_USAGE


class VerificationError(HermeticError):
    """Input was well formed but a cryptographic or policy check rejected it."""


# --- attestation -------------------------------------------------------------------------


class AttestationError(HermeticError):
    """Area class for attestation documents (codec and verifier)."""


class AttestationFormatError(AttestationError, MalformedInputError):
    """The attestation document is not a well-formed Nitro COSE_Sign1 document."""


class AttestationVerificationError(AttestationError, VerificationError):
    """A well-formed attestation document failed verification."""


class SignatureInvalidError(AttestationVerificationError):
    """The COSE ES384 signature does not verify with the leaf certificate's key."""


class CertificateChainError(AttestationVerificationError):
    """The certificate chain is broken: a signature, extension or constraint is wrong."""


class CertificateValidityError(CertificateChainError):
    """A certificate in the chain is not valid at the verification time."""


class UntrustedRootError(CertificateChainError):
    """The chain does not end at the pinned root."""


class PolicyError(AttestationVerificationError):
    """The document verified but the relying party's policy rejects it."""


class PCRMismatchError(PolicyError):
    """A PCR differs from the expected reference value (or is missing)."""


class DebugModeError(PolicyError):
    """The document comes from a debug-mode enclave and the policy does not allow it."""


class NonceMismatchError(PolicyError):
    """The document's nonce is not the one the relying party expected."""


class PublicKeyMismatchError(PolicyError):
    """The document's public_key is not the one the relying party expected."""


class UserDataMismatchError(PolicyError):
    """The document's user_data is not the one the relying party expected."""


class DocumentAgeError(PolicyError):
    """The document is older than the policy allows, or dated in the future."""


# --- nsm ---------------------------------------------------------------------------------


class NSMError(HermeticError):
    """The Nitro Secure Module (real or emulated) refused or failed a request.

    ``code`` is the NSM's own ErrorCode name (``InvalidIndex``, ``ReadOnlyIndex``, ...).
    """

    def __init__(self, message: str, code: str = "InternalError") -> None:
        super().__init__(message)
        self.code = code


class NSMUnavailableError(NSMError):
    """No NSM backend is reachable (no /dev/nsm and no emulator socket)."""


# --- areas of later components: each adds its own subclasses here --------------------------


class ImageError(HermeticError):
    """Enclave images: build, measure, EIF parsing."""


class LauncherError(HermeticError):
    """Starting, stopping or reaching an enclave."""


class TransportError(HermeticError):
    """A vsock, TCP, Unix or WebSocket transport failed."""


class ChannelError(HermeticError):
    """The attested Noise channel: handshake, evidence or transport messages."""


class TranslogError(HermeticError):
    """The transparency log: proofs, checkpoints, notes, releases."""


class KMSError(HermeticError):
    """The KMS client, CMS parsing or the local KMS server."""


class StoreError(HermeticError):
    """Persistent storage (SQLite, PostgreSQL)."""


class ConfigError(UsageError):
    """A configuration file or manifest is missing a field or has a bad value."""
