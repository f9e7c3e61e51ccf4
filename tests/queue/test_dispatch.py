"""Push dispatch over the Lease stream, against real queue and registry processes."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TypeAlias

import grpc
import pytest
from google.protobuf import field_mask_pb2

from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from tests.processes import until
from tests.queue.conftest import LEASE_TTL_SECONDS, NewQueue
from tests.queue.harness import ScriptedAgent, agent_shown, struct, watch_until

Stub: TypeAlias = "queue_pb2_grpc.QueueServiceAsyncStub"  # a type only the stubs know
LEASED = common_pb2.ITEM_STATE_LEASED
RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
FAILED = common_pb2.ITEM_STATE_FAILED
PENDING = common_pb2.ITEM_STATE_PENDING
CANCELLED = common_pb2.ITEM_STATE_CANCELLED
UNSPECIFIED_STATE = common_pb2.ITEM_STATE_UNSPECIFIED
UNSPECIFIED_REASON = common_pb2.FAILURE_REASON_UNSPECIFIED


async def enqueue(queues: Stub, queue: str, job: str, **fields: object) -> queue_pb2.Item:
    return (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, **fields))).item  # type: ignore[arg-type]


async def item(queues: Stub, name: str) -> queue_pb2.Item:
    return (await queues.GetItem(queue_pb2.GetItemRequest(name=name))).item


def moves(shown: queue_pb2.Item) -> list[tuple[int, int, int]]:
    """An item's history as (from state, to state, reason)."""
    return [(t.from_state, t.to_state, t.reason) for t in shown.transitions]


