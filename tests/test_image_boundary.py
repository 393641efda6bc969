"""Layer boundaries: two different images never share a PCR0.

Format version 1 hashed the runtime layer and the app layer back to back into PCR0, and its
reader stopped at each tar's end-of-archive blocks. So moving a file from the head of the
app layer onto the tail of the runtime layer gave a different image that still parsed, with
the same PCR0: a KMS key policy pinning only ImageSha384 (PCR0), as AWS's examples do, would
have released its keys to it. These tests build that attack byte by byte, as an attacker
would, and check each defence on its own: PCR0 commits to where each layer ends, and the
reader refuses every byte a tar reader would skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hermetic.errors import (
    ImageFormatError,
    ImageVersionError,
    LayerFormatError,
    LayerTrailingDataError,
)
from hermetic.image.archive import FILE_MODE, LayerEntry, read_layer, write_layer
from hermetic.image.build import assemble_image, runtime_root
from hermetic.image.imagefile import (
    FORMAT_VERSION,
    ImageSections,
    decode_image,
    encode_image,
    measure_sections,
    parse_image,
)

ECHO = Path(__file__).resolve().parents[1] / "examples" / "echo"
BLOCK = 512
RECORD = 20 * BLOCK


def tpm_pcr(data: bytes) -> bytes:
    return hashlib.sha384(bytes(48) + hashlib.sha384(data).digest()).digest()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The echo example on a snapshot of the real runtime (others may be editing the tree)."""
    runtime = tmp_path_factory.mktemp("runtime") / "hermetic"
    shutil.copytree(runtime_root(), runtime, ignore=shutil.ignore_patterns("__pycache__"))
    data, _, _ = assemble_image(ECHO, runtime=runtime, epoch=0)
    return data


def _members(layer: bytes) -> list[tarfile.TarInfo]:
    """What a plain tar reader (the only check format version 1 made) finds in a layer."""
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:") as tar:
        return tar.getmembers()


def _names(layer: bytes) -> list[str]:
    return [m.name for m in _members(layer)]


def _pcr0(runtime_layer: bytes, app_layer: bytes) -> bytes:
    pcr0, _, _, _ = measure_sections(ImageSections(runtime_layer, app_layer, b"{}", None), ())
    return pcr0


def _with_layers(image: bytes, runtime_layer: bytes, app_layer: bytes) -> bytes:
    """The image with its layers replaced, section sizes and CRC rewritten to match."""
    metadata = decode_image(image).metadata
    return encode_image(ImageSections(runtime_layer, app_layer, metadata, None))


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _entries_end(layer: bytes) -> int:
    last = _members(layer)[-1]
    return last.offset_data + _padded(last.size)


def _ignored_offsets(layer: bytes) -> list[int]:
    """Offsets a tar reader never interprets: file padding, end blocks, record padding."""
    offsets: list[int] = []
    for m in _members(layer):
        offsets += range(m.offset_data + m.size, m.offset_data + _padded(m.size))
    return offsets + list(range(_entries_end(layer), len(layer)))


# --- the attack across the boundary ------------------------------------------------------


def test_moving_the_first_app_file_onto_the_runtime_tail_is_rejected_and_changes_pcr0(
    image: bytes,
) -> None:
    sections = decode_image(image)
    runtime, app = sections.runtime_layer, sections.app_layer
    moved = _members(app)[1].offset  # README.md, sorted first: header, data, padding
    crafted_runtime, crafted_app = runtime + app[:moved], app[moved:]
    # The attack is real: version 1's PCR0 input is unchanged, and a tar reader sees the
    # same runtime and an app without README.md (still a valid app: it keeps its manifest).
    assert crafted_runtime + crafted_app == runtime + app
    assert tpm_pcr(crafted_runtime + crafted_app) == tpm_pcr(runtime + app)
    assert _names(crafted_runtime) == _names(runtime)
    assert _names(crafted_app) == [n for n in _names(app) if n != "README.md"]
    assert "hermetic.toml" in _names(crafted_app)

    # Defence 1: PCR0 commits to the boundary, so the crafted layers measure differently.
    assert _pcr0(crafted_runtime, crafted_app) != parse_image(image).measurements.pcr0
    # Defence 2: the runtime layer's tail is bytes after its end, refused by type.
    crafted = _with_layers(image, crafted_runtime, crafted_app)
    with pytest.raises(
        LayerTrailingDataError,
        match=f"runtime layer: {moved} bytes after the end of the archive, which must end "
        f"at byte {len(runtime)}",
    ):
        parse_image(crafted)
    # And the shortened app layer no longer has the record padding the writer emits.
    with pytest.raises(LayerFormatError, match="app layer: ends at byte"):
        read_layer(crafted_app, "app layer")


