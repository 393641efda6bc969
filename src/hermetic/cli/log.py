"""``hermetic log``: run the transparency log, append to it, witness it and monitor it.

Keys are C2SP texts: the log key is an Ed25519 signed-note key (``PRIVATE+KEY+...`` in a
0600 file, its verifier key printed for clients to pin); a witness key is an Ed25519
cosignature/v1 key. Wherever a verifier key is asked for, either the key text or a file
holding it is accepted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hermetic.cli import echo_json
from hermetic.cli._options import write_secret
from hermetic.errors import HermeticError, MalformedInputError
from hermetic.paths import state_dir


def _read_text(value: str, what: str) -> str:
    """A key given inline, or the first line of the file it names."""
    path = Path(value)
    if "+" not in value or path.is_file():
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise MalformedInputError(f"cannot read {what} from {value}: {exc.strerror}") from None
    return value.strip()


def _verifier(value: str, what: str):  # type: ignore[no-untyped-def]
    from hermetic.translog.note import NoteVerifier

    return NoteVerifier.from_vkey(_read_text(value, what))


@click.group("log")
def log() -> None:
    """Run and use the transparency log (C2SP tlog-tiles, checkpoints, witnesses)."""


@log.command("key")
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the private key (mode 0600).",
)
@click.option(
    "--name",
    default="hermetic.local/log",
    show_default=True,
    help="Key name = the log's checkpoint origin (scheme-less URL prefix).",
)
@click.option("--force", is_flag=True, help="Replace an existing key file.")
def key(out: Path, name: str, force: bool) -> None:  # fmt: skip
    """Make a log signing key; print its verifier key (what clients pin)."""
    from hermetic.translog.note import generate_key

    skey, vkey = generate_key(name)
    write_secret(out, f"{skey}\n".encode(), force=force)
    click.echo(vkey)


@log.command("witness-key")
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the private key (mode 0600).",
)
@click.option(
    "--name", default="hermetic.local/witness", show_default=True, help="The witness's key name."
)
@click.option("--force", is_flag=True, help="Replace an existing key file.")
def witness_key(out: Path, name: str, force: bool) -> None:  # fmt: skip
    """Make a witness cosigning key; print its verifier key (for logs and clients)."""
    from hermetic.translog.checkpoint import CosignatureSigner

    signer = CosignatureSigner.generate(name)
    write_secret(out, f"{signer.skey()}\n".encode(), force=force)
    click.echo(signer.vkey)


@log.command("serve")
@click.option(
    "--db",
    default=None,
    help="SQLite file, or a postgresql:// URL. Default: <state dir>/translog/log.db.",
)
@click.option("--listen", default="127.0.0.1:8470", show_default=True, help="HOST:PORT to bind.")
@click.option(
    "--key",
    "key_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Log key file (from 'log key'). Default: <state dir>/translog/log.skey, "
    "created on first use.",
)
@click.option("--origin", default=None, help="Checkpoint origin; must equal the key name.")
@click.option(
    "--witness",
    "witnesses",
    multiple=True,
    help="Verifier key (or file) of a witness whose cosignatures the log accepts; repeatable.",
)
@click.option("--batch-size", default=1000, show_default=True, help="Max entries per batch.")
@click.option(
    "--batch-delay",
    default=0.01,
    show_default=True,
    help="Seconds a batch waits for more entries after the first.",
)
def serve(db: str | None, listen: str, key_file: Path | None, origin: str | None,
          witnesses: tuple[str, ...], batch_size: int, batch_delay: float) -> None:  # fmt: skip
    """Serve the log: tlog-tiles read API, POST /add, proofs and witness cosignatures."""
    from hermetic.translog import service
    from hermetic.translog.note import Ed25519NoteSigner, generate_key
    from hermetic.translog.store import open_store
    from hermetic.transport.tcp import parse_hostport

    address = parse_hostport(listen, field="--listen")
    host, port = address.host, address.port
    base = state_dir() / "translog"
    if key_file is None:
        key_file = base / "log.skey"
        if not key_file.exists():
            skey, vkey = generate_key(origin or "hermetic.local/log")
            write_secret(key_file, f"{skey}\n".encode(), force=False)
            click.echo(f"created log key {key_file}; verifier key: {vkey}", err=True)
    signer = Ed25519NoteSigner.from_skey(_read_text(str(key_file), "log key"))
    if db is None:
        base.mkdir(parents=True, exist_ok=True)
        db = str(base / "log.db")
    store = open_store(db)
    try:
        svc = service.LogService(
            store,
            signer,
            origin=origin,
            witnesses=[_verifier(w, "witness key") for w in witnesses],
            max_batch=batch_size,
            max_delay=batch_delay,
        )
        click.echo(
            f"log {svc.origin} serving on http://{host}:{port} (verifier key {signer.vkey})",
            err=True,
        )
        service.serve(svc, host, port)
    finally:
        store.close()


@log.command("append")
@click.option("--log", "url", required=True, help="Log URL, e.g. http://127.0.0.1:8470.")
@click.option(
    "--log-key",
    default=None,
    help="The log's verifier key (or file): verify the checkpoint's signature too.",
)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print index, size and proof as JSON.")
def append(url: str, log_key: str | None, file: Path, as_json: bool) -> None:
    """Log FILE's bytes as one entry; print its index once integrated and proven."""
    from hermetic.translog.client import LogClient, add_unpinned

    entry = file.read_bytes()
    if log_key is None:
        index, size, proof = add_unpinned(url, entry)
        click.echo(
            "hermetic: warning: inclusion proof checked, checkpoint signature not checked "
            "(pass --log-key)",
            err=True,
        )
    else:
        with LogClient(url, _verifier(log_key, "log key")) as client:
            result = client.add(entry)
        index, size, proof = result.index, result.checkpoint.size, list(result.inclusion_proof)
    if as_json:
        import base64

        echo_json({"index": index, "size": size,
                   "inclusion_proof": [base64.b64encode(h).decode() for h in proof]})  # fmt: skip
    else:
        click.echo(index)


