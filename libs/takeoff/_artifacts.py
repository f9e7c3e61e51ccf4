"""The client side of named artifacts: the files a version is made of, the bytes an upload sends, and the
local cache downloads go through.

- **Upload** (``Client.log_artifact``): each file is hashed as it is read (1 MiB at a time, never whole
  in memory), ``FindMissingBlobs`` says which contents the project lacks, and one ``CreateArtifactVersion``
  stream sends the manifest and then only those contents, concatenated and cut into 1 MiB chunks (many
  small files share a chunk).
- **Download** (``ArtifactVersion.download``): each file is fetched into the cache by its sha256, its
  digest checked, then copied into the version's directory (a reflink where the file system can share
  blocks). A partial fetch is kept and continued from its end (``ReadArtifactFile.offset``).

The cache (``TAKEOFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/takeoff``, else ``~/.cache/takeoff``) holds
``artifacts/blobs/{sha[:2]}/{sha}``, read-only and with a fixed modification time, which a cached blob must
still have to be used: a write moves it, so a blob changed by hand is fetched again, not handed out.
Downloaded files are copies, not links to the blobs: a job that saves over the checkpoint it resumed from
(as root, permissions do not stop it) would otherwise change the cache and every other download of it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from takeoff.errors import FailedPreconditionError, InvalidArgumentError, TakeoffError

CHUNK_BYTES = 1024 * 1024
"""Upload chunks and read buffers: the size the registry recommends per message."""
CACHE_DIR_ENV = "TAKEOFF_CACHE_DIR"
BLOB_TIME_NS = 978_307_200 * 10**9
"""2001-01-01: the modification time of every cached blob, checked on each use. Not the epoch, which zip
archives and some build tools refuse."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LocalFile:
    """A file to upload: its path inside the version, where it is, its sha256 and size."""

    path: str
    source: Path
    sha256: str
    size_bytes: int


def local_files(path: Path) -> list[LocalFile]:
    """The files ``path`` stands for, hashed: a file (named by its file name), or every regular file under
    a directory (relative ``/`` paths, sorted; symbolic links to files followed, to directories not)."""
    if path.is_file():
        return [_hashed(path.name, path)]
    if not path.is_dir():
        raise InvalidArgumentError(
            "INVALID_ARGUMENT", "ARGUMENT_INVALID", f"cannot log {path}: no file or directory is there"
        )
    files = []
    for folder, subfolders, names in os.walk(path):
        subfolders.sort()
        for name in sorted(names):
            source = Path(folder, name)
            if source.is_file():
                files.append(_hashed(source.relative_to(path).as_posix(), source))
    if not files:
        raise InvalidArgumentError(
            "INVALID_ARGUMENT", "ARGUMENT_INVALID", f"cannot log {path}: the directory holds no files"
        )
    return sorted(files, key=lambda file: file.path)


def _hashed(path: str, source: Path) -> LocalFile:
    with source.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256")
        size = stream.tell()
    return LocalFile(path, source, digest.hexdigest(), size)


def upload_sources(files: Iterable[LocalFile], missing: Iterable[str]) -> list[LocalFile]:
    """One file for each missing content, in ``missing``'s order: what the stream sends."""
    by_digest = {file.sha256: file for file in files}
    return [by_digest[digest] for digest in dict.fromkeys(missing)]


def upload_chunks(sources: Iterable[LocalFile]) -> Iterator[bytes]:
    """The bytes of ``sources``, one after the other, in chunks of ``CHUNK_BYTES`` (the last shorter).

    Each source gives exactly the bytes it was hashed with, hashed again as they are read: a file changed
    since (a training thread saving over a checkpoint being logged) raises FailedPreconditionError naming
    it before its last byte is yielded, so the stream never carries it whole.
    """
    buffer = bytearray()
    for source in sources:
        digest = hashlib.sha256()
        remaining = source.size_bytes
        with source.source.open("rb") as stream:
            if not remaining:
                _check_whole(source, digest, stream)
            while remaining:
                piece = stream.read(min(CHUNK_BYTES - len(buffer), remaining))
                if not piece:
                    raise _changed(source, f"it has only {source.size_bytes - remaining} bytes now")
                digest.update(piece)
                remaining -= len(piece)
                if not remaining:
                    _check_whole(source, digest, stream)
                if not buffer and len(piece) == CHUNK_BYTES:
                    yield piece  # a large file's chunk goes as it was read, without a copy
                    continue
                buffer += piece
                if len(buffer) == CHUNK_BYTES:
                    yield bytes(buffer)
                    buffer.clear()
    if buffer:
        yield bytes(buffer)


