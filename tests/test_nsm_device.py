"""The /dev/nsm backend's pure parts: ioctl number, struct layout, size checks, errors.

The ioctl itself needs Nitro hardware (docs/nsm.md says how it is exercised there); what
can fail on any machine — packing, unpacking, limits, error mapping — is pinned here.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from hermetic.errors import NSMError, NSMUnavailableError
from hermetic.nsm.client import NSMClient
from hermetic.nsm.device import (
    NSM_IOCTL_RAW,
    NSM_RAW,
    DeviceBackend,
    NSMRaw,
    check_request_size,
    ioc_readwrite,
    pack_nsm_raw,
    response_length,
    unpack_nsm_raw,
)
from hermetic.nsm.server import SocketBackend


def test_ioctl_number_is_iowr_0x0a_0_of_a_32_byte_struct() -> None:
    assert NSM_RAW.size == 32
    assert NSM_IOCTL_RAW == 0xC0200A00
    assert ioc_readwrite(0x0A, 0, 32) == (3 << 30) | (32 << 16) | (0x0A << 8)


def test_struct_is_two_iovecs_request_then_response_in_native_order() -> None:
    raw = NSMRaw(request_addr=0x1111, request_len=0x22, response_addr=0x3333, response_len=0x3000)
    packed = pack_nsm_raw(raw)
    assert isinstance(packed, bytearray)
    assert len(packed) == 32
    assert struct.unpack(f"{'<' if sys.byteorder == 'little' else '>'}4Q", packed) == (
        0x1111,
        0x22,
        0x3333,
        0x3000,
    )
    assert unpack_nsm_raw(packed) == raw


def test_response_length_is_read_back_from_the_last_field() -> None:
    packed = pack_nsm_raw(NSMRaw(1, 2, 3, 0x3000))
    packed[24:32] = (1234).to_bytes(8, sys.byteorder)  # what the kernel writes back
    assert response_length(unpack_nsm_raw(packed)) == 1234


def test_response_length_beyond_buffer_is_refused() -> None:
    with pytest.raises(NSMError) as info:
        response_length(NSMRaw(1, 2, 3, 0x3001))
    assert info.value.code == "InternalError"


def test_struct_of_wrong_size_is_refused() -> None:
    with pytest.raises(NSMError):
        unpack_nsm_raw(b"\x00" * 31)


def test_request_over_0x1000_bytes_is_refused_before_the_ioctl(tmp_path: Path) -> None:
    check_request_size(b"x" * 0x1000)
    not_a_device = tmp_path / "nsm"
    not_a_device.write_bytes(b"")
    with DeviceBackend(str(not_a_device)) as backend, pytest.raises(NSMError) as info:
        backend.transact(b"x" * 0x1001)
    assert info.value.code == "InputTooLarge"


def test_ioctl_failure_becomes_a_typed_error(tmp_path: Path) -> None:
    # A regular file answers the ioctl with ENOTTY: the backend must not leak an OSError.
    not_a_device = tmp_path / "nsm"
    not_a_device.write_bytes(b"")
    with DeviceBackend(str(not_a_device)) as backend, pytest.raises(NSMError) as info:
        backend.transact(b"\x69GetRandom")
    assert info.value.code == "InternalError"


def test_missing_device_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(NSMUnavailableError):
        DeviceBackend(str(tmp_path / "absent"))


def test_open_prefers_the_device_then_the_socket_then_fails(tmp_path: Path) -> None:
    device = tmp_path / "nsm"
    device.write_bytes(b"")
    client = NSMClient.open(device_path=str(device), environ={})
    assert isinstance(client._backend, DeviceBackend)
    client.close()
    absent = str(tmp_path / "absent")
    client = NSMClient.open(
        device_path=absent, environ={"HERMETIC_NSM_SOCKET": str(tmp_path / "s")}
    )
    assert isinstance(client._backend, SocketBackend)
    with pytest.raises(NSMUnavailableError):
        NSMClient.open(device_path=absent, environ={})
