"""Strict CBOR decoding and deterministic encoding shared by every hermetic format.

Why this module exists: several formats (the attestation document, the evidence bundle,
NSM messages, runtime config bundles, the boot status, nitro-cli's PCR signatures) are
CBOR that arrives from a party we do not trust. Each needs the same guarantees from the
decoder, and getting any one of them wrong in one place is a parser bug an attacker can
use, so they are written once here:

* exactly one CBOR item: trailing bytes are an error, not silently ignored (``cbor2.loads``
  ignores them);
* no semantic tags interpreted: dates, bignums, shared references (which can build cycles),
  string references and sets decode as opaque :class:`cbor2.CBORTag` values, so a caller's
  type checks reject them instead of receiving a coerced ``int`` or ``datetime``;
* bounded nesting depth and no duplicate map keys;
* text strings are Unicode text: strictly valid UTF-8, so no lone surrogates (the rule
  :func:`hermetic.jsontext.is_unicode_text` states for JSON), both when decoding and when
  encoding, with a message that says so;
* any decoder failure becomes the caller's own :class:`~hermetic.errors.HermeticError`
  subclass, with the caller's message prefix, so only typed errors escape;
* error messages name the kind of problem, never a decoded value: cbor2's own text can
  quote one (``Duplicate map key: 'k'``), and the decoded data may be application data
  (RPC arguments, config values) that must not reach messages and logs.

cbor2 does the parsing; this module only configures it and maps its errors.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import cbor2

from hermetic.errors import HermeticError

#: Default nesting bound: every hermetic format is at most a few levels deep.
MAX_DEPTH = 8

#: Tags cbor2 would otherwise interpret (RFC 8949 and IANA registrations cbor2 implements).
SEMANTIC_TAGS: tuple[int, ...] = (
    *(0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 100),
    *(256, 258, 260, 261, 1004, 55799),
)

#: What builds the caller's error from a message: an error class, or a factory for classes
#: that take more arguments (``NSMError(message, code)``).
ErrorFactory = Callable[[str], HermeticError]


def _opaque(tag: int) -> Callable[[Any, bool], Any]:
    def keep(value: Any, immutable: bool) -> Any:
        return cbor2.CBORTag(tag, value)

    return keep


#: Built once (a read-only mapping, not per call): every hermetic decode passes it.
_OPAQUE_DECODERS: Mapping[int, Callable[[Any, bool], Any]] = MappingProxyType(
    {tag: _opaque(tag) for tag in SEMANTIC_TAGS}
)


#: A text string whose bytes are not strictly valid UTF-8 (which excludes encoded
#: surrogates, overlong forms and truncated sequences).
_NOT_UTF8 = "text string is not valid UTF-8"

#: The item kind cbor2 names at the start of its messages ("error decoding map: ...").
_DECODING_KIND = re.compile(r"error decoding ([a-z ]+?)(?::|$)")


def _problem(exc: BaseException, max_depth: int) -> str:
    """What went wrong, by kind only: cbor2's message is matched, never echoed."""
    text = str(exc)
    if isinstance(exc.__cause__, UnicodeDecodeError):
        return _NOT_UTF8
    if isinstance(exc, RecursionError) or "nesting depth" in text:
        return f"nesting depth above {max_depth}"
    if "duplicate map key" in text.lower():
        return "duplicate map key"
    if "premature end of stream" in text:
        return "truncated"
    if "break code" in text:
        return "unexpected break code"
    kind = _DECODING_KIND.match(text)
    if kind is not None:
        return f"malformed {kind.group(1)}"
    return f"undecodable ({type(exc).__name__})"


def strict_loads(data: bytes, *, what: str, error: ErrorFactory, max_depth: int = MAX_DEPTH) -> Any:
    """Decode exactly one CBOR item from ``data`` under the rules in the module docstring.

    Any problem raises ``error(f"{what}: ...")``: ``not valid CBOR (<kind>)`` for
    undecodable bytes (``truncated``, ``duplicate map key``, ``nesting depth above N``,
    ``text string is not valid UTF-8``, ``malformed <item>``...; never a decoded value)
    and ``N trailing byte(s) after the CBOR item`` when more than one item is present.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise error(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(
        stream,
        semantic_decoders=_OPAQUE_DECODERS,
        max_depth=max_depth,
        allow_duplicate_keys=False,
        # cbor2 >= 6 reads ahead in blocks and leaves the stream at the item's end, so the
        # trailing-bytes check below holds; reading byte by byte cost ~40% of a decode.
    )
    try:
        value = decoder.decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise error(f"{what}: not valid CBOR ({_problem(exc, max_depth)})") from None
    if stream.tell() != len(data):
        raise error(f"{what}: {len(data) - stream.tell()} trailing byte(s) after the CBOR item")
    return value


def canonical_dumps(value: Any, *, what: str, error: ErrorFactory) -> bytes:
    """The deterministic encoding (RFC 8949 §4.2.1) of ``value``, or ``error`` if it has none."""
    try:
        data: bytes = cbor2.dumps(value, canonical=True)
    except UnicodeEncodeError:
        # Only a lone surrogate makes a str unencodable; the message must not quote it.
        raise error(f"{what}: cannot encode (a text string has a lone UTF-16 surrogate)") from None
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise error(f"{what}: cannot encode ({exc})") from None
    return data
