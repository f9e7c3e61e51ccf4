"""The registry's tables and the queries on them, on SQLite or PostgreSQL through the async engine.

Metric rows and log lines are stored in chunks: each accepted batch is one row holding the batch in its
wire encoding, with its first index and count, while the run row keeps the running totals. Appending a
batch is one insert and one update, whatever its size.

Transactions: :meth:`RegistryStore.write` serializes writers in this process on SQLite (one writer at a
time is SQLite's own rule; waiting here beats failing with "database is locked") and relies on row locks
(``SELECT ... FOR UPDATE``) on PostgreSQL, where several registries may share the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import await_only
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from takeoff_server.database import Database, libpq_conninfo
from takeoff_server.idempotency import RequestIds, request_ids_table
from takeoff_server.sqltypes import JsonText, UtcDateTime
from takeoff_server.upserts import insert_unless_present


class ProjectRow(SQLModel, table=True):
    __tablename__ = "registry_projects"

    project_id: str = Field(primary_key=True, max_length=63)
    create_time: datetime = Field(sa_type=UtcDateTime)


class JobRow(SQLModel, table=True):
    __tablename__ = "registry_jobs"
    __table_args__ = (sa.UniqueConstraint("project_id", "job_id"),)

    id: int | None = Field(default=None, primary_key=True)
    project_id: str = Field(foreign_key="registry_projects.project_id", max_length=63)
    job_id: str = Field(max_length=63)
    description: str = Field(sa_type=sa.Text)
    version_count: int
    create_time: datetime = Field(sa_type=UtcDateTime)
    update_time: datetime = Field(sa_type=UtcDateTime)


class JobVersionRow(SQLModel, table=True):
    __tablename__ = "registry_job_versions"

    job_pk: int = Field(foreign_key="registry_jobs.id", ondelete="CASCADE", primary_key=True)
    version: int = Field(primary_key=True)
    content: dict[str, Any] = Field(sa_type=JsonText)
    """The version's content as :func:`takeoff_registry.versions.to_document` writes it."""
    digest: str = Field(max_length=64)
    description: str = Field(sa_type=sa.Text)
    create_time: datetime = Field(sa_type=UtcDateTime)


class JobAliasRow(SQLModel, table=True):
    """A user alias; ``latest`` is not stored, it is always the newest version."""

    __tablename__ = "registry_job_aliases"
    __table_args__ = (
        sa.ForeignKeyConstraint(
            ["job_pk", "version"],
            ["registry_job_versions.job_pk", "registry_job_versions.version"],
            ondelete="CASCADE",
        ),
    )

    job_pk: int = Field(foreign_key="registry_jobs.id", ondelete="CASCADE", primary_key=True)
    alias: str = Field(primary_key=True, max_length=63)
    version: int


class ArtifactRow(SQLModel, table=True):
    """An artifact of a project; its bytes live in the artifact directory, shared across projects."""

    __tablename__ = "registry_artifacts"

    project_id: str = Field(foreign_key="registry_projects.project_id", primary_key=True, max_length=63)
    sha256: str = Field(primary_key=True, max_length=64)
    size_bytes: int = Field(sa_type=sa.BigInteger)
    create_time: datetime = Field(sa_type=UtcDateTime)


