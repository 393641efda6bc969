"""The log server: C2SP tlog-tiles read API, a batching sequencer and witness cosignatures.

Reads are the C2SP tlog-tiles API exactly (``/checkpoint``, ``/tile/<L>/<N>[.p/<W>]``,
``/tile/entries/<N>[.p/<W>]``), so any tiled-log client, witness or mirror can follow this
log without knowing hermetic. Writes and conveniences are ours:

* ``POST /add`` (body = entry bytes) waits until the entry is integrated and returns
  ``{index, duplicate, size, checkpoint, inclusion_proof}``;
* ``GET /proof/inclusion?index=I&size=N`` and ``GET /proof/consistency?old=M&new=N``
  for clients that prefer one round trip to fetching tiles;
* ``POST /cosignature`` (body = our checkpoint note plus a witness's cosignature line):
  verified against the configured witness keys and stored, and from then on served with
  the checkpoint, so clients receive a witnessed checkpoint;
* ``GET /checkpoint/witnessed?min=K``: the largest checkpoint with at least K
  cosignatures (release publishers wait on it).

Concurrent adds are grouped by :class:`Sequencer` (group commit: whatever arrived while
the previous batch was being written, up to ``max_batch``, after lingering at most
``max_delay``), and each batch is integrated by the store in one durable transaction
before any of its adds is answered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from hermetic.errors import (
    CosignatureRejectedError,
    EntryRejectedError,
    HermeticError,
    LogStoreError,
    MalformedInputError,
    TranslogError,
    UsageError,
)
from hermetic.store.web import error_response, read_body
from hermetic.translog.checkpoint import (
    Checkpoint,
    CosignatureVerifier,
    check_distinct_keys,
    open_checkpoint,
    sign_checkpoint,
)
from hermetic.translog.merkle import consistency_proof, inclusion_proof
from hermetic.translog.note import NoteSigner, NoteVerifier, parse_signature_line, split_note
from hermetic.translog.store import (
    MAX_ENTRY_SIZE,
    IntegratedBatch,
    LogStore,
    StoredCheckpoint,
    check_entry,
)
from hermetic.translog.tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    encode_entry_bundle,
    parse_tile_path,
)

MAX_COSIGNED_SIZE = 1 << 16
"""Largest cosigned checkpoint a witness may post (a note with a few signatures is < 2 KiB)."""

CHECKPOINT_TYPE = "text/plain; charset=utf-8"
TILE_TYPE = "application/octet-stream"
IMMUTABLE = "public, max-age=31536000, immutable"
_TILE_CACHE = 2048


@dataclass(frozen=True)
class SequencedEntry:
    """The sequencer's answer for one add: where the entry is, and the checkpoint covering it."""

    index: int
    duplicate: bool
    checkpoint: StoredCheckpoint


@dataclass
class _Pending:
    entry: bytes
    future: asyncio.Future[SequencedEntry] = field(repr=False)


