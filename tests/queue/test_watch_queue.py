"""WatchQueue against a real queue service and registry (queue.proto, QueueService.WatchQueue): the snapshot
of a queue's open items in dispatch order and of its agents, then coalesced changes as items are enqueued,
dispatched, completed and cancelled, as agents come and go, and as the queue is paused and deleted."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import grpc
import pytest
from google.protobuf import field_mask_pb2

from takeoff.v1 import common_pb2, keys_pb2, keys_pb2_grpc, queue_pb2, queue_pb2_grpc
from takeoff_queue.queue_watch import FRONT_KEPT_CURRENT, MESSAGE_INTERVAL_SECONDS
from takeoff_server.pagination import MAX_PAGE_BYTES
from tests.queue.conftest import NewQueue
from tests.queue.harness import ScriptedAgent, error_details, keyed_channel, struct

Stub: TypeAlias = "queue_pb2_grpc.QueueServiceAsyncStub"  # a type only the stubs know
Response = queue_pb2.WatchQueueResponse
PENDING = common_pb2.ITEM_STATE_PENDING
LEASED = common_pb2.ITEM_STATE_LEASED
STARTING = common_pb2.ITEM_STATE_STARTING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
CANCELLED = common_pb2.ITEM_STATE_CANCELLED


class QueueView:
    """A client's view of a watched queue: the snapshot, then every change applied as it arrives."""

    def __init__(self, stub: Stub, queue: str) -> None:
        self.items: dict[str, queue_pb2.Item] = {}
        self.agents: dict[str, queue_pb2.Agent] = {}
        self.messages: list[Response] = []
        self.error: grpc.aio.AioRpcError | None = None
        self._call = stub.WatchQueue(queue_pb2.WatchQueueRequest(name=queue))
        self._arrived: asyncio.Queue[Response | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self._call:
                await self._arrived.put(message)
        except grpc.aio.AioRpcError as error:
            self.error = error
        await self._arrived.put(None)

    async def next(self, within: float = 10.0) -> Response | None:
        """The next message, applied to the view (None: the stream ended)."""
        message = await asyncio.wait_for(self._arrived.get(), within)
        if message is not None:
            self.messages.append(message)
            for item in message.items:
                self.items[item.name] = item
            for agent in message.agents:
                self.agents[agent.name] = agent
            for name in message.removed_agents:
                del self.agents[name]
        return message

    async def snapshot(self) -> list[Response]:
        messages = [await self.next()]
        while not messages[-1] or not messages[-1].snapshot_done:
            messages.append(await self.next())
        return [message for message in messages if message is not None]

    async def until(self, holds: Callable[[QueueView], bool], within: float = 10.0) -> None:
        """Apply messages until ``holds`` is true of the view."""
        async with asyncio.timeout(within):
            while not holds(self):
                if await self.next() is None:
                    raise AssertionError(f"the stream ended ({self.error}) before the view got there")

    def state(self, name: str) -> int:
        item = self.items.get(name)
        return item.state if item is not None else common_pb2.ITEM_STATE_UNSPECIFIED

    def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()


@asynccontextmanager
async def watching(stub: Stub, queue: str) -> AsyncIterator[QueueView]:
    view = QueueView(stub, queue)
    try:
        yield view
    finally:
        view.close()


async def enqueue(queues: Stub, queue: str, job: str, **fields: Any) -> queue_pb2.Item:
    return (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, **fields))).item


async def update(queues: Stub, queue: str, **settings: Any) -> None:
    await queues.UpdateQueue(
        queue_pb2.UpdateQueueRequest(
            queue=queue_pb2.Queue(name=queue, **settings),
            update_mask=field_mask_pb2.FieldMask(paths=list(settings)),
        )
    )


def waits(item: queue_pb2.Item) -> tuple[int, str]:
    return item.position, queue_pb2.PendingReason.Name(item.pending_reason)


