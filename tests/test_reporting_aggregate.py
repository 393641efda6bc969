"""The incremental aggregate and its report, against an independent pure-Python oracle.

The enclave's report must equal the client-side baseline exactly (acceptance 2), whatever
split the batches arrive in, and a tampered, replayed or foreign batch must be rejected
and counted, never aggregated (acceptance 5).
"""

from __future__ import annotations

import contextlib
import datetime
import random
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.errors import (
    AggregateMergeError,
    AggregateStateError,
    BatchAuthenticationError,
    BatchFormatError,
    BatchIdError,
    BatchReplayError,
    BatchTenantError,
)
from hermetic.reporting import aggregate as agg
from hermetic.reporting.aggregate import Aggregate, SealedBatch, baseline_report
from hermetic.reporting.format import Event, encode_columns, open_batch, seal_batch, seal_plaintext
from hermetic.reporting.generator import SyntheticTenant, generate_tenant

KEY = bytes(range(32))
TENANT = "acme"


def oracle(tenant: str, batches: list[SealedBatch], key: bytes = KEY) -> dict[str, Any]:
    """The report, computed the obvious way from every event (sets and counters)."""
    users: dict[str, set[str]] = defaultdict(set)
    outside: dict[str, set[str]] = defaultdict(set)
    events: Counter[str] = Counter()
    sso: Counter[str] = Counter()
    week_users: dict[datetime.date, set[str]] = defaultdict(set)
    week_events: Counter[datetime.date] = Counter()
    everyone: set[str] = set()
    for batch in batches:
        for e in open_batch(key, batch.data, tenant=tenant, batch_id=batch.batch_id).events():
            users[e.app].add(e.user)
            everyone.add(e.user)
            events[e.app] += 1
            if e.managed:
                sso[e.app] += 1
            else:
                outside[e.app].add(e.user)
            day = datetime.datetime.fromtimestamp(e.time, datetime.UTC).date()
            monday = day - datetime.timedelta(days=day.weekday())
            week_users[monday].add(e.user)
            week_events[monday] += 1
    managed = {a for a in users if sso[a]}
    apps = [
        {
            "app": a,
            "managed": a in managed,
            "users": len(users[a]),
            "users_outside_sso": len(outside[a]),
            "events": events[a],
            "sso_events": sso[a],
        }
        for a in users
    ]
    apps.sort(key=lambda x: (-x["users"], x["app"]))
    unmanaged = [x for x in apps if not x["managed"]]
    unmanaged.sort(key=lambda x: (-x["users"], -x["events"], x["app"]))
    weeks = []
    if week_events:
        day, last = min(week_events), max(week_events)
        while day <= last:
            weeks.append(
                {"week": day.isoformat(), "users": len(week_users[day]), "events": week_events[day]}
            )
            day += datetime.timedelta(days=7)
    return {
        "tenant": tenant,
        "batches": len(batches),
        "events": sum(events.values()),
        "users": len(everyone),
        "split": {
            "managed_apps": len(managed),
            "unmanaged_apps": len(users) - len(managed),
            "managed_app_users": len(set().union(*(users[a] for a in managed))),
            "unmanaged_app_users": len(set().union(*(users[a] for a in users if a not in managed))),
            "managed_app_events": sum(events[a] for a in managed),
            "unmanaged_app_events": sum(events[a] for a in users if a not in managed),
        },
        "apps": apps,
        "top_unmanaged": unmanaged[: agg.TOP_UNMANAGED],
        "weeks": weeks,
    }


@pytest.fixture(scope="module", params=[1, 2, 3])
def tenant(request: pytest.FixtureRequest) -> SyntheticTenant:
    return generate_tenant(KEY, request.param, events=6_000, weeks=4)


def test_the_baseline_equals_the_oracle(tenant: SyntheticTenant) -> None:
    report, result = baseline_report(KEY, TENANT, tenant.batches)
    assert result.rejected == ()
    assert (result.batches, result.events) == (len(tenant.batches), 6_000)
    assert report.to_dict() == oracle(TENANT, list(tenant.batches))
    assert report.split.managed_apps > 0
    assert report.split.unmanaged_apps > 0
    assert len(report.top_unmanaged) == agg.TOP_UNMANAGED


