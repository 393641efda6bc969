"""A hostile app in the emulated enclave: everything a real Nitro enclave cannot do is refused.

The app (tests/apps/hostile) is run by ``hermetic run`` in the real sandbox beside a victim
enclave (the probe app), and reports, from inside, the outcome of each attempt. Each test
asserts the refusal itself (the errno or the endpoint's answer), not only that nothing
worked.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from apps.probe.harness import Release, hermetic, release, run_json, vsock_url
from hermetic.client import ServicePolicy, connect
from hermetic.errors import ReleasePCRMismatchError
from hermetic.image import build_image
from hermetic.image.build import BuildResult
from hermetic.launcher import records, sandbox
from hermetic.paths import state_dir
from hermetic.transport import vsock

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_leftover_enclaves")]
HOSTILE = Path(__file__).parent / "apps" / "hostile" / "hostile_service.py"


def build_hostile(
    workdir: Path, operator: ed25519.Ed25519PrivateKey, victim_endorsement: Path | None = None
) -> BuildResult:
    app = workdir / "hostile"
    app.mkdir(parents=True)
    shutil.copy(HOSTILE, app / "hostile_service.py")
    if victim_endorsement is not None:
        shutil.copy(victim_endorsement, app / "victim.endorsement.json")
    pem = operator.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (app / "operator.pub.pem").write_bytes(pem)
    (app / "hermetic.toml").write_text(
        'name = "hostile"\nversion = "1.0.0"\nentry = "hostile_service:app"\n'
        'cpus = 1\nmemory_mib = 512\nports = [5000]\noperator_key = "operator.pub.pem"\n'
    )
    return build_image(app, workdir / "hostile.img")


@pytest.fixture(scope="module")
def hostile(
    tmp_path_factory: pytest.TempPathFactory, operator: ed25519.Ed25519PrivateKey
) -> Release:
    directory = tmp_path_factory.mktemp("hostile")
    return release(build_hostile(directory, operator), directory)


async def call_hostile(hostile: Release, url: str, targets: dict[str, Any]) -> Any:
    async with await hostile.connect(url, service="hostile") as session:
        return await session.call("attack", targets)


def _refused(report: dict[str, Any], key: str, *expected: str) -> None:
    value = report[key]
    assert isinstance(value, str), (key, value)
    assert value.startswith("refused"), f"{key}: {value}"
    assert any(e in value for e in expected), f"{key}: {value}"


def test_hostile_enclave_is_refused_everything_a_nitro_enclave_cannot_do(
    probe: Release, hostile: Release
) -> None:
    victim = probe.run()
    attacker = hostile.run()
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen()
    record = records.load(attacker["EnclaveID"])
    targets = {
        "other_cid": victim["EnclaveCID"],
        "other_port": 5000,
        "state_dir": str(state_dir()),
        "host_vsock_root": str(vsock.emulation_root()),
        "supervisor_pid": record.supervisor_pid,
        "host_port": host.getsockname()[1],
    }
    try:
        report = asyncio.run(call_hostile(hostile, vsock_url(attacker), targets))
        host.setblocking(False)
        with pytest.raises(BlockingIOError):
            host.accept()  # nothing reached the host's loopback
    finally:
        host.close()
    assert isinstance(report, dict)

    # Another enclave's NSM and endpoints: not even there, by any path.
    for key in ("other_nsm_view", "other_nsm_host_path", "other_nsm_proc_root"):
        _refused(report, key, "No such file", "NSMUnavailable")
    _refused(report, "other_service_port", "PeerUnavailableError")
    _refused(report, "other_config_port", "ENOENT")
    # Boot frames: not for a claimed CID, and not a second time for its own.
    _refused(report, "boot_frames_claiming_other_cid", "closed without a frame")
    _refused(report, "boot_frames_again", "closed without a frame")
    # The launcher's state (dev PKI keys, logs, records), by any path.
    for key in [k for k in report if k.startswith("read_")]:
        _refused(report, key, "ENOENT", "EACCES")
    assert max(report["visible_processes"]) < 64, report["visible_processes"]
    assert record.supervisor_pid not in report["visible_processes"]
    # Mounts, namespaces, the host network, other processes.
    for key in ("mount_tmpfs", "umount_image", "unshare_user", "unshare_net", "unshare_mount"):
        _refused(report, key, "EPERM")
    _refused(report, "setns_pid1_net", "EPERM", "EACCES")
    _refused(report, "setns_own_net", "EPERM")
    _refused(report, "tcp_host_loopback", "ECONNREFUSED", "ENETUNREACH")
    _refused(report, "signal_supervisor", "ESRCH")
    _refused(report, "signal_pid1", "EPERM")
    _refused(report, "ptrace_pid1", "EPERM")
    # A set-uid binary gives nothing: mount runs, but as the enclave's own user.
    _refused(report, "setuid_mount", "must be superuser")
    status = report["status"]
    assert status["NoNewPrivs"] == "1"
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapBnd"], 16) == 0
    assert status["Seccomp"] == "2"
    assert status["Uid"].split()[0] != "0"
    assert report["usr_nosuid"] is True
    # Its parent-side endpoints are read-only; a symlink it plants leads the parent nowhere.
    _refused(report, "write_host_dir", "EROFS", "EACCES")
    # Landlock: the endpoint directory takes sockets only (the parent would not follow a
    # symlink anyway: tests/test_transport_vsock.py and test_runtime_hostile_limits.py).
    _refused(report, "plant_symlink", "EACCES")

    # ps --json reports the sandbox as measured from the host.
    described = {d["EnclaveID"]: d for d in run_json("ps", "--json")}[attacker["EnclaveID"]]
    sandbox = described["Sandbox"]
    assert sandbox["mode"] == "bubblewrap"
    for kind in ("user", "pid", "mnt", "net", "ipc", "uts"):
        assert sandbox[f"{kind}_namespace"] == "own", kind
    assert sandbox["capabilities"] == "none"
    assert sandbox["no_new_privs"] == "yes"
    assert sandbox["seccomp"] == "filter"
    assert sandbox["launcher_state"] == "not visible"
    assert sandbox["proc"].startswith("private")
    if os.geteuid() == 0:
        assert sandbox["uid"].endswith("(unprivileged)")


def test_client_rejects_a_hostile_enclave_serving_another_releases_endorsement(
    probe: Release, operator: ed25519.Ed25519PrivateKey, tmp_path: Path
) -> None:
    probe.run()  # the victim is running too: its NSM is what the impostor would want
    impostor = build_hostile(tmp_path, operator, victim_endorsement=probe.endorsement)
    started = run_json("run", str(impostor.path))

    async def attempt() -> None:
        policy = ServicePolicy(services=frozenset({"probe"}))
        await connect(vsock_url(started), trust=probe.trust(), policy=policy, timeout=60)

    with pytest.raises(ReleasePCRMismatchError):
        asyncio.run(attempt())


def test_run_refuses_in_one_line_when_the_sandbox_cannot_be_built(probe: Release) -> None:
    done = hermetic("run", probe.image.path, env={"PATH": "/nonexistent"})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "SandboxUnavailableError" in lines[0]
    assert "bubblewrap (bwrap) is not installed" in lines[0]
    assert "--no-sandbox" in lines[0]
    assert run_json("ps", "--json", "--all") == []  # nothing was started


def test_no_sandbox_warns_on_every_start_and_shows_in_ps(probe: Release) -> None:
    for _ in range(2):
        done = hermetic("run", probe.image.path, "--endorsement", probe.endorsement, "--no-sandbox")
        assert done.returncode == 0, done.stderr
        assert "WARNING: --no-sandbox" in done.stderr
        started = json.loads(done.stdout)
        assert started["Sandbox"]["mode"] == "NONE (--no-sandbox)"
        assert started["Sandbox"]["pid_namespace"] == "SHARED WITH HOST"
        described = {d["EnclaveID"]: d for d in run_json("ps", "--json")}
        assert described[started["EnclaveID"]]["Sandbox"]["mode"] == "NONE (--no-sandbox)"
        hermetic("stop", started["EnclaveID"], check=True)


# --- Further probes: what holds, each tried from inside by the hostile app ------------------


def _enclave_processes(pid_namespace: str) -> list[int]:
    """Host pids of every process in the PID namespace ``pid_namespace``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "pid") == pid_namespace:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _wait_gone(pid_namespace: str, deadline: float = 60) -> list[int]:
    end = time.monotonic() + deadline
    while (left := _enclave_processes(pid_namespace)) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def _call(hostile: Release, started: dict[str, Any], method: str, arg: object = None) -> Any:
    async def go() -> Any:
        async with await hostile.connect(vsock_url(started), service="hostile") as session:
            return await session.call(method, arg)

    return asyncio.run(go())


