"""Review of the queue replicas (docs/design.md §5 "Several queue replicas"): sequences of events between
two replicas that the fenced writes must survive.

Real ``python -m takeoff_queue`` processes on a fresh PostgreSQL schema (the fixtures of test_replicas.py).
Where a test needs "another replica's commit" to land at an exact moment, it makes that commit itself on
the database, as a replica does (the row's revision moved on, a NOTIFY naming the item), holding it open
until the moment comes; nothing waits on time."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from google.protobuf import duration_pb2

from takeoff.v1 import common_pb2, queue_pb2
from takeoff_queue.dispatcher import Dispatcher
from takeoff_queue.settings import QueueSettings
from takeoff_queue.store import next_revision
from tests.processes import ServiceProcess
from tests.queue.harness import PATIENCE, ScriptedAgent, Stub, in_process_queue
from tests.queue.replicas_harness import queue_replicas, replica_env
from tests.queue.test_paging_review import hold_enqueues_after_their_commit
from tests.queue.test_replicas import LONG_TTL, database, enqueue, new_queue, two_replicas

pytestmark = pytest.mark.postgres

__all__ = ["database"]  # the fixture, used by name

BUILDING = common_pb2.ITEM_STATE_BUILDING
STARTING = common_pb2.ITEM_STATE_STARTING
LEASED = common_pb2.ITEM_STATE_LEASED
RUNNING = common_pb2.ITEM_STATE_RUNNING
PENDING = common_pb2.ITEM_STATE_PENDING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
ITEMS_CHANNEL = "takeoff_queue_items"
START_TIMEOUT = 2


async def test_a_cancel_committed_by_another_replica_survives_pipelined_progress(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    """Replica A has two writes of one item in flight (an agent's Progress BUILDING and STARTING, sent
    without waiting for Acks, as agents do); another replica's cancel commits between A's read and A's
    first write. A's first write is refused (revision r is gone), and its second, fenced on the r + 1 that
    A expected its first write to make, must be refused too: the other replica's write made r + 1 as well.
    Otherwise the cancel is overwritten and never reaches the agent."""
    async with two_replicas(tmp_path, registry, database) as ((first, _), (on_first, _)):
        queue = await new_queue(on_first)
        agent = await ScriptedAgent(first.address).connect([queue], capacity=1)
        try:
            await enqueue(on_first, queue, job)
            assignment = (await agent.next("assignment")).assignment
            async with await psycopg.AsyncConnection.connect(database) as other:
                row = await (await other.execute("SELECT id, revision FROM queue_items")).fetchone()
                assert row is not None
                item_id, revision = row
                # The other replica's CancelItem, committed once A's writes are on their way.
                await other.execute(
                    "UPDATE queue_items SET revision = %s, cancel_requested = true, message = 'stop it'"
                    " WHERE id = %s AND revision = %s",
                    (next_revision(revision), item_id, revision),
                )
                await other.execute("SELECT pg_notify(%s, %s)", (ITEMS_CHANNEL, f"other-replica:{item_id}"))
                for state in (BUILDING, STARTING):
                    await agent.send(
                        progress=queue_pb2.LeaseRequest.Progress(
                            lease_id=assignment.lease_id, epoch=assignment.epoch, state=state
                        )
                    )
                # Answered without a write: once its Ack is here, both Progress writes were handed to the
                # store (each message changes the index, in order, before its first wait).
                await agent.send(set_capacity=queue_pb2.LeaseRequest.SetCapacity(capacity=1))
                while (await agent.answer()).ack.of != queue_pb2.LEASE_MESSAGE_KIND_SET_CAPACITY:
                    pass
                await other.commit()
            answers = [await agent.answer(), await agent.answer()]
            seen = [
                (response.ack.request_sequence, common_pb2.ItemState.Name(response.ack.state))
                if response.HasField("ack")
                else (response.reject.request_sequence, response.reject.message)
                for response in answers
            ]
            async with await psycopg.AsyncConnection.connect(database) as reader:
                stored = await (
                    await reader.execute("SELECT cancel_requested, state FROM queue_items")
                ).fetchone()
            # The other replica's committed cancel is never overwritten, and the agent hears it.
            assert stored == (True, "STARTING"), seen
            assert (await agent.next("cancel")).cancel.lease_id == assignment.lease_id
        finally:
            await agent.close()


async def test_a_stream_left_open_on_another_replica_does_not_end_leases_given_on_this_one(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    """An agent left replica B for replica A, but B never saw its stream end (a network partition, or B was
    stopped: the agent's goodbye never reached it; gRPC keeps such a stream until keepalive, minutes). A
    gives the agent work; B reads that lease from A's notification and must not end it as "assigned
    through a replica the agent had left": the agent holds it, on A, and is working on it."""
    async with two_replicas(tmp_path, registry, database) as ((first, second), (on_first, on_second)):
        queue = await new_queue(on_first)
        stale = await ScriptedAgent(second.address).connect([queue], capacity=1)  # never closed by B
        live = await ScriptedAgent(first.address, agent_id=stale.agent_id).connect([queue], capacity=1)
        watch = await _watch_from_now(on_second, queue)
        try:
            name = await enqueue(on_first, queue, job)
            assignment = (await live.next("assignment")).assignment
            async for change in watch:  # B has read the lease A gave
                if any(item.name == name and item.state == LEASED for item in change.items):
                    break
            # A commit of B's made after that: whatever B decided on reading the lease is committed by now.
            await new_queue(on_second)
            async with await psycopg.AsyncConnection.connect(database) as reader:
                closes = await (await reader.execute("SELECT run, message FROM queue_run_closes")).fetchall()
            assert closes == []
            assert (await live.progress(assignment, RUNNING)).ack.state == RUNNING
        finally:
            watch.cancel()
            await live.close()
            await stale.close()


async def test_a_start_timeout_that_fell_due_while_the_agent_moved_still_ends_the_lease(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    """A replica times an item's start only while the agent's stream is here; a deadline that falls due
    while the agent is between replicas (its replica died, it has not reconnected yet) must still be
    enforced once the agent is back on a replica, or a lease that never starts is held for ever."""
    async with two_replicas(tmp_path, registry, database) as ((doomed, survivor), (on_doomed, _)):
        created = await on_doomed.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent="projects/qtest",
                queue_id=f"start-{uuid.uuid4().hex[:8]}",
                queue=queue_pb2.Queue(
                    resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS,
                    start_timeout=duration_pb2.Duration(seconds=START_TIMEOUT),
                ),
            )
        )
        queue = created.queue.name
        agent = await ScriptedAgent(doomed.address).connect([queue])
        await enqueue(on_doomed, queue, job)
        assignment = (await agent.next("assignment")).assignment
        doomed.kill()
        assert (await agent.next()).WhichOneof("message") is None, "the stream outlived its replica"
        await agent.close()
        # The agent comes back after the start deadline has passed (the clock is what is tested here).
        late = assignment.start_deadline.ToDatetime(UTC) - datetime.now(UTC) + timedelta(seconds=0.5)
        await asyncio.sleep(max(late.total_seconds(), 0))
        back = await ScriptedAgent(survivor.address, agent_id=agent.agent_id).connect(
            [queue], held={assignment.lease_id: assignment.epoch}
        )
        try:
            assert back.welcome is not None
            [verdict] = back.welcome.lease_verdicts
            if verdict.kept:  # kept at the Hello, then taken away as the deadline says
                revoke = (await back.next("revoke", within=START_TIMEOUT * 3)).revoke
                assert revoke.lease_id == assignment.lease_id
        finally:
            await back.close()


