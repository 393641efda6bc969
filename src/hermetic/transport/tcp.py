"""TCP endpoints as ``HOST:PORT`` strings, the way operators write them on command lines."""

from __future__ import annotations

from dataclasses import dataclass

from hermetic.errors import ConfigError


@dataclass(frozen=True)
class HostPort:
    """A TCP endpoint. ``str()`` gives back ``host:port`` (IPv6 hosts in brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_hostport(text: str, *, field: str = "address", allow_port_zero: bool = False) -> HostPort:
    """Parse ``host:port`` or ``[v6]:port``; raise :class:`ConfigError` naming ``field``."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{field}: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit():
        raise ConfigError(f"{field}: expected a numeric port, got {port_text!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{field}: expected a port in {low}..65535, got {port}")
    return HostPort(host, port)
