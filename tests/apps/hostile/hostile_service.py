"""A hostile enclave app: from inside the sandbox it tries everything a real Nitro enclave
cannot do, and reports each attempt's outcome (it never raises, so the test sees them all).

It also tries to impersonate another release: at import it replaces the runtime's evidence
provider with one that serves the victim's (public) endorsement, taken from
``victim.endorsement.json`` beside it when the test put one there, and that attests with
the victim's NSM when it can reach it (it must not), else with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

from hermetic.enclave import App, boot, runtime
from hermetic.errors import HermeticError
from hermetic.nsm.client import NSMClient
from hermetic.nsm.server import SocketBackend
from hermetic.transport import vsock
from hermetic.transport.frames import read_frame

app = App()
HERE = Path(__file__).parent
VICTIM_ENDORSEMENT = HERE / "victim.endorsement.json"
LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
PTRACE_ATTACH = 16


def outcome(action: Any) -> str:
    """``SUCCEEDED ...`` or ``refused: <errno name or error type>: detail``."""
    try:
        result = action()
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        return f"refused: {name}: {exc.strerror or exc}"
    except HermeticError as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    except Exception as exc:  # a hostile probe reports everything
        return f"refused: {type(exc).__name__}: {exc}"
    return f"SUCCEEDED {result!r}"[:300]


def libc_call(name: str, *args: object) -> int:
    result = int(getattr(LIBC, name)(*args))
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def nsm_describe(path: str) -> str:
    client = NSMClient(SocketBackend(path))
    try:
        return repr(client.describe_nsm())
    finally:
        client.close()


async def ask_boot_frames(claimed_cid: int) -> str:
    """On this enclave's own config endpoint, claim ``claimed_cid``: is any frame served?"""
    me = vsock.local_cid()
    path = vsock.socket_path(
        Path(os.environ["HERMETIC_VSOCK_DIR"]),
        vsock.VsockAddress(vsock.PARENT_CID, boot.CONFIG_PORT),
        me,
    )
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except OSError as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    writer.write(claimed_cid.to_bytes(4, "big"))
    try:
        frame = await asyncio.wait_for(read_frame(reader), 10)
    except (HermeticError, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    finally:
        writer.close()
    if frame is None:
        return "refused: closed without a frame"
    return f"SUCCEEDED got a {len(frame)}-byte frame"


async def ask_other_endpoint(cid: int, port: int) -> str:
    try:
        stream = await vsock.connect(cid, port, timeout=5)
    except HermeticError as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    await stream.aclose()
    return "SUCCEEDED connected"


def run_setuid_mount() -> str:
    target = Path("/tmp/hostile-mount")
    target.mkdir(exist_ok=True)
    done = subprocess.run(
        ["/usr/bin/mount", "-t", "tmpfs", "none", str(target)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode == 0:
        return "SUCCEEDED mounted through set-uid mount"
    return f"refused: exit {done.returncode}: {done.stderr.strip().splitlines()[0]}"


def own_status() -> dict[str, str]:
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


@app.method("attack")
async def attack(targets: dict[str, Any]) -> dict[str, object]:
    """Try each attack against ``targets`` (what the test tells about the host)."""
    other = int(targets["other_cid"])
    me = vsock.local_cid()
    state = str(targets["state_dir"])
    host_vsock = str(targets["host_vsock_root"])
    supervisor = int(targets["supervisor_pid"])
    root = os.environ["HERMETIC_VSOCK_DIR"]
    report: dict[str, object] = {}

    # Another enclave's NSM and endpoints, by every path an app could try.
    for label, path in (
        ("other_nsm_view", f"{root}/{other}/host/nsm.sock"),
        ("other_nsm_host_path", f"{host_vsock}/{other}/host/nsm.sock"),
        ("other_nsm_proc_root", f"/proc/{supervisor}/root{host_vsock}/{other}/host/nsm.sock"),
    ):
        report[label] = outcome(lambda path=path: nsm_describe(path))
    report["other_service_port"] = await ask_other_endpoint(other, int(targets["other_port"]))
    report["other_config_port"] = outcome(
        lambda: os.listdir(f"{root}/{other}")  # the directory is not even there
    )
    # Another enclave's boot frames by claiming its CID on our own config socket, then
    # our own boot frames a second time (served once, at boot).
    report["boot_frames_claiming_other_cid"] = await ask_boot_frames(other)
    report["boot_frames_again"] = await ask_boot_frames(me)

    # The launcher's state: keys, logs, other enclaves' records, by any path.
    paths = {
        "state_dir": state,
        "state_pki": f"{state}/pki",
        "state_enclaves": f"{state}/enclaves",
        "state_via_proc_supervisor_root": f"/proc/{supervisor}/root{state}",
        "state_via_proc_1_root": f"/proc/1/root{state}",
        "proc_1_root": "/proc/1/root/",
        "host_vsock_root": host_vsock,
    }
    for label, path in paths.items():
        report[f"read_{label}"] = outcome(lambda path=path: os.listdir(path))
    report["visible_processes"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())

    # Mounts and namespaces.
    report["mount_tmpfs"] = outcome(
        lambda: libc_call("mount", b"tmpfs", b"/tmp", b"tmpfs", 0, None)
    )
    report["umount_image"] = outcome(lambda: libc_call("umount2", b"/enclave", 2))
    report["unshare_user"] = outcome(lambda: libc_call("unshare", CLONE_NEWUSER))
    report["unshare_net"] = outcome(lambda: libc_call("unshare", CLONE_NEWNET))
    report["unshare_mount"] = outcome(lambda: libc_call("unshare", CLONE_NEWNS))

    def setns_into(path: str) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            return libc_call("setns", fd, 0)
        finally:
            os.close(fd)

    report["setns_pid1_net"] = outcome(lambda: setns_into("/proc/1/ns/net"))
    report["setns_own_net"] = outcome(lambda: setns_into("/proc/self/ns/net"))

    # The host network.
    def tcp() -> str:
        with socket.create_connection(("127.0.0.1", int(targets["host_port"])), timeout=5):
            return "connected"

    report["tcp_host_loopback"] = outcome(tcp)

    # Processes outside the enclave: the supervisor (not even addressable) and pid 1 (the
    # sandbox's root-owned init, the only process here not ours).
    report["signal_supervisor"] = outcome(lambda: os.kill(supervisor, 0))
    report["signal_pid1"] = outcome(lambda: os.kill(1, signal.SIGTERM))
    report["ptrace_pid1"] = outcome(lambda: libc_call("ptrace", PTRACE_ATTACH, 1, None, None))

    # Privileges through a set-uid binary.
    try:
        report["setuid_mount"] = run_setuid_mount()
    except (OSError, subprocess.SubprocessError) as exc:
        report["setuid_mount"] = f"refused: {type(exc).__name__}: {exc}"
    status = own_status()
    report["status"] = {k: status[k] for k in ("Uid", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp")}
    report["usr_nosuid"] = bool(os.statvfs("/usr/bin/mount").f_flag & os.ST_NOSUID)

    # Our own parent-side endpoints are read-only (no squatting a parent port).
    report["write_host_dir"] = outcome(lambda: Path(f"{root}/{me}/host/planted").write_text("x"))
    # Plant a symlink where the parent looks for our port 5001: it must not follow it.
    planted = Path(f"{root}/{me}/enclave/5001.sock")
    report["plant_symlink"] = outcome(
        lambda: planted.symlink_to(f"{host_vsock}/{other}/host/nsm.sock")
    )
    return report


def _impersonate() -> None:
    """Serve the victim's endorsement; attest with the victim's NSM if it can be reached."""
    if not VICTIM_ENDORSEMENT.exists():
        return
    victim_text = VICTIM_ENDORSEMENT.read_text()
    from hermetic.translog.release import Endorsement

    victim = Endorsement.loads(victim_text)
    original = runtime.make_evidence_provider

    def provider(nsm: Any, endorsement: Any, digest: Any) -> Any:
        root = os.environ["HERMETIC_VSOCK_DIR"]
        for cid in range(16, 32):
            path = f"{root}/{cid}/host/nsm.sock"
            if cid != vsock.local_cid() and os.path.exists(path):
                try:
                    nsm = NSMClient(SocketBackend(path))
                    nsm.describe_nsm()
                    break
                except (HermeticError, OSError):
                    continue
        return original(nsm, victim, digest)

    runtime.make_evidence_provider = provider  # type: ignore[assignment]


_impersonate()


# --- Probes beyond "attack": each reports outcomes, the tests decide what must hold. -----

MIB = 1 << 20
X32_SYSCALL_BIT = 0x40000000
I386_GETPID, I386_UNSHARE = 20, 310
X86_64_GETPID, X86_64_UNSHARE, X86_64_IO_URING_SETUP = 39, 272, 425
LIBC.syscall.restype = ctypes.c_long
LIBC.shmat.restype = ctypes.c_void_p


def in_child(action: Any) -> str:
    """Run ``action`` in a forked child: ``killed by SIG...`` or ``returned ...``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            os.write(write, repr(action()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"returned {said}"


def int80(number: int, ebx: int = 0) -> int:
    """A 32-bit (i386 ABI) system call through ``int 0x80``, from executable memory."""
    import mmap

    code = (
        b"\x53"  # push rbx
        + b"\xb8" + number.to_bytes(4, "little")  # mov eax, number
        + b"\xbb" + ebx.to_bytes(4, "little")  # mov ebx, arg
        + b"\xcd\x80"  # int 0x80
        + b"\x5b\xc3"  # pop rbx; ret
    )  # fmt: skip
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    function = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    return int(function())


def raw_syscall(number: int, *args: int) -> str:
    result = LIBC.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    if result < 0:
        return f"refused: {errno.errorcode.get(ctypes.get_errno(), '?')}"
    return f"SUCCEEDED {result}"


@app.method("other_abis")
async def other_abis(_: object = None) -> dict[str, str]:
    """System calls through the i386 (int 0x80) and x32 ABIs, which a filter for x86_64
    numbers alone would let through; and the same calls natively, as a control."""
    return {
        "i386_getpid": in_child(lambda: int80(I386_GETPID)),
        "i386_unshare_user": in_child(lambda: int80(I386_UNSHARE, CLONE_NEWUSER)),
        "x32_getpid": in_child(lambda: raw_syscall(X32_SYSCALL_BIT | X86_64_GETPID)),
        "x32_unshare_user": in_child(
            lambda: raw_syscall(X32_SYSCALL_BIT | X86_64_UNSHARE, CLONE_NEWUSER)
        ),
        "native_getpid": in_child(lambda: raw_syscall(X86_64_GETPID)),
        "native_unshare_user": in_child(lambda: raw_syscall(X86_64_UNSHARE, CLONE_NEWUSER)),
    }


@app.method("inherited")
async def inherited(_: object = None) -> dict[str, object]:
    """What the process got from the launcher: its initial environment and open files."""
    environ = Path("/proc/self/environ").read_bytes().split(b"\0")
    fds: dict[str, str] = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return {
        "environ": sorted(e.decode() for e in environ if e),
        "fds": fds,
        "dev": sorted(os.listdir("/dev")),
        "sys": outcome(lambda: os.listdir("/sys")),
    }


def write_until(path: str, total: int) -> str:
    """Write ``total`` bytes to a new file ``path``: ``SUCCEEDED`` or where it stopped."""
    chunk = b"\1" * MIB
    done = 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return f"refused: {errno.errorcode.get(exc.errno or 0, '?')} (open)"
    try:
        while done < total:
            done += os.write(fd, chunk)
    except OSError as exc:
        return f"refused: {errno.errorcode.get(exc.errno or 0, '?')} after {done >> 20} MiB"
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
    return f"SUCCEEDED {done >> 20} MiB"


def address_space_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_AS)[0]


@app.method("tmp_quota")
async def tmp_quota(_: object = None) -> dict[str, object]:
    """``/tmp`` is a tmpfs of at most half the enclave's memory: twice that must not fit."""
    limit = address_space_limit()
    return {"limit_mib": limit >> 20, "tmp": write_until("/tmp/hostile-fill", 2 * limit)}


@app.method("fork_limit")
async def fork_limit(count: int) -> str:
    """Fork ``count`` sleeping children: how many the sandbox allows before refusing."""
    children: list[int] = []
    refusal = "none"
    for _ in range(count):
        try:
            pid = os.fork()
        except OSError as exc:
            refusal = errno.errorcode.get(exc.errno or 0, "?")
            break
        if pid == 0:  # pragma: no cover - the child
            signal.pause()
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
    return f"{len(children)} forked, then {refusal}"


@app.method("daemonize")
async def daemonize(_: object = None) -> int:
    """Leave a process behind: a double-forked session leader that ignores every catchable
    signal. Returns its pid as the enclave sees it."""
    read, write = os.pipe()
    if os.fork() == 0:  # pragma: no cover - the children
        os.setsid()
        if os.fork() == 0:
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_IGN)
            os.write(write, str(os.getpid()).encode())
            os.close(write)
            while True:
                signal.pause()
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        return int(pipe.read())


@app.method("abstract_socket")
async def abstract_socket(name: str) -> str:
    """Connect to a host process's abstract Unix socket (not a file: no mount hides it)."""

    def attempt() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(b"\0" + name.encode())
        return "connected"

    return outcome(attempt)


@app.method("kernel_knobs")
async def kernel_knobs(_: object = None) -> dict[str, str]:
    """Host-wide kernel settings through /proc/sys (the network namespace's own included)."""
    report = {}
    for path in (
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/vm/drop_caches",
        "/proc/sys/kernel/hostname",
        "/proc/sys/net/ipv4/ip_forward",
    ):
        report[path] = outcome(lambda path=path: Path(path).write_text("0\n"))
    report["mknod_null"] = outcome(
        lambda: os.mknod("/tmp/hostile-null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    )
    return report
