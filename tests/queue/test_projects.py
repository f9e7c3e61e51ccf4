"""Where projects exist (common.proto): a read in a project never written to is PROJECT_NOT_FOUND; a project
written to through the queue (its queues deleted since, the service restarted since) or only through the
registry (a job, a run) is there; and without the registry the queue says it cannot tell, never NOT_FOUND.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import takeoff_queue.store
from takeoff.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, queue_pb2, queue_pb2_grpc, runs_pb2, runs_pb2_grpc
from takeoff_queue.settings import QueueSettings
from takeoff_server.database import Database
from tests.postgres import postgres_schema_url
from tests.processes import service_process
from tests.queue.harness import AdminKeyOnly, error_details, in_process_queue, keyed_channel

Stub: TypeAlias = "queue_pb2_grpc.QueueServiceAsyncStub"  # a type only the stubs know

NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
LOCAL_PROCESS = common_pb2.RESOURCE_KIND_LOCAL_PROCESS
MIGRATIONS = Path(takeoff_queue.store.__file__).with_name("migrations")


def fresh_project() -> str:
    return f"projects/p-{uuid.uuid4().hex[:12]}"


async def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value.code(), error_details(raised.value)[0]


async def create_queue(queues: Stub, project: str) -> str:
    request = queue_pb2.CreateQueueRequest(
        parent=project, queue_id="q", queue=queue_pb2.Queue(resource=LOCAL_PROCESS)
    )
    return (await queues.CreateQueue(request)).queue.name


async def listed(queues: Stub, project: str) -> list[str]:
    return [
        queue.name for queue in (await queues.ListQueues(queue_pb2.ListQueuesRequest(parent=project))).queues
    ]


async def write_in_registry(address: str, project: str, what: str) -> None:
    """Write ``what`` ("job" or "run") into ``project`` through the registry only."""
    async with keyed_channel(address) as channel:
        if what == "job":
            request = jobs_pb2.CreateJobRequest(parent=project, job_id="only-job")
            await jobs_pb2_grpc.JobServiceStub(channel).CreateJob(request)
        else:
            await runs_pb2_grpc.RunServiceStub(channel).CreateRun(runs_pb2.CreateRunRequest(parent=project))


async def test_reads_in_a_project_never_written_to_are_project_not_found(settings: QueueSettings) -> None:
    project = fresh_project()
    async with in_process_queue(settings) as service:
        queues = service.queues
        for call in (
            queues.ListQueues(queue_pb2.ListQueuesRequest(parent=project)),
            queues.GetQueue(queue_pb2.GetQueueRequest(name=f"{project}/queues/q")),
            queues.ListItems(queue_pb2.ListItemsRequest(parent=f"{project}/queues/q")),
            queues.ListItems(queue_pb2.ListItemsRequest(parent=f"{project}/queues/-")),
            queues.GetItem(queue_pb2.GetItemRequest(name=f"{project}/queues/q/items/i")),
        ):
            assert await refused(call) == (NOT_FOUND, "PROJECT_NOT_FOUND")


@pytest.mark.parametrize("what", ["job", "run"])
async def test_a_project_written_to_only_in_the_registry_has_no_queues(
    settings: QueueSettings, what: str
) -> None:
    project = fresh_project()
    await write_in_registry(settings.registry_address, project, what)
    async with in_process_queue(settings) as service:
        queues = service.queues
        assert await listed(queues, project) == []
        items = await queues.ListItems(queue_pb2.ListItemsRequest(parent=f"{project}/queues/-"))
        assert list(items.items) == []
        missing = queues.GetQueue(queue_pb2.GetQueueRequest(name=f"{project}/queues/q"))
        assert await refused(missing) == (NOT_FOUND, "QUEUE_NOT_FOUND")


async def test_a_project_whose_only_queue_was_deleted_has_no_queues_after_a_restart(
    settings: QueueSettings,
) -> None:
    project = fresh_project()  # the registry never hears of it: only the queue's own record can tell
    async with in_process_queue(settings) as first:
        created = await create_queue(first.queues, project)
        await first.queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=created))
        assert await listed(first.queues, project) == []
    async with in_process_queue(settings) as second:
        assert await listed(second.queues, project) == []
        missing = second.queues.GetQueue(queue_pb2.GetQueueRequest(name=created))
        assert await refused(missing) == (NOT_FOUND, "QUEUE_NOT_FOUND")


async def test_without_the_registry_an_unknown_project_is_unavailable_and_a_known_one_answers(
    settings: QueueSettings, tmp_path: Path
) -> None:
    in_registry, in_queue, unknown = fresh_project(), fresh_project(), fresh_project()
    with service_process("registry", tmp_path / "registry") as registry:
        await write_in_registry(registry.address, in_registry, "job")
        own_registry = settings.model_copy(update={"registry_address": registry.address})
        async with in_process_queue(own_registry) as service:
            queues = service.queues
            queue = await create_queue(queues, in_queue)
            assert await listed(queues, in_registry) == []  # the registry's yes is kept
            registry.terminate()

            assert await listed(queues, in_registry) == []
            assert await listed(queues, in_queue) == [queue]
            for call in (
                queues.ListQueues(queue_pb2.ListQueuesRequest(parent=unknown)),
                queues.GetQueue(queue_pb2.GetQueueRequest(name=f"{unknown}/queues/q")),
                queues.ListItems(queue_pb2.ListItemsRequest(parent=f"{unknown}/queues/-")),
            ):
                assert await refused(call) == (UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")

        # Restarted while the registry is away, the queue cannot verify keys through it: the admin key is
        # admitted here without it, since what is tested is the queue's own record.
        async with in_process_queue(own_registry, verifier=AdminKeyOnly()) as restarted:
            assert await listed(restarted.queues, in_queue) == [queue]  # the queue's own record
            # The registry's yes was kept in memory only: the registry is that project's record.
            unasked = restarted.queues.ListQueues(queue_pb2.ListQueuesRequest(parent=in_registry))
            assert await refused(unasked) == (UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")


@pytest.fixture
def empty_database_url(queue_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """A database the queue service never ran on, of the kind ``queue_env`` names."""
    if "TAKEOFF_DATABASE_URL" not in queue_env:
        yield f"sqlite:///{tmp_path / 'queue.db'}"
        return
    with postgres_schema_url("queue_migration") as url:
        yield url


def _queue_tables(item: Any, name: str | None, kind: str, reflected: bool, compare_to: Any) -> bool:
    if kind != "table":
        return True
    return name is not None and name.startswith("queue_") and name != "queue_schema_version"


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"include_object": _queue_tables})
    return list(compare_metadata(context, SQLModel.metadata))


async def test_migrations_build_exactly_the_tables_the_store_declares(empty_database_url: str) -> None:
    database = Database("queue", empty_database_url, migrations=MIGRATIONS)
    try:
        assert await database.migrate() == "0006"
        async with database.engine.connect() as connection:
            differences = await connection.run_sync(_differences)
    finally:
        await database.close()
    assert differences == []


async def test_the_migration_records_the_projects_of_the_queues_stored_before_it(
    empty_database_url: str, tmp_path: Path
) -> None:
    first_only = tmp_path / "migrations"
    first_only.mkdir()
    shutil.copy(MIGRATIONS / "0001_initial.py", first_only)
    before = Database("queue", empty_database_url, migrations=first_only)
    try:
        assert await before.migrate() == "0001"
        async with before.engine.begin() as connection:
            for name in ("projects/old/queues/a", "projects/old/queues/b", "projects/other/queues/a"):
                row = {**_QUEUE_COLUMNS, "name": name, "project": name.rsplit("/queues/", 1)[0]}
                # The table as revision 0001 has it: only these columns (later ones do not exist yet).
                columns = takeoff_queue.store.queues.c
                table = sa.table("queue_queues", *(sa.column(key, columns[key].type) for key in row))
                await connection.execute(table.insert().values(**row))
    finally:
        await before.close()

    after = Database("queue", empty_database_url, migrations=MIGRATIONS)
    try:
        assert await after.migrate() == "0006"
        stored = await takeoff_queue.store.QueueStore(after).load()
    finally:
        await after.close()
    assert sorted(stored.projects) == ["projects/old", "projects/other"]


_CREATED = datetime(2026, 1, 1, tzinfo=UTC)
_QUEUE_COLUMNS: dict[str, Any] = {
    "resource": "local-process",
    "description": "",
    "resource_config": {},
    "template_variables": {},
    "prioritization": False,
    "max_attempts": 3,
    "retry_job_failures": False,
    "retry_delay_seconds": 0.0,
    "start_timeout_seconds": 1800.0,
    "max_run_seconds": None,
    "concurrency_limit": 0,
    "paused": False,
    "container_name": "",
    "create_time": _CREATED,
    "update_time": _CREATED,
}
"""A queue_queues row as revision 0001 keeps it, but for its name and project."""