@pytest.mark.parametrize("split_seed", [0, 1, 2])
def test_incremental_absorption_equals_the_baseline(
    tenant: SyntheticTenant, split_seed: int
) -> None:
    baseline, _ = baseline_report(KEY, TENANT, tenant.batches)
    rng = random.Random(split_seed)
    batches = list(tenant.batches)
    rng.shuffle(batches)
    incremental = Aggregate(TENANT)
    at = 0
    while at < len(batches):
        step = rng.choice([1, 2, 7, 50, 600])
        result = incremental.absorb(KEY, batches[at : at + step])
        assert result.rejected == ()
        assert result.batches == len(batches[at : at + step])
        at += step
        if rng.random() < 0.3:  # persisted and restored between refreshes
            incremental = Aggregate.from_bytes(incremental.to_bytes())
    assert incremental.report() == baseline
    scratch = Aggregate(TENANT)
    scratch.absorb(KEY, tenant.batches)
    assert incremental.to_bytes() == scratch.to_bytes()


def test_merged_aggregates_equal_the_baseline(tenant: SyntheticTenant) -> None:
    parts = [Aggregate(TENANT) for _ in range(3)]
    for i, batch in enumerate(tenant.batches):
        parts[i % 3].absorb(KEY, [batch])
    merged = parts[2].merge(parts[0]).merge(parts[1])
    scratch = Aggregate(TENANT)
    scratch.absorb(KEY, tenant.batches)
    assert merged == scratch
    assert merged.report() == scratch.report()
    with pytest.raises(AggregateMergeError):
        merged.merge(parts[0])
    with pytest.raises(AggregateMergeError):
        merged.merge(Aggregate("globex"))


def test_only_new_batches_are_processed_and_a_refresh_shows_them() -> None:
    first = generate_tenant(KEY, 5, events=3_000, weeks=2, members=40)
    later = generate_tenant(KEY, 5, events=800, weeks=1, members=40, first_week=2)
    assert {m.name for m in first.members} == {m.name for m in later.members}
    state = Aggregate(TENANT)
    state.absorb(KEY, first.batches)
    before = state.report()
    stored = list(first.batches) + list(later.batches)  # the store lists every batch
    new = [b for b in stored if b.batch_id not in state.batch_ids]
    assert len(new) == len(later.batches)
    result = state.absorb(KEY, new)
    assert (result.batches, result.events, result.rejected) == (len(new), 800, ())
    after = state.report()
    assert after.events == before.events + 800
    assert after.weeks[-1].week > before.weeks[-1].week
    assert after.to_dict() == oracle(TENANT, stored)


def _bad_batches(good: list[SealedBatch]) -> list[tuple[SealedBatch, type[Exception]]]:
    flipped = bytearray(good[0].data)
    flipped[-1] ^= 1
    foreign = generate_tenant(bytes(32), 9, tenant="globex", events=50).batches[0]
    bad_index = encode_columns(
        ["mallory@acme.example"],
        ["dev"],
        ["EvilApp"],
        time=np.array([1_767_571_200]),
        user=np.array([0]),
        device=np.array([0]),
        app=np.array([0]),
        managed=np.array([False]),
    )
    bad_index = bad_index[:-3] + b"\x01\x00" + bad_index[-1:]  # app index 1 of a 1-name dictionary
    unknown_flag = bad_index[:-3] + b"\x00\x00\x04"
    evil_id = bytes(range(0xE0, 0xF0))
    return [
        (SealedBatch(good[0].batch_id, bytes(flipped)), BatchAuthenticationError),
        (SealedBatch(bytes(16), good[1].data), BatchIdError),
        (SealedBatch(foreign.batch_id, foreign.data), BatchTenantError),
        (SealedBatch(evil_id, seal_plaintext(KEY, TENANT, evil_id, bad_index)), BatchFormatError),
        (
            SealedBatch(evil_id[::-1], seal_plaintext(KEY, TENANT, evil_id[::-1], unknown_flag)),
            BatchFormatError,
        ),
        (good[2], BatchReplayError),  # absorbed already below
    ]


