"""What the registry prunes (docs/design.md §9, "Retention"): code artifacts no job version references, and
request-id records older than ``request_id_days``.

A code artifact is uploaded before the version that references it is created, so one uploaded (or
recorded in its project) within ``in_use_hours`` is in use: its version may be on its way. Otherwise an
artifact no version of its project names is garbage, whatever its age: versions are immutable, so nothing
can come to reference it later except a new version, which would upload it again. Its bytes, shared by
every project that has the same digest, go when no project records it any more and the file was not
written within ``in_use_hours`` (an upload of the same bytes by another project may be about to record
it). Staging files an interrupted upload left behind go after ``in_use_hours`` too.

Named artifacts (``ArtifactService``) are what users keep on purpose: retention leaves them alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import col, select

from takeoff_registry.store import ArtifactRow, JobRow, JobVersionRow, RegistryStore, request_ids
from takeoff_server.retention import RetentionSettings, forget_request_ids

Clock = Callable[[], datetime]

STAGING = "staging"


@dataclass
class PruneReport:
    artifacts: int = 0
    """(project, digest) records removed."""
    files: list[str] = field(default_factory=list)
    """Files removed (artifact bytes and leftover staging files), relative to the artifact directory."""
    bytes_freed: int = 0
    request_ids: int = 0

    def __str__(self) -> str:
        return (
            f"removed {self.artifacts} unreferenced code artifacts, {len(self.files)} files "
            f"({self.bytes_freed} bytes), {self.request_ids} request ids"
        )


def _referenced(content: Mapping[str, object]) -> str | None:
    source = content.get("source")
    code = source.get("code") if isinstance(source, dict) else None
    digest = code.get("sha256") if isinstance(code, dict) else None
    return digest if isinstance(digest, str) else None


class RegistryRetention:
    def __init__(
        self,
        settings: RetentionSettings,
        store: RegistryStore,
        artifact_dir: Path,
        *,
        clock: Clock = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._store = store
        self._artifact_dir = artifact_dir
        self._clock = clock

    async def prune(self) -> PruneReport:
        now = self._clock()
        in_use_since = self._settings.in_use_since(now)
        report = PruneReport()
        async with self._store.write() as tx:
            session = tx.session
            versions = await session.exec(
                select(JobRow.project_id, JobVersionRow.content).join(
                    JobVersionRow, col(JobVersionRow.job_pk) == col(JobRow.id)
                )
            )
            referenced = {
                (project, digest) for project, content in versions if (digest := _referenced(content))
            }
            candidates = await session.exec(
                select(ArtifactRow.project_id, ArtifactRow.sha256).where(
                    ArtifactRow.create_time < in_use_since
                )
            )
            unreferenced = [pair for pair in candidates if tuple(pair) not in referenced]
            for project, digest in unreferenced:
                await session.exec(
                    sa.delete(ArtifactRow).where(
                        col(ArtifactRow.project_id) == project, col(ArtifactRow.sha256) == digest
                    )
                )
            report.artifacts = len(unreferenced)
            report.request_ids = await forget_request_ids(
                session, request_ids, self._settings.request_ids_before(now)
            )
            recorded = set(await session.exec(select(ArtifactRow.sha256).distinct()))
        removed = await asyncio.to_thread(self._remove_files, recorded, in_use_since.timestamp())
        report.files = [str(path.relative_to(self._artifact_dir)) for path, _ in removed]
        report.bytes_freed = sum(size for _, size in removed)
        return report

    def _remove_files(self, recorded: set[str], written_before: float) -> list[tuple[Path, int]]:
        """Artifact files no project records, and leftover staging files, not written since
        ``written_before``; returns each removed with its size."""
        if not self._artifact_dir.is_dir():
            return []
        candidates = [
            path
            for directory in self._artifact_dir.iterdir()
            if len(directory.name) == 2 and directory.is_dir()
            for path in directory.iterdir()
            if path.name not in recorded
        ]
        staging = self._artifact_dir / STAGING
        if staging.is_dir():
            candidates += list(staging.iterdir())
        removed = []
        for path in candidates:
            with contextlib.suppress(OSError):
                status = path.stat()
                if status.st_mtime < written_before:
                    os.unlink(path)
                    removed.append((path, status.st_size))
        return removed
