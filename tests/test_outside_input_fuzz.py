"""Every parser of outside input against hostile text: only typed errors, never a crash.

Each parser gets its own real, valid input (a log entry, an endorsement, a trust file, a
key policy...) with one hostile change drawn by hypothesis: a lone UTF-16 surrogate in a
string or key, invalid UTF-8 bytes, a duplicate key at some depth, or deep nesting
(up to 64 KiB of it). Each such input must be *refused* with a
:class:`~hermetic.errors.HermeticError` subclass (the KMS server answers with the AWS
error shape); arbitrary bytes and text must parse or be refused the same way. A
``UnicodeEncodeError``, ``RecursionError`` or ``KeyError`` escaping any of them is the bug
these tests exist to catch.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermetic.attestation import TrustRoot
from hermetic.cbor import canonical_dumps, strict_loads
from hermetic.client.trust import ClientTrust, ServicePolicy, write_trust_bundle
from hermetic.enclave.config import SIGNING_CONTEXT, parse_bundle, verify_bundle
from hermetic.enclave.manifest import DirectoryFiles, parse_manifest
from hermetic.errors import (
    EvidenceFormatError,
    HermeticError,
    KeyPolicyFormatError,
    MalformedInputError,
    NoteFormatError,
    ReleaseEndorsementFormatError,
    ReleaseFormatError,
    RuntimeConfigFormatError,
)
from hermetic.evidence import EvidenceBundle
from hermetic.jsontext import MAX_DEPTH
from hermetic.kms.keypolicy import ReleaseReference, load_release_reference, release_key_policy
from hermetic.kms.policy import KeyPolicy
from hermetic.kms.server import KMSService, ServerThread
from hermetic.kms.store import KeyStore
from hermetic.translog.checkpoint import Checkpoint, CosignatureSigner, sign_checkpoint
from hermetic.translog.client import LogClient
from hermetic.translog.daemons import Monitor
from hermetic.translog.note import Ed25519NoteSigner, generate_key, open_note, split_note
from hermetic.translog.rekor import trusted_logs, verify_rekor_entry
from hermetic.translog.release import (
    Endorsement,
    ReleaseStatement,
    SignedStatement,
    TrustBundle,
    generate_publisher_key,
    load_publisher_key,
    sign_statement,
)
from hermetic.translog.witness import parse_add_checkpoint

ECHO_APP = Path(__file__).resolve().parents[1] / "examples" / "echo"
ORIGIN = "fuzz.example/log"
SCOPE = "20260101/us-east-1/kms/aws4_request"
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: Any code point, lone surrogates included (hypothesis leaves them out unless asked).
ANY_CHARACTER = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


def any_text(max_size: int) -> st.SearchStrategy[str]:
    """Strings of :data:`ANY_CHARACTER` (``st.text`` would drop the surrogates again)."""
    return st.lists(ANY_CHARACTER, max_size=max_size).map("".join)


#: Byte sequences no strict UTF-8 decoder accepts (bad start, lone continuation, overlong,
#: encoded surrogates, above U+10FFFF, truncated).
INVALID_UTF8 = (b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
                b"\xf4\x90\x80\x80", b"\xe2\x82")  # fmt: skip
_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"')


# --- hostile variants of a valid JSON document ----------------------------------------------


def _objects(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from _objects(child)
    elif isinstance(value, list):
        for child in value:
            yield from _objects(child)


def _dump_with_duplicate(value: Any, target: dict[str, Any], key: str, extra: Any) -> str:
    """``value`` as JSON, with one more ``key: extra`` pair in the object ``target``."""
    if isinstance(value, dict):
        pairs = [f"{json.dumps(k)}:{_dump_with_duplicate(v, target, key, extra)}"
                 for k, v in value.items()]  # fmt: skip
        if value is target:
            pairs.append(f"{json.dumps(key)}:{json.dumps(extra)}")
        return "{" + ",".join(pairs) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump_with_duplicate(v, target, key, extra) for v in value) + "]"
    return json.dumps(value)


@st.composite
def hostile_json(draw: st.DrawFn, document: Any) -> bytes:
    """``document`` as JSON with one change that a strict reader must refuse."""
    kind = draw(st.sampled_from(["surrogate", "invalid_utf8", "duplicate", "deep"]))
    text = json.dumps(document)  # ASCII: every non-ASCII character is an escape
    spans = [m.span() for m in _STRING_LITERAL.finditer(text)]  # keys and values
    if kind == "deep":  # nest a value (a key cannot be an array)
        spans = [(a, b) for a, b in spans if not text[b:].lstrip().startswith(":")]
    start, end = draw(st.sampled_from(spans))
    at = draw(st.sampled_from([start + 1, end - 1]))  # just inside the quotes
    if kind == "surrogate":
        code = draw(st.integers(0xD800, 0xDFFF))
        return (text[:at] + f"\\u{code:04x}" + text[at:]).encode()
    if kind == "invalid_utf8":
        return text[:at].encode() + draw(st.sampled_from(INVALID_UTF8)) + text[at:].encode()
    if kind == "duplicate":
        target = draw(st.sampled_from([o for o in _objects(document) if o]))
        key = draw(st.sampled_from(sorted(target)))
        extra = draw(st.sampled_from([target[key], None, {}, "x", 0]))
        return _dump_with_duplicate(document, target, key, extra).encode()
    depth = draw(st.sampled_from([MAX_DEPTH + 1, 1000, 32767]))
    literal = text[start:end]
    return (text[:start] + "[" * depth + literal + "]" * depth + text[end:]).encode()


ANY_BYTES = st.binary(max_size=300) | any_text(100).map(
    lambda t: t.encode("utf-8", "surrogatepass")
)


def _as_text(data: bytes) -> str:
    """Bytes as a ``str`` the way an OS hands them over (invalid bytes -> lone surrogates)."""
    return data.decode("utf-8", "surrogateescape")


def _refused(parse: Callable[[], object], error: type[HermeticError] = HermeticError) -> None:
    with pytest.raises(error):
        parse()


def _typed_or_parsed(parse: Callable[[], object]) -> None:
    with contextlib.suppress(HermeticError):
        parse()


# --- hostile variants of a valid CBOR item -----------------------------------------------------

_PLACEHOLDER = b"\x00hermetic-fuzz-placeholder\x00"


@st.composite
def hostile_item(draw: st.DrawFn) -> bytes:
    """One CBOR item no strict decoder accepts: bad UTF-8 text, duplicate key, deep nesting."""
    kind = draw(st.sampled_from(["invalid_utf8", "duplicate", "deep"]))
    if kind == "invalid_utf8":
        ascii_text = st.text(st.characters(max_codepoint=0x7F), max_size=8)
        raw = draw(ascii_text).encode() + draw(st.sampled_from(INVALID_UTF8))
        return bytes([0x60 + len(raw)]) + raw  # a text string whose bytes are not UTF-8
    if kind == "duplicate":
        key = cbor2.dumps(draw(st.sampled_from(["k", "entry", 1, b"k"])))
        return b"\xa2" + key + b"\x01" + key + b"\x02"
    depth = draw(st.sampled_from([9, 1000, 65536]))
    return b"\x81" * depth + b"\x00"


def _with_item(value: dict[str, Any], key: str, item: bytes) -> bytes:
    """The canonical encoding of ``value`` with ``value[key]`` replaced by the raw ``item``."""
    encoded = canonical_dumps({**value, key: _PLACEHOLDER}, what="t", error=EvidenceFormatError)
    marker = cbor2.dumps(_PLACEHOLDER)
    assert encoded.count(marker) == 1
    return encoded.replace(marker, item)


# --- the real inputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    directory: Path
    entry: bytes
    endorsement: bytes
    trust: bytes
    policy: bytes
    key_policy: dict[str, Any]
    checkpoint: str
    log_key: Any
    bundle_value: dict[str, Any]
    operator: ed25519.Ed25519PrivateKey
    operator_pem: bytes
    manifest: str


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    directory = tmp_path_factory.mktemp("hostile")
    log_signer = Ed25519NoteSigner.from_skey(generate_key(ORIGIN)[0])
    witness = CosignatureSigner.generate("w1.example")
    publisher = load_publisher_key(generate_publisher_key())
    statement = ReleaseStatement("echo", "1.0.0", "a0" * 48, "b1" * 48, "c2" * 48, None, None,
                                 "abc123", "2026-11-28T12:00:00Z")  # fmt: skip
    signed = sign_statement(statement, publisher)
    checkpoint = sign_checkpoint(Checkpoint(ORIGIN, 1, bytes(32)), log_signer)
    endorsement = Endorsement(signed, ORIGIN, 0, (), checkpoint)
    public_pem = publisher.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    trust = write_trust_bundle(directory / "trust.json", log_vkey=log_signer.vkey,
                               witness_vkeys=[witness.vkey], threshold=1,
                               publishers={"acme": public_pem.decode()},
                               root=TrustRoot.aws())  # fmt: skip
    operator = ed25519.Ed25519PrivateKey.generate()
    return Inputs(
        directory=directory,
        entry=signed.entry(),
        endorsement=endorsement.dumps(),
        trust=trust.dumps(),
        policy=json.dumps(
            {
                "services": ["echo"],
                "versions": ["1.0.0"],
                "pcr0": ["a0" * 48],
                "allow_debug": False,
                "max_age_seconds": 60,
            }
        ).encode(),
        key_policy=release_key_policy(
            ReleaseReference({0: "a0" * 48, 1: "b1" * 48, 2: "c2" * 48}), account="111122223333"
        ),
        checkpoint=checkpoint,
        log_key=log_signer.verifier,
        bundle_value={
            "v": 1,
            "attestation": b"\x01" * 16,
            "config_digest": None,
            "endorsement": {
                "entry": signed.entry(),
                "origin": ORIGIN,
                "index": 0,
                "inclusion_proof": [],
                "checkpoint": checkpoint,
            },
        },
        operator=operator,
        operator_pem=operator.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        manifest=(ECHO_APP / "hermetic.toml").read_text(),
    )


def test_the_real_inputs_parse(inputs: Inputs) -> None:
    """The baseline: without the hostile change every parser accepts its input."""
    SignedStatement.from_entry(inputs.entry)
    Endorsement.loads(inputs.endorsement)
    load_release_reference(inputs.endorsement)
    ClientTrust.loads(inputs.trust)
    ServicePolicy.from_json(json.loads(inputs.policy))
    KeyPolicy.parse(json.dumps(inputs.key_policy))
    bundle = canonical_dumps(inputs.bundle_value, what="b", error=EvidenceFormatError)
    assert EvidenceBundle.decode(bundle).endorsement is not None
    open_note(inputs.checkpoint, [inputs.log_key])
    parse_manifest(inputs.manifest, DirectoryFiles(ECHO_APP))
    verify_bundle(_signed_config(inputs, b'{"a": 1}'), inputs.operator_pem)


def _write(inputs: Inputs, name: str, data: bytes) -> Path:
    path = inputs.directory / name
    path.write_bytes(data)
    return path


# --- JSON documents -------------------------------------------------------------------------


@FUZZ
@given(st.data())
def test_log_entries_refuse_hostile_json(inputs: Inputs, data: st.DataObject) -> None:
    entry = data.draw(hostile_json(json.loads(inputs.entry)))
    _refused(lambda: SignedStatement.from_entry(entry), ReleaseFormatError)


@pytest.mark.parametrize("field", ["service", "version", "source_revision"])
def test_log_entry_with_a_lone_surrogate_in_a_free_text_field_is_refused(
    inputs: Inputs, field: str
) -> None:
    """Finding 4 of issue 9: this entry parsed, then raised UnicodeEncodeError when
    re-encoded, which no caller catches (the monitor died on it, and on every restart)."""
    entry = json.loads(inputs.entry)
    entry["statement"][field] += "\ud800"
    text = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    assert b"\\ud800" in text
    with pytest.raises(ReleaseFormatError, match=r"^log entry: lone UTF-16 surrogate in a string"):
        SignedStatement.from_entry(text)


@FUZZ
@given(st.data())
def test_endorsements_refuse_hostile_json(inputs: Inputs, data: st.DataObject) -> None:
    text = data.draw(hostile_json(json.loads(inputs.endorsement)))
    _refused(lambda: Endorsement.loads(text), ReleaseFormatError)
    _refused(lambda: Endorsement.load(_write(inputs, "endorsement.json", text)), ReleaseFormatError)
    _refused(lambda: load_release_reference(text), ReleaseEndorsementFormatError)


@FUZZ
@given(st.data())
def test_trust_files_refuse_hostile_json(inputs: Inputs, data: st.DataObject) -> None:
    text = data.draw(hostile_json(json.loads(inputs.trust)))
    _refused(lambda: ClientTrust.loads(text))
    path = _write(inputs, "trust.json", text)
    _refused(lambda: ClientTrust.load(path))
    _refused(lambda: TrustBundle.load(path))


@FUZZ
@given(st.data())
def test_policy_files_refuse_hostile_json(inputs: Inputs, data: st.DataObject) -> None:
    text = data.draw(hostile_json(json.loads(inputs.policy)))
    _refused(lambda: ServicePolicy.load(_write(inputs, "policy.json", text)))


@FUZZ
@given(st.data())
def test_key_policies_refuse_hostile_json(inputs: Inputs, data: st.DataObject) -> None:
    text = _as_text(data.draw(hostile_json(inputs.key_policy)))
    _refused(lambda: KeyPolicy.parse(text), KeyPolicyFormatError)


@FUZZ
@given(st.data())
def test_config_bundles_refuse_hostile_config_json(inputs: Inputs, data: st.DataObject) -> None:
    config = data.draw(hostile_json({"region": "eu-west-1", "limits": {"rps": 10},
                                     "hosts": ["a.example", "b.example"]}))  # fmt: skip
    bundle = _signed_config(inputs, config)
    _refused(lambda: verify_bundle(bundle, inputs.operator_pem), RuntimeConfigFormatError)


def _signed_config(inputs: Inputs, config: bytes) -> bytes:
    """A bundle whose signature is genuine, so only the config's text can be refused."""
    signature = inputs.operator.sign(SIGNING_CONTEXT + config)
    return canonical_dumps({"config": config, "signature": signature}, what="bundle",
                           error=RuntimeConfigFormatError)  # fmt: skip


