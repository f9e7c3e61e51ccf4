"""Adversarial cases of the index leaving PENDING items that wait out a retry's delay in the database
(docs/design.md §9 "The queue's in-memory index", review of 5ca3f04: ``_rest``, ``_come_due``,
``_read_back``). Each test forces one case the change gets wrong, named R<n> in its xfail; the case itself
is checked with :func:`_case`, which fails the test outright (not as the expected failure) if it was not
reached, so each strict xfail fails only at the assertion its reason names."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from takeoff.v1 import common_pb2, queue_pb2
from takeoff_queue.lifecycle import ItemState
from takeoff_queue.store import QueueStore, QueueWrite
from tests.queue.harness import InProcessQueue, ScriptedAgent, error_details
from tests.queue.test_paging import PENDING, RUNNING, Service, _enqueue, _new_queue
from tests.queue.test_paging_review import (
    _a_low_item_released_behind_highs,
    _database_down,
    _fail,
    _Gate,
    _retrying_queue,
    _set_paused,
    windowed,  # noqa: F401 (the fixture: test_paging's window)
)

FAILED = common_pb2.ITEM_STATE_FAILED
RETRY_BACKOFF = queue_pb2.PENDING_REASON_RETRY_BACKOFF
QUEUE_PAUSED = queue_pb2.PENDING_REASON_QUEUE_PAUSED
NO_AGENT = queue_pb2.PENDING_REASON_NO_AGENT
AN_HOUR = duration_pb2.Duration(seconds=3600)
WAIT = 30.0
"""Bound of a wait for a message the server sends at once (a loaded machine's reads included)."""
TOLD_WITHIN = 10.0
"""How long a watch may lag the one woken in the same dispatch pass (each reads its item, then sends it)."""


def _dispatcher_now(service: InProcessQueue) -> str:
    return service.parts.dispatcher._clock().isoformat()


def _case(reached: bool, what: str) -> None:
    """The case the test names was reached; if not, the test fails as broken, not as the expected failure."""
    if not reached:
        pytest.fail(f"case not reached: {what}", pytrace=False)


async def _resting_item(service: InProcessQueue, queue: str, job: str) -> str:
    """An item of ``queue`` (retry delay of an hour) that failed once and waits out the delay in the
    database: not in the index, PENDING with RETRY_BACKOFF. The agent that failed it is gone."""
    name = await _enqueue(service, queue, job)
    agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
    try:
        await _fail(agent, (await agent.next("assignment", within=60)).assignment)
    finally:
        await agent.close()
    stored = await service.stored(name)
    _case(service.held(name) is None, "the failed item left the index")
    _case(stored.state == PENDING and stored.pending_reason == RETRY_BACKOFF, f"it waits its retry: {stored}")
    return name


class _Watch:
    """One WatchItem stream, read message by message."""

    def __init__(self, service: InProcessQueue, name: str) -> None:
        self._call: Any = service.queues.WatchItem(queue_pb2.WatchItemRequest(name=name))

    async def next(self, within: float = WAIT) -> queue_pb2.Item:
        message = await asyncio.wait_for(self._call.read(), within)
        assert message is not grpc.aio.EOF, "the watch ended"
        item: queue_pb2.Item = message.item
        return item

    def cancel(self) -> None:
        self._call.cancel()


async def _snapshot(service: InProcessQueue, queue: str) -> dict[str, queue_pb2.Item]:
    """WatchQueue's first state (its snapshot), by item name."""
    shown: dict[str, queue_pb2.Item] = {}
    watch = service.queues.WatchQueue(queue_pb2.WatchQueueRequest(name=queue))
    try:
        async with asyncio.timeout(WAIT):
            async for message in watch:
                shown.update({item.name: item for item in message.items})
                if message.snapshot_done:
                    break
    finally:
        watch.cancel()
    return shown


# ----- R1: WatchQueue's snapshot leaves out the items waiting out a retry ---------------------------------


async def test_r1_watch_queue_snapshot_shows_an_item_waiting_out_its_retry(
    service: InProcessQueue, job: str
) -> None:
    queue = await _retrying_queue(service, AN_HOUR)
    resting = await _resting_item(service, queue, job)
    pending, _ = service.parts.dispatcher.depths()
    _case(pending[queue] == 1, "the depth counts it")

    shown = await _snapshot(service, queue)
    assert resting in shown, f"the snapshot shows {sorted(shown)}, not the item waiting out its retry"
    assert (shown[resting].state, shown[resting].pending_reason) == (PENDING, RETRY_BACKOFF)


# ----- R2: WatchItem begun on a resting item is told its reason changed ---------------------------------


async def test_r2_watch_item_begun_on_a_resting_item_is_told_when_its_queue_is_paused(
    service: InProcessQueue, job: str
) -> None:
    queue = await _retrying_queue(service, AN_HOUR)
    resting = await _resting_item(service, queue, job)
    held = await _enqueue(service, queue, job)  # no agent serves the queue now: it waits in the index
    _case(service.held(held) is not None, "the second item is held in the index")
    watches = {name: _Watch(service, name) for name in (resting, held)}
    try:
        first = {name: (await watch.next()).pending_reason for name, watch in watches.items()}
        _case(first == {resting: RETRY_BACKOFF, held: NO_AGENT}, f"the watches began: {first}")

        await _set_paused(service, queue, True)
        # The pass that the pause scheduled woke the watchers whose item's reason changed: the held one's
        # watch shows it, and the resting one's was woken in the same loop.
        _case((await watches[held].next()).pending_reason == QUEUE_PAUSED, "the held item's watch was told")
        try:
            told = await watches[resting].next(within=TOLD_WITHIN)
        except TimeoutError:
            raise AssertionError("the resting item's watch was not told its queue is paused") from None
        assert told.pending_reason == QUEUE_PAUSED
    finally:
        for watch in watches.values():
            watch.cancel()


# ----- R3: a DeleteQueue between a retry's commit and its return leaves a phantom resting item ------------


def _hold_after_commit(monkeypatch: pytest.MonkeyPatch, gate: _Gate) -> None:
    """Hold the next item write of the dispatcher (``_persist``) once it has committed, before it returns."""
    write = QueueStore.write

    async def committed_then_held(store: QueueStore, changes: Callable[[QueueWrite], Awaitable[Any]]) -> Any:
        result = await write(store, changes)
        if changes.__qualname__ == "Dispatcher._persist.<locals>.write":
            await gate.hold()
        return result

    monkeypatch.setattr(QueueStore, "write", committed_then_held)


async def test_r3_a_queue_deleted_while_a_retry_commits_leaves_nothing_behind(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await _retrying_queue(service, AN_HOUR)
    name = await _enqueue(service, queue, job)
    gate = _Gate()
    gate.armed = False
    _hold_after_commit(monkeypatch, gate)
    agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
    try:
        assignment = (await agent.next("assignment", within=60)).assignment
        _case(assignment.item.name == name, "the item was assigned")
        await agent.progress(assignment, RUNNING)
        gate.armed = True
        await agent.send(
            complete=queue_pb2.LeaseRequest.Complete(
                lease_id=assignment.lease_id,
                epoch=assignment.epoch,
                outcome=FAILED,
                reason=common_pb2.FAILURE_REASON_JOB_FAILED,
                exit_code=1,
            )
        )
        await asyncio.wait_for(gate.reached.wait(), WAIT)  # the retry is committed; _persist not yet back
        await service.queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=queue, force=True))
        gate.open()
        _case((await agent.answer()).ack.state == PENDING, "the failure was committed, to be tried again")

        # The queue made again under its name is empty, and deleted without force.
        project, queue_id = queue.split("/queues/")
        await service.queues.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent=project,
                queue_id=queue_id,
                queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
            )
        )
        pending, _ = service.parts.dispatcher.depths()
        try:
            await service.queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=queue))
        except grpc.aio.AioRpcError as error:
            refused = f"{error_details(error)} {error.details()}"
            raise AssertionError(f"the new empty queue was refused: {refused}") from None
        assert pending[queue] == 0
    finally:
        _Gate.open_all()
        await agent.close()


