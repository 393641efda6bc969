"""``hermetic kms serve`` as a real process: flags, startup errors, restart durability."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest

from helpers import free_port


@contextmanager
def _serve(*args: str, env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "hermetic", "kms", "serve", "--port", str(port), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited: {process.stderr.read()}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _kms(endpoint: str) -> Any:
    return boto3.session.Session(
        aws_access_key_id="admin", aws_secret_access_key="x", region_name="us-east-1"
    ).client("kms", endpoint_url=endpoint)


def test_serve_process_keeps_keys_across_restarts(tmp_path: Path) -> None:
    env = {**os.environ, "HERMETIC_STATE_DIR": str(tmp_path / "state")}
    db = tmp_path / "db" / "kms.sqlite3"
    with _serve("--db", str(db), "--attestation-root", "aws", env=env) as endpoint:
        kms = _kms(endpoint)
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        blob = kms.encrypt(KeyId=key, Plaintext=b"kept", EncryptionContext={"k": "v"})[
            "CiphertextBlob"
        ]
    assert (db.parent / "root.key").stat().st_mode & 0o777 == 0o600
    with _serve("--db", str(db), "--attestation-root", "aws", env=env) as endpoint:
        out = _kms(endpoint).decrypt(CiphertextBlob=blob, EncryptionContext={"k": "v"})
        assert out["Plaintext"] == b"kept"


def test_serve_defaults_to_the_state_dir(tmp_path: Path, vectors: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "HERMETIC_STATE_DIR": str(state)}
    root = vectors / "nitro" / "aws-nitro-enclaves-root-g1.pem"
    with _serve("--attestation-root", str(root), env=env) as endpoint:
        assert _kms(endpoint).list_keys()["Keys"] == []
    assert (state / "kms" / "kms.sqlite3").exists()
    assert (state / "kms" / "root.key").stat().st_mode & 0o777 == 0o600


def test_serve_on_a_fresh_state_dir_creates_the_dev_pki_it_trusts(tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    state.mkdir()
    env = {**os.environ, "HERMETIC_STATE_DIR": str(state)}
    with _serve(env=env) as endpoint:  # --attestation-root dev is the default
        assert _kms(endpoint).list_keys()["Keys"] == []
    root = state / "dev-pki" / "root.pem"
    assert root.is_file()
    created = root.read_bytes()
    with _serve(env=env) as endpoint:  # created once: a restart trusts the same root
        assert _kms(endpoint).list_keys()["Keys"] == []
    assert root.read_bytes() == created


def _startup_error(state: Path, *args: str) -> str:
    """Start ``kms serve`` expecting it to refuse; returns its stderr (one line, no trace)."""
    done = subprocess.run(
        [sys.executable, "-m", "hermetic", "kms", "serve", "--port", "0", *args],
        env={**os.environ, "HERMETIC_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (1, 2)
    assert "Traceback" not in done.stderr
    return done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attestation-root", "nowhere.pem"], "--attestation-root"),
        (["--listen", "no-port"], "--listen"),
    ],
)
def test_serve_startup_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    assert message in _startup_error(tmp_path / "empty-state", *args)


def test_serve_refuses_a_broken_dev_pki_in_one_line_instead_of_replacing_it(
    tmp_path: Path,
) -> None:
    pki = tmp_path / "state" / "dev-pki"
    pki.mkdir(parents=True)
    (pki / "root.pem").write_text("not a certificate\n")  # and no key beside it
    err = _startup_error(tmp_path / "state")
    assert "DevPKIStateError" in err
    assert "root.pem" in err
    assert (pki / "root.pem").read_text() == "not a certificate\n"  # left for the user
