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
from typing import TYPE_CHECKING, Any

from hermetic.errors import (
    EnclaveBootError,
    EnclaveNotFoundError,
    HermeticError,
    LauncherError,
    ReleaseFormatError,
    ReleaseMismatchError,
    UsageError,
)
from hermetic.image.imagefile import open_image
from hermetic.launcher import records, sandbox
from hermetic.launcher.records import EnclaveRecord
from hermetic.launcher.supervisor import Supervisor, console_path, enclave_dir
from hermetic.nsm.emulator import new_module_id
from hermetic.nsm.pki import DevPKI
from hermetic.translog.release import Endorsement, ReleaseStatement

if TYPE_CHECKING:
    from hermetic.kms.client import KMSCredentials

STOP_TIMEOUT = 15.0
MIN_MEMORY_MIB = 64


def prepare(
    image_path: Path,
    *,
    cpus: int | None = None,
    memory_mib: int | None = None,
    cid: int | None = None,
    debug: bool = False,
    endorsement: bytes | None = None,
    reuse_endorsement: bool = True,
    sandboxed: bool = True,
) -> EnclaveRecord:
    """Copy and check the image, choose resources and a CID, write the BOOTING record.

    ``endorsement`` (``hermetic release publish`` output) is handed to the enclave at boot
    and kept in the record. Without one, and with ``reuse_endorsement``, the newest
    endorsement an earlier enclave of the same image (same PCR0) ran with is reused, so
    ``hermetic run IMAGE`` restarts a service as its clients knew it.

    With ``sandboxed`` (the default) this machine must be able to build the sandbox
    (:func:`hermetic.launcher.sandbox.preflight`): nothing starts otherwise.
    """
    from datetime import UTC, datetime

    if sandboxed:
        sandbox.preflight()

    enclave_id = new_module_id(DevPKI().instance_id(), datetime.now(UTC))
    workdir = enclave_dir(enclave_id)
    workdir.mkdir(parents=True, mode=0o700)
    try:
        return _prepare_in(
            workdir,
            enclave_id,
            image_path,
            cpus,
            memory_mib,
            cid,
            debug,
            endorsement,
            reuse_endorsement,
            sandboxed,
        )
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
    endorsement: bytes | None,
    reuse_endorsement: bool,
    sandboxed: bool,
) -> EnclaveRecord:
    private = workdir / "image.img"
    shutil.copyfile(image_path, private)
    image = open_image(private)
    manifest = image.manifest
    pcr0 = image.measurements.pcr0.hex()
    if endorsement is not None:
        endorsement_text: str | None = check_endorsement(endorsement, pcr0)
    elif reuse_endorsement:
        endorsement_text = previous_endorsement(pcr0)
    else:
        endorsement_text = None
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
        endorsement=endorsement_text,
        sandboxed=sandboxed,
    )
    return records.allocate(draft, cid)


def check_endorsement(data: bytes, pcr0: str) -> str:
    """The endorsement's text, if it is one and it endorses an image with this PCR0.

    The launcher does not verify it (the clients do, against their own trust); it refuses
    one that could never verify for this image, so the mistake shows now, not at every
    client's handshake.
    """
    try:
        text = data.decode("utf-8")
        endorsement = Endorsement.loads(text)
    except UnicodeDecodeError:
        raise ReleaseFormatError("endorsement: expected UTF-8 JSON text") from None
    statement = endorsement.signed.statement
    if not isinstance(statement, ReleaseStatement):
        raise ReleaseMismatchError(
            f"endorsement: expected a release statement, got {statement.type!r}"
        )
    if statement.pcr0 != pcr0:
        raise ReleaseMismatchError(
            f"endorsement: release {statement.service} {statement.version} has PCR0"
            f" {statement.pcr0}, the image's PCR0 is {pcr0}"
        )
    return text


def previous_endorsement(pcr0: str) -> str | None:
    """The newest endorsement an earlier enclave of an image with this PCR0 was given."""
    found: list[tuple[float, str]] = []
    for record in records.all_records():
        if record.endorsement is None:
            continue
        try:
            check_endorsement(record.endorsement.encode("utf-8"), pcr0)
            when = records.record_path(record.id).stat().st_mtime
        except (HermeticError, OSError):
            continue
        found.append((when, record.endorsement))
    return max(found)[1] if found else None


def run_detached(
    record: EnclaveRecord,
    config: Path | None,
    *,
    timeout: float = 90.0,
    forward_credentials: bool = False,
) -> EnclaveRecord:
    """Start the supervisor in the background; return once the enclave is RUNNING.

    With ``forward_credentials`` the supervisor forwards the AWS credentials of the
    environment it inherits from this process (never its command line, never a file).
    """
    log_path = records.records_dir() / f"{record.id}.log"
    command = [sys.executable, "-m", "hermetic.launcher.supervisor", record.id]
    if config is not None:
        command += ["--config", str(Path(config).resolve())]
    if forward_credentials:
        command.append("--aws-credentials-env")
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
    record: EnclaveRecord, bundle: bytes | None, credentials: KMSCredentials | None = None
) -> tuple[Supervisor, asyncio.Task[int]]:
    """Run the supervisor in this event loop; return once the enclave is RUNNING."""
    supervisor = Supervisor(record, bundle, credentials)
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
