"""Where the CPU of one gateway call goes, per process (issue 11, acceptance 6 evidence).

In emulation every part of the gateway path (client, the gateway's proxy and backend
dialer, the gateway enclave, the backend enclave) shares the machine's cores, so the
throughput through the gateway is bounded by the CPU all of them spend per call. Wall-clock
rates move with whatever else runs on a shared machine; CPU time per call does not (much).

This boots the benchmark's stack (:mod:`bench.gateway_stack`: the gateway from ``hermetic
gateway up`` and backend services, ``s00`` also served directly through a ``hermetic
proxy``), then drives ``--calls`` calls with ``--in-flight`` in flight on one session
through each path, and reads each process's ``utime + stime`` (``/proc/PID/stat``, all its
threads; the client is this process, ``resource.getrusage``) before and after. Printed:
CPU microseconds per call per process, for the direct path and the gateway path.

    .venv/bin/python -m bench.gateway_cpu [--calls 3000] [--in-flight 16] [--services 1]
        [--profile FILE] [--per-pid]

``--profile FILE`` also writes a cProfile of this process (the client) over the gateway
calls. Not a ``bench_*`` module: ``make bench`` does not run it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")
FIRST_CID = 200


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def self_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def descendants(roots: list[int]) -> set[int]:
    """``roots`` and every live process below them."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(parents.get(pid, []))
    return found


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def enclave_processes(enclave_id: str) -> dict[int, str]:
    """The host pids of an enclave (its supervisor and the app, with their children)."""
    from hermetic.launcher import records

    record = records.find(enclave_id)
    named: dict[int, str] = {}
    for pid, what in (
        (record.supervisor_pid, "supervisor"),
        (record.pid, "enclave"),
        (record.app_pid, "app"),
    ):
        if pid is None:
            continue
        for child in descendants([pid]):
            named.setdefault(child, what if child == pid else f"{what} child")
    return named


async def drive(call: Callable[[int], Awaitable[Any]], calls: int, in_flight: int) -> None:
    """``calls`` calls, ``in_flight`` at a time."""
    next_call = 0

    async def worker() -> None:
        nonlocal next_call
        while next_call < calls:
            n = next_call
            next_call += 1
            await call(n)

    await asyncio.gather(*(worker() for _ in range(in_flight)))


def measure(
    label: str,
    call: Callable[[int], Awaitable[Any]],
    roles: dict[str, list[int]],
    calls: int,
    in_flight: int,
    profile: cProfile.Profile | None = None,
) -> dict[str, float]:
    """CPU us per call per role while ``calls`` calls run."""

    def snapshot() -> dict[str, float]:
        values = {role: sum(cpu_seconds(p) for p in pids) for role, pids in roles.items()}
        values["client (this process)"] = self_seconds()
        for pids in roles.values():
            values |= {f"pid {p} {process_name(p)}": cpu_seconds(p) for p in pids}
        return values

    loop = asyncio.get_event_loop()
    loop.run_until_complete(drive(call, 200, in_flight))  # warm
    before = snapshot()
    began = loop.time()
    if profile is not None:
        profile.enable()
    loop.run_until_complete(drive(call, calls, in_flight))
    if profile is not None:
        profile.disable()
    wall = loop.time() - began
    after = snapshot()
    per_call = {role: (after[role] - before[role]) / calls * 1e6 for role in after}
    per_call["wall (us per call)"] = wall / calls * 1e6
    print(f"{label}: {calls} calls, {in_flight} in flight, {calls / wall:.0f} calls/s")
    return per_call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_cpu")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--services", type=int, default=1)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--per-pid", action="store_true", help="also each process's share")
    args = parser.parse_args(argv)
    from bench.gateway_stack import state_dir

    with tempfile.TemporaryDirectory() as tmp, state_dir(Path(tmp) / "state"):
        _run(Path(tmp), args)
    return 0


def _run(work: Path, args: argparse.Namespace) -> None:
    from bench.bench_gateway import _proxy
    from bench.gateway_stack import boot_backends, gateway_up, make_stack
    from bench.report import print_table
    from hermetic.client import ClientTrust, ServicePolicy, connect
    from hermetic.gateway import connect_gateway

    services = [f"s{n:02d}" for n in range(args.services)]
    stack = make_stack(
        work, services, limits={"max_concurrency": 256, "max_per_client": 128},
        backend_ports=(5000, 5001),
    )  # fmt: skip
    specs = [
        (name, stack.images[name], stack.backend_config, False, FIRST_CID + n)
        for n, name in enumerate(services)
    ]
    started = dict(zip(services, boot_backends(specs), strict=True))
    hints = [f"{name}=vsock://{started[name]['EnclaveCID']}:5001" for name in services]
    running = gateway_up(stack.gateway, stack.gateway_config, stack.trust, hints)
    proxy: subprocess.Popen[str] | None = None
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        first = services[0]
        proxy, direct_url = _proxy(started[first]["EnclaveID"])
        gateway_pids = enclave_processes(running.up["EnclaveID"])
        backend_pids = enclave_processes(started[first]["EnclaveID"])
        up_pid = running.process.pid
        roles = {
            # `gateway up` is also the gateway enclave's supervisor: its own pid is the
            # proxy (ingress and egress relays), the backend dialer and the supervisor.
            "gateway up (proxy + dialer)": [up_pid],
            "gateway enclave": sorted(set(gateway_pids) - {up_pid}),
            "backend enclave": sorted(backend_pids),
            "direct proxy": sorted(descendants([proxy.pid])),
        }
        for role, pids in roles.items():
            shown = ", ".join(f"{p} {process_name(p)}" for p in pids)
            print(f"{role}: {shown}")
        trust = ClientTrust.load(stack.trust)
        policy = ServicePolicy(services=frozenset({first}))
        direct = loop.run_until_complete(
            connect(direct_url, trust=trust, policy=policy, timeout=60)
        )
        gateway = loop.run_until_complete(connect_gateway(running.url, trust=trust, timeout=60))

        async def via_direct(arg: int) -> Any:
            return await direct.call("whoami", arg)

        async def via_gateway(arg: int) -> Any:
            reply = await gateway.call(first, "whoami", arg)
            if len(gateway.exchanges) > 1000:
                gateway.exchanges.clear()
            return reply.result

        profile = cProfile.Profile() if args.profile is not None else None
        results = {
            "direct": measure("direct", via_direct, roles, args.calls, args.in_flight),
            "gateway": measure("gateway", via_gateway, roles, args.calls, args.in_flight, profile),
        }
        if profile is not None:
            profile.dump_stats(str(args.profile))
        loop.run_until_complete(direct.close())
        loop.run_until_complete(gateway.close())
        rows = []
        for role in [*roles, "client (this process)"]:
            rows.append([role, results["direct"][role], results["gateway"][role]])
        total = {
            path: sum(v for k, v in r.items() if k in roles or k.startswith("client"))
            for path, r in results.items()
        }
        if args.per_pid:
            for key in results["gateway"]:
                if key.startswith("pid "):
                    rows.append([f"  {key}", results["direct"][key], results["gateway"][key]])
        rows.append(["total CPU", total["direct"], total["gateway"]])
        rows.append(["wall", results["direct"]["wall (us per call)"],
                     results["gateway"]["wall (us per call)"]])  # fmt: skip
        print()
        print_table(["CPU us per call", "direct", "gateway"], rows)
        print(f"\ngateway / direct total CPU per call: {total['gateway'] / total['direct']:.2f}x")
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(15)
        running.stop()
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
