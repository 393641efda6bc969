"""Dependencies point downward: the trust layer never loads the runtime or the platform.

Each check runs in a fresh interpreter, since this test process has long since imported
everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_ABOVE_TRUST = (
    "hermetic.enclave.app",
    "hermetic.enclave.runtime",
    "hermetic.enclave.config",
    "hermetic.launcher",
    "hermetic.proxy",
    "hermetic.client",
)


def _loaded_after_import(module: str) -> list[str]:
    code = (
        f"import json, sys, {module}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('hermetic'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    loaded: list[str] = json.loads(out.stdout)
    return loaded


@pytest.mark.parametrize(
    "module", ["hermetic.image", "hermetic.attestation", "hermetic.translog", "hermetic.nsm"]
)
def test_trust_layer_import_does_not_load_the_runtime(module: str) -> None:
    loaded = _loaded_after_import(module)
    assert module in loaded
    assert [m for m in loaded if m.startswith(_ABOVE_TRUST)] == []


def test_image_reads_the_manifest_without_the_app_framework() -> None:
    loaded = _loaded_after_import("hermetic.image")
    assert "hermetic.enclave.manifest" in loaded
    assert "hermetic.enclave.app" not in loaded
    assert "hermetic.enclave.runtime" not in loaded


def test_enclave_package_still_exports_the_app_framework() -> None:
    import hermetic.enclave as enclave
    from hermetic.enclave.app import App

    assert enclave.App is App
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = enclave.Nope  # type: ignore[attr-defined]


_BASE = ("hermetic", "hermetic.errors", "hermetic.paths", "hermetic.jsontext")


def _loaded_with_every_submodule(package: str) -> list[str]:
    """The hermetic modules loaded once ``package`` and each of its submodules is imported."""
    code = (
        f"import importlib, json, pkgutil, sys, {package}\n"
        f"for m in pkgutil.iter_modules({package}.__path__):\n"
        f"    importlib.import_module('{package}.' + m.name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('hermetic'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    loaded: list[str] = json.loads(out.stdout)
    return loaded


def test_store_layer_loads_nothing_above_the_base_layer() -> None:
    """The log, the KMS and the record store sit on ``hermetic.store``: it must not load
    any of them (or anything else above the base layer), with every submodule imported."""
    loaded = _loaded_with_every_submodule("hermetic.store")
    assert "hermetic.store.migrations" in loaded
    above = [m for m in loaded if m not in _BASE and not m.startswith("hermetic.store")]
    assert above == []


_LOG_FORMATS = (
    "hermetic.translog",
    "hermetic.translog.merkle",
    "hermetic.translog.note",
    "hermetic.translog.checkpoint",
    "hermetic.translog.release",
)
"""The log's sans-IO formats (hashing, notes, checkpoints, statements): the persistence
anchor (issue 10 item 5) hashes its state with the log's Merkle code and signs state
statements in the log's envelope. The log's client, server and store stay out."""


def test_persistence_core_loads_only_the_base_layer() -> None:
    """The persistence core is sans-IO: errors, CBOR, the store's checks and the log's
    formats, nothing of the log's I/O, the channel, the runtime or the proxy (the enclave
    service wires those)."""
    loaded = _loaded_with_every_submodule("hermetic.persistence")
    assert "hermetic.persistence.keyring" in loaded
    allowed = (*_BASE, "hermetic.cbor", *_LOG_FORMATS)
    above = [
        m
        for m in loaded
        if m not in allowed and not m.startswith(("hermetic.store", "hermetic.persistence"))
    ]
    assert above == []
