"""Where hermetic keeps local state (dev PKI, emulator sockets, local logs and keys).

Everything lives under one directory so a developer can inspect or wipe it:
``$HERMETIC_STATE_DIR`` if set, else ``$XDG_STATE_HOME/hermetic``, else
``~/.local/state/hermetic``.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """The dev-state directory, created (mode 0700) on first use."""
    explicit = os.environ.get("HERMETIC_STATE_DIR")
    if explicit:
        base = Path(explicit)
    else:
        xdg = os.environ.get("XDG_STATE_HOME")
        base = Path(xdg) / "hermetic" if xdg else Path.home() / ".local" / "state" / "hermetic"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return base
