"""The emulated enclave's sandbox: what stands in for the Nitro hypervisor's isolation.

Threat model: the app inside the image is arbitrary code chosen by an attacker. Whatever
code in a real Nitro enclave cannot do, the emulated enclave must not do either: see the
host's files, network or processes, another enclave's NSM or endpoints, or gain any
privilege. The sandbox is built by **bubblewrap** (``bwrap``, the sandbox Flatpak relies
on), not by namespace code of our own:

* its own user, PID, mount, network, IPC, UTS and cgroup namespaces; a private ``/proc``
  that shows only the enclave's processes; no network interface but a down loopback;
* no capabilities, ``no_new_privs`` (set-uid binaries give nothing) and a seccomp filter
  that refuses the calls an enclave never needs and that would widen its reach
  (:data:`DENIED_SYSCALLS`: mounting, namespaces, ptrace, keyrings, BPF, modules);
* a root file system that holds only the read-only image (``/enclave``), the read-only
  Python runtime it runs on, a private size-limited ``/tmp``, a minimal ``/dev`` and the
  enclave's own endpoint directory (``/run/hermetic/vsock/<cid>``, see
  :mod:`hermetic.transport.vsock`), whose parent-side half is read-only;
* an address-space limit of the enclave's memory, its CPUs, and death with its
  supervisor.

When the launcher runs as root, the enclave runs as an unprivileged host uid of its own,
leased host-wide (:mod:`hermetic.launcher.uids`): a privileged bubblewrap builds the
namespaces and the file system (it can read the Python runtime wherever it lives),
``setpriv`` drops to the enclave's uid with no capabilities, and an unprivileged
bubblewrap inside adds the user namespace, forbids any further one and loads the seccomp
filter. Run as an ordinary user, one
unprivileged bubblewrap does it all and the enclave keeps that user's uid.

The environment the enclave gets is exactly: ``HERMETIC_NSM_SOCKET`` (the emulated
NSM), ``HERMETIC_VSOCK=emulated``, ``HERMETIC_VSOCK_DIR`` and ``HERMETIC_VSOCK_CID`` (the
vsock emulation). Nothing else.

:func:`inspect` measures what the sandbox actually is from the host's ``/proc``, never
from the enclave's word; ``hermetic ps --json`` reports that.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hermetic.errors import SandboxUnavailableError
from hermetic.launcher import uids
from hermetic.launcher.cgroups import EnclaveCgroup, memory_limit_of

INSIDE_IMAGE = PurePosixPath("/enclave")
EMPTY_FILE = "empty"
"""An empty file in the endpoint directory's ``host/`` half, bound over host facts."""
INSIDE_VSOCK = PurePosixPath("/run/hermetic/vsock")
MAX_PROCESSES = 512
"""RLIMIT_NPROC of a sandbox with its own uid (threads count): no fork bomb reaches the host."""

DENIED_SYSCALLS = (
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "setns", "unshare",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "open_by_handle_at", "name_to_handle_at",
    "swapon", "swapoff", "reboot", "acct", "quotactl", "syslog", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "modify_ldt", "mbind", "move_pages", "migrate_pages", "set_mempolicy", "get_mempolicy",
    "set_mempolicy_home_node", "sysfs", "ustat", "uselib", "lookup_dcookie", "nfsservctl",
    "_sysctl", "iopl", "ioperm", "fanotify_init",
    "sched_setaffinity",
)  # fmt: skip
"""Refused with EPERM by the seccomp filter (most already fail for want of capabilities;
the filter makes the refusal independent of how the namespaces were set up). Besides these:
io_uring and NUMA calls are kernel attack surface an enclave never needs, and
``sched_setaffinity`` would let it take CPUs it was not given."""
AF_VSOCK = 40
"""Refused for ``socket``/``socketpair`` (EAFNOSUPPORT): a network namespace does not
isolate vsock, and an emulated enclave reaches its parent through its endpoint directory
only; the machine's real vsock (a hypervisor, or real enclaves on a Nitro parent) is not
its to touch."""
MAX_OPEN_FILES = 4096
"""RLIMIT_NOFILE per process: with :data:`MAX_PROCESSES` it bounds the host file table."""

_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)