def test_bad_batches_are_rejected_counted_and_never_aggregated() -> None:
    tenant = generate_tenant(KEY, 4, events=2_000, weeks=2)
    good = list(tenant.batches)
    state = Aggregate(TENANT)
    state.absorb(KEY, [good[2]])
    bad = _bad_batches(good)
    mixed: list[SealedBatch] = []
    for i, batch in enumerate(good[3:]):  # bad ones in the middle of one chunk
        mixed.append(batch)
        if i % 5 == 0 and bad:
            mixed.append(bad.pop(0)[0])
    mixed += [b for b, _ in bad]
    result = state.absorb(KEY, mixed)
    expected = [type_ for _, type_ in _bad_batches(good)]
    assert sorted(type(r.error).__name__ for r in result.rejected) == sorted(
        t.__name__ for t in expected
    )
    assert result.batches == len(good) - 3
    # what was aggregated is exactly the good batches: no EvilApp, no foreign member
    clean = Aggregate(TENANT)
    clean.absorb(KEY, [good[2], *good[3:]])
    assert state == clean
    assert "EvilApp" not in {a.app for a in state.report().apps}
    # a first batch that fails authentication does not spoil the rest of its chunk
    assert state.report().to_dict() == oracle(TENANT, [good[2], *good[3:]])


def test_a_batch_id_repeated_within_one_call_is_a_replay() -> None:
    tenant = generate_tenant(KEY, 4, events=300, weeks=1)
    batch = tenant.batches[0]
    state = Aggregate(TENANT)
    result = state.absorb(KEY, [batch, batch])
    assert result.batches == 1
    assert [type(r.error) for r in result.rejected] == [BatchReplayError]
    assert state.report().events == len(open_batch(KEY, batch.data, tenant=TENANT))


def test_ties_are_broken_by_name() -> None:
    t = 1_767_571_200
    evs = [
        Event("u1", "d", "Zeta", False, t),
        Event("u1", "d", "Alpha", False, t),
        Event("u1", "d", "Mid", True, t),
        Event("u2", "d", "Beta", False, t + 8 * 86400),
    ]
    batch = SealedBatch(bytes(16), seal_batch(KEY, TENANT, bytes(16), evs))
    report, _ = baseline_report(KEY, TENANT, [batch])
    assert [a.app for a in report.apps] == ["Alpha", "Beta", "Mid", "Zeta"]
    assert [a.app for a in report.top_unmanaged] == ["Alpha", "Beta", "Zeta"]
    assert [(w.week, w.users, w.events) for w in report.weeks] == [
        ("2026-01-05", 1, 3),
        ("2026-01-12", 1, 1),
    ]
    assert report.split.managed_apps == 1
    assert report.split.unmanaged_app_users == 2


def test_an_empty_aggregate_reports_nothing_and_round_trips() -> None:
    empty = Aggregate(TENANT)
    report = empty.report()
    assert (report.events, report.users, report.apps, report.weeks) == (0, 0, (), ())
    assert Aggregate.from_bytes(empty.to_bytes()) == empty


@pytest.fixture(scope="module")
def state_bytes() -> bytes:
    tenant = generate_tenant(KEY, 11, events=400, weeks=2, members=6)
    state = Aggregate(TENANT)
    state.absorb(KEY, tenant.batches)
    return state.to_bytes()


def test_the_state_encoding_is_canonical(state_bytes: bytes) -> None:
    restored = Aggregate.from_bytes(state_bytes)
    assert restored.to_bytes() == state_bytes


def test_every_truncation_of_the_state_is_rejected(state_bytes: bytes) -> None:
    for cut in range(len(state_bytes)):
        with pytest.raises(AggregateStateError):
            Aggregate.from_bytes(state_bytes[:cut])
    with pytest.raises(AggregateStateError):
        Aggregate.from_bytes(state_bytes + b"\0")


