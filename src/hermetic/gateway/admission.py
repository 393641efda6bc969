"""The admission policy: which backend releases the gateway may route each service to.

The gateway attests every backend on its clients' behalf, so what it accepts must be as
visible as what a client would accept itself. The policy is a small document::

    {"type": "hermetic.gateway-admission/v1",
     "gateway": "gw-eu1",
     "services": {"alpha": {"pcr0": ["7158..."], "allow_debug": false},
                  "beta": {"versions": ["1.0.0"]}}}

Per service: ``versions`` and ``pcr0`` are allow-lists of the service's releases (absent:
any release a trusted publisher logged for that service name); ``allow_debug`` (default
false) admits debug-mode backends, whose code nothing proves. A backend is admitted for a
service only if its evidence verifies (docs/evidence.md §4) and its *logged* release names
that service: the service name comes from the publisher's signed statement, never from the
backend or from the parent's hint.

The **digest** is SHA-256 of the canonical JSON (sorted keys, no whitespace, UTF-8). A
publisher logs it as a ``hermetic.gateway-policy/v1`` statement with subject
``gateway/<gateway>``; the operator puts the document and that endorsement in the gateway's
signed runtime config, whose digest is in every attestation document the gateway produces.
The gateway refuses to start unless the endorsement verifies and names this digest
(:func:`verify_logged`), and a client does the same check on the config the gateway shows it
(:mod:`hermetic.gateway.client`), so both know the policy in force is the logged one.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from hermetic.client.trust import ServicePolicy
from hermetic.errors import AdmissionPolicyError, HermeticError
from hermetic.jsontext import typed_document
from hermetic.translog.release import (
    GATEWAY_POLICY_V1,
    Endorsement,
    PolicyStatement,
    TrustBundle,
    VerifiedRelease,
    canonical_json,
    verify_endorsement,
)

__all__ = [
    "ADMISSION_V1",
    "AdmissionPolicy",
    "ServiceAdmission",
    "verify_logged",
]

ADMISSION_V1 = "hermetic.gateway-admission/v1"
MAX_SERVICES = 256
MAX_LIST = 64
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_PCR0 = re.compile(r"[0-9a-f]{96}")


def check_name(value: object, field: str) -> str:
    """A gateway or service name: 1 to 64 of ``a-z 0-9 . _ -``, starting with a letter or
    digit (the rule manifests use for service names)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise AdmissionPolicyError(
            f"{field}: expected a name of 1 to 64 characters a-z 0-9 . _ -, got {value!r:.80}"
        )
    return value


