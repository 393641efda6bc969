"""The tenant admin client's signed calls, against the real guarded service on SQLite.

``TenantAdminClient`` builds the ``(method, argument)`` pairs ``hermetic demo`` sends over
the channel; here they are handed to :class:`GuardedPersistence` the way the enclave app
does (same fields), so a wrong signature, a wrong counter or a wrong material digest fails
as the service would fail it. ``read_audit_trail`` must accept the service's own reply
and refuse one that was cut, reordered or mislabelled.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from hermetic.errors import AdminReplayError, AdminSignatureError, AuditTrailError
from hermetic.persistence.adminclient import (
    TenantAdminClient,
    access_policy_statement,
    read_audit_trail,
)
from hermetic.persistence.keys import RootKey
from hermetic.persistence.policy import ACCESS_POLICY_V1, AccessPolicy
from hermetic.persistence.service import (
    Caller,
    GuardedPersistence,
    PersistenceService,
    PersistenceSettings,
    RootKeyOrigin,
)
from hermetic.store.records import RecordStore
from hermetic.translog.release import PERSISTENCE_POLICY_V1

STORE_ID = "store-eu1"
POLICY = AccessPolicy.from_json(
    {
        "type": ACCESS_POLICY_V1,
        "store_id": STORE_ID,
        "rules": [{"feature": "insights", "services": ["keyreader"], "keys": ["insights/*"]}],
    }
)
KEYREADER = Caller(True, "keyreader", "0.1.0", "ab" * 48)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[GuardedPersistence]:
    store = RecordStore(tmp_path / "records.db")
    settings = PersistenceSettings(STORE_ID, "key-1")
    service = PersistenceService(RootKey(os.urandom(32)), store, settings, RootKeyOrigin("x", 1))
    yield GuardedPersistence(service, POLICY)
    store.close()


def _send(guarded: GuardedPersistence, call: tuple[str, dict[str, Any]]) -> Any:
    """What the enclave app does with the call's fields (services/persistence)."""
    method, a = call
    signed = (a["counter"], a["signature"])
    if method == "create_tenant":
        return guarded.create_tenant(a["tenant"], a["admin_key"], *signed)
    if method == "put_key":
        return guarded.put_key(a["tenant"], a["name"], a["material"], *signed)
    if method in ("enable", "disable"):
        return guarded.set_feature(a["tenant"], a["feature"], method == "enable", *signed)
    if method == "rotate":
        return guarded.rotate(a["tenant"], a["name"], *signed)
    if method == "audit":
        trail = guarded.audit(a["tenant"], *signed)
        head = {"seq": trail.head.seq, "hash": trail.head.hash}
        return {"tenant": a["tenant"], "entries": list(trail.entries), "head": head}
    raise AssertionError(method)


def test_the_clients_calls_are_accepted_and_audited_in_order(
    guarded: GuardedPersistence,
) -> None:
    admin = TenantAdminClient(STORE_ID, "acme")
    material = os.urandom(32)
    for call in (admin.create(), admin.put("insights/a", material), admin.enable("insights")):
        _send(guarded, call)
    assert guarded.get_key(KEYREADER, "acme", "insights/a").material == material
    assert _send(guarded, admin.rotate("insights/a")) == 2
    entries, head = read_audit_trail(_send(guarded, admin.audit()), STORE_ID, "acme")
    assert [(e.event, e.operation, e.actor) for e in entries] == [
        ("change", "create_tenant", "admin counter 1"),
        ("change", "put_key", "admin counter 2"),
        ("change", "enable", "admin counter 3"),
        ("get", "get_key", KEYREADER.describe()),
        ("change", "rotate", "admin counter 4"),
        ("read", "audit", "admin counter 5"),
    ]
    assert head.seq == len(entries)
    assert admin.counter == 5


def test_a_replayed_call_another_key_or_other_material_is_refused(
    guarded: GuardedPersistence,
) -> None:
    admin = TenantAdminClient(STORE_ID, "acme")
    _send(guarded, admin.create())
    put = admin.put("insights/a", os.urandom(32))
    _send(guarded, put)
    with pytest.raises(AdminReplayError):
        _send(guarded, put)
    method, argument = admin.put("insights/b", os.urandom(32))
    with pytest.raises(AdminSignatureError):  # signed for other bytes than those sent
        _send(guarded, (method, {**argument, "material": os.urandom(32)}))
    impostor = TenantAdminClient(STORE_ID, "acme", ed25519.Ed25519PrivateKey.generate(), 10)
    with pytest.raises(AdminSignatureError):
        _send(guarded, impostor.enable("insights"))
    other_store = TenantAdminClient("store-us1", "acme", admin.key, admin.counter)
    with pytest.raises(AdminSignatureError):
        _send(guarded, other_store.enable("insights"))


def test_read_audit_trail_refuses_a_cut_reordered_or_mislabelled_reply(
    guarded: GuardedPersistence,
) -> None:
    admin = TenantAdminClient(STORE_ID, "acme")
    for call in (admin.create(), admin.put("insights/a", os.urandom(32))):
        _send(guarded, call)
    reply = _send(guarded, admin.audit())
    entries, head = read_audit_trail(reply, STORE_ID, "acme")
    assert len(entries) == head.seq == 3
    cut = {**reply, "entries": reply["entries"][:-1]}
    first, second, *rest = reply["entries"]
    reordered = {**reply, "entries": [second, first, *rest]}
    for bad, message in (
        (cut, "the head is entry 3"),
        (reordered, "follows entry 0"),
        ({**reply, "tenant": "globex"}, "expected a map naming the tenant"),
        ({**reply, "head": {"seq": 3}}, "head: expected a map with seq and hash"),
        ({**reply, "entries": ["text"]}, "expected a list of entry bytes"),
    ):
        with pytest.raises(AuditTrailError, match=message):
            read_audit_trail(bad, STORE_ID, "acme")
    # Another tenant's whole trail, relabelled: its chain starts from acme's genesis.
    with pytest.raises(AuditTrailError, match="entry 1 does not chain from entry 0"):
        read_audit_trail({**reply, "tenant": "globex"}, STORE_ID, "globex")


def test_the_policy_statement_names_the_store_and_the_documents_digest() -> None:
    statement = access_policy_statement(POLICY, "7")
    assert statement.type == PERSISTENCE_POLICY_V1
    assert statement.subject == f"persistence/{STORE_ID}"
    assert statement.digest == POLICY.digest.hex()
    assert statement.version == "7"
