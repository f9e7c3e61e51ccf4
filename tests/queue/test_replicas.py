"""Two queue replicas on one PostgreSQL database (docs/design.md §5 "Several queue replicas"): agents spread
across them work through every item once; a cancel crosses replicas; a replica killed with -9 costs its
agents a reconnect, not their leases; the leases of an agent that died with its replica expire on the other.

Each test has a fresh database schema, the module's registry, and real ``python -m takeoff_queue``
processes with ``TAKEOFF_REPLICAS=true``; the agents are Lease streams the test drives (no job runs)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from tests.postgres import postgres_schema_url
from tests.processes import ServiceProcess
from tests.queue.harness import ScriptedAgent, Stub, keyed_channel, watch_until
from tests.queue.replicas_harness import (
    Assignment,
    HoldingAgent,
    Replica,
    Worker,
    all_items,
    queue_replicas,
    replica_env,
    work_through,
)

pytestmark = pytest.mark.postgres

PENDING = common_pb2.ITEM_STATE_PENDING
LEASED = common_pb2.ITEM_STATE_LEASED
RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
CANCELLED = common_pb2.ITEM_STATE_CANCELLED
AGENT_LOST = common_pb2.FAILURE_REASON_AGENT_LOST
LONG_TTL = 30.0
"""Longer than any of these tests: no lease expires unless a test waits for it to."""
SHORT_TTL = 2.0
ITEMS = 1000


@pytest.fixture
def database() -> Iterator[str]:
    with postgres_schema_url("queue_replicas") as url:
        yield url


@asynccontextmanager
async def two_replicas(
    home: Path, registry: ServiceProcess, database: str, *, lease_ttl: float = LONG_TTL, heartbeat: float = 5
) -> AsyncIterator[tuple[list[Replica], list[Stub]]]:
    """Two replicas on ``database`` and a QueueService client of each (the admin key)."""
    env = replica_env(registry.address, database, lease_ttl=lease_ttl, heartbeat=heartbeat)
    with queue_replicas(home, env) as replicas:
        async with AsyncExitStack() as stack:
            channels = [await stack.enter_async_context(keyed_channel(r.address)) for r in replicas]
            yield replicas, [queue_pb2_grpc.QueueServiceStub(channel) for channel in channels]


async def new_queue(queues: Stub) -> str:
    created = await queues.CreateQueue(
        queue_pb2.CreateQueueRequest(
            parent="projects/qtest",
            queue_id=f"replicas-{uuid.uuid4().hex[:8]}",
            queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
        )
    )
    return created.queue.name


async def enqueue(queues: Stub, queue: str, job: str) -> str:
    return (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item.name


@pytest.mark.timeout(240)  # 1,000 life cycles on the shared two-core machine; the work's own wait is 200 s
async def test_four_agents_on_two_replicas_run_1000_items_each_exactly_once(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    async with two_replicas(tmp_path, registry, database) as (replicas, stubs):
        queue = await new_queue(stubs[0])
        async with AsyncExitStack() as agents:
            workers = []
            for index in range(4):  # two per replica
                replica = replicas[index % 2]
                agent = await ScriptedAgent(replica.address).connect([queue], capacity=16)
                agents.push_async_callback(agent.close)
                await agents.enter_async_context(agent.heartbeating())
                workers.append(Worker(agent, replica.address))

            left = list(range(ITEMS))
            names: list[str] = []

            async def enqueuer(queues: Stub) -> None:
                while left:
                    left.pop()
                    names.append(await enqueue(queues, queue, f"{job}:v0"))  # numbered: resolved once

            # Through both replicas at once, while the agents work.
            await asyncio.gather(
                *(enqueuer(stubs[index % 2]) for index in range(16)),
                work_through(workers, ITEMS, within=200),
            )
        items = await all_items(stubs[1], queue)

    assignments = [assignment for worker in workers for assignment in worker.assignments]
    per_item = Counter(assignment.item.name for assignment in assignments)
    assert len(names) == len(set(names)) == ITEMS
    assert set(per_item) == set(names)  # none lost
    assert [name for name, count in per_item.items() if count != 1] == []  # none assigned twice
    assert {(assignment.epoch, assignment.attempt) for assignment in assignments} == {(1, 1)}
    for replica in replicas:  # both replicas dispatched
        assert sum(len(w.assignments) for w in workers if w.replica == replica.address) > 0
    assert sorted(item.name for item in items) == sorted(names)
    assert {(item.state, item.attempt) for item in items} == {(SUCCEEDED, 1)}
    for item in items:  # ended SUCCEEDED exactly once, from one lease
        assert [t.to_state for t in item.transitions] == [PENDING, LEASED, RUNNING, SUCCEEDED], item


async def test_a_cancel_issued_on_one_replica_reaches_the_agent_on_the_other(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    async with two_replicas(tmp_path, registry, database) as ((_, second), (on_first, on_second)):
        queue = await new_queue(on_first)
        agent = await ScriptedAgent(second.address).connect([queue])  # the only agent: on the second
        try:
            name = await enqueue(on_first, queue, job)
            assignment = (await agent.next("assignment")).assignment
            assert assignment.item.name == name
            assert (await agent.progress(assignment, RUNNING)).ack.state == RUNNING

            asked = await on_first.CancelItem(queue_pb2.CancelItemRequest(name=name, message="stop it"))
            assert asked.item.cancel_requested

            cancel = (await agent.next("cancel")).cancel
            assert (cancel.lease_id, cancel.item) == (assignment.lease_id, name)
            assert (await agent.complete(assignment, CANCELLED)).ack.state == CANCELLED
        finally:
            await agent.close()
        for queues in (on_first, on_second):
            item = await watch_until(queues, name, lambda item: item.state == CANCELLED)
            assert item.reason == common_pb2.FAILURE_REASON_CANCELLED
            assert item.transitions[-1].actor.startswith("keys/")  # who cancelled, on the other replica


async def test_agents_of_a_replica_killed_9_keep_their_leases_on_the_other(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    async with two_replicas(tmp_path, registry, database) as ((doomed, survivor), (on_doomed, on_survivor)):
        queue = await new_queue(on_doomed)
        # The agents list both replicas, as an agent's queue_address does: they use the first that answers.
        both = f"{doomed.address},{survivor.address}"
        agents = [await ScriptedAgent(both).connect([queue], capacity=2) for _ in range(2)]
        names = [await enqueue(on_survivor, queue, job) for _ in range(4)]
        held: dict[str, list[queue_pb2.LeaseResponse.Assignment]] = {}
        for agent in agents:  # two each: the room the four items fill
            held[agent.agent_id] = [(await agent.next("assignment")).assignment for _ in range(2)]
            for assignment in held[agent.agent_id]:
                assert (await agent.progress(assignment, RUNNING)).ack.state == RUNNING

        doomed.kill()
        for agent in agents:  # their streams were on the killed replica: they end
            assert (await agent.next()).WhichOneof("message") is None, "the stream outlived its replica"
            await agent.close()

        for agent in agents:
            mine = held[agent.agent_id]
            back = await ScriptedAgent(both, agent_id=agent.agent_id).connect(
                [queue], capacity=2, held={lease.lease_id: lease.epoch for lease in mine}
            )
            try:
                assert back.welcome is not None
                verdicts = {verdict.lease_id: verdict.kept for verdict in back.welcome.lease_verdicts}
                assert verdicts == {lease.lease_id: True for lease in mine}, back.welcome
                for assignment in mine:
                    assert (await back.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
            finally:
                await back.close()

        items = await all_items(on_survivor, queue)
        assert sorted(item.name for item in items) == sorted(names)
        for item in items:  # nothing ran twice, nothing was taken for lost
            assert (item.state, item.attempt) == (SUCCEEDED, 1), item
            assert [t.to_state for t in item.transitions] == [PENDING, LEASED, RUNNING, SUCCEEDED], item
            assert AGENT_LOST not in {t.reason for t in item.transitions}, item


async def test_leases_of_an_agent_that_died_with_its_replica_expire_on_the_other(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    async with two_replicas(tmp_path, registry, database, lease_ttl=SHORT_TTL, heartbeat=0.5) as (
        (doomed, survivor),
        (on_doomed, on_survivor),
    ):
        queue = await new_queue(on_doomed)
        hello_sent = datetime.now(UTC)
        lost = await ScriptedAgent(doomed.address).connect([queue])
        name = await enqueue(on_doomed, queue, job)
        first = (await lost.next("assignment")).assignment
        assert (await lost.progress(first, RUNNING)).ack.state == RUNNING

        rescuer = await ScriptedAgent(survivor.address).connect([queue])
        try:
            async with rescuer.heartbeating():
                doomed.kill()
                await lost.vanish()  # it never heartbeats again, nor comes back
                # The TTL, the registry's answer to the run's close, then the 1 s retry back-off.
                async with asyncio.timeout(SHORT_TTL * 5 + 1):  # a deadline across the heartbeats' Acks
                    retry = (await rescuer.next("assignment")).assignment
                assert (retry.item.name, retry.attempt, retry.epoch) == (name, 2, 2)
                assert (await rescuer.complete(retry, SUCCEEDED)).ack.state == SUCCEEDED
        finally:
            await rescuer.close()

        item = await watch_until(on_survivor, name, lambda item: item.state == SUCCEEDED)
        states = [t.to_state for t in item.transitions]
        assert states == [PENDING, LEASED, RUNNING, PENDING, LEASED, SUCCEEDED], item
        expired = item.transitions[3]
        assert (expired.reason, expired.attempt) == (AGENT_LOST, 1)
        # Ended by expiry (renewed at the Hello at the earliest), not by the replica's death.
        assert expired.time.ToDatetime(UTC) >= hello_sent + timedelta(seconds=SHORT_TTL)
        assert item.transitions[4].agent != item.transitions[1].agent


async def test_a_concurrency_limit_holds_across_replicas(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    limit, count = 2, 20
    async with two_replicas(tmp_path, registry, database) as (replicas, stubs):
        created = await stubs[0].CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent="projects/qtest",
                queue_id=f"limited-{uuid.uuid4().hex[:8]}",
                queue=queue_pb2.Queue(
                    resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS, concurrency_limit=limit
                ),
            )
        )
        queue = created.queue.name
        async with AsyncExitStack() as stack:
            agents: list[HoldingAgent] = []
            for index in range(4):  # two per replica, each with room for three
                agent = HoldingAgent(replicas[index % 2].address)
                await agent.connect([queue], capacity=3)
                stack.push_async_callback(agent.close)
                agents.append(agent)
            names = [await enqueue(stubs[index % 2], queue, job) for index in range(count)]

            # Held: an Assignment received and its Complete not yet sent. A replica claims only while the
            # queue's live count is under the limit, and a lease stops counting only once its Complete is
            # committed (after it was sent), so the agents together never hold more than the limit.
            held: list[tuple[HoldingAgent, Assignment]] = []
            most, assigned = 0, list[Assignment]()
            async with asyncio.timeout(60):
                while len(assigned) < count:
                    if not held:  # wait for the next Assignment, wherever it comes
                        waits = {asyncio.create_task(agent.next("assignment")): agent for agent in agents}
                        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                        for task in pending:
                            task.cancel()
                        if pending:
                            await asyncio.wait(pending)
                        # A wait cancelled just as its message came returns it (asyncio.wait_for, Python
                        # 3.11): that Assignment is held too, not dropped (it would hold a slot forever).
                        got = done | {task for task in pending if not task.cancelled()}
                        held += [(waits[task], task.result().assignment) for task in got]
                        assigned += [assignment for _, assignment in held]
                    for agent in agents:
                        arrived = await agent.assignments_so_far()
                        held += [(agent, assignment) for assignment in arrived]
                        assigned += arrived
                    most = max(most, len(held))
                    assert len(held) <= limit, [
                        (agent.address, a.item.name, a.assign_time.ToJsonString()) for agent, a in held
                    ]
                    agent, assignment = held.pop(0)
                    assert (await agent.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
                for agent, assignment in held:
                    assert (await agent.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
        items = await all_items(stubs[1], queue)

    assert most == limit  # the limit, not the agents' room, is what held them back
    assert sorted(assignment.item.name for assignment in assigned) == sorted(names)  # each once
    assert {(item.state, item.attempt) for item in items} == {(SUCCEEDED, 1)}
    assert len(items) == count


async def test_a_page_token_from_one_replica_is_honoured_by_the_other(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    async with two_replicas(tmp_path, registry, database) as (_, stubs):
        queue = await new_queue(stubs[0])
        names = [await enqueue(stubs[index % 2], queue, job) for index in range(5)]
        listed: list[str] = []
        token = ""
        for page in range(3):  # 2 + 2 + 1, each page from the other replica than the last
            response = await stubs[page % 2].ListItems(
                queue_pb2.ListItemsRequest(parent=queue, page_size=2, page_token=token)
            )
            listed += [item.name for item in response.items]
            token = response.next_page_token
        assert token == ""
    assert sorted(listed) == sorted(names)
    assert len(listed) == len(set(listed))


async def test_a_complete_resent_to_the_other_replica_after_its_ack_was_lost_is_acknowledged(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    async with two_replicas(tmp_path, registry, database) as ((doomed, survivor), (on_doomed, on_survivor)):
        queue = await new_queue(on_doomed)
        agent = await ScriptedAgent(doomed.address).connect([queue])
        name = await enqueue(on_doomed, queue, job)
        assignment = (await agent.next("assignment")).assignment
        assert (await agent.progress(assignment, RUNNING)).ack.state == RUNNING
        await agent.send(
            complete=queue_pb2.LeaseRequest.Complete(
                lease_id=assignment.lease_id, epoch=assignment.epoch, outcome=SUCCEEDED
            )
        )
        await watch_until(on_survivor, name, lambda item: item.state == SUCCEEDED)  # committed, seen there
        doomed.kill()  # the Ack, never read, is lost with its replica
        await agent.vanish()

        back = await ScriptedAgent(survivor.address, agent_id=agent.agent_id).connect(
            [queue], held={assignment.lease_id: assignment.epoch}
        )
        try:
            assert (await back.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED  # not LEASE_LOST
        finally:
            await back.close()
        item = await watch_until(on_survivor, name, lambda item: item.state == SUCCEEDED)
    assert [t.to_state for t in item.transitions] == [PENDING, LEASED, RUNNING, SUCCEEDED]