class RunRow(SQLModel, table=True):
    __tablename__ = "registry_runs"
    __table_args__ = (
        sa.UniqueConstraint("project_id", "run_id"),
        sa.Index("ix_registry_runs_project_id_seq", "project_id", "seq"),
        sa.Index("ix_registry_runs_project_id_run_group_seq", "project_id", "run_group", "seq"),
    )

    seq: int | None = Field(default=None, primary_key=True)
    """Creation order: ListRuns pages by it, newest first."""
    project_id: str = Field(foreign_key="registry_projects.project_id", max_length=63)
    run_id: str = Field(max_length=63)
    """Compared byte by byte on every database (on PostgreSQL its collation is "C", migration 0004)."""
    display_name: str = Field(max_length=256)
    job: str = Field(index=True, max_length=200)
    """Name of the job of ``job_version`` (empty when none), for filtering by job."""
    job_version: str = Field(index=True, max_length=220)
    queue_item: str = Field(index=True, max_length=230)
    attempt: int
    state: str = Field(max_length=16)
    config: dict[str, Any] = Field(sa_type=JsonText)
    summary: dict[str, Any] = Field(sa_type=JsonText)
    create_time: datetime = Field(sa_type=UtcDateTime)
    start_time: datetime | None = Field(default=None, sa_type=UtcDateTime)
    end_time: datetime | None = Field(default=None, sa_type=UtcDateTime)
    update_time: datetime = Field(sa_type=UtcDateTime)
    exit_code: int | None = None
    message: str = Field(sa_type=sa.Text)
    history_length: int = Field(sa_type=sa.BigInteger)
    last_step: int = Field(sa_type=sa.BigInteger)
    metric_keys: list[str] = Field(sa_type=JsonText)
    log_line_count: int = Field(sa_type=sa.BigInteger)
    # Added by migration 0004; runs from before it read as having none.
    tags: str = Field(sa_type=sa.Text, sa_column_kwargs={"server_default": ""})
    """The tags in order, each between commas (``,a,b,``; tags hold no comma): see :func:`tags_text`."""
    notes: str = Field(sa_type=sa.Text, sa_column_kwargs={"server_default": ""})
    run_group: str = Field(max_length=128, sa_column_kwargs={"server_default": ""})
    job_type: str = Field(max_length=64, sa_column_kwargs={"server_default": ""})
    # Added by migration 0006.
    resumed_from: str = Field(max_length=200, sa_column_kwargs={"server_default": ""})
    """The run of the item's previous attempt that this one continues (Run.resumed_from), or empty."""
    launch_config_keys: list[str] = Field(sa_type=JsonText, sa_column_kwargs={"server_default": "[]"})
    """The top-level keys of the config given at creation: the launch's, read-only to UpdateRunConfig."""


def tags_text(tags: Sequence[str]) -> str:
    """Tags as stored: each between commas, so that one tag is found with one LIKE on every database."""
    return f",{','.join(tags)}," if tags else ""


def tags_of(text: str) -> tuple[str, ...]:
    return tuple(text[1:-1].split(",")) if text else ()


class MetricChunkRow(SQLModel, table=True):
    """One accepted batch of metric rows, encoded as the api layer chose."""

    __tablename__ = "registry_metric_chunks"

    run_seq: int = Field(foreign_key="registry_runs.seq", ondelete="CASCADE", primary_key=True)
    first_index: int = Field(primary_key=True, sa_type=sa.BigInteger)
    count: int
    payload: bytes = Field(sa_type=sa.LargeBinary)
    store_time: datetime = Field(sa_type=UtcDateTime)
    """When the batch was stored: the time of rows that carry none."""
    # Added by migration 0005; chunks from before it have none.
    value_columns: bytes | None = Field(default=None, sa_type=sa.LargeBinary)
    """Each key's values by row, for downsampling without decoding the rows (takeoff_registry.sampling)."""


@dataclass(frozen=True, slots=True)
class StoredColumns:
    """What sampling reads of a metric chunk."""

    first_index: int
    count: int
    value_columns: bytes | None
    payload: bytes | None
    """Only when the chunk has no columns, to make them from."""


class LogChunkRow(SQLModel, table=True):
    """One accepted batch of log lines, encoded as the api layer chose."""

    __tablename__ = "registry_log_chunks"

    run_seq: int = Field(foreign_key="registry_runs.seq", ondelete="CASCADE", primary_key=True)
    first_index: int = Field(primary_key=True, sa_type=sa.BigInteger)
    count: int
    payload: bytes = Field(sa_type=sa.LargeBinary)
    store_time: datetime = Field(sa_type=UtcDateTime)


ChunkT = TypeVar("ChunkT", MetricChunkRow, LogChunkRow)
request_ids = request_ids_table("registry_request_ids", SQLModel.metadata)


