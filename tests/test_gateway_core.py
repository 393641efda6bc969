"""The gateway's parts without enclaves: admission policy, settings, receipts (offline, as
``hermetic receipts verify`` checks them), backend admission against hostile backends, and
the parent's dialer.

Evidence comes from emulated NSMs of the test's dev PKI, releases and policies from a dev
log, exactly as in the enclave tests; backends are served the way the runtime serves an
``xx_port`` (:func:`hermetic.enclave.runtime.serve_session`), over the real backend dialer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from helpers import act_as_enclave
from hermetic.cbor import canonical_dumps
from hermetic.channel import aio
from hermetic.channel.noise import StaticKeypair
from hermetic.client import ClientTrust, ServicePolicy, verify_evidence
from hermetic.client.connect import AttestedSession
from hermetic.enclave import App
from hermetic.enclave.runtime import serve_session
from hermetic.errors import (
    AdmissionPolicyError,
    BackendHintError,
    BackendRefusedError,
    DebugModeError,
    GatewayConfigError,
    GatewayUsageError,
    HermeticError,
    NonceMismatchError,
    PublicKeyMismatchError,
    ReceiptFormatError,
    ReceiptKeyError,
    ReceiptMismatchError,
    ReceiptNotAdmittedError,
    ReceiptSessionError,
    ReceiptSignatureError,
    ReleaseNotAcceptedError,
    ServiceNotAcceptedError,
    UsageError,
)
from hermetic.evidence import make_evidence_provider
from hermetic.gateway.admission import ADMISSION_V1, AdmissionPolicy
from hermetic.gateway.backends import BackendHint, attest_backend
from hermetic.gateway.client import GatewaySession
from hermetic.gateway.dialer import BackendDialer
from hermetic.gateway.receipt import (
    Exchange,
    Receipt,
    ReceiptsFile,
    check_receipt,
    request_digest,
    response_digest,
    signed_bytes,
    verify_receipt_file,
)
from hermetic.gateway.service import ReceiptSigner
from hermetic.gateway.settings import GatewaySettings
from hermetic.image.pcrs import Measurements
from hermetic.launcher.devrelease import DevLog
from hermetic.nsm import DevPKI, EmulatedNSM, NSMClient
from hermetic.translog.release import GATEWAY_POLICY_V1, PolicyStatement, utc_timestamp
from hermetic.transport import egress, vsock
from hermetic.transport.tcp import HostPort


def _pcrs(name: str) -> dict[int, bytes]:
    return {n: hashlib.sha384(f"{name} {n}".encode()).digest() for n in (0, 1, 2)}


ALPHA, GATEWAY, ROGUE = _pcrs("alpha"), _pcrs("gateway"), _pcrs("rogue")


def _admission(**alpha: Any) -> dict[str, Any]:
    return {
        "type": ADMISSION_V1,
        "gateway": "gw-test",
        "services": {"alpha": alpha or {"pcr0": [ALPHA[0].hex()]}, "beta": {"versions": ["1.0.0"]}},
    }


@dataclass
class World:
    """A dev log with releases of alpha, a rogue alpha and the gateway, and its trust."""

    directory: Path
    log: DevLog
    trust: ClientTrust
    trust_json: dict[str, Any]

    def release(self, pcrs: dict[int, bytes], service: str, version: str = "1.0.0") -> Any:
        return self.log.publish(
            Measurements("hermetic", pcrs[0], pcrs[1], pcrs[2], None, service, version)
        )

    def provider(
        self, pcrs: dict[int, bytes], service: str | None, config_digest: bytes | None = None
    ) -> Callable[[bytes, bytes], bytes]:
        endorsement = self.release(pcrs, service) if service is not None else None
        nsm = NSMClient(EmulatedNSM(pcrs, pki=DevPKI(), debug=service is None))
        return make_evidence_provider(nsm, endorsement, config_digest)

    def logged_config(self, admission: dict[str, Any], *, log_digest: str | None = None) -> bytes:
        digest = log_digest or AdmissionPolicy.from_json(admission).digest.hex()
        endorsement = self.log.publish_statement(
            PolicyStatement(GATEWAY_POLICY_V1, "gateway/gw-test", digest, "1", utc_timestamp())
        )
        values = {
            "gateway": {
                "admission": admission,
                "admission_endorsement": endorsement.to_json(),
                "peers": self.trust_json,
            }
        }
        return json.dumps(values).encode()


@pytest.fixture
def world(tmp_path: Path) -> World:
    log = DevLog(tmp_path / "dev-log")
    trust = log.write_trust(tmp_path / "trust.json")
    return World(tmp_path, log, trust, json.loads((tmp_path / "trust.json").read_text()))


# --- the admission policy and the config --------------------------------------------------


def test_admission_policy_parses_strictly_and_has_one_digest() -> None:
    policy = AdmissionPolicy.from_json(_admission())
    reordered = json.loads(json.dumps(_admission())[::1])
    assert AdmissionPolicy.from_json(reordered).digest == policy.digest
    assert policy.admits("alpha", "9.9", ALPHA[0].hex(), False)
    assert not policy.admits("alpha", "1.0.0", ROGUE[0].hex(), False)
    assert not policy.admits("alpha", None, "00" * 48, True)  # debug not allowed
    assert not policy.admits("gamma", "1.0.0", ALPHA[0].hex(), False)
    assert policy.service_policy("beta").versions == frozenset({"1.0.0"})
    bad = [
        {**_admission(), "extra": 1},
        {**_admission(), "type": "other"},
        _admission(pcr0=["not hex"]),
        _admission(versions=[]),
        _admission(pcr0=[ALPHA[0].hex()], allow_debug=True),  # debug has no release to match
        _admission(colour="red"),
        {**_admission(), "services": {"Bad Name": {}}},
    ]
    for value in bad:
        with pytest.raises(AdmissionPolicyError):
            AdmissionPolicy.from_json(value)


def test_gateway_refuses_to_start_with_an_admission_policy_that_is_not_the_logged_one(
    world: World,
) -> None:
    logged = json.loads(world.logged_config(_admission()))
    assert (
        GatewaySettings.from_config(logged).admission.digest
        == AdmissionPolicy.from_json(_admission()).digest
    )
    # the operator changed the policy after logging it: the endorsement names another digest
    changed = json.loads(world.logged_config(_admission()))
    changed["gateway"]["admission"] = _admission(pcr0=[ROGUE[0].hex()])
    with pytest.raises(AdmissionPolicyError, match="names 'gateway/gw-test' digest"):
        GatewaySettings.from_config(changed)
    # an endorsement of the right digest from a log nobody trusts
    other = DevLog(world.directory / "other-log")
    foreign = json.loads(world.logged_config(_admission()))
    digest = AdmissionPolicy.from_json(_admission()).digest.hex()
    foreign["gateway"]["admission_endorsement"] = other.publish_statement(
        PolicyStatement(GATEWAY_POLICY_V1, "gateway/gw-test", digest, "1", utc_timestamp())
    ).to_json()
    with pytest.raises(AdmissionPolicyError, match="endorsement"):
        GatewaySettings.from_config(foreign)


# --- receipts: the offline check (acceptance 5) -------------------------------------------


@dataclass
class Issued:
    signer: ReceiptSigner
    session: bytes
    config: bytes
    policy: AdmissionPolicy

    def receipt(self, *, pcr0: bytes = ALPHA[0], arg: Any = "hi", **changes: Any) -> Exchange:
        request = request_digest("alpha", "echo", arg)
        response = response_digest({"arg": arg})
        fields: dict[str, Any] = {
            "session": self.session, "time_ms": 1_764_650_000_000, "service": "alpha",
            "method": "echo", "request": request, "response": response,
            "policy": self.policy.digest, "backend_version": "1.0.0", "backend_pcr0": pcr0,
            "backend_debug": False, "backend_module": "i-0123456789abcdef0-enc0123456789abcdef",
            "backend_session": b"\x07" * 32,
        }  # fmt: skip
        fields.update(changes)
        return Exchange(self.signer.sign(Receipt(**fields)), request, response)

    def file(self, *exchanges: Exchange) -> ReceiptsFile:
        return ReceiptsFile(self.session, self.signer.binding, exchanges)


@pytest.fixture
def issued(world: World) -> Issued:
    """A gateway's receipt key bound to its attestation (a logged gateway release and a
    config with a logged admission policy), as the gateway makes it at boot."""
    config = world.logged_config(_admission())
    provider = world.provider(GATEWAY, "gateway", hashlib.sha256(config).digest())
    return Issued(
        ReceiptSigner(provider, config),
        b"\x01" * 32,
        config,
        AdmissionPolicy.from_json(_admission()),
    )


def test_saved_receipts_verify_offline(world: World, issued: Issued) -> None:
    verified = verify_receipt_file(
        issued.file(issued.receipt(), issued.receipt(arg="again")),
        world.trust,
        ServicePolicy(services=frozenset({"gateway"})),
    )
    assert verified.gateway.service == "gateway"
    assert verified.gateway.pcrs[0] == GATEWAY[0]
    assert [r.backend_pcr0 for r in verified.receipts] == [ALPHA[0], ALPHA[0]]
    round_trip = ReceiptsFile.loads(issued.file(issued.receipt()).dumps())
    assert verify_receipt_file(round_trip, world.trust).receipts[0].service == "alpha"


def test_receipts_verify_rejects_a_flipped_byte_anywhere_in_a_receipt(
    world: World, issued: Issued
) -> None:
    exchange = issued.receipt()
    for position in range(0, len(exchange.receipt), 7):
        data = bytearray(exchange.receipt)
        data[position] ^= 0x01
        flipped = Exchange(bytes(data), exchange.request, exchange.response)
        with pytest.raises((ReceiptSignatureError, ReceiptFormatError)):
            verify_receipt_file(issued.file(flipped), world.trust)


def test_receipts_verify_rejects_a_receipt_from_another_session(
    world: World, issued: Issued
) -> None:
    other = issued.receipt(session=b"\x02" * 32)
    with pytest.raises(ReceiptSessionError, match="another session"):
        verify_receipt_file(issued.file(issued.receipt(), other), world.trust)


def test_receipts_verify_rejects_a_release_outside_the_logged_policy(
    world: World, issued: Issued
) -> None:
    # Signed by the genuine receipt key, so only the policy check can catch it: a gateway
    # whose code were wrong could not make it pass.
    rogue = issued.receipt(pcr0=ROGUE[0])
    with pytest.raises(ReceiptNotAdmittedError, match="not admitted by the logged admission"):
        verify_receipt_file(issued.file(rogue), world.trust)
    debug = issued.receipt(pcr0=b"\x00" * 48, backend_debug=True, backend_version=None)
    with pytest.raises(ReceiptNotAdmittedError):
        verify_receipt_file(issued.file(debug), world.trust)
    other_policy = issued.receipt(policy=b"\x09" * 32)
    with pytest.raises(ReceiptNotAdmittedError, match="logged policy"):
        verify_receipt_file(issued.file(other_policy), world.trust)


def test_receipts_verify_rejects_receipts_for_other_requests_or_keys(
    world: World, issued: Issued
) -> None:
    exchange = issued.receipt()
    swapped = Exchange(
        exchange.receipt, request_digest("alpha", "echo", "other"), exchange.response
    )
    with pytest.raises(ReceiptMismatchError, match="another request"):
        verify_receipt_file(issued.file(swapped), world.trust)
    # a key the evidence does not name
    forger = ed25519.Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    binding = issued.signer.binding
    forged_key = forger.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    from hermetic.gateway.receipt import GatewayKey

    stolen = ReceiptsFile(
        issued.session, GatewayKey(forged_key, binding.key_evidence, binding.config), (exchange,)
    )
    with pytest.raises(ReceiptKeyError, match=r"PublicKeyMismatchError|NonceMismatchError"):
        verify_receipt_file(stolen, world.trust)
    # another config than the one the evidence names (a different admission policy)
    other_config = world.logged_config(_admission(pcr0=[ROGUE[0].hex()]))
    relabelled = ReceiptsFile(
        issued.session,
        GatewayKey(binding.receipt_key, binding.key_evidence, other_config),
        (exchange,),
    )
    with pytest.raises(ReceiptKeyError, match="config"):
        verify_receipt_file(relabelled, world.trust)
    # a key evidence made by a gateway release nobody logged
    rogue_config = issued.config
    unlogged = ReceiptSigner(
        make_evidence_provider(
            NSMClient(EmulatedNSM(ROGUE, pki=DevPKI())), None, hashlib.sha256(rogue_config).digest()
        ),
        rogue_config,
    )
    with pytest.raises(ReceiptKeyError, match="EndorsementMissingError"):
        verify_receipt_file(ReceiptsFile(issued.session, unlogged.binding, ()), world.trust)


def test_a_receipt_is_checked_against_the_service_the_client_asked_for(issued: Issued) -> None:
    exchange = issued.receipt()
    with pytest.raises(ReceiptMismatchError, match="request was for 'beta'"):
        check_receipt(
            exchange.receipt, public_key=issued.signer.binding.receipt_key,
            session=issued.session, request=exchange.request, response=exchange.response,
            policy=issued.policy, service="beta",
        )  # fmt: skip


# --- backend admission against hostile backends (hints are untrusted) ---------------------


async def _backend(
    cid: int,
    provider: Callable[[bytes, bytes], bytes],
    verify: Any,
    handlers: dict[str, Any] | None = None,
) -> vsock.VsockListener:
    """A backend served on vsock ``cid``:5001 as the runtime serves an ``xx_port``."""
    act_as_enclave(cid)
    app = App()
    static = StaticKeypair.generate()

    async def on_stream(stream: vsock.VsockStream) -> None:
        await serve_session(app, 5001, stream, provider, handlers or {}, static, verify)

    return await vsock.listen(cid, 5001, on_stream)


def _dial_through(dialer: BackendDialer) -> Any:
    """The gateway's dial, straight to the dialer (the egress's part is the proxy's)."""
    assert dialer.address is not None
    address = dialer.address

    async def dial(hint: BackendHint) -> aio.MessagePipe:
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(egress.encode_connect(HostPort(hint.host, hint.port)))
        await writer.drain()
        assert egress.decode_reply(await reader.readline()) is None
        return aio.StreamPipe(reader, writer)

    return dial


