"""The guarded persistence layer in-process: admin signatures, the access policy, the audit
trail, on a real record store (SQLite) with a random root key.

The same layer behind a real sandboxed enclave, an XX session and the proxy is
``tests/test_persistence_policy_enclave.py``; here every refusal, forgery and replay is
forced one by one, and the audit trail is tampered with entry by entry.
"""

from __future__ import annotations

import base64
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from hermetic.errors import (
    AccessDeniedError,
    AccessPolicyError,
    AdminReplayError,
    AdminSignatureError,
    AuditTrailError,
    KeyNotFoundError,
    PersistenceUsageError,
    TenantExistsError,
)
from hermetic.persistence.admin import AdminRequest, admin_public_key
from hermetic.persistence.audit import AuditEntry, AuditHead, verify_audit_trail
from hermetic.persistence.keys import RootKey
from hermetic.persistence.policy import ACCESS_POLICY_V1, AccessPolicy, key_class_matches
from hermetic.persistence.service import (
    Caller,
    GuardedPersistence,
    PersistenceService,
    PersistenceSettings,
    RootKeyOrigin,
)
from hermetic.store.records import RecordStore

STORE_ID = "store-eu1"
POLICY = {
    "type": ACCESS_POLICY_V1,
    "store_id": STORE_ID,
    "rules": [{"feature": "insights", "services": ["reporting"], "keys": ["insights/*"]}],
}
REPORTING = Caller(True, "reporting", "1.0.0", "ab" * 48)
INTRUDER = Caller(True, "intruder", "1.0.0", "cd" * 48)


@dataclass
class Admin:
    """A tenant admin client: its key and its next counter."""

    tenant: str
    key: ed25519.Ed25519PrivateKey
    counter: int = 0

    def sign(self, operation: str, **fields: object) -> tuple[int, bytes]:
        self.counter += 1
        request = AdminRequest(operation, STORE_ID, self.tenant, self.counter, **fields)  # type: ignore[arg-type]
        return self.counter, request.sign(self.key)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RecordStore]:
    opened = RecordStore(tmp_path / "records.db")
    yield opened
    opened.close()


@pytest.fixture
def guarded(store: RecordStore) -> GuardedPersistence:
    settings = PersistenceSettings(STORE_ID, "key-1")
    service = PersistenceService(RootKey(os.urandom(32)), store, settings, RootKeyOrigin("x", 1))
    return GuardedPersistence(service, AccessPolicy.from_json(POLICY))


def _tenant(guarded: GuardedPersistence, name: str) -> Admin:
    admin = Admin(name, ed25519.Ed25519PrivateKey.generate())
    public = admin_public_key(admin.key)
    counter, signature = admin.sign("create_tenant", admin_key=public)
    guarded.create_tenant(name, public, counter, signature)
    return admin


def _put(guarded: GuardedPersistence, admin: Admin, name: str, material: bytes) -> int:
    digest = AdminRequest.material_digest_of(material)
    counter, signature = admin.sign("put_key", name=name, material_digest=digest)
    return guarded.put_key(admin.tenant, name, material, counter, signature)


def _enable(guarded: GuardedPersistence, admin: Admin, feature: str = "insights") -> None:
    counter, signature = admin.sign("enable", feature=feature)
    guarded.set_feature(admin.tenant, feature, True, counter, signature)


def _trail(guarded: GuardedPersistence, admin: Admin) -> list[AuditEntry]:
    counter, signature = admin.sign("audit")
    trail = guarded.audit(admin.tenant, counter, signature)
    entries, head = verify_audit_trail(trail.entries, STORE_ID, admin.tenant, head=trail.head)
    assert head == trail.head
    return entries


def test_admitted_release_fetches_an_enabled_tenant_key_and_the_trail_records_it(
    guarded: GuardedPersistence,
) -> None:
    acme = _tenant(guarded, "acme")
    material = secrets.token_bytes(32)
    assert _put(guarded, acme, "insights/app-usage", material) == 1
    _enable(guarded, acme)
    key = guarded.get_key(REPORTING, "acme", "insights/app-usage")
    assert key.material == material
    assert key.version == 1
    entries = _trail(guarded, acme)
    assert [(e.event, e.operation) for e in entries] == [
        ("change", "create_tenant"),
        ("change", "put_key"),
        ("change", "enable"),
        ("get", "get_key"),
        ("read", "audit"),
    ]
    assert entries[3].actor.startswith("service reporting 1.0.0 pcr0 abab")
    assert entries[3].key_version == 1