async def test_a_replica_stopped_in_a_transaction_does_not_stop_the_others_renewing_leases(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    """A replica SIGSTOPped (or cut off from the database) in the middle of a commit keeps the rows it wrote
    locked. Another replica's write of one of those rows waits for it; the heartbeats of that replica's own
    agents must still be answered, or every agent leaves a healthy replica and, past the TTL, no lease is
    renewed anywhere: one stopped replica would stop them all."""
    async with two_replicas(tmp_path, registry, database) as ((first, _), (on_first, _)):
        queue = await new_queue(on_first)
        agent = await ScriptedAgent(first.address).connect([queue])
        await enqueue(on_first, queue, job)
        assignment = (await agent.next("assignment")).assignment
        async with await psycopg.AsyncConnection.connect(database) as stopped:
            # What the stopped replica's open transaction holds: the item's row, written, not committed.
            await stopped.execute("SELECT id FROM queue_items FOR UPDATE")
            try:
                # The agent's Progress waits for the row; its Heartbeat, read after it, must not.
                await agent.send(
                    progress=queue_pb2.LeaseRequest.Progress(
                        lease_id=assignment.lease_id, epoch=assignment.epoch, state=RUNNING
                    )
                )
                await agent.settle()  # within 10 s: before the agent takes the replica for silent (TTL / 3)
            finally:
                await stopped.rollback()
                await agent.close()


async def test_a_replica_starting_while_others_sweep_does_not_extend_dead_agents_leases(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    """A replica that starts while others run must not give every agent a new TTL: the database's clock
    kept running and the others kept sweeping. Otherwise a replica restarting more often than the TTL (a
    crash loop, a rolling update of many replicas) keeps the leases of dead agents, and their items, for
    ever."""
    async with two_replicas(tmp_path, registry, database) as ((first, _), (on_first, _)):
        queue = await new_queue(on_first)
        dead = await ScriptedAgent(first.address).connect([queue])
        await enqueue(on_first, queue, job)
        await dead.next("assignment")
        await dead.vanish()
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as reader:
            query = "SELECT lease_expiry FROM queue_agents WHERE agent_id = %s"
            before = await (await reader.execute(query, (dead.agent_id,))).fetchone()
            env = replica_env(registry.address, database, lease_ttl=LONG_TTL, heartbeat=5)
            with queue_replicas(tmp_path, env, count=1, first=2):
                after = await (await reader.execute(query, (dead.agent_id,))).fetchone()
        assert after == before


async def test_a_sweeper_that_read_an_agent_expired_ends_no_lease_it_renewed_meanwhile(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    """The review's F10. A sweeper reads the agents whose leases expired, then ends their leases in a
    transaction of its own; the agent's heartbeat may renew them in between, through any replica. Forced
    here: the expiry is committed in the past while a renewal holds the agent's row, and commits only once
    both replicas' sweepers wait on that row inside their closing transactions. They must end nothing."""
    async with two_replicas(tmp_path, registry, database) as ((first, _), (on_first, _)):
        queue = await new_queue(on_first)
        agent = await ScriptedAgent(first.address).connect([queue], capacity=1)
        try:
            name = await enqueue(on_first, queue, job)
            assignment = (await agent.next("assignment")).assignment
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as watcher:
                item_id = name.rsplit("/", 1)[1]
                before = await (
                    await watcher.execute("SELECT revision FROM queue_items WHERE id = %s", (item_id,))
                ).fetchone()
                async with _sweepers_waiting_on_a_renewal(database, watcher, agent.agent_id):
                    pass
                await _until_no_lock_waits(watcher)
                closes = await (await watcher.execute("SELECT count(*) FROM queue_run_closes")).fetchone()
                after = await (
                    await watcher.execute(
                        "SELECT revision, state, lease_id FROM queue_items WHERE id = %s", (item_id,)
                    )
                ).fetchone()
            assert closes == (0,)
            assert before is not None
            assert after == (before[0], "LEASED", assignment.lease_id)
        finally:
            await agent.close()


async def test_a_message_about_a_lease_whose_expiry_is_being_committed_is_to_be_sent_again(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    """A sweeper read the agent's leases expired and is committing their end, when the agent's Progress
    arrives; the agent's renewal then commits first, and the end is not recorded: the lease is the agent's
    still. Before, the Progress was answered LEASE_LOST at once (the lease was released in memory before the
    commit), and the agent would have stopped a job whose lease it kept. Now it is answered NOT_COMMITTED,
    and sent again once the sweeper's transaction has decided, it is taken. Forced as in the test above:
    the renewal holds the agent's row until the sweepers wait on it."""
    async with two_replicas(tmp_path, registry, database) as ((first, _), (on_first, _)):
        queue = await new_queue(on_first)
        agent = await ScriptedAgent(first.address).connect([queue], capacity=1)
        try:
            await enqueue(on_first, queue, job)
            assignment = (await agent.next("assignment")).assignment
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as watcher:
                async with _sweepers_waiting_on_a_renewal(database, watcher, agent.agent_id):
                    while_ending = await agent.progress(assignment, RUNNING)
                await _until_no_lock_waits(watcher)
            assert while_ending.reject.reason == queue_pb2.REJECT_REASON_NOT_COMMITTED, while_ending
            # The sweeper's transaction has decided; its task may take a turn more to learn it. Sent again
            # as an agent does while the answer is NOT_COMMITTED, the Progress is taken.
            again = await agent.progress(assignment, RUNNING)
            async with asyncio.timeout(PATIENCE):
                while again.reject.reason == queue_pb2.REJECT_REASON_NOT_COMMITTED:
                    again = await agent.progress(assignment, RUNNING)
            assert again.ack.state == RUNNING
            assert (await agent.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
        finally:
            await agent.close()


async def test_a_hello_waits_for_a_stale_claim_of_a_lease_it_lists_to_be_refused(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    """Replica A claims an item for an agent of its own, read before replica B leased it to another agent;
    that agent then moves to A (its replica gone) listing the lease, while A's claim is still on its way to
    the database. The Welcome must keep the lease. Before, the verdict read A's index, where the stale claim
    stood until refused: the lease was called lost, and once read back ended as never delivered (the
    replica chaos test's lost verdicts, once in CI). Forced: an earlier write of A's waits on a row the test
    locks, so that the claim waits behind it in A's group commit; the agent's renewal at its Hello waits on a
    second lock, so that the test knows A has read the agent's leases before it lets the claim through."""
    async with two_replicas(tmp_path, registry, database) as ((first, second), (on_first, on_second)):
        queue, parked = await new_queue(on_first), await new_queue(on_first)
        blocker = await enqueue(on_first, parked, job)  # nobody serves its queue: only the test's write
        async with (
            await psycopg.AsyncConnection.connect(database, autocommit=True) as watcher,
            await psycopg.AsyncConnection.connect(database) as hold_blocker,
        ):
            await hold_blocker.execute(
                "SELECT 1 FROM queue_items WHERE id = %s FOR UPDATE", (blocker.rsplit("/", 1)[1],)
            )
            cancelling = asyncio.ensure_future(on_first.CancelItem(queue_pb2.CancelItemRequest(name=blocker)))
            await _until_waiting_on(watcher, "%queue_items%")
            own = await ScriptedAgent(first.address).connect([queue], capacity=1)
            name = await enqueue(on_second, queue, job)  # PENDING: no agent on the second replica

            async def claimed() -> bool:  # in A's memory, not committed
                return bool((await _agent(on_first, own.agent_id)).leases)

            await _until(claimed, "the first replica claimed the item")
            mover = await ScriptedAgent(second.address).connect([queue], capacity=1)
            assignment = (await mover.next("assignment")).assignment  # committed on the second replica
            await mover.vanish()
            back = ScriptedAgent(first.address, agent_id=mover.agent_id)
            async with await psycopg.AsyncConnection.connect(database) as hold_renewal:
                await hold_renewal.execute(
                    "SELECT 1 FROM queue_agents WHERE agent_id = %s FOR UPDATE", (mover.agent_id,)
                )
                held = {assignment.lease_id: assignment.epoch}
                await back.connect([queue], capacity=1, held=held, expect_welcome=False)
                await _until_waiting_on(watcher, "%queue_agents%")  # A read its leases, and renews them

            async def renewed() -> bool:
                query = "SELECT session_id FROM queue_agents WHERE agent_id = %s"
                found = await (await watcher.execute(query, (mover.agent_id,))).fetchone()
                return found == (back.session_id,)

            await _until(renewed, "the Hello's renewal was committed")
            await hold_blocker.rollback()  # A's claim goes through now, and is refused
            welcome = (await back.next("welcome")).welcome
        try:
            assert [(v.lease_id, v.kept) for v in welcome.lease_verdicts] == [(assignment.lease_id, True)]
            assert (await back.progress(assignment, RUNNING)).ack.state == RUNNING
            assert (await back.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
            await cancelling
            item = (await on_second.GetItem(queue_pb2.GetItemRequest(name=name))).item
            assert [t.to_state for t in item.transitions] == [PENDING, LEASED, RUNNING, SUCCEEDED], item
            assert (await _agent(on_first, own.agent_id)).leases == []
        finally:
            await back.close()
            await own.close()


async def test_a_refresh_read_before_a_lease_ended_here_does_not_hold_the_lease_again(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str
) -> None:
    """Replica A reads an item another replica named (a refresh), then the item's run closes; between the
    two reads the agent completes the item on A, which drops it from A's index, and leaves. The copy read
    first must not put the ended lease back: a phantom lease, held by an agent that is gone, shown to A's
    watchers after the item's end until A compares its whole index with the database, a minute later.
    Forced: queue_run_closes is locked (ACCESS EXCLUSIVE) so that the refresh waits between its reads. An
    item enqueued on the other replica once the lock is released is read by A only after that refresh (A
    applies what the others wrote one refresh at a time), which tells the test that it is over. Enqueued
    while the lock is held, it could wait behind the other replica's outbox drainer, itself waiting on the
    lock: the test would then wait on itself."""
    async with two_replicas(tmp_path, registry, database) as ((first, _), (on_first, on_second)):
        queue, parked = await new_queue(on_first), await new_queue(on_first)
        agent = await ScriptedAgent(first.address).connect([queue], capacity=1)
        watch = await _watch_from_now(on_first, parked)
        try:
            name = await enqueue(on_first, queue, job)
            assignment = (await agent.next("assignment")).assignment
            async with (
                await psycopg.AsyncConnection.connect(database, autocommit=True) as watcher,
                await psycopg.AsyncConnection.connect(database) as lock,
            ):
                await lock.execute("LOCK TABLE queue_run_closes IN ACCESS EXCLUSIVE MODE")
                await watcher.execute(
                    "SELECT pg_notify(%s, %s)", (ITEMS_CHANNEL, f"other-replica:{name.rsplit('/', 1)[1]}")
                )
                # Both replicas refresh the item the notification names: A's refresh among the two waiting.
                await _until_waiting_on(watcher, "%queue_run_closes.item_id IN%", count=2)
                assert (await agent.progress(assignment, RUNNING)).ack.state == RUNNING
                assert (await agent.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
                await agent.close()  # its stream is over on A once the call has ended
                await lock.rollback()
            read_after = await enqueue(on_second, parked, job)
            async with asyncio.timeout(PATIENCE):
                async for change in watch:
                    if any(item.name == read_after for item in change.items):
                        break
            listed = await on_first.ListAgents(queue_pb2.ListAgentsRequest(include_disconnected=True))
            assert [lease.lease_id for found in listed.agents for lease in found.leases] == []
        finally:
            watch.cancel()
            await agent.close()


async def test_a_refresh_during_an_enqueues_admission_leaves_its_new_lease_to_it(
    tmp_path: Path, registry: ServiceProcess, job: str, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Enqueue leases its item at once (to an agent whose stream this replica holds) and commits it; a
    refresh (a notification naming it, as another replica's would) reads it then, before the Enqueue's
    admission took it in. The refresh must leave it to the admission: indexed from the refresh, the lease
    looked like one given through a replica the agent had left, and was ended as never delivered while
    its Assignment was on its way. A replica in this process, so that the Enqueue can be held there."""
    settings = QueueSettings(
        home=tmp_path,
        listen=["127.0.0.1:0"],
        registry_address=registry.address,
        database_url=database,
        replicas=True,
        heartbeat_interval_seconds=0.2,
    )
    refreshed: asyncio.Queue[list[str]] = asyncio.Queue()
    refresh = Dispatcher.refresh

    async def observed(dispatcher: Dispatcher, item_ids: Iterable[str]) -> None:
        wanted = list(item_ids)
        await refresh(dispatcher, wanted)
        refreshed.put_nowait(wanted)

    monkeypatch.setattr(Dispatcher, "refresh", observed)
    gate = hold_enqueues_after_their_commit(monkeypatch)
    async with in_process_queue(settings) as service:
        await refreshed.get()  # the catch-up read once it listens: notifications reach it from now on
        queue = await new_queue(service.queues)
        agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
        try:
            gate.armed = True
            enqueuing = asyncio.create_task(enqueue(service.queues, queue, job))
            await gate.reached.wait()
            [item_id] = gate.inserted
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as other:
                await other.execute("SELECT pg_notify(%s, %s)", (ITEMS_CHANNEL, f"other-replica:{item_id}"))
            while item_id not in await refreshed.get():
                pass
            gate.open()
            await enqueuing
            assignment = (await agent.next("assignment")).assignment
            assert (await agent.progress(assignment, RUNNING)).ack.state == RUNNING
            assert (await agent.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
        finally:
            gate.open()
            await agent.close()


@asynccontextmanager
async def _sweepers_waiting_on_a_renewal(
    database: str, watcher: psycopg.AsyncConnection[Any], agent_id: str
) -> AsyncIterator[None]:
    """The agent's leases expired by the database's clock, and a renewal of them holding the agent's row:
    the block runs once both replicas' sweepers (every ttl/6: 5 s) wait on that row inside their closing
    transactions, which have read the agent's leases and released them in memory; then the renewal
    commits."""
    await watcher.execute(
        "UPDATE queue_agents SET lease_expiry = now() - interval '1 second' WHERE agent_id = %s", (agent_id,)
    )
    async with await psycopg.AsyncConnection.connect(database) as renewal:
        await renewal.execute(
            "UPDATE queue_agents SET lease_expiry = now() + interval '30 seconds' WHERE agent_id = %s",
            (agent_id,),
        )
        await _until_waiting_on(watcher, "%queue_agents%FOR UPDATE%", count=2)
        yield
        await renewal.commit()


async def _watch_from_now(queues: Stub, queue: str) -> Any:
    """A WatchQueue stream of the queue, read past its snapshot: what it yields next changed after."""
    watch = queues.WatchQueue(queue_pb2.WatchQueueRequest(name=queue))
    async for change in watch:
        if change.snapshot_done:
            break
    return watch


async def _until_no_lock_waits(watcher: psycopg.AsyncConnection[Any]) -> None:
    async def none() -> bool:
        query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        return await (await watcher.execute(query)).fetchone() == (0,)

    await _until(none, "no statement waits on a lock")


async def _until_waiting_on(watcher: psycopg.AsyncConnection[Any], query: str, *, count: int = 1) -> None:
    """Until ``count`` statements like ``query`` wait on a lock in the database."""

    async def waiting() -> bool:
        found = await (
            await watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                (query,),
            )
        ).fetchone()
        return found is not None and found[0] >= count

    await _until(waiting, f"{count} statements like {query} wait on a lock")


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(2000):
        if await check():
            return
        await asyncio.sleep(0.01)  # polling a state, not waiting out time
    pytest.fail(f"never: {what}")


async def _agent(queues: Stub, agent_id: str) -> queue_pb2.Agent:
    return (await queues.GetAgent(queue_pb2.GetAgentRequest(name=f"agents/{agent_id}"))).agent