class Sequencer:
    """Groups concurrent adds into batches and integrates each in a worker thread.

    ``integrate`` must be durable when it returns (the store commits); only then are the
    adds' futures resolved, so an acknowledged entry is always on disk.
    """

    def __init__(
        self,
        integrate: Callable[[list[bytes]], IntegratedBatch],
        *,
        max_batch: int = 1000,
        max_delay: float = 0.01,
    ) -> None:
        if max_batch < 1 or max_delay < 0:
            raise UsageError(f"bad batch settings: max_batch={max_batch}, max_delay={max_delay}")
        self._integrate = integrate
        self.max_batch = max_batch
        self.max_delay = max_delay
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    async def add(self, entry: bytes) -> SequencedEntry:
        """Queue ``entry``; return once it (and its checkpoint) is committed."""
        check_entry(entry)
        if self._task is None or self._task.done():
            raise LogStoreError("the sequencer is not running")
        future: asyncio.Future[SequencedEntry] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(bytes(entry), future))
        return await future

    def start(self) -> None:
        """Run in the current event loop (a fresh queue: an app may be restarted)."""
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sequencer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(LogStoreError("log is shutting down"))

    async def _collect(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            try:
                result = await asyncio.to_thread(self._integrate, [p.entry for p in batch])
            except HermeticError as exc:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            except Exception as exc:  # a bug must not kill the sequencer silently
                error = LogStoreError(f"integration failed: {type(exc).__name__}: {exc}")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            self.batches += 1
            for pending, index, dup in zip(batch, result.indices, result.duplicates, strict=True):
                if not pending.future.done():
                    pending.future.set_result(SequencedEntry(index, dup, result.checkpoint))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class LogService:
    """One log: its store, its signing key and the witnesses whose cosignatures it keeps."""

    def __init__(
        self,
        store: LogStore,
        signer: NoteSigner,
        *,
        origin: str | None = None,
        witnesses: list[NoteVerifier] | None = None,
        max_batch: int = 1000,
        max_delay: float = 0.01,
    ) -> None:
        self.store = store
        self.signer = signer
        self.origin = origin or signer.name
        if self.origin != signer.name:
            raise UsageError(
                f"origin {self.origin!r} differs from the log key name {signer.name!r};"
                " C2SP checkpoints are verified under the key whose name is the origin"
            )
        verifier = getattr(signer, "verifier", None)
        if not isinstance(verifier, NoteVerifier):
            raise UsageError("the log key must be an Ed25519 signed-note key")
        self.verifier: NoteVerifier = verifier
        self.witnesses = list(witnesses or [])
        for w in self.witnesses:
            if not isinstance(w, CosignatureVerifier):
                raise UsageError(f"witness key {w.name} is not a cosignature/v1 (type 0x04) key")
        check_distinct_keys(self.verifier, self.witnesses)  # else one key is two witnesses
        self.sequencer = Sequencer(self.integrate, max_batch=max_batch, max_delay=max_delay)
        self._tiles: OrderedDict[tuple[int | None, int], bytes] = OrderedDict()
        store.bind_identity(self.origin, getattr(verifier, "vkey", verifier.name))
        self._check_latest()

    def _check_latest(self) -> None:
        latest = self.store.latest_checkpoint()
        if latest is None:
            self.integrate([])  # publish the empty tree, so /checkpoint always answers
            return
        opened = open_checkpoint(latest.note, self.verifier)
        if opened.size != latest.size:
            raise LogStoreError(
                f"stored checkpoint for size {latest.size} claims size {opened.size}"
            )

    # -- writing -------------------------------------------------------------------------

    def sign(self, size: int, root: bytes) -> str:
        return sign_checkpoint(Checkpoint(self.origin, size, root), self.signer)

    def integrate(self, entries: list[bytes]) -> IntegratedBatch:
        """Sequence, store and sign one batch (blocking; called from the sequencer thread)."""
        return self.store.integrate(entries, self.sign)

    def add_cosignature(self, message: str) -> list[str]:
        """Verify and store the witness cosignature lines in a cosigned copy of our checkpoint.

        Returns the names of witnesses whose line was newly stored.
        """
        text, sigs = split_note(message)
        checkpoint = Checkpoint.parse(text)
        if checkpoint.origin != self.origin:
            raise CosignatureRejectedError(
                f"checkpoint origin {checkpoint.origin!r} is not this log's {self.origin!r}"
            )
        stored = self.store.checkpoint_at(checkpoint.size)
        if stored is None:
            raise CosignatureRejectedError(
                f"this log published no checkpoint of size {checkpoint.size}"
            )
        stored_text, _ = split_note(stored.note)
        if stored_text != text:
            raise CosignatureRejectedError(
                f"cosigned checkpoint for size {checkpoint.size} is not the one this log published"
            )
        known = {(w.name, bytes(w.key_id)): w for w in self.witnesses}
        log_id = (self.verifier.name, bytes(self.verifier.key_id))
        added: list[str] = []
        for sig in sigs:
            ident = (sig.name, sig.key_id)
            if ident == log_id:
                continue
            witness = known.get(ident)
            if witness is None:
                raise CosignatureRejectedError(
                    f"{sig.name}+{sig.key_id.hex()} is not a witness this log accepts"
                )
            line = sig.line()
            try:
                open_checkpoint(stored.note + line, self.verifier, [witness], 1)
            except TranslogError as exc:
                raise CosignatureRejectedError(
                    f"cosignature by {sig.name} does not verify: {exc}"
                ) from None
            if self.store.add_cosignature(checkpoint.size, sig.name, line):
                added.append(sig.name)
            elif _timestamp(line) > max(
                (_timestamp(kept) for kept in stored.cosignatures if _signer(kept) == sig.name),
                default=-1,
            ):
                # A newer cosignature of the same tree head: keep the freshest, so a
                # witnessed checkpoint of a log that stopped growing stays recent.
                self.store.replace_cosignature(checkpoint.size, sig.name, line)
                added.append(sig.name)
        return added

    # -- reading -------------------------------------------------------------------------

    def tile(self, level: int | None, index: int, width: int) -> bytes | None:
        """Tile or entry-bundle bytes, or ``None`` if the tree does not have it (yet)."""
        size = self.store.tree_size()
        height = 0 if level is None else TILE_HEIGHT * level
        available = size >> height
        if index * TILE_WIDTH + width > available:
            return None
        if width == TILE_WIDTH:
            cached = self._tiles.get((level, index))
            if cached is not None:
                self._tiles.move_to_end((level, index))
                return cached
        if level is None:
            data = encode_entry_bundle(self.store.read_entries(index * TILE_WIDTH, width))
        else:
            data = b"".join(self.store.read_hashes(height, index * TILE_WIDTH, width))
        if width == TILE_WIDTH:
            self._tiles[(level, index)] = data
            if len(self._tiles) > _TILE_CACHE:
                self._tiles.popitem(last=False)
        return data

    def inclusion(self, index: int, size: int) -> list[bytes]:
        return inclusion_proof(index, size, self.store.read_hash)

    def consistency(self, old: int, new: int) -> list[bytes]:
        return consistency_proof(old, new, self.store.read_hash)

    # -- HTTP ----------------------------------------------------------------------------

    def app(self) -> Starlette:
        """The ASGI application (the sequencer runs for the app's lifetime)."""

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.sequencer.start()
            try:
                yield
            finally:
                await self.sequencer.stop()

        routes = [
            Route("/checkpoint", self._get_checkpoint, methods=["GET"]),
            Route("/checkpoint/witnessed", self._get_witnessed, methods=["GET"]),
            Route("/tile/{path:path}", self._get_tile, methods=["GET"]),
            Route("/add", self._post_add, methods=["POST"]),
            Route("/cosignature", self._post_cosignature, methods=["POST"]),
            Route("/proof/inclusion", self._get_inclusion, methods=["GET"]),
            Route("/proof/consistency", self._get_consistency, methods=["GET"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan)

    async def _get_checkpoint(self, request: Request) -> Response:
        latest = await asyncio.to_thread(self.store.latest_checkpoint)
        if latest is None:
            return error_response(503, "LogStoreError", "no checkpoint published yet")
        return PlainTextResponse(
            latest.text_with_cosignatures,
            media_type=CHECKPOINT_TYPE,
            headers={"Cache-Control": "no-cache, max-age=0"},
        )

    async def _get_witnessed(self, request: Request) -> Response:
        try:
            minimum = _int_param(request, "min", default=1)
        except UsageError as exc:
            return error_response(400, type(exc).__name__, str(exc))
        size = await asyncio.to_thread(self.store.latest_cosigned_size, minimum)
        cp = None if size is None else await asyncio.to_thread(self.store.checkpoint_at, size)
        if cp is None:
            return error_response(
                404, "NotFound", f"no checkpoint has {minimum} cosignature(s) yet"
            )
        return PlainTextResponse(
            cp.text_with_cosignatures,
            media_type=CHECKPOINT_TYPE,
            headers={"Cache-Control": "no-cache"},
        )

    async def _get_tile(self, request: Request) -> Response:
        path = "tile/" + request.path_params["path"]
        try:
            level, index, width = parse_tile_path(path)
        except MalformedInputError as exc:
            return error_response(404, type(exc).__name__, str(exc))
        data = await asyncio.to_thread(self.tile, level, index, width)
        if data is None:
            return error_response(404, "NotFound", f"{path} is not in the tree")
        return Response(data, media_type=TILE_TYPE, headers={"Cache-Control": IMMUTABLE})

    async def _post_add(self, request: Request) -> Response:
        body = await read_body(request, MAX_ENTRY_SIZE)
        if body is None:
            return error_response(
                413, "EntryRejectedError", f"entry exceeds {MAX_ENTRY_SIZE} bytes"
            )
        try:
            sequenced = await self.sequencer.add(body)
        except EntryRejectedError as exc:
            return error_response(400, type(exc).__name__, str(exc))
        except HermeticError as exc:
            return error_response(503, type(exc).__name__, str(exc))
        size = sequenced.checkpoint.size
        proof = await asyncio.to_thread(self.inclusion, sequenced.index, size)
        return JSONResponse(
            {
                "index": sequenced.index,
                "duplicate": sequenced.duplicate,
                "size": size,
                "checkpoint": sequenced.checkpoint.note,
                "inclusion_proof": [_b64(h) for h in proof],
            }
        )

    async def _post_cosignature(self, request: Request) -> Response:
        # Read bounded: the whole body used to be read before its size was checked, so
        # any caller could make the log hold as much as it cared to send.
        body = await read_body(request, MAX_COSIGNED_SIZE)
        if body is None:
            return error_response(
                413, "CosignatureRejectedError", "cosigned checkpoint is too large"
            )
        try:
            added = await asyncio.to_thread(self.add_cosignature, body.decode("utf-8"))
        except UnicodeDecodeError:
            return error_response(400, "NoteFormatError", "cosigned checkpoint is not UTF-8")
        except MalformedInputError as exc:
            return error_response(400, type(exc).__name__, str(exc))
        except CosignatureRejectedError as exc:
            return error_response(403, type(exc).__name__, str(exc))
        return JSONResponse({"stored": added})

    async def _get_inclusion(self, request: Request) -> Response:
        try:
            size = _int_param(request, "size", default=None)
            if size is None:
                size = await asyncio.to_thread(self.store.tree_size)
            index = _int_param(request, "index")
            _check_size(size, await asyncio.to_thread(self.store.tree_size))
            proof = await asyncio.to_thread(self.inclusion, index, size)
        except (UsageError, TranslogError) as exc:
            return error_response(400, type(exc).__name__, str(exc))
        return JSONResponse(
            {"index": index, "size": size, "inclusion_proof": [_b64(h) for h in proof]}
        )

    async def _get_consistency(self, request: Request) -> Response:
        try:
            old = _int_param(request, "old")
            new = _int_param(request, "new", default=None)
            current = await asyncio.to_thread(self.store.tree_size)
            new = current if new is None else new
            _check_size(new, current)
            proof = await asyncio.to_thread(self.consistency, old, new)
        except (UsageError, TranslogError) as exc:
            return error_response(400, type(exc).__name__, str(exc))
        return JSONResponse({"old": old, "new": new, "consistency_proof": [_b64(h) for h in proof]})


def _signer(line: str) -> str:
    """The key name of a stored signature line (``— <name> <base64>``)."""
    return parse_signature_line(line.rstrip("\n")).name


def _timestamp(line: str) -> int:
    """The cosignature/v1 timestamp of a stored, verified cosignature line."""
    return int.from_bytes(parse_signature_line(line.rstrip("\n")).signature[:8], "big")


def _check_size(size: int, current: int) -> None:
    if size > current:
        raise UsageError(f"size {size} is beyond the current tree size {current}")


def _int_param(request: Request, name: str, default: Any = ...) -> Any:
    raw = request.query_params.get(name)
    if raw is None:
        if default is ...:
            raise UsageError(f"query parameter {name!r} is required")
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or (len(raw) > 1 and raw[0] == "0"):
        raise UsageError(f"query parameter {name!r} must be a decimal integer >= 0, got {raw!r}")
    return int(raw)


def serve(service: LogService, host: str, port: int) -> None:
    """Run the log on ``host:port`` with uvicorn until interrupted."""
    import uvicorn

    config = uvicorn.Config(
        service.app(), host=host, port=port, log_level="warning", access_log=False, lifespan="on"
    )
    uvicorn.Server(config).run()
