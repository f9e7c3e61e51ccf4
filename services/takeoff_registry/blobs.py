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
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

READ_CHUNK_BYTES = 1024 * 1024


class StagedFile:
    """A staging file being written and hashed."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=directory, prefix="upload-")
        self.path = Path(name)
        self._file = os.fdopen(descriptor, "wb")
        self._hash = hashlib.sha256()

    def absorb(self, *chunks: bytes | memoryview) -> None:
        """Write and hash ``chunks``; large ones go straight to the file, past Python's small buffer."""
        for chunk in chunks:
            self._file.write(chunk)
            self._hash.update(chunk)  # hashlib releases the GIL for large buffers

    def finish(self) -> str:
        """Flush to disk and return the sha256 of everything absorbed."""
        self._file.flush()
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
        return StagedFile(self.root / "staging")

    def put(self, staged: Path, sha256: str) -> None:
        """Move a finished staging file into place (same content if one is there: replacing is harmless)."""
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)

    def put_new(self, staged: Sequence[tuple[Path, str]]) -> list[Path]:
        """Move each finished staging file into place where there is none yet; returns the paths placed,
        for :meth:`remove` to take back if what they belong to is not recorded after all."""
        placed = []
        for path, sha256 in staged:
            if not self.path(sha256).exists():
                self.put(path, sha256)
                placed.append(self.path(sha256))
        return placed

    @staticmethod
    def remove(paths: Sequence[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    async def read(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        """The file's bytes from ``offset`` on, in chunks of at most 1 MiB (async, file work in threads)."""
        file = await asyncio.to_thread(self.path(sha256).open, "rb")
        try:
            await asyncio.to_thread(file.seek, offset)
            while chunk := await asyncio.to_thread(file.read, READ_CHUNK_BYTES):
                yield chunk
        finally:
            file.close()