BOOT_STAGE = r"""
import ctypes, importlib, os, struct, sys
runtime, app, module, sockets = sys.argv[1:5]
# Landlock before any image code runs (see landlock_abi() for why by hand): files may be
# written under /tmp only, and the endpoint directory takes sockets (bind) and their
# removal, nothing else: no files on the host's disk, no symlinks for the parent to follow.
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
abi = libc.syscall(444, None, 0, 1)
if abi > 0:
    write = (1 << 1) | sum(1 << b for b in range(4, 13))
    write |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)
    scoped = 3 if abi >= 6 else 0
    attr = struct.pack("=QQQ", write, 0, scoped)[: 24 if abi >= 6 else 16 if abi >= 4 else 8]
    ruleset = libc.syscall(444, attr, len(attr), 0)
    if ruleset < 0:
        sys.exit("hermetic sandbox: landlock_create_ruleset failed")
    for path, allowed in (("/tmp", write), (sockets, (1 << 9) | (1 << 5)), ("/dev", 1 << 1)):
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
        rule = struct.pack("=Qi", allowed, fd)
        if libc.syscall(445, ruleset, 1, rule, 0) != 0:
            sys.exit("hermetic sandbox: landlock_add_rule failed for " + path)
        os.close(fd)
    if libc.syscall(446, ruleset, 0) != 0:
        sys.exit("hermetic sandbox: landlock_restrict_self failed")
    os.close(ruleset)
keep = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, "hermetic"))]
sys.path[:] = [runtime, app] + keep
del ctypes, libc, struct
sys.exit(importlib.import_module(module).main(app))
"""
"""The enclave's first code, launcher code not image code: confines file writes with
Landlock, puts the image's runtime and app first on ``sys.path`` and drops any other
``hermetic`` source (a developer's checkout must not shadow the measured runtime), then
boots. Landlock is applied by the stage itself because it must precede every import of
image code; a kernel without Landlock (before 5.13) leaves the file-system confinement to
the read-only mounts and :func:`inspect` says so."""


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0 when it has none).

    Written by hand with ctypes (three system calls): no well-kept Python binding exists,
    and the boot stage must use it from the standard library before anything is imported.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    version = int(libc.syscall(444, None, 0, 1))
    return max(version, 0)


@dataclass(frozen=True)
class SandboxTools:
    """The programs the sandbox is built with, found by :func:`preflight`."""

    bwrap: str
    setpriv: str | None
    """Only needed when the launcher is root (to drop to the enclave's own uid)."""


@dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to start one enclave process in its sandbox."""

    image_dir: Path
    endpoint_dir: Path
    """The enclave's directory of the vsock emulation root (``<root>/<cid>``)."""
    cid: int
    boot_module: str
    memory_mib: int
    cpu_ids: tuple[int, ...]
    uid: int | None
    """Host uid to run as (launcher is root), or ``None`` to keep the launcher's."""

    def environment(self) -> dict[str, str]:
        return enclave_environment(
            Path(INSIDE_VSOCK / str(self.cid) / "host" / "nsm.sock"), Path(INSIDE_VSOCK), self.cid
        )


def enclave_environment(nsm_socket: Path, vsock_root: Path, cid: int) -> dict[str, str]:
    """The complete environment of an emulated enclave (see the module docstring)."""
    return {
        "HERMETIC_NSM_SOCKET": str(nsm_socket),
        "HERMETIC_VSOCK": "emulated",
        "HERMETIC_VSOCK_DIR": str(vsock_root),
        "HERMETIC_VSOCK_CID": str(cid),
    }


