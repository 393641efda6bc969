"""The real ``/dev/nsm`` backend: one ``ioctl`` per request, as the Linux driver defines it.

Inside a Nitro enclave the NSM is a virtio device behind ``/dev/nsm`` (upstream driver
``drivers/misc/nsm.c`` since Linux 6.8, or AWS's older ``nsm.ko``). Its only operation is
``NSM_IOCTL_RAW = _IOWR(0x0A, 0, struct nsm_raw)``: the caller passes two iovecs (request
address/length, response address/length) and the driver writes the response and its
length back. There is no Python binding for it, hence the small amount of ``ctypes`` here.

The struct packing is split into pure functions so it is tested everywhere; the ioctl
itself only runs on Nitro hardware (see ``docs/nsm.md``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from hermetic.errors import NSMError, NSMUnavailableError
from hermetic.nsm.messages import REQUEST_MAX_SIZE, RESPONSE_MAX_SIZE

DEVICE_PATH = "/dev/nsm"
NSM_MAGIC = 0x0A

#: ``struct nsm_raw { struct nsm_iovec { __u64 addr; __u64 len; } request, response; }``,
#: native byte order (the kernel's), 32 bytes.
NSM_RAW = struct.Struct("=QQQQ")

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_WRITE, _IOC_READ = 1, 2


def ioc_readwrite(magic: int, number: int, size: int) -> int:
    """Linux ``_IOWR(magic, number, size)`` on x86_64/aarch64 (the asm-generic layout)."""
    direction = _IOC_READ | _IOC_WRITE
    return (
        (direction << (_IOC_NRBITS + _IOC_TYPEBITS + _IOC_SIZEBITS))
        | (size << (_IOC_NRBITS + _IOC_TYPEBITS))
        | (magic << _IOC_NRBITS)
        | number
    )


#: 0xC0200A00.
NSM_IOCTL_RAW = ioc_readwrite(NSM_MAGIC, 0, NSM_RAW.size)


@dataclass(frozen=True)
class NSMRaw:
    """The ioctl argument: where the request is and where the response goes."""

    request_addr: int
    request_len: int
    response_addr: int
    response_len: int


def pack_nsm_raw(raw: NSMRaw) -> bytearray:
    """The 32 bytes passed to the ioctl (mutable: the kernel writes ``response_len`` back)."""
    return bytearray(
        NSM_RAW.pack(raw.request_addr, raw.request_len, raw.response_addr, raw.response_len)
    )


def unpack_nsm_raw(data: bytes | bytearray) -> NSMRaw:
    """Read the struct back after the ioctl (the response length is what changed)."""
    if len(data) != NSM_RAW.size:
        raise NSMError(f"nsm_raw: expected {NSM_RAW.size} bytes, got {len(data)}", "InternalError")
    return NSMRaw(*NSM_RAW.unpack(bytes(data)))


def check_request_size(request: bytes) -> None:
    """The driver refuses requests over 0x1000 bytes; refuse them before the ioctl."""
    if len(request) > REQUEST_MAX_SIZE:
        raise NSMError(
            f"request: expected at most {REQUEST_MAX_SIZE} bytes, got {len(request)}",
            "InputTooLarge",
        )


def response_length(raw: NSMRaw) -> int:
    """The response length the driver wrote back, checked against the buffer size."""
    if raw.response_len > RESPONSE_MAX_SIZE:
        raise NSMError(
            f"response length: expected at most {RESPONSE_MAX_SIZE}, got {raw.response_len}",
            "InternalError",
        )
    return raw.response_len


class DeviceBackend:
    """:class:`~hermetic.nsm.client.Backend` over the real ``/dev/nsm`` character device."""

    def __init__(self, path: str = DEVICE_PATH) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NSMUnavailableError(
                f"cannot open {path}: {exc.strerror}", "InternalError"
            ) from None
        self._path = path

    def transact(self, request: bytes) -> bytes:
        check_request_size(request)
        # Both buffers must stay referenced until the ioctl returns: the kernel reads and
        # writes them through the raw addresses in the struct.
        request_buffer = ctypes.create_string_buffer(bytes(request), max(len(request), 1))
        response_buffer = ctypes.create_string_buffer(RESPONSE_MAX_SIZE)
        argument = pack_nsm_raw(
            NSMRaw(
                request_addr=ctypes.addressof(request_buffer),
                request_len=len(request),
                response_addr=ctypes.addressof(response_buffer),
                response_len=RESPONSE_MAX_SIZE,
            )
        )
        try:
            fcntl.ioctl(self._fd, NSM_IOCTL_RAW, argument, True)
        except OSError as exc:
            code = "InputTooLarge" if exc.errno == errno.EMSGSIZE else "InternalError"
            raise NSMError(f"ioctl on {self._path} failed: {exc.strerror}", code) from None
        length = response_length(unpack_nsm_raw(argument))
        return response_buffer.raw[:length]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DeviceBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