def test_moving_the_last_runtime_file_onto_the_app_head_is_rejected_and_changes_pcr0(
    image: bytes,
) -> None:
    sections = decode_image(image)
    runtime, app = sections.runtime_layer, sections.app_layer
    last = _members(runtime)[-1]
    crafted_runtime, crafted_app = runtime[: last.offset], runtime[last.offset :] + app
    assert crafted_runtime + crafted_app == runtime + app
    # A tar reader sees the runtime without its last file, and the app as that file alone
    # (the real app now hides behind the runtime's end-of-archive blocks).
    assert _names(crafted_runtime) == _names(runtime)[:-1]
    assert _names(crafted_app) == [last.name]

    assert _pcr0(crafted_runtime, crafted_app) != parse_image(image).measurements.pcr0
    with pytest.raises(LayerFormatError, match="runtime layer: ends at byte"):
        parse_image(_with_layers(image, crafted_runtime, crafted_app))
    with pytest.raises(LayerFormatError, match="app layer"):
        read_layer(crafted_app, "app layer")


def test_a_runtime_file_moved_onto_the_app_head_hides_the_app_and_is_rejected() -> None:
    # Layers whose moved file stays a valid entry on its own, so only the tail gives it away.
    runtime = write_layer(
        [LayerEntry("a.txt", FILE_MODE, b"a"), LayerEntry("b.txt", FILE_MODE, b"b")], 0
    )
    app = write_layer([LayerEntry("c.txt", FILE_MODE, b"c" * 700)], 0)
    moved = _members(runtime)[1].offset
    crafted_runtime, crafted_app = runtime[:moved], runtime[moved:] + app
    assert _names(crafted_app) == ["b.txt"]  # c.txt is behind the end-of-archive blocks
    assert _pcr0(crafted_runtime, crafted_app) != _pcr0(runtime, app)
    # The moved file's own record padding would have to be zero up to byte 10240, but the
    # real app's first header now starts inside it.
    hidden_at = len(runtime) - moved
    with pytest.raises(
        LayerTrailingDataError, match=f"app layer: byte {hidden_at} is 0x63 in the record padding"
    ):
        read_layer(crafted_app, "app layer")
    with pytest.raises(LayerFormatError, match="runtime layer: ends at byte 1024"):
        read_layer(crafted_runtime, "runtime layer")


def test_a_file_moved_between_well_formed_layers_is_accepted_and_changes_every_pcr(
    image: bytes,
) -> None:
    # The honest version of the move: both layers rewritten in normal form. The reader
    # accepts it, so PCR0 alone must tell the two images apart.
    sections = decode_image(image)
    runtime = read_layer(sections.runtime_layer, "runtime layer")
    app = read_layer(sections.app_layer, "app layer")
    readme = next(e for e in app if e.path == "README.md")
    moved = _with_layers(
        image,
        write_layer([*runtime, readme], 0),
        write_layer([e for e in app if e is not readme], 0),
    )
    before, after = parse_image(image).measurements, parse_image(moved).measurements
    assert after.pcr0 != before.pcr0
    assert (after.pcr1 != before.pcr1, after.pcr2 != before.pcr2) == (True, True)


