"""A queue deeper than the service's pending window (docs/design.md §9 "The queue's in-memory index"): the
index holds each queue's first PENDING items and leaves the rest in the database, reading them in as
dispatch reaches them; the order, positions, cancels, counts and a restart behave as if it held them all."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import grpc
import pytest
from google.protobuf import field_mask_pb2

from takeoff.v1 import common_pb2, queue_pb2
from takeoff_queue.lifecycle import ItemState
from takeoff_queue.settings import QueueSettings
from tests.queue.harness import InProcessQueue, ScriptedAgent, error_details, in_process_queue

PENDING = common_pb2.ITEM_STATE_PENDING
RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
CANCELLED = common_pb2.ITEM_STATE_CANCELLED
LOW, MEDIUM, HIGH, CRITICAL = (
    common_pb2.PRIORITY_LOW,
    common_pb2.PRIORITY_MEDIUM,
    common_pb2.PRIORITY_HIGH,
    common_pb2.PRIORITY_CRITICAL,
)
WINDOW = 4

Service = Callable[[], AbstractAsyncContextManager[InProcessQueue]]


@pytest.fixture
def service_with_window(settings: QueueSettings) -> Service:
    """The queue service with a window of 4; each call starts it again on the same database."""
    windowed = settings.model_copy(update={"pending_window": WINDOW})
    return lambda: in_process_queue(windowed)


async def _new_queue(service: InProcessQueue, *, prioritization: bool = False) -> str:
    response = await service.queues.CreateQueue(
        queue_pb2.CreateQueueRequest(
            parent="projects/qtest",
            queue_id=f"page-{uuid.uuid4().hex[:10]}",
            queue=queue_pb2.Queue(
                resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS, prioritization=prioritization
            ),
        )
    )
    return response.queue.name


async def _enqueue(
    service: InProcessQueue, queue: str, job: str, priority: common_pb2.Priority.ValueType = MEDIUM
) -> str:
    request = queue_pb2.EnqueueRequest(queue=queue, job=job, priority=priority)
    return (await service.queues.Enqueue(request)).item.name


def _held_pending(service: InProcessQueue, queue: str) -> int:
    return sum(
        1
        for item in service.parts.dispatcher.items.values()
        if item.queue == queue and item.state is ItemState.PENDING
    )


async def _positions(service: InProcessQueue, names: list[str]) -> list[int]:
    found = []
    for name in names:
        item = (await service.queues.GetItem(queue_pb2.GetItemRequest(name=name))).item
        assert item.state == PENDING
        found.append(item.position)
    return found


async def _drain(service: InProcessQueue, queue: str, count: int) -> AsyncIterator[str]:
    """Serve the queue with one slot until ``count`` items ran, yielding each as it is assigned."""
    agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
    try:
        for _ in range(count):
            # A mint the loaded registry does not answer in time is tried again after its back-off (up to
            # 5 s + 10 s): what this test is about is the order, not the pace.
            assignment = (await agent.next("assignment", within=60)).assignment
            yield assignment.item.name
            await agent.progress(assignment, RUNNING)
            assert (await agent.complete(assignment, SUCCEEDED, exit_code=0)).ack.state == SUCCEEDED
    finally:
        await agent.close()


async def test_a_deep_fifo_queue_keeps_its_order_and_positions_with_a_bounded_part_in_memory(
    service_with_window: Service, job: str
) -> None:
    async with service_with_window() as service:
        queue = await _new_queue(service)
        names = [await _enqueue(service, queue, job) for _ in range(5 * WINDOW + 3)]
        assert _held_pending(service, queue) <= 2 * WINDOW
        assert await _positions(service, names) == list(range(1, len(names) + 1))
        listed = await service.queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, page_size=100))
        assert [(item.name, item.position) for item in reversed(listed.items)] == [
            (name, place) for place, name in enumerate(names, 1)
        ]

        assigned = []
        async for name in _drain(service, queue, len(names)):
            assigned.append(name)
            assert _held_pending(service, queue) <= 2 * WINDOW
        assert assigned == names


async def test_a_restart_loads_the_front_of_each_line_and_serves_priorities_then_enqueue_order(
    service_with_window: Service, job: str
) -> None:
    priorities = [LOW, MEDIUM, LOW, CRITICAL, HIGH, LOW, MEDIUM, CRITICAL, LOW, HIGH, MEDIUM, LOW, HIGH]
    async with service_with_window() as service:
        queue = await _new_queue(service, prioritization=True)
        names = [await _enqueue(service, queue, job, priority) for priority in priorities]
    expected = [name for _, _, name in sorted(zip(priorities, range(len(names)), names, strict=True))]

    async with service_with_window() as restarted:
        assert _held_pending(restarted, queue) == WINDOW
        places = dict(zip(names, await _positions(restarted, names), strict=True))
        assert sorted(names, key=places.__getitem__) == expected
        late = await _enqueue(restarted, queue, job, CRITICAL)  # ahead of everything left in the database
        assert (await _positions(restarted, [late])) == [3]
        assigned = [name async for name in _drain(restarted, queue, len(names) + 1)]
    assert assigned == [*expected[:2], late, *expected[2:]]


async def test_an_item_left_in_the_database_is_cancelled_and_counted_and_never_runs(
    service_with_window: Service, job: str
) -> None:
    async with service_with_window() as service:
        queue = await _new_queue(service)
        names = [await _enqueue(service, queue, job) for _ in range(3 * WINDOW)]
        cancelled = names[-2]
        assert service.held(cancelled) is None  # the case named: it waits in the database
        reply = await service.queues.CancelItem(queue_pb2.CancelItemRequest(name=cancelled))
        assert reply.item.state == CANCELLED
        assert (await _positions(service, [names[-1]])) == [len(names) - 1]

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await service.queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=queue))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(refused.value)[0] == "QUEUE_NOT_EMPTY"
        assert f"has {len(names) - 1} items" in (refused.value.details() or "")
        pending, _ = service.parts.dispatcher.depths()
        assert pending[queue] == len(names) - 1

        assigned = [name async for name in _drain(service, queue, len(names) - 1)]
        assert assigned == [name for name in names if name != cancelled]
        got = await service.queues.GetItem(queue_pb2.GetItemRequest(name=cancelled))
        assert got.item.state == CANCELLED
        assert [t.to_state for t in got.item.transitions] == [PENDING, CANCELLED]


async def test_turning_prioritization_on_reorders_the_items_left_in_the_database_too(
    service_with_window: Service, job: str
) -> None:
    priorities = [LOW, LOW, MEDIUM, LOW, HIGH, LOW, CRITICAL, LOW, MEDIUM, LOW, HIGH, LOW]
    async with service_with_window() as service:
        queue = await _new_queue(service)
        names = [await _enqueue(service, queue, job, priority) for priority in priorities]
        await service.queues.UpdateQueue(
            queue_pb2.UpdateQueueRequest(
                queue=queue_pb2.Queue(name=queue, prioritization=True),
                update_mask=field_mask_pb2.FieldMask(paths=["prioritization"]),
            )
        )
        expected = [name for _, _, name in sorted(zip(priorities, range(len(names)), names, strict=True))]
        places = dict(zip(names, await _positions(service, names), strict=True))
        assert sorted(names, key=places.__getitem__) == expected
        assigned = [name async for name in _drain(service, queue, len(names))]
        assert assigned == expected
