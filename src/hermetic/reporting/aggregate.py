"""The application-insights report and the incremental aggregate it is computed from.

An :class:`Aggregate` is what the reporting service keeps per tenant between refreshes: it
absorbs sealed batches (only the new ones: it remembers every batch id it absorbed and
rejects a replay), serializes to one canonical byte string (which persistence seals), merges
with another aggregate of the same tenant, and yields the :class:`Report`. The client-side
baseline is the same computation from scratch: every batch downloaded, decrypted and
absorbed into an empty aggregate (:func:`baseline_report`).

What the aggregate holds is exactly what the report needs and no event: the distinct
(app, member, sign-in through SSO or not) triples, the distinct (week, member) pairs, and
event counts per app and per week. Definitions (``docs/reporting.md``):

* an app is **managed** when at least one of its sign-ins went through the tenant's SSO,
  **unmanaged** when none did;
* an app's **users** are the distinct members who signed in to it; ``users_outside_sso``
  those of them with at least one sign-in that did not go through SSO;
* weeks are ISO weeks (Monday 00:00 UTC to the next Monday); a week's **users** are the
  distinct members with a sign-in in it;
* orderings are by the figure, largest first, then by name (code point order); the
  weekly trend runs from the first week with an event to the last, empty weeks included.

The hot path decrypts each batch (one AES-GCM call), reads its three dictionaries, and
then checks and aggregates the columns of a whole chunk of batches with numpy at once;
a chunk that fails a vectorized check is retried batch by batch, so a malformed batch
is rejected alone and never aggregated.
"""

from __future__ import annotations

import datetime
import struct
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from hermetic.errors import (
    AggregateMergeError,
    AggregateStateError,
    BatchError,
    BatchFormatError,
    BatchIdError,
    BatchReplayError,
    ReportingUsageError,
)
from hermetic.reporting.format import (
    _CONTROL,
    BATCH_ID_SIZE,
    EVENT_BYTES,
    FLAG_MANAGED,
    MAX_BASE_TIME,
    MAX_EVENTS,
    MAX_NAME_BYTES,
    BatchOpener,
    check_tenant,
    decode_plaintext,
    name_problem,
)

WEEK = 7 * 86400
_MONDAY_OFFSET = 3 * 86400
"""Unix time 0 is a Thursday: week w starts at w * WEEK - 3 days (Monday 1969-12-29)."""
TOP_UNMANAGED = 10
CHUNK_BATCHES = 1024
"""Batches decrypted before their columns are aggregated together."""

STATE_MAGIC = b"HRA1"
STATE_VERSION = 1
_FIXED = struct.Struct("<IQHHH")  # events, base time, member/device/app dictionary sizes
_STATE_HEAD = struct.Struct(">4sHB")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_USER_BITS = 32


class SealedBatch(NamedTuple):
    """A batch as the record store holds it: the id it is stored under and its sealed bytes."""

    batch_id: bytes
    data: bytes


@dataclass(frozen=True)
class Rejected:
    """A batch an aggregate refused, and the typed error that says why."""

    batch_id: bytes
    error: BatchError


@dataclass(frozen=True)
class AbsorbResult:
    batches: int
    """Batches absorbed by this call."""
    events: int
    rejected: tuple[Rejected, ...] = ()


@dataclass(frozen=True)
class AppUsage:
    app: str
    managed: bool
    users: int
    users_outside_sso: int
    events: int
    sso_events: int


@dataclass(frozen=True)
class WeekUsage:
    week: str
    """The Monday that starts the week, ISO date (UTC)."""
    users: int
    events: int


@dataclass(frozen=True)
class Split:
    """Managed against unmanaged apps: how many apps, distinct members, sign-ins."""

    managed_apps: int
    unmanaged_apps: int
    managed_app_users: int
    unmanaged_app_users: int
    managed_app_events: int
    unmanaged_app_events: int


