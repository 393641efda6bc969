"""A tenant's audit trail: every key fetch, refusal and change, hash-chained.

Each entry is canonical CBOR (RFC 8949 §4.2.1), a map with exactly these keys::

    {"seq": 7,                      ; 1, 2, 3, ... with no gap
     "prev": h'<32 bytes>',         ; hash of entry seq - 1 (the genesis hash for seq 1)
     "time": 1764650000,            ; the enclave's clock, seconds since the epoch
     "event": "get" | "refused" | "change" | "read",
     "operation": "get_key",        ; the method called
     "actor": "service reporting 1.0.0 pcr0 1a2b3c4d5e6f7a8b",  ; or "admin counter 12", ...
     "name": "insights/app-usage",  ; "" when the operation names no key
     "key_version": 2,              ; 0 when none
     "detail": "..."}               ; a refusal's error type and message, else ""

and its hash is ``SHA-256(LP("hermetic/persistence/audit/v1") || LP(entry bytes))``; the
genesis hash is ``SHA-256(LP(domain) || LP("genesis") || LP(store id) || LP(tenant))``, so a
trail cannot be moved to another tenant or store. No entry holds key material: names,
versions, who asked and why a request was refused (hermetic error messages never carry key
bytes).

The service seals each entry (``audit-entry`` under the tenant's state key) as record
``<store id>/tenants/<tenant>/audit/<seq, 20 digits>`` and keeps the newest ``(seq,
hash)`` in the sealed ``audit-head`` record; ``audit`` returns the entry bytes and that
head. The admin runs :func:`verify_audit_trail`: entries numbered 1..n with no gap, each
chaining from the one before, ending exactly at the head; an admin who remembers an earlier
head also passes it as ``known``, so a trail rewritten since (entries dropped, reordered or
edited before that point) fails even if it is self-consistent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hermetic.cbor import canonical_dumps, strict_loads
from hermetic.errors import AuditTrailError
from hermetic.persistence.keys import length_prefixed

__all__ = [
    "AUDIT_DOMAIN",
    "AUDIT_EVENTS",
    "AuditEntry",
    "AuditHead",
    "genesis_hash",
    "verify_audit_trail",
]

AUDIT_DOMAIN = b"hermetic/persistence/audit/v1"
AUDIT_EVENTS = ("get", "refused", "change", "read")
MAX_TEXT = 1024
_FIELDS = ("seq", "prev", "time", "event", "operation", "actor", "name", "key_version", "detail")


def genesis_hash(store_id: str, tenant: str) -> bytes:
    """The ``prev`` of entry 1: binds the chain to its store and tenant."""
    return hashlib.sha256(
        length_prefixed(AUDIT_DOMAIN, b"genesis", store_id.encode(), tenant.encode())
    ).digest()


@dataclass(frozen=True)
class AuditHead:
    """The newest entry's number and hash (``seq`` 0 and the genesis hash when empty)."""

    seq: int
    hash: bytes

    def encode(self) -> bytes:
        return canonical_dumps(
            {"seq": self.seq, "hash": self.hash}, what="audit head", error=AuditTrailError
        )

    @classmethod
    def decode(cls, data: bytes) -> AuditHead:
        value = strict_loads(data, what="audit head", error=AuditTrailError)
        if (
            not isinstance(value, dict)
            or set(value) != {"seq", "hash"}
            or not isinstance(value["seq"], int)
            or isinstance(value["seq"], bool)
            or value["seq"] < 0
            or not isinstance(value["hash"], bytes)
            or len(value["hash"]) != 32
        ):
            raise AuditTrailError("audit head: expected {seq: uint, hash: 32 bytes}")
        return cls(value["seq"], value["hash"])


