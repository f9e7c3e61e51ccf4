"""Jobs, their immutable versions and movable aliases: JobService's rules, without any gRPC.

Projects exist once written to; reads in a project that never was fail with ``PROJECT_NOT_FOUND``.
Version numbers count up from 0 per job; ``latest`` is not stored but always means the newest version.

Resolving a reference (GetJobVersion, on the queue's Enqueue and the builder's Build path) is answered
from memory: a version's content, which never changes (:func:`version_key`), and a snapshot of the job
(its version count and aliases, :class:`JobSnapshots`) that is never stale. In this process every write
that changes what a reference resolves to drops the job's snapshot after its commit, and a read that began
before such a write never keeps what it read; where other registries share the database (PostgreSQL), a
snapshot is used only while the database still holds what it says, one indexed read without the ORM
(:meth:`RegistryStore.job_state`). So an alias moved, a version added, an alias or a job deleted, by
any registry, is seen by the next resolve (docs/design.md §16 "GetJobVersion and caching").
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from takeoff_registry.git_source import GitResolver
from takeoff_registry.refs import JOB_VERSION, LATEST, JobKey, JobReference, check_alias, project_not_found
from takeoff_registry.store import JobRow, JobState, JobVersionRow, RegistryStore, Tx
from takeoff_registry.versions import (
    MAX_DESCRIPTION,
    CodeSource,
    GitSource,
    JobVersion,
    VersionSpec,
    check_spec,
    content_digest,
    from_document,
    to_document,
)
from takeoff_server.errors import AlreadyExists, NotFound
from takeoff_server.idempotency import request_fingerprint
from takeoff_server.pagination import PageRequest
from takeoff_server.validation import Problems, check_text
from takeoff_server.versions import VERSION_CACHE_SIZE, VersionCache


@dataclass(frozen=True, slots=True)
class Job:
    key: JobKey
    description: str
    version_count: int
    aliases: dict[str, int]
    """Every alias -> version number, ``latest`` included once there is a version."""
    create_time: datetime
    update_time: datetime

    @property
    def latest_version(self) -> str:
        return self.key.version_name(self.version_count - 1) if self.version_count else ""


@dataclass(frozen=True, slots=True)
class CreatedVersion:
    version: JobVersion
    reused_existing: bool
    job: Job


def _now() -> datetime:
    return datetime.now(UTC)


def _check_description(description: str, *, field: str) -> None:
    check_text(description, field=field, max_chars=MAX_DESCRIPTION)


def _job_not_found(key: JobKey) -> NotFound:
    return NotFound("JOB_NOT_FOUND", f"job {key.name} does not exist", metadata={"resource": key.name})


def _version_not_found(reference: str, why: str) -> NotFound:
    return NotFound("JOB_VERSION_NOT_FOUND", f"{reference}: {why}", metadata={"resource": reference})


@dataclass(frozen=True, slots=True)
class JobSnapshot:
    """What resolving a reference needs of a job, as one read of its row and aliases found it."""

    job: Job
    state: JobState
    """What it was read from: the snapshot is current while the database holds the same."""

    @property
    def pk(self) -> int:
        return self.state.pk

    @classmethod
    def of(cls, row: JobRow, user_aliases: dict[str, int]) -> JobSnapshot:
        return cls(_job(row, user_aliases), JobState(_pk(row), row.version_count, user_aliases))


def version_key(snapshot: JobSnapshot, number: int) -> tuple[int, datetime, int]:
    """Where a registry process keeps a version's content (:class:`takeoff_server.versions.VersionCache`).

    A version never changes once created, so an entry is never stale, whichever registry process made or
    changes the job: aliases (``latest`` included) come from the job's current snapshot and are put on the
    cached content. The job's create time is in the key because a job deleted and made again may get its
    row id back (SQLite reuses the highest), never its create time; a deleted job's entries are simply
    never asked for again and age out."""
    return (snapshot.pk, snapshot.job.create_time, number)


JobId = tuple[str, str]
"""(project, job)."""


class JobSnapshots:
    """The snapshots of the jobs this process resolved lately (the least recently used dropped first),
    and which of them it wrote since.

    A clock counts this process's writes to jobs; each write stamps its job with the clock
    (:meth:`invalidate`, after its commit) and drops the job's snapshot. A read that fills a snapshot takes
    the clock before it begins (:meth:`ticket`), and :meth:`put` keeps its snapshot only if the job was not
    stamped since: such a read may have seen the job before the write's commit, after the write dropped
    the old snapshot. The stamps of the last ``size`` jobs written are kept; a fill that began before a
    forgotten stamp is not kept, whichever its job (a read more, never a stale answer)."""

    def __init__(self, size: int = VERSION_CACHE_SIZE) -> None:
        self._size = size
        self._snapshots: OrderedDict[JobId, JobSnapshot] = OrderedDict()
        self._clock = 0
        self._stamps: OrderedDict[JobId, int] = OrderedDict()
        self._forgotten = 0
        """The newest stamp no longer kept."""

    def ticket(self) -> int:
        return self._clock

    def get(self, job: JobId) -> JobSnapshot | None:
        found = self._snapshots.get(job)
        if found is not None:
            self._snapshots.move_to_end(job)
        return found

    def put(self, job: JobId, snapshot: JobSnapshot, ticket: int) -> None:
        """Keep ``snapshot``, read after :meth:`ticket` gave ``ticket``, unless the job was written since."""
        if self._stamps.get(job, self._forgotten) > ticket:
            return
        self._snapshots[job] = snapshot
        self._snapshots.move_to_end(job)
        if len(self._snapshots) > self._size:
            self._snapshots.popitem(last=False)

    def invalidate(self, job: JobId) -> None:
        self._clock += 1
        self._snapshots.pop(job, None)
        self._stamps[job] = self._clock
        self._stamps.move_to_end(job)
        if len(self._stamps) > self._size:
            _, self._forgotten = self._stamps.popitem(last=False)


class Jobs:
    """Creates, reads and changes jobs, versions and aliases."""

    def __init__(self, store: RegistryStore, git: GitResolver) -> None:
        self._store = store
        self._git = git
        self._versions: VersionCache[tuple[int, datetime, int], JobVersion] = VersionCache()
        self._snapshots = JobSnapshots()

    @asynccontextmanager
    async def _write_job(self, key: JobKey) -> AsyncIterator[Tx]:
        """A write transaction that may change what references to the job resolve to: once it has ended
        (committed, or not), this process's next resolve of the job reads it anew."""
        try:
            async with self._store.write() as tx:
                yield tx
        finally:
            self._snapshots.invalidate((key.project, key.job))

    async def create_job(self, key: JobKey, *, description: str, request_id: str) -> Job:
        _check_description(description, field="job.description")
        fingerprint = request_fingerprint({"job": key.name, "description": description})
        async with self._store.write() as tx:
            if request_id and (replayed := await tx.replay("CreateJob", request_id, fingerprint)):
                return await self._require_job(tx, JobKey.parse(replayed, field="request_id"))
            now = _now()
            await tx.ensure_project(key.project, now)
            row = JobRow(
                project_id=key.project,
                job_id=key.job,
                description=description,
                version_count=0,
                create_time=now,
                update_time=now,
            )
            if not await tx.insert_job(row):
                raise AlreadyExists(
                    "JOB_ALREADY_EXISTS", f"job {key.name} already exists", metadata={"resource": key.name}
                )
            if request_id:
                await tx.remember("CreateJob", request_id, fingerprint, key.name)
            return _job(row, {})

    async def get_job(self, key: JobKey) -> Job:
        async with self._store.read() as tx:
            return await self._require_job(tx, key)

    async def list_jobs(
        self, project: str, *, prefix: str, page: PageRequest
    ) -> tuple[list[Job], str | None]:
        """One page of jobs ordered by id, and the id to continue after (None at the end)."""
        async with self._store.read() as tx:
            if not await tx.project_exists(project):
                raise project_not_found(project)
            after = str(page.after[0]) if page.after else None
            rows = await tx.jobs(project, prefix=prefix, after=after, limit=page.size + 1)
            aliases = await tx.aliases([_pk(row) for row in rows[: page.size]])
        jobs = [_job(row, aliases[_pk(row)]) for row in rows[: page.size]]
        return jobs, (rows[page.size - 1].job_id if len(rows) > page.size else None)

    async def update_job(self, key: JobKey, *, description: str | None) -> Job:
        """Change the given fields (None: keep)."""
        if description is not None:
            _check_description(description, field="job.description")
        async with self._store.write() as tx:
            row = await self._require_job_row(tx, key, for_update=True)
            if description is not None and description != row.description:
                row.description = description
                row.update_time = _now()
            return await self._load_job(tx, row)

    async def delete_job(self, key: JobKey) -> None:
        async with self._write_job(key) as tx:
            await tx.delete_job(await self._require_job_row(tx, key, for_update=True))

    async def create_version(
        self,
        key: JobKey,
        spec: VersionSpec,
        *,
        aliases: list[str],
        allow_missing: bool,
        request_id: str,
    ) -> CreatedVersion:
        """Store the next version of the job, or return the newest if its content is the same."""
        problems = Problems()
        check_spec(spec, problems)
        for index, alias in enumerate(aliases):
            with problems.collect():
                check_alias(alias, field=f"aliases[{index}]")
        problems.raise_if_any()
        fingerprint = request_fingerprint(
            {
                "job": key.name,
                "content": to_document(spec),
                "description": spec.description,
                "aliases": aliases,
                "allow_missing": allow_missing,
            }
        )
        if request_id:
            async with self._store.read() as tx:
                if replayed := await tx.replay("CreateJobVersion", request_id, fingerprint):
                    return await self._replay_version(tx, replayed)
        if not allow_missing:
            async with self._store.read() as tx:
                if await tx.job(key.project, key.job) is None:
                    raise _job_not_found(key)
        if isinstance(spec.source, GitSource):
            commit = await self._git.resolve(spec.source.url, spec.source.ref)
            spec = replace(spec, source=replace(spec.source, commit=commit))
        async with self._write_job(key) as tx:
            if request_id and (replayed := await tx.replay("CreateJobVersion", request_id, fingerprint)):
                return await self._replay_version(tx, replayed)
            now = _now()
            if allow_missing:
                row = await tx.ensure_job(key.project, key.job, now)
            elif (found := await tx.job(key.project, key.job, for_update=True)) is not None:
                row = found
            else:
                raise _job_not_found(key)
            if isinstance(spec.source, CodeSource):
                artifact = await tx.artifact(key.project, spec.source.sha256)
                if artifact is None:
                    name = f"projects/{key.project}/artifacts/{spec.source.sha256}"
                    raise NotFound(
                        "ARTIFACT_NOT_FOUND",
                        f"artifact {name} does not exist: upload it first",
                        metadata={"resource": name},
                    )
                spec = replace(spec, source=replace(spec.source, size_bytes=artifact.size_bytes))
            digest = content_digest(spec)
            newest = await tx.version(_pk(row), row.version_count - 1) if row.version_count else None
            reused = newest is not None and newest.digest == digest
            if newest is not None and reused:
                version_row = newest
            else:
                version_row = JobVersionRow(
                    job_pk=_pk(row),
                    version=row.version_count,
                    content=to_document(spec),
                    digest=digest,
                    description=spec.description,
                    create_time=now,
                )
                tx.add(version_row)
                row.version_count += 1
                row.update_time = now
            for alias in aliases:
                await tx.set_alias(_pk(row), alias, version_row.version)
            if aliases:
                row.update_time = now
            if request_id:
                result = json.dumps({"version": key.version_name(version_row.version), "reused": reused})
                await tx.remember("CreateJobVersion", request_id, fingerprint, result)
            job = await self._load_job(tx, row)
            return CreatedVersion(_version(key, version_row, job), reused, job)

    async def _replay_version(self, tx: Tx, replayed: str) -> CreatedVersion:
        recorded = json.loads(replayed)
        version_key = JOB_VERSION.parse(recorded["version"], field="request_id")
        key = JobKey(version_key["project"], version_key["job"])
        version = await self._resolve(tx, JobReference(key, version=int(version_key["version"])), ticket=None)
        return CreatedVersion(version, bool(recorded["reused"]), await self._require_job(tx, key))

    async def resolve(self, reference: JobReference) -> JobVersion:
        """The one version a job reference names: from memory when this process holds a current snapshot
        of the job and the version's content, else read (and kept)."""
        job_id = (reference.job.project, reference.job.job)
        ticket = self._snapshots.ticket()
        if (snapshot := await self._current_snapshot(job_id)) is not None:
            number = _number(reference, snapshot)
            if (cached := self._versions.get(version_key(snapshot, number))) is not None:
                return replace(cached, aliases=_aliases_of(snapshot.job, number))
            async with self._store.read() as tx:
                if (version_row := await tx.version(snapshot.pk, number)) is not None:
                    return self._kept(reference, version_row, snapshot)
            # The job was deleted since its snapshot was checked: read why it is not found.
        async with self._store.read() as tx:  # its first read begins after the ticket
            return await self._resolve(tx, reference, ticket=ticket)

    async def resolve_in(self, tx: Tx, reference: JobReference) -> JobVersion:
        """:meth:`resolve` in the caller's transaction, from what it reads (whose snapshot of the database
        may be older than a write this process saw, so it keeps no snapshot of the job)."""
        return await self._resolve(tx, reference, ticket=None)

    async def _current_snapshot(self, job_id: JobId) -> JobSnapshot | None:
        """This process's snapshot of the job, if it is still what the database holds."""
        snapshot = self._snapshots.get(job_id)
        if snapshot is None or not self._store.shared:  # on SQLite every write is this process's own
            return snapshot
        if await self._store.job_state(*job_id) != snapshot.state:
            return None  # written by another registry, deleted, or deleted and made anew
        return snapshot

    async def _resolve(self, tx: Tx, reference: JobReference, *, ticket: int | None) -> JobVersion:
        """Resolve by reading the job; keep its snapshot when ``ticket`` (taken before ``tx`` began) says
        it may be kept."""
        found = await tx.job_and_aliases(reference.job.project, reference.job.job)
        if found is None:
            raise await self._missing(tx, reference.job)
        snapshot = JobSnapshot.of(*found)
        if ticket is not None:
            self._snapshots.put((reference.job.project, reference.job.job), snapshot, ticket)
        number = _number(reference, snapshot)
        if (cached := self._versions.get(version_key(snapshot, number))) is not None:
            return replace(cached, aliases=_aliases_of(snapshot.job, number))
        version_row = await tx.version(snapshot.pk, number)
        if version_row is None:
            raise _version_not_found(str(reference), f"the job has no version v{number}")
        return self._kept(reference, version_row, snapshot)

    def _kept(self, reference: JobReference, row: JobVersionRow, snapshot: JobSnapshot) -> JobVersion:
        """The version ``row`` holds, its content kept for the next resolve."""
        version = _version(reference.job, row, snapshot.job)
        self._versions.put(version_key(snapshot, version.version), replace(version, aliases=()))
        return version

    async def list_versions(self, key: JobKey, *, page: PageRequest) -> tuple[list[JobVersion], int | None]:
        """One page of versions, newest first, and the number to continue before (None at the end)."""
        async with self._store.read() as tx:
            row = await self._require_job_row(tx, key)
            job = await self._load_job(tx, row)
            before = int(page.after[0]) if page.after else None
            rows = await tx.versions(_pk(row), before=before, limit=page.size + 1)
        versions = [_version(key, version_row, job) for version_row in rows[: page.size]]
        return versions, (rows[page.size - 1].version if len(rows) > page.size else None)

    async def set_alias(self, key: JobKey, alias: str, version: int) -> Job:
        check_alias(alias, field="alias")
        async with self._write_job(key) as tx:
            row = await self._require_job_row(tx, key, for_update=True)
            if version < 0 or await tx.version(_pk(row), version) is None:
                raise _version_not_found(f"{key.name}:v{version}", f"the job has no version v{version}")
            await tx.set_alias(_pk(row), alias, version)
            row.update_time = _now()
            return await self._load_job(tx, row)

    async def delete_alias(self, key: JobKey, alias: str) -> Job:
        check_alias(alias, field="alias")
        async with self._write_job(key) as tx:
            row = await self._require_job_row(tx, key, for_update=True)
            if not await tx.delete_alias(_pk(row), alias):
                reference = f"{key.name}:{alias}"
                raise NotFound(
                    "ALIAS_NOT_FOUND",
                    f"job {key.name} has no alias {alias!r}",
                    metadata={"resource": reference},
                )
            row.update_time = _now()
            return await self._load_job(tx, row)

    async def _require_job_row(self, tx: Tx, key: JobKey, *, for_update: bool = False) -> JobRow:
        row = await tx.job(key.project, key.job, for_update=for_update)
        if row is not None:
            return row
        raise await self._missing(tx, key)

    async def _missing(self, tx: Tx, key: JobKey) -> NotFound:
        """Why a job that is not there is not found: its project, or just the job."""
        if not await tx.project_exists(key.project):
            return project_not_found(key.project)
        return _job_not_found(key)

    async def _require_job(self, tx: Tx, key: JobKey) -> Job:
        return await self._load_job(tx, await self._require_job_row(tx, key))

    async def _load_job(self, tx: Tx, row: JobRow) -> Job:
        aliases = await tx.aliases([_pk(row)])
        return _job(row, aliases[_pk(row)])


