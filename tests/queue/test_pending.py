"""Finding an item without its queue (GetItem on `queues/-`), ListItems by id prefix, and what a PENDING item
says about its wait: its position in the queue's dispatch order and why it is not running yet (queue.proto,
Item.position and Item.pending_reason), each reason forced against a real queue service and registry."""

from __future__ import annotations

import uuid
from typing import Any, TypeAlias

import grpc
import pytest

from takeoff.v1 import keys_pb2, queue_pb2, queue_pb2_grpc
from tests.queue.conftest import NewQueue
from tests.queue.harness import error_details, keyed_channel
from tests.queue.test_security import create_key, project_queue_request

Stub: TypeAlias = "queue_pb2_grpc.QueueServiceAsyncStub"  # a type only the stubs know


async def refused(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    reason, fields = error_details(raised.value)
    return raised.value.code(), reason, fields


def anywhere(item: queue_pb2.Item) -> str:
    """The item's name with `-` for its queue."""
    project = item.name.split("/queues/")[0]
    return f"{project}/queues/-/items/{item.name.rsplit('/', 1)[1]}"


async def enqueue(queues: Stub, queue: str, job: str, **fields: Any) -> queue_pb2.Item:
    return (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, **fields))).item


# ----- finding items ---------------------------------------------------------------------------------


async def test_get_item_through_any_queue_finds_it_with_its_full_name(
    queues: Stub, new_queue: NewQueue, job: str
) -> None:
    first, second = await new_queue(), await new_queue()
    await enqueue(queues, first, job)
    item = await enqueue(queues, second, job)
    found = (await queues.GetItem(queue_pb2.GetItemRequest(name=anywhere(item)))).item
    assert found.name == item.name
    assert found.name.startswith(f"{second}/items/")


async def test_get_item_through_any_queue_is_not_found_for_an_unknown_id_or_another_projects_item(
    queues: Stub, new_queue: NewQueue, job: str
) -> None:
    item = await enqueue(queues, await new_queue(), job)
    unknown = f"projects/qtest/queues/-/items/{uuid.uuid4().hex[:20]}"
    code, reason, _ = await refused(queues.GetItem(queue_pb2.GetItemRequest(name=unknown)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ITEM_NOT_FOUND")
    elsewhere = f"projects/p-{uuid.uuid4().hex[:8]}"
    await queues.CreateQueue(project_queue_request(elsewhere))  # the project exists; the item is not in it
    wrong_project = anywhere(item).replace("projects/qtest/", f"{elsewhere}/")
    code, reason, _ = await refused(queues.GetItem(queue_pb2.GetItemRequest(name=wrong_project)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ITEM_NOT_FOUND")


async def test_a_key_of_another_project_cannot_read_an_item_through_any_queue(
    queues: Stub, new_queue: NewQueue, job: str, registry_address: str, queue_address: str
) -> None:
    item = await enqueue(queues, await new_queue(), job)
    other = f"projects/p-{uuid.uuid4().hex[:8]}"
    _, key = await create_key(
        registry_address,
        keys_pb2.Key(kind=keys_pb2.KEY_KIND_PROJECT, projects=[other], role=keys_pb2.PROJECT_ROLE_READ),
    )
    _, reader = await create_key(
        registry_address,
        keys_pb2.Key(
            kind=keys_pb2.KEY_KIND_PROJECT, projects=["projects/qtest"], role=keys_pb2.PROJECT_ROLE_READ
        ),
    )
    async with keyed_channel(queue_address, key) as channel:
        as_other = queue_pb2_grpc.QueueServiceStub(channel)
        code, _, _ = await refused(as_other.GetItem(queue_pb2.GetItemRequest(name=anywhere(item))))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    async with keyed_channel(queue_address, reader) as channel:
        as_reader = queue_pb2_grpc.QueueServiceStub(channel)
        found = (await as_reader.GetItem(queue_pb2.GetItemRequest(name=anywhere(item)))).item
        assert found.name == item.name


async def test_list_items_keeps_those_whose_id_starts_with_the_prefix(
    queues: Stub, new_queue: NewQueue, job: str
) -> None:
    queue = await new_queue()
    made = [await enqueue(queues, queue, job) for _ in range(6)]
    ids = [item.name.rsplit("/", 1)[1] for item in made]
    for parent in (queue, "projects/qtest/queues/-"):
        for item_id in ids:
            for length in (1, 3, 20):
                listed = await queues.ListItems(
                    queue_pb2.ListItemsRequest(parent=parent, id_prefix=item_id[:length])
                )
                shown = [item.name.rsplit("/", 1)[1] for item in listed.items]
                assert item_id in shown
                assert all(shown_id.startswith(item_id[:length]) for shown_id in shown)
    listed = await queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, id_prefix=ids[0]))
    assert [item.name for item in listed.items] == [made[0].name]


@pytest.mark.parametrize("prefix", ["ABC", "xyz", "-", "0" * 21, "ab%"])
async def test_an_id_prefix_that_no_item_id_can_start_with_is_refused(
    queues: Stub, new_queue: NewQueue, prefix: str
) -> None:
    queue = await new_queue()
    code, reason, fields = await refused(
        queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, id_prefix=prefix))
    )
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "ARGUMENT_INVALID", ["id_prefix"])
