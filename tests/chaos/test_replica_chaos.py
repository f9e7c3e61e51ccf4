"""Queue replicas under faults (docs/design.md §5 "Several queue replicas"): two replicas on one PostgreSQL
database and four agents, two on each, work through 300 items; a third of the way through one replica is
killed with -9 and its agents move to the other; two thirds of the way a fresh replica joins. Faults cost
time, not work: every item ends SUCCEEDED, none ran twice, no agent lost a lease it held."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from tests.postgres import postgres_schema_url
from tests.processes import ServiceProcess, service_process
from tests.queue.harness import keyed_channel, make_code_job
from tests.queue.replicas_harness import (
    FailoverWorker,
    Violations,
    WorkDone,
    all_items,
    queue_replicas,
    replica_env,
)

pytestmark = [pytest.mark.postgres, pytest.mark.chaos]

ITEMS = 300
RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with service_process("registry", tmp_path_factory.mktemp("registry")) as process:
        yield process
        process.terminate()


@pytest.mark.timeout(180)  # the work's own deadline is 120 s on the loaded machine
async def test_replicas_killed_and_added_cost_no_work(
    tmp_path: Path, registry: ServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    make_code_job(registry.address, "chaos", "work", tmp_path_factory.mktemp("jobs"))
    with postgres_schema_url("replica_chaos") as database, ExitStack() as stack:
        env = replica_env(registry.address, database, lease_ttl=30, heartbeat=5)
        doomed, survivor = stack.enter_context(queue_replicas(tmp_path, env))
        live = [doomed.address, survivor.address]
        async with keyed_channel(doomed.address) as first, keyed_channel(survivor.address) as second:
            stubs = [queue_pb2_grpc.QueueServiceStub(channel) for channel in (first, second)]
            queue = (
                await stubs[0].CreateQueue(
                    queue_pb2.CreateQueueRequest(
                        parent="projects/chaos",
                        queue_id=f"chaos-{uuid.uuid4().hex[:8]}",
                        queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
                    )
                )
            ).queue.name
            left = list(range(ITEMS))

            async def enqueuer(queues: queue_pb2_grpc.QueueServiceAsyncStub) -> None:
                while left:
                    left.pop()
                    await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job="work:v0"))

            await asyncio.gather(*(enqueuer(stubs[index % 2]) for index in range(8)))  # through both

            violations, holders = Violations(), dict[str, str]()
            workers = [FailoverWorker(live, live[index % 2], holders, violations) for index in range(4)]
            done = WorkDone(ITEMS, within=120)
            tasks = [asyncio.create_task(worker.work(queue, 4, done)) for worker in workers]
            try:
                async with asyncio.timeout(done.within):
                    await done.reached(ITEMS // 3)
                    live.remove(doomed.address)
                    doomed.kill()
                    await done.reached(2 * ITEMS // 3)
                    [fresh] = await asyncio.to_thread(
                        stack.enter_context, queue_replicas(tmp_path, env, 1, first=2)
                    )
                    live.append(fresh.address)
                    await done.event.wait()
            except TimeoutError:
                items = await all_items(stubs[1], queue)
                states = Counter(common_pb2.ItemState.Name(item.state) for item in items)
                raise AssertionError(
                    f"{done.acknowledged} of {ITEMS} completed; items by state {dict(states)}; {violations};"
                    f" workers: {[(w.address, w.sessions, w.held) for w in workers]};"
                    f" failed workers: {[t.exception() for t in tasks if t.done() and not t.cancelled()]}"
                ) from None
            finally:
                for task in tasks:
                    task.cancel()
            for task in tasks:  # a worker's own assertion, if one failed
                if task.done() and not task.cancelled() and task.exception():
                    raise task.exception()  # type: ignore[misc]
            items = await all_items(stubs[1], queue)

    assert_no_work_lost(items, violations, workers)


def assert_no_work_lost(
    items: list[queue_pb2.Item], violations: Violations, workers: list[FailoverWorker]
) -> None:
    assert violations.rejected == []
    assert violations.doubly_held == []
    assert [w.sessions for w in workers if w.sessions < 1] == []
    assert sum(w.sessions for w in workers) >= 6  # the two on the killed replica moved
    assert len(items) == ITEMS
    ran_twice, lost = [], []
    for item in items:
        assert item.state == SUCCEEDED, item
        runs = [t for t in item.transitions if t.to_state == RUNNING]
        if len(runs) != 1:
            ran_twice.append(item.name)
        # A held lease a Welcome did not keep is fine only when that lease had completed the item.
        epoch = violations.lost_verdicts.get(item.name)
        if epoch is not None and item.transitions[-1].epoch != epoch:
            lost.append(item.name)
        for t in item.transitions[:-1]:  # attempts that ended without their Complete: lost before running
            if t.to_state == common_pb2.ITEM_STATE_PENDING and t.reason:
                assert t.reason == common_pb2.FAILURE_REASON_AGENT_LOST, item
    assert ran_twice == []
    assert lost == []
