"""KeyService on a real registry: each kind of key and what it may do, secrets shown once and stored as
digests, revocation reaching calls and open streams within 5 s, run tokens, bad input, the bootstrap key."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from takeoff.v1 import (
    common_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
)
from takeoff_registry.__main__ import wire
from takeoff_server.errors import ServiceFailed
from tests.keys import ADMIN_KEY
from tests.processes import until
from tests.registry.conftest import (
    Failure,
    Registry,
    failure,
    failure_of,
    registry_settings,
    start_registry,
)

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
REVOCATION_BOUND = 5.0
"""Seconds within which every call and stream of a revoked key is refused (keys.proto, RevokeKey)."""

RUN = "projects/demo/runs/run-1"
ITEM = "projects/demo/queues/gpu/items/item-1"
JOB_VERSION = "projects/demo/jobs/train/versions/0"


def project_key(
    *projects: str, role: keys_pb2.ProjectRole.ValueType = keys_pb2.PROJECT_ROLE_WRITE
) -> keys_pb2.Key:
    return keys_pb2.Key(kind=keys_pb2.KEY_KIND_PROJECT, projects=projects, role=role)


async def create_key(registry: Registry, key: keys_pb2.Key, key_id: str = "") -> keys_pb2.CreateKeyResponse:
    return await registry.keys.CreateKey(keys_pb2.CreateKeyRequest(key=key, key_id=key_id))


class Stubs:
    """The registry's stubs on a channel presenting one key."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.jobs = jobs_pb2_grpc.JobServiceStub(channel)
        self.runs = runs_pb2_grpc.RunServiceStub(channel)
        self.keys = keys_pb2_grpc.KeyServiceStub(channel)


class As:
    """``async with As(registry, secret) as stubs``: stubs presenting ``secret``."""

    def __init__(self, registry: Registry, secret: str | None) -> None:
        self._channel = registry.channel(secret)

    async def __aenter__(self) -> Stubs:
        return Stubs(self._channel)

    async def __aexit__(self, *_: object) -> None:
        await self._channel.close()


async def refused_within(call: Callable[[], Awaitable[Any]], seconds: float) -> tuple[Failure, float]:
    """Repeat ``call`` until it fails with UNAUTHENTICATED; the failure and how long that took."""
    started = time.monotonic()
    while True:
        try:
            await call()
        except grpc.aio.AioRpcError as error:
            if error.code() != UNAUTHENTICATED:
                raise
            return failure_of(error), time.monotonic() - started
        assert time.monotonic() - started < seconds, f"still admitted after {seconds}s"
        await asyncio.sleep(0.05)


async def image_version(registry: Registry, project: str = "demo", job: str = "train") -> str:
    response = await registry.jobs.CreateJobVersion(
        jobs_pb2.CreateJobVersionRequest(
            parent=f"projects/{project}/jobs/{job}",
            allow_missing=True,
            version=common_pb2.JobVersion(
                source=common_pb2.JobSource(image=common_pb2.ImageSource(reference="python:3.12"))
            ),
        )
    )
    return response.version.name


# Kinds.


async def test_each_kind_of_key_verifies_with_the_permissions_of_its_kind(registry: Registry) -> None:
    made = {
        "admin": await create_key(registry, keys_pb2.Key(kind=keys_pb2.KEY_KIND_ADMIN, display_name="ops")),
        "project": await create_key(registry, project_key("projects/a", role=keys_pb2.PROJECT_ROLE_READ)),
        "agent": await create_key(
            registry, keys_pb2.Key(kind=keys_pb2.KEY_KIND_AGENT, queues=["projects/a/queues/gpu"])
        ),
        "service": await create_key(
            registry, keys_pb2.Key(kind=keys_pb2.KEY_KIND_SERVICE, service=keys_pb2.SERVICE_ROLE_BUILDER)
        ),
    }
    for kind, created in made.items():
        key_id = created.key.name.removeprefix("keys/")
        assert created.secret.startswith(f"tko_{key_id}_"), kind
        assert len(created.secret) >= len(f"tko_{key_id}_") + 43, kind  # 256 random bits
        assert created.key.secret_hint == f"tko_{key_id}_"
        assert created.key.creator == "keys/bootstrap-admin"
        assert not created.key.HasField("revoke_time")
        verified = await registry.keys.VerifyKey(keys_pb2.VerifyKeyRequest(secret=created.secret))
        assert verified.valid, kind
        assert verified.key == created.key
    assert "keys.write on *" in made["admin"].key.permissions
    assert made["project"].key.permissions == [
        "artifacts.read on projects/a",
        "jobs.read on projects/a",
        "queues.read on projects/a",
        "runs.read on projects/a",
        "secrets.read on projects/a",
    ]
    assert "queues.lease on projects/a/queues/gpu" in made["agent"].key.permissions
    assert made["service"].key.permissions == ["jobs.read on *", "keys.verify on *"]

    unknown = await registry.keys.VerifyKey(keys_pb2.VerifyKeyRequest(secret="tko_nobody_" + "x" * 43))
    assert unknown == keys_pb2.VerifyKeyResponse(valid=False)


