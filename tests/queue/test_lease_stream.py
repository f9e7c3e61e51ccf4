"""Malformed agent messages on a real Lease stream: each is refused with INVALID_MESSAGE, the stream stays."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from tests.queue.conftest import NewQueue
from tests.queue.harness import ScriptedAgent, error_details

Stub: TypeAlias = "queue_pb2_grpc.QueueServiceAsyncStub"  # a type only the stubs know
Request = queue_pb2.LeaseRequest
KIND = queue_pb2.LeaseMessageKind
UNKNOWN_NUMBER = 999


def malformed(assignment: queue_pb2.LeaseResponse.Assignment) -> list[tuple[str, dict[str, Any], int]]:
    """(what is wrong, the message, the kind the Reject names) for a lease the agent holds."""
    lease, epoch = assignment.lease_id, assignment.epoch
    running = common_pb2.ITEM_STATE_RUNNING
    return [
        ("no message set", {}, KIND.LEASE_MESSAGE_KIND_UNSPECIFIED),
        (
            "progress to an unknown state",
            {"progress": Request.Progress(lease_id=lease, epoch=epoch, state=UNKNOWN_NUMBER)},  # type: ignore[arg-type]
            KIND.LEASE_MESSAGE_KIND_PROGRESS,
        ),
        (
            "progress without a state",
            {"progress": Request.Progress(lease_id=lease, epoch=epoch)},
            KIND.LEASE_MESSAGE_KIND_PROGRESS,
        ),
        (
            "progress without a lease id",
            {"progress": Request.Progress(epoch=epoch, state=running)},
            KIND.LEASE_MESSAGE_KIND_PROGRESS,
        ),
        (
            "progress without an epoch",
            {"progress": Request.Progress(lease_id=lease, state=running)},
            KIND.LEASE_MESSAGE_KIND_PROGRESS,
        ),
        (
            "complete with an unknown outcome",
            {"complete": Request.Complete(lease_id=lease, epoch=epoch, outcome=UNKNOWN_NUMBER)},  # type: ignore[arg-type]
            KIND.LEASE_MESSAGE_KIND_COMPLETE,
        ),
        (
            "complete with an unknown reason",
            {
                "complete": Request.Complete(
                    lease_id=lease,
                    epoch=epoch,
                    outcome=common_pb2.ITEM_STATE_FAILED,
                    reason=UNKNOWN_NUMBER,  # type: ignore[arg-type]
                )
            },
            KIND.LEASE_MESSAGE_KIND_COMPLETE,
        ),
        (
            "complete without an outcome",
            {"complete": Request.Complete(lease_id=lease, epoch=epoch)},
            KIND.LEASE_MESSAGE_KIND_COMPLETE,
        ),
        (
            "complete without a lease id",
            {"complete": Request.Complete(epoch=epoch, outcome=common_pb2.ITEM_STATE_SUCCEEDED)},
            KIND.LEASE_MESSAGE_KIND_COMPLETE,
        ),
        (
            "release without an epoch",
            {"release": Request.Release(lease_id=lease)},
            KIND.LEASE_MESSAGE_KIND_RELEASE,
        ),
        (
            "negative capacity",
            {"set_capacity": Request.SetCapacity(capacity=-1)},
            KIND.LEASE_MESSAGE_KIND_SET_CAPACITY,
        ),
    ]


async def test_each_malformed_message_is_rejected_and_the_stream_carries_on(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    enqueued = (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        assignment = (await agent.next("assignment")).assignment
        for problem, message, kind in malformed(assignment):
            sequence = await agent.send(**message)
            answer = await agent.answer()
            assert answer.WhichOneof("message") == "reject", f"{problem}: {answer}"
            reject = answer.reject
            assert (reject.request_sequence, reject.of, reject.reason) == (
                sequence,
                kind,
                queue_pb2.REJECT_REASON_INVALID_MESSAGE,
            ), problem
            assert reject.message, problem
        # Nothing changed, and the same stream still works.
        held = (await queues.GetItem(queue_pb2.GetItemRequest(name=enqueued.name))).item
        assert (held.state, held.epoch) == (common_pb2.ITEM_STATE_LEASED, assignment.epoch)
        assert (await agent.complete(assignment, common_pb2.ITEM_STATE_SUCCEEDED)).ack.state == (
            common_pb2.ITEM_STATE_SUCCEEDED
        )
        assert agent.error is None
    finally:
        await agent.close()


async def test_a_second_hello_ends_the_stream_with_hello_required(
    new_queue: NewQueue, queue_address: str
) -> None:
    queue = await new_queue()
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        await agent.send(hello=Request.Hello(agent_id=agent.agent_id, session_id="again", queues=[queue]))
        end = await agent.next()
        assert end.WhichOneof("message") is None
        assert agent.error is not None
        assert agent.error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(agent.error)[0] == "HELLO_REQUIRED"
    finally:
        await agent.close()
