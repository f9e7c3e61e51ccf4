"""Files named by their sha256 in a directory, ``{root}/{sha[:2]}/{sha}``, written through a staging file.

Code artifacts (:mod:`takeoff_registry.artifacts`) and the blobs of named artifacts
(:mod:`takeoff_registry.named_artifacts`) keep their bytes this way. A file is written and hashed in
``{root}/staging`` and moved into place (atomically, on the same file system) only once it is complete and
checked, so a reader never sees part of one. Every method here blocks unless it says otherwise: callers run
them in worker threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from takeoff_server.errors import Unavailable

READ_CHUNK_BYTES = 1024 * 1024
STAGING = "staging"
logger = logging.getLogger(__name__)


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """The file system failing (a full disk, an I/O error, a stored file gone) as UNAVAILABLE
    ``DEPENDENCY_UNAVAILABLE``, not INTERNAL: the storage is what failed, and a retry may succeed once it is
    mended. The answer names what failed; the log also says where."""
    try:
        yield
    except OSError as error:
        logger.warning("artifact storage failed to %s: %s", what, error)
        raise Unavailable(
            "DEPENDENCY_UNAVAILABLE",
            f"the registry's artifact storage failed to {what}: {error.strerror or type(error).__name__}",
        ) from None


class StagedFile:
    """A staging file being written and hashed."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=directory, prefix="upload-")
        self.path = Path(name)
        self._file = os.fdopen(descriptor, "wb")
        self._hash = hashlib.sha256()

    def absorb(self, *chunks: bytes | memoryview) -> None:
        """Write and hash ``chunks``."""
        self.write(*chunks)
        self.hash(*chunks)

    def write(self, *chunks: bytes | memoryview) -> None:
        """Large chunks go straight to the file, past Python's small buffer."""
        for chunk in chunks:
            self._file.write(chunk)

    def hash(self, *chunks: bytes | memoryview) -> None:
        """May run in another thread than :meth:`write` at the same time: hashlib releases the GIL."""
        for chunk in chunks:
            self._hash.update(chunk)

    def finish(self, *chunks: bytes | memoryview, durable: bool = True) -> str:
        """Write the last ``chunks``, close the file and return the sha256 of everything absorbed. With
        ``durable`` it is on disk before this returns; without, call :func:`sync` before relying on it (so
        that many files are synced together)."""
        self.absorb(*chunks)
        self._file.flush()
        if durable:
            os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        """Close and remove the file unless it was moved into place; quick, safe to call at any time."""
        self._file.close()
        self.path.unlink(missing_ok=True)


class ContentStore:
    """One directory of content-addressed files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def stage(self) -> StagedFile:
        """A new staging file; quick enough to create without a thread hop, so that no cancellation can
        strand one."""
        return StagedFile(self.root / STAGING)

    def put(self, staged: Path, sha256: str) -> None:
        """Move a finished staging file into place (same content if one is there: replacing is harmless)."""
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)

    def put_new(self, staged: Sequence[tuple[Path, str]]) -> list[Path]:
        """Move each finished staging file into place where there is none yet; returns the paths placed,
        for :meth:`remove` to take back if what they belong to is not recorded after all."""
        placed = []
        made: set[Path] = set()
        for path, sha256 in staged:
            target = self.path(sha256)
            if target.exists():
                continue
            if target.parent not in made:  # one mkdir per prefix directory, not per file
                target.parent.mkdir(parents=True, exist_ok=True)
                made.add(target.parent)
            os.replace(path, target)
            placed.append(target)
        return placed

    @staticmethod
    def remove(paths: Sequence[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    async def read(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        """The file's bytes from ``offset`` on, in chunks of at most 1 MiB (async, file work in threads;
        a small file costs one thread hop)."""
        with storage_errors("read stored bytes"):
            file, chunk = await asyncio.to_thread(self._open_at, sha256, offset)
        try:
            while chunk:
                yield chunk
                if len(chunk) < READ_CHUNK_BYTES:
                    break  # a short read of a file is its end
                with storage_errors("read stored bytes"):
                    chunk = await asyncio.to_thread(file.read, READ_CHUNK_BYTES)
        finally:
            file.close()

    def _open_at(self, sha256: str, offset: int) -> tuple[BinaryIO, bytes]:
        file = self.path(sha256).open("rb")
        try:
            file.seek(offset)
            return file, file.read(READ_CHUNK_BYTES)
        except BaseException:
            file.close()
            raise


_SYNCS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="fsync")
"""Threads for fsync alone (they wait on the disk, not the CPU): files synced together share the file
system's journal commits, several times faster than one after another for small files."""


async def sync(paths: Sequence[Path]) -> None:
    """Make closed files durable (:meth:`StagedFile.finish` without ``durable``)."""
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(_SYNCS, _sync, path) for path in paths))


def _sync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
