"""GetJobVersion answers a job name or alias from memory, and never stale (docs/design.md §16 "GetJobVersion
and caching", services/takeoff_registry/jobs.py ``JobSnapshots``): an alias moved, a version added, an
alias or a job deleted is seen by the very next resolve, in the registry that wrote it (SQLite and
PostgreSQL) and in another one on the same PostgreSQL database; a read that raced a write never keeps
what it read.

Which resolves read the job is counted on ``Tx.job_and_aliases``, the read a resolve makes when it has no
current snapshot: the registries run in this process, so the count is theirs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
import pytest

from takeoff.v1 import jobs_pb2
from takeoff_registry.store import Tx, _HeldConnection
from tests.postgres import postgres_schema_url
from tests.registry.conftest import Registry, failure, registry_settings, start_registry
from tests.registry.test_jobs import create_version, get_version, image_version
from tests.registry.test_version_cache import set_alias

JOB = "projects/demo/jobs/train"
EVENT_WAIT = 30  # seconds; generous for a loaded machine, and only ever a bound, never a pace
T = TypeVar("T")


class JobReads:
    """Counts the resolves that read a job from the database (``Tx.job_and_aliases``) and can hold one
    such read, once it has read, until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._hold: tuple[asyncio.Event, asyncio.Event] | None = None
        read = Tx.job_and_aliases

        async def counted(tx: Tx, project_id: str, job_id: str) -> Any:
            self.count += 1
            found = await read(tx, project_id, job_id)
            if (hold := self._hold) is not None:
                self._hold = None
                done, release = hold
                done.set()
                await release.wait()
            return found

        monkeypatch.setattr(Tx, "job_and_aliases", counted)

    def hold_next(self) -> tuple[asyncio.Event, asyncio.Event]:
        """Hold the next read after it has read: (set once it has, set it to let the read go on)."""
        self._hold = (asyncio.Event(), asyncio.Event())
        return self._hold

    async def during(self, call: Awaitable[T]) -> tuple[T, int]:
        """What ``call`` returned, and how many job reads it made."""
        before = self.count
        result = await call
        return result, self.count - before


@pytest.fixture
def job_reads(monkeypatch: pytest.MonkeyPatch) -> JobReads:
    return JobReads(monkeypatch)


async def add_version(registry: Registry, tag: str) -> None:
    await create_version(registry, JOB, image_version(f"alpine:{tag}", entrypoint=["true"]))


async def resolved(registry: Registry, name: str) -> tuple[int, str, list[str]]:
    """The version ``name`` resolves to: its number, its image, its aliases."""
    version = await get_version(registry, name)
    return version.version, version.source.image.reference, list(version.aliases)


async def resolved_from_memory(
    registry: Registry, job_reads: JobReads, name: str
) -> tuple[int, str, list[str]]:
    """Resolve ``name`` until the registry answers it from memory (the first resolve may read the job and
    the version's content), so that the next write has a snapshot to make stale; that answer."""
    await resolved(registry, name)
    answer, reads = await job_reads.during(resolved(registry, name))
    assert reads == 0, name
    return answer


async def resolved_anew(registry: Registry, job_reads: JobReads, name: str) -> tuple[int, str, list[str]]:
    """What ``name`` resolves to, which the registry must read the job for."""
    answer, reads = await job_reads.during(resolved(registry, name))
    assert reads == 1, name
    return answer


async def not_found(registry: Registry, name: str) -> str:
    """The reason GetJobVersion of ``name`` fails NOT_FOUND with."""
    failed = await failure(registry.jobs.GetJobVersion(jobs_pb2.GetJobVersionRequest(name=name)))
    assert failed.code == grpc.StatusCode.NOT_FOUND, failed
    return failed.reason