def _check_whole(source: LocalFile, digest: hashlib._Hash, stream: io.BufferedReader) -> None:
    """Raise unless the file's bytes, all read, are the ones hashed and it has no more."""
    if digest.hexdigest() != source.sha256:
        raise _changed(source, f"its bytes hash to {digest.hexdigest()[:12]}... now")
    if stream.read(1):  # hashed while still being written: what was hashed is a torn file
        raise _changed(source, "it is longer now")


def _changed(source: LocalFile, how: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        "FAILED_PRECONDITION",
        "ARTIFACT_DIGEST_MISMATCH",
        f"{source.source} changed while it was being logged (hashed as {source.size_bytes} bytes with "
        f"sha256 {source.sha256[:12]}..., {how}); nothing was stored: log a file no one is writing",
    )


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "takeoff"


class BlobCache:
    """Artifact files by sha256, shared by every version and every process of the user."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or cache_dir()) / "artifacts"

    def blob(self, sha256: str) -> Path:
        """Where the blob of ``sha256`` is cached. Anything but a sha256 (64 lowercase hex digits) is
        refused: the digest comes from the registry's manifest and becomes a path here."""
        if not _SHA256.fullmatch(sha256):
            raise TakeoffError(
                "DATA_LOSS",
                "ARGUMENT_INVALID",
                f"the registry's manifest names a file by {sha256[:80]!r}, which is not a sha256 (64 "
                "lowercase hex digits); nothing was written",
            )
        return self.root / "blobs" / sha256[:2] / sha256

    def cached(self, sha256: str, size: int) -> Path | None:
        """The blob, if it is cached and unchanged since it was checked (size and fixed time)."""
        blob = self.blob(sha256)
        try:
            status = blob.stat()
        except FileNotFoundError:
            return None
        return blob if status.st_size == size and status.st_mtime_ns == BLOB_TIME_NS else None

    def fetch(self, sha256: str, size: int, read_from: Callable[[int], Iterator[bytes]]) -> tuple[Path, int]:
        """The cached blob, fetched first when missing; returns it and how many bytes were fetched.

        ``read_from(offset)`` yields the file's bytes from ``offset`` on; a partial fetch left by an
        earlier call (interrupted, or killed) is continued from its end. One process fetches a blob at a
        time (a lock on its partial file); another waits for it, then finds the blob cached.
        """
        if (hit := self.cached(sha256, size)) is not None:
            return hit, 0
        partials = self.root / "partial"
        partials.mkdir(parents=True, exist_ok=True)
        partial = partials / sha256
        with partial.open("ab+") as stream:
            fcntl.flock(stream, fcntl.LOCK_EX)
            if (hit := self.cached(sha256, size)) is not None:  # fetched by another process meanwhile
                return hit, 0
            return self._fetch_locked(sha256, size, read_from, partial, stream)

    def _fetch_locked(
        self,
        sha256: str,
        size: int,
        read_from: Callable[[int], Iterator[bytes]],
        partial: Path,
        stream: io.BufferedRandom,
    ) -> tuple[Path, int]:
        stream.seek(0)
        digest = hashlib.file_digest(stream, "sha256")  # what an earlier fetch left, counted in
        offset = stream.tell()
        if offset > size:
            stream.truncate(0)
            digest, offset = hashlib.sha256(), 0
        fetched = 0
        for chunk in read_from(offset):
            stream.write(chunk)
            digest.update(chunk)
            fetched += len(chunk)
        stream.flush()
        total = stream.tell()
        if total != size or digest.hexdigest() != sha256:
            partial.unlink(missing_ok=True)
            raise TakeoffError(
                "DATA_LOSS",
                "ARTIFACT_DIGEST_MISMATCH",
                f"the download of {sha256[:12]}... gave {total} bytes with sha256 "
                f"{digest.hexdigest()[:12]}..., not the {size} bytes the manifest names; nothing was kept",
            )
        blob = self.blob(sha256)
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(partial, 0o444)
        os.utime(partial, ns=(BLOB_TIME_NS, BLOB_TIME_NS))
        os.replace(partial, blob)
        return blob, fetched


