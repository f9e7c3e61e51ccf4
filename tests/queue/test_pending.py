"""Finding an item without its queue (GetItem on `queues/-`), ListItems by id prefix, and what a PENDING item
says about its wait: its position in the queue's dispatch order and why it is not running yet (queue.proto,
Item.position and Item.pending_reason), each reason forced against a real queue service and registry."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from takeoff.v1 import common_pb2, keys_pb2, keys_pb2_grpc, queue_pb2, queue_pb2_grpc
from takeoff_queue.pending import PendingReason, QueueOutlook, Waiting, why_pending
from tests.queue.conftest import NewQueue
from tests.queue.harness import PATIENCE, ScriptedAgent, error_details, keyed_channel

Stub: TypeAlias = "queue_pb2_grpc.QueueServiceAsyncStub"  # a type only the stubs know
PENDING = common_pb2.ITEM_STATE_PENDING
LEASED = common_pb2.ITEM_STATE_LEASED


async def refused(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    reason, fields = error_details(raised.value)
    return raised.value.code(), reason, fields


def anywhere(item: queue_pb2.Item) -> str:
    """The item's name with `-` for its queue."""
    project = item.name.split("/queues/")[0]
    return f"{project}/queues/-/items/{item.name.rsplit('/', 1)[1]}"


async def reader_key(registry: str, project: str) -> str:
    """The secret of a new key that reads ``project``."""
    key = keys_pb2.Key(kind=keys_pb2.KEY_KIND_PROJECT, projects=[project], role=keys_pb2.PROJECT_ROLE_READ)
    async with keyed_channel(registry) as channel:
        return (
            await keys_pb2_grpc.KeyServiceStub(channel).CreateKey(keys_pb2.CreateKeyRequest(key=key))
        ).secret


async def new_project(queues: Stub) -> str:
    """A project written to (a queue made in it), other than the item's."""
    project = f"projects/p-{uuid.uuid4().hex[:8]}"
    queue = queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS)
    await queues.CreateQueue(queue_pb2.CreateQueueRequest(parent=project, queue_id="q", queue=queue))
    return project


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
    wrong_project = anywhere(item).replace("projects/qtest/", f"{await new_project(queues)}/")
    code, reason, _ = await refused(queues.GetItem(queue_pb2.GetItemRequest(name=wrong_project)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ITEM_NOT_FOUND")


async def test_a_key_of_another_project_cannot_read_an_item_through_any_queue(
    queues: Stub, new_queue: NewQueue, job: str, registry_address: str, queue_address: str
) -> None:
    item = await enqueue(queues, await new_queue(), job)
    other = await new_project(queues)
    async with keyed_channel(queue_address, await reader_key(registry_address, other)) as channel:
        as_other = queue_pb2_grpc.QueueServiceStub(channel)
        code, _, _ = await refused(as_other.GetItem(queue_pb2.GetItemRequest(name=anywhere(item))))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        # Named in its own project, another project's item is not there.
        in_own_project = anywhere(item).replace("projects/qtest/", f"{other}/")
        code, reason, _ = await refused(as_other.GetItem(queue_pb2.GetItemRequest(name=in_own_project)))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ITEM_NOT_FOUND")
    async with keyed_channel(queue_address, await reader_key(registry_address, "projects/qtest")) as channel:
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


@pytest.mark.parametrize("prefix", ["ABC", "0" * 21, "ab%"])
async def test_an_id_prefix_that_no_item_id_can_start_with_is_refused(
    queues: Stub, new_queue: NewQueue, prefix: str
) -> None:
    queue = await new_queue()
    code, reason, fields = await refused(
        queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, id_prefix=prefix))
    )
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "ARGUMENT_INVALID", ["id_prefix"])


# ----- why a PENDING item waits, and its place ---------------------------------------------------------


async def shown(queues: Stub, item: queue_pb2.Item) -> queue_pb2.Item:
    return (await queues.GetItem(queue_pb2.GetItemRequest(name=item.name))).item


def waits(item: queue_pb2.Item) -> tuple[str, str]:
    return queue_pb2.PendingReason.Name(item.pending_reason), item.pending_detail


async def test_an_item_of_a_paused_queue_says_so_until_the_queue_is_resumed(
    queues: Stub, new_queue: NewQueue, job: str
) -> None:
    queue = await new_queue(paused=True)
    item = await enqueue(queues, queue, job)
    assert (item.position, *waits(item)) == (1, "PENDING_REASON_QUEUE_PAUSED", "the queue is paused")
    await queues.UpdateQueue(
        queue_pb2.UpdateQueueRequest(
            queue=queue_pb2.Queue(name=queue, paused=False),
            update_mask=field_mask_pb2.FieldMask(paths=["paused"]),
        )
    )
    assert waits(await shown(queues, item)) == (
        "PENDING_REASON_NO_AGENT",
        "no connected agent serves the queue",
    )


