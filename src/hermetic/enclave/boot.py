"""The boot handshake between an enclave and its parent, shared by both sides.

Two parent vsock ports matter at boot:

* ``CONFIG_PORT`` (9001): the enclave connects, the parent sends two frames, the runtime
  config bundle and then the release endorsement (``hermetic.endorsement/v1`` JSON, what
  ``hermetic release publish`` writes); an empty frame means "none". The enclave answers
  one frame, a CBOR map ``{"ok": bool, "reason": text, "digest": bstr|null}``. A refusal
  (unsigned or tampered bundle, unreadable endorsement) is reported here before the
  enclave exits, so the launcher can say *why* it did not start. The enclave does not
  verify the endorsement (it cannot know whom its clients trust): it only forwards it in
  every evidence bundle, and clients verify it. A third frame follows: the AWS
  credentials the parent forwards (CBOR ``{"access_key_id": text, "secret_access_key":
  text, "session_token": text|null}``, empty for none), as a Nitro parent forwards its
  instance role's credentials, so the enclave can sign its own KMS requests. The parent
  holds them only in memory; nothing writes them to disk or to a log.
* ``READY_PORT`` (9000): the enclave sends the single byte ``0xB7`` once its service
  ports are listening, exactly the heartbeat nitro-cli waits for
  (``ENCLAVE_READY_VSOCK_PORT``, ``HEART_BEAT``).

The status message codec below is sans-IO; the runtime and the launcher do the I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import cbor2

from hermetic.cbor import strict_loads
from hermetic.errors import FrameFormatError, UsageError
from hermetic.kms.client import KMSCredentials

READY_PORT = 9000
READY_BYTE = b"\xb7"
CONFIG_PORT = 9001
EGRESS_PORT = 8000
"""Parent port of the proxy's egress listener (vsock-proxy's default, 8000)."""

EXIT_REFUSED = 3
"""Exit status of an enclave runtime that refused to start (bad config, bad manifest)."""


@dataclass(frozen=True)
class BootStatus:
    ok: bool
    reason: str
    digest: bytes | None


def encode_status(status: BootStatus) -> bytes:
    return cbor2.dumps({"ok": status.ok, "reason": status.reason, "digest": status.digest})


def decode_status(data: bytes) -> BootStatus:
    value = strict_loads(data, what="boot status", error=FrameFormatError)
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("ok"), bool)
        or not isinstance(value.get("reason"), str)
        or not isinstance(value.get("digest"), bytes | None)
    ):
        raise FrameFormatError("boot status: expected {ok: bool, reason: text, digest: bytes|null}")
    return BootStatus(value["ok"], value["reason"], value["digest"])


CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
"""Where the parent reads the credentials it forwards (``--aws-credentials-env``)."""
_CREDENTIAL_FIELDS = ("access_key_id", "secret_access_key", "session_token")
MAX_CREDENTIAL_FIELD = 4096


def credentials_from_environment(environ: Mapping[str, str]) -> KMSCredentials:
    """The credentials to forward, from ``AWS_ACCESS_KEY_ID``/``..._SECRET_...``/``..._TOKEN``.

    Raises UsageError naming the missing variable (never a value).
    """
    key_name, secret_name, token_name = CREDENTIAL_VARIABLES
    key_id, secret = environ.get(key_name), environ.get(secret_name)
    for name, value in ((key_name, key_id), (secret_name, secret)):
        if not value:
            raise UsageError(f"--aws-credentials-env: {name} is not set in the environment")
    return KMSCredentials(str(key_id), str(secret), environ.get(token_name) or None)


def encode_credentials(credentials: KMSCredentials | None) -> bytes:
    """The credentials frame; empty when the parent forwards none."""
    if credentials is None:
        return b""
    values = (credentials.access_key_id, credentials.secret_access_key, credentials.session_token)
    return cbor2.dumps(dict(zip(_CREDENTIAL_FIELDS, values, strict=True)))


def decode_credentials(data: bytes) -> KMSCredentials | None:
    """Parse the credentials frame; FrameFormatError names the field, never its value."""
    if not data:
        return None
    value = strict_loads(data, what="credentials frame", error=FrameFormatError)
    if not isinstance(value, dict) or set(value) != set(_CREDENTIAL_FIELDS):
        raise FrameFormatError(
            "credentials frame: expected a map with access_key_id, secret_access_key and "
            "session_token"
        )
    for name in _CREDENTIAL_FIELDS:
        field = value[name]
        optional = name == "session_token"
        if field is None and optional:
            continue
        if not isinstance(field, str) or not field or len(field) > MAX_CREDENTIAL_FIELD:
            expected = "text or null" if optional else "non-empty text"
            raise FrameFormatError(
                f"credentials frame: {name}: expected {expected} of at most "
                f"{MAX_CREDENTIAL_FIELD} characters"
            )
    return KMSCredentials(
        value["access_key_id"], value["secret_access_key"], value["session_token"]
    )
