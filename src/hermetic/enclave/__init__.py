"""The hermetic enclave runtime: the app framework, boot and runtime config inside the enclave."""

from hermetic.enclave.app import App, EnclaveContext, RuntimeConfig

__all__ = ["App", "EnclaveContext", "RuntimeConfig"]