_LAYER_ENTRIES = st.dictionaries(
    st.text(alphabet="abcdefgh", min_size=1, max_size=8), st.binary(max_size=1500), max_size=4
).map(lambda files: [LayerEntry(name, FILE_MODE, data) for name, data in files.items()])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runtime_entries=_LAYER_ENTRIES, app_entries=_LAYER_ENTRIES, data=st.data())
def test_every_other_split_of_two_layers_is_rejected_and_measures_differently(
    runtime_entries: list[LayerEntry], app_entries: list[LayerEntry], data: st.DataObject
) -> None:
    runtime, app = write_layer(runtime_entries, 0), write_layer(app_entries, 0)
    joined = runtime + app
    # Entry and block boundaries are where a split could look plausible; any byte may do.
    boundaries = [m.offset for m in _members(runtime)] + [
        len(runtime) + m.offset for m in _members(app)
    ]
    boundaries += range(0, len(joined) + 1, BLOCK)
    split = data.draw(st.one_of(st.sampled_from(boundaries), st.integers(0, len(joined))))
    assume(split != len(runtime))
    left, right = joined[:split], joined[split:]
    assert _pcr0(left, right) != _pcr0(runtime, app)
    rejected = 0
    for part, what in ((left, "runtime layer"), (right, "app layer")):
        try:
            read_layer(part, what)
        except LayerFormatError:
            rejected += 1
    assert rejected >= 1


# --- bytes a tar reader skips -------------------------------------------------------------


@pytest.mark.parametrize("which", ["runtime", "app"])
@pytest.mark.parametrize(
    "extra",
    [
        b"\x00" * BLOCK,  # one more zero block than the writer emits
        b"\x00" * RECORD,  # a whole extra record of zeros
        b"x",
        write_layer([LayerEntry("hidden.py", FILE_MODE, b"import os\n")], 0),  # a whole tar
    ],
    ids=["zero-block", "zero-record", "one-byte", "hidden-tar"],
)
def test_rejects_bytes_after_an_archive_end(image: bytes, which: str, extra: bytes) -> None:
    sections = decode_image(image)
    runtime, app = sections.runtime_layer, sections.app_layer
    if which == "runtime":
        runtime += extra
    else:
        app += extra
    with pytest.raises(
        LayerTrailingDataError, match=f"{which} layer: {len(extra)} bytes after the end"
    ):
        parse_image(_with_layers(image, runtime, app))


@pytest.mark.parametrize(
    ("where", "region"),
    [(0, "end-of-archive blocks"), (BLOCK + 7, "end-of-archive blocks"), (1024, "record padding")],
)
def test_rejects_nonzero_bytes_in_the_end_blocks_and_record_padding(
    image: bytes, where: int, region: str
) -> None:
    sections = decode_image(image)
    app = bytearray(sections.app_layer)
    at = _entries_end(bytes(app)) + where
    app[at] = 0x41
    # A tar reader does not notice: same entries as before.
    assert _names(bytes(app)) == _names(sections.app_layer)
    with pytest.raises(
        LayerTrailingDataError, match=f"app layer: byte {at} is 0x41 in the {region}"
    ):
        parse_image(_with_layers(image, sections.runtime_layer, bytes(app)))


def test_rejects_nonzero_padding_after_file_data(image: bytes) -> None:
    sections = decode_image(image)
    app = bytearray(sections.app_layer)
    readme = _members(bytes(app))[0]
    at = readme.offset_data + readme.size  # 452 bytes of data, then zero padding to 512
    app[at] = 0x7F
    assert read_layer(sections.app_layer, "app layer")[0].path == "README.md"
    with pytest.raises(
        LayerFormatError,
        match=f"app layer: byte {at} is 0x7f in the padding after the data of 'README.md'",
    ):
        read_layer(bytes(app), "app layer")


def test_rejects_layer_without_the_writers_record_padding(image: bytes) -> None:
    app = decode_image(image).app_layer
    end = _entries_end(app)
    for cut in (end, end + BLOCK, end + 2 * BLOCK, len(app) - BLOCK):
        with pytest.raises(LayerFormatError, match=f"app layer: ends at byte {cut}"):
            read_layer(app[:cut], "app layer")


