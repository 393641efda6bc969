"""The ``persistence.anchor`` section of the persistence service's runtime config.

Without it the service would have no rollback detection, so a config that lacks it, or
names a value outside its range, is refused at boot with a typed error naming the field
(the enclave tests boot with a valid one).
"""

from __future__ import annotations

from typing import Any

import pytest

from hermetic.errors import PersistenceConfigError
from hermetic.persistence.service import AnchorSettings

VALID = {"log": "127.0.0.1:4601", "log_key": "log+0123abcd+AAAA", "witnesses": ["w+0123abcd+B"]}


def _config(anchor: object) -> dict[str, Any]:
    return {"persistence": {"store_id": "store-eu1", "anchor": anchor}}


def test_defaults_are_deferred_mode_with_a_timer_and_a_five_minute_window() -> None:
    settings = AnchorSettings.from_config(_config(VALID))
    assert settings == AnchorSettings(
        "127.0.0.1:4601", "log+0123abcd+AAAA", ("w+0123abcd+B",), 1, 300, "deferred", 30.0, 64
    )
    anchored = AnchorSettings.from_config(
        _config({**VALID, "mode": "anchored", "max_age": 60, "interval": 0.5, "writes": 1})
    )
    assert (anchored.mode, anchored.max_age, anchored.interval, anchored.writes) == (
        "anchored", 60, 0.5, 1,
    )  # fmt: skip


def test_rejects_a_config_without_an_anchor_section() -> None:
    with pytest.raises(PersistenceConfigError, match=r"config persistence\.anchor: expected an"):
        AnchorSettings.from_config({"persistence": {"store_id": "store-eu1"}})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"log": 4601}, "log"),
        ({"log_key": ""}, "log_key"),
        ({"witnesses": []}, "witnesses"),
        ({"witnesses": ["ok", 3]}, "witnesses"),
        ({"threshold": 2}, "threshold"),
        ({"threshold": True}, "threshold"),
        ({"max_age": 0}, "max_age"),
        ({"mode": "lazy"}, "mode"),
        ({"interval": 0}, "interval"),
        ({"interval": "30"}, "interval"),
        ({"writes": 0}, "writes"),
        ({"extra": 1}, ""),
    ],
)
def test_rejects_each_malformed_anchor_field_naming_it(change: dict[str, Any], field: str) -> None:
    where = "config persistence.anchor" + (f".{field}" if field else "")
    with pytest.raises(PersistenceConfigError) as caught:
        AnchorSettings.from_config(_config({**VALID, **change}))
    assert str(caught.value).startswith(f"{where}: ")
