"""The sans-IO session: handshake, evidence gate, chunking, rekey, and every way it must fail."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermetic.channel.noise import MAX_NONCE, XX, StaticKeypair
from hermetic.channel.session import (
    MAX_CHUNK_DATA,
    ApplicationData,
    ClientSession,
    Closed,
    Event,
    HandshakeComplete,
    PeerVerified,
    ServerSession,
    State,
    _Session,
)
from hermetic.errors import (
    DecryptError,
    EvidenceRejectedError,
    FrameError,
    HandshakeError,
    HermeticError,
    MessageTooLargeError,
    NonceExhaustedError,
    PolicyError,
    SessionClosedError,
    SessionStateError,
)

SERVER_KEY = StaticKeypair.generate()
CLIENT_KEY = StaticKeypair.generate()


class Recorder:
    """An evidence verifier that records what it was given and accepts a known bundle."""

    def __init__(self, accept: bool = True) -> None:
        self.calls: list[tuple[bytes, bytes, bytes]] = []
        self.accept = accept

    def __call__(self, bundle: bytes, handshake_hash: bytes, remote_static: bytes) -> object:
        self.calls.append((bundle, handshake_hash, remote_static))
        if not self.accept or not bundle.startswith(b"evidence:"):
            raise PolicyError(f"bundle: expected the test evidence, got {bundle[:16]!r}")
        return {"peer": remote_static.hex()}


def evidence(handshake_hash: bytes, static_public: bytes) -> bytes:
    return b"evidence:" + handshake_hash + static_public


def pump(a: _Session, b: _Session) -> tuple[list[Event], list[Event]]:
    """Deliver queued messages both ways until neither side has anything to send."""
    events_a: list[Event] = []
    events_b: list[Event] = []
    while True:
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return events_a, events_b
        for message in out_a:
            events_b += b.receive(message)
        for message in out_b:
            events_a += a.receive(message)


def nx_pair(
    verifier: Callable[[bytes, bytes, bytes], object] | None = None,
    make: Callable[[bytes, bytes], bytes] = evidence,
    **options: Any,
) -> tuple[ClientSession, ServerSession]:
    client = ClientSession(verifier or Recorder(), **options)
    server = ServerSession(SERVER_KEY, make, **options)
    return client, server


def open_nx(**options: Any) -> tuple[ClientSession, ServerSession]:
    client, server = nx_pair(**options)
    pump(client, server)
    assert client.state is State.OPEN
    assert server.state is State.OPEN
    return client, server


def handshake_only(client: ClientSession, server: ServerSession) -> list[bytes]:
    """Run the handshake; return the server's queued transport messages, undelivered."""
    server.receive(client.data_to_send()[0])
    msg2, *transport = server.data_to_send()
    client.receive(msg2)
    return transport


# -- handshake and evidence -------------------------------------------------------------


def test_nx_handshake_opens_both_sides_and_carries_data_both_ways() -> None:
    client, server = nx_pair()
    client_events, server_events = pump(client, server)
    assert isinstance(client_events[0], HandshakeComplete)
    assert isinstance(client_events[1], PeerVerified)
    assert isinstance(server_events[0], HandshakeComplete)
    client.send_application(b"ping")
    server.send_application(b"pong")
    to_client, to_server = pump(client, server)
    assert to_client == [ApplicationData(b"pong")]
    assert to_server == [ApplicationData(b"ping")]


def test_verifier_gets_final_handshake_hash_equal_on_both_sides_and_server_static_key() -> None:
    verifier = Recorder()
    made: list[tuple[bytes, bytes]] = []

    def make(handshake_hash: bytes, static_public: bytes) -> bytes:
        made.append((handshake_hash, static_public))
        return evidence(handshake_hash, static_public)

    client, server = nx_pair(verifier, make)
    pump(client, server)
    [(bundle, seen_hash, seen_static)] = verifier.calls
    assert seen_hash == client.handshake_hash == server.handshake_hash
    assert len(seen_hash) == 32
    assert seen_static == SERVER_KEY.public == client.remote_static
    assert made == [(server.handshake_hash, SERVER_KEY.public)]
    assert bundle == evidence(seen_hash, SERVER_KEY.public)
    assert client.peer_info == {"peer": SERVER_KEY.public.hex()}


def test_two_sessions_never_share_a_handshake_hash() -> None:
    first, _ = open_nx()
    second, _ = open_nx()
    assert first.handshake_hash != second.handshake_hash


