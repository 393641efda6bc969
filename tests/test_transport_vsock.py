"""The vsock emulation: Unix sockets keyed by (CID, port), peer CID reporting, cleanup."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from helpers import act_as_enclave
from hermetic.errors import ConfigError, PeerRefusedError, PeerUnavailableError, TransportError
from hermetic.peercred import ProcessIdentity
from hermetic.transport import vsock
from hermetic.transport.tcp import parse_hostport
from hermetic.transport.vsock import VsockStream


@pytest.fixture(autouse=True)
def _emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMETIC_VSOCK", "emulated")
    monkeypatch.delenv("HERMETIC_VSOCK_CID", raising=False)


async def _echo(stream: VsockStream) -> None:
    data = await stream.reader.read(100)
    stream.writer.write(f"{stream.peer.cid}:".encode() + data)
    await stream.writer.drain()


async def test_listener_lives_at_cid_and_port_and_reports_peer_cid(tmp_path: Path) -> None:
    act_as_enclave(16, tmp_path)
    async with await vsock.listen(16, 5000, _echo, root=tmp_path) as listener:
        assert listener.path == tmp_path / "16" / "enclave" / "5000.sock"
        stream = await vsock.connect(16, 5000, root=tmp_path, source_cid=3)
        stream.writer.write(b"hi")
        assert await stream.reader.read(100) == b"3:hi"
        await stream.aclose()
    assert not (tmp_path / "16" / "enclave" / "5000.sock").exists()


async def test_parent_reaches_an_enclave_listener_below_an_overlong_state_dir(
    tmp_path: Path,
) -> None:
    # The enclave binds inside its sandbox at a short path; the parent sees the same
    # directory under its (possibly deep) state dir and connects through a held
    # descriptor, so the sun_path limit does not apply to it.
    act_as_enclave(16, tmp_path)
    deep = tmp_path / ("d" * 110)
    deep.symlink_to(tmp_path, target_is_directory=True)
    assert len(str(vsock.socket_path(deep, vsock.VsockAddress(16, 5000), bound=False))) > 108
    async with await vsock.listen(16, 5000, _echo, root=tmp_path):
        stream = await vsock.connect(16, 5000, root=deep, source_cid=3)
        stream.writer.write(b"deep")
        assert await stream.reader.read(100) == b"3:deep"
        await stream.aclose()


async def test_connect_to_nobody_is_a_clean_peer_unavailable_error(tmp_path: Path) -> None:
    with pytest.raises(PeerUnavailableError, match="vsock:17:5000"):
        await vsock.connect(17, 5000, root=tmp_path)


async def test_parent_listener_serves_one_enclave_in_its_own_directory(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="serves one enclave: expected a peer CID"):
        await vsock.listen(3, 9000, _echo, root=tmp_path)
    act_as_enclave(16, tmp_path)
    only16 = await vsock.listen(3, 9000, _echo, root=tmp_path, peer_cid=16)
    assert only16.path == tmp_path / "16" / "host" / "9000.sock"
    stream = await vsock.connect(3, 9000, root=tmp_path, source_cid=16)
    stream.writer.write(b"x")
    assert await stream.reader.read(100) == b"16:x"
    await stream.aclose()
    # Another enclave has no such endpoint at all: its directory holds only its own.
    with pytest.raises(PeerUnavailableError, match="nobody listening"):
        await vsock.connect(3, 9000, root=tmp_path, source_cid=17)
    await only16.aclose()


async def test_parent_listener_refuses_a_peer_claiming_another_cid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    act_as_enclave(16, tmp_path)
    called = asyncio.Event()

    async def handler(stream: VsockStream) -> None:
        called.set()

    listener = await vsock.listen(3, 9000, handler, root=tmp_path, peer_cid=16)
    assert listener.path is not None
    reader, writer = await asyncio.open_unix_connection(str(listener.path))
    writer.write((17).to_bytes(4, "big"))  # the right socket, another enclave's CID
    with caplog.at_level(logging.WARNING, logger="hermetic.vsock"):
        assert await asyncio.wait_for(reader.read(), 30) == b""
    assert not called.is_set()
    assert "refused a peer claiming CID 17" in caplog.text
    writer.close()
    await listener.aclose()


async def test_parent_listener_refuses_a_process_outside_the_enclaves_sandbox(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Enclave 16's identity is another uid in another PID namespace than this process.
    vsock.publish_identity(
        tmp_path, 16, ProcessIdentity(uid=os.getuid() + 1, pid_namespace="pid:[1]")
    )
    called = asyncio.Event()

    async def handler(stream: VsockStream) -> None:
        called.set()

    listener = await vsock.listen(3, 9000, handler, root=tmp_path, peer_cid=16)
    with caplog.at_level(logging.WARNING, logger="hermetic.vsock"):
        stream = await vsock.connect(3, 9000, root=tmp_path, source_cid=16)
        assert await asyncio.wait_for(stream.reader.read(), 30) == b""
    assert not called.is_set()
    assert f"expected uid {os.getuid() + 1}, got uid {os.getuid()}" in caplog.text
    await stream.aclose()
    # Right uid, wrong PID namespace: refused too.
    vsock.publish_identity(tmp_path, 16, ProcessIdentity(uid=os.getuid(), pid_namespace="pid:[1]"))
    with caplog.at_level(logging.WARNING, logger="hermetic.vsock"):
        stream = await vsock.connect(3, 9000, root=tmp_path, source_cid=16)
        assert await asyncio.wait_for(stream.reader.read(), 30) == b""
    assert "expected a process in pid:[1]" in caplog.text
    assert not called.is_set()
    await stream.aclose()
    await listener.aclose()


async def test_parent_does_not_follow_a_symlink_an_enclave_planted_for_its_port(
    tmp_path: Path,
) -> None:
    act_as_enclave(17, tmp_path)
    target = await vsock.listen(17, 5000, _echo, root=tmp_path)  # somebody else's socket
    assert target.path is not None
    planted = tmp_path / "16" / "enclave" / "5000.sock"
    planted.parent.mkdir(parents=True)
    planted.symlink_to(target.path)
    with pytest.raises(PeerRefusedError, match="is not a socket"):
        await vsock.connect(16, 5000, root=tmp_path, source_cid=3)
    await target.aclose()


async def test_parent_refuses_a_listener_that_is_not_the_enclaves_process(
    tmp_path: Path,
) -> None:
    listener = await vsock.listen(16, 5000, _echo, root=tmp_path)
    with pytest.raises(PeerRefusedError, match="enclave 16 has no published identity"):
        await vsock.connect(16, 5000, root=tmp_path, source_cid=3)
    vsock.publish_identity(tmp_path, 16, ProcessIdentity(uid=os.getuid(), pid_namespace="pid:[1]"))
    with pytest.raises(PeerRefusedError, match="expected a process in pid:\\[1\\]"):
        await vsock.connect(16, 5000, root=tmp_path, source_cid=3)
    await listener.aclose()


async def test_stale_socket_file_is_replaced_but_live_one_is_address_in_use(
    tmp_path: Path,
) -> None:
    first = await vsock.listen(16, 1, _echo, root=tmp_path)
    with pytest.raises(TransportError, match="address in use"):
        await vsock.listen(16, 1, _echo, root=tmp_path)
    # Simulate a crashed owner: the file stays but nobody accepts any more.
    first._server.close()
    await first._server.wait_closed()
    assert first.path is not None
    first.path.touch(exist_ok=True)
    second = await vsock.listen(16, 1, _echo, root=tmp_path)
    await second.aclose()


def test_addresses_out_of_range_are_rejected() -> None:
    with pytest.raises(TransportError, match=r"port: expected 0\.\.4294967295, got -1"):
        vsock.VsockAddress(3, -1)


def test_overlong_emulation_path_is_refused_with_advice(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="shorter HERMETIC_STATE_DIR"):
        vsock.socket_path(tmp_path / ("x" * 120), vsock.VsockAddress(16, 1))


def test_native_mode_is_chosen_only_on_nitro_or_when_forced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not vsock.native_available()
    monkeypatch.setenv("HERMETIC_VSOCK", "native")
    assert vsock.native_available()
    monkeypatch.setenv("HERMETIC_VSOCK", "bogus")
    with pytest.raises(TransportError, match="HERMETIC_VSOCK"):
        vsock.native_available()


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("127.0.0.1:80", "127.0.0.1", 80), ("[::1]:443", "::1", 443), ("kms:1", "kms", 1)],
)
def test_hostport_parses_v4_v6_and_names(text: str, host: str, port: int) -> None:
    parsed = parse_hostport(text)
    assert (parsed.host, parsed.port) == (host, port)


@pytest.mark.parametrize("text", ["nohost", ":80", "h:", "h:x", "h:70000", "h:0"])
def test_hostport_rejects_bad_values(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_hostport(text)


async def test_listener_drops_connection_that_sends_no_cid_header(tmp_path: Path) -> None:
    called = asyncio.Event()

    async def handler(stream: VsockStream) -> None:
        called.set()

    listener = await vsock.listen(16, 2, handler, root=tmp_path)
    assert listener.path is not None
    reader, writer = await asyncio.open_unix_connection(str(listener.path))
    writer.write(b"\x00")
    writer.write_eof()
    # The listener closing its end is the event that it has decided: only then is "the
    # handler was not called" a result rather than a race.
    assert await asyncio.wait_for(reader.read(), 30) == b""
    assert not called.is_set()
    writer.close()
    await listener.aclose()
