"""The ``gateway`` section of the gateway's signed runtime config.

::

    {"gateway": {"admission": {<admission policy, hermetic.gateway.admission>},
                 "admission_endorsement": {<its hermetic.endorsement/v1 JSON>},
                 "peers": {<trust file: nitro_root, log, publishers>},
                 "dialer": "127.0.0.1:7100",
                 "max_request": 1048576, "max_response": 1048576, "reattest": 240,
                 "max_concurrency": 64, "max_per_client": 32, "max_sessions": 1024,
                 "health_interval": 5, "health_timeout": 2}}

``peers`` is what backends' evidence and the admission policy's endorsement are verified
against. ``dialer`` is the parent-side relay to backends' vsock ports
(:mod:`hermetic.gateway.dialer`), reached through the proxy's egress; it is untrusted, like
everything the parent runs (absent: only ``tcp://`` hints can be used). ``max_request`` and
``max_response`` bound a client's request and a backend's result in bytes (canonical CBOR),
default 1 MiB each. ``reattest`` (seconds, default 240, below the 300 s a backend's
document may be old when its session opens) is how long a backend session serves before
the gateway attests that instance again with a fresh document. ``max_concurrency``
(default 64) and ``max_per_client`` (default 32, per client session) bound the requests in
flight; one over either is refused at once with ``overloaded`` (nothing is queued, so
memory stays bounded by the limits times the message sizes). ``max_sessions`` (default
1024) bounds the client sessions open at once: a connection beyond it is closed before its
handshake, so it costs no attestation document (:meth:`hermetic.enclave.App.limit_sessions`).
Every ``health_interval``
seconds (default 5) each admitted backend is pinged on its session; one that does not
answer within ``health_timeout`` seconds (default 2) twice in a row is drained, and a lost
instance is re-attested until it is admitted again
(:meth:`hermetic.gateway.backends.Backends.check_health`).

The config carries no secret, so the gateway shows it to clients (``describe``), who check
its digest against their verified session and the policy's endorsement against their own
trust file (:func:`admission_from_config`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hermetic.client.trust import ClientTrust
from hermetic.errors import AdmissionPolicyError, GatewayConfigError, HermeticError
from hermetic.gateway.admission import AdmissionPolicy, verify_logged
from hermetic.transport.tcp import HostPort, parse_hostport

DEFAULT_LIMIT = 1024 * 1024
MESSAGE_SLACK = 64 * 1024
MAX_LIMIT = 8 * 1024 * 1024
DEFAULT_REATTEST = 240
DEFAULT_CONCURRENCY = 64
DEFAULT_PER_CLIENT = 32
DEFAULT_SESSIONS = 1024
MAX_CONCURRENCY = 65536
MAX_REATTEST = 86400
DEFAULT_HEALTH_INTERVAL = 5
DEFAULT_HEALTH_TIMEOUT = 2
MAX_HEALTH_INTERVAL = 3600
MAX_HEALTH_TIMEOUT = 60
_FIELDS = frozenset(
    {"admission", "admission_endorsement", "peers", "dialer", "max_request", "max_response",
     "reattest", "max_concurrency", "max_per_client", "max_sessions", "health_interval",
     "health_timeout"}
)  # fmt: skip


def _section(values: Mapping[str, Any]) -> dict[str, Any]:
    section = values.get("gateway")
    if not isinstance(section, dict):
        raise GatewayConfigError(
            f"config gateway: expected an object, got {type(section).__name__}"
        )
    unknown = sorted(str(k) for k in set(section) - _FIELDS)
    if unknown:
        raise GatewayConfigError(f"config gateway: unknown fields {unknown}")
    return section


def _limit(section: dict[str, Any], name: str) -> int:
    value = section.get(name, DEFAULT_LIMIT)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise GatewayConfigError(
            f"config gateway.{name}: expected bytes between 1 and {MAX_LIMIT}, got {value!r:.40}"
        )
    return value


def _seconds(section: dict[str, Any], name: str, default: int, most: int) -> int:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise GatewayConfigError(
            f"config gateway.{name}: expected seconds between 1 and {most}, got {value!r:.40}"
        )
    return value


def _count(section: dict[str, Any], name: str, default: int) -> int:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
        raise GatewayConfigError(
            f"config gateway.{name}: expected 1 to {MAX_CONCURRENCY}, got {value!r:.40}"
        )
    return value


@dataclass(frozen=True)
class GatewaySettings:
    """The checked ``gateway`` section: the logged admission policy and the limits."""

    admission: AdmissionPolicy
    peers: ClientTrust
    dialer: HostPort | None
    max_request: int
    max_response: int
    reattest: int = DEFAULT_REATTEST
    max_concurrency: int = DEFAULT_CONCURRENCY
    max_per_client: int = DEFAULT_PER_CLIENT
    max_sessions: int = DEFAULT_SESSIONS
    health_interval: int = DEFAULT_HEALTH_INTERVAL
    health_timeout: int = DEFAULT_HEALTH_TIMEOUT

    @property
    def message_limit(self) -> int:
        """The largest channel message either way on the client port: the larger size
        limit plus room for the envelope and the receipt. A client that sends a larger one
        has its session closed before the message is reassembled, so what a client makes
        the gateway hold is bounded by the limits. (Backend sessions keep the channel's
        16 MiB: backends are admitted releases, and an oversized result is refused as
        ``response_too_large`` without losing the instance.)"""
        return max(self.max_request, self.max_response) + MESSAGE_SLACK

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> GatewaySettings:
        """Parse the section and check that the admission policy is the logged one
        (:func:`~hermetic.gateway.admission.verify_logged` against ``peers``)."""
        section = _section(values)
        try:
            peers = ClientTrust.from_json(section.get("peers"))
        except HermeticError as exc:
            raise GatewayConfigError(f"config gateway.peers: {type(exc).__name__}: {exc}") from None
        admission = AdmissionPolicy.from_json(section.get("admission"))
        verify_logged(admission, section.get("admission_endorsement"), peers.translog)
        dialer = section.get("dialer")
        if dialer is not None:
            if not isinstance(dialer, str):
                raise GatewayConfigError(
                    f"config gateway.dialer: expected 'host:port', got {dialer!r:.40}"
                )
            try:
                dialer = parse_hostport(dialer, field="config gateway.dialer")
            except HermeticError as exc:
                raise GatewayConfigError(str(exc)) from None
        limits = _limit(section, "max_request"), _limit(section, "max_response")
        reattest = _seconds(section, "reattest", DEFAULT_REATTEST, MAX_REATTEST)
        return cls(
            admission, peers, dialer, *limits, reattest,
            max_concurrency=_count(section, "max_concurrency", DEFAULT_CONCURRENCY),
            max_per_client=_count(section, "max_per_client", DEFAULT_PER_CLIENT),
            max_sessions=_count(section, "max_sessions", DEFAULT_SESSIONS),
            health_interval=_seconds(
                section, "health_interval", DEFAULT_HEALTH_INTERVAL, MAX_HEALTH_INTERVAL
            ),
            health_timeout=_seconds(
                section, "health_timeout", DEFAULT_HEALTH_TIMEOUT, MAX_HEALTH_TIMEOUT
            ),
        )  # fmt: skip


def admission_from_config(config: bytes, trust: ClientTrust) -> AdmissionPolicy:
    """The admission policy in a gateway's config, checked against the *caller's* trust
    file: its endorsement must verify there and name the document's digest."""
    try:
        values = json.loads(config.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise AdmissionPolicyError("gateway config: not a JSON object") from None
    if not isinstance(values, dict):
        raise AdmissionPolicyError("gateway config: not a JSON object")
    try:
        section = _section(values)
    except GatewayConfigError as exc:
        raise AdmissionPolicyError(str(exc)) from None
    admission = AdmissionPolicy.from_json(section.get("admission"))
    verify_logged(admission, section.get("admission_endorsement"), trust.translog)
    return admission
