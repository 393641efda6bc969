"""The egress header an enclave sends to the parent's proxy, and the proxy's answer."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hermetic.errors import FrameFormatError
from hermetic.transport.egress import decode_connect, decode_reply, encode_connect, encode_reply
from hermetic.transport.tcp import HostPort


def test_connect_line_is_one_ascii_line() -> None:
    assert encode_connect(HostPort("kms.eu-west-1.amazonaws.com", 443)) == (
        b"CONNECT kms.eu-west-1.amazonaws.com:443\n"
    )
    assert encode_connect(HostPort("::1", 80)) == b"CONNECT [::1]:80\n"


@given(
    st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?", fullmatch=True),
    st.integers(min_value=1, max_value=65535),
)
def test_connect_roundtrips(host: str, port: int) -> None:
    assert decode_connect(encode_connect(HostPort(host, port))) == HostPort(host, port)


@pytest.mark.parametrize(
    "line",
    [
        b"CONNECT host:80",  # no newline
        b"GET / HTTP/1.1\n",
        b"CONNECT host\n",
        b"CONNECT host:0\n",
        b"CONNECT host:99999\n",
        b"CONNECT \xff:80\n",
        b"CONNECT " + b"a" * 400 + b":80\n",
    ],
)
def test_malformed_connect_lines_are_rejected(line: bytes) -> None:
    with pytest.raises(FrameFormatError):
        decode_connect(line)


@given(st.binary(max_size=80))
def test_connect_decoder_raises_only_frame_errors(junk: bytes) -> None:
    with contextlib.suppress(FrameFormatError):
        decode_connect(junk)


def test_every_single_byte_mutation_of_a_connect_line_changes_or_fails() -> None:
    line = encode_connect(HostPort("127.0.0.1", 8443))
    for i in range(len(line)):
        mutated = bytearray(line)
        mutated[i] ^= 0x40
        with contextlib.suppress(FrameFormatError):
            assert decode_connect(bytes(mutated)) != HostPort("127.0.0.1", 8443)


def test_reply_roundtrip_and_newlines_cannot_smuggle_a_second_line() -> None:
    assert decode_reply(encode_reply(None)) is None
    assert decode_reply(encode_reply("nope\nOK")) == "nope OK"
    with pytest.raises(FrameFormatError):
        decode_reply(b"YES\n")
