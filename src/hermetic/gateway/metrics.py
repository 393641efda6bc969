"""The gateway's Prometheus metrics: declared, bounded and content-free.

Labels are service names from the admission policy (a fixed, logged set), outcome words
and error type names: never a hint's address, a method name, a client or any request data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

REQUEST_OUTCOMES = ("ok", "backend_error", "unavailable")
"""Outcomes of a routed request (``hermetic_gateway_requests_total``)."""
HEALTH_OUTCOMES = ("ok", "missed", "readmitted", "readmit_unreachable", "readmit_refused")
"""Outcomes of ``hermetic_gateway_health_checks_total``: a ping answered or missed, and a
lost instance's re-attestation admitted, unanswered or refused."""


class GatewayMetrics:
    """One registry per gateway (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hermetic_gateway_requests_total",
            "Requests routed to a backend service, by outcome.",
            ["service", "outcome"],
            registry=self.registry,
        )
        self.refused_requests = Counter(
            "hermetic_gateway_refused_requests_total",
            "Client requests refused before routing, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.admissions = Counter(
            "hermetic_gateway_backend_admissions_total",
            "Backend instances that passed admission (attested, admitted, accepted us).",
            ["service"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "hermetic_gateway_backend_refusals_total",
            "Backend instances refused admission, by the failed check's error type.",
            ["service", "reason"],
            registry=self.registry,
        )
        self.retries = Counter(
            "hermetic_gateway_retries_total",
            "Idempotent requests sent again to another instance after one died mid-request.",
            ["service"],
            registry=self.registry,
        )
        self.health_checks = Counter(
            "hermetic_gateway_health_checks_total",
            "Health checks of backend instances and re-attestations of lost ones, by outcome.",
            ["service", "outcome"],
            registry=self.registry,
        )
        self.drains = Counter(
            "hermetic_gateway_drains_total",
            "Instances drained (taken out, their session closed) after missed health checks.",
            ["service"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "hermetic_gateway_in_flight_requests",
            "Client requests being routed now (bounded by the config's max_concurrency).",
            registry=self.registry,
        )
        self.backends = Gauge(
            "hermetic_gateway_backends",
            "Backend instances known to the gateway, by state.",
            ["service", "state"],
            registry=self.registry,
        )

    def text(self) -> str:
        """The Prometheus text exposition."""
        return generate_latest(self.registry).decode("utf-8")