async def test_enqueued_item_is_pushed_to_an_idle_agent(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        enqueued = await enqueue(queues, queue, job, run_config=struct({"epochs": 3}))
        assignment = (await agent.next("assignment")).assignment

        assert assignment.item.name == enqueued.name
        assert (assignment.attempt, assignment.epoch) == (1, 1)
        assert assignment.run == f"projects/qtest/runs/{enqueued.name.rsplit('/', 1)[1]}-1"
        assert assignment.job_version.name.startswith("projects/qtest/jobs/train/versions/")
        assert list(assignment.entrypoint) == ["python", "train.py"]
        assert dict(assignment.item.run_config) == {"epochs": 3.0, "lr": 0.1}  # schema default filled in
        assert (await item(queues, enqueued.name)).state == LEASED  # committed before it was sent

        ack = await agent.progress(assignment, RUNNING)
        assert ack.ack.state == RUNNING
        ack = await agent.complete(assignment, SUCCEEDED, exit_code=0)
        assert ack.ack.state == SUCCEEDED
        done = await item(queues, enqueued.name)
        assert [(t.from_state, t.to_state) for t in done.transitions] == [
            (common_pb2.ITEM_STATE_UNSPECIFIED, PENDING),
            (PENDING, LEASED),
            (LEASED, RUNNING),
            (RUNNING, SUCCEEDED),
        ]
    finally:
        await agent.close()


async def test_fifo_within_priority_and_priority_first(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(prioritization=True)
    low = await enqueue(queues, queue, job, priority=common_pb2.PRIORITY_LOW)
    first = await enqueue(queues, queue, job)
    second = await enqueue(queues, queue, job)
    urgent = await enqueue(queues, queue, job, priority=common_pb2.PRIORITY_CRITICAL)
    agent = await ScriptedAgent(queue_address).connect([queue], capacity=1)
    try:
        order = []
        for _ in range(4):
            assignment = (await agent.next("assignment")).assignment
            order.append(assignment.item.name)
            await agent.complete(assignment, SUCCEEDED)
        assert order == [urgent.name, first.name, second.name, low.name]
    finally:
        await agent.close()


async def test_without_prioritization_it_is_pure_fifo(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    names = [(await enqueue(queues, queue, job, priority=p)).name for p in (4, 1, 3)]
    agent = await ScriptedAgent(queue_address).connect([queue], capacity=3)
    try:
        received = [(await agent.next("assignment")).assignment.item.name for _ in names]
        assert received == names
    finally:
        await agent.close()


async def test_round_robin_across_an_agents_queues(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    a, b = await new_queue(), await new_queue()
    for _ in range(3):
        await enqueue(queues, a, job)
    for _ in range(3):
        await enqueue(queues, b, job)
    agent = await ScriptedAgent(queue_address).connect([a, b], capacity=1)
    try:
        served = []
        for _ in range(4):
            assignment = (await agent.next("assignment")).assignment
            served.append(assignment.queue)
            await agent.complete(assignment, SUCCEEDED)
        assert served == [a, b, a, b]
    finally:
        await agent.close()


async def test_capacity_and_concurrency_limit(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    limited = await new_queue(concurrency_limit=1)
    names = [(await enqueue(queues, limited, job)).name for _ in range(3)]
    first = await ScriptedAgent(queue_address).connect([limited], capacity=5)
    second = await ScriptedAgent(queue_address).connect([limited], capacity=5)
    try:
        assignment = (await first.next("assignment")).assignment
        assert assignment.item.name == names[0]
        # With both connected and every pass run, the two agents, with room for ten, hold one lease.
        await second.settle()
        assert await _leases_held(queues, limited) == 1
        assert (await item(queues, names[1])).state == PENDING

        await first.complete(assignment, SUCCEEDED)
        winner = await _first_assignment([first, second])
        assert winner.item.name == names[1]  # the next in line, and only it
        assert await _leases_held(queues, limited) == 1
    finally:
        await first.close()
        await second.close()


async def _leases_held(queues: Stub, queue: str) -> int:
    agents = await queues.ListAgents(queue_pb2.ListAgentsRequest(queue=queue))
    return sum(len(agent.leases) for agent in agents.agents)


async def _first_assignment(agents: list[ScriptedAgent]) -> queue_pb2.LeaseResponse.Assignment:
    tasks = [asyncio.create_task(agent.next("assignment", within=5)) for agent in agents]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return done.pop().result().assignment


async def test_capacity_limits_an_agent(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    names = [(await enqueue(queues, queue, job)).name for _ in range(3)]
    agent = await ScriptedAgent(queue_address).connect([queue], capacity=2)
    try:
        await agent.next("assignment")
        await agent.next("assignment")
        await agent.settle()
        assert await _leases_held(queues, queue) == 2
        assert (await item(queues, names[2])).state == PENDING
        await agent.send(set_capacity=queue_pb2.LeaseRequest.SetCapacity(capacity=3))
        assert (await agent.next("ack")).ack.of == queue_pb2.LEASE_MESSAGE_KIND_SET_CAPACITY
        assert (await agent.next("assignment")).assignment.item.name == names[2]
    finally:
        await agent.close()


async def test_a_paused_queue_assigns_nothing_until_resumed(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(paused=True)
    paused = await enqueue(queues, queue, job)
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        await agent.settle()
        assert await _leases_held(queues, queue) == 0
        assert (await item(queues, paused.name)).state == PENDING
        await queues.UpdateQueue(
            queue_pb2.UpdateQueueRequest(
                queue=queue_pb2.Queue(name=queue, paused=False),
                update_mask=field_mask_pb2.FieldMask(paths=["paused"]),
            )
        )
        assert (await agent.next("assignment")).assignment.item.name == paused.name
    finally:
        await agent.close()


async def test_cancel_pending_and_cancel_leased(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    leased = await enqueue(queues, queue, job)
    pending = await enqueue(queues, queue, job)
    agent = await ScriptedAgent(queue_address).connect([queue], capacity=1)
    try:
        assignment = (await agent.next("assignment")).assignment
        cancelled = (await queues.CancelItem(queue_pb2.CancelItemRequest(name=pending.name))).item
        assert cancelled.state == CANCELLED

        flagged = (await queues.CancelItem(queue_pb2.CancelItemRequest(name=leased.name))).item
        assert (flagged.state, flagged.cancel_requested) == (LEASED, True)
        cancel = (await agent.next("cancel")).cancel
        assert cancel.lease_id == assignment.lease_id
        ack = await agent.complete(assignment, CANCELLED)
        assert ack.ack.state == CANCELLED
        await agent.settle()
        assert await _leases_held(queues, queue) == 0  # the cancelled pending item is never assigned
    finally:
        await agent.close()


async def test_cancel_while_the_agent_is_away_reaches_it_on_reconnect(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(max_attempts=3)
    enqueued = await enqueue(queues, queue, job)
    agent = await ScriptedAgent(queue_address).connect([queue])
    assignment = (await agent.next("assignment")).assignment
    await agent.vanish()

    await queues.CancelItem(queue_pb2.CancelItemRequest(name=enqueued.name))
    back = await ScriptedAgent(queue_address, agent_id=agent.agent_id).connect(
        [queue], held={assignment.lease_id: assignment.epoch}
    )
    try:
        assert back.welcome is not None
        assert [v.kept for v in back.welcome.lease_verdicts] == [True]
        assert (await back.next("cancel")).cancel.lease_id == assignment.lease_id
    finally:
        await back.close()


async def test_cancel_requested_item_whose_agent_never_returns_ends_cancelled(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(max_attempts=3)
    enqueued = await enqueue(queues, queue, job)
    agent = await ScriptedAgent(queue_address).connect([queue])
    await agent.next("assignment")
    await agent.vanish()
    await queues.CancelItem(queue_pb2.CancelItemRequest(name=enqueued.name))

    ended = await watch_until(
        queues, enqueued.name, lambda shown: shown.state == CANCELLED, within=LEASE_TTL_SECONDS * 4
    )
    assert ended.attempt == 1  # never retried


async def test_heartbeats_keep_a_lease_past_its_ttl(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    enqueued = await enqueue(queues, queue, job)
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        await agent.next("assignment")
        first_expiry = (await item(queues, enqueued.name)).lease_expire_time.ToDatetime()
        async with agent.heartbeating():
            await asyncio.sleep(LEASE_TTL_SECONDS * 2)  # time passing is the case, not a wait for it
        held = await item(queues, enqueued.name)
        assert held.state == LEASED
        assert held.lease_expire_time.ToDatetime() > first_expiry + timedelta(seconds=LEASE_TTL_SECONDS)
    finally:
        await agent.close()


async def test_a_silent_agent_loses_the_item_to_another_with_attempt_two_in_its_place(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(max_attempts=3)
    first = await enqueue(queues, queue, job)
    silent = await ScriptedAgent(queue_address).connect([queue])
    lost = (await silent.next("assignment")).assignment
    later = await enqueue(queues, queue, job)

    revoke = (await silent.next("revoke", within=LEASE_TTL_SECONDS * 4)).revoke
    assert (revoke.lease_id, revoke.reason) == (lost.lease_id, queue_pb2.REVOKE_REASON_EXPIRED)
    # PENDING once the registry has closed the attempt's run (docs/design.md §16)
    retried = await watch_until(queues, first.name, lambda seen: seen.state != LEASED)
    assert (retried.state, retried.reason) == (PENDING, common_pb2.FAILURE_REASON_AGENT_LOST), (
        retried.transitions
    )
    assert moves(retried)[-1] == (LEASED, PENDING, common_pb2.FAILURE_REASON_AGENT_LOST)
    # An infrastructure failure backs off: 1 s after the first failed attempt (docs/design.md §16).
    retried_at = retried.transitions[-1].time.ToDatetime()
    assert retried.eligible_time.ToDatetime() - retried_at == timedelta(seconds=1)

    rescuer = await ScriptedAgent(queue_address).connect([queue], capacity=2)
    try:
        # The later item is eligible at once; the retried one once its back-off ends.
        assignments = {
            assignment.item.name: assignment
            for assignment in [(await rescuer.next("assignment")).assignment for _ in range(2)]
        }
        assert set(assignments) == {first.name, later.name}
        assignment = assignments[first.name]
        assert (assignment.attempt, assignment.epoch) == (2, 2)
        assert moves(assignment.item) == [*moves(retried), (PENDING, LEASED, UNSPECIFIED_REASON)]

        # The zombie's report is refused, and its stream stays up.
        await silent.send(
            complete=queue_pb2.LeaseRequest.Complete(
                lease_id=lost.lease_id, epoch=lost.epoch, outcome=SUCCEEDED
            )
        )
        reject = (await silent.next("reject")).reject
        assert reject.reason == queue_pb2.REJECT_REASON_LEASE_LOST
        await silent.heartbeat()
        assert (await silent.next("ack")).ack.of == queue_pb2.LEASE_MESSAGE_KIND_HEARTBEAT
        assert (await item(queues, first.name)).state == LEASED
    finally:
        await rescuer.close()
        await silent.close()


async def test_a_zombie_complete_is_rejected_and_other_leases_carry_on(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    await enqueue(queues, queue, job)
    await enqueue(queues, queue, job)
    agent = await ScriptedAgent(queue_address).connect([queue], capacity=2)
    try:
        one = (await agent.next("assignment")).assignment
        two = (await agent.next("assignment")).assignment
        await agent.send(
            complete=queue_pb2.LeaseRequest.Complete(
                lease_id=one.lease_id,
                epoch=one.epoch + 1,
                outcome=SUCCEEDED,  # not the lease's epoch
            )
        )
        assert (await agent.next("reject")).reject.reason == queue_pb2.REJECT_REASON_LEASE_LOST
        assert (await agent.complete(two, SUCCEEDED)).ack.state == SUCCEEDED
        assert (await agent.complete(one, SUCCEEDED)).ack.state == SUCCEEDED
        again = await agent.complete(one, SUCCEEDED)  # a resend gets the same answer
        assert again.ack.state == SUCCEEDED
    finally:
        await agent.close()


async def test_reconnect_within_the_ttl_keeps_the_lease(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    enqueued = await enqueue(queues, queue, job)
    agent = await ScriptedAgent(queue_address).connect([queue])
    assignment = (await agent.next("assignment")).assignment
    await agent.vanish()

    back = await ScriptedAgent(queue_address, agent_id=agent.agent_id).connect(
        [queue], held={assignment.lease_id: assignment.epoch, "made-up-lease": 7}
    )
    try:
        assert back.welcome is not None
        verdicts = {v.lease_id: (v.kept, v.reason) for v in back.welcome.lease_verdicts}
        assert verdicts == {
            assignment.lease_id: (True, queue_pb2.REVOKE_REASON_UNSPECIFIED),
            "made-up-lease": (False, queue_pb2.REVOKE_REASON_LEASE_LOST),
        }
        assert (await back.complete(assignment, SUCCEEDED)).ack.state == SUCCEEDED
        assert (await item(queues, enqueued.name)).attempt == 1
    finally:
        await back.close()


async def test_a_second_session_supersedes_the_first(queue_address: str, new_queue: NewQueue) -> None:
    queue = await new_queue()
    first = await ScriptedAgent(queue_address).connect([queue])
    second = await ScriptedAgent(queue_address, agent_id=first.agent_id).connect([queue])
    try:
        end = await first.next()
        assert end.WhichOneof("message") is None
        assert first.error is not None
        assert first.error.code() == grpc.StatusCode.ABORTED
    finally:
        await second.close()
        await first.close()


async def test_start_timeout_revokes_and_retries(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(start_timeout={"seconds": 1}, max_attempts=2)
    enqueued = await enqueue(queues, queue, job)
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        async with agent.heartbeating():  # a live agent whose job never starts
            first = (await agent.next("assignment")).assignment
            revoke = (await agent.next("revoke", within=5)).revoke
            assert (revoke.lease_id, revoke.reason) == (first.lease_id, queue_pb2.REVOKE_REASON_START_TIMEOUT)
            second = (await agent.next("assignment", within=5)).assignment
            assert second.item.name == enqueued.name
            assert (second.attempt, second.epoch) == (2, 2)
            assert moves(second.item)[-2:] == [
                (LEASED, PENDING, common_pb2.FAILURE_REASON_START_TIMEOUT),
                (PENDING, LEASED, UNSPECIFIED_REASON),
            ]
            revoke = (await agent.next("revoke", within=5)).revoke
            assert (revoke.lease_id, revoke.reason) == (
                second.lease_id,
                queue_pb2.REVOKE_REASON_START_TIMEOUT,
            )
        ended = await watch_until(queues, enqueued.name, lambda seen: seen.state != LEASED)
        assert (ended.state, ended.reason, ended.attempt) == (
            FAILED,
            common_pb2.FAILURE_REASON_START_TIMEOUT,
            2,
        )
    finally:
        await agent.close()


async def test_max_run_time_is_enforced(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    enqueued = await enqueue(queues, queue, job, max_run_time={"seconds": 1}, max_attempts=1)
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        assignment = (await agent.next("assignment")).assignment
        assert assignment.max_run_time.seconds == 1
        await agent.progress(assignment, RUNNING)
        revoke = (await agent.next("revoke", within=5)).revoke
        assert revoke.reason == queue_pb2.REVOKE_REASON_MAX_RUN_TIME_EXCEEDED
        ended = await watch_until(queues, enqueued.name, lambda seen: seen.state != RUNNING)
        assert (ended.state, ended.reason) == (FAILED, common_pb2.FAILURE_REASON_MAX_RUN_TIME_EXCEEDED)
    finally:
        await agent.close()


async def test_an_agent_lacking_a_queues_resource_is_refused(queue_address: str, new_queue: NewQueue) -> None:
    queue = await new_queue(resource=common_pb2.RESOURCE_KIND_KUBERNETES)
    agent = ScriptedAgent(queue_address)
    await agent.connect([queue], expect_welcome=False)
    end = await agent.next()
    assert end.WhichOneof("message") is None
    assert agent.error is not None
    assert agent.error.code() == grpc.StatusCode.FAILED_PRECONDITION
    await agent.close()


async def test_unknown_queue_in_hello_is_not_found(queue_address: str) -> None:
    agent = ScriptedAgent(queue_address)
    await agent.connect(["projects/qtest/queues/nope"], expect_welcome=False)
    await agent.next()
    assert agent.error is not None
    assert agent.error.code() == grpc.StatusCode.NOT_FOUND
    await agent.close()


@pytest.mark.parametrize("outcome", [FAILED])
async def test_job_failure_is_final_and_infra_failure_retries(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str, outcome: common_pb2.ItemState.ValueType
) -> None:
    queue = await new_queue(max_attempts=2)
    failing = await enqueue(queues, queue, job)
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        assignment = (await agent.next("assignment")).assignment
        ack = await agent.complete(assignment, outcome, reason=common_pb2.FAILURE_REASON_BUILD_INFRA)
        assert ack.ack.state == PENDING
        retry = (await agent.next("assignment")).assignment
        assert retry.attempt == 2
        # The assignment carries the item with every transition committed before it.
        assert moves(retry.item) == moves(await item(queues, failing.name))
        assert moves(retry.item) == [
            (UNSPECIFIED_STATE, PENDING, UNSPECIFIED_REASON),
            (PENDING, LEASED, UNSPECIFIED_REASON),
            (LEASED, PENDING, common_pb2.FAILURE_REASON_BUILD_INFRA),
            (PENDING, LEASED, UNSPECIFIED_REASON),
        ]
        ack = await agent.complete(retry, outcome, reason=common_pb2.FAILURE_REASON_JOB_FAILED, exit_code=3)
        assert ack.ack.state == FAILED
        ended = await item(queues, failing.name)
        assert (ended.reason, ended.exit_code) == (common_pb2.FAILURE_REASON_JOB_FAILED, 3)
    finally:
        await agent.close()


async def test_a_relaunched_item_is_assigned_with_its_own_history(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(max_attempts=1)
    original = await enqueue(queues, queue, job)
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        first = (await agent.next("assignment")).assignment
        ack = await agent.complete(first, FAILED, reason=common_pb2.FAILURE_REASON_JOB_FAILED, exit_code=1)
        assert ack.ack.state == FAILED
        relaunched = (await queues.RelaunchItem(queue_pb2.RelaunchItemRequest(name=original.name))).item
        assignment = (await agent.next("assignment")).assignment
        assert (assignment.item.name, assignment.item.relaunched_from) == (relaunched.name, original.name)
        assert (assignment.attempt, assignment.epoch) == (1, 1)
        assert moves(assignment.item) == [
            (UNSPECIFIED_STATE, PENDING, UNSPECIFIED_REASON),
            (PENDING, LEASED, UNSPECIFIED_REASON),
        ]
        assert moves(assignment.item) == moves(await item(queues, relaunched.name))
    finally:
        await agent.close()


async def _until_forgotten(queues: Stub, agent: ScriptedAgent) -> None:
    async def forgotten() -> bool:
        return await agent_shown(queues, agent.agent_id) is None

    await until(forgotten, f"the queue to forget agents/{agent.agent_id}")


async def test_an_agent_is_forgotten_once_it_has_left_holding_nothing_and_may_come_back(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    holder = await ScriptedAgent(queue_address).connect([queue])
    enqueued = await enqueue(queues, queue, job)
    await holder.next("assignment")
    await holder.vanish()
    shown = await agent_shown(queues, holder.agent_id)
    assert shown is not None  # it still holds the lease, until the lease expires
    assert len(shown.leases) == 1
    await watch_until(queues, enqueued.name, lambda seen: seen.state != LEASED)
    await _until_forgotten(queues, holder)  # its lease expired: it holds nothing now

    idle = await ScriptedAgent(queue_address).connect([queue], capacity=0)
    await idle.close()
    await _until_forgotten(queues, idle)

    back = await ScriptedAgent(queue_address, agent_id=idle.agent_id).connect([queue])
    try:
        assert back.welcome is not None
        again = await agent_shown(queues, back.agent_id)
        assert again is not None
        assert again.connected
    finally:
        await back.close()
