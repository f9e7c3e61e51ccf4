"""The registry's schema and its behaviour under concurrent writers, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import takeoff_registry.named_artifacts_store
import takeoff_registry.store
from takeoff.v1 import common_pb2, jobs_pb2, runs_pb2
from takeoff_server.database import Database
from tests.postgres import assert_on_postgresql
from tests.registry.conftest import Registry, make_tarball, stream, upload_messages

MIGRATIONS = Path(takeoff_registry.store.__file__).with_name("migrations")


def _registry_tables(item: Any, name: str | None, kind: str, reflected: bool, compare_to: Any) -> bool:
    if kind != "table":
        return True
    return name is not None and name.startswith("registry_") and name != "registry_schema_version"


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"include_object": _registry_tables})
    return list(compare_metadata(context, SQLModel.metadata))


async def test_migrations_build_exactly_the_tables_the_store_declares(database_url: str) -> None:
    database = Database("registry", database_url, migrations=MIGRATIONS)
    try:
        assert await database.migrate() == "0007"
        if database_url.startswith("postgresql"):
            assert "registry_jobs" in await assert_on_postgresql(database.engine)
        async with database.engine.connect() as connection:
            differences = await connection.run_sync(_differences)
    finally:
        await database.close()

    assert differences == []


async def test_concurrent_metric_writers_lose_nothing(registry: Registry) -> None:
    run = (await registry.runs.CreateRun(runs_pb2.CreateRunRequest(parent="projects/demo"))).run

    async def writer(writer_number: int) -> None:
        for batch in range(5):
            await registry.runs.BatchLogMetrics(
                runs_pb2.BatchLogMetricsRequest(
                    name=run.name,
                    rows=[
                        runs_pb2.MetricRow(step=writer_number * 1000 + batch * 100 + n, values={"x": 1.0})
                        for n in range(100)
                    ],
                )
            )

    await asyncio.gather(*(writer(number) for number in range(8)))

    got = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))).run
    assert got.history_length == 4000
    indexes, steps = [], []
    async for message in registry.runs.ReadMetrics(runs_pb2.ReadMetricsRequest(name=run.name)):
        indexes += [row.index for row in message.rows]
        steps += [row.step for row in message.rows]
    assert indexes == list(range(4000))
    assert sorted(steps) == sorted(
        w * 1000 + b * 100 + n for w in range(8) for b in range(5) for n in range(100)
    )


async def test_concurrent_first_versions_of_a_new_job_get_distinct_numbers(registry: Registry) -> None:
    async def create(minor: int) -> jobs_pb2.CreateJobVersionResponse:
        return await registry.jobs.CreateJobVersion(
            jobs_pb2.CreateJobVersionRequest(
                parent="projects/demo/jobs/train",
                allow_missing=True,
                version=common_pb2.JobVersion(
                    source=common_pb2.JobSource(image=common_pb2.ImageSource(reference=f"python:3.{minor}"))
                ),
            )
        )

    created = await asyncio.gather(*(create(minor) for minor in range(6)))

    assert sorted(response.version.version for response in created) == list(range(6))
    job = await registry.jobs.GetJob(jobs_pb2.GetJobRequest(name="projects/demo/jobs/train"))
    assert job.job.version_count == 6


async def test_concurrent_uploads_of_one_artifact_record_it_once(registry: Registry) -> None:
    data = make_tarball({"train.py": b"print(1)\n"})

    responses = await asyncio.gather(
        *(registry.jobs.UploadArtifact(stream(upload_messages("demo", data))) for _ in range(4))
    )

    assert sorted(response.already_existed for response in responses) == [False, True, True, True]
    assert await registry.count_rows("registry_artifacts") == 1
    assert len(registry.stored_files()) == 1