@FUZZ
@given(st.data())
def test_daemon_state_files_refuse_hostile_json(inputs: Inputs, data: st.DataObject) -> None:
    state = {"size": 1, "root": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
             "checkpoint": inputs.checkpoint}  # fmt: skip
    path = _write(inputs, "monitor.json", data.draw(hostile_json(state)))
    with LogClient("http://127.0.0.1:9", inputs.log_key) as client:  # never contacted
        _refused(lambda: Monitor(client, ["*"], path), MalformedInputError)


@FUZZ
@given(ANY_BYTES)
def test_json_parsers_take_any_bytes_with_typed_errors_only(inputs: Inputs, raw: bytes) -> None:
    for parse in (
        lambda: SignedStatement.from_entry(raw),
        lambda: Endorsement.loads(raw),
        lambda: load_release_reference(raw),
        lambda: ClientTrust.loads(raw),
        lambda: ServicePolicy.load(_write(inputs, "policy.json", raw)),
        lambda: KeyPolicy.parse(_as_text(raw)),
        lambda: verify_bundle(_signed_config(inputs, raw), inputs.operator_pem),
    ):
        _typed_or_parsed(parse)


# --- the KMS server: hostile key policies and bodies get the AWS error shape -----------------


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    store = KeyStore.open(tmp_path_factory.mktemp("kms") / "kms.sqlite3")

    def no_documents(document: bytes) -> Any:
        raise AssertionError("no attestation documents here")

    service = KMSService(store, no_documents)
    with ServerThread(service) as running:
        key = _call(running.endpoint, "CreateKey", b"{}").json()["KeyMetadata"]["KeyId"]
        yield running.endpoint, key
    store.close()


