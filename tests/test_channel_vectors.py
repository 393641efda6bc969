"""Every published NX/XX 25519 vector in our allow-list, replayed through hermetic's wrapper."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
from noise.connection import Keypair, NoiseConnection

from hermetic.channel.noise import ALLOWED_PROTOCOLS, NoiseHandshake, StaticKeypair

FILES = ("cacophony.txt", "snow.txt", "noise-c-basic.txt")
EXPECTED_PER_FILE = 8  # {NX, XX} x {AESGCM, ChaChaPoly} x {SHA256, BLAKE2s}


def _name(vector: dict[str, Any]) -> str:
    return str(vector.get("protocol_name") or vector.get("name"))


def _load(vectors: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for file in FILES:
        for vector in json.loads((vectors / "noise" / file).read_text())["vectors"]:
            if _name(vector) in ALLOWED_PROTOCOLS:
                out.append((file, vector))
    return out


def _replay(vector: dict[str, Any]) -> None:
    name = _name(vector)
    xx = "_XX_" in name
    init = NoiseHandshake(
        name,
        initiator=True,
        prologue=bytes.fromhex(vector["init_prologue"]),
        static=StaticKeypair.from_private(bytes.fromhex(vector["init_static"])) if xx else None,
        ephemeral_private=bytes.fromhex(vector["init_ephemeral"]),
    )
    resp = NoiseHandshake(
        name,
        initiator=False,
        prologue=bytes.fromhex(vector["resp_prologue"]),
        static=StaticKeypair.from_private(bytes.fromhex(vector["resp_static"])),
        ephemeral_private=bytes.fromhex(vector["resp_ephemeral"]),
    )
    messages = vector["messages"]
    parties = [init, resp]
    n = 0
    while not (init.complete and resp.complete):
        sender, receiver = parties[n % 2], parties[(n + 1) % 2]
        payload = bytes.fromhex(messages[n]["payload"])
        ciphertext = sender.write_message(payload)
        assert ciphertext.hex() == messages[n]["ciphertext"], f"handshake message {n}"
        assert receiver.read_message(ciphertext) == payload
        n += 1
    assert init.handshake_hash == resp.handshake_hash
    if "handshake_hash" in vector:
        assert init.handshake_hash.hex() == vector["handshake_hash"]
    assert (
        init.remote_static
        == StaticKeypair.from_private(bytes.fromhex(vector["resp_static"])).public
    )
    transports = [init.split(), resp.split()]
    for m in range(n, len(messages)):
        sender, receiver = transports[m % 2], transports[(m + 1) % 2]
        payload = bytes.fromhex(messages[m]["payload"])
        ciphertext = sender.encrypt(payload)
        assert ciphertext.hex() == messages[m]["ciphertext"], f"transport message {m}"
        assert receiver.decrypt(ciphertext) == payload


def test_every_allowed_vector_replays_byte_for_byte_through_the_wrapper(vectors: Path) -> None:
    selected = _load(vectors)
    counts = {file: sum(1 for f, _ in selected if f == file) for file in FILES}
    assert counts == dict.fromkeys(FILES, EXPECTED_PER_FILE)
    for file, vector in selected:
        try:
            _replay(vector)
        except AssertionError as exc:
            raise AssertionError(f"{file} {_name(vector)}: {exc}") from exc
    assert len(selected) == 24


def test_vectors_reject_a_flipped_ciphertext_bit(vectors: Path) -> None:
    """The replay is a real check: one altered handshake byte must fail it."""
    _, vector = _load(vectors)[0]
    msgs = [dict(m) for m in vector["messages"]]
    first = bytearray.fromhex(msgs[1]["ciphertext"])
    first[-1] ^= 1
    msgs[1]["ciphertext"] = first.hex()
    with pytest.raises(AssertionError):
        _replay({**vector, "messages": msgs})


def _fundamental(name: str) -> bool:
    parts = name.split("_")
    return (
        len(parts) == 5
        and parts[0] == "Noise"
        and parts[1].isalpha()
        and parts[1].isupper()
        and parts[2] == "25519"
    )


def test_all_fundamental_25519_vectors_pass_in_noiseprotocol_directly(vectors: Path) -> None:
    """Sanity check of the library under the wrapper across every fundamental pattern."""
    checked = 0
    for file in FILES:
        for vector in json.loads((vectors / "noise" / file).read_text())["vectors"]:
            name = _name(vector)
            if not _fundamental(name):
                continue
            one_way = name.split("_")[1] in {"N", "K", "X"}
            conns = []
            for role in ("init", "resp"):
                conn = NoiseConnection.from_name(name.encode())
                (conn.set_as_initiator if role == "init" else conn.set_as_responder)()
                conn.set_prologue(bytes.fromhex(vector[f"{role}_prologue"]))
                for key, kind in (("static", Keypair.STATIC), ("ephemeral", Keypair.EPHEMERAL)):
                    if vector.get(f"{role}_{key}"):
                        conn.set_keypair_from_private_bytes(
                            kind, bytes.fromhex(vector[f"{role}_{key}"])
                        )
                if vector.get(f"{role}_remote_static"):
                    conn.set_keypair_from_public_bytes(
                        Keypair.REMOTE_STATIC, bytes.fromhex(vector[f"{role}_remote_static"])
                    )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "ephemeral injected": fine for vectors
                    conn.start_handshake()
                conns.append(conn)
            for n, message in enumerate(vector["messages"]):
                s, r = (0, 1) if one_way or n % 2 == 0 else (1, 0)
                payload = bytes.fromhex(message["payload"])
                if not conns[s].handshake_finished:
                    ct = bytes(conns[s].write_message(payload))
                    assert bytes(conns[r].read_message(ct)) == payload
                else:
                    ct = conns[s].encrypt(payload)
                    assert conns[r].decrypt(ct) == payload
                assert ct.hex() == message["ciphertext"], f"{file} {name} message {n}"
            checked += 1
    # 15 fundamental patterns x 2 ciphers x 4 hashes x 25519 in each of the three files.
    assert checked == 3 * 120


def _library(
    name: str, initiator: bool, prologue: bytes, static: bytes | None, ephemeral: bytes
) -> Any:
    conn = NoiseConnection.from_name(name.encode())
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(prologue)
    if static is not None:
        conn.set_keypair_from_private_bytes(Keypair.STATIC, static)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library warns about injected ephemerals
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
        conn.start_handshake()
    return conn


@pytest.mark.parametrize("name", sorted(ALLOWED_PROTOCOLS))
def test_handshake_is_byte_identical_to_noiseprotocol_for_random_keys(name: str) -> None:
    """A differential check beyond the vectors: random keys, prologues and payloads, every
    message compared with the library's, and the transport keys compared by their output."""
    rng = random.Random(name)
    for _ in range(10):
        prologue = rng.randbytes(rng.randrange(0, 40))
        keys = {k: rng.randbytes(32) for k in ("is", "rs", "ie", "re")}
        xx = "_XX_" in name
        ours = [
            NoiseHandshake(
                name,
                initiator=True,
                prologue=prologue,
                static=StaticKeypair.from_private(keys["is"]) if xx else None,
                ephemeral_private=keys["ie"],
            ),
            NoiseHandshake(
                name,
                initiator=False,
                prologue=prologue,
                static=StaticKeypair.from_private(keys["rs"]),
                ephemeral_private=keys["re"],
            ),
        ]
        theirs = [
            _library(name, True, prologue, keys["is"] if xx else None, keys["ie"]),
            _library(name, False, prologue, keys["rs"], keys["re"]),
        ]
        n = 0
        while not (ours[0].complete and ours[1].complete):
            sender, receiver = n % 2, (n + 1) % 2
            payload = rng.randbytes(rng.randrange(0, 100))
            message = ours[sender].write_message(payload)
            assert message == bytes(theirs[sender].write_message(payload)), f"message {n}"
            assert ours[receiver].read_message(message) == payload
            assert bytes(theirs[receiver].read_message(message)) == payload
            n += 1
        assert ours[0].handshake_hash == bytes(theirs[0].get_handshake_hash())
        transports = [ours[0].split(), ours[1].split()]
        for m in range(4):
            payload = rng.randbytes(rng.randrange(0, 100))
            sender = m % 2
            mine = transports[sender].encrypt(payload)
            assert mine == bytes(theirs[sender].encrypt(payload)), f"transport {m}"
            assert transports[1 - sender].decrypt(mine) == payload
