"""The app manifest, ``hermetic.toml``: what a service declares about itself.

The manifest is baked into the application layer, so everything it says (entry point,
resources, vsock ports, egress allowlist, metric names and the operator's public key) is
covered by PCR2 and PCR0. A relying party that trusts a measurement therefore also knows
which operator may configure the service at run time and which hosts it may reach.

Parsing is strict on purpose: an unknown field is most likely a typo that would silently
drop a restriction (``egres = []``), so it is rejected, and every error names the field,
what was expected and what was found. The same parser serves the build (reading from the
app directory) and the runtime and image reader (reading from a layer), through a
small :class:`AppFiles` view that resolves paths relative to the app root.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from hermetic import jsontext
from hermetic.errors import ManifestError

MANIFEST_NAME = "hermetic.toml"

# vsock ports are 32-bit; 0xFFFFFFFF is VMADDR_PORT_ANY and cannot be listened on by name.
MAX_VSOCK_PORT = 0xFFFFFFFE
MIN_MEMORY_MIB = 64
MAX_CPUS = 256
MAX_OPERATOR_KEY_BYTES = 64 * 1024

_REQUIRED = ("name", "version", "entry", "cpus", "memory_mib", "ports", "operator_key")
_OPTIONAL = ("egress", "metrics", "dependencies")

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_ENTRY_RE = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*")
_METRIC_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_WHEEL_RE = re.compile(
    r"[A-Za-z0-9_.]+-[A-Za-z0-9_.!+]+(-[0-9][A-Za-z0-9_.]*)?-[^-/]+-[^-/]+-[^-/]+\.whl"
)


class AppFiles(Protocol):
    """Read access to an app's files by normalised app-relative path."""

    def is_file(self, relative: str) -> bool:
        """Whether ``relative`` names a regular file (not a symlink) in the app."""
        ...

    def read(self, relative: str, limit: int) -> bytes:
        """The file's bytes; raise :class:`ManifestError` if missing or over ``limit``."""
        ...


@dataclass(frozen=True)
class DirectoryFiles:
    """:class:`AppFiles` over an app directory on disk."""

    root: Path

    def is_file(self, relative: str) -> bool:
        target = self.root / relative
        return not target.is_symlink() and target.is_file()

    def read(self, relative: str, limit: int) -> bytes:
        if not self.is_file(relative):
            raise ManifestError(f"{relative!r} is not a regular file in the app directory")
        target = self.root / relative
        try:
            if target.stat().st_size > limit:
                raise ManifestError(f"{relative!r} is larger than {limit} bytes")
            return target.read_bytes()
        except OSError as exc:
            raise ManifestError(f"{relative!r}: cannot read: {exc.strerror}") from None


