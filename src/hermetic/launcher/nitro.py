"""The real-hardware driver: the same launcher commands, executed by ``nitro-cli``.

On a Nitro parent instance (``/dev/nitro_enclaves`` exists and ``nitro-cli`` is on PATH)
hermetic does not play hypervisor: the Nitro hypervisor measures the EIF, the NSM is
real, and ``nitro-cli`` already prints the JSON that ``hermetic ps --json`` mirrors. This
module only builds the command lines and parses their JSON; it cannot run in CI (no
Nitro hardware), which is why it is kept this thin. The runtime config is delivered by
``hermetic proxy --config`` on the parent (the enclave asks CID 3 port 9001 at boot).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from hermetic.errors import EnclaveBootError, LauncherError


def available() -> bool:
    return Path("/dev/nitro_enclaves").exists() and shutil.which("nitro-cli") is not None


def run_command(
    eif: Path, *, cpus: int, memory_mib: int, cid: int | None, debug: bool
) -> list[str]:
    command = [
        "nitro-cli", "run-enclave", "--eif-path", str(eif),
        "--cpu-count", str(cpus), "--memory", str(memory_mib),
    ]  # fmt: skip
    if cid is not None:
        command += ["--enclave-cid", str(cid)]
    if debug:
        command.append("--debug-mode")
    return command


def _json(command: list[str]) -> Any:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LauncherError(f"{command[1]}: nitro-cli failed to run: {exc}") from None
    if done.returncode != 0:
        raise LauncherError(
            f"{command[1]}: nitro-cli exit {done.returncode}: {done.stderr.strip()}"
        )
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise LauncherError(f"{command[1]}: nitro-cli printed no JSON") from None


def run(eif: Path, *, cpus: int, memory_mib: int, cid: int | None, debug: bool) -> dict[str, Any]:
    try:
        result: dict[str, Any] = _json(
            run_command(eif, cpus=cpus, memory_mib=memory_mib, cid=cid, debug=debug)
        )
    except LauncherError as exc:
        raise EnclaveBootError(str(exc)) from None
    return result


def describe() -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = _json(["nitro-cli", "describe-enclaves"])
    return result


def terminate(enclave_id: str) -> dict[str, Any]:
    result: dict[str, Any] = _json(["nitro-cli", "terminate-enclave", "--enclave-id", enclave_id])
    return result


def console(enclave_id: str, timeout: float | None) -> int:
    command = ["nitro-cli", "console", "--enclave-id", enclave_id]
    if timeout is not None:
        command += ["--disconnect-timeout", str(int(timeout))]
    return subprocess.run(command, check=False).returncode