async def _attest(
    world: World,
    cid: int,
    gateway_provider: Any,
    service: str = "alpha",
    admission: AdmissionPolicy | None = None,
) -> Any:
    """The gateway's admission of ``service`` at vsock ``cid`` through the real dialer."""
    admission = admission or AdmissionPolicy.from_json(_admission())
    async with BackendDialer(HostPort("127.0.0.1", 0)) as dialer:
        return await attest_backend(
            BackendHint.parse(service, f"vsock://{cid}:5001"), admission, world.trust,
            _dial_through(dialer),
            static=StaticKeypair.generate(), make_evidence=gateway_provider, timeout=10,
        )  # fmt: skip


def _accepts_gateway(world: World) -> Any:
    policy = ServicePolicy(services=frozenset({"gateway"}), pcr0s=frozenset({GATEWAY[0].hex()}))
    return lambda b, h, rs: verify_evidence(b, h, rs, world.trust, policy)


def _cause(error: BackendRefusedError) -> type[BaseException]:
    assert error.__cause__ is not None
    return type(error.__cause__)


async def test_an_admitted_backend_gets_a_session_and_an_unadmitted_one_is_refused(
    world: World,
) -> None:
    gateway = world.provider(GATEWAY, "gateway")
    listeners = [
        await _backend(60, world.provider(ALPHA, "alpha"), _accepts_gateway(world)),
        await _backend(61, world.provider(ROGUE, "alpha"), _accepts_gateway(world)),
        await _backend(62, world.provider(ALPHA, None), _accepts_gateway(world)),
    ]
    try:
        session = await _attest(world, 60, gateway)
        assert session.peer.service == "alpha"
        assert session.peer.pcrs[0] == ALPHA[0]
        await session.close()
        with pytest.raises(BackendRefusedError) as caught:
            await _attest(world, 61, gateway)
        assert _cause(caught.value) is ReleaseNotAcceptedError
        with pytest.raises(BackendRefusedError) as caught:
            await _attest(world, 62, gateway)
        assert _cause(caught.value) is DebugModeError
    finally:
        for listener in listeners:
            await listener.aclose()