@log.command("witness")
@click.option("--log", "url", required=True, help="Log URL to follow.")
@click.option("--log-key", required=True, help="The log's verifier key (or file).")
@click.option(
    "--key",
    "key_file",
    required=True,
    type=click.Path(path_type=Path),
    help="This witness's private key file (from 'log witness-key').",
)
@click.option(
    "--state",
    "state_file",
    required=True,
    type=click.Path(path_type=Path),
    help="Where the witness keeps the last cosigned checkpoint.",
)
@click.option("--once", is_flag=True, help="Cosign the current checkpoint once, then exit.")
@click.option("--interval", default=5.0, show_default=True, help="Seconds between rounds.")
def witness(url: str, log_key: str, key_file: Path, state_file: Path, once: bool,
            interval: float) -> None:  # fmt: skip
    """Follow a log and cosign every checkpoint that extends the last one; refuse forks."""
    from hermetic.translog.checkpoint import CosignatureSigner
    from hermetic.translog.client import LogClient
    from hermetic.translog.daemons import WitnessDaemon

    signer = CosignatureSigner.from_skey(_read_text(str(key_file), "witness key"))
    with LogClient(url, _verifier(log_key, "log key")) as client:
        daemon = WitnessDaemon(client, signer, state_file)
        for item in daemon.run(interval, once=once):
            if isinstance(item, HermeticError):
                click.echo(f"hermetic: warning: {type(item).__name__}: {item}", err=True)
                continue
            echo_json({"size": item.size, "root": item.root.hex(), "grew": item.grew,
                       "stored_by_log": item.stored_by_log})  # fmt: skip
            sys.stdout.flush()


@log.command("monitor")
@click.option("--log", "url", required=True, help="Log URL to tail.")
@click.option("--log-key", required=True, help="The log's verifier key (or file).")
@click.option(
    "--watch",
    "watch",
    multiple=True,
    required=True,
    help="Service (or policy subject) to report; repeatable; '*' for all.",
)
@click.option(
    "--state",
    "state_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Remember the last verified checkpoint here between runs.",
)
@click.option("--once", is_flag=True, help="Catch up once, then exit.")
@click.option("--interval", default=5.0, show_default=True, help="Seconds between polls.")
def monitor(url: str, log_key: str, watch: tuple[str, ...], state_file: Path | None,
            once: bool, interval: float) -> None:  # fmt: skip
    """Tail a log: verify consistency and print each new statement for watched services."""
    import json

    from hermetic.translog.client import LogClient
    from hermetic.translog.daemons import Monitor

    with LogClient(url, _verifier(log_key, "log key")) as client:
        mon = Monitor(client, list(watch), state_file)
        for item in mon.run(interval, once=once):
            if isinstance(item, HermeticError):
                click.echo(f"hermetic: warning: {type(item).__name__}: {item}", err=True)
                continue
            click.echo(json.dumps(item.to_json(), sort_keys=True))
            sys.stdout.flush()
