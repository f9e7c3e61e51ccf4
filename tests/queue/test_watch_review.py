"""Review of WatchItem sending the dispatcher's copy of the item (book.watch_item): what it shows must be
what the database holds, as GetItem shows it (D6 of the review, fixed: the copy's update time is set only
once its write is committed). The queue in this process (its store's write failed on
purpose, through QueueWrite), real gRPC calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from takeoff.v1 import common_pb2, queue_pb2
from takeoff_queue.settings import QueueSettings
from takeoff_queue.store import QueueWrite
from tests.queue.harness import InProcessQueue, in_process_queue

PENDING = common_pb2.ITEM_STATE_PENDING
WAIT = 30.0


@pytest.fixture
async def service(tmp_path: Path, queue_env: dict[str, str]) -> AsyncIterator[InProcessQueue]:
    settings = QueueSettings(
        home=tmp_path,
        listen=["127.0.0.1:0"],
        registry_address=queue_env["TAKEOFF_REGISTRY_ADDRESS"],
        database_url=queue_env.get("TAKEOFF_DATABASE_URL"),
    )
    async with in_process_queue(settings) as queue_service:
        yield queue_service


async def test_watch_item_shows_the_update_time_the_database_holds(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_persist sets item.update_time before the write; _roll_back restores the life, not update_time.
    WatchItem, sending the dispatcher's copy with ``life=committed``, then shows the failed write's time
    (and a write in flight's, the same way), while GetItem shows the database's."""
    queue = await service.new_queue()
    name = await service.enqueue(queue, job)  # PENDING: no agent serves the queue
    watch = service.queues.WatchItem(queue_pb2.WatchItemRequest(name=name))
    first: Any = await asyncio.wait_for(watch.read(), WAIT)
    assert first.item.state == PENDING

    save_item = QueueWrite.save_item
    failed = asyncio.Event()

    async def failing_once(self: QueueWrite, *args: Any, **kwargs: Any) -> Any:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("the database went away")
        return await save_item(self, *args, **kwargs)

    monkeypatch.setattr(QueueWrite, "save_item", failing_once)
    with pytest.raises(grpc.aio.AioRpcError):
        await service.queues.CancelItem(queue_pb2.CancelItemRequest(name=name))
    assert failed.is_set()
    stored = await service.stored(name)
    assert stored.state == PENDING  # nothing committed
    assert stored.update_time == first.item.update_time

    # Why it waits changes (the queue is paused): WatchItem sends the item again.
    await service.queues.UpdateQueue(
        queue_pb2.UpdateQueueRequest(
            queue=queue_pb2.Queue(name=queue, paused=True),
            update_mask=field_mask_pb2.FieldMask(paths=["paused"]),
        )
    )
    second: Any = await asyncio.wait_for(watch.read(), WAIT)
    watch.cancel()
    assert second.item.state == PENDING
    assert second.item.update_time == (await service.stored(name)).update_time, (
        "WatchItem shows an update_time no commit wrote"
    )
