"""GetJobVersion keeps versions in memory, never aliases: an alias moved, a version added or a job made
anew is seen by the next resolve, in this registry process and in another one on the same PostgreSQL
database (docs/design.md §16, services/takeoff_registry/jobs.py ``version_key``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from takeoff.v1 import jobs_pb2
from tests.postgres import postgres_schema_url
from tests.registry.conftest import Registry, registry_settings, start_registry, upload
from tests.registry.test_jobs import code_version, create_version, get_version

JOB = "projects/demo/jobs/train"


async def two_versions(registry: Registry) -> None:
    sha256 = await upload(registry, "demo")
    for script in ("first.py", "second.py"):
        await create_version(registry, JOB, code_version(sha256, entrypoint=("python", script)))


async def set_alias(registry: Registry, alias: str, version: int) -> None:
    await registry.jobs.SetJobAlias(jobs_pb2.SetJobAliasRequest(job=JOB, alias=alias, version=version))


async def test_an_alias_moved_is_resolved_to_its_new_version_at_once(registry: Registry) -> None:
    await two_versions(registry)
    await set_alias(registry, "prod", 0)
    assert (await get_version(registry, f"{JOB}:prod")).entrypoint == ["python", "first.py"]
    assert list((await get_version(registry, f"{JOB}/versions/1")).aliases) == ["latest"]

    await set_alias(registry, "prod", 1)

    moved = await get_version(registry, f"{JOB}:prod")
    assert (moved.version, list(moved.entrypoint)) == (1, ["python", "second.py"])
    assert list(moved.aliases) == ["latest", "prod"]
    assert list((await get_version(registry, f"{JOB}/versions/0")).aliases) == []
    await registry.jobs.DeleteJobAlias(jobs_pb2.DeleteJobAliasRequest(job=JOB, alias="prod"))
    assert list((await get_version(registry, f"{JOB}/versions/1")).aliases) == ["latest"]


async def test_a_job_made_anew_is_not_answered_with_the_deleted_jobs_versions(registry: Registry) -> None:
    """On SQLite the new job gets the deleted one's row id back: the cache tells them apart all the same."""
    await two_versions(registry)
    assert (await get_version(registry, f"{JOB}/versions/0")).entrypoint == ["python", "first.py"]
    await registry.jobs.DeleteJob(jobs_pb2.DeleteJobRequest(name=JOB))

    sha256 = await upload(registry, "demo")
    await create_version(registry, JOB, code_version(sha256, entrypoint=("python", "again.py")))

    again = await get_version(registry, f"{JOB}/versions/0")
    assert list(again.entrypoint) == ["python", "again.py"]
    assert list(again.aliases) == ["latest"]


@pytest.mark.postgres
async def test_another_registry_process_sees_an_alias_moved_and_a_version_added(tmp_path: Path) -> None:
    """Two registries on one PostgreSQL database, each with its own cache: what one writes, the other's
    next resolve answers with."""
    with postgres_schema_url("registry_test") as url:
        async for first in start_registry(registry_settings(tmp_path / "first", url)):
            async for second in start_registry(registry_settings(tmp_path / "second", url)):
                await two_versions(first)
                await set_alias(first, "prod", 0)
                assert (await get_version(second, f"{JOB}:prod")).version == 0
                assert (await get_version(second, f"{JOB}:latest")).version == 1

                await set_alias(first, "prod", 1)
                sha256 = await upload(first, "demo")
                await create_version(first, JOB, code_version(sha256, entrypoint=("python", "third.py")))

                assert (await get_version(second, f"{JOB}:prod")).version == 1
                newest = await get_version(second, f"{JOB}:latest")
                assert (newest.version, list(newest.entrypoint)) == (2, ["python", "third.py"])
                assert list((await get_version(second, f"{JOB}/versions/1")).aliases) == ["prod"]