async def _deadlines_passed(service: InProcessQueue, span: timedelta) -> None:
    """Return once every deadline on the dispatcher's timer due within ``span`` from now has been handled: a
    marker put on the timer ``span`` from now comes due after them (the timer takes its entries in order)."""
    dispatcher = service.parts.dispatcher
    timer = dispatcher._deadlines
    marker, reached = uuid.uuid4().hex, asyncio.Event()
    on_due = timer._on_due

    def observed(kind: str, key: str, epoch: int) -> None:
        if kind == "marker" and key == marker:
            reached.set()
        else:
            on_due(kind, key, epoch)

    timer._on_due = observed
    try:
        timer.at(dispatcher._clock() + span, "marker", marker)
        await asyncio.wait_for(reached.wait(), WAIT)
    finally:
        timer._on_due = on_due


# ----- R4: a failed cancel of a held item waiting out its retry puts it in line at once (before 5ca3f04) ---


async def test_r4_a_failed_cancel_of_a_watched_item_waiting_out_its_retry_does_not_run_it_early(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await _retrying_queue(service, AN_HOUR)
    name = await _enqueue(service, queue, job)
    item_id = name.rsplit("/", 1)[1]
    watch = _Watch(service, name)  # watched before it fails: held in the index while it waits
    agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
    try:
        await watch.next()
        await _fail(agent, (await agent.next("assignment", within=60)).assignment)
        held = service.held(name)
        _case(held is not None and held.state is ItemState.PENDING, "the watched item waits in the index")

        save_item = QueueWrite.save_item

        async def refused_once(tx: QueueWrite, saved_id: str, *args: Any, **fence: Any) -> bool:
            if saved_id == item_id:
                monkeypatch.setattr(QueueWrite, "save_item", save_item)
                raise _database_down()
            return await save_item(tx, saved_id, *args, **fence)

        monkeypatch.setattr(QueueWrite, "save_item", refused_once)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await service.queues.CancelItem(queue_pb2.CancelItemRequest(name=name))
        _case(failed.value.code() == grpc.StatusCode.UNAVAILABLE, "the cancel's write failed")

        await _deadlines_passed(service, 2 * service.parts.dispatcher.timing.heartbeat_interval)
        await agent.settle()  # every dispatch pass they scheduled has run
        held = service.held(name)
        state, eligible = (held.state, held.life.eligible_time) if held is not None else (None, None)
        assert state is ItemState.PENDING, (
            f"{state} at {_dispatcher_now(service)}, its retry due at {eligible}"
        )
        assert (await service.stored(name)).state == PENDING
    finally:
        watch.cancel()
        await agent.close()


# ----- R5: WatchQueue keeps a released item's place current as the line moves ---------------------------


async def test_r5_watch_queue_moves_a_released_item_up_as_the_items_ahead_are_leased(
    windowed: Service,  # noqa: F811
    job: str,
) -> None:
    async with windowed() as service:
        queue = await _new_queue(service, prioritization=True)
        agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
        watch = None
        try:
            low, highs = await _a_low_item_released_behind_highs(service, queue, agent, job)
            watch = service.queues.WatchQueue(queue_pb2.WatchQueueRequest(name=queue))
            shown: dict[str, queue_pb2.Item] = {}
            async with asyncio.timeout(WAIT):
                async for message in watch:
                    shown.update({item.name: item for item in message.items})
                    if message.snapshot_done:
                        break
            _case(shown[low].position == len(highs) + 1, f"the snapshot placed it: {shown[low].position}")

            await _set_paused(service, queue, False)  # the agent's one slot takes the first HIGH item
            async with asyncio.timeout(WAIT):
                async for message in watch:
                    shown.update({item.name: item for item in message.items})
                    if shown[highs[0]].state != PENDING:
                        break
            _case(shown[highs[0]].state == common_pb2.ITEM_STATE_LEASED, "the first HIGH item was leased")
            place, reason = shown[low].position, queue_pb2.PendingReason.Name(shown[low].pending_reason)
            assert (place, reason != "PENDING_REASON_QUEUE_PAUSED") == (len(highs), True), (
                f"the released item still shows place {place} and {reason}, as before the queue was resumed"
            )
        finally:
            if watch is not None:
                watch.cancel()
            _Gate.open_all()
            await agent.close()