@dataclass(frozen=True)
class Report:
    tenant: str
    batches: int
    events: int
    users: int
    split: Split
    apps: tuple[AppUsage, ...]
    top_unmanaged: tuple[AppUsage, ...]
    weeks: tuple[WeekUsage, ...]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values (dicts, lists, str, int, bool), in order."""
        out = asdict(self)
        for name in ("apps", "top_unmanaged", "weeks"):
            out[name] = list(out[name])
        return out


def week_start(week: int) -> str:
    return (
        datetime.datetime.fromtimestamp(week * WEEK - _MONDAY_OFFSET, datetime.UTC)
        .date()
        .isoformat()
    )


class _Staged(NamedTuple):
    """One authentic plaintext waiting to be checked and aggregated with its chunk."""

    batch_id: bytes
    plaintext: bytes
    events: int
    base: int
    users: int
    devices: int
    apps: int
    names_at: int
    columns_at: int


_Chunk = list[_Staged]


class _Malformed(Exception):
    """A vectorized check of a chunk failed: some batch in it is malformed."""


def sorted_distinct(keys: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The distinct values of ``keys``, sorted (numpy's hash-based unique is slower on
    millions of distinct int64 than one sort)."""
    keys = np.sort(keys)
    if len(keys) < 2:
        return keys
    keep = np.empty(len(keys), dtype=np.bool_)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


def _count_present(ids: npt.NDArray[np.int64], size: int) -> int:
    """How many distinct values ``ids`` (each in range(size)) holds."""
    return int(np.count_nonzero(np.bincount(ids, minlength=size)))


def baseline_report(
    key: bytes, tenant: str, batches: Iterable[SealedBatch]
) -> tuple[Report, AbsorbResult]:
    """The client-side baseline: every batch of the tenant, downloaded, decrypted and
    aggregated from scratch, as an admin client did before the enclave."""
    aggregate = Aggregate(tenant)
    result = aggregate.absorb(key, batches)
    return aggregate.report(), result


class _Keys:
    """A growing set of int64 keys: a sorted distinct array plus what was added since."""

    __slots__ = ("_pending", "_pending_size", "_sorted")

    def __init__(self, keys: npt.NDArray[np.int64] | None = None) -> None:
        self._sorted = np.zeros(0, dtype=np.int64) if keys is None else keys
        self._pending: list[npt.NDArray[np.int64]] = []
        self._pending_size = 0

    def add(self, keys: npt.NDArray[np.int64]) -> None:
        self._pending.append(keys)
        self._pending_size += len(keys)
        if self._pending_size > max(4 * len(self._sorted), 1 << 22):
            self.array()

    def array(self) -> npt.NDArray[np.int64]:
        """The distinct keys, sorted."""
        if self._pending:
            self._sorted = sorted_distinct(np.concatenate([self._sorted, *self._pending]))
            self._pending, self._pending_size = [], 0
        return self._sorted


def _intern(names: Sequence[str], ids: dict[str, int], order: list[str]) -> list[int]:
    out = []
    for name in names:
        index = ids.get(name)
        if index is None:
            index = ids[name] = len(order)
            order.append(name)
        out.append(index)
    return out


def _stage(batch_id: bytes, plaintext: bytes) -> _Staged:
    """Read the fixed header of one authentic plaintext; every other check runs on the
    whole chunk (:func:`_check_chunk`)."""
    size = len(plaintext)
    if size < _FIXED.size:
        raise BatchFormatError("batch plaintext: shorter than its header")
    n, base, users, devices, apps = _FIXED.unpack_from(plaintext)
    if not 1 <= n <= MAX_EVENTS:
        raise BatchFormatError(f"batch plaintext: {n} events, expected 1 to {MAX_EVENTS}")
    if base >= MAX_BASE_TIME:
        raise BatchFormatError("batch plaintext: base time out of range")
    if not (users and devices and apps):
        raise BatchFormatError("batch plaintext: an empty dictionary")
    names_at = _FIXED.size + 2 * (users + devices + apps)
    at = size - n * EVENT_BYTES
    if at < names_at:
        raise BatchFormatError("batch plaintext: shorter than its dictionaries and columns")
    return _Staged(batch_id, plaintext, n, base, users, devices, apps, names_at, at)


