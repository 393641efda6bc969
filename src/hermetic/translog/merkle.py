"""RFC 9162 Merkle trees: hashing, proof generation and proof verification.

The log's whole security argument rests on these few functions, so they follow RFC 9162
§2.1 (identical hashing to RFC 6962) literally and stay sans-IO. Storage is abstracted as
a :data:`HashReader` that returns the hash of a *perfect* subtree (2**level leaves, aligned
on a multiple of 2**level); every tree of any size is a short list of such subtrees, so
root, inclusion and consistency computations need O(log n) reads, whether the reader is a
dict in memory, a database table or the C2SP tiles of a remote log.

No well-kept Python library offers RFC 9162 proof generation over an arbitrary hash store
together with consistency-proof verification (sigstore-python only verifies inclusion,
privately; pymerkle uses its own proof format), hence this module.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

from hermetic.errors import ConsistencyProofError, InclusionProofError, TranslogError

HASH_SIZE = 32
EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()

HashReader = Callable[[int, int], bytes]
"""``read(level, index)``: hash of the perfect subtree of ``2**level`` leaves that starts at
leaf ``index * 2**level``."""


def leaf_hash(entry: bytes) -> bytes:
    """``SHA-256(0x00 || entry)``: the hash of a log entry as a leaf."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def parent_row(row: Sequence[bytes]) -> list[bytes]:
    """:func:`node_hash` of each adjacent pair of ``row`` (an unpaired last hash is dropped).

    The formula is spelled out rather than calling :func:`node_hash` per pair: a tile
    reader hashes up whole rows, and the per-call overhead is a third of each hash.
    """
    sha256 = hashlib.sha256
    return [sha256(b"\x01" + row[i] + row[i + 1]).digest() for i in range(0, len(row) - 1, 2)]


