"""The emulated launcher: ``nitro-cli``'s run/describe/terminate/console, locally.

``run`` prepares an enclave (private copy of the image, CPU and memory choice, a CID,
a BOOTING record), then hands it to a supervisor (``hermetic.launcher.supervisor``):
a detached process by default, returning when the enclave signals ready, or in the
caller's event loop for ``--foreground`` and ``hermetic up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hermetic.errors import EnclaveBootError, EnclaveNotFoundError, LauncherError, UsageError
from hermetic.image.imagefile import open_image
from hermetic.launcher import records, sandbox
from hermetic.launcher.records import EnclaveRecord
from hermetic.launcher.supervisor import Supervisor, console_path, enclave_dir
from hermetic.nsm.emulator import new_module_id
from hermetic.nsm.pki import DevPKI

STOP_TIMEOUT = 15.0
MIN_MEMORY_MIB = 64


def prepare(
    image_path: Path,
    *,
    cpus: int | None = None,
    memory_mib: int | None = None,
    cid: int | None = None,
    debug: bool = False,
) -> EnclaveRecord:
    """Copy and check the image, choose resources and a CID, write the BOOTING record."""
    from datetime import UTC, datetime

    enclave_id = new_module_id(DevPKI().instance_id(), datetime.now(UTC))
    workdir = enclave_dir(enclave_id)
    workdir.mkdir(parents=True, mode=0o700)
    try:
        return _prepare_in(workdir, enclave_id, image_path, cpus, memory_mib, cid, debug)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _prepare_in(
    workdir: Path,
    enclave_id: str,
    image_path: Path,
    cpus: int | None,
    memory_mib: int | None,
    cid: int | None,
    debug: bool,
) -> EnclaveRecord:
    private = workdir / "image.img"
    shutil.copyfile(image_path, private)
    image = open_image(private)
    manifest = image.manifest
    cpus = manifest.cpus if cpus is None else cpus
    memory_mib = manifest.memory_mib if memory_mib is None else memory_mib
    if cpus < 1:
        raise UsageError(f"--cpus: expected at least 1, got {cpus}")
    if memory_mib < MIN_MEMORY_MIB:
        raise UsageError(f"--memory: expected at least {MIN_MEMORY_MIB} MiB, got {memory_mib}")
    draft = EnclaveRecord(
        id=enclave_id,
        name=manifest.name,
        image=str(Path(image_path).resolve()),
        cid=0,
        cpus=cpus,
        memory_mib=memory_mib,
        debug=debug,
        state=records.BOOTING,
        cpu_ids=sandbox.pick_cpus(cpus),
        ports=manifest.ports,
        egress=tuple(str(rule) for rule in manifest.egress),
    )
    return records.allocate(draft, cid)


def run_detached(
    record: EnclaveRecord, config: Path | None, *, timeout: float = 90.0
) -> EnclaveRecord:
    """Start the supervisor in the background; return once the enclave is RUNNING."""
    log_path = records.records_dir() / f"{record.id}.log"
    command = [sys.executable, "-m", "hermetic.launcher.supervisor", record.id]
    if config is not None:
        command += ["--config", str(Path(config).resolve())]
    with open(log_path, "ab") as log:
        subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = records.load(record.id)
        if current.state == records.RUNNING:
            return current
        if current.state in (records.FAILED, records.TERMINATED):
            raise EnclaveBootError(f"enclave {record.id} did not start: {current.reason}")
        time.sleep(0.05)
    terminate(record.id)
    raise EnclaveBootError(f"enclave {record.id} did not start within {timeout:.0f} s")


async def start_in_process(
    record: EnclaveRecord, bundle: bytes | None
) -> tuple[Supervisor, asyncio.Task[int]]:
    """Run the supervisor in this event loop; return once the enclave is RUNNING."""
    supervisor = Supervisor(record, bundle)
    task = asyncio.ensure_future(supervisor.run())
    ready = asyncio.ensure_future(supervisor.ready.wait())
    await asyncio.wait({task, ready}, return_when="FIRST_COMPLETED")
    while not task.done() and supervisor.record.state != records.RUNNING:
        await asyncio.sleep(0.01)
    if task.done():
        ready.cancel()
        task.result()
        raise EnclaveBootError(f"enclave {record.id} did not start: {supervisor.record.reason}")
    return supervisor, task


def describe() -> list[dict[str, Any]]:
    """``nitro-cli describe-enclaves`` for emulated enclaves (every known record)."""
    return [record.describe() for record in records.all_records()]


def terminate(id_or_cid: str) -> dict[str, Any]:
    """Stop an enclave and wait until its record says TERMINATED."""
    record = records.find(id_or_cid)
    if record.state in records.LIVE_STATES:
        for pid, start in (
            (record.supervisor_pid, record.supervisor_start),
            (record.pid, record.pid_start),
        ):
            if pid is not None and records.alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                break
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            record = records.load(record.id)
            if record.state not in records.LIVE_STATES:
                break
            time.sleep(0.05)
        else:
            for pid, start in (
                (record.pid, record.pid_start),
                (record.supervisor_pid, record.supervisor_start),
            ):
                if pid is not None and records.alive(pid, start):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            record = records.load(record.id)
    return {"EnclaveName": record.name, "EnclaveID": record.id, "Terminated": True}


def console_lines(id_or_cid: str, *, follow: bool, timeout: float | None) -> Iterator[bytes]:
    """The enclave's console output; with ``follow`` keep reading until it terminates."""
    record = records.find(id_or_cid)
    if not record.debug:
        raise LauncherError(
            f"enclave {record.id}: console: expected an enclave started with --debug, "
            "got a production enclave (its output never leaves it)"
        )
    path = console_path(record.id)
    deadline = None if timeout is None else time.monotonic() + timeout
    position = 0
    while True:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as handle:
            handle.seek(position)
            chunk = handle.read()
            position += len(chunk)
            if chunk:
                yield chunk
        if not follow:
            return
        try:
            state = records.load(record.id).state
        except EnclaveNotFoundError:
            return
        if state not in records.LIVE_STATES:
            return
        if deadline is not None and time.monotonic() > deadline:
            return
        time.sleep(0.1)