def test_every_byte_change_of_the_state_is_rejected_or_canonical(state_bytes: bytes) -> None:
    """A changed byte either breaks a rule (typed error) or is another canonical state
    (a changed count or name): it never decodes into something that re-encodes otherwise."""
    for i in range(len(state_bytes)):
        changed = bytearray(state_bytes)
        changed[i] ^= 0x41
        try:
            other = Aggregate.from_bytes(bytes(changed))
        except AggregateStateError:
            continue
        assert other.to_bytes() == bytes(changed)
        other.report()


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_any_bytes_are_a_state_or_a_state_error(data: bytes) -> None:
    with contextlib.suppress(AggregateStateError):
        Aggregate.from_bytes(data)


def test_an_absorbed_batch_is_remembered_across_serialization(state_bytes: bytes) -> None:
    restored = Aggregate.from_bytes(state_bytes)
    tenant = generate_tenant(KEY, 11, events=400, weeks=2, members=6)
    result = restored.absorb(KEY, tenant.batches)
    assert result.batches == 0
    assert {type(r.error) for r in result.rejected} == {BatchReplayError}
    assert restored.to_bytes() == state_bytes


_VALID = [
    [Event("alice@acme.example", "mac-1", "Slack", True, 1_767_571_200 + i) for i in range(3)]
    + [Event("alice@acme.example", "mac-1", "Canva", False, 1_767_571_200)],
    [
        Event("zoë@acme.example", "iphone-ü", "Café", False, 1_767_571_200),
        Event("zoë@acme.example", "ipad", "Straße", True, 1_767_571_300),
        Event("zoë@acme.example", "ipad", "Café", True, 1_767_571_400),
    ],
]


@given(
    st.sampled_from(_VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=3),
    st.integers(0, 3),
)
@settings(max_examples=400, deadline=None)
def test_the_chunked_checks_agree_with_the_strict_decoder(
    events: list[Event], changes: list[tuple[int, int]], neighbours: int
) -> None:
    """A mutated authentic plaintext (a hostile key holder) is accepted by the aggregate's
    vectorized path exactly when the strict decoder accepts it, with the same events, and a
    bad batch among good ones in one chunk is rejected alone."""
    from hermetic.reporting.format import encode_events

    plaintext = bytearray(encode_events(events))
    for at, value in changes:
        plaintext[at % len(plaintext)] = value
    bad_id = bytes(range(100, 116))
    sealed = SealedBatch(bad_id, seal_plaintext(KEY, TENANT, bad_id, bytes(plaintext)))
    goods = [
        SealedBatch(bytes([i]) * 16, seal_batch(KEY, TENANT, bytes([i]) * 16, _VALID[i % 2]))
        for i in range(neighbours)
    ]
    try:
        open_batch(KEY, sealed.data, tenant=TENANT)
        strict_ok = True
    except BatchFormatError:
        strict_ok = False
    state = Aggregate(TENANT)
    result = state.absorb(KEY, [*goods[:1], sealed, *goods[1:]])
    assert result.batches == neighbours + strict_ok
    assert [type(r.error) for r in result.rejected] == ([] if strict_ok else [BatchFormatError])
    kept = [*goods, sealed] if strict_ok else goods
    assert state.report().to_dict() == oracle(TENANT, kept)


def test_stored_batch_ids_of_the_wrong_type_or_size_are_rejected() -> None:
    batch = generate_tenant(KEY, 4, events=100, weeks=1).batches[0]
    state = Aggregate(TENANT)
    odd = [
        SealedBatch(bytearray(batch.batch_id), batch.data),  # type: ignore[arg-type]
        SealedBatch(batch.batch_id[:8], batch.data),
        SealedBatch("not bytes", batch.data),  # type: ignore[arg-type]
        SealedBatch(batch.batch_id, "not bytes"),  # type: ignore[arg-type]
    ]
    result = state.absorb(KEY, odd)
    assert [type(r.error) for r in result.rejected] == [BatchIdError] * 3 + [BatchFormatError]
    assert state.report().events == 0
