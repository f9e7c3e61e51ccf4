"""A real registry and a real queue service (separate processes, loopback ports) for the queue tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from takeoff_queue.settings import QueueSettings
from tests.postgres import assert_service_wrote_tables, postgres_schema_url
from tests.processes import ServiceProcess, service_process
from tests.queue.harness import InProcessQueue, in_process_queue, keyed_channel, make_code_job

LEASE_TTL_SECONDS = 2.0
QUEUE_ENV = {
    "TAKEOFF_LEASE_TTL_SECONDS": str(LEASE_TTL_SECONDS),
    "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS": "0.5",
    "TAKEOFF_SHUTDOWN_GRACE_SECONDS": "1",
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qhome")


@pytest.fixture(scope="module")
def registry(home: Path) -> Iterator[ServiceProcess]:
    with service_process("registry", home) as process:
        yield process
        process.terminate()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def queue_env(request: pytest.FixtureRequest, registry: ServiceProcess) -> Iterator[dict[str, str]]:
    """The queue service's settings; each test module runs once on SQLite and once on PostgreSQL."""
    env = {**QUEUE_ENV, "TAKEOFF_REGISTRY_ADDRESS": registry.address}
    if request.param == "sqlite":
        yield env
        return
    with postgres_schema_url("queue_test") as url:
        yield {**env, "TAKEOFF_DATABASE_URL": url}


@pytest.fixture(scope="module")
def queue_service(home: Path, queue_env: dict[str, str]) -> Iterator[ServiceProcess]:
    with service_process("queue", home, env=queue_env) as process:
        if url := queue_env.get("TAKEOFF_DATABASE_URL"):
            assert_service_wrote_tables(url, "queue_")  # the PostgreSQL variant really runs there
        yield process
        process.terminate()


@pytest.fixture(scope="module")
def registry_address(registry: ServiceProcess) -> str:
    return registry.address


@pytest.fixture(scope="module")
def queue_address(queue_service: ServiceProcess) -> str:
    return queue_service.address


@pytest.fixture(scope="module")
def job(registry: ServiceProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    schema = {
        "type": "object",
        "properties": {"lr": {"type": "number", "default": 0.1}, "epochs": {"type": "integer"}},
    }
    make_code_job(registry.address, "qtest", "train", tmp_path_factory.mktemp("jobs"), schema=schema)
    return "train"


@pytest.fixture
async def queues(queue_service: ServiceProcess) -> AsyncIterator[queue_pb2_grpc.QueueServiceAsyncStub]:
    async with keyed_channel(queue_service.address) as channel:
        yield queue_pb2_grpc.QueueServiceStub(channel)


NewQueue = Callable[..., Awaitable[str]]


@pytest.fixture
def new_queue(queues: queue_pb2_grpc.QueueServiceAsyncStub) -> NewQueue:
    """Create a queue with a fresh id in project ``qtest``; returns its name."""

    async def create(**settings: Any) -> str:
        settings.setdefault("resource", common_pb2.RESOURCE_KIND_LOCAL_PROCESS)
        response = await queues.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent="projects/qtest",
                queue_id=f"q-{uuid.uuid4().hex[:10]}",
                queue=queue_pb2.Queue(**settings),
            )
        )
        return response.queue.name

    return create


# The queue service in this process, for tests that make one item, queue or write fail on purpose.
@pytest.fixture
def settings(tmp_path: Path, queue_env: dict[str, str], job: str) -> QueueSettings:
    return QueueSettings(
        home=tmp_path,
        listen=["127.0.0.1:0"],
        registry_address=queue_env["TAKEOFF_REGISTRY_ADDRESS"],
        database_url=queue_env.get("TAKEOFF_DATABASE_URL"),
        lease_ttl_seconds=30,
        heartbeat_interval_seconds=0.2,
    )


@pytest.fixture
async def service(settings: QueueSettings) -> AsyncIterator[InProcessQueue]:
    async with in_process_queue(settings) as service:
        yield service
