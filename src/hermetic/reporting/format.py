"""Sealed batches of sign-in events: the one format devices upload and the reporting service opens.

A batch is what one member device uploads at a time: its sign-in events (who, on which
device, to which app, whether the sign-in went through the tenant's SSO, when), encoded
column by column with a dictionary of the names, and sealed with AES-256-GCM under the
tenant's insights key. The record store and the parent only ever hold the sealed bytes:
every name (member, device, app) is inside the ciphertext. ``docs/reporting.md`` gives
the byte layout.

The associated data binds the tenant, the batch id and the schema version, domain
separated and length prefixed, so a batch does not open under another tenant, as another
batch (a replay under a fresh id) or as another version of the format.

Sans-IO: pure functions over bytes. :func:`open_batch` is strict: any input that is not
exactly a batch this module seals raises a :class:`~hermetic.errors.BatchError` subclass
(never another exception), and nothing of a batch that fails is returned.
"""

from __future__ import annotations

import functools
import os
import re
import struct
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hermetic.errors import (
    BatchAuthenticationError,
    BatchFormatError,
    BatchIdError,
    BatchSchemaError,
    BatchTenantError,
    ReportingUsageError,
)

SCHEMA_VERSION = 1
"""The one schema version this module writes and reads."""
SUPPORTED_VERSIONS = frozenset({SCHEMA_VERSION})

MAGIC = b"HRB1"
"""The first four bytes of every sealed batch (hermetic reporting batch)."""
DOMAIN = b"hermetic/reporting/event-batch"
"""Domain label: the first field of every batch's associated data."""

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
BATCH_ID_SIZE = 16
MAX_TENANT_LENGTH = 64
MAX_NAME_BYTES = 1024
"""Longest member, device or app name (UTF-8 bytes)."""
MAX_DICTIONARY = 0xFFFF
"""Most names in one dictionary (indices are 16-bit)."""
MAX_EVENTS = 1 << 20
"""Most events in one batch."""
MAX_BASE_TIME = 1 << 37
"""Exclusive bound of a batch's base time (Unix seconds): base + a 32-bit offset stays
before year 6500, within every calendar routine."""
EVENT_BYTES = 4 + 2 + 2 + 2 + 1
"""Bytes per event in the columns: time offset, member, device, app, flags."""
FLAG_MANAGED = 0x01
"""Flags bit 0: the sign-in went through the tenant's SSO (the app is managed)."""
_KNOWN_FLAGS = FLAG_MANAGED

_TENANT = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HEADER = struct.Struct(">4sHB")  # magic, schema version, tenant length
_PLAIN_HEAD = struct.Struct("<IQ")  # event count, base time
_U16 = struct.Struct("<H")
_MIN_SEALED = _HEADER.size + 1 + BATCH_ID_SIZE + NONCE_SIZE + TAG_SIZE
MAX_SEALED_SIZE = 64 << 20
"""Largest sealed batch :func:`open_batch` reads (a full batch is well under this)."""

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
"""What a name may not hold: C0/C1 controls and DEL (table and log safety) and lone
surrogates (not Unicode text: no UTF-8 encoder accepts them)."""

_LE_U32 = np.dtype("<u4")
_LE_U16 = np.dtype("<u2")
_U8 = np.dtype("u1")


class Event(NamedTuple):
    """One sign-in: a member on one of their devices signs in to an app at a time."""

    user: str
    device: str
    app: str
    managed: bool
    time: int
    """Unix seconds, UTC."""


@dataclass(frozen=True, eq=False)
class EventBatch:
    """An opened batch: its identity, its three dictionaries and its five columns.

    ``user``, ``device`` and ``app`` index the dictionaries; ``time`` is absolute Unix
    seconds (int64); ``managed`` is a bool column.
    """

    tenant: str
    batch_id: bytes
    users: tuple[str, ...]
    devices: tuple[str, ...]
    apps: tuple[str, ...]
    time: npt.NDArray[np.int64]
    user: npt.NDArray[np.uint16]
    device: npt.NDArray[np.uint16]
    app: npt.NDArray[np.uint16]
    managed: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return len(self.time)

    def events(self) -> Iterator[Event]:
        """The events with their names, in batch order."""
        users, devices, apps = self.users, self.devices, self.apps
        for t, u, d, a, m in zip(
            self.time.tolist(),
            self.user.tolist(),
            self.device.tolist(),
            self.app.tolist(),
            self.managed.tolist(),
            strict=True,
        ):
            yield Event(users[u], devices[d], apps[a], bool(m), t)


# --- checks of the caller's values ---------------------------------------------------------


