"""Benchmark-only enclave app: time KMS calls where they really happen, inside the enclave.

``bench/bench_kms.py`` needs the cost of ``Decrypt`` with ``Recipient`` against a plain
``Decrypt`` on the real path (enclave botocore -> loopback egress forwarder -> vsock ->
proxy egress allowlist -> local KMS -> back), without the client's Noise session and RPC
hops in the figure. So the timing is done here, with ``time.perf_counter`` around each
KMS call, and only the numbers travel back over the attested session.

``run({"n", "attested", "concurrency", "op"})`` makes ``n`` calls split over
``concurrency`` threads (botocore blocks; its connection pool is shared, as an app would
share ``app.context.kms``) and returns every call's duration and the wall time of the
whole run, so the bench gets latency (concurrency 1) and throughput (n / wall).

Both paths use the same botocore client, connection pool, forwarder and egress:

* ``attested``: ``app.context.kms.decrypt`` / ``generate_data_key``, i.e. with
  ``Recipient`` (NSM document, RSA-OAEP unwrap of ``CiphertextForRecipient``), under the
  key named ``attested_key`` whose policy is pinned to this image's PCR0;
* plain: the same call without ``Recipient``, through the same client's explicitly
  unattested ``decrypt_without_recipient`` / ``generate_data_key_without_recipient`` (a
  second botocore client would not share the pool), under ``plain_key``, which the
  enclave principal may use without conditions.

The runtime config names the keys::

    {"kms": {...}, "kmsbench": {"attested_key": "<key id>", "plain_key": "<key id>"}}
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hermetic.enclave import App
from hermetic.errors import ServiceError

OPS = ("decrypt", "generate_data_key")
MAX_CALLS = 20_000
MAX_CONCURRENCY = 32  # botocore pool size in EnclaveKMSClient

app = App()


def _key(name: str) -> str:
    config = app.context.config
    section = config.values.get("kmsbench") if config is not None else None
    key_id = section.get(name) if isinstance(section, dict) else None
    if not isinstance(key_id, str) or not key_id:
        raise ServiceError(f"config kmsbench.{name}: expected a KMS key id, got none", "Config")
    return key_id


def _int(args: dict[str, Any], name: str, low: int, high: int) -> int:
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ServiceError(
            f"{name}: expected an integer in [{low}, {high}], got {value!r}", "Invalid"
        )
    return value


def _call_for(op: str, attested: bool) -> Callable[[], None]:
    """One KMS call of ``op`` on the chosen path, checking what comes back."""
    kms = app.context.kms
    if kms is None:
        raise ServiceError("config kms: expected a KMS section, got none", "Config")
    key_id = _key("attested_key" if attested else "plain_key")
    if op == "generate_data_key":
        if attested:
            return lambda: _expect_len(kms.generate_data_key(key_id).plaintext, 32)
        return lambda: _expect_len(kms.generate_data_key_without_recipient(key_id).plaintext, 32)
    secret = os.urandom(32)
    blob = kms.encrypt(key_id, secret)  # not timed: Encrypt releases nothing
    if attested:
        return lambda: _expect(kms.decrypt(blob, key_id=key_id), secret)
    return lambda: _expect(kms.decrypt_without_recipient(blob, key_id=key_id), secret)


def _expect(got: bytes, want: bytes) -> None:
    if not hmac.compare_digest(got, want):
        raise ServiceError("decrypt: plaintext differs from what was encrypted", "Mismatch")


def _expect_len(got: bytes, size: int) -> None:
    if len(got) != size:
        raise ServiceError(f"data key: expected {size} bytes, got {len(got)}", "Mismatch")


def _measure(call: Callable[[], None], n: int, concurrency: int) -> dict[str, Any]:
    shares = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]

    def worker(count: int) -> list[float]:
        durations = []
        for _ in range(count):
            start = time.perf_counter()
            call()
            durations.append(time.perf_counter() - start)
        return durations

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(worker, shares))
        wall = time.perf_counter() - start
    return {"durations": [d for part in results for d in part], "wall": wall}


@app.method("run")
async def run(args: dict[str, Any]) -> dict[str, Any]:
    """``n`` KMS calls of ``op`` with ``concurrency`` callers; durations and wall time (s)."""
    if not isinstance(args, dict):
        raise ServiceError(f"args: expected a map, got {type(args).__name__}", "Invalid")
    n = _int(args, "n", 1, MAX_CALLS)
    concurrency = _int(args, "concurrency", 1, MAX_CONCURRENCY)
    attested, op = args.get("attested"), args.get("op", "decrypt")
    if not isinstance(attested, bool):
        raise ServiceError(f"attested: expected true or false, got {attested!r}", "Invalid")
    if op not in OPS:
        raise ServiceError(f"op: expected one of {list(OPS)}, got {op!r}", "Invalid")
    call = await asyncio.to_thread(_call_for, op, attested)
    result = await asyncio.to_thread(_measure, call, n, min(concurrency, n))
    return {**result, "n": n, "concurrency": concurrency, "attested": attested, "op": op}