async def test_a_project_key_may_do_what_its_role_allows_in_its_projects_only(registry: Registry) -> None:
    await registry.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/a", job_id="train"))
    await registry.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/b", job_id="train"))
    reader = (await create_key(registry, project_key("projects/a", role=keys_pb2.PROJECT_ROLE_READ))).secret
    writer = (await create_key(registry, project_key("projects/a"))).secret

    async with As(registry, reader) as read_only:
        await read_only.jobs.GetJob(jobs_pb2.GetJobRequest(name="projects/a/jobs/train"))
        refused = await failure(read_only.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/a")))
        assert (refused.code, refused.reason) == (DENIED, "PERMISSION_DENIED")
        assert refused.metadata["permission"] == "jobs.write"
        elsewhere = await failure(read_only.jobs.GetJob(jobs_pb2.GetJobRequest(name="projects/b/jobs/train")))
        assert (elsewhere.code, elsewhere.metadata["resource"]) == (DENIED, "projects/b/jobs/train")
        keys = await failure(read_only.keys.ListKeys(keys_pb2.ListKeysRequest()))
        assert (keys.code, keys.metadata["permission"]) == (DENIED, "keys.read")

    async with As(registry, writer) as read_write:
        await read_write.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/a", job_id="eval"))
        refused = await failure(
            read_write.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/b", job_id="eval"))
        )
        assert (refused.code, refused.metadata["resource"]) == (DENIED, "projects/b")
        # A project id that merely starts with "a" is another project.
        prefix = await failure(read_write.jobs.ListJobs(jobs_pb2.ListJobsRequest(parent="projects/ab")))
        assert prefix.code == DENIED


async def test_agent_and_service_keys_reach_only_what_their_services_need(registry: Registry) -> None:
    version = await image_version(registry, "a")
    agent = (
        await create_key(
            registry, keys_pb2.Key(kind=keys_pb2.KEY_KIND_AGENT, queues=["projects/a/queues/gpu"])
        )
    ).secret
    queue = (
        await create_key(
            registry, keys_pb2.Key(kind=keys_pb2.KEY_KIND_SERVICE, service=keys_pb2.SERVICE_ROLE_QUEUE)
        )
    ).secret
    async with As(registry, agent) as as_agent:
        got = await as_agent.jobs.GetJobVersion(jobs_pb2.GetJobVersionRequest(name=version))
        assert got.version.name == version
        await as_agent.keys.VerifyKey(keys_pb2.VerifyKeyRequest(secret=queue))
        other = await failure(
            as_agent.jobs.GetJobVersion(
                jobs_pb2.GetJobVersionRequest(name="train:latest", project="projects/b")
            )
        )
        assert (other.code, other.metadata["resource"]) == (DENIED, "projects/b/jobs/train:latest")
        assert (await failure(as_agent.keys.CreateKey(keys_pb2.CreateKeyRequest()))).code == DENIED
    async with As(registry, queue) as as_queue:
        minted = await as_queue.keys.MintRunToken(
            keys_pb2.MintRunTokenRequest(run=RUN, item=ITEM, job_version=JOB_VERSION)
        )
        assert minted.key.creator.startswith("keys/key-")
        assert (
            await failure(as_queue.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/a")))
        ).code == (DENIED)
        assert (await failure(as_queue.keys.ListKeys(keys_pb2.ListKeysRequest()))).code == DENIED


async def test_calls_without_a_valid_key_are_unauthenticated(registry: Registry) -> None:
    for secret, reason in ((None, "KEY_MISSING"), ("tko_nobody_" + "x" * 43, "KEY_INVALID")):
        async with As(registry, secret) as anonymous:
            refused = await failure(anonymous.keys.ListKeys(keys_pb2.ListKeysRequest()))
            assert (refused.code, refused.reason) == (UNAUTHENTICATED, reason)


# Secrets shown once, stored as digests.


async def test_the_secret_is_shown_once_and_stored_only_as_its_sha256(registry: Registry) -> None:
    created = await create_key(registry, project_key("projects/a"), key_id="ci-bot")
    assert created.key.name == "keys/ci-bot"
    got = (await registry.keys.GetKey(keys_pb2.GetKeyRequest(name="keys/ci-bot"))).key
    assert got == created.key
    listed = await registry.keys.ListKeys(keys_pb2.ListKeysRequest())
    assert created.key in listed.keys
    for answer in (
        got,
        listed,
        (await registry.keys.RevokeKey(keys_pb2.RevokeKeyRequest(name=got.name))).key,
    ):
        assert created.secret.encode() not in answer.SerializeToString()

    async with registry.database.engine.connect() as connection:
        row = (await connection.execute(sa.text("SELECT * FROM registry_keys WHERE key_id = 'ci-bot'"))).one()
    assert row.secret_digest == hashlib.sha256(created.secret.encode()).hexdigest()
    random_part = created.secret.removeprefix("tko_ci-bot_")
    assert not any(random_part in str(value) for value in row)


# Listing.


async def test_list_keys_pages_oldest_first_and_shows_revoked_keys_and_run_tokens_when_asked(
    registry: Registry,
) -> None:
    made = [
        (await create_key(registry, project_key("projects/a"), key_id=f"k{n}")).key.name for n in range(3)
    ]
    await registry.keys.RevokeKey(keys_pb2.RevokeKeyRequest(name=made[1]))
    await registry.keys.MintRunToken(
        keys_pb2.MintRunTokenRequest(run=RUN, item=ITEM, job_version=JOB_VERSION)
    )

    async def names(**request: Any) -> list[str]:
        found, token = [], ""
        while True:
            page = await registry.keys.ListKeys(
                keys_pb2.ListKeysRequest(page_size=1, page_token=token, **request)
            )
            assert len(page.keys) <= 1
            found += [key.name for key in page.keys]
            if not (token := page.next_page_token):
                return found

    assert await names() == ["keys/bootstrap-admin", made[0], made[2]]
    assert await names(show_revoked=True) == ["keys/bootstrap-admin", *made]
    with_tokens = await names(show_run_tokens=True)
    assert len(with_tokens) == 4
    assert with_tokens[-1].startswith("keys/run-")

    first = await registry.keys.ListKeys(keys_pb2.ListKeysRequest(page_size=1))
    other_query = await failure(
        registry.keys.ListKeys(keys_pb2.ListKeysRequest(page_token=first.next_page_token, show_revoked=True))
    )
    assert (other_query.code, other_query.reason) == (INVALID, "PAGE_TOKEN_INVALID")


# Revocation.


async def test_a_revoked_key_is_refused_within_5_seconds(registry: Registry) -> None:
    await registry.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/a", job_id="train"))
    created = await create_key(registry, project_key("projects/a"))
    async with As(registry, created.secret) as holder:
        await holder.jobs.ListJobs(jobs_pb2.ListJobsRequest(parent="projects/a"))  # verified, now cached
        revoked = await registry.keys.RevokeKey(keys_pb2.RevokeKeyRequest(name=created.key.name))
        assert revoked.key.HasField("revoke_time")
        verified = await registry.keys.VerifyKey(keys_pb2.VerifyKeyRequest(secret=created.secret))
        assert not verified.valid  # VerifyKey answers from the store at once
        refused, took = await refused_within(
            lambda: holder.jobs.ListJobs(jobs_pb2.ListJobsRequest(parent="projects/a")), REVOCATION_BOUND
        )
    assert refused.reason == "KEY_INVALID"
    assert took < REVOCATION_BOUND

    again = await registry.keys.RevokeKey(keys_pb2.RevokeKeyRequest(name=created.key.name))
    assert again.key.revoke_time == revoked.key.revoke_time  # revoking again changes nothing
    missing = await failure(registry.keys.RevokeKey(keys_pb2.RevokeKeyRequest(name="keys/nobody")))
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND")


@pytest.mark.parametrize("method", ["ReadLogs", "ReadMetrics"])
async def test_a_follow_stream_of_a_revoked_key_ends_within_5_seconds(
    registry: Registry, method: str
) -> None:
    run = (await registry.runs.CreateRun(runs_pb2.CreateRunRequest(parent="projects/a"))).run
    await registry.runs.AppendLogs(
        runs_pb2.AppendLogsRequest(name=run.name, lines=[runs_pb2.LogLine(text="hi")])
    )
    await registry.runs.BatchLogMetrics(
        runs_pb2.BatchLogMetricsRequest(name=run.name, rows=[runs_pb2.MetricRow(step=0, values={"x": 1.0})])
    )
    created = await create_key(registry, project_key("projects/a", role=keys_pb2.PROJECT_ROLE_READ))
    async with As(registry, created.secret) as reader:
        if method == "ReadLogs":
            follow: Any = reader.runs.ReadLogs(runs_pb2.ReadLogsRequest(name=run.name, follow=True))
        else:
            follow = reader.runs.ReadMetrics(runs_pb2.ReadMetricsRequest(name=run.name, follow=True))
        await follow.read()  # the stream is open and served
        await registry.keys.RevokeKey(keys_pb2.RevokeKeyRequest(name=created.key.name))
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(follow.read(), timeout=REVOCATION_BOUND + 5)
        took = time.monotonic() - started
    refused = failure_of(ended.value)
    assert (refused.code, refused.reason) == (UNAUTHENTICATED, "KEY_REVOKED")
    assert took < REVOCATION_BOUND


# Run tokens.


async def test_a_run_token_writes_its_run_and_nothing_else(registry: Registry) -> None:
    version = await image_version(registry)
    minted = await registry.keys.MintRunToken(
        keys_pb2.MintRunTokenRequest(
            run=RUN, item=ITEM, job_version=version, secrets=["projects/demo/secrets/HF_TOKEN"]
        )
    )
    assert minted.key.kind == keys_pb2.KEY_KIND_RUN
    assert (minted.key.run, minted.key.item, minted.key.job_version) == (RUN, ITEM, version)
    assert minted.key.creator == "keys/bootstrap-admin"
    assert minted.key.permissions == [
        "artifacts.read on projects/demo",
        f"artifacts.write on {RUN}",
        f"jobs.read on {version}",
        f"runs.read on {RUN}",
        f"runs.write on {RUN}",
        "secrets.access on projects/demo/secrets/HF_TOKEN",
    ]
    async with As(registry, minted.secret) as token:
        created = await token.runs.CreateRun(
            runs_pb2.CreateRunRequest(
                parent="projects/demo", run_id="run-1", run=runs_pb2.Run(job_version=version)
            )
        )
        assert created.run.name == RUN
        await token.runs.AppendLogs(
            runs_pb2.AppendLogsRequest(name=RUN, lines=[runs_pb2.LogLine(text="training")])
        )
        await token.jobs.GetJobVersion(jobs_pb2.GetJobVersionRequest(name=version))
        await token.runs.FinishRun(runs_pb2.FinishRunRequest(name=RUN, state=common_pb2.RUN_STATE_FINISHED))

        refusals: dict[str, Awaitable[Any]] = {
            "another run": token.runs.CreateRun(
                runs_pb2.CreateRunRequest(parent="projects/demo", run_id="run-2")
            ),
            "a generated run": token.runs.CreateRun(runs_pb2.CreateRunRequest(parent="projects/demo")),
            "another run's logs": token.runs.AppendLogs(
                runs_pb2.AppendLogsRequest(name="projects/demo/runs/run-10")
            ),
            "the project's runs": token.runs.ListRuns(runs_pb2.ListRunsRequest(parent="projects/demo")),
            "a job": token.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/demo", job_id="x")),
            "a key": token.keys.MintRunToken(keys_pb2.MintRunTokenRequest(run=RUN)),
        }
        for what, call in refusals.items():
            assert (await failure(call)).code == DENIED, what

        first = await registry.keys.RevokeRunTokens(keys_pb2.RevokeRunTokensRequest(run=RUN))
        assert first.revoked == 1
        again = await registry.keys.RevokeRunTokens(keys_pb2.RevokeRunTokensRequest(run=RUN))
        assert again.revoked == 0
        none = await registry.keys.RevokeRunTokens(
            keys_pb2.RevokeRunTokensRequest(run="projects/demo/runs/x")
        )
        assert none.revoked == 0
        refused, took = await refused_within(
            lambda: token.runs.GetRun(runs_pb2.GetRunRequest(name=RUN)), REVOCATION_BOUND
        )
    assert refused.reason == "KEY_INVALID"
    assert took < REVOCATION_BOUND


async def test_a_log_metrics_stream_of_a_revoked_run_token_ends_within_5_seconds(registry: Registry) -> None:
    minted = await registry.keys.MintRunToken(
        keys_pb2.MintRunTokenRequest(run=RUN, item=ITEM, job_version=JOB_VERSION)
    )
    await registry.runs.CreateRun(runs_pb2.CreateRunRequest(parent="projects/demo", run_id="run-1"))
    sent = asyncio.Event()
    never = asyncio.Event()

    async def batches() -> AsyncIterator[runs_pb2.LogMetricsRequest]:
        yield runs_pb2.LogMetricsRequest(name=RUN, rows=[runs_pb2.MetricRow(step=0, values={"x": 1.0})])
        sent.set()
        await never.wait()  # the job keeps the stream open without sending

    async with As(registry, minted.secret) as token:
        call = token.runs.LogMetrics(batches())
        await sent.wait()

        async def one_row() -> bool:
            return (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=RUN))).run.history_length == 1

        await until(one_row, "the first batch to be stored (the stream is open and served)")
        await registry.keys.RevokeRunTokens(keys_pb2.RevokeRunTokensRequest(run=RUN))
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call, timeout=REVOCATION_BOUND + 5)
        took = time.monotonic() - started
        never.set()
    refused = failure_of(ended.value)
    assert (refused.code, refused.reason) == (UNAUTHENTICATED, "KEY_REVOKED")
    assert took < REVOCATION_BOUND


