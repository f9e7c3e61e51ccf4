"""Review of the queue replicas (docs/design.md §5 "Several queue replicas"): sequences of events between
two replicas that the fenced writes must survive.

Real ``python -m takeoff_queue`` processes on a fresh PostgreSQL schema (the fixtures of test_replicas.py).
Where a test needs "another replica's commit" to land at an exact moment, it makes that commit itself on
the database, as a replica does (the row's revision moved on, a NOTIFY naming the item), holding it open
until the moment comes; nothing waits on time."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from takeoff.v1 import common_pb2, queue_pb2
from tests.processes import ServiceProcess
from tests.queue.harness import ScriptedAgent
from tests.queue.test_replicas import database, enqueue, new_queue, two_replicas

pytestmark = pytest.mark.postgres

__all__ = ["database"]  # the fixture, used by name

BUILDING = common_pb2.ITEM_STATE_BUILDING
STARTING = common_pb2.ITEM_STATE_STARTING
ITEMS_CHANNEL = "takeoff_queue_items"


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
                    "UPDATE queue_items SET revision = revision + 1, cancel_requested = true,"
                    " message = 'stop it' WHERE id = %s AND revision = %s",
                    (item_id, revision),
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
