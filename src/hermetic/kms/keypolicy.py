"""Least-privilege key policies for a release: the key goes to that measured image only.

A publisher releases an image (PCR0/1/2, logged with its endorsement); the KMS key that
protects the service's data should be released to exactly that image and nothing else. The
policy written here has two statements:

* ``EnclaveKeyRelease``: ``kms:Decrypt`` and ``kms:GenerateDataKey`` only (no ``kms:*``),
  conditioned with ``StringEqualsIgnoreCase`` on ``kms:RecipientAttestation:ImageSha384``
  (= PCR0), ``:PCR1``, ``:PCR2`` and any extra PCRs (e.g. PCR3, the parent's IAM role);
  since a condition on an absent key fails, calls without an attested ``Recipient`` are
  denied too;
* ``KeyAdministration``: describe, policy, alias, enable/disable and deletion actions, and
  nothing that releases or re-wraps key material (no Decrypt, ReEncrypt, GenerateDataKey*,
  and no CreateGrant, which would let an administrator grant itself Decrypt on real AWS).

An administrator who may call ``kms:PutKeyPolicy`` without conditions can still rewrite the
policy and grant itself Decrypt; :func:`rewrite_risks` finds such statements in any policy,
and the CLI prints them as a warning. ``immutable=True`` leaves PutKeyPolicy out (the policy
can then only be put with ``BypassPolicyLockoutSafetyCheck``, and never changed again).

The policy's SHA-256 over canonical JSON is what gets logged and published
(``hermetic.kms-key-policy/v1`` statements in the transparency log).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermetic import jsontext
from hermetic.errors import ReleaseEndorsementFormatError, UsageError
from hermetic.kms.policy import KeyPolicy, canonical_json, policy_digest, wildcard_match

__all__ = [
    "ADMIN_ACTIONS",
    "RELEASE_ACTIONS",
    "ReleaseReference",
    "load_release_reference",
    "policy_sha256",
    "release_key_policy",
    "rewrite_risks",
]

RELEASE_ACTIONS = ("kms:Decrypt", "kms:GenerateDataKey")
ADMIN_ACTIONS = (
    "kms:DescribeKey",
    "kms:GetKeyPolicy",
    "kms:PutKeyPolicy",
    "kms:ListAliases",
    "kms:ListResourceTags",
    "kms:CreateAlias",
    "kms:UpdateAlias",
    "kms:DeleteAlias",
    "kms:UpdateKeyDescription",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:EnableKey",
    "kms:DisableKey",
    "kms:ScheduleKeyDeletion",
    "kms:CancelKeyDeletion",
)
_PCR_HEX = re.compile(r"[0-9a-f]{96}")
_MAX_PCR = 31


@dataclass(frozen=True)
class ReleaseReference:
    """The reference values a key is bound to: PCRs (index -> lower-case hex)."""

    pcrs: Mapping[int, str]
    service: str | None = None
    version: str | None = None

    def __post_init__(self) -> None:
        checked: dict[int, str] = {}
        for index, value in dict(self.pcrs).items():
            if not isinstance(index, int) or not 0 <= index <= _MAX_PCR:
                raise UsageError(f"PCR index: expected 0..{_MAX_PCR}, got {index!r}")
            hex_value = str(value).lower()
            if not _PCR_HEX.fullmatch(hex_value):
                raise UsageError(
                    f"PCR{index}: expected 96 hex characters (SHA-384), got {str(value)[:100]!r}"
                )
            checked[index] = hex_value
        if 0 not in checked:
            raise UsageError("PCR0: a key policy for a release must pin PCR0 (ImageSha384)")
        if int(checked[0], 16) == 0:
            raise UsageError("PCR0: all zero is a debug-mode enclave, not a release")
        object.__setattr__(self, "pcrs", dict(sorted(checked.items())))


def load_release_reference(data: bytes | str | Path) -> ReleaseReference:
    """Read PCRs from a release endorsement, a signed statement or a bare statement (JSON).

    Tolerant of the shapes ``hermetic.translog.release`` writes: the statement may sit at
    the top level, under ``statement``, or under ``entry.statement``. The endorsement is not
    verified here (``hermetic release verify`` does that); only its PCRs are read.
    """
    raw = data.read_bytes() if isinstance(data, Path) else data
    tree = jsontext.loads(raw, what="endorsement", error=ReleaseEndorsementFormatError)
    statement = _find_statement(tree)
    if statement is None:
        raise ReleaseEndorsementFormatError(
            "endorsement: no release statement with pcr0 found (looked at the top level, "
            "statement and entry.statement)"
        )
    pcrs: dict[int, str] = {}
    for index in (0, 1, 2):
        value = statement.get(f"pcr{index}")
        if not isinstance(value, str):
            raise ReleaseEndorsementFormatError(
                f"endorsement statement.pcr{index}: expected hex text, got {value!r}"
            )
        pcrs[index] = value
    try:
        return ReleaseReference(
            pcrs=pcrs,
            service=_opt_text(statement.get("service")),
            version=_opt_text(statement.get("version")),
        )
    except UsageError as exc:
        raise ReleaseEndorsementFormatError(f"endorsement statement: {exc}") from None


def release_key_policy(
    release: ReleaseReference,
    *,
    account: str,
    principal: str | None = None,
    admin_principal: str | None = None,
    immutable: bool = False,
) -> dict[str, Any]:
    """The least-privilege key policy for ``release`` (a JSON-ready dict)."""
    if not re.fullmatch(r"\d{12}", account):
        raise UsageError(f"account: expected a 12-digit AWS account id, got {account!r}")
    root = f"arn:aws:iam::{account}:root"
    conditions = {
        "kms:RecipientAttestation:ImageSha384": release.pcrs[0],
        **{
            f"kms:RecipientAttestation:PCR{index}": value
            for index, value in release.pcrs.items()
            if index != 0
        },
    }
    admin_actions = [a for a in ADMIN_ACTIONS if not (immutable and a == "kms:PutKeyPolicy")]
    policy_id = "hermetic-release"
    if release.service:
        policy_id += f"-{release.service}" + (f"-{release.version}" if release.version else "")
    policy: dict[str, Any] = {
        "Version": "2012-10-17",
        "Id": re.sub(r"[^A-Za-z0-9._-]", "_", policy_id)[:128],
        "Statement": [
            {
                "Sid": "EnclaveKeyRelease",
                "Effect": "Allow",
                "Principal": {"AWS": principal or root},
                "Action": list(RELEASE_ACTIONS),
                "Resource": "*",
                "Condition": {"StringEqualsIgnoreCase": conditions},
            },
            {
                "Sid": "KeyAdministration",
                "Effect": "Allow",
                "Principal": {"AWS": admin_principal or root},
                "Action": admin_actions,
                "Resource": "*",
            },
        ],
    }
    KeyPolicy.parse(json.dumps(policy))  # what we emit must be what we can read back
    return policy


def rewrite_risks(policy: Mapping[str, Any] | str) -> list[str]:
    """Statements that let some principal call kms:PutKeyPolicy without any condition."""
    text = policy if isinstance(policy, str) else json.dumps(policy)
    parsed = KeyPolicy.parse(text)
    risks = []
    for statement in parsed.statements:
        if statement.effect != "Allow" or statement.conditions:
            continue
        if any(wildcard_match(p, "kms:PutKeyPolicy", ignore_case=True) for p in statement.actions):
            risks.append(
                f"statement {statement.sid!r} lets {', '.join(statement.principals)} call "
                "kms:PutKeyPolicy without conditions: it can rewrite this policy and grant "
                "itself Decrypt"
            )
    return risks


def policy_sha256(policy: Mapping[str, Any]) -> str:
    """SHA-256 hex over the policy's canonical JSON."""
    return policy_digest(canonical_json(policy).decode("utf-8"))


def _find_statement(tree: Any) -> Mapping[str, Any] | None:
    candidates = [tree]
    if isinstance(tree, Mapping):
        candidates.append(tree.get("statement"))
        entry = tree.get("entry")
        if isinstance(entry, Mapping):
            candidates.append(entry.get("statement"))
    for candidate in candidates:
        if isinstance(candidate, Mapping) and "pcr0" in candidate:
            return candidate
    return None


def _opt_text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