def test_filter_kills_system_calls_through_the_i386_and_x32_abis(hostile: Release) -> None:
    started = hostile.run()
    report = _call(hostile, started, "other_abis")
    # A filter matching only x86_64 numbers would let int 0x80 (i386 numbering) and the
    # x32 bit through; libseccomp's architecture check kills the caller instead.
    for key in ("i386_getpid", "i386_unshare_user", "x32_getpid", "x32_unshare_user"):
        assert report[key] == "killed by SIGSYS", (key, report[key])
    assert report["native_getpid"].startswith("returned 'SUCCEEDED")  # the control
    assert report["native_unshare_user"] == "returned 'refused: EPERM'"


def test_enclave_inherits_only_its_four_variables_and_no_launcher_file(hostile: Release) -> None:
    started = hostile.run()
    report = _call(hostile, started, "inherited")
    cid = started["EnclaveCID"]
    assert report["environ"] == sorted(
        [
            f"HERMETIC_NSM_SOCKET=/run/hermetic/vsock/{cid}/host/nsm.sock",
            "HERMETIC_VSOCK=emulated",
            "HERMETIC_VSOCK_DIR=/run/hermetic/vsock",
            f"HERMETIC_VSOCK_CID={cid}",
        ]
    )
    # The runtime's own sockets and epoll, and /dev/null: no seccomp memfd, info pipe or file.
    for fd, target in report["fds"].items():
        assert target == "/dev/null" or target.startswith(("socket:", "anon_inode:")), (fd, target)
    minimal_dev = "core fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"
    assert report["dev"] == sorted(minimal_dev.split())
    assert report["sys"].startswith("refused: ENOENT"), report["sys"]