def manifest_parts(path: str) -> list[str]:
    """The folders and file name of a manifest path, refused (DATA_LOSS) unless it is relative,
    ``/``-separated, without empty, ``.`` or ``..`` segments, backslashes or NUL: it becomes a path under
    the download directory, and must stay under it."""
    parts = path.split("/")
    if not path or "\\" in path or "\0" in path or any(part in ("", ".", "..") for part in parts):
        raise TakeoffError(
            "DATA_LOSS",
            "ARGUMENT_INVALID",
            f"the registry's manifest names a file outside its version: {path!r}",
        )
    return parts


def place(blob: Path, directory: Path, parts: Sequence[str]) -> None:
    """Make ``directory/parts`` a copy of ``blob`` (a reflink where the file system can), made beside it and
    renamed into place, so a reader never sees half a file; a copy already placed and unchanged since (size
    and the cache's fixed time) is left alone.

    Folders are made and entered one at a time without following symbolic links: a link inside
    ``directory`` (left there by an earlier artifact, say) cannot send a file outside it. InvalidArgumentError
    when the directory cannot take the file (a link or a file where a folder must be, no permission).
    """
    target = directory.joinpath(*parts)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        folder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                inner = _enter(folder, part)
                os.close(folder)
                folder = inner
            _copy_into(blob, folder, parts[-1])
        finally:
            os.close(folder)
    except OSError as error:
        why = {
            errno.ELOOP: "a symbolic link is in the way (files are never written through one)",
            errno.ENOTDIR: "a file is where a folder must be",
            errno.EEXIST: "a file is where a folder must be",  # the directory itself, from mkdir
        }.get(error.errno or 0, error.strerror or str(error))
        raise InvalidArgumentError(
            "INVALID_ARGUMENT", "ARGUMENT_INVALID", f"cannot write {target}: {why}"
        ) from None


def _enter(folder: int, name: str) -> int:
    """The folder ``name`` inside ``folder``, made if missing, opened without following a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, dir_fd=folder)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    except NotADirectoryError:  # what Linux says of a link there too
        if stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
        raise


def _copy_into(blob: Path, folder: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        placed = os.stat(name, dir_fd=folder, follow_symlinks=False)
        # One link only: a file linked to the cache (as older versions placed them) is replaced by a copy.
        if (
            stat.S_ISREG(placed.st_mode)
            and placed.st_nlink == 1
            and placed.st_mtime_ns == BLOB_TIME_NS
            and placed.st_size == blob.stat().st_size
        ):
            return
    temporary = f".{name}.takeoff-{uuid.uuid4().hex[:8]}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    copy = os.open(temporary, flags, 0o666, dir_fd=folder)
    try:
        try:
            with blob.open("rb") as source:
                _copy_bytes(source, copy)
            os.utime(copy, ns=(BLOB_TIME_NS, BLOB_TIME_NS))  # what marks it placed and unchanged
        finally:
            os.close(copy)
        os.replace(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=folder)


def _copy_bytes(source: io.BufferedReader, copy: int) -> None:
    """``copy_file_range``: in the kernel, and a reflink (shared blocks, no bytes copied) on file systems
    that have them (btrfs, XFS); a plain copy where the kernel refuses it (another file system on old
    kernels, or no ``copy_file_range`` at all: macOS)."""
    copy_range = getattr(os, "copy_file_range", None)
    try:
        if copy_range is not None:
            while copy_range(source.fileno(), copy, 1 << 30):
                pass
            return
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    source.seek(0)
    os.lseek(copy, 0, os.SEEK_SET)
    os.ftruncate(copy, 0)
    with open(copy, "wb", closefd=False) as stream:
        shutil.copyfileobj(source, stream, CHUNK_BYTES)
