"""Deterministic layer archives: the same files always give the same bytes.

A layer is a POSIX tar (pax where a name needs it) written by the standard library with
every varying header normalised: entries sorted by their UTF-8 path, one fixed mtime
(``SOURCE_DATE_EPOCH`` or 0), uid/gid 0, empty user and group names, mode 0644 for files
and 0755 for directories and owner-executable files, and only regular files and the
directories that contain them. So the bytes, and thus the PCRs, depend only on file names,
contents and the executable bit: not on the checkout path, the clock, the umask, the
owner or the file system's directory order (the causes of the irreproducible PCRs users
report against nitro-cli and enclaver). Symlinks, devices, FIFOs and sockets are refused
rather than silently dropped, so an image never differs from its source without an error.

Reading is as strict as writing: a layer must be in this normal form, so a layer that was
not produced this way (path escapes, links, odd owners) is rejected before extraction. The
check is on bytes, not just on what tarfile reports: a layer must be exactly what
:func:`write_layer` emits for the entries it holds. A tar reader silently skips a great deal
(whatever follows the end-of-archive blocks, padding contents, header bytes after a NUL),
and a measured byte that no reader looks at would let two different images share a PCR.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hermetic.errors import AppContentError, LayerFormatError, LayerTrailingDataError

FILE_MODE = 0o644
EXEC_MODE = 0o755
DIR_MODE = 0o755
# Largest mtime a ustar header holds without a pax record (11 octal digits).
MAX_MTIME = 8**11 - 1
# tarfile's layout, which write_layer produces: 512-byte blocks, an archive closed by two
# zero blocks and zero-padded to a whole 20-block record.
BLOCK_SIZE = tarfile.BLOCKSIZE
END_OF_ARCHIVE_SIZE = 2 * tarfile.BLOCKSIZE
RECORD_SIZE = tarfile.RECORDSIZE

IGNORED_DIRS = frozenset(
    {
        "__pycache__",
        ".git",
        ".hg",
        ".svn",
        ".idea",
        ".vscode",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".hypothesis",
        ".venv",
        ".tox",
    }
)
IGNORED_FILES = frozenset({".DS_Store", "Thumbs.db", ".gitignore"})
IGNORED_SUFFIXES = (".pyc", ".pyo", "~", ".swp", ".swo", ".swx", ".orig", ".rej")


@dataclass(frozen=True)
class LayerEntry:
    """One archive member: a regular file (``data`` set) or a directory (``data`` None)."""

    path: str
    mode: int
    data: bytes | None

    @property
    def is_dir(self) -> bool:
        return self.data is None


def is_ignored(name: str) -> bool:
    """Editor, VCS and bytecode files that never belong in an image."""
    if name in IGNORED_FILES or name.endswith(IGNORED_SUFFIXES):
        return True
    return (name.startswith("#") and name.endswith("#")) or name.startswith(".#")


def _check_name(name: str, where: Path) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise AppContentError(f"{where}: file name is not valid UTF-8") from None
    if any(ord(c) < 0x20 or c in "\\\x7f" for c in name):
        raise AppContentError(f"{where}: file name has a control character or backslash")


def scan_tree(
    root: Path,
    *,
    include: Callable[[str], bool] = lambda name: True,
    exclude: Iterable[Path] = (),
    keep_exec_bit: bool = True,
) -> list[LayerEntry]:
    """Collect a directory's files as normalised layer entries (sorted, dirs derived).

    ``include`` sees each file's base name; ``exclude`` lists absolute paths to skip (the
    output file when it lives inside the app). Anything but a regular file or a directory
    raises :class:`AppContentError`.
    """
    skip = {p.resolve() for p in exclude}
    files: list[LayerEntry] = []

    def walk(directory: Path, prefix: str) -> None:
        try:
            children = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise AppContentError(f"{directory}: cannot list directory: {exc.strerror}") from None
        for child in children:
            path = Path(child.path)
            _check_name(child.name, path)
            relative = f"{prefix}{child.name}"
            mode = child.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise AppContentError(
                    f"{path}: symlinks are not allowed in an image (copy the target instead)"
                )
            if stat.S_ISDIR(mode):
                if child.name not in IGNORED_DIRS and path.resolve() not in skip:
                    walk(path, f"{relative}/")
                continue
            if not stat.S_ISREG(mode):
                raise AppContentError(
                    f"{path}: only regular files can go in an image "
                    "(found a device, FIFO or socket)"
                )
            if is_ignored(child.name) or not include(child.name) or path.resolve() in skip:
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise AppContentError(f"{path}: cannot read: {exc.strerror}") from None
            executable = keep_exec_bit and bool(mode & stat.S_IXUSR)
            files.append(LayerEntry(relative, EXEC_MODE if executable else FILE_MODE, data))

    if not root.is_dir():
        raise AppContentError(f"{root}: not a directory")
    walk(root, "")
    return with_directories(files)


def with_directories(files: Sequence[LayerEntry]) -> list[LayerEntry]:
    """Add an entry for every parent directory of a file and sort by UTF-8 path."""
    entries = {f.path: f for f in files}
    for f in files:
        parent = PurePosixPath(f.path).parent
        while parent.as_posix() != ".":
            entries.setdefault(parent.as_posix(), LayerEntry(parent.as_posix(), DIR_MODE, None))
            parent = parent.parent
    return sorted(entries.values(), key=lambda e: e.path.encode("utf-8"))


def write_layer(entries: Sequence[LayerEntry], mtime: int) -> bytes:
    """Serialise entries as a normalised tar; same entries and mtime give the same bytes."""
    if not 0 <= mtime <= MAX_MTIME:
        raise AppContentError(f"SOURCE_DATE_EPOCH must be in 0..{MAX_MTIME}, got {mtime}")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for entry in sorted(entries, key=lambda e: e.path.encode("utf-8")):
            info = tarfile.TarInfo(entry.path)
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = entry.mode
            if entry.data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.type = tarfile.REGTYPE
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    return out.getvalue()


def read_layer(data: bytes, what: str) -> list[LayerEntry]:
    """Parse a layer and check it is in normal form; raise :class:`LayerFormatError`.

    Normal form is byte-exact: after the per-entry checks, the entries are written again
    with :func:`write_layer` and must give back ``data`` itself, so every byte (headers,
    file data, block padding, the two end-of-archive blocks and the record padding) is one
    the writer put there. Anything else is refused with a message naming where it is.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8") as tar:
            members = tar.getmembers()
            entries = [_entry(tar, member, what) for member in members]
    except LayerFormatError:
        raise
    except Exception as exc:  # tarfile raises many types on damaged input
        raise LayerFormatError(
            f"{what}: not a readable tar archive ({type(exc).__name__})"
        ) from None
    paths = [e.path for e in entries]
    if len(set(paths)) != len(paths):
        raise LayerFormatError(f"{what}: an entry appears twice")
    if paths != sorted(paths, key=lambda p: p.encode("utf-8")):
        raise LayerFormatError(f"{what}: entries are not in sorted order")
    mtimes = {m.mtime for m in members}
    if len(mtimes) > 1:
        raise LayerFormatError(f"{what}: entries have different mtimes (not a normalised layer)")
    known_dirs = {e.path for e in entries if e.is_dir}
    for e in entries:
        parent = PurePosixPath(e.path).parent.as_posix()
        if parent != "." and parent not in known_dirs:
            raise LayerFormatError(f"{what}: {e.path!r} has no directory entry for {parent!r}")
    mtime = members[0].mtime if members else 0
    if not isinstance(mtime, int) or not 0 <= mtime <= MAX_MTIME:
        raise LayerFormatError(f"{what}: mtime must be an integer in 0..{MAX_MTIME}, got {mtime}")
    _check_normal_form(data, write_layer(entries, mtime), members, what)
    return entries


