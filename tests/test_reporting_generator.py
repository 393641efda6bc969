"""The synthetic tenant: deterministic from its seed, realistic in shape, sealed as devices do."""

from __future__ import annotations

import datetime
from collections import Counter

import pytest

from hermetic.errors import ReportingUsageError
from hermetic.reporting.aggregate import baseline_report
from hermetic.reporting.format import MAX_EVENTS, open_batch
from hermetic.reporting.generator import (
    DEFAULT_START,
    MAX_BATCH_EVENTS,
    SyntheticTenant,
    generate_tenant,
)

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def tenant() -> SyntheticTenant:
    return generate_tenant(KEY, 42, events=20_000, weeks=4)


def _events(tenant: SyntheticTenant) -> list:  # type: ignore[type-arg]
    out = []
    for batch in tenant.batches:
        out += list(open_batch(KEY, batch.data, tenant="acme", batch_id=batch.batch_id).events())
    return out


def test_same_seed_same_tenant_and_report(tenant: SyntheticTenant) -> None:
    again = generate_tenant(KEY, 42, events=20_000, weeks=4)
    assert again.members == tenant.members
    assert again.apps == tenant.apps
    assert [b.batch_id for b in again.batches] == [b.batch_id for b in tenant.batches]
    assert _events(again) == _events(tenant)
    # nonces come from the OS, as on a device: same events, other ciphertexts
    assert [b.data for b in again.batches] != [b.data for b in tenant.batches]
    assert (
        baseline_report(KEY, "acme", again.batches)[0]
        == baseline_report(KEY, "acme", tenant.batches)[0]
    )


def test_another_seed_another_tenant(tenant: SyntheticTenant) -> None:
    other = generate_tenant(KEY, 43, events=20_000, weeks=4)
    assert other.members != tenant.members
    assert (
        baseline_report(KEY, "acme", other.batches)[0]
        != baseline_report(KEY, "acme", tenant.batches)[0]
    )


def test_exact_event_count_unique_batch_ids_bounded_batches(tenant: SyntheticTenant) -> None:
    sizes = [len(open_batch(KEY, b.data, tenant="acme")) for b in tenant.batches]
    assert sum(sizes) == tenant.events == 20_000
    assert max(sizes) <= MAX_BATCH_EVENTS <= MAX_EVENTS
    ids = [b.batch_id for b in tenant.batches]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 for i in ids)


def test_each_batch_is_one_device_of_one_member_in_one_week(tenant: SyntheticTenant) -> None:
    owner = {d: m.name for m in tenant.members for d in m.devices}
    for batch in tenant.batches:
        opened = open_batch(KEY, batch.data, tenant="acme")
        assert len(opened.devices) == 1
        assert opened.users == (owner[opened.devices[0]],)
        weeks = {(t - DEFAULT_START) // (7 * 86400) for t in opened.time.tolist()}
        assert len(weeks) == 1


def test_the_tenant_looks_like_a_company(tenant: SyntheticTenant) -> None:
    events = _events(tenant)
    managed_apps = {a.name for a in tenant.apps if a.managed}
    # weekdays dominate, and working hours in the member's time zone
    offset = {m.name: m.utc_offset for m in tenant.members}
    local = [
        datetime.datetime.fromtimestamp(e.time + offset[e.user] * 3600, datetime.UTC)
        for e in events
    ]
    weekend = sum(1 for t in local if t.weekday() >= 5)
    assert weekend < 0.05 * len(events)
    working = sum(1 for t in local if 8 <= t.hour < 19)
    assert working > 0.75 * len(events)
    # managed apps: mostly through SSO, some bypass; unmanaged: never through SSO
    to_managed = [e for e in events if e.app in managed_apps]
    assert 0.9 < sum(e.managed for e in to_managed) / len(to_managed) < 1.0
    assert not any(e.managed for e in events if e.app not in managed_apps)
    # a long tail: many unmanaged apps, the most popular used by far more members
    report = baseline_report(KEY, "acme", tenant.batches)[0]
    unmanaged = [a for a in report.apps if not a.managed]
    assert len(unmanaged) > 30
    assert unmanaged[0].users > 5 * unmanaged[len(unmanaged) // 2].users
    # several devices for some members, non-ASCII names for some
    assert Counter(len(m.devices) for m in tenant.members)[1] < len(tenant.members)
    assert any(not m.name.isascii() for m in tenant.members)


def test_progress_is_reported_up_to_the_total() -> None:
    seen: list[tuple[int, int]] = []
    generated = generate_tenant(
        KEY, 1, events=3_000, weeks=2, progress=lambda d, t: seen.append((d, t))
    )
    assert len(seen) == len(generated.batches)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (3_000, 3_000)


def test_later_weeks_keep_the_population() -> None:
    first = generate_tenant(KEY, 8, events=1_000, weeks=2, members=30)
    later = generate_tenant(KEY, 8, events=500, weeks=1, members=30, first_week=2)
    assert later.members == first.members
    assert not {b.batch_id for b in first.batches} & {b.batch_id for b in later.batches}
    assert min(e.time for e in _events(later)) > DEFAULT_START + 2 * 7 * 86400 - 86400


def test_names_never_appear_in_the_sealed_batches(tenant: SyntheticTenant) -> None:
    blob = b"".join(b.data for b in tenant.batches)
    names = [m.name for m in tenant.members] + [d for m in tenant.members for d in m.devices]
    names += [a.name for a in tenant.apps]
    assert all(n.encode() not in blob for n in names if len(n.encode()) >= 5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"events": 0},
        {"weeks": 0},
        {"members": 0},
        {"first_week": -1},
        {"tenant": "Not A Tenant"},
        {"start": DEFAULT_START + 3600},
    ],
)
def test_bad_parameters_are_usage_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ReportingUsageError):
        generate_tenant(KEY, 1, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ReportingUsageError):
        generate_tenant(b"short", 1)