async def test_a_rule_that_allows_debug_backends_still_holds_releases_to_its_service(
    world: World,
) -> None:
    listeners = [
        await _backend(66, world.provider(ALPHA, None), _accepts_gateway(world)),
        await _backend(67, world.provider(_pcrs("beta"), "beta"), _accepts_gateway(world)),
    ]
    admission = AdmissionPolicy.from_json(_admission(allow_debug=True))
    try:
        gateway = world.provider(GATEWAY, "gateway")
        debug = await _attest(world, 66, gateway, admission=admission)
        assert debug.peer.debug
        await debug.close()
        with pytest.raises(BackendRefusedError) as caught:
            await _attest(world, 67, gateway, admission=admission)  # a beta release as alpha
        assert _cause(caught.value) is ServiceNotAcceptedError
    finally:
        for listener in listeners:
            await listener.aclose()


async def test_a_backend_replaying_or_relaying_another_backends_evidence_is_refused(
    world: World,
) -> None:
    genuine = world.provider(ALPHA, "alpha")
    recorded = genuine(b"\x05" * 32, StaticKeypair.generate().public)  # another session's

    def replay(handshake_hash: bytes, static_public: bytes) -> bytes:
        return recorded

    def relay(handshake_hash: bytes, static_public: bytes) -> bytes:
        # a fresh document for this session, but for the key of the enclave it relays for
        return genuine(handshake_hash, StaticKeypair.generate().public)

    listeners = [
        await _backend(63, replay, _accepts_gateway(world)),
        await _backend(64, relay, _accepts_gateway(world)),
    ]
    try:
        gateway = world.provider(GATEWAY, "gateway")
        with pytest.raises(BackendRefusedError) as caught:
            await _attest(world, 63, gateway)
        assert _cause(caught.value) is NonceMismatchError
        with pytest.raises(BackendRefusedError) as caught:
            await _attest(world, 64, gateway)
        assert _cause(caught.value) is PublicKeyMismatchError
    finally:
        for listener in listeners:
            await listener.aclose()


