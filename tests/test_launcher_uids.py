"""Host-wide sandbox uid leases: unique among live holders, freed when a holder dies, and
never a uid that still owns a process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hermetic.launcher import uids

# A range of its own, far from the uids real enclaves lease while this suite runs.
BASE = uids.SANDBOX_UID_BASE + 0x400000


def test_live_leases_never_share_a_uid_and_a_released_one_serves_again(tmp_path: Path) -> None:
    held = [uids.lease(tmp_path, base=BASE) for _ in range(5)]
    assert len({lease.uid for lease in held}) == 5
    assert all(lease.uid > BASE for lease in held)  # slot 0 is the preflight probe's
    freed = held.pop(2)
    freed.release()
    freed.release()  # twice is harmless
    again = uids.lease(tmp_path, base=BASE)
    assert again.uid == freed.uid
    assert again.uid not in {lease.uid for lease in held}
    for lease in [*held, again]:
        lease.release()


def test_a_killed_holders_uid_is_leased_again(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from hermetic.launcher import uids;"
         f"lease = uids.lease(Path({str(tmp_path)!r}), base={BASE});"
         "print(lease.uid, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        theirs = int(holder.stdout.readline())
        ours = uids.lease(tmp_path, base=BASE)
        assert ours.uid != theirs
    finally:
        holder.kill()
        holder.wait()
    after = uids.lease(tmp_path, base=BASE)
    assert after.uid == theirs  # the kernel dropped the dead holder's lock
    ours.release()
    after.release()


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a process as another uid needs root")
def test_a_uid_that_still_owns_a_process_is_skipped(tmp_path: Path) -> None:
    lingering = subprocess.Popen(["sleep", "600"], user=BASE + 1, group=BASE + 1, extra_groups=[])
    try:
        lease = uids.lease(tmp_path, base=BASE)  # nobody holds slot 1's lock: a dying enclave's
        assert lease.uid == BASE + 2
        lease.release()
    finally:
        lingering.kill()
        lingering.wait()
    lease = uids.lease(tmp_path, base=BASE)
    assert lease.uid == BASE + 1
    lease.release()


def test_the_lease_directory_is_the_roots_alone(tmp_path: Path) -> None:
    directory = tmp_path / "leases"
    uids.lease(directory, base=BASE).release()
    assert directory.stat().st_mode & 0o777 == 0o700
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in directory.iterdir())
