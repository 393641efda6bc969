"""The egress header: how an enclave asks the parent's proxy for a TCP destination.

An enclave has no network; to reach KMS or a database it opens a vsock stream to the
parent's egress port (8000, like AWS's vsock-proxy) and names the destination in one
line, ``CONNECT host:port\\n``. The proxy answers ``OK\\n`` and then relays bytes, or
``ERR <reason>\\n`` and closes. Unlike vsock-proxy (one fixed destination per port) one
port serves every allowlisted destination, and the allowlist is enforced on the parent,
where refusals can be counted.

Sans-IO: build and parse the two lines; the proxy and the enclave do the I/O.
"""

from __future__ import annotations

from hermetic.errors import FrameFormatError
from hermetic.transport.tcp import HostPort, parse_hostport

MAX_LINE = 300
_PREFIX = b"CONNECT "


def encode_connect(destination: HostPort) -> bytes:
    return _PREFIX + str(destination).encode("ascii") + b"\n"


def decode_connect(line: bytes) -> HostPort:
    """Parse the request line (with its trailing newline); raise FrameFormatError."""
    if len(line) > MAX_LINE or not line.endswith(b"\n") or not line.startswith(_PREFIX):
        raise FrameFormatError(
            f"egress request: expected 'CONNECT host:port\\n' of at most {MAX_LINE} bytes"
        )
    try:
        text = line[len(_PREFIX) : -1].decode("ascii")
    except UnicodeDecodeError:
        raise FrameFormatError("egress request: destination is not ASCII") from None
    try:
        return parse_hostport(text, field="egress destination")
    except Exception as exc:
        raise FrameFormatError(str(exc)) from None


def encode_reply(error: str | None) -> bytes:
    if error is None:
        return b"OK\n"
    return b"ERR " + error.replace("\n", " ").encode("utf-8", "replace")[: MAX_LINE - 6] + b"\n"


def decode_reply(line: bytes) -> str | None:
    """None for OK, else the proxy's reason; FrameFormatError if it is neither."""
    if line == b"OK\n":
        return None
    if line.startswith(b"ERR ") and line.endswith(b"\n") and len(line) <= MAX_LINE:
        return line[4:-1].decode("utf-8", "replace")
    raise FrameFormatError("egress reply: expected 'OK\\n' or 'ERR reason\\n'")
