"""Adversarial cases of the bounded in-memory index (docs/design.md §9 "The queue's in-memory index", §5
"Where a PENDING item stands"): each test forces one interleaving or fault the paging code once got wrong
(the review's findings F1..F9, named in each test), so that it stays right."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy.exc
from google.protobuf import duration_pb2, field_mask_pb2
from sqlalchemy import event

from takeoff.v1 import common_pb2, queue_pb2
from takeoff_queue import store as store_module
from takeoff_queue.book import QueueBook
from takeoff_queue.dispatcher import Dispatcher
from takeoff_queue.lifecycle import ItemState
from takeoff_queue.model import Item
from takeoff_queue.settings import QueueSettings
from takeoff_queue.store import LineKey, QueueStore, QueueWrite
from takeoff_server.database import Database
from tests.queue.harness import InProcessQueue, ScriptedAgent, error_details, in_process_queue
from tests.queue.test_paging import (
    CANCELLED,
    CRITICAL,
    HIGH,
    LOW,
    PENDING,
    RUNNING,
    SUCCEEDED,
    WINDOW,
    Service,
    _enqueue,
    _held_pending,
    _new_queue,
    _positions,
)

Assignment = queue_pb2.LeaseResponse.Assignment
FAILED = common_pb2.ITEM_STATE_FAILED


@pytest.fixture
def windowed(settings: QueueSettings) -> Service:
    """The queue service with test_paging's window; each call starts it again on the same database."""
    return lambda: in_process_queue(settings.model_copy(update={"pending_window": WINDOW}))


async def _set_paused(service: InProcessQueue, queue: str, paused: bool) -> None:
    await service.queues.UpdateQueue(
        queue_pb2.UpdateQueueRequest(
            queue=queue_pb2.Queue(name=queue, paused=paused),
            update_mask=field_mask_pb2.FieldMask(paths=["paused"]),
        )
    )


async def _cancel(service: InProcessQueue, name: str) -> queue_pb2.Item:
    reply = await service.queues.CancelItem(queue_pb2.CancelItemRequest(name=name))
    assert reply.item.state == CANCELLED or reply.item.cancel_requested
    return reply.item


async def _release(agent: ScriptedAgent, assignment: Assignment) -> None:
    await agent.send(
        release=queue_pb2.LeaseRequest.Release(lease_id=assignment.lease_id, epoch=assignment.epoch)
    )
    assert (await agent.answer()).ack.state == PENDING


async def _run_in_order(agent: ScriptedAgent, expected: list[str]) -> None:
    """Run what the agent is assigned, one after the other, checking each against ``expected`` as it comes
    (so that a wrong order fails at once, not after the line runs dry)."""
    assigned: list[str] = []
    while len(assigned) < len(expected):
        assignment = (await agent.next("assignment")).assignment
        assigned.append(assignment.item.name)
        assert assigned == expected[: len(assigned)], (
            f"got {[expected.index(n) if n in expected else n for n in assigned]}"
        )
        await agent.progress(assignment, RUNNING)
        assert (await agent.complete(assignment, SUCCEEDED, exit_code=0)).ack.state == SUCCEEDED


async def _listed_positions(service: InProcessQueue, queue: str) -> dict[str, int]:
    listed = await service.queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, page_size=100))
    return {item.name: item.position for item in listed.items if item.state == PENDING}


class _Gate:
    """Holds one call of a store read at a chosen point until the test opens it."""

    made: list[_Gate] = []

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self._open = asyncio.Event()
        self.armed = True
        self.inserted: list[str] = []
        _Gate.made.append(self)

    @classmethod
    def open_all(cls) -> None:
        """On a test's way out: a read left held would hold up the service's stop."""
        for gate in cls.made:
            gate.open()
        cls.made.clear()

    async def hold(self) -> None:
        if self.armed:
            self.armed = False
            self.reached.set()
            await self._open.wait()

    def open(self) -> None:
        self._open.set()


