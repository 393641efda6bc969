"""``hermetic reporting``: generate a synthetic tenant, and run the ingestion endpoint.

``generate`` plays the tenant's member devices: it makes (or reuses) the tenant's insights
key, seals a seeded synthetic tenant's sign-in events under it exactly as devices do, and
uploads the batches through the ingestion endpoint or writes them to a directory.
``ingest`` runs that endpoint on the parent, in front of the record store. See
``docs/reporting.md``.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import click

from hermetic.cli import echo_json
from hermetic.errors import ReportingUsageError

DEFAULT_INGEST_LISTEN = "127.0.0.1:8472"
KEY_FILE_MODE = 0o600


@click.group("reporting")
def reporting() -> None:
    """The reporting service: synthetic tenants and the batch ingestion endpoint."""


def load_or_create_key(path: Path) -> tuple[bytes, bool]:
    """The insights key in ``path`` (64 hex digits), or a fresh one written there with mode
    0600 (created exclusively: never over another file). True when it was created.

    An existing key file readable or writable by anyone but its owner is refused: the key
    opens every batch of the tenant."""
    from hermetic.reporting.format import KEY_SIZE

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    except FileExistsError:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ReportingUsageError(f"--key-file {path}: not a regular file") from None
        if info.st_mode & 0o077:
            raise ReportingUsageError(
                f"--key-file {path}: mode {stat.S_IMODE(info.st_mode):04o}, other users may"
                f" read it; expected 0600 (chmod 600 {path})"
            ) from None
        text = path.read_text(encoding="ascii", errors="replace").strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != KEY_SIZE or len(text) != 2 * KEY_SIZE:
            raise ReportingUsageError(
                f"--key-file {path}: expected {2 * KEY_SIZE} hex digits (an insights key)"
            ) from None
        return key, False
    key = os.urandom(KEY_SIZE)
    try:
        os.fchmod(fd, KEY_FILE_MODE)  # whatever the umask
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return key, True


@reporting.command("generate")
@click.option("--seed", type=int, required=True, help="Seed of the synthetic tenant.")
@click.option("--events", type=int, required=True, help="Exact number of sign-in events.")
@click.option("--weeks", type=int, default=8, show_default=True, help="Weeks of events.")
@click.option("--members", type=int, default=None, help="Members (default: from --events).")
@click.option(
    "--first-week",
    type=int,
    default=0,
    show_default=True,
    help="Shift the weeks (same members and apps): later uploads of the same tenant.",
)
@click.option("--tenant", default="acme", show_default=True, help="Tenant id.")
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The tenant's insights key: read if it exists, else created (mode 0600).",
)
@click.option("--upload", "upload_url", default=None, help="Ingestion endpoint URL to upload to.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to write the sealed batches to (<batch id hex>.hrb).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def generate(
    seed: int,
    events: int,
    weeks: int,
    members: int | None,
    first_week: int,
    tenant: str,
    key_file: Path,
    upload_url: str | None,
    out: Path | None,
    quiet: bool,
) -> None:
    """Seal a synthetic tenant's sign-ins as its devices would; upload them or write them
    out. Prints a JSON summary."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    from hermetic.reporting.format import check_tenant
    from hermetic.reporting.generator import generate_tenant

    if (upload_url is None) == (out is None):
        raise ReportingUsageError("expected exactly one of --upload URL and --out DIR")
    check_tenant(tenant)
    key, created = load_or_create_key(key_file)
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=quiet) as bars:
        sealing = bars.add_task("sealing events", total=events)
        synthetic = generate_tenant(
            key,
            seed,
            tenant=tenant,
            events=events,
            weeks=weeks,
            members=members,
            first_week=first_week,
            progress=lambda done, total: bars.update(sealing, completed=done),
        )
        summary: dict[str, object] = {
            "tenant": tenant,
            "seed": seed,
            "events": synthetic.events,
            "batches": len(synthetic.batches),
            "members": len(synthetic.members),
            "apps": len(synthetic.apps),
            "weeks": weeks,
            "first_week": first_week,
            "key_file": str(key_file),
            "key_created": created,
        }
        if upload_url is not None:
            from hermetic.reporting.ingest import upload_batches

            uploading = bars.add_task("uploading batches", total=len(synthetic.batches))
            result = upload_batches(
                upload_url,
                synthetic.batches,
                progress=lambda size, n: bars.update(uploading, completed=n),
            )
            summary["upload"] = {
                "url": upload_url,
                "created": result.created,
                "already_stored": result.already_stored,
                "bytes": result.bytes,
            }
        else:
            assert out is not None
            out.mkdir(parents=True, exist_ok=True)
            writing = bars.add_task("writing batches", total=len(synthetic.batches))
            size = 0
            for n, batch in enumerate(synthetic.batches, 1):
                (out / f"{batch.batch_id.hex()}.hrb").write_bytes(batch.data)
                size += len(batch.data)
                bars.update(writing, completed=n)
            summary["out"] = {"dir": str(out), "bytes": size}
    echo_json(summary)


@reporting.command("ingest")
@click.option(
    "--listen",
    default=DEFAULT_INGEST_LISTEN,
    show_default=True,
    help="HOST:PORT to bind (port 0: any free port).",
)
@click.option("--store", "store_url", default=None, help="URL of a running hermetic store serve.")
@click.option("--db", default=None, help="Or a record store database (path or postgresql:// URL).")
def ingest(listen: str, store_url: str | None, db: str | None) -> None:
    """Serve the batch ingestion endpoint in front of the record store; print its URL as
    JSON once listening."""
    from hermetic.reporting.ingest import IngestService, Records, serve
    from hermetic.store import service
    from hermetic.store.client import RecordStoreClient
    from hermetic.store.records import RecordStore
    from hermetic.transport.tcp import parse_hostport

    if (store_url is None) == (db is None):
        raise ReportingUsageError("expected exactly one of --store URL and --db LOCATION")
    address = parse_hostport(listen, field="--listen", allow_port_zero=True)
    records: RecordStore | RecordStoreClient
    if store_url is not None:
        records = RecordStoreClient(store_url)
        where = store_url
    else:
        assert db is not None
        records = RecordStore(db)
        where = str(records.location)
    target: Records = records
    try:
        sock = service.bind(address.host, address.port)
        host, port = service.address_of(sock)
        shown = f"[{host}]" if ":" in host else host
        echo_json({"url": f"http://{shown}:{port}", "store": where})
        sys.stdout.flush()
        serve(IngestService(target), sock)
    finally:
        records.close()
