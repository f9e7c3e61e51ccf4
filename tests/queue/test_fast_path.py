"""Enqueue's one-commit path: an item an agent can take at once is inserted already LEASED.

The queue service runs in this process (a real gRPC server on a loopback port, a real database), so that
a test can watch every store write, hold one in its transaction, or make it fail.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import field_mask_pb2

from takeoff.v1 import common_pb2, queue_pb2
from takeoff_queue.dispatcher import Dispatcher
from takeoff_queue.lifecycle import ItemLife, ItemState
from takeoff_queue.model import Assignment, Item
from takeoff_queue.store import QueueStore, QueueWrite
from tests.queue.harness import PATIENCE, InProcessQueue, ScriptedAgent
from tests.queue.test_paging_review import hold_enqueues_after_their_commit

T = TypeVar("T")
PENDING = common_pb2.ITEM_STATE_PENDING
LEASED = common_pb2.ITEM_STATE_LEASED
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
CANCELLED = common_pb2.ITEM_STATE_CANCELLED

Change = tuple[str, str, tuple[ItemState, ...]]
"""What a store write did to one item: ("insert" or "save", its id, the states of the transitions written)."""


class StoreWrites:
    """Every store write (one caller's changes, in the transaction group commit gives them) and what each
    did to items; ``requested`` gets each write's changes, empty yet, as soon as it is asked for.

    With ``hold_first_insert``, the first item inserted waits in its transaction (and every later write
    behind it) until :meth:`release`; ``holding`` is set once it waits."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, hold_first_insert: bool = False) -> None:
        self.writes: list[list[Change]] = []
        self.requested: asyncio.Queue[list[Change]] = asyncio.Queue()
        self.holding = asyncio.Event()
        self._held_until = asyncio.Event() if hold_first_insert else None
        self._current: list[Change] = []
        log = self
        write, insert_item, save_item = QueueStore.write, QueueWrite.insert_item, QueueWrite.save_item

        async def logged_write(store: QueueStore, changes: Callable[[QueueWrite], Awaitable[T]]) -> T:
            done: list[Change] = []
            log.writes.append(done)
            log.requested.put_nowait(done)

            async def logged(tx: QueueWrite) -> T:
                log._current = done  # group commit runs each caller's changes in turn
                return await changes(tx)

            return await write(store, logged)

        async def logged_insert(tx: QueueWrite, item: Item) -> int:
            if log._held_until is not None and not log.holding.is_set():
                log.holding.set()
                await log._held_until.wait()
            log._current.append(("insert", item.id, tuple(t.to_state for t in item.life.history)))
            return await insert_item(tx, item)

        async def logged_save(
            tx: QueueWrite, item_id: str, life: ItemLife, now: datetime, since: int, **fence: int
        ) -> bool:
            log._current.append(("save", item_id, tuple(t.to_state for t in life.history[since:])))
            return await save_item(tx, item_id, life, now, since, **fence)

        monkeypatch.setattr(QueueStore, "write", logged_write)
        monkeypatch.setattr(QueueWrite, "insert_item", logged_insert)
        monkeypatch.setattr(QueueWrite, "save_item", logged_save)

    def release(self) -> None:
        assert self._held_until is not None
        self._held_until.set()

    def of(self, name: str) -> list[list[Change]]:
        """The writes that changed the item ``name``, each with only its changes to that item."""
        item_id = name.rsplit("/", 1)[1]
        found = [[change for change in write if change[1] == item_id] for write in self.writes]
        return [changes for changes in found if changes]


async def enqueue(service: InProcessQueue, queue: str, job: str) -> queue_pb2.Item:
    return (await service.queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item


def states(item: queue_pb2.Item) -> list[int]:
    return [transition.to_state for transition in item.transitions]


async def test_an_item_an_agent_can_take_is_inserted_leased_in_one_write(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await service.new_queue()
    agent = await ScriptedAgent(service.address).connect([queue], capacity=2)
    try:
        await agent.settle()  # the pass its Hello scheduled has run: it is idle, with room
        writes = StoreWrites(monkeypatch)
        reply = await enqueue(service, queue, job)
        assignment = (await agent.next("assignment")).assignment

        assert assignment.item.name == reply.name
        assert writes.of(reply.name) == [
            [("insert", reply.name.rsplit("/", 1)[1], (ItemState.PENDING, ItemState.LEASED))]
        ]
        assert (assignment.attempt, assignment.epoch) == (1, 1)
        assert states(assignment.item) == [PENDING, LEASED]
        assert (reply.state, reply.lease_id, states(reply)) == (
            LEASED,
            assignment.lease_id,
            [PENDING, LEASED],
        )
        stored = await service.stored(reply.name)
        assert (stored.state, stored.epoch, stored.lease_id) == (LEASED, 1, assignment.lease_id)
        assert states(stored) == [PENDING, LEASED]

        # The lease is like any other: the agent completes the item under it.
        assert (await agent.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
    finally:
        await agent.close()


async def test_a_failed_commit_on_the_fast_path_leaves_no_phantom_and_the_agent_its_room(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await service.new_queue()
    agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
    insert_item = QueueWrite.insert_item
    failed: list[tuple[str, ItemState]] = []

    async def failing_once(tx: QueueWrite, item: Item) -> int:
        if not failed:
            failed.append((item.id, item.life.state))
            raise RuntimeError("the database went away")
        return await insert_item(tx, item)

    try:
        await agent.settle()
        monkeypatch.setattr(QueueWrite, "insert_item", failing_once)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await service.queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))
        assert error.value.code() == grpc.StatusCode.INTERNAL  # as any failed write answers
        [(phantom, state)] = failed
        assert state is ItemState.LEASED, "the failed insert was not the fast path's: the case was not forced"
        assert phantom not in service.parts.dispatcher.items
        held = service.parts.dispatcher.agents[agent.agent_id]
        assert (held.leases, held.leases_committing, held.free_capacity) == ({}, 0, 1)

        # The agent's one slot is still free: the next item goes to it, in one write too.
        real = await enqueue(service, queue, job)
        assignment = (await agent.next("assignment")).assignment
        assert assignment.item.name == real.name
        assert states(assignment.item) == [PENDING, LEASED]
        listed = await service.queues.ListItems(queue_pb2.ListItemsRequest(parent=queue))
        assert [item.name for item in listed.items] == [real.name]
        agents = await service.queues.ListAgents(queue_pb2.ListAgentsRequest())
        [shown] = [shown for shown in agents.agents if shown.name == f"agents/{agent.agent_id}"]
        assert [lease.item for lease in shown.leases] == [real.name]
    finally:
        await agent.close()


async def test_an_item_enqueued_while_an_older_one_is_committed_does_not_overtake_it(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await service.new_queue()
    agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
    try:
        first = await enqueue(service, queue, job)
        busy = (await agent.next("assignment")).assignment
        assert busy.item.name == first.name

        # The older item comes while the agent is full: it goes in PENDING, and its insert is held in
        # its transaction.
        writes = StoreWrites(monkeypatch, hold_first_insert=True)
        older = asyncio.create_task(enqueue(service, queue, job))
        await asyncio.wait_for(writes.holding.wait(), 10)
        await writes.requested.get()  # the older item's write

        # The agent frees its slot (in memory at once; its commit waits behind the older insert) and a
        # newer item comes, which the agent could take at once.
        await agent.send(
            complete=queue_pb2.LeaseRequest.Complete(
                lease_id=busy.lease_id, epoch=busy.epoch, outcome=SUCCEEDED
            )
        )
        await asyncio.wait_for(writes.requested.get(), 10)  # the completion's write
        newer = asyncio.create_task(enqueue(service, queue, job))
        await asyncio.wait_for(writes.requested.get(), 10)  # the newer item's write
        writes.release()

        older_item, newer_item = await older, await newer
        assert (older_item.state, newer_item.state) == (PENDING, PENDING)
        assert (await agent.answer()).ack.state == SUCCEEDED
        assignment = (await agent.next("assignment")).assignment
        assert assignment.item.name == older_item.name
        await agent.settle()
        assert (await service.stored(newer_item.name)).state == PENDING  # the agent has no room for it
        assert (await agent.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
        assert (await agent.next("assignment")).assignment.item.name == newer_item.name
    finally:
        await agent.close()


@pytest.mark.parametrize(
    ("capacity", "concurrency_limit"), [(1, 0), (2, 1)], ids=["agent-capacity", "concurrency-limit"]
)
async def test_room_held_for_an_item_being_committed_is_not_given_twice(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch, capacity: int, concurrency_limit: int
) -> None:
    queue = await service.new_queue()
    await service.queues.UpdateQueue(
        queue_pb2.UpdateQueueRequest(
            queue=queue_pb2.Queue(name=queue, concurrency_limit=concurrency_limit),
            update_mask=field_mask_pb2.FieldMask(paths=["concurrency_limit"]),
        )
    )
    agent = await ScriptedAgent(service.address).connect([queue], capacity=capacity)
    try:
        await agent.settle()
        writes = StoreWrites(monkeypatch, hold_first_insert=True)
        first = asyncio.create_task(enqueue(service, queue, job))
        await asyncio.wait_for(writes.holding.wait(), 10)  # leased to the agent, not yet committed
        second = asyncio.create_task(enqueue(service, queue, job))
        await asyncio.wait_for(writes.requested.get(), 10)  # the first item's write
        await asyncio.wait_for(writes.requested.get(), 10)  # the second's: its admission is decided
        writes.release()

        first_item, second_item = await first, await second
        assert (first_item.state, second_item.state) == (LEASED, PENDING)
        assignment = (await agent.next("assignment")).assignment
        assert assignment.item.name == first_item.name
        await agent.settle()
        assert (await service.stored(second_item.name)).state == PENDING
        assert (await agent.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
        assert (await agent.next("assignment")).assignment.item.name == second_item.name
    finally:
        await agent.close()


async def test_the_fast_path_keeps_paused_queues_and_concurrency_limits(
    service: InProcessQueue, job: str
) -> None:
    queue = await service.new_queue()
    await service.queues.UpdateQueue(
        queue_pb2.UpdateQueueRequest(
            queue=queue_pb2.Queue(name=queue, concurrency_limit=1, paused=True),
            update_mask=field_mask_pb2.FieldMask(paths=["concurrency_limit", "paused"]),
        )
    )
    agent = await ScriptedAgent(service.address).connect([queue], capacity=3)
    try:
        await agent.settle()
        paused = await enqueue(service, queue, job)
        assert paused.state == PENDING
        await agent.settle()
        assert (await service.stored(paused.name)).state == PENDING

        await service.queues.UpdateQueue(
            queue_pb2.UpdateQueueRequest(
                queue=queue_pb2.Queue(name=queue, paused=False),
                update_mask=field_mask_pb2.FieldMask(paths=["paused"]),
            )
        )
        assignment = (await agent.next("assignment")).assignment
        assert assignment.item.name == paused.name

        # The agent has room for two more, the queue for none.
        limited = await enqueue(service, queue, job)
        assert limited.state == PENDING
        await agent.settle()
        assert (await agent.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
        assert (await agent.next("assignment")).assignment.item.name == limited.name
    finally:
        await agent.close()


async def test_two_tries_of_one_enqueue_on_the_fast_path_hold_one_lease(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await service.new_queue()
    agent = await ScriptedAgent(service.address).connect([queue], capacity=2)
    dispatcher = service.parts.dispatcher
    admit, write = dispatcher.admit, QueueStore.write
    leased_at_once: list[Assignment | None] = []
    both_admitted = asyncio.Event()

    def admit_counted(item: Item) -> Assignment | None:
        leased_at_once.append(admit(item))
        if len(leased_at_once) == 2:
            both_admitted.set()
        return leased_at_once[-1]

    async def write_once_both_admitted(store: QueueStore, changes: Callable[[QueueWrite], Awaitable[T]]) -> T:
        await asyncio.wait_for(both_admitted.wait(), 10)  # neither has committed: each holds a lease
        return await write(store, changes)

    try:
        await agent.settle()
        monkeypatch.setattr(dispatcher, "admit", admit_counted)
        monkeypatch.setattr(QueueStore, "write", write_once_both_admitted)
        request = queue_pb2.EnqueueRequest(queue=queue, job=job, request_id=uuid.uuid4().hex)
        first, second = await asyncio.gather(service.queues.Enqueue(request), service.queues.Enqueue(request))
        monkeypatch.undo()

        assert [leased is not None for leased in leased_at_once] == [True, True], "the case was not forced"
        assert first.item == second.item  # the same item, leased once
        assignment = (await agent.next("assignment")).assignment
        assert (assignment.item.name, assignment.lease_id) == (first.item.name, first.item.lease_id)
        held = dispatcher.agents[agent.agent_id]
        assert (list(held.leases), held.leases_committing, held.free_capacity) == (
            [assignment.lease_id],
            0,
            1,
        )

        # The lease the other try held while it was being committed is free again.
        other = await enqueue(service, queue, job)
        assert (await agent.next("assignment")).assignment.item.name == other.name
        listed = await service.queues.ListItems(queue_pb2.ListItemsRequest(parent=queue))
        assert sorted(item.name for item in listed.items) == sorted([first.item.name, other.name])
    finally:
        await agent.close()


async def test_an_enqueue_its_caller_gave_up_on_is_delivered_once_committed(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await service.new_queue()
    agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
    try:
        await agent.settle()
        writes = StoreWrites(monkeypatch, hold_first_insert=True)
        call = service.queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))
        await asyncio.wait_for(writes.holding.wait(), 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call  # the caller has given up mid-commit
        writes.release()

        assignment = (await agent.next("assignment")).assignment
        stored = await service.stored(assignment.item.name)
        assert (stored.state, stored.lease_id, states(stored)) == (
            LEASED,
            assignment.lease_id,
            [PENDING, LEASED],
        )
        held = service.parts.dispatcher.agents[agent.agent_id]
        assert (list(held.leases), held.leases_committing) == ([assignment.lease_id], 0)
    finally:
        await agent.close()


async def test_tokens_minted_out_of_turn_still_lease_the_items_in_line(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await service.new_queue()
    first, second = await enqueue(service, queue, job), await enqueue(service, queue, job)  # no agent yet
    tokens: Any = service.parts.dispatcher._tokens
    mint = tokens.mint_run_token
    release_first, second_minted = asyncio.Event(), asyncio.Event()

    async def first_one_late(run: str, item: str, job_version: str, secrets: Any) -> str:
        if item == first.name:
            await release_first.wait()
        token: str = await mint(run, item, job_version, secrets)
        return token

    monkeypatch.setattr(tokens, "mint_run_token", first_one_late)
    # The first item's token only is minted (a scope too long to sign, say); the second's is signed at once
    # (the signer is registered first), and must still wait for the first's.
    project = queue.split("/queues/")[0]
    await mint(f"{project}/runs/warm-1", f"{queue}/items/warm", f"{project}/jobs/j/versions/0", [])
    sign = tokens.signed_run_token

    def all_but_the_first(run: str, item: str, *rest: Any) -> str | None:
        if item == first.name:
            return None
        token: str | None = sign(run, item, *rest)
        if item == second.name:
            second_minted.set()
        return token

    monkeypatch.setattr(tokens, "signed_run_token", all_but_the_first)
    agent = await ScriptedAgent(service.address).connect([queue], capacity=2)
    try:
        await asyncio.wait_for(second_minted.wait(), PATIENCE)
        await agent.settle()  # the passes after the second's token have run, the first's still minting
        release_first.set()

        leased = [(await agent.next("assignment")).assignment.item.name for _ in range(2)]
        assert leased == [first.name, second.name]
    finally:
        await agent.close()


async def test_a_cancel_of_an_item_committed_but_not_yet_admitted_waits_for_its_admission(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CancelItem finds the new item in the store between its Enqueue's commit and its admission (a retry
    of the Enqueue returned it, say). It waits for the admission, then cancels the lease the admission
    gave: before, it wrote the item from the store's copy, which wrote the LEASED transition a second time,
    or, with that write failing, left a slot of the queue held for good."""
    queue = await service.new_queue()
    agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
    dispatcher = service.parts.dispatcher
    waiting: asyncio.Queue[str] = asyncio.Queue()
    admission_done = Dispatcher.admission_done

    async def observed(self: Dispatcher, item_id: str) -> None:
        if item_id in self._admitting:
            waiting.put_nowait(item_id)
        await admission_done(self, item_id)

    monkeypatch.setattr(Dispatcher, "admission_done", observed)
    gate = hold_enqueues_after_their_commit(monkeypatch)
    try:
        await agent.settle()
        gate.armed = True
        enqueuing = asyncio.create_task(enqueue(service, queue, job))
        await gate.reached.wait()
        [item_id] = gate.inserted
        name = f"{queue}/items/{item_id}"
        cancelling = asyncio.ensure_future(service.queues.CancelItem(queue_pb2.CancelItemRequest(name=name)))
        assert await waiting.get() == item_id
        gate.open()
        assert (await enqueuing).name == name
        cancelled = (await cancelling).item
        assignment = (await agent.next("assignment")).assignment
        assert (await agent.next("cancel")).cancel.lease_id == assignment.lease_id
        assert (cancelled.state, cancelled.cancel_requested) == (LEASED, True)
        assert states(await service.stored(name)) == [PENDING, LEASED]
        assert (await agent.complete(assignment, CANCELLED)).ack.state == CANCELLED
        assert dispatcher._live[queue] == 0
    finally:
        gate.open()
        await agent.close()