def _check_chunk(
    chunk: _Chunk,
) -> tuple[list[str], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64],
           npt.NDArray[np.int64], npt.NDArray[np.int64]]:  # fmt: skip
    """Every rule of the plaintext layout, checked over a whole chunk at once.

    Returns the chunk's distinct names, each dictionary entry's index among them, each
    event's member and app entry (positions in the chunk's concatenated dictionaries), its
    SSO flag and its time; raises :class:`_Malformed` when any batch breaks a rule.
    """
    _, plaintexts, ns, bases, users, devices, apps, names_ats, ats = zip(*chunk, strict=True)
    counts = np.array(ns, dtype=np.int64)
    sizes = np.array([users, devices, apps], dtype=np.int64).T.ravel()  # per batch: m, d, a
    lengths = np.frombuffer(
        b"".join([p[_FIXED.size : q] for p, q in zip(plaintexts, names_ats, strict=True)]), "<u2"
    ).astype(np.int64)
    raw = b"".join([p[q:r] for p, q, r in zip(plaintexts, names_ats, ats, strict=True)])
    blob_sizes = np.array(ats, dtype=np.int64) - np.array(names_ats, dtype=np.int64)
    # each batch's names fill exactly its blob; every name 1..MAX_NAME_BYTES bytes
    per_batch = sizes.reshape(-1, 3).sum(axis=1)
    first_name = np.cumsum(per_batch) - per_batch
    filled = np.add.reduceat(lengths, first_name) == blob_sizes
    if not bool(filled.all()) or int(lengths.min()) < 1 or int(lengths.max()) > MAX_NAME_BYTES:
        raise _Malformed
    ends = np.cumsum(lengths)
    pieces = list(map(raw.__getitem__, map(slice, (ends - lengths).tolist(), ends.tolist())))
    # names repeat from batch to batch: each distinct one is decoded and checked once
    index = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    local = np.fromiter(map(index.__getitem__, pieces), np.int64, len(pieces))
    names: list[str] = []
    for piece in index:
        try:
            name = piece.decode()
        except UnicodeDecodeError:
            raise _Malformed from None
        if _CONTROL.search(name) is not None or not (
            name.isascii() or unicodedata.is_normalized("NFC", name)
        ):
            raise _Malformed
        names.append(name)
    # no name twice in one dictionary
    dictionary = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    if len(sorted_distinct((dictionary << 32) | local)) != len(local):
        raise _Malformed
    # every index within its dictionary, every dictionary entry used by an event
    entry_start = (np.cumsum(sizes) - sizes).reshape(-1, 3)
    positions = []
    for column in range(3):  # member, device, app: the u16 columns after the times
        first, last = 4 + 2 * column, 6 + 2 * column
        part = b"".join(
            [p[c + first * n : c + last * n] for p, n, c in zip(plaintexts, ns, ats, strict=True)]
        )
        entry = np.frombuffer(part, "<u2").astype(np.int64)
        if not bool((entry < np.repeat(sizes[column::3], counts)).all()):
            raise _Malformed
        positions.append(entry + np.repeat(entry_start[:, column], counts))
    if not bool(np.bincount(np.concatenate(positions), minlength=len(local)).all()):
        raise _Malformed
    flags = np.frombuffer(
        b"".join([p[c + 10 * n :] for p, n, c in zip(plaintexts, ns, ats, strict=True)]), np.uint8
    )
    if int(flags.max()) > FLAG_MANAGED:
        raise _Malformed
    time = np.frombuffer(
        b"".join([p[c : c + 4 * n] for p, n, c in zip(plaintexts, ns, ats, strict=True)]), "<u4"
    ).astype(np.int64)
    time += np.repeat(np.array(bases, dtype=np.int64), counts)
    return names, local, positions[0], positions[2], flags.astype(np.int64), time