async def test_mint_run_token_checks_the_names(registry: Registry) -> None:
    refused = await failure(
        registry.keys.MintRunToken(
            keys_pb2.MintRunTokenRequest(
                run="projects/demo/runs/run-1",
                item="gpu/items/1",
                job_version="projects/demo/jobs/train",
                secrets=["projects/other/secrets/HF", "HF"],
            )
        )
    )
    assert refused.code == INVALID
    assert refused.fields == ["item", "job_version", "secrets[1]", "secrets[0]"]


# Bad input.


@pytest.mark.parametrize(
    ("key", "key_id", "fields"),
    [
        (keys_pb2.Key(), "", ["key.kind"]),
        (keys_pb2.Key(kind=keys_pb2.KEY_KIND_RUN), "", ["key.kind"]),
        (keys_pb2.Key(kind=keys_pb2.KeyKind.ValueType(42)), "", ["key.kind"]),
        (keys_pb2.Key(kind=keys_pb2.KEY_KIND_PROJECT), "", ["key.projects", "key.role"]),
        (project_key("a", "projects/b/c"), "", ["key.projects[0]", "key.projects[1]"]),
        (keys_pb2.Key(kind=keys_pb2.KEY_KIND_AGENT, queues=["projects/a"]), "", ["key.queues[0]"]),
        (keys_pb2.Key(kind=keys_pb2.KEY_KIND_AGENT), "", ["key.queues"]),
        (keys_pb2.Key(kind=keys_pb2.KEY_KIND_SERVICE), "", ["key.service"]),
        (
            keys_pb2.Key(kind=keys_pb2.KEY_KIND_ADMIN, projects=["projects/a"], display_name="x" * 201),
            "Bad_Id",
            ["key_id", "key.display_name", "key.projects"],
        ),
        (keys_pb2.Key(kind=keys_pb2.KEY_KIND_ADMIN), "1abc", ["key_id"]),
        (keys_pb2.Key(kind=keys_pb2.KEY_KIND_ADMIN), "a" * 64, ["key_id"]),
    ],
)
async def test_bad_create_key_requests_name_each_bad_field(
    registry: Registry, key: keys_pb2.Key, key_id: str, fields: list[str]
) -> None:
    refused = await failure(registry.keys.CreateKey(keys_pb2.CreateKeyRequest(key=key, key_id=key_id)))
    assert refused.code == INVALID
    assert refused.fields == fields
    listed = await registry.keys.ListKeys(keys_pb2.ListKeysRequest(show_revoked=True))
    assert [key.name for key in listed.keys] == ["keys/bootstrap-admin"]  # nothing was created


