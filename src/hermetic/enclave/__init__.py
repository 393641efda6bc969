"""The hermetic enclave runtime: the app framework, boot and runtime config inside the enclave.

Service code imports :class:`App` from here. :func:`main` is the image's boot entry
(``hermetic-boot.json`` names this module): the launcher's boot stage calls it with the
app directory and it runs :mod:`hermetic.enclave.runtime`.
"""

from hermetic.enclave.app import App, BoundNSM, EnclaveContext, RuntimeConfig

__all__ = ["App", "BoundNSM", "EnclaveContext", "RuntimeConfig", "main"]


def main(app_dir: str) -> int:
    """Boot the enclave runtime for the app in ``app_dir`` (imported lazily)."""
    from hermetic.enclave.runtime import main as run_runtime

    return run_runtime(app_dir)