def _pages_applied(monkeypatch: pytest.MonkeyPatch) -> asyncio.Queue[str]:
    """A queue name put each time the dispatcher has taken in a page it read (or given it up)."""
    applied: asyncio.Queue[str] = asyncio.Queue()
    read_page = Dispatcher._read_page

    async def observed(dispatcher: Dispatcher, queue: Any, backlog: Any) -> None:
        try:
            await read_page(dispatcher, queue, backlog)
        finally:
            applied.put_nowait(queue.name)

    monkeypatch.setattr(Dispatcher, "_read_page", observed)
    return applied


# ----- F1: _trim moved `after` past items still in the database (fixed in 19de5e0) -------------------------


async def test_f1_a_trim_after_released_items_never_passes_over_items_left_in_the_database(
    windowed: Service, job: str
) -> None:
    async with windowed() as service:
        queue = await _new_queue(service, prioritization=True)
        agent = await ScriptedAgent(service.address).connect([queue], capacity=5)
        lows = [await _enqueue(service, queue, job, LOW) for _ in range(5)]
        leases = [(await agent.next("assignment")).assignment for _ in lows]
        assert [lease.item.name for lease in leases] == lows
        await _set_paused(service, queue, True)
        highs = [await _enqueue(service, queue, job, HIGH) for _ in range(2 * WINDOW + 1)]
        await agent.close()

    # After a restart the index holds highs[:WINDOW]; highs[WINDOW:] wait in the database.
    async with windowed() as restarted:
        assert restarted.held(highs[WINDOW]) is None
        again = await ScriptedAgent(restarted.address, agent_id=agent.agent_id).connect(
            [queue], capacity=5, held={lease.lease_id: lease.epoch for lease in leases}
        )
        for lease in leases:
            await _release(again, lease)  # PENDING again, held, sorting after every HIGH item
        await again.close()
        for name in highs[:3]:
            await _cancel(restarted, name)
        critical = await _enqueue(restarted, queue, job, CRITICAL)  # held: the index trims its line
        await _set_paused(restarted, queue, False)

        expected = [critical, *highs[3:], *lows]
        runner = await ScriptedAgent(restarted.address).connect([queue], capacity=1)
        try:
            await _run_in_order(runner, expected)
        finally:
            await runner.close()


async def _fifo_with_backlog(service: InProcessQueue, job: str, count: int) -> tuple[str, list[str]]:
    """A FIFO queue of ``count`` PENDING items, more than two windows: the index holds the first window."""
    queue = await _new_queue(service)
    names = [await _enqueue(service, queue, job) for _ in range(count)]
    assert service.held(names[WINDOW]) is None  # the case named: the rest wait in the database
    return queue, names


# ----- F2: a cancel between the page's two statements ended the line early (fixed in 19de5e0) -------------