def _call(endpoint: str, operation: str, body: bytes) -> httpx.Response:
    return httpx.post(
        endpoint + "/",
        content=body,
        headers={
            "X-Amz-Target": f"TrentService.{operation}",
            "Content-Type": "application/x-amz-json-1.1",
            "Authorization": f"AWS4-HMAC-SHA256 Credential=admin/{SCOPE}",
        },
        timeout=30,
    )


def _aws_error(response: httpx.Response, *codes: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"__type", "message"}
    assert body["__type"] in codes, body


@FUZZ
@given(st.data())
def test_kms_refuses_hostile_key_policies_as_malformed_documents(
    kms: tuple[str, str], inputs: Inputs, data: st.DataObject
) -> None:
    endpoint, key = kms
    policy = data.draw(hostile_json(inputs.key_policy))
    try:
        field = json.dumps(policy.decode("utf-8"))  # the policy as a JSON string value
    except UnicodeDecodeError:
        # Not text at all: it cannot be a JSON string, so the raw bytes go in the body.
        field = None
    for operation, others in (("PutKeyPolicy", {"KeyId": key, "PolicyName": "default"}),
                              ("CreateKey", {})):  # fmt: skip
        head = json.dumps(others)[:-1] + (", " if others else "")
        if field is not None:
            body = f'{head}"Policy": {field}}}'.encode()
            _aws_error(_call(endpoint, operation, body), "MalformedPolicyDocumentException")
        else:
            body = f'{head}"Policy": "'.encode() + policy + b'"}'
            _aws_error(_call(endpoint, operation, body), "SerializationException")


