"""The persistence service's sans-IO core: the key hierarchy and sealed records (issue 10).

The persistence service holds the platform's single root key and keeps every byte it
stores in the parent's untrusted record store sealed. This package is the part that
touches no socket, no KMS and no database, so it can be tested with bytes alone:

* :mod:`hermetic.persistence.keys`: the root key, the per-tenant keys derived from it
  (HKDF-SHA256), and the wrapping of each named key's random per-version material;
* :mod:`hermetic.persistence.sealing`: the sealed record format (AES-256-GCM, associated
  data binding store id, tenant, key name, key version, record id and counter);
* :mod:`hermetic.persistence.keyring`: a tenant's keyring (create, rotate, retire), itself
  kept as a sealed record;
* :mod:`hermetic.persistence.admin`, :mod:`~hermetic.persistence.policy` and
  :mod:`~hermetic.persistence.audit`: the tenant admin's signed requests, the access policy
  document and the hash-chained audit trail (formats and checks, no I/O).

:mod:`hermetic.persistence.service` builds the service's operations on it (the root key
from KMS at boot, tenant keyrings kept in the record store with compare-and-set) behind two
small protocols for KMS and the store; the enclave app in ``services/persistence`` wires
them to the attested KMS client and the proxy's egress. :mod:`hermetic.persistence.anchor`
anchors the whole store state in the witnessed transparency log and checks the store
against it (rollback detection, item 5). This is a platform package that imports only the
base layer (:mod:`hermetic.errors`, :mod:`hermetic.cbor`, :mod:`hermetic.store`), the
log's sans-IO formats (:mod:`hermetic.translog` hashing, checkpoints, statements) and
``cryptography`` (``tests/test_layering.py`` checks it). See ``docs/persistence.md``.
"""

from hermetic.persistence.keyring import (
    MAX_KEY_NAMES,
    MAX_KEY_VERSIONS,
    Keyring,
    KeyringState,
    NamedKey,
    parse_keyring_state,
)
from hermetic.persistence.keys import (
    KEY_SIZE,
    DataKey,
    RootKey,
    TenantKey,
    check_key_name,
    check_store_id,
    check_tenant,
)
from hermetic.persistence.sealing import (
    MAX_PLAINTEXT_SIZE,
    OVERHEAD,
    SealedHeader,
    open_record,
    parse_header,
    seal_record,
)

__all__ = [
    "KEY_SIZE",
    "MAX_KEY_NAMES",
    "MAX_KEY_VERSIONS",
    "MAX_PLAINTEXT_SIZE",
    "OVERHEAD",
    "DataKey",
    "Keyring",
    "KeyringState",
    "NamedKey",
    "RootKey",
    "SealedHeader",
    "TenantKey",
    "check_key_name",
    "check_store_id",
    "check_tenant",
    "open_record",
    "parse_header",
    "parse_keyring_state",
    "seal_record",
]
