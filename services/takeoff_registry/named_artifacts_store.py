"""The tables of named artifacts (artifacts.proto) and the queries on them, on SQLite or PostgreSQL.

A collection row counts its versions and is locked (``SELECT ... FOR UPDATE`` on PostgreSQL, the one
SQLite writer otherwise) while a version is added, so version numbers never collide. A version keeps its
manifest as JSON; the bytes of each file are a blob of the project (a row here, the file in the blob
directory). ``latest`` is not stored: it is always the newest version. Uses (lineage) are one row per
(version, run), holding the latest use time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel, col, select

from takeoff_registry.store import Tx
from takeoff_server.sqltypes import JsonText, UtcDateTime
from takeoff_server.upserts import insert_unless_present, upsert

MAX_USED_BY = 100
"""Runs listed in ArtifactVersion.used_by (the most recent uses)."""


class ArtifactCollectionRow(SQLModel, table=True):
    __tablename__ = "registry_artifact_collections"
    __table_args__ = (sa.UniqueConstraint("project_id", "artifact_id"),)

    id: int | None = Field(default=None, primary_key=True)
    project_id: str = Field(foreign_key="registry_projects.project_id", max_length=63)
    artifact_id: str = Field(max_length=128)
    type: str = Field(max_length=64)
    version_count: int
    create_time: datetime = Field(sa_type=UtcDateTime)
    update_time: datetime = Field(sa_type=UtcDateTime)


class ArtifactVersionRow(SQLModel, table=True):
    __tablename__ = "registry_artifact_versions"
    __table_args__ = (
        sa.UniqueConstraint("collection_pk", "version"),
        sa.Index("ix_registry_artifact_versions_collection_pk_digest", "collection_pk", "digest"),
        sa.Index("ix_registry_artifact_versions_project_id_id", "project_id", "id"),
        sa.Index("ix_registry_artifact_versions_run", "run"),
    )

    id: int | None = Field(default=None, primary_key=True)
    """Creation order: lists page by it, newest first."""
    collection_pk: int = Field(foreign_key="registry_artifact_collections.id", ondelete="CASCADE")
    project_id: str = Field(max_length=63)
    """The collection's project, for listing every artifact's versions of a project."""
    version: int
    digest: str = Field(max_length=64)
    size_bytes: int = Field(sa_type=sa.BigInteger)
    files: list[list[Any]] = Field(sa_type=JsonText)
    """``[path, sha256, size_bytes]`` of each file, sorted by path."""
    user_metadata: dict[str, Any] = Field(sa_type=JsonText)
    run: str = Field(max_length=200)
    """The run that logged it (``projects/P/runs/R``), empty when none."""
    create_time: datetime = Field(sa_type=UtcDateTime)


class ArtifactAliasRow(SQLModel, table=True):
    """A user alias; ``latest`` is not stored."""

    __tablename__ = "registry_artifact_aliases"

    collection_pk: int = Field(
        foreign_key="registry_artifact_collections.id", ondelete="CASCADE", primary_key=True
    )
    alias: str = Field(primary_key=True, max_length=128)
    version: int


class ArtifactBlobRow(SQLModel, table=True):
    """A blob the project holds; its bytes are in the project's blob directory."""

    __tablename__ = "registry_artifact_blobs"

    project_id: str = Field(foreign_key="registry_projects.project_id", primary_key=True, max_length=63)
    sha256: str = Field(primary_key=True, max_length=64)
    size_bytes: int = Field(sa_type=sa.BigInteger)
    create_time: datetime = Field(sa_type=UtcDateTime)


class ArtifactUseRow(SQLModel, table=True):
    """A run used a version (lineage); ``use_time`` is its latest use."""

    __tablename__ = "registry_artifact_uses"
    __table_args__ = (
        sa.Index("ix_registry_artifact_uses_run", "run"),
        sa.Index("ix_registry_artifact_uses_version_pk_use_time", "version_pk", "use_time"),
    )

    version_pk: int = Field(foreign_key="registry_artifact_versions.id", ondelete="CASCADE", primary_key=True)
    run: str = Field(primary_key=True, max_length=200)
    use_time: datetime = Field(sa_type=UtcDateTime)


_blobs = ArtifactBlobRow.__table__  # type: ignore[attr-defined]
_uses = ArtifactUseRow.__table__  # type: ignore[attr-defined]
# Built once (see takeoff_server.upserts): blobs are recorded per artifact write, a use per run reading one.
_INSERT_BLOB = insert_unless_present(_blobs, ("project_id", "sha256", "size_bytes", "create_time"))
_RECORD_USE = upsert(
    _uses, ("version_pk", "run", "use_time"), conflict=("version_pk", "run"), update=("use_time",)
)