def test_refuses_unadmitted_releases_nx_callers_and_tenants_that_did_not_enable_the_feature(
    guarded: GuardedPersistence,
) -> None:
    acme = _tenant(guarded, "acme")
    globex = _tenant(guarded, "globex")
    for admin in (acme, globex):
        _put(guarded, admin, "insights/app-usage", secrets.token_bytes(32))
        _put(guarded, admin, "billing/card", secrets.token_bytes(32))
    _enable(guarded, acme)
    with pytest.raises(AccessDeniedError, match=r"by service intruder 1\.0\.0"):
        guarded.get_key(INTRUDER, "acme", "insights/app-usage")
    with pytest.raises(AccessDeniedError, match="only over an attested XX session"):
        guarded.get_key(Caller(False), "acme", "insights/app-usage")
    with pytest.raises(AccessDeniedError, match=r"no key class of 'billing/card'"):
        guarded.get_key(REPORTING, "acme", "billing/card")
    with pytest.raises(AccessDeniedError, match=r"tenant 'globex' enabled \(none\)"):
        guarded.get_key(REPORTING, "globex", "insights/app-usage")
    with pytest.raises(AccessDeniedError, match="no such tenant"):
        guarded.get_key(REPORTING, "nobody", "insights/app-usage")
    refused = [(e.event, e.actor.split(" ")[1], e.name) for e in _trail(guarded, acme)[-4:-1]]
    assert refused == [
        ("refused", "intruder", "insights/app-usage"),
        ("refused", "without", "insights/app-usage"),
        ("refused", "reporting", "billing/card"),
    ]
    last = _trail(guarded, globex)[-2]
    assert (last.event, last.name) == ("refused", "insights/app-usage")
    assert last.detail.startswith("AccessDeniedError: get_key of 'insights/app-usage'")


def test_a_disabled_feature_admits_nobody_again(guarded: GuardedPersistence) -> None:
    acme = _tenant(guarded, "acme")
    _put(guarded, acme, "insights/a", secrets.token_bytes(32))
    _enable(guarded, acme)
    guarded.get_key(REPORTING, "acme", "insights/a")
    counter, signature = acme.sign("disable", feature="insights")
    assert guarded.set_feature("acme", "insights", False, counter, signature) == frozenset()
    with pytest.raises(AccessDeniedError):
        guarded.get_key(REPORTING, "acme", "insights/a")


def test_rejects_forged_replayed_and_misbound_admin_signatures(
    guarded: GuardedPersistence,
) -> None:
    acme = _tenant(guarded, "acme")
    material = secrets.token_bytes(32)
    digest = AdminRequest.material_digest_of(material)
    # Signed by another key.
    mallory = Admin("acme", ed25519.Ed25519PrivateKey.generate(), acme.counter)
    counter, forged = mallory.sign("put_key", name="insights/a", material_digest=digest)
    with pytest.raises(AdminSignatureError, match="does not verify"):
        guarded.put_key("acme", "insights/a", material, counter, forged)
    # Signed for other material, another name, another store, another operation.
    counter, signature = acme.sign("put_key", name="insights/a", material_digest=digest)
    with pytest.raises(AdminSignatureError):
        guarded.put_key("acme", "insights/a", secrets.token_bytes(32), counter, signature)
    with pytest.raises(AdminSignatureError):
        guarded.put_key("acme", "insights/b", material, counter, signature)
    with pytest.raises(AdminSignatureError):
        guarded.rotate("acme", "insights/a", counter, signature)
    other_store = AdminRequest("put_key", "store-us1", "acme", counter, name="insights/a",
                               material_digest=digest).sign(acme.key)  # fmt: skip
    with pytest.raises(AdminSignatureError):
        guarded.put_key("acme", "insights/a", material, counter, other_store)
    with pytest.raises(AdminSignatureError, match="expected 64 bytes"):
        guarded.put_key("acme", "insights/a", material, counter, b"short")
    # The genuine request works once; the same bytes again are a replay.
    assert guarded.put_key("acme", "insights/a", material, counter, signature) == 1
    with pytest.raises(AdminReplayError, match=f"counter {counter} is not above"):
        guarded.put_key("acme", "insights/a", material, counter, signature)
    # An older, never-used counter is refused too (reordering).
    stale = AdminRequest("rotate", STORE_ID, "acme", counter - 1, name="insights/a").sign(acme.key)
    with pytest.raises(AdminReplayError):
        guarded.rotate("acme", "insights/a", counter - 1, stale)
    refusals = [e for e in _trail(guarded, acme) if e.event == "refused"]
    assert len(refusals) == 8
    assert {e.detail.split(":")[0] for e in refusals} == {"AdminSignatureError", "AdminReplayError"}