async def test_an_item_no_connected_agent_serves_says_so_and_then_runs_once_one_connects(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    item = await enqueue(queues, queue, job)
    assert (item.state, item.position, *waits(item)) == (
        PENDING,
        1,
        "PENDING_REASON_NO_AGENT",
        "no connected agent serves the queue",
    )
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        await agent.next("assignment")
        leased = await shown(queues, item)
        assert (leased.state, leased.position, leased.pending_reason, leased.pending_detail) == (
            LEASED,
            0,
            queue_pb2.PENDING_REASON_UNSPECIFIED,
            "",
        )
    finally:
        await agent.close()


async def test_an_item_whose_agents_have_no_free_slot_says_agents_busy(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    agent = await ScriptedAgent(queue_address).connect([queue], capacity=1)
    try:
        async with agent.heartbeating():
            await enqueue(queues, queue, job)
            await agent.next("assignment")  # its one slot is taken
            item = await enqueue(queues, queue, job)
            assert (item.position, *waits(item)) == (1, "PENDING_REASON_AGENTS_BUSY", "1 agent, 0 free slots")
    finally:
        await agent.close()


async def test_an_item_held_back_by_the_queues_concurrency_limit_says_so(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(concurrency_limit=1)
    agent = await ScriptedAgent(queue_address).connect([queue], capacity=2)
    try:
        async with agent.heartbeating():
            await enqueue(queues, queue, job)
            await agent.next("assignment")
            item = await enqueue(queues, queue, job)
            assert waits(item) == ("PENDING_REASON_CONCURRENCY_LIMIT", "1 of 1 running")
            assert waits(await shown(queues, item)) == ("PENDING_REASON_CONCURRENCY_LIMIT", "1 of 1 running")
    finally:
        await agent.close()


async def test_an_item_waiting_out_its_retry_says_when_it_is_retried(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(retry_delay=duration_pb2.Duration(seconds=600))
    agent = await ScriptedAgent(queue_address).connect([queue], capacity=1)
    try:
        async with agent.heartbeating():
            item = await enqueue(queues, queue, job)
            assignment = (await agent.next("assignment")).assignment
            answer = await agent.complete(
                assignment, common_pb2.ITEM_STATE_FAILED, reason=common_pb2.FAILURE_REASON_RUNNER_INFRA
            )
            assert answer.ack.state == PENDING
            retried = await shown(queues, item)
            reason, detail = waits(retried)
            assert reason == "PENDING_REASON_RETRY_BACKOFF"
            # 600 s of retry delay and 1 s of infrastructure back-off, from the Complete on
            assert detail in {f"retry in {seconds}s" for seconds in range(590, 602)}, detail
            assert retried.position == 1
    finally:
        await agent.close()


async def test_positions_follow_the_dispatch_order_of_priorities_then_enqueue_order(
    queues: Stub, new_queue: NewQueue, job: str
) -> None:
    queue = await new_queue(prioritization=True)
    priorities = [
        common_pb2.PRIORITY_LOW,
        common_pb2.PRIORITY_HIGH,
        common_pb2.PRIORITY_MEDIUM,
        common_pb2.PRIORITY_CRITICAL,
        common_pb2.PRIORITY_HIGH,
        common_pb2.PRIORITY_LOW,
    ]
    made = [await enqueue(queues, queue, job, priority=priority) for priority in priorities]
    in_order = [
        item.name
        for item in sorted(made, key=lambda item: (item.priority, item.enqueue_time.ToNanoseconds()))
    ]
    expected = {name: place for place, name in enumerate(in_order, start=1)}
    listed = (await queues.ListItems(queue_pb2.ListItemsRequest(parent=queue))).items
    assert {item.name: item.position for item in listed} == expected
    assert {item.name: (await shown(queues, item)).position for item in made} == expected
    assert {waits(item)[0] for item in listed} == {"PENDING_REASON_NO_AGENT"}
    # The first leaves the line: everyone behind it moves up one place.
    await queues.CancelItem(queue_pb2.CancelItemRequest(name=in_order[0]))
    listed = (await queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, states=[PENDING]))).items
    assert {item.name: item.position for item in listed} == {
        name: place - 1 for name, place in expected.items() if place > 1
    }
    cancelled = await shown(queues, made[priorities.index(common_pb2.PRIORITY_CRITICAL)])
    assert (cancelled.position, cancelled.pending_reason) == (0, queue_pb2.PENDING_REASON_UNSPECIFIED)


async def test_a_watched_pending_item_shows_its_place_and_reason(
    queues: Stub, new_queue: NewQueue, job: str
) -> None:
    queue = await new_queue()
    await enqueue(queues, queue, job)
    item = await enqueue(queues, queue, job)
    async for update in queues.WatchItem(queue_pb2.WatchItemRequest(name=item.name)):
        assert (update.item.position, *waits(update.item)) == (
            2,
            "PENDING_REASON_NO_AGENT",
            "no connected agent serves the queue",
        )
        break


async def test_a_watched_item_is_sent_again_whenever_why_it_waits_changes(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(paused=True)
    item = await enqueue(queues, queue, job)
    updates: asyncio.Queue[queue_pb2.WatchItemResponse] = asyncio.Queue()

    async def watch() -> None:
        async for update in queues.WatchItem(queue_pb2.WatchItemRequest(name=item.name)):
            await updates.put(update)

    async def next_update() -> queue_pb2.WatchItemResponse:
        return await asyncio.wait_for(updates.get(), PATIENCE)

    watcher = asyncio.create_task(watch())
    leaving, agent = ScriptedAgent(queue_address), ScriptedAgent(queue_address)
    try:
        assert waits((await next_update()).item)[0] == "PENDING_REASON_QUEUE_PAUSED"
        await queues.UpdateQueue(
            queue_pb2.UpdateQueueRequest(
                queue=queue_pb2.Queue(name=queue, paused=False),
                update_mask=field_mask_pb2.FieldMask(paths=["paused"]),
            )
        )
        resumed = await next_update()
        assert not resumed.HasField("transition")
        assert waits(resumed.item) == ("PENDING_REASON_NO_AGENT", "no connected agent serves the queue")
        await leaving.connect([queue], capacity=0)
        assert waits((await next_update()).item) == ("PENDING_REASON_AGENTS_BUSY", "1 agent, 0 free slots")
        await leaving.close()
        assert waits((await next_update()).item)[0] == "PENDING_REASON_NO_AGENT"
        await agent.connect([queue], capacity=0)
        assert waits((await next_update()).item)[0] == "PENDING_REASON_AGENTS_BUSY"
        await agent.send(set_capacity=queue_pb2.LeaseRequest.SetCapacity(capacity=1))
        while not (update := await next_update()).HasField("transition"):
            # The slot may be seen before the dispatch pass that takes it; then its token is minted, which
            # on a loaded machine may time out and be tried again.
            assert waits(update.item) in {
                ("PENDING_REASON_QUEUED", "next to be assigned"),
                ("PENDING_REASON_QUEUED", "being assigned"),
                ("PENDING_REASON_QUEUED", "its run token is tried again: the registry did not give one"),
            }
        assert (update.transition.to_state, update.item.pending_reason) == (
            LEASED,
            queue_pb2.PENDING_REASON_UNSPECIFIED,
        )
    finally:
        watcher.cancel()
        await leaving.close()
        await agent.close()


def test_the_first_reason_that_holds_is_given_in_queue_protos_order() -> None:
    """Every reason holds at first; clearing them one by one shows each next one in turn."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    retry = now + timedelta(seconds=11.2)
    everything = QueueOutlook(paused=True, live=2, concurrency_limit=2, agents=0, free_slots=0)
    resumed = replace(everything, paused=False)
    below_limit = replace(resumed, live=1)
    served = replace(below_limit, agents=3)
    room = replace(served, free_slots=1)
    cleared = [
        (retry, everything, PendingReason.QUEUE_PAUSED, "the queue is paused"),
        (retry, resumed, PendingReason.RETRY_BACKOFF, "retry in 12s"),
        (now, resumed, PendingReason.CONCURRENCY_LIMIT, "2 of 2 running"),
        (now, below_limit, PendingReason.NO_AGENT, "no connected agent serves the queue"),
        (now, served, PendingReason.AGENTS_BUSY, "3 agents, 0 free slots"),
        (now, room, PendingReason.QUEUED, "2 items ahead"),
    ]
    for eligible, queue, reason, detail in cleared:
        assert why_pending(eligible, 3, queue, now) == Waiting(3, reason, detail)
    # With room, an item waits for those ahead of it; the first in line is about to be assigned.
    assert why_pending(now, 2, room, now).detail == "1 item ahead"
    assert why_pending(now, 1, room, now) == Waiting(1, PendingReason.QUEUED, "next to be assigned")
    # Taken by a pass, its own slots do not hold it back; without its run token, it says so.
    assert why_pending(now, 1, everything, now, assigning=True).detail == "the queue is paused"
    assert why_pending(now, 1, resumed, now, assigning=True).detail == "being assigned"
    assert "registry" in why_pending(now, 1, room, now, token_refused=True).detail
    assert why_pending(now, 1, below_limit, now, token_refused=True).reason is PendingReason.NO_AGENT