@FUZZ
@given(st.data())
def test_kms_answers_hostile_request_bodies_with_the_aws_error_shape(
    kms: tuple[str, str], data: st.DataObject
) -> None:
    endpoint, key = kms
    request = {"KeyId": key, "Plaintext": "aGVsbG8=", "EncryptionContext": {"purpose": "x"}}
    body = data.draw(hostile_json(request) | ANY_BYTES)
    _aws_error(_call(endpoint, "Encrypt", body), "SerializationException", "ValidationException",
               "NotFoundException")  # fmt: skip


# --- CBOR: evidence bundles and config bundles ------------------------------------------------


@FUZZ
@given(st.data())
def test_evidence_bundles_refuse_hostile_cbor_and_hostile_entries(
    inputs: Inputs, data: st.DataObject
) -> None:
    value = inputs.bundle_value
    endorsement = value["endorsement"]
    if data.draw(st.booleans()):
        field = data.draw(st.sampled_from(sorted(endorsement)))
        inner = _with_item(endorsement, field, data.draw(hostile_item()))
        bundle = _with_item(value, "endorsement", inner)
    else:
        entry = data.draw(hostile_json(json.loads(inputs.entry)))
        bundle = canonical_dumps({**value, "endorsement": {**endorsement, "entry": entry}},
                                 what="b", error=EvidenceFormatError)  # fmt: skip
    _refused(lambda: EvidenceBundle.decode(bundle), EvidenceFormatError)


