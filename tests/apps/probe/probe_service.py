"""A test service that reports, from inside the enclave, what it can and cannot do."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from hermetic.enclave import App
from hermetic.enclave.egress import open_egress
from hermetic.errors import HermeticError, NSMError

MARKER = "PROBE-CONSOLE-" + "MARKER-7f3a"  # never whole in the source or image
print(MARKER, "stdout at import", flush=True)
print(MARKER, "stderr at import", file=sys.stderr, flush=True)

app = App()


@app.method("echo")
async def echo(arg: object) -> object:
    return arg


@app.method("attest")
async def attest(nonce: bytes) -> bytes:
    return app.context.nsm.attest(nonce=nonce)


@app.method("extend_pcr")
async def extend_pcr(index: int) -> str:
    try:
        app.context.nsm.extend_pcr(index, b"probe")
    except NSMError as exc:
        return exc.code
    return "extended"


@app.method("config")
async def config(_: object = None) -> object:
    current = app.context.config
    return None if current is None else {"values": current.values, "digest": current.digest}


@app.method("isolation")
async def isolation(host_port: int) -> dict[str, object]:
    print(MARKER, "stdout from a method", flush=True)
    print(MARKER, "stderr from a method", file=sys.stderr, flush=True)
    initial = Path("/proc/self/environ").read_bytes().split(b"\0")
    report: dict[str, object] = {
        "environment": dict(os.environ),
        "initial_environment": sorted(e.split(b"=")[0].decode() for e in initial if e),
    }
    try:
        with socket.create_connection(("127.0.0.1", host_port), timeout=2):
            report["tcp"] = "connected"
    except OSError as exc:
        report["tcp"] = f"{type(exc).__name__}: {exc.strerror or exc}"
    target = Path(__file__).parent / "written-by-probe"
    try:
        target.write_text("x")
        report["write_image"] = "written"
    except OSError as exc:
        report["write_image"] = f"{type(exc).__name__}: {exc.strerror}"
    return report


@app.method("egress")
async def egress(request: list[object]) -> object:
    """``[host, port, payload]``: send payload through the parent's egress relay."""
    host, port, payload = request
    if not (isinstance(host, str) and isinstance(port, int) and isinstance(payload, bytes)):
        raise TypeError("egress: expected [host: str, port: int, payload: bytes]")
    try:
        reader, writer = await open_egress(host, port)
    except HermeticError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    writer.write(payload)
    await writer.drain()
    data = await reader.read(65536)
    writer.close()
    return {"reply": data}


@app.method("listdir")
async def listdir(path: str) -> object:
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror}"
