"""Proxy telemetry (prometheus-client), one registry per proxy instance (no globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

STATES = ("BOOTING", "RUNNING", "TERMINATING", "TERMINATED", "FAILED", "UNKNOWN")


class _StateCollector(Collector):
    def __init__(self, current: Callable[[], str]) -> None:
        self._current = current

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily(
            "hermetic_enclave_state", "1 for the enclave's current state", labels=["state"]
        )
        state = self._current()
        for name in STATES:
            family.add_metric([name], 1.0 if name == state else 0.0)
        yield family


class ProxyMetrics:
    """Counters for ingress, egress and the enclave's state."""

    def __init__(self, enclave_state: Callable[[], str]) -> None:
        self.registry = CollectorRegistry()
        self.connections = Counter(
            "hermetic_proxy_connections",
            "Client connections accepted, by transport",
            ["transport"],
            registry=self.registry,
        )
        self.active = Gauge(
            "hermetic_proxy_active_connections",
            "Client connections open now, by transport",
            ["transport"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "hermetic_proxy_bytes",
            "Bytes relayed, by direction (to_enclave, from_enclave, egress_out, egress_in)",
            ["direction"],
            registry=self.registry,
        )
        self.enclave_errors = Counter(
            "hermetic_proxy_enclave_unavailable",
            "Client connections ended because the enclave was unreachable or went away",
            registry=self.registry,
        )
        self.egress_allowed = Counter(
            "hermetic_proxy_egress_connections",
            "Egress connections opened, by destination",
            ["destination"],
            registry=self.registry,
        )
        self.egress_refused = Counter(
            "hermetic_proxy_egress_refused",
            "Egress requests refused, by requested destination",
            ["destination", "reason"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(enclave_state))
