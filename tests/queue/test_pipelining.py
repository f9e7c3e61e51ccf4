"""One agent's messages are applied as they arrive, not each after the commit of the one before
(services/takeoff_queue/api.py ``QueueApi._read``): a Heartbeat behind a Progress waiting for its commit is
answered, and its leases renewed, at once; the Progress is answered once committed, in order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from takeoff.v1 import common_pb2, queue_pb2
from tests.queue.harness import InProcessQueue, ScriptedAgent


async def test_a_heartbeat_is_answered_while_the_progress_before_it_waits_for_its_commit(
    service: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await service.new_queue()
    agent = await ScriptedAgent(service.address).connect([queue])
    try:
        await service.enqueue(queue, job)
        assignment = (await agent.next("assignment")).assignment
        store = service.parts.store
        commit = store.write
        release = asyncio.Event()

        async def held(changes: Any) -> Any:
            await release.wait()
            return await commit(changes)

        monkeypatch.setattr(store, "write", held)
        progress = await agent.send(
            progress=queue_pb2.LeaseRequest.Progress(
                lease_id=assignment.lease_id, epoch=assignment.epoch, state=common_pb2.ITEM_STATE_RUNNING
            )
        )
        heartbeat = await agent.send(heartbeat=queue_pb2.LeaseRequest.Heartbeat())
        first = (await agent.next("ack")).ack
        assert (first.request_sequence, first.of) == (heartbeat, queue_pb2.LEASE_MESSAGE_KIND_HEARTBEAT)
        leased = service.held(assignment.item.name)
        assert leased is not None
        assert leased.committed is not None
        assert leased.committed.state.value == "LEASED"  # RUNNING is not written yet

        release.set()
        second = (await agent.next("ack")).ack
        assert (second.request_sequence, second.state) == (progress, common_pb2.ITEM_STATE_RUNNING)
        assert (await service.stored(assignment.item.name)).state == common_pb2.ITEM_STATE_RUNNING
    finally:
        await agent.close()
