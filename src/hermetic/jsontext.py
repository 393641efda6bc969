"""Strict JSON, and the one text rule it shares with the CBOR decoder.

Why this module exists: hermetic reads JSON from parties it does not trust (log entries,
release statements and endorsements, trust and policy files, KMS key policies and request
bodies, runtime config, Rekor bundles, the daemons' state files), and Python's ``json``
module accepts things that make two readers of the same bytes disagree, or that blow up
later far from the parser:

* duplicate object keys: ``json.loads`` keeps the *last* one, so a key policy whose text
  shows a PCR0 condition followed by ``"Condition": {}`` would be read as unconditional,
  while a reader that keeps the first (or a human) sees the condition;
* lone UTF-16 surrogates (``"\\ud800"``): they parse into a ``str`` that is not Unicode text
  and raises ``UnicodeEncodeError`` the moment anything re-encodes it (a canonical form, a
  digest, a log line), an untyped crash in whichever caller touches it first;
* ``NaN``, ``Infinity`` and numbers that overflow to infinity, which no other JSON reader
  agrees on;
* unbounded nesting, which ends in ``RecursionError``.

So every parser of outside JSON goes through :func:`loads`, which rejects all of them (and
invalid UTF-8 when given bytes) with the caller's own
:class:`~hermetic.errors.HermeticError` subclass, exactly as :func:`hermetic.cbor.strict_loads`
does for CBOR. The text rule (:func:`is_unicode_text`: no lone surrogates, so the text
encodes to UTF-8) is the same for both formats; CBOR text strings arrive as UTF-8 bytes,
whose strict decoding already excludes surrogates, and :mod:`hermetic.cbor` names that
failure the same way.

Error messages name the kind of problem and a position, never a decoded value: keys and
values may be application data (config values, policy contents) that must not reach
messages and logs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hermetic.errors import HermeticError

#: Default nesting bound: hermetic's JSON documents are a handful of levels deep (a key
#: policy's Statement[].Condition.Operator.key[] is five).
MAX_DEPTH = 32

#: What builds the caller's error from a message (an error class or a factory).
ErrorFactory = Callable[[str], HermeticError]

_SURROGATE = re.compile("[\ud800-\udfff]")
#: A ``\uD800``..``\uDFFF`` escape (or text that merely looks like one): only where this
#: matches can a parsed string hold a lone surrogate, if the text itself held none.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def is_unicode_text(value: str) -> bool:
    """Whether ``value`` is Unicode text: no lone surrogate, so it encodes to UTF-8.

    A ``str`` can hold code points U+D800..U+DFFF on their own (JSON's ``\\ud800`` escape,
    or bytes decoded with ``surrogateescape``); no UTF-8 encoder accepts them.
    """
    return value.isascii() or _SURROGATE.search(value) is None


class _Rejected(Exception):
    """Raised inside the ``json`` hooks; :func:`loads` turns it into the caller's error."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Rejected("duplicate object key")
    return out


def _no_constant(text: str) -> Any:
    raise _Rejected(f"{text} is not allowed")


def _no_float(text: str) -> Any:
    raise _Rejected("non-integer number (fraction or exponent) is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Rejected("number out of range (overflows to infinity)")
    return value


def decode_utf8(data: bytes | bytearray | memoryview, *, what: str, error: ErrorFactory) -> str:
    """Strict UTF-8 (no surrogates, no overlong forms); the failure names the byte offset."""
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what}: not valid UTF-8 (byte {exc.start})") from None


def loads(
    data: bytes | bytearray | memoryview | str,
    *,
    what: str,
    error: ErrorFactory,
    max_depth: int = MAX_DEPTH,
    allow_floats: bool = False,
) -> Any:
    """Parse exactly one JSON value from ``data`` under the rules in the module docstring.

    Bytes must be UTF-8 (no BOM). Any problem raises ``error(f"{what}: ...")`` naming the
    kind (``not valid UTF-8 (byte N)``, ``not valid JSON (<reason> at line L column C)``,
    ``duplicate object key``, ``lone UTF-16 surrogate in a string``, ``nesting depth above
    N``, ``NaN is not allowed``...), never a decoded key or value. Numbers with a fraction
    or exponent are refused unless ``allow_floats`` (then they must be finite).
    """
    if isinstance(data, bytes | bytearray | memoryview):
        text = decode_utf8(data, what=what, error=error)
    elif isinstance(data, str):
        if not is_unicode_text(data):
            raise error(f"{what}: lone UTF-16 surrogate in a string (not Unicode text)")
        text = data
    else:
        raise error(f"{what}: expected JSON text, got {type(data).__name__}")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_unique_pairs,
            parse_constant=_no_constant,
            parse_float=_finite_float if allow_floats else _no_float,
        )
    except _Rejected as exc:
        raise error(f"{what}: {exc}") from None
    except json.JSONDecodeError as exc:
        # exc.msg is one of json's fixed phrases ("Expecting value"...), never input text.
        raise error(
            f"{what}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise error(f"{what}: nesting depth above {max_depth}") from None
    except ValueError:  # int() refusing a number of more than 4300 digits
        raise error(f"{what}: integer with too many digits") from None
    # The walk is only needed where the text allows a problem: more brackets than the
    # depth bound, or something that looks like a surrogate escape (most documents have
    # neither, and then skip it).
    deep = text.count("[") + text.count("{") > max_depth
    if deep or _SURROGATE_ESCAPE.search(text) is not None:
        problem = _problem(value, max_depth)
        if problem is not None:
            raise error(f"{what}: {problem}")
    return value


def _problem(value: Any, max_depth: int) -> str | None:
    """Walk the parsed value once (iteratively): nesting depth and the text rule."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not is_unicode_text(item):
                return "lone UTF-16 surrogate in a string (not Unicode text)"
        elif isinstance(item, dict):
            if depth >= max_depth:
                return f"nesting depth above {max_depth}"
            for key, child in item.items():
                if not is_unicode_text(key):
                    return "lone UTF-16 surrogate in an object key (not Unicode text)"
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth >= max_depth:
                return f"nesting depth above {max_depth}"
            stack.extend((child, depth + 1) for child in item)
    return None


def load_file(
    path: str | Path,
    *,
    what: str,
    error: ErrorFactory,
    max_depth: int = MAX_DEPTH,
    allow_floats: bool = False,
) -> Any:
    """Read and :func:`loads` a JSON file; "cannot read" and "not valid" are both ``error``.

    Trust files, client policies and the like are all loaded this way, so every such
    message reads the same whichever file it was.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    return loads(
        data, what=f"{what} {path}", error=error, max_depth=max_depth, allow_floats=allow_floats
    )


def typed_document(
    value: object, *, where: str, type_: str, fields: set[str], error: ErrorFactory
) -> dict[str, Any]:
    """``value`` as a JSON object with exactly ``fields``, whose ``type`` is ``type_``.

    The head every versioned policy document (access, admission) is checked with before
    its own fields; ``error`` builds the document's own error from the message.
    """
    if not isinstance(value, dict):
        raise error(f"{where}: expected an object, got {type(value).__name__}")
    if set(value) != fields:
        raise error(f"{where}: expected fields {sorted(fields)}, got {sorted(map(str, value))}")
    if value["type"] != type_:
        raise error(f"{where}.type: expected {type_!r}, got {value['type']!r:.80}")
    return value
