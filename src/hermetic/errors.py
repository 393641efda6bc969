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


class TrustRootError(AttestationError, UsageError):
    """A trust root could not be loaded (missing file, bad PEM, wrong pinned fingerprint)."""


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


class NSMResponseFormatError(NSMError, MalformedInputError):
    """The module's answer is not a well-formed NSM response message (code InvalidResponse)."""


class DevPKIStateError(NSMError, MalformedInputError):
    """A file of the emulated Nitro PKI in the state directory is unreadable or inconsistent."""


# --- areas of later components: each adds its own subclasses here --------------------------


class ImageError(HermeticError):
    """Enclave images: build, measure, EIF parsing."""


class ManifestError(ImageError, UsageError):
    """An app's ``hermetic.toml`` is missing a field or has a bad value (like ConfigError)."""


class AppContentError(ImageError, UsageError):
    """An app directory holds something an image cannot carry (symlink, device, bad name)."""


class ImageFileError(ImageError, MalformedInputError):
    """An image file could not be opened or read at all."""


class ImageFormatError(ImageError, MalformedInputError):
    """A hermetic image file is not well formed (magic, version, sections, layers)."""


class ImageTruncatedError(ImageFormatError):
    """A hermetic image file ends before its declared sections do."""


class ImageChecksumError(ImageFormatError):
    """A hermetic image file's CRC32 trailer does not match its contents."""


class ImageVersionError(ImageFormatError):
    """A hermetic image file is in a format version this reader refuses (rebuild it)."""


class LayerFormatError(ImageFormatError):
    """A layer archive is unreadable or holds an entry an image may not contain."""


class LayerTrailingDataError(LayerFormatError):
    """A layer has bytes after its last entry other than the writer's zero end blocks.

    A tar reader stops at the end-of-archive blocks and ignores what follows, so such bytes
    would be measured without being part of the layer: they are refused, never skipped.
    """


class EIFFormatError(ImageError, MalformedInputError):
    """An EIF file is not well formed (see docs/images.md for the checks)."""


class EIFMagicError(EIFFormatError):
    """The file does not start with the EIF magic ``.eif``."""


class EIFVersionError(EIFFormatError):
    """The EIF header carries a version this reader does not support."""


class EIFTruncatedError(EIFFormatError):
    """The EIF file ends inside its header or inside a section."""


class EIFSectionCountError(EIFFormatError):
    """num_sections is over 32 or disagrees with the offsets/sizes tables or the sections."""


class EIFSectionBoundsError(EIFFormatError):
    """A section's offset or size disagrees with the file layout or points past its end."""


class EIFSectionTypeError(EIFFormatError):
    """A section has an unknown type, or the section types are not in a valid arrangement."""


class EIFChecksumError(EIFFormatError):
    """The EIF CRC32 over the header and the sections does not match the header's value."""


class ImageSignatureFormatError(ImageError, MalformedInputError):
    """A signature section (EIF PcrSignature CBOR, COSE_Sign1, certificate) is malformed."""


class ImageSignatureError(ImageError, VerificationError):
    """An image signature does not verify with its certificate over the image's PCR0."""


class SigningKeyError(ImageError, UsageError):
    """The signing key or certificate given to ``hermetic build`` is unusable or mismatched."""


class NitroCliNotFoundError(ImageError):
    """``nitro-cli`` is not on PATH, so an EIF cannot be built here."""


class EIFBuildError(ImageError):
    """``nitro-cli build-enclave`` failed or produced an EIF whose PCRs disagree with ours."""


class LauncherError(HermeticError):
    """Starting, stopping or reaching an enclave."""


class EnclaveNotFoundError(LauncherError):
    """No enclave with the given ID (or CID) is known to the launcher."""


class EnclaveBootError(LauncherError):
    """The enclave did not come up: it refused to start, crashed or never signalled ready."""


