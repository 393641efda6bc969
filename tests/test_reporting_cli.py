"""``hermetic reporting generate``: the real CLI in a subprocess, writing sealed batches to a
directory or uploading them through a real ingestion endpoint into a real record store."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from click.testing import CliRunner

from helpers import hermetic
from hermetic.cli import cli
from hermetic.reporting import baseline_report, generate_tenant
from hermetic.reporting.aggregate import SealedBatch
from hermetic.reporting.ingest import parse_record_id
from hermetic.store.records import RecordStore
from test_reporting_ingest import IngestServerProcess


def read_batches(directory: Path) -> list[SealedBatch]:
    return [
        SealedBatch(bytes.fromhex(path.stem), path.read_bytes())
        for path in sorted(directory.glob("*.hrb"))
    ]


def key_of(path: Path) -> bytes:
    return bytes.fromhex(path.read_text())


def test_generate_to_a_directory(tmp_path: Path) -> None:
    key_file, out = tmp_path / "acme.key", tmp_path / "batches"
    done = hermetic(
        "reporting", "generate", "--seed", "3", "--events", "4000", "--weeks", "3",
        "--tenant", "acme", "--key-file", key_file, "--out", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_of(key_file)
    assert len(key) == 32
    assert key_file.read_text().endswith("\n")
    assert summary["key_created"] is True
    # The same tenant as the library makes from the seed: the same batch ids, the same report.
    library = generate_tenant(key, 3, tenant="acme", events=4000, weeks=3)
    written = read_batches(out)
    assert {b.batch_id for b in written} == {b.batch_id for b in library.batches}
    assert (summary["events"], summary["batches"]) == (4000, len(library.batches))
    assert summary["out"]["bytes"] == sum(len(b.data) for b in written)
    report, result = baseline_report(key, "acme", written)
    assert result.rejected == ()
    assert report == baseline_report(key, "acme", library.batches)[0]
    assert "sealing events" in done.stderr  # the progress bar

    # A second run reuses the key file (a later upload of the same tenant).
    later = hermetic(
        "reporting", "generate", "--seed", "3", "--events", "500", "--weeks", "1",
        "--first-week", "3", "--tenant", "acme", "--key-file", key_file,
        "--out", tmp_path / "later", "--quiet",
    )  # fmt: skip
    assert later.returncode == 0, later.stderr
    assert json.loads(later.stdout)["key_created"] is False
    assert key_of(key_file) == key
    assert "sealing" not in later.stderr
    assert baseline_report(key, "acme", read_batches(tmp_path / "later"))[1].rejected == ()


def test_generate_uploads_through_the_ingestion_endpoint(tmp_path: Path) -> None:
    db = str(tmp_path / "records.db")
    key_file = tmp_path / "globex.key"
    with IngestServerProcess("--db", db) as server:
        done = hermetic(
            "reporting", "generate", "--seed", "11", "--events", "3000", "--weeks", "2",
            "--tenant", "globex", "--key-file", key_file, "--upload", server.url,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["upload"]["created"] == summary["batches"]
    assert "uploading batches" in done.stderr
    key = key_of(key_file)
    with RecordStore(db) as store:
        fetched = [
            SealedBatch(parse_record_id(info.id)[1], store.get(info.id).data)
            for info in store.scan("batches/globex/")
        ]
    assert len(fetched) == summary["batches"]
    library = generate_tenant(key, 11, tenant="globex", events=3000, weeks=2)
    assert baseline_report(key, "globex", fetched) == baseline_report(
        key, "globex", library.batches
    )


def test_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "acme.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    key_file.chmod(0o644)
    args = ["reporting", "generate", "--seed", "1", "--events", "100", "--tenant", "acme"]
    done = hermetic(*args, "--key-file", key_file, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert "ReportingUsageError" in done.stderr
    assert "0644" in done.stderr
    assert not (tmp_path / "out").exists()
    key_file.chmod(0o600)
    key_file.write_text("not a key\n")
    done = hermetic(*args, "--key-file", key_file, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert "64 hex digits" in done.stderr


def test_exactly_one_destination(tmp_path: Path) -> None:
    args = ["reporting", "generate", "--seed", "1", "--events", "100", "--tenant", "acme"]
    args += ["--key-file", str(tmp_path / "k")]
    neither = hermetic(*args)
    both = hermetic(*args, "--out", tmp_path / "o", "--upload", "http://127.0.0.1:9")
    for done in (neither, both):
        assert done.returncode == 2
        assert "exactly one of --upload URL and --out DIR" in done.stderr
    bad_tenant = hermetic(*args[:-2], "--key-file", tmp_path / "k", "--tenant", "Acme!")
    assert bad_tenant.returncode == 2


def test_registered_in_the_cli() -> None:
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert "reporting" in top.output
    sub = runner.invoke(cli, ["reporting", "generate", "--help"])
    assert sub.exit_code == 0
    assert "--key-file" in sub.output
