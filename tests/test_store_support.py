"""A real ``hermetic store serve`` subprocess for the record store tests.

Kept in a module of its own (imported by the test modules) so every record-store test
runs the same real server; it holds no tests itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from typing import Any

import httpx


class StoreServerProcess:
    """``hermetic store serve --listen 127.0.0.1:0``: it binds a free port itself and
    prints its URL as JSON, which is read before the server is used."""

    command = ("store", "serve")
    """The ``hermetic`` subcommand run; another server that announces itself the same way
    (a JSON object with ``url``, then ``GET /health``) subclasses this with its own."""
    what = "store serve"

    def __init__(self, db: str | None, *extra: str) -> None:
        self.db, self.extra = db, extra
        self.proc: subprocess.Popen[str] | None = None
        # stderr goes to a file (a pipe nobody reads could fill and stall the server); it
        # lives as long as this object, so a test can read it after stop().
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.url = ""
        self.announced: dict[str, Any] = {}

    def start(self) -> StoreServerProcess:
        db = ["--db", self.db] if self.db is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hermetic", *self.command, *db,
             "--listen", "127.0.0.1:0", *self.extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        lines: list[str] = []
        while not lines or lines[-1] != "}\n":
            line = self.proc.stdout.readline()  # the suite's timeout bounds a silent hang
            if not line:
                raise RuntimeError(f"{self.what} exited with {self.proc.wait()}: {self.stderr()}")
            lines.append(line)
        self.announced = json.loads("".join(lines))
        self.url = self.announced["url"]
        # Bound before the URL was printed, so this answers (or the server is broken).
        assert httpx.get(f"{self.url}/health", timeout=60).json() == {"status": "ok"}
        return self

    def stop(self) -> int | None:
        """SIGTERM (uvicorn shuts down cleanly), SIGKILL after 30 s; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def stderr(self) -> str:
        """Everything the server wrote to stderr so far."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def __enter__(self) -> StoreServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
