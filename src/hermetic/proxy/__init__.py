"""The parent-side service proxy: the enclave's only door to the world.

On the (untrusted) parent instance it bridges client TCP and WebSocket connections to
the enclave's service vsock port, relays the enclave's outbound connections to an
allowlist of destinations, delivers the runtime config at boot and exports Prometheus
telemetry. It only ever sees what the enclave sends in the clear: with the channel
component in place that is Noise ciphertext.
"""

from hermetic.proxy.server import ProxyOptions, ServiceProxy

__all__ = ["ProxyOptions", "ServiceProxy"]
