"""Faults cost time, not work (docs/design.md §16): infrastructure failures back off; every attempt the queue
ends without its agent has its run closed through the outbox, also across a registry outage and a queue
restart; a run the job finished while its agent was away ends its item SUCCEEDED, never run again; and
local-container volumes are named volumes only."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2, field_mask_pb2
from sqlalchemy.engine import Engine

import takeoff_queue.store
from takeoff.v1 import common_pb2, queue_pb2, runs_pb2, runs_pb2_grpc
from takeoff_queue.run_closes import (
    CLAIM_HOLD,
    REVOCATION_BATCH,
    RunClose,
    RunCloseFailed,
    RunCloser,
    RunEnd,
    TokenCallFailed,
    TokenRevoker,
)
from takeoff_queue.settings import QueueSettings
from takeoff_queue.store import QueueStore, QueueWrite
from takeoff_queue.store import items as item_rows
from takeoff_queue.store import transitions as transition_rows
from takeoff_server.database import Database
from takeoff_server.resource_configs import CONTAINER_OPTIONS
from tests.postgres import postgres_schema_url
from tests.processes import ServiceProcess, service_process, until
from tests.queue.harness import (
    InProcessQueue,
    ScriptedAgent,
    error_details,
    in_process_queue,
    keyed_channel,
    make_code_job,
    struct,
    watch_until,
)

PENDING = common_pb2.ITEM_STATE_PENDING
LEASED = common_pb2.ITEM_STATE_LEASED
RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
FAILED = common_pb2.ITEM_STATE_FAILED
CANCELLED = common_pb2.ITEM_STATE_CANCELLED
LOCAL_CONTAINER = common_pb2.RESOURCE_KIND_LOCAL_CONTAINER
KILLED = common_pb2.RUN_STATE_KILLED
FINISHED = common_pb2.RUN_STATE_FINISHED
TTL_SECONDS = 1.0
MIGRATIONS = Path(takeoff_queue.store.__file__).with_name("migrations")
T = TypeVar("T")


@pytest.fixture
def registry_home(tmp_path: Path) -> Path:
    home = tmp_path / "registry"
    home.mkdir()
    return home


@pytest.fixture
def own_registry(registry_home: Path, tmp_path: Path) -> Iterator[ServiceProcess]:
    """A registry of the test's own, to stop and start again at the same address."""
    with service_process("registry", registry_home) as process:
        make_code_job(process.address, "qtest", "train", tmp_path)
        yield process
        process.terminate()


def fast_queue_settings(home: Path, queue_env: dict[str, str], registry_address: str) -> QueueSettings:
    """The queue in this process, with leases that expire within a second of their agent going."""
    return QueueSettings(
        home=home,
        listen=["127.0.0.1:0"],
        registry_address=registry_address,
        database_url=queue_env.get("TAKEOFF_DATABASE_URL"),
        lease_ttl_seconds=TTL_SECONDS,
        heartbeat_interval_seconds=0.2,
    )


@pytest.fixture
async def fast(tmp_path: Path, queue_env: dict[str, str], job: str) -> AsyncIterator[InProcessQueue]:
    """On the registry of the test module (``job`` is its job ``train``)."""
    settings = fast_queue_settings(tmp_path, queue_env, queue_env["TAKEOFF_REGISTRY_ADDRESS"])
    async with in_process_queue(settings) as service:
        yield service


@pytest.fixture
def outage_settings(tmp_path: Path, queue_env: dict[str, str], own_registry: ServiceProcess) -> QueueSettings:
    """On a registry of the test's own."""
    return fast_queue_settings(tmp_path, queue_env, own_registry.address)


@asynccontextmanager
async def run_service(registry: str) -> AsyncIterator[runs_pb2_grpc.RunServiceAsyncStub]:
    async with keyed_channel(registry) as channel:
        yield runs_pb2_grpc.RunServiceStub(channel)