@dataclass(frozen=True)
class EgressRule:
    """One ``host:port`` the service may reach through the parent's proxy."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Manifest:
    """A validated ``hermetic.toml``.

    ``operator_key`` is the PEM of the operator's public key (the bytes that are in the
    image); ``operator_key_file`` is its path inside the app directory, or None when the
    PEM is inline. ``dependencies`` are app-relative paths: wheel files, or one
    requirements lock file.
    """

    name: str
    version: str
    entry: str
    cpus: int
    memory_mib: int
    ports: tuple[int, ...]
    egress: tuple[EgressRule, ...]
    metrics: tuple[str, ...]
    operator_key: bytes
    operator_key_file: str | None
    dependencies: tuple[str, ...]

    @property
    def service_port(self) -> int:
        """The vsock port the service itself listens on (the first declared port)."""
        return self.ports[0]

    @property
    def entry_module(self) -> str:
        return self.entry.split(":", 1)[0]

    @property
    def entry_attribute(self) -> str:
        return self.entry.split(":", 1)[1]

    def operator_public_key(self) -> ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey:
        """The operator key as a cryptography object (already validated at load time)."""
        return _load_public_key(self.operator_key, "operator_key")

    def summary(self) -> dict[str, Any]:
        """The manifest as JSON-ready values (image metadata, ``hermetic image`` output)."""
        return {
            "name": self.name,
            "version": self.version,
            "entry": self.entry,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "ports": list(self.ports),
            "egress": [str(rule) for rule in self.egress],
            "metrics": list(self.metrics),
            "dependencies": list(self.dependencies),
        }


def load_manifest(appdir: str | Path) -> Manifest:
    """Read and validate ``APPDIR/hermetic.toml`` (and the operator key file it names)."""
    root = Path(appdir)
    path = root / MANIFEST_NAME
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no {MANIFEST_NAME} in the app directory") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc.strerror}") from None
    return parse_manifest(text, DirectoryFiles(root), source=str(path))


def parse_manifest(
    text: bytes | str,
    files: AppFiles,
    *,
    source: str = MANIFEST_NAME,
) -> Manifest:
    """Validate manifest TOML; ``files`` resolves the key file and dependencies it names.

    ``files`` is only asked about normalised relative paths that stay inside the app root.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{source}: not UTF-8 (byte {exc.start})") from None
    elif not jsontext.is_unicode_text(text):  # the shared text rule (no lone surrogates)
        raise ManifestError(f"{source}: not Unicode text (a lone UTF-16 surrogate)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise ManifestError(f"{source}: arrays or inline tables nested too deeply") from None

    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ManifestError(
            f"{source}: unknown field {unknown[0]!r} (allowed: {', '.join(_REQUIRED + _OPTIONAL)})"
        )
    for field in _REQUIRED:
        if field not in data:
            raise ManifestError(f"{source}: missing required field {field!r}")

    name = _pattern(data, "name", _NAME_RE, "lowercase letters, digits, '.', '_', '-'", source)
    version = _pattern(data, "version", _VERSION_RE, "a version such as 0.1.0", source)
    entry = _pattern(data, "entry", _ENTRY_RE, "'module:callable' e.g. echo_service:app", source)
    cpus = _int(data, "cpus", 1, MAX_CPUS, source)
    memory_mib = _int(data, "memory_mib", MIN_MEMORY_MIB, 1 << 24, source)
    ports = _ports(data.get("ports"), source)
    egress = tuple(_egress(item, i, source) for i, item in enumerate(_list(data, "egress", source)))
    if len(set(egress)) != len(egress):
        raise ManifestError(f"{source}: field 'egress' lists the same host:port twice")
    metrics = tuple(
        _metric(item, i, source) for i, item in enumerate(_list(data, "metrics", source))
    )
    if len(set(metrics)) != len(metrics):
        raise ManifestError(f"{source}: field 'metrics' declares the same name twice")
    operator_key, operator_key_file = _operator_key(data["operator_key"], files, source)
    dependencies = _dependencies(data.get("dependencies"), files, source)
    return Manifest(
        name=name,
        version=version,
        entry=entry,
        cpus=cpus,
        memory_mib=memory_mib,
        ports=ports,
        egress=egress,
        metrics=metrics,
        operator_key=operator_key,
        operator_key_file=operator_key_file,
        dependencies=dependencies,
    )


def app_relative_path(value: str, field: str, source: str) -> str:
    """Normalise an app-relative path; reject absolute paths and escapes with ``..``."""
    if not value or "\\" in value or "\x00" in value:
        raise ManifestError(f"{source}: field {field!r} must be a relative path, got {value!r}")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts:
        raise ManifestError(
            f"{source}: field {field!r} must stay inside the app directory, got {value!r}"
        )
    return path.as_posix()


def _type_name(value: object) -> str:
    return type(value).__name__


def _pattern(
    data: Mapping[str, Any], field: str, regex: re.Pattern[str], what: str, source: str
) -> str:
    value = data[field]
    if not isinstance(value, str):
        raise ManifestError(f"{source}: field {field!r} must be a string, got {_type_name(value)}")
    if not regex.fullmatch(value):
        raise ManifestError(f"{source}: field {field!r} must be {what}, got {value!r}")
    return value


def _int(data: Mapping[str, Any], field: str, low: int, high: int, source: str) -> int:
    value = data[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(
            f"{source}: field {field!r} must be an integer, got {_type_name(value)}"
        )
    if not low <= value <= high:
        raise ManifestError(f"{source}: field {field!r} must be in {low}..{high}, got {value}")
    return value


def _list(data: Mapping[str, Any], field: str, source: str) -> list[Any]:
    value = data.get(field, [])
    if not isinstance(value, list):
        raise ManifestError(f"{source}: field {field!r} must be a list, got {_type_name(value)}")
    return value


def _ports(value: object, source: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ManifestError(
            f"{source}: field 'ports' must be a list of integers, got {_type_name(value)}"
        )
    if not value:
        raise ManifestError(f"{source}: field 'ports' must list at least the service port")
    ports: list[int] = []
    for i, port in enumerate(value):
        if isinstance(port, bool) or not isinstance(port, int):
            raise ManifestError(f"{source}: ports[{i}] must be an integer, got {_type_name(port)}")
        if not 1 <= port <= MAX_VSOCK_PORT:
            raise ManifestError(
                f"{source}: ports[{i}] must be a vsock port in 1..{MAX_VSOCK_PORT}, got {port}"
            )
        if port in ports:
            raise ManifestError(f"{source}: ports[{i}] repeats port {port}")
        ports.append(port)
    return tuple(ports)


def _egress(item: object, i: int, source: str) -> EgressRule:
    where = f"{source}: egress[{i}]"
    if not isinstance(item, str):
        raise ManifestError(f"{where} must be a 'host:port' string, got {_type_name(item)}")
    host, sep, port_text = item.rpartition(":")
    if not sep or not host or not port_text.isascii() or not port_text.isdigit():
        raise ManifestError(f"{where} must be 'host:port', got {item!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ManifestError(f"{where} port must be in 1..65535, got {port}")
    if host.startswith("[") and host.endswith("]"):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ManifestError(f"{where} has a bad IPv6 address {host!r}") from None
        return EgressRule(str(address), port)
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        raise ManifestError(f"{where} has a bad host name {host!r}")
    return EgressRule(host.rstrip(".").lower(), port)


def _metric(item: object, i: int, source: str) -> str:
    if not isinstance(item, str) or not _METRIC_RE.fullmatch(item):
        raise ManifestError(
            f"{source}: metrics[{i}] must be a Prometheus metric name, got {item!r}"
        )
    return item


def _operator_key(value: object, files: AppFiles, source: str) -> tuple[bytes, str | None]:
    if not isinstance(value, str):
        raise ManifestError(
            f"{source}: field 'operator_key' must be a PEM string or a file path, "
            f"got {_type_name(value)}"
        )
    if value.lstrip().startswith("-----BEGIN"):
        pem, relative = value.strip().encode("ascii", "replace") + b"\n", None
    else:
        relative = app_relative_path(value, "operator_key", source)
        pem = files.read(relative, MAX_OPERATOR_KEY_BYTES)
    _load_public_key(pem, f"{source}: operator_key")
    return pem, relative


def _load_public_key(
    pem: bytes, where: str
) -> ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise ManifestError(f"{where} is not a PEM public key") from None
    except Exception:  # the PEM/DER parser is native code; any failure means "not a key"
        raise ManifestError(f"{where} is not a PEM public key") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(
        key.curve, ec.SECP256R1 | ec.SECP384R1
    ):
        return key
    raise ManifestError(
        f"{where} must be an Ed25519 or ECDSA P-256/P-384 public key, got {type(key).__name__}"
    )


def _dependencies(value: object, files: AppFiles, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        relative = app_relative_path(value, "dependencies", source)
        if relative.endswith(".whl"):
            raise ManifestError(
                f"{source}: field 'dependencies' as a string must be a requirements lock, "
                f"got a wheel {value!r}; use a list for wheels"
            )
        _require_file(files, relative, "dependencies", source)
        return (relative,)
    if not isinstance(value, list):
        raise ManifestError(
            f"{source}: field 'dependencies' must be a list of wheel files or a lock file path, "
            f"got {_type_name(value)}"
        )
    wheels: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ManifestError(
                f"{source}: dependencies[{i}] must be a string, got {_type_name(item)}"
            )
        relative = app_relative_path(item, f"dependencies[{i}]", source)
        if not _WHEEL_RE.fullmatch(PurePosixPath(relative).name):
            raise ManifestError(
                f"{source}: dependencies[{i}] must be a .whl file name, got {item!r}"
            )
        if relative in wheels:
            raise ManifestError(f"{source}: dependencies[{i}] repeats {item!r}")
        _require_file(files, relative, f"dependencies[{i}]", source)
        wheels.append(relative)
    return tuple(wheels)


def _require_file(files: AppFiles, relative: str, field: str, source: str) -> None:
    if not files.is_file(relative):
        raise ManifestError(
            f"{source}: field {field!r} names {relative!r}, which is not a file in the app"
        )
