"""The builder's tables (builds, their log lines, request ids) and the queries on them.

What is cached lives on disk, not here: these records say what was asked and what came of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import JSON, Column, Field, SQLModel, col, select

from takeoff_builder.model import (
    JOB,
    Build,
    BuildFailure,
    BuildKind,
    BuildOptions,
    BuildQuery,
    BuildResult,
    BuildState,
    FailureReason,
)
from takeoff_server.database import Database
from takeoff_server.group_commit import Batch, GroupCommitter
from takeoff_server.idempotency import RequestIds, request_ids_table
from takeoff_server.pagination import PageRequest
from takeoff_server.retention import forget_request_ids
from takeoff_server.sqltypes import UtcDateTime
from takeoff_server.upserts import insert_unless_present


class BuildRow(SQLModel, table=True):
    __tablename__ = "builder_builds"
    __table_args__ = (sa.Index("ix_builder_builds_flight_lock_state", "flight_lock", "state"),)

    seq: int | None = Field(default=None, primary_key=True)
    """Creation order: lists are newest first by it."""
    id: str = Field(index=True, unique=True)
    job: str = Field(index=True)
    job_version: str = Field(index=True)
    kind: str
    push: bool = False
    no_cache: bool = False
    run: str = ""
    state: str = Field(index=True)
    environment_key: str = ""
    build_key: str = ""
    cache_hit: bool = False
    cache_detail: str | None = None
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    failure_reason: str | None = None
    failure_message: str = ""
    failure_log_tail: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    log_line_count: int = 0
    create_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))
    start_time: datetime | None = Field(default=None, sa_column=Column(UtcDateTime))
    end_time: datetime | None = Field(default=None, sa_column=Column(UtcDateTime))
    flight_lock: int = Field(default=0, sa_column=Column(sa.BigInteger, nullable=False, server_default="0"))
    """The advisory lock the replica carrying out the build holds (PostgreSQL; see ``flights``)."""
    holds: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )
    """The cache entries the build uses or makes (``Builder.held``), for other replicas' retention."""


class BuildLogRow(SQLModel, table=True):
    __tablename__ = "builder_build_logs"

    build_id: str = Field(primary_key=True)
    line: int = Field(primary_key=True)
    text: str


builds = BuildRow.__table__  # type: ignore[attr-defined]
build_logs = BuildLogRow.__table__  # type: ignore[attr-defined]
request_id_records = request_ids_table("builder_request_ids", SQLModel.metadata)
request_ids = RequestIds(request_id_records)
BUILD_SCOPE = "Build"
"""Request ids of BuildService.Build, as the other services scope theirs by method."""
_UNFINISHED = [BuildState.QUEUED.value, BuildState.RUNNING.value]


def build_channel(build_id: str) -> str:
    """The PostgreSQL notification channel that tells of changes to one build (its ids are hex)."""
    return f"builder_build_{build_id}"


def _state_values(build: Build) -> dict[str, Any]:
    """The columns that change over a build's life."""
    failure = build.failure
    return {
        "state": build.state.value,
        "environment_key": build.environment_key,
        "build_key": build.build_key,
        "cache_hit": build.cache_hit,
        "cache_detail": build.cache_detail,
        "result": dataclasses.asdict(build.result) if build.result is not None else None,
        "failure_reason": failure.reason.value if failure is not None else None,
        "failure_message": failure.message if failure is not None else "",
        "failure_log_tail": list(failure.log_tail) if failure is not None else [],
        "log_line_count": build.log_line_count,
        "start_time": build.start_time,
        "end_time": build.end_time,
    }


def _build_from_row(row: BuildRow) -> Build:
    return Build(
        id=row.id,
        job_version=row.job_version,
        kind=BuildKind(row.kind),
        options=BuildOptions(push=row.push, no_cache=row.no_cache),
        create_time=row.create_time,
        state=BuildState(row.state),
        run=row.run,
        environment_key=row.environment_key,
        build_key=row.build_key,
        cache_hit=row.cache_hit,
        cache_detail=row.cache_detail,
        result=BuildResult(**row.result) if row.result is not None else None,
        failure=BuildFailure(
            FailureReason(row.failure_reason), row.failure_message, tuple(row.failure_log_tail)
        )
        if row.failure_reason
        else None,
        start_time=row.start_time,
        end_time=row.end_time,
        log_line_count=row.log_line_count,
    )


