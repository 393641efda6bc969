"""What a client pins (the trust bundle) and what it accepts (the service policy).

Why two objects: the trust bundle answers *whom do I believe* (the Nitro root, the log and
its witnesses, the publishers) and is shared by every connection a client makes; the policy
answers *what do I accept from them* (which services and releases, debug or not, how old a
document may be) and differs per call site. Both load from small JSON files documented in
``docs/evidence.md``.

The trust bundle extends the log's :class:`~hermetic.translog.release.TrustBundle` (its
``log`` and ``publishers`` sections) with a ``nitro_root`` section; the log's loader keeps
unknown sections, so one file serves ``hermetic release verify`` and ``hermetic connect``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from hermetic.attestation import AttestationVerifier, TrustRoot
from hermetic.errors import ClientTrustError, ReleaseFormatError, TrustRootError
from hermetic.translog.release import (
    LogTrust,
    SignedStatement,
    TrustBundle,
    TrustedPublisher,
    VerifiedRelease,
    load_json_file,
    parse_json,
)

ROOT_SECTION = "nitro_root"
DEFAULT_MAX_AGE = timedelta(minutes=5)
_HEX = frozenset("0123456789abcdef")
_RELEASE_CACHE_SIZE = 64


class ReleaseCache:
    """A bounded LRU of verified endorsements, keyed by their exact bytes.

    An enclave sends the same endorsement on every handshake; its verification (publisher
    signature, log signature, cosignatures, inclusion) does not depend on the time unless
    the publisher is pinned by CA, so the verifier only repeats it for new bytes.

    It also keeps the parsed log entry of each verified endorsement, keyed by the entry's
    exact bytes, so decoding the next bundle does not re-parse the same JSON
    (:meth:`parse_entry`); parsing is deterministic, so this changes no result.
    """

    def __init__(self, size: int = _RELEASE_CACHE_SIZE) -> None:
        self._size = size
        self._items: OrderedDict[tuple[object, ...], VerifiedRelease] = OrderedDict()
        self._entries: OrderedDict[bytes, SignedStatement] = OrderedDict()

    def get(self, key: tuple[object, ...]) -> VerifiedRelease | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(
        self,
        key: tuple[object, ...],
        value: VerifiedRelease,
        *,
        entry: bytes,
        signed: SignedStatement,
    ) -> None:
        """Remember ``value``, verified from the endorsement ``key`` whose entry is ``entry``
        (parsed as ``signed``)."""
        self._items[key] = value
        self._entries[bytes(entry)] = signed
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def parse_entry(self, entry: bytes) -> SignedStatement:
        """:meth:`SignedStatement.from_entry`, reusing the parse of a verified entry."""
        found = self._entries.get(entry) if type(entry) is bytes else None
        if found is not None:
            self._entries.move_to_end(entry)
            return found
        return SignedStatement.from_entry(entry)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class ClientTrust:
    """The pinned Nitro root plus the log trust bundle, with warm verifiers.

    ``attestation`` keeps verified certificate chains between sessions (steady-state cost
    near one P-384 verify per document) and ``releases`` keeps verified endorsements; both
    live and die with this object, nothing is global.
    """

    root: TrustRoot
    translog: TrustBundle
    attestation: AttestationVerifier = field(init=False, repr=False, compare=False)
    releases: ReleaseCache = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attestation", AttestationVerifier(self.root))
        object.__setattr__(self, "releases", ReleaseCache())

    @classmethod
    def from_json(cls, value: Any) -> ClientTrust:
        if not isinstance(value, dict):
            raise ClientTrustError("trust file must be a JSON object")
        if ROOT_SECTION not in value:
            raise ClientTrustError(
                f"trust file: {ROOT_SECTION} (the pinned Nitro root) is required"
            )
        root = _load_root(value[ROOT_SECTION])
        return cls(root, TrustBundle.from_json(value))

    @classmethod
    def loads(cls, data: bytes | str, what: str = "trust file") -> ClientTrust:
        try:
            value = parse_json(data, what)
        except ReleaseFormatError as exc:
            raise ClientTrustError(str(exc)) from None
        return cls.from_json(value)

    @classmethod
    def load(cls, path: str | Path) -> ClientTrust:
        return cls.from_json(load_json_file(path, "trust file", ClientTrustError))

    def to_json(self) -> dict[str, Any]:
        return _trust_json(self.root, self.translog)

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=2).encode("utf-8") + b"\n"


def _load_root(value: Any) -> TrustRoot:
    where = f"trust file: {ROOT_SECTION}"
    if not isinstance(value, dict):
        raise ClientTrustError(f"{where} must be an object with name, sha256 and/or pem")
    extra = sorted(set(value) - {"name", "sha256", "pem"})
    if extra:
        raise ClientTrustError(f"{where} has unexpected field(s) {', '.join(extra)}")
    name = value.get("name", "custom")
    pin = value.get("sha256")
    pem = value.get("pem")
    if not isinstance(name, str) or not name:
        raise ClientTrustError(f"{where}.name must be a non-empty string")
    if pin is not None and (not isinstance(pin, str) or len(pin) != 64 or set(pin) - _HEX):
        raise ClientTrustError(f"{where}.sha256 must be 64 lowercase hex digits")
    if pem is not None and not isinstance(pem, str):
        raise ClientTrustError(f"{where}.pem must be a PEM string")
    try:
        if pem is not None:
            if pin is None:
                raise ClientTrustError(
                    f"{where}: a PEM root must be pinned by its sha256 fingerprint"
                )
            return TrustRoot.from_pem(
                pem.encode("ascii", "replace"), name=name, expected_sha256=pin
            )
        if name == "aws":
            root = TrustRoot.aws()
        elif name == "dev":
            root = TrustRoot.dev()
        else:
            raise ClientTrustError(
                f"{where}: name {name!r} needs a pem (only aws and dev are built in)"
            )
    except TrustRootError as exc:
        raise ClientTrustError(f"{where}: {exc}") from None
    if pin is not None and root.fingerprint != pin:
        raise ClientTrustError(
            f"{where}: {name} root SHA-256 fingerprint expected {pin}, got {root.fingerprint}"
        )
    return root


def _trust_json(root: TrustRoot, log: TrustBundle) -> dict[str, Any]:
    out = log.to_json()
    pinned: dict[str, Any] = {"name": root.name, "sha256": root.fingerprint}
    if root.name != "aws":
        pinned["pem"] = root.certificate.public_bytes(Encoding.PEM).decode("ascii")
    out[ROOT_SECTION] = pinned
    return out


def write_trust_bundle(
    path: str | Path,
    *,
    log_vkey: str,
    witness_vkeys: Sequence[str] = (),
    threshold: int = 0,
    publishers: Mapping[str, str] | Iterable[TrustedPublisher] = (),
    root: TrustRoot | None = None,
    origin: str | None = None,
) -> ClientTrust:
    """Write a client trust file (default root: this machine's emulator dev root, created
    if needed).

    ``publishers`` maps a name to a PEM public key or certificate, or is a sequence of
    :class:`TrustedPublisher`. The dev root's PEM is embedded (and pinned by fingerprint)
    so the file works from any state directory. The file is validated by loading it back
    before it replaces ``path`` (atomically).
    """
    pinned = root if root is not None else _local_dev_root()
    if isinstance(publishers, Mapping):
        items = [
            TrustedPublisher(
                name,
                **{("certificate_pem" if "BEGIN CERTIFICATE" in pem else "public_key_pem"): pem},
            )
            for name, pem in publishers.items()
        ]
    else:
        items = list(publishers)
    bundle = TrustBundle(LogTrust(log_vkey, tuple(witness_vkeys), threshold, origin), tuple(items))
    data = json.dumps(_trust_json(pinned, bundle), indent=2).encode("utf-8") + b"\n"
    trust = ClientTrust.loads(data)  # validates every key and the root pin
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return trust


def _local_dev_root() -> TrustRoot:
    """This machine's dev root, creating the emulated PKI first if it does not exist yet."""
    from datetime import UTC, datetime

    from hermetic.nsm.pki import DevPKI

    return DevPKI().trust_root(datetime.now(UTC))


