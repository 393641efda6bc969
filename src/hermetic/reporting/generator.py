"""A synthetic tenant: members, devices, apps and weeks of sign-in events, sealed as devices do.

Deterministic from a seed (for a given numpy, which ``requirements.lock`` pins): the same
seed and sizes give the same members, apps, events and batch ids. Only the AES-GCM nonces
differ from run to run, because they come from the OS exactly as on a device (a nonce
derived from the seed would repeat under the same key for other events).

The shape of a tenant, so that the report has something to show:

* members in departments, each with one to three devices and a time zone; activity per
  member is log-normal (a few heavy users, many light ones);
* apps: the SSO-managed suite every member uses (mail, chat, video), managed department
  apps, and a long tail of unmanaged apps, popular ones first (Zipf), a handful per
  member; about 4 % of the sign-ins to managed apps still bypass SSO;
* sign-ins on weekdays in working hours in the member's time zone, a few at night and on
  weekends, slowly growing from week to week;
* each device uploads its events once a week (UTC), in batches of at most
  :data:`MAX_BATCH_EVENTS`, with a fresh random batch id; batches come in upload order.

``events`` is exact: the tenant holds exactly that many sign-ins. ``first_week`` shifts the
weeks without changing the members or apps (same seed and ``members``), which is how a
later upload (the asynchronous refresh) is made.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hermetic.errors import ReportingUsageError
from hermetic.reporting.aggregate import WEEK, SealedBatch
from hermetic.reporting.format import check_key, check_tenant, encode_columns, seal_plaintext

DAY = 86400
MAX_BATCH_EVENTS = 500
DEFAULT_START = int(datetime.datetime(2026, 1, 5, tzinfo=datetime.UTC).timestamp())
"""A Monday, 00:00 UTC: week 0 of a generated tenant."""
SIGN_INS_PER_MEMBER_WEEK = 60
"""How many members ``events`` implies when ``members`` is not given."""
BYPASS_SSO = 0.04

Progress = Callable[[int, int], None]
"""Called as ``progress(events_sealed, events_total)`` after each sealed batch."""

_FIRST = (
    "Alice", "Bob", "Carmen", "Dmitri", "Elena", "Farid", "Grace", "Hiroshi", "Ines", "Jamal",
    "Kofi", "Lena", "Mateo", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tomás",
    "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoë", "Åsa", "Björn", "Chloé", "Dário",
    "Emeka", "Fatima", "Gökhan", "Hana", "Ivan", "Józef", "Kai", "Leilani", "Marta", "Nikos",
    "Olga", "Pål", "Rania", "Søren", "Thi", "Ugo", "Valentina", "William", "Yara", "Zhang",
)  # fmt: skip
_LAST = (
    "Smith", "García", "Müller", "Nguyen", "Kowalski", "Okafor", "Rossi", "Tanaka", "Silva",
    "Johansson", "Dubois", "Patel", "Kim", "Novak", "Haddad", "O'Brien", "Fernández",
    "Schmidt", "Ivanova", "Chen", "Andersen", "Costa", "Yılmaz", "Mensah", "Lindqvist",
    "Moreau", "Singh", "Sato", "Pereira", "Horváth", "Brown", "Wójcik", "Jensen", "Ali",
)  # fmt: skip
_DEPARTMENTS = (
    ("engineering", 0.30, ("GitHub", "Jira", "Confluence", "PagerDuty", "Datadog", "AWS Console")),
    ("sales", 0.20, ("Salesforce", "Gong", "Outreach", "LinkedIn Sales Navigator")),
    ("support", 0.15, ("Zendesk", "Intercom", "Confluence")),
    ("operations", 0.12, ("Asana", "Smartsheet", "Workday", "Coupa")),
    ("marketing", 0.10, ("HubSpot", "Figma", "Marketo", "Asana")),
    ("finance", 0.08, ("NetSuite", "Expensify", "Coupa", "Workday")),
    ("people", 0.05, ("Workday", "Greenhouse", "Lattice")),
)  # fmt: skip
_CORE = ("Google Workspace", "Slack", "Zoom", "Okta Dashboard", "Box", "DocuSign")
_UNMANAGED_HEAD = (
    "Canva", "Dropbox", "ChatGPT", "Grammarly", "Miro", "Calendly", "Loom", "Trello",
    "Notion", "WeTransfer", "Evernote", "Airtable", "SurveyMonkey", "Typeform", "Mailchimp",
    "Hootsuite", "Zapier", "Postman", "Replit", "Vercel", "Netlify", "Smallpdf", "iLovePDF",
    "DeepL", "Otter.ai", "Discord", "WhatsApp Web", "Telegram Web", "Pastebin", "Linktree",
    "Squarespace", "Wix", "Prezi", "Todoist", "Pocket", "Medium", "Substack", "Buffer",
    "Lucidchart", "Monday.com",
)  # fmt: skip
_SYLLABLES = (
    "zen", "lo", "tri", "fy", "ka", "mo", "bri", "vex", "qu", "ly", "sta", "nu", "pix", "ra",
    "dex", "flo", "gri", "ma", "tek", "sol", "vi", "ta", "ble", "co", "ora", "ix", "dri", "pa",
)  # fmt: skip
_DEVICE_KINDS = ("macbook", "thinkpad", "surface", "iphone", "pixel", "ipad", "imac", "xps")
_OFFSETS = ((-8, 0.15), (-5, 0.35), (0, 0.10), (1, 0.25), (2, 0.05), (5, 0.05), (9, 0.05))


@dataclass(frozen=True)
class Member:
    name: str
    """The member's sign-in name (an e-mail address)."""
    department: str
    devices: tuple[str, ...]
    utc_offset: int
    """Hours east of UTC of the member's working day."""


