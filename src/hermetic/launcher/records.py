"""Enclave records: what ``hermetic ps`` in any process knows about running enclaves.

Each enclave has one JSON file, ``state_dir()/enclaves/<id>.json``, written atomically by
whoever changes its state (``hermetic run`` creates it, the enclave's supervisor updates
it). A record alone can lie after a crash (a SIGKILLed supervisor writes nothing), so
:func:`refresh` also checks that the recorded processes are still the same processes
(PID plus kernel start time, so a reused PID is not mistaken for the enclave).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hermetic import jsontext
from hermetic.errors import EnclaveNotFoundError, LauncherError
from hermetic.paths import state_dir
from hermetic.transport.vsock import FIRST_ENCLAVE_CID

BOOTING = "BOOTING"
RUNNING = "RUNNING"
TERMINATING = "TERMINATING"
TERMINATED = "TERMINATED"
FAILED = "FAILED"
LIVE_STATES = (BOOTING, RUNNING, TERMINATING)
_MAX_CID = 0xFFFFFFFE


@dataclass(frozen=True)
class EnclaveRecord:
    """One enclave as the launcher sees it (JSON-serialisable)."""

    id: str
    name: str
    image: str
    cid: int
    cpus: int
    memory_mib: int
    debug: bool
    state: str
    cpu_ids: tuple[int, ...] = ()
    pid: int | None = None
    """The sandbox's outermost process (bubblewrap); stopping it stops the enclave."""
    pid_start: str | None = None
    app_pid: int | None = None
    """The enclave app's own process (host pid), the one that signalled ready."""
    supervisor_pid: int | None = None
    supervisor_start: str | None = None
    measurements: dict[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = ()
    egress: tuple[str, ...] = ()
    reason: str | None = None
    config_digest: str | None = None
    sandbox: dict[str, str] = field(default_factory=dict)
    """What the supervisor measured of the enclave's sandbox (``sandbox.inspect``)."""
    sandboxed: bool = True
    """False for ``--no-sandbox``: the enclave then runs as a plain host process."""
    endorsement: str | None = None
    """The release endorsement (JSON) handed to the enclave at boot, kept for restarts."""

    def to_json(self) -> dict[str, Any]:
        value = asdict(self)
        value["cpu_ids"] = list(self.cpu_ids)
        value["ports"] = list(self.ports)
        value["egress"] = list(self.egress)
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> EnclaveRecord:
        try:
            return cls(
                **{
                    **value,
                    "cpu_ids": tuple(value.get("cpu_ids", ())),
                    "ports": tuple(value.get("ports", ())),
                    "egress": tuple(value.get("egress", ())),
                }
            )
        except TypeError as exc:
            raise LauncherError(f"enclave record: unexpected fields ({exc})") from None

    def describe(self) -> dict[str, Any]:
        """The object ``nitro-cli describe-enclaves`` prints for one enclave."""
        return {
            "EnclaveName": self.name,
            "EnclaveID": self.id,
            "ProcessID": self.supervisor_pid,
            "EnclaveCID": self.cid,
            "NumberOfCPUs": self.cpus,
            "CPUIDs": list(self.cpu_ids),
            "MemoryMiB": self.memory_mib,
            "State": self.state,
            "Flags": "DEBUG_MODE" if self.debug else "NONE",
            "Measurements": self.measurements,
            "Reason": self.reason,
            "Sandbox": self.sandbox,
        }


def records_dir() -> Path:
    path = state_dir() / "enclaves"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def record_path(enclave_id: str) -> Path:
    if not enclave_id or "/" in enclave_id or enclave_id.startswith("."):
        raise EnclaveNotFoundError(
            f"enclave id: expected an id like i-...-enc..., got {enclave_id!r}"
        )
    return records_dir() / f"{enclave_id}.json"


def save(record: EnclaveRecord) -> None:
    path = record_path(record.id)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record.to_json(), indent=1, sort_keys=True))
    os.replace(tmp, path)


def load(enclave_id: str) -> EnclaveRecord:
    path = record_path(enclave_id)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EnclaveNotFoundError(f"enclave {enclave_id}: no such enclave") from None
    except OSError as exc:
        raise LauncherError(f"enclave {enclave_id}: unreadable record ({exc})") from None
    value = jsontext.loads(raw, what=f"enclave {enclave_id}: record", error=LauncherError)
    return refresh(EnclaveRecord.from_json(value))


def all_records() -> list[EnclaveRecord]:
    out = []
    for path in sorted(records_dir().glob("*.json")):
        with contextlib.suppress(EnclaveNotFoundError, LauncherError):
            out.append(load(path.stem))
    return out


def find(id_or_cid: str) -> EnclaveRecord:
    """An enclave by ID, or by CID when given digits (the newest one with that CID)."""
    if id_or_cid.isdigit():
        matches = [r for r in all_records() if r.cid == int(id_or_cid)]
        live = [r for r in matches if r.state in LIVE_STATES]
        if live or matches:
            return (live or matches)[-1]
        raise EnclaveNotFoundError(f"enclave with CID {id_or_cid}: none known")
    return load(id_or_cid)


def process_start(pid: int) -> str | None:
    """The kernel start time of ``pid`` (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return fields[19]


def alive(pid: int | None, start: str | None) -> bool:
    return pid is not None and start is not None and process_start(pid) == start


def refresh(record: EnclaveRecord) -> EnclaveRecord:
    """Correct a live-looking record whose processes are gone (crash, SIGKILL)."""
    if record.state not in LIVE_STATES:
        return record
    if record.state == BOOTING and record.supervisor_pid is None:
        return record  # `hermetic run` has not started the supervisor yet
    if alive(record.supervisor_pid, record.supervisor_start):
        return record  # the supervisor is the authority and records every change itself
    enclave_ok = record.pid is not None and alive(record.pid, record.pid_start)
    reason = "supervisor process is gone" if enclave_ok else "enclave process is gone"
    return replace(record, state=TERMINATED, reason=record.reason or reason)


@contextlib.contextmanager
def allocation_lock() -> Iterator[None]:
    with open(records_dir() / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def allocate(draft: EnclaveRecord, requested_cid: int | None) -> EnclaveRecord:
    """Give ``draft`` a fresh CID (or check the requested one) and persist it, atomically."""
    with allocation_lock():
        used = {r.cid for r in all_records() if r.state in LIVE_STATES}
        if requested_cid is not None:
            if not FIRST_ENCLAVE_CID <= requested_cid <= _MAX_CID:
                raise LauncherError(
                    f"cid: expected {FIRST_ENCLAVE_CID}..{_MAX_CID}, got {requested_cid}"
                )
            if requested_cid in used:
                raise LauncherError(f"cid: {requested_cid} is used by a running enclave")
            cid = requested_cid
        else:
            cid = next(c for c in range(FIRST_ENCLAVE_CID, _MAX_CID) if c not in used)
        record = replace(draft, cid=cid)
        save(record)
        return record