# --- policy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServicePolicy:
    """Which services and releases a client accepts.

    ``services``, ``versions``, ``pcr0s`` and ``config_digests`` are allow-lists; ``None``
    means "any" (a release is still only accepted if a trusted publisher logged it).
    ``allow_debug`` admits debug-mode enclaves, whose PCRs are zero and so never match a
    release: the peer is then marked ``debug`` and nothing about its code is proven.
    ``max_age`` bounds how old the (per-handshake) attestation document may be.
    """

    services: frozenset[str] | None = None
    versions: frozenset[str] | None = None
    pcr0s: frozenset[str] | None = None
    config_digests: frozenset[str] | None = None
    allow_debug: bool = False
    max_age: timedelta = DEFAULT_MAX_AGE

    def __post_init__(self) -> None:
        for name in ("services", "versions", "pcr0s", "config_digests"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ClientTrustError(f"policy {name}: expected a set of non-empty strings")
            object.__setattr__(self, name, frozenset(value))
        for name in ("pcr0s", "config_digests"):
            value = getattr(self, name)
            if value is not None:
                lowered = frozenset(v.lower() for v in value)
                if any(set(v) - _HEX or len(v) % 2 for v in lowered):
                    raise ClientTrustError(f"policy {name}: expected lowercase hex strings")
                object.__setattr__(self, name, lowered)
        if not isinstance(self.allow_debug, bool):
            raise ClientTrustError("policy allow_debug: expected a boolean")
        if not isinstance(self.max_age, timedelta) or self.max_age < timedelta(0):
            raise ClientTrustError(
                f"policy max_age: expected a non-negative timedelta, got {self.max_age!r}"
            )

    def with_service(self, service: str | None) -> ServicePolicy:
        """The same policy narrowed to one service (``--service``)."""
        if service is None:
            return self
        services = frozenset({service})
        if self.services is not None and service not in self.services:
            raise ClientTrustError(f"--service {service!r} is not among the policy's services")
        return _replace(self, services=services)

    def with_debug(self, allow: bool) -> ServicePolicy:
        return _replace(self, allow_debug=self.allow_debug or allow)

    @classmethod
    def from_json(cls, value: Any) -> ServicePolicy:
        if not isinstance(value, dict):
            raise ClientTrustError("policy file must be a JSON object")
        known = {"services", "versions", "pcr0", "config_digests", "allow_debug",
                 "max_age_seconds"}  # fmt: skip
        extra = sorted(set(value) - known)
        if extra:
            raise ClientTrustError(f"policy file: unexpected field(s) {', '.join(extra)}")
        sets: dict[str, frozenset[str] | None] = {}
        for key, attr in (("services", "services"), ("versions", "versions"), ("pcr0", "pcr0s"),
                          ("config_digests", "config_digests")):  # fmt: skip
            raw = value.get(key)
            if raw is None:
                sets[attr] = None
            elif isinstance(raw, list) and all(isinstance(v, str) for v in raw):
                sets[attr] = frozenset(raw)
            else:
                raise ClientTrustError(f"policy file: {key} must be a list of strings")
        allow_debug = value.get("allow_debug", False)
        if not isinstance(allow_debug, bool):
            raise ClientTrustError("policy file: allow_debug must be true or false")
        max_age = value.get("max_age_seconds", int(DEFAULT_MAX_AGE.total_seconds()))
        if not isinstance(max_age, int) or isinstance(max_age, bool) or max_age < 0:
            raise ClientTrustError(
                f"policy file: max_age_seconds must be an integer >= 0, got {max_age!r}"
            )
        return cls(
            services=sets["services"],
            versions=sets["versions"],
            pcr0s=sets["pcr0s"],
            config_digests=sets["config_digests"],
            allow_debug=allow_debug,
            max_age=timedelta(seconds=max_age),
        )

    @classmethod
    def load(cls, path: str | Path) -> ServicePolicy:
        return cls.from_json(load_json_file(path, "policy file", ClientTrustError))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, attr in (("services", "services"), ("versions", "versions"), ("pcr0", "pcr0s"),
                          ("config_digests", "config_digests")):  # fmt: skip
            value = getattr(self, attr)
            if value is not None:
                out[key] = sorted(value)
        out["allow_debug"] = self.allow_debug
        out["max_age_seconds"] = int(self.max_age.total_seconds())
        return out


def _replace(policy: ServicePolicy, **changes: Any) -> ServicePolicy:
    import dataclasses

    return dataclasses.replace(policy, **changes)


__all__ = [
    "DEFAULT_MAX_AGE",
    "ClientTrust",
    "ReleaseCache",
    "ServicePolicy",
    "write_trust_bundle",
]