@dataclass(frozen=True)
class App:
    name: str
    managed: bool
    """Integrated with the tenant's SSO (most sign-ins to it go through SSO)."""


@dataclass(frozen=True)
class SyntheticTenant:
    tenant: str
    seed: int
    start: int
    """Unix time of the Monday 00:00 UTC that starts week 0."""
    first_week: int
    weeks: int
    members: tuple[Member, ...]
    apps: tuple[App, ...]
    batches: tuple[SealedBatch, ...]
    events: int


def default_members(events: int, weeks: int) -> int:
    return max(10, events // (weeks * SIGN_INS_PER_MEMBER_WEEK))


def _long_tail_name(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        parts = rng.choice(len(_SYLLABLES), size=int(rng.integers(2, 4)))
        word = "".join(_SYLLABLES[i] for i in parts.tolist())
        name = word.capitalize() + (".io" if rng.random() < 0.3 else "")
        if name not in taken:
            taken.add(name)
            return name


@dataclass(frozen=True)
class _Population:
    members: tuple[Member, ...]
    apps: tuple[App, ...]
    activity: npt.NDArray[np.float64]
    app_slots: npt.NDArray[np.int64]  # member x slot -> app index (slots past a member's apps: 0)
    app_cum: npt.NDArray[np.float64]  # member x slot cumulative choice weights (1.0 at the end)
    device_start: npt.NDArray[np.int64]
    device_count: npt.NDArray[np.int64]
    utc_offset: npt.NDArray[np.int64]
    devices: tuple[str, ...]
    device_member: npt.NDArray[np.int64]


def _population(seed: int, tenant: str, members: int) -> _Population:
    rng = np.random.default_rng([seed, 1, members])
    taken: set[str] = set(_CORE) | set(_UNMANAGED_HEAD)
    for _, _, extra in _DEPARTMENTS:
        taken |= set(extra)
    managed_names = list(dict.fromkeys([*_CORE, *(a for _, _, e in _DEPARTMENTS for a in e)]))
    tail = [_long_tail_name(rng, taken) for _ in range(150 + members // 8)]
    unmanaged_names = [*_UNMANAGED_HEAD, *tail]
    apps = [App(n, True) for n in managed_names] + [App(n, False) for n in unmanaged_names]
    index = {a.name: i for i, a in enumerate(apps)}
    zipf = 1.0 / np.arange(1, len(unmanaged_names) + 1) ** 1.1
    zipf /= zipf.sum()
    dept_p = np.array([w for _, w, _ in _DEPARTMENTS])
    off_values = np.array([o for o, _ in _OFFSETS])
    off_p = np.array([w for _, w in _OFFSETS])

    out: list[Member] = []
    names: set[str] = set()
    slots: list[list[int]] = []
    weights: list[list[float]] = []
    devices: list[str] = []
    device_member: list[int] = []
    device_start = np.zeros(members, dtype=np.int64)
    device_count = np.zeros(members, dtype=np.int64)
    offsets = np.zeros(members, dtype=np.int64)
    domain = f"{tenant}.example"
    for m in range(members):
        first = _FIRST[int(rng.integers(len(_FIRST)))]
        last = _LAST[int(rng.integers(len(_LAST)))]
        base = f"{first}.{last}".lower().replace("'", "").replace(" ", "")
        name, n = f"{base}@{domain}", 1
        while name in names:
            n += 1
            name = f"{base}{n}@{domain}"
        names.add(name)
        dept, _, dept_apps = _DEPARTMENTS[int(rng.choice(len(_DEPARTMENTS), p=dept_p))]
        count = int(rng.choice(3, p=[0.6, 0.3, 0.1])) + 1
        own = []
        for _ in range(count):
            kind = _DEVICE_KINDS[int(rng.integers(len(_DEVICE_KINDS)))]
            own.append(f"{kind}-{rng.bytes(4).hex()}")
        device_start[m] = len(devices)
        device_count[m] = count
        devices += own
        device_member += [m] * count
        offsets[m] = int(rng.choice(off_values, p=off_p))
        out.append(Member(name, dept, tuple(own), int(offsets[m])))
        chosen = {index[a]: 3.0 for a in _CORE[:3]}
        chosen |= {index[a]: 1.0 for a in _CORE[3:]}
        chosen |= {index[a]: 2.0 for a in dept_apps}
        picks = rng.choice(len(unmanaged_names), size=int(rng.integers(1, 9)), p=zipf)
        for u in picks.tolist():
            chosen.setdefault(index[unmanaged_names[u]], float(rng.uniform(0.2, 1.5)))
        slots.append(list(chosen))
        weights.append(list(chosen.values()))
    width = max(len(s) for s in slots)
    app_slots = np.zeros((members, width), dtype=np.int64)
    app_cum = np.ones((members, width), dtype=np.float64)
    for m, (s, w) in enumerate(zip(slots, weights, strict=True)):
        app_slots[m, : len(s)] = s
        cum = np.cumsum(w) / sum(w)
        cum[-1] = 1.0
        app_cum[m, : len(s)] = cum
    activity = rng.lognormal(0.0, 0.6, members)
    return _Population(
        members=tuple(out),
        apps=tuple(apps),
        activity=activity / activity.sum(),
        app_slots=app_slots,
        app_cum=app_cum,
        device_start=device_start,
        device_count=device_count,
        utc_offset=offsets,
        devices=tuple(devices),
        device_member=np.array(device_member, dtype=np.int64),
    )


def generate_tenant(
    key: bytes,
    seed: int,
    *,
    tenant: str = "acme",
    events: int = 200_000,
    weeks: int = 8,
    members: int | None = None,
    first_week: int = 0,
    start: int = DEFAULT_START,
    progress: Progress | None = None,
) -> SyntheticTenant:
    """A tenant of ``members`` members (default: from ``events``) with exactly ``events``
    sign-ins over ``weeks`` weeks from week ``first_week``, sealed under ``key``."""
    check_key(key)
    check_tenant(tenant)
    for name, value, low in (
        ("events", events, 1),
        ("weeks", weeks, 1),
        ("first_week", first_week, 0),
    ):
        if type(value) is not int or value < low:
            raise ReportingUsageError(f"{name}: expected an integer of at least {low}")
    if members is None:
        members = default_members(events, weeks)
    if type(members) is not int or not 1 <= members <= 1_000_000:
        raise ReportingUsageError("members: expected an integer from 1 to 1,000,000")
    if type(seed) is not int or seed < 0:
        raise ReportingUsageError("seed: expected a non-negative integer")
    if start % WEEK != 4 * DAY or start < 0:
        raise ReportingUsageError("start: expected a Monday 00:00 UTC")
    pop = _population(seed, tenant, members)
    rng = np.random.default_rng([seed, 2, members, first_week, weeks, events])

    member = rng.choice(members, size=events, p=pop.activity)
    device = pop.device_start[member] + (rng.random(events) * pop.device_count[member]).astype(
        np.int64
    )
    day_weight = np.tile(np.array([1.0, 1.0, 1.0, 1.0, 0.95, 0.07, 0.05]), weeks)
    day_weight *= 1.0 + 0.15 * (np.arange(7 * weeks) // 7 + first_week) / max(weeks, 8)
    day = rng.choice(7 * weeks, size=events, p=day_weight / day_weight.sum())
    working = rng.random(events) < 0.9
    hour = np.where(
        working, np.clip(rng.normal(13.0, 2.6, events), 7.0, 19.99), rng.uniform(0, 24, events)
    )
    local = (hour * 3600).astype(np.int64)
    time = start + (first_week * 7 + day) * DAY + local - pop.utc_offset[member] * 3600
    time = np.maximum(time, 0)
    u = rng.random(events)
    slot = (pop.app_cum[member] < u[:, None]).sum(axis=1)
    app = pop.app_slots[member, np.minimum(slot, pop.app_slots.shape[1] - 1)]
    app_managed = np.array([a.managed for a in pop.apps], dtype=np.bool_)
    managed = app_managed[app] & (rng.random(events) >= BYPASS_SSO)

    # Each device uploads once a week, at most MAX_BATCH_EVENTS per batch, in upload order.
    order = np.lexsort((time, device))
    time, device, app, managed = time[order], device[order], app[order], managed[order]
    week = (time - start) // WEEK
    cut = np.flatnonzero((np.diff(device) != 0) | (np.diff(week) != 0)) + 1
    bounds = _split(np.concatenate([[0], cut, [events]]))
    uploaded = [(int(week[a]), int(device[a]), a) for a, _ in bounds]
    sequence = sorted(range(len(bounds)), key=lambda i: uploaded[i])

    ids: set[bytes] = set()
    batches: list[SealedBatch] = []
    done = 0
    user_names = [m.name for m in pop.members]
    app_lut = np.zeros(len(pop.apps), dtype=np.int64)
    for i in sequence:
        a, b = bounds[i]
        batch_id = rng.bytes(16)
        while batch_id in ids:  # 128 random bits: never, but ids must be unique
            batch_id = rng.bytes(16)
        ids.add(batch_id)
        dev = int(device[a])
        apps_here = sorted(set(app[a:b].tolist()))
        app_lut[apps_here] = np.arange(len(apps_here))
        app_local = app_lut[app[a:b]]
        plaintext = encode_columns(
            [user_names[int(pop.device_member[dev])]],
            [pop.devices[dev]],
            [pop.apps[j].name for j in apps_here],
            time=time[a:b],
            user=np.zeros(b - a, dtype=np.int64),
            device=np.zeros(b - a, dtype=np.int64),
            app=app_local,
            managed=managed[a:b],
        )
        batches.append(SealedBatch(batch_id, seal_plaintext(key, tenant, batch_id, plaintext)))
        done += b - a
        if progress is not None:
            progress(done, events)
    return SyntheticTenant(
        tenant=tenant,
        seed=seed,
        start=start,
        first_week=first_week,
        weeks=weeks,
        members=pop.members,
        apps=pop.apps,
        batches=tuple(batches),
        events=events,
    )


def _split(edges: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        while b - a > MAX_BATCH_EVENTS:
            out.append((a, a + MAX_BATCH_EVENTS))
            a += MAX_BATCH_EVENTS
        out.append((a, b))
    return out