def _why_malformed(staged: _Staged, tenant: str) -> BatchFormatError:
    """The strict decoder's own error for ``staged`` (its message says which rule); the
    vectorized checks and the strict decoder enforce the same rules."""
    try:
        decode_plaintext(staged.plaintext, tenant, staged.batch_id)
    except BatchFormatError as error:
        return error
    return BatchFormatError("batch plaintext: malformed")


class Aggregate:
    """The incremental application-insights aggregate of one tenant."""

    def __init__(self, tenant: str) -> None:
        self.tenant = check_tenant(tenant)
        self._users: list[str] = []
        self._user_ids: dict[str, int] = {}
        self._apps: list[str] = []
        self._app_ids: dict[str, int] = {}
        self._batches: set[bytes] = set()
        # sorted distinct keys, and keys absorbed since (not yet deduplicated)
        self._triples = _Keys()  # app << 33 | user << 1 | through SSO
        self._week_users = _Keys()  # week << 32 | user
        self._app_events = np.zeros(0, dtype=np.int64)
        self._app_sso_events = np.zeros(0, dtype=np.int64)
        self._week_events: dict[int, int] = {}
        self._report: Report | None = None

    # --- absorbing ------------------------------------------------------------------------

    @property
    def batch_ids(self) -> frozenset[bytes]:
        return frozenset(self._batches)

    @property
    def events(self) -> int:
        return int(self._app_events.sum())

    def absorb(self, key: bytes, batches: Iterable[SealedBatch]) -> AbsorbResult:
        """Decrypt and aggregate ``batches`` under the tenant's insights ``key``.

        Each batch that fails (format, tenant, batch id, authentication, or a batch id
        already absorbed, here or earlier in this call) is listed in the result with its
        typed error and leaves the aggregate unchanged; the others are absorbed.
        """
        opener = BatchOpener(key, self.tenant)
        rejected: list[Rejected] = []
        absorbed = events = 0
        chunk: _Chunk = []
        seen: set[bytes] = set()
        absorbed_before = self._batches
        decrypt = opener.decrypt
        for batch_id, data in batches:
            try:
                if type(batch_id) is not bytes or len(batch_id) != BATCH_ID_SIZE:
                    batch_id = batch_id if type(batch_id) is bytes else b""
                    raise BatchIdError(f"stored batch: expected a {BATCH_ID_SIZE}-byte batch id")
                if batch_id in absorbed_before or batch_id in seen:
                    raise BatchReplayError("sealed batch: this batch id was already absorbed")
                chunk.append(_stage(batch_id, decrypt(data, batch_id)[1]))
            except BatchError as error:
                rejected.append(Rejected(batch_id, error))
                continue
            seen.add(batch_id)
            if len(chunk) >= CHUNK_BATCHES:
                done = self._flush(chunk, rejected)
                absorbed, events = absorbed + done[0], events + done[1]
                chunk = []
        done = self._flush(chunk, rejected)
        return AbsorbResult(absorbed + done[0], events + done[1], tuple(rejected))

    def _intern_users(self, names: Sequence[str]) -> list[int]:
        return _intern(names, self._user_ids, self._users)

    def _intern_apps(self, names: Sequence[str]) -> list[int]:
        return _intern(names, self._app_ids, self._apps)

    def _flush(self, chunk: _Chunk, rejected: list[Rejected]) -> tuple[int, int]:
        if not chunk:
            return 0, 0
        try:
            names, local, user, app, flags, time = _check_chunk(chunk)
        except _Malformed:
            if len(chunk) > 1:  # find the culprits; the rest is aggregated without them
                return self._flush_one_by_one(chunk, rejected)
            rejected.append(Rejected(chunk[0].batch_id, _why_malformed(chunk[0], self.tenant)))
            return 0, 0
        # Names are interned only now: a rejected batch adds no member and no app.
        user_local = local[user]
        app_local = local[app]
        lut = np.full(len(names), -1, dtype=np.int64)
        present = sorted_distinct(user_local)
        lut[present] = self._intern_users([names[i] for i in present.tolist()])
        global_user = lut[user_local]
        present = sorted_distinct(app_local)
        lut[present] = self._intern_apps([names[i] for i in present.tolist()])
        global_app = lut[app_local]
        self._aggregate(global_user, global_app, flags, time)
        self._batches.update(staged.batch_id for staged in chunk)
        return len(chunk), len(time)

    def _flush_one_by_one(self, chunk: _Chunk, rejected: list[Rejected]) -> tuple[int, int]:
        absorbed = events = 0
        for staged in chunk:
            done = self._flush([staged], rejected)
            absorbed, events = absorbed + done[0], events + done[1]
        return absorbed, events

    def _aggregate(
        self,
        user: npt.NDArray[np.int64],
        app: npt.NDArray[np.int64],
        managed: npt.NDArray[np.int64],
        time: npt.NDArray[np.int64],
    ) -> None:
        self._report = None
        week = (time + _MONDAY_OFFSET) // WEEK
        self._triples.add((app << 33) | (user << 1) | managed)
        self._week_users.add((week << _USER_BITS) | user)
        apps = len(self._apps)
        per_app = np.bincount(app * 2 + managed, minlength=2 * apps).reshape(apps, 2)
        grow = apps - len(self._app_events)
        if grow:
            self._app_events = np.concatenate([self._app_events, np.zeros(grow, np.int64)])
            self._app_sso_events = np.concatenate([self._app_sso_events, np.zeros(grow, np.int64)])
        self._app_events += per_app.sum(axis=1)
        self._app_sso_events += per_app[:, 1]
        weeks, counts = np.unique(week, return_counts=True)
        for w, c in zip(weeks.tolist(), counts.tolist(), strict=True):
            self._week_events[w] = self._week_events.get(w, 0) + c

    # --- the report -------------------------------------------------------------------------

    def report(self) -> Report:
        """The report of everything absorbed so far (computed once per change)."""
        if self._report is None:
            self._report = self._compute_report()
        return self._report

    def _compute_report(self) -> Report:
        apps = self._apps
        triples = self._triples.array()
        t_app = triples >> 33
        t_user = (triples >> 1) & ((1 << 32) - 1)
        t_sso = triples & 1
        n_apps = len(apps)
        n_users = len(self._users)
        # distinct users per app: a user appears once or twice (with and without SSO); the
        # triples are sorted, so (app, user) pairs are too
        pairs = sorted_distinct(triples >> 1)
        pair_app, pair_user = pairs >> 32, pairs & ((1 << 32) - 1)
        users_per_app = np.bincount(pair_app, minlength=n_apps)
        outside = np.bincount(t_app[t_sso == 0], minlength=n_apps)
        sso_events = self._app_sso_events
        app_events = self._app_events
        managed = sso_events > 0
        usage = [
            AppUsage(
                app=apps[i],
                managed=bool(managed[i]),
                users=int(users_per_app[i]),
                users_outside_sso=int(outside[i]),
                events=int(app_events[i]),
                sso_events=int(sso_events[i]),
            )
            for i in range(n_apps)
        ]
        usage.sort(key=lambda a: (-a.users, a.app))
        managed_pair = managed[pair_app]
        split = Split(
            managed_apps=int(managed.sum()),
            unmanaged_apps=int(n_apps - managed.sum()),
            managed_app_users=_count_present(pair_user[managed_pair], n_users),
            unmanaged_app_users=_count_present(pair_user[~managed_pair], n_users),
            managed_app_events=int(app_events[managed].sum()),
            unmanaged_app_events=int(app_events[~managed].sum()),
        )
        unmanaged = [a for a in usage if not a.managed]
        top = sorted(unmanaged, key=lambda a: (-a.users, -a.events, a.app))[:TOP_UNMANAGED]
        weeks: list[WeekUsage] = []
        if self._week_events:
            first = min(self._week_events)
            last = max(self._week_events)
            week_users = np.bincount(
                (self._week_users.array() >> _USER_BITS) - first, minlength=last - first + 1
            ).tolist()
            for w in range(first, last + 1):
                weeks.append(
                    WeekUsage(week_start(w), week_users[w - first], self._week_events.get(w, 0))
                )
        return Report(
            tenant=self.tenant,
            batches=len(self._batches),
            events=int(app_events.sum()),
            users=_count_present(t_user, n_users),
            split=split,
            apps=tuple(usage),
            top_unmanaged=tuple(top),
            weeks=tuple(weeks),
        )

    # --- merging --------------------------------------------------------------------------

    def copy(self) -> Aggregate:
        out = Aggregate(self.tenant)
        out._add(self)
        return out

    def merge(self, other: Aggregate) -> Aggregate:
        """A new aggregate holding both ``self`` and ``other`` (same tenant, no batch in
        common: a batch absorbed twice would count its events twice)."""
        if not isinstance(other, Aggregate) or other.tenant != self.tenant:
            raise AggregateMergeError("aggregates of different tenants do not merge")
        if self._batches & other._batches:
            raise AggregateMergeError("both aggregates absorbed the same batch")
        out = self.copy()
        out._add(other)
        return out

    def _add(self, other: Aggregate) -> None:
        self._report = None
        users = np.array(self._intern_users(other._users) or [0], dtype=np.int64)
        apps = np.array(self._intern_apps(other._apps) or [0], dtype=np.int64)
        triples = other._triples.array()
        if len(triples):
            self._triples.add(
                (apps[triples >> 33] << 33)
                | (users[(triples >> 1) & 0xFFFFFFFF] << 1)
                | (triples & 1)
            )
        week_users = other._week_users.array()
        if len(week_users):
            self._week_users.add(
                ((week_users >> _USER_BITS) << _USER_BITS) | users[week_users & 0xFFFFFFFF]
            )
        grow = len(self._apps) - len(self._app_events)
        if grow:
            self._app_events = np.concatenate([self._app_events, np.zeros(grow, np.int64)])
            self._app_sso_events = np.concatenate([self._app_sso_events, np.zeros(grow, np.int64)])
        if len(other._apps):
            np.add.at(self._app_events, apps, other._app_events)
            np.add.at(self._app_sso_events, apps, other._app_sso_events)
        for w, c in other._week_events.items():
            self._week_events[w] = self._week_events.get(w, 0) + c
        self._batches |= other._batches

    # --- canonical serialization ----------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Aggregate) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    def to_bytes(self) -> bytes:
        """The canonical encoding (``docs/reporting.md``): names sorted, every set sorted,
        so two aggregates of the same batches encode alike, whatever the order absorbed."""
        user_order = sorted(range(len(self._users)), key=self._users.__getitem__)
        app_order = sorted(range(len(self._apps)), key=self._apps.__getitem__)
        user_rank = np.zeros(max(len(user_order), 1), dtype=np.int64)
        user_rank[user_order] = np.arange(len(user_order))
        app_rank = np.zeros(max(len(app_order), 1), dtype=np.int64)
        app_rank[app_order] = np.arange(len(app_order))
        triples = self._triples.array()
        triples = np.sort(
            (app_rank[triples >> 33] << 33)
            | (user_rank[(triples >> 1) & 0xFFFFFFFF] << 1)
            | (triples & 1)
        )
        week_users = self._week_users.array()
        week_users = np.sort(
            ((week_users >> _USER_BITS) << _USER_BITS) | user_rank[week_users & 0xFFFFFFFF]
        )
        weeks = sorted(self._week_events)
        tenant = self.tenant.encode()
        parts = [
            _STATE_HEAD.pack(STATE_MAGIC, STATE_VERSION, len(tenant)),
            tenant,
            _names([self._users[i] for i in user_order]),
            _names([self._apps[i] for i in app_order]),
            _U32.pack(len(self._batches)),
            *sorted(self._batches),
            self._app_events[app_order].astype(">u8").tobytes(),
            self._app_sso_events[app_order].astype(">u8").tobytes(),
            _U32.pack(len(triples)),
            triples.astype(">u8").tobytes(),
            _U32.pack(len(weeks)),
            np.array(weeks, dtype=">u8").tobytes(),
            np.array([self._week_events[w] for w in weeks], dtype=">u8").tobytes(),
            _U32.pack(len(week_users)),
            week_users.astype(">u8").tobytes(),
        ]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Aggregate:
        """The aggregate :meth:`to_bytes` encoded; anything else raises
        :class:`~hermetic.errors.AggregateStateError`."""
        if not isinstance(data, bytes):
            raise AggregateStateError("aggregate state: expected bytes")
        reader = _StateReader(data)
        magic, version, tenant_length = reader.unpack(_STATE_HEAD)
        if magic != STATE_MAGIC or version != STATE_VERSION:
            raise AggregateStateError("aggregate state: not a version 1 aggregate")
        try:
            tenant = check_tenant(reader.take(tenant_length).decode("ascii"))
        except (UnicodeDecodeError, ReportingUsageError):
            raise AggregateStateError("aggregate state: bad tenant id") from None
        out = cls(tenant)
        users = reader.names()
        apps = reader.names()
        (n_batches,) = reader.unpack(_U32)
        batches = [reader.take(BATCH_ID_SIZE) for _ in range(reader.bounded(n_batches, 16))]
        if batches != sorted(set(batches)):
            raise AggregateStateError("aggregate state: batch ids not sorted and distinct")
        app_events = reader.array(len(apps)).astype(np.int64)
        app_sso = reader.array(len(apps)).astype(np.int64)
        (n_triples,) = reader.unpack(_U32)
        triples = reader.array(n_triples)
        (n_weeks,) = reader.unpack(_U32)
        weeks = reader.array(n_weeks)
        week_events = reader.array(n_weeks)
        (n_week_users,) = reader.unpack(_U32)
        week_users = reader.array(n_week_users)
        if reader.pos != len(data):
            raise AggregateStateError("aggregate state: trailing bytes")
        _check_state(
            users, apps, batches, app_events, app_sso, triples, weeks, week_events, week_users
        )
        out._users = users
        out._user_ids = {n: i for i, n in enumerate(users)}
        out._apps = apps
        out._app_ids = {n: i for i, n in enumerate(apps)}
        out._batches = set(batches)
        out._app_events = app_events
        out._app_sso_events = app_sso
        out._triples = _Keys(triples.astype(np.int64))
        out._week_users = _Keys(week_users.astype(np.int64))
        out._week_events = dict(zip(weeks.tolist(), week_events.tolist(), strict=True))
        return out