class SandboxError(LauncherError):
    """The launcher could not build the enclave's sandbox (namespace, limits, image)."""


class SandboxUnavailableError(SandboxError):
    """This machine cannot build the enclave sandbox (bubblewrap or user namespaces missing)."""


class RuntimeConfigError(LauncherError, VerificationError):
    """A runtime config bundle is unsigned, tampered, or signed by the wrong operator key."""


class RuntimeConfigFormatError(RuntimeConfigError, MalformedInputError):
    """A runtime config bundle could not be parsed at all."""


class ServiceError(LauncherError):
    """A service call failed: the app raised, or the method does not exist."""

    def __init__(self, message: str, code: str = "InternalError") -> None:
        super().__init__(message)
        self.code = code


class TransportError(HermeticError):
    """A vsock, TCP, Unix or WebSocket transport failed."""


class FrameFormatError(TransportError, MalformedInputError):
    """A length-prefixed frame or a service message on the wire is malformed or too large."""


class PeerUnavailableError(TransportError):
    """The other end (an enclave, the parent, a proxied service) is not reachable or went away."""


class PeerRefusedError(PeerUnavailableError):
    """A local peer is not who the endpoint serves (wrong enclave, host process, wrong uid)."""


class EgressRefusedError(TransportError):
    """The proxy refused an egress destination that is not on the allowlist."""


class ChannelError(HermeticError):
    """The attested Noise channel: handshake, evidence or transport messages."""


class UnsupportedProtocolError(ChannelError, UsageError):
    """The Noise protocol name is not one hermetic accepts (see docs/protocol.md)."""


class HandshakeError(ChannelError):
    """A Noise handshake message was rejected (size, prologue, key, low-order point, tag)."""


class DecryptError(ChannelError):
    """A transport message failed authentication (truncated, reordered, replayed, altered)."""


class FrameError(ChannelError, MalformedInputError):
    """A length-prefixed frame or a chunk header inside a transport message is malformed."""


class MessageTooLargeError(ChannelError):
    """A Noise message or an application message exceeds its size limit."""


class NonceExhaustedError(ChannelError):
    """A cipher state reached the last usable nonce: the session must be replaced."""


class SessionClosedError(ChannelError):
    """The session is closed (after an error or a close message); no further use."""


class SessionStateError(ChannelError):
    """The session was asked to do something its current state does not allow."""


class EvidenceRejectedError(ChannelError, VerificationError):
    """The peer's evidence bundle was rejected by the relying party's verifier callback."""


class RPCFormatError(ChannelError, MalformedInputError):
    """An RPC message is not the CBOR array shape docs/protocol.md specifies."""


