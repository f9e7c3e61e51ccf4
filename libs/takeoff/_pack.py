"""Packing a directory into the code tarball of a job version.

The tarball holds what git would track: ``.gitignore`` rules apply (in every directory, as git reads
them), a ``.takeoffignore`` beside one adds rules or overrides them (``!data/small.csv``), and ``.git`` is
never packed. Regular files and symlinks are packed; sockets, fifos and devices are skipped.

The archive is deterministic: the same files give the same bytes, hence the same sha256, so the registry
stores unchanged code once and an unchanged job version is recognised as such. Entries are sorted and
carry a fixed time, owner and a permission normalised to 0644 or 0755.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import pathspec

IGNORE_FILES = (".gitignore", ".takeoffignore")
NEVER_PACKED = ".git"
# 2000-01-01 UTC, not the epoch: zip-based tools (building a wheel from the code) refuse pre-1980 times.
FIXED_MTIME = 946_684_800


class PackError(Exception):
    """The directory cannot be packed; the message names the offending path and what to do."""


@dataclass(frozen=True)
class PackedDirectory:
    """What :func:`pack_directory` wrote: the archive's digest and size, and the packed paths in order."""

    sha256: str
    size_bytes: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    path: Path
    archive_name: str
    link_target: str | None  # set for symlinks


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, destination: BinaryIO) -> None:
        self._destination = destination
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._destination.write(data)

    def flush(self) -> None:
        self._destination.flush()


def pack_directory(root: Path, destination: BinaryIO) -> PackedDirectory:
    """Write ``root`` as a gzip-compressed tarball to ``destination``; raise PackError when it can't be."""
    if not root.is_dir():
        raise PackError(f"{root} is not a directory")
    entries = sorted(_walk(root), key=lambda entry: entry.archive_name)
    writer = _HashingWriter(destination)
    # GzipFile's own header would otherwise hold the current time and a file name.
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=writer, compresslevel=6, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for entry in entries:
            _add(archive, entry)
    return PackedDirectory(
        writer.sha256.hexdigest(), writer.size, tuple(entry.archive_name for entry in entries)
    )


def packed_paths(root: Path) -> list[str]:
    """The archive names ``pack_directory(root, ...)`` would pack, sorted (for previews and tests)."""
    return sorted(entry.archive_name for entry in _walk(root))


def _walk(root: Path) -> Iterator[_Entry]:
    real_root = Path(os.path.realpath(root))
    specs: dict[PurePosixPath, pathspec.GitIgnoreSpec] = {}
    for directory, dirnames, filenames in os.walk(root):
        here = PurePosixPath(Path(directory).relative_to(root).as_posix())
        if (spec := _ignore_spec(Path(directory))) is not None:
            specs[here] = spec
        kept_dirs = []
        for name in sorted(dirnames):
            path = Path(directory, name)
            if name == NEVER_PACKED or _ignored(here / name, specs, is_dir=True):
                continue
            if path.is_symlink():
                yield _link(path, root, real_root)
            else:
                kept_dirs.append(name)
        dirnames[:] = kept_dirs  # os.walk descends only into what is left here
        for name in sorted(filenames):
            path = Path(directory, name)
            if name == NEVER_PACKED or _ignored(here / name, specs, is_dir=False):
                continue
            if path.is_symlink():
                yield _link(path, root, real_root)
            elif stat.S_ISREG(path.lstat().st_mode):
                yield _Entry(path, path.relative_to(root).as_posix(), None)


def _ignore_spec(directory: Path) -> pathspec.GitIgnoreSpec | None:
    lines: list[str] = []
    for name in IGNORE_FILES:  # .takeoffignore last, so its rules win over .gitignore's
        try:
            lines += (directory / name).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            continue
        except OSError as error:
            raise PackError(f"cannot read {directory / name}: {error.strerror}") from error
    return pathspec.GitIgnoreSpec.from_lines(lines) if lines else None


def _ignored(
    path: PurePosixPath, specs: dict[PurePosixPath, pathspec.GitIgnoreSpec], *, is_dir: bool
) -> bool:
    """Git's rule: the deepest ignore file with a matching pattern decides; within it, the last match."""
    ignored = False
    for base in reversed(path.parents):  # from the root down to the path's own directory
        if (spec := specs.get(base)) is None:
            continue
        relative = path.relative_to(base).as_posix() + ("/" if is_dir else "")
        if (verdict := spec.check_file(relative).include) is not None:
            ignored = verdict
    return ignored


def _link(path: Path, root: Path, real_root: Path) -> _Entry:
    archive_name = path.relative_to(root).as_posix()
    target = os.readlink(path)
    resolved = Path(os.path.realpath(path))
    if not resolved.is_relative_to(real_root):
        raise PackError(
            f"symlink {archive_name} points outside {root} (to {resolved}); replace it with a copy of what"
            " it points at, or add it to .takeoffignore"
        )
    lexical = os.path.normpath(PurePosixPath(archive_name).parent / target)
    if os.path.isabs(target) or lexical == ".." or lexical.startswith("../"):
        # It lands inside, but only via an absolute path or a detour: store the path from inside instead.
        target = os.path.relpath(resolved, os.path.realpath(path.parent))
    return _Entry(path, archive_name, target)


def _add(archive: tarfile.TarFile, entry: _Entry) -> None:
    info = tarfile.TarInfo(entry.archive_name)
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.link_target is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = entry.link_target
        info.mode = 0o777
        archive.addfile(info)
        return
    try:
        with entry.path.open("rb") as content:
            status = os.fstat(content.fileno())
            info.size = status.st_size
            info.mode = 0o755 if status.st_mode & stat.S_IXUSR else 0o644
            archive.addfile(info, content)
    except OSError as error:
        # Unreadable, or shrunk while being read (tarfile then reports missing data).
        raise PackError(f"cannot pack {entry.archive_name}: {error.strerror or error}") from error
