"""Shared fixtures for the log-service tests: a throw-away PostgreSQL server, a real
``hermetic log serve`` subprocess on a free port, and log keys.

Kept in a module of its own (imported by the test modules) so every test file can use the
same real parts; it holds no tests itself.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from helpers import hermetic

PG_APT_PACKAGE = "postgresql"


def pg_bindir() -> Path | None:
    """The newest Debian PostgreSQL server binaries, if installed."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


@dataclass(frozen=True)
class PostgresServer:
    socket_dir: Path
    user: str

    def dsn(self, database: str) -> str:
        return f"postgresql://{self.user}@/{database}?host={self.socket_dir}"

    def new_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """initdb + pg_ctl in a temp dir, Unix socket only; skipped when PostgreSQL is absent."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
            f"(install the Debian package '{PG_APT_PACKAGE}')"
        )
    run_as: list[str] = []
    owner = None
    if os.getuid() == 0:
        # initdb refuses to run as root: run the server as the 'postgres' system user.
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user for initdb")
        run_as = ["runuser", "-u", "postgres", "--"]
    # Under /tmp directly (not pytest's 0700 tmp dirs) so the postgres user can reach it.
    base = Path(tempfile.mkdtemp(prefix="hermetic-pg-"))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data = base / "data"
    try:
        subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "hermetic",
             "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True,
        )  # fmt: skip
        opts = f"-c listen_addresses='' -c unix_socket_directories={base} -c fsync=on"
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"),
             "-w", "-o", opts, "start"],
            check=True, capture_output=True,
        )  # fmt: skip
        try:
            yield PostgresServer(base, "hermetic")
        finally:
            subprocess.run(
                [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class LogKeys:
    skey_file: Path
    vkey: str
    origin: str


def make_log_key(directory: Path, origin: str = "example.test/log") -> LogKeys:
    out = directory / f"{origin.replace('/', '_')}.skey"
    result = hermetic("log", "key", "--out", str(out), "--name", origin, check=True)
    return LogKeys(out, result.stdout.strip(), origin)


class LogServerProcess:
    """``hermetic log serve`` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, db: str, keys: LogKeys, *extra: str) -> None:
        self.db, self.keys, self.extra = db, keys, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> LogServerProcess:
        """Start the server and wait until it answers ``/checkpoint`` (a generous deadline:
        a loaded machine may take many seconds to import and bind)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hermetic", "log", "serve", "--db", self.db,
             "--listen", f"127.0.0.1:{self.port}", "--key", str(self.keys.skey_file),
             "--origin", self.keys.origin, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        # One client for the whole wait: each new httpx client loads the CA bundle anew.
        with httpx.Client(timeout=10) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"log server exited with {self.proc.returncode}: {err}")
                try:
                    if http.get(f"{self.url}/checkpoint").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        self.kill()
        raise RuntimeError("log server did not come up")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LogServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