async def test_the_snapshot_has_the_open_items_in_dispatch_order_and_the_agents_serving_the_queue(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(prioritization=True)
    agent = await ScriptedAgent(queue_address).connect([queue], capacity=1)
    try:
        leased = await enqueue(queues, queue, job)
        await agent.next("assignment")
        low = await enqueue(queues, queue, job, priority=common_pb2.PRIORITY_LOW)
        high = await enqueue(queues, queue, job, priority=common_pb2.PRIORITY_HIGH)
        done = await enqueue(queues, queue, job)
        await queues.CancelItem(queue_pb2.CancelItemRequest(name=done.name))
        async with watching(queues, queue) as view:
            (snapshot,) = await view.snapshot()
    finally:
        await agent.close()
    assert (snapshot.snapshot, snapshot.snapshot_done) == (True, True)
    assert [item.name for item in snapshot.items] == [high.name, low.name, leased.name]
    assert [waits(item) for item in snapshot.items] == [
        (1, "PENDING_REASON_AGENTS_BUSY"),
        (2, "PENDING_REASON_AGENTS_BUSY"),
        (0, "PENDING_REASON_UNSPECIFIED"),
    ]
    assert snapshot.items[2].state == LEASED
    assert not any(item.transitions for item in snapshot.items)  # without history
    (shown,) = snapshot.agents
    assert shown.name == f"agents/{agent.agent_id}"
    assert [lease.item for lease in shown.leases] == [leased.name]


async def test_a_snapshot_larger_than_a_message_is_split_the_last_part_saying_so(
    queues: Stub, new_queue: NewQueue, job: str
) -> None:
    queue = await new_queue()
    config = struct({"lr": 0.1, "notes": "x" * 90_000})  # within the run config's 96 KiB as JSON
    count = MAX_PAGE_BYTES // 90_000 + 5
    made = await asyncio.gather(*(enqueue(queues, queue, job, run_config=config) for _ in range(count)))
    async with watching(queues, queue) as view:
        parts = await view.snapshot()
    assert len(parts) > 1
    assert all(part.snapshot for part in parts)
    assert [part.snapshot_done for part in parts] == [False] * (len(parts) - 1) + [True]
    assert all(part.ByteSize() <= MAX_PAGE_BYTES for part in parts)
    assert sorted(item.name for part in parts for item in part.items) == sorted(item.name for item in made)
    assert [item.position for part in parts for item in part.items] == list(range(1, count + 1))


async def test_only_the_front_of_a_deep_line_is_resent_as_it_moves_up(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    await asyncio.gather(*(enqueue(queues, queue, job) for _ in range(FRONT_KEPT_CURRENT + 3)))
    async with watching(queues, queue) as view:
        made = [item.name for part in await view.snapshot() for item in part.items]  # in dispatch order
        agent = await ScriptedAgent(queue_address).connect([queue], capacity=1)
        try:
            await agent.next("assignment")
            last_in_front = made[FRONT_KEPT_CURRENT]  # place 101 before the dispatch, 100 after it
            await view.until(lambda v: v.items[last_in_front].position == FRONT_KEPT_CURRENT)
        finally:
            await agent.close()
    moved = {item.name for item in view.messages[-1].items}
    assert set(made[1 : FRONT_KEPT_CURRENT + 1]) <= moved
    assert not moved & set(made[FRONT_KEPT_CURRENT + 1 :])  # further back: not resent for the move
    assert view.items[made[-1]].position == FRONT_KEPT_CURRENT + 3


async def test_enqueue_dispatch_and_complete_are_sent_with_the_positions_behind_and_the_agent(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    async with watching(queues, queue) as view:
        assert [message.items for message in await view.snapshot()] == [[]]
        first, second, third = [await enqueue(queues, queue, job) for _ in range(3)]
        await view.until(lambda v: len(v.items) == 3)
        assert [waits(view.items[item.name]) for item in (first, second, third)] == [
            (1, "PENDING_REASON_NO_AGENT"),
            (2, "PENDING_REASON_NO_AGENT"),
            (3, "PENDING_REASON_NO_AGENT"),
        ]
        agent = await ScriptedAgent(queue_address).connect([queue], capacity=1)
        try:
            assignment = (await agent.next("assignment")).assignment
            assert assignment.item.name == first.name
            # The item dispatched, the ones behind it one place up, the agent holding its lease.
            await view.until(
                lambda v: (
                    v.state(first.name) == LEASED
                    and waits(v.items[third.name]) == (2, "PENDING_REASON_AGENTS_BUSY")
                    and [lease.item for lease in v.agents[f"agents/{agent.agent_id}"].leases] == [first.name]
                )
            )
            assert waits(view.items[second.name]) == (1, "PENDING_REASON_AGENTS_BUSY")
            await agent.complete(assignment, SUCCEEDED)
            await view.until(lambda v: v.state(first.name) == SUCCEEDED)
            succeeded = view.items[first.name]
            assert succeeded.end_time.seconds
            assert waits(succeeded) == (0, "PENDING_REASON_UNSPECIFIED")
            await queues.CancelItem(queue_pb2.CancelItemRequest(name=third.name))
            second_assignment = (await agent.next("assignment")).assignment
            await agent.complete(second_assignment, SUCCEEDED)
            await view.until(lambda v: v.state(second.name) == SUCCEEDED and v.state(third.name) == CANCELLED)
        finally:
            await agent.close()
        await view.until(lambda v: f"agents/{agent.agent_id}" not in v.agents)
    ended = [item.name for message in view.messages for item in message.items if item.state == SUCCEEDED]
    assert sorted(ended) == sorted([first.name, second.name])  # each sent once ended, then no more
    assert any(f"agents/{agent.agent_id}" in message.removed_agents for message in view.messages)


async def test_changes_are_coalesced_each_item_once_per_message_at_most_five_messages_a_second(
    queues: Stub, new_queue: NewQueue, job: str
) -> None:
    queue = await new_queue(paused=True)
    async with watching(queues, queue) as view:
        started = time.monotonic()
        await view.snapshot()
        items = await asyncio.gather(*(enqueue(queues, queue, job) for _ in range(20)))
        await asyncio.gather(
            *(queues.CancelItem(queue_pb2.CancelItemRequest(name=item.name)) for item in items)
        )
        await view.until(lambda v: all(v.state(item.name) == CANCELLED for item in items))
        elapsed = time.monotonic() - started
    changes = view.messages[1:]
    for message in changes:
        names = [item.name for item in message.items]
        assert len(names) == len(set(names))
    # 40 changes, but never more than one message per interval, however fast they came
    assert len(changes) <= elapsed / MESSAGE_INTERVAL_SECONDS + 1
    cancelled = [item.name for message in changes for item in message.items if item.state == CANCELLED]
    assert sorted(cancelled) == sorted(item.name for item in items)  # each sent once ended


async def test_pausing_the_queue_sends_its_pending_items_with_the_new_reason(
    queues: Stub, new_queue: NewQueue, job: str
) -> None:
    queue = await new_queue()
    item = await enqueue(queues, queue, job)
    async with watching(queues, queue) as view:
        await view.snapshot()
        assert waits(view.items[item.name]) == (1, "PENDING_REASON_NO_AGENT")
        await update(queues, queue, paused=True)
        await view.until(lambda v: waits(v.items[item.name]) == (1, "PENDING_REASON_QUEUE_PAUSED"))
        assert view.items[item.name].pending_detail == "the queue is paused"
        await update(queues, queue, paused=False)
        await view.until(lambda v: waits(v.items[item.name]) == (1, "PENDING_REASON_NO_AGENT"))


async def test_a_repeated_progress_with_a_new_detail_is_shown_by_get_item_and_both_watches(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    agent = await ScriptedAgent(queue_address).connect([queue], capacity=1)
    try:
        item = await enqueue(queues, queue, job)
        assignment = (await agent.next("assignment")).assignment

        async def starting(detail: str) -> None:
            progress = queue_pb2.LeaseRequest.Progress(
                lease_id=assignment.lease_id, epoch=assignment.epoch, state=STARTING, detail=detail
            )
            await agent.send(progress=progress)
            assert (await agent.answer()).WhichOneof("message") == "ack"

        await starting("waiting: Resources")
        item_updates = aiter(queues.WatchItem(queue_pb2.WatchItemRequest(name=item.name)))
        async with watching(queues, queue) as view:
            await view.snapshot()
            assert (await anext(item_updates)).item.message == "waiting: Resources"
            await starting("waiting: Priority")  # the runner's new reason, in the same state
            update = await asyncio.wait_for(anext(item_updates), 10)
            await view.until(lambda v: v.items[item.name].message == "waiting: Priority")
        await starting("")  # no detail: nothing new to say
        stored = (await queues.GetItem(queue_pb2.GetItemRequest(name=item.name))).item
    finally:
        await agent.close()
    assert not update.HasField("transition")
    assert (update.item.state, update.item.message) == (STARTING, "waiting: Priority")
    assert stored.message == "waiting: Priority"
    starts = [t for t in stored.transitions if t.to_state == STARTING]
    assert [t.message for t in starts] == ["waiting: Resources"]  # the repeat records no transition


async def test_deleting_the_queue_ends_the_stream_with_not_found(
    queues: Stub, new_queue: NewQueue, job: str
) -> None:
    queue = await new_queue()
    await enqueue(queues, queue, job)
    async with watching(queues, queue) as view:
        await view.snapshot()
        await queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=queue, force=True))
        while await view.next() is not None:
            pass
    assert view.error is not None
    assert (view.error.code(), error_details(view.error)[0]) == (grpc.StatusCode.NOT_FOUND, "QUEUE_NOT_FOUND")


@pytest.mark.parametrize(
    ("name", "code", "reason"),
    [
        ("projects/qtest/queues/Not A Queue", grpc.StatusCode.INVALID_ARGUMENT, "NAME_INVALID"),
        ("projects/qtest/queues/never-made", grpc.StatusCode.NOT_FOUND, "QUEUE_NOT_FOUND"),
    ],
)
async def test_a_bad_or_unknown_queue_is_refused(
    queues: Stub, name: str, code: grpc.StatusCode, reason: str
) -> None:
    async with watching(queues, name) as view:
        assert await view.next() is None
    assert view.error is not None
    assert (view.error.code(), error_details(view.error)[0]) == (code, reason)


async def test_a_key_without_queues_read_on_the_queue_is_refused(
    queues: Stub, new_queue: NewQueue, registry_address: str, queue_address: str
) -> None:
    queue = await new_queue()
    other = f"projects/p-{uuid.uuid4().hex[:8]}"
    key = keys_pb2.Key(kind=keys_pb2.KEY_KIND_PROJECT, projects=[other], role=keys_pb2.PROJECT_ROLE_WRITE)
    async with keyed_channel(registry_address) as channel:
        secret = (
            await keys_pb2_grpc.KeyServiceStub(channel).CreateKey(keys_pb2.CreateKeyRequest(key=key))
        ).secret
    channel = keyed_channel(queue_address, secret)
    async with channel, watching(queue_pb2_grpc.QueueServiceStub(channel), queue) as view:
        assert await view.next() is None
    assert view.error is not None
    assert view.error.code() == grpc.StatusCode.PERMISSION_DENIED
