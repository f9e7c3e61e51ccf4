"""Queues and items through the API: checks before accepting, idempotency, paging, watch, delete."""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

import grpc
import pytest

from takeoff.client import Client
from takeoff.models import ImageSource
from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from takeoff_server.protovalues import struct_to_dict
from tests.queue.conftest import NewQueue
from tests.queue.harness import ScriptedAgent, error_details, struct

Stub: TypeAlias = "queue_pb2_grpc.QueueServiceAsyncStub"  # a type only the stubs know


async def refused(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    reason, fields = error_details(raised.value)
    return raised.value.code(), reason, fields


async def test_enqueue_checks_every_input_and_names_each_problem(
    queues: Stub, new_queue: NewQueue, job: str
) -> None:
    queue = await new_queue(
        resource_config=struct({"env": {"THREADS": "{{threads}}"}}),
        template_variables={
            "threads": queue_pb2.TemplateVariable(
                schema=struct({"type": "integer", "minimum": 1, "maximum": 8})
            )
        },
    )
    code, reason, fields = await refused(
        queues.Enqueue(
            queue_pb2.EnqueueRequest(
                queue=queue,
                job=job,
                run_config=struct({"epochs": "three"}),
                template_variables=struct({"threads": 64, "gpu": 1}),
            )
        )
    )

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "CONFIG_INVALID"
    assert sorted(fields) == ["run_config.epochs", "template_variables.gpu", "template_variables.threads"]


async def test_template_variables_are_filled_with_their_types(
    queues: Stub, new_queue: NewQueue, job: str
) -> None:
    queue = await new_queue(
        resource_config=struct({"env": {"THREADS": "{{threads}}", "NAME": "run-{{threads}}"}}),
        template_variables={
            "threads": queue_pb2.TemplateVariable(schema=struct({"type": "integer", "default": 2}))
        },
    )
    item = (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item

    assert struct_to_dict(item.resource_config) == {"env": {"THREADS": 2, "NAME": "run-2"}}
    assert dict(item.template_variables) == {"threads": 2.0}


async def test_unknown_queue_and_unknown_job(queues: Stub, new_queue: NewQueue, job: str) -> None:
    code, reason, _ = await refused(
        queues.Enqueue(queue_pb2.EnqueueRequest(queue="projects/qtest/queues/missing", job=job))
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "QUEUE_NOT_FOUND")

    queue = await new_queue()
    code, reason, _ = await refused(queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job="no-such-job")))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
    code, reason, _ = await refused(queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=f"{job}:v99")))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "JOB_VERSION_NOT_FOUND")


async def test_resource_config_outside_the_allow_list(queues: Stub, new_queue: NewQueue, job: str) -> None:
    queue = await new_queue()
    code, reason, fields = await refused(
        queues.Enqueue(
            queue_pb2.EnqueueRequest(queue=queue, job=job, resource_config=struct({"privileged": True}))
        )
    )
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "RESOURCE_CONFIG_INVALID",
        ["resource_config.privileged"],
    )


async def test_bad_queues_are_refused(queues: Stub, new_queue: NewQueue) -> None:
    code, reason, fields = await refused(
        queues.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent="projects/qtest",
                queue_id="bad",
                queue=queue_pb2.Queue(
                    resource=common_pb2.RESOURCE_KIND_LOCAL_CONTAINER,
                    resource_config=struct({"cpus": "{{cpu}}"}),
                    concurrency_limit=-1,
                ),
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TEMPLATE_VARIABLE_INVALID")
    assert sorted(fields) == ["queue.concurrency_limit", "queue.resource_config"]

    code, reason, _ = await refused(
        queues.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent="projects/qtest",
                queue_id="Bad Name!",
                queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "NAME_INVALID")

    existing = await new_queue()
    code, reason, _ = await refused(
        queues.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent="projects/qtest",
                queue_id=existing.rsplit("/", 1)[1],
                queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "QUEUE_ALREADY_EXISTS")


async def test_enqueue_with_a_request_id_is_idempotent(queues: Stub, new_queue: NewQueue, job: str) -> None:
    queue = await new_queue()
    request = queue_pb2.EnqueueRequest(queue=queue, job=job, request_id="retry-me")

    first = (await queues.Enqueue(request)).item
    again = (await queues.Enqueue(request)).item

    assert again.name == first.name
    listed = (await queues.ListItems(queue_pb2.ListItemsRequest(parent=queue))).items
    assert [item.name for item in listed] == [first.name]
    code, reason, _ = await refused(
        queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, request_id="retry-me", max_attempts=2))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_CONFLICT")


