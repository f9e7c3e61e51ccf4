"""The client side of named artifacts: the files a version is made of, the bytes an upload sends, and the
local cache downloads go through.

- **Upload** (``Client.log_artifact``): each file is hashed as it is read (1 MiB at a time, never whole
  in memory), ``FindMissingBlobs`` says which contents the project lacks, and one ``CreateArtifactVersion``
  stream sends the manifest and then only those contents, concatenated and cut into 1 MiB chunks (many
  small files share a chunk).
- **Download** (``ArtifactVersion.download``): each file is fetched into the cache by its sha256, its
  digest checked, then the version's directory is made of hard links to the cached blobs (copies where a
  link cannot be made). A partial fetch is kept and continued from its end (``ReadArtifactFile.offset``).

The cache (``TAKEOFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/takeoff``, else ``~/.cache/takeoff``) holds
``artifacts/blobs/{sha[:2]}/{sha}``, read-only and with a fixed modification time: a blob written through
a hard link (by a job that saves over a downloaded checkpoint, as root or after a chmod) gets a new time,
so the next use sees it and fetches the blob again instead of handing out changed bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from takeoff.errors import TakeoffError

CHUNK_BYTES = 1024 * 1024
"""Upload chunks and read buffers: the size the registry recommends per message."""
CACHE_DIR_ENV = "TAKEOFF_CACHE_DIR"
BLOB_TIME_NS = 978_307_200 * 10**9
"""2001-01-01: the modification time of every cached blob, checked on each use. Not the epoch, which zip
archives and some build tools refuse."""


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
        raise FileNotFoundError(f"no file or directory at {path}")
    files = []
    for folder, subfolders, names in os.walk(path):
        subfolders.sort()
        for name in sorted(names):
            source = Path(folder, name)
            if source.is_file():
                files.append(_hashed(source.relative_to(path).as_posix(), source))
    if not files:
        raise ValueError(f"{path} holds no files to log")
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
    """The bytes of ``sources``, one after the other, in chunks of ``CHUNK_BYTES`` (the last shorter)."""
    buffer = bytearray()
    for source in sources:
        with source.source.open("rb") as stream:
            while piece := stream.read(CHUNK_BYTES - len(buffer)):
                if not buffer and len(piece) == CHUNK_BYTES:
                    yield piece  # a large file's chunk goes as it was read, without a copy
                    continue
                buffer += piece
                if len(buffer) == CHUNK_BYTES:
                    yield bytes(buffer)
                    buffer.clear()
    if buffer:
        yield bytes(buffer)


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


def place(blob: Path, target: Path) -> None:
    """Make ``target`` hold ``blob``'s bytes: a hard link to it, else (another file system, a file system
    without links) a copy; replaced atomically, so a reader never sees half a file."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.samefile(blob, target):
            return
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.takeoff-{uuid.uuid4().hex[:8]}")
    try:
        try:
            os.link(blob, temporary)
        except OSError:
            shutil.copyfile(blob, temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