async def test_a_backend_that_refuses_the_gateway_is_refused_promptly(world: World) -> None:
    other = ServicePolicy(services=frozenset({"gateway"}), pcr0s=frozenset({"00" * 48}))
    listener = await _backend(
        65, world.provider(ALPHA, "alpha"),
        lambda b, h, rs: verify_evidence(b, h, rs, world.trust, other),
    )  # fmt: skip
    try:
        with pytest.raises(BackendRefusedError, match="refused the gateway's evidence"):
            await asyncio.wait_for(_attest(world, 65, world.provider(GATEWAY, "gateway")), 20)
    finally:
        await listener.aclose()


async def test_the_dialer_relays_to_enclave_cids_only() -> None:
    async with BackendDialer(HostPort("127.0.0.1", 0)) as dialer:
        assert dialer.address is not None
        for line in (b"CONNECT 3:9000\n", b"CONNECT 2:1\n", b"CONNECT example.com:80\n",
                     b"GET / HTTP/1.1\n", b"CONNECT 99:5001\n"):  # fmt: skip
            reader, writer = await asyncio.open_connection(dialer.address.host, dialer.address.port)
            writer.write(line)
            await writer.drain()
            reply = await reader.readline()
            assert reply.startswith(b"ERR "), (line, reply)
            writer.close()
        assert dialer.refused == 5
        assert dialer.relayed == 0