async def test_f2_a_cancel_between_the_pages_two_reads_does_not_end_the_line(
    windowed: Service, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with windowed() as service:
        queue, names = await _fifo_with_backlog(service, job, 3 * WINDOW)
        gate = _Gate()
        fetch_items = store_module._fetch_items

        async def rows_after_the_ids(connection: Any, **filters: Any) -> list[dict[str, Any]]:
            if filters.get("item_ids") is not None and filters.get("states") == [ItemState.PENDING.value]:
                await gate.hold()  # the page's ids are read; its rows not yet
            return await fetch_items(connection, **filters)

        monkeypatch.setattr(store_module, "_fetch_items", rows_after_the_ids)
        applied = _pages_applied(monkeypatch)

        agent = await ScriptedAgent(service.address).connect([queue], capacity=WINDOW)
        try:
            leases = [(await agent.next("assignment")).assignment for _ in range(WINDOW)]
            assert [lease.item.name for lease in leases] == names[:WINDOW]
            await gate.reached.wait()  # the read ahead of names[WINDOW:2 * WINDOW] is under way
            cancelled = names[WINDOW + 1]
            await _cancel(service, cancelled)
            gate.open()
            assert await applied.get() == queue

            waiting = [name for name in names[WINDOW:] if name != cancelled]
            assert await _positions(service, waiting) == list(range(1, len(waiting) + 1))
            for lease in leases:
                await agent.progress(lease, RUNNING)
                await agent.complete(lease, SUCCEEDED, exit_code=0)
            await _run_in_order(agent, waiting)
        finally:
            _Gate.open_all()
            await agent.close()


# ----- F3: a page read before a cancel, taken in after it (fixed in 19de5e0) ------------------------------


async def test_f3_a_page_read_before_a_cancel_does_not_bring_the_cancelled_item_back(
    windowed: Service, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with windowed() as service:
        queue, names = await _fifo_with_backlog(service, job, 3 * WINDOW)
        gate = _Gate()
        pending_page = QueueStore.pending_page

        async def read_then_held(store: QueueStore, *args: Any) -> tuple[list[Item], LineKey | None]:
            page = await pending_page(store, *args)
            await gate.hold()  # read; not yet taken in
            return page

        monkeypatch.setattr(QueueStore, "pending_page", read_then_held)
        applied = _pages_applied(monkeypatch)

        agent = await ScriptedAgent(service.address).connect([queue], capacity=WINDOW)
        try:
            for _ in range(WINDOW):
                await agent.next("assignment")
            await gate.reached.wait()
            cancelled = names[WINDOW + 1]
            await _cancel(service, cancelled)
            gate.open()
            assert await applied.get() == queue

            waiting = [name for name in names[WINDOW:] if name != cancelled]
            assert await _positions(service, waiting) == list(range(1, len(waiting) + 1))
            held = service.held(cancelled)
            assert held is None or held.state is not ItemState.PENDING
            pending, _ = service.parts.dispatcher.depths()
            assert pending[queue] == len(waiting)
        finally:
            _Gate.open_all()
            await agent.close()


async def _a_low_item_released_behind_highs(
    service: InProcessQueue, queue: str, agent: ScriptedAgent, job: str
) -> tuple[str, list[str]]:
    """A LOW item leased, the queue paused, HIGH items enqueued past the window (the later ones wait in the
    database), then the LOW item released: PENDING again, held, behind every HIGH item."""
    low = await _enqueue(service, queue, job, LOW)
    lease = (await agent.next("assignment")).assignment
    await _set_paused(service, queue, True)
    highs = [await _enqueue(service, queue, job, HIGH) for _ in range(2 * WINDOW + 1)]
    assert service.held(highs[-1]) is None  # the case named: the later ones wait in the database
    await _release(agent, lease)
    return low, highs


# ----- F4: positions when held items sort after the backlog's `after` (fixed in 19de5e0) ------------------


async def test_f4_positions_count_a_released_item_behind_the_database_once(
    windowed: Service, job: str
) -> None:
    async with windowed() as service:
        queue = await _new_queue(service, prioritization=True)
        agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
        try:
            low, highs = await _a_low_item_released_behind_highs(service, queue, agent, job)
            lows = [low] + [await _enqueue(service, queue, job, LOW) for _ in range(2)]

            expected = [*highs, *lows]
            assert await _listed_positions(service, queue) == {
                name: place for place, name in enumerate(expected, 1)
            }
        finally:
            _Gate.open_all()
            await agent.close()


# ----- F5: SQLite read a prioritized line from the start of the priority (fixed in 4e63f36) ---------------

DEEP = 150


def _vm_steps(path: Path, statements: list[tuple[str, Any]]) -> int:
    """The SQLite virtual machine instructions the statements take, run again as the store ran them."""
    connection = sqlite3.connect(path)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    connection.set_progress_handler(count, 1)
    try:
        for statement, parameters in statements:
            connection.execute(statement, parameters).fetchall()
    finally:
        connection.close()
    return steps


async def test_f5_reading_deep_in_a_prioritized_line_costs_what_reading_its_front_does_on_sqlite(
    settings: QueueSettings, job: str
) -> None:
    on_sqlite = settings.model_copy(update={"database_url": None, "pending_window": WINDOW})
    async with in_process_queue(on_sqlite) as service:
        queue = await _new_queue(service, prioritization=True)
        names = [await _enqueue(service, queue, job) for _ in range(DEEP)]  # one priority, as most queues
        line = service.parts.dispatcher.queues[queue]
        found = await service.parts.store.items(item_ids=[name.rsplit("/", 1)[1] for name in names])
        keys: dict[str, LineKey] = {item.name: (int(item.priority), item.seq or 0) for item in found}

        path = on_sqlite.home / "queue.db"
        database = Database("queue", f"sqlite:///{path}")
        ran: list[tuple[str, Any]] = []

        def keep(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            if statement.lstrip().upper().startswith("SELECT"):
                ran.append((statement, parameters))

        event.listen(database.engine.sync_engine, "before_cursor_execute", keep)
        reader = QueueStore(database)
        try:

            async def cost_at(place: int) -> int:
                ran.clear()
                after = keys[names[place]]
                await reader.pending_page(line, after, WINDOW)
                await reader.pending_ahead(line, after, [keys[names[place + WINDOW]]])
                return _vm_steps(path, list(ran))

            front, deep = await cost_at(10), await cost_at(DEEP - 2 * WINDOW)
        finally:
            await database.engine.dispose()
        passed_over = DEEP - 2 * WINDOW - 10
        # Reading from a place costs what the page and the count hold, not the items before the place.
        assert deep - front < passed_over, f"{deep} VM steps {passed_over} items deeper, against {front}"


# ----- F6: CancelItem read an item left in the database while a page took it in and leased it ------------


async def test_f6_cancelling_an_item_a_page_leases_meanwhile_cancels_the_lease_the_agent_holds(
    windowed: Service, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with windowed() as service:
        queue, names = await _fifo_with_backlog(service, job, 3 * WINDOW)
        target = names[WINDOW]
        page_gate, read_gate = _Gate(), _Gate()
        pending_page, get_item = QueueStore.pending_page, QueueBook.get_item

        async def page_held(store: QueueStore, *args: Any) -> tuple[list[Item], LineKey | None]:
            page = await pending_page(store, *args)
            await page_gate.hold()
            return page

        async def read_held(book: QueueBook, name: str) -> Item:
            found = await get_item(book, name)
            if name == target:
                await read_gate.hold()  # CancelItem found it not held, and read it PENDING
            return found

        monkeypatch.setattr(QueueStore, "pending_page", page_held)
        monkeypatch.setattr(QueueBook, "get_item", read_held)

        agent = await ScriptedAgent(service.address).connect([queue], capacity=WINDOW + 1)
        try:
            for _ in range(WINDOW):
                await agent.next("assignment")
            await page_gate.reached.wait()  # the read ahead of names[WINDOW:] is under way
            cancel = asyncio.create_task(_cancel(service, target))
            await read_gate.reached.wait()
            page_gate.open()
            leased = (await agent.next("assignment")).assignment  # the free slot takes the page's first
            assert leased.item.name == target
            read_gate.open()
            await cancel

            assert (await agent.progress(leased, RUNNING)).WhichOneof("message") == "ack"
            assert (await agent.next("cancel")).cancel.lease_id == leased.lease_id
            assert (await agent.complete(leased, CANCELLED)).ack.state == CANCELLED
            ended = await service.stored(target)
            assert (ended.state, ended.attempt) == (CANCELLED, 1)
            _, live = service.parts.dispatcher.depths()
            assert service.parts.dispatcher.leases_by_queue()[queue] == live[queue]
        finally:
            _Gate.open_all()
            await agent.close()


def _database_down() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("a statement", {}, Exception("the database went away"))


# ----- F7: a cancel of an item left in the database whose write fails (fixed in 4ea4152) -----------------


async def test_f7_a_failed_cancel_of_an_item_left_in_the_database_leaves_it_counted_once(
    windowed: Service, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with windowed() as service:
        queue, names = await _fifo_with_backlog(service, job, 3 * WINDOW)
        target = names[-3]
        save_item = QueueWrite.save_item

        async def refused_once(tx: QueueWrite, item_id: str, *args: Any, **fence: Any) -> bool:
            if item_id == target.rsplit("/", 1)[1]:
                monkeypatch.setattr(QueueWrite, "save_item", save_item)
                raise _database_down()
            return await save_item(tx, item_id, *args, **fence)

        monkeypatch.setattr(QueueWrite, "save_item", refused_once)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await service.queues.CancelItem(queue_pb2.CancelItemRequest(name=target))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (await service.stored(target)).state == PENDING  # nothing changed

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await service.queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=queue))
        assert error_details(refused.value)[0] == "QUEUE_NOT_EMPTY"
        assert f"has {len(names)} items" in (refused.value.details() or "")
        pending, _ = service.parts.dispatcher.depths()
        assert pending[queue] == len(names)
        assert await _positions(service, names) == list(range(1, len(names) + 1))


async def _prioritized_low_backlog(windowed: Service, job: str) -> str:
    """A prioritized queue of 3 windows' worth of LOW items, made by a service that then stops: the one
    started next holds its first window and leaves the rest in the database, their last key unknown."""
    async with windowed() as service:
        queue = await _new_queue(service, prioritization=True)
        for _ in range(3 * WINDOW):
            await _enqueue(service, queue, job, LOW)
    return queue


# ----- F8: an Enqueue whose item is committed failed on reading its position (fixed in 4ea4152) ----------


async def test_f8_an_enqueue_committed_is_answered_even_when_its_position_cannot_be_read(
    windowed: Service, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await _prioritized_low_backlog(windowed, job)
    async with windowed() as restarted:

        async def unreadable(*_: Any) -> list[int]:
            raise _database_down()

        monkeypatch.setattr(QueueStore, "pending_ahead", unreadable)
        try:
            reply = await restarted.queues.Enqueue(
                queue_pb2.EnqueueRequest(queue=queue, job=job, priority=LOW)
            )
        except grpc.aio.AioRpcError as error:
            monkeypatch.undo()
            listed = await restarted.queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, page_size=100))
            raise AssertionError(
                f"Enqueue answered {error.code()} with {len(listed.items)} items committed (of "
                f"{3 * WINDOW + 1} asked)"
            ) from error
        assert reply.item.state == PENDING


# ----- F9: after a restart a prioritized queue counted its whole backlog per Enqueue (fixed in 4ea4152) ---


async def test_f9_an_enqueue_that_sorts_last_counts_nothing_after_a_restart(
    windowed: Service, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await _prioritized_low_backlog(windowed, job)
    async with windowed() as restarted:
        counted: list[int] = []
        pending_ahead = QueueStore.pending_ahead

        async def recorded(store: QueueStore, *args: Any) -> list[int]:
            counts = await pending_ahead(store, *args)
            counted.extend(counts)
            return counts

        monkeypatch.setattr(QueueStore, "pending_ahead", recorded)
        late = await restarted.queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, priority=LOW))
        assert late.item.position == 3 * WINDOW + 1
        assert counted == [], f"the Enqueue counted {counted} items in the database to place its item last"


def hold_enqueues_after_their_commit(monkeypatch: pytest.MonkeyPatch) -> _Gate:
    """A gate, disarmed, for the next store write that inserts an item once it is armed: the write is
    committed, and Dispatcher.admitted not called yet. ``gate.inserted`` has the ids of items inserted."""
    gate = _Gate()
    gate.armed = False
    write = QueueStore.write

    async def held_after_insert(store: QueueStore, changes: Any) -> Any:
        inserted: list[str] = []

        async def noting(tx: QueueWrite) -> Any:
            insert_item = tx.insert_item

            async def insert(item: Item) -> int:
                inserted.append(item.id)
                return await insert_item(item)

            tx.insert_item = insert  # type: ignore[method-assign]
            return await changes(tx)

        result = await write(store, noting)
        if inserted and gate.armed:
            gate.inserted = inserted
            await gate.hold()
        return result

    monkeypatch.setattr(QueueStore, "write", held_after_insert)
    return gate


# ----- F10: a page reads an Enqueue's item between its commit and its admission -------------------------


async def test_f10_an_item_a_page_read_before_its_enqueue_was_admitted_is_held_once(
    windowed: Service, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page that reads the line's end finds the new item committed while its Enqueue is not admitted
    yet. It passes the item over: the admission holds it, once, in its place at the line's end."""
    async with windowed() as service:
        queue, names = await _fifo_with_backlog(service, job, 2 * WINDOW + 1)
        applied = _pages_applied(monkeypatch)
        gate = hold_enqueues_after_their_commit(monkeypatch)
        agent = await ScriptedAgent(service.address).connect([queue], capacity=WINDOW)
        dispatcher = service.parts.dispatcher
        try:
            leases = [(await agent.next("assignment")).assignment for _ in range(WINDOW)]
            gate.armed = True
            enqueue = asyncio.create_task(_enqueue(service, queue, job))
            await gate.reached.wait()
            for lease in leases:
                await agent.progress(lease, RUNNING)
                await agent.complete(lease, SUCCEEDED, exit_code=0)
            for _ in names[WINDOW:]:
                older = (await agent.next("assignment")).assignment
                await agent.progress(older, RUNNING)
                await agent.complete(older, SUCCEEDED, exit_code=0)
            while queue in dispatcher._backlogs:  # until a page has read the line's end, the new item too
                await applied.get()
            assert [item.name for item in dispatcher.items.values() if item.queue == queue] == []
            gate.open()
            new = await enqueue
            assert (await agent.next("assignment")).assignment.item.name == new
            held = service.held(new)
            assert held is not None
            assert held.state is ItemState.LEASED
            assert list(dispatcher.agents[agent.agent_id].leases.values()) == [held.id]
        finally:
            _Gate.open_all()
            await agent.close()


# ----- F12: WatchQueue places a held item past the backlog's `after` without the items ahead of it ---------


async def _watched_positions(service: InProcessQueue, queue: str) -> dict[str, int]:
    """The PENDING items' positions in WatchQueue's first state (its snapshot)."""
    shown: dict[str, int] = {}
    watch = service.queues.WatchQueue(queue_pb2.WatchQueueRequest(name=queue))
    async for message in watch:
        shown.update({item.name: item.position for item in message.items if item.state == PENDING})
        if message.snapshot_done:
            break
    watch.cancel()
    return shown


async def test_f12_watch_queue_places_a_released_item_behind_the_database_as_get_item_does(
    windowed: Service, job: str
) -> None:
    async with windowed() as service:
        queue = await _new_queue(service, prioritization=True)
        agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
        try:
            low, highs = await _a_low_item_released_behind_highs(service, queue, agent, job)

            assert await _positions(service, [low]) == [len(highs) + 1]  # GetItem: right since F4
            assert (await _watched_positions(service, queue))[low] == len(highs) + 1
        finally:
            await agent.close()


# ----- F13: items waiting out a retry delay are held however many there are ------------------------------


async def _retrying_queue(
    service: InProcessQueue, retry_delay: duration_pb2.Duration, *, prioritization: bool = False
) -> str:
    """A queue whose failed items are tried again after ``retry_delay``, three attempts in all."""
    created = await service.queues.CreateQueue(
        queue_pb2.CreateQueueRequest(
            parent="projects/qtest",
            queue_id=f"page-{uuid.uuid4().hex[:10]}",
            queue=queue_pb2.Queue(
                resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS,
                prioritization=prioritization,
                retry_job_failures=True,
                retry_delay=retry_delay,
                max_attempts=3,
            ),
        )
    )
    return created.queue.name


async def _fail(agent: ScriptedAgent, assignment: Assignment) -> None:
    await agent.progress(assignment, RUNNING)
    failed = await agent.complete(assignment, FAILED, common_pb2.FAILURE_REASON_JOB_FAILED, exit_code=1)
    assert failed.ack.state == PENDING  # tried again after the queue's retry delay


def _waits_ended(monkeypatch: pytest.MonkeyPatch) -> asyncio.Queue[str]:
    """An item id put each time an item the index left in the database to wait out a retry stops waiting
    there: due (read back into the index, or counted among the items left in the database), or ended."""
    ended: asyncio.Queue[str] = asyncio.Queue()
    unrest = Dispatcher._unrest

    def observed(dispatcher: Dispatcher, item_id: str) -> None:
        resting = item_id in dispatcher._resting.by_id
        unrest(dispatcher, item_id)
        if resting:
            ended.put_nowait(item_id)

    monkeypatch.setattr(Dispatcher, "_unrest", observed)
    return ended


async def test_f13_items_waiting_out_a_retry_delay_do_not_grow_the_index_past_its_window(
    windowed: Service, job: str
) -> None:
    async with windowed() as service:
        queue = await _retrying_queue(service, duration_pb2.Duration(seconds=3600))
        for _ in range(5 * WINDOW):
            await _enqueue(service, queue, job)
        agent = await ScriptedAgent(service.address).connect([queue], capacity=1)  # one slot
        try:
            for _ in range(3 * WINDOW):
                await _fail(agent, (await agent.next("assignment")).assignment)  # tried again in an hour
                assert _held_pending(service, queue) <= 2 * WINDOW
        finally:
            await agent.close()


async def test_f13_items_read_back_after_their_retry_delay_keep_their_place_and_run_once(
    windowed: Service, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits_ended = _waits_ended(monkeypatch)
    async with windowed() as service:
        queue = await _retrying_queue(service, duration_pb2.Duration(seconds=2))
        names = [await _enqueue(service, queue, job) for _ in range(3 * WINDOW)]
        agent = await ScriptedAgent(service.address).connect([queue], capacity=2)
        try:
            async with agent.heartbeating():  # as a live agent does: its lease must not lapse
                failing = [(await agent.next("assignment")).assignment for _ in range(2)]
                assert [assignment.item.name for assignment in failing] == names[:2]
                await _set_paused(service, queue, True)
                for assignment in failing:
                    await _fail(agent, assignment)
                    # The case named: it waits out its delay in the database.
                    assert service.held(assignment.item.name) is None
                pending, _ = service.parts.dispatcher.depths()
                assert pending[queue] == len(names)
                assert await _positions(service, names[2:]) == list(range(1, len(names) - 1))

                # Read back a second before they are due; due, both sort before the backlog's key: held.
                due = {await asyncio.wait_for(waits_ended.get(), 30) for _ in failing}
                assert due == {name.rsplit("/", 1)[1] for name in names[:2]}
                assert all(service.held(name) is not None for name in names[:2])
                await _set_paused(service, queue, False)
                await _run_in_order(agent, names)  # the retried items first: they are the oldest
                for name in names[:2]:
                    item = (await service.queues.GetItem(queue_pb2.GetItemRequest(name=name))).item
                    leased = [t for t in item.transitions if t.to_state == common_pb2.ITEM_STATE_LEASED]
                    assert [t.attempt for t in leased] == [1, 2]
                    assert leased[1].time.ToDatetime() >= item.eligible_time.ToDatetime()
        finally:
            await agent.close()


async def test_f13_a_released_item_due_past_the_window_is_counted_in_the_database_and_runs_in_its_place(
    windowed: Service, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits_ended = _waits_ended(monkeypatch)
    async with windowed() as service:
        queue = await _retrying_queue(service, duration_pb2.Duration(seconds=2), prioritization=True)
        agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
        try:
            async with agent.heartbeating():  # as a live agent does: its lease must not lapse
                low, highs = await _a_low_item_released_behind_highs(service, queue, agent, job)
                assert service.held(low) is None  # the case named: it waits out the delay in the database
                assert await _positions(service, [low]) == [len(highs) + 1]

                assert await asyncio.wait_for(waits_ended.get(), 30) == low.rsplit("/", 1)[1]
                assert service.held(low) is None  # due past the backlog's key: counted there, read by a page
                pending, _ = service.parts.dispatcher.depths()
                assert pending[queue] == len(highs) + 1
                assert await _positions(service, [low]) == [len(highs) + 1]
                await _set_paused(service, queue, False)
                await _run_in_order(agent, [*highs, low])
        finally:
            await agent.close()


async def test_f13_after_a_restart_items_waiting_out_a_retry_delay_stay_in_the_database(
    windowed: Service, job: str
) -> None:
    async with windowed() as service:
        queue = await _retrying_queue(service, duration_pb2.Duration(seconds=3600))
        names = [await _enqueue(service, queue, job) for _ in range(3 * WINDOW)]
        agent = await ScriptedAgent(service.address).connect([queue], capacity=2)
        failing = [(await agent.next("assignment")).assignment for _ in range(2)]
        await _set_paused(service, queue, True)
        for assignment in failing:
            await _fail(agent, assignment)
        await agent.close()

    async with windowed() as restarted:
        # Loaded with the first window, and left there with their due times only.
        assert [restarted.held(name) for name in names[:2]] == [None, None]
        pending, _ = restarted.parts.dispatcher.depths()
        assert pending[queue] == len(names)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await restarted.queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=queue))
        assert f"has {len(names)} items" in (refused.value.details() or "")
        await _set_paused(restarted, queue, False)
        runner = await ScriptedAgent(restarted.address).connect([queue], capacity=1)
        try:
            async with runner.heartbeating():  # as a live agent does: its lease must not lapse
                await _run_in_order(runner, names[2:])  # the failed ones wait out their hour
                assert _held_pending(restarted, queue) == 0
        finally:
            await runner.close()


async def test_f13_an_item_cancelled_while_its_read_back_is_under_way_never_runs(
    windowed: Service, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with windowed() as service:
        queue = await _retrying_queue(service, duration_pb2.Duration(seconds=2))
        names = [await _enqueue(service, queue, job) for _ in range(3 * WINDOW)]
        target = names[0]
        gate = _Gate()
        gate.armed = False
        items = QueueStore.items

        async def read_then_held(store: QueueStore, **filters: Any) -> list[Item]:
            found = await items(store, **filters)
            if filters.get("item_ids") == [target.rsplit("/", 1)[1]]:
                await gate.hold()  # read back PENDING ahead of its due time; not yet at hand
            return found

        monkeypatch.setattr(QueueStore, "items", read_then_held)
        agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
        try:
            async with agent.heartbeating():  # as a live agent does: its lease must not lapse
                failing = (await agent.next("assignment")).assignment
                assert failing.item.name == target
                await _set_paused(service, queue, True)
                gate.armed = True
                await _fail(agent, failing)
                assert service.held(target) is None  # waiting out its delay in the database
                await asyncio.wait_for(gate.reached.wait(), 30)
                assert (await _cancel(service, target)).state == CANCELLED
                gate.open()

                pending, _ = service.parts.dispatcher.depths()
                assert pending[queue] == len(names) - 1
                await _set_paused(service, queue, False)
                await _run_in_order(agent, names[1:])
                assert (await service.stored(target)).state == CANCELLED
                assert service.held(target) is None
        finally:
            _Gate.open_all()
            await agent.close()


async def test_f13_an_item_due_before_its_read_back_lands_is_not_passed_over_meanwhile(
    windowed: Service, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with windowed() as service:
        queue = await _retrying_queue(service, duration_pb2.Duration(seconds=2))
        names = [await _enqueue(service, queue, job) for _ in range(3 * WINDOW)]
        target = names[0].rsplit("/", 1)[1]
        gate, due = _Gate(), asyncio.Event()
        gate.armed = False
        items, come_due = QueueStore.items, Dispatcher._come_due

        async def read_then_held(store: QueueStore, **filters: Any) -> list[Item]:
            found = await items(store, **filters)
            if filters.get("item_ids") == [target]:
                await gate.hold()  # a slow read back: it lands after the item is due
            return found

        def noted(dispatcher: Dispatcher, item_id: str, epoch: int) -> None:
            come_due(dispatcher, item_id, epoch)
            if item_id == target:
                due.set()

        monkeypatch.setattr(QueueStore, "items", read_then_held)
        monkeypatch.setattr(Dispatcher, "_come_due", noted)
        agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
        try:
            async with agent.heartbeating():  # as a live agent does: its lease must not lapse
                failing = (await agent.next("assignment")).assignment
                await _set_paused(service, queue, True)
                gate.armed = True
                await _fail(agent, failing)
                await asyncio.wait_for(gate.reached.wait(), 30)
                await asyncio.wait_for(due.wait(), 30)
                await _set_paused(service, queue, False)  # a free slot, and names[1] first in the heap
                await agent.settle()
                dispatcher = service.parts.dispatcher
                behind = service.held(names[1])
                assert behind is not None
                assert behind.state is ItemState.PENDING
                assert behind.id not in dispatcher._minting
                gate.open()
                await _run_in_order(agent, names)
        finally:
            _Gate.open_all()
            await agent.close()