def _check_normal_form(
    data: bytes, expected: bytes, members: Sequence[tarfile.TarInfo], what: str
) -> None:
    """Raise unless ``data`` is ``expected`` byte for byte, saying where they part."""
    if data == expected:
        return
    at = _first_difference(data, expected)
    # Up to ``at`` the layer is in normal form, so tarfile's offsets locate ``at`` exactly.
    entries_end = members[-1].offset_data + _padded(members[-1].size) if members else 0
    if at >= entries_end:
        padding_start = entries_end + END_OF_ARCHIVE_SIZE
        if at == len(expected):
            raise LayerTrailingDataError(
                f"{what}: {len(data) - len(expected)} bytes after the end of the archive, which "
                f"must end at byte {len(expected)} (two zero end-of-archive blocks at "
                f"{entries_end}, then zero padding to a {RECORD_SIZE}-byte record); "
                "a tar reader would ignore them"
            )
        if at == len(data):
            raise LayerFormatError(
                f"{what}: ends at byte {len(data)}, but its two zero end-of-archive blocks "
                f"(from byte {entries_end}) and record padding must run to byte {len(expected)}"
            )
        region = (
            f"the end-of-archive blocks (bytes {entries_end}..{padding_start})"
            if at < padding_start
            else f"the record padding (bytes {padding_start}..{len(expected)})"
        )
        raise LayerTrailingDataError(
            f"{what}: byte {at} is {data[at]:#04x} in {region}, which must be zero; "
            "a tar reader would ignore it"
        )
    member = next(m for m in reversed(members) if m.offset <= at)
    if at < member.offset_data:
        raise LayerFormatError(
            f"{what}: the header of {member.name!r} (bytes {member.offset}..{member.offset_data}) "
            f"is not the one the writer emits for it (first difference at byte {at})"
        )
    data_end = member.offset_data + member.size
    if at >= data_end:
        raise LayerFormatError(
            f"{what}: byte {at} is {data[at]:#04x} in the padding after the data of "
            f"{member.name!r} (bytes {data_end}..{member.offset_data + _padded(member.size)}), "
            "which must be zero"
        )
    raise LayerFormatError(
        f"{what}: the data of {member.name!r} differs from its normal form at byte {at}"
    )