async def test_the_dialer_relays_bytes_both_ways_as_they_came_and_passes_the_end_on() -> None:
    """The dialer's spliced relay: bytes the gateway sent right behind its header (before
    the ``OK``) arrive first, a large transfer arrives whole and in order both ways, and
    the gateway's end of stream reaches the backend, whose answers still come back."""
    act_as_enclave(70)
    received = bytearray()

    async def on_stream(stream: vsock.VsockStream) -> None:
        while data := await stream.reader.read(65536):
            received.extend(data)
        stream.writer.write(bytes(received[::-1]))  # after the gateway's end: still heard
        await stream.writer.drain()

    listener = await vsock.listen(70, 5001, on_stream)
    payload = os.urandom(3 * 1024 * 1024)
    try:
        async with BackendDialer(HostPort("127.0.0.1", 0)) as dialer:
            assert dialer.address is not None
            reader, writer = await asyncio.open_connection(dialer.address.host, dialer.address.port)
            writer.write(b"CONNECT 70:5001\nearly bytes|")
            await writer.drain()
            assert await reader.readline() == b"OK\n"
            writer.write(payload)
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            assert dialer.relayed == 1
        assert bytes(received) == b"early bytes|" + payload
        assert answer == bytes(received[::-1])
    finally:
        await listener.aclose()


def test_backend_hints_are_parsed_strictly() -> None:
    assert BackendHint.parse("alpha", "vsock://17:5001").address == "vsock://17:5001"
    assert BackendHint.parse("alpha", "tcp://10.0.0.1:443").scheme == "tcp"
    bad: list[tuple[str, object]] = [
        ("Alpha", "vsock://17:5001"), ("alpha", "ws://x:1/"), ("alpha", "vsock://x:1"),
        ("alpha", 17), ("alpha", "unix:///s"),
    ]  # fmt: skip
    for service, address in bad:
        with pytest.raises(BackendHintError):
            BackendHint.parse(service, address)


async def test_reattesting_swaps_in_a_fresh_session_and_drains_the_old_one(world: World) -> None:
    from hermetic.errors import BackendUnavailableError
    from hermetic.gateway.backends import Backends
    from hermetic.gateway.metrics import GatewayMetrics

    refuse = {"now": False}
    accepts = _accepts_gateway(world)

    def verify(bundle: bytes, h: bytes, remote_static: bytes) -> Any:
        if refuse["now"]:
            raise ReleaseNotAcceptedError("this backend's policy no longer names the gateway")
        return accepts(bundle, h, remote_static)

    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "finished"

    listener = await _backend(68, world.provider(ALPHA, "alpha"), verify, {"slow": slow})
    try:
        async with BackendDialer(HostPort("127.0.0.1", 0)) as dialer:
            backends = Backends(
                AdmissionPolicy.from_json(_admission()), world.trust, _dial_through(dialer),
                make_evidence=world.provider(GATEWAY, "gateway"), metrics=GatewayMetrics(),
            )  # fmt: skip
            hint = BackendHint.parse("alpha", "vsock://68:5001")
            assert (await backends.add(hint)).state == "admitted"
            pool = backends.pools["alpha"]
            first = pool.pick()
            in_flight = asyncio.ensure_future(first.call("slow", 0.5))
            await asyncio.sleep(0.05)
            assert await backends.reattest(3600) == 0  # not due yet
            assert await backends.reattest(0) == 1
            second = pool.pick()
            assert second is not first
            assert second.handshake_hash != first.handshake_hash
            assert await in_flight == "finished"  # the old session finished its request
            for _ in range(100):
                if not first.usable:
                    break
                await asyncio.sleep(0.05)
            assert not first.usable  # then it was closed
            # the backend stops accepting the gateway: the next re-attestation takes it out
            refuse["now"] = True
            await backends.reattest(0)
            instance = pool.instances[hint.address]
            assert instance.state == "refused"
            with pytest.raises(BackendUnavailableError):
                pool.pick()
            await backends.aclose()
    finally:
        await listener.aclose()


def test_the_gateway_config_section_is_checked_field_by_field(world: World) -> None:
    good = json.loads(world.logged_config(_admission()))
    settings = GatewaySettings.from_config(good)
    assert (settings.max_request, settings.max_per_client, settings.reattest) == (
        1024 * 1024, 32, 240,
    )  # fmt: skip
    assert settings.dialer is None
    assert (settings.health_interval, settings.health_timeout) == (5, 2)
    for field, value in (
        ("surprise", 1), ("max_request", 0), ("max_request", True), ("max_response", 2**40),
        ("reattest", 0), ("max_concurrency", "many"), ("max_per_client", -1),
        ("dialer", "no port"), ("dialer", 7100), ("peers", {"log": {}}),
        ("health_interval", 0), ("health_interval", 1.5), ("health_timeout", 61),
    ):  # fmt: skip
        broken = json.loads(json.dumps(good))
        broken["gateway"][field] = value
        with pytest.raises((GatewayConfigError, AdmissionPolicyError)):
            GatewaySettings.from_config(broken)
    with pytest.raises(GatewayConfigError, match="config gateway: expected an object"):
        GatewaySettings.from_config({})