def test_create_tenant_must_be_signed_by_the_key_it_registers_and_happens_once(
    guarded: GuardedPersistence,
) -> None:
    admin = ed25519.Ed25519PrivateKey.generate()
    public = admin_public_key(admin)
    other = ed25519.Ed25519PrivateKey.generate()
    signature = AdminRequest("create_tenant", STORE_ID, "acme", 1, admin_key=public).sign(other)
    with pytest.raises(AdminSignatureError):
        guarded.create_tenant("acme", public, 1, signature)
    _tenant(guarded, "acme")
    again = AdminRequest("create_tenant", STORE_ID, "acme", 1, admin_key=public).sign(admin)
    with pytest.raises(TenantExistsError):
        guarded.create_tenant("acme", public, 1, again)
    with pytest.raises(PersistenceUsageError, match="raw Ed25519 public key"):
        guarded.create_tenant("beta", b"\x01" * 31, 1, again)


def test_rotate_retire_and_delete_are_admin_signed_and_audited(
    guarded: GuardedPersistence,
) -> None:
    acme = _tenant(guarded, "acme")
    _put(guarded, acme, "insights/a", secrets.token_bytes(32))
    _enable(guarded, acme)
    counter, signature = acme.sign("rotate", name="insights/a")
    assert guarded.rotate("acme", "insights/a", counter, signature) == 2
    counter, signature = acme.sign("retire", name="insights/a", version=1)
    guarded.retire("acme", "insights/a", 1, counter, signature)
    assert guarded.get_key(REPORTING, "acme", "insights/a").version == 2
    counter, signature = acme.sign("delete", name="insights/a")
    guarded.delete("acme", "insights/a", counter, signature)
    with pytest.raises(KeyNotFoundError):
        guarded.get_key(REPORTING, "acme", "insights/a")
    changes = [(e.operation, e.key_version) for e in _trail(guarded, acme) if e.event == "change"]
    assert changes[-3:] == [("rotate", 2), ("retire", 1), ("delete", 0)]


def test_no_key_material_in_the_audit_trail_or_the_store(
    guarded: GuardedPersistence, store: RecordStore
) -> None:
    acme = _tenant(guarded, "acme")
    materials = [secrets.token_bytes(32) for _ in range(3)]
    for n, material in enumerate(materials):
        _put(guarded, acme, f"insights/k{n}", material)
    _enable(guarded, acme)
    for n in range(3):
        guarded.get_key(REPORTING, "acme", f"insights/k{n}")
    with pytest.raises(AccessDeniedError):
        guarded.get_key(INTRUDER, "acme", "insights/k0")
    counter, signature = acme.sign("audit")
    trail = guarded.audit("acme", counter, signature)
    blobs = [*trail.entries, *(store.get(r.id).data for r in store.scan(f"{STORE_ID}/"))]
    for material in materials:
        forms = [material, material.hex().encode(), base64.b64encode(material)]
        forms += [base64.urlsafe_b64encode(material).rstrip(b"=")]
        for blob in blobs:
            assert not any(form in blob for form in forms)


# --- the audit trail's own checks ----------------------------------------------------------


def _entries(n: int, tenant: str = "acme") -> list[bytes]:
    from hermetic.persistence.audit import genesis_hash

    out, prev = [], genesis_hash(STORE_ID, tenant)
    for seq in range(1, n + 1):
        data = AuditEntry(seq, prev, 1_700_000_000 + seq, "get", "get_key", "svc").encode()
        out.append(data)
        prev = AuditEntry.hash_of(data)
    return out


def test_audit_verification_detects_dropped_reordered_edited_and_moved_entries() -> None:
    entries = _entries(5)
    _, head = verify_audit_trail(entries, STORE_ID, "acme")
    assert head.seq == 5
    with pytest.raises(AuditTrailError, match="entry 3 follows entry 1"):
        verify_audit_trail(entries[:1] + entries[2:], STORE_ID, "acme")
    with pytest.raises(AuditTrailError, match="follows entry 2"):
        verify_audit_trail([entries[0], entries[1], entries[3], entries[2]], STORE_ID, "acme")
    with pytest.raises(AuditTrailError, match="ends at entry 4, the head is entry 5"):
        verify_audit_trail(entries[:4], STORE_ID, "acme", head=head)
    edited = AuditEntry.decode(entries[1])
    forged = AuditEntry(2, edited.prev, edited.time, "get", "get_key", "someone else").encode()
    with pytest.raises(AuditTrailError, match="entry 3 does not chain from entry 2"):
        verify_audit_trail([entries[0], forged, *entries[2:]], STORE_ID, "acme")
    with pytest.raises(AuditTrailError, match="entry 1 does not chain"):
        verify_audit_trail(entries, STORE_ID, "globex")
    # A self-consistent rewrite from entry 3 on fails against a head seen before.
    known = AuditHead(4, AuditEntry.hash_of(entries[3]))
    rewritten = [*entries[:2], *_rewrite(entries[:2], 3)]
    verify_audit_trail(rewritten, STORE_ID, "acme")
    with pytest.raises(AuditTrailError, match="not the one seen before"):
        verify_audit_trail(rewritten, STORE_ID, "acme", known=known)
    with pytest.raises(AuditTrailError, match="before the entry 4 seen before"):
        verify_audit_trail(entries[:3], STORE_ID, "acme", known=known)
    import cbor2

    first = cbor2.loads(entries[0])
    shuffled = cbor2.dumps(dict(reversed(list(first.items()))))
    assert shuffled != entries[0]
    with pytest.raises(AuditTrailError, match="not in canonical CBOR form"):
        verify_audit_trail([shuffled], STORE_ID, "acme")


