from __future__ import annotations

from pathlib import Path

import pytest

from hermetic.paths import shared_dir


@pytest.fixture(scope="session")
def vectors() -> Path:
    """``../shared/vectors``: the published vectors every format is tested against."""
    path = shared_dir() / "vectors"
    if not path.is_dir():
        pytest.fail(f"vectors not found at {path}: set HERMETIC_SHARED to the shared/ folder")
    return path


@pytest.fixture(autouse=True)
def _isolated_state(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test gets its own dev-state directory, never the developer's."""
    monkeypatch.setenv("HERMETIC_STATE_DIR", str(tmp_path_factory.mktemp("state")))