async def start_run(registry: str, run: str, *, attach: bool = True) -> None:
    """What the agent (CreateRun) and the job's SDK (AttachRun) do for an attempt."""
    project, run_id = run.split("/runs/")
    async with run_service(registry) as runs:
        await runs.CreateRun(runs_pb2.CreateRunRequest(parent=project, run_id=run_id))
        if attach:
            await runs.AttachRun(runs_pb2.AttachRunRequest(name=run))


async def run_when_ended(registry: str, run: str) -> runs_pb2.Run:
    """The run once it has ended: a followed log stream ends only then."""
    async with run_service(registry) as runs:
        async for _ in runs.ReadLogs(runs_pb2.ReadLogsRequest(name=run, follow=True)):
            pass
        return (await runs.GetRun(runs_pb2.GetRunRequest(name=run))).run


async def run_of(registry: str, run: str) -> runs_pb2.Run:
    async with run_service(registry) as runs:
        return (await runs.GetRun(runs_pb2.GetRunRequest(name=run))).run


async def new_queue(service: InProcessQueue, **settings: Any) -> str:
    settings.setdefault("resource", common_pb2.RESOURCE_KIND_LOCAL_PROCESS)
    response = await service.queues.CreateQueue(
        queue_pb2.CreateQueueRequest(
            parent="projects/qtest", queue_id=f"q-{uuid.uuid4().hex[:10]}", queue=queue_pb2.Queue(**settings)
        )
    )
    return response.queue.name


def waited(item: queue_pb2.Item) -> timedelta:
    """How long a retried item waits: from the transition back to PENDING to its eligible time."""
    back_to_pending = item.transitions[-1]
    assert back_to_pending.to_state == PENDING, item.transitions
    return item.eligible_time.ToDatetime() - back_to_pending.time.ToDatetime()


async def outbox(service: InProcessQueue, run: str) -> list[Any]:
    return [close for close in await service.parts.store.run_closes() if close.run == run]


async def leases_held(service: InProcessQueue, agent: ScriptedAgent) -> int:
    """The leases the agent holds, once every dispatch pass due has run."""
    await agent.settle()
    request = queue_pb2.GetAgentRequest(name=f"agents/{agent.agent_id}")
    return len((await service.queues.GetAgent(request)).agent.leases)


# ----- retry back-off ----------------------------------------------------------------------------------


async def test_infrastructure_failures_back_off_one_then_two_seconds_and_wait_for_it(
    fast: InProcessQueue,
) -> None:
    queue = await new_queue(fast, max_attempts=3, retry_delay=duration_pb2.Duration(nanos=250_000_000))
    name = await fast.enqueue(queue, "train")
    agent = await ScriptedAgent(fast.address).connect([queue])
    try:
        async with agent.heartbeating():
            first = (await agent.next("assignment")).assignment
            answer = await agent.complete(first, FAILED, common_pb2.FAILURE_REASON_BUILD_INFRA)
            assert answer.ack.state == PENDING
            retried = await fast.stored(name)
            assert waited(retried) == timedelta(seconds=0.25 + 1)  # retry_delay + 1 s after one failure

            second = (await agent.next("assignment")).assignment
            assert second.attempt == 2
            assert second.assign_time.ToDatetime() >= retried.eligible_time.ToDatetime()  # not before
            await agent.complete(second, FAILED, common_pb2.FAILURE_REASON_RUNNER_INFRA)
            assert waited(await fast.stored(name)) == timedelta(seconds=0.25 + 2)  # doubled
    finally:
        await agent.close()


