"""An HTTP client for a hermetic log that trusts nothing it receives.

Every checkpoint is opened with the pinned log key (and, when a policy asks for it, a
quorum of pinned witnesses); every proof is verified against a checkpoint that was;
entries read from bundles are checked against the tree. What the client returns has been
verified, so callers (``log append``, ``release publish``, the witness and the monitor)
never handle an unverified byte from the network.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from hermetic import jsontext
from hermetic.errors import (
    ConsistencyProofError,
    InclusionProofError,
    LogServiceError,
    TranslogError,
)
from hermetic.translog.checkpoint import VerifiedCheckpoint, open_checkpoint
from hermetic.translog.merkle import (
    inclusion_proof,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from hermetic.translog.note import NoteVerifier
from hermetic.translog.tiles import (
    TILE_WIDTH,
    TileHashReader,
    decode_entry_bundle,
    entries_path,
)


@dataclass(frozen=True)
class AddResult:
    """A logged entry: its index and a verified inclusion proof in a verified checkpoint."""

    index: int
    duplicate: bool
    checkpoint: VerifiedCheckpoint
    inclusion_proof: tuple[bytes, ...]


def _hashes(value: Any, what: str, error: type[TranslogError]) -> list[bytes]:
    if not isinstance(value, list) or len(value) > 64:
        raise error(f"{what} must be a list of at most 64 base64 hashes")
    out = []
    for i, item in enumerate(value):
        try:
            raw = base64.b64decode(str(item), validate=True)
        except (binascii.Error, ValueError):
            raise error(f"{what}[{i}] is not base64") from None
        if len(raw) != 32:
            raise error(f"{what}[{i}] must be 32 bytes, got {len(raw)}")
        out.append(raw)
    return out


def _body(response: httpx.Response, what: str) -> dict[str, Any]:
    """A log server's JSON answer, strictly parsed; it must be an object."""
    body = jsontext.loads(response.content, what=f"{what} response", error=LogServiceError)
    if not isinstance(body, dict):
        raise LogServiceError(f"{what} response: expected a JSON object")
    return body


