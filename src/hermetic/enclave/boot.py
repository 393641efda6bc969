"""The boot handshake between an enclave and its parent, shared by both sides.

Two parent vsock ports matter at boot:

* ``CONFIG_PORT`` (9001): the enclave connects, the parent sends two frames, the runtime
  config bundle and then the release endorsement (``hermetic.endorsement/v1`` JSON, what
  ``hermetic release publish`` writes); an empty frame means "none". The enclave answers
  one frame, a CBOR map ``{"ok": bool, "reason": text, "digest": bstr|null}``. A refusal
  (unsigned or tampered bundle, unreadable endorsement) is reported here before the
  enclave exits, so the launcher can say *why* it did not start. The enclave does not
  verify the endorsement (it cannot know whom its clients trust): it only forwards it in
  every evidence bundle, and clients verify it.
* ``READY_PORT`` (9000): the enclave sends the single byte ``0xB7`` once its service
  ports are listening, exactly the heartbeat nitro-cli waits for
  (``ENCLAVE_READY_VSOCK_PORT``, ``HEART_BEAT``).

The status message codec below is sans-IO; the runtime and the launcher do the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import cbor2

from hermetic.cbor import strict_loads
from hermetic.errors import FrameFormatError

READY_PORT = 9000
READY_BYTE = b"\xb7"
CONFIG_PORT = 9001
EGRESS_PORT = 8000
"""Parent port of the proxy's egress listener (vsock-proxy's default, 8000)."""

EXIT_REFUSED = 3
"""Exit status of an enclave runtime that refused to start (bad config, bad manifest)."""


@dataclass(frozen=True)
class BootStatus:
    ok: bool
    reason: str
    digest: bytes | None


def encode_status(status: BootStatus) -> bytes:
    return cbor2.dumps({"ok": status.ok, "reason": status.reason, "digest": status.digest})


def decode_status(data: bytes) -> BootStatus:
    value = strict_loads(data, what="boot status", error=FrameFormatError)
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("ok"), bool)
        or not isinstance(value.get("reason"), str)
        or not isinstance(value.get("digest"), bytes | None)
    ):
        raise FrameFormatError("boot status: expected {ok: bool, reason: text, digest: bytes|null}")
    return BootStatus(value["ok"], value["reason"], value["digest"])