async def test_job_failures_and_releases_wait_only_the_retry_delay(fast: InProcessQueue) -> None:
    queue = await new_queue(
        fast, max_attempts=5, retry_job_failures=True, retry_delay=duration_pb2.Duration(nanos=100_000_000)
    )
    name = await fast.enqueue(queue, "train")
    agent = await ScriptedAgent(fast.address).connect([queue])
    try:
        async with agent.heartbeating():
            assignment = (await agent.next("assignment")).assignment
            await agent.complete(assignment, FAILED, common_pb2.FAILURE_REASON_JOB_FAILED, exit_code=1)
            assert waited(await fast.stored(name)) == timedelta(seconds=0.1)

            assignment = (await agent.next("assignment")).assignment
            await agent.send(
                release=queue_pb2.LeaseRequest.Release(lease_id=assignment.lease_id, epoch=assignment.epoch)
            )
            assert (await agent.answer()).ack.state == PENDING
            released = await fast.stored(name)
            assert released.reason == common_pb2.FAILURE_REASON_RELEASED
            assert waited(released) == timedelta(seconds=0.1)  # a hand-back is no fault: no back-off
    finally:
        await agent.close()


# ----- runs closed by the queue ------------------------------------------------------------------------


async def test_a_lease_expiring_with_its_agent_gone_kills_its_run_and_retries_the_item(
    fast: InProcessQueue, registry_address: str
) -> None:
    queue = await new_queue(fast)
    name = await fast.enqueue(queue, "train")
    agent = await ScriptedAgent(fast.address).connect([queue])
    async with agent.heartbeating():
        assignment = (await agent.next("assignment")).assignment
        await start_run(registry_address, assignment.run)
        await agent.progress(assignment, RUNNING)
    await agent.vanish()

    retried = await watch_until(fast.queues, name, lambda seen: seen.state != RUNNING)

    assert (retried.state, retried.reason) == (PENDING, common_pb2.FAILURE_REASON_AGENT_LOST)
    run = await run_of(registry_address, assignment.run)
    assert run.state == KILLED
    assert "AGENT_LOST" in run.message
    assert await outbox(fast, assignment.run) == []


async def test_a_run_the_job_finished_while_its_agent_was_away_ends_the_item_succeeded(
    fast: InProcessQueue, registry_address: str
) -> None:
    queue = await new_queue(fast)
    name = await fast.enqueue(queue, "train")
    agent = await ScriptedAgent(fast.address).connect([queue])
    async with agent.heartbeating():
        assignment = (await agent.next("assignment")).assignment
        await start_run(registry_address, assignment.run)
        await agent.progress(assignment, RUNNING)
        async with run_service(registry_address) as runs:  # the job's SDK finishes its run...
            await runs.FinishRun(runs_pb2.FinishRunRequest(name=assignment.run, state=FINISHED))
    await agent.vanish()  # ...and its agent dies before it could report
    standby = await ScriptedAgent(fast.address).connect([queue])
    try:
        ended = await watch_until(fast.queues, name, lambda seen: seen.state != RUNNING)

        assert (ended.state, ended.attempt) == (SUCCEEDED, 1)
        assert ended.message == "completed while its agent was unreachable"
        assert (await run_of(registry_address, assignment.run)).state == FINISHED
        assert await leases_held(fast, standby) == 0, "the item was given out again"
    finally:
        await standby.close()


