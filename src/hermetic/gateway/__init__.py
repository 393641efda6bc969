"""The enclave gateway (issue 11): the attestation deputy with auditable admission.

A client attests the gateway once; the gateway attests every backend on its behalf,
against an **admission policy** that is logged and travels in the gateway's signed runtime
config, and answers every request with a **receipt** naming the backend release that
produced it. See ``docs/gateway.md``.

* :mod:`~hermetic.gateway.admission`: the admission policy, its digest, the logged check;
* :mod:`~hermetic.gateway.settings`: the ``gateway`` section of the runtime config;
* :mod:`~hermetic.gateway.receipt`: receipts, the receipt key's binding, offline checks;
* :mod:`~hermetic.gateway.backends`: hints, admission of backend instances, pools;
* :mod:`~hermetic.gateway.service`: the request path (route, call, sign a receipt);
* :mod:`~hermetic.gateway.dialer`: the parent's relay to backends' vsock ports;
* :mod:`~hermetic.gateway.client`: the client SDK, :func:`connect_gateway`.

The enclave app is ``services/gateway``.
"""

from __future__ import annotations

from hermetic.gateway.admission import ADMISSION_V1, AdmissionPolicy, ServiceAdmission
from hermetic.gateway.client import GatewayReply, GatewaySession, connect_gateway
from hermetic.gateway.receipt import Receipt, ReceiptsFile, verify_receipt_file

__all__ = [
    "ADMISSION_V1",
    "AdmissionPolicy",
    "GatewayReply",
    "GatewaySession",
    "Receipt",
    "ReceiptsFile",
    "ServiceAdmission",
    "connect_gateway",
    "verify_receipt_file",
]
