"""RFC 9162 hashing and proofs against every published Merkle vector, plus properties."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.errors import ConsistencyProofError, HermeticError, InclusionProofError
from hermetic.translog.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    MemoryTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    parent_row,
    root_hash,
    stored_hashes_for_leaf,
    verify_consistency,
    verify_consistency_rfc,
    verify_inclusion,
)


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def _proof(value: list[str] | None) -> list[bytes]:
    return [_b64(p) for p in (value or [])]


def _probes(vectors: Path, kind: str) -> list[tuple[str, dict[str, Any]]]:
    base = vectors / "merkle" / "transparency-dev-merkle" / kind
    files = sorted(base.rglob("*.json"))
    return [(str(f.relative_to(base)), json.loads(f.read_text())) for f in files]


def _fails(fn: Any, *args: Any) -> bool:
    try:
        fn(*args)
    except HermeticError:
        return True
    return False


# --- transparency-dev probes ----------------------------------------------------------


def test_every_transparency_dev_inclusion_probe_fails_iff_want_err(vectors: Path) -> None:
    probes = _probes(vectors, "inclusion")
    assert len(probes) == 98
    wrong = []
    for name, p in probes:
        failed = _fails(
            verify_inclusion,
            _b64(p["leafHash"]),
            p["leafIdx"],
            p["treeSize"],
            _proof(p["proof"]),
            _b64(p["root"]),
        )
        if failed != p["wantErr"]:
            wrong.append(name)
    assert wrong == []


def test_every_transparency_dev_consistency_probe_fails_iff_want_err_rfc(vectors: Path) -> None:
    probes = _probes(vectors, "consistency")
    assert len(probes) == 98
    wrong = []
    for name, p in probes:
        failed = _fails(
            verify_consistency_rfc,
            p["size1"],
            p["size2"],
            _b64(p["root1"]),
            _b64(p["root2"]),
            _proof(p["proof"]),
        )
        if failed != p["wantErr"]:
            wrong.append(name)
    assert wrong == []


def test_c2sp_verifier_differs_from_rfc_only_on_size_zero_with_empty_proof(vectors: Path) -> None:
    differ = []
    for name, p in _probes(vectors, "consistency"):
        args = (p["size1"], p["size2"], _b64(p["root1"]), _b64(p["root2"]), _proof(p["proof"]))
        if _fails(verify_consistency, *args) != p["wantErr"]:
            differ.append(name)
    # Old size 0, empty-tree old root, empty proof: trivially consistent under C2SP.
    assert differ == ["additional/size1-is-zero-and-size2-is-not-zero.json"]


def test_c2sp_rule_accepts_empty_proof_from_zero_and_rejects_anything_else() -> None:
    tree = MemoryTree()
    for i in range(5):
        tree.append(b"%d" % i)
    verify_consistency(0, 5, EMPTY_ROOT, tree.root(), [])
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    with pytest.raises(ConsistencyProofError):
        verify_consistency(0, 5, EMPTY_ROOT, tree.root(), [tree.root()])
    with pytest.raises(ConsistencyProofError):
        verify_consistency(0, 5, tree.root(), tree.root(), [])
    with pytest.raises(ConsistencyProofError):
        verify_consistency_rfc(0, 5, EMPTY_ROOT, tree.root(), [])
    assert consistency_proof(0, 5, tree.read) == []


# --- RFC 6962 reference tree ------------------------------------------------------------


def test_rfc6962_reference_tree_roots_leaf_hashes_and_goldens(vectors: Path) -> None:
    ref = json.loads((vectors / "merkle" / "rfc6962-reference-tree.json").read_text())
    leaves = [bytes.fromhex(h) for h in ref["leaves_hex"]]
    assert [leaf_hash(leaf).hex() for leaf in leaves] == ref["leaf_hash_hex"]
    goldens = ref["single_hash_goldens_from_transparency-dev/merkle rfc6962/rfc6962_test.go"]
    assert EMPTY_ROOT.hex() == goldens["EmptyRoot"]
    assert leaf_hash(b"").hex() == goldens["HashLeaf('')"]
    assert leaf_hash(b"L123456").hex() == goldens["HashLeaf('L123456')"]
    assert node_hash(b"N123", b"N456").hex() == goldens["HashChildren('N123','N456')"]
    tree = MemoryTree()
    assert tree.root().hex() == ref["roots_by_size_hex"]["0"]
    for size, leaf in enumerate(leaves, start=1):
        tree.append(leaf)
        assert tree.root().hex() == ref["roots_by_size_hex"][str(size)]
    for size in range(9):
        assert tree.root(size).hex() == ref["roots_by_size_hex"][str(size)]


# --- argon2020 real CT data -------------------------------------------------------------


def test_argon2020_leaf_10000_is_included_in_real_sth(vectors: Path) -> None:
    base = vectors / "merkle" / "golang-mod-argon2020"
    sth = json.loads((base / "sth.json").read_text())
    entry = json.loads((base / "entries.json").read_text())["entries"][0]
    proof = json.loads((base / "proof.json").read_text())
    leaf = leaf_hash(_b64(entry["leaf_input"]))
    root = _b64(sth["sha256_root_hash"])
    path = _proof(proof["audit_path"])
    assert proof["leaf_index"] == 10000
    verify_inclusion(leaf, 10000, sth["tree_size"], path, root)
    with pytest.raises(InclusionProofError):
        verify_inclusion(leaf, 10001, sth["tree_size"], path, root)


def test_argon2020_consistency_from_3654490_to_real_sth(vectors: Path) -> None:
    base = vectors / "merkle" / "golang-mod-argon2020"
    sth = json.loads((base / "sth.json").read_text())
    proof = _proof(json.loads((base / "consistency.json").read_text())["consistency"])
    old_root = _b64("AuIZ5V6sDUj1vn3Y1K85oOaQ7y+FJJKtyRTl1edIKBQ=")
    new_root = _b64(sth["sha256_root_hash"])
    verify_consistency(3654490, sth["tree_size"], old_root, new_root, proof)
    with pytest.raises(ConsistencyProofError):
        verify_consistency(3654491, sth["tree_size"], old_root, new_root, proof)


# --- generation ---------------------------------------------------------------------------


class CountingReader:
    def __init__(self, tree: MemoryTree) -> None:
        self.tree = tree
        self.calls = 0

    def __call__(self, level: int, index: int) -> bytes:
        self.calls += 1
        return self.tree.read(level, index)


def test_proof_generation_reads_logarithmically_many_hashes() -> None:
    tree = MemoryTree()
    for i in range(1000):
        tree.append(b"%d" % i)
    reader = CountingReader(tree)
    for index in (0, 1, 511, 512, 998, 999):
        reader.calls = 0
        inclusion_proof(index, 1000, reader)
        assert reader.calls <= 2 * 10
    for old in (1, 3, 512, 513, 999):
        reader.calls = 0
        consistency_proof(old, 1000, reader)
        assert reader.calls <= 3 * 10


def test_stored_hashes_complete_perfect_subtrees() -> None:
    tree = MemoryTree()
    for i in range(7):
        tree.append(b"%d" % i)
    stored = stored_hashes_for_leaf(7, b"7", tree.read)
    assert [(lvl, idx) for lvl, idx, _ in stored] == [(0, 7), (1, 3), (2, 1), (3, 0)]
    tree.append(b"7")
    assert stored[-1][2] == tree.root()


def test_parent_row_is_node_hash_of_each_pair_and_drops_an_unpaired_last_hash() -> None:
    tree = MemoryTree()
    for i in range(7):
        tree.append(b"%d" % i)
    leaves = [tree.read(0, i) for i in range(7)]
    assert parent_row(leaves) == [tree.read(1, i) for i in range(3)]
    assert parent_row(leaves[:6]) == [node_hash(leaves[i], leaves[i + 1]) for i in (0, 2, 4)]
    assert parent_row(leaves[:1]) == []


def test_generation_rejects_out_of_range_arguments() -> None:
    tree = MemoryTree()
    tree.append(b"a")
    with pytest.raises(InclusionProofError):
        tree.inclusion_proof(1, 1)
    with pytest.raises(InclusionProofError):
        inclusion_proof(-1, 1, tree.read)
    with pytest.raises(ConsistencyProofError):
        consistency_proof(2, 1, tree.read)
    with pytest.raises(HermeticError):
        tree.read(5, 0)


# --- properties ---------------------------------------------------------------------------


def _tree(size: int) -> MemoryTree:
    tree = MemoryTree()
    for i in range(size):
        tree.append(b"leaf %d" % i)
    return tree


_BIG = _tree(600)


def _flip(data: bytes, bit: int) -> bytes:
    buf = bytearray(data)
    buf[bit // 8] ^= 1 << (bit % 8)
    return bytes(buf)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_inclusion_proofs_verify_and_any_bit_flip_fails(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 600), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    root = _BIG.root(size)
    leaf = _BIG.read(0, index)
    proof = _BIG.inclusion_proof(index, size)
    verify_inclusion(leaf, index, size, proof, root)
    # The tree size is not committed to by the hashes alone (the signed checkpoint binds it),
    # so the mutations are of what the proof does commit to: leaf, index, path and root.
    target = data.draw(st.sampled_from(["root", "leaf", "index", "proof"]))
    if target == "proof" and not proof:
        target = "root"
    if target == "root":
        bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1))
        args = (leaf, index, size, proof, _flip(root, bit))
    elif target == "leaf":
        bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1))
        args = (_flip(leaf, bit), index, size, proof, root)
    elif target == "index":
        bit = data.draw(st.integers(0, 63))
        args = (leaf, index ^ (1 << bit), size, proof, root)
    else:
        i = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1))
        mutated = list(proof)
        mutated[i] = _flip(mutated[i], bit)
        args = (leaf, index, size, mutated, root)
    with pytest.raises(InclusionProofError):
        verify_inclusion(*args)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_consistency_proofs_verify_and_any_bit_flip_fails(data: st.DataObject) -> None:
    new = data.draw(st.integers(0, 600), label="new")
    old = data.draw(st.integers(0, new), label="old")
    old_root, new_root = _BIG.root(old), _BIG.root(new)
    proof = _BIG.consistency_proof(old, new)
    verify_consistency(old, new, old_root, new_root, proof)
    if old == 0:
        assert proof == []
        return
    target = data.draw(st.sampled_from(["old_root", "new_root", "proof"]))
    if target == "proof" and not proof:
        target = "new_root"
    if target in ("old_root", "new_root"):
        bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1))
        if target == "old_root":
            args = (old, new, _flip(old_root, bit), new_root, proof)
        else:
            args = (old, new, old_root, _flip(new_root, bit), proof)
    else:
        i = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1))
        mutated = list(proof)
        mutated[i] = _flip(mutated[i], bit)
        args = (old, new, old_root, new_root, mutated)
    with pytest.raises(ConsistencyProofError):
        verify_consistency(*args)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 600))
def test_root_from_hash_reader_matches_recursive_definition(size: int) -> None:
    def mth(lo: int, hi: int) -> bytes:
        if hi - lo == 0:
            return EMPTY_ROOT
        if hi - lo == 1:
            return _BIG.read(0, lo)
        k = 1 << ((hi - lo - 1).bit_length() - 1)
        return node_hash(mth(lo, lo + k), mth(lo + k, hi))

    assert root_hash(size, _BIG.read) == mth(0, size)
