"""Limits a second, attacker's reading of the sandbox tried to break: vsock, memory beyond
the address-space limit, the host's disk through the endpoint directory, CPUs, io_uring,
the host's kernel command line, and a parent led to a host socket by a swapped endpoint.

The app is the hostile app plus tests/apps/hostile/hostile_findings.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from apps.probe.harness import Release, release, run_json, vsock_url, wait_state
from hermetic.client import ServicePolicy, connect
from hermetic.errors import HermeticError
from hermetic.image import build_image
from hermetic.transport import vsock

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("no_leftover_enclaves")]
HOSTILE = Path(__file__).parent / "apps" / "hostile"


@pytest.fixture(scope="module")
def findings(
    tmp_path_factory: pytest.TempPathFactory, operator: ed25519.Ed25519PrivateKey
) -> Release:
    directory = tmp_path_factory.mktemp("findings")
    app = directory / "hostile"
    app.mkdir()
    for name in ("hostile_service.py", "hostile_findings.py"):
        shutil.copy(HOSTILE / name, app / name)
    pem = operator.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (app / "operator.pub.pem").write_bytes(pem)
    (app / "hermetic.toml").write_text(
        'name = "hostile"\nversion = "1.0.0"\nentry = "hostile_findings:app"\n'
        'cpus = 1\nmemory_mib = 512\nports = [5000]\noperator_key = "operator.pub.pem"\n'
    )
    return release(build_image(app, directory / "findings.img"), directory)


def _call(
    hostile: Release,
    started: dict[str, Any],
    method: str,
    arg: object = None,
    *,
    debug: bool = False,
) -> Any:
    async def go() -> Any:
        url = vsock_url(started)
        if debug:  # a debug peer is no logged release: no service name to accept
            policy = ServicePolicy(allow_debug=True)
            session = await connect(url, trust=hostile.trust(), policy=policy, timeout=60)
        else:
            session = await hostile.connect(url, service="hostile")
        async with session:
            return await session.call(method, arg)

    return asyncio.run(go())


def test_enclave_cannot_open_the_hosts_af_vsock(findings: Release) -> None:
    started = findings.run()
    port = 40000 + os.getpid() % 20000
    report = _call(findings, started, "vsock_listen", port)
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as host:
        try:
            host.bind((0xFFFFFFFF, port))
            shared = "host bound the same port: not shared"
        except OSError as exc:
            shared = f"host bind of port {port}: {exc.strerror}"
    assert report.startswith("refused"), f"enclave: {report}; {shared}"


@pytest.mark.skipif(os.geteuid() != 0, reason="memory cgroups need the launcher to be root")
def test_enclave_memory_is_bounded_beyond_its_address_space(findings: Release) -> None:
    # Pages no address space holds (a memfd, SysV segments) are charged to the enclave's
    # memory cgroup: past its memory, the enclave is refused or killed, never the host.
    started = findings.run()
    try:
        report = _call(findings, started, "memory_beyond_limit")
    except (HermeticError, asyncio.CancelledError):  # its own OOM kill ended the session
        assert wait_state(started["EnclaveID"], "TERMINATED").state == "TERMINATED"
        return
    assert str(report["memfd"]).startswith("refused"), report
    assert str(report["sysv"]).startswith("refused"), report


def test_enclave_cannot_fill_the_hosts_disk_through_its_endpoint_dir(findings: Release) -> None:
    started = findings.run()
    report = _call(findings, started, "fill_endpoint_dir")
    assert str(report["write"]).startswith("refused"), report


def test_enclave_cannot_widen_its_cpus(findings: Release) -> None:
    started = findings.run()
    report = _call(findings, started, "widen_cpus")
    described = {d["EnclaveID"]: d for d in run_json("ps", "--json")}[started["EnclaveID"]]
    assert report["after"] == report["before"], (report, described["Sandbox"]["cpus"])


def test_enclave_cannot_set_up_io_uring(findings: Release) -> None:
    started = findings.run()
    report = _call(findings, started, "io_uring")
    assert report.startswith("refused"), report


def test_enclave_does_not_see_the_hosts_kernel_command_line(findings: Release) -> None:
    started = findings.run()
    seen = _call(findings, started, "host_cmdline")
    assert seen != Path("/proc/cmdline").read_text()


def test_swapped_endpoint_never_makes_the_parent_connect_to_a_host_socket(
    findings: Release, tmp_path: Path
) -> None:
    started = findings.run()
    target = tmp_path / "host-service.sock"  # stands for any host socket (docker.sock, ...)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
        host.bind(str(target))
        host.listen(1024)
        host.setblocking(False)
        _call(
            findings, started, "swap_endpoint", {"port": 5001, "target": str(target), "seconds": 30}
        )

        async def attempts() -> tuple[int, dict[str, int]]:
            outcomes: dict[str, int] = {}
            reached = 0
            for _ in range(3000):
                try:
                    stream = await vsock.connect(started["EnclaveCID"], 5001, timeout=5)
                    await stream.aclose()
                    kind = "connected to the enclave's own listener"
                except HermeticError as exc:
                    kind = f"{type(exc).__name__}: {str(exc).split(':')[-1].strip()}"
                outcomes[kind] = outcomes.get(kind, 0) + 1
                try:
                    host.accept()[0].close()
                    reached += 1
                    break
                except BlockingIOError:
                    continue
            return reached, outcomes

        reached, outcomes = asyncio.run(attempts())
    assert reached == 0, f"the parent connected {reached} times to {target}: {outcomes}"
