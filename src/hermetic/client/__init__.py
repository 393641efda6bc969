"""The client SDK and the channel assembly: attestation + transparency log + Noise channel.

This is the only package that wires :mod:`hermetic.attestation`, :mod:`hermetic.translog`
and :mod:`hermetic.channel` together (Project Oak's separation: the parts stay independent,
the assembly is small). A client pins a :class:`ClientTrust`, states a
:class:`ServicePolicy`, and :func:`connect` returns a session only after the service's
evidence verified; :func:`serve_attested` is the service side. See ``docs/evidence.md``.
"""

from __future__ import annotations

from hermetic.client.connect import (
    AttestedSession,
    ServiceURL,
    SyncSession,
    connect,
    connect_sync,
)
from hermetic.client.server import (
    dispatch_handlers,
    serve_attested,
    serve_attested_websocket,
    start_tcp_server,
)
from hermetic.client.trust import ClientTrust, ServicePolicy, write_trust_bundle
from hermetic.client.verify import Check, VerificationReport, VerifiedPeer, verify_evidence
from hermetic.evidence import EvidenceBundle, make_evidence_provider

__all__ = [
    "AttestedSession",
    "Check",
    "ClientTrust",
    "EvidenceBundle",
    "ServicePolicy",
    "ServiceURL",
    "SyncSession",
    "VerificationReport",
    "VerifiedPeer",
    "connect",
    "connect_sync",
    "dispatch_handlers",
    "make_evidence_provider",
    "serve_attested",
    "serve_attested_websocket",
    "start_tcp_server",
    "verify_evidence",
    "write_trust_bundle",
]