# The queries of every job launch and every write to a run, built once (building one per call, and its cache
# key, cost about as much CPU as running it).
_JOB = select(JobRow).where(
    JobRow.project_id == sa.bindparam("where_project"), JobRow.job_id == sa.bindparam("where_job")
)
_JOB_FOR_UPDATE = _JOB.with_for_update()
_JOB_AND_ALIASES = (
    select(JobRow, JobAliasRow.alias, JobAliasRow.version)
    .outerjoin(JobAliasRow, col(JobAliasRow.job_pk) == col(JobRow.id))
    .where(JobRow.project_id == sa.bindparam("where_project"), JobRow.job_id == sa.bindparam("where_job"))
)
_JOB_STATE = (
    sa.select(col(JobRow.id), col(JobRow.version_count), col(JobAliasRow.alias), col(JobAliasRow.version))
    .outerjoin(JobAliasRow, col(JobAliasRow.job_pk) == col(JobRow.id))
    .where(
        col(JobRow.project_id) == sa.bindparam("where_project"),
        col(JobRow.job_id) == sa.bindparam("where_job"),
    )
)
_RUN = select(RunRow).where(
    RunRow.project_id == sa.bindparam("where_project"), RunRow.run_id == sa.bindparam("where_run")
)
_RUN_FOR_UPDATE = _RUN.with_for_update()


def _run_locked(*columns: Any) -> sa.Select[Any]:
    """``columns`` of one run (by project and id), its row locked for the rest of the transaction."""
    return (
        sa.select(*columns)
        .where(
            col(RunRow.project_id) == sa.bindparam("where_project"),
            col(RunRow.run_id) == sa.bindparam("where_run"),
        )
        .with_for_update()
    )


# AppendLogs (three or four times a launch) and BatchLogMetrics (every 0.2 s of a run that logs) read and
# write only the run's log or history columns: Core statements, without loading (and decoding) the whole row.
_LOG_POSITION = _run_locked(col(RunRow.seq), col(RunRow.log_line_count))
_INSERT_LOG_CHUNK = sa.insert(LogChunkRow)
_GROW_LOG = (
    sa.update(RunRow)
    .where(col(RunRow.seq) == sa.bindparam("where_seq"))
    .values(log_line_count=sa.bindparam("length"), update_time=sa.bindparam("now"))
)
_HISTORY_POSITION = _run_locked(
    col(RunRow.seq),
    col(RunRow.state),
    col(RunRow.history_length),
    col(RunRow.last_step),
    col(RunRow.metric_keys),
)
_INSERT_METRIC_CHUNK = sa.insert(MetricChunkRow)
_GROW_HISTORY = (
    sa.update(RunRow)
    .where(col(RunRow.seq) == sa.bindparam("where_seq"))
    .values(
        history_length=sa.bindparam("length"),
        last_step=sa.bindparam("last_step"),
        metric_keys=sa.bindparam("metric_keys", type_=JsonText),
        update_time=sa.bindparam("now"),
    )
)


@dataclass(frozen=True, slots=True)
class HistoryPosition:
    """What BatchLogMetrics reads of a run."""

    seq: int
    state: str
    length: int
    """Rows in the history."""
    last_step: int
    metric_keys: list[str]


@dataclass(frozen=True, slots=True)
class JobState:
    """What references to a job resolve to: the job's row id, its version count (``latest``), its user
    aliases."""

    pk: int
    version_count: int
    aliases: dict[str, int]