def _padded(size: int) -> int:
    return -(-size // BLOCK_SIZE) * BLOCK_SIZE


def _first_difference(a: bytes, b: bytes) -> int:
    """Index of the first byte where ``a`` and ``b`` differ (or the shorter length)."""
    chunk = 1 << 16
    start = 0
    while a[start : start + chunk] == b[start : start + chunk] and start < min(len(a), len(b)):
        start += chunk
    limit = min(len(a), len(b), start + chunk)
    return next((i for i in range(start, limit) if a[i] != b[i]), limit)


def _entry(tar: tarfile.TarFile, member: tarfile.TarInfo, what: str) -> LayerEntry:
    name = member.name.rstrip("/") if member.isdir() else member.name
    path = PurePosixPath(name)
    if (
        not name
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
        or "\\" in name
        or any(ord(c) < 0x20 for c in name)
    ):
        raise LayerFormatError(f"{what}: unsafe entry name {member.name!r}")
    if member.uid != 0 or member.gid != 0 or member.uname or member.gname:
        raise LayerFormatError(f"{what}: {name!r} has an owner (uid/gid/uname/gname not empty)")
    if member.isdir():
        if member.mode != DIR_MODE:
            raise LayerFormatError(
                f"{what}: directory {name!r} has mode {member.mode:o}, expected 755"
            )
        return LayerEntry(name, DIR_MODE, None)
    if not member.isreg():
        raise LayerFormatError(f"{what}: {name!r} is not a regular file or directory")
    if member.mode not in (FILE_MODE, EXEC_MODE):
        raise LayerFormatError(f"{what}: {name!r} has mode {member.mode:o}, expected 644 or 755")
    stream = tar.extractfile(member)
    if stream is None:
        raise LayerFormatError(f"{what}: {name!r} has no data")
    content = stream.read()
    if len(content) != member.size:
        raise LayerFormatError(f"{what}: {name!r} is truncated")
    return LayerEntry(name, member.mode, content)


def extract_entries(entries: Sequence[LayerEntry], dest: Path, *, read_only: bool = False) -> None:
    """Write validated entries under ``dest`` (which must not exist yet or be empty)."""
    if dest.exists() and any(dest.iterdir()):
        raise AppContentError(f"{dest}: extraction target must be empty")
    dest.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    for entry in entries:
        target = dest.joinpath(*entry.path.split("/"))
        if entry.data is None:
            target.mkdir(mode=DIR_MODE, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(entry.data)
        os.chmod(target, entry.mode)
    if read_only:
        for entry in reversed(entries):
            target = dest.joinpath(*entry.path.split("/"))
            os.chmod(target, 0o555 if entry.mode == EXEC_MODE or entry.is_dir else 0o444)
        os.chmod(dest, 0o555)  # noqa: S103 - read-only on purpose, nothing to hide