def _names(names: Sequence[str]) -> bytes:
    raw = [n.encode() for n in names]
    return _U32.pack(len(raw)) + b"".join(_U16.pack(len(r)) + r for r in raw)


class _StateReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise AggregateStateError("aggregate state: truncated")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size))

    def bounded(self, count: int, size: int) -> int:
        if count * size > len(self.data) - self.pos:
            raise AggregateStateError("aggregate state: truncated")
        return count

    def array(self, count: int) -> npt.NDArray[np.uint64]:
        raw = self.take(8 * self.bounded(count, 8))
        values = np.frombuffer(raw, ">u8").astype(np.uint64)
        if len(values) and int(values.max()) >= 1 << 62:
            raise AggregateStateError("aggregate state: a value out of range")
        return values

    def names(self) -> list[str]:
        (count,) = self.unpack(_U32)
        names: list[str] = []
        for _ in range(self.bounded(count, 3)):
            (length,) = self.unpack(_U16)
            try:
                name = self.take(length).decode()
            except UnicodeDecodeError:
                raise AggregateStateError("aggregate state: a name is not valid UTF-8") from None
            if name_problem(name) is not None:
                raise AggregateStateError("aggregate state: a name outside the naming rule")
            names.append(name)
        if any(a >= b for a, b in pairwise(names)):
            raise AggregateStateError("aggregate state: names not sorted and distinct")
        return names