def _pk(row: JobRow) -> int:
    assert row.id is not None, "a stored job has an id"
    return row.id


def _job(row: JobRow, user_aliases: dict[str, int]) -> Job:
    aliases = dict(user_aliases)
    if row.version_count:
        aliases[LATEST] = row.version_count - 1
    return Job(
        key=JobKey(row.project_id, row.job_id),
        description=row.description,
        version_count=row.version_count,
        aliases=aliases,
        create_time=row.create_time,
        update_time=row.update_time,
    )


def _number(reference: JobReference, snapshot: JobSnapshot) -> int:
    """The number of the version ``reference`` names in the job as ``snapshot`` holds it."""
    aliases = snapshot.job.aliases
    if reference.version is not None:
        number = reference.version
    elif (alias := reference.alias or LATEST) in aliases:
        number = aliases[alias]
    elif alias == LATEST:
        raise _version_not_found(str(reference), "the job has no versions yet")
    else:
        raise _version_not_found(str(reference), f"the job has no alias {alias!r}")
    if not 0 <= number < snapshot.job.version_count:  # versions are numbered 0 to the count, none removed
        raise _version_not_found(str(reference), f"the job has no version v{number}")
    return number


def _version(key: JobKey, row: JobVersionRow, job: Job) -> JobVersion:
    return JobVersion(
        job=key,
        version=row.version,
        spec=from_document(row.content, row.description),
        digest=row.digest,
        aliases=_aliases_of(job, row.version),
        create_time=row.create_time,
    )


def _aliases_of(job: Job, number: int) -> tuple[str, ...]:
    return tuple(sorted(alias for alias, pointed in job.aliases.items() if pointed == number))