def preflight() -> SandboxTools:
    """The sandbox's tools, or :class:`SandboxUnavailableError` naming what is missing."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailableError(
            "cannot sandbox the enclave: bubblewrap (bwrap) is not installed (Debian package"
            " 'bubblewrap'; 'make' installs it when run as root), or pass --no-sandbox"
        )
    setpriv = None
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise SandboxUnavailableError(
                "cannot sandbox the enclave: setpriv (util-linux) is not installed, or pass"
                " --no-sandbox"
            )
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, OSError) as exc:
        raise SandboxUnavailableError(
            f"cannot sandbox the enclave: libseccomp is not usable ({exc}), or pass --no-sandbox"
        ) from None
    as_sandbox_user = uids.PROBE_UID if setpriv else None
    probe = subprocess.run(
        [bwrap, "--unshare-user", "--disable-userns", "--ro-bind", "/", "/", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        user=as_sandbox_user,
        group=as_sandbox_user,
        extra_groups=[] if as_sandbox_user is not None else None,
    )
    if probe.returncode != 0:
        reason = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "no reason"
        raise SandboxUnavailableError(
            "cannot sandbox the enclave: unprivileged user namespaces do not work here"
            f" (bwrap: {reason}), or pass --no-sandbox"
        )
    return SandboxTools(bwrap=bwrap, setpriv=setpriv)


def seccomp_program() -> bytes:
    """The compiled BPF filter (libseccomp, through pyseccomp) that bwrap loads."""
    import pyseccomp as seccomp

    refused = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        with contextlib.suppress(RuntimeError, OSError, ValueError):  # unknown on this arch
            rules.add_rule(refused, name)
    # New namespaces through clone; clone3 hides its flags in memory a filter cannot read,
    # so it answers ENOSYS and the C library falls back to clone (as Docker's profile does).
    for flag in _NAMESPACE_FLAGS:
        rules.add_rule(refused, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for call in ("socket", "socketpair"):
        rules.add_rule(
            seccomp.ERRNO(errno.EAFNOSUPPORT), call, seccomp.Arg(0, seccomp.EQ, AF_VSOCK)
        )
    # Faking terminal input (TIOCSTI) into a shared terminal; bwrap's --new-session too.
    rules.add_rule(refused, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, 0x5412))
    memfd = os.memfd_create("hermetic-seccomp", 0)
    try:
        rules.export_bpf(_Fd(memfd))
        size = os.lseek(memfd, 0, os.SEEK_END)
        return os.pread(memfd, size, 0)
    finally:
        os.close(memfd)


class _Fd:
    """The file-like object pyseccomp's ``export_bpf`` wants (it only calls ``fileno``)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


def python_runtime() -> tuple[Path, ...]:
    """The directories the enclave's Python needs, read-only: the base install and venv."""
    roots = {Path(sys.base_prefix).resolve(), Path(sys.prefix)}
    return tuple(sorted(p for p in roots if p.is_dir()))