async def test_list_items_pages_newest_first(queues: Stub, new_queue: NewQueue, job: str) -> None:
    queue = await new_queue(paused=True)
    names = [
        (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item.name for _ in range(5)
    ]

    seen, token = [], ""
    while True:
        page = await queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, page_size=2, page_token=token))
        seen += [item.name for item in page.items]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(names))
    code, reason, _ = await refused(queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, page_size=-1)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ARGUMENT_INVALID")
    counts = (await queues.GetQueue(queue_pb2.GetQueueRequest(name=queue))).queue.item_counts
    assert counts.pending == 5


async def test_watch_item_sends_the_item_then_one_message_per_transition(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    item = (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item
    updates: list[queue_pb2.WatchItemResponse] = []
    first_seen = asyncio.Event()

    async def watch() -> None:
        async for update in queues.WatchItem(queue_pb2.WatchItemRequest(name=item.name)):
            updates.append(update)
            first_seen.set()

    watcher = asyncio.create_task(watch())
    await asyncio.wait([asyncio.create_task(first_seen.wait()), watcher], return_when=asyncio.FIRST_COMPLETED)
    if watcher.done():
        watcher.result()  # the watch failed: say why instead of waiting forever
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        assignment = (await agent.next("assignment")).assignment
        await agent.progress(assignment, common_pb2.ITEM_STATE_RUNNING)
        await agent.complete(assignment, common_pb2.ITEM_STATE_SUCCEEDED)
        await asyncio.wait_for(watcher, 10)
    finally:
        await agent.close()
    assert not updates[0].HasField("transition")
    assert updates[0].item.state == common_pb2.ITEM_STATE_PENDING
    # Without a transition: still PENDING, sent again because why it waits changed (the agent connected).
    reasons_changed = [u for u in updates[1:] if not u.HasField("transition")]
    assert {u.item.state for u in reasons_changed} <= {common_pb2.ITEM_STATE_PENDING}
    assert [u.transition.to_state for u in updates[1:] if u.HasField("transition")] == [
        common_pb2.ITEM_STATE_LEASED,
        common_pb2.ITEM_STATE_RUNNING,
        common_pb2.ITEM_STATE_SUCCEEDED,
    ]
    assert updates[-1].item.state == common_pb2.ITEM_STATE_SUCCEEDED


async def test_filters_apply_before_paging(queues: Stub, new_queue: NewQueue, job: str) -> None:
    queue = await new_queue(paused=True, max_run_time={"seconds": 0})  # 0: unlimited
    await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))
    page = await queues.ListItems(
        queue_pb2.ListItemsRequest(parent=queue, job=f"projects/qtest/jobs/{job}", page_size=1)
    )
    assert len(page.items) == 1
    other = await queues.ListItems(
        queue_pb2.ListItemsRequest(parent=queue, job=f"projects/qtest/jobs/{job}x")
    )
    assert list(other.items) == []

    kubernetes = await new_queue(resource=common_pb2.RESOURCE_KIND_KUBERNETES)
    listed = await queues.ListQueues(
        queue_pb2.ListQueuesRequest(parent="projects/qtest", resource=common_pb2.RESOURCE_KIND_KUBERNETES)
    )
    assert kubernetes in [q.name for q in listed.queues]
    assert all(q.resource == common_pb2.RESOURCE_KIND_KUBERNETES for q in listed.queues)


