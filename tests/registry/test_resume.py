"""Resume: a retried attempt's run records the run it continues, and AttachRun hands the job that run's last
step and summary when it asks (``takeoff.init(resume=...)``)."""

from __future__ import annotations

import grpc
from google.protobuf import struct_pb2

from takeoff.v1 import common_pb2, keys_pb2, runs_pb2, runs_pb2_grpc
from tests.registry.conftest import Registry, failure

ITEM = "projects/demo/queues/gpu/items/item-1"


async def create(registry: Registry, run_id: str, attempt: int, item: str = ITEM) -> runs_pb2.Run:
    request = runs_pb2.CreateRunRequest(
        parent="projects/demo", run_id=run_id, run=runs_pb2.Run(queue_item=item, attempt=attempt)
    )
    return (await registry.runs.CreateRun(request)).run


async def test_a_retried_attempt_continues_the_previous_attempts_run(registry: Registry) -> None:
    first = await create(registry, "attempt-1", 1)
    await registry.runs.AttachRun(runs_pb2.AttachRunRequest(name=first.name))
    await registry.runs.BatchLogMetrics(
        runs_pb2.BatchLogMetricsRequest(
            name=first.name,
            rows=[runs_pb2.MetricRow(step=step, values={"loss": 1.0 / step}) for step in (10, 41)],
        )
    )
    summary = struct_pb2.Struct()
    summary.update({"best_loss": 0.02})
    await registry.runs.UpdateSummary(runs_pb2.UpdateSummaryRequest(name=first.name, summary=summary))
    await create(registry, "other-item", 2, item="projects/demo/queues/gpu/items/item-2")
    second = await create(registry, "attempt-2", 2)

    assert first.resumed_from == ""
    assert second.resumed_from == first.name
    listed = await registry.runs.ListRuns(runs_pb2.ListRunsRequest(parent="projects/demo", queue_item=ITEM))
    assert [(run.name, run.resumed_from) for run in listed.runs] == [
        (second.name, first.name),
        (first.name, ""),
    ]

    # The job's run token reads the earlier run here without a grant on it.
    token = await registry.keys.MintRunToken(
        keys_pb2.MintRunTokenRequest(
            run=second.name, item=ITEM, job_version="projects/demo/jobs/train/versions/0"
        )
    )
    async with registry.channel(token.secret) as channel:
        attached = await runs_pb2_grpc.RunServiceStub(channel).AttachRun(
            runs_pb2.AttachRunRequest(name=second.name, resume=runs_pb2.RESUME_MODE_ALLOW)
        )
    resumed = attached.resumed_from_run
    assert (resumed.name, resumed.last_step, resumed.history_length) == (first.name, 41, 2)
    assert dict(resumed.summary) == {"best_loss": 0.02}
    assert attached.run.resumed_from == first.name

    # An attempt whose predecessor got no run (it failed before starting) continues the latest that did.
    fourth = await create(registry, "attempt-4", 4)
    assert fourth.resumed_from == second.name
    never = await registry.runs.AttachRun(
        runs_pb2.AttachRunRequest(name=fourth.name, resume=runs_pb2.RESUME_MODE_NEVER)
    )
    assert not never.HasField("resumed_from_run")

    # A run its job never attached (the agent lost before the job started) has nothing to continue from.
    await create(registry, "attempt-5", 5)
    sixth = await create(registry, "attempt-6", 6)
    assert sixth.resumed_from == fourth.name


async def test_must_resume_without_an_earlier_run_fails_and_changes_nothing(registry: Registry) -> None:
    first = await create(registry, "attempt-1", 1)
    lone = (await registry.runs.CreateRun(runs_pb2.CreateRunRequest(parent="projects/demo"))).run

    for run in (first, lone):
        refused = await failure(
            registry.runs.AttachRun(
                runs_pb2.AttachRunRequest(name=run.name, resume=runs_pb2.RESUME_MODE_MUST)
            )
        )
        assert (refused.code, refused.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOTHING_TO_RESUME")
        still = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))).run
        assert still.state == common_pb2.RUN_STATE_STARTING

    allowed = await registry.runs.AttachRun(
        runs_pb2.AttachRunRequest(name=first.name, resume=runs_pb2.RESUME_MODE_ALLOW)
    )
    assert allowed.run.state == common_pb2.RUN_STATE_RUNNING
    assert not allowed.HasField("resumed_from_run")

    unknown = await failure(registry.runs.AttachRun(runs_pb2.AttachRunRequest(name=lone.name, resume=9)))  # type: ignore[arg-type]
    assert (unknown.code, unknown.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["resume"])
