"""``hermetic store``: run the parent's record store, and look at what it holds.

The record store keeps opaque records that the persistence service sealed inside the
enclave; the parent (and whoever runs these commands) is not trusted with their contents.
``inspect`` therefore shows ids, versions, sizes and SHA-256 digests, and never reads a
record's bytes at all. See ``docs/store.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hermetic.cli import echo_json
from hermetic.paths import state_dir

DEFAULT_LISTEN = "127.0.0.1:8471"

_DB_HELP = (
    "SQLite file, sqlite:///absolute/path or a postgresql:// URL."
    " Default: <state dir>/store/records.db."
)


def _default_db() -> str:
    base = state_dir() / "store"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return str(base / "records.db")


@click.group("store")
def store() -> None:
    """The parent's record store: opaque sealed records under compare-and-set versions."""


@store.command("serve")
@click.option("--db", default=None, help=_DB_HELP)
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="HOST:PORT to bind (port 0: any free port).",
)
def serve(db: str | None, listen: str) -> None:
    """Serve the record store's HTTP API; print its URL as JSON once listening."""
    from hermetic.store import service
    from hermetic.store.records import RecordStore
    from hermetic.transport.tcp import parse_hostport

    address = parse_hostport(listen, field="--listen", allow_port_zero=True)
    records = RecordStore(db if db is not None else _default_db())
    try:
        sock = service.bind(address.host, address.port)
        host, port = service.address_of(sock)
        shown = f"[{host}]" if ":" in host else host
        echo_json({"url": f"http://{shown}:{port}", "db": str(records.location)})
        sys.stdout.flush()
        service.serve(service.RecordService(records), sock)
    finally:
        records.close()


@store.command("inspect")
@click.option("--db", default=None, help=_DB_HELP)
@click.option("--prefix", default="", help="Only records whose id starts with this.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(db: str | None, prefix: str, as_json: bool) -> None:
    """List what is stored: id, version, size and SHA-256 of each record (never its bytes)."""
    from hermetic.errors import StoreUnavailableError
    from hermetic.store import parse_location
    from hermetic.store.records import RecordStore, check_prefix

    location = parse_location(db if db is not None else str(state_dir() / "store" / "records.db"))
    if location.backend == "sqlite" and not Path(location.target).is_file():
        raise StoreUnavailableError(f"no record store at {location} (start one with store serve)")
    check_prefix(prefix, field="--prefix")
    with RecordStore(location) as records:
        infos = list(records.scan(prefix))
    total = sum(r.size for r in infos)
    if as_json:
        echo_json({"db": str(location), "count": len(infos), "bytes": total,
                   "records": [r.to_json() for r in infos]})  # fmt: skip
        return
    click.echo(f"{'version':>10}  {'size':>8}  {'sha256':<16}  id")
    for r in infos:
        click.echo(f"{r.version:>10}  {r.size:>8}  {r.sha256.hex()[:16]:<16}  {r.id}")
    click.echo(f"{len(infos)} record(s), {total} byte(s) in {location}")
