from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from helpers import VECTORS, stop_process

if TYPE_CHECKING:
    from apps.probe.harness import Release
    from test_translog_service_support import PostgresServer


ENCLAVE_MODULES = frozenset(
    {
        "test_cli_options",
        "test_config_cli",
        "test_demo",
        "test_gateway_enclave",
        "test_interop_running_service",
        "test_kms_enclave",
        "test_persistence_enclave",
        "test_release",
        "test_runtime_boot_config",
        "test_runtime_hostile",
        "test_runtime_hostile_limits",
        "test_runtime_launcher",
        "test_runtime_proxy",
    }
)
"""Modules whose tests start sandboxed enclaves. ``make test`` runs the suite on two
xdist workers with ``--dist loadgroup``; each of these modules is one group, so its
module-scoped images and stacks are built once, on one worker, while the two workers
share the modules between them. Enclaves of parallel tests may have the same CID (each
test has its own state directory), never the same sandbox uid (leased host-wide,
:mod:`hermetic.launcher.uids`)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__ in ENCLAVE_MODULES:
            item.add_marker(pytest.mark.xdist_group(_group(item)))


def _group(item: pytest.Item) -> str:
    """The module's name, or what its ``xdist_group_of(item)`` says: a module whose tests
    fall in independent halves (each with its own module-scoped stack) may split them, so
    the two workers share it instead of one worker running it all."""
    choose = getattr(item.module, "xdist_group_of", None)
    name: str = item.module.__name__  # type: ignore[union-attr]
    return f"{name}:{choose(item)}" if callable(choose) else name


@pytest.fixture(scope="session")
def vectors() -> Path:
    """``tests/vectors``: the published vectors every format is tested against.

    They live in the repository (each folder's README gives source and licence), so a
    clone alone runs the suite.
    """
    return VECTORS


@pytest.fixture(autouse=True)
def _isolated_state(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test gets its own dev-state directory, never the developer's."""
    monkeypatch.setenv("HERMETIC_STATE_DIR", str(tmp_path_factory.mktemp("state")))


# --- runtime tests: the probe app, released to a dev log, and enclave clean-up ------------


@pytest.fixture(scope="module")
def operator() -> ed25519.Ed25519PrivateKey:
    """The operator key the module's probe image trusts for runtime config."""
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory, operator: ed25519.Ed25519PrivateKey) -> Release:
    """The probe app built with ``operator``'s key and published to a fresh dev log."""
    from apps.probe.harness import build_probe, release

    directory = tmp_path_factory.mktemp("probe")
    return release(build_probe(directory, operator), directory)


@pytest.fixture
def no_leftover_enclaves() -> Iterator[None]:
    """Terminate every enclave the test started (use with ``pytest.mark.usefixtures``)."""
    yield
    from apps.probe.harness import stop_all

    stop_all()


@pytest.fixture
def background() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts (append them); on teardown each is stopped (SIGTERM, then
    killed after 15 s) and so is every enclave the test left running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        stop_process(process)
    from apps.probe.harness import stop_all

    stop_all()


# --- storage: one throw-away PostgreSQL server for the whole session ----------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server (initdb + pg_ctl in a temp dir, Unix socket only), shared
    by every test that asks; each test takes its own database with ``new_database()``.
    Skipped when the server binaries are not installed."""
    from test_translog_service_support import postgres_server

    with postgres_server() as server:
        yield server
