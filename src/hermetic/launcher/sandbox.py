"""The emulated enclave's sandbox: what stands in for the Nitro hypervisor's isolation.

The enclave process is started in two stages, both ``python -I`` with an empty
environment:

1. **sandbox stage** (:data:`SANDBOX_STAGE`, launcher code, never image code): enters a
   new network namespace (no interfaces but a down loopback, so nothing reaches the host's
   network) and a private mount namespace in which the extracted image is bind-mounted
   read-only (root ignores file modes, a read-only mount it cannot ignore) and the
   launcher's state directory (the dev PKI's signing keys, other enclaves) is covered by
   an empty tmpfs with only the image and the vsock directory brought back; sets
   ``RLIMIT_AS`` to the enclave's memory and pins the process to its CPUs; asks the
   kernel to kill it if its supervisor dies (an orphan enclave would outlive the NSM and
   the record that says it is gone); then ``execve``
   stage 2 with exactly :func:`enclave_environment`.
2. **boot stage** (:data:`BOOT_STAGE`): puts the image's runtime and app directories first
   on ``sys.path`` and drops any other ``hermetic`` source (the developer's checkout must
   not shadow the measured runtime), then calls the image's boot module's
   ``main(app_dir)``.

When the kernel refuses a namespace (not root, no user namespaces) the stage prints a
warning and goes on; the supervisor independently checks the result through ``/proc``
and records it (``sandbox`` in the enclave record) and logs it loudly.

The environment the enclave gets is exactly: ``HERMETIC_NSM_SOCKET`` (the emulated
NSM), ``HERMETIC_VSOCK=emulated``, ``HERMETIC_VSOCK_DIR`` and ``HERMETIC_VSOCK_CID`` (the
vsock emulation). Nothing else.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

SANDBOX_STAGE = r"""
import ctypes, json, os, resource, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
def warn(what):
    err = ctypes.get_errno()
    sys.stderr.write("hermetic sandbox WARNING: %s: %s\n" % (what, os.strerror(err)))
PR_SET_PDEATHSIG, SIGKILL = 1, 9
libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
if os.getppid() != spec["parent"]:
    sys.exit("hermetic sandbox: the supervisor died during boot")
if libc.unshare(CLONE_NEWNET) != 0:
    warn("no network namespace, the enclave shares the host network")
image = os.fsencode(spec["image"])
def hide_state():
    # Cover the launcher's state dir (dev PKI keys, other enclaves) with an empty tmpfs,
    # then bring back only what the enclave needs: its image and the vsock directory.
    keep = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in spec["expose"]]
    hide = os.fsencode(spec["hide"])
    if libc.mount(b"tmpfs", hide, b"tmpfs", 0, b"mode=0755,size=64k") != 0:
        return warn("cannot hide the launcher state (PKI keys stay visible)")
    for path, fd in keep:
        os.makedirs(path, exist_ok=True)
        source = ("/proc/self/fd/%d" % fd).encode()
        if libc.mount(source, os.fsencode(path), None, MS_BIND | MS_REC, None) != 0:
            warn("cannot expose %s" % path)
        os.close(fd)
if libc.unshare(CLONE_NEWNS) != 0:
    warn("no mount namespace, the image is not mounted read-only")
elif libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
    warn("cannot make mounts private")
elif hide_state() is None and libc.mount(image, image, None, MS_BIND | MS_REC, None) != 0:
    warn("cannot bind-mount the image")
elif libc.mount(b"none", image, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0:
    warn("cannot remount the image read-only")
limit = spec["memory_mib"] * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
os.sched_setaffinity(0, spec["cpu_ids"])
os.chdir(spec["image"])
argv = [sys.executable, "-I", "-c", spec["boot"], spec["runtime"], spec["app"], spec["module"]]
os.execve(sys.executable, argv, spec["env"])
"""

BOOT_STAGE = r"""
import importlib, os, sys
runtime, app, module = sys.argv[1:4]
keep = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, "hermetic"))]
sys.path[:] = [runtime, app] + keep
sys.exit(importlib.import_module(module).main(app))
"""


@dataclass(frozen=True)
class SandboxSpec:
    """Everything the sandbox stage needs, passed as one JSON argument."""

    image_dir: Path
    boot_module: str
    memory_mib: int
    cpu_ids: tuple[int, ...]
    environment: dict[str, str]
    hidden_state: Path
    exposed: tuple[Path, ...]

    def argv(self) -> list[str]:
        spec = {
            "image": str(self.image_dir),
            "runtime": str(self.image_dir / "runtime"),
            "app": str(self.image_dir / "app"),
            "module": self.boot_module,
            "memory_mib": self.memory_mib,
            "cpu_ids": list(self.cpu_ids),
            "env": self.environment,
            "boot": BOOT_STAGE,
            "parent": os.getpid(),
            "hide": str(self.hidden_state),
            "expose": [str(p) for p in self.exposed if p.is_relative_to(self.hidden_state)],
        }
        return [sys.executable, "-I", "-c", SANDBOX_STAGE, json.dumps(spec)]


def enclave_environment(nsm_socket: Path, vsock_root: Path, cid: int) -> dict[str, str]:
    """The complete environment of an emulated enclave (see the module docstring)."""
    return {
        "HERMETIC_NSM_SOCKET": str(nsm_socket),
        "HERMETIC_VSOCK": "emulated",
        "HERMETIC_VSOCK_DIR": str(vsock_root),
        "HERMETIC_VSOCK_CID": str(cid),
    }


def pick_cpus(count: int) -> tuple[int, ...]:
    """``count`` CPUs from those this process may use (all of them if fewer exist)."""
    available = sorted(os.sched_getaffinity(0))
    return tuple(available[: max(1, min(count, len(available)))])


def inspect(pid: int, image_dir: Path, state: Path) -> dict[str, str]:
    """What the sandbox really achieved, read from /proc (never from the enclave itself)."""
    result: dict[str, str] = {}
    try:
        own = os.readlink("/proc/self/ns/net")
        theirs = os.readlink(f"/proc/{pid}/ns/net")
        result["network"] = "isolated" if own != theirs else "SHARED WITH HOST"
    except OSError:
        result["network"] = "unknown"
    try:
        mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        target = str(image_dir)
        options = [line.split()[5] for line in mounts if line.split()[4] == target]
        ro = bool(options) and "ro" in options[-1].split(",")
        result["image"] = "read-only mount" if ro else "WRITABLE"
        hidden = any(line.split()[4] == str(state) and " - tmpfs " in line for line in mounts)
        result["launcher_state"] = "hidden" if hidden else "VISIBLE"
    except (OSError, IndexError):
        result["image"] = "unknown"
    try:
        limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
        line = next(line for line in limits if line.startswith("Max address space"))
        soft = line.split()[3]
        result["memory"] = "UNLIMITED" if soft == "unlimited" else f"{int(soft) >> 20} MiB"
    except (OSError, StopIteration, ValueError, IndexError):
        result["memory"] = "unknown"
    try:
        result["cpus"] = ",".join(map(str, sorted(os.sched_getaffinity(pid))))
    except OSError:
        result["cpus"] = "unknown"
    return result