def check_tenant(value: object) -> str:
    """A tenant id, by the persistence service's rule: one name segment (``acme``,
    ``tenant-7``): 1 to 64 of a-z 0-9 . _ -, starting with a letter or digit."""
    if not isinstance(value, str) or _TENANT.fullmatch(value) is None:
        raise ReportingUsageError(
            "tenant: expected 1 to 64 characters of a-z 0-9 . _ -, starting with a letter or digit"
        )
    return value


def check_key(key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise ReportingUsageError(f"insights key: expected {KEY_SIZE} bytes")
    return key


def check_batch_id(value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != BATCH_ID_SIZE:
        raise ReportingUsageError(f"batch id: expected {BATCH_ID_SIZE} bytes")
    return value


@functools.lru_cache(maxsize=1 << 16)
def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a member, device or app name, or None when it can.

    A name is non-empty Unicode text in NFC, with no control character, of at most
    :data:`MAX_NAME_BYTES` UTF-8 bytes: one spelling per name, so two spellings of one app
    never count as two apps. The message never repeats the name.
    """
    if not name:
        return "empty name"
    if _CONTROL.search(name) is not None:
        return "name holds a control character or a lone surrogate"
    if len(name) > MAX_NAME_BYTES or len(name.encode()) > MAX_NAME_BYTES:
        return f"name longer than {MAX_NAME_BYTES} UTF-8 bytes"
    if not unicodedata.is_normalized("NFC", name):
        return "name not in Unicode normalization form C"
    return None


def associated_data(tenant: str, batch_id: bytes, version: int = SCHEMA_VERSION) -> bytes:
    """The AES-GCM associated data of a batch: each field as a 4-byte big-endian length and
    its bytes (domain, schema version as 2 bytes, tenant, batch id)."""
    fields = (DOMAIN, version.to_bytes(2, "big"), tenant.encode(), batch_id)
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


# --- sealing (the device side) -------------------------------------------------------------


def _check_dictionary(names: Sequence[str], column: str) -> None:
    if not 1 <= len(names) <= MAX_DICTIONARY:
        raise ReportingUsageError(f"batch: expected 1 to {MAX_DICTIONARY} {column} names")
    for name in names:
        if not isinstance(name, str):
            raise ReportingUsageError(f"{column} name: expected a string")
        if (problem := name_problem(name)) is not None:
            raise ReportingUsageError(f"{column} name: {problem}")
    if len(set(names)) != len(names):
        raise ReportingUsageError(f"batch: a {column} name is listed twice")


def _encode_dictionaries(*dictionaries: Sequence[str]) -> bytes:
    raw = [name.encode() for names in dictionaries for name in names]
    counts = struct.pack("<HHH", *(len(names) for names in dictionaries))
    return b"".join([counts, struct.pack(f"<{len(raw)}H", *(len(r) for r in raw)), *raw])


def _index_column(
    values: Sequence[int] | npt.NDArray[np.integer], size: int, column: str, n: int
) -> bytes:
    array = np.asarray(values)
    if array.shape != (n,) or (n and array.dtype.kind not in "iu"):
        raise ReportingUsageError(f"{column} column: expected {n} integers")
    if int(array.min()) < 0 or int(array.max()) >= size:
        raise ReportingUsageError(f"{column} column: an index past its dictionary")
    if not bool(np.bincount(array, minlength=size).all()):
        raise ReportingUsageError(f"{column} column: a dictionary name no event uses")
    return array.astype(_LE_U16).tobytes()


def encode_columns(
    users: Sequence[str],
    devices: Sequence[str],
    apps: Sequence[str],
    *,
    time: Sequence[int] | npt.NDArray[np.integer],
    user: Sequence[int] | npt.NDArray[np.integer],
    device: Sequence[int] | npt.NDArray[np.integer],
    app: Sequence[int] | npt.NDArray[np.integer],
    managed: Sequence[bool] | npt.NDArray[np.bool_],
) -> bytes:
    """The plaintext of a batch given as its dictionaries (distinct names, batch order) and
    its columns (``user``, ``device`` and ``app`` index the dictionaries, ``time`` is Unix
    seconds, ``managed`` says whether each sign-in went through SSO)."""
    times = np.asarray(time)
    n = len(times)
    if not 1 <= n <= MAX_EVENTS:
        raise ReportingUsageError(f"batch: expected 1 to {MAX_EVENTS} events, got {n}")
    if times.shape != (n,) or times.dtype.kind not in "iu":
        raise ReportingUsageError("time column: expected integers (Unix seconds)")
    base = int(times.min())
    if base < 0 or base >= MAX_BASE_TIME or int(times.max()) - base > 0xFFFFFFFF:
        raise ReportingUsageError(
            "time column: expected Unix seconds from 0, a batch spanning under 2**32 seconds"
        )
    flags = np.asarray(managed)
    if flags.shape != (n,) or flags.dtype != np.bool_:
        raise ReportingUsageError(f"managed column: expected {n} bools")
    for names, column in ((users, "member"), (devices, "device"), (apps, "app")):
        _check_dictionary(names, column)
    return b"".join(
        (
            _PLAIN_HEAD.pack(n, base),
            _encode_dictionaries(users, devices, apps),
            (times.astype(np.int64) - base).astype(_LE_U32).tobytes(),
            _index_column(user, len(users), "member", n),
            _index_column(device, len(devices), "device", n),
            _index_column(app, len(apps), "app", n),
            flags.astype(_U8).tobytes(),
        )
    )


def _dictionary(names: Iterable[str]) -> tuple[list[str], list[int]]:
    order: dict[str, int] = {}
    index = [order.setdefault(name, len(order)) for name in names]
    return list(order), index


def encode_events(events: Sequence[Event]) -> bytes:
    """The plaintext of a batch of ``events`` (1 to :data:`MAX_EVENTS`), before sealing;
    each dictionary lists names in the order the events first use them."""
    for event in events:
        if type(event.time) is not int or type(event.managed) is not bool:
            raise ReportingUsageError("event: time must be an int and managed a bool")
    if not 1 <= len(events) <= MAX_EVENTS:
        raise ReportingUsageError(f"batch: expected 1 to {MAX_EVENTS} events, got {len(events)}")
    times = [e.time for e in events]
    if not all(0 <= t < MAX_BASE_TIME for t in times):
        raise ReportingUsageError("event time: expected Unix seconds from 0 to 2**37")
    users, user = _dictionary(e.user for e in events)
    devices, device = _dictionary(e.device for e in events)
    apps, app = _dictionary(e.app for e in events)
    return encode_columns(
        users,
        devices,
        apps,
        time=np.array(times, dtype=np.int64),
        user=user,
        device=device,
        app=app,
        managed=np.array([e.managed for e in events], dtype=np.bool_),
    )


def seal_plaintext(
    key: bytes, tenant: str, batch_id: bytes, plaintext: bytes, *, version: int = SCHEMA_VERSION
) -> bytes:
    """``plaintext`` sealed as a batch: header ‖ nonce ‖ AES-256-GCM ciphertext and tag.

    The nonce is fresh from the OS for every call, never derived: a generator rerun with
    the same seed must not reuse a nonce under the same key for other events.
    """
    check_key(key)
    check_tenant(tenant)
    check_batch_id(batch_id)
    if not 0 <= version <= 0xFFFF:
        raise ReportingUsageError("schema version: expected 0 to 65535")
    nonce = os.urandom(NONCE_SIZE)
    header = _HEADER.pack(MAGIC, version, len(tenant)) + tenant.encode() + batch_id
    sealed = AESGCM(key).encrypt(nonce, plaintext, associated_data(tenant, batch_id, version))
    return header + nonce + sealed


def seal_batch(key: bytes, tenant: str, batch_id: bytes, events: Sequence[Event]) -> bytes:
    """``events`` encoded and sealed as batch ``batch_id`` of ``tenant`` under the tenant's
    insights ``key``: what a member device uploads."""
    return seal_plaintext(key, tenant, batch_id, encode_events(events))


# --- opening (the reporting service and the client-side baseline) ---------------------------


@dataclass(frozen=True)
class SealedHeader:
    """The clear part of a sealed batch: what the record store may see."""

    version: int
    tenant: str
    batch_id: bytes


def read_header(sealed: bytes) -> tuple[SealedHeader, int]:
    """The clear header of ``sealed`` and the offset of its nonce; checks the form only."""
    if not isinstance(sealed, bytes | bytearray | memoryview):
        raise BatchFormatError(f"sealed batch: expected bytes, got {type(sealed).__name__}")
    size = len(sealed)
    if size < _MIN_SEALED:
        raise BatchFormatError(f"sealed batch: {size} bytes, shorter than any batch")
    if size > MAX_SEALED_SIZE:
        raise BatchFormatError(f"sealed batch: {size} bytes, over {MAX_SEALED_SIZE}")
    magic, version, tenant_length = _HEADER.unpack_from(sealed)
    if magic != MAGIC:
        raise BatchFormatError("sealed batch: bad magic, not a hermetic event batch")
    if version not in SUPPORTED_VERSIONS:
        raise BatchSchemaError(
            f"sealed batch: schema version {version}, expected one of {sorted(SUPPORTED_VERSIONS)}"
        )
    end = _HEADER.size + tenant_length
    if (
        not 1 <= tenant_length <= MAX_TENANT_LENGTH
        or size < end + BATCH_ID_SIZE + NONCE_SIZE + TAG_SIZE
    ):
        raise BatchFormatError(f"sealed batch: tenant length {tenant_length} out of range")
    raw_tenant = bytes(sealed[_HEADER.size : end])
    tenant = raw_tenant.decode("ascii", "replace")
    if _TENANT.fullmatch(tenant) is None:
        raise BatchFormatError("sealed batch: tenant id outside the naming rule")
    batch_id = bytes(sealed[end : end + BATCH_ID_SIZE])
    return SealedHeader(version, tenant, batch_id), end + BATCH_ID_SIZE


class BatchOpener:
    """Opens the batches of one tenant under its insights key (one AES-GCM context for all).

    :meth:`decrypt` checks the clear header against the tenant and, when the caller knows
    it (the record's id in the store), the expected batch id, then authenticates; it
    returns the batch id and the plaintext. :meth:`open` also decodes the plaintext.
    """

    def __init__(self, key: bytes, tenant: str) -> None:
        self._aead = AESGCM(check_key(key))
        self.tenant = check_tenant(tenant)
        self._prefix = _HEADER.pack(MAGIC, SCHEMA_VERSION, len(tenant)) + tenant.encode()
        self._aad_prefix = associated_data(tenant, b"")[:-4]

    def decrypt(self, sealed: bytes, batch_id: bytes | None = None) -> tuple[bytes, bytes]:
        prefix = self._prefix
        start = len(prefix)
        if (
            isinstance(sealed, bytes)
            and MAX_SEALED_SIZE >= len(sealed) >= start + BATCH_ID_SIZE + NONCE_SIZE + TAG_SIZE
            and sealed.startswith(prefix)
        ):  # the one header this tenant's batches have: no need to parse it field by field
            found = sealed[start : start + BATCH_ID_SIZE]
            aad = self._aad_prefix + b"\x00\x00\x00\x10" + found
            offset = start + BATCH_ID_SIZE
        else:
            header, offset = read_header(sealed)
            if header.tenant != self.tenant:
                raise BatchTenantError("sealed batch: belongs to another tenant")
            found = header.batch_id
            aad = associated_data(header.tenant, found, header.version)
        if batch_id is not None and found != batch_id:
            raise BatchIdError("sealed batch: its batch id is not the one it was stored under")
        try:
            plaintext = self._aead.decrypt(
                sealed[offset : offset + NONCE_SIZE], sealed[offset + NONCE_SIZE :], aad
            )
        except InvalidTag:
            raise BatchAuthenticationError(
                "sealed batch: AES-GCM authentication failed (tampered, or not sealed for this"
                " tenant, batch id and schema version under this key)"
            ) from None
        return found, plaintext

    def open(self, sealed: bytes, batch_id: bytes | None = None) -> EventBatch:
        found, plaintext = self.decrypt(sealed, batch_id)
        return decode_plaintext(plaintext, self.tenant, found)


_COUNTS = struct.Struct("<HHH")
_COLUMNS = ("member", "device", "app")


def read_dictionaries(
    data: bytes, pos: int
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], int]:
    """The member, device and app dictionaries at ``pos`` and the offset past them: three
    u16 counts, one u16 byte length per name, then the names' UTF-8 bytes back to back."""
    if pos + 6 > len(data):
        raise BatchFormatError("batch plaintext: truncated in the dictionaries")
    counts = _COUNTS.unpack_from(data, pos)
    pos += 6
    if 0 in counts:
        raise BatchFormatError(f"batch plaintext: empty {_COLUMNS[counts.index(0)]} dictionary")
    k = counts[0] + counts[1] + counts[2]
    if pos + 2 * k > len(data):
        raise BatchFormatError("batch plaintext: truncated in the dictionaries")
    lengths = struct.unpack_from(f"<{k}H", data, pos)
    pos += 2 * k
    total = sum(lengths)
    if pos + total > len(data):
        raise BatchFormatError("batch plaintext: truncated in the dictionaries")
    if min(lengths) == 0 or max(lengths) > MAX_NAME_BYTES:
        raise BatchFormatError("batch plaintext: a name of a bad length")
    raw = data[pos : pos + total]
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise BatchFormatError("batch plaintext: a name is not valid UTF-8") from None
    if _CONTROL.search(text) is not None:
        raise BatchFormatError("batch plaintext: a name holds a control character")
    ends = list(accumulate(lengths))
    if len(text) == total:  # ASCII: byte offsets are character offsets, and it is NFC
        names = [text[end - length : end] for end, length in zip(ends, lengths, strict=True)]
    else:
        names = []
        for end, length in zip(ends, lengths, strict=True):
            try:
                name = raw[end - length : end].decode()
            except UnicodeDecodeError:  # a length that splits a character
                raise BatchFormatError("batch plaintext: a name is not valid UTF-8") from None
            if not unicodedata.is_normalized("NFC", name):
                raise BatchFormatError("batch plaintext: a name not in Unicode NFC")
            names.append(name)
    a, b = counts[0], counts[0] + counts[1]
    users, devices, apps = tuple(names[:a]), tuple(names[a:b]), tuple(names[b:])
    for column, found in zip(_COLUMNS, (users, devices, apps), strict=True):
        if len(set(found)) != len(found):
            raise BatchFormatError(f"batch plaintext: a {column} name is listed twice")
    return users, devices, apps, pos + total


def decode_plaintext(plaintext: bytes, tenant: str, batch_id: bytes) -> EventBatch:
    """The :class:`EventBatch` that ``plaintext`` encodes (already authenticated).

    The reference reader of the layout: :class:`~hermetic.reporting.aggregate.Aggregate`
    checks the same rules over many batches at once and defers to this reader for the
    message when a batch breaks one.
    """
    if len(plaintext) < _PLAIN_HEAD.size:
        raise BatchFormatError("batch plaintext: shorter than its header")
    n, base = _PLAIN_HEAD.unpack_from(plaintext)
    if not 1 <= n <= MAX_EVENTS:
        raise BatchFormatError(f"batch plaintext: {n} events, expected 1 to {MAX_EVENTS}")
    if base >= MAX_BASE_TIME:
        raise BatchFormatError("batch plaintext: base time out of range")
    users, devices, apps, pos = read_dictionaries(plaintext, _PLAIN_HEAD.size)
    if len(plaintext) - pos != n * EVENT_BYTES:
        raise BatchFormatError(
            f"batch plaintext: {len(plaintext) - pos} bytes of columns, expected {n * EVENT_BYTES}"
        )
    offsets = np.frombuffer(plaintext, _LE_U32, n, pos)
    pos += 4 * n
    user = np.frombuffer(plaintext, _LE_U16, n, pos)
    device = np.frombuffer(plaintext, _LE_U16, n, pos + 2 * n)
    app = np.frombuffer(plaintext, _LE_U16, n, pos + 4 * n)
    flags = np.frombuffer(plaintext, _U8, n, pos + 6 * n)
    if int(user.max()) >= len(users):
        raise BatchFormatError("batch plaintext: a member index past its dictionary")
    if int(device.max()) >= len(devices):
        raise BatchFormatError("batch plaintext: a device index past its dictionary")
    if int(app.max()) >= len(apps):
        raise BatchFormatError("batch plaintext: an app index past its dictionary")
    for column, names, values in (
        ("member", users, user),
        ("device", devices, device),
        ("app", apps, app),
    ):
        if not bool(np.bincount(values, minlength=len(names)).all()):
            raise BatchFormatError(f"batch plaintext: a {column} name no event uses")
    if int(flags.max()) & ~_KNOWN_FLAGS:
        raise BatchFormatError("batch plaintext: an event sets an unknown flag")
    return EventBatch(
        tenant=tenant,
        batch_id=batch_id,
        users=users,
        devices=devices,
        apps=apps,
        time=offsets.astype(np.int64) + base,
        user=user.astype(np.uint16),
        device=device.astype(np.uint16),
        app=app.astype(np.uint16),
        managed=(flags & FLAG_MANAGED).astype(np.bool_),
    )


def open_batch(
    key: bytes, sealed: bytes, *, tenant: str, batch_id: bytes | None = None
) -> EventBatch:
    """The events of ``sealed``, a batch of ``tenant`` (stored as ``batch_id`` when given).

    Raises :class:`~hermetic.errors.BatchFormatError` (and its
    :class:`~hermetic.errors.BatchSchemaError`) for bytes that are not a batch,
    :class:`~hermetic.errors.BatchTenantError` and :class:`~hermetic.errors.BatchIdError`
    for a batch of another tenant or stored under another id, and
    :class:`~hermetic.errors.BatchAuthenticationError` when AES-GCM rejects it.
    """
    return BatchOpener(key, tenant).open(sealed, batch_id)
