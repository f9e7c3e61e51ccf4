"""The queue's own Prometheus metrics (services/takeoff_queue/metrics.py) follow what happens to items:
enqueues, depth, assignments and their latency, leases held, items under a lease."""

from __future__ import annotations

from takeoff.v1 import common_pb2
from takeoff_server.metrics import process_registry
from tests.queue.harness import InProcessQueue, ScriptedAgent

RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED


async def test_the_metrics_follow_enqueues_dispatches_and_ends(service: InProcessQueue, job: str) -> None:
    metrics = process_registry(service.parts.metrics)

    def value(name: str, queue: str) -> float | None:
        return metrics.get_sample_value(name, {"queue": queue})

    queue = await service.new_queue()
    assert value("takeoff_queue_depth", queue) == 0
    for _ in range(2):
        await service.enqueue(queue, job)
    assert value("takeoff_queue_enqueues_total", queue) == 2
    assert value("takeoff_queue_depth", queue) == 2
    assert value("takeoff_queue_assignments_total", queue) is None  # no agent: nothing assigned yet

    agent = await ScriptedAgent(service.address).connect([queue], capacity=1)
    try:
        first = (await agent.next("assignment")).assignment
        assert value("takeoff_queue_assignments_total", queue) == 1
        assert value("takeoff_queue_dispatch_seconds_count", queue) == 1
        assert (value("takeoff_queue_dispatch_seconds_sum", queue) or 0) > 0
        assert value("takeoff_queue_depth", queue) == 1
        assert value("takeoff_queue_running", queue) == 1
        assert value("takeoff_queue_leases_held", queue) == 1

        assert (await agent.progress(first, RUNNING)).ack.state == RUNNING
        assert (await agent.complete(first, SUCCEEDED)).ack.state == SUCCEEDED
        second = (await agent.next("assignment")).assignment
        assert second.item.name != first.item.name
        assert value("takeoff_queue_assignments_total", queue) == 2
        assert value("takeoff_queue_depth", queue) == 0
        assert value("takeoff_queue_leases_held", queue) == 1
        assert value("takeoff_queue_leases_expired_total", queue) is None
    finally:
        await agent.close()