async def test_a_backend_that_stops_answering_is_drained_and_readmitted_once_it_answers(
    world: World,
) -> None:
    """Health checks (issue 11 item 4): one of two instances stops answering with its
    session still open (a hung process); after one missed check it still serves, after two
    it is drained, its session closed, so the idempotent request it held is answered by the
    other instance instead of waiting; once it answers again it is re-attested on a fresh
    session and gets traffic again."""
    from hermetic.errors import BackendUnavailableError
    from hermetic.gateway.backends import Backends
    from hermetic.gateway.metrics import GatewayMetrics
    from hermetic.gateway.service import Gateway

    answering = asyncio.Event()
    answering.set()

    def handlers(name: str, hangs: bool) -> dict[str, Any]:
        async def methods(_: object) -> dict[str, list[str]]:
            if hangs:
                await answering.wait()
            return {"methods": ["work"], "idempotent": ["work"]}

        async def work(arg: object) -> list[object]:
            if hangs:
                await answering.wait()
            return [arg, name]

        return {"hermetic.methods": methods, "work": work}

    listeners = [
        await _backend(69, world.provider(ALPHA, "alpha"), _accepts_gateway(world),
                       handlers("hangs", True)),
        await _backend(70, world.provider(ALPHA, "alpha"), _accepts_gateway(world),
                       handlers("steady", False)),
    ]  # fmt: skip
    config = world.logged_config(_admission())
    settings = GatewaySettings.from_config(json.loads(config))
    provider = world.provider(GATEWAY, "gateway", hashlib.sha256(config).digest())
    metrics = GatewayMetrics()
    try:
        async with BackendDialer(HostPort("127.0.0.1", 0)) as dialer:
            backends = Backends(
                settings.admission, world.trust, _dial_through(dialer),
                make_evidence=provider, metrics=metrics,
            )  # fmt: skip
            gateway = Gateway(settings, backends, ReceiptSigner(provider, config), metrics)
            hung, steady = (BackendHint.parse("alpha", f"vsock://{c}:5001") for c in (69, 70))
            for hint in (hung, steady):
                assert (await backends.add(hint)).state == "admitted"
            instances = backends.pools["alpha"].instances
            first = instances[hung.address].session
            assert await backends.check_health(0.5) == {
                "ok": 2, "missed": 0, "drained": 0, "readmitting": 0,
            }  # fmt: skip

            answering.clear()
            request = {"service": "alpha", "method": "work", "args": 0}
            calls = [asyncio.ensure_future(gateway.forward(b"\x01" * 32, request)) for _ in "ab"]
            done, held = await asyncio.wait(calls, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            assert (len(done), len(held)) == (1, 1)  # the steady one's; the hung one holds one
            assert (await backends.check_health(0.5))["missed"] == 1
            assert instances[hung.address].current == "admitted"  # one miss is not enough
            assert (await backends.check_health(0.5))["drained"] == 1
            drained = instances[hung.address]
            assert drained.current == "unhealthy"
            assert "2 health checks in a row" in (drained.to_json()["reason"] or "")
            answers = await asyncio.wait_for(asyncio.gather(*calls), 10)  # none failed
            assert [a["result"] for a in answers] == [[0, "steady"], [0, "steady"]]
            for _ in range(4):  # drained: no request goes to it
                picked = backends.pools["alpha"].pick()
                assert picked.hint.address == steady.address
            assert 'hermetic_gateway_drains_total{service="alpha"} 1.0' in metrics.text()
            assert 'state="unhealthy"} 1.0' in metrics.text()

            answering.set()  # it answers again: re-attested on a fresh session
            readmission = drained.readmitting
            assert readmission is not None  # started by the round that drained it
            await asyncio.wait_for(readmission, 15)
            assert drained.current == "admitted"
            assert first is not None
            assert drained.session is not None
            assert drained.session.handshake_hash != first.handshake_hash
            answered = {
                (await gateway.forward(b"\x02" * 32, request))["result"][1] for _ in range(4)
            }
            assert answered == {"hangs", "steady"}
            assert 'outcome="readmitted",service="alpha"} 1.0' in metrics.text()
            with pytest.raises(BackendUnavailableError):
                backends.pools["beta"].pick()
            await backends.aclose()
    finally:
        for listener in listeners:
            await listener.aclose()


def test_digests_of_encoded_requests_and_results_are_the_receipts_digests() -> None:
    """The gateway hashes the bytes it encoded to check a request's size (and a result's);
    they must be the digests a client computes from the decoded values."""
    from functools import partial

    from hermetic.cbor import canonical_dumps as dumps
    from hermetic.errors import GatewayRequestError
    from hermetic.gateway.receipt import encoded_request_digest, encoded_response_digest

    canonical_dumps = partial(dumps, what="value", error=GatewayRequestError)
    for args in (None, 1, "hi", b"\x00" * 70, {"b": [1, 2], "a": {"z": None}}):
        request = canonical_dumps(["alpha", "echo", args])
        assert encoded_request_digest(request) == request_digest("alpha", "echo", args)
        assert encoded_response_digest(canonical_dumps(args)) == response_digest(args)
        assert encoded_request_digest(request) != encoded_response_digest(request)
    policy = AdmissionPolicy.from_json(_admission())
    assert policy.digest == hashlib.sha256(policy.canonical()).digest()


async def test_a_drained_instance_is_not_readmitted_when_another_image_answers_there(
    world: World,
) -> None:
    """Re-admission is a full attestation: once an instance is drained, the host puts an
    unadmitted release of the same service at its address; the next attempt is refused
    (ReleaseNotAcceptedError), the instance is ``refused`` and never routed to again."""
    from hermetic.errors import BackendUnavailableError
    from hermetic.gateway.backends import Backends
    from hermetic.gateway.metrics import GatewayMetrics

    answering = asyncio.Event()
    answering.set()

    async def methods(_: object) -> dict[str, list[str]]:
        await answering.wait()
        return {"methods": [], "idempotent": []}

    listener = await _backend(
        73, world.provider(ALPHA, "alpha"), _accepts_gateway(world), {"hermetic.methods": methods}
    )
    metrics = GatewayMetrics()
    try:
        async with BackendDialer(HostPort("127.0.0.1", 0)) as dialer:
            backends = Backends(
                AdmissionPolicy.from_json(_admission()), world.trust, _dial_through(dialer),
                make_evidence=world.provider(GATEWAY, "gateway"), metrics=metrics,
            )  # fmt: skip
            hint = BackendHint.parse("alpha", "vsock://73:5001")
            instance = await backends.add(hint)
            assert instance.state == "admitted"
            answering.clear()
            for _ in range(2):
                await backends.check_health(0.3)
            assert instance.current == "unhealthy"
            # the attempt the drain started would wait on the hung backend; the host swaps
            # in another image at the address, and that attempt is given up
            assert instance.readmitting is not None
            instance.readmitting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await instance.readmitting
            await listener.aclose()
            answering.set()
            listener = await _backend(
                73, world.provider(ROGUE, "alpha"), _accepts_gateway(world), {}
            )
            assert (await backends.check_health(0.3))["readmitting"] == 1
            assert instance.readmitting is not None
            await asyncio.wait_for(instance.readmitting, 15)
            assert instance.current == "refused"
            assert "ReleaseNotAcceptedError" in (instance.reason or "")
            with pytest.raises(BackendUnavailableError):
                backends.pools["alpha"].pick()
            assert (await backends.check_health(0.3))["readmitting"] == 0  # not retried
            text = metrics.text()
            assert 'outcome="readmit_refused",service="alpha"} 1.0' in text
            assert 'reason="ReleaseNotAcceptedError",service="alpha"} 1.0' in text
            await backends.aclose()
    finally:
        await listener.aclose()


def test_the_client_checks_every_receipt_signature_before_receipts_leave_the_session(
    world: World, issued: Issued
) -> None:
    """The SDK's calls leave the signature for later (the session that delivered the
    receipt already authenticates it); it is checked, once, before receipts are saved."""
    exchanges = [issued.receipt(arg=n) for n in range(3)]
    # Only the kept receipts and the session's handshake hash are used here.
    session = cast(AttestedSession, SimpleNamespace(handshake_hash=issued.session))
    client = GatewaySession(session, issued.policy, issued.signer.binding)
    client.exchanges.extend(exchanges)
    assert client.verify_signatures() == 3
    assert client.verify_signatures() == 0  # each is checked once
    saved = client.receipts_file()
    assert verify_receipt_file(saved, world.trust).receipts[2].request == exchanges[2].request
    body = bytearray(exchanges[1].receipt)
    body[-1] ^= 0x01  # the signature's last byte
    client.exchanges.append(Exchange(bytes(body), exchanges[1].request, exchanges[1].response))
    with pytest.raises(ReceiptSignatureError):
        client.receipts_file()
    with pytest.raises(ReceiptSignatureError):
        client.verify_signatures()  # still not accepted on a second look
    client.exchanges.pop()
    assert client.receipts_file().exchanges == tuple(exchanges)


def test_a_port_over_its_session_limit_closes_a_connection_before_any_handshake(
    world: World,
) -> None:
    """An anonymous client opening connections without end makes the enclave hold only
    ``limit_sessions`` sessions and attest only for them; a freed slot takes a new one."""
    documents: list[bytes] = []
    own = world.provider(ALPHA, "alpha")

    def provider(handshake_hash: bytes, static: bytes) -> bytes:
        documents.append(handshake_hash)
        return own(handshake_hash, static)

    async def run() -> None:
        act_as_enclave(76)
        app = App()
        app.limit_sessions(7000, 2)
        static = StaticKeypair.generate()

        async def on_stream(stream: vsock.VsockStream) -> None:
            await serve_session(app, 7000, stream, provider, {}, static, None)

        async def client() -> aio.ClientChannel:
            stream = await vsock.connect(76, 7000)
            pipe = aio.StreamPipe(stream.reader, stream.writer)
            return await aio.connect(pipe, lambda b, h, rs: None, handshake_timeout=10)

        listener = await vsock.listen(76, 7000, on_stream)
        try:
            first, second = await client(), await client()
            assert app.open_sessions(7000) == 2
            for _ in range(3):
                with pytest.raises(HermeticError):
                    await client()
            assert len(documents) == 2  # the refused ones cost no attestation
            await first.close()
            for _ in range(200):
                if app.open_sessions(7000) < 2:
                    break
                await asyncio.sleep(0.05)
            third = await client()
            assert len(documents) == 3
            assert app.open_sessions(7000) == 2
            await second.close()
            await third.close()
        finally:
            await listener.aclose()

    asyncio.run(run())
    with pytest.raises(UsageError, match="limit_sessions"):
        App().limit_sessions(7000, 0)


def test_the_gateway_config_bounds_client_sessions(world: World) -> None:
    config = json.loads(world.logged_config(_admission()))
    assert GatewaySettings.from_config(config).max_sessions == 1024
    config["gateway"]["max_sessions"] = 8
    assert GatewaySettings.from_config(config).max_sessions == 8
    for bad in (0, True, "8", 70000):
        config["gateway"]["max_sessions"] = bad
        with pytest.raises(GatewayConfigError, match="max_sessions"):
            GatewaySettings.from_config(config)


class _Answers:
    """The attested session's side of ``call``: answers with the receipts given, in order
    (only the client's bookkeeping is under test; the channel has its own tests)."""

    def __init__(self, handshake_hash: bytes, answers: list[Exchange], args: list[Any]) -> None:
        self.handshake_hash = handshake_hash
        self.answers = answers
        self.args = args

    async def call(self, method: str, arg: Any = None) -> Any:
        assert method == "call"
        exchange = self.answers.pop(0)
        return {"result": {"arg": arg["args"]}, "receipt": exchange.receipt}


def test_a_session_that_keeps_no_receipts_checks_each_signature_at_once_and_stays_small(
    world: World, issued: Issued
) -> None:
    """``keep_receipts=False``: a long-lived client's session does not grow with its calls,
    and a receipt whose signature is bad is refused by the call itself (no later check)."""
    args = list(range(50))
    answers = [issued.receipt(arg=n) for n in args]
    bad = bytearray(answers[7].receipt)
    bad[-1] ^= 0x01  # the signature's last byte; every field still matches the call
    answers[7] = Exchange(bytes(bad), answers[7].request, answers[7].response)
    session = cast(AttestedSession, _Answers(issued.session, list(answers), args))
    client = GatewaySession(session, issued.policy, issued.signer.binding, keep_receipts=False)

    async def run() -> list[int]:
        seen = []
        for n in args:
            if n == 7:
                with pytest.raises(ReceiptSignatureError):
                    await client.call("alpha", "echo", n)
                continue
            reply = await client.call("alpha", "echo", n)
            seen.append(reply.result["arg"])
        return seen

    assert asyncio.run(run()) == [n for n in args if n != 7]
    assert client.exchanges == []
    with pytest.raises(GatewayUsageError, match="keep_receipts=False"):
        client.receipts_file()
    # the same answers to a session that keeps receipts: the bad one is accepted by the
    # call (the channel authenticated it) and caught when the receipts leave
    keeping = GatewaySession(
        cast(AttestedSession, _Answers(issued.session, list(answers), args)),
        issued.policy,
        issued.signer.binding,
    )
    for n in args:
        asyncio.run(keeping.call("alpha", "echo", n))
    assert len(keeping.exchanges) == len(args)
    with pytest.raises(ReceiptSignatureError):
        keeping.receipts_file()


def test_a_receipt_encodes_as_the_canonical_cbor_of_its_fields() -> None:
    """Receipt.encode skips the canonical encoder's sorting; its bytes must still be the
    canonical encoding the receipt's definition names, and the signed receipt's too."""
    for version, debug, time_ms, method in (
        ("1.0.0", False, 1_764_650_000_000, "echo"),
        (None, True, 0, "m"),
        ("2.10.3-rc.1", False, 2**63 - 1, "caf\u00e9 \u2603" * 10),
    ):
        receipt = Receipt(
            session=b"\x01" * 32, time_ms=time_ms, service="alpha", method=method,
            request=b"\x02" * 32, response=b"\x03" * 32, policy=b"\x04" * 32,
            backend_version=version, backend_pcr0=b"\x05" * 48, backend_debug=debug,
            backend_module="i-0123456789abcdef0-enc0123456789abcdef",
            backend_session=b"\x06" * 32,
        )  # fmt: skip
        fields = {
            "v": 1, "session": receipt.session, "time": time_ms, "service": "alpha",
            "method": method, "request": receipt.request, "response": receipt.response,
            "policy": receipt.policy, "backend_version": version,
            "backend_pcr0": receipt.backend_pcr0, "backend_debug": debug,
            "backend_module": receipt.backend_module,
            "backend_session": receipt.backend_session,
        }  # fmt: skip
        body = receipt.encode()
        assert body == canonical_dumps(fields, what="receipt", error=ReceiptFormatError)
        assert Receipt.decode(body) == receipt
        signature = bytes(range(64))
        assert signed_bytes(body, signature) == canonical_dumps(
            {"signature": signature, "receipt": body}, what="signed", error=ReceiptFormatError
        )