@pytest.mark.parametrize("job_finished", [False, True], ids=["running", "finished"])
async def test_a_registry_outage_and_a_queue_restart_delay_the_close_and_never_lose_it(
    outage_settings: QueueSettings,
    own_registry: ServiceProcess,
    registry_home: Path,
    job_finished: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with in_process_queue(outage_settings) as service:
        close_failed = asyncio.Event()
        retry_later = service.parts.store.retry_run_close

        async def retried(*args: Any) -> None:
            await retry_later(*args)
            close_failed.set()

        monkeypatch.setattr(service.parts.store, "retry_run_close", retried)
        queue = await new_queue(service)
        name = await service.enqueue(queue, "train")
        agent = await ScriptedAgent(service.address).connect([queue])
        async with agent.heartbeating():
            assignment = (await agent.next("assignment")).assignment
            await start_run(own_registry.address, assignment.run)
            await agent.progress(assignment, RUNNING)
            if job_finished:
                async with run_service(own_registry.address) as runs:
                    await runs.FinishRun(runs_pb2.FinishRunRequest(name=assignment.run, state=FINISHED))
            own_registry.terminate()
        await agent.vanish()

        await asyncio.wait_for(close_failed.wait(), 30)
        [row] = await outbox(service, assignment.run)
        assert (row.item_id, row.epoch, row.tries) == (name.rsplit("/", 1)[1], 1, 1)
        standby = await ScriptedAgent(service.address).connect([queue])
        try:
            # Not dispatched before the registry says whether the job finished: that could run it twice.
            assert await leases_held(service, standby) == 0
            assert (await service.stored(name)).state == RUNNING
        finally:
            await standby.close()

    # The queue restarts while the registry is still away; the registry comes back at the same address.
    with service_process("registry", registry_home, listen=[own_registry.address]):
        async with in_process_queue(outage_settings) as service:
            ended = await watch_until(
                service.queues, name, lambda seen: seen.state not in (RUNNING, LEASED), within=30
            )
            run = await run_of(own_registry.address, assignment.run)
            assert await outbox(service, assignment.run) == []
    if job_finished:
        assert (ended.state, run.state) == (SUCCEEDED, FINISHED)
    else:
        assert (ended.state, ended.reason, run.state) == (
            PENDING,
            common_pb2.FAILURE_REASON_AGENT_LOST,
            KILLED,
        )


async def test_an_item_cancelled_while_its_agent_is_away_ends_cancelled_with_its_run_killed(
    fast: InProcessQueue, registry_address: str
) -> None:
    queue = await new_queue(fast)
    name = await fast.enqueue(queue, "train")
    agent = await ScriptedAgent(fast.address).connect([queue])
    async with agent.heartbeating():
        assignment = (await agent.next("assignment")).assignment
        await start_run(registry_address, assignment.run)
        await agent.progress(assignment, RUNNING)
    await agent.vanish()
    await fast.queues.CancelItem(queue_pb2.CancelItemRequest(name=name))

    ended = await watch_until(fast.queues, name, lambda seen: seen.state != RUNNING)

    assert (ended.state, ended.reason) == (CANCELLED, common_pb2.FAILURE_REASON_CANCELLED)
    assert (await run_of(registry_address, assignment.run)).state == KILLED
    assert await outbox(fast, assignment.run) == []


async def test_a_start_timeout_kills_the_run_of_the_attempt_it_ends(
    fast: InProcessQueue, registry_address: str
) -> None:
    queue = await new_queue(fast, start_timeout=duration_pb2.Duration(seconds=1), max_attempts=1)
    name = await fast.enqueue(queue, "train")
    agent = await ScriptedAgent(fast.address).connect([queue])
    try:
        async with agent.heartbeating():  # a live agent whose job never starts
            assignment = (await agent.next("assignment")).assignment
            await start_run(registry_address, assignment.run, attach=False)
            revoke = (await agent.next("revoke", within=5)).revoke
            assert revoke.reason == queue_pb2.REVOKE_REASON_START_TIMEOUT
            ended = await watch_until(fast.queues, name, lambda seen: seen.state != LEASED)
        assert (ended.state, ended.reason) == (FAILED, common_pb2.FAILURE_REASON_START_TIMEOUT)
        run = await run_of(registry_address, assignment.run)
        assert (run.state, "START_TIMEOUT" in run.message) == (KILLED, True)
    finally:
        await agent.close()


async def test_a_lease_revoked_when_its_agent_returns_past_the_ttl_kills_the_run(
    fast: InProcessQueue, registry_address: str
) -> None:
    queue = await new_queue(fast)
    name = await fast.enqueue(queue, "train")
    agent = await ScriptedAgent(fast.address).connect([queue])
    async with agent.heartbeating():
        assignment = (await agent.next("assignment")).assignment
        await start_run(registry_address, assignment.run)
        await agent.progress(assignment, RUNNING)
    await agent.vanish()
    await watch_until(fast.queues, name, lambda seen: seen.state != RUNNING)

    back = await ScriptedAgent(fast.address, agent_id=agent.agent_id).connect(
        [queue], held={assignment.lease_id: assignment.epoch}
    )
    try:
        assert back.welcome is not None
        [verdict] = back.welcome.lease_verdicts
        assert (verdict.kept, verdict.reason) == (False, queue_pb2.REVOKE_REASON_LEASE_LOST)
        assert (await run_of(registry_address, assignment.run)).state == KILLED
    finally:
        await back.close()


async def test_a_queue_deleted_with_live_items_kills_their_runs(
    fast: InProcessQueue, registry_address: str
) -> None:
    queue = await new_queue(fast)
    await fast.enqueue(queue, "train")
    agent = await ScriptedAgent(fast.address).connect([queue])
    try:
        async with agent.heartbeating():
            assignment = (await agent.next("assignment")).assignment
            await start_run(registry_address, assignment.run)
            await fast.queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=queue, force=True))
            assert (await agent.next("revoke")).revoke.reason == queue_pb2.REVOKE_REASON_QUEUE_DELETED

        run = await asyncio.wait_for(run_when_ended(registry_address, assignment.run), 30)
        assert run.state == KILLED
        assert "its queue was deleted" in run.message
    finally:
        await agent.close()


