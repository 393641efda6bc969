"""Host-wide leases of sandbox uids, so no two live enclaves on a host share one.

When the launcher runs as root each enclave runs as an unprivileged host uid of its own
(see :mod:`hermetic.launcher.sandbox`). Its process limit (``RLIMIT_NPROC``), its files in
the endpoint directory and the kernel's permission checks between processes all key on
that uid, so it must be unique among the host's live enclaves, like a Nitro enclave's CID
is unique on its host. CIDs come from one state directory's records, and two state
directories (two users' launchers, or parallel test runs) hand out the same CIDs: the uid
cannot be derived from the CID.

A lease is an exclusive ``flock`` on ``<LEASE_DIR>/<slot>``, held by the supervisor for
the enclave's life. The kernel drops it when the supervisor exits, however it exits; the
enclave dies with its supervisor (bubblewrap's ``--die-with-parent``), and a slot whose uid
still owns a process on the host (an enclave being torn down) is skipped, so a new
enclave never shares a process count or a uid with a dying one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from hermetic.errors import LauncherError

LEASE_DIR = Path("/run/hermetic/sandbox-uids")
SANDBOX_UID_BASE = 0x6E000000
"""Host uids of sandboxed enclaves: base + slot, far above any login or subordinate-id
range. Slot 0 is never leased: :func:`hermetic.launcher.sandbox.preflight` probes with it."""
PROBE_UID = SANDBOX_UID_BASE
SLOTS = 1 << 16
"""How many enclaves may run on one host at once with a uid of their own."""


@dataclass
class UidLease:
    """One leased sandbox uid; :meth:`release` (or the holder's exit) gives it back."""

    uid: int
    _fd: int = field(repr=False)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = -1


def lease(directory: Path = LEASE_DIR, *, base: int = SANDBOX_UID_BASE) -> UidLease:
    """The lowest free sandbox uid on this host, leased until released or this process exits.

    ``base`` moves the whole range (tests lease from a range no enclave uses)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    busy = _uids_with_processes()
    for slot in range(1, SLOTS):
        uid = base + slot
        if uid in busy:
            continue
        fd = os.open(directory / str(slot), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        # Ours now. A previous holder may have started a process between the scan and
        # its release: look once more, under the lock.
        if uid in _uids_with_processes():
            os.close(fd)
            continue
        return UidLease(uid, fd)
    raise LauncherError(f"sandbox uid: all {SLOTS - 1} host-wide slots are leased by live enclaves")


def _uids_with_processes() -> set[int]:
    """Every real, effective, saved or file-system uid of a process on this host."""
    uids: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry.name}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"Uid:"):
                    uids.update(int(value) for value in line.split()[1:])
                    break
    return uids