async def test_a_resolve_reads_the_job_only_when_this_registry_has_no_current_snapshot(
    registry: Registry, job_reads: JobReads
) -> None:
    """The case the cache is for: every reference to a job resolved from memory until the job is written."""
    await add_version(registry, "3.19")
    await add_version(registry, "3.20")
    await set_alias(registry, "prod", 0)

    assert await job_reads.during(resolved(registry, f"{JOB}:prod")) == ((0, "alpine:3.19", ["prod"]), 1)
    for name, answer in [
        (f"{JOB}:prod", (0, "alpine:3.19", ["prod"])),
        (JOB, (1, "alpine:3.20", ["latest"])),
        (f"{JOB}:latest", (1, "alpine:3.20", ["latest"])),
        (f"{JOB}/versions/0", (0, "alpine:3.19", ["prod"])),
    ]:
        # Version 1's content was not read yet: a read of the version, not of the job.
        assert await job_reads.during(resolved(registry, name)) == (answer, 0), name

    await set_alias(registry, "prod", 1)
    assert await job_reads.during(resolved(registry, f"{JOB}:prod")) == (
        (1, "alpine:3.20", ["latest", "prod"]),
        1,
    )
    assert await job_reads.during(resolved(registry, f"{JOB}:prod")) == (
        (1, "alpine:3.20", ["latest", "prod"]),
        0,
    )


async def test_every_write_is_seen_by_the_next_resolve_in_the_registry_that_made_it(
    registry: Registry, job_reads: JobReads
) -> None:
    await add_version(registry, "3.19")
    await add_version(registry, "3.20")
    await set_alias(registry, "prod", 0)
    names = [JOB, f"{JOB}:prod", f"{JOB}/versions/0", f"{JOB}:v1"]

    async def cached(*names: str) -> None:
        for name in names:
            await resolved_from_memory(registry, job_reads, name)

    await cached(*names)
    await set_alias(registry, "prod", 1)  # an alias moved
    assert await resolved(registry, f"{JOB}:prod") == (1, "alpine:3.20", ["latest", "prod"])
    assert await resolved(registry, f"{JOB}/versions/0") == (0, "alpine:3.19", [])

    await cached(*names)
    await add_version(registry, "3.21")  # a version added: `latest` moves
    assert await resolved(registry, JOB) == (2, "alpine:3.21", ["latest"])
    assert await resolved(registry, f"{JOB}:v1") == (1, "alpine:3.20", ["prod"])

    await cached(*names)
    await registry.jobs.DeleteJobAlias(jobs_pb2.DeleteJobAliasRequest(job=JOB, alias="prod"))
    assert await not_found(registry, f"{JOB}:prod") == "JOB_VERSION_NOT_FOUND"
    assert await resolved(registry, f"{JOB}:v1") == (1, "alpine:3.20", [])

    await cached(JOB, f"{JOB}/versions/0")
    await registry.jobs.DeleteJob(jobs_pb2.DeleteJobRequest(name=JOB))
    for name in (JOB, f"{JOB}:latest", f"{JOB}/versions/0"):
        assert await not_found(registry, name) == "JOB_NOT_FOUND", name

    await add_version(registry, "3.22")  # the job made anew (on SQLite with the deleted one's row id)
    assert await resolved(registry, f"{JOB}/versions/0") == (0, "alpine:3.22", ["latest"])


async def test_a_read_that_began_before_an_alias_moved_is_answered_but_not_kept(
    registry: Registry, job_reads: JobReads
) -> None:
    """The read of a resolve is held after it has read the job, while the alias moves and the move's
    snapshot drop runs; then it goes on and answers what it read, a resolve concurrent with the move.
    The next resolve must not be answered from what that read found."""
    await add_version(registry, "3.19")
    await add_version(registry, "3.20")
    await set_alias(registry, "prod", 0)
    has_read, release = job_reads.hold_next()
    racing = asyncio.create_task(resolved(registry, f"{JOB}:prod"))
    await asyncio.wait_for(has_read.wait(), EVENT_WAIT)

    await set_alias(registry, "prod", 1)
    release.set()

    assert await asyncio.wait_for(racing, EVENT_WAIT) == (0, "alpine:3.19", ["prod"])
    assert await job_reads.during(resolved(registry, f"{JOB}:prod")) == (
        (1, "alpine:3.20", ["latest", "prod"]),
        1,
    )