async def test_a_key_id_is_taken_once(registry: Registry) -> None:
    await create_key(registry, project_key("projects/a"), key_id="ci")
    refused = await failure(create_key(registry, project_key("projects/a"), key_id="ci"))
    assert (refused.code, refused.reason) == (grpc.StatusCode.ALREADY_EXISTS, "KEY_ALREADY_EXISTS")
    bad_name = await failure(registry.keys.GetKey(keys_pb2.GetKeyRequest(name="ci")))
    assert (bad_name.code, bad_name.reason, bad_name.fields) == (INVALID, "NAME_INVALID", ["name"])


# The bootstrap admin key.


async def test_the_bootstrap_key_is_imported_once_across_restarts(database_url: str, tmp_path: Path) -> None:
    settings = registry_settings(tmp_path / "home", database_url)
    assert settings.bootstrap_admin_key_file is not None  # from tests/keys.py
    second_file = tmp_path / "second.key"
    second_secret = "tko_second_" + "s" * 40
    second_file.write_text(f"  {second_secret}\n")
    for _ in range(2):
        async for registry in start_registry(settings):
            listed = await registry.keys.ListKeys(keys_pb2.ListKeysRequest(show_revoked=True))
            assert [(key.name, key.creator, key.kind) for key in listed.keys] == [
                ("keys/bootstrap-admin", "bootstrap", keys_pb2.KEY_KIND_ADMIN)
            ]
    # Another file's secret is another key; the first id being taken, it gets the next.
    for _ in range(2):
        async for registry in start_registry(
            settings.model_copy(update={"bootstrap_admin_key_file": second_file})
        ):
            listed = await registry.keys.ListKeys(keys_pb2.ListKeysRequest())
            assert [key.name for key in listed.keys] == ["keys/bootstrap-admin", "keys/bootstrap-admin-2"]
            async with As(registry, second_secret) as second:
                await second.keys.GetKey(keys_pb2.GetKeyRequest(name="keys/bootstrap-admin-2"))
            async with As(registry, ADMIN_KEY) as first:
                await first.keys.GetKey(keys_pb2.GetKeyRequest(name="keys/bootstrap-admin"))


@pytest.mark.parametrize("content", [None, "short", "tko_" + "x" * 20 + " " + "y" * 20])
async def test_a_bad_bootstrap_file_fails_the_start_naming_the_file_not_its_content(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "admin.key"
    if content is not None:
        path.write_text(content)
    # The environment wins over arguments (tests/keys.py sets the file for every registry).
    settings = registry_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'registry.db'}").model_copy(
        update={"bootstrap_admin_key_file": path}
    )
    async with AsyncExitStack() as resources:
        with pytest.raises(ServiceFailed) as raised:
            await wire(settings, resources)
    assert str(path) in str(raised.value)
    if content:
        assert content not in str(raised.value)
        assert "x" * 10 not in str(raised.value)