def command(spec: SandboxSpec, tools: SandboxTools, seccomp_fd: int, info_fd: int) -> list[str]:
    """The bwrap command line that starts the enclave (see the module docstring)."""
    inside_vsock = INSIDE_VSOCK / str(spec.cid)
    filesystem: list[str] = ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / top
        if host.is_symlink():
            filesystem += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            filesystem += ["--ro-bind", str(host), str(host)]
    # /tmp first: a runtime that lives below /tmp (a checkout's venv there) is bound on top.
    tmp = PurePosixPath("/tmp")  # noqa: S108
    filesystem += ["--size", str(spec.memory_mib * 1024 * 1024 // 2), "--perms", "1777"]
    filesystem += ["--tmpfs", str(tmp)]
    made: set[PurePosixPath] = {tmp}
    for runtime in python_runtime():
        for parent in reversed(PurePosixPath(runtime).parents):
            if parent != PurePosixPath("/") and parent not in made and parent.parts[1] != "usr":
                filesystem += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
        filesystem += ["--ro-bind", str(runtime), str(runtime)]
    for parent in reversed(PurePosixPath(inside_vsock).parents):
        if parent != PurePosixPath("/"):
            filesystem += ["--perms", "0755", "--dir", str(parent)]
    # The endpoint directory is read-only but for enclave/, a mount point of its own (so
    # it cannot be renamed or replaced), where Landlock lets the enclave make sockets only.
    filesystem += [
        "--ro-bind", str(spec.image_dir), str(INSIDE_IMAGE),
        "--ro-bind", str(spec.endpoint_dir), str(inside_vsock),
        "--bind", str(spec.endpoint_dir / "enclave"), str(inside_vsock / "enclave"),
        "--proc", "/proc",
        # The host's boot command line, hidden behind an empty file (a device node cannot
        # be bound there: bind mounts are nodev).
        "--ro-bind", str(spec.endpoint_dir / "host" / EMPTY_FILE), "/proc/cmdline",
        "--dev", "/dev",
        "--remount-ro", "/",
        "--chdir", str(INSIDE_IMAGE),
    ]  # fmt: skip
    environment: list[str] = ["--clearenv"]
    for name, value in spec.environment().items():
        environment += ["--setenv", name, value]
    namespaces = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    namespaces += ["--unshare-cgroup-try", "--hostname", "enclave"]
    # bwrap adds PWD to the environment; env(1) drops it, so the enclave's initial
    # environment is exactly enclave_environment().
    app = [
        "/usr/bin/env", "-u", "PWD", "--", sys.executable, "-I", "-c", BOOT_STAGE,
        str(INSIDE_IMAGE / "runtime"), str(INSIDE_IMAGE / "app"), spec.boot_module,
        str(inside_vsock / "enclave"),
    ]  # fmt: skip
    confine = ["--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]
    confine += ["--seccomp", str(seccomp_fd)]
    if spec.uid is None:
        return [
            tools.bwrap, *namespaces, *confine, *filesystem, *environment,
            "--info-fd", str(info_fd), "--", *app,
        ]  # fmt: skip
    if tools.setpriv is None:
        raise SandboxUnavailableError("cannot sandbox the enclave: setpriv is not installed")
    drop = [
        tools.setpriv, f"--reuid={spec.uid}", f"--regid={spec.uid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
    ]  # fmt: skip
    return [
        tools.bwrap, *namespaces, "--die-with-parent", "--cap-add", "CAP_SETUID,CAP_SETGID",
        *filesystem, *environment, "--info-fd", str(info_fd), "--",
        *drop,
        tools.bwrap, *confine, "--bind", "/", "/", "--chdir", str(INSIDE_IMAGE), "--", *app,
    ]  # fmt: skip


def limit_resources(spec: SandboxSpec, cgroup: EnclaveCgroup | None = None) -> None:
    """Run in the child between fork and exec: memory, processes, files, CPUs and the
    enclave's cgroup (all inherited by everything it starts)."""
    if cgroup is not None:
        cgroup.attach(os.getpid())
    limit = spec.memory_mib * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES))
    if spec.uid is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))
    os.sched_setaffinity(0, spec.cpu_ids)


def unsandboxed_command(spec: SandboxSpec) -> list[str]:
    """``--no-sandbox``: the enclave as a plain host process (for platforms without bwrap)."""
    return [
        sys.executable, "-I", "-c", BOOT_STAGE,
        str(spec.image_dir / "runtime"), str(spec.image_dir / "app"), spec.boot_module,
        str(spec.endpoint_dir / "enclave"),
    ]  # fmt: skip


def pick_cpus(count: int) -> tuple[int, ...]:
    """``count`` CPUs from those this process may use (all of them if fewer exist)."""
    available = sorted(os.sched_getaffinity(0))
    return tuple(available[: max(1, min(count, len(available)))])


def parse_info(raw: bytes) -> int:
    """The sandbox's first process (host pid) from bwrap's ``--info-fd`` JSON."""
    try:
        info = json.loads(raw)
        pid = info["child-pid"]
    except (ValueError, KeyError, TypeError):
        raise SandboxUnavailableError("bwrap: expected its --info-fd JSON, got none") from None
    if not isinstance(pid, int) or pid <= 0:
        raise SandboxUnavailableError(f"bwrap: child-pid: expected a pid, got {pid!r}")
    return pid


_NAMESPACES = ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup")


