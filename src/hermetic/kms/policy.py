"""The part of the AWS key-policy language that decides attested key release.

A key policy is the relying party's *policy* in RATS terms: it says which evidence (PCRs in
a verified attestation document) may receive a key. The local KMS server evaluates it the
way AWS documents for key policies, restricted to the subset that matters here:

* ``Statement``: a list (or one object) of statements with ``Effect`` ``Allow``/``Deny``;
  an explicit Deny wins, and anything not allowed is denied (default deny);
* ``Principal``: ``"*"`` or ``{"AWS": ARN | [ARN, ...]}``. The local server has one account
  (:attr:`Caller.account`); ``"*"``, the account id and ``arn:aws:iam::<account>:root`` match
  every caller of that account, and any other ARN matches a caller whose access key id equals
  the ARN's last path segment (``arn:aws:iam::111122223333:role/enclave`` matches the access
  key id ``enclave``) or the whole ARN. That stands in for IAM, which the local server has not;
* ``Action``: ``kms:Decrypt`` or a wildcard (``kms:*``, ``kms:Generate*``), case-insensitive;
* ``Resource``: ``*`` or a pattern matched against the key ARN;
* ``Condition``: ``StringEquals``, ``StringEqualsIgnoreCase``, ``StringLike`` (and their
  ``...IfExists`` forms) on any condition key; the server supplies
  ``kms:RecipientAttestation:ImageSha384`` (= PCR0), ``kms:RecipientAttestation:PCR<n>``
  (lower-case hex), ``kms:EncryptionContext:<key>`` and ``kms:CallerAccount``. A condition on
  a key absent from the request fails, so a policy with attestation conditions denies calls
  that carry no ``Recipient``.

Anything outside this subset (``NotAction``, ``NotPrincipal``, other operators) is rejected
when the policy is stored rather than ignored: a policy that is read differently from how
AWS reads it would fail open. For the same reason the document is parsed strictly
(:mod:`hermetic.jsontext`): a duplicate key at any depth is a malformed policy, not "the
last one wins". Evaluation is a pure function returning a :class:`Decision`
whose ``reason`` names the failed condition (key, expected, actual), for the denial log.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hermetic import jsontext
from hermetic.errors import KeyPolicyFormatError

__all__ = [
    "Caller",
    "Condition",
    "Decision",
    "KeyPolicy",
    "Statement",
    "canonical_json",
    "default_key_policy",
    "normalise_condition_key",
    "policy_digest",
    "wildcard_match",
]

MAX_POLICY_BYTES = 32768  # AWS's key-policy size limit
_OPERATORS = ("StringEquals", "StringEqualsIgnoreCase", "StringLike")
_ANY = "*"


@dataclass(frozen=True)
class Caller:
    """Who is calling, as the local server sees it (from the SigV4 credential scope)."""

    access_key_id: str
    account: str


@dataclass(frozen=True)
class Condition:
    """One ``Operator: {key: values}`` test; any value matching satisfies it."""

    operator: str
    key: str
    values: tuple[str, ...]
    if_exists: bool = False

    def failure(self, context: Mapping[str, str]) -> str | None:
        """None when satisfied, else a one-line description of what did not match."""
        actual = context.get(normalise_condition_key(self.key))
        name = self.operator + ("IfExists" if self.if_exists else "")
        if actual is None:
            if self.if_exists:
                return None
            return f"{name} {self.key}: expected {list(self.values)}, got <absent>"
        if any(_string_match(self.operator, expected, actual) for expected in self.values):
            return None
        return f"{name} {self.key}: expected {list(self.values)}, got {actual!r}"


@dataclass(frozen=True)
class Statement:
    sid: str
    effect: str
    principals: tuple[str, ...]
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    conditions: tuple[Condition, ...]

    def applies_to(self, caller: Caller, action: str, resource: str) -> bool:
        return (
            any(_principal_matches(p, caller) for p in self.principals)
            and any(wildcard_match(pattern, action, ignore_case=True) for pattern in self.actions)
            and any(
                wildcard_match(pattern, resource, ignore_case=False) for pattern in self.resources
            )
        )

    def condition_failure(self, context: Mapping[str, str]) -> str | None:
        for condition in self.conditions:
            failure = condition.failure(context)
            if failure is not None:
                return failure
        return None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


@dataclass(frozen=True)
class KeyPolicy:
    """A parsed, validated key policy; ``document`` is the JSON text as stored."""

    document: str
    statements: tuple[Statement, ...]

    @classmethod
    def parse(cls, document: str) -> KeyPolicy:
        """Validate ``document``; raise :class:`KeyPolicyFormatError` naming what is wrong."""
        if len(document.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
            raise KeyPolicyFormatError(
                f"Policy: {len(document)} characters, expected at most {MAX_POLICY_BYTES}"
            )
        tree = _load(document)
        if not isinstance(tree, dict):
            raise KeyPolicyFormatError("Policy: expected a JSON object")
        version = tree.get("Version", "2012-10-17")
        if version not in ("2012-10-17", "2008-10-17"):
            raise KeyPolicyFormatError(f"Policy.Version: expected '2012-10-17', got {version!r}")
        unknown = set(tree) - {"Version", "Id", "Statement"}
        if unknown:
            raise KeyPolicyFormatError(f"Policy: unsupported top-level fields {sorted(unknown)}")
        raw = tree.get("Statement")
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise KeyPolicyFormatError("Policy.Statement: expected a non-empty list")
        statements = tuple(_parse_statement(n, s) for n, s in enumerate(raw))
        return cls(document=document, statements=statements)

    def evaluate(
        self, caller: Caller, action: str, resource: str, context: Mapping[str, str]
    ) -> Decision:
        """Explicit Deny wins, then any Allow, else default deny; ``reason`` says why."""
        context = {normalise_condition_key(k): v for k, v in context.items()}
        allowed_by: str | None = None
        nearest_failure: str | None = None
        for statement in self.statements:
            if not statement.applies_to(caller, action, resource):
                continue
            failure = statement.condition_failure(context)
            if statement.effect == "Deny":
                if failure is None:
                    return Decision(False, f"explicit deny by statement {statement.sid!r}")
                continue
            if failure is None:
                allowed_by = allowed_by or statement.sid
            elif nearest_failure is None:
                nearest_failure = f"statement {statement.sid!r} condition failed: {failure}"
        if allowed_by is not None:
            return Decision(True, f"allowed by statement {allowed_by!r}")
        if nearest_failure is not None:
            return Decision(False, nearest_failure)
        return Decision(
            False, f"no statement allows {action} for {caller.access_key_id} on {resource}"
        )


def default_key_policy(account: str) -> str:
    """What AWS attaches when CreateKey has no Policy: the account root may do ``kms:*``."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [
                {
                    "Sid": "Enable IAM User Permissions",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        },
        indent=2,
    )


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8: the bytes a policy digest covers."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if not jsontext.is_unicode_text(text):
        raise KeyPolicyFormatError("Policy: a string holds a lone UTF-16 surrogate")
    return text.encode()


