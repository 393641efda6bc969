"""The hermetic enclave runtime: the app framework, boot and runtime config inside the enclave.

Service code imports :class:`App` from here. :func:`main` is the image's boot entry
(``hermetic-boot.json`` names this module): the launcher's boot stage calls it with the
app directory and it runs :mod:`hermetic.enclave.runtime`.

The app framework is imported lazily (module ``__getattr__``): the trust layer
(:mod:`hermetic.image`) reads :mod:`hermetic.enclave.manifest`, which runs this package's
``__init__``, and building or measuring an image must not load the runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hermetic.enclave.app import App, BoundNSM, EnclaveContext, RuntimeConfig

__all__ = ["App", "BoundNSM", "EnclaveContext", "RuntimeConfig", "main"]

_FROM_APP = frozenset({"App", "BoundNSM", "EnclaveContext", "RuntimeConfig"})


def __getattr__(name: str) -> Any:
    if name in _FROM_APP:
        from hermetic.enclave import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(app_dir: str) -> int:
    """Boot the enclave runtime for the app in ``app_dir`` (imported lazily)."""
    from hermetic.enclave.runtime import main as run_runtime

    return run_runtime(app_dir)