class LogClient:
    """Talks to ``url`` and verifies with the pinned log key ``vkey``.

    ``witnesses``/``threshold`` is the cosignature policy applied by :meth:`checkpoint`
    (fresh checkpoints returned by :meth:`add` are not yet witnessed, so only the log
    signature is checked there).
    """

    def __init__(
        self,
        url: str,
        log_key: NoteVerifier,
        witnesses: Sequence[NoteVerifier] = (),
        threshold: int = 0,
        *,
        timeout: float = 60.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.log_key = log_key
        self.witnesses = list(witnesses)
        self.threshold = threshold
        self._http = client or httpx.Client(timeout=timeout)
        self._owns_http = client is None

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> LogClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, f"{self.url}/{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise LogServiceError(f"{method} {self.url}/{path} failed: {exc}") from None
        if response.status_code != 200:
            detail = response.text[:300]
            try:
                body = _body(response, f"{method} {path}")
                detail = f"{body.get('error')}: {body.get('message')}"
            except LogServiceError:
                pass
            raise LogServiceError(
                f"{method} {self.url}/{path} answered {response.status_code}: {detail}"
            )
        return response

    def _json(self, path: str, **params: int) -> dict[str, Any]:
        return _body(self._request("GET", path, params=params), path)

    def fetch(self, path: str) -> bytes:
        """Raw bytes of a tlog-tiles resource (for :class:`TileHashReader`)."""
        return self._request("GET", path).content

    # -- checkpoints -----------------------------------------------------------------------

    def open(self, note: str | bytes, threshold: int | None = None) -> VerifiedCheckpoint:
        """Open a checkpoint note with the pinned keys and this client's policy."""
        return open_checkpoint(
            note,
            self.log_key,
            self.witnesses,
            self.threshold if threshold is None else threshold,
        )

    def checkpoint(self, threshold: int | None = None) -> VerifiedCheckpoint:
        """The log's latest checkpoint, verified (log signature and witness quorum)."""
        return self.open(self._request("GET", "checkpoint").content, threshold)

    def witnessed_checkpoint(self, minimum: int) -> VerifiedCheckpoint | None:
        """The largest checkpoint with at least ``minimum`` valid trusted cosignatures."""
        try:
            response = self._http.get(f"{self.url}/checkpoint/witnessed", params={"min": minimum})
        except httpx.HTTPError as exc:
            raise LogServiceError(f"GET {self.url}/checkpoint/witnessed failed: {exc}") from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise LogServiceError(
                f"GET /checkpoint/witnessed answered {response.status_code}: {response.text[:200]}"
            )
        return self.open(response.content, minimum)

    # -- proofs --------------------------------------------------------------------------

    def inclusion_proof(
        self, index: int, checkpoint: VerifiedCheckpoint, entry: bytes
    ) -> list[bytes]:
        """An inclusion proof for ``entry`` at ``index``, verified against ``checkpoint``."""
        body = self._json("proof/inclusion", index=index, size=checkpoint.size)
        proof = _hashes(body.get("inclusion_proof"), "inclusion_proof", InclusionProofError)
        verify_inclusion(leaf_hash(entry), index, checkpoint.size, proof, checkpoint.root_hash)
        return proof

    def check_consistency(self, old: VerifiedCheckpoint, new: VerifiedCheckpoint) -> list[bytes]:
        """Fetch and verify that ``new`` extends ``old`` (raises ConsistencyProofError)."""
        if old.size > new.size:
            raise ConsistencyProofError(
                f"checkpoint size went backwards from {old.size} to {new.size}"
            )
        body = self._json("proof/consistency", old=old.size, new=new.size)
        proof = _hashes(body.get("consistency_proof"), "consistency_proof", ConsistencyProofError)
        verify_consistency(old.size, new.size, old.root_hash, new.root_hash, proof)
        return proof

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """The raw consistency proof (for a witness that verifies it itself)."""
        body = self._json("proof/consistency", old=old_size, new=new_size)
        return _hashes(body.get("consistency_proof"), "consistency_proof", ConsistencyProofError)

    # -- writing -------------------------------------------------------------------------

    def add(self, entry: bytes) -> AddResult:
        """Log ``entry``; return once integrated, with the proof checked."""
        body = _body(
            self._request(
                "POST", "add", content=entry, headers={"Content-Type": "application/octet-stream"}
            ),
            "add",
        )
        index = body.get("index")
        note = body.get("checkpoint")
        if not isinstance(index, int) or index < 0 or not isinstance(note, str):
            raise LogServiceError("add response lacks index or checkpoint")
        checkpoint = self.open(note, threshold=0)
        proof = _hashes(body.get("inclusion_proof"), "inclusion_proof", InclusionProofError)
        verify_inclusion(leaf_hash(entry), index, checkpoint.size, proof, checkpoint.root_hash)
        return AddResult(index, bool(body.get("duplicate")), checkpoint, tuple(proof))

    def submit_cosignature(self, cosigned_note: str) -> list[str]:
        """POST a cosigned checkpoint note; returns the witness names the log stored."""
        body = _body(
            self._request(
                "POST",
                "cosignature",
                content=cosigned_note.encode(),
                headers={"Content-Type": "text/plain"},
            ),
            "cosignature",
        )
        stored = body.get("stored")
        return [str(s) for s in stored] if isinstance(stored, list) else []

    # -- reading entries -----------------------------------------------------------------

    def tile_reader(self, checkpoint: VerifiedCheckpoint) -> TileHashReader:
        return TileHashReader(self.fetch, checkpoint.size)

    def entries(self, start: int, end: int, checkpoint: VerifiedCheckpoint) -> list[bytes]:
        """Entries ``[start, end)`` from bundles, each proven included in ``checkpoint``."""
        if not 0 <= start <= end <= checkpoint.size:
            raise TranslogError(
                f"entry range [{start}, {end}) is not inside the checkpoint's {checkpoint.size}"
            )
        reader = self.tile_reader(checkpoint)
        out: list[bytes] = []
        index = start
        while index < end:
            bundle = index // TILE_WIDTH
            width = min(TILE_WIDTH, checkpoint.size - bundle * TILE_WIDTH)
            items = decode_entry_bundle(self.fetch(entries_path(bundle, width)), width)
            for offset in range(index - bundle * TILE_WIDTH, width):
                position = bundle * TILE_WIDTH + offset
                if position >= end:
                    break
                entry = items[offset]
                proof = inclusion_proof(position, checkpoint.size, reader)
                verify_inclusion(
                    leaf_hash(entry), position, checkpoint.size, proof, checkpoint.root_hash
                )
                out.append(entry)
                index = position + 1
        return out


def add_unpinned(url: str, entry: bytes, *, timeout: float = 60.0) -> tuple[int, int, list[bytes]]:
    """Log ``entry`` without a pinned log key: ``(index, size, proof)``.

    Only the inclusion proof against the returned checkpoint's root is checked (the log
    could sign anything); use :meth:`LogClient.add` with the log's key wherever it matters.
    """
    from hermetic.translog.checkpoint import Checkpoint
    from hermetic.translog.note import split_note

    try:
        response = httpx.post(f"{url.rstrip('/')}/add", content=entry, timeout=timeout)
    except httpx.HTTPError as exc:
        raise LogServiceError(f"POST {url}/add failed: {exc}") from None
    if response.status_code != 200:
        raise LogServiceError(
            f"POST {url}/add answered {response.status_code}: {response.text[:300]}"
        )
    body = _body(response, "add")
    index, note = body.get("index"), body.get("checkpoint")
    if not isinstance(index, int) or not isinstance(note, str):
        raise LogServiceError("add response lacks index or checkpoint")
    checkpoint = Checkpoint.parse(split_note(note)[0])
    proof = _hashes(body.get("inclusion_proof"), "inclusion_proof", InclusionProofError)
    verify_inclusion(leaf_hash(entry), index, checkpoint.size, proof, checkpoint.root_hash)
    return index, checkpoint.size, proof