@dataclass(frozen=True)
class AuditEntry:
    """One event of the trail (module docstring)."""

    seq: int
    prev: bytes
    time: int
    event: str
    operation: str
    actor: str
    name: str = ""
    key_version: int = 0
    detail: str = ""

    def __post_init__(self) -> None:
        if self.event not in AUDIT_EVENTS:
            raise AuditTrailError(
                f"audit entry event: expected one of {', '.join(AUDIT_EVENTS)}, got"
                f" {self.event!r:.40}"
            )
        for name in ("seq", "time", "key_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise AuditTrailError(f"audit entry {name}: expected an integer >= 0")
        if self.seq < 1:
            raise AuditTrailError("audit entry seq: expected 1 or more, got 0")
        if not isinstance(self.prev, bytes) or len(self.prev) != 32:
            raise AuditTrailError("audit entry prev: expected a 32-byte hash")
        for name in ("operation", "actor", "name", "detail"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > MAX_TEXT:
                raise AuditTrailError(
                    f"audit entry {name}: expected text of at most {MAX_TEXT} characters"
                )

    def encode(self) -> bytes:
        return canonical_dumps(
            {name: getattr(self, name) for name in _FIELDS},
            what="audit entry",
            error=AuditTrailError,
        )

    @classmethod
    def decode(cls, data: bytes) -> AuditEntry:
        """Strict: exactly the fields above, in canonical form (re-encoding must give the
        same bytes, so an entry has one encoding and one hash)."""
        value: Any = strict_loads(data, what="audit entry", error=AuditTrailError)
        if not isinstance(value, dict) or set(value) != set(_FIELDS):
            raise AuditTrailError(f"audit entry: expected a map with fields {list(_FIELDS)}")
        entry = cls(**{name: value[name] for name in _FIELDS})
        if entry.encode() != data:
            raise AuditTrailError(f"audit entry {entry.seq}: not in canonical CBOR form")
        return entry

    @staticmethod
    def hash_of(data: bytes) -> bytes:
        return hashlib.sha256(length_prefixed(AUDIT_DOMAIN, data)).digest()


def verify_audit_trail(
    entries: Sequence[bytes],
    store_id: str,
    tenant: str,
    *,
    head: AuditHead | None = None,
    known: AuditHead | None = None,
) -> tuple[list[AuditEntry], AuditHead]:
    """The decoded entries and the head they reach, if the trail is whole.

    Raises :class:`AuditTrailError` on a gap or reordering (``seq`` not 1..n), an entry not
    chaining from the one before (dropped, inserted, edited), a trail that does not end at
    ``head`` (entries dropped at the end, or a stale head), or one that does not pass
    through ``known`` (the trail changed since the admin last saw that head).
    """
    where = f"audit trail of tenant {tenant!r}"
    decoded: list[AuditEntry] = []
    current = AuditHead(0, genesis_hash(store_id, tenant))
    passed_known = known is None or known.seq == 0
    if known is not None and known.seq == 0 and known.hash != current.hash:
        raise AuditTrailError(f"{where}: the known empty head is another tenant's or store's")
    for data in entries:
        entry = AuditEntry.decode(data)
        if entry.seq != current.seq + 1:
            raise AuditTrailError(
                f"{where}: entry {entry.seq} follows entry {current.seq} (expected"
                f" {current.seq + 1}: an entry is missing or out of order)"
            )
        if entry.prev != current.hash:
            raise AuditTrailError(
                f"{where}: entry {entry.seq} does not chain from entry {current.seq}"
                " (an earlier entry was edited, dropped or replaced)"
            )
        current = AuditHead(entry.seq, AuditEntry.hash_of(data))
        decoded.append(entry)
        if known is not None and known.seq == current.seq:
            if known.hash != current.hash:
                raise AuditTrailError(
                    f"{where}: entry {known.seq} is not the one seen before (the trail was"
                    " rewritten since)"
                )
            passed_known = True
    if not passed_known:
        assert known is not None
        raise AuditTrailError(
            f"{where}: ends at entry {current.seq}, before the entry {known.seq} seen before"
            " (entries were dropped)"
        )
    if head is not None and (head.seq, head.hash) != (current.seq, current.hash):
        raise AuditTrailError(
            f"{where}: ends at entry {current.seq}, the head is entry {head.seq} (entries"
            " were dropped at the end, or the trail does not match its head)"
        )
    return decoded, current