class RPCError(ChannelError):
    """A remote procedure call failed; ``code`` is the wire error code (a short string)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.remote_message = message


# channel assembly (client/evidence): evidence bundles, the client's trust file and policy


class EvidenceError(ChannelError):
    """Evidence bundles and the client assembly that verifies them (docs/evidence.md)."""


class EvidenceFormatError(EvidenceError, MalformedInputError):
    """An evidence bundle is not the deterministic CBOR map docs/evidence.md specifies."""


class EvidenceVerificationError(EvidenceError, VerificationError):
    """A well-formed evidence bundle failed a check of the assembly (not of a component)."""


class ConfigDigestMismatchError(EvidenceVerificationError):
    """The document's user_data does not carry the bundle's config digest (or policy's)."""


class ReleasePCRMismatchError(EvidenceVerificationError):
    """The document's PCRs are not the ones the logged release statement records."""


class EndorsementMissingError(EvidenceVerificationError):
    """A non-debug peer sent evidence without an endorsement (release + log proof)."""


class ServiceNotAcceptedError(EvidenceVerificationError):
    """The verified release is for a service the relying party's policy does not accept."""


class ReleaseNotAcceptedError(EvidenceVerificationError):
    """The verified release (its version or PCR0) is not one the policy accepts."""


class ClientTrustError(EvidenceError, UsageError):
    """The client's trust file or policy file lacks a field or has a bad value."""


class ServiceURLError(EvidenceError, UsageError):
    """A service URL is not tcp://, unix://, ws:// or vsock:// in the documented form."""


class TranslogError(HermeticError):
    """The transparency log: proofs, checkpoints, notes, releases."""


class TranslogVerificationError(TranslogError, VerificationError):
    """A well-formed log artefact (proof, note, checkpoint, entry) failed a check."""


class InclusionProofError(TranslogVerificationError):
    """An inclusion proof does not lead from the leaf to the expected root."""


class ConsistencyProofError(TranslogVerificationError):
    """A consistency proof does not link the old tree head to the new one."""


class NoteFormatError(TranslogError, MalformedInputError):
    """A signed note (or a key, or a signature line) is not in C2SP signed-note form."""


class NoteSignatureError(TranslogVerificationError):
    """A signature by a known key does not verify, or no known key signed the note."""


class UnknownKeyError(NoteSignatureError):
    """None of the note's signatures is by a key the verifier knows."""


class CheckpointError(TranslogVerificationError):
    """A checkpoint is signed but not acceptable (origin, size, root or extension lines)."""


class CheckpointFormatError(NoteFormatError):
    """The checkpoint body is not in C2SP tlog-checkpoint form."""


class CosignatureThresholdError(TranslogVerificationError):
    """Fewer trusted witnesses cosigned the checkpoint than the policy requires."""


class SplitViewError(TranslogVerificationError):
    """The log showed two different trees for the same size (a split view)."""


class ForkDetectedError(SplitViewError):
    """A new checkpoint is not an extension of the last one (rollback or bad proof)."""


class WitnessConflictError(TranslogVerificationError):
    """A witness request's old size is not the witness's latest size (tlog-witness 409)."""

    def __init__(self, message: str, current_size: int) -> None:
        super().__init__(message)
        self.current_size = current_size


class TileFormatError(TranslogError, MalformedInputError):
    """A tile path, tile or entry bundle is malformed."""


class RekorEntryError(TranslogVerificationError):
    """A Sigstore/Rekor transparency-log entry failed verification."""


class RekorFormatError(TranslogError, MalformedInputError):
    """A Sigstore bundle or trusted root could not be parsed."""


# translog service side: store, HTTP service, client, releases


class LogStoreError(TranslogError):
    """The log's durable store failed or holds something it must never hold."""


class CheckpointConflictError(LogStoreError):
    """A different checkpoint is already stored for this tree size (never rewritten)."""


class EntryRejectedError(TranslogError, UsageError):
    """The log refused to accept an entry (empty, or longer than a tile bundle allows)."""


class LogServiceError(TranslogError):
    """The log server could not be reached or answered with an error."""


class UnknownLogError(CheckpointError):
    """The checkpoint comes from a log (origin or key) that the verifier does not trust."""


class CosignatureRejectedError(TranslogVerificationError):
    """A witness cosignature is not by a configured witness or does not verify."""


class ReleaseFormatError(TranslogError, MalformedInputError):
    """A release statement, log envelope or endorsement file is not in hermetic's form."""


class TrustBundleError(TranslogError, UsageError):
    """A trust file lacks a field or has a bad value."""


class DuplicateTrustedKeyError(TrustBundleError):
    """One public key is pinned twice: under two witness names, or as the log and a witness.

    Cosignatures do not sign the witness's name, so one key listed twice would let one
    signature count as two witnesses (and the log's own key would witness itself).
    """


class StatementSignatureError(TranslogVerificationError):
    """The publisher's signature over the canonical statement does not verify."""


class UnknownPublisherError(TranslogVerificationError):
    """The statement is signed by a key or certificate that no trusted publisher holds."""


class ReleaseMismatchError(TranslogVerificationError):
    """A verified release does not carry the reference value the caller expected."""


class RekorSubmissionError(TranslogError):
    """A Rekor instance refused a submitted entry or could not be reached."""


class KMSError(HermeticError):
    """The KMS client, CMS parsing or the local KMS server."""


class CMSFormatError(KMSError, MalformedInputError):
    """A ``CiphertextForRecipient`` is not the CMS EnvelopedData shape KMS emits."""


class CMSDecryptionError(KMSError, VerificationError):
    """A well-formed ``CiphertextForRecipient`` did not decrypt with the recipient key.

    Deliberately one type with one message for every cause (OAEP unwrap, key length, CBC
    padding), so a caller cannot be turned into a padding oracle.
    """


class KeyPolicyFormatError(KMSError, MalformedInputError):
    """A key policy is not valid JSON or not the policy-language subset hermetic reads."""


class ReleaseEndorsementFormatError(KMSError, MalformedInputError):
    """A release endorsement handed to the policy helper lacks the PCRs it needs."""


class KMSSealedStoreError(KMSError):
    """The local KMS server's sealed key store is unreadable or was tampered with."""


class KMSServiceError(KMSError):
    """KMS (real or local) rejected a request; ``code`` is the AWS error code.

    The local server raises these and turns them into AWS-shaped JSON errors; the enclave
    client turns botocore's ``ClientError`` back into them, so both sides share one type.
    """

    code: str = "KMSInternalException"
    status: int = 400

    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class KMSAccessDeniedError(KMSServiceError, VerificationError):
    """The key policy, or the attestation evidence behind ``Recipient``, denied the call."""

    code = "AccessDeniedException"


class KMSInvalidCiphertextError(KMSServiceError, VerificationError):
    """A ciphertext blob is corrupted or its encryption context does not match."""

    code = "InvalidCiphertextException"


class KMSNotFoundError(KMSServiceError):
    """The key, alias or other named entity does not exist."""

    code = "NotFoundException"


class KMSValidationError(KMSServiceError):
    """A request parameter is missing or has a value KMS does not accept."""

    code = "ValidationException"


class KMSUnavailableError(KMSError):
    """KMS could not be reached (connection refused, timeout, TLS failure)."""


# --- store: the shared storage layer and the parent's record store ----------------------


class StoreError(HermeticError):
    """Persistent storage (SQLite, PostgreSQL): the shared layer under the log, the local
    KMS and the record store, and the record store itself."""


class StoreLocationError(StoreError, UsageError):
    """A database location is neither a path, a ``sqlite:///`` URL nor a PostgreSQL URL."""


class StoreUnavailableError(StoreError):
    """The database could not be opened or reached (or the connection was lost)."""


class StoreClosedError(StoreError):
    """The store was used after it was closed."""


class StoreIntegrityError(StoreError):
    """The database refused a write that breaks one of its constraints."""


class StoreQueryError(StoreError):
    """A statement failed for another reason (locked too long, disk full, bad SQL)."""


class SchemaError(StoreError):
    """A database's recorded schema does not fit the code that opens it."""


class SchemaTooNewError(SchemaError):
    """The database was migrated by newer code than this one: opening it could corrupt it."""


class SchemaMismatchError(SchemaError):
    """A migration recorded as applied differs from the code's migration of that version."""


class RecordStoreError(StoreError):
    """The parent's record store (core, HTTP service or client)."""


class RecordIdError(RecordStoreError, UsageError):
    """A record id (or list prefix) is empty, too long or not printable ASCII."""


class RecordTooLargeError(RecordStoreError, UsageError):
    """A record's data is larger than the store accepts."""


class RecordVersionError(RecordStoreError, UsageError):
    """An expected version (or an If-Match / If-None-Match header) is malformed or missing."""


class RecordNotFoundError(RecordStoreError):
    """No record is stored under this id (or it was deleted)."""


class VersionConflictError(RecordStoreError):
    """Compare-and-set failed: the record is not at the version the writer expected.

    ``current`` is the version stored now (``None`` when the record does not exist), so a
    writer can re-read and retry.
    """

    def __init__(self, message: str, current: int | None = None) -> None:
        super().__init__(message)
        self.current = current


class RecordServiceError(RecordStoreError):
    """The record store server could not be reached or answered with an error."""


class RecordResponseFormatError(RecordStoreError, MalformedInputError):
    """The record store server's answer is not in the documented form."""


# --- persistence: the key hierarchy and sealed records (issue 10) ------------------------


class PersistenceError(HermeticError):
    """The persistence service's core: key hierarchy, keyrings and sealed records.

    No message of this family carries key material or a record's plaintext.
    """


class PersistenceUsageError(PersistenceError, UsageError):
    """A caller passed a bad value: a store id, tenant or key name outside the naming rules,
    a root key or key material of the wrong size, a counter out of range, a plaintext too
    large to seal."""


class SealedRecordError(PersistenceError, VerificationError):
    """A sealed record does not open; nothing of it is returned."""


class SealedRecordFormatError(SealedRecordError, MalformedInputError):
    """A sealed record is too short, has an unknown format byte, or a header field out of range."""


class RecordAuthenticationError(SealedRecordError):
    """A sealed record fails AES-GCM authentication under the identity it was opened with.

    A flipped byte, another record's bytes under this id (swapped) and a record sealed for
    another store, tenant, key name or under another key all end here: the tag cannot tell
    them apart, and no bit of the record is trusted once it failed.
    """


class RecordReplayError(SealedRecordError):
    """An authentic record whose counter is lower than expected: an older version replayed."""


class RecordCounterError(SealedRecordError):
    """An authentic record whose counter is higher than expected: the caller's expected state
    is older than the record (the caller's own state is stale or was rolled back)."""


# --- persistence: the store state anchored in the transparency log (issue 10 item 5) ------


class AnchorError(PersistenceError, VerificationError):
    """The record store's state and the state the service anchored in the transparency log
    disagree, or the log could not show a recent enough anchored state. Every message names
    the state that was expected (sequence number, Merkle root, log index) and what was
    found; nothing of the store is served after one."""


class StaleCheckpointError(AnchorError):
    """No witnessed checkpoint of the log carries enough cosignatures recent by the trusted
    clock: the log may be withholding its newest entries (and with them the newest state
    statements), or its witnesses stopped cosigning."""


class StoreRollbackError(AnchorError):
    """The store is at an older state than the newest one anchored in the log (a database
    restored from an older copy, the state record deleted or replaced by an older one), or
    the log holds no state for a store that has one."""


class StoreStateMismatchError(AnchorError):
    """The store's records are not those of the state its state record names: a record's
    bytes edited, two records swapped, an older version of a record replayed, a record
    deleted or added by the host."""


class StateKeyMismatchError(AnchorError):
    """The store id is anchored in the log under a signing key the service's root key does
    not derive, or its state record is not signed by that key: the root-key record was
    replaced, or the store id belongs to another deployment."""


class StateForkError(AnchorError):
    """Two different state statements with the same sequence number for one store, both
    signed by the service's key: two writers on one store, or a forked history."""


class StateRecordError(AnchorError, MalformedInputError):
    """The store's state record, or a state statement, is not in the documented form."""


class StateConflictError(AnchorError):
    """The state record changed under this writer: another instance writes the same store
    (the anchored store admits one writer per store id); nothing was acknowledged."""


class AnchorTimeoutError(AnchorError):
    """A write's state statement was not in a checkpoint cosigned by the witness quorum
    before the deadline: the write is in the store but was not acknowledged as anchored."""


class KeyringError(PersistenceError):
    """A tenant's keyring: its named keys, their versions and its own sealed state."""


class KeyringFormatError(KeyringError, MalformedInputError):
    """An opened keyring state is not the canonical CBOR form docs/persistence.md specifies."""


class KeyNotFoundError(KeyringError):
    """The tenant's keyring holds no key of this name."""


class UnknownKeyVersionError(KeyNotFoundError):
    """The key exists but this version never did (or the version is not a data key's)."""


class KeyRetiredError(KeyringError):
    """The key version was retired: its material is gone and its records cannot be opened."""


class KeyringStateError(KeyringError, UsageError):
    """The keyring's state does not allow the operation (the name exists already, the version
    is the current one, a limit is reached)."""


class TenantNotFoundError(KeyringError):
    """The record store holds no keyring for this tenant (never created, or deleted by the
    host: the store is untrusted, so a missing keyring is reported, never recreated)."""


class TenantExistsError(KeyringStateError):
    """``create_tenant`` of a tenant whose keyring is already in the store."""


class PersistenceConflictError(PersistenceError):
    """A keyring or record changed under every compare-and-set attempt: too many writers
    at once, or a store that keeps moving; nothing was written."""


class RootKeyError(PersistenceError):
    """The persistence service could not obtain its root key at boot: KMS refused
    (``AccessDeniedException``: this image's PCRs are not the ones the key policy pins),
    the kept ``CiphertextBlob`` is not one KMS decrypts, or KMS answered with a key of the
    wrong size. The service then serves nothing that needs a key."""


class PersistenceConfigError(PersistenceError, UsageError):
    """The ``persistence`` section of the runtime config is missing or malformed."""


class AccessDeniedError(PersistenceError):
    """The access policy does not admit this caller for this key: not an attested XX
    session, a release the policy names for no key class of this name, or a tenant whose
    admin has not enabled the feature that admits it. The refusal is in the tenant's audit
    trail."""


class AdminSignatureError(PersistenceError, VerificationError):
    """An admin request's Ed25519 signature does not verify under the tenant admin's key
    registered at ``create_tenant`` (forged, made for another store, tenant, operation,
    name, material or counter, or by another key)."""


class AdminReplayError(AdminSignatureError):
    """An admin request with a valid signature whose counter is not above the last one the
    service accepted for this tenant: a replayed (or reordered) request."""


class AccessPolicyError(PersistenceError, MalformedInputError):
    """The access policy document (or its logged endorsement) is malformed, or its digest is
    not the one the logged policy statement names."""


class AuditTrailError(PersistenceError, VerificationError):
    """A tenant's audit trail does not verify: an entry is missing, reordered, edited or
    does not chain from the previous one, or the trail ends before the head it must reach."""


class ConfigError(UsageError):
    """A configuration file or manifest is missing a field or has a bad value."""


# --- gateway: the attestation deputy, its admission policy and receipts (issue 11) -------


class GatewayError(HermeticError):
    """The enclave gateway: admission of backends, routing, receipts."""


class AdmissionPolicyError(GatewayError, MalformedInputError):
    """The admission policy document (or its logged endorsement) is malformed, or its digest
    is not the one the logged ``hermetic.gateway-policy/v1`` statement names."""


class GatewayConfigError(GatewayError, UsageError):
    """The ``gateway`` section of the runtime config is missing or malformed."""


class GatewayUsageError(GatewayError, UsageError):
    """A gateway client call that cannot be done as asked, e.g. saving the receipts of a
    session opened to keep none."""


class BackendHintError(GatewayError, UsageError):
    """A backend hint from the parent is malformed (service name, address)."""


class BackendRefusedError(GatewayError, VerificationError):
    """A backend the parent pointed at did not pass admission: its evidence failed (another
    service than the hint said, a release or a debug mode the admission policy does not
    admit, a replayed or relayed bundle), or it refused the gateway's own evidence."""


class BackendUnavailableError(GatewayError):
    """No admitted backend instance of the service could take the request (none admitted
    yet, all refused or gone), or the one chosen went away mid-request."""


class UnknownServiceError(GatewayError):
    """The request names a service the admission policy does not list."""


class GatewayRequestError(GatewayError, MalformedInputError):
    """A client's request to the gateway is malformed (not a map of service, method and
    args, wrong types), or a method is called on the wrong port."""


class RequestTooLargeError(GatewayError):
    """A client's request (or a backend's response) is larger than the gateway's limit."""


class GatewayOverloadedError(GatewayError):
    """The gateway refused a request because this client (or all clients together) already
    has as many requests in flight as its limits allow; nothing was queued. Try later."""


class ReceiptError(GatewayError, VerificationError):
    """A gateway receipt does not verify: signature, session, request or response digest,
    admission policy, or the key binding to the gateway's attestation."""


class ReceiptFormatError(ReceiptError, MalformedInputError):
    """A receipt, or a saved receipts file, could not be parsed at all."""


class ReceiptSignatureError(ReceiptError):
    """A receipt's Ed25519 signature does not verify under the gateway's receipt key
    (a flipped byte, a forged or edited receipt)."""


class ReceiptSessionError(ReceiptError):
    """A receipt names another client session than the one it is presented for."""


class ReceiptMismatchError(ReceiptError):
    """A receipt covers another request or response than the one it came with, or names
    another service than the one called."""


class ReceiptNotAdmittedError(ReceiptError):
    """A receipt names a backend release the logged admission policy does not admit for
    its service, or another admission policy than the gateway's logged one."""


class ReceiptKeyError(ReceiptError):
    """The receipt key is not bound to a verified gateway attestation (the key evidence
    does not verify, names another key, or another config than the one presented)."""


# --- reporting: sealed sign-in event batches and their aggregates (issue 12) -------------


class ReportingError(HermeticError):
    """The reporting core: event batches, the synthetic tenant, aggregates and reports.

    No message of this family carries a member, device or app name, or key material.
    """


class ReportingUsageError(ReportingError, UsageError):
    """A caller passed a bad value: an insights key of the wrong size, a tenant id outside
    the naming rule, a name that is not NFC text without controls, too many events."""


class BatchError(ReportingError, VerificationError):
    """A sealed event batch was rejected; nothing of it is aggregated."""


class BatchFormatError(BatchError, MalformedInputError):
    """A sealed batch, or its plaintext once opened, is not in the documented layout."""


class BatchSchemaError(BatchFormatError):
    """A sealed batch names a schema version this reader does not support."""


class BatchTenantError(BatchError):
    """A sealed batch names another tenant than the one it is opened for."""


class BatchIdError(BatchError):
    """A sealed batch's batch id is not the id it was stored under."""


class BatchAuthenticationError(BatchError):
    """A sealed batch fails AES-GCM authentication: a flipped byte, a batch moved to another
    batch id, tenant or schema version, or sealed under another key."""


class BatchReplayError(BatchError):
    """An authentic batch whose batch id an aggregate has already absorbed."""


class AggregateStateError(ReportingError, MalformedInputError):
    """Serialized aggregate state is not in the documented canonical form."""


class AggregateMergeError(ReportingError):
    """Two aggregates cannot merge: other tenants, or a batch absorbed by both."""


class IngestError(ReportingError):
    """Event ingestion: the parent's upload endpoint for sealed batches and its client."""


class BatchTooLargeError(IngestError, UsageError):
    """An uploaded batch is over the ingestion endpoint's size limit (HTTP 413)."""


class BatchConflictError(IngestError):
    """A batch id the tenant already stored with other bytes: a second, different upload
    of one batch is refused (HTTP 409); the same bytes again are accepted as stored."""


class IngestServiceError(IngestError):
    """The ingestion endpoint is unreachable, failed, or answered outside its documented
    form."""


# --- WAN emulation (issue 12 item 6) -------------------------------------------------------


class WanUsageError(UsageError):
    """A bandwidth, delay or burst the WAN relay cannot use."""