class Tx:
    """One transaction on the registry's tables."""

    def __init__(self, session: AsyncSession, request_ids: RequestIds) -> None:
        self.session = session
        self.request_ids = request_ids

    def add(self, row: SQLModel) -> None:
        self.session.add(row)

    async def flush(self) -> None:
        await self.session.flush()

    async def replay(self, scope: str, request_id: str, fingerprint: str) -> str | None:
        return await self.request_ids.replay(
            self.session, scope=scope, request_id=request_id, fingerprint=fingerprint
        )

    async def remember(self, scope: str, request_id: str, fingerprint: str, result: str) -> None:
        await self.request_ids.remember(
            self.session, scope=scope, request_id=request_id, fingerprint=fingerprint, result=result
        )

    async def insert_unless_present(self, table: type[SQLModel], **values: Any) -> bool:
        """Insert a row unless one with its key exists; True when this call inserted it."""
        statement = insert_unless_present(sa.inspect(table, raiseerr=True).local_table, tuple(values))
        connection = await self.session.connection()
        return (await connection.execute(statement, values)).first() is not None

    async def ensure_project(self, project_id: str, now: datetime) -> None:
        """Create the project unless it exists (projects exist once written to)."""
        await self.insert_unless_present(ProjectRow, project_id=project_id, create_time=now)

    async def project_exists(self, project_id: str) -> bool:
        return await self.session.get(ProjectRow, project_id) is not None

    # Jobs, versions, aliases.

    async def job(self, project_id: str, job_id: str, *, for_update: bool = False) -> JobRow | None:
        query = _JOB_FOR_UPDATE if for_update else _JOB
        return (
            await self.session.exec(query, params={"where_project": project_id, "where_job": job_id})
        ).first()

    async def job_and_aliases(self, project_id: str, job_id: str) -> tuple[JobRow, dict[str, int]] | None:
        """The job and its user aliases (alias -> version) in one query; None when the job does not exist."""
        parameters = {"where_project": project_id, "where_job": job_id}
        rows = (await self.session.exec(_JOB_AND_ALIASES, params=parameters)).all()
        if not rows:
            return None
        return rows[0][0], {alias: version for _, alias, version in rows if alias is not None}

    async def ensure_job(self, project_id: str, job_id: str, now: datetime) -> JobRow:
        """The job, created empty if missing, locked for the rest of the transaction."""
        await self.ensure_project(project_id, now)
        await self.insert_unless_present(
            JobRow,
            project_id=project_id,
            job_id=job_id,
            description="",
            version_count=0,
            create_time=now,
            update_time=now,
        )
        row = await self.job(project_id, job_id, for_update=True)
        assert row is not None
        return row

    async def insert_job(self, row: JobRow) -> bool:
        """Insert ``row``; False when the project already has a job with its id (the transaction is
        then unusable: raise)."""
        self.session.add(row)
        try:
            await self.session.flush()
        except IntegrityError:
            return False
        return True

    async def jobs(self, project_id: str, *, prefix: str, after: str | None, limit: int) -> Sequence[JobRow]:
        query = select(JobRow).where(JobRow.project_id == project_id)
        if prefix:
            query = query.where(col(JobRow.job_id).startswith(prefix, autoescape=True))
        if after is not None:
            query = query.where(JobRow.job_id > after)
        return (await self.session.exec(query.order_by(col(JobRow.job_id)).limit(limit))).all()

    async def delete_job(self, row: JobRow) -> None:
        await self.session.delete(row)

    async def aliases(self, job_pks: Sequence[int]) -> dict[int, dict[str, int]]:
        """User aliases of each job: job pk -> alias -> version."""
        return await self.aliases_in(JobAliasRow, "job_pk", job_pks)

    async def set_alias(self, job_pk: int, alias: str, version: int) -> None:
        await self.set_alias_in(JobAliasRow, "job_pk", job_pk, alias, version)

    async def aliases_in(
        self, table: type[SQLModel], owner: str, owner_pks: Sequence[int]
    ) -> dict[int, dict[str, int]]:
        """User aliases of the versions of each owner (a job, a named artifact) as ``table`` keeps them
        (primary key ``owner``, ``alias``; and ``version``): owner pk -> alias -> version."""
        found: dict[int, dict[str, int]] = {pk: {} for pk in owner_pks}
        if owner_pks:
            rows = await self.session.exec(
                select(table).where(col(getattr(table, owner)).in_(set(owner_pks)))
            )
            for row in rows:
                alias_row: Any = row  # a JobAliasRow or an ArtifactAliasRow
                found[getattr(alias_row, owner)][alias_row.alias] = alias_row.version
        return found

    async def set_alias_in(
        self, table: type[SQLModel], owner: str, owner_pk: int, alias: str, version: int
    ) -> None:
        """Point an alias kept in ``table`` (see :meth:`aliases_in`) at ``version``, creating it if new."""
        row = await self.session.get(table, (owner_pk, alias))
        if row is None:
            self.session.add(table(**{owner: owner_pk, "alias": alias, "version": version}))
        else:
            row.version = version

    async def delete_alias(self, job_pk: int, alias: str) -> bool:
        row = await self.session.get(JobAliasRow, (job_pk, alias))
        if row is None:
            return False
        await self.session.delete(row)
        return True

    async def version(self, job_pk: int, version: int) -> JobVersionRow | None:
        return await self.session.get(JobVersionRow, (job_pk, version))

    async def versions(self, job_pk: int, *, before: int | None, limit: int) -> Sequence[JobVersionRow]:
        query = select(JobVersionRow).where(JobVersionRow.job_pk == job_pk)
        if before is not None:
            query = query.where(JobVersionRow.version < before)
        return (await self.session.exec(query.order_by(col(JobVersionRow.version).desc()).limit(limit))).all()

    # Artifacts.

    async def artifact(self, project_id: str, sha256: str) -> ArtifactRow | None:
        return await self.session.get(ArtifactRow, (project_id, sha256))

    async def ensure_artifact(self, project_id: str, sha256: str, size_bytes: int, now: datetime) -> bool:
        """Record the artifact in the project unless it is there; True when this call recorded it."""
        await self.ensure_project(project_id, now)
        return await self.insert_unless_present(
            ArtifactRow, project_id=project_id, sha256=sha256, size_bytes=size_bytes, create_time=now
        )

    # Runs.

    async def run(self, project_id: str, run_id: str, *, for_update: bool = False) -> RunRow | None:
        query = _RUN_FOR_UPDATE if for_update else _RUN
        return (
            await self.session.exec(query, params={"where_project": project_id, "where_run": run_id})
        ).first()

    async def log_position(self, project_id: str, run_id: str) -> tuple[int, int] | None:
        """The run's row id and log length, its row locked for the rest of the transaction; None when the
        run does not exist."""
        connection = await self.session.connection()
        row = (
            await connection.execute(_LOG_POSITION, {"where_project": project_id, "where_run": run_id})
        ).first()
        return None if row is None else (row[0], row[1])

    async def append_log_chunk(
        self, run_seq: int, first_index: int, count: int, payload: bytes, now: datetime
    ) -> None:
        """A chunk of ``count`` lines at ``first_index``: the log length :meth:`log_position` read."""
        connection = await self.session.connection()
        chunk = {
            "run_seq": run_seq,
            "first_index": first_index,
            "count": count,
            "payload": payload,
            "store_time": now,
        }
        await connection.execute(_INSERT_LOG_CHUNK, chunk)
        await connection.execute(_GROW_LOG, {"where_seq": run_seq, "length": first_index + count, "now": now})

    async def history_position(self, project_id: str, run_id: str) -> HistoryPosition | None:
        """What BatchLogMetrics needs of the run, its row locked for the rest of the transaction; None when
        the run does not exist."""
        connection = await self.session.connection()
        parameters = {"where_project": project_id, "where_run": run_id}
        row = (await connection.execute(_HISTORY_POSITION, parameters)).first()
        return None if row is None else HistoryPosition(*row)

    async def append_metric_chunk(
        self, position: HistoryPosition, chunk: MetricChunkRow, *, last_step: int, metric_keys: list[str]
    ) -> None:
        """``chunk`` at the end of the history ``position`` read, and the run's history columns after it."""
        connection = await self.session.connection()
        await connection.execute(_INSERT_METRIC_CHUNK, chunk.model_dump())
        grown = {
            "where_seq": position.seq,
            "length": position.length + chunk.count,
            "last_step": last_step,
            "metric_keys": metric_keys,
            "now": chunk.store_time,
        }
        await connection.execute(_GROW_HISTORY, grown)

    async def insert_run(self, row: RunRow) -> bool:
        """Insert ``row``; False when the project already has a run with its id (the transaction is
        then unusable: raise)."""
        self.session.add(row)
        try:
            await self.session.flush()
        except IntegrityError:
            return False
        return True

    async def previous_attempt(self, project_id: str, queue_item: str, attempt: int) -> RunRow | None:
        """The run of the item's latest attempt before ``attempt`` whose job started (attached its run): one
        that never did (its agent lost, its image not pulled) has nothing to continue from."""
        query = (
            select(RunRow)
            .where(
                RunRow.project_id == project_id,
                RunRow.queue_item == queue_item,
                RunRow.attempt < attempt,
                col(RunRow.start_time).is_not(None),
            )
            .order_by(col(RunRow.attempt).desc(), col(RunRow.seq).desc())
            .limit(1)
        )
        return (await self.session.exec(query)).first()

    async def runs(
        self,
        project_id: str,
        *,
        job: str,
        job_version: str,
        queue_item: str,
        states: Sequence[str] | None,
        id_prefix: str,
        group: str,
        tags: Sequence[str],
        before_seq: int | None,
        limit: int,
    ) -> Sequence[RunRow]:
        query = select(RunRow).where(RunRow.project_id == project_id)
        if id_prefix:
            # A range, not LIKE: it uses the (project_id, run_id) index and needs no escaping. Ids are
            # of [a-z0-9_-], all below "{", so every id with the prefix sorts below the bound.
            query = query.where(col(RunRow.run_id) >= id_prefix, col(RunRow.run_id) < id_prefix + "{")
        if group:
            query = query.where(RunRow.run_group == group)
        for tag in tags:
            query = query.where(col(RunRow.tags).contains(tags_text([tag]), autoescape=True))
        if job:
            query = query.where(RunRow.job == job)
        if job_version:
            query = query.where(RunRow.job_version == job_version)
        if queue_item:
            query = query.where(RunRow.queue_item == queue_item)
        if states is not None:
            query = query.where(col(RunRow.state).in_(states))
        if before_seq is not None:
            query = query.where(col(RunRow.seq) < before_seq)
        return (await self.session.exec(query.order_by(col(RunRow.seq).desc()).limit(limit))).all()

    async def chunks(
        self, table: type[ChunkT], run_seq: int, *, start: int, end: int, limit: int
    ) -> Sequence[ChunkT]:
        """Chunks holding any entry with an index in [start, end), in order, at most ``limit`` of them."""
        containing_start = _first_chunk_holding(table, run_seq, start)
        query = (
            select(table)
            .where(
                table.run_seq == run_seq,
                col(table.first_index) >= containing_start,
                table.first_index < end,
            )
            .order_by(col(table.first_index))
            .limit(limit)
        )
        return (await self.session.exec(query)).all()

    async def metric_columns(self, run_seq: int, *, start: int, end: int, limit: int) -> list[StoredColumns]:
        """The columns of the metric chunks holding any row with an index in [start, end), in order, at
        most ``limit`` of them; the payload only of those stored without columns."""
        table = MetricChunkRow
        containing_start = _first_chunk_holding(table, run_seq, start)
        payload_if_needed: sa.ColumnElement[bytes | None] = sa.case(
            (col(table.value_columns).is_(None), col(table.payload)), else_=sa.null()
        )
        query = (
            select(col(table.first_index), col(table.count), col(table.value_columns), payload_if_needed)
            .where(
                col(table.run_seq) == run_seq,
                col(table.first_index) >= containing_start,
                col(table.first_index) < end,
            )
            .order_by(col(table.first_index))
            .limit(limit)
        )
        return [StoredColumns(*row) for row in (await self.session.exec(query)).all()]


