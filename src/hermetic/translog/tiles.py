"""C2SP tlog-tiles: the static, cacheable read API of a Merkle log.

A tiled log publishes its stored hashes in immutable 256-hash tiles and its entries in
256-entry bundles, so clients (and witnesses, monitors, mirrors) read it with plain GETs
and compute every proof themselves. This module is the sans-IO half: path encoding and
parsing, tile contents from any :data:`~hermetic.translog.merkle.HashReader`, entry-bundle
framing, and :class:`TileHashReader`, which turns fetched tiles back into a HashReader.

Tile ``n`` at tile level ``L`` holds the Merkle hashes at tree level ``8*L``, indices
``n*256 .. n*256+255``; a partial tile (``.p/<W>``) holds the first ``W`` of them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from hermetic.errors import TileFormatError, TranslogError
from hermetic.translog.merkle import HASH_SIZE

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_TILE_LEVEL = 63
MAX_ENTRY_SIZE = 0xFFFF


@dataclass(frozen=True)
class Tile:
    """Coordinates of a tile: tile level, tile index and width (256 = full)."""

    level: int
    index: int
    width: int = TILE_WIDTH

    def __post_init__(self) -> None:
        if not 0 <= self.level <= MAX_TILE_LEVEL:
            raise TileFormatError(f"tile level must be 0..{MAX_TILE_LEVEL}, got {self.level}")
        if self.index < 0:
            raise TileFormatError(f"tile index must be >= 0, got {self.index}")
        if not 1 <= self.width <= TILE_WIDTH:
            raise TileFormatError(f"tile width must be 1..{TILE_WIDTH}, got {self.width}")

    @property
    def path(self) -> str:
        return tile_path(self.level, self.index, self.width)


def _encode_index(index: int) -> str:
    if index < 0:
        raise TileFormatError(f"tile index must be >= 0, got {index}")
    digits = str(index)
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    return "/".join([f"x{g}" for g in groups[:-1]] + [groups[-1]])


def _suffix(width: int) -> str:
    if not 1 <= width <= TILE_WIDTH:
        raise TileFormatError(f"tile width must be 1..{TILE_WIDTH}, got {width}")
    return "" if width == TILE_WIDTH else f".p/{width}"


def tile_path(level: int, index: int, width: int = TILE_WIDTH) -> str:
    """``tile/<L>/<N>[.p/<W>]``, N in 3-digit groups (1234067 -> ``x001/x234/067``)."""
    if not 0 <= level <= MAX_TILE_LEVEL:
        raise TileFormatError(f"tile level must be 0..{MAX_TILE_LEVEL}, got {level}")
    return f"tile/{level}/{_encode_index(index)}{_suffix(width)}"


def entries_path(index: int, width: int = TILE_WIDTH) -> str:
    """``tile/entries/<N>[.p/<W>]``: the bundle of entries ``index*256 ..``."""
    return f"tile/entries/{_encode_index(index)}{_suffix(width)}"


_PATH = re.compile(r"tile/(entries|[0-9]{1,2})/((?:x[0-9]{3}/)*[0-9]{3})(?:\.p/([0-9]{1,3}))?")


def parse_tile_path(path: str) -> tuple[int | None, int, int]:
    """Parse a tile or entry-bundle path: ``(level or None for entries, index, width)``.

    Only the canonical encoding is accepted (no leading ``x000`` groups, no leading zeros
    in the level or width), so each tile has exactly one name.
    """
    match = _PATH.fullmatch(path) if isinstance(path, str) else None
    if match is None:
        raise TileFormatError(f"not a tlog-tiles path: {path!r}")
    level_text, index_text, width_text = match.groups()
    groups = index_text.split("/")
    index = int("".join(g.lstrip("x") for g in groups))
    width = TILE_WIDTH if width_text is None else int(width_text)
    level = None if level_text == "entries" else int(level_text)
    canonical_numbers = (level is None or str(level) == level_text) and (
        width_text is None or (width_text == str(width) and width != TILE_WIDTH)
    )
    canonical = entries_path(index, width) if level is None else tile_path(level, index, width)
    if not canonical_numbers or canonical != path:
        raise TileFormatError(f"not a canonical tlog-tiles path: {path!r}")
    return level, index, width


def tiles_for_size(size: int) -> Iterator[Tile]:
    """Every tile a log of ``size`` entries publishes (full and the partial one per level)."""
    if size < 0:
        raise TranslogError(f"tree size must be >= 0, got {size}")
    level = 0
    while level <= MAX_TILE_LEVEL:
        count = size >> (TILE_HEIGHT * level)  # hashes at this tile level
        if count == 0:
            return
        for index in range(count // TILE_WIDTH):
            yield Tile(level, index)
        if count % TILE_WIDTH:
            yield Tile(level, count // TILE_WIDTH, count % TILE_WIDTH)
        level += 1


def tile_for(level: int, index: int, size: int) -> Tile:
    """The tile (with the right width for ``size``) holding hash ``index`` at tile ``level``."""
    count = size >> (TILE_HEIGHT * level)
    if index >= count:
        raise TranslogError(
            f"tile level {level} of a size-{size} tree has {count} hashes, not {index + 1}"
        )
    number = index // TILE_WIDTH
    width = min(TILE_WIDTH, count - number * TILE_WIDTH)
    return Tile(level, number, width)


def tile_bytes(level: int, index: int, width: int, read: Callable[[int, int], bytes]) -> bytes:
    """Contents of tile ``(level, index, width)``: ``width`` concatenated 32-byte hashes."""
    tile = Tile(level, index, width)
    base = tile.index * TILE_WIDTH
    return b"".join(read(TILE_HEIGHT * tile.level, base + i) for i in range(tile.width))


def split_tile(data: bytes, width: int) -> list[bytes]:
    """The hashes of a fetched tile, checking its length."""
    if len(data) != width * HASH_SIZE:
        raise TileFormatError(
            f"tile of width {width} must be {width * HASH_SIZE} bytes, got {len(data)}"
        )
    return [bytes(data[i : i + HASH_SIZE]) for i in range(0, len(data), HASH_SIZE)]


_NODE_PREFIX = hashlib.sha256(b"\x01")


def _parent_row(row: bytes) -> bytes:
    """:func:`~hermetic.translog.merkle.parent_row` over a row of concatenated hashes.

    Each node hash continues a copy of one SHA-256 state that has absorbed the interior
    node prefix, over the pair's 64 bytes in place: no per-pair concatenation and no
    per-pair hash set-up (the fastest of the spellings measured here).
    """
    view = memoryview(row)
    out = []
    for i in range(0, len(row) - 2 * HASH_SIZE + 1, 2 * HASH_SIZE):
        node = _NODE_PREFIX.copy()
        node.update(view[i : i + 2 * HASH_SIZE])
        out.append(node.digest())
    return b"".join(out)


# --- entry bundles -----------------------------------------------------------------------


def encode_entry_bundle(entries: Sequence[bytes]) -> bytes:
    """Frame up to 256 entries as ``u16 big-endian length || entry`` each."""
    if not 1 <= len(entries) <= TILE_WIDTH:
        raise TileFormatError(f"an entry bundle holds 1..{TILE_WIDTH} entries, got {len(entries)}")
    out = bytearray()
    for i, entry in enumerate(entries):
        if len(entry) > MAX_ENTRY_SIZE:
            raise TileFormatError(f"entry {i} is {len(entry)} bytes, max {MAX_ENTRY_SIZE}")
        out += len(entry).to_bytes(2, "big") + entry
    return bytes(out)


def decode_entry_bundle(data: bytes, width: int | None = None) -> list[bytes]:
    """Split an entry bundle; ``width`` (if given) is the exact entry count expected."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TileFormatError(f"entry bundle must be bytes, got {type(data).__name__}")
    data = bytes(data)
    entries: list[bytes] = []
    pos = 0
    while pos < len(data):
        if len(entries) == TILE_WIDTH:
            raise TileFormatError(f"entry bundle holds more than {TILE_WIDTH} entries")
        if pos + 2 > len(data):
            raise TileFormatError(f"entry bundle truncated in the length of entry {len(entries)}")
        length = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        if pos + length > len(data):
            raise TileFormatError(
                f"entry {len(entries)} claims {length} bytes, only {len(data) - pos} remain"
            )
        entries.append(data[pos : pos + length])
        pos += length
    if not entries:
        raise TileFormatError("entry bundle is empty")
    if width is not None and len(entries) != width:
        raise TileFormatError(f"entry bundle holds {len(entries)} entries, expected {width}")
    return entries


