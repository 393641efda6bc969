"""A hostile enclave app: from inside the sandbox it tries everything a real Nitro enclave
cannot do, and reports each attempt's outcome (it never raises, so the test sees them all).

It also tries to impersonate another release: at import it replaces the runtime's evidence
provider with one that serves the victim's (public) endorsement, taken from
``victim.endorsement.json`` beside it when the test put one there, and that attests with
the victim's NSM when it can reach it (it must not), else with its own.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import signal
import socket
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
