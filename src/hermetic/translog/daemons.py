"""The two long-running followers of a log: the witness and the monitor.

The **witness** pulls the log's checkpoint, checks it extends the last one it cosigned
(:class:`~hermetic.translog.witness.WitnessState` decides; this module only does I/O),
persists its new state *before* releasing the cosignature (check-and-persist, so a crash
can never make it cosign two forks), then hands the cosignature to the log, which serves
it with the checkpoint. Any inconsistency is refused with a typed error naming both roots.

The **monitor** tails the log for the services a relying party cares about: it verifies
each new checkpoint against the previous one, reads the new entries from the tiles (each
proven included), decodes release/policy statements and reports the ones for watched
subjects, so a publisher notices a release it did not make. An entry it cannot read as a
statement (invalid UTF-8, a lone surrogate, absurd nesting, any other parse failure) is a
finding reported with its index, never a reason to stop: a monitor that died on one rogue
entry, and again on every restart, would never see the release appended after it.

Neither daemon trusts what the log sends, and neither stops on anything but a fork: a
transient error is yielded and the follow loop goes on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization

from hermetic import jsontext
from hermetic.errors import (
    ForkDetectedError,
    HermeticError,
    MalformedInputError,
    SplitViewError,
    TranslogError,
    UsageError,
)
from hermetic.translog.checkpoint import CosignatureSigner, VerifiedCheckpoint, open_checkpoint
from hermetic.translog.client import LogClient
from hermetic.translog.note import NoteVerifier, split_note
from hermetic.translog.release import SignedStatement
from hermetic.translog.witness import WitnessState

_T = TypeVar("_T")

log = logging.getLogger("hermetic.translog.daemons")


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` durably: temp file, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    value = jsontext.loads(raw, what=f"state file {path}", error=MalformedInputError)
    if not isinstance(value, dict):
        raise MalformedInputError(f"state file {path} is not a JSON object")
    return value


def _state_root(value: dict[str, Any], path: Path) -> tuple[int, bytes]:
    size, root = value.get("size"), value.get("root")
    try:
        raw = base64.b64decode(str(root), validate=True)
    except ValueError:
        raw = b""
    if not isinstance(size, int) or size < 0 or len(raw) != 32:
        raise MalformedInputError(f"state file {path} lacks a valid size and root")
    return size, raw


def _log_signed_note(note: str, log_key: NoteVerifier) -> str:
    """The checkpoint note with only the log's own signature line."""
    text, sigs = split_note(note)
    ident = (log_key.name, bytes(log_key.key_id))
    return text + "\n" + "".join(s.line() for s in sigs if (s.name, s.key_id) == ident)


# --- witness ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WitnessStep:
    """What one witness round did."""

    size: int
    root: bytes
    cosignature: str
    grew: bool
    stored_by_log: bool


class WitnessDaemon:
    """Follows one log and cosigns each checkpoint that extends the previous one."""

    def __init__(self, client: LogClient, signer: CosignatureSigner, state_file: Path) -> None:
        self.client = client
        self.signer = signer
        self.state_file = state_file
        self.state = self._load()

    def _load(self) -> WitnessState:
        origin = self.client.log_key.name
        stored = _read_state(self.state_file)
        if stored is None:
            return WitnessState(origin, self.client.log_key)
        if stored.get("origin") != origin:
            raise UsageError(
                f"state file {self.state_file} belongs to log {stored.get('origin')!r},"
                f" not {origin!r}"
            )
        size, root = _state_root(stored, self.state_file)
        return WitnessState(origin, self.client.log_key, size, root)

    def _save(self, verified: VerifiedCheckpoint, line: str) -> None:
        body = {
            "origin": self.state.origin,
            "size": self.state.last_size,
            "root": base64.b64encode(self.state.last_root).decode(),
            "checkpoint": verified.text,
            "cosignature": line,
            "cosigned_at": int(time.time()),
        }
        write_atomically(self.state_file, json.dumps(body, indent=2).encode() + b"\n")

    def step(self, now: int | None = None) -> WitnessStep:
        """Fetch, verify, persist and cosign the log's current checkpoint once."""
        note = self.client.fetch("checkpoint").decode("utf-8", errors="replace")
        verified = open_checkpoint(note, self.client.log_key, origin=self.state.origin)
        old_size, old_root = self.state.last_size, self.state.last_root
        proof: list[bytes] = []
        if old_size < verified.size and old_size > 0:
            proof = self.client.consistency_proof(old_size, verified.size)
        try:
            new_state, line = self.state.update(
                note, proof, signer=self.signer, timestamp=int(time.time() if now is None else now)
            )
        except SplitViewError as exc:
            kind = type(exc)
            raise kind(
                f"refusing checkpoint of log {self.state.origin!r}: size {verified.size} root "
                f"{verified.root_hash.hex()} does not extend cosigned size {old_size} root "
                f"{old_root.hex()} ({exc})"
            ) from exc
        grew = new_state.last_size != old_size
        self.state = new_state
        self._save(verified, line)  # persist before the cosignature leaves this process
        stored = self.client.submit_cosignature(_log_signed_note(note, self.client.log_key) + line)
        return WitnessStep(
            verified.size, verified.root_hash, line, grew, self.signer.name in stored
        )

    def run(self, interval: float, once: bool = False) -> Iterator[WitnessStep | HermeticError]:
        """Step every ``interval`` seconds; yields steps and transient errors.

        A fork or split view is raised, not yielded: the witness stops.
        """
        return _follow(lambda: (self.step(),), interval, once)