@FUZZ
@given(st.data())
def test_config_bundles_refuse_hostile_cbor(inputs: Inputs, data: st.DataObject) -> None:
    value = {"config": b'{"a": 1}', "signature": b"\x00" * 64}
    bundle = _with_item(value, data.draw(st.sampled_from(sorted(value))), data.draw(hostile_item()))
    _refused(lambda: parse_bundle(bundle), RuntimeConfigFormatError)


@FUZZ
@given(ANY_BYTES)
def test_cbor_parsers_take_any_bytes_with_typed_errors_only(raw: bytes) -> None:
    for parse in (
        lambda: strict_loads(raw, what="x", error=EvidenceFormatError),
        lambda: EvidenceBundle.decode(raw),
        lambda: parse_bundle(raw),
    ):
        _typed_or_parsed(parse)


# --- checkpoints and notes ---------------------------------------------------------------------


@FUZZ
@given(st.data())
def test_checkpoints_and_notes_refuse_surrogates_and_invalid_utf8(
    inputs: Inputs, data: st.DataObject
) -> None:
    note = inputs.checkpoint
    at = data.draw(st.integers(0, len(note)))
    if data.draw(st.booleans()):
        hostile: str | bytes = note[:at] + chr(data.draw(st.integers(0xD800, 0xDFFF))) + note[at:]
    else:
        hostile = note[:at].encode() + data.draw(st.sampled_from(INVALID_UTF8)) + note[at:].encode()
    _refused(lambda: split_note(hostile), NoteFormatError)
    _refused(lambda: open_note(hostile, [inputs.log_key]), NoteFormatError)
    raw = hostile if isinstance(hostile, bytes) else hostile.encode("utf-8", "surrogatepass")
    _typed_or_parsed(lambda: parse_add_checkpoint(b"old 0\n\n" + raw))
    checkpoint_text = split_note(note)[0]
    at = data.draw(st.integers(0, len(checkpoint_text)))
    _refused(lambda: Checkpoint.parse(checkpoint_text[:at] + "\udc80" + checkpoint_text[at:]))
    _refused(lambda: Checkpoint.parse(checkpoint_text[:at].encode() + b"\xff"
                                      + checkpoint_text[at:].encode()))  # fmt: skip


