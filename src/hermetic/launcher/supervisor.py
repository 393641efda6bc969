"""One enclave's supervisor: the emulated hypervisor for exactly one enclave.

It owns everything the enclave must not: the image measurement, the NSM (and so the PKI
keys), the boot listeners and the enclave's lifecycle. ``hermetic run`` starts it as a
detached process (``python -m hermetic.launcher.supervisor ID``) and returns once the
enclave is ready, like ``nitro-cli run-enclave``; ``--foreground`` runs it in-process.

At boot it hands the enclave its runtime config bundle, the release endorsement kept in
the record and, when asked to (``--aws-credentials-env``), the AWS credentials of its own
environment (see ``hermetic.enclave.boot``). The credentials stay in this process's
memory: they are never written to the record, the log or any file.

Lifecycle written to the enclave record: BOOTING -> RUNNING -> TERMINATED, or
BOOTING -> FAILED with the reason (the enclave's own refusal from the config channel,
or its exit status).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING

from hermetic.enclave import boot
from hermetic.errors import FrameFormatError, HermeticError
from hermetic.image.imagefile import extract, open_image
from hermetic.launcher import cgroups, records, sandbox, uids
from hermetic.launcher.records import EnclaveRecord
from hermetic.nsm.emulator import EmulatedNSM
from hermetic.nsm.server import start_server
from hermetic.paths import state_dir
from hermetic.peercred import ProcessIdentity, peer_credentials, pid_namespace
from hermetic.transport import vsock
from hermetic.transport.frames import read_frame, write_frame

if TYPE_CHECKING:
    from hermetic.kms.client import KMSCredentials

log = logging.getLogger("hermetic.launcher")

BOOT_TIMEOUT = 60.0
STOP_GRACE = 5.0


def enclave_dir(enclave_id: str) -> Path:
    return records.records_dir() / enclave_id


def console_path(enclave_id: str) -> Path:
    return records.records_dir() / f"{enclave_id}.console"


class Supervisor:
    """Boot one enclave, keep its record current, tear it down on stop or exit."""

    def __init__(
        self,
        record: EnclaveRecord,
        bundle: bytes | None,
        credentials: KMSCredentials | None = None,
    ) -> None:
        self.record = record
        self.bundle = bundle
        self._credentials = credentials
        self.root = vsock.emulation_root()
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.boot_status: boot.BootStatus | None = None
        self.process: asyncio.subprocess.Process | None = None
        self._ready_pid: int | None = None
        self._cgroup: cgroups.EnclaveCgroup | None = None
        self._config_served = False
        self._final: tuple[str, str] | None = None

    def _update(self, **changes: object) -> None:
        self.record = replace(self.record, **changes)  # type: ignore[arg-type]
        records.save(self.record)

    def _finish(self, state: str, reason: str) -> None:
        """Remember the final state; :meth:`run` records it once everything is released.

        ``hermetic stop`` and ``run`` return when the record leaves the live states, so the
        record must not say TERMINATED or FAILED while the enclave's directory, endpoints
        or cgroup still exist.
        """
        self._final = (state, reason)

    async def run(self) -> int:
        """Supervise until the enclave exits or :attr:`stopping` is set."""
        self._update(
            supervisor_pid=os.getpid(), supervisor_start=records.process_start(os.getpid())
        )
        workdir = enclave_dir(self.record.id)
        image_dir = workdir / "image"
        cid = self.record.cid
        endpoints = vsock.endpoint_dir(self.root, cid)
        cleanup: list[object] = []
        try:
            try:
                tools = sandbox.preflight() if self.record.sandboxed else None
                image = open_image(workdir / "image.img")
                extract(image, image_dir)
                _make_read_only(image_dir)
            except HermeticError as exc:
                self._finish(records.FAILED, f"{type(exc).__name__}: {exc}")
                return 1
            measurements = image.measurements
            # The image's measurements, as nitro-cli reports them; in debug mode the NSM
            # (not this record) zeroes PCR0/1/2/8 in attestation documents.
            self._update(measurements=measurements.to_nitro_json(), ports=image.manifest.ports)
            nsm = EmulatedNSM(
                measurements.pcrs(), debug=self.record.debug, module_id=self.record.id
            )
            uid = None
            if tools is not None and os.geteuid() == 0:
                lease = uids.lease()
                cleanup.append(lease)
                uid = lease.uid
            self._cgroup = cgroups.create(
                f"hermetic-{self.record.id}",
                self.record.memory_mib * 1024 * 1024,
                sandbox.MAX_PROCESSES,
            )
            _prepare_endpoints(endpoints, uid)
            nsm_server = await start_server(
                nsm, endpoints / vsock.HOST_DIR / "nsm.sock", mode=0o666, admit=self._admit_nsm
            )
            cleanup.append(nsm_server)
            for port, handler in (
                (boot.READY_PORT, self._on_ready),
                (boot.CONFIG_PORT, self._on_config),
            ):
                cleanup.append(await vsock.listen(vsock.PARENT_CID, port, handler, peer_cid=cid))
            spec = sandbox.SandboxSpec(
                image_dir=image_dir,
                endpoint_dir=endpoints,
                cid=cid,
                boot_module=image.boot.boot_module,
                memory_mib=self.record.memory_mib,
                cpu_ids=self.record.cpu_ids,
                uid=uid,
            )
            return await self._boot_and_wait(spec, tools)
        finally:
            await self._terminate_child()
            for item in reversed(cleanup):
                if isinstance(item, uids.UidLease):
                    item.release()  # the enclave's processes are gone: its uid may serve again
                elif isinstance(item, vsock.VsockListener):
                    await item.aclose()
                elif isinstance(item, asyncio.Server):
                    item.close()
                    await item.wait_closed()
            vsock.withdraw_identity(self.root, cid)
            if self._cgroup is not None:
                self._cgroup.remove()
            _remove_tree(endpoints)
            _remove_tree(workdir)
            if self._final is not None:
                self._update(state=self._final[0], reason=self._final[1])

    async def _admit_nsm(self, sock: socket.socket) -> None:
        await vsock.admit_enclave_peer(sock, self.root, self.record.cid, "NSM")

    async def _spawn(
        self, spec: sandbox.SandboxSpec, tools: sandbox.SandboxTools | None, console: IO[bytes]
    ) -> asyncio.subprocess.Process:
        """Start the enclave process and publish its identity for the parent's endpoints."""
        if tools is None:
            log.warning(
                "enclave %s runs WITHOUT A SANDBOX (--no-sandbox): its code can reach this"
                " host as the launcher's user",
                self.record.id,
            )
            nsm_socket = spec.endpoint_dir / vsock.HOST_DIR / "nsm.sock"
            process = await asyncio.create_subprocess_exec(
                *sandbox.unsandboxed_command(spec),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                env=sandbox.enclave_environment(nsm_socket, self.root, spec.cid),
                cwd=spec.image_dir,
                preexec_fn=partial(sandbox.limit_resources, spec, self._cgroup),
            )
            vsock.publish_identity(self.root, spec.cid, ProcessIdentity.of_process(process.pid))
            return process
        program = sandbox.seccomp_program()
        seccomp_fd = os.memfd_create("hermetic-seccomp", 0)
        info_read, info_write = os.pipe()
        try:
            os.write(seccomp_fd, program)
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
            process = await asyncio.create_subprocess_exec(
                *sandbox.command(spec, tools, seccomp_fd, info_write),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                env={},
                pass_fds=(seccomp_fd, info_write),
                preexec_fn=partial(sandbox.limit_resources, spec, self._cgroup),
            )
        finally:
            os.close(seccomp_fd)
            os.close(info_write)
        try:
            raw = await asyncio.wait_for(asyncio.to_thread(_read_all, info_read), BOOT_TIMEOUT)
        finally:
            os.close(info_read)
        first = sandbox.parse_info(raw) if raw else None
        if first is None:
            return process  # bwrap failed before starting anything: its exit says why
        identity = ProcessIdentity(
            uid=os.getuid() if spec.uid is None else spec.uid,
            pid_namespace=pid_namespace(first),
        )
        vsock.publish_identity(self.root, spec.cid, identity)
        return process

    async def _boot_and_wait(
        self, spec: sandbox.SandboxSpec, tools: sandbox.SandboxTools | None
    ) -> int:
        if self.record.debug:
            console = open(console_path(self.record.id), "ab")  # noqa: SIM115
        else:
            console = open(os.devnull, "wb")  # noqa: SIM115
        with console:
            try:
                self.process = await self._spawn(spec, tools, console)
            except (HermeticError, OSError, TimeoutError) as exc:
                reason = f"sandbox: {exc}"
                log.error("enclave %s did not start: %s", self.record.id, reason)
                self._finish(records.FAILED, reason)
                return 1
        pid = self.process.pid
        self._update(pid=pid, pid_start=records.process_start(pid))
        exited = asyncio.ensure_future(self.process.wait())
        ready = asyncio.ensure_future(self.ready.wait())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait(
            {exited, ready, stop}, timeout=BOOT_TIMEOUT, return_when="FIRST_COMPLETED"
        )
        ready.cancel()
        if not self.ready.is_set():
            exited.cancel()
            stop.cancel()
            reason = self._boot_failure_reason()
            log.error("enclave %s did not start: %s", self.record.id, reason)
            self._finish(records.FAILED, reason)
            return 1
        app_pid = self._ready_pid or sandbox.find_enclave_process(pid)
        checks = sandbox.inspect(app_pid, state=state_dir(), sandboxed=tools is not None)
        for what, verdict in checks.items():
            if sandbox.weakened(verdict):
                log.warning("SANDBOX WEAKENED for %s: %s %s", self.record.id, what, verdict)
        digest = (
            self.boot_status.digest.hex() if self.boot_status and self.boot_status.digest else None
        )
        self._update(
            state=records.RUNNING,
            sandbox=checks,
            config_digest=digest,
            reason=None,
            app_pid=app_pid,
        )
        log.info("enclave %s running on CID %d", self.record.id, self.record.cid)
        await asyncio.wait({exited, stop}, return_when="FIRST_COMPLETED")
        stop.cancel()
        if exited.done():
            reason = f"enclave process exited with status {exited.result()}"
        else:
            exited.cancel()
            reason = "stopped by the operator"
        await self._terminate_child()
        self._finish(records.TERMINATED, reason)
        log.info("enclave %s terminated: %s", self.record.id, reason)
        return 0

    def _boot_failure_reason(self) -> str:
        if self.boot_status is not None and not self.boot_status.ok:
            return f"enclave refused to start: {self.boot_status.reason}"
        if self.process is not None and self.process.returncode is not None:
            return f"enclave exited with status {self.process.returncode} before it was ready"
        if self.stopping.is_set():
            return "stopped by the operator during boot"
        return f"enclave not ready after {BOOT_TIMEOUT:.0f} s"

    async def _on_ready(self, stream: vsock.VsockStream) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            byte = await asyncio.wait_for(stream.reader.readexactly(1), 10)
            if byte == boot.READY_BYTE:
                with contextlib.suppress(OSError):
                    self._ready_pid = peer_credentials(stream.writer.get_extra_info("socket")).pid
                self.ready.set()

    async def _on_config(self, stream: vsock.VsockStream) -> None:
        # The boot frames (config, endorsement, forwarded credentials) go out once, to the
        # enclave's first connection only: a second asker gets nothing.
        if self._config_served:
            log.warning("enclave %s asked for its boot frames again: refused", self.record.id)
            return
        self._config_served = True
        try:
            await write_frame(stream.writer, self.bundle or b"")
            endorsement = self.record.endorsement
            await write_frame(stream.writer, endorsement.encode() if endorsement else b"")
            await write_frame(stream.writer, boot.encode_credentials(self._credentials))
            answer = await asyncio.wait_for(read_frame(stream.reader), 30)
            if answer is not None:
                self.boot_status = boot.decode_status(answer)
                if not self.boot_status.ok:
                    log.error(
                        "enclave %s refused its config: %s", self.record.id, self.boot_status.reason
                    )
        except (FrameFormatError, HermeticError, TimeoutError) as exc:
            log.error("config channel with enclave %s failed: %s", self.record.id, exc)

    async def _terminate_child(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _prepare_endpoints(endpoints: Path, uid: int | None) -> None:
    """A fresh endpoint directory: ``host/`` is ours, ``enclave/`` the sandbox user's."""
    _remove_tree(endpoints)
    endpoints.mkdir(parents=True, mode=0o755)
    endpoints.chmod(0o755)  # the sandbox user must traverse it, whatever the umask
    (endpoints / vsock.HOST_DIR).mkdir(mode=0o755)
    (endpoints / vsock.HOST_DIR).chmod(0o755)
    empty = endpoints / vsock.HOST_DIR / sandbox.EMPTY_FILE
    empty.touch(mode=0o444)
    empty.chmod(0o444)
    own = endpoints / vsock.ENCLAVE_DIR
    own.mkdir(mode=0o700)
    if uid is not None:
        os.chown(own, uid, uid)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _make_read_only(root: Path) -> None:
    """Drop write bits too: the read-only mount is the real barrier, this covers non-root."""
    for path in [*sorted(root.rglob("*"), reverse=True), root]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _remove_tree(root: Path) -> None:
    if not root.exists():
        return
    for path in [root, *root.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.chmod(0o700)
    shutil.rmtree(root, ignore_errors=True)


async def supervise(
    record: EnclaveRecord, bundle: bytes | None, credentials: KMSCredentials | None = None
) -> int:
    """Run a supervisor with SIGTERM/SIGINT wired to a clean stop."""
    supervisor = Supervisor(record, bundle, credentials)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.stopping.set)
    try:
        return await supervisor.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hermetic-supervisor", description=__doc__)
    parser.add_argument("enclave_id")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument(
        "--aws-credentials-env",
        action="store_true",
        help="forward AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN at boot",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s supervisor %(levelname)s %(message)s",
    )
    record = records.load(args.enclave_id)
    bundle = args.config.read_bytes() if args.config else None
    try:
        credentials = (
            boot.credentials_from_environment(os.environ) if args.aws_credentials_env else None
        )
        return asyncio.run(supervise(record, bundle, credentials))
    except HermeticError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