def test_xx_both_sides_send_and_verify_evidence() -> None:
    client_verifier, server_verifier = Recorder(), Recorder()
    client = ClientSession(
        client_verifier, protocol_name=XX, static=CLIENT_KEY, make_evidence=evidence
    )
    server = ServerSession(SERVER_KEY, evidence, protocol_name=XX, verify_evidence=server_verifier)
    client_events, server_events = pump(client, server)
    assert [type(e) for e in client_events] == [HandshakeComplete, PeerVerified]
    assert [type(e) for e in server_events] == [HandshakeComplete, PeerVerified]
    assert client_verifier.calls[0][1:] == (server.handshake_hash, SERVER_KEY.public)
    assert server_verifier.calls[0][1:] == (client.handshake_hash, CLIENT_KEY.public)
    client.send_application(b"x" * 100_000)
    assert pump(client, server)[1] == [ApplicationData(b"x" * 100_000)]


def test_xx_server_refuses_application_data_until_client_evidence_verified() -> None:
    client = ClientSession(Recorder(), protocol_name=XX, static=CLIENT_KEY, make_evidence=evidence)
    server = ServerSession(SERVER_KEY, evidence, protocol_name=XX, verify_evidence=Recorder())
    server.receive(client.data_to_send()[0])
    client.receive(server.data_to_send()[0])
    server.receive(client.data_to_send()[0])  # msg3: handshake done, client evidence pending
    assert server.state is State.AWAIT_EVIDENCE
    with pytest.raises(SessionStateError):
        server.send_application(b"too early")


def test_client_cannot_send_application_data_before_evidence_verified() -> None:
    client, server = nx_pair()
    handshake_only(client, server)
    assert client.state is State.AWAIT_EVIDENCE
    with pytest.raises(SessionStateError, match="evidence not yet verified"):
        client.send_application(b"secret")
    assert client.data_to_send() == []


def test_rejected_evidence_closes_session_and_releases_no_application_data() -> None:
    client, server = nx_pair(Recorder(accept=False))
    transport = handshake_only(client, server)
    server.send_application(b"data sent right after the evidence")
    transport += server.data_to_send()
    with pytest.raises(EvidenceRejectedError, match="PolicyError"):
        client.receive(transport[0])
    assert client.state is State.CLOSED
    with pytest.raises(SessionClosedError):
        client.receive(transport[1])
    with pytest.raises(SessionClosedError):
        client.send_application(b"x")


def test_application_data_in_place_of_evidence_is_never_delivered() -> None:
    """A server that skips its evidence: its first message is judged as evidence, and fails."""
    verifier = Recorder()
    client, server = nx_pair(verifier, make=lambda h, s: b"hello, application")
    transport = handshake_only(client, server)
    with pytest.raises(EvidenceRejectedError):
        client.receive(transport[0])
    assert verifier.calls[0][0] == b"hello, application"


def test_verifier_raising_a_non_hermetic_error_still_rejects() -> None:
    def broken(bundle: bytes, h: bytes, s: bytes) -> object:
        raise KeyError("bug")

    client, server = nx_pair(broken)
    transport = handshake_only(client, server)
    with pytest.raises(EvidenceRejectedError, match="KeyError"):
        client.receive(transport[0])


def test_prologue_mismatch_fails_the_handshake() -> None:
    client = ClientSession(Recorder(), prologue=b"hermetic/2")
    server = ServerSession(SERVER_KEY, evidence)
    server.receive(client.data_to_send()[0])
    with pytest.raises(HandshakeError, match="handshake message 2: authentication failed"):
        client.receive(server.data_to_send()[0])


def test_bit_flip_in_server_handshake_message_fails_the_handshake() -> None:
    client, server = nx_pair()
    server.receive(client.data_to_send()[0])
    msg2 = bytearray(server.data_to_send()[0])
    msg2[40] ^= 0x01  # inside the encrypted static key
    with pytest.raises(HandshakeError):
        client.receive(bytes(msg2))
    assert client.state is State.CLOSED


@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little")])
def test_low_order_ephemeral_is_a_handshake_error(point: bytes) -> None:
    server = ServerSession(SERVER_KEY, evidence)
    with pytest.raises(HandshakeError, match="low-order"):
        server.receive(point)
    client = ClientSession(Recorder())
    with pytest.raises(HandshakeError, match="low-order"):
        client.receive(point + bytes(64))


def test_handshake_message_sizes_are_checked() -> None:
    server = ServerSession(SERVER_KEY, evidence)
    with pytest.raises(HandshakeError, match="at least 32 bytes, got 31"):
        server.receive(bytes(31))
    server = ServerSession(SERVER_KEY, evidence)
    with pytest.raises(MessageTooLargeError):
        server.receive(bytes(65536))
    client, server = nx_pair()
    server.receive(client.data_to_send()[0])
    msg2 = server.data_to_send()[0]
    assert len(msg2) == 96
    with pytest.raises(HandshakeError, match="at least 96 bytes, got 95"):
        client.receive(msg2[:95])