@dataclass(frozen=True, slots=True)
class Uses:
    """Who used a version: the most recent runs (at most MAX_USED_BY) and how many in all."""

    runs: tuple[str, ...] = ()
    count: int = 0


class ArtifactTables:
    """The queries on the named-artifact tables, in one transaction of the registry's store."""

    def __init__(self, tx: Tx) -> None:
        self.tx = tx
        self._session = tx.session
        self._dialect = tx.session.bind.dialect.name

    async def collection(
        self, project_id: str, artifact_id: str, *, for_update: bool = False
    ) -> ArtifactCollectionRow | None:
        query = select(ArtifactCollectionRow).where(
            ArtifactCollectionRow.project_id == project_id, ArtifactCollectionRow.artifact_id == artifact_id
        )
        if for_update:
            query = query.with_for_update()
        return (await self._session.exec(query)).first()

    async def ensure_collection(
        self, project_id: str, artifact_id: str, type_: str, now: datetime
    ) -> ArtifactCollectionRow:
        """The collection, created empty (of ``type_``) if missing, locked for the rest of the transaction."""
        await self.tx.ensure_project(project_id, now)
        await self.tx.insert_unless_present(
            ArtifactCollectionRow,
            project_id=project_id,
            artifact_id=artifact_id,
            type=type_,
            version_count=0,
            create_time=now,
            update_time=now,
        )
        row = await self.collection(project_id, artifact_id, for_update=True)
        assert row is not None
        return row

    async def collections(
        self, project_id: str, *, type_: str, after: str | None, limit: int
    ) -> Sequence[ArtifactCollectionRow]:
        """Ordered by id byte by byte on every database, so pages continue alike on SQLite and PostgreSQL."""
        artifact_id: Any = col(ArtifactCollectionRow.artifact_id)
        if self._dialect == "postgresql":
            artifact_id = artifact_id.collate("C")
        query = select(ArtifactCollectionRow).where(ArtifactCollectionRow.project_id == project_id)
        if type_:
            query = query.where(ArtifactCollectionRow.type == type_)
        if after is not None:
            query = query.where(artifact_id > after)
        return (await self._session.exec(query.order_by(artifact_id).limit(limit))).all()

    async def collections_by_pk(self, pks: Sequence[int]) -> dict[int, ArtifactCollectionRow]:
        if not pks:
            return {}
        rows = await self._session.exec(
            select(ArtifactCollectionRow).where(col(ArtifactCollectionRow.id).in_(set(pks)))
        )
        return {pk(row): row for row in rows}

    async def aliases(self, collection_pks: Sequence[int]) -> dict[int, dict[str, int]]:
        """User aliases of each collection: pk -> alias -> version."""
        return await self.tx.aliases_in(ArtifactAliasRow, "collection_pk", collection_pks)

    async def set_alias(self, collection_pk: int, alias: str, version: int) -> None:
        await self.tx.set_alias_in(ArtifactAliasRow, "collection_pk", collection_pk, alias, version)

    async def version(self, collection_pk: int, version: int) -> ArtifactVersionRow | None:
        query = select(ArtifactVersionRow).where(
            ArtifactVersionRow.collection_pk == collection_pk, ArtifactVersionRow.version == version
        )
        return (await self._session.exec(query)).first()

    async def version_pk(self, project_id: str, artifact_id: str, version: int) -> int | None:
        """The row id of a version, in one query."""
        query = (
            select(ArtifactVersionRow.id)
            .join(
                ArtifactCollectionRow, col(ArtifactCollectionRow.id) == col(ArtifactVersionRow.collection_pk)
            )
            .where(
                ArtifactCollectionRow.project_id == project_id,
                ArtifactCollectionRow.artifact_id == artifact_id,
                ArtifactVersionRow.version == version,
            )
        )
        return (await self._session.exec(query)).first()

    async def version_files(self, version_pk: int) -> list[list[Any]]:
        query = select(ArtifactVersionRow.files).where(ArtifactVersionRow.id == version_pk)
        return list((await self._session.exec(query)).one())

    async def version_with_digest(
        self, collection_pk: int, digest: str, *, run: str
    ) -> ArtifactVersionRow | None:
        """The first version with this content that ``run`` logged (empty: logged outside a run)."""
        query = select(ArtifactVersionRow).where(
            ArtifactVersionRow.collection_pk == collection_pk,
            ArtifactVersionRow.digest == digest,
            ArtifactVersionRow.run == run,
        )
        return (await self._session.exec(query.order_by(col(ArtifactVersionRow.version)).limit(1))).first()

    async def add_version(self, row: ArtifactVersionRow) -> None:
        self._session.add(row)
        await self._session.flush()

    async def versions(
        self,
        project_id: str,
        *,
        collection_pk: int | None,
        logged_by: str,
        used_by: str,
        before: int | None,
        limit: int,
    ) -> Sequence[ArtifactVersionRow]:
        """Newest first: of one collection, or (None) of every collection of the project."""
        query = select(ArtifactVersionRow).where(ArtifactVersionRow.project_id == project_id)
        if collection_pk is not None:
            query = query.where(ArtifactVersionRow.collection_pk == collection_pk)
        if logged_by:
            query = query.where(ArtifactVersionRow.run == logged_by)
        if used_by:
            used = select(ArtifactUseRow.version_pk).where(ArtifactUseRow.run == used_by)
            query = query.where(col(ArtifactVersionRow.id).in_(used))
        if before is not None:
            query = query.where(col(ArtifactVersionRow.id) < before)
        return (
            await self._session.exec(query.order_by(col(ArtifactVersionRow.id).desc()).limit(limit))
        ).all()

    async def stored_blobs(self, project_id: str, digests: Sequence[str]) -> set[str]:
        """Which of ``digests`` the project holds."""
        found: set[str] = set()
        distinct = sorted(set(digests))
        # In slices, to keep each statement's parameter count far under every driver's limit.
        for start in range(0, len(distinct), 1000):
            query = select(ArtifactBlobRow.sha256).where(
                ArtifactBlobRow.project_id == project_id,
                col(ArtifactBlobRow.sha256).in_(distinct[start : start + 1000]),
            )
            found.update((await self._session.exec(query)).all())
        return found

    async def ensure_blobs(self, project_id: str, sizes: dict[str, int], now: datetime) -> None:
        """Record the blobs (sha256 -> size) in the project unless there, in one statement executed for
        every row. On PostgreSQL a concurrent transaction recording one of them waits here until this one
        ends (and finds it then); rows go in digest order, the same in every transaction, so two never wait
        for each other. Either way, once this returns no other writer places these blobs' files until this
        transaction ends."""
        rows = [
            {"project_id": project_id, "sha256": sha256, "size_bytes": sizes[sha256], "create_time": now}
            for sha256 in sorted(sizes)
        ]
        if rows:
            await (await self._session.connection()).execute(_INSERT_BLOB, rows)

    async def record_use(self, version_pk: int, run: str, now: datetime) -> None:
        use = {"version_pk": version_pk, "run": run, "use_time": now}
        await (await self._session.connection()).execute(_RECORD_USE, use)

    async def uses(self, version_pks: Sequence[int]) -> dict[int, Uses]:
        """The most recent uses and the use count of each version."""
        if not version_pks:
            return {}
        pks = set(version_pks)
        counts = dict(
            (
                await self._session.exec(
                    select(ArtifactUseRow.version_pk, sa.func.count())
                    .where(col(ArtifactUseRow.version_pk).in_(pks))
                    .group_by(col(ArtifactUseRow.version_pk))
                )
            ).all()
        )
        ranked = (
            select(
                col(ArtifactUseRow.version_pk),
                col(ArtifactUseRow.run),
                sa.func.row_number()
                .over(
                    partition_by=col(ArtifactUseRow.version_pk),
                    order_by=(col(ArtifactUseRow.use_time).desc(), col(ArtifactUseRow.run)),
                )
                .label("rank"),
            )
            .where(col(ArtifactUseRow.version_pk).in_(pks))
            .subquery()
        )
        recent = await self._session.exec(
            select(ranked.c.version_pk, ranked.c.run)
            .where(ranked.c.rank <= MAX_USED_BY)
            .order_by(ranked.c.version_pk, ranked.c.rank)
        )
        runs: dict[int, list[str]] = {}
        for version_pk, run in recent.all():
            runs.setdefault(version_pk, []).append(run)
        return {pk: Uses(tuple(runs.get(pk, ())), int(counts.get(pk, 0))) for pk in pks}


def pk(row: ArtifactCollectionRow | ArtifactVersionRow) -> int:
    assert row.id is not None, "a stored row has an id"
    return row.id
