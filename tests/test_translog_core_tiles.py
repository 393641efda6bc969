"""C2SP tlog-tiles against the 300-entry log generated with x/mod."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.errors import HermeticError, TileFormatError
from hermetic.translog.checkpoint import open_checkpoint
from hermetic.translog.merkle import (
    MemoryTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from hermetic.translog.note import NoteVerifier
from hermetic.translog.tiles import (
    Tile,
    TileHashReader,
    decode_entry_bundle,
    encode_entry_bundle,
    entries_path,
    parse_tile_path,
    tile_bytes,
    tile_path,
    tiles_for_size,
)


def _entries() -> list[bytes]:
    return [b"entry %d\n" % i for i in range(300)]


def _tree() -> MemoryTree:
    tree = MemoryTree()
    for entry in _entries():
        tree.append(entry)
    return tree


def _base(vectors: Path) -> Path:
    return vectors / "merkle" / "tiles-300-x-mod"


def _proofs(vectors: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((_base(vectors) / "proofs.json").read_text())
    return data


def _b64list(value: list[str] | None) -> list[bytes]:
    return [base64.b64decode(p) for p in (value or [])]


def test_spec_path_examples() -> None:
    assert tile_path(0, 1234067) == "tile/0/x001/x234/067"
    assert tile_path(1, 0, 1) == "tile/1/000.p/1"
    assert tile_path(0, 1, 44) == "tile/0/001.p/44"
    assert entries_path(1, 44) == "tile/entries/001.p/44"
    assert entries_path(1000) == "tile/entries/x001/000"
    assert parse_tile_path("tile/0/x001/x234/067") == (0, 1234067, 256)
    assert parse_tile_path("tile/entries/001.p/44") == (None, 1, 44)


def test_spec_size_70000_tile_layout() -> None:
    tiles = list(tiles_for_size(70000))
    level0 = [t for t in tiles if t.level == 0]
    assert len(level0) == 274
    assert level0[-1].width == 112
    assert [(t.index, t.width) for t in tiles if t.level == 1] == [(0, 256), (1, 17)]
    assert [(t.index, t.width) for t in tiles if t.level == 2] == [(0, 1)]


@pytest.mark.parametrize(
    "path",
    [
        "tile/0/1",
        "tile/0/0001",
        "tile/00/000",
        "tile/0/x000/001",
        "tile/0/000.p/256",
        "tile/0/000.p/0",
        "tile/0/000.p/044",
        "tile/64/000",
        "tile/0/000/",
        "tile/entries/000.p/300",
        "/tile/0/000",
        "tile/0/x001",
    ],
)
def test_non_canonical_or_invalid_paths_are_rejected(path: str) -> None:
    with pytest.raises(TileFormatError):
        parse_tile_path(path)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 63), st.integers(0, 10**12), st.integers(1, 256))
def test_tile_paths_round_trip(level: int, index: int, width: int) -> None:
    assert parse_tile_path(tile_path(level, index, width)) == (level, index, width)
    assert parse_tile_path(entries_path(index, width)) == (None, index, width)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_path_parser_only_raises_hermetic_errors(path: str) -> None:
    with contextlib.suppress(HermeticError):
        level, index, width = parse_tile_path(path)
        assert (
            entries_path(index, width) if level is None else tile_path(level, index, width)
        ) == path


def test_every_tile_and_bundle_of_the_300_entry_log_is_byte_exact(vectors: Path) -> None:
    tree = _tree()
    tiles = list(tiles_for_size(300))
    assert [t.path for t in tiles] == ["tile/0/000", "tile/0/001.p/44", "tile/1/000.p/1"]
    for tile in tiles:
        expected = (_base(vectors) / tile.path).read_bytes()
        assert tile_bytes(tile.level, tile.index, tile.width, tree.read) == expected
    entries = _entries()
    for index, width, chunk in ((0, 256, entries[:256]), (1, 44, entries[256:])):
        expected = (_base(vectors) / entries_path(index, width)).read_bytes()
        assert encode_entry_bundle(chunk) == expected
        assert decode_entry_bundle(expected, width) == chunk


def test_roots_and_checkpoint_are_reproduced(vectors: Path) -> None:
    tree = _tree()
    proofs = _proofs(vectors)
    for size, root in proofs["roots_base64"].items():
        assert tree.root(int(size)) == base64.b64decode(root)
    vkey = NoteVerifier.from_vkey(proofs["checkpoint_vkey"])
    verified = open_checkpoint((_base(vectors) / "checkpoint").read_text(), vkey)
    assert verified.root_hash == tree.root(300)


def _fetcher(vectors: Path) -> Any:
    def fetch(path: str) -> bytes:
        return (_base(vectors) / path).read_bytes()

    return fetch


def test_every_published_proof_verifies_and_is_reproduced_from_tiles(vectors: Path) -> None:
    proofs = _proofs(vectors)
    tree = _tree()
    assert len(proofs["inclusion_proofs"]) > 0
    assert len(proofs["consistency_proofs"]) > 0
    for p in proofs["inclusion_proofs"]:
        leaf = leaf_hash(p["Entry"].encode())
        assert leaf == base64.b64decode(p["LeafHash"])
        root = tree.root(p["TreeSize"])
        path = _b64list(p["Proof"])
        verify_inclusion(leaf, p["Index"], p["TreeSize"], path, root)
        reader = TileHashReader(_fetcher(vectors), 300)
        assert inclusion_proof(p["Index"], p["TreeSize"], reader) == path
        assert tree.inclusion_proof(p["Index"], p["TreeSize"]) == path
    for p in proofs["consistency_proofs"]:
        path = _b64list(p["Proof"])
        old, new = base64.b64decode(p["Root1"]), base64.b64decode(p["Root2"])
        verify_consistency(p["Size1"], p["Size2"], old, new, path)
        reader = TileHashReader(_fetcher(vectors), 300)
        assert consistency_proof(p["Size1"], p["Size2"], reader) == path


def test_tile_reader_answers_every_hash_of_the_tree(vectors: Path) -> None:
    tree = _tree()
    reader = TileHashReader(_fetcher(vectors), 300)
    for level in range(9):
        for index in range(300 >> level):
            assert reader(level, index) == tree.read(level, index)
    assert root_hash(300, reader) == tree.root()
    assert reader.fetched == 3
    with pytest.raises(HermeticError):
        reader(0, 300)


def test_tile_reader_rejects_wrong_length_tiles() -> None:
    reader = TileHashReader(lambda path: b"\x00" * 31, 300)
    with pytest.raises(TileFormatError):
        reader(0, 0)


def test_forged_tile_gives_proofs_that_do_not_verify(vectors: Path) -> None:
    tree = _tree()

    def forged(path: str) -> bytes:
        data = bytearray((_base(vectors) / path).read_bytes())
        data[5 * 32] ^= 1
        return bytes(data)

    reader = TileHashReader(forged, 300)
    proof = inclusion_proof(4, 300, reader)
    with pytest.raises(HermeticError):
        verify_inclusion(tree.read(0, 4), 4, 300, proof, tree.root())


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\x00\x05abc", b"\x00\x01a\x00", b"\x00\x00" * 257],
)
def test_malformed_entry_bundles_are_rejected(data: bytes) -> None:
    with pytest.raises(TileFormatError):
        decode_entry_bundle(data)


def test_entry_bundle_width_is_enforced(vectors: Path) -> None:
    data = (_base(vectors) / "tile/entries/001.p/44").read_bytes()
    with pytest.raises(TileFormatError):
        decode_entry_bundle(data, 45)
    with pytest.raises(TileFormatError):
        decode_entry_bundle(data[:-1], 44)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_entry_bundle_decoder_only_raises_hermetic_errors(data: bytes) -> None:
    with contextlib.suppress(HermeticError):
        entries = decode_entry_bundle(data)
        assert encode_entry_bundle(entries) == data


def test_tile_coordinates_are_validated() -> None:
    for bad in ((-1, 0, 256), (64, 0, 256), (0, -1, 256), (0, 0, 0), (0, 0, 257)):
        with pytest.raises(TileFormatError):
            Tile(*bad)
