"""Helpers every kind of test shares (runtime-specific ones live in apps/probe/harness.py)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).resolve().parent / "vectors"
"""The published test vectors, kept in the repository (see each folder's README)."""


def hermetic(
    *args: str | Path,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | None = None,
    timeout: float = 90,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (``python -m hermetic``) in a subprocess and capture its output.

    It inherits this test's environment, so its own HERMETIC_STATE_DIR; ``env`` overrides
    variables (None removes one).
    """
    environment = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return subprocess.run(
        [sys.executable, "-m", "hermetic", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=cwd,
        check=check,
    )


def state_files(root: Path) -> Iterator[tuple[Path, bytes]]:
    """Every regular file under ``root`` with its bytes, for scans of local state (secrets,
    leaked app output).

    Services may still be removing files while the scan runs (an enclave's sockets and
    records on its way down): a file or directory that vanishes between being listed and
    being read is skipped, since what is gone holds nothing. ``os.walk`` already skips a
    directory that vanishes before it is listed.
    """
    for directory, _, names in os.walk(root):
        for name in sorted(names):
            path = Path(directory) / name
            try:
                if not stat.S_ISREG(path.stat().st_mode):
                    continue
                data = path.read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                continue
            yield path, data


def stop_process(process: subprocess.Popen[Any], grace: float = 15) -> None:
    """SIGTERM ``process`` if it still runs; SIGKILL it after ``grace`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_port(
    port: int, process: subprocess.Popen[Any], what: str = "kms serve", timeout: float = 90
) -> None:
    """Wait until ``process`` listens on 127.0.0.1:``port``; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{what} not listening on {port}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that need a fixed one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def act_as_enclave(cid: int, root: Path | None = None) -> None:
    """Publish this test process as enclave ``cid``'s identity, so the parent-side vsock
    endpoints (which admit only a process of that enclave's sandbox) accept it, and the
    parent's connections to ``cid``'s ports accept its listeners."""
    from hermetic.peercred import ProcessIdentity
    from hermetic.transport import vsock

    vsock.publish_identity(
        root or vsock.emulation_root(), cid, ProcessIdentity.of_process(os.getpid())
    )
