"""Retention in the queue (services/takeoff_queue/retention.py): one pass deletes ended items past their
age or beyond the count kept, with their history, and old request-id records; it never touches an item not
ended, whatever its age, nor its history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
import sqlalchemy as sa

from takeoff.v1 import common_pb2, queue_pb2
from takeoff_queue.retention import QueueRetention, QueueRetentionSettings
from takeoff_queue.store import QueueWrite, items, request_ids_rows, transitions
from tests.queue.harness import InProcessQueue, ScriptedAgent

RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
LONG_AGO = datetime.now(UTC) - timedelta(days=400)


async def _backdate(service: InProcessQueue, names: list[str]) -> None:
    """Every time of these items, their history and the request ids recorded for them, 400 days back."""
    ids = [name.rsplit("/", 1)[1] for name in names]

    async def write(tx: QueueWrite) -> None:
        connection = tx._batch.connection
        await connection.execute(
            items.update().where(items.c.id.in_(ids)).values(update_time=LONG_AGO, enqueue_time=LONG_AGO)
        )
        await connection.execute(
            items.update().where(items.c.id.in_(ids), items.c.end_time.is_not(None)).values(end_time=LONG_AGO)
        )
        await connection.execute(
            transitions.update().where(transitions.c.item_id.in_(ids)).values(time=LONG_AGO)
        )
        await connection.execute(
            request_ids_rows.update().where(request_ids_rows.c.result.in_(names)).values(create_time=LONG_AGO)
        )

    await service.parts.store.write(write)


async def _history_rows(service: InProcessQueue, name: str) -> int:
    async def read(tx: QueueWrite) -> int:
        query = sa.select(sa.func.count()).where(transitions.c.item_id == name.rsplit("/", 1)[1])
        return int((await tx._batch.execute(query)).scalar_one())

    return await service.parts.store.write(read)


async def _gone(service: InProcessQueue, name: str) -> bool:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await service.stored(name)
    return raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_pass_prunes_old_ended_items_and_request_ids_and_keeps_every_item_not_ended(
    service: InProcessQueue, job: str
) -> None:
    queue = await service.new_queue()
    agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
    try:
        old_done = await service.enqueue(queue, job)
        assignment = (await agent.next("assignment")).assignment
        await agent.progress(assignment, RUNNING)
        assert (await agent.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
        running = (
            await service.queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, request_id="keep-me"))
        ).item.name
        assignment = (await agent.next("assignment")).assignment
        assert assignment.item.name == running
        await agent.progress(assignment, RUNNING)
        pending = (
            await service.queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, request_id="old-id"))
        ).item.name
        await _backdate(service, [old_done, running, pending])
        recent_done = (await service.queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item.name
        await service.queues.CancelItem(queue_pb2.CancelItemRequest(name=recent_done))
        running_history = await _history_rows(service, running)

        settings = QueueRetentionSettings(ended_item_days=30, request_id_days=7)
        report = await QueueRetention(settings, service.parts.store, lambda: datetime.now(UTC)).prune()

        assert report == {"ended_items": 1, "request_ids": 2}
        assert await _gone(service, old_done)
        assert await _history_rows(service, old_done) == 0
        assert (await service.stored(running)).state == RUNNING
        assert await _history_rows(service, running) == running_history
        assert (await service.stored(pending)).state == common_pb2.ITEM_STATE_PENDING
        assert (await service.stored(recent_done)).state == common_pb2.ITEM_STATE_CANCELLED

        # By count: the newest ended items are kept, the others go whatever their age.
        newer_done = (await service.queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item.name
        await service.queues.CancelItem(queue_pb2.CancelItemRequest(name=newer_done))
        by_count = QueueRetentionSettings(ended_item_days=30, max_ended_items=1)
        report = await QueueRetention(by_count, service.parts.store, lambda: datetime.now(UTC)).prune()
        assert report["ended_items"] == 1
        assert await _gone(service, recent_done)
        assert (await service.stored(newer_done)).state == common_pb2.ITEM_STATE_CANCELLED
        assert (await service.stored(running)).state == RUNNING
        assert (await service.stored(pending)).state == common_pb2.ITEM_STATE_PENDING
    finally:
        await agent.close()


def test_retention_settings_refuse_less_than_a_day() -> None:
    with pytest.raises(ValueError, match="ended_item_days"):
        QueueRetentionSettings(ended_item_days=0.5)
