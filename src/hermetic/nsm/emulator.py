"""The emulated Nitro Secure Module: the real message protocol, served by the launcher.

Locally the launcher plays the Nitro hypervisor, so it also plays the NSM: it owns the PCR
bank and the signing keys, and the enclave process only ever sees request/response bytes
(over the socket of :mod:`hermetic.nsm.server`). That is what keeps an emulated enclave
from lying about its own measurements.

:class:`EmulatedNSM` is sans-IO: :meth:`EmulatedNSM.handle` takes the bytes of one request
and returns the bytes of one response, exactly as ``/dev/nsm`` would. It answers every
input, including garbage, with a response message (an ``Error`` one when the request is
refused), and follows the real module's semantics as AWS's hardware test ``nsm-check``
pins them: 32 SHA-384 PCRs, 0-15 locked at boot, ``extend = SHA384(old || data)``,
``ReadOnlyIndex`` on a locked PCR, ``InvalidIndex`` past PCR 31, documents listing the
locked PCRs and signed by a leaf of the emulated Nitro PKI (:mod:`hermetic.nsm.pki`).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from hermetic.attestation.codec import (
    PROTECTED_ES384,
    AttestationDocument,
    encode_cose_sign1,
    encode_payload,
    sig_structure,
)
from hermetic.errors import HermeticError, NSMError
from hermetic.nsm.messages import (
    REQUEST_MAX_SIZE,
    AttestationRequest,
    AttestationResponse,
    DescribeNSMRequest,
    DescribeNSMResponse,
    DescribePCRRequest,
    DescribePCRResponse,
    Digest,
    ErrorCode,
    ErrorResponse,
    ExtendPCRRequest,
    ExtendPCRResponse,
    GetRandomRequest,
    GetRandomResponse,
    LockPCRRequest,
    LockPCRResponse,
    LockPCRsRequest,
    LockPCRsResponse,
    Request,
    Response,
    decode_request,
    encode_response,
)
from hermetic.nsm.pki import MODULE_ID_PATTERN, DevPKI

MAX_PCRS = 32
PCR_SIZE = 48
BOOT_LOCKED_PCRS = frozenset(range(16))
#: user_data, nonce and public_key: real modules accept 1024 bytes each.
MAX_ATTESTATION_FIELD = 1024
RANDOM_SIZE = 256
#: What DescribeNSM reports. No capture from hardware is public (reference/nitro.md 7.6);
#: 1.0.0 marks the first layout of the message set emulated here.
VERSION = (1, 0, 0)

_ZERO_PCR = bytes(PCR_SIZE)


def measurement(data: bytes) -> bytes:
    """``SHA384(0^48 || data)``: a PCR extended once from zero (how Nitro fills PCR4, and
    how the EIF tool finalises PCR0-2 over the image digest)."""
    return hashlib.sha384(_ZERO_PCR + data).digest()


#: PCR0/1/2 of an empty image: ``SHA384(0^48 || SHA384(b""))``; non-zero, so not debug.
EMPTY_IMAGE_PCR = measurement(hashlib.sha384(b"").digest())
DEBUG_ZEROED_PCRS = (0, 1, 2, 8)


def _system_clock() -> datetime:
    return datetime.now(UTC)


def new_module_id(instance_id: str, now: datetime) -> str:
    """A module id in the real format ``i-<17 hex>-enc<16 hex>``.

    Real enclave ids are the boot time in ms (48 bits) followed by 16 more bits, which is
    what we generate too.
    """
    boot_ms = int(now.timestamp() * 1000) & 0xFFFF_FFFF_FFFF
    return f"{instance_id}-enc{boot_ms:012x}{secrets.token_hex(2)}"


class EmulatedNSM:
    """One enclave's NSM: a PCR bank, a module id and access to the dev PKI.

    ``pcrs`` are the initial values the launcher measured (index -> 48 bytes). Without
    them PCR0-2 hold the empty-image measurement. PCR4 is always the parent instance id
    measurement, as on hardware, unless given. ``debug=True`` zeroes PCR0/1/2/8 like a
    debug-mode enclave. ``clock`` is only used when :meth:`handle` is not given ``now``.
    """

    def __init__(
        self,
        pcrs: Mapping[int, bytes] | None = None,
        *,
        debug: bool = False,
        pki: DevPKI | None = None,
        module_id: str | None = None,
        now: datetime | None = None,
        clock: Callable[[], datetime] = _system_clock,
    ) -> None:
        self._clock = clock
        self._pki = pki if pki is not None else DevPKI()
        instance_id = self._pki.instance_id()
        if module_id is None:
            module_id = new_module_id(instance_id, now if now is not None else clock())
        elif not MODULE_ID_PATTERN.fullmatch(module_id):
            raise NSMError(
                f"module_id: expected i-<17 hex>-enc<16 hex>, got {module_id[:60]!r}",
                "InvalidArgument",
            )
        self.module_id = module_id
        self.debug = debug
        bank = [_ZERO_PCR] * MAX_PCRS
        bank[4] = measurement(instance_id.encode("ascii"))
        if pcrs is None:
            bank[0] = bank[1] = bank[2] = EMPTY_IMAGE_PCR
        else:
            for index, value in pcrs.items():
                if isinstance(index, bool) or not isinstance(index, int):
                    raise NSMError(f"pcrs: index must be an int, got {index!r}", "InvalidArgument")
                if not 0 <= index < MAX_PCRS:
                    raise NSMError(f"pcrs: index must be 0..31, got {index}", "InvalidIndex")
                if not isinstance(value, bytes) or len(value) != PCR_SIZE:
                    raise NSMError(
                        f"pcrs[{index}]: expected {PCR_SIZE} bytes, got "
                        f"{len(value) if isinstance(value, bytes) else type(value).__name__}",
                        "InvalidArgument",
                    )
                bank[index] = value
        if debug:
            for index in DEBUG_ZEROED_PCRS:
                bank[index] = _ZERO_PCR
        self._pcrs = bank
        self._locked: set[int] = set(BOOT_LOCKED_PCRS)

    # --- the module ----------------------------------------------------------------------

    def handle(self, request: bytes, now: datetime | None = None) -> bytes:
        """Answer one request message with one response message (never raises)."""
        try:
            response = self._respond(request, now)
        except NSMError as exc:
            codes = {c.value: c for c in ErrorCode}
            response = ErrorResponse(codes.get(exc.code, ErrorCode.INTERNAL_ERROR))
        except (HermeticError, OSError):
            # The PKI could not be read or written: the module itself failed.
            response = ErrorResponse(ErrorCode.INTERNAL_ERROR)
        return encode_response(response)

    def transact(self, request: bytes) -> bytes:
        """:class:`~hermetic.nsm.client.Backend` interface, for in-process use."""
        return self.handle(request)

    @property
    def locked_pcrs(self) -> frozenset[int]:
        return frozenset(self._locked)

    def pcr(self, index: int) -> bytes:
        """The current value of one PCR (launcher-side inspection)."""
        return self._pcrs[index]

    def _respond(self, raw: bytes, now: datetime | None) -> Response:
        if len(raw) > REQUEST_MAX_SIZE:
            raise NSMError(
                f"request: expected at most {REQUEST_MAX_SIZE} bytes, got {len(raw)}",
                "InputTooLarge",
            )
        request: Request = decode_request(raw)
        match request:
            case DescribePCRRequest(index=index):
                self._check_index(index)
                return DescribePCRResponse(lock=index in self._locked, data=self._pcrs[index])
            case ExtendPCRRequest(index=index, data=data):
                self._check_index(index)
                if index in self._locked:
                    raise NSMError(f"PCR{index} is locked", "ReadOnlyIndex")
                self._pcrs[index] = hashlib.sha384(self._pcrs[index] + data).digest()
                return ExtendPCRResponse(data=self._pcrs[index])
            case LockPCRRequest(index=index):
                self._check_index(index)
                if index in self._locked:
                    raise NSMError(f"PCR{index} is already locked", "ReadOnlyIndex")
                self._locked.add(index)
                return LockPCRResponse()
            case LockPCRsRequest(range=range_):
                if range_ > MAX_PCRS:
                    raise NSMError(f"range: expected 0..{MAX_PCRS}, got {range_}", "InvalidIndex")
                self._locked.update(range(range_))
                return LockPCRsResponse()
            case DescribeNSMRequest():
                return DescribeNSMResponse(
                    version_major=VERSION[0],
                    version_minor=VERSION[1],
                    version_patch=VERSION[2],
                    module_id=self.module_id,
                    max_pcrs=MAX_PCRS,
                    locked_pcrs=tuple(sorted(self._locked)),
                    digest=Digest.SHA384,
                )
            case AttestationRequest():
                return AttestationResponse(document=self._attest(request, now))
            case GetRandomRequest():
                return GetRandomResponse(random=secrets.token_bytes(RANDOM_SIZE))

    @staticmethod
    def _check_index(index: int) -> None:
        if index >= MAX_PCRS:
            raise NSMError(f"PCR index: expected 0..{MAX_PCRS - 1}, got {index}", "InvalidIndex")

    def _attest(self, request: AttestationRequest, now: datetime | None) -> bytes:
        for name in ("user_data", "nonce", "public_key"):
            value = getattr(request, name)
            if value is not None and len(value) > MAX_ATTESTATION_FIELD:
                raise NSMError(
                    f"{name}: expected at most {MAX_ATTESTATION_FIELD} bytes, got {len(value)}",
                    "InputTooLarge",
                )
        when = now if now is not None else self._clock()
        credentials = self._pki.credentials(self.module_id, when)
        document = AttestationDocument(
            module_id=self.module_id,
            digest="SHA384",
            timestamp=int(when.timestamp() * 1000),
            pcrs={index: self._pcrs[index] for index in sorted(self._locked)},
            certificate=credentials.leaf.der,
            cabundle=credentials.cabundle_der,
            public_key=request.public_key,
            user_data=request.user_data,
            nonce=request.nonce,
        )
        payload = encode_payload(document)
        signature = credentials.leaf.private_key.sign(
            sig_structure(PROTECTED_ES384, payload), ec.ECDSA(hashes.SHA384())
        )
        r, s = decode_dss_signature(signature)
        return encode_cose_sign1(payload, r.to_bytes(48, "big") + s.to_bytes(48, "big"))