def _rewrite(prefix: list[bytes], count: int) -> list[bytes]:
    prev = AuditEntry.hash_of(prefix[-1])
    out = []
    for seq in range(len(prefix) + 1, len(prefix) + 1 + count):
        data = AuditEntry(seq, prev, 1, "change", "rotate", "admin counter 9").encode()
        out.append(data)
        prev = AuditEntry.hash_of(data)
    return out


def test_audit_refuses_a_trail_whose_entry_the_host_deleted(
    guarded: GuardedPersistence, store: RecordStore
) -> None:
    acme = _tenant(guarded, "acme")
    _put(guarded, acme, "insights/a", secrets.token_bytes(32))
    record = f"{STORE_ID}/tenants/acme/audit/{2:020d}"
    store.delete(record, 1)
    counter, signature = acme.sign("audit")
    with pytest.raises(AuditTrailError, match="entry 2 of 3 is missing"):
        guarded.audit("acme", counter, signature)


def test_concurrent_appends_lose_no_audit_entry(guarded: GuardedPersistence) -> None:
    acme = _tenant(guarded, "acme")
    _put(guarded, acme, "insights/a", secrets.token_bytes(32))
    _enable(guarded, acme)

    def fetch() -> None:
        for _ in range(5):
            guarded.get_key(REPORTING, "acme", "insights/a")

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gets = [e for e in _trail(guarded, acme) if e.event == "get"]
    assert len(gets) == 20


# --- the policy document -------------------------------------------------------------------


def test_key_classes_match_a_prefix_with_more_segments_or_an_exact_name() -> None:
    assert key_class_matches("insights/*", "insights/a")
    assert key_class_matches("insights/*", "insights/a/b")
    assert not key_class_matches("insights/*", "insights")
    assert not key_class_matches("insights/*", "insightsx/a")
    assert key_class_matches("billing/card", "billing/card")
    assert not key_class_matches("billing/card", "billing/card/x")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "x"}, "access policy.type: expected"),
        ({"store_id": "Bad Id"}, "store_id"),
        ({"rules": [{"feature": "f", "services": [], "keys": ["a"]}]}, r"rules\[0\].services"),
        ({"rules": [{"feature": "f", "services": ["s"], "keys": ["A/*"]}]}, r"keys\[0\]"),
        ({"rules": [{"feature": "f", "services": ["s"]}]}, r"missing fields \['keys'\]"),
        ({"rules": [{"feature": "f", "services": ["s"], "keys": ["a"], "x": 1}]}, "unknown"),
        ({"extra": 1}, "expected fields"),
    ],
)
def test_rejects_malformed_policies_naming_the_field(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(AccessPolicyError, match=message):
        AccessPolicy.from_json({**POLICY, **change})


def test_policy_digest_is_sha256_of_the_canonical_document() -> None:
    import hashlib
    import json

    policy = AccessPolicy.from_json(POLICY)
    text = json.dumps(POLICY, sort_keys=True, separators=(",", ":")).encode()
    assert policy.digest == hashlib.sha256(text).digest()
    reordered = {"rules": POLICY["rules"], "store_id": STORE_ID, "type": ACCESS_POLICY_V1}
    assert AccessPolicy.from_json(reordered).digest == policy.digest


def test_a_persistence_policy_statement_is_signed_and_parsed_like_any_logged_statement() -> None:
    from hermetic.translog.release import (
        PERSISTENCE_POLICY_V1,
        PolicyStatement,
        SignedStatement,
        generate_publisher_key,
        load_publisher_key,
        parse_statement,
        sign_statement,
        utc_timestamp,
    )

    policy = AccessPolicy.from_json(POLICY)
    statement = PolicyStatement(
        PERSISTENCE_POLICY_V1, f"persistence/{STORE_ID}", policy.digest.hex(), "1", utc_timestamp()
    )
    signed = sign_statement(statement, load_publisher_key(generate_publisher_key()))
    parsed = SignedStatement.from_json(signed.to_json())
    parsed.verify_signature()
    assert parse_statement(statement.to_json()) == statement
    assert parsed.statement == statement
