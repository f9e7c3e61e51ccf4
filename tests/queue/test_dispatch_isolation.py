"""One failing item, queue or write cannot break dispatch for the others, nor leave memory and store apart.

The queue service runs in this process (a real gRPC server on a loopback port, a real database), so that
a test can make one item's computation or one write fail and watch what the others get.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from takeoff.v1 import common_pb2, queue_pb2
from takeoff_queue import lifecycle
from takeoff_queue.lifecycle import ItemLife, ItemState
from takeoff_queue.model import Item, ResolvedJob
from takeoff_queue.settings import QueueSettings
from takeoff_queue.store import QueueWrite
from tests.queue.harness import InProcessQueue, ScriptedAgent, in_process_queue

LEASED = common_pb2.ITEM_STATE_LEASED
PENDING = common_pb2.ITEM_STATE_PENDING
FAILED = common_pb2.ITEM_STATE_FAILED
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED


async def test_durations_beyond_every_date_mean_never(settings: QueueSettings, job: str) -> None:
    # What the API bounds now, an older version stored: durations no date arithmetic can add.
    far_off = timedelta(seconds=315_576_000_000)  # the most a protobuf Duration holds: 10,000 years
    async with in_process_queue(settings) as service:
        far_queue, near_queue = await service.new_queue(), await service.new_queue()
        far = await service.enqueue(far_queue, job)
        near = await service.enqueue(near_queue, job)
        stored = replace(
            service.parts.dispatcher.queues[far_queue], start_timeout=far_off, retry_delay=far_off
        )

        async def write(tx: QueueWrite) -> None:
            await tx.update_queue(stored)

        await service.parts.store.write(write)

    async with in_process_queue(settings) as service:  # the index rebuilt from that store
        agent = await ScriptedAgent(service.address).connect([far_queue, near_queue], capacity=2)
        try:
            assignments = [(await agent.next("assignment")).assignment for _ in range(2)]
            received = {assignment.item.name: assignment for assignment in assignments}
            assert sorted(received) == sorted([far, near])
            assert received[far].start_deadline.ToDatetime(UTC) == lifecycle.NEVER
            ack = await agent.complete(received[far], FAILED, reason=common_pb2.FAILURE_REASON_BUILD_INFRA)
            assert ack.ack.state == PENDING
            waiting = await service.stored(far)
            assert waiting.eligible_time.ToDatetime(UTC) == lifecycle.NEVER  # tried again never
            assert (await agent.complete(received[near], SUCCEEDED)).ack.state == SUCCEEDED
        finally:
            await agent.close()


async def test_an_item_that_fails_to_assign_is_set_aside_and_another_queues_item_still_goes(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broken_queue, healthy_queue = await service.new_queue(), await service.new_queue()
    broken = await service.enqueue(broken_queue, job)
    healthy = await service.enqueue(healthy_queue, job)
    assign = lifecycle.assign

    def failing_for_broken(life: ItemLife, agent: str, now: datetime, **lease: Any) -> ItemLife:
        if broken.endswith(life.item_id):
            raise OverflowError("date value out of range")  # what a far-off deadline once raised
        return assign(life, agent, now, **lease)

    monkeypatch.setattr(lifecycle, "assign", failing_for_broken)
    agent = await ScriptedAgent(service.address).connect([broken_queue, healthy_queue], capacity=2)
    try:
        # One pass: the broken queue comes first in the agent's round robin, and fails.
        assignment = (await agent.next("assignment")).assignment
        assert assignment.item.name == healthy
        assert any(
            broken in record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR
        )

        # The failed item is where the store says it is: PENDING, held by nobody.
        assert (await service.stored(broken)).state == PENDING
        in_memory = service.held(broken)
        assert in_memory is not None
        assert in_memory.state is ItemState.PENDING
        agents = await service.queues.ListAgents(queue_pb2.ListAgentsRequest())
        assert [lease.item for a in agents.agents for lease in a.leases] == [healthy]

        # Once its queue changes, it is tried again, and goes.
        monkeypatch.setattr(lifecycle, "assign", assign)
        await service.queues.UpdateQueue(
            queue_pb2.UpdateQueueRequest(
                queue=queue_pb2.Queue(name=broken_queue, description="fixed"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            )
        )
        retried = (await agent.next("assignment")).assignment
        assert (retried.item.name, retried.attempt) == (broken, 1)
        assert (await service.stored(broken)).state == LEASED
    finally:
        await agent.close()


async def test_a_failed_claim_write_rolls_back_and_nothing_is_stranded(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_queue, other_queue = await service.new_queue(), await service.new_queue()
    one = await service.enqueue(one_queue, job)
    other = await service.enqueue(other_queue, job)
    save_item = QueueWrite.save_item
    failures: list[str] = []

    async def failing_once(
        self: QueueWrite, item_id: str, life: ItemLife, now: datetime, since: int, **fence: int
    ) -> bool:
        if one.endswith(item_id) and not failures:
            failures.append(item_id)
            raise RuntimeError("the database went away")
        return await save_item(self, item_id, life, now, since, **fence)

    monkeypatch.setattr(QueueWrite, "save_item", failing_once)
    agent = await ScriptedAgent(service.address).connect([one_queue, other_queue], capacity=2)
    try:
        # Both claims shared the failed transaction; both are rolled back, then made again.
        received = [(await agent.next("assignment")).assignment for _ in range(2)]
        assert failures, "the claim's write never failed: the case was not forced"
        assert sorted(a.item.name for a in received) == sorted([one, other])
        for assignment in received:
            assert (assignment.attempt, assignment.epoch) == (1, 1)
            stored = await service.stored(assignment.item.name)
            assert (stored.state, stored.lease_id) == (LEASED, assignment.lease_id)
            assert [t.to_state for t in stored.transitions] == [PENDING, LEASED]
            assert [t.to_state for t in assignment.item.transitions] == [PENDING, LEASED]
            in_memory = service.held(assignment.item.name)
            assert in_memory is not None
            assert in_memory.lease_id == assignment.lease_id
    finally:
        await agent.close()


async def test_an_enqueue_whose_commit_fails_leaves_no_phantom(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await service.new_queue()
    insert_item = QueueWrite.insert_item

    async def failing(self: QueueWrite, item: Item) -> int:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(QueueWrite, "insert_item", failing)
    with pytest.raises(grpc.aio.AioRpcError):
        await service.enqueue(queue, job)
    assert [item for item in service.parts.dispatcher.items.values() if item.queue == queue] == []

    monkeypatch.setattr(QueueWrite, "insert_item", insert_item)
    real = await service.enqueue(queue, job)
    agent = await ScriptedAgent(service.address).connect([queue], capacity=2)
    try:
        assignment = (await agent.next("assignment")).assignment
        assert assignment.item.name == real  # a phantom enqueued first would have come first
        listed = await service.queues.ListItems(queue_pb2.ListItemsRequest(parent=queue))
        assert [item.name for item in listed.items] == [real]
        assert [item.name for item in service.parts.dispatcher.items.values() if item.queue == queue] == [
            real
        ]
    finally:
        await agent.close()


async def test_two_tries_of_one_enqueue_at_once_make_one_item(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await service.new_queue()
    jobs = service.parts.book._jobs
    resolve = jobs.resolve
    both_past_the_first_lookup = asyncio.Barrier(2)

    async def resolve_together(project: str, reference: str) -> ResolvedJob:
        await both_past_the_first_lookup.wait()  # neither has committed: neither replays the other yet
        return await resolve(project, reference)

    monkeypatch.setattr(jobs, "resolve", resolve_together)
    request = queue_pb2.EnqueueRequest(queue=queue, job=job, request_id=uuid.uuid4().hex)
    first, second = await asyncio.gather(service.queues.Enqueue(request), service.queues.Enqueue(request))

    assert first.item.name == second.item.name
    listed = await service.queues.ListItems(queue_pb2.ListItemsRequest(parent=queue))
    assert [item.name for item in listed.items] == [first.item.name]
    assert [item.name for item in service.parts.dispatcher.items.values() if item.queue == queue] == [
        first.item.name
    ]
