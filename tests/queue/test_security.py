"""The queue under access control (docs/design.md §13), against a real registry: who may lease, enqueue
and cancel where; who did it, in the item's history; run tokens minted for each attempt and revoked when
it ends, through registry outages; secure queues and secret mounts; the enqueue rate limit."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from takeoff.v1 import common_pb2, keys_pb2, keys_pb2_grpc, queue_pb2, queue_pb2_grpc, runs_pb2, runs_pb2_grpc
from takeoff_queue.settings import QueueSettings
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, eventually, service_process, until
from tests.queue.conftest import NewQueue
from tests.queue.harness import ScriptedAgent, error_details, in_process_queue, keyed_channel, make_code_job

Stub = Any
PENDING = common_pb2.ITEM_STATE_PENDING
LEASED = common_pb2.ITEM_STATE_LEASED
RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
FAILED = common_pb2.ITEM_STATE_FAILED
CANCELLED = common_pb2.ITEM_STATE_CANCELLED
DENIED = grpc.StatusCode.PERMISSION_DENIED


async def create_key(registry: str, key: keys_pb2.Key) -> tuple[str, str]:
    """A key made with the admin key: (its name, its secret)."""
    async with keyed_channel(registry) as channel:
        created = await keys_pb2_grpc.KeyServiceStub(channel).CreateKey(keys_pb2.CreateKeyRequest(key=key))
    return created.key.name, created.secret


async def agent_key(registry: str, *queues: str) -> str:
    return (await create_key(registry, keys_pb2.Key(kind=keys_pb2.KEY_KIND_AGENT, queues=queues)))[1]


async def verified(registry: str, secret: str) -> bool:
    async with keyed_channel(registry) as channel:
        answer = await keys_pb2_grpc.KeyServiceStub(channel).VerifyKey(
            keys_pb2.VerifyKeyRequest(secret=secret)
        )
    return answer.valid


@asynccontextmanager
async def queue_stub(address: str, key: str) -> AsyncIterator[Stub]:
    async with keyed_channel(address, key) as channel:
        yield queue_pb2_grpc.QueueServiceStub(channel)


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def project_queue_request(project: str) -> queue_pb2.CreateQueueRequest:
    return queue_pb2.CreateQueueRequest(
        parent=project,
        queue_id=f"q-{uuid.uuid4().hex[:10]}",
        queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
    )


# ----- who may do what -------------------------------------------------------------------------------


async def test_an_agent_key_leases_only_its_queues(
    new_queue: NewQueue, registry_address: str, queue_address: str
) -> None:
    mine, other = await new_queue(), await new_queue()
    key = await agent_key(registry_address, mine)
    refused = ScriptedAgent(queue_address, key=key)
    await refused.connect([mine, other], expect_welcome=False)
    try:
        end = await refused.next()
        assert end.WhichOneof("message") is None, end  # the stream ended, no Welcome
        assert refused.error is not None
        assert refused.error.code() == DENIED
        assert "queues.lease" in (refused.error.details() or "")
        assert other in (refused.error.details() or "")
    finally:
        await refused.close()
    admitted = await ScriptedAgent(queue_address, key=key).connect([mine])
    await admitted.close()


async def test_an_agent_key_cannot_complete_an_item_it_does_not_hold(
    queues: Stub, new_queue: NewQueue, job: str, registry_address: str, queue_address: str
) -> None:
    queue = await new_queue()
    holder = await ScriptedAgent(queue_address, key=await agent_key(registry_address, queue)).connect([queue])
    other_key = await agent_key(registry_address, queue)
    other = await ScriptedAgent(queue_address, key=other_key).connect([queue])
    try:
        await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))
        assignment = (await holder.next("assignment")).assignment
        answer = await other.complete(assignment, SUCCEEDED)
        assert answer.reject.reason == queue_pb2.REJECT_REASON_LEASE_NOT_FOUND, answer
        # Nor can it pass for the holder: its agent id is bound to the key that holds its leases.
        impostor = ScriptedAgent(queue_address, agent_id=holder.agent_id, key=other_key)
        await impostor.connect([queue], expect_welcome=False)
        try:
            end = await impostor.next()
            assert end.WhichOneof("message") is None, end
            assert impostor.error is not None
            assert impostor.error.code() == DENIED
            assert error_details(impostor.error)[0] == "AGENT_KEY_MISMATCH"
        finally:
            await impostor.close()
        item = (await queues.GetItem(queue_pb2.GetItemRequest(name=assignment.item.name))).item
        assert item.state == LEASED
    finally:
        await holder.close()
        await other.close()


async def test_a_project_key_cannot_enqueue_another_projects_job_nor_cancel_there(
    queues: Stub, new_queue: NewQueue, job: str, registry_address: str, queue_address: str
) -> None:
    project = f"projects/p-{uuid.uuid4().hex[:8]}"
    theirs = await new_queue()  # in qtest, where the job is
    ours = (await queues.CreateQueue(project_queue_request(project))).queue.name
    _, key = await create_key(
        registry_address,
        keys_pb2.Key(kind=keys_pb2.KEY_KIND_PROJECT, projects=[project], role=keys_pb2.PROJECT_ROLE_WRITE),
    )
    item = (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=theirs, job=job))).item
    async with queue_stub(queue_address, key) as as_project:
        refused = await refusal(
            as_project.Enqueue(queue_pb2.EnqueueRequest(queue=ours, job=f"projects/qtest/jobs/{job}"))
        )
        assert refused.code() == DENIED
        assert "jobs.read" in (refused.details() or "")
        refused = await refusal(as_project.Enqueue(queue_pb2.EnqueueRequest(queue=theirs, job=job)))
        assert refused.code() == DENIED
        assert "items.write" in (refused.details() or "")
        refused = await refusal(as_project.CancelItem(queue_pb2.CancelItemRequest(name=item.name)))
        assert refused.code() == DENIED
        assert "items.write" in (refused.details() or "")
        refused = await refusal(
            as_project.ListItems(queue_pb2.ListItemsRequest(parent="projects/-/queues/-"))
        )
        assert refused.code() == DENIED
    listed = await queues.ListItems(queue_pb2.ListItemsRequest(parent=ours))
    assert list(listed.items) == [], "a refused Enqueue stored nothing"
    assert (await queues.GetItem(queue_pb2.GetItemRequest(name=item.name))).item.state == PENDING


async def test_enqueue_and_cancel_record_who_called(
    queues: Stub, new_queue: NewQueue, job: str, registry_address: str, queue_address: str
) -> None:
    queue = await new_queue()
    name, key = await create_key(
        registry_address,
        keys_pb2.Key(
            kind=keys_pb2.KEY_KIND_PROJECT,
            display_name="alice",
            projects=["projects/qtest"],
            role=keys_pb2.PROJECT_ROLE_WRITE,
        ),
    )
    actor = f"{name} (alice)"
    async with queue_stub(queue_address, key) as as_alice:
        pending = (await as_alice.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item
        cancelled = (await as_alice.CancelItem(queue_pb2.CancelItemRequest(name=pending.name))).item
        assert pending.creator == actor
        assert [(t.to_state, t.actor) for t in cancelled.transitions] == [
            (PENDING, actor),
            (CANCELLED, actor),
        ]

        # A live item ends CANCELLED when its agent confirms: that transition names who cancelled.
        agent = await ScriptedAgent(queue_address).connect([queue])
        try:
            live = (await as_alice.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item
            assignment = (await agent.next("assignment")).assignment
            await as_alice.CancelItem(queue_pb2.CancelItemRequest(name=live.name))
            await agent.next("cancel")
            await agent.complete(assignment, CANCELLED, common_pb2.FAILURE_REASON_CANCELLED)
        finally:
            await agent.close()
        ended = (await queues.GetItem(queue_pb2.GetItemRequest(name=live.name))).item
        assert [(t.to_state, t.actor) for t in ended.transitions] == [
            (PENDING, actor),
            (LEASED, ""),
            (CANCELLED, actor),
        ]
        relaunched = (await queues.RelaunchItem(queue_pb2.RelaunchItemRequest(name=live.name))).item
        assert relaunched.creator.startswith("keys/")
        assert relaunched.creator != actor


# ----- run tokens ------------------------------------------------------------------------------------


async def test_an_assignment_carries_a_run_token_for_its_run_only_revoked_when_the_attempt_ends(
    queues: Stub, new_queue: NewQueue, job: str, registry_address: str, queue_address: str
) -> None:
    queue = await new_queue()
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))
        assignment = (await agent.next("assignment")).assignment
        token = assignment.run_token
        assert token
        assert await verified(registry_address, token)
        project, run_id = assignment.run.split("/runs/")
        async with keyed_channel(registry_address, token) as channel:
            runs = runs_pb2_grpc.RunServiceStub(channel)
            await runs.CreateRun(runs_pb2.CreateRunRequest(parent=project, run_id=run_id))
            refused = await refusal(
                runs.CreateRun(runs_pb2.CreateRunRequest(parent=project, run_id="other-1"))
            )
            assert refused.code() == DENIED
        async with queue_stub(queue_address, token) as as_run:
            refused = await refusal(as_run.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job)))
            assert refused.code() == DENIED
        await agent.complete(assignment, SUCCEEDED)
    finally:
        await agent.close()

    async def revoked() -> bool:
        return not await verified(registry_address, token)

    await until(revoked, "the run token to be revoked")


@pytest.mark.parametrize("ending", ["lease expiry", "cancel"])
async def test_a_token_is_revoked_however_the_attempt_ends(
    queues: Stub, new_queue: NewQueue, job: str, registry_address: str, queue_address: str, *, ending: str
) -> None:
    queue = await new_queue()
    agent = await ScriptedAgent(queue_address).connect([queue])
    name = (await queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item.name
    assignment = (await agent.next("assignment")).assignment
    if ending == "cancel":
        await queues.CancelItem(queue_pb2.CancelItemRequest(name=name))
        await agent.next("cancel")
        await agent.complete(assignment, CANCELLED, common_pb2.FAILURE_REASON_CANCELLED)
        await agent.close()
    else:
        await agent.vanish()  # no heartbeats: the lease expires (the module's TTL is 2 s)

    async def revoked() -> bool:
        return not await verified(registry_address, assignment.run_token)

    await until(revoked, f"the run token to be revoked after {ending}")


@pytest.fixture
def registry_home(tmp_path: Path) -> Path:
    home = tmp_path / "registry"
    home.mkdir()
    return home


@pytest.fixture
def own_registry(registry_home: Path, tmp_path: Path) -> Iterator[ServiceProcess]:
    with service_process("registry", registry_home) as process:
        make_code_job(process.address, "qtest", "train", tmp_path)
        yield process
        process.terminate()


def _outage_settings(tmp_path: Path, queue_env: dict[str, str], registry: ServiceProcess) -> QueueSettings:
    return QueueSettings(
        home=tmp_path,
        listen=["127.0.0.1:0"],
        registry_address=registry.address,
        database_url=queue_env.get("TAKEOFF_DATABASE_URL"),
        lease_ttl_seconds=30,
        heartbeat_interval_seconds=0.2,
    )


async def test_a_registry_outage_delays_the_token_and_its_revocation_and_fails_nothing(
    tmp_path: Path,
    queue_env: dict[str, str],
    own_registry: ServiceProcess,
    registry_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with in_process_queue(_outage_settings(tmp_path, queue_env, own_registry)) as service:
        dispatcher = service.parts.dispatcher
        # A token the queue cannot sign (a scope too long to travel signed): the registry mints it.
        monkeypatch.setattr(dispatcher._tokens, "signed_run_token", lambda *scope: None)
        queue = await service.new_queue()
        name = await service.enqueue(queue, "train")  # no agent yet: it waits PENDING
        item_id = name.rsplit("/", 1)[1]
        own_registry.terminate()
        agent = await ScriptedAgent(service.address).connect([queue])
        try:
            await eventually(lambda: dispatcher._mint_failures.get(item_id), "a mint to fail")
            await agent.settle()
            assert agent.received.empty(), "nothing is assigned without a token"
            assert (await service.stored(name)).state == PENDING
            with service_process("registry", registry_home, listen=[own_registry.address]):
                assignment = (await agent.next("assignment", within=60)).assignment
                assert assignment.run_token
                assert assignment.attempt == 1
                token = assignment.run_token
            # The registry is away again when the attempt ends: the revocation waits in the outbox.
            await agent.complete(assignment, SUCCEEDED)
            assert await service.parts.store.token_revocations() == [assignment.run]
            stored = await service.stored(name)
            assert stored.state == SUCCEEDED
            assert [t.to_state for t in stored.transitions] == [PENDING, LEASED, SUCCEEDED]
            with service_process("registry", registry_home, listen=[own_registry.address]):

                async def drained() -> bool:
                    return await service.parts.store.token_revocations() == []

                await until(drained, "the revocation to be drained", within=60)
                assert not await verified(own_registry.address, token)
        finally:
            await agent.close()


async def test_a_token_the_queue_signs_does_not_wait_for_a_registry_that_is_down(
    tmp_path: Path, queue_env: dict[str, str], own_registry: ServiceProcess
) -> None:
    """The queue registers its signer once the registry answers (the first Enqueue's job resolved), so an
    outage after that delays no signed token."""
    async with in_process_queue(_outage_settings(tmp_path, queue_env, own_registry)) as service:
        queue = await service.new_queue()
        name = await service.enqueue(queue, "train")  # no agent yet: it waits PENDING
        tokens: Any = service.parts.dispatcher._tokens
        await eventually(lambda: tokens._signer_id, "the signer to be registered")
        own_registry.terminate()
        agent = await ScriptedAgent(service.address).connect([queue])
        try:
            assignment = (await agent.next("assignment")).assignment
            assert (assignment.item.name, assignment.attempt) == (name, 1)
            assert "." in assignment.run_token  # signed here: tko_{signer}_{claims}.{signature}
            assert not service.parts.dispatcher._mint_failures
        finally:
            await agent.close()


# ----- secure queues, secrets, rate limits ---------------------------------------------------------------


async def test_queue_security_fields_are_stored_updated_and_given_to_the_attempt(
    queues: Stub, new_queue: NewQueue, job: str, queue_address: str
) -> None:
    queue = await new_queue(
        secure=True,
        secrets=[
            queue_pb2.SecretMount(secret="db-password", env="DB_PASSWORD"),
            queue_pb2.SecretMount(secret="projects/qtest/secrets/cert", file="cert.pem"),
        ],
    )
    shown = (await queues.GetQueue(queue_pb2.GetQueueRequest(name=queue))).queue
    assert shown.secure
    assert not shown.allow_host_paths
    assert [(m.secret, m.env, m.file) for m in shown.secrets] == [
        ("projects/qtest/secrets/db-password", "DB_PASSWORD", ""),
        ("projects/qtest/secrets/cert", "", "cert.pem"),
    ]
    refused = await refusal(
        queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, entrypoint=["python", "evil.py"]))
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(refused) == ("SECURE_QUEUE_OVERRIDE", ["entrypoint"])

    updated = (
        await queues.UpdateQueue(
            queue_pb2.UpdateQueueRequest(
                queue=queue_pb2.Queue(
                    name=queue,
                    secure=False,
                    allow_host_paths=True,
                    secrets=[queue_pb2.SecretMount(secret="db-password", env="DB_PASSWORD")],
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["secure", "allow_host_paths", "secrets"]),
            )
        )
    ).queue
    assert (updated.secure, updated.allow_host_paths, len(updated.secrets)) == (False, True, 1)

    item = (
        await queues.Enqueue(
            queue_pb2.EnqueueRequest(
                queue=queue,
                job=job,
                secrets=[
                    queue_pb2.SecretMount(secret="other-password", env="DB_PASSWORD"),
                    queue_pb2.SecretMount(secret="token", file="token.txt"),
                ],
            )
        )
    ).item
    assert [m.secret for m in item.secrets] == [
        "projects/qtest/secrets/other-password",
        "projects/qtest/secrets/token",
    ]
    agent = await ScriptedAgent(queue_address).connect([queue])
    try:
        assignment = (await agent.next("assignment")).assignment
        # The item's mount of DB_PASSWORD replaces the queue's.
        assert [(m.secret, m.env, m.file) for m in assignment.secrets] == [
            ("projects/qtest/secrets/other-password", "DB_PASSWORD", ""),
            ("projects/qtest/secrets/token", "", "token.txt"),
        ]
    finally:
        await agent.close()


async def test_enqueues_beyond_the_rate_of_a_key_are_refused_and_store_nothing(
    tmp_path: Path, queue_env: dict[str, str], job: str
) -> None:
    settings = QueueSettings(
        home=tmp_path,
        listen=["127.0.0.1:0"],
        registry_address=queue_env["TAKEOFF_REGISTRY_ADDRESS"],
        database_url=queue_env.get("TAKEOFF_DATABASE_URL"),
        enqueues_per_second=0.01,
        enqueue_burst=2,
    )
    async with in_process_queue(settings) as service:
        queue = await service.new_queue()
        await service.enqueue(queue, job)
        await service.enqueue(queue, job)
        refused = await refusal(service.queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job)))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_details(refused)[0] == "RATE_LIMITED"
        listed = await service.queues.ListItems(queue_pb2.ListItemsRequest(parent=queue))
        assert len(listed.items) == 2
        assert ADMIN_KEY not in (refused.details() or "")