def _strictly_increasing(values: npt.NDArray[np.uint64]) -> bool:
    return len(values) < 2 or bool((values[1:] > values[:-1]).all())


def _check_state(
    users: list[str],
    apps: list[str],
    batches: list[bytes],
    app_events: npt.NDArray[np.int64],
    app_sso: npt.NDArray[np.int64],
    triples: npt.NDArray[np.uint64],
    weeks: npt.NDArray[np.uint64],
    week_events: npt.NDArray[np.uint64],
    week_users: npt.NDArray[np.uint64],
) -> None:
    """Every consistency rule an aggregate built by absorbing batches keeps."""

    def fail(why: str) -> None:
        raise AggregateStateError(f"aggregate state: {why}")

    n_users, n_apps = len(users), len(apps)
    t = triples.astype(np.int64)
    wu = week_users.astype(np.int64)
    if not (_strictly_increasing(triples) and _strictly_increasing(weeks)):
        fail("triples or weeks not sorted and distinct")
    if not _strictly_increasing(week_users):
        fail("week members not sorted and distinct")
    t_app, t_user, t_sso = t >> 33, (t >> 1) & 0xFFFFFFFF, t & 1
    if len(t) and (int(t_app.max()) >= n_apps or int(t_user.max()) >= n_users):
        fail("a triple names no listed app or member")
    if _count_present(t_app, n_apps) != n_apps or _count_present(t_user, n_users) != n_users:
        fail("a listed app or member is in no triple")
    sso_triples = np.bincount(t_app[t_sso == 1], minlength=n_apps)
    other_triples = np.bincount(t_app[t_sso == 0], minlength=n_apps)
    if not (
        bool((app_sso <= app_events).all())
        and bool(((app_sso > 0) == (sso_triples > 0)).all())
        and bool((app_sso >= sso_triples).all())
        and bool((app_events - app_sso >= other_triples).all())
    ):
        fail("app event counts disagree with the triples")
    if int(app_events.sum()) != int(week_events.sum()) or (
        len(week_events) and int(week_events.min()) == 0
    ):
        fail("week event counts disagree with the app event counts")
    if (len(t) == 0) != (len(batches) == 0) or (len(t) == 0) != (len(weeks) == 0):
        fail("an aggregate with batches and no events, or events and no batch")
    w, u = wu >> _USER_BITS, wu & 0xFFFFFFFF
    if len(wu) and int(u.max()) >= n_users:
        fail("a week member names no listed member")
    if len(weeks) and int(weeks.max()) > (1 << 32):
        fail("a week out of range")
    position = np.searchsorted(weeks.astype(np.int64), w)
    if len(wu) and not bool(
        (weeks.astype(np.int64)[np.minimum(position, len(weeks) - 1)] == w).all()
    ):
        fail("a week member in a week with no events")
    per_week = np.bincount(position, minlength=len(weeks))
    if len(weeks) and not bool(
        ((per_week >= 1) & (per_week <= week_events.astype(np.int64))).all()
    ):
        fail("week member counts disagree with the week event counts")
    if len(wu) and _count_present(u, n_users) != n_users:
        fail("a listed member in no week")