@pytest.fixture
def two_registries_url() -> Iterator[str]:
    with postgres_schema_url("registry_alias_cache") as url:
        yield url


@pytest.mark.postgres
async def test_another_registry_sees_every_write_at_once(
    tmp_path: Path, two_registries_url: str, job_reads: JobReads
) -> None:
    """Two registries on one PostgreSQL database: the first writes, the second resolves. Each time the
    second has resolved the job from memory just before, and its next resolve reads the job again."""
    async for first in start_registry(registry_settings(tmp_path / "first", two_registries_url)):
        async for second in start_registry(registry_settings(tmp_path / "second", two_registries_url)):
            await add_version(first, "3.19")
            await add_version(first, "3.20")
            await set_alias(first, "prod", 0)

            assert await resolved_from_memory(second, job_reads, f"{JOB}:prod") == (
                0,
                "alpine:3.19",
                ["prod"],
            )
            await set_alias(first, "prod", 1)
            assert await resolved_anew(second, job_reads, f"{JOB}:prod") == (
                1,
                "alpine:3.20",
                ["latest", "prod"],
            )

            assert await resolved_from_memory(second, job_reads, JOB) == (
                1,
                "alpine:3.20",
                ["latest", "prod"],
            )
            await add_version(first, "3.21")
            assert await resolved_anew(second, job_reads, JOB) == (2, "alpine:3.21", ["latest"])

            assert await resolved_from_memory(second, job_reads, f"{JOB}:prod") == (
                1,
                "alpine:3.20",
                ["prod"],
            )
            await first.jobs.DeleteJobAlias(jobs_pb2.DeleteJobAliasRequest(job=JOB, alias="prod"))
            assert await not_found(second, f"{JOB}:prod") == "JOB_VERSION_NOT_FOUND"

            assert await resolved_from_memory(second, job_reads, f"{JOB}/versions/0") == (
                0,
                "alpine:3.19",
                [],
            )
            await first.jobs.DeleteJob(jobs_pb2.DeleteJobRequest(name=JOB))
            for name in (JOB, f"{JOB}/versions/0"):
                assert await not_found(second, name) == "JOB_NOT_FOUND", name

            await add_version(first, "3.22")  # made anew: a new row id, the same names
            assert await resolved(second, f"{JOB}/versions/0") == (0, "alpine:3.22", ["latest"])


@pytest.mark.postgres
async def test_a_cut_connection_for_the_checks_costs_a_retry_not_an_answer(
    tmp_path: Path, two_registries_url: str, job_reads: JobReads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection a PostgreSQL registry checks its snapshots on is ended by the server (as a database
    restart or a proxy would): the next resolve is answered all the same, from memory, its check made on
    a pooled connection, and the one after opens the connection again; the registry's stop closes it."""
    opened: list[psycopg.AsyncConnection[Any]] = []
    open_connection = _HeldConnection._open

    async def recorded(held: _HeldConnection) -> psycopg.AsyncConnection[Any]:
        connection = await open_connection(held)
        if connection not in opened:
            opened.append(connection)
        return connection

    monkeypatch.setattr(_HeldConnection, "_open", recorded)
    async for registry in start_registry(registry_settings(tmp_path / "home", two_registries_url)):
        await add_version(registry, "3.19")
        assert await resolved_from_memory(registry, job_reads, JOB) == (0, "alpine:3.19", ["latest"])
        [held] = opened
        with pytest.raises(psycopg.errors.AdminShutdown):
            await held.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        assert await job_reads.during(resolved(registry, JOB)) == ((0, "alpine:3.19", ["latest"]), 0)
        await add_version(registry, "3.20")
        assert await resolved_anew(registry, job_reads, JOB) == (1, "alpine:3.20", ["latest"])
        assert await resolved_from_memory(registry, job_reads, JOB) == (1, "alpine:3.20", ["latest"])
        assert held.closed
        assert len(opened) == 2
    assert opened[1].closed  # closed with the registry's engine
