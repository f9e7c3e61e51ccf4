"""``takeoff.Client`` queue methods against a real registry and queue; a scripted agent plays the agent."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from takeoff import (
    Client,
    FailureReason,
    Item,
    ItemState,
    Priority,
    ResourceKind,
    TakeoffError,
    TemplateVariable,
)
from takeoff.v1 import common_pb2
from tests.processes import ServiceProcess, service_process, wait_for
from tests.queue.harness import ScriptedAgent, make_code_job
from tests.sdk.conftest import ReplyLosingProxy, free_port

INPUT_SCHEMA = {
    "type": "object",
    "properties": {"lr": {"type": "number", "default": 0.1}, "epochs": {"type": "integer"}},
}
THREADS = {"type": "integer", "minimum": 1, "maximum": 8, "default": 2, "description": "worker threads"}


@pytest.fixture
def client(registry: ServiceProcess, queue_service: ServiceProcess, project: str) -> Iterator[Client]:
    with Client(registry.address, queue=queue_service.address, project=project) as client:
        yield client


@pytest.fixture
def job(registry: ServiceProcess, project: str, tmp_path: Path) -> str:
    make_code_job(registry.address, project, "train", tmp_path, schema=INPUT_SCHEMA)
    return "train"


async def wait_in_thread(item: Item) -> tuple[asyncio.Future[Item], list[ItemState]]:
    """``item.wait`` on a thread, so the test's event loop can play the agent meanwhile; returns the wait
    and the states ``on_change`` saw, once it has seen the first."""
    seen: list[ItemState] = []
    watching = threading.Event()

    def record(current: Item) -> None:
        seen.append(current.state)
        watching.set()

    waiting = asyncio.ensure_future(asyncio.to_thread(item.wait, 30, record))
    assert await asyncio.to_thread(watching.wait, 10), "wait() never reported the item"
    return waiting, seen


def reachable(client: Client) -> bool:
    try:
        list(client.list_queues())
    except TakeoffError:
        return False
    return True


def test_queue_settings_round_trip_and_update_only_what_is_given(client: Client, project: str) -> None:
    created = client.create_queue(
        "cpu",
        resource="local-process",
        resource_config={"env": {"THREADS": "{{threads}}"}},
        template_variables={"threads": THREADS, "label": TemplateVariable({"type": "string"}, "a tag")},
        prioritization=True,
        max_attempts=2,
        retry_delay=10,
        start_timeout=timedelta(minutes=10),
        max_run_time=timedelta(hours=1, minutes=30),
        concurrency_limit=4,
        description="small jobs",
    )

    assert created.name == f"projects/{project}/queues/cpu"
    assert created.resource is ResourceKind.LOCAL_PROCESS
    assert created.template_variables["threads"] == TemplateVariable(THREADS, "worker threads")
    assert created.template_variables["label"].description == "a tag"
    assert (created.retry_delay, created.start_timeout, created.max_run_time) == (
        timedelta(seconds=10),
        timedelta(minutes=10),
        timedelta(hours=1, minutes=30),
    )
    assert client.get_queue(created.name) == client.get_queue("cpu")
    assert [queue.id for queue in client.list_queues()] == ["cpu"]
    assert list(client.list_queues(resource="kubernetes")) == []

    updated = client.update_queue("cpu", concurrency_limit=1, max_run_time=None, description="tiny jobs")
    assert (updated.concurrency_limit, updated.max_run_time, updated.description) == (1, None, "tiny jobs")
    assert (updated.prioritization, updated.max_attempts, updated.start_timeout) == (
        True,
        2,
        timedelta(minutes=10),
    )
    assert client.pause_queue("cpu").paused
    assert not client.resume_queue("cpu").paused
    with pytest.raises(TypeError, match="resource"):
        client.update_queue("cpu", resource="kubernetes")

    client.delete_queue("cpu")
    with pytest.raises(TakeoffError) as missing:
        client.get_queue("cpu")
    assert missing.value.reason == "QUEUE_NOT_FOUND"


async def test_launch_then_wait_until_an_agent_completes_it(
    client: Client, job: str, queue_service: ServiceProcess
) -> None:
    queue = client.create_queue(
        "cpu", resource_config={"env": {"THREADS": "{{threads}}"}}, template_variables={"threads": THREADS}
    )
    item = client.launch(
        job, "cpu", config={"epochs": 3}, template_variables={"threads": 4}, priority="HIGH", run_name="first"
    )

    assert (item.state, item.priority, item.run_display_name) == (ItemState.PENDING, Priority.HIGH, "first")
    assert item.run_config == {"lr": 0.1, "epochs": 3}
    assert item.resource_config == {"env": {"THREADS": 4}}
    assert item.queue == queue.name
    waiting, seen = await wait_in_thread(item)
    agent = await ScriptedAgent(queue_service.address).connect([queue.name])
    try:
        assignment = (await agent.next("assignment")).assignment
        await agent.progress(assignment, common_pb2.ITEM_STATE_RUNNING)
        await agent.complete(assignment, common_pb2.ITEM_STATE_SUCCEEDED, exit_code=0)
        final = await asyncio.wait_for(waiting, 10)
    finally:
        await agent.close()

    assert final is item
    assert (item.state, item.exit_code, item.run) == (ItemState.SUCCEEDED, 0, assignment.run)
    assert [transition.to_state for transition in item.transitions] == [
        ItemState.PENDING,
        ItemState.LEASED,
        ItemState.RUNNING,
        ItemState.SUCCEEDED,
    ]
    assert (seen[0], seen[-1]) == (ItemState.PENDING, ItemState.SUCCEEDED)


async def test_wait_returns_a_failed_item_with_its_reason(
    client: Client, job: str, queue_service: ServiceProcess
) -> None:
    queue = client.create_queue("cpu")
    item = client.launch(job, queue.name)
    waiting, _ = await wait_in_thread(item)
    agent = await ScriptedAgent(queue_service.address).connect([queue.name])
    try:
        assignment = (await agent.next("assignment")).assignment
        await agent.progress(assignment, common_pb2.ITEM_STATE_RUNNING)
        await agent.complete(
            assignment, common_pb2.ITEM_STATE_FAILED, common_pb2.FAILURE_REASON_JOB_FAILED, exit_code=3
        )
        final = await asyncio.wait_for(waiting, 10)
    finally:
        await agent.close()

    assert (final.state, final.reason, final.exit_code, final.attempt) == (
        ItemState.FAILED,
        FailureReason.JOB_FAILED,
        3,
        1,
    )


async def test_cancel_a_waiting_item_at_once_and_a_running_one_through_its_agent(
    client: Client, job: str, queue_service: ServiceProcess
) -> None:
    queue = client.create_queue("cpu")
    waiting_item = client.launch(job, "cpu", config={"epochs": 1})
    running_item = client.launch(job, "cpu", config={"epochs": 2})
    assert waiting_item.cancel("not needed").state is ItemState.CANCELLED

    agent = await ScriptedAgent(queue_service.address).connect([queue.name])
    try:
        assignment = (await agent.next("assignment")).assignment
        assert assignment.item.name == running_item.name
        await agent.progress(assignment, common_pb2.ITEM_STATE_RUNNING)
        running_item.cancel()
        assert (running_item.state, running_item.cancel_requested) == (ItemState.RUNNING, True)
        assert (await agent.next("cancel")).cancel.item == running_item.name
        await agent.complete(assignment, common_pb2.ITEM_STATE_CANCELLED)
        final = await asyncio.to_thread(running_item.wait, 10)
    finally:
        await agent.close()

    assert (final.state, final.reason) == (ItemState.CANCELLED, FailureReason.CANCELLED)
    relaunched = client.relaunch_item(final.name)
    assert (relaunched.state, relaunched.relaunched_from, relaunched.run_config) == (
        ItemState.PENDING,
        final.name,
        final.run_config,
    )


def test_items_by_reference_across_queues_and_by_state(client: Client, job: str, project: str) -> None:
    client.create_queue("first", paused=True)
    client.create_queue("second", paused=True)
    older = client.launch(job, "first")
    newer = client.launch(job, "second")
    older.cancel()

    assert [item.name for item in client.list_items()] == [newer.name, older.name]
    assert [item.name for item in client.list_items(queue="first")] == [older.name]
    assert [item.name for item in client.list_items(states=["pending"])] == [newer.name]
    for reference, queue in (
        (older.name, None),
        (f"first/{older.id}", None),
        (older.id, "first"),
        (older.id, None),
    ):
        assert client.get_item(reference, queue=queue).name == older.name
    assert older.refresh().transitions[-1].to_state is ItemState.CANCELLED


def test_a_bad_launch_names_every_problem(client: Client, job: str) -> None:
    client.create_queue("cpu", template_variables={"threads": THREADS})

    with pytest.raises(TakeoffError) as refused:
        client.launch(job, "cpu", config={"epochs": "three"}, template_variables={"threads": 64})

    assert refused.value.reason == "CONFIG_INVALID"
    assert sorted(violation.field for violation in refused.value.violations) == [
        "run_config.epochs",
        "template_variables.threads",
    ]
    assert list(client.list_items()) == []


def test_wait_gives_up_after_its_timeout(client: Client, job: str) -> None:
    client.create_queue("cpu", paused=True)
    item = client.launch(job, "cpu")

    with pytest.raises(TimeoutError):
        item.wait(timeout=0.5)
    assert item.state is ItemState.PENDING


def test_a_launch_whose_reply_is_lost_is_sent_again_and_launches_once(
    registry: ServiceProcess, queue_service: ServiceProcess, client: Client, job: str, project: str
) -> None:
    client.create_queue("cpu", paused=True)
    proxy = ReplyLosingProxy(queue_service.address)
    proxy.lose_next_reply("QueueService/Enqueue")
    try:
        with Client(registry.address, queue=proxy.address, project=project) as flaky:
            launched = flaky.launch(job, "cpu")
    finally:
        proxy.close()

    [lost] = proxy.lost["QueueService/Enqueue"]
    assert proxy.requests["QueueService/Enqueue"] == [lost, lost]  # the same request_id again
    assert [item.name for item in client.list_items()] == [launched.name]


async def test_list_agents_shows_what_an_agent_serves_and_holds(
    client: Client, job: str, queue_service: ServiceProcess
) -> None:
    queue = client.create_queue("cpu")
    agent = await ScriptedAgent(queue_service.address).connect([queue.name], capacity=2)
    try:
        item = client.launch(job, "cpu")
        assignment = (await agent.next("assignment")).assignment
        listed = list(client.list_agents(queue="cpu"))
    finally:
        await agent.close()

    assert [(found.id, found.connected, found.capacity, found.queues) for found in listed] == [
        (agent.agent_id, True, 2, [queue.name])
    ]
    assert [(lease.lease_id, lease.item) for lease in listed[0].leases] == [(assignment.lease_id, item.name)]


def test_wait_follows_an_item_across_a_queue_service_restart(
    registry: ServiceProcess, job: str, project: str, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {"TAKEOFF_REGISTRY_ADDRESS": registry.address, "TAKEOFF_SHUTDOWN_GRACE_SECONDS": "1"}
    home = tmp_path / "queue"
    home.mkdir()
    with Client(registry.address, queue=address, project=project) as client:
        with service_process("queue", home, env=env, listen=[address]) as first:
            client.create_queue("cpu", paused=True)
            item = client.launch(job, "cpu")
            seen: list[ItemState] = []
            waiting = threading.Thread(target=item.wait, args=(60, lambda now: seen.append(now.state)))
            waiting.start()
            wait_for(lambda: seen or None, what="the watch to start")
            first.terminate()
        with service_process("queue", home, env=env, listen=[address]):
            # Channels of one process to one address share a connection, and its backoff after the
            # outage: wait until the restarted service is reachable again.
            wait_for(lambda: reachable(client), what="the restarted queue service")
            client.cancel_item(item.name)
            waiting.join(30)

    assert not waiting.is_alive()
    assert (seen[0], seen[-1], item.state) == (ItemState.PENDING, ItemState.CANCELLED, ItemState.CANCELLED)
