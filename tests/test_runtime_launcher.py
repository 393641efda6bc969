"""The emulated launcher end to end: real processes, real sandbox, real NSM, real CLI.

Each test runs the probe app (tests/apps/probe), released to a dev log, in an emulated
enclave and asks it, through the attested channel, what it can see and do from inside.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from apps.probe.harness import MARKER, Release, hermetic, run_json, vsock_url, wait_state
from helpers import state_files
from hermetic.attestation.codec import decode
from hermetic.launcher import records
from hermetic.nsm.pki import pki_dir

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftover_enclaves")]


def test_run_then_ps_shows_running_with_measurements_and_document_verifies(
    probe: Release, tmp_path: Path
) -> None:
    started = probe.run()
    assert started["State"] == "RUNNING"
    listed = {d["EnclaveID"]: d for d in run_json("ps", "--json")}
    mine = listed[started["EnclaveID"]]
    assert mine["State"] == "RUNNING"
    assert mine["Flags"] == "NONE"
    assert mine["Measurements"]["PCR0"] == probe.image.measurements.pcr0.hex()
    assert mine["Measurements"]["PCR2"] == probe.image.measurements.pcr2.hex()

    document = asyncio.run(probe.call(vsock_url(started), "attest", b"probe-nonce"))
    assert isinstance(document, bytes)
    path = tmp_path / "doc.cbor"
    path.write_bytes(document)
    pcr0 = probe.image.measurements.pcr0.hex()
    verified = hermetic("attestation", "verify", str(path), "--root", "dev", "--pcr", f"0={pcr0}")
    assert verified.returncode == 0, verified.stderr
    wrong = hermetic("attestation", "verify", str(path), "--root", "dev", "--pcr", f"0={'00' * 48}")
    assert wrong.returncode == 1
    _, payload = decode(document)
    assert payload.module_id == started["EnclaveID"]
    assert payload.nonce == b"probe-nonce"

    assert asyncio.run(probe.call(vsock_url(started), "extend_pcr", 0)) == "ReadOnlyIndex"
    assert asyncio.run(probe.call(vsock_url(started), "extend_pcr", 16)) == "extended"


def test_sandbox_blocks_host_network_environment_image_writes_and_console(
    probe: Release,
) -> None:
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen()
    port = host.getsockname()[1]
    try:
        started = probe.run()
        report = asyncio.run(probe.call(vsock_url(started), "isolation", port))
        # The enclave's 127.0.0.1 is its own namespace's loopback: nothing reached ours.
        host.setblocking(False)
        with pytest.raises(BlockingIOError):
            host.accept()
    finally:
        host.close()
    assert isinstance(report, dict)
    assert report["tcp"].startswith(
        ("ConnectionRefusedError: Connection refused", "OSError: Network is unreachable")
    ), report["tcp"]
    # execve gave exactly the four documented variables; the only other one the app sees
    # is LC_CTYPE, which the interpreter itself adds in the C locale (PEP 538 coercion).
    assert report["initial_environment"] == [
        "HERMETIC_NSM_SOCKET",
        "HERMETIC_VSOCK",
        "HERMETIC_VSOCK_CID",
        "HERMETIC_VSOCK_DIR",
    ]
    assert set(report["environment"]) - set(report["initial_environment"]) <= {"LC_CTYPE"}
    assert "Read-only file system" in report["write_image"]
    record = records.load(started["EnclaveID"])
    assert record.sandbox["net_namespace"] == "own"
    assert record.sandbox["network"].startswith("loopback only (own namespace)")
    assert "/enclave(ro)" in record.sandbox["root_filesystem"].split()
    assert record.sandbox["launcher_state"] == "not visible"
    # The launcher's state (the dev PKI's signing keys, other enclaves) is not in the
    # enclave's file system at all: its root holds the image, the runtime and its endpoints.
    state_dir = os.environ["HERMETIC_STATE_DIR"]
    assert pki_dir().is_dir()
    for path in (state_dir, str(pki_dir()), f"{state_dir}/enclaves"):
        listed = asyncio.run(probe.call(vsock_url(started), "listdir", path))
        assert listed == "FileNotFoundError: No such file or directory", path
    # Nothing the app printed reached the host: no file in the state dir holds it.
    state = Path(os.environ["HERMETIC_STATE_DIR"])
    for path, data in state_files(state):
        assert MARKER.encode() not in data, path
    assert hermetic("console", started["EnclaveID"], "--no-follow").returncode == 1


def test_debug_enclave_console_shows_app_output(probe: Release) -> None:
    started = probe.run("--debug")
    assert started["Flags"] == "DEBUG_MODE"
    report = asyncio.run(probe.call(vsock_url(started), "isolation", 9, debug=True))
    assert isinstance(report, dict)
    console = hermetic("console", started["EnclaveID"], "--no-follow")
    assert console.returncode == 0
    assert f"{MARKER} stdout at import" in console.stdout
    assert f"{MARKER} stderr from a method" in console.stdout


def test_killed_enclave_shows_terminated_and_can_be_run_again(probe: Release) -> None:
    started = probe.run()
    record = records.load(started["EnclaveID"])
    assert record.pid is not None
    os.kill(record.pid, signal.SIGKILL)
    assert wait_state(record.id, "TERMINATED").state == "TERMINATED"
    listed = {d["EnclaveID"]: d for d in run_json("ps", "--json")}
    assert listed[record.id]["State"] == "TERMINATED"
    assert "exited" in listed[record.id]["Reason"] or "gone" in listed[record.id]["Reason"]

    # Run again without --endorsement: the one the enclave ran with is reused.
    again = run_json("run", str(probe.image.path))
    assert again["State"] == "RUNNING"
    assert again["EnclaveCID"] == started["EnclaveCID"]  # the CID was freed
    assert asyncio.run(probe.call(vsock_url(again), "echo", "back")) == "back"


def test_stop_terminates_and_frees_resources(probe: Release) -> None:
    started = probe.run()
    stopped = run_json("stop", started["EnclaveID"])
    assert stopped == {
        "EnclaveName": "probe",
        "EnclaveID": started["EnclaveID"],
        "Terminated": True,
    }
    record = records.load(started["EnclaveID"])
    assert record.state == "TERMINATED"
    assert record.pid is not None
    assert not records.alive(record.pid, record.pid_start)
    assert not (Path(os.environ["HERMETIC_STATE_DIR"]) / "enclaves" / record.id).exists()


def test_stop_of_unknown_enclave_is_a_clean_error() -> None:
    done = hermetic("stop", "i-00000000000000000-enc0000000000000000")
    assert done.returncode == 1
    assert "no such enclave" in done.stderr
    assert "Traceback" not in done.stderr


def test_killed_supervisor_takes_its_enclave_down_and_ps_says_so(probe: Release) -> None:
    started = probe.run()
    record = records.load(started["EnclaveID"])
    assert record.supervisor_pid is not None
    assert record.pid is not None
    os.kill(record.supervisor_pid, signal.SIGKILL)
    assert wait_state(record.id, "TERMINATED").state == "TERMINATED"
    deadline = time.monotonic() + 60
    while records.alive(record.pid, record.pid_start) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not records.alive(record.pid, record.pid_start)


def test_bad_run_requests_fail_cleanly_and_leave_nothing_behind(
    probe: Release, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"not an image")
    state = Path(os.environ["HERMETIC_STATE_DIR"]) / "enclaves"
    for args, code in (([str(junk)], 2), ([str(probe.image.path), "--cpus", "0"], 2)):
        done = hermetic("run", *args)
        assert done.returncode == code, done.stderr
        assert "Traceback" not in done.stderr
        assert not [p for p in state.glob("*") if not p.name.startswith(".")]
    first = probe.run("--cid", "40")
    assert first["EnclaveCID"] == 40
    clash = hermetic("run", str(probe.image.path), "--cid", "40")
    assert clash.returncode == 1
    assert "cid: 40 is used by a running enclave" in clash.stderr


def test_enclave_is_pinned_to_the_requested_cpus(probe: Release) -> None:
    started = probe.run("--cpus", "1")
    record = records.load(started["EnclaveID"])
    assert len(started["CPUIDs"]) == 1
    assert record.sandbox["cpus"] == str(started["CPUIDs"][0])


def test_enclave_address_space_is_limited_to_its_memory(probe: Release) -> None:
    started = probe.run("--memory", "768")
    assert started["MemoryMiB"] == 768
    memory = records.load(started["EnclaveID"]).sandbox["memory"]
    assert memory.startswith("768 MiB"), memory
    assert memory.endswith("address space 768 MiB"), memory
