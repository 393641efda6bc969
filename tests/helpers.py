"""Helpers every kind of test shares (runtime-specific ones live in apps/probe/harness.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that need a fixed one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
