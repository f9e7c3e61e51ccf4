"""Hostile input to the queue service: each class of bad request is a clear INVALID_ARGUMENT (or NOT_FOUND)
naming the field, never INTERNAL or UNKNOWN; nothing half-created is listed, and dispatch goes on."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2, field_mask_pb2

from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from tests.processes import service_process
from tests.queue.conftest import NewQueue
from tests.queue.harness import ScriptedAgent, error_details, keyed_channel, struct

Stub: TypeAlias = "queue_pb2_grpc.QueueServiceAsyncStub"  # a type only the stubs know

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
LOCAL_PROCESS = common_pb2.RESOURCE_KIND_LOCAL_PROCESS
LOCAL_CONTAINER = common_pb2.RESOURCE_KIND_LOCAL_CONTAINER
KUBERNETES = common_pb2.RESOURCE_KIND_KUBERNETES
TEN_THOUSAND_YEARS = duration_pb2.Duration(seconds=315_576_000_000)


async def refused(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    reason, fields = error_details(raised.value)
    return raised.value.code(), reason, fields


def create(queue_id: str, **settings: Any) -> queue_pb2.CreateQueueRequest:
    settings.setdefault("resource", LOCAL_PROCESS)
    return queue_pb2.CreateQueueRequest(
        parent="projects/qtest", queue_id=queue_id, queue=queue_pb2.Queue(**settings)
    )


async def queue_names(queues: Stub, project: str = "projects/qtest") -> list[str]:
    """Every queue listed in ``project``; none when it has none (a refused create made nothing)."""
    names, token = [], ""
    while True:
        try:
            page = await queues.ListQueues(queue_pb2.ListQueuesRequest(parent=project, page_token=token))
        except grpc.aio.AioRpcError as error:
            if error_details(error)[0] == "PROJECT_NOT_FOUND":
                return []
            raise
        names += [queue.name for queue in page.queues]
        if not (token := page.next_page_token):
            return names


async def item_names(queues: Stub, parent: str) -> list[str]:
    names, token = [], ""
    while True:
        page = await queues.ListItems(queue_pb2.ListItemsRequest(parent=parent, page_token=token))
        names += [item.name for item in page.items]
        if not (token := page.next_page_token):
            return names


async def dispatch_goes_on(queues: Stub, new_queue: NewQueue, job: str, address: str) -> None:
    """A normal item on a normal queue still reaches an agent."""
    queue = await new_queue()
    item = (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item
    agent = await ScriptedAgent(address).connect([queue])
    try:
        assert (await agent.next("assignment")).assignment.item.name == item.name
    finally:
        await agent.close()


async def test_durations_beyond_their_documented_range_are_refused(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    for field, value in [
        ("start_timeout", TEN_THOUSAND_YEARS),
        ("retry_delay", TEN_THOUSAND_YEARS),
        ("max_run_time", TEN_THOUSAND_YEARS),
        ("start_timeout", duration_pb2.Duration(seconds=-1)),
        ("retry_delay", duration_pb2.Duration(seconds=2**62)),  # not even a Duration
        ("max_run_time", duration_pb2.Duration(seconds=5, nanos=-1)),  # signs disagree
    ]:
        queue_id = f"late-{uuid.uuid4().hex[:8]}"
        code, reason, fields = await refused(queues.CreateQueue(create(queue_id, **{field: value})))
        assert (code, reason, fields) == (INVALID, "ARGUMENT_INVALID", [f"queue.{field}"]), field
        assert f"projects/qtest/queues/{queue_id}" not in await queue_names(queues)

    queue = await new_queue(paused=True)
    mask = field_mask_pb2.FieldMask(paths=["start_timeout"])
    code, reason, fields = await refused(
        queues.UpdateQueue(
            queue_pb2.UpdateQueueRequest(
                queue=queue_pb2.Queue(name=queue, start_timeout=TEN_THOUSAND_YEARS), update_mask=mask
            )
        )
    )
    assert (code, reason, fields) == (INVALID, "ARGUMENT_INVALID", ["queue.start_timeout"])
    # A field the mask does not name is not read, however wrong it is.
    updated = await queues.UpdateQueue(
        queue_pb2.UpdateQueueRequest(
            queue=queue_pb2.Queue(
                name=queue, description="x", retry_delay=duration_pb2.Duration(seconds=2**62)
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )
    )
    assert (updated.queue.description, updated.queue.retry_delay.seconds) == ("x", 0)
    assert updated.queue.start_timeout.seconds == 30 * 60

    code, reason, fields = await refused(
        queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, max_run_time=TEN_THOUSAND_YEARS))
    )
    assert (code, reason, fields) == (INVALID, "ARGUMENT_INVALID", ["max_run_time"])
    assert await item_names(queues, queue) == []
    await dispatch_goes_on(queues, new_queue, job, queue_address)


async def test_schemas_are_checked_whole_when_a_queue_is_created_or_updated(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    dangling = queue_pb2.TemplateVariable(schema=struct({"type": "integer", "$ref": "#/$defs/gone"}))
    looping = queue_pb2.TemplateVariable(schema=struct({"type": "integer", "$ref": "#"}))
    for variable in (dangling, looping):
        queue_id = f"schema-{uuid.uuid4().hex[:8]}"
        code, reason, fields = await refused(
            queues.CreateQueue(create(queue_id, template_variables={"n": variable}))
        )
        assert (code, reason, fields) == (INVALID, "SCHEMA_INVALID", ["queue.template_variables[n].schema"])
        assert f"projects/qtest/queues/{queue_id}" not in await queue_names(queues)

    queue = await new_queue()
    code, reason, fields = await refused(
        queues.UpdateQueue(
            queue_pb2.UpdateQueueRequest(
                queue=queue_pb2.Queue(name=queue, template_variables={"n": dangling}),
                update_mask=field_mask_pb2.FieldMask(paths=["template_variables"]),
            )
        )
    )
    assert (code, reason, fields) == (INVALID, "SCHEMA_INVALID", ["queue.template_variables[n].schema"])
    assert dict((await queues.GetQueue(queue_pb2.GetQueueRequest(name=queue))).queue.template_variables) == {}
    await dispatch_goes_on(queues, new_queue, job, queue_address)


def _sync_url(home: Path, env: dict[str, str]) -> str:
    url = env.get("TAKEOFF_DATABASE_URL", f"sqlite:///{home / 'queue.db'}")
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


async def test_a_stored_schema_that_cannot_be_used_is_schema_invalid_at_enqueue(
    tmp_path_factory: pytest.TempPathFactory, queue_env: dict[str, str], job: str
) -> None:
    home = tmp_path_factory.mktemp("stored")
    variable = queue_pb2.TemplateVariable(schema=struct({"type": "integer", "default": 1}))
    with service_process("queue", home, env=queue_env) as first:
        async with keyed_channel(first.address) as channel:
            queues = queue_pb2_grpc.QueueServiceStub(channel)
            name = (
                await queues.CreateQueue(
                    create(f"legacy-{uuid.uuid4().hex[:8]}", template_variables={"n": variable})
                )
            ).queue.name
        first.terminate()
    # As a queue created before schemas were checked whole would hold it.
    engine = sa.create_engine(_sync_url(home, queue_env))
    table = sa.table("queue_queues", sa.column("name"), sa.column("template_variables", sa.JSON))
    with engine.begin() as connection:
        broken = {"n": {"schema": {"type": "integer", "$ref": "#/$defs/gone"}, "description": ""}}
        connection.execute(table.update().where(table.c.name == name).values(template_variables=broken))
    engine.dispose()

    with service_process("queue", home, env=queue_env) as second:
        async with keyed_channel(second.address) as channel:
            queues = queue_pb2_grpc.QueueServiceStub(channel)
            code, reason, fields = await refused(
                queues.Enqueue(queue_pb2.EnqueueRequest(queue=name, job=job))
            )
            assert (code, reason, fields) == (INVALID, "SCHEMA_INVALID", ["queue"])
            assert await item_names(queues, name) == []

            async def fresh_queue(**settings: Any) -> str:
                request = create(f"fresh-{uuid.uuid4().hex[:8]}", **settings)
                return (await queues.CreateQueue(request)).queue.name

            await dispatch_goes_on(queues, fresh_queue, job, second.address)


async def test_resource_configs_of_the_wrong_shape_are_resource_config_invalid(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    shapes: list[tuple[int, dict[str, Any], str]] = [
        (KUBERNETES, {"spec": "a string"}, "queue.resource_config.spec"),
        (
            KUBERNETES,
            {"spec": {"template": {"spec": {"containers": {"a": 1}}}}},
            "queue.resource_config.spec.template.spec.containers",
        ),
        (LOCAL_CONTAINER, {"ulimits": {"nofile": 1}}, "queue.resource_config.ulimits"),
        (LOCAL_PROCESS, {"env": ["A=1"]}, "queue.resource_config.env"),
    ]
    for kind, config, field in shapes:
        queue_id = f"shape-{uuid.uuid4().hex[:8]}"
        code, reason, fields = await refused(
            queues.CreateQueue(create(queue_id, resource=kind, resource_config=struct(config)))
        )
        assert (code, reason, fields) == (INVALID, "RESOURCE_CONFIG_INVALID", [field])
        assert f"projects/qtest/queues/{queue_id}" not in await queue_names(queues)

    # An item's override, and a config only wrong once its template variables are filled in.
    queue = await new_queue(
        resource=LOCAL_CONTAINER,
        resource_config=struct({"ulimits": "{{limits}}"}),
        template_variables={"limits": queue_pb2.TemplateVariable(schema=struct({"type": "string"}))},
    )
    code, reason, fields = await refused(
        queues.Enqueue(
            queue_pb2.EnqueueRequest(
                queue=queue,
                job=job,
                template_variables=struct({"limits": "many"}),
                resource_config=struct({"env": {"A": {"nested": True}}}),
            )
        )
    )
    assert (code, reason, sorted(fields)) == (
        INVALID,
        "RESOURCE_CONFIG_INVALID",
        ["resource_config.env.A", "resource_config.ulimits"],
    )
    assert await item_names(queues, queue) == []
    await dispatch_goes_on(queues, new_queue, job, queue_address)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def test_size_limits_are_enforced_and_list_pages_fit_a_default_client(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue_id = f"wordy-{uuid.uuid4().hex[:8]}"
    variable = queue_pb2.TemplateVariable(schema=struct({"type": "integer"}))
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"description": "d" * 4097}, "queue.description"),
        ({"description": "PostgreSQL text holds no \x00"}, "queue.description"),
        ({"container_name": "Main Container"}, "queue.container_name"),
        ({"template_variables": {f"v{i}": variable for i in range(65)}}, "queue.template_variables"),
        (
            {"resource_config": struct({"env": {"A": "x" * 60_000}, "deep": _nested(31)})},
            "queue.resource_config",
        ),
    ]
    for settings, field in refusals:
        code, reason, fields = await refused(queues.CreateQueue(create(queue_id, **settings)))
        assert (code, reason, fields) == (INVALID, "ARGUMENT_INVALID", [field]), settings
    assert f"projects/qtest/queues/{queue_id}" not in await queue_names(queues)

    queue = await new_queue(paused=True)
    for request, field in [
        (queue_pb2.EnqueueRequest(run_display_name="n" * 3 * 1024 * 1024), "run_display_name"),
        (queue_pb2.EnqueueRequest(run_config=struct(_nested(31))), "run_config"),
        (
            queue_pb2.EnqueueRequest(run_config=struct({"big": "x" * 100 * 1024})),
            "run_config",
        ),  # > 96 KiB JSON
        (queue_pb2.EnqueueRequest(entrypoint=["python", "a\x00b"]), "entrypoint[1]"),
        (queue_pb2.EnqueueRequest(request_id="retry\x00"), "request_id"),
    ]:
        request.queue, request.job = queue, job
        code, reason, fields = await refused(queues.Enqueue(request))
        assert (code, reason, fields) == (INVALID, "ARGUMENT_INVALID", [field])
    assert await item_names(queues, queue) == []
    code, reason, fields = await refused(
        queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, job="projects/qtest/jobs/%\x00"))
    )
    assert (code, reason, fields) == (INVALID, "NAME_INVALID", ["job"])
    pending = (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item.name
    code, reason, fields = await refused(
        queues.CancelItem(queue_pb2.CancelItemRequest(name=pending, message="m" * 1025))
    )
    assert (code, reason, fields) == (INVALID, "ARGUMENT_INVALID", ["message"])
    await queues.CancelItem(queue_pb2.CancelItemRequest(name=pending))

    # Items as large as allowed: each carries its override and the merged config, about 480 KiB, so a
    # page of 50 would be far over a default client's 4 MiB receive size.
    large = {"env": {name: name * 60_000 for name in "ABCD"}}
    enqueued = [
        (
            await queues.Enqueue(
                queue_pb2.EnqueueRequest(queue=queue, job=job, resource_config=struct(large))
            )
        ).item.name
        for _ in range(10)
    ]
    first = await queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, page_size=50))
    assert 0 < len(first.items) < 10
    assert first.next_page_token
    assert sorted(await item_names(queues, queue)) == sorted([*enqueued, pending])

    # An item with every input near its limit still reaches an agent that keeps the default 4 MiB.
    blob = queue_pb2.TemplateVariable(schema=struct({"type": "string"}))
    roomy = await new_queue(template_variables={"blob": blob})
    largest = await queues.Enqueue(
        queue_pb2.EnqueueRequest(
            queue=roomy,
            job=job,
            run_config=struct({"epochs": 1, "notes": "n" * 90_000, "deep": _nested(29)}),
            resource_config=struct(large),
            template_variables=struct({"blob": "b" * 250_000}),
            entrypoint=["python", "train.py", *["a" * 250] * 250],
        )
    )
    agent = await ScriptedAgent(queue_address).connect([roomy])
    try:
        assignment = (await agent.next("assignment")).assignment
    finally:
        await agent.close()
    assert assignment.item.name == largest.item.name
    assert assignment.resource_config == largest.item.resource_config
    await dispatch_goes_on(queues, new_queue, job, queue_address)


async def test_unknown_enum_numbers_are_invalid_argument_naming_the_field(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(paused=True)
    queue_id = f"kind-{uuid.uuid4().hex[:8]}"
    for call, field in [
        (queues.CreateQueue(create(queue_id, resource=42)), "queue.resource"),
        (queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, priority=99)), "priority"),  # type: ignore[arg-type]
        (queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, states=[1, 77])), "states[1]"),  # type: ignore[list-item]
        (queues.ListQueues(queue_pb2.ListQueuesRequest(parent="projects/qtest", resource=9)), "resource"),  # type: ignore[arg-type]
    ]:
        code, reason, fields = await refused(call)
        assert (code, reason, fields) == (INVALID, "ARGUMENT_INVALID", [field])
    assert f"projects/qtest/queues/{queue_id}" not in await queue_names(queues)
    assert await item_names(queues, queue) == []
    unspecified = await queues.ListItems(
        queue_pb2.ListItemsRequest(parent=queue, states=[common_pb2.ITEM_STATE_UNSPECIFIED])
    )
    assert list(unspecified.items) == []  # matches nothing, as common.proto says
    await dispatch_goes_on(queues, new_queue, job, queue_address)


async def test_reads_in_a_project_never_written_to_are_project_not_found(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    project = f"projects/ghost-{uuid.uuid4().hex[:8]}"
    for call in (
        queues.ListQueues(queue_pb2.ListQueuesRequest(parent=project)),
        queues.GetQueue(queue_pb2.GetQueueRequest(name=f"{project}/queues/q")),
        queues.ListItems(queue_pb2.ListItemsRequest(parent=f"{project}/queues/-")),
        queues.GetItem(queue_pb2.GetItemRequest(name=f"{project}/queues/q/items/i")),
    ):
        code, reason, _ = await refused(call)
        assert (code, reason) == (NOT_FOUND, "PROJECT_NOT_FOUND")

    request = queue_pb2.CreateQueueRequest(
        parent=project, queue_id="q", queue=queue_pb2.Queue(resource=LOCAL_PROCESS)
    )
    created = (await queues.CreateQueue(request)).queue.name  # the first write creates the project
    assert await queue_names(queues, project) == [created]
    await queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=created))
    # Written to once, the project stays when its queues are gone.
    listed = await queues.ListQueues(queue_pb2.ListQueuesRequest(parent=project))
    assert list(listed.queues) == []
    code, reason, _ = await refused(queues.GetQueue(queue_pb2.GetQueueRequest(name=created)))
    assert (code, reason) == (NOT_FOUND, "QUEUE_NOT_FOUND")
    await dispatch_goes_on(queues, new_queue, job, queue_address)


async def test_page_tokens_not_issued_for_the_request_are_page_token_invalid(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(paused=True)
    await new_queue()  # two queues: ListQueues has a second page
    for _ in range(3):
        await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))
    token = (await queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, page_size=1))).next_page_token
    queues_token = (
        await queues.ListQueues(queue_pb2.ListQueuesRequest(parent="projects/qtest", page_size=1))
    ).next_page_token
    edited = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for wrong in (edited, queues_token, "not a token"):
        code, reason, fields = await refused(
            queues.ListItems(queue_pb2.ListItemsRequest(parent=queue, page_size=1, page_token=wrong))
        )
        assert (code, reason, fields) == (INVALID, "PAGE_TOKEN_INVALID", ["page_token"])
    code, reason, _ = await refused(
        queues.ListItems(
            queue_pb2.ListItemsRequest(parent=queue, page_token=token, states=[common_pb2.ITEM_STATE_PENDING])
        )
    )
    assert (code, reason) == (INVALID, "PAGE_TOKEN_INVALID")
    await dispatch_goes_on(queues, new_queue, job, queue_address)
