"""Memory and process limits for an emulated enclave, in a control group of its own.

``RLIMIT_AS`` bounds an enclave's address space, not its memory: pages in a ``memfd``, in
System V segments, in socket buffers or in its ``/tmp`` tmpfs are charged to no address
space. A real Nitro enclave cannot use more memory than it was given, so the emulated one
runs in a memory cgroup whose limit is the enclave's memory (swap included), and a pids
cgroup caps its processes. Both are created under the launcher's own cgroup (so this works
inside a container or a session's own cgroup), one per enclave, and removed when it ends.

Only root can do this; as an ordinary user (or where the hierarchy is not writable)
:func:`create` returns ``None`` and the sandbox report says ``ADDRESS SPACE ONLY``.
Both cgroup v1 (one hierarchy per controller) and v2 (the unified hierarchy) are handled.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class EnclaveCgroup:
    """The cgroup directories of one enclave (one per v1 controller, or one in v2)."""

    directories: tuple[Path, ...]
    unified: bool

    def attach(self, pid: int) -> None:
        """Move ``pid`` in (called in the child before exec, so all it starts is inside)."""
        for directory in self.directories:
            (directory / "cgroup.procs").write_text(f"{pid}\n")

    def remove(self) -> None:
        """Remove the directories once the enclave's processes are gone (bounded retries)."""
        for directory in self.directories:
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def create(name: str, memory_bytes: int, max_processes: int) -> EnclaveCgroup | None:
    """The enclave's cgroup with its limits set, or ``None`` where that is not possible."""
    if os.geteuid() != 0 or not ROOT.is_dir():
        return None
    try:
        if (ROOT / "cgroup.controllers").exists():
            return _create_unified(name, memory_bytes, max_processes)
        return _create_v1(name, memory_bytes, max_processes)
    except OSError:
        return None


def memory_limit_of(pid: int) -> int | None:
    """The memory limit (bytes) of the cgroup ``pid`` is in, read from the host's view."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "memory":
            return _read_limit(ROOT / "memory" / relative / "memory.limit_in_bytes")
        if controllers == "" and (ROOT / "cgroup.controllers").exists():
            return _read_limit(ROOT / relative / "memory.max")
    return None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _own_path(controller: str) -> str:
    """This process's cgroup path in the v1 hierarchy of ``controller``."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path.lstrip("/")
    raise OSError(f"no {controller} cgroup for this process")


def _create_v1(name: str, memory_bytes: int, max_processes: int) -> EnclaveCgroup:
    made: list[Path] = []
    try:
        memory = ROOT / "memory" / _own_path("memory") / name
        memory.mkdir()
        made.append(memory)
        (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
        with contextlib.suppress(OSError):  # absent without swap accounting
            (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        pids = ROOT / "pids" / _own_path("pids") / name
        pids.mkdir()
        made.append(pids)
        (pids / "pids.max").write_text(str(max_processes))
    except OSError:
        EnclaveCgroup(tuple(made), unified=False).remove()
        raise
    return EnclaveCgroup(tuple(made), unified=False)


def _create_unified(name: str, memory_bytes: int, max_processes: int) -> EnclaveCgroup:
    directory = ROOT / _unified_path() / name
    directory.mkdir()
    try:
        (directory / "memory.max").write_text(str(memory_bytes))
        with contextlib.suppress(OSError):
            (directory / "memory.swap.max").write_text("0")
        (directory / "pids.max").write_text(str(max_processes))
    except OSError:
        EnclaveCgroup((directory,), unified=True).remove()
        raise
    return EnclaveCgroup((directory,), unified=True)


def _unified_path() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            return path.lstrip("/")
    raise OSError("no unified cgroup for this process")