def test_tmp_holds_at_most_half_the_enclave_memory(hostile: Release) -> None:
    started = hostile.run()
    report = _call(hostile, started, "tmp_quota")
    assert report["tmp"] == f"refused: ENOSPC after {report['limit_mib'] // 2} MiB", report


@pytest.mark.skipif(
    os.geteuid() != 0, reason="RLIMIT_NPROC is set when the enclave has its own uid"
)
def test_fork_bomb_stops_at_the_process_limit(hostile: Release) -> None:
    # Memory enough for the children's own pages: the process limit must be what stops it.
    started = hostile.run("--memory", "4096")
    report = _call(hostile, started, "fork_limit", sandbox.MAX_PROCESSES + 50)
    forked, _, refusal = report.partition(" forked, then ")
    assert refusal == "EAGAIN", report
    assert int(forked) < sandbox.MAX_PROCESSES, report


@pytest.mark.skipif(os.geteuid() != 0, reason="a non-root launcher runs enclaves as itself")
def test_same_cid_from_two_state_directories_never_shares_a_sandbox_uid(
    hostile: Release, tmp_path: Path
) -> None:
    """CIDs are per state directory, uids host-wide: a second launcher's enclave with the
    same CID gets another uid, so it can neither exhaust this one's process limit nor own
    its files."""
    first = hostile.run()
    other = {"HERMETIC_STATE_DIR": str(tmp_path / "other-state")}
    done = hermetic(
        "run", hostile.image.path, "--endorsement", hostile.endorsement, env=other, check=True
    )
    second = json.loads(done.stdout)
    try:

        def uid_of(enclave: dict[str, Any], env: dict[str, str] | None = None) -> str:
            listed = json.loads(hermetic("ps", "--json", env=env, check=True).stdout)
            described = {d["EnclaveID"]: d for d in listed}[enclave["EnclaveID"]]
            return str(described["Sandbox"]["uid"])

        assert second["EnclaveCID"] == first["EnclaveCID"]
        assert uid_of(first).endswith("(unprivileged)")
        assert uid_of(second, other).endswith("(unprivileged)")
        assert uid_of(first) != uid_of(second, other)
    finally:
        hermetic("stop", second["EnclaveID"], env=other, check=True)


def test_host_abstract_unix_socket_is_out_of_reach(hostile: Release) -> None:
    started = hostile.run()
    name = f"hermetic-hostile-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
        host.bind(b"\0" + name.encode())
        host.listen()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
            control.connect(b"\0" + name.encode())  # it is there, for the host
        host.accept()[0].close()
        report = _call(hostile, started, "abstract_socket", name)
        host.setblocking(False)
        with pytest.raises(BlockingIOError):
            host.accept()  # nothing from the enclave reached it
    _refused({"abstract": report}, "abstract", "ECONNREFUSED")


def test_kernel_settings_and_device_nodes_are_refused(hostile: Release) -> None:
    started = hostile.run()
    report = _call(hostile, started, "kernel_knobs")
    for path in [k for k in report if k.startswith("/proc/sys/")]:
        _refused(report, path, "EACCES", "EROFS")
    _refused(report, "mknod_null", "EPERM")


def test_stop_leaves_no_enclave_process_behind(hostile: Release) -> None:
    started = hostile.run()
    daemon = _call(hostile, started, "daemonize")
    assert isinstance(daemon, int)
    identity = vsock.load_identity(vsock.emulation_root(), started["EnclaveCID"])
    assert identity is not None
    before = _enclave_processes(identity.pid_namespace)
    assert len(before) >= 3, before  # bwrap's init, the app, the daemon (at least)
    hermetic("stop", started["EnclaveID"], check=True)
    assert _wait_gone(identity.pid_namespace) == []


def test_killed_supervisor_takes_its_enclave_with_it(hostile: Release) -> None:
    started = hostile.run()
    _call(hostile, started, "daemonize")
    identity = vsock.load_identity(vsock.emulation_root(), started["EnclaveCID"])
    assert identity is not None
    assert _enclave_processes(identity.pid_namespace)
    supervisor = records.load(started["EnclaveID"]).supervisor_pid
    assert supervisor is not None
    os.kill(supervisor, signal.SIGKILL)
    assert _wait_gone(identity.pid_namespace) == []


def test_every_denied_system_call_is_known_to_libseccomp_here() -> None:
    # seccomp_program() skips a name libseccomp does not know (absent on this architecture):
    # a misspelled name would silently leave that call allowed.
    import pyseccomp

    unknown = [n for n in sandbox.DENIED_SYSCALLS if pyseccomp.resolve_syscall(0, n) < 0]
    assert unknown == []
