"""The access policy: which attested release may fetch which key class of a tenant.

A service fetches a tenant's key (``get_key``) only over an attested **XX** session (it
proved its own release with its own evidence bundle), and only if a rule of the policy in
force names its release for a key class that matches the key's name, and the tenant's
admin has enabled that rule's feature (an admin-signed ``enable``)::

    {"type": "hermetic.persistence-access/v1",
     "store_id": "store-eu1",
     "rules": [{"feature": "insights", "services": ["reporting"], "keys": ["insights/*"],
                "versions": ["1.0.0"]}]}

``versions`` is optional (absent: any version the trusted publisher logged). A key class is
a key name (exact match) or a name prefix ending in ``/*`` (one or more further segments).
A rule admits nobody until a tenant enables its feature, so the policy (published once, for
every tenant) says what *may* be granted and each tenant's admin says what *is*.

The document's **digest** is SHA-256 of its canonical JSON (sorted keys, no whitespace,
UTF-8); a publisher logs it as a ``hermetic.persistence-policy/v1`` statement
(:mod:`hermetic.translog.release`) and the operator puts the document and that endorsement
in the service's signed runtime config, whose digest every attestation document of the
service carries, so a client sees in the handshake which policy is in force. The service
itself refuses to start unless the endorsement verifies and names this digest (the app
edge checks that; this module has no log code, to stay in the base layer).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from hermetic.errors import AccessPolicyError, HermeticError
from hermetic.jsontext import typed_document
from hermetic.persistence.keys import check_key_name, check_store_id, check_tenant
from hermetic.translog.release import canonical_json

__all__ = ["ACCESS_POLICY_V1", "AccessPolicy", "AccessRule", "key_class_matches"]

ACCESS_POLICY_V1 = "hermetic.persistence-access/v1"
MAX_RULES = 256
MAX_LIST = 64


def key_class_matches(key_class: str, name: str) -> bool:
    """``insights/*`` matches ``insights/a`` and ``insights/a/b``, not ``insights``;
    anything else matches only itself."""
    if key_class.endswith("/*"):
        return name.startswith(key_class[:-1]) and len(name) > len(key_class) - 1
    return name == key_class


def _check_key_class(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise AccessPolicyError(f"{field}: expected a key name or 'prefix/*', got {value!r}")
    try:
        check_key_name(value.removesuffix("/*"), field=field)
    except HermeticError as exc:
        raise AccessPolicyError(str(exc)) from None
    return value


def _texts(value: object, field: str, *, required: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or (required and not value) or len(value) > MAX_LIST:
        raise AccessPolicyError(
            f"{field}: expected a list of 1 to {MAX_LIST} names, got {value!r:.80}"
        )
    items = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not 1 <= len(item) <= 256:
            raise AccessPolicyError(f"{field}[{i}]: expected a name, got {item!r:.80}")
        items.append(item)
    if len(set(items)) != len(items):
        raise AccessPolicyError(f"{field}: names must be unique")
    return tuple(items)


@dataclass(frozen=True)
class AccessRule:
    """Releases of ``services`` (at ``versions``, or any) may fetch keys of ``keys`` from
    tenants that enabled ``feature``."""

    feature: str
    services: tuple[str, ...]
    keys: tuple[str, ...]
    versions: tuple[str, ...] | None = None

    def admits(self, service: str, version: str, name: str) -> bool:
        return (
            service in self.services
            and (self.versions is None or version in self.versions)
            and any(key_class_matches(k, name) for k in self.keys)
        )

    def to_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "feature": self.feature,
            "services": list(self.services),
            "keys": list(self.keys),
        }
        if self.versions is not None:
            value["versions"] = list(self.versions)
        return value


@dataclass(frozen=True)
class AccessPolicy:
    """A parsed access policy document (module docstring). Build it with :meth:`from_json`."""

    store_id: str
    rules: tuple[AccessRule, ...]

    @classmethod
    def from_json(cls, value: object) -> AccessPolicy:
        where = "access policy"
        fields = {"type", "store_id", "rules"}
        value = typed_document(
            value, where=where, type_=ACCESS_POLICY_V1, fields=fields, error=AccessPolicyError
        )
        try:
            store_id = check_store_id(value["store_id"], field=f"{where}.store_id")
        except HermeticError as exc:
            raise AccessPolicyError(str(exc)) from None
        rules_value = value["rules"]
        if not isinstance(rules_value, list) or len(rules_value) > MAX_RULES:
            raise AccessPolicyError(f"{where}.rules: expected a list of at most {MAX_RULES}")
        rules = []
        for i, rule in enumerate(rules_value):
            at = f"{where}.rules[{i}]"
            if not isinstance(rule, dict):
                raise AccessPolicyError(f"{at}: expected an object, got {type(rule).__name__}")
            allowed = {"feature", "services", "keys", "versions"}
            missing = sorted({"feature", "services", "keys"} - set(rule))
            unknown = sorted(str(k) for k in set(rule) - allowed)
            if missing or unknown:
                raise AccessPolicyError(f"{at}: missing fields {missing}, unknown {unknown}")
            try:
                feature = check_tenant(rule["feature"], field=f"{at}.feature")
            except HermeticError as exc:
                raise AccessPolicyError(str(exc)) from None
            keys = _texts(rule["keys"], f"{at}.keys", required=True)
            for n, key_class in enumerate(keys):
                _check_key_class(key_class, f"{at}.keys[{n}]")
            versions = (
                _texts(rule["versions"], f"{at}.versions", required=True)
                if "versions" in rule
                else None
            )
            services = _texts(rule["services"], f"{at}.services", required=True)
            rules.append(AccessRule(feature, services, keys, versions))
        return cls(store_id, tuple(rules))

    def to_json(self) -> dict[str, Any]:
        return {
            "type": ACCESS_POLICY_V1,
            "store_id": self.store_id,
            "rules": [rule.to_json() for rule in self.rules],
        }

    def canonical(self) -> bytes:
        """The log's canonical JSON of the document: the bytes the digest covers."""
        return canonical_json(self.to_json())

    @property
    def digest(self) -> bytes:
        """SHA-256 of :meth:`canonical`, the value the logged policy statement names."""
        return hashlib.sha256(self.canonical()).digest()

    @property
    def features(self) -> frozenset[str]:
        return frozenset(rule.feature for rule in self.rules)

    def admitting_rule(
        self, service: str, version: str, name: str, enabled: frozenset[str]
    ) -> AccessRule | None:
        """The first rule that admits this release for ``name`` among the features the
        tenant enabled, or None."""
        for rule in self.rules:
            if rule.feature in enabled and rule.admits(service, version, name):
                return rule
        return None