@FUZZ
@given(any_text(200) | ANY_BYTES)
def test_note_parsers_take_anything_with_typed_errors_only(
    inputs: Inputs, raw: str | bytes
) -> None:
    for parse in (
        lambda: split_note(raw),
        lambda: open_note(raw, [inputs.log_key]),
        lambda: Checkpoint.parse(raw),
        lambda: parse_add_checkpoint(raw),
    ):
        _typed_or_parsed(parse)


# --- the app manifest (TOML) ----------------------------------------------------------------


@FUZZ
@given(st.data())
def test_manifests_refuse_hostile_toml(inputs: Inputs, data: st.DataObject) -> None:
    text = inputs.manifest
    files = DirectoryFiles(ECHO_APP)
    kind = data.draw(st.sampled_from(["surrogate", "invalid_utf8", "duplicate", "deep"]))
    line = data.draw(st.sampled_from([n for n, t in enumerate(text.splitlines()) if " = " in t]))
    lines = text.splitlines(keepends=True)
    if kind == "surrogate":
        at = lines[line].index('"') + 1 if '"' in lines[line] else 0
        lines[line] = (
            lines[line][:at] + chr(data.draw(st.integers(0xD800, 0xDFFF))) + lines[line][at:]
        )
        _refused(lambda: parse_manifest("".join(lines), files))
    elif kind == "invalid_utf8":
        raw = "".join(lines).encode()
        at = data.draw(st.integers(0, len(raw)))
        hostile = raw[:at] + data.draw(st.sampled_from(INVALID_UTF8)) + raw[at:]
        _refused(lambda: parse_manifest(hostile, files))
    elif kind == "duplicate":
        lines.append(lines[line] if lines[line].endswith("\n") else "\n" + lines[line])
        _refused(lambda: parse_manifest("".join(lines), files))
    else:
        depth = data.draw(st.sampled_from([40, 5000, 30000]))
        lines.append("metrics = " + "[" * depth + "]" * depth + "\n")
        lines = [t for t in lines if not t.startswith('metrics = ["')]
        _refused(lambda: parse_manifest("".join(lines), files))


@FUZZ
@given(any_text(200) | ANY_BYTES)
def test_manifest_parser_takes_anything_with_typed_errors_only(raw: str | bytes) -> None:
    _typed_or_parsed(lambda: parse_manifest(raw, DirectoryFiles(ECHO_APP)))


# --- Sigstore / Rekor bundles ------------------------------------------------------------------


@FUZZ
@given(st.data())
def test_rekor_bundles_refuse_hostile_json(vectors: Path, data: st.DataObject) -> None:
    base = vectors / "merkle" / "sigstore-real-bundles"
    root = (base / "staging-trusted_root.json").read_text()
    bundle = json.loads((base / "rekor-v2-staging.txt.sigstore.json").read_text())
    _refused(lambda: verify_rekor_entry(data.draw(hostile_json(bundle)), root))
    _refused(lambda: trusted_logs(data.draw(hostile_json(json.loads(root)))))