def policy_digest(document: str) -> str:
    """SHA-256 (hex) of a policy's canonical JSON: what gets logged and published."""
    return hashlib.sha256(canonical_json(_load(document))).hexdigest()


def _load(document: str | bytes) -> Any:
    """Strict JSON (:func:`hermetic.jsontext.loads`): a duplicate key at any depth, a lone
    surrogate or NaN is a malformed policy, since ``json.loads`` would keep only the last of
    two ``Condition`` keys and so read a policy differently from what its text shows."""
    return jsontext.loads(document, what="Policy", error=KeyPolicyFormatError, allow_floats=True)


def normalise_condition_key(key: str) -> str:
    """Condition key names are case-insensitive, except the encryption-context key part."""
    prefix = "kms:encryptioncontext:"
    if key.lower().startswith(prefix):
        return prefix + key[len(prefix) :]
    return key.lower()


def _parse_statement(index: int, raw: Any) -> Statement:
    where = f"Statement[{index}]"
    if not isinstance(raw, dict):
        raise KeyPolicyFormatError(f"{where}: expected a JSON object")
    unsupported = set(raw) - {"Sid", "Effect", "Principal", "Action", "Resource", "Condition"}
    if unsupported:
        raise KeyPolicyFormatError(f"{where}: unsupported fields {sorted(unsupported)}")
    sid = raw.get("Sid", str(index))
    if not isinstance(sid, str):
        raise KeyPolicyFormatError(f"{where}.Sid: expected a string")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise KeyPolicyFormatError(f"{where}.Effect: expected 'Allow' or 'Deny', got {effect!r}")
    return Statement(
        sid=sid,
        effect=effect,
        principals=_parse_principal(where, raw.get("Principal")),
        actions=_string_list(f"{where}.Action", raw.get("Action")),
        resources=_string_list(f"{where}.Resource", raw.get("Resource")),
        conditions=_parse_conditions(where, raw.get("Condition", {})),
    )


