"""Building images: the reproducible hermetic image, and an EIF through nitro-cli.

``build_image`` is a pure function of three inputs: the hermetic runtime's source files,
the app directory's files (names, contents, executable bits) and ``SOURCE_DATE_EPOCH``
(0 when unset). Nothing about the build machine (path, clock, umask, owner, Python patch
level) reaches the bytes, so anyone holding the same source gets the same PCR0.

The runtime layer is the ``hermetic`` package as installed (``*.py`` plus the package data
``py.typed``, ``*.pem`` and ``*.json``, mirroring pyproject's package-data) under
``hermetic/``, plus a boot descriptor naming the Python version the runtime targets and
the module that boots the app. The Python version is the project's target, not the
builder's interpreter, so building with another Python does not change PCR1.

For real Nitro hardware, ``build_eif`` writes a Docker build context (runtime, app,
Dockerfile) and hands it to ``nitro-cli build-enclave``; the EIF's PCRs come from
nitro-cli's kernel and the container's root file system, so they are only as reproducible
as the base image (pin it by digest).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import hermetic
from hermetic.enclave.manifest import Manifest, load_manifest
from hermetic.errors import AppContentError, EIFBuildError, ImageFileError, NitroCliNotFoundError
from hermetic.image.archive import (
    FILE_MODE,
    LayerEntry,
    extract_entries,
    scan_tree,
    with_directories,
    write_layer,
)
from hermetic.image.eif import read_eif_file
from hermetic.image.imagefile import (
    BOOT_DESCRIPTOR,
    BootDescriptor,
    ImageSections,
    encode_image,
    measure_sections,
)
from hermetic.image.pcrs import Measurements
from hermetic.image.signing import PcrSignature, encode_signature_section, sign_pcr0

RUNTIME_PYTHON = "3.11"
BOOT_MODULE = "hermetic.enclave"
RUNTIME_DATA_SUFFIXES = (".py", ".pem", ".json")
DEFAULT_BASE_IMAGE = "python:3.11-slim"


@dataclass(frozen=True)
class SigningMaterial:
    """PEM private key and certificate for ``--sign-key`` / ``--sign-cert``."""

    key_pem: bytes
    cert_pem: bytes


@dataclass(frozen=True)
class BuildResult:
    path: Path
    size: int
    manifest: Manifest
    measurements: Measurements


def source_date_epoch(environ: dict[str, str] | None = None) -> int:
    """``SOURCE_DATE_EPOCH`` as an int (0 when unset), per reproducible-builds.org."""
    value = (os.environ if environ is None else environ).get("SOURCE_DATE_EPOCH", "")
    if not value:
        return 0
    if not value.isascii() or not value.isdigit():
        raise AppContentError(f"SOURCE_DATE_EPOCH must be a non-negative integer, got {value!r}")
    return int(value)


def runtime_root() -> Path:
    """The installed ``hermetic`` package directory (the runtime layer's source)."""
    return Path(hermetic.__file__).resolve().parent


def runtime_entries(root: Path | None = None) -> list[LayerEntry]:
    """The runtime layer's entries: the package's files under ``hermetic/`` and the boot file."""
    source = runtime_root() if root is None else root

    def include(name: str) -> bool:
        return name == "py.typed" or name.endswith(RUNTIME_DATA_SUFFIXES)

    package = scan_tree(source, include=include, keep_exec_bit=False)
    files = [
        LayerEntry(f"hermetic/{e.path}", FILE_MODE, e.data) for e in package if e.data is not None
    ]
    boot = BootDescriptor(format=1, python=RUNTIME_PYTHON, boot_module=BOOT_MODULE)
    files.append(LayerEntry(BOOT_DESCRIPTOR, FILE_MODE, boot.to_bytes()))
    return with_directories(files)


def image_metadata(manifest: Manifest, epoch: int) -> bytes:
    """The unmeasured metadata section (EIF-style names, stable key order)."""
    body = {
        "ImageName": manifest.name,
        "ImageVersion": manifest.version,
        "BuildMetadata": {
            "BuildTool": "hermetic",
            "BuildToolVersion": hermetic.__version__,
            "SourceDateEpoch": epoch,
            "RuntimePython": RUNTIME_PYTHON,
        },
        "Manifest": manifest.summary(),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def assemble_image(
    appdir: str | Path,
    *,
    signing: SigningMaterial | None = None,
    epoch: int | None = None,
    runtime: Path | None = None,
    exclude: tuple[Path, ...] = (),
) -> tuple[bytes, Manifest, Measurements]:
    """Build the image bytes in memory; see :func:`build_image`."""
    app_root = Path(appdir)
    manifest = load_manifest(app_root)
    mtime = source_date_epoch() if epoch is None else epoch
    runtime_layer = write_layer(runtime_entries(runtime), mtime)
    app_layer = write_layer(scan_tree(app_root, exclude=exclude), mtime)
    unsigned = ImageSections(runtime_layer, app_layer, image_metadata(manifest, mtime), None)
    pcr0, pcr1, pcr2, _ = measure_sections(unsigned, ())
    signature_section = None
    signatures: tuple[PcrSignature, ...] = ()
    if signing is not None:
        signature = sign_pcr0(pcr0, signing.key_pem, signing.cert_pem)
        signatures = (signature,)
        signature_section = encode_signature_section(signatures)
    sections = ImageSections(runtime_layer, app_layer, unsigned.metadata, signature_section)
    _, _, _, pcr8 = measure_sections(sections, signatures)
    measurements = Measurements("hermetic", pcr0, pcr1, pcr2, pcr8, manifest.name, manifest.version)
    return encode_image(sections), manifest, measurements


def build_image(
    appdir: str | Path,
    output: str | Path,
    *,
    signing: SigningMaterial | None = None,
    epoch: int | None = None,
    runtime: Path | None = None,
) -> BuildResult:
    """Build ``appdir`` into a hermetic image at ``output`` (written atomically).

    ``epoch`` defaults to ``SOURCE_DATE_EPOCH`` (or 0); ``runtime`` to the installed
    hermetic package. The output file is never itself archived, even inside ``appdir``.
    """
    out = Path(output)
    data, manifest, measurements = assemble_image(
        appdir, signing=signing, epoch=epoch, runtime=runtime, exclude=(out,)
    )
    write_atomically(out, data)
    return BuildResult(out, len(data), manifest, measurements)


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ImageFileError(f"{path}: cannot write image: {exc.strerror}") from None


# --- EIF via nitro-cli --------------------------------------------------------------------


def dockerfile(manifest: Manifest, base_image: str) -> str:
    """A Dockerfile that runs the hermetic runtime with the app, as PID 1 in the enclave."""
    return "\n".join(
        [
            "# Generated by `hermetic build --eif`. The enclave's PCR2 measures this image's",
            "# root file system: pin the base image by digest for a reproducible PCR0.",
            f"FROM {base_image}",
            "ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 \\",
            "    PYTHONPATH=/opt/hermetic/runtime",
            "COPY requirements.lock /opt/hermetic/requirements.lock",
            "RUN python -m pip install --no-cache-dir --require-hashes --no-deps \\",
            "    -r /opt/hermetic/requirements.lock",
            "COPY runtime/ /opt/hermetic/runtime/",
            "COPY app/ /opt/hermetic/app/",
            "WORKDIR /opt/hermetic/app",
            'CMD ["python", "-c", "import sys, hermetic.enclave as e; '
            "sys.exit(e.main('/opt/hermetic/app'))\"]",
            f"LABEL org.opencontainers.image.title={json.dumps(manifest.name)} \\",
            f"      org.opencontainers.image.version={json.dumps(manifest.version)}",
            "",
        ]
    )


def write_docker_context(
    appdir: str | Path,
    context: Path,
    *,
    base_image: str = DEFAULT_BASE_IMAGE,
    exclude: tuple[Path, ...] = (),
) -> tuple[Path, Manifest]:
    """Write runtime, app, lock and Dockerfile into ``context`` (replaced if present)."""
    app_root = Path(appdir)
    manifest = load_manifest(app_root)
    if context.exists():
        shutil.rmtree(context)
    context.mkdir(parents=True)
    extract_entries(runtime_entries(), context / "runtime")
    extract_entries(scan_tree(app_root, exclude=(context, *exclude)), context / "app")
    lock = runtime_root().parents[1] / "requirements.lock"
    (context / "requirements.lock").write_bytes(lock.read_bytes() if lock.is_file() else b"")
    path = context / "Dockerfile"
    path.write_text(dockerfile(manifest, base_image))
    return path, manifest


def build_eif(
    appdir: str | Path,
    output: str | Path,
    *,
    signing_paths: tuple[Path, Path] | None = None,
    base_image: str = DEFAULT_BASE_IMAGE,
    nitro_cli: str | None = None,
) -> Measurements:
    """Build an EIF with nitro-cli; check its PCRs against our own reading of the file.

    ``signing_paths`` is (key, certificate) passed to nitro-cli. Without nitro-cli on PATH
    this raises :class:`NitroCliNotFoundError` naming the generated Dockerfile.
    """
    out = Path(output)
    context = out.with_name(f"{out.name}.docker")
    docker_file, manifest = write_docker_context(
        appdir, context, base_image=base_image, exclude=(out,)
    )
    tool = nitro_cli or shutil.which("nitro-cli")
    if tool is None:
        raise NitroCliNotFoundError(
            f"nitro-cli is not installed (not on PATH), so no EIF was built; the generated "
            f"Dockerfile is {docker_file} (run `nitro-cli build-enclave --docker-dir {context} "
            f"--docker-uri hermetic-{manifest.name}:{manifest.version} --output-file {out}` where "
            "nitro-cli is installed)"
        )
    command = [
        tool,
        "build-enclave",
        "--docker-dir",
        str(context),
        "--docker-uri",
        f"hermetic-{manifest.name}:{manifest.version}",
        "--output-file",
        str(out),
    ]
    if signing_paths is not None:
        key, cert = signing_paths
        command += ["--private-key", str(key), "--signing-certificate", str(cert)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise EIFBuildError(f"cannot run {tool}: {exc.strerror}") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise EIFBuildError(f"nitro-cli build-enclave exited with {result.returncode}: {last}")
    measured = read_eif_file(out).measurements
    reported = _reported_pcrs(result.stdout)
    ours = measured.to_nitro_json()
    for name, value in reported.items():
        if ours.get(name) != value:
            raise EIFBuildError(
                f"nitro-cli reported {name}={value} but the EIF file measures {ours.get(name)}"
            )
    return measured


def _reported_pcrs(stdout: str) -> dict[str, str]:
    try:
        value = json.loads(stdout)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    inner = value.get("Measurements", value)
    if not isinstance(inner, dict):
        return {}
    return {k: v for k, v in inner.items() if k.startswith("PCR") and isinstance(v, str)}