def test_handshake_payload_must_be_empty() -> None:
    server = ServerSession(SERVER_KEY, evidence)
    client = ClientSession(Recorder())
    msg1 = client.data_to_send()[0]
    with pytest.raises(HandshakeError, match="handshake payload: expected empty"):
        server.receive(msg1 + b"payload")


# -- transport integrity ----------------------------------------------------------------


def _server_messages(count: int) -> tuple[ClientSession, ServerSession, list[bytes]]:
    client, server = open_nx()
    for n in range(count):
        server.send_application(f"message {n}".encode())
    return client, server, server.data_to_send()


def test_truncated_transport_message_closes_with_decrypt_error() -> None:
    client, _, messages = _server_messages(1)
    with pytest.raises(DecryptError, match="authentication failed"):
        client.receive(messages[0][:-1])
    assert client.state is State.CLOSED
    assert isinstance(client.error, DecryptError)


def test_transport_message_shorter_than_a_tag_is_rejected_as_truncated() -> None:
    client, _, _ = _server_messages(0)
    with pytest.raises(DecryptError, match="truncated"):
        client.receive(bytes(15))


def test_reordered_transport_messages_close_with_decrypt_error() -> None:
    client, _, messages = _server_messages(2)
    with pytest.raises(DecryptError):
        client.receive(messages[1])
    with pytest.raises(SessionClosedError):
        client.receive(messages[0])


def test_replayed_transport_message_closes_with_decrypt_error() -> None:
    client, _, messages = _server_messages(1)
    assert client.receive(messages[0]) == [ApplicationData(b"message 0")]
    with pytest.raises(DecryptError):
        client.receive(messages[0])


def test_every_single_bit_flip_of_a_transport_message_is_rejected() -> None:
    _, _, [original] = _server_messages(1)
    for bit in range(len(original) * 8):
        client, _, [message] = _server_messages(1)
        mutated = bytearray(message)
        mutated[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecryptError):
            client.receive(bytes(mutated))
        assert client.state is State.CLOSED


def test_bad_chunk_header_from_an_authenticated_peer_is_a_frame_error() -> None:
    client, server = open_nx()
    assert server._transport is not None
    with pytest.raises(FrameError, match="chunk header"):
        client.receive(server._transport.encrypt(b"\x04data"))


def test_empty_transport_plaintext_is_a_frame_error() -> None:
    client, server = open_nx()
    assert server._transport is not None
    with pytest.raises(FrameError, match="empty"):
        client.receive(server._transport.encrypt(b""))


def test_close_message_ends_the_session_on_both_sides() -> None:
    client, server = open_nx()
    server.close("maintenance")
    assert pump(client, server)[0] == [Closed("maintenance")]
    assert client.state is State.CLOSED
    assert server.state is State.CLOSED
    with pytest.raises(SessionClosedError):
        client.send_application(b"x")
    with pytest.raises(SessionClosedError):
        server.receive(b"anything")


# -- chunking and limits ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "noise_messages"),
    [(0, 1), (1, 1), (MAX_CHUNK_DATA, 1), (MAX_CHUNK_DATA + 1, 2), (3 * MAX_CHUNK_DATA + 5, 4)],
)
def test_application_messages_are_chunked_and_reassembled(size: int, noise_messages: int) -> None:
    client, server = open_nx()
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    client.send_application(data)
    sent = client.data_to_send()
    assert len(sent) == noise_messages
    assert all(len(m) <= 65535 for m in sent)
    events = [e for m in sent for e in server.receive(m)]
    assert events == [ApplicationData(data)]


def test_sender_refuses_an_application_message_over_the_cap() -> None:
    client, _ = open_nx(max_message_size=1000)
    with pytest.raises(MessageTooLargeError, match="at most 1000 bytes, got 1001"):
        client.send_application(bytes(1001))
    assert client.state is State.OPEN


def test_receiver_closes_when_reassembly_would_exceed_its_cap() -> None:
    client = ClientSession(Recorder(), max_message_size=100_000)
    server = ServerSession(SERVER_KEY, evidence, max_message_size=1_000_000)
    pump(client, server)
    server.send_application(bytes(200_000))
    messages = server.data_to_send()
    client.receive(messages[0])
    with pytest.raises(MessageTooLargeError):
        client.receive(messages[1])
    assert client.state is State.CLOSED


def test_oversized_transport_message_is_rejected() -> None:
    client, _ = open_nx()
    with pytest.raises(MessageTooLargeError):
        client.receive(bytes(65536))