def _first_chunk_holding(table: type[ChunkT], run_seq: int, index: int) -> sa.ScalarSelect[int]:
    """The first index of the run's chunk holding entry ``index`` (0 when none begins at or before it)."""
    return (
        select(sa.func.coalesce(sa.func.max(table.first_index), 0))
        .where(table.run_seq == run_seq, table.first_index <= index)
        .scalar_subquery()
    )


class RegistryStore:
    """Opens transactions on the registry's database."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._request_ids = RequestIds(request_ids)
        self._writer = asyncio.Lock() if database.engine.dialect.name == "sqlite" else None
        self.shared = self._writer is None
        """Whether other registry processes may write this database (PostgreSQL replicas, docs/design.md
        §9): what this process keeps of it must then be checked against it; a SQLite file has one."""
        self._held = _HeldConnection(database.engine) if self.shared else None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Tx]:
        async with self.database.session() as session:
            yield Tx(session, self._request_ids)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Tx]:
        """A transaction committed when the block ends without an exception, rolled back otherwise."""
        async with self._writer or nullcontext(), self.database.session() as session, session.begin():
            yield Tx(session, self._request_ids)

    async def job_state(self, project_id: str, job_id: str) -> JobState | None:
        """What references to the job resolve to, or None when it does not exist (PostgreSQL only): the
        query of :meth:`Tx.job_and_aliases` without the ORM, on a connection of its own
        (:class:`_HeldConnection`)."""
        assert self._held is not None, "job_state reads a shared (PostgreSQL) database"
        parameters = {"where_project": project_id, "where_job": job_id}
        rows = await self._held.fetch(_JOB_STATE, parameters)
        if not rows:
            return None
        aliases = {alias: version for _, _, alias, version in rows if alias is not None}
        return JobState(rows[0][0], rows[0][1], aliases)

    @asynccontextmanager
    async def read_connection(self) -> AsyncIterator[AsyncConnection]:
        """A connection for Core statements, without the ORM session :meth:`read` opens."""
        async with self.database.engine.connect() as connection:
            yield connection

    @asynccontextmanager
    async def write_connection(self) -> AsyncIterator[AsyncConnection]:
        """:meth:`write`'s transaction on a bare connection, for Core statements."""
        async with self._writer or nullcontext(), self.database.engine.begin() as connection:
            yield connection


