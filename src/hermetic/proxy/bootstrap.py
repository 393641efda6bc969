"""Delivering the runtime config bundle and the release endorsement to a booting enclave.

This is the parent side of ``CONFIG_PORT`` (see :mod:`hermetic.enclave.boot`) on real
Nitro, where ``hermetic proxy`` serves it; in emulation the launcher's supervisor does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from hermetic.enclave import boot
from hermetic.errors import HermeticError
from hermetic.transport.frames import read_frame, write_frame
from hermetic.transport.vsock import VsockStream

if TYPE_CHECKING:
    from hermetic.kms.client import KMSCredentials

log = logging.getLogger("hermetic.proxy")


async def deliver_config(
    stream: VsockStream,
    bundle: bytes | None,
    endorsement: bytes | None = None,
    credentials: KMSCredentials | None = None,
    *,
    timeout: float = 30.0,
) -> boot.BootStatus | None:
    """Send ``bundle``, ``endorsement`` and ``credentials`` (empty frames for none), return
    the enclave's verdict (None if it said none). Credentials are never logged.

    A refusal is logged with the enclave's reason: this is where an operator learns that
    the bundle was unsigned, tampered or signed by the wrong key.
    """
    try:
        await write_frame(stream.writer, bundle or b"")
        await write_frame(stream.writer, endorsement or b"")
        await write_frame(stream.writer, boot.encode_credentials(credentials))
        answer = await asyncio.wait_for(read_frame(stream.reader), timeout)
        if answer is None:
            return None
        status = boot.decode_status(answer)
    except (HermeticError, TimeoutError) as exc:
        log.error("config delivery to CID %d failed: %s", stream.peer.cid, exc)
        return None
    if status.ok:
        log.info("enclave CID %d: %s", stream.peer.cid, status.reason)
    else:
        log.error("enclave CID %d refused its runtime config: %s", stream.peer.cid, status.reason)
    return status
