"""Code artifacts: gzip-compressed tarballs, stored once by sha256 and listed per project.

An upload streams into a staging file while it is hashed and counted; only a complete, matching and
safe archive is moved (atomically) to ``{root}/{sha[:2]}/{sha}``, and only then is the project's row
written. Whatever goes wrong on the way, cancellation included, the staging file is removed and nothing
is recorded. File work runs in worker threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from takeoff_registry.blobs import ContentStore, storage_errors
from takeoff_registry.refs import ArtifactKey, project_not_found
from takeoff_registry.store import ArtifactRow, RegistryStore
from takeoff_registry.versions import SHA256
from takeoff_server.archive import check_archive
from takeoff_server.errors import FieldViolation, InvalidArgument, NotFound, ResourceExhausted
from takeoff_server.validation import field_error


@dataclass(frozen=True, slots=True)
class Artifact:
    key: ArtifactKey
    size_bytes: int
    create_time: datetime


class Artifacts:
    """Stores, describes and serves artifacts."""

    def __init__(self, store: RegistryStore, root: Path, *, max_bytes: int) -> None:
        self._store = store
        self._files = ContentStore(root)
        self._max_bytes = max_bytes

    def _check_declared(self, sha256: str, size_bytes: int) -> None:
        if not SHA256.fullmatch(sha256):
            raise field_error("header.sha256", "must be a lowercase hex sha256 (64 characters)")
        if size_bytes <= 0:
            raise field_error("header.size_bytes", "must be the exact size in bytes, > 0")
        if size_bytes > self._max_bytes:
            raise self._too_large(f"the declared size {size_bytes} bytes")

    def _too_large(self, what: str) -> ResourceExhausted:
        return ResourceExhausted(
            "ARTIFACT_TOO_LARGE",
            f"{what} is over this registry's artifact limit of {self._max_bytes} bytes",
            metadata={"limit_bytes": str(self._max_bytes)},
        )

    async def upload(
        self, key: ArtifactKey, size_bytes: int, chunks: AsyncIterable[bytes]
    ) -> tuple[Artifact, bool]:
        """Receive and store an artifact; returns it and whether the project had it already."""
        self._check_declared(key.sha256, size_bytes)
        with storage_errors("store an upload"):
            staged = self._files.stage()
        try:
            received = 0
            async for chunk in chunks:
                received += len(chunk)
                if received > self._max_bytes:
                    raise self._too_large("the upload")
                if received > size_bytes:
                    raise self._size_mismatch(f"more than the declared {size_bytes} bytes arrived")
                with storage_errors("store an upload"):
                    await asyncio.to_thread(staged.absorb, chunk)
            with storage_errors("store an upload"):
                digest = await asyncio.to_thread(staged.finish)
            if received != size_bytes:
                raise self._size_mismatch(f"{received} of the declared {size_bytes} bytes arrived")
            if digest != key.sha256:
                raise InvalidArgument(
                    "ARTIFACT_DIGEST_MISMATCH",
                    f"the uploaded bytes hash to {digest}, not to the declared {key.sha256}",
                    metadata={"sha256": digest},
                    violations=[FieldViolation("header.sha256", "does not match the uploaded bytes")],
                )
            await asyncio.to_thread(check_archive, staged.path)
            with storage_errors("store an upload"):
                await asyncio.to_thread(self._files.put, staged.path, key.sha256)
        finally:
            # Deliberately synchronous: it must run even when the upload task is being cancelled.
            staged.discard()
        async with self._store.write() as tx:
            recorded = await tx.ensure_artifact(key.project, key.sha256, size_bytes, datetime.now(UTC))
            row = await tx.artifact(key.project, key.sha256)
        assert row is not None
        return _artifact(row), not recorded

    @staticmethod
    def _size_mismatch(problem: str) -> InvalidArgument:
        return field_error("header.size_bytes", problem, reason="ARTIFACT_SIZE_MISMATCH")

    async def get(self, key: ArtifactKey) -> Artifact:
        async with self._store.read() as tx:
            row = await tx.artifact(key.project, key.sha256)
            if row is not None:
                return _artifact(row)
            if not await tx.project_exists(key.project):
                raise project_not_found(key.project)
        raise NotFound(
            "ARTIFACT_NOT_FOUND", f"artifact {key.name} does not exist", metadata={"resource": key.name}
        )

    async def download(self, key: ArtifactKey, *, offset: int) -> tuple[Artifact, AsyncIterator[bytes]]:
        """The artifact and its bytes from ``offset`` on, in chunks of at most 1 MiB."""
        artifact = await self.get(key)
        if not 0 <= offset < artifact.size_bytes:
            raise field_error("offset", f"must be between 0 and {artifact.size_bytes - 1}")
        return artifact, self._files.read(key.sha256, offset)


def _artifact(row: ArtifactRow) -> Artifact:
    return Artifact(
        key=ArtifactKey(row.project_id, row.sha256), size_bytes=row.size_bytes, create_time=row.create_time
    )
