"""The witness and monitor daemons keep going through malformed log entries.

Finding 4 of issue 9: one entry with a lone UTF-16 surrogate parsed, then raised
``UnicodeEncodeError`` when re-encoded; the monitor only caught ``HermeticError``, died on
it and died again on every restart, so a rogue release appended after it was never
reported. Here a real ``hermetic log serve`` receives such entries (and invalid UTF-8, 64 KiB
of nesting, a duplicate key, an entry of the maximum size), then a release; a real
``hermetic log monitor`` and ``hermetic log witness`` run throughout, as subprocesses.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest

from hermetic.translog.client import LogClient
from hermetic.translog.note import NoteVerifier
from hermetic.translog.release import (
    ReleaseStatement,
    canonical_json,
    load_publisher_key,
    sign_statement,
)
from hermetic.translog.tiles import MAX_ENTRY_SIZE
from test_translog_service_support import LogServerProcess, hermetic, make_log_key

ORIGIN = "rogue.example/log"
SERVICE = "watched-svc"
PCRS = ("--pcr0", "a0" * 48, "--pcr1", "b1" * 48, "--pcr2", "c2" * 48)
DEADLINE = 180.0  # generous: the machine is shared; nothing here is a timing assertion


class Lines:
    """A subprocess's output, line by line, read on a thread so waits can have deadlines."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def until(self, done: Any, what: str) -> list[str]:
        """Read lines until ``done(line)`` is true; every line read so far is returned."""
        end = time.monotonic() + DEADLINE
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {what} within {DEADLINE} s: {self.seen}") from None
            if line is None:
                raise AssertionError(f"the process ended before {what}: {self.seen}")
            self.seen.append(line)
            if done(line):
                return list(self.seen)