def _list(value: object, field: str, pattern: re.Pattern[str] | None) -> tuple[str, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LIST:
        raise AdmissionPolicyError(
            f"{field}: expected a list of 1 to {MAX_LIST}, got {value!r:.80}"
        )
    items: list[str] = []
    for i, item in enumerate(value):
        ok = isinstance(item, str) and (
            pattern.fullmatch(item) if pattern else 1 <= len(item) <= 128
        )
        if not ok:
            raise AdmissionPolicyError(f"{field}[{i}]: unexpected value {item!r:.80}")
        items.append(str(item))
    if len(set(items)) != len(items):
        raise AdmissionPolicyError(f"{field}: entries must be unique")
    return tuple(items)


@dataclass(frozen=True)
class ServiceAdmission:
    """What the gateway accepts as an instance of one service."""

    versions: tuple[str, ...] | None = None
    pcr0s: tuple[str, ...] | None = None
    allow_debug: bool = False

    def admits(self, version: str | None, pcr0: str, debug: bool) -> bool:
        """Whether a backend of this service with this release (a debug one has no version
        and a zero PCR0) is admitted: the offline form of :meth:`service_policy`."""
        if debug:
            return self.allow_debug and self.versions is None and self.pcr0s is None
        return (self.versions is None or version in self.versions) and (
            self.pcr0s is None or pcr0 in self.pcr0s
        )

    def to_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {}
        if self.versions is not None:
            value["versions"] = list(self.versions)
        if self.pcr0s is not None:
            value["pcr0"] = list(self.pcr0s)
        if self.allow_debug:
            value["allow_debug"] = True
        return value


@dataclass(frozen=True)
class AdmissionPolicy:
    """A parsed admission policy (module docstring); build it with :meth:`from_json`."""

    gateway: str
    services: Mapping[str, ServiceAdmission]

    @classmethod
    def from_json(cls, value: object) -> AdmissionPolicy:
        where = "admission policy"
        fields = {"type", "gateway", "services"}
        value = typed_document(
            value, where=where, type_=ADMISSION_V1, fields=fields, error=AdmissionPolicyError
        )
        gateway = check_name(value["gateway"], f"{where}.gateway")
        raw = value["services"]
        if not isinstance(raw, dict) or not 1 <= len(raw) <= MAX_SERVICES:
            raise AdmissionPolicyError(
                f"{where}.services: expected an object of 1 to {MAX_SERVICES} services"
            )
        services: dict[str, ServiceAdmission] = {}
        for name, rule in raw.items():
            at = f"{where}.services.{name!s:.64}"
            check_name(name, f"{where}.services key")
            if not isinstance(rule, dict):
                raise AdmissionPolicyError(f"{at}: expected an object, got {type(rule).__name__}")
            unknown = sorted(str(k) for k in set(rule) - {"versions", "pcr0", "allow_debug"})
            if unknown:
                raise AdmissionPolicyError(f"{at}: unknown fields {unknown}")
            allow_debug = rule.get("allow_debug", False)
            if not isinstance(allow_debug, bool):
                raise AdmissionPolicyError(f"{at}.allow_debug: expected true or false")
            versions = (
                _list(rule["versions"], f"{at}.versions", None) if "versions" in rule else None
            )
            pcr0s = _list(rule["pcr0"], f"{at}.pcr0", _PCR0) if "pcr0" in rule else None
            if allow_debug and (versions is not None or pcr0s is not None):
                # A debug backend has no release: versions or PCR0s could never match it,
                # so a rule that lists them and allows debug would say two things at once.
                raise AdmissionPolicyError(
                    f"{at}: allow_debug admits backends with no release; it cannot be"
                    " combined with versions or pcr0"
                )
            services[name] = ServiceAdmission(versions, pcr0s, allow_debug)
        return cls(gateway, MappingProxyType(services))

    def to_json(self) -> dict[str, Any]:
        return {
            "type": ADMISSION_V1,
            "gateway": self.gateway,
            "services": {name: rule.to_json() for name, rule in sorted(self.services.items())},
        }

    def canonical(self) -> bytes:
        """The log's canonical JSON of the document: the bytes the digest covers."""
        return canonical_json(self.to_json())

    @functools.cached_property
    def digest(self) -> bytes:
        """SHA-256 of :meth:`canonical`, the value the logged policy statement names
        (computed once: the gateway puts it in every receipt, the client checks it in
        every receipt)."""
        return hashlib.sha256(self.canonical()).digest()

    @property
    def subject(self) -> str:
        """The logged statement's subject: ``gateway/<gateway>``."""
        return f"gateway/{self.gateway}"

    def service_policy(self, service: str) -> ServicePolicy:
        """The verifier policy a backend of ``service`` must pass (docs/evidence.md §4):
        that service name from its logged release, the listed versions and PCR0s, debug
        only if allowed."""
        rule = self.services.get(service)
        if rule is None:
            raise AdmissionPolicyError(f"admission policy: no service {service!r:.80}")
        if rule.allow_debug:
            return ServicePolicy(allow_debug=True)
        return ServicePolicy(
            services=frozenset({service}),
            versions=frozenset(rule.versions) if rule.versions is not None else None,
            pcr0s=frozenset(rule.pcr0s) if rule.pcr0s is not None else None,
        )

    def admits(self, service: str, version: str | None, pcr0: str, debug: bool) -> bool:
        rule = self.services.get(service)
        return rule is not None and rule.admits(version, pcr0, debug)


def verify_logged(
    policy: AdmissionPolicy,
    endorsement_json: object,
    trust: TrustBundle,
    now: datetime | None = None,
) -> VerifiedRelease:
    """Check that ``endorsement_json`` proves ``policy`` is the logged policy of its gateway.

    The endorsement must verify against ``trust`` (a trusted publisher's signature, log
    inclusion, a witnessed checkpoint) and be a ``hermetic.gateway-policy/v1`` statement
    for subject ``gateway/<gateway>`` naming the document's digest.
    """
    try:
        endorsement = Endorsement.from_json(endorsement_json)
        verified = verify_endorsement(endorsement, trust, now=now)
    except HermeticError as exc:
        raise AdmissionPolicyError(
            f"admission policy endorsement: {type(exc).__name__}: {exc}"
        ) from None
    statement = verified.statement
    if not isinstance(statement, PolicyStatement) or statement.type != GATEWAY_POLICY_V1:
        raise AdmissionPolicyError(
            f"admission policy endorsement: expected a {GATEWAY_POLICY_V1} statement, got"
            f" {statement.type}"
        )
    if statement.subject != policy.subject or statement.digest != policy.digest.hex():
        raise AdmissionPolicyError(
            f"admission policy endorsement: names {statement.subject!r} digest"
            f" {statement.digest}, expected {policy.subject!r} digest {policy.digest.hex()}"
        )
    return verified
