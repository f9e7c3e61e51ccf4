"""The deadline an agent gives its fences ends before the queue service's own expiry of its leases
(docs/design.md §5 "Timing"): a job whose agent is away is stopped before the queue takes its attempt for
lost, so it cannot finish its work after the item went to the next attempt.

The Welcome's ``server_time`` is the queue's renewal time (``Dispatcher.hello`` renews with the same clock
reading), so the queue expires the agent's leases at ``server_time + TTL`` unless a heartbeat renews them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff.client import Client
from takeoff.v1 import common_pb2
from takeoff_agent.lease import FENCE_LEAD_SECONDS, HelloSpec, LeaseLink
from tests.keys import ADMIN_KEY
from tests.lease_handlers import NoLeases
from tests.processes import ServiceProcess, service_process

PROJECT = "deadline"
TTL_SECONDS = 6.0
"""Long enough that the lead is the whole FENCE_LEAD_SECONDS (it is at most a sixth of the TTL)."""
PATIENCE = 30.0


@pytest.fixture(scope="module")
def queue_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    home: Path = tmp_path_factory.mktemp("deadline")
    with contextlib.ExitStack() as processes:
        registry = processes.enter_context(service_process("registry", home))
        env = {
            "TAKEOFF_REGISTRY_ADDRESS": registry.address,
            "TAKEOFF_LEASE_TTL_SECONDS": str(TTL_SECONDS),
            "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS": "0.5",
        }
        queue = processes.enter_context(service_process("queue", home, env=env))
        with Client(registry.address, queue=queue.address, project=PROJECT, api_key=ADMIN_KEY) as client:
            client.create_queue("work")
        yield queue


async def test_the_welcome_and_each_heartbeat_renew_to_a_lead_before_the_queues_expiry(
    queue_service: ServiceProcess,
) -> None:
    renewals = NoLeases()
    hello = HelloSpec(
        agent_id=f"deadline-{uuid.uuid4().hex[:8]}",
        display_name="deadline",
        queues=[f"projects/{PROJECT}/queues/work"],
        resources=[common_pb2.RESOURCE_KIND_LOCAL_PROCESS],
        capacity=1,
        version="test",
    )
    link = LeaseLink(queue_service.address, hello, renewals, api_key=ADMIN_KEY)
    running = asyncio.create_task(link.run())
    try:
        welcome = await renewals.next(PATIENCE)
        assert welcome.lease_ttl.ToTimedelta().total_seconds() == TTL_SECONDS
        expiry = welcome.server_time.ToNanoseconds() / 1e9 + TTL_SECONDS  # the queue's, unless renewed
        welcomed_until = renewals.deadlines[0]
        assert welcomed_until <= expiry - FENCE_LEAD_SECONDS

        await renewals.renewals(3, PATIENCE)  # the Welcome's, and two heartbeats acknowledged
        # A heartbeat renews from its send time: never later than the queue, which renews on receipt.
        assert all(until <= time.time() + TTL_SECONDS - FENCE_LEAD_SECONDS for until in renewals.deadlines)
        assert renewals.deadlines[-1] > welcomed_until
    finally:
        link.stop()
        await asyncio.wait_for(running, PATIENCE)
