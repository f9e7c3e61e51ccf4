"""Jobs, their immutable versions and movable aliases: JobService's rules, without any gRPC.

Projects exist once written to; reads in a project that never was fail with ``PROJECT_NOT_FOUND``.
Version numbers count up from 0 per job; ``latest`` is not stored but always means the newest version.

Resolving a reference (GetJobVersion, on the queue's dispatch path) reads the job's row and its aliases
in one query every time, so an alias moved or a version added by any registry process is
seen by the next resolve; only a version's content, which never changes, is kept in memory
(:func:`version_key`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from takeoff_registry.git_source import GitResolver
from takeoff_registry.refs import JOB_VERSION, LATEST, JobKey, JobReference, check_alias, project_not_found
from takeoff_registry.store import JobRow, JobVersionRow, RegistryStore, Tx
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
from takeoff_server.versions import VersionCache


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


def version_key(row: JobRow, number: int) -> tuple[int, datetime, int]:
    """Where a registry process keeps a version's content (:class:`takeoff_server.versions.VersionCache`).

    A version never changes once created, so an entry is never stale, whichever registry process made or
    changes the job: aliases (``latest`` included) are read from the database at every resolve and put on
    the cached content. The job's create time is in the key because a job deleted and made again may get
    its row id back (SQLite reuses the highest), never its create time; a deleted job's entries are simply
    never asked for again and age out."""
    return (_pk(row), row.create_time, number)


class Jobs:
    """Creates, reads and changes jobs, versions and aliases."""

    def __init__(self, store: RegistryStore, git: GitResolver) -> None:
        self._store = store
        self._git = git
        self._versions: VersionCache[tuple[int, datetime, int], JobVersion] = VersionCache()

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
        async with self._store.write() as tx:
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
        async with self._store.write() as tx:
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
        version = await self._resolve(tx, JobReference(key, version=int(version_key["version"])))
        return CreatedVersion(version, bool(recorded["reused"]), await self._require_job(tx, key))

    async def resolve(self, reference: JobReference) -> JobVersion:
        """The one version a job reference names."""
        async with self._store.read() as tx:
            return await self._resolve(tx, reference)

    async def resolve_in(self, tx: Tx, reference: JobReference) -> JobVersion:
        """:meth:`resolve` in the caller's transaction."""
        return await self._resolve(tx, reference)

    async def _resolve(self, tx: Tx, reference: JobReference) -> JobVersion:
        found = await tx.job_and_aliases(reference.job.project, reference.job.job)
        if found is None:
            raise await self._missing(tx, reference.job)
        row, user_aliases = found
        job = _job(row, user_aliases)
        if reference.version is not None:
            number = reference.version
        elif (alias := reference.alias or LATEST) in job.aliases:
            number = job.aliases[alias]
        elif alias == LATEST:
            raise _version_not_found(str(reference), "the job has no versions yet")
        else:
            raise _version_not_found(str(reference), f"the job has no alias {alias!r}")
        if not 0 <= number < row.version_count:  # versions are numbered 0 to the count, none ever removed
            raise _version_not_found(str(reference), f"the job has no version v{number}")
        if (cached := self._versions.get(version_key(row, number))) is not None:
            return replace(cached, aliases=_aliases_of(job, number))
        version_row = await tx.version(_pk(row), number)
        if version_row is None:
            raise _version_not_found(str(reference), f"the job has no version v{number}")
        version = _version(reference.job, version_row, job)
        self._versions.put(version_key(row, version.version), replace(version, aliases=()))
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
        async with self._store.write() as tx:
            row = await self._require_job_row(tx, key, for_update=True)
            if version < 0 or await tx.version(_pk(row), version) is None:
                raise _version_not_found(f"{key.name}:v{version}", f"the job has no version v{version}")
            await tx.set_alias(_pk(row), alias, version)
            row.update_time = _now()
            return await self._load_job(tx, row)

    async def delete_alias(self, key: JobKey, alias: str) -> Job:
        check_alias(alias, field="alias")
        async with self._store.write() as tx:
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
