"""The tenant admin's half of the persistence service's RPCs, and the access policy's log entry.

A tenant admin signs every change and every audit read (:mod:`hermetic.persistence.admin`)
with its Ed25519 key and a counter above the last one the service accepted.
:class:`TenantAdminClient` keeps that key and counter and builds each call as the
``(method, argument)`` pair a session sends (``session.call(*admin.put(name, material))``);
:func:`read_audit_trail` checks the ``audit`` reply the way the admin must (the hash chain
from the tenant's genesis to the head the service keeps). :func:`access_policy_statement`
is the ``hermetic.persistence-policy/v1`` statement a publisher logs for an access policy,
whose endorsement goes into the service's runtime config.

Sans-IO (no session, no log client): ``hermetic demo`` and the tests send these over their
own attested sessions and publish the statement to their own log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from hermetic.errors import AuditTrailError
from hermetic.persistence.admin import AdminRequest, admin_public_key
from hermetic.persistence.audit import AuditEntry, AuditHead, verify_audit_trail
from hermetic.persistence.policy import AccessPolicy
from hermetic.translog.release import PERSISTENCE_POLICY_V1, PolicyStatement, utc_timestamp

__all__ = ["AdminCall", "TenantAdminClient", "access_policy_statement", "read_audit_trail"]

AdminCall = tuple[str, dict[str, Any]]
"""An RPC ``(method, argument)`` ready for ``session.call(*call)``."""


@dataclass
class TenantAdminClient:
    """One tenant's admin: its Ed25519 key and the counter of its last signed request.

    Each method signs the next request (counter + 1) and returns the call to send. A call
    that is not sent, or that the service refuses, still used its counter: the next one is
    higher, which the service accepts (it requires only an increase)."""

    store_id: str
    tenant: str
    key: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)
    counter: int = 0

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte key ``create_tenant`` registers."""
        return admin_public_key(self.key)

    def request(self, operation: str, **fields: Any) -> AdminCall:
        """The signed call of ``operation`` (also its method name) with ``fields``; a
        ``material`` field travels as is and is signed as its SHA-256."""
        self.counter += 1
        signed = {k: v for k, v in fields.items() if k != "material"}
        if "material" in fields:
            signed["material_digest"] = AdminRequest.material_digest_of(fields["material"])
        request = AdminRequest(operation, self.store_id, self.tenant, self.counter, **signed)
        argument = {"tenant": self.tenant, **fields, "counter": self.counter}
        return operation, {**argument, "signature": request.sign(self.key)}

    def create(self) -> AdminCall:
        return self.request("create_tenant", admin_key=self.public_key)

    def put(self, name: str, material: bytes) -> AdminCall:
        return self.request("put_key", name=name, material=material)

    def rotate(self, name: str) -> AdminCall:
        return self.request("rotate", name=name)

    def retire(self, name: str, version: int) -> AdminCall:
        return self.request("retire", name=name, version=version)

    def delete(self, name: str) -> AdminCall:
        return self.request("delete", name=name)

    def enable(self, feature: str) -> AdminCall:
        return self.request("enable", feature=feature)

    def disable(self, feature: str) -> AdminCall:
        return self.request("disable", feature=feature)

    def audit(self) -> AdminCall:
        return self.request("audit")


def read_audit_trail(
    reply: object, store_id: str, tenant: str, *, known: AuditHead | None = None
) -> tuple[list[AuditEntry], AuditHead]:
    """The entries of an ``audit`` reply (``{"tenant", "entries", "head": {"seq",
    "hash"}}``) once they chain from the tenant's genesis to that head (and through
    ``known``, a head seen before); :class:`AuditTrailError` otherwise."""
    where = f"audit reply of tenant {tenant!r}"
    if not isinstance(reply, Mapping) or reply.get("tenant") != tenant:
        raise AuditTrailError(f"{where}: expected a map naming the tenant, got {reply!r:.80}")
    entries, head = reply.get("entries"), reply.get("head")
    if not isinstance(entries, list) or not all(isinstance(e, bytes) for e in entries):
        raise AuditTrailError(f"{where}: entries: expected a list of entry bytes")
    if not isinstance(head, Mapping) or set(head) != {"seq", "hash"}:
        raise AuditTrailError(f"{where}: head: expected a map with seq and hash")
    seq, digest = head["seq"], head["hash"]
    if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(digest, bytes):
        raise AuditTrailError(f"{where}: head: expected an integer seq and a hash")
    return verify_audit_trail(entries, store_id, tenant, head=AuditHead(seq, digest), known=known)


def access_policy_statement(policy: AccessPolicy, version: str = "1") -> PolicyStatement:
    """The statement a publisher logs for ``policy`` (subject ``persistence/<store id>``,
    the document's digest): the service starts only under a policy whose endorsement is
    this statement, verified against its peers' trust file."""
    return PolicyStatement(
        PERSISTENCE_POLICY_V1,
        f"persistence/{policy.store_id}",
        policy.digest.hex(),
        version,
        utc_timestamp(),
    )
