"""What an agent sends on a real Lease stream: a malformed message is refused with INVALID_MESSAGE and the
stream stays; a Hello beyond a documented bound ends the stream; over-long or NUL-holding reports are
kept in a form the store and every reader can hold, and the item still moves."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import grpc
import pytest

from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from takeoff_queue.settings import QueueSettings
from tests.agent.test_lost_verdicts import writes_refused
from tests.queue.conftest import NewQueue
from tests.queue.harness import LOCAL_PROCESS, InProcessQueue, ScriptedAgent, error_details, keyed_channel

RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED

Stub: TypeAlias = "queue_pb2_grpc.QueueServiceAsyncStub"  # a type only the stubs know
Request = queue_pb2.LeaseRequest
KIND = queue_pb2.LeaseMessageKind
UNKNOWN_NUMBER = 999
# The bounds queue.proto documents for what an agent sends.
MAX_CAPACITY = 4096
MAX_OUTCOME_MESSAGE_BYTES = 4 * 1024
MAX_PROGRESS_DETAIL_BYTES = 1024
MAX_LABELS = 64
RECEIVE_LIMIT = 4 * 1024 * 1024


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
            "complete naming a lease id longer than any the server gives out",
            {
                "complete": Request.Complete(
                    lease_id="x" * 100_000, epoch=epoch, outcome=common_pb2.ITEM_STATE_SUCCEEDED
                )
            },
            KIND.LEASE_MESSAGE_KIND_COMPLETE,
        ),
        (
            "negative capacity",
            {"set_capacity": Request.SetCapacity(capacity=-1)},
            KIND.LEASE_MESSAGE_KIND_SET_CAPACITY,
        ),
        (
            "capacity over the maximum",
            {"set_capacity": Request.SetCapacity(capacity=MAX_CAPACITY + 1)},
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


async def test_an_over_long_failure_message_keeps_its_end_and_the_item_fails(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(max_attempts=1)
    enqueued = (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item
    log_tail = "".join(f"étape {number}\n" for number in range(150_000)) + "Error: out of memory\x00\n"
    assert len(log_tail.encode()) > 1024 * 1024
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        assignment = (await agent.next("assignment")).assignment
        await agent.send(
            complete=Request.Complete(
                lease_id=assignment.lease_id,
                epoch=assignment.epoch,
                outcome=common_pb2.ITEM_STATE_FAILED,
                reason=common_pb2.FAILURE_REASON_JOB_FAILED,
                exit_code=137,
                message=log_tail,
            )
        )
        assert (await agent.answer()).ack.state == common_pb2.ITEM_STATE_FAILED
    finally:
        await agent.close()

    ended = (await queues.GetItem(queue_pb2.GetItemRequest(name=enqueued.name))).item
    assert (ended.state, ended.reason, ended.exit_code) == (
        common_pb2.ITEM_STATE_FAILED,
        common_pb2.FAILURE_REASON_JOB_FAILED,
        137,
    )
    assert len(ended.message.encode()) <= MAX_OUTCOME_MESSAGE_BYTES
    assert ended.message.startswith("…")
    assert ended.message.endswith("étape 149999\nError: out of memory\ufffd\n")
    assert ended.transitions[-1].message == ended.message


async def test_progress_details_are_kept_without_nul_and_clipped(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    enqueued = (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        assignment = (await agent.next("assignment")).assignment

        async def progress(state: common_pb2.ItemState.ValueType, detail: str) -> queue_pb2.LeaseResponse:
            await agent.send(
                progress=Request.Progress(
                    lease_id=assignment.lease_id, epoch=assignment.epoch, state=state, detail=detail
                )
            )
            return await agent.answer()

        starting_ack = await progress(common_pb2.ITEM_STATE_STARTING, "pid\x0042")
        assert starting_ack.ack.state == common_pb2.ITEM_STATE_STARTING
        running_ack = await progress(common_pb2.ITEM_STATE_RUNNING, "x" * 50_000 + "pod p-1")
        assert running_ack.ack.state == common_pb2.ITEM_STATE_RUNNING
        running = (await queues.GetItem(queue_pb2.GetItemRequest(name=enqueued.name))).item
        starting, started = running.transitions[-2:]
        assert (starting.to_state, starting.message) == (common_pb2.ITEM_STATE_STARTING, "pid\ufffd42")
        assert started.to_state == common_pb2.ITEM_STATE_RUNNING
        assert len(started.message.encode()) <= MAX_PROGRESS_DETAIL_BYTES
        assert started.message.startswith("…x")
        assert started.message.endswith("xpod p-1")
        assert (await agent.complete(assignment, common_pb2.ITEM_STATE_SUCCEEDED)).ack.state == (
            common_pb2.ITEM_STATE_SUCCEEDED
        )
    finally:
        await agent.close()


@asynccontextmanager
async def lease_stream(address: str, hello: Request.Hello) -> AsyncIterator[Any]:
    """A Lease call that sends ``hello`` and then stays open until the block ends."""
    finished = asyncio.Event()

    async def requests() -> AsyncIterator[queue_pb2.LeaseRequest]:
        yield Request(hello=hello)
        await finished.wait()

    async with keyed_channel(address) as channel:
        call = queue_pb2_grpc.QueueServiceStub(channel).Lease(requests())
        try:
            yield call
        finally:
            finished.set()
            call.cancel()


def hello(queue: str, **fields: Any) -> Request.Hello:
    """A valid Hello for ``queue`` but for ``fields``."""
    valid = {
        "agent_id": uuid.uuid4().hex,
        "session_id": uuid.uuid4().hex,
        "queues": [queue],
        "resources": [LOCAL_PROCESS],
        "capacity": 1,
    }
    return Request.Hello(**{**valid, **fields})


OVERSIZED_HELLOS: dict[str, tuple[dict[str, Any], str]] = {
    "10,000 labels": ({"labels": {f"rack-{n}": "a" for n in range(10_000)}}, "hello.labels"),
    "a 1 MiB display name": ({"display_name": "n" * 1024 * 1024}, "hello.display_name"),
    "a long label value": ({"labels": {"zone": "z" * 10_000}}, "hello.labels['zone']"),
    "a NUL in the version": ({"version": "1.0\x00"}, "hello.version"),
    "a capacity over the maximum": ({"capacity": MAX_CAPACITY + 1}, "hello.capacity"),
    "more held leases than any capacity": (
        {"held_leases": [Request.HeldLease(lease_id=f"l{n}", epoch=1) for n in range(MAX_CAPACITY + 1)]},
        "hello.held_leases",
    ),
}


@pytest.mark.parametrize("case", OVERSIZED_HELLOS)
async def test_a_hello_beyond_a_bound_ends_the_stream_naming_the_field(
    queues: Stub, new_queue: NewQueue, queue_address: str, case: str
) -> None:
    fields, field = OVERSIZED_HELLOS[case]
    queue = await new_queue()
    refused = hello(queue, **fields)
    async with lease_stream(queue_address, refused) as call:
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async with asyncio.timeout(10):
                await call.read()
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(ended.value) == ("ARGUMENT_INVALID", [field])
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await queues.GetAgent(queue_pb2.GetAgentRequest(name=f"agents/{refused.agent_id}"))
    assert error_details(unknown.value)[0] == "AGENT_NOT_FOUND"


async def test_an_agent_at_every_hello_bound_is_listed_under_the_receive_limit(
    queues: Stub, new_queue: NewQueue, queue_address: str
) -> None:
    queue = await new_queue()
    wide = "\U0001d11e"  # four bytes of UTF-8 per character
    largest = hello(
        queue,
        display_name=wide * 256,
        version=wide * 128,
        labels={f"{n:03d}" + wide * 125: wide * 256 for n in range(MAX_LABELS)},
        capacity=MAX_CAPACITY,
    )
    async with lease_stream(queue_address, largest) as call:
        async with asyncio.timeout(10):
            assert (await call.read()).WhichOneof("message") == "welcome"
        listed = await queues.ListAgents(queue_pb2.ListAgentsRequest(queue=queue))
        assert [agent.name for agent in listed.agents] == [f"agents/{largest.agent_id}"]
        assert dict(listed.agents[0].labels) == dict(largest.labels)
        assert listed.ByteSize() < RECEIVE_LIMIT


async def test_a_complete_the_queue_cannot_commit_is_refused_not_committed_and_the_stream_goes_on(
    service: InProcessQueue, settings: QueueSettings, job: str
) -> None:
    """The queue's database refuses the write that would end the item (a trigger raising, as a full disk
    does): the Complete is answered Reject NOT_COMMITTED, nothing changed, the lease is still held, the
    same stream carries on (a heartbeat is acknowledged on it), and the same Complete sent again once the
    database takes writes ends the item once."""
    database_url = settings.database_url or f"sqlite:///{settings.home / 'queue.db'}"
    queue = await service.new_queue()
    name = await service.enqueue(queue, job)
    agent = await ScriptedAgent(service.address).connect([queue])
    try:
        assignment = (await agent.next("assignment")).assignment
        await agent.progress(assignment, RUNNING)
        # Entered and left off the event loop, which the queue service in this process shares.
        refusing = writes_refused(database_url, queue, "NEW.state = 'SUCCEEDED'")
        await asyncio.to_thread(refusing.__enter__)
        try:
            refused = await agent.complete(assignment, SUCCEEDED, exit_code=0)
            assert refused.reject.reason == queue_pb2.REJECT_REASON_NOT_COMMITTED
            assert "send it again" in refused.reject.message
            await agent.settle()  # the stream is still open: its heartbeat is acknowledged
            assert (await service.stored(name)).state == RUNNING
        finally:
            await asyncio.to_thread(refusing.__exit__, None, None, None)
        taken = await agent.complete(assignment, SUCCEEDED, exit_code=0)
        assert taken.ack.state == SUCCEEDED
        ended = await service.stored(name)
        assert [t.to_state for t in ended.transitions].count(SUCCEEDED) == 1
    finally:
        await agent.close()