# --- reading a tiled log ------------------------------------------------------------------


class TileHashReader:
    """A :data:`~hermetic.translog.merkle.HashReader` over a remote tiled log of ``size``.

    ``fetch(path)`` returns the bytes at a tile path (HTTP GET, file read, ...). Fetched
    tiles are kept for the life of this object, and so are the levels hashed up inside
    each tile: a hash between two tile levels (tree level ``8*L + r``) is not published
    and must be computed from ``2**r`` tile hashes, and the siblings one inclusion proof
    needs inside a tile cover nearly the whole tile, so each tile's rows are hashed up
    once, a whole row at a time, and every later proof that touches the tile reads them
    for free (at 10^6 entries this halves the proof cost of a reader that serves several
    proofs, and costs a single cold proof the same). The hashes are *not* authenticated
    here: a proof computed from them means something only once verified against a root
    from a verified checkpoint (``verify_inclusion`` / ``verify_consistency``), which a
    forged tile cannot pass.
    """

    def __init__(self, fetch: Callable[[str], bytes], size: int) -> None:
        if size < 0:
            raise TranslogError(f"tree size must be >= 0, got {size}")
        self._fetch = fetch
        self.size = size
        # rows[r]: the hashes of the perfect subtrees of 2**r tile hashes, concatenated
        # (hash i at bytes 32*i .. 32*i+32); rows[0] is the tile as fetched. Rows stay
        # joined, so a hash is sliced out only when a proof reads it: splitting every
        # fetched tile into 256 objects cost a fresh reader's proof as much as a third
        # of its hashing (bench_translog_proofs).
        self._tiles: dict[Tile, list[bytes]] = {}

    def tile(self, tile: Tile) -> list[bytes]:
        return split_tile(self._rows(tile, 0)[0], tile.width)

    def _rows(self, tile: Tile, height: int) -> list[bytes]:
        """The tile's rows 0..``height`` (fetching the tile, hashing up rows as needed)."""
        rows = self._tiles.get(tile)
        if rows is None:
            data = bytes(self._fetch(tile.path))
            if len(data) != tile.width * HASH_SIZE:
                raise TileFormatError(
                    f"tile of width {tile.width} must be {tile.width * HASH_SIZE} bytes,"
                    f" got {len(data)}"
                )
            rows = [data]
            self._tiles[tile] = rows
        while len(rows) <= height:
            rows.append(_parent_row(rows[-1]))
        return rows

    def __call__(self, level: int, index: int) -> bytes:
        if level < 0 or index < 0 or (index + 1) << level > self.size:
            raise TranslogError(
                f"no perfect subtree at level {level}, index {index} in a size-{self.size} tree"
            )
        tile_level, rest = divmod(level, TILE_HEIGHT)
        first = index << rest  # position of the subtree's first hash at tile_level
        tile = tile_for(tile_level, first + (1 << rest) - 1, self.size)
        at = ((first - tile.index * TILE_WIDTH) >> rest) * HASH_SIZE
        return self._rows(tile, rest)[rest][at : at + HASH_SIZE]

    @property
    def fetched(self) -> int:
        """How many distinct tiles were fetched (for tests and metrics)."""
        return len(self._tiles)
