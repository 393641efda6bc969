"""The Nitro Secure Module: one client, two backends, and the emulated module.

Enclave code calls :class:`NSMClient` (``NSMClient.open()``); on Nitro hardware it talks to
``/dev/nsm`` (:class:`DeviceBackend`), in the local emulator to the launcher's
:class:`EmulatedNSM` over a Unix socket (:class:`SocketBackend`). Both speak the real NSM
CBOR messages (:mod:`hermetic.nsm.messages`). The emulated module signs documents with the
dev PKI (:class:`DevPKI`), shaped like AWS's, whose root only verifiers told to trust it
accept. See ``docs/nsm.md``.
"""

from __future__ import annotations

from hermetic.nsm.client import Attester, Backend, NSMClient, NSMDescription, PCRState
from hermetic.nsm.device import DeviceBackend
from hermetic.nsm.emulator import EmulatedNSM
from hermetic.nsm.messages import ErrorCode
from hermetic.nsm.pki import DevPKI, SigningCredentials, fingerprint, pki_dir, root_path
from hermetic.nsm.server import SOCKET_ENV, SocketBackend, serve_forever, start_server

__all__ = [
    "SOCKET_ENV",
    "Attester",
    "Backend",
    "DevPKI",
    "DeviceBackend",
    "EmulatedNSM",
    "ErrorCode",
    "NSMClient",
    "NSMDescription",
    "PCRState",
    "SigningCredentials",
    "SocketBackend",
    "fingerprint",
    "pki_dir",
    "root_path",
    "serve_forever",
    "start_server",
]