def inspect(pid: int, *, state: Path, sandboxed: bool) -> dict[str, str]:
    """What the sandbox of enclave process ``pid`` really is, read from the host's /proc.

    A verdict a reviewer should worry about starts with an upper-case word (``SHARED WITH
    HOST``, ``ADDRESS SPACE ONLY``, ...): :func:`weakened` picks those out and the
    supervisor logs them loudly.
    """
    result: dict[str, str] = {"mode": "bubblewrap" if sandboxed else "NONE (--no-sandbox)"}
    for kind in _NAMESPACES:
        try:
            own = os.readlink(f"/proc/self/ns/{kind}")
            theirs = os.readlink(f"/proc/{pid}/ns/{kind}")
            result[f"{kind}_namespace"] = "own" if own != theirs else "SHARED WITH HOST"
        except OSError:
            result[f"{kind}_namespace"] = "UNKNOWN"
    status = _status(pid)
    uid = status.get("Uid", "").split()
    if uid:
        real = int(uid[0])
        result["uid"] = "ROOT (uid 0)" if real == 0 else f"{real} (unprivileged)"
    caps = [status.get(k, "") for k in ("CapEff", "CapPrm", "CapBnd")]
    result["capabilities"] = (
        "none" if caps and all(c and int(c, 16) == 0 for c in caps) else "PRESENT"
    )
    result["no_new_privs"] = "yes" if status.get("NoNewPrivs") == "1" else "NO"
    result["seccomp"] = "filter" if status.get("Seccomp") == "2" else "NONE"
    result["network"] = _interfaces(pid)
    if sandboxed:
        result["network"] += "; vsock sockets refused"
        abi = landlock_abi()
        result["file_writes"] = (
            f"/tmp and sockets in its endpoint directory only (Landlock ABI {abi})"  # noqa: S108
            if abi
            else "READ-ONLY MOUNTS ONLY (no Landlock in this kernel)"
        )
    result["proc"] = _proc_view(pid)
    result["root_filesystem"] = _mounts(pid)
    try:
        visible = Path(f"/proc/{pid}/root") / state.relative_to("/")
        result["launcher_state"] = "VISIBLE" if visible.exists() else "not visible"
    except (OSError, ValueError):
        result["launcher_state"] = "UNKNOWN"
    result["memory"] = _memory_limit(pid)
    cgroup_limit = memory_limit_of(pid)
    if cgroup_limit is not None and cgroup_limit < 1 << 60:
        result["memory"] = (
            f"{cgroup_limit >> 20} MiB (memory cgroup), address space " + (result["memory"])
        )
    else:
        result["memory"] = "ADDRESS SPACE ONLY: " + result["memory"]
    try:
        result["cpus"] = ",".join(map(str, sorted(os.sched_getaffinity(pid))))
    except OSError:
        result["cpus"] = "UNKNOWN"
    return result


def weakened(verdict: str) -> bool:
    """Whether an :func:`inspect` verdict reports a weaker sandbox than intended."""
    first = verdict.split(maxsplit=1)[0].rstrip(":") if verdict.strip() else ""
    return len(first) >= 2 and first.isupper()


def find_enclave_process(first: int) -> int:
    """The enclave's app process: the deepest descendant of bwrap's ``first`` process."""
    current = first
    for _ in range(8):
        children = _children(current)
        if not children:
            return current
        current = children[-1]
    return current


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        found: list[int] = []
        for task in tasks:
            text = (task / "children").read_text()
            found += [int(c) for c in text.split()]
        return sorted(found)
    except (OSError, ValueError):
        return []


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _interfaces(pid: int) -> str:
    try:
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    except OSError:
        return "UNKNOWN"
    names = sorted(line.split(":")[0].strip() for line in lines if ":" in line)
    if names == ["lo"]:
        return "loopback only (own namespace)"
    return "INTERFACES: " + ",".join(names)


def _proc_view(pid: int) -> str:
    try:
        own = Path(f"/proc/{pid}/root/proc")
        count = sum(1 for entry in own.iterdir() if entry.name.isdigit())
    except OSError:
        return "UNKNOWN"
    host = sum(1 for entry in Path("/proc").iterdir() if entry.name.isdigit())
    if count >= host:
        return f"HOST PROCESSES VISIBLE ({count})"
    return f"private ({count} processes visible)"


def _mounts(pid: int) -> str:
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return "UNKNOWN"
    described = []
    for line in lines:
        fields = line.split()
        point, options = fields[4], fields[5].split(",")
        described.append(f"{point}({'ro' if 'ro' in options else 'rw'})")
    image = [d for d in described if d.startswith(f"{INSIDE_IMAGE}(")]
    if not image or not image[-1].endswith("(ro)"):
        return "IMAGE WRITABLE: " + " ".join(described)
    return " ".join(described)


def _memory_limit(pid: int) -> str:
    try:
        limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
        line = next(line for line in limits if line.startswith("Max address space"))
        soft = line.split()[3]
    except (OSError, StopIteration, IndexError):
        return "UNKNOWN"
    return "UNLIMITED" if soft == "unlimited" else f"{int(soft) >> 20} MiB"
