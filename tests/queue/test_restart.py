"""kill -9 of the queue service mid-flight, then a restart: nothing lost; leases kept for a grace of one
TTL, and ended after it when their agent never returns."""

from __future__ import annotations

import signal
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from tests.postgres import assert_service_wrote_tables
from tests.processes import service_process
from tests.queue.conftest import LEASE_TTL_SECONDS
from tests.queue.harness import ScriptedAgent, keyed_channel, watch_until

SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
RUNNING = common_pb2.ITEM_STATE_RUNNING
PENDING = common_pb2.ITEM_STATE_PENDING
LEASED = common_pb2.ITEM_STATE_LEASED
FAILED = common_pb2.ITEM_STATE_FAILED


async def test_kill_9_then_restart_keeps_every_item_and_running_leases(
    tmp_path_factory: pytest.TempPathFactory, queue_env: dict[str, str], job: str
) -> None:
    home: Path = tmp_path_factory.mktemp("restart")
    env = queue_env
    with service_process("queue", home, env=env) as first:
        address = first.address
        if url := env.get("TAKEOFF_DATABASE_URL"):
            assert_service_wrote_tables(url, "queue_")  # the PostgreSQL variant runs there
        async with keyed_channel(address) as channel:
            queues = queue_pb2_grpc.QueueServiceStub(channel)
            queue = (
                await queues.CreateQueue(
                    queue_pb2.CreateQueueRequest(
                        parent="projects/qtest",
                        queue_id=f"restart-{uuid.uuid4().hex[:8]}",
                        queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
                    )
                )
            ).queue.name
            names = [
                (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item.name
                for _ in range(5)
            ]
        agent = await ScriptedAgent(address).connect([queue], capacity=2)
        running = (await agent.next("assignment")).assignment
        leased = (await agent.next("assignment")).assignment
        await agent.progress(running, RUNNING)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        await agent.vanish()

    with service_process("queue", home, env=env, listen=[address]) as second:
        back = await ScriptedAgent(second.address, agent_id=agent.agent_id).connect(
            [queue], capacity=2, held={running.lease_id: running.epoch, leased.lease_id: leased.epoch}
        )
        try:
            assert back.welcome is not None
            assert sorted(v.kept for v in back.welcome.lease_verdicts) == [True, True]
            for assignment in (running, leased):
                assert (await back.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
            for _ in range(3):
                assignment = (await back.next("assignment")).assignment
                assert assignment.attempt == 1
                assert (await back.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
        finally:
            await back.close()
        async with keyed_channel(second.address) as channel:
            queues = queue_pb2_grpc.QueueServiceStub(channel)
            items = (await queues.ListItems(queue_pb2.ListItemsRequest(parent=queue))).items
        assert sorted(item.name for item in items) == sorted(names)
        assert {item.state for item in items} == {SUCCEEDED}
        assert all(item.attempt == 1 for item in items)
        second.terminate()


async def test_sigterm_ends_lease_streams_with_unavailable_at_once(
    tmp_path_factory: pytest.TempPathFactory, queue_env: dict[str, str]
) -> None:
    home: Path = tmp_path_factory.mktemp("sigterm")
    env = {**queue_env, "TAKEOFF_SHUTDOWN_GRACE_SECONDS": "30"}
    with service_process("queue", home, env=env) as server:
        async with keyed_channel(server.address) as channel:
            queue = (
                await queue_pb2_grpc.QueueServiceStub(channel).CreateQueue(
                    queue_pb2.CreateQueueRequest(
                        parent="projects/qtest",
                        queue_id=f"term-{uuid.uuid4().hex[:8]}",
                        queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
                    )
                )
            ).queue.name
        agent = await ScriptedAgent(server.address).connect([queue])
        server.process.send_signal(signal.SIGTERM)
        ended = await agent.next(within=10)  # well inside the 30 s grace
        assert ended.WhichOneof("message") is None
        assert agent.error is not None
        assert agent.error.code() == grpc.StatusCode.UNAVAILABLE
        assert server.process.wait(timeout=10) == 0
        await agent.close()


async def test_leases_of_an_agent_that_never_returns_end_after_the_grace(
    tmp_path_factory: pytest.TempPathFactory, queue_env: dict[str, str], job: str
) -> None:
    home: Path = tmp_path_factory.mktemp("never-returns")
    with service_process("queue", home, env=queue_env) as first:
        address = first.address
        if url := queue_env.get("TAKEOFF_DATABASE_URL"):
            assert_service_wrote_tables(url, "queue_")  # the PostgreSQL variant runs there
        async with keyed_channel(address) as channel:
            queues = queue_pb2_grpc.QueueServiceStub(channel)
            queue = (
                await queues.CreateQueue(
                    queue_pb2.CreateQueueRequest(
                        parent="projects/qtest",
                        queue_id=f"gone-{uuid.uuid4().hex[:8]}",
                        queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
                    )
                )
            ).queue.name
            retried = (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item.name
            last_try = (
                await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, max_attempts=1))
            ).item.name
        agent = await ScriptedAgent(address).connect([queue], capacity=2)
        running = (await agent.next("assignment")).assignment
        await agent.next("assignment")
        await agent.progress(running, RUNNING)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        await agent.vanish()

    restarted_at = datetime.now(UTC)
    with service_process("queue", home, env=queue_env, listen=[address]) as second:
        async with keyed_channel(second.address) as channel:
            queues = queue_pb2_grpc.QueueServiceStub(channel)
            within = LEASE_TTL_SECONDS * 5
            # As the state table says: back to PENDING with attempts left, FAILED without.
            back = await watch_until(queues, retried, lambda item: item.state == PENDING, within=within)
            ended = await watch_until(queues, last_try, lambda item: item.state == FAILED, within=within)
            for item in (back, ended):
                assert item.reason == common_pb2.FAILURE_REASON_AGENT_LOST
                assert item.attempt == 1
                lost = item.transitions[-1]
                assert lost.reason == common_pb2.FAILURE_REASON_AGENT_LOST
                # Not before the grace: one lease TTL from the restart.
                assert lost.time.ToDatetime(UTC) >= restarted_at + timedelta(seconds=LEASE_TTL_SECONDS)

        rescuer = await ScriptedAgent(second.address).connect([queue])
        try:
            assignment = (await rescuer.next("assignment")).assignment
            assert (assignment.item.name, assignment.attempt) == (retried, 2)
            assert [t.to_state for t in assignment.item.transitions] == [
                PENDING,
                LEASED,
                RUNNING,
                PENDING,
                LEASED,
            ]
        finally:
            await rescuer.close()
        second.terminate()