class BuildStore:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._ended = GroupCommitter(database)
        """Builds stored once they have ended (cache hits answered first), many to a transaction."""

    async def replay(self, scope: str, request_id: str, fingerprint: str) -> str | None:
        """The build a ``request_id`` started or joined before, or None when it is new."""
        async with self._database.session() as session:
            return await request_ids.replay(
                session, scope=scope, request_id=request_id, fingerprint=fingerprint
            )

    async def remember(self, scope: str, request_id: str, fingerprint: str, result: str) -> None:
        async with self._database.session() as session:
            await request_ids.remember(
                session, scope=scope, request_id=request_id, fingerprint=fingerprint, result=result
            )
            await session.commit()

    @property
    def shared(self) -> bool:
        """Whether replicas may share this database (PostgreSQL), so builds take flight locks."""
        return self._database.engine.dialect.name == "postgresql"

    async def insert(
        self,
        build: Build,
        *,
        request_id: str = "",
        fingerprint: str = "",
        flight_lock: int = 0,
        holds: Iterable[str] = (),
    ) -> None:
        """Store a new build and, in the same transaction, the ``request_id`` that started it."""
        async with self._database.session() as session:
            await session.exec(
                sa.insert(builds).values(
                    id=build.id,
                    job=build.job,
                    job_version=build.job_version,
                    kind=build.kind.value,
                    push=build.options.push,
                    no_cache=build.options.no_cache,
                    run=build.run,
                    create_time=build.create_time,
                    flight_lock=flight_lock,
                    holds=sorted(holds),
                    **_state_values(build),
                )
            )
            if request_id:
                await request_ids.remember(
                    session,
                    scope=BUILD_SCOPE,
                    request_id=request_id,
                    fingerprint=fingerprint,
                    result=build.id,
                )
            await session.commit()

    async def insert_ended(
        self, build: Build, *, request_id: str = "", fingerprint: str = "", holds: Iterable[str] = ()
    ) -> None:
        """Store a build that has already ended, with the ``request_id`` that asked for it, in a transaction
        shared with the other ended builds stored at the same moment. A build or request id stored before
        (a retry on another replica) is left as it is."""
        row = {
            "id": build.id,
            "job": build.job,
            "job_version": build.job_version,
            "kind": build.kind.value,
            "push": build.options.push,
            "no_cache": build.options.no_cache,
            "run": build.run,
            "create_time": build.create_time,
            "holds": sorted(holds),
            **_state_values(build),
        }
        recorded = {
            "scope": BUILD_SCOPE,
            "request_id": request_id,
            "fingerprint": fingerprint,
            "result": build.id,
            "create_time": build.create_time,
        }

        async def insert(batch: Batch) -> None:
            await batch.execute(insert_unless_present(builds, tuple(row)), row)
            if request_id:
                await batch.execute(insert_unless_present(request_id_records, tuple(recorded)), recorded)

        await self._ended.commit(insert)

    async def update(
        self, build: Build, *, log_lines: Sequence[str] = (), first_line: int = 0, notify: bool = False
    ) -> None:
        """Save the build's state and ``log_lines``, numbered from ``first_line`` (the lines stored
        before); with ``notify``, tell the replicas following the build once it is committed."""
        values = _state_values(build)
        if notify:
            values["log_line_count"] = first_line + len(log_lines)  # what a follower can read
        async with self._database.session() as session:
            await session.exec(sa.update(builds).where(builds.c.id == build.id).values(**values))
            if log_lines:
                await session.exec(
                    sa.insert(build_logs),
                    params=[
                        {"build_id": build.id, "line": number, "text": text}
                        for number, text in enumerate(log_lines, start=first_line)
                    ],
                )
            if notify:
                await session.exec(select(sa.func.pg_notify(build_channel(build.id), "")))
            await session.commit()

    async def unfinished(self, flight_lock: int) -> Build | None:
        """The build of this flight that is QUEUED or RUNNING (its holder's or a dead holder's)."""
        statement = select(BuildRow).where(
            BuildRow.flight_lock == flight_lock, col(BuildRow.state).in_(_UNFINISHED)
        )
        async with self._database.session() as session:
            row = (await session.exec(statement.order_by(col(BuildRow.seq).desc()))).first()
        return _build_from_row(row) if row is not None else None

    async def get(self, build_id: str) -> Build | None:
        async with self._database.session() as session:
            row = (await session.exec(select(BuildRow).where(BuildRow.id == build_id))).first()
        return _build_from_row(row) if row is not None else None

    async def unfinished_holds(self) -> set[str]:
        """The cache entries that builds QUEUED or RUNNING hold, whichever replica carries them out."""
        statement = select(BuildRow.holds).where(col(BuildRow.state).in_(_UNFINISHED))
        async with self._database.session() as session:
            return {key for holds in await session.exec(statement) for key in holds}

    async def log_lines(self, build_id: str, *, first_line: int = 0) -> list[str]:
        async with self._database.session() as session:
            rows = await session.exec(
                select(BuildLogRow.text)
                .where(BuildLogRow.build_id == build_id, BuildLogRow.line >= first_line)
                .order_by(col(BuildLogRow.line))
            )
            return list(rows)

    async def list(self, query: BuildQuery, page: PageRequest) -> tuple[list[tuple[Build, int]], bool]:
        """A page of builds, newest first, each with the cursor after it, and whether more follow."""
        statement = select(BuildRow).order_by(col(BuildRow.seq).desc()).limit(page.size + 1)
        if query.job:
            column = BuildRow.job if JOB.match(query.job) else BuildRow.job_version
            statement = statement.where(column == query.job)
        if query.states:
            statement = statement.where(col(BuildRow.state).in_([state.value for state in query.states]))
        if query.kind is not None:
            statement = statement.where(BuildRow.kind == query.kind.value)
        if page.after is not None:
            statement = statement.where(col(BuildRow.seq) < page.after[0])
        async with self._database.session() as session:
            rows = list(await session.exec(statement))
        return [(_build_from_row(row), _seq(row)) for row in rows[: page.size]], len(rows) > page.size

    async def last_uses(self) -> dict[str, datetime]:
        """When each venv and code directory (by path) and image (by tag) was last handed out by a build
        that succeeded, as far as the records kept tell."""
        statement = select(BuildRow.result, BuildRow.end_time).where(
            BuildRow.state == BuildState.SUCCEEDED.value
        )
        uses: dict[str, datetime] = {}
        async with self._database.session() as session:
            for result, end_time in await session.exec(statement):
                if end_time is None:
                    continue
                for field in ("venv_path", "code_path", "image"):
                    handed_out = (result or {}).get(field)
                    if handed_out and (handed_out not in uses or uses[handed_out] < end_time):
                        uses[handed_out] = end_time
        return uses

    async def prune(self, *, builds_before: datetime | None, request_ids_before: datetime) -> tuple[int, int]:
        """Delete the builds that ended before ``builds_before`` with their logs, and the request ids
        recorded before ``request_ids_before``; returns how many of each."""
        async with self._database.session() as session:
            pruned_builds = 0
            if builds_before is not None:
                ended = select(builds.c.id).where(
                    builds.c.state.in_([BuildState.SUCCEEDED.value, BuildState.FAILED.value]),
                    builds.c.end_time < builds_before,
                )
                await session.exec(sa.delete(build_logs).where(build_logs.c.build_id.in_(ended)))
                result = await session.exec(sa.delete(builds).where(builds.c.id.in_(ended)))
                pruned_builds = int(result.rowcount)
            forgotten = await forget_request_ids(session, request_id_records, request_ids_before)
            await session.commit()
            return pruned_builds, forgotten

    async def fail_unfinished(self, failure: BuildFailure, now: datetime) -> int:
        """End the builds a stopped process left QUEUED or RUNNING; returns how many there were.

        On PostgreSQL only those nobody holds: a replica carrying out a build holds its flight lock, and
        a replica waiting to take a dead holder's build over is queued for it, so the transaction-scoped
        try fails for both and their builds are left alone."""
        unfinished = builds.c.state.in_(_UNFINISHED)
        if self.shared:  # CASE: lock only the unfinished builds' flights, whatever order the planner picks
            unfinished = sa.case(
                (unfinished, sa.func.pg_try_advisory_xact_lock(builds.c.flight_lock)), else_=False
            )
        async with self._database.session() as session:
            result = await session.exec(
                sa.update(builds)
                .where(unfinished)
                .values(
                    state=BuildState.FAILED.value,
                    failure_reason=failure.reason.value,
                    failure_message=failure.message,
                    end_time=now,
                )
            )
            await session.commit()
            return int(result.rowcount)


def _seq(row: BuildRow) -> int:
    assert row.seq is not None, "a stored build has a sequence number"
    return row.seq