class NoJitter(random.Random):
    """An outbox's back-off of zero: a retry is due at once, so a test waits on the drainer, not on time."""

    def uniform(self, a: float, b: float) -> float:
        return a


@pytest.fixture
async def outbox_store(outbox_database_url: str) -> AsyncIterator[QueueStore]:
    """The queue's store on a migrated database of its own."""
    database = Database("queue", outbox_database_url, migrations=MIGRATIONS)
    try:
        await database.migrate()
        yield QueueStore(database)
    finally:
        await database.close()


@pytest.fixture
def outbox_database_url(queue_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """A database of its own, of the kind ``queue_env`` names."""
    if "TAKEOFF_DATABASE_URL" not in queue_env:
        yield f"sqlite:///{tmp_path / 'outbox.db'}"
        return
    with postgres_schema_url("queue_outbox") as url:
        yield url


async def test_drainers_sharing_a_database_never_claim_one_close_twice(outbox_database_url: str) -> None:
    first = Database("queue", outbox_database_url, migrations=MIGRATIONS)
    second = Database("queue", outbox_database_url)  # another replica
    try:
        await first.migrate()
        replicas = (QueueStore(first), QueueStore(second))
        now = datetime.now(UTC)
        closes = [RunClose(f"projects/qtest/runs/r{index}-1", "a test") for index in range(6)]

        async def insert(tx: QueueWrite) -> Any:
            return await tx.insert_run_closes(closes, now)

        await replicas[0].write(insert)

        claims = await asyncio.gather(
            *(replica.claim_run_closes(now, now + CLAIM_HOLD, limit=4) for replica in replicas)
        )
        claimed = [close.id for claim in claims for close in claim]
        assert sorted(claimed) == sorted(set(claimed))  # no row twice
        assert len(claimed) == len(closes)  # and none left out: a claimed row is skipped, not waited for
        assert await replicas[1].claim_run_closes(now, now + CLAIM_HOLD, limit=10) == []

        # A drainer that died with its claims leaves them to the others once the claim runs out.
        after_the_hold = now + CLAIM_HOLD + timedelta(seconds=1)
        reclaimed = await replicas[1].claim_run_closes(after_the_hold, after_the_hold + CLAIM_HOLD, limit=10)
        assert sorted(close.id for close in reclaimed) == sorted(claimed)
    finally:
        await second.close()
        await first.close()


async def test_a_close_that_failed_is_tried_again_after_its_back_off_without_another_wake(
    outbox_store: QueueStore,
) -> None:
    store = outbox_store
    close = RunClose("projects/qtest/runs/r-1", "a test")

    async def insert(tx: QueueWrite) -> Any:
        return await tx.insert_run_closes([close], datetime.now(UTC))

    await store.write(insert)
    answers: list[RunEnd | RunCloseFailed] = [RunCloseFailed("UNAVAILABLE"), RunEnd(finished=False)]
    settled = asyncio.Event()

    class Registry:
        async def close_run(self, run: str, message: str) -> RunEnd:
            answer = answers.pop(0)
            if isinstance(answer, RunCloseFailed):
                raise answer
            return answer

    async def settle(closed: RunClose, end: RunEnd) -> None:
        async def forget(tx: QueueWrite) -> None:
            await tx.delete_run_close(closed.id)

        await store.write(forget)
        settled.set()

    closer = RunCloser(store, Registry(), settle, lambda: datetime.now(UTC), NoJitter())
    draining = asyncio.create_task(closer.drain_forever())
    try:
        closer.wake()  # the one wake: the row's commit
        await asyncio.wait_for(settled.wait(), 10)
    finally:
        draining.cancel()
    assert answers == []
    assert await store.next_run_close_time() is None


async def test_token_revocations_go_to_the_registry_in_batches_and_a_failed_batch_is_tried_again_whole(
    outbox_store: QueueStore,
) -> None:
    store = outbox_store
    runs = [f"projects/qtest/runs/r{index}-1" for index in range(REVOCATION_BATCH + 44)]

    async def insert(tx: QueueWrite) -> None:
        tx.insert_token_revocations(runs, datetime.now(UTC))

    await store.write(insert)
    calls: list[list[str]] = []
    failed_once, all_revoked = asyncio.Event(), asyncio.Event()

    class Registry:
        async def revoke_run_tokens(self, batch: Sequence[str]) -> None:
            calls.append(list(batch))
            if not failed_once.is_set():
                failed_once.set()
                raise TokenCallFailed("UNAVAILABLE DEPENDENCY_UNAVAILABLE: the registry is away")
            if sorted(run for call in calls[1:] for run in call) == sorted(runs):
                all_revoked.set()

        def signed_run_token(self, *_: Any) -> str | None:
            raise AssertionError("a revoker signs nothing")

        async def mint_run_token(self, *_: Any) -> str:
            raise AssertionError("a revoker mints nothing")

    revoker = TokenRevoker(store, Registry(), lambda: datetime.now(UTC), NoJitter())
    draining = asyncio.create_task(revoker.drain_forever())
    try:
        revoker.wake()  # the one wake: the rows' commit
        await asyncio.wait_for(all_revoked.wait(), 20)

        async def outbox_empty() -> bool:  # the last batch's rows go once its call has returned
            return await store.token_revocations() == []

        await until(outbox_empty, "the revoked runs' rows are deleted", within=20)
    finally:
        draining.cancel()
    assert [len(call) for call in calls[:2]] == [REVOCATION_BATCH, REVOCATION_BATCH]
    assert calls[1] == calls[0]  # the failed batch, tried again whole (its rows came due first)
    assert sorted(run for call in calls[1:] for run in call) == sorted(runs)  # each revoked once
    assert all(len(call) <= REVOCATION_BATCH for call in calls)


async def test_an_item_read_while_a_change_of_it_commits_shows_its_state_and_history_from_one_moment(
    tmp_path: Path, registry_address: str, job: str
) -> None:
    # On SQLite only (not parametrized by queue_env): the change is committed from beside the queue through
    # the database file. The one-statement read it proves is the same code on PostgreSQL.
    settings = fast_queue_settings(tmp_path, {}, registry_address)
    database_file = str(tmp_path / "queue.db")
    async with in_process_queue(settings) as service:
        queue = await new_queue(service, paused=True)
        name = await service.enqueue(queue, "train")
        item_id = name.rsplit("/", 1)[1]
        beside = sa.create_engine(f"sqlite:///{database_file}")
        committed: list[str] = []

        def commit_a_cancel_after_the_first_read(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            # The moment between two statements of one read, if the read has two: the item's change lands.
            if committed or conn.engine.url.database != database_file or "queue_items" not in statement:
                return
            committed.append(statement)
            now = datetime.now(UTC)
            with beside.begin() as connection:
                connection.execute(
                    item_rows.update()
                    .where(item_rows.c.id == item_id)
                    .values(state="CANCELLED", end_time=now)
                )
                connection.execute(
                    transition_rows.insert().values(
                        item_id=item_id, time=now, from_state="PENDING", to_state="CANCELLED"
                    )
                )

        sa.event.listen(Engine, "after_cursor_execute", commit_a_cancel_after_the_first_read)
        try:
            item = await service.stored(name)
        finally:
            sa.event.remove(Engine, "after_cursor_execute", commit_a_cancel_after_the_first_read)
            beside.dispose()
        assert committed
        assert item.state == item.transitions[-1].to_state


# ----- host-path volumes (issue 10's queue side) -------------------------------------------------------


EVERY_CONTAINER_OPTION: dict[str, Any] = {
    "gpus": 1,
    "cpus": 2,
    "mem_limit": "2g",
    "memswap_limit": "4g",
    "shm_size": "1g",
    "env": {"A": "1"},
    "volumes": {"cache": {"bind": "/cache", "mode": "rw"}},
    "user": "1000",
    "ipc_mode": "host",
    "ulimits": [{"name": "nofile", "soft": 1024, "hard": 2048}],
    "nodes": 2,
}


async def test_every_container_option_is_accepted_and_host_path_volumes_are_refused_by_name(
    fast: InProcessQueue,
) -> None:
    assert set(EVERY_CONTAINER_OPTION) == CONTAINER_OPTIONS
    queue = await new_queue(fast, resource=LOCAL_CONTAINER, resource_config=struct(EVERY_CONTAINER_OPTION))
    updated = await fast.queues.UpdateQueue(
        queue_pb2.UpdateQueueRequest(
            queue=queue_pb2.Queue(
                name=queue, resource_config=struct({**EVERY_CONTAINER_OPTION, "volumes": ["data:/data:ro"]})
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["resource_config"]),
        )
    )
    assert updated.queue.resource_config["volumes"] == ["data:/data:ro"]
    await fast.enqueue(queue, "train")  # the stored config is usable

    host_paths: list[tuple[dict[str, Any], str]] = [
        ({"volumes": ["/srv:/data"]}, "volumes[0]"),
        ({"volumes": ["data:/data", "./work:/work"]}, "volumes[1]"),
        ({"volumes": {"~/x": {"bind": "/x"}}}, "volumes.~/x"),
    ]
    for config, field in host_paths:
        with pytest.raises(grpc.aio.AioRpcError) as created:
            await new_queue(fast, resource=LOCAL_CONTAINER, resource_config=struct(config))
        assert error_details(created.value) == ("RESOURCE_CONFIG_INVALID", [f"queue.resource_config.{field}"])

        with pytest.raises(grpc.aio.AioRpcError) as changed:
            await fast.queues.UpdateQueue(
                queue_pb2.UpdateQueueRequest(
                    queue=queue_pb2.Queue(name=queue, resource_config=struct(config)),
                    update_mask=field_mask_pb2.FieldMask(paths=["resource_config"]),
                )
            )
        assert error_details(changed.value) == ("RESOURCE_CONFIG_INVALID", [f"queue.resource_config.{field}"])

        with pytest.raises(grpc.aio.AioRpcError) as overridden:
            await fast.queues.Enqueue(
                queue_pb2.EnqueueRequest(queue=queue, job="train", resource_config=struct(config))
            )
        assert overridden.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(overridden.value) == ("RESOURCE_CONFIG_INVALID", [f"resource_config.{field}"])
