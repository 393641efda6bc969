"""Outbound TCP from inside the enclave, through the parent proxy's egress port.

The enclave has no network interface; this is its only way out, and the parent decides
(by allowlist) where it leads. Anything secret must still be protected end to end (TLS
or the Noise channel) because the parent sees these bytes.
"""

from __future__ import annotations

import asyncio

from hermetic.enclave.boot import EGRESS_PORT
from hermetic.errors import EgressRefusedError, PeerUnavailableError
from hermetic.transport import egress, vsock
from hermetic.transport.tcp import HostPort


async def open_egress(
    host: str, port: int, *, timeout: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A byte stream to ``host:port`` via the parent; EgressRefusedError if not allowed."""
    stream = await vsock.connect(vsock.PARENT_CID, EGRESS_PORT, timeout=timeout)
    stream.writer.write(egress.encode_connect(HostPort(host, port)))
    try:
        line = await asyncio.wait_for(stream.reader.readline(), timeout)
    except (TimeoutError, ConnectionError, OSError) as exc:
        await stream.aclose()
        raise PeerUnavailableError(
            f"egress to {host}:{port}: no answer from proxy ({exc})"
        ) from None
    try:
        error = egress.decode_reply(line)
    except Exception:
        await stream.aclose()
        raise
    if error is not None:
        await stream.aclose()
        raise EgressRefusedError(f"egress to {host}:{port}: refused by the proxy: {error}")
    return stream.reader, stream.writer
