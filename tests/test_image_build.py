"""Reproducible hermetic images: same source, same bytes, same PCRs; and a strict reader.

The runtime layer is built from a snapshot of the hermetic package taken once per module,
so colleagues editing the source tree while the tests run cannot make two builds differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermetic.errors import (
    AppContentError,
    HermeticError,
    ImageChecksumError,
    ImageFormatError,
    ImageTruncatedError,
    LayerFormatError,
    SigningKeyError,
)
from hermetic.image import SigningMaterial, build_image, extract, measure_file, open_image
from hermetic.image.archive import LayerEntry, write_layer
from hermetic.image.build import assemble_image, runtime_root
from hermetic.image.imagefile import ImageSections, decode_image, encode_image, parse_image
from test_image_eif import make_signer

ECHO = Path(__file__).resolve().parents[1] / "examples" / "echo"


def tpm_pcr(data: bytes) -> bytes:
    return hashlib.sha384(b"\x00" * 48 + hashlib.sha384(data).digest()).digest()


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("runtime") / "hermetic"
    shutil.copytree(runtime_root(), dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def tiny_runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("tiny") / "hermetic"
    dest.mkdir()
    (dest / "__init__.py").write_text('"""tiny runtime for fuzzing"""\n')
    return dest


@pytest.fixture
def app(tmp_path: Path) -> Path:
    dest = tmp_path / "echo"
    shutil.copytree(ECHO, dest)
    return dest


def _build_in_subprocess(app: Path, out: Path, runtime: Path, umask: int, cwd: Path) -> None:
    code = (
        "import os, sys; os.umask(int(sys.argv[1], 8));"
        "from pathlib import Path;"
        "from hermetic.image.build import build_image;"
        "build_image(sys.argv[2], sys.argv[3], runtime=Path(sys.argv[4]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    result = subprocess.run(
        [sys.executable, "-c", code, oct(umask), str(app), str(out), str(runtime)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_two_builds_in_different_places_times_and_umasks_are_byte_identical(
    tmp_path: Path, runtime: Path
) -> None:
    first = tmp_path / "one" / "echo"
    second = tmp_path / "two" / "deeper" / "echo-copy"
    shutil.copytree(ECHO, first)
    shutil.copytree(ECHO, second)
    # Different mtimes, permission bits (not the executable bit) and editor/bytecode debris.
    for n, path in enumerate(sorted(second.rglob("*"))):
        os.utime(path, (1_000_000 + n, 2_000_000_000 - n))
        path.chmod(0o600 if path.is_file() else 0o700)
    for path in first.rglob("*"):
        if path.is_file():
            path.chmod(0o664)
    (second / "__pycache__").mkdir()
    (second / "__pycache__" / "echo_service.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (second / "echo_service.py~").write_text("backup")
    (second / ".echo_service.py.swp").write_bytes(b"vim swap")

    _build_in_subprocess(first, tmp_path / "one.img", runtime, 0o022, tmp_path / "one")
    _build_in_subprocess(second, tmp_path / "two.img", runtime, 0o077, tmp_path / "two")

    one, two = (tmp_path / "one.img").read_bytes(), (tmp_path / "two.img").read_bytes()
    assert hashlib.sha256(one).hexdigest() == hashlib.sha256(two).hexdigest()
    assert measure_file(tmp_path / "one.img") == measure_file(tmp_path / "two.img")


def test_changing_one_line_of_the_app_changes_pcr0_and_pcr2_but_not_pcr1(
    app: Path, tmp_path: Path, runtime: Path
) -> None:
    before = build_image(app, tmp_path / "a.img", runtime=runtime).measurements
    source = app / "echo_service.py"
    source.write_text(source.read_text().replace("return arg", "return [arg]"))
    after = build_image(app, tmp_path / "b.img", runtime=runtime).measurements
    assert after.pcr1 == before.pcr1
    assert after.pcr0 != before.pcr0
    assert after.pcr2 != before.pcr2


def test_changing_the_runtime_changes_pcr0_and_pcr1_but_not_pcr2(
    app: Path, tmp_path: Path, tiny_runtime: Path, runtime: Path
) -> None:
    full = build_image(app, tmp_path / "a.img", runtime=runtime).measurements
    tiny = build_image(app, tmp_path / "b.img", runtime=tiny_runtime).measurements
    assert (tiny.pcr2, tiny.pcr0 != full.pcr0, tiny.pcr1 != full.pcr1) == (full.pcr2, True, True)


def test_pcrs_are_reproducible_from_the_file_with_hashlib_alone(
    app: Path, tmp_path: Path, runtime: Path
) -> None:
    out = tmp_path / "echo.img"
    measured = build_image(app, out, runtime=runtime).measurements
    data = out.read_bytes()
    # The recipe in docs/images.md: 16-byte header, then 12-byte section headers.
    runtime_size = struct.unpack_from(">Q", data, 16 + 4)[0]
    runtime_layer = data[28 : 28 + runtime_size]
    app_start = 28 + runtime_size + 12
    app_size = struct.unpack_from(">Q", data, app_start - 8)[0]
    app_layer = data[app_start : app_start + app_size]
    assert measured.pcr1 == tpm_pcr(runtime_layer)
    assert measured.pcr2 == tpm_pcr(app_layer)
    # PCR0: each layer behind its section header (u16 type, u16 flags 0, u64 length), which
    # is the file's one byte range from the end of the 16-byte header to the app layer's end.
    layers = b"".join(
        struct.pack(">HHQ", kind, 0, len(layer)) + layer
        for kind, layer in ((1, runtime_layer), (2, app_layer))
    )
    assert layers == data[16 : app_start + app_size]
    assert measured.pcr0 == tpm_pcr(layers)
    assert (measured.service, measured.version, measured.kind) == ("echo", "0.1.0", "hermetic")


def test_layers_are_normalised_tar(app: Path, tmp_path: Path, tiny_runtime: Path) -> None:
    (app / "run.sh").write_text("#!/bin/sh\n")
    (app / "run.sh").chmod(0o700)
    (app / "pkg" / "sub").mkdir(parents=True)
    (app / "pkg" / "sub" / "mod.py").write_text("x = 1\n")
    (app / "empty").mkdir()
    image = open_image(build_image(app, tmp_path / "x.img", runtime=tiny_runtime).path)
    with tarfile.open(fileobj=io.BytesIO(image.app_layer)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "README.md",
        "echo_service.py",
        "hermetic.toml",
        "operator.pub.pem",
        "pkg",
        "pkg/sub",
        "pkg/sub/mod.py",
        "run.sh",
    ]
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 0)
    modes = {m.name: m.mode for m in members}
    assert modes["run.sh"] == 0o755
    assert modes["pkg"] == 0o755
    assert modes["README.md"] == 0o644


def test_source_date_epoch_sets_every_mtime(
    app: Path, tmp_path: Path, tiny_runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = build_image(app, tmp_path / "a.img", runtime=tiny_runtime).measurements
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = build_image(app, tmp_path / "b.img", runtime=tiny_runtime)
    with tarfile.open(fileobj=io.BytesIO(open_image(dated.path).app_layer)) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1700000000}
    assert dated.measurements.pcr2 != plain.pcr2


def test_bad_source_date_epoch_is_rejected(
    app: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(AppContentError, match="SOURCE_DATE_EPOCH"):
        build_image(app, tmp_path / "x.img")


def test_output_inside_the_app_is_not_archived(app: Path, tiny_runtime: Path) -> None:
    first = build_image(app, app / "echo.img", runtime=tiny_runtime)
    second = build_image(app, app / "echo.img", runtime=tiny_runtime)
    assert first.measurements == second.measurements
    assert "echo.img" not in [e.path for e in open_image(app / "echo.img").app_entries()]


def test_symlink_in_app_is_rejected(app: Path, tmp_path: Path) -> None:
    (app / "link.py").symlink_to(app / "echo_service.py")
    with pytest.raises(AppContentError, match="symlink"):
        build_image(app, tmp_path / "x.img")


def test_fifo_in_app_is_rejected(app: Path, tmp_path: Path) -> None:
    os.mkfifo(app / "pipe")
    with pytest.raises(AppContentError, match="regular files"):
        build_image(app, tmp_path / "x.img")


def test_runtime_layer_holds_package_sources_and_boot_descriptor(
    app: Path, tmp_path: Path, runtime: Path
) -> None:
    image = open_image(build_image(app, tmp_path / "x.img", runtime=runtime).path)
    paths = {e.path for e in image.runtime_entries()}
    assert {"hermetic/__init__.py", "hermetic/image/eif.py", "hermetic/py.typed"} <= paths
    assert "hermetic-boot.json" in paths
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in paths)
    assert (image.boot.python, image.boot.boot_module) == ("3.11", "hermetic.enclave")


def test_extract_writes_runtime_and_app(app: Path, tmp_path: Path, tiny_runtime: Path) -> None:
    image = open_image(build_image(app, tmp_path / "x.img", runtime=tiny_runtime).path)
    dest = tmp_path / "root"
    extract(image, dest)
    assert (dest / "app" / "echo_service.py").read_bytes() == (app / "echo_service.py").read_bytes()
    assert (dest / "runtime" / "hermetic" / "__init__.py").is_file()
    assert (dest / "runtime" / "hermetic-boot.json").is_file()
    with pytest.raises(AppContentError, match="empty"):
        extract(image, dest)


def test_extract_read_only(app: Path, tmp_path: Path, tiny_runtime: Path) -> None:
    image = open_image(build_image(app, tmp_path / "x.img", runtime=tiny_runtime).path)
    extract(image, tmp_path / "ro", read_only=True)
    assert (tmp_path / "ro" / "app" / "hermetic.toml").stat().st_mode & 0o777 == 0o444
    for path in (tmp_path / "ro").rglob("*"):
        path.chmod(0o755)  # let pytest clean up
    (tmp_path / "ro").chmod(0o755)


# --- signing -------------------------------------------------------------------------------


def _signer() -> tuple[bytes, bytes, bytes]:
    signer = make_signer(ec.SECP384R1())
    return signer.key_pem, signer.cert_pem, signer.cert_der


def test_signing_sets_pcr8_to_certificate_and_keeps_pcr0(
    app: Path, tmp_path: Path, tiny_runtime: Path
) -> None:
    key_pem, cert_pem, cert_der = _signer()
    unsigned = build_image(app, tmp_path / "u.img", runtime=tiny_runtime).measurements
    signed = build_image(
        app, tmp_path / "s.img", runtime=tiny_runtime, signing=SigningMaterial(key_pem, cert_pem)
    ).measurements
    assert signed.pcr8 == tpm_pcr(cert_der)
    assert (signed.pcr0, signed.pcr1, signed.pcr2) == (unsigned.pcr0, unsigned.pcr1, unsigned.pcr2)
    assert unsigned.pcr8 is None
    assert measure_file(tmp_path / "s.img") == signed
    # The section is nitro-cli's: a list of maps whose byte strings are arrays of uints.
    section = decode_image((tmp_path / "s.img").read_bytes()).signature
    assert section is not None
    (entry,) = cbor2.loads(section)
    assert bytes(entry["signing_certificate"]) == cert_pem
    assert isinstance(entry["signature"], list)


def test_signature_over_other_image_is_rejected(
    app: Path, tmp_path: Path, tiny_runtime: Path
) -> None:
    key_pem, cert_pem, _ = _signer()
    signing = SigningMaterial(key_pem, cert_pem)
    signed = decode_image(
        build_image(
            app, tmp_path / "s.img", runtime=tiny_runtime, signing=signing
        ).path.read_bytes()
    )
    (app / "hermetic.toml").write_text(
        (app / "hermetic.toml").read_text().replace("cpus = 2", "cpus = 4")
    )
    other = decode_image(
        build_image(app, tmp_path / "o.img", runtime=tiny_runtime).path.read_bytes()
    )
    forged = ImageSections(other.runtime_layer, other.app_layer, other.metadata, signed.signature)
    from hermetic.errors import ImageSignatureError

    with pytest.raises(ImageSignatureError, match="PCR0"):
        parse_image(encode_image(forged))


def test_signing_key_must_match_certificate_and_be_ecdsa(app: Path, tmp_path: Path) -> None:
    key_pem, _, _ = _signer()
    _, other_cert, _ = _signer()
    with pytest.raises(SigningKeyError, match="does not match"):
        build_image(app, tmp_path / "x.img", signing=SigningMaterial(key_pem, other_cert))
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(SigningKeyError, match="ECDSA"):
        build_image(app, tmp_path / "x.img", signing=SigningMaterial(ed, other_cert))


# --- the reader rejects damaged or non-normalised images ----------------------------------


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory, tiny_runtime: Path) -> bytes:
    data, _, _ = assemble_image(ECHO, runtime=tiny_runtime, epoch=0)
    return data


def test_truncated_image_is_rejected(small_image: bytes) -> None:
    for cut in (4, 20, 40, len(small_image) - 1):
        with pytest.raises(ImageTruncatedError):
            parse_image(small_image[:cut])


def test_bad_crc_is_rejected(small_image: bytes) -> None:
    data = bytearray(small_image)
    data[100] ^= 0x40
    with pytest.raises(ImageChecksumError):
        parse_image(bytes(data))


def test_bad_magic_is_rejected(small_image: bytes) -> None:
    with pytest.raises(ImageFormatError, match="magic"):
        parse_image(b"XRMTIMG\n" + small_image[8:])


def test_metadata_disagreeing_with_measured_manifest_is_rejected(small_image: bytes) -> None:
    sections = decode_image(small_image)
    lying = sections.metadata.replace(b'"ImageName":"echo"', b'"ImageName":"bank"')
    with pytest.raises(ImageFormatError, match="ImageName"):
        parse_image(
            encode_image(ImageSections(sections.runtime_layer, sections.app_layer, lying, None))
        )


def test_layer_with_owner_or_escape_is_rejected(small_image: bytes) -> None:
    sections = decode_image(small_image)
    for name, uid in (("../evil", 0), ("ok.txt", 1000)):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(name)
            info.uid, info.mode, info.size = uid, 0o644, 1
            tar.addfile(info, io.BytesIO(b"x"))
        image = encode_image(ImageSections(sections.runtime_layer, out.getvalue(), b"{}", None))
        with pytest.raises(LayerFormatError):
            parse_image(image)


def test_same_entries_give_same_layer_bytes_in_any_input_order() -> None:
    entries = [LayerEntry("b", 0o644, b"2"), LayerEntry("a", 0o644, b"1")]
    assert write_layer(entries, 0) == write_layer(list(reversed(entries)), 0)


_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=1024))
def test_arbitrary_bytes_raise_only_hermetic_errors(data: bytes) -> None:
    for candidate in (data, b"HRMTIMG\n" + data):
        with contextlib.suppress(HermeticError):
            parse_image(candidate)


@_FUZZ
@given(data=st.data())
def test_mutated_image_raises_only_hermetic_errors(small_image: bytes, data: st.DataObject) -> None:
    image = bytearray(small_image)
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, len(image) - 5))
        image[position] = data.draw(st.integers(0, 255))
    body = bytes(image[:-4])
    fixed = body + struct.pack(">I", zlib.crc32(body))  # reach past the CRC check
    for candidate in (bytes(image), fixed):
        with contextlib.suppress(HermeticError):
            parse_image(candidate)


@_FUZZ
@given(data=st.data())
def test_bytes_inserted_into_a_layer_are_never_accepted(
    small_image: bytes, data: st.DataObject
) -> None:
    # Section sizes and the CRC are rewritten, so only the layer reader stands in the way:
    # trailing bytes, bytes in padding or between entries, anywhere in either layer.
    sections = decode_image(small_image)
    which = data.draw(st.sampled_from(["runtime_layer", "app_layer"]))
    layer = bytearray(getattr(sections, which))
    at = data.draw(st.one_of(st.just(len(layer)), st.integers(0, len(layer))))
    layer[at:at] = data.draw(st.one_of(st.binary(min_size=1, max_size=1024), st.just(bytes(512))))
    with pytest.raises(HermeticError):
        parse_image(encode_image(dataclasses.replace(sections, **{which: bytes(layer)})))


def _docs_block(language: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "images.md").read_text()
    start = text.index(f"```{language}\nIMG=" if language == "sh" else f"```{language}\n")
    body = text[start:].split("\n", 1)[1]
    return body[: body.index("```")]


@pytest.mark.skipif(shutil.which("xxd") is None, reason="the shell recipe needs xxd")
def test_shell_recipe_in_docs_reproduces_the_pcrs(app: Path, tmp_path: Path, runtime: Path) -> None:
    m = build_image(app, tmp_path / "echo.img", runtime=runtime).measurements
    result = subprocess.run(
        ["bash", "-c", _docs_block("sh")], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "PCR0",
        m.pcr0.hex(),
        "PCR1",
        m.pcr1.hex(),
        "PCR2",
        m.pcr2.hex(),
    ]


def test_python_recipe_in_docs_reproduces_the_pcrs(
    app: Path,
    tmp_path: Path,
    runtime: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    m = build_image(app, tmp_path / "echo.img", runtime=runtime).measurements
    monkeypatch.chdir(tmp_path)
    exec(compile(_docs_block("python"), "docs/images.md", "exec"), {})
    out = capsys.readouterr().out.split()
    assert out == ["PCR0", m.pcr0.hex(), "PCR1", m.pcr1.hex(), "PCR2", m.pcr2.hex()]