class _HeldConnection:
    """A PostgreSQL connection of its own for the reads on every GetJobVersion, held open between them:
    a checkout from the engine's pool (its ping, its reset, SQLAlchemy's greenlet hops) costs about ten
    times such a read (0.75 ms of CPU against 0.07 ms, measured). Concurrent reads take turns on it
    (psycopg's connection lock); each is one short statement in autocommit. It is opened at the first
    read and again after one failed (a database restarted, a connection cut), when the read is made on a
    pooled connection instead, so a dead connection costs one read's retry and no error. It closes with
    the engine: an async engine disposes inside the greenlet SQLAlchemy runs it in, where ``await_only``
    may wait for the close."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conninfo = libpq_conninfo(engine.url.render_as_string(hide_password=False))
        self._connection: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._opening = asyncio.Lock()
        self._sql: dict[sa.Select[Any], str] = {}
        event.listen(engine.sync_engine, "engine_disposed", self._close_on_dispose)

    async def fetch(self, statement: sa.Select[Any], parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        connection = None
        try:
            connection = await self._open()
            cursor = await connection.execute(self._compiled(statement), parameters)
            return await cursor.fetchall()
        except psycopg.Error:
            await self._discard(connection)
        async with self._engine.connect() as pooled:
            return [tuple(row) for row in (await pooled.execute(statement, parameters)).all()]

    def _compiled(self, statement: sa.Select[Any]) -> str:
        if (sql := self._sql.get(statement)) is None:
            sql = self._sql[statement] = str(statement.compile(dialect=self._engine.dialect))
        return sql

    async def _open(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        async with self._opening:
            if self._connection is None or self._connection.closed:
                self._connection = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            return self._connection

    async def _discard(self, connection: psycopg.AsyncConnection[tuple[Any, ...]] | None) -> None:
        """Close ``connection`` (None: none was opened), and hold it no more, unless another read that
        found it broken already put a new one in its place."""
        if connection is self._connection:
            self._connection = None
        if connection is not None:
            await connection.close()

    def _close_on_dispose(self, _engine: sa.Engine) -> None:
        if self._connection is not None:
            await_only(self._discard(self._connection))
