"""Release statements, endorsements and their offline verification against a trust file.

Endorsements here come from a real log (LogService over SQLite, real Ed25519 checkpoint
signatures and witness cosignatures); each rejection has its own error type.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hermetic.errors import (
    CosignatureThresholdError,
    HermeticError,
    InclusionProofError,
    MalformedInputError,
    RekorSubmissionError,
    ReleaseFormatError,
    ReleaseMismatchError,
    StatementSignatureError,
    TrustBundleError,
    UnknownLogError,
    UnknownPublisherError,
)
from hermetic.translog.checkpoint import CosignatureSigner, cosign
from hermetic.translog.note import Ed25519NoteSigner, generate_key
from hermetic.translog.release import (
    KMS_KEY_POLICY_V1,
    Endorsement,
    PolicyStatement,
    ReleaseStatement,
    SignedStatement,
    TrustBundle,
    VerifiedRelease,
    canonical_json,
    generate_publisher_key,
    load_publisher_key,
    parse_json,
    rekor_hashedrekord,
    sign_statement,
    statement_bytes,
    submit_to_rekor,
    verify_endorsement,
)
from hermetic.translog.service import LogService
from hermetic.translog.store import SQLiteLogStore
from test_translog_service_support import free_port

ORIGIN = "releases.example/log"
NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def release(version: str = "1.0.0", pcr0: str = "a0" * 48) -> ReleaseStatement:
    return ReleaseStatement(
        service="reporting",
        version=version,
        pcr0=pcr0,
        pcr1="b1" * 48,
        pcr2="c2" * 48,
        pcr8=None,
        config_policy_digest="d3" * 32,
        source_revision="0123abcd",
        build_time="2026-11-28T10:00:00Z",
    )


def public_pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class Log:
    """A real log with two witnesses, for minting endorsements."""

    def __init__(self, path: Path, origin: str = ORIGIN) -> None:
        self.signer = Ed25519NoteSigner.from_skey(generate_key(origin)[0])
        self.witnesses = [CosignatureSigner.generate(f"w{i}.example") for i in (1, 2)]
        self.store = SQLiteLogStore(path)
        self.service = LogService(self.store, self.signer)

    def endorse(self, signed: SignedStatement, cosigners: int = 2) -> Endorsement:
        batch = self.service.integrate([signed.entry(), f"filler {time.time_ns()}".encode()])
        index, size = batch.indices[0], batch.checkpoint.size
        note = batch.checkpoint.note + "".join(
            cosign(batch.checkpoint.note, w, 1_800_000_000) for w in self.witnesses[:cosigners]
        )
        return Endorsement(signed, ORIGIN, index, tuple(self.service.inclusion(index, size)), note)

    def trust(self, publishers: list[dict[str, str]], threshold: int = 2) -> TrustBundle:
        return TrustBundle.from_json(
            {
                "log": {
                    "vkey": self.signer.vkey,
                    "witnesses": [w.vkey for w in self.witnesses],
                    "threshold": threshold,
                },
                "publishers": publishers,
                "nitro_root": {"sha256": "future channel field"},
            }
        )


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Log]:
    made = Log(tmp_path / "log.db")
    yield made
    made.store.close()


@pytest.fixture(params=["ed25519", "p384"])
def publisher_key(request: pytest.FixtureRequest) -> Any:
    return load_publisher_key(generate_publisher_key(request.param))


def test_verifies_a_logged_witnessed_release(log: Log, publisher_key: Any) -> None:
    endorsement = log.endorse(sign_statement(release(), publisher_key))
    trust = log.trust([{"name": "acme", "public_key_pem": public_pem(publisher_key)}])
    reloaded = Endorsement.loads(endorsement.dumps())
    verified = verify_endorsement(reloaded, trust, expected_pcr0="A0" * 48)
    assert verified.publisher == "acme"
    assert verified.statement == release()
    assert (verified.origin, verified.index) == (ORIGIN, endorsement.index)
    assert sorted(verified.cosigners) == ["w1.example", "w2.example"]


def test_flipped_byte_in_the_statement_is_a_signature_error(log: Log, publisher_key: Any) -> None:
    endorsement = log.endorse(sign_statement(release(), publisher_key))
    trust = log.trust([{"name": "acme", "public_key_pem": public_pem(publisher_key)}])
    text = endorsement.dumps().decode()
    flipped = text.replace("a0" * 48, "a1" + "a0" * 47, 1)
    assert flipped != text
    with pytest.raises(StatementSignatureError, match="reporting"):
        verify_endorsement(Endorsement.loads(flipped), trust)


def test_statement_signed_by_an_untrusted_key_is_an_unknown_publisher(log: Log) -> None:
    trusted = load_publisher_key(generate_publisher_key())
    stranger = load_publisher_key(generate_publisher_key())
    endorsement = log.endorse(sign_statement(release(), stranger))
    trust = log.trust([{"name": "acme", "public_key_pem": public_pem(trusted)}])
    with pytest.raises(UnknownPublisherError, match="no trusted publisher"):
        verify_endorsement(endorsement, trust)


def test_inclusion_proof_for_another_entry_is_rejected(log: Log, publisher_key: Any) -> None:
    first = log.endorse(sign_statement(release("1.0.0"), publisher_key))
    second = log.endorse(sign_statement(release("1.0.1"), publisher_key))
    trust = log.trust([{"name": "acme", "public_key_pem": public_pem(publisher_key)}])
    verify_endorsement(second, trust)
    swapped = Endorsement(
        first.signed, ORIGIN, second.index, second.inclusion_proof, second.checkpoint
    )
    with pytest.raises(InclusionProofError):
        verify_endorsement(swapped, trust)


def test_checkpoint_from_another_log_is_rejected(
    log: Log, publisher_key: Any, tmp_path: Path
) -> None:
    impostor = Log(tmp_path / "other.db")  # same origin, different key
    endorsement = impostor.endorse(sign_statement(release(), publisher_key))
    trust = log.trust([{"name": "acme", "public_key_pem": public_pem(publisher_key)}], 0)
    with pytest.raises(UnknownLogError, match="not signed by the trusted log key"):
        verify_endorsement(endorsement, trust)
    renamed = Endorsement(endorsement.signed, "elsewhere.example/log", endorsement.index,
                          endorsement.inclusion_proof, endorsement.checkpoint)  # fmt: skip
    with pytest.raises(UnknownLogError, match="elsewhere"):
        verify_endorsement(renamed, trust)
    impostor.store.close()


def test_too_few_cosignatures_fail_the_threshold(log: Log, publisher_key: Any) -> None:
    endorsement = log.endorse(sign_statement(release(), publisher_key), cosigners=1)
    trust = log.trust([{"name": "acme", "public_key_pem": public_pem(publisher_key)}], 2)
    with pytest.raises(CosignatureThresholdError, match="requires 2"):
        verify_endorsement(endorsement, trust)
    relaxed = log.trust([{"name": "acme", "public_key_pem": public_pem(publisher_key)}], 1)
    assert verify_endorsement(endorsement, relaxed).cosigners == ("w1.example",)


def test_expected_pcr0_must_match(log: Log, publisher_key: Any) -> None:
    endorsement = log.endorse(sign_statement(release(), publisher_key))
    trust = log.trust([{"name": "acme", "public_key_pem": public_pem(publisher_key)}])
    with pytest.raises(ReleaseMismatchError, match="expected " + "ff" * 48):
        verify_endorsement(endorsement, trust, expected_pcr0="ff" * 48)


def _cert(subject_key: Any, issuer_key: Any, issuer: str, subject: str, *, days: int = 30,
          ca: bool = False, start: dt.datetime = NOW) -> x509.Certificate:  # fmt: skip
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - dt.timedelta(days=1))
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(issuer_key, hashes.SHA384())


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_publisher_certificate_issued_by_a_pinned_ca_is_trusted(log: Log) -> None:
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _cert(ca_key, ca_key, "Acme Release CA", "Acme Release CA", days=3650, ca=True)
    key = load_publisher_key(generate_publisher_key("p384"))
    leaf = _cert(key, ca_key, "Acme Release CA", "acme releases")
    endorsement = log.endorse(sign_statement(release(), key, _pem(leaf)))
    trust = log.trust([{"name": "acme", "ca_certificate_pem": _pem(ca)}])
    assert verify_endorsement(endorsement, trust, now=NOW).publisher == "acme"
    pinned = log.trust([{"name": "acme-pinned", "certificate_pem": _pem(leaf)}])
    assert verify_endorsement(endorsement, pinned, now=NOW).publisher == "acme-pinned"
    with pytest.raises(UnknownPublisherError, match="acme releases"):
        verify_endorsement(endorsement, trust, now=NOW + dt.timedelta(days=60))  # expired
    other_ca_key = ec.generate_private_key(ec.SECP384R1())
    other_ca = _cert(other_ca_key, other_ca_key, "Other CA", "Other CA", ca=True)
    with pytest.raises(UnknownPublisherError):
        verify_endorsement(
            endorsement, log.trust([{"name": "x", "ca_certificate_pem": _pem(other_ca)}]), now=NOW
        )


def test_certificate_must_belong_to_the_signing_key() -> None:
    ca_key = ec.generate_private_key(ec.SECP384R1())
    other = load_publisher_key(generate_publisher_key("p384"))
    leaf = _cert(other, ca_key, "CA", "someone else")
    key = load_publisher_key(generate_publisher_key("p384"))
    with pytest.raises(ReleaseFormatError, match="not for the publisher key"):
        sign_statement(release(), key, _pem(leaf))


def test_trust_bundle_keeps_unknown_sections_and_validates_the_rest(log: Log) -> None:
    key = load_publisher_key(generate_publisher_key())
    trust = log.trust([{"name": "acme", "public_key_pem": public_pem(key)}])
    assert trust.extra == {"nitro_root": {"sha256": "future channel field"}}
    again = TrustBundle.from_json(json.loads(json.dumps(trust.to_json())))
    assert again == trust
    base = trust.to_json()
    bad_cases = [
        ({**base, "log": {**base["log"], "threshold": 3}}, "exceeds"),
        ({**base, "log": {**base["log"], "threshold": -1}}, "threshold"),
        ({**base, "log": {**base["log"], "vkey": "nonsense+0000+AA"}}, "verifier key"),
        ({**base, "publishers": [{"name": "x"}]}, "exactly one"),
        ({**base, "publishers": [{"name": "x", "public_key_pem": "junk"}]}, "PEM"),
        ({"publishers": []}, "log.vkey"),
    ]
    for value, message in bad_cases:
        with pytest.raises(TrustBundleError, match=message):
            TrustBundle.from_json(value)


def test_trust_file_errors_are_usage_errors(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    path.write_text('{"log": {"vkey": 1}')
    with pytest.raises(TrustBundleError) as caught:
        TrustBundle.load(path)
    assert caught.value.exit_code == 2
    with pytest.raises(TrustBundleError, match="cannot read"):
        TrustBundle.load(tmp_path / "absent.json")


def test_statements_are_canonical_json_and_parsing_is_strict() -> None:
    key = load_publisher_key(generate_publisher_key())
    signed = sign_statement(release(), key)
    entry = signed.entry()
    assert entry == canonical_json(json.loads(entry))
    expected = (
        '{"build_time":"2026-11-28T10:00:00Z","config_policy_digest":"' + "d3" * 32 + '",'
        '"pcr0":"' + "a0" * 48 + '","pcr1":"' + "b1" * 48 + '","pcr2":"' + "c2" * 48 + '",'
        '"pcr8":null,"service":"reporting","source_revision":"0123abcd",'
        '"type":"hermetic.release/v1","version":"1.0.0"}'
    )
    assert statement_bytes(release()) == expected.encode()
    assert SignedStatement.from_entry(entry) == signed
    spaced = json.dumps(json.loads(entry), indent=1).encode()
    with pytest.raises(ReleaseFormatError, match="not canonical"):
        SignedStatement.from_entry(spaced)
    for text, message in (('{"a":1,"a":2}', "duplicate"), ('{"a":1.5}', "non-integer"),
                          ('{"a":NaN}', "NaN"), ("[1", "not valid")):  # fmt: skip
        with pytest.raises(ReleaseFormatError, match=message):
            parse_json(text, "x")
    with pytest.raises(ReleaseFormatError, match="float"):
        canonical_json({"a": 1.5})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("pcr0", "ab" * 32, "48 bytes"),
        ("pcr1", "AB" * 48, "lowercase hex"),
        ("pcr8", "zz" * 48, "hex"),
        ("service", "", "non-empty"),
        ("version", "1\n2", "control"),
        ("build_time", "2026-13-01T00:00:00Z", "real date"),
        ("build_time", "yesterday", "RFC 3339"),
        ("config_policy_digest", "ab", "32 or 48 or 64"),
    ],
)
def test_release_statement_fields_are_validated(field: str, value: str, message: str) -> None:
    obj = release().to_json()
    obj[field] = value
    with pytest.raises(ReleaseFormatError, match=message):
        ReleaseStatement.from_json(obj)


def test_policy_statements_share_the_log_format() -> None:
    key = load_publisher_key(generate_publisher_key("p384"))
    policy = PolicyStatement(KMS_KEY_POLICY_V1, "arn:aws:kms:eu-west-1:1:key/x", "ab" * 32, "3",
                             "2026-11-28T00:00:00Z")  # fmt: skip
    signed = SignedStatement.from_entry(sign_statement(policy, key).entry())
    assert signed.statement == policy
    signed.verify_signature()
    with pytest.raises(ReleaseFormatError, match="unexpected field"):
        PolicyStatement.from_json({**policy.to_json(), "extra": 1})
    with pytest.raises(ReleaseFormatError, match="not a known statement type"):
        SignedStatement.from_json({**signed.to_json(), "statement": {"type": "x/v9"}})


def test_verified_release_cannot_be_built_without_verifying() -> None:
    with pytest.raises(TypeError, match="verify_endorsement"):
        VerifiedRelease(release(), "acme", ORIGIN, 0, 1, b"\x00" * 32, ())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_escape_as_untyped_errors(data: bytes) -> None:
    for parse in (Endorsement.loads, SignedStatement.from_entry):
        with contextlib.suppress(MalformedInputError):
            parse(data)


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                       children, max_size=3),
    max_leaves=10,
))  # fmt: skip
def test_structured_json_never_escapes_as_untyped_errors(value: Any) -> None:
    for candidate in (value, {"type": "hermetic.endorsement/v1", "entry": value, "log": value}):
        with contextlib.suppress(MalformedInputError):
            Endorsement.loads(json.dumps(candidate))


def test_every_single_byte_mutation_of_an_endorsement_is_rejected_or_harmless(
    log: Log,
) -> None:
    key = load_publisher_key(generate_publisher_key())
    endorsement = log.endorse(sign_statement(release(), key))
    trust = log.trust([{"name": "acme", "public_key_pem": public_pem(key)}])
    original = endorsement.dumps()
    rejected = 0
    for position in range(0, len(original), 3):
        mutated = bytearray(original)
        mutated[position] ^= 0x01
        try:
            parsed = Endorsement.loads(bytes(mutated))
            verify_endorsement(parsed, trust)
        except HermeticError:
            rejected += 1
            continue
        # Accepted: the mutation did not change what was verified (e.g. JSON whitespace).
        assert parsed.to_json() == endorsement.to_json(), position
    assert rejected > len(original) // 3 * 0.9


def test_rekor_hashedrekord_matches_the_documented_schema() -> None:
    key = load_publisher_key(generate_publisher_key("p384"))
    signed = sign_statement(release(), key)
    body = rekor_hashedrekord(signed)
    assert body["apiVersion"] == "0.0.1"
    assert body["kind"] == "hashedrekord"
    assert set(body["spec"]) == {"data", "signature"}
    digest = body["spec"]["data"]["hash"]
    assert digest["algorithm"] == "sha384"
    assert digest["value"] == hashlib.sha384(canonical_json(release().to_json())).hexdigest()
    sig = body["spec"]["signature"]
    assert set(sig) == {"content", "publicKey"}
    pem = base64.b64decode(sig["publicKey"]["content"])
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    # What Rekor does: verify the signature over the *digest* with the given key.
    public = serialization.load_pem_public_key(pem)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(
        base64.b64decode(sig["content"]),
        bytes.fromhex(digest["value"]),
        ec.ECDSA(utils.Prehashed(hashes.SHA384())),
    )
    with pytest.raises(ReleaseFormatError, match="Ed25519ph"):
        rekor_hashedrekord(sign_statement(release(), ed25519.Ed25519PrivateKey.generate()))


class RekorStub:
    """A local Rekor v1 stand-in that checks the request shape like the real API would."""

    def __init__(self, tamper: bool = False, status: int = 201) -> None:
        self.tamper, self.status = tamper, status
        self.requests: list[Any] = []

    async def entries(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(body)
        ok = (
            request.headers["content-type"] == "application/json"
            and body.get("apiVersion") == "0.0.1"
            and body.get("kind") == "hashedrekord"
            and body["spec"]["data"]["hash"]["algorithm"] in ("sha256", "sha384", "sha512")
            and len(body["spec"]["data"]["hash"]["value"]) == 96
            and base64.b64decode(body["spec"]["signature"]["content"])
            and base64.b64decode(body["spec"]["signature"]["publicKey"]["content"])
        )
        if not ok:
            return JSONResponse({"code": 400, "message": "bad hashedrekord"}, status_code=400)
        if self.status != 201:
            return JSONResponse({"code": self.status, "message": "nope"}, status_code=self.status)
        logged = dict(body)
        if self.tamper:
            logged = {**body, "kind": "rekord"}
        encoded = base64.b64encode(json.dumps(logged).encode()).decode()
        uuid = "24296fb24b8ad77a" + hashlib.sha256(encoded.encode()).hexdigest()
        return JSONResponse(
            {uuid: {"body": encoded, "integratedTime": 1_800_000_000, "logID": "ab" * 32,
                    "logIndex": 42, "verification": {}}},
            status_code=201,
        )  # fmt: skip


@pytest.fixture
def rekor() -> Iterator[tuple[str, RekorStub]]:
    stub = RekorStub()
    app = Starlette(routes=[Route("/api/v1/log/entries", stub.entries, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the Rekor stub did not start"
    yield f"http://127.0.0.1:{port}", stub
    server.should_exit = True
    thread.join(5)


def test_rekor_submission_posts_hashedrekord_and_checks_the_echo(
    rekor: tuple[str, RekorStub],
) -> None:
    url, stub = rekor
    signed = sign_statement(release(), load_publisher_key(generate_publisher_key("p384")))
    receipt = submit_to_rekor(url, signed)
    assert receipt.log_index == 42
    assert len(receipt.uuid) == 80
    assert stub.requests == [rekor_hashedrekord(signed)]
    stub.tamper = True
    with pytest.raises(RekorSubmissionError, match="different"):
        submit_to_rekor(url, signed)
    stub.tamper, stub.status = False, 500
    with pytest.raises(RekorSubmissionError, match="500"):
        submit_to_rekor(url, signed)
    with pytest.raises(RekorSubmissionError, match="failed"):
        submit_to_rekor(f"http://127.0.0.1:{free_port()}", signed, timeout=2)
