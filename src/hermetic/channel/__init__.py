"""The attested Noise channel (sans-IO), its stream framing, an RPC layer and asyncio adapters.

Evidence is produced and verified through callbacks the assembly code supplies, so this
package never imports attestation, translog or transport code (Project Oak's separation).
The wire protocol is specified in docs/protocol.md. The asyncio adapters live in
:mod:`hermetic.channel.aio` and are not imported here, so sans-IO users do not pay for them.
"""

from hermetic.channel.framing import FrameDecoder, encode_frame
from hermetic.channel.noise import ALLOWED_PROTOCOLS, NX, XX, StaticKeypair
from hermetic.channel.session import (
    PROLOGUE,
    ApplicationData,
    ClientSession,
    Closed,
    Event,
    HandshakeComplete,
    MakeEvidence,
    PeerVerified,
    ServerSession,
    State,
    VerifyEvidence,
)

__all__ = [
    "ALLOWED_PROTOCOLS",
    "NX",
    "PROLOGUE",
    "XX",
    "ApplicationData",
    "ClientSession",
    "Closed",
    "Event",
    "FrameDecoder",
    "HandshakeComplete",
    "MakeEvidence",
    "PeerVerified",
    "ServerSession",
    "State",
    "StaticKeypair",
    "VerifyEvidence",
    "encode_frame",
]