# -- rekey and nonces -----------------------------------------------------------------------


def test_rekey_in_lockstep_across_many_intervals() -> None:
    client, server = open_nx(rekey_interval=3)
    for n in range(20):
        client.send_application(f"c{n}".encode())
        server.send_application(f"s{n}".encode() * 30_000)  # multi-chunk messages too
    to_client, to_server = pump(client, server)
    assert to_server == [ApplicationData(f"c{n}".encode()) for n in range(20)]
    assert to_client == [ApplicationData(f"s{n}".encode() * 30_000) for n in range(20)]
    # evidence + 10 single-chunk + 10 two-chunk messages: about ten rekeys each way
    assert server._transport is not None
    assert server._transport.messages_sent == 31


def test_rekey_really_changes_keys_so_mismatched_intervals_fail() -> None:
    client = ClientSession(Recorder(), rekey_interval=4)
    server = ServerSession(SERVER_KEY, evidence, rekey_interval=3)
    pump(client, server)  # evidence is server message 1
    for _n in range(2):
        server.send_application(b"ok")
        assert client.receive(server.data_to_send()[0]) == [ApplicationData(b"ok")]
    server.send_application(b"after the server's rekey")
    with pytest.raises(DecryptError):
        client.receive(server.data_to_send()[0])


def test_send_nonce_exhaustion_is_refused_before_the_reserved_value() -> None:
    client, _ = open_nx()
    assert client._transport is not None
    client._transport._sent = MAX_NONCE - 1
    with pytest.raises(NonceExhaustedError):
        client.send_application(b"x")


def test_receive_nonce_exhaustion_is_refused() -> None:
    client, server = open_nx()
    assert client._transport is not None
    server.send_application(b"x")
    client._transport._received = MAX_NONCE - 1
    with pytest.raises(NonceExhaustedError):
        client.receive(server.data_to_send()[0])


# -- arbitrary input in every state ---------------------------------------------------------


def _session_in(state: str) -> _Session:
    if state == "server-handshake":
        return ServerSession(SERVER_KEY, evidence)
    if state == "xx-server-handshake":
        client = ClientSession(
            Recorder(), protocol_name=XX, static=CLIENT_KEY, make_evidence=evidence
        )
        server = ServerSession(SERVER_KEY, evidence, protocol_name=XX, verify_evidence=Recorder())
        server.receive(client.data_to_send()[0])
        return server
    if state == "client-handshake":
        return ClientSession(Recorder())
    client, server = nx_pair()
    if state == "client-await-evidence":
        handshake_only(client, server)
        return client
    pump(client, server)
    if state == "server-open":
        return server
    if state == "client-open":
        return client
    client.close("done")
    return client


STATES = [
    "server-handshake",
    "xx-server-handshake",
    "client-handshake",
    "client-await-evidence",
    "client-open",
    "server-open",
    "closed",
]


@pytest.mark.parametrize("state", STATES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_arbitrary_messages_in_every_state_raise_only_hermetic_errors(
    state: str, messages: list[bytes]
) -> None:
    session = _session_in(state)
    for message in messages:
        try:
            events = session.receive(message)
        except HermeticError:
            assert session.state is State.CLOSED
            continue
        # Random bytes never authenticate as transport data.
        assert not any(isinstance(e, ApplicationData | PeerVerified) for e in events)


def test_connection_lost_closes_the_session_with_the_carriers_error() -> None:
    client, _ = open_nx()
    client.connection_lost(SessionClosedError("connection ended without a close message"))
    assert client.state is State.CLOSED
    with pytest.raises(SessionClosedError, match="without a close message"):
        client.send_application(b"x")


def test_static_keypair_built_once_is_the_same_key_the_library_would_build() -> None:
    from noise.backends.default.keypairs import KeyPair25519

    static = StaticKeypair.generate()
    rebuilt = KeyPair25519.from_private_bytes(static.private)
    ours = static.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert ours == rebuilt.public_bytes == static.public
    # two handshakes with the one static key pair: each gets its own transport keys
    hashes = set()
    for _ in range(2):
        client = ClientSession(lambda bundle, hh, rs: rs)
        server = ServerSession(static, lambda hh, pub: b"evidence")
        server_events = server.receive(client.data_to_send()[0])
        client.receive(server.data_to_send()[0])
        assert client.remote_static == static.public
        hashes.add(client.handshake_hash)
        assert server_events
    assert len(hashes) == 2


def test_static_keypair_with_a_public_key_of_another_private_key_is_refused() -> None:
    one, other = StaticKeypair.generate(), StaticKeypair.generate()
    with pytest.raises(HandshakeError, match="does not match"):
        StaticKeypair(private=one.private, public=other.public)