def _parse_principal(where: str, raw: Any) -> tuple[str, ...]:
    if raw == _ANY:
        return (_ANY,)
    if not isinstance(raw, dict) or set(raw) != {"AWS"}:
        raise KeyPolicyFormatError(
            f"{where}.Principal: expected '*' or {{\"AWS\": ARN or [ARN, ...]}}, got {raw!r}"
        )
    return _string_list(f"{where}.Principal.AWS", raw["AWS"])


def _parse_conditions(where: str, raw: Any) -> tuple[Condition, ...]:
    if not isinstance(raw, dict):
        raise KeyPolicyFormatError(f"{where}.Condition: expected a JSON object")
    conditions: list[Condition] = []
    for operator, tests in raw.items():
        base = operator.removesuffix("IfExists")
        if base not in _OPERATORS:
            raise KeyPolicyFormatError(
                f"{where}.Condition: unsupported operator {operator!r}, expected one of "
                f"{list(_OPERATORS)} (optionally ...IfExists)"
            )
        if not isinstance(tests, dict) or not tests:
            raise KeyPolicyFormatError(f"{where}.Condition.{operator}: expected a JSON object")
        for key, values in tests.items():
            conditions.append(
                Condition(
                    operator=base,
                    key=key,
                    values=_condition_values(f"{where}.Condition.{operator}.{key}", values),
                    if_exists=base != operator,
                )
            )
    return tuple(conditions)


def _condition_values(where: str, raw: Any) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else [raw]
    values: list[str] = []
    for item in items:
        if isinstance(item, bool):
            values.append("true" if item else "false")
        elif isinstance(item, str | int | float):
            values.append(str(item))
        else:
            raise KeyPolicyFormatError(f"{where}: expected strings, got {item!r}")
    if not values:
        raise KeyPolicyFormatError(f"{where}: expected at least one value")
    return tuple(values)


def _string_list(where: str, raw: Any) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(i, str) and i for i in items):
        raise KeyPolicyFormatError(f"{where}: expected a string or a list of strings, got {raw!r}")
    return tuple(items)


def _principal_matches(pattern: str, caller: Caller) -> bool:
    if pattern in (_ANY, caller.account, f"arn:aws:iam::{caller.account}:root"):
        return True
    if pattern == caller.access_key_id:
        return True
    if pattern.startswith(f"arn:aws:iam::{caller.account}:"):
        return pattern.rsplit("/", 1)[-1] == caller.access_key_id
    return False


def _string_match(operator: str, expected: str, actual: str) -> bool:
    if operator == "StringEquals":
        return expected == actual
    if operator == "StringEqualsIgnoreCase":
        return expected.casefold() == actual.casefold()
    return wildcard_match(expected, actual, ignore_case=False)


def wildcard_match(pattern: str, value: str, *, ignore_case: bool) -> bool:
    """IAM-style wildcard match of ``value`` against ``pattern``."""
    # IAM wildcards: '*' any run, '?' one character; nothing else is special (unlike fnmatch).
    regex = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    flags = re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL
    return re.fullmatch(regex, value, flags) is not None
