"""The enclave gateway's cost (issue 11, acceptance 6), in emulation on loopback.

One stack (:mod:`bench.gateway_stack`): the gateway from ``hermetic gateway up`` and 16
backend services (``s00`` .. ``s15``, one instance each, the test backend built under each
name), whose port 5000 also serves clients directly over NX. Measured in one run:

* **latency**: p50 and p99 of one small call (``whoami``) made in turn, one at a time, on
  an attested session straight to ``s00`` (through a ``hermetic proxy`` on TCP, as a client
  reaches a service) and on a session to the gateway (through its proxy on TCP), which
  forwards it to ``s00`` over its XX session and signs a receipt the client checks. The
  two paths alternate in rounds, so load on the shared machine falls on both. Goal: the
  gateway adds at most 1 ms at p50;
* **throughput**: calls per second with 16 in flight on one session, each path for the
  same time in alternating rounds. Goal: through the gateway at least 0.7x direct;
* **set-up time for K = 1, 4, 16 services**: from nothing to one answer from each of K
  services. Through the deputy: one attested session to the gateway, then one call per
  service (one attestation verification). Directly: an attested session to each service
  (K verifications; over vsock from the parent, one hop fewer than a client through a
  proxy, in the direct path's favour), then one call on each. Both with the K sessions or
  calls at once, as a client in a hurry would; median of several tries.
  Goal: flat in K through the deputy, set-up(16) / set-up(1) at most 2x (directly it grows
  with K).

All enclaves run on this machine, so the gateway's own work (two more sessions' crypto, the
receipt's signature) competes with the client and the backend for the same cores; on real
Nitro the gateway has its own vCPUs.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import Goal, print_goals, print_table

SERVICES = [f"s{n:02d}" for n in range(16)]
KS = (1, 4, 16)
ROUNDS = 10
CALLS_PER_ROUND = 100
IN_FLIGHT = 16
RATE_SECONDS = 1.0
SETUP_TRIES = 5
FIRST_CID = 200


def main() -> list[Goal]:
    from bench.gateway_stack import state_dir

    with tempfile.TemporaryDirectory() as tmp, state_dir(Path(tmp) / "state"):
        return _run(Path(tmp))


def _run(work: Path) -> list[Goal]:
    from bench.gateway_stack import boot_backends, gateway_up, make_stack

    stack = make_stack(
        work, SERVICES, limits={"max_concurrency": 256, "max_per_client": 128},
        backend_ports=(5000, 5001),
    )  # fmt: skip
    specs = [
        (name, stack.images[name], stack.backend_config, False, FIRST_CID + n)
        for n, name in enumerate(SERVICES)
    ]
    started = dict(zip(SERVICES, boot_backends(specs), strict=True))
    hints = [f"{name}=vsock://{started[name]['EnclaveCID']}:5001" for name in SERVICES]
    running = gateway_up(stack.gateway, stack.gateway_config, stack.trust, hints)
    proxy: subprocess.Popen[str] | None = None
    try:
        states = {b["state"] for b in running.up["backends"]}
        if states != {"admitted"}:
            raise RuntimeError(f"backends not all admitted: {running.up['backends']}")
        proxy, direct_url = _proxy(started[SERVICES[0]]["EnclaveID"])
        cids = {name: int(started[name]["EnclaveCID"]) for name in SERVICES}
        return asyncio.run(_measure(running.url, direct_url, stack.trust, cids))
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(15)
        running.stop()


def _proxy(enclave_id: str) -> tuple[subprocess.Popen[str], str]:
    """``hermetic proxy`` for one backend's port 5000 on TCP; its client URL."""
    from bench.gateway_stack import printed_json

    process = subprocess.Popen(
        [sys.executable, "-m", "hermetic", "proxy", "--enclave", enclave_id,
         "--port", "5000", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    shown, _ = printed_json(process, "hermetic proxy")
    return process, f"tcp://{shown['tcp']}"


async def _measure(
    gateway_url: str, direct_url: str, trust_file: Path, cids: dict[str, int]
) -> list[Goal]:
    from hermetic.client import ClientTrust, ServicePolicy, connect
    from hermetic.gateway import connect_gateway

    trust = ClientTrust.load(trust_file)
    first = SERVICES[0]
    policy = ServicePolicy(services=frozenset({first}))
    direct = await connect(direct_url, trust=trust, policy=policy, timeout=60)
    gateway = await connect_gateway(gateway_url, trust=trust, timeout=60)
    try:

        async def via_direct(arg: object) -> Any:
            return await direct.call("whoami", arg)

        async def via_gateway(arg: object) -> Any:
            return (await gateway.call(first, "whoami", arg)).result

        paths = {"direct": via_direct, "gateway": via_gateway}
        for call in paths.values():  # both answer, from the same instance
            assert (await call("warm"))["cid"] == cids[first]
        latency: dict[str, list[float]] = {name: [] for name in paths}
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(ROUNDS):
            for name, call in paths.items():
                for i in range(CALLS_PER_ROUND):
                    begun = time.perf_counter()
                    await call(i)
                    latency[name].append(time.perf_counter() - begun)
            for name, call in paths.items():
                rates[name].append(await _rate(call))
        gateway.exchanges.clear()  # the receipts kept for offline checks are not the point
    finally:
        await direct.close()
        await gateway.close()
    setup = {("deputy", k): await _setup_deputy(gateway_url, trust, k) for k in KS}
    setup |= {("direct", k): await _setup_direct(cids, trust, k) for k in KS}

    p = {name: _percentiles(samples) for name, samples in latency.items()}
    rate = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
    print_table(
        ["path", "p50 ms", "p99 ms", "calls/s (16 in flight)"],
        [[name, p[name][0] * 1e3, p[name][1] * 1e3, rate[name]] for name in paths],
    )
    print()
    print_table(
        ["set-up", *(f"K={k} ms" for k in KS)],
        [[way, *(setup[(way, k)] * 1e3 for k in KS)] for way in ("deputy", "direct")],
    )
    goals = [
        Goal("gateway: added p50 latency", (p["gateway"][0] - p["direct"][0]) * 1e3, "<=", 1.0,
             "ms"),
        Goal("gateway: throughput / direct", rate["gateway"] / rate["direct"], ">=", 0.7),
        Goal("deputy: set-up K=16 / K=1", setup[("deputy", 16)] / setup[("deputy", 1)], "<=",
             2.0),
    ]  # fmt: skip
    print_goals(goals)
    return goals


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def _rate(call: Any) -> float:
    """Calls per second with IN_FLIGHT calls in flight on one session for RATE_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RATE_SECONDS
    done = 0

    async def worker() -> None:
        nonlocal done
        while loop.time() < deadline:
            await call(done)
            done += 1

    begun = loop.time()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return done / (loop.time() - begun)


async def _setup_deputy(url: str, trust: Any, k: int) -> float:
    from hermetic.gateway import connect_gateway

    times = []
    for _ in range(SETUP_TRIES):
        begun = time.perf_counter()
        session = await connect_gateway(url, trust=trust, timeout=60)
        try:
            await asyncio.gather(*(session.call(name, "whoami", None) for name in SERVICES[:k]))
            times.append(time.perf_counter() - begun)
            assert session.attestations == 1
        finally:
            await session.close()
    return sorted(times)[len(times) // 2]


async def _setup_direct(cids: dict[str, int], trust: Any, k: int) -> float:
    from hermetic.client import ServicePolicy, connect

    async def reach(name: str) -> Any:
        policy = ServicePolicy(services=frozenset({name}))
        session = await connect(
            f"vsock://{cids[name]}:5000", trust=trust, policy=policy, timeout=60
        )
        await session.call("whoami", None)
        return session

    times = []
    for _ in range(SETUP_TRIES):
        begun = time.perf_counter()
        sessions = await asyncio.gather(*(reach(name) for name in SERVICES[:k]))
        times.append(time.perf_counter() - begun)
        for session in sessions:
            await session.close()
    return sorted(times)[len(times) // 2]