async def test_an_invalid_variable_schema_is_schema_invalid(queues: Stub) -> None:
    code, reason, fields = await refused(
        queues.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent="projects/qtest",
                queue_id="badschema",
                queue=queue_pb2.Queue(
                    resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS,
                    template_variables={
                        "n": queue_pb2.TemplateVariable(schema=struct({"type": "integer", "minimum": "x"}))
                    },
                ),
            )
        )
    )
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "SCHEMA_INVALID",
        ["queue.template_variables[n].schema['minimum']"],
    )


async def test_relaunch_and_delete(queues: Stub, new_queue: NewQueue, job: str) -> None:
    queue = await new_queue(paused=True)
    item = (
        await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, run_config=struct({"epochs": 2})))
    ).item
    code, reason, _ = await refused(queues.RelaunchItem(queue_pb2.RelaunchItemRequest(name=item.name)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ITEM_NOT_ENDED")

    await queues.CancelItem(queue_pb2.CancelItemRequest(name=item.name))
    again = (await queues.RelaunchItem(queue_pb2.RelaunchItemRequest(name=item.name))).item
    assert (again.relaunched_from, again.state, dict(again.run_config)) == (
        item.name,
        common_pb2.ITEM_STATE_PENDING,
        dict(item.run_config),
    )

    code, reason, _ = await refused(queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=queue)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "QUEUE_NOT_EMPTY")
    await queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=queue, force=True))
    code, reason, _ = await refused(queues.GetItem(queue_pb2.GetItemRequest(name=again.name)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ITEM_NOT_FOUND")


async def test_list_agents_shows_queues_capacity_and_leases(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue()
    agent = await ScriptedAgent(queue_address).connect([queue], capacity=3)
    try:
        await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))
        assignment = (await agent.next("assignment")).assignment
        listed = (await queues.ListAgents(queue_pb2.ListAgentsRequest(queue=queue))).agents
        assert [a.name for a in listed] == [f"agents/{agent.agent_id}"]
        shown = listed[0]
        assert (shown.connected, shown.capacity, list(shown.queues)) == (True, 3, [queue])
        assert [lease.lease_id for lease in shown.leases] == [assignment.lease_id]

        await agent.send(drain=queue_pb2.LeaseRequest.Drain())
        assert (await agent.answer()).ack.of == queue_pb2.LEASE_MESSAGE_KIND_DRAIN
        waiting = (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item
        await agent.settle()  # every dispatch pass the Enqueue caused has run
        drained = (await queues.GetAgent(queue_pb2.GetAgentRequest(name=shown.name))).agent
        assert drained.draining
        assert [lease.lease_id for lease in drained.leases] == [assignment.lease_id]  # room, but no new work
        still = (await queues.GetItem(queue_pb2.GetItemRequest(name=waiting.name))).item
        assert still.state == common_pb2.ITEM_STATE_PENDING
    finally:
        await agent.close()


async def test_a_job_is_refused_on_a_queue_it_cannot_run_on(
    queues: Stub, new_queue: NewQueue, job: str, registry_address: str
) -> None:
    with Client(registry_address, project="qtest") as client:
        client.create_job_version("prebuilt", ImageSource("python:3.12-slim"))
    local = await new_queue()
    code, reason, fields = await refused(
        queues.Enqueue(queue_pb2.EnqueueRequest(queue=local, job="prebuilt"))
    )
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "SOURCE_INCOMPATIBLE", ["job"])

    cluster = await new_queue(resource=common_pb2.RESOURCE_KIND_KUBERNETES)
    code, reason, _ = await refused(queues.Enqueue(queue_pb2.EnqueueRequest(queue=cluster, job=job)))
    assert (code, reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "SOURCE_INCOMPATIBLE",
    )  # nowhere to push its image
    accepted = await queues.Enqueue(queue_pb2.EnqueueRequest(queue=cluster, job="prebuilt"))
    assert accepted.item.job_version.endswith("/jobs/prebuilt/versions/0")