def _follow(
    step: Callable[[], Iterable[_T]], interval: float, once: bool
) -> Iterator[_T | HermeticError]:
    """The daemons' loop: run ``step`` every ``interval`` seconds, yielding what it yields.

    A transient HermeticError (log unreachable, bad response) is yielded and the loop goes on;
    with ``once`` it is raised. A split view or fork is always raised: the daemon stops.
    """
    while True:
        try:
            yield from step()
        except SplitViewError:
            raise
        except HermeticError as exc:
            if once:
                raise
            yield exc
        if once:
            return
        time.sleep(interval)


# --- monitor ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonitorEvent:
    """Something the monitor reports about one entry.

    ``kind`` is ``statement`` (a new statement for a watched subject) or ``malformed`` (an
    entry that is not a readable statement: reported for every subject, since nobody can
    tell whose it was meant to be).
    """

    kind: str
    index: int
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, "index": self.index, **self.detail}


class Monitor:
    """Tails a log and reports release and policy statements for watched subjects."""

    def __init__(self, client: LogClient, watch: Sequence[str], state_file: Path | None) -> None:
        if not watch:
            raise UsageError("watch at least one service (or '*' for every subject)")
        self.client = client
        self.watch = set(watch)
        self.state_file = state_file
        self.last: VerifiedCheckpoint | None = None
        self.start = 0
        if state_file is not None:
            stored = _read_state(state_file)
            if stored is not None:
                note = stored.get("checkpoint")
                if not isinstance(note, str):
                    raise MalformedInputError(f"state file {state_file} lacks the checkpoint")
                self.last = open_checkpoint(note, client.log_key)
                self.start = self.last.size

    def _watched(self, subject: str) -> bool:
        return "*" in self.watch or subject in self.watch

    def step(self) -> list[MonitorEvent]:
        """Verify the next checkpoint against the last one and report new statements."""
        current = self.client.checkpoint(threshold=0)
        if self.last is not None:
            try:
                self.client.check_consistency(self.last, current)
            except TranslogError as exc:
                raise ForkDetectedError(
                    f"log {current.origin!r} checkpoint size {current.size} root "
                    f"{current.root_hash.hex()} is not consistent with size {self.last.size} root "
                    f"{self.last.root_hash.hex()}: {exc}"
                ) from exc
        events: list[MonitorEvent] = []
        entries = self.client.entries(self.start, current.size, current)
        for offset, entry in enumerate(entries):
            index = self.start + offset
            event = self._decode(index, entry)
            if event is not None:
                events.append(event)
        self.last, self.start = current, current.size
        if self.state_file is not None:
            body = {"size": current.size, "root": base64.b64encode(current.root_hash).decode(),
                    "checkpoint": current.message}  # fmt: skip
            write_atomically(self.state_file, json.dumps(body, indent=2).encode() + b"\n")
        return events

    def _decode(self, index: int, entry: bytes) -> MonitorEvent | None:
        try:
            signed = SignedStatement.from_entry(entry)
        except HermeticError as exc:
            return _malformed(index, entry, type(exc).__name__, str(exc))
        except Exception as exc:
            # Every parser of log entries raises only typed errors (tested); should one
            # ever fail otherwise, the entry is still a finding: a monitor that stopped
            # here would be blind to every entry after it, and so would its restarts.
            log.exception("entry %d: the statement parser failed unexpectedly", index)
            return _malformed(index, entry, type(exc).__name__, "unexpected parser failure")
        statement = signed.statement
        if not self._watched(statement.subject):
            return None
        try:
            signed.verify_signature()
            signature_valid = True
        except HermeticError:
            signature_valid = False
        key = signed.publisher_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return MonitorEvent(
            "statement",
            index,
            {
                "statement": statement.to_json(),
                "publisher_key_sha256": hashlib.sha256(key).hexdigest(),
                "publisher_certificate": signed.certificate_pem is not None,
                "signature_valid": signature_valid,
            },
        )

    def run(self, interval: float, once: bool = False) -> Iterator[MonitorEvent | HermeticError]:
        """Step every ``interval`` seconds; yields events and transient errors (forks raise)."""
        return _follow(self.step, interval, once)


def _malformed(index: int, entry: bytes, error: str, reason: str) -> MonitorEvent:
    """The finding for an entry that is not a readable statement (logged as well)."""
    reason = reason[:500]  # messages name the problem; a bounded one is enough
    log.warning("malformed log entry at index %d (%d bytes): %s: %r", index, len(entry),
                error, reason)  # fmt: skip
    return MonitorEvent(
        "malformed",
        index,
        {
            "error": error,
            "reason": reason,
            "size": len(entry),
            "entry_sha256": hashlib.sha256(entry).hexdigest(),
        },
    )
