"""Offline verification of the real Rekor v1 and v2 staging bundles, and their mutations."""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.errors import HermeticError, RekorEntryError, RekorFormatError
from hermetic.translog.rekor import canonical_json, trusted_logs, verify_rekor_entry

V1 = "rekor-v1-staging.bundle_v3.txt.sigstore.json"
V2 = "rekor-v2-staging.txt.sigstore.json"


def _dir(vectors: Path) -> Path:
    return vectors / "merkle" / "sigstore-real-bundles"


def _load(vectors: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((_dir(vectors) / name).read_text())
    return data


def _root(vectors: Path) -> str:
    return (_dir(vectors) / "staging-trusted_root.json").read_text()


def test_rekor_v1_entry_verifies_with_shard_local_index_and_set(vectors: Path) -> None:
    entry = verify_rekor_entry((_dir(vectors) / V1).read_text(), _root(vectors))
    assert entry.origin == "rekor.sigstage.dev - 8050909264565447525"
    assert (entry.log_index, entry.global_log_index) == (25901137, 25915956)
    assert entry.tree_size == 25901138
    assert entry.integrated_time == 1712085549
    assert (entry.kind, entry.version) == ("hashedrekord", "0.0.1")


def test_rekor_v2_entry_verifies_with_c2sp_checkpoint(vectors: Path) -> None:
    entry = verify_rekor_entry((_dir(vectors) / V2).read_bytes(), _root(vectors))
    assert entry.origin == "log2025-alpha1.rekor.sigstage.dev"
    assert (entry.log_index, entry.tree_size) == (645, 646)
    assert entry.integrated_time is None
    assert (entry.kind, entry.version) == ("hashedrekord", "0.0.2")


def test_logged_digest_is_the_artifacts_sha256(vectors: Path) -> None:
    for bundle, artifact in ((V1, "rekor-v1-staging.bundle_v3.txt"), (V2, "rekor-v2-staging.txt")):
        data = _load(vectors, bundle)
        verify_rekor_entry(data, _root(vectors))
        digest = hashlib.sha256((_dir(vectors) / artifact).read_bytes()).digest()
        assert base64.b64decode(data["messageSignature"]["messageDigest"]["digest"]) == digest


def test_trusted_root_log_ids_match_their_keys(vectors: Path) -> None:
    logs = trusted_logs(_root(vectors))
    assert {log.host for log in logs} >= {
        "rekor.sigstage.dev",
        "log2025-alpha1.rekor.sigstage.dev",
    }


def test_entry_from_a_log_missing_from_the_trusted_root_is_rejected(vectors: Path) -> None:
    root = json.loads(_root(vectors))
    root["tlogs"] = [t for t in root["tlogs"] if "alpha1" not in t["baseUrl"]]
    with pytest.raises(RekorEntryError, match="not a log in the trusted root"):
        verify_rekor_entry(_load(vectors, V2), root)


def test_trusted_root_with_a_mislabeled_log_id_is_rejected(vectors: Path) -> None:
    root = json.loads(_root(vectors))
    for tlog in root["tlogs"]:
        if "alpha1" in tlog["baseUrl"]:
            tlog["baseUrl"] = "https://other.example"
    with pytest.raises(RekorEntryError):
        verify_rekor_entry(_load(vectors, V2), root)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, ("key", key))
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))
    else:
        yield prefix


def _mutations(bundle: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Bundles with one character flipped in one field (or one key renamed)."""
    for section in (("verificationMaterial", "tlogEntries", 0), ("messageSignature",)):
        node: Any = bundle
        for step in section:
            node = node[step]
        for path in _paths(node):
            full = section + path
            if full and isinstance(full[-1], tuple):
                mutated = copy.deepcopy(bundle)
                parent: Any = mutated
                for step in full[:-1]:
                    parent = parent[step]
                key = full[-1][1]
                parent["X" + key[1:]] = parent.pop(key)
                yield f"rename {full}", mutated
                continue
            parent = bundle
            for step in full[:-1]:
                parent = parent[step]
            value = str(parent[full[-1]])
            stride = 1 if len(value) < 400 else 37
            for pos in range(0, len(value), stride):
                flipped = value[:pos] + chr(ord(value[pos]) ^ 1) + value[pos + 1 :]
                mutated = copy.deepcopy(bundle)
                target: Any = mutated
                for step in full[:-1]:
                    target = target[step]
                target[full[-1]] = flipped
                yield f"flip {full} @{pos}", mutated


@pytest.mark.parametrize("name", [V1, V2])
def test_flipping_any_character_of_the_entry_is_rejected(vectors: Path, name: str) -> None:
    bundle = _load(vectors, name)
    root = json.loads(_root(vectors))
    verify_rekor_entry(bundle, root)
    accepted = []
    count = 0
    for label, mutated in _mutations(bundle):
        count += 1
        try:
            verify_rekor_entry(mutated, root)
        except HermeticError:
            continue
        accepted.append(label)
    assert count > 500
    assert accepted == []


def test_unreadable_bundles_are_malformed(vectors: Path) -> None:
    root = _root(vectors)
    for bad in ("", "[]", "{", '{"verificationMaterial": {}}', b"\xff"):
        with pytest.raises(RekorFormatError):
            verify_rekor_entry(bad, root)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), st.binary()))
def test_bundle_parser_only_raises_hermetic_errors(data: str | bytes) -> None:
    with contextlib.suppress(HermeticError):
        verify_rekor_entry(data, '{"tlogs": []}')


def test_canonical_json_sorts_by_utf16_and_escapes_like_es6() -> None:
    value = {"b": 1, "a": [True, None, "x\u2028\n\x01"], "\U0001f600": 0, "\ufb01": 2}
    assert (
        canonical_json(value)
        == ('{"a":[true,null,"x\u2028\\n\\u0001"],"b":1,"\U0001f600":0,"\ufb01":2}').encode()
    )
