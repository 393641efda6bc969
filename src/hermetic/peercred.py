"""Who is on the other end of a local Unix socket, as the kernel reports it.

A parent-side server of the emulator (the NSM, the boot frames, readiness, egress) must
know that a connection comes from *its* enclave and not from another enclave or a host
process. Where the socket lives already narrows who can reach it (each enclave sees only
its own endpoint directory); this module adds the kernel's word: ``SO_PEERCRED`` gives the
peer's pid and uid as the kernel recorded them at ``connect``/``listen`` time, and the pid's
PID namespace (``/proc/PID/ns/pid``) says which sandbox it runs in. Neither can be forged by
the peer.

An enclave's :class:`ProcessIdentity` is its uid on the host plus the inode of its PID
namespace. The supervisor learns it from bubblewrap when the sandbox starts and publishes
it beside the enclave's endpoints, so every parent-side process can check against it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermetic.errors import PeerRefusedError

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCredentials:
    """``SO_PEERCRED``: the peer process as the kernel saw it (pid in our PID namespace)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class ProcessIdentity:
    """What a sandboxed enclave is, seen from the host: its uid and its PID namespace."""

    uid: int
    pid_namespace: str
    """``/proc/PID/ns/pid`` of any process of the enclave, e.g. ``pid:[4026532180]``."""

    @classmethod
    def of_process(cls, pid: int) -> ProcessIdentity:
        """The identity a running process has (used for the sandbox and by tests)."""
        return cls(uid=_uid_of(pid), pid_namespace=pid_namespace(pid))

    def to_json(self) -> dict[str, Any]:
        return {"uid": self.uid, "pid_namespace": self.pid_namespace}

    @classmethod
    def from_json(cls, value: object) -> ProcessIdentity:
        if not (
            isinstance(value, dict)
            and set(value) == {"uid", "pid_namespace"}
            and isinstance(value["uid"], int)
            and isinstance(value["pid_namespace"], str)
        ):
            raise PeerRefusedError("enclave identity: expected {uid, pid_namespace}")
        return cls(uid=value["uid"], pid_namespace=value["pid_namespace"])

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    def check(self, peer: PeerCredentials, what: str) -> None:
        """Raise :class:`PeerRefusedError` unless ``peer`` is a process of this identity."""
        if peer.uid != self.uid:
            raise PeerRefusedError(f"{what}: expected uid {self.uid}, got uid {peer.uid}")
        try:
            theirs = pid_namespace(peer.pid)
        except PeerRefusedError:
            raise PeerRefusedError(f"{what}: peer pid {peer.pid} is gone") from None
        if theirs != self.pid_namespace:
            raise PeerRefusedError(
                f"{what}: expected a process in {self.pid_namespace}, got pid {peer.pid}"
                f" in {theirs}"
            )


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The kernel's record of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def pid_namespace(pid: int) -> str:
    """``pid:[inode]`` of ``pid``'s PID namespace; :class:`PeerRefusedError` if unreadable."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError as exc:
        raise PeerRefusedError(f"pid {pid}: PID namespace unreadable ({exc.strerror})") from None


def _uid_of(pid: int) -> int:
    """The effective uid of ``pid`` (what ``SO_PEERCRED`` reports for its sockets)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError as exc:
        raise PeerRefusedError(f"pid {pid}: not readable ({exc.strerror})") from None
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])
    raise PeerRefusedError(f"pid {pid}: no Uid line in its status")