@contextmanager
def daemon(*args: str) -> Iterator[tuple[subprocess.Popen[str], Lines, Lines]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "hermetic", "log", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        yield process, Lines(process.stdout), Lines(process.stderr)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _entry(publisher_key: Path, version: str) -> dict[str, Any]:
    statement = ReleaseStatement(SERVICE, version, "a0" * 48, "b1" * 48, "c2" * 48, None, None,
                                 "abc123", "2026-11-28T12:00:00Z")  # fmt: skip
    signed = sign_statement(statement, load_publisher_key(publisher_key.read_bytes()))
    value: dict[str, Any] = json.loads(signed.entry())
    return value


def malformed_entries(publisher_key: Path) -> dict[str, bytes]:
    """Entries a monitor cannot read as statements, each one of the ways of issue 9."""
    genuine = _entry(publisher_key, "6.6.6")
    text = canonical_json(genuine).decode()
    surrogate = text.replace(f'"service":"{SERVICE}"', f'"service":"{SERVICE}\\ud800"')
    bad_utf8 = canonical_json(genuine).replace(b'"6.6.6"', b'"6.6.\xff6"')
    duplicate = text.replace('{"publisher"', '{"statement":{},"publisher"', 1)
    padded = json.loads(text)
    padded["statement"]["source_revision"] = ""
    padded["statement"]["source_revision"] = "x" * (MAX_ENTRY_SIZE - len(canonical_json(padded)))
    entries = {
        "lone surrogate": surrogate.encode(),
        "invalid UTF-8": bad_utf8,
        "64 KiB of nesting": b"[" * MAX_ENTRY_SIZE,
        "balanced nesting": b"[" * (MAX_ENTRY_SIZE // 2) + b"]" * (MAX_ENTRY_SIZE // 2),
        "duplicate key": duplicate.encode(),
        "maximum size": canonical_json(padded),
    }
    assert len(entries["maximum size"]) == MAX_ENTRY_SIZE
    assert surrogate != text
    assert bad_utf8 != canonical_json(genuine)
    assert duplicate != text
    return entries


def _size(line: str) -> int:
    """The tree size in a line of the witness's output (its JSON is indented), or -1."""
    found = re.match(r'\s*"size": (\d+)', line)
    return int(found.group(1)) if found else -1


@pytest.mark.slow
def test_monitor_and_witness_report_malformed_entries_and_the_release_after_them(
    tmp_path: Path,
) -> None:
    keys = make_log_key(tmp_path, ORIGIN)
    witness_key = tmp_path / "witness.skey"
    witness_vkey = hermetic("log", "witness-key", "--out", str(witness_key), "--name",
                            "w1.example", check=True).stdout.strip()  # fmt: skip
    publisher = tmp_path / "publisher.pem"
    public = hermetic("release", "key", "--out", str(publisher), check=True).stdout
    (tmp_path / "publisher.pub.pem").write_text(public)
    trust = tmp_path / "trust.json"
    hermetic("release", "trust", "--log-key", keys.vkey, "--witness", witness_vkey,
             "--threshold", "1", "--publisher", f"acme={tmp_path / 'publisher.pub.pem'}",
             "--out", str(trust), check=True)  # fmt: skip
    entries = malformed_entries(publisher)

    with (
        LogServerProcess(str(tmp_path / "log.db"), keys, "--witness", witness_vkey) as server,
        daemon("witness", "--log", server.url, "--log-key", keys.vkey, "--key", str(witness_key),
               "--state", str(tmp_path / "witness.json"), "--interval", "0.2") as witness,
        daemon("monitor", "--log", server.url, "--log-key", keys.vkey, "--watch", SERVICE,
               "--state", str(tmp_path / "monitor.json"), "--interval", "0.2") as monitor,
    ):  # fmt: skip
        with LogClient(server.url, NoteVerifier.from_vkey(keys.vkey)) as client:
            indices = {name: client.add(entry).index for name, entry in entries.items()}
        published = hermetic("release", "publish", *PCRS, "--service", SERVICE,
                             "--version", "1.0.0", "--key", str(publisher), "--log", server.url,
                             "--trust", str(trust), "--out", str(tmp_path / "release.json"),
                             timeout=DEADLINE)  # fmt: skip
        assert published.returncode == 0, published.stderr
        release_index = json.loads(published.stdout)["index"]
        assert release_index > max(indices.values())

        # The monitor reported every malformed entry by index, then the release after them.
        lines = monitor[1].until(lambda line: '"event": "statement"' in line, "release event")
        events = [json.loads(line) for line in lines]
        malformed = {e["index"]: e for e in events if e["event"] == "malformed"}
        assert sorted(malformed) == sorted(indices.values())
        assert malformed[indices["lone surrogate"]]["error"] == "ReleaseFormatError"
        assert "surrogate" in malformed[indices["lone surrogate"]]["reason"]
        assert "UTF-8" in malformed[indices["invalid UTF-8"]]["reason"]
        assert "nesting depth" in malformed[indices["64 KiB of nesting"]]["reason"]
        assert "duplicate object key" in malformed[indices["duplicate key"]]["reason"]
        assert malformed[indices["maximum size"]]["size"] == MAX_ENTRY_SIZE
        (release,) = [e for e in events if e["event"] == "statement"]
        assert (release["index"], release["statement"]["version"]) == (release_index, "1.0.0")
        assert release["signature_valid"] is True
        # ... logged each finding with its index, and is still running.
        monitor[2].until(lambda line: f"index {indices['maximum size']}" in line, "logged finding")
        assert monitor[0].poll() is None

        # The witness kept cosigning through the same entries: the release's endorsement
        # carries its cosignature, and it is still running.
        witness[1].until(lambda line: _size(line) > release_index, "witness round")
        assert witness[0].poll() is None
        verified = hermetic("release", "verify", str(tmp_path / "release.json"),
                            "--trust", str(trust))  # fmt: skip
        assert verified.returncode == 0, verified.stderr
        assert json.loads(verified.stdout)["cosigners"] == ["w1.example"]

        # A monitor started afresh (where the old one died on every restart) catches up
        # over the same entries and reports the same.
        again = hermetic("log", "monitor", "--log", server.url, "--log-key", keys.vkey,
                         "--watch", SERVICE, "--once", timeout=DEADLINE)  # fmt: skip
        assert again.returncode == 0, again.stderr
        replayed = [json.loads(line) for line in again.stdout.splitlines()]
        assert [(e["event"], e["index"]) for e in replayed] == [
            (e["event"], e["index"]) for e in events
        ]
        assert "Traceback" not in again.stderr
    assert "Traceback" not in "".join(monitor[2].seen + witness[2].seen)