def _largest_power_of_two_below(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _subtree_hash(start: int, end: int, read: HashReader) -> bytes:
    """MTH of leaves ``[start, end)`` from perfect-subtree reads (O(log n) of them).

    The range is split greedily, left to right, into the largest aligned perfect subtrees,
    which are then folded right to left, exactly as RFC 9162's recursive definition nests.
    """
    if start >= end:
        return EMPTY_ROOT
    parts: list[bytes] = []
    while start < end:
        level = (end - start).bit_length() - 1
        if start:
            level = min(level, (start & -start).bit_length() - 1)
        parts.append(read(level, start >> level))
        start += 1 << level
    acc = parts[-1]
    for part in reversed(parts[:-1]):
        acc = node_hash(part, acc)
    return acc


def root_hash(size: int, read: HashReader) -> bytes:
    """The Merkle tree hash of the first ``size`` leaves."""
    if size < 0:
        raise TranslogError(f"tree size must be >= 0, got {size}")
    return _subtree_hash(0, size, read)


def inclusion_proof(index: int, size: int, read: HashReader) -> list[bytes]:
    """RFC 9162 ``PATH(index, D[size])``, hashes ordered leaf to root."""
    if not 0 <= index < size:
        raise InclusionProofError(f"leaf index must be in [0, {size}), got {index}")
    proof: list[bytes] = []
    start, n, m = 0, size, index
    # Walk down from the root; each step contributes the sibling subtree's hash. The
    # collected hashes come out root-first, so reverse at the end.
    while n > 1:
        k = _largest_power_of_two_below(n)
        if m < k:
            proof.append(_subtree_hash(start + k, start + n, read))
            n = k
        else:
            proof.append(_subtree_hash(start, start + k, read))
            start, n, m = start + k, n - k, m - k
    proof.reverse()
    return proof


def consistency_proof(old_size: int, new_size: int, read: HashReader) -> list[bytes]:
    """RFC 9162 ``PROOF(old_size, D[new_size])``; the empty proof for old_size 0 or equal sizes."""
    if not 0 <= old_size <= new_size:
        raise ConsistencyProofError(
            f"sizes must satisfy 0 <= old_size <= new_size, got {old_size} and {new_size}"
        )
    if old_size == 0 or old_size == new_size:
        return []
    proof: list[bytes] = []
    start, n, m, complete = 0, new_size, old_size, True
    while m != n:
        k = _largest_power_of_two_below(n)
        if m <= k:
            proof.append(_subtree_hash(start + k, start + n, read))
            n = k
        else:
            proof.append(_subtree_hash(start, start + k, read))
            start, n, m, complete = start + k, n - k, m - k, False
    if not complete:
        proof.append(_subtree_hash(start, start + n, read))
    proof.reverse()
    return proof


def _check_hashes(proof: Sequence[bytes], error: type[TranslogError]) -> None:
    for i, item in enumerate(proof):
        if not isinstance(item, bytes | bytearray) or len(item) != HASH_SIZE:
            length = len(item) if isinstance(item, bytes | bytearray) else type(item).__name__
            raise error(f"proof[{i}] must be a {HASH_SIZE}-byte hash, got {length}")


def _equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(bytes(a), bytes(b))


def root_from_inclusion_proof(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root that ``proof`` implies for leaf hash ``leaf`` at ``index`` (RFC 9162 §2.1.3.2)."""
    if not isinstance(leaf, bytes | bytearray) or len(leaf) != HASH_SIZE:
        raise InclusionProofError(f"leaf hash must be {HASH_SIZE} bytes")
    if not 0 <= index < size:
        raise InclusionProofError(f"leaf index must be in [0, {size}), got {index}")
    _check_hashes(proof, InclusionProofError)
    fn, sn, r = index, size - 1, bytes(leaf)
    for p in proof:
        if sn == 0:
            raise InclusionProofError(
                f"inclusion proof for index {index} in size {size} is too long: {len(proof)} hashes"
            )
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InclusionProofError(
            f"inclusion proof for index {index} in size {size} is too short: {len(proof)} hashes"
        )
    return r


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that the leaf hash ``leaf`` (``leaf_hash(entry)``, not the entry) is leaf
    ``index`` of the tree of ``size`` leaves whose root is ``root``.

    Raises :class:`InclusionProofError` otherwise.
    """
    computed = root_from_inclusion_proof(leaf, index, size, proof)
    if not _equal(computed, root):
        raise InclusionProofError(
            f"inclusion proof for index {index} in size {size} leads to root "
            f"{computed.hex()}, expected {bytes(root).hex()}"
        )


def verify_consistency_rfc(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2 consistency verification with transparency-dev edge semantics.

    Equal sizes need an empty proof and equal roots; an old size of 0 is rejected as
    meaningless (see :func:`verify_consistency` for the C2SP rule). Raises
    :class:`ConsistencyProofError`.
    """
    if old_size < 0 or new_size < old_size:
        raise ConsistencyProofError(
            f"sizes must satisfy 0 <= old_size <= new_size, got {old_size} and {new_size}"
        )
    if old_size == 0:
        raise ConsistencyProofError("a consistency proof from size 0 is meaningless")
    if old_size == new_size:
        if proof:
            raise ConsistencyProofError(
                f"proof between equal sizes {old_size} must be empty, got {len(proof)} hashes"
            )
        if not _equal(old_root, new_root):
            raise ConsistencyProofError(f"two different roots for the same size {old_size}")
        return
    if not proof:
        raise ConsistencyProofError(
            f"consistency proof from {old_size} to {new_size} is empty, expected hashes"
        )
    _check_hashes(proof, ConsistencyProofError)
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, bytes(old_root))
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = bytes(path[0])
    for c in path[1:]:
        if sn == 0:
            raise ConsistencyProofError(
                f"consistency proof from {old_size} to {new_size} is too long: {len(proof)} hashes"
            )
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ConsistencyProofError(
            f"consistency proof from {old_size} to {new_size} is too short: {len(proof)} hashes"
        )
    if not _equal(fr, old_root):
        raise ConsistencyProofError(
            f"consistency proof leads to old root {fr.hex()}, expected {bytes(old_root).hex()}"
        )
    if not _equal(sr, new_root):
        raise ConsistencyProofError(
            f"consistency proof leads to new root {sr.hex()}, expected {bytes(new_root).hex()}"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree ``(new_size, new_root)`` extends ``(old_size, old_root)``.

    C2SP tlog-witness semantics: from an old size of 0 (whose root must be the empty-tree
    root) only the empty proof is valid and it proves consistency trivially. Otherwise
    :func:`verify_consistency_rfc`. Raises :class:`ConsistencyProofError`.
    """
    if old_size == 0 and new_size >= 0:
        if proof:
            raise ConsistencyProofError(f"proof from size 0 must be empty, got {len(proof)} hashes")
        if not _equal(old_root, EMPTY_ROOT):
            raise ConsistencyProofError(
                f"old root for size 0 must be the empty-tree root {EMPTY_ROOT.hex()}"
            )
        if new_size == 0 and not _equal(new_root, EMPTY_ROOT):
            raise ConsistencyProofError(
                f"new root for size 0 must be the empty-tree root {EMPTY_ROOT.hex()}"
            )
        return
    verify_consistency_rfc(old_size, new_size, old_root, new_root, proof)


def stored_hashes_for_leaf(
    index: int, leaf: bytes, read: HashReader
) -> list[tuple[int, int, bytes]]:
    """The perfect-subtree hashes completed by appending entry ``leaf`` as leaf ``index``.

    Returns ``(level, index, hash)`` triples, level 0 first (the leaf hash itself); each
    further one combines the stored left sibling (read via ``read``) with the one below.
    A store that persists these can answer every :data:`HashReader` call.
    """
    if index < 0:
        raise TranslogError(f"leaf index must be >= 0, got {index}")
    h = leaf_hash(leaf)
    out = [(0, index, h)]
    level, i = 0, index
    while i & 1:
        h = node_hash(read(level, i - 1), h)
        level += 1
        i >>= 1
        out.append((level, i, h))
    return out


class MemoryTree:
    """An append-only Merkle tree held in memory: tests, tools and small logs.

    It stores every perfect-subtree hash by level, so it is its own :data:`HashReader`.
    """

    def __init__(self) -> None:
        self._levels: list[list[bytes]] = []

    @property
    def size(self) -> int:
        return len(self._levels[0]) if self._levels else 0

    def append(self, entry: bytes) -> int:
        """Append ``entry``; return its leaf index."""
        index = self.size
        for level, i, h in stored_hashes_for_leaf(index, entry, self.read):
            if level == len(self._levels):
                self._levels.append([])
            if len(self._levels[level]) != i:  # pragma: no cover - internal invariant
                raise TranslogError(f"stored hash ({level}, {i}) out of order")
            self._levels[level].append(h)
        return index

    def read(self, level: int, index: int) -> bytes:
        """The :data:`HashReader` over this tree's stored hashes."""
        try:
            if level < 0 or index < 0:
                raise IndexError
            return self._levels[level][index]
        except IndexError:
            raise TranslogError(
                f"no stored hash at level {level}, index {index} (tree size {self.size})"
            ) from None

    def root(self, size: int | None = None) -> bytes:
        """Root of the first ``size`` leaves (default: the whole tree)."""
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise TranslogError(f"size must be in [0, {self.size}], got {size}")
        return root_hash(size, self.read)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        size = self.size if size is None else size
        if size > self.size:
            raise InclusionProofError(f"size {size} exceeds tree size {self.size}")
        return inclusion_proof(index, size, self.read)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        new_size = self.size if new_size is None else new_size
        if new_size > self.size:
            raise ConsistencyProofError(f"size {new_size} exceeds tree size {self.size}")
        return consistency_proof(old_size, new_size, self.read)