def test_rejects_header_bytes_a_tar_reader_ignores(image: bytes) -> None:
    app = bytearray(decode_image(image).app_layer)
    app[50:56] = b"HIDDEN"  # after the NUL that ends "README.md" in the name field
    app[148:156] = b" " * 8
    app[148:155] = b"%06o\x00" % sum(app[:BLOCK])  # a valid header checksum again
    assert _names(bytes(app))[0] == "README.md"
    with pytest.raises(
        LayerFormatError,
        match="app layer: the header of 'README.md' .* not the one the writer emits for it "
        r"\(first difference at byte 50\)",
    ):
        read_layer(bytes(app), "app layer")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(["runtime", "app"]), extra=st.binary(min_size=1, max_size=3000))
def test_random_bytes_after_a_layer_are_rejected(image: bytes, which: str, extra: bytes) -> None:
    sections = decode_image(image)
    runtime, app = sections.runtime_layer, sections.app_layer
    if which == "runtime":
        runtime += extra
    else:
        app += extra
    with pytest.raises(LayerTrailingDataError, match=f"{which} layer: {len(extra)} bytes after"):
        parse_image(_with_layers(image, runtime, app))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_change_to_padding_a_tar_reader_skips_is_rejected(
    image: bytes, data: st.DataObject
) -> None:
    original = decode_image(image).app_layer
    ignored = _ignored_offsets(original)
    end = _entries_end(original)
    layer = bytearray(original)
    changed = data.draw(st.lists(st.sampled_from(ignored), min_size=1, max_size=4, unique=True))
    for at in changed:
        layer[at] = data.draw(st.integers(1, 255))
    # Mostly invisible to a tar reader; bytes written into the first end block can make
    # Python's tarfile read a member there (seen in CI: '\udc80\udc81\udcff'). Visible or
    # not, the layer must be refused.
    invisible = _names(bytes(layer)) == _names(original)
    trailing = invisible and min(changed) >= end
    expected = LayerTrailingDataError if trailing else LayerFormatError
    with pytest.raises(expected):
        read_layer(bytes(layer), "app layer")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_change_to_a_layer_is_rejected_or_changes_what_it_holds(
    image: bytes, data: st.DataObject
) -> None:
    original = decode_image(image).app_layer
    positions = st.one_of(
        st.integers(0, len(original) - 1), st.sampled_from(_ignored_offsets(original))
    )
    layer = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        at = min(data.draw(positions), len(layer))
        op = data.draw(st.sampled_from(["set", "insert", "delete", "append"]))
        if op == "set" and at < len(layer):
            layer[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            layer[at:at] = data.draw(st.binary(min_size=1, max_size=600))
        elif op == "delete":
            del layer[at : at + data.draw(st.integers(1, 600))]
        else:
            layer += data.draw(st.binary(min_size=1, max_size=600))
    assume(bytes(layer) != original)
    accepted = None
    with contextlib.suppress(LayerFormatError):
        accepted = read_layer(bytes(layer), "app layer")
    if accepted is not None:
        # Accepted bytes are the normal form of what they hold: a different layer.
        mtimes = {m.mtime for m in _members(bytes(layer))}
        assert (accepted, mtimes) != (read_layer(original, "app layer"), {0})


# --- the old format -----------------------------------------------------------------------


def _as_version(image: bytes, version: int) -> bytes:
    """The same file with another format version in its header (CRC rewritten)."""
    body = bytearray(image[:-4])
    struct.pack_into(">H", body, 8, version)
    return bytes(body) + struct.pack(">I", zlib.crc32(body))


def test_refuses_a_version_1_image_and_says_to_rebuild(image: bytes) -> None:
    # Version 1 had this very layout; only its PCR0 (the layers back to back) differed.
    assert FORMAT_VERSION == 2
    old = _as_version(image, 1)
    with pytest.raises(ImageVersionError, match="rebuild the image with `hermetic build`"):
        parse_image(old)
    with pytest.raises(ImageFormatError, match="format version 1 is no longer accepted"):
        decode_image(old)


@pytest.mark.parametrize("version", [0, 3, 0xFFFF])
def test_refuses_an_unknown_format_version(image: bytes, version: int) -> None:
    with pytest.raises(ImageVersionError, match=f"format version must be 2, got {version}"):
        parse_image(_as_version(image, version))
